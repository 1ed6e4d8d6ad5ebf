//! Deployment (issue 13): the daemon's topology.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_cannot_be_built_fails_the_start_before_the_database_is_opened() {
    let sb = Sandbox::new("deploy_build_first");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .webhook_sink("portal", &receiver);
    // Valid when checked, gone when the daemon builds its sinks (a secret rotated away).
    let cfg = tc.build();
    std::fs::remove_file(sb.path().join("portal.whsec")).unwrap();
    let err = hvac_edge::daemon::run(cfg, tokio_util::sync::CancellationToken::new(), None)
        .await
        .expect_err("the start must fail");
    let msg = format!("{err:#}");
    assert!(msg.starts_with("cannot start sink portal: "), "{msg}");
    assert!(msg.contains("portal.whsec"), "{msg}");
    assert!(
        !tc.db_path().exists(),
        "nothing ran: not even the database was created"
    );
    assert_eq!(
        broker.count_lines_containing(&tc.client_id("z2m")),
        0,
        "the source never connected"
    );
}

/// `systemd-analyze` (package `systemd`; scripts/test.sh installs it where it is missing).
fn systemd_analyze(args: &[&str], unit: &std::path::Path) -> std::process::Output {
    std::process::Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        .output()
        .unwrap_or_else(|e| {
            panic!("systemd-analyze not found ({e}): run scripts/test.sh, it installs systemd")
        })
}

#[test]
fn the_unit_verifies_and_rates_at_most_2_0_exposure() {
    let sb = Sandbox::new("deploy_unit");
    let unit = include_str!("../../systemd/hvac-edge.service");
    // `verify` checks that ExecStart= and ExecReload= are executable: point them at the binary
    // just built.
    assert!(unit.contains("\nExecStart=/usr/bin/hvac-edge run -c "));
    assert!(unit.contains("\nExecReload=/usr/bin/hvac-edge reload -c "));
    let local = unit.replace(
        "=/usr/bin/hvac-edge ",
        &format!("={} ", env!("CARGO_BIN_EXE_hvac-edge")),
    );
    let path = sb.path().join("hvac-edge.service");
    std::fs::write(&path, local).unwrap();
    let out = systemd_analyze(&["verify"], &path);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = systemd_analyze(&["security", "--offline=true", "--no-pager"], &path);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for hvac-edge.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
    // Each check the tool still flags is an exception the unit's comments explain.
    let comments: String = unit
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .collect::<Vec<_>>()
        .join(" ");
    for exception in [
        "PrivateDevices=",
        "ProtectClock=",
        "PrivateNetwork=",
        "IPAddressDeny=",
        "PrivateUsers=",
    ] {
        assert!(
            comments.contains(&format!("not {exception}"))
                || comments.contains(&format!("No {exception}"))
                || comments.contains(&format!("or {exception}")),
            "no comment explains why the unit has no {exception}"
        );
    }
}

#[test]
fn sysusers_and_tmpfiles_entries_name_the_user_its_group_and_private_directories() {
    let sysusers = include_str!("../../systemd/hvac-edge.sysusers");
    let lines: Vec<&str> = sysusers.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        lines,
        vec![
            "u hvac-edge - \"hvac-edge HVAC gateway daemon\" /var/lib/hvac-edge /usr/sbin/nologin",
            "m hvac-edge dialout"
        ]
    );
    let tmpfiles = include_str!("../../systemd/hvac-edge.tmpfiles");
    assert!(tmpfiles.contains("d /var/lib/hvac-edge 0750 hvac-edge hvac-edge -"));
    assert!(tmpfiles.contains("d /etc/hvac-edge 0750 root hvac-edge -"));
}

#[test]
fn the_daemon_refuses_to_run_as_root_without_allow_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: nothing to refuse here (the check needs a root test run)");
        return;
    }
    let sb = Sandbox::new("deploy_root");
    let path = TestConfig::new(&sb).write("hvac-edge.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(78),
        "EX_CONFIG: systemd does not restart it in a loop"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: refusing to run as root: run it as the system user hvac-edge (the systemd unit does), or pass --allow-root\n"
    );
    assert!(
        !sb.path().join("hvac-edge.db").exists(),
        "nothing was opened"
    );
}

