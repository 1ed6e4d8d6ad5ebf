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
