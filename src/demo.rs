//! `hvac-edge demo`: the production pipeline on an embedded config, end to end, in one process.
//!
//! A simulated fleet feeds the same diff → SQLite outbox → signed HTTP sink as production; the
//! far end is an in-process [`Receiver`] that verifies every signature. Part way through the
//! receiver goes away (listener closed, 503 on open connections) and comes back: the events are
//! held in the outbox meanwhile, then drained in order. At the end the demo checks that every
//! committed event arrived exactly once by id, with no per-device `seq` gap or reordering.

use crate::config::{self, Config};
use crate::receiver::Receiver;
use crate::sinks::signing::SigningKey;
use crate::store::{self, outbox};
use anyhow::Context as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Timeline of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Total run time before the final drain, seconds.
    pub duration_secs: u64,
    /// When the receiver goes away, seconds after the start.
    pub outage_at_secs: u64,
    /// How long it stays away.
    pub outage_secs: u64,
    /// Print every event the receiver gets.
    pub verbose: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration_secs: 20,
            outage_at_secs: 6,
            outage_secs: 7,
            verbose: true,
        }
    }
}

/// Builds the demo config around a temp dir and a receiver address.
///
/// # Errors
/// When the embedded config does not parse or validate (a bug) or the secret cannot be written.
pub fn demo_config(dir: &std::path::Path, url: &str, secret: &str) -> anyhow::Result<Config> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut cfg: Config =
        toml::from_str(config::DEMO_TOML).context("embedded config/demo.toml does not parse")?;
    let secret_path = dir.join("whsec");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&secret_path)
        .with_context(|| format!("cannot write {}", secret_path.display()))?;
    std::io::Write::write_all(&mut f, secret.as_bytes())?;
    cfg.store.path = dir.join("hvac-edge-demo.db");
    let sink = cfg
        .sinks
        .http
        .first_mut()
        .context("demo config has no sink")?;
    sink.url = url.to_string();
    sink.signing_secret_file = Some(secret_path);
    if let Err(problems) = cfg.validate() {
        let list: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        anyhow::bail!("embedded demo config is invalid: {}", list.join("; "));
    }
    Ok(cfg)
}

/// Runs the demo; returns whether the delivery checks passed.
///
/// # Errors
/// Setup failures (temp dir, port, database).
pub async fn run(opts: DemoOptions) -> anyhow::Result<bool> {
    let dir = tempfile::Builder::new()
        .prefix("hvac-edge-demo-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let secret_bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    let secret = format!("whsec_{}", base64_std(&secret_bytes));
    let key = SigningKey::from_whsec(&secret).context("demo secret")?;
    let mut receiver = Receiver::start(([127, 0, 0, 1], 0).into(), Some(key), opts.verbose)
        .await
        .context("cannot start the demo receiver on 127.0.0.1")?;
    let url = format!("http://{}/v1/events", receiver.addr());
    let mut cfg = demo_config(dir.path(), &url, &secret)?;
    for sim in &mut cfg.sources.simulator {
        sim.max_observations = (sim.changes_per_sec * opts.duration_secs as f64).ceil() as u64;
    }
    let db = cfg.store.path.clone();
    println!(
        "hvac-edge demo: {} simulated thermostats -> diff -> SQLite outbox ({}) -> signed HTTP -> receiver at {}",
        cfg.sources.simulator.first().map_or(0, |s| s.devices),
        db.display(),
        url
    );
    println!(
        "  the receiver verifies every Standard Webhooks signature; it goes away at {}s for {}s\n",
        opts.outage_at_secs, opts.outage_secs
    );

    let token = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(crate::daemon::run(
        cfg.clone(),
        token.clone(),
        Some(ready_tx),
    ));
    let handles = ready_rx.await.context("the daemon did not start")?;
    let start = Instant::now();
    let mut down = false;
    let mut next_status = Duration::from_secs(2);
    while start.elapsed() < Duration::from_secs(opts.duration_secs) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if daemon.is_finished() {
            break;
        }
        let t = start.elapsed();
        if !down
            && t >= Duration::from_secs(opts.outage_at_secs)
            && t < Duration::from_secs(opts.outage_at_secs + opts.outage_secs)
        {
            receiver.stop();
            down = true;
            println!(
                "\n== {:>4.1}s receiver DOWN: events keep being committed to the outbox and are held ==\n",
                t.as_secs_f64()
            );
        }
        if down && t >= Duration::from_secs(opts.outage_at_secs + opts.outage_secs) {
            receiver
                .restart()
                .await
                .context("cannot bring the receiver back")?;
            down = false;
            println!(
                "\n== {:>4.1}s receiver UP again: the held events drain in order ==\n",
                t.as_secs_f64()
            );
        }
        if t >= next_status {
            next_status += Duration::from_secs(2);
            print_status(&db, t, &handles, &receiver);
        }
    }
    if down {
        receiver
            .restart()
            .await
            .context("cannot bring the receiver back")?;
    }
    // The simulator stops by itself (max_observations); wait, bounded, until the receiver has
    // every committed event, then shut the daemon down the way SIGTERM would.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut committed = handles.writer.events.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        committed = handles.writer.events.load(Ordering::Relaxed);
        if receiver.summary().unique_events >= committed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
    daemon
        .await
        .context("daemon task")?
        .context("daemon failed")?;
    // After the stop, so the sink's last progress is saved and "pending" reads 0.
    print_status(&db, start.elapsed(), &handles, &receiver);
    let s = receiver.summary();
    println!("\n== summary ==");
    println!("  events committed to the outbox : {committed}");
    println!("  events received (unique ids)   : {}", s.unique_events);
    println!("  duplicates dropped by id       : {}", s.duplicate_events);
    println!(
        "  signatures verified / rejected : {} / {}",
        s.signatures_verified, s.signatures_rejected
    );
    println!(
        "  answered 503 while down        : {}",
        s.refused_while_down
    );
    println!(
        "  per-device seq gaps / reorders : {} / {}",
        s.gaps, s.out_of_order
    );
    let ok = s.unique_events == committed
        && s.gaps == 0
        && s.out_of_order == 0
        && s.signatures_rejected == 0;
    println!(
        "  result                         : {}",
        if ok {
            "OK: nothing lost, nothing out of order"
        } else {
            "FAILED"
        }
    );
    Ok(ok)
}

fn print_status(db: &std::path::Path, t: Duration, h: &crate::daemon::Handles, r: &Receiver) {
    let pending = store::open(db, store::Mode::ReadOnly, &store::Options::default())
        .ok()
        .and_then(|c| outbox::queue_stats(&c, db, crate::telemetry::now_ms()).ok())
        .and_then(|q| {
            q.sinks
                .first()
                .map(|s| (s.pending, s.row.consecutive_failures))
        });
    let (pending, failures) = pending.unwrap_or((0, 0));
    println!(
        "-- {:>4.1}s committed {:>4} | received {:>4} | pending in outbox {:>4} | consecutive failures {}",
        t.as_secs_f64(),
        h.writer.events.load(Ordering::Relaxed),
        r.summary().unique_events,
        pending,
        failures
    );
}

fn base64_std(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