/// Reads sd_notify datagrams until one satisfies `done` (or `timeout`); returns them all.
fn notifications(
    sock: &std::os::unix::net::UnixDatagram,
    timeout: std::time::Duration,
    mut done: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for notifications; got {got:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            got.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_string),
            );
        }
    }
    got
}

#[test]
fn sd_notify_says_ready_once_the_database_is_open_then_watchdog_status_reloading_and_stopping() {
    use std::time::Duration;
    let sb = Sandbox::new("deploy_notify");
    let sock_path = sb.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut tc = TestConfig::new(&sb);
    tc.raw("[[sources.simulator]]\nname = \"sim\"\ndevices = 2\nchanges_per_sec = 20.0\n");
    let config = tc.write("hvac-edge.toml");
    let socket = sock_path.display().to_string();
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[("NOTIFY_SOCKET", &socket)]);
    let got = notifications(&sock, TIMEOUT, |g| g.iter().any(|l| l == "READY=1"));
    // READY=1 only once the database is open and migrated.
    let db = Db::open(&tc.db_path());
    assert_eq!(db.count("PRAGMA user_version"), 7);
    assert!(
        got.iter().all(|l| l != "STOPPING=1"),
        "nothing but readiness yet: {got:?}"
    );
    // The writer pets the watchdog (after each commit and tick) and reports its figures.
    let got = notifications(&sock, TIMEOUT, |g| {
        g.iter().filter(|l| *l == "WATCHDOG=1").count() >= 3
            && g.iter().any(|l| l.starts_with("STATUS=events committed "))
    });
    let status = got
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .unwrap()
        .clone();
    assert!(
        status.contains(", stored ") && status.contains(", evicted "),
        "{status}"
    );
    // A reload (here with an unchanged file) is framed by RELOADING=1 (with the monotonic
    // time systemd wants) and READY=1, with the outcome as STATUS=.
    d.signal(libc::SIGHUP);
    let got = notifications(&sock, TIMEOUT, |g| {
        g.iter()
            .skip_while(|l| *l != "RELOADING=1")
            .any(|l| l == "READY=1")
    });
    let framed: Vec<&String> = got
        .iter()
        .skip_while(|l| *l != "RELOADING=1")
        .filter(|l| !l.starts_with("WATCHDOG") && !l.starts_with("STATUS=events"))
        .collect();
    assert_eq!(framed[0], "RELOADING=1");
    assert!(framed[1].starts_with("MONOTONIC_USEC="), "{framed:?}");
    assert_eq!(framed[2], "READY=1");
    assert_eq!(
        framed[3],
        "STATUS=reloaded: started none; stopped none; restarted none; 1 unchanged"
    );
    d.sigterm();
    notifications(&sock, TIMEOUT, |g| g.iter().any(|l| l == "STOPPING=1"));
    let exit = d
        .wait_timeout(TIMEOUT)
        .expect("the daemon exits after SIGTERM");
    assert_eq!(exit.code(), Some(0), "{}", d.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_support_bundle_holds_what_a_technician_needs_and_no_secret() {
    let sb = Sandbox::new("deploy_bundle");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    let api_key = "k3y-that-must-never-leak-0042";
    let password = "pa55-that-must-never-leak";
    let key_file = tc.secret_file("portal-key", api_key);
    let pw_file = tc.secret_file("mqtt-password", password);
    tc.z2m_source("z2m", broker.port())
        .source_set("z2m", "username", &toml_str("gw"))
        .source_set(
            "z2m",
            "password_file",
            &toml_str(&pw_file.display().to_string()),
        )
        .webhook_sink("portal", &receiver)
        .sink_set("portal", "auth", "\"api_key\"")
        .sink_set("portal", "api_key_header", "\"x-api-key\"")
        .sink_set(
            "portal",
            "api_key_file",
            &toml_str(&key_file.display().to_string()),
        );
    let config = tc.write("hvac-edge.toml");
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    p.publish(
        &format!("{}/hall", tc.base_topic()),
        r#"{"occupied_heating_setpoint":21.0}"#,
        false,
    )
    .await;
    receiver.wait_unique_events(1, TIMEOUT).await;
    daemon.stop().await.unwrap();
    let out_path = sb.path().join("bundle.tar");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["support-bundle", "-c"])
        .arg(&config)
        .arg("-o")
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&out_path).unwrap();
    let mut names = Vec::new();
    let mut bodies = std::collections::HashMap::new();
    let mut archive = tar::Archive::new(bytes.as_slice());
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut e, &mut body).unwrap();
        names.push(name.clone());
        bodies.insert(name, body);
    }
    assert_eq!(
        names,
        [
            "version.txt",
            "config.toml",
            "check-config.txt",
            "queue-stats.json",
            "sources.json",
            "integrity.txt",
            "journal.txt"
        ]
        .map(|n| format!("hvac-edge-support/{n}"))
    );
    let get = |n: &str| bodies[&format!("hvac-edge-support/{n}")].clone();
    assert!(
        get("config.toml").contains("[[sinks.webhook]]")
            || get("config.toml").contains("[[sinks.webhook")
    );
    assert!(
        get("config.toml").contains("portal-key"),
        "paths stay: the integrator sees where"
    );
    assert_eq!(
        get("check-config.txt").lines().next(),
        Some("valid: gateway gw-it")
    );
    let stats: serde_json::Value = serde_json::from_str(&get("queue-stats.json")).unwrap();
    assert_eq!(stats["sinks"][0]["name"], "portal");
    let sources: serde_json::Value = serde_json::from_str(&get("sources.json")).unwrap();
    assert_eq!(sources[0]["name"], "z2m");
    assert!(
        get("integrity.txt").contains("quick_check: ok"),
        "{}",
        get("integrity.txt")
    );
    // No secret anywhere in the file, in any form.
    for secret in [api_key, password] {
        let raw = secret.as_bytes();
        assert!(
            !bytes.windows(raw.len()).any(|w| w == raw),
            "{secret} leaked into the bundle"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_heavy_ingest_and_delivery_exits_0_in_the_grace_and_loses_nothing() {
    use std::time::{Duration, Instant};
    let sb = Sandbox::new("deploy_sigterm_load");
    // A receiver slow enough that deliveries are in flight when the signal comes.
    let receiver =
        Receiver::start_with_default([], Reply::ok().delay(Duration::from_millis(30))).await;
    let mut tc = TestConfig::new(&sb);
    tc.http_sink("upstream", &receiver)
        .sink_set("upstream", "batch_max_events", "50");
    let quiet = tc.write("quiet.toml");
    tc.raw(
        "[[sources.simulator]]\nname = \"sim\"\ndevices = 40\nchanges_per_sec = 2000.0\nseed = 7\n",
    );
    let busy = tc.write("busy.toml");
    let mut d = DaemonProcess::spawn(&busy, sb.path(), &[]);
    wait_until_async("ingest and delivery under way", TIMEOUT, || {
        receiver.unique_events().len() >= 200
    })
    .await;
    let t0 = Instant::now();
    d.sigterm();
    let status = d
        .wait_timeout_async(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no exit within 10 s of SIGTERM:\n{}", d.stderr()));
    let took = t0.elapsed();
    assert_eq!(status.code(), Some(0), "{}", d.stderr());
    // shutdown_grace_secs = 2 (the harness's) for the sinks, plus the writer's flush.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let db = Db::open(&tc.db_path());
    let committed = db.events().len();
    assert!(
        committed > receiver.unique_events().len(),
        "a backlog was left to deliver"
    );
    // A restart without the simulator delivers every committed event, gap-free per device.
    let want: Vec<String> = db.events().into_iter().map(|e| e.id).collect();
    let mut d = DaemonProcess::spawn(&quiet, sb.path(), &[]);
    receiver.set_default(Reply::ok());
    let got = receiver.wait_unique_events(want.len(), TIMEOUT).await;
    let got_ids: std::collections::HashSet<String> = got.iter().map(|e| e.id.clone()).collect();
    assert!(
        want.iter().all(|id| got_ids.contains(id)),
        "a committed event was not delivered"
    );
    check_seq_gap_free(&got).unwrap();
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0)
    );
}
