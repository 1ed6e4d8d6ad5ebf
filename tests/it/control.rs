//! The technician's control path (issue 14): `queue retry`, `queue purge`, `sinks test` and
//! `audit`, on the real binary, with and without a running daemon.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::harness::*;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;

fn cli(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn setpoint(e: &hvac_edge::model::Event) -> String {
    e.state
        .setpoint
        .as_ref()
        .map(|t| t.value.to_string())
        .unwrap_or_default()
}

/// The receiver refuses (400) any batch holding a setpoint of 30.0 until told otherwise.
fn refuse_30(receiver: &Receiver) {
    receiver.set_rule(Some(Arc::new(|b| {
        let b = b.as_ref().ok()?;
        b.events
            .iter()
            .any(|e| setpoint(e) == "30.0")
            .then(|| Reply::status(400).body("setpoint out of range"))
    })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_retry_redelivers_dead_letters_with_their_original_ids_with_or_without_a_daemon() {
    let sb = Sandbox::new("control_retry");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    refuse_30(&receiver);
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("up", &receiver);
    let config = tc.write("hvac-edge.toml");
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[]);
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    let hall = format!("{}/hall", tc.base_topic());
    for sp in ["20.0", "30.0", "21.0"] {
        p.publish(
            &hall,
            format!("{{\"occupied_heating_setpoint\":{sp}}}"),
            false,
        )
        .await;
    }
    let db_path = tc.db_path();
    wait_until_async("the 30.0 event is a dead letter", TIMEOUT, || {
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters") == 1
    })
    .await;
    // 21.0 was published after 30.0: wait for it rather than assume it is there already.
    receiver
        .wait_event("21.0 accepted", TIMEOUT, |e| setpoint(e) == "21.0")
        .await;
    let accepted: Vec<String> = receiver.accepted_events().iter().map(setpoint).collect();
    assert_eq!(accepted, vec!["20.0", "21.0"]);
    let dead = Db::open(&db_path).dead_letters();
    let (dead_id, dead_seq) = (dead[0].event_id.clone(), dead[0].seq);

    // Counted, not changed.
    let out = cli(&config, &["queue", "retry", "--dry-run", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["would_requeue"], 1);
    assert_eq!(
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters WHERE requeued_at IS NULL"),
        1
    );

    // The receiver is fixed; the running daemon sends it again, same id and seq.
    receiver.set_rule(None);
    let out = cli(
        &config,
        &[
            "queue", "retry", "--sink", "up", "--reason", "rejected", "--wait", "20", "--json",
        ],
    );
    let o = json(&out);
    assert_eq!(out.status.code(), Some(0), "{o}");
    assert_eq!(
        (o["requeued"].clone(), o["delivered"].clone()),
        (1.into(), 1.into()),
        "{o}"
    );
    assert_eq!(o["daemon_running"], true);
    let again: Vec<_> = receiver
        .accepted_events()
        .into_iter()
        .filter(|e| e.id == dead_id)
        .collect();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].seq, setpoint(&again[0])),
        (dead_seq as u64, "30.0".to_string())
    );
    assert_eq!(
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters"),
        0
    );
    // Nothing left to retry.
    let out = cli(&config, &["queue", "retry", "--json"]);
    assert_eq!(json(&out)["requeued"], 0);

    // Without a daemon: re-queued by the command, sent when the daemon starts.
    refuse_30(&receiver);
    p.publish(&hall, "{\"occupied_heating_setpoint\":30.0}", false)
        .await;
    wait_until_async("a second dead letter", TIMEOUT, || {
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters") == 1
    })
    .await;
    let second = Db::open(&db_path).dead_letters()[0].event_id.clone();
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0)
    );
    receiver.set_rule(None);
    let out = cli(&config, &["queue", "retry", "--event", &second]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("re-queued 1 dead letter(s) (up 1)"),
        "{text}"
    );
    assert!(
        text.contains("no daemon is running: they are sent when it starts"),
        "{text}"
    );
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[]);
    receiver
        .wait_event("the second retry", TIMEOUT, |e| e.id == second)
        .await;
    wait_until_async("its dead letter gone", TIMEOUT, || {
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters") == 0
    })
    .await;

    // Every change is on record: who, what, how many.
    let out = cli(&config, &["audit", "--json"]);
    let a = json(&out);
    let changes = a["changes"].as_array().unwrap();
    let summary: Vec<(String, i64, String)> = changes
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap().to_string(),
                c["events"].as_i64().unwrap_or(-1),
                c["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("retry".to_string(), 1, "done".to_string()),
            ("retry".to_string(), 0, "done".to_string()),
            ("retry".to_string(), 1, "done".to_string()),
        ]
    );
    assert!(
        changes
            .iter()
            .all(|c| !c["by"].as_str().unwrap().is_empty())
    );
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_purge_asks_first_and_deletes_only_what_is_old_enough() {
    let sb = Sandbox::new("control_purge");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    refuse_30(&receiver);
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("up", &receiver);
    let config = tc.write("hvac-edge.toml");
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    for (d, sp) in [("a", "30.0"), ("b", "30.0"), ("c", "20.0")] {
        p.publish(
            &format!("{}/{d}", tc.base_topic()),
            format!("{{\"occupied_heating_setpoint\":{sp}}}"),
            false,
        )
        .await;
    }
    let db_path = tc.db_path();
    wait_until_async("two dead letters", TIMEOUT, || {
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters") == 2
    })
    .await;
    daemon.stop().await.unwrap();
    // Nothing is a day old.
    let out = cli(&config, &["queue", "purge", "--older-than", "1d", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["would_delete"], 0);
    // No terminal to ask on: refused without --yes.
    let out = cli(&config, &["queue", "purge", "--older-than", "0s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("2 dead letter(s) would be deleted for good; confirm with --yes")
    );
    let out = cli(
        &config,
        &["queue", "purge", "--older-than", "0s", "--dry-run"],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("would delete 2 dead letter(s) older than 0s (up 2)")
    );
    assert_eq!(
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters"),
        2
    );
    let out = cli(
        &config,
        &["queue", "purge", "--older-than", "0s", "--yes", "--json"],
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json(&out)["deleted"], 2);
    assert_eq!(
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters"),
        0
    );
    let a = json(&cli(&config, &["audit", "--json"]));
    assert_eq!(a["changes"][0]["action"], "purge");
    assert_eq!(a["changes"][0]["events"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_test_sends_one_signed_test_event_through_the_daemon_or_by_itself() {
    let sb = Sandbox::new("control_test");
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.webhook_sink("portal", &receiver);
    tc.raw("[[sources.simulator]]\nname = \"sim\"\ndevices = 1\nchanges_per_sec = 1.0\nmax_observations = 1\n");
    let config = tc.write("hvac-edge.toml");
    // No daemon: the command sends it itself.
    let out = cli(&config, &["sinks", "test", "portal", "--json"]);
    let o = json(&out);
    assert_eq!(out.status.code(), Some(0), "{o}");
    assert_eq!(
        (o["ok"].clone(), o["status"].clone()),
        (true.into(), 200.into())
    );
    assert_eq!(o["via"], "this command (no daemon is running)");
    let first = receiver.requests();
    assert_eq!(first.len(), 1);
    assert!(first[0].signature_ok, "signed like any delivery");
    let ev = &first[0].events()[0];
    assert_eq!(
        (ev.kind.as_str(), ev.device.as_str(), ev.seq),
        ("test", "@gateway", 0)
    );
    assert_eq!(ev.id, o["event_id"].as_str().unwrap());

    // Through the running daemon's sink, refused: FAILED, with the status and the answer.
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[]);
    receiver.wait_unique_events(2, TIMEOUT).await;
    receiver.set_default(Reply::status(503).body("maintenance until 14:00"));
    let out = cli(&config, &["sinks", "test", "portal"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("sink portal: FAILED — status 503, "),
        "{text}"
    );
    assert!(text.contains("answer: maintenance until 14:00"), "{text}");
    assert!(text.contains("sent by the running daemon (pid"), "{text}");
    let a = json(&cli(&config, &["audit", "--json"]));
    let states: Vec<(String, String)> = a["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["state"].as_str().unwrap().into(),
                c["applied_by"].as_str().unwrap().into(),
            )
        })
        .collect();
    // A test is outside the queue: it is in the audit, not in the sink's figures.
    let list = json(&cli(&config, &["sinks", "--json"]));
    assert_eq!(list[0]["name"], "portal");
    assert_eq!(list[0]["delivered"], 1, "the simulator's one event: {list}");
    assert_eq!(list[0]["pending"], 0);
    let detail = cli(&config, &["sinks", "portal"]);
    let text = String::from_utf8_lossy(&detail.stdout);
    assert!(
        text.starts_with("sink portal (webhook): ACTIVE\n"),
        "{text}"
    );
    assert!(
        text.contains("  delivered    1 events; failed attempts 0\n"),
        "{text}"
    );
    let unknown = cli(&config, &["sinks", "nope"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no sink \"nope\" has run on"));
    // The first test ran before any database existed: nothing to record it in.
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(states[0].0, "failed");
    assert!(states[0].1.starts_with("daemon pid "), "{states:?}");
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn technician_commands_in_a_loop_during_full_speed_ingest_and_delivery_lock_nothing_out() {
    use std::time::{Duration, Instant};
    let sb = Sandbox::new("control_concurrency");
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.http_sink("up", &receiver)
        .sink_set("up", "batch_max_events", "100");
    tc.raw(
        "[[sources.simulator]]\nname = \"sim\"\ndevices = 50\nchanges_per_sec = 2000.0\nseed = 11\nmax_observations = 6000\n",
    );
    let config = tc.write("hvac-edge.toml");
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[]);
    let db_path = tc.db_path();
    wait_until_async("the database exists", TIMEOUT, || Db::migrated(&db_path)).await;
    // Every read and write command the technician has, in a loop, while the simulator runs
    // at 2000 changes/s and the sink delivers (bounded: 40 rounds or 60 s).
    let commands: [&[&str]; 6] = [
        &["queue", "stats", "--json"],
        &["sources", "--json"],
        &["queue", "dead-letters", "--json"],
        &["queue", "retry", "--dry-run", "--json"],
        &["queue", "retry", "--json"],
        &["audit", "--json"],
    ];
    let started = Instant::now();
    let mut rounds = 0;
    while rounds < 40 && started.elapsed() < Duration::from_secs(60) {
        for c in commands {
            let out = cli(&config, c);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{c:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            json(&out);
        }
        rounds += 1;
    }
    // The simulator's last observation committed, then every event delivered.
    wait_until_async("all 6000 observations processed", TIMEOUT, || {
        json(&cli(&config, &["queue", "stats", "--json"]))["sinks"][0]["pending"] == 0
            && Db::open(&db_path).count("SELECT COUNT(*) FROM events") > 0
            && d.stderr().contains("Simulator finished")
    })
    .await;
    let db = Db::open(&db_path);
    let committed: std::collections::HashSet<String> =
        db.events().into_iter().map(|e| e.id).collect();
    let got = receiver.wait_unique_events(committed.len(), TIMEOUT).await;
    let delivered: std::collections::HashSet<String> = got.iter().map(|e| e.id.clone()).collect();
    assert!(
        committed.is_subset(&delivered),
        "a committed event was not delivered"
    );
    check_seq_gap_free(&got).unwrap();
    let log = d.stderr();
    assert!(!log.contains("database is locked"), "{log}");
    assert!(!log.contains("Commit failed"), "{log}");
    // The retries re-queued nothing (there were no dead letters) and each one is on record.
    assert_eq!(
        db.count("SELECT COUNT(*) FROM control WHERE action = 'retry' AND events = 0"),
        rounds
    );
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_retry_leaves_dead_letters_of_sinks_no_longer_configured_alone() {
    let sb = Sandbox::new("control_retry_removed");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    refuse_30(&receiver);
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("up", &receiver)
        .http_sink("old", &receiver);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    p.publish(
        &format!("{}/hall", tc.base_topic()),
        "{\"occupied_heating_setpoint\":30.0}",
        false,
    )
    .await;
    let db_path = tc.db_path();
    wait_until_async("a dead letter per sink", TIMEOUT, || {
        Db::open(&db_path).count("SELECT COUNT(*) FROM dead_letters") == 2
    })
    .await;
    daemon.stop().await.unwrap();
    tc.remove_sink("old");
    let config = tc.write("hvac-edge.toml");
    let out = cli(&config, &["queue", "retry", "--sink", "old"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sink \"old\" is not in the config"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&config, &["queue", "retry"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("left alone: dead letters of sinks no longer configured (old 1)")
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("re-queued 1 dead letter(s) (up 1)"));
    let db = Db::open(&db_path);
    assert_eq!(
        db.count("SELECT COUNT(*) FROM dead_letters WHERE sink = 'old' AND requeued_at IS NULL"),
        1
    );
    assert_eq!(
        db.count("SELECT COUNT(*) FROM dead_letters WHERE sink = 'up' AND requeued_at IS NOT NULL"),
        1
    );
}
