//! Hostile publishers and inputs on the gateway's LAN (issue 11, sources), and what technicians
//! see of them: `last valid data` for MQTT, escaped ids in tables, bounded warnings, oversized
//! packets, TLS to the broker.

// Test helpers: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::harness::*;
use serde_json::Value;

/// Runs `hvac-edge <args>` and returns (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(args)
        .output()
        .expect("run the hvac-edge binary");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Issue 11 item 24: `hvac-edge sources` said `last valid data never` for an MQTT source that
/// had handed thousands of observations to the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_mqtt_source_sets_last_valid_data() {
    let sb = Sandbox::new("mqtt_last_valid");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut publisher = Publisher::connect(broker.port()).await;
    let base = tc.base_topic();

    // A message the source ignores (the bridge's own state) is not valid thermostat data.
    publisher
        .publish(
            &format!("{base}/bridge/state"),
            r#"{"state":"online"}"#,
            false,
        )
        .await;
    let stats = daemon.source("z2m");
    wait_until_async("the bridge message is ignored", TIMEOUT, || {
        get(&stats.ignored) == 1
    })
    .await;
    assert_eq!(stats.snapshot("z2m", "mqtt").last_valid_ms, None);

    let before = now_ms();
    publisher
        .publish(
            &format!("{base}/trv"),
            r#"{"local_temperature":20.5}"#,
            false,
        )
        .await;
    wait_until_async("one observation", TIMEOUT, || get(&stats.observations) == 1).await;
    let after = now_ms();
    let valid = stats
        .snapshot("z2m", "mqtt")
        .last_valid_ms
        .expect("last_valid_ms set by the accepted observation");
    assert!(
        (before..=after).contains(&valid),
        "{before} <= {valid} <= {after}"
    );

    // The technician's view, from another process reading the database.
    let db = tc.db_path().display().to_string();
    let json = wait_for_async("`hvac-edge sources --json` shows z2m", TIMEOUT, || {
        let (code, out, _) = cli(&["sources", "--db", &db, "--json"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        let z = v.as_array()?.iter().find(|s| s["name"] == "z2m")?.clone();
        (code == 0 && z["counters"]["observations"] == 1).then_some(z)
    })
    .await;
    assert_eq!(json["last_valid_ms"], Value::from(valid));
    let (code, out, _) = cli(&["sources", "--db", &db]);
    assert_eq!(code, 0);
    let line = out
        .lines()
        .find(|l| l.starts_with("z2m (mqtt): connected"))
        .unwrap_or_else(|| panic!("no z2m line in:\n{out}"));
    assert!(line.contains("; last valid data "), "{line}");
    assert!(!line.contains("last valid data never"), "{line}");
    daemon.stop().await.expect("clean stop");
}

/// Issue 11 item 22: device ids, response snippets and error texts come from devices and
/// upstreams; the tables of `queue stats`, `queue dead-letters` and `sources` print their
/// control characters escaped (an ESC sequence could clear the screen or forge a line), while
/// `--json` keeps every byte.
#[test]
fn issue_11_technician_tables_escape_control_characters() {
    use hvac_edge::sources::{Link, SourceStatus, UnitStatus};
    let sb = Sandbox::new("tables_escape");
    let path = sb.path().join("hvac-edge.db");
    let conn = hvac_edge::store::open(
        &path,
        hvac_edge::store::Mode::ReadWrite,
        &hvac_edge::store::Options::default(),
    )
    .expect("create the database");
    let device = "evil\u{1b}[31m\nroom";
    let snippet = "\u{1b}]0;pwned\u{7}";
    let last_error = "HTTP 503: \u{1b}[2J\u{1b}[Hall good\nfake line";
    let now = now_ms();
    conn.execute(
        "INSERT INTO sinks (name, kind, cursor, status, consecutive_failures, last_error, updated_at)
         VALUES ('upstream', 'http', 0, 'FAILING', 3, ?1, ?2)",
        rusqlite::params![last_error, now],
    )
    .expect("insert the sink row");
    conn.execute(
        "INSERT INTO dead_letters (sink, event_pos, event_id, device, seq, type, payload, reason, http_status, response_snippet, at)
         VALUES ('upstream', 1, 'e-1', ?1, 7, 'setpoint', '{}', 'rejected', 400, ?2, ?3)",
        rusqlite::params![device, snippet, now],
    )
    .expect("insert the dead letter");
    let status = SourceStatus {
        name: "fcu".into(),
        kind: "modbus".into(),
        port: Some("/dev/tty\u{1b}[8mUSB0".into()),
        link: Link::Connected,
        last_error: Some("garbled\u{9b}K".into()),
        values: [("firmware".to_string(), "4.2\u{1b}[5m".to_string())].into(),
        units: vec![UnitStatus {
            unit_id: 1,
            device: "fcu\n1".into(),
            last_error: Some("exception\r".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    conn.execute(
        "INSERT INTO source_status (name, kind, status, updated_at) VALUES ('fcu', 'modbus', ?1, ?2)",
        rusqlite::params![serde_json::to_string(&status).expect("status JSON"), now],
    )
    .expect("insert the source status");
    drop(conn);
    let db = path.display().to_string();
    let raw = |out: &str| out.chars().any(|c| c.is_control() && c != '\n');

    let (code, out, err) = cli(&["queue", "dead-letters", "--db", &db]);
    assert_eq!(code, 0, "{err}");
    assert!(!raw(&out), "{out:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    assert_eq!(
        lines[1],
        format!(
            "{:<16} {:<38} {:<16} {:>6} {:<14} {:<8} {:>6}  {}",
            "upstream",
            "e-1",
            "evil\\x1b[31m\\nroom",
            7,
            "setpoint",
            "rejected",
            400,
            "\\x1b]0;pwned\\x07"
        )
    );
    let (code, out, _) = cli(&["queue", "dead-letters", "--db", &db, "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("dead letters JSON");
    assert_eq!(v[0]["device"], device);
    assert_eq!(v[0]["response_snippet"], snippet);

    let (code, out, err) = cli(&["queue", "stats", "--db", &db]);
    assert_eq!(code, 0, "{err}");
    assert!(!raw(&out), "{out:?}");
    let sink_lines: Vec<&str> = out.lines().filter(|l| l.starts_with("upstream ")).collect();
    assert_eq!(sink_lines.len(), 1, "{out:?}");
    assert!(
        sink_lines[0].ends_with("  HTTP 503: \\x1b[2J\\x1b[Hall good\\nfake line"),
        "{out:?}"
    );
    assert!(!out.contains("\nfake line"), "{out:?}");
    let (code, out, _) = cli(&["queue", "stats", "--db", &db, "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("queue stats JSON");
    assert_eq!(v["sinks"][0]["last_error"], last_error);

    let (code, out, err) = cli(&["sources", "--db", &db]);
    assert_eq!(code, 0, "{err}");
    assert!(!raw(&out), "{out:?}");
    assert!(
        out.starts_with("fcu (modbus) on /dev/tty\\x1b[8mUSB0: connected; last valid data never"),
        "{out:?}"
    );
    assert!(out.contains("\n  last error: garbled\\u{9b}K\n"), "{out:?}");
    assert!(
        out.contains("\n  values: firmware 4.2\\x1b[5m\n"),
        "{out:?}"
    );
    let unit = out
        .lines()
        .find(|l| l.contains("fcu\\n1"))
        .unwrap_or_else(|| panic!("no unit line in {out:?}"));
    assert!(unit.ends_with("  exception\\r"), "{unit:?}");
    let (code, out, _) = cli(&["sources", "--db", &db, "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("sources JSON");
    assert_eq!(v[0]["units"][0]["device"], "fcu\n1");
    assert_eq!(v[0]["port"], "/dev/tty\u{1b}[8mUSB0");
}

/// Issue 11 item 15: `check-config` warns (stderr, exit 0) that `store.synchronous = "normal"`
/// may roll back acknowledged events on a power cut; the default says nothing.
#[test]
fn issue_11_check_config_warns_about_synchronous_normal() {
    let sb = Sandbox::new("sync_normal");
    let mut tc = TestConfig::new(&sb);
    let quiet = tc.write("full.toml");
    tc.set("store", "synchronous", &toml_str("normal"));
    let normal = tc.write("normal.toml");

    let (code, out, err) = cli(&["check-config", "-c", &normal.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err,
        "warning: store.synchronous: \"normal\" does not fsync each commit: a power cut may roll \
         back events that were already acknowledged to the broker, and they are lost; use \
         \"full\" (the default) unless the gateway has a UPS or battery-backed storage\n"
    );
    assert!(
        out.starts_with(&format!("{} is valid: ", normal.display())),
        "{out}"
    );

    let (code, out, err) = cli(&["check-config", "-c", &quiet.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "");
    assert!(
        out.starts_with(&format!("{} is valid: ", quiet.display())),
        "{out}"
    );
}

/// Issue 11 item 18: a publisher floods 10,001 distinct topics whose device ids are over 128
/// bytes (then a few non-JSON payloads): every one is counted as malformed, the log gets one
/// line per kind of problem per minute (keyed by (source, kind), not by topic or device; the
/// old per-device key wrote a line for each), and a real device keeps working before and
/// after. The real binary, so that its log is what a technician would read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_flood_of_bogus_device_ids_writes_a_bounded_number_of_log_lines() {
    const FLOOD: usize = 10_001;
    const NOT_JSON: usize = 10;
    let sb = Sandbox::new("id_flood");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver);
    let config = tc.write("hvac-edge.toml");
    let mut daemon = DaemonProcess::spawn(&config, sb.path(), &[("RUST_LOG", "info")]);
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut publisher = Publisher::connect(broker.port()).await;
    let base = tc.base_topic();
    publisher
        .publish(
            &format!("{base}/trv"),
            r#"{"local_temperature":20.5}"#,
            false,
        )
        .await;
    receiver.wait_unique_events(1, TIMEOUT).await;

    let started = std::time::Instant::now();
    let long = "x".repeat(130);
    for i in 0..FLOOD {
        publisher
            .publish(
                &format!("{base}/bogus-{i}-{long}"),
                r#"{"local_temperature":20}"#,
                false,
            )
            .await;
    }
    for i in 0..NOT_JSON {
        publisher
            .publish(&format!("{base}/junk-{i}"), "not json", false)
            .await;
    }
    publisher
        .publish(
            &format!("{base}/trv"),
            r#"{"local_temperature":22.5}"#,
            false,
        )
        .await;
    let events = receiver.wait_unique_events(2, TIMEOUT).await;
    let elapsed_min = started.elapsed().as_secs() / 60;
    assert_eq!(
        events
            .iter()
            .map(|e| (e.device.as_str(), e.seq, e.kind.as_str()))
            .collect::<Vec<_>>(),
        [("trv", 1, "snapshot"), ("trv", 2, "temperature")]
    );

    let db = tc.db_path().display().to_string();
    let counters = wait_for_async("the malformed count in `sources`", TIMEOUT, || {
        let (_, out, _) = cli(&["sources", "--db", &db, "--json"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        let c = v.as_array()?.first()?["counters"].clone();
        (c["received"] == FLOOD + NOT_JSON + 2).then_some(c)
    })
    .await;
    assert_eq!(counters["malformed"], FLOOD + NOT_JSON);
    assert_eq!(counters["observations"], 2);

    daemon.sigterm();
    let status = daemon.wait_timeout_async(TIMEOUT).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let log = daemon.stderr();
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Dropped a message that does not map"))
        .collect();
    let bad_id = dropped
        .iter()
        .filter(|l| l.contains("bad_device_id"))
        .count();
    let not_json = dropped.iter().filter(|l| l.contains("not_json")).count();
    // One line per kind, plus one per further minute the flood lasted.
    let most = 1 + elapsed_min as usize;
    assert!(
        (1..=most).contains(&bad_id) && (1..=most).contains(&not_json),
        "{bad_id} bad-id and {not_json} not-JSON lines (at most {most} each) in:\n{}",
        dropped.join("\n")
    );
    assert_eq!(dropped.len(), bad_id + not_json, "{}", dropped.join("\n"));
    // The first line names the problem and shows the id cut and escaped.
    assert!(
        dropped[0].contains(&format!(
            "error=device id \"bogus-0-{}…\": is 138 bytes long; at most 128 are accepted",
            "x".repeat(24)
        )),
        "{}",
        dropped[0]
    );
}

/// Issue 11 item 21: a `*_file` value that is a bare name is a systemd credential
/// (`LoadCredential=`), read from `$CREDENTIALS_DIRECTORY` by `check-config` and by the daemon
/// (the broker sees the username, so the source started with the password); without the
/// variable it is a config error naming the key. Parse errors never print the config line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_secret_file_bare_name_is_a_systemd_credential() {
    use std::os::unix::fs::PermissionsExt;
    let sb = Sandbox::new("credentials");
    let creds = sb.path().join("credentials");
    std::fs::create_dir(&creds).expect("credentials dir");
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700))
        .expect("chmod credentials dir");
    let pw = creds.join("mqtt-password");
    std::fs::write(&pw, "s3cret-pw\n").expect("write the credential");
    // What systemd gives a LoadCredential= file: mode 0400 (owned by root).
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o400)).expect("chmod 400");
    let broker = Mosquitto::start();
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .source_set("z2m", "username", &toml_str("hvac-user"))
        .source_set("z2m", "password_file", &toml_str("mqtt-password"));
    let config = tc.write("hvac-edge.toml");
    let config_s = config.display().to_string();
    let creds_s = creds.display().to_string();

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["check-config", "-c", &config_s])
        .env("CREDENTIALS_DIRECTORY", &creds_s)
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["check-config", "-c", &config_s])
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "error: {config_s} is invalid (1 problem)\n  sources.mqtt[0].password_file: mqtt-password \
             is a bare name, which names a systemd credential in $CREDENTIALS_DIRECTORY \
             (LoadCredential=), but $CREDENTIALS_DIRECTORY is not set; give an absolute path\n"
        )
    );

    let mut daemon =
        DaemonProcess::spawn(&config, sb.path(), &[("CREDENTIALS_DIRECTORY", &creds_s)]);
    broker
        .wait_connected(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    assert!(
        broker.count_lines_containing("u'hvac-user'") >= 1,
        "{}",
        broker.log()
    );
    daemon.sigterm();
    let status = daemon.wait_timeout_async(TIMEOUT).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        daemon.stderr()
    );

    // A secret pasted into the config as an unknown key is not echoed by the parse error.
    tc.source_set("z2m", "password", &toml_str("hunter2-pasted"));
    let bad = tc.write("bad.toml");
    let (code, _, err) = cli(&["check-config", "-c", &bad.display().to_string()]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains(": at line "), "{err}");
    assert!(err.contains("unknown field `password`"), "{err}");
    assert!(!err.contains("hunter2"), "the secret leaked: {err}");
}

/// Issue 11 item 19: the MQTT client reads at most max(max_payload_bytes, 1 MiB) plus room for
/// the topic: a 4 KiB payload over `max_payload_bytes = 1024` is read, acked and counted as
/// malformed; a 2 MiB publish (a broker without `max_packet_size`) is refused from its fixed
/// header, before it is buffered, and never counted as received; the daemon keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_a_huge_publish_is_refused_by_the_mqtt_client() {
    let sb = Sandbox::new("huge_publish");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .source_set("z2m", "max_payload_bytes", "1024")
        .http_sink("upstream", &receiver);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let base = tc.base_topic();
    let stats = daemon.source("z2m");

    let mut publisher = Publisher::connect(broker.port()).await;
    let mid = format!(r#"{{"local_temperature":20,"x":"{}"}}"#, "a".repeat(4096));
    publisher.publish(&format!("{base}/mid"), mid, false).await;
    wait_until_async("the 4 KiB payload is counted", TIMEOUT, || {
        get(&stats.malformed) == 1
    })
    .await;

    let topic = format!("{base}/huge");
    let file = sb.path().join("huge.json");
    let payload = format!(
        r#"{{"local_temperature":20,"x":"{}"}}"#,
        "a".repeat(2 << 20)
    );
    std::fs::write(&file, &payload).expect("write the payload");
    let st = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port().to_string(),
            "-q",
            "1",
        ])
        .args(["-t", &topic, "-f"])
        .arg(&file)
        .status()
        .expect("run mosquitto_pub (apt-get install -y mosquitto-clients)");
    assert!(st.success());
    let remaining = 2 + topic.len() + 2 + payload.len();
    let want = format!("payload size limit exceeded: {remaining}");
    wait_until_async("the client refuses the huge packet", TIMEOUT, || {
        stats
            .snapshot("z2m", "mqtt")
            .last_error
            .is_some_and(|e| e.contains(&want))
    })
    .await;
    assert_eq!(get(&stats.received), 1);
    assert_eq!(get(&stats.malformed), 1);
    assert_eq!(get(&stats.observations), 0);
    daemon.stop().await.expect("clean stop");
}

#[path = "tls_broker.rs"]
mod tls_broker;
use tls_broker::{Pki, TlsBroker};

/// The first event of device `trv` with a 21.5 °C reading: (device, seq, type, temperature).
fn first_trv_event(events: &[hvac_edge::model::Event]) -> (&str, u64, &str, Value) {
    let e = &events[0];
    let state = serde_json::to_value(&e.state).expect("state as JSON");
    (
        e.device.as_str(),
        e.seq,
        e.kind.as_str(),
        state["temperature"]["value"].clone(),
    )
}

/// Issue 11 item 20: an MQTT source with `ca_file` connects to the broker's TLS listener (the
/// broker's certificate, for 127.0.0.1, is signed by that CA), logs in with its username over
/// TLS, and a publish made on the broker's plain listener becomes an event at the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_mqtt_source_over_tls_delivers_events() {
    let sb = Sandbox::new("mqtt_tls");
    let pki = Pki::create(&sb);
    let broker = TlsBroker::start(&pki, false);
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.tls_port())
        .source_set("z2m", "ca_file", &toml_str(&pki.ca.display().to_string()))
        .source_set("z2m", "username", &toml_str("hvac-tls"))
        .http_sink("upstream", &receiver);
    let daemon = Daemon::start(tc.build()).await;
    let client = tc.client_id("z2m");
    broker.wait_subscribed(&client, 1, TIMEOUT).await;
    assert_eq!(
        broker.count_lines_containing(&format!("as {client} (p2, c0, k30, u'hvac-tls')")),
        1,
        "{}",
        broker.log()
    );
    let mut publisher = Publisher::connect(broker.plain_port()).await;
    publisher
        .publish(
            &format!("{}/trv", tc.base_topic()),
            r#"{"local_temperature":21.5}"#,
            false,
        )
        .await;
    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        first_trv_event(&events),
        ("trv", 1, "snapshot", Value::from("21.5"))
    );
    let stats = daemon.source("z2m").snapshot("z2m", "mqtt");
    assert_eq!(
        (stats.link, stats.last_error),
        (hvac_edge::sources::Link::Connected, None)
    );
    daemon.stop().await.expect("clean stop");
}

