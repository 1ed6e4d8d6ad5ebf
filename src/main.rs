//! The `hvac-edge` binary: parse arguments, start logging, dispatch, map errors to exit codes.

use clap::Parser;
use hvac_edge::cli::{self, Cli, Command, QueueCommand, SinksCommand};
use hvac_edge::{config, daemon, demo, telemetry};
use tokio_util::sync::CancellationToken;

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::CheckConfig { config } => cli::check_config::run(&config),
        Command::Doctor {
            config,
            service_user,
            json,
        } => cli::doctor::run(&config, service_user.as_deref(), json),
        Command::Reload {
            config,
            pid,
            timeout_secs,
            json,
        } => cli::reload::run(
            &config,
            pid,
            std::time::Duration::from_secs(timeout_secs),
            json,
        ),
        Command::Queue { command } => {
            let res = match command {
                QueueCommand::Stats { db, json } => {
                    db.path().and_then(|p| cli::queue::stats(&p, json))
                }
                QueueCommand::List {
                    db,
                    filter,
                    limit,
                    json,
                } => std::process::exit(cli::queue::list_cmd(&db, &filter, limit, json)),
                QueueCommand::Show { id, db, json } => {
                    std::process::exit(cli::queue::show_cmd(&db, &id, json))
                }
                QueueCommand::Tail {
                    db,
                    filter,
                    lines,
                    follow,
                    max,
                    timeout_secs,
                    json,
                } => std::process::exit(cli::queue::tail_cmd(
                    &db,
                    &filter,
                    cli::queue::Tail {
                        lines,
                        follow,
                        max,
                        timeout: timeout_secs.map(std::time::Duration::from_secs),
                        json,
                    },
                )),
                QueueCommand::Export {
                    db,
                    filter,
                    format,
                    out,
                    limit,
                } => std::process::exit(cli::queue::export_cmd(
                    &db,
                    &filter,
                    format,
                    out.as_deref(),
                    limit,
                )),
                QueueCommand::DeadLetters {
                    db,
                    sink,
                    limit,
                    json,
                } => db
                    .path()
                    .and_then(|p| cli::queue::dead_letters(&p, sink.as_deref(), limit, json)),
                QueueCommand::Retry {
                    db,
                    sink,
                    reason,
                    events,
                    since,
                    until,
                    dry_run,
                    wait,
                    json,
                } => {
                    let sel = cli::control::Selection {
                        sink,
                        reason,
                        events,
                        since,
                        until,
                        configured: db.sink_names(),
                    };
                    exit(db.path().and_then(|p| {
                        cli::control::retry(
                            &p,
                            &sel,
                            dry_run,
                            wait.map(std::time::Duration::from_secs),
                            json,
                        )
                    }));
                }
                QueueCommand::Purge {
                    db,
                    older_than,
                    sink,
                    reason,
                    yes,
                    dry_run,
                    json,
                } => {
                    let sel = cli::control::Selection {
                        sink,
                        reason,
                        ..Default::default()
                    };
                    exit(db.path().and_then(|p| {
                        cli::control::purge(&p, &sel, &older_than, yes, dry_run, json)
                    }));
                }
            };
            report(res)
        }
        Command::Audit { db, limit, json } => {
            report(db.path().and_then(|p| cli::control::audit(&p, limit, json)))
        }
        Command::SupportBundle { db, output } => report(
            cli::support_bundle::run(&db.config, db.db.as_deref(), output.as_deref()).map(|p| {
                println!(
                    "support bundle written: {} (no secrets: secret files are not read, secret-looking values are redacted)",
                    p.display()
                );
            }),
        ),
        Command::Sinks {
            name,
            db,
            json,
            command,
        } => {
            let Some(command) = command else {
                std::process::exit(report(
                    db.path()
                        .and_then(|p| cli::sinks::show(&p, name.as_deref(), json)),
                ));
            };
            let res = match command {
                SinksCommand::Enable { name, note, db } => db
                    .path()
                    .and_then(|p| cli::sinks::set(&p, &name, true, note.as_deref())),
                SinksCommand::Disable { name, note, db } => db
                    .path()
                    .and_then(|p| cli::sinks::set(&p, &name, false, note.as_deref())),
                SinksCommand::Test {
                    name,
                    config,
                    timeout_secs,
                    json,
                } => {
                    exit(cli::control::test_sink(
                        &config,
                        &name,
                        std::time::Duration::from_secs(timeout_secs),
                        json,
                    ));
                }
            };
            report(res)
        }
        Command::Status { db, json } => cli::status::cmd(&db, json),
        Command::Devices {
            device,
            db,
            window,
            until,
            json,
        } => cli::devices::cmd(&db, device.as_deref(), &window, until.as_deref(), json),
        Command::Sources { db, json } => {
            report(db.path().and_then(|p| cli::sources::run(&p, json)))
        }
        Command::Run { config, allow_root } => run_daemon(&config, allow_root),
        Command::Demo {
            duration_secs,
            outage_at_secs,
            outage_secs,
            quiet,
        } => {
            telemetry::init("warn", config::LogFormat::Plain);
            let opts = demo::DemoOptions {
                duration_secs,
                outage_at_secs,
                outage_secs,
                verbose: !quiet,
            };
            match runtime().and_then(|rt| rt.block_on(demo::run(opts))) {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hvac-edge")
        .build()?)
}

/// Exits with the command's own code, or 1 after printing its error.
fn exit(res: anyhow::Result<i32>) -> ! {
    let code = match res {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code)
}

fn report(res: anyhow::Result<()>) -> i32 {
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn run_daemon(path: &std::path::Path, allow_root: bool) -> i32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if !allow_root && unsafe { libc::geteuid() } == 0 {
        eprintln!(
            "error: refusing to run as root: run it as the system user hvac-edge (the systemd unit \
             does), or pass --allow-root"
        );
        // A setup problem like an invalid config: the unit must not restart it in a loop.
        return cli::EXIT_CONFIG;
    }
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            telemetry::init("info", config::LogFormat::Plain);
            tracing::error!("{e}");
            eprintln!("error: {e}");
            // Unreadable or invalid, it is a configuration problem: 78, which the unit does not
            // restart in a loop.
            return cli::EXIT_CONFIG;
        }
    };
    telemetry::init(&cfg.log.level, cfg.log.format);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return report(Err(e)),
    };
    let file = path.to_path_buf();
    let res = rt.block_on(async move {
        let token = CancellationToken::new();
        let (tx, requests) = tokio::sync::mpsc::channel(1);
        daemon::spawn_signal_handler(token.clone(), Some(tx))?;
        let reloads = daemon::Reloads {
            requests,
            load: Box::new({
                let file = file.clone();
                move || config::load(&file)
            }),
            path: file,
        };
        daemon::run_with_reloads(cfg, token, Some(reloads), None).await
    });
    match res {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            1
        }
    }
}