/// Issue 11 item 20: with `ca_file` naming a CA that did not sign the broker's certificate,
/// the handshake is refused: the source shows the certificate error (in-process and in
/// `hvac-edge sources --json`), never completes an MQTT connection and delivers nothing, while
/// it keeps retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_mqtt_source_refuses_a_broker_certificate_from_another_ca() {
    let sb = Sandbox::new("mqtt_tls_wrong_ca");
    let pki = Pki::create(&sb);
    let broker = TlsBroker::start(&pki, false);
    let receiver = Receiver::start([]).await;
    // A retained state the source would receive as soon as it subscribed.
    let mut tc = TestConfig::new(&sb);
    let mut publisher = Publisher::connect(broker.plain_port()).await;
    publisher
        .publish(
            &format!("{}/trv", tc.base_topic()),
            r#"{"local_temperature":21.5}"#,
            true,
        )
        .await;
    tc.z2m_source("z2m", broker.tls_port())
        .source_set(
            "z2m",
            "ca_file",
            &toml_str(&pki.other_ca.display().to_string()),
        )
        .http_sink("upstream", &receiver);
    let refused = "OpenSSL Error[0]: error:0A000418:SSL routines::tlsv1 alert unknown ca";
    let daemon = Daemon::start(tc.build()).await;
    let stats = daemon.source("z2m");
    let want = "TLS: I/O: invalid peer certificate: UnknownIssuer";
    wait_until_async("the source shows the certificate error", TIMEOUT, || {
        stats.snapshot("z2m", "mqtt").last_error.as_deref() == Some(want)
    })
    .await;
    // Two refused handshakes: the source retries, and is refused again.
    wait_until_async("a second refused handshake", TIMEOUT, || {
        broker.count_lines_containing(refused) >= 2
    })
    .await;
    let snap = stats.snapshot("z2m", "mqtt");
    assert_eq!(snap.link, hvac_edge::sources::Link::Disconnected);
    assert_eq!(
        (
            get(&stats.connects),
            get(&stats.received),
            get(&stats.observations)
        ),
        (0, 0, 0)
    );
    let client = tc.client_id("z2m");
    assert_eq!(
        broker.count_lines_containing(&format!("Sending CONNACK to {client}")),
        0,
        "{}",
        broker.log()
    );
    assert_eq!(daemon.committed(), 0);
    assert_eq!(receiver.request_count(), 0);

    let db = tc.db_path().display().to_string();
    let json = wait_for_async(
        "`hvac-edge sources --json` shows the TLS error",
        TIMEOUT,
        || {
            let (code, out, _) = cli(&["sources", "--db", &db, "--json"]);
            let v: Value = serde_json::from_str(&out).ok()?;
            let z = v.as_array()?.iter().find(|s| s["name"] == "z2m")?.clone();
            (code == 0 && z["last_error"] == want).then_some(z)
        },
    )
    .await;
    assert_eq!(json["link"], "disconnected");
    daemon.stop().await.expect("clean stop");
}

/// Issue 11 item 20: a broker that requires a client certificate (`require_certificate true`)
/// accepts the source that presents `cert_file`/`key_file` (signed by the broker's CA), whose
/// publish is delivered, and refuses the source without one, which shows why and receives
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_11_mqtt_source_presents_its_client_certificate() {
    let sb = Sandbox::new("mqtt_tls_client_cert");
    let pki = Pki::create(&sb);
    let broker = TlsBroker::start(&pki, true);
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    let ca = toml_str(&pki.ca.display().to_string());
    tc.z2m_source("cert", broker.tls_port())
        .source_set("cert", "ca_file", &ca)
        .source_set(
            "cert",
            "cert_file",
            &toml_str(&pki.client_cert.display().to_string()),
        )
        .source_set(
            "cert",
            "key_file",
            &toml_str(&pki.client_key.display().to_string()),
        )
        .z2m_source("nocert", broker.tls_port())
        .source_set("nocert", "ca_file", &ca)
        .http_sink("upstream", &receiver);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("cert"), 1, TIMEOUT)
        .await;
    let nocert = daemon.source("nocert");
    // TLS 1.3: the broker checks the client's (absent) certificate after the client finished
    // its side of the handshake, so its alert arrives where the client reads the CONNACK.
    let want = "Mqtt state: Mqtt serialization/deserialization error: IO: received fatal alert: CertificateRequired";
    wait_until_async(
        "the source without a certificate is refused",
        TIMEOUT,
        || nocert.snapshot("nocert", "mqtt").last_error.as_deref() == Some(want),
    )
    .await;

    let mut publisher = Publisher::connect(broker.plain_port()).await;
    publisher
        .publish(
            &format!("{}/trv", tc.base_topic()),
            r#"{"local_temperature":21.5}"#,
            false,
        )
        .await;
    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        first_trv_event(&events),
        ("trv", 1, "snapshot", Value::from("21.5"))
    );
    let cert = daemon.source("cert");
    assert_eq!((get(&cert.connects), get(&cert.observations)), (1, 1));
    assert_eq!((get(&nocert.connects), get(&nocert.received)), (0, 0));
    assert_eq!(
        broker.count_lines_containing(&format!("Sending CONNACK to {}", tc.client_id("nocert"))),
        0
    );
    daemon.stop().await.expect("clean stop");
}
