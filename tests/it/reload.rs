//! Live reload (issue 13): SIGHUP / `hvac-edge reload` applies a changed config by component,
//! on the real binary, without a restart, a duplicate or a loss; an invalid change leaves the
//! old config running and names every problem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::harness::*;
use std::collections::HashSet;
use std::path::Path;
use std::process::Output;

/// `hvac-edge reload -c <config> --json`.
fn reload(config: &Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["reload", "--json", "--timeout-secs", "30", "-c"])
        .arg(config)
        .output()
        .unwrap()
}

/// The outcome the CLI printed (exit status checked by the caller).
fn outcome(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "reload printed no JSON ({e}): stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_default().to_string())
        .collect()
}

/// A generic source reading `<prefix>/<device>/state` JSON with a `setpoint` field.
fn mapping() -> String {
    "device = \"{topic:1}\"\nunit = \"C\"\n[sources.mqtt.mapping.fields]\nsetpoint = \"/setpoint\"\n"
        .to_string()
}

fn ids(events: &[hvac_edge::model::Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_sinks_and_changes_topics_without_a_restart_a_duplicate_or_a_loss()
 {
    let sb = Sandbox::new("reload_apply");
    let broker = Mosquitto::start();
    let a = Receiver::start([]).await;
    let b = Receiver::start([]).await;
    let old_prefix = format!("old-{}", sb.tag());
    let new_prefix = format!("new-{}", sb.tag());
    let mut tc = TestConfig::new(&sb);
    tc.generic_source(
        "lan",
        broker.port(),
        &[&format!("{old_prefix}/+/state")],
        &mapping(),
    )
    .http_sink("a", &a);
    let config = tc.write("hvac-edge.toml");
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[]);
    broker
        .wait_subscribed(&tc.client_id("lan"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    let publish_old = |i: usize| {
        (
            format!("{old_prefix}/hall/state"),
            format!("{{\"setpoint\":{}}}", 15 + i),
        )
    };
    for i in 0..5 {
        let (t, m) = publish_old(i);
        p.publish(&t, m, false).await;
    }
    a.wait_unique_events(5, TIMEOUT).await;

    // 1. Add a webhook sink "b", move the source to new topics; sink "a" is untouched.
    tc.remove_source("lan")
        .generic_source(
            "lan",
            broker.port(),
            &[&format!("{new_prefix}/+/state")],
            &mapping(),
        )
        .webhook_sink("b", &b);
    tc.write("hvac-edge.toml");
    let out = reload(&config);
    let o = outcome(&out);
    assert_eq!(out.status.code(), Some(0), "{o}");
    assert_eq!(o["applied"], true, "{o}");
    assert_eq!(strings(&o["started"]), vec!["sink b"]);
    assert_eq!(strings(&o["restarted"]), vec!["source lan"]);
    assert!(strings(&o["stopped"]).is_empty(), "{o}");
    assert_eq!(o["unchanged"], 1, "sink a kept running: {o}");
    assert_eq!(o["writer_changed"], true, "a new sink for GC: {o}");
    assert_eq!(o["pid"], d.pid(), "the same process: no restart");
    assert!(d.try_status().is_none(), "still running");
    // The restarted source subscribes to the new topics (a second SUBSCRIBE of its client id).
    broker
        .wait_subscribed(&tc.client_id("lan"), 2, TIMEOUT)
        .await;
    // An old topic no longer makes events; the new one does.
    p.publish(
        &format!("{old_prefix}/hall/state"),
        "{\"setpoint\":30}",
        false,
    )
    .await;
    for i in 0..5 {
        p.publish(
            &format!("{new_prefix}/hall/state"),
            format!("{{\"setpoint\":{}}}", 25 + i),
            false,
        )
        .await;
    }
    let got_a = a.wait_unique_events(10, TIMEOUT).await;
    // The new sink starts from the oldest stored event: it gets the history too.
    let got_b = b.wait_unique_events(10, TIMEOUT).await;
    assert_eq!(ids(&got_a), ids(&got_b), "same events, same order");
    let setpoints: Vec<String> = got_a
        .iter()
        .map(|e| {
            e.state
                .setpoint
                .as_ref()
                .map(|t| t.value.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        setpoints,
        [15, 16, 17, 18, 19, 25, 26, 27, 28, 29].map(|v| format!("{v}.0")),
        "the old topic's 30 made no event"
    );
    check_seq_gap_free(&got_a).unwrap();

    // 2. Remove sink "a": it stops; "b" keeps delivering; nothing else restarts.
    tc.remove_sink("a");
    tc.write("hvac-edge.toml");
    let out = reload(&config);
    let o = outcome(&out);
    assert_eq!(out.status.code(), Some(0), "{o}");
    assert_eq!(strings(&o["stopped"]), vec!["sink a"]);
    assert!(strings(&o["started"]).is_empty() && strings(&o["restarted"]).is_empty());
    assert_eq!(o["unchanged"], 2, "{o}");
    assert_eq!(o["writer_changed"], true, "GC no longer waits for a: {o}");
    let a_requests = a.request_count();
    for i in 0..3 {
        p.publish(
            &format!("{new_prefix}/hall/state"),
            format!("{{\"setpoint\":{}}}", 40 + i),
            false,
        )
        .await;
    }
    let got_b = b.wait_unique_events(13, TIMEOUT).await;
    assert_eq!(
        a.request_count(),
        a_requests,
        "a removed sink sends nothing"
    );
    check_seq_gap_free(&got_b).unwrap();
    // Nothing was delivered twice to either receiver (no restart replayed a cursor).
    assert_eq!(a.events().len(), 10, "no duplicate at a");
    assert_eq!(b.events().len(), 13, "no duplicate at b");
    // Every committed event reached the sink that stayed.
    let db = Db::open(&tc.db_path());
    let committed: HashSet<String> = db.events().into_iter().map(|e| e.id).collect();
    let delivered: HashSet<String> = got_b.iter().map(|e| e.id.clone()).collect();
    assert!(
        committed.is_subset(&delivered),
        "committed but not delivered"
    );
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0),
        "{}",
        d.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_restart_only_change_leaves_the_old_config_running_and_names_every_problem() {
    let sb = Sandbox::new("reload_refused");
    let broker = Mosquitto::start();
    let a = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port()).http_sink("a", &a);
    let config = tc.write("hvac-edge.toml");
    let good = tc.toml();
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[]);
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    let topic = format!("{}/hall", tc.base_topic());
    p.publish(&topic, r#"{"occupied_heating_setpoint":20.0}"#, false)
        .await;
    a.wait_unique_events(1, TIMEOUT).await;

    // Invalid in two places: the CLI refuses to ask the daemon and lists both keys.
    let invalid = good
        .replace("url = \"http://", "url = \"ftp://")
        .replace("[pipeline]\n", "[pipeline]\nbatch_max = 0\n");
    assert_ne!(invalid, good);
    std::fs::write(&config, &invalid).unwrap();
    let out = reload(&config);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sinks.http[0].url"), "{err}");
    assert!(err.contains("pipeline.batch_max"), "{err}");
    assert!(err.contains("was not asked to reload"), "{err}");

    // SIGHUP with the invalid file: the daemon itself refuses, logs each problem with its key
    // and records the outcome.
    let reloads_before = Db::open(&tc.db_path()).count("SELECT COUNT(*) FROM reloads");
    d.signal(libc::SIGHUP);
    wait_until_async("the refusal recorded", TIMEOUT, || {
        Db::open(&tc.db_path()).count("SELECT COUNT(*) FROM reloads") > reloads_before
    })
    .await;
    let log = d.stderr();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Reload refused"))
        .collect();
    assert!(
        refused.iter().any(|l| l.contains("sinks.http[0].url")),
        "{log}"
    );
    assert!(
        refused.iter().any(|l| l.contains("pipeline.batch_max")),
        "{log}"
    );

    // Valid, but the gateway's identity and the logging are fixed for the life of the process.
    let fixed = good
        .replace("id = \"gw-it\"", "id = \"gw-other\"")
        .replace("level = \"info\"", "level = \"debug\"");
    assert_ne!(fixed, good);
    std::fs::write(&config, fixed).unwrap();
    let out = reload(&config);
    let o = outcome(&out);
    assert_eq!(out.status.code(), Some(1), "{o}");
    assert_eq!(o["applied"], false);
    let problems = strings(&o["problems"]);
    assert_eq!(problems.len(), 2, "{o}");
    assert!(
        problems[0].starts_with("gateway: changed, but it is fixed"),
        "{o}"
    );
    assert!(
        problems[1].starts_with("log: changed, but it is fixed"),
        "{o}"
    );
    // A moved database: the CLI cannot find the daemon there and says why.
    std::fs::write(&config, good.replace("hvac-edge.db\"", "other.db\"")).unwrap();
    let out = reload(&config);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("if store.path was changed"), "{err}");

    // A new sink whose secret file is missing: refused by the daemon, with the file named.
    tc.webhook_sink("b", &a);
    tc.write("hvac-edge.toml");
    std::fs::remove_file(sb.path().join("b.whsec")).unwrap();
    let reloads_before = Db::open(&tc.db_path()).count("SELECT COUNT(*) FROM reloads");
    d.signal(libc::SIGHUP);
    wait_until_async("the refusal recorded", TIMEOUT, || {
        Db::open(&tc.db_path()).count("SELECT COUNT(*) FROM reloads") > reloads_before
    })
    .await;
    let last = Db::open(&tc.db_path()).text("SELECT outcome FROM reloads ORDER BY id DESC LIMIT 1");
    let o: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(o["applied"], false, "{o}");
    assert!(
        strings(&o["problems"])
            .iter()
            .any(|p| p.contains("b.whsec")),
        "{o}"
    );

    // The old config still runs: the daemon never stopped, sink a still delivers.
    assert!(d.try_status().is_none(), "still running");
    p.publish(&topic, r#"{"occupied_heating_setpoint":21.0}"#, false)
        .await;
    let got = a.wait_unique_events(2, TIMEOUT).await;
    assert_eq!(got.len(), 2);
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0),
        "{}",
        d.stderr()
    );
}

#[test]
fn reload_without_a_running_daemon_says_so_and_exits_3() {
    let sb = Sandbox::new("reload_none");
    let config = TestConfig::new(&sb).write("hvac-edge.toml");
    let out = reload(&config);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no hvac-edge daemon is running"), "{err}");
    assert!(err.contains("applies at the next start"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_while_messages_flow_restart_the_source_and_sinks_without_a_loss_or_a_duplicate() {
    let sb = Sandbox::new("reload_under_load");
    let broker = Mosquitto::start();
    let a = Receiver::start([]).await;
    let b = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("a", &a)
        .sink_set("a", "batch_max_events", "20");
    let config = tc.write("hvac-edge.toml");
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[]);
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    // 300 distinct setpoint changes over 3 devices, published while the reloads happen.
    const N: usize = 300;
    let base = tc.base_topic();
    let mut p = Publisher::connect(broker.port()).await;
    // The publisher waits at message 100 until the first reload is done and at 200 until the
    // second is: each reload lands with messages still to come, however slow the machine.
    let (stage_tx, mut stage) = tokio::sync::watch::channel(0u8);
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            let gate = match i {
                100 => 1,
                200 => 2,
                _ => 0,
            };
            if gate > 0 {
                let _ = stage.wait_for(|s| *s >= gate).await;
            }
            let sp = 10.0 + (i / 3) as f64 * 0.1;
            p.publish(
                &format!("{base}/room-{}", i % 3),
                format!("{{\"occupied_heating_setpoint\":{sp:.1}}}"),
                false,
            )
            .await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    let db_path = tc.db_path();
    let committed = |n: i64| {
        let p = db_path.clone();
        move || Db::migrated(&p) && Db::open(&p).count("SELECT COUNT(*) FROM events") >= n
    };
    wait_until_async("a first part committed", TIMEOUT, committed(30)).await;
    // Restart the source (keep-alive changed) and add sink b, mid-stream.
    tc.source_set("z2m", "keep_alive_secs", "45")
        .webhook_sink("b", &b);
    tc.write("hvac-edge.toml");
    let out = reload(&config);
    let o = outcome(&out);
    assert_eq!(out.status.code(), Some(0), "{o}");
    assert_eq!(strings(&o["restarted"]), vec!["source z2m"], "{o}");
    assert_eq!(strings(&o["started"]), vec!["sink b"], "{o}");
    let _ = stage_tx.send(1);
    wait_until_async("more committed", TIMEOUT, committed(150)).await;
    // Restart sink a (another batch size) while it delivers.
    tc.sink_set("a", "batch_max_events", "7");
    tc.write("hvac-edge.toml");
    let out = reload(&config);
    let o = outcome(&out);
    assert_eq!(out.status.code(), Some(0), "{o}");
    assert_eq!(strings(&o["restarted"]), vec!["sink a"], "{o}");
    let at_second_reload = Db::open(&tc.db_path()).count("SELECT COUNT(*) FROM events");
    assert!(
        at_second_reload <= 200,
        "the publisher waits at 200 for this reload ({at_second_reload} committed)"
    );
    let _ = stage_tx.send(2);
    tokio::time::timeout(TIMEOUT, publisher)
        .await
        .expect("the publisher finished")
        .expect("the publisher did not panic");
    // Every change committed exactly once: none lost in the source's restart, no redelivery
    // committed twice.
    let got_a = a.wait_unique_events(N, TIMEOUT).await;
    let got_b = b.wait_unique_events(N, TIMEOUT).await;
    let db = Db::open(&tc.db_path());
    assert_eq!(db.events().len(), N, "one event per published change");
    for got in [&got_a, &got_b] {
        assert_eq!(got.len(), N);
        check_seq_gap_free(got).unwrap();
        for room in 0..3 {
            let sps: Vec<String> = of_device(got, &format!("room-{room}"))
                .iter()
                .map(|e| {
                    e.state
                        .setpoint
                        .as_ref()
                        .map(|t| t.value.to_string())
                        .unwrap_or_default()
                })
                .collect();
            let want: Vec<String> = (0..N / 3)
                .map(|k| format!("{:.1}", 10.0 + k as f64 * 0.1))
                .collect();
            assert_eq!(sps, want, "room-{room}: every change, in order");
        }
    }
    // A stopped sink finishes its in-flight request and saves its cursor before its
    // replacement starts: nothing was sent twice.
    assert_eq!(a.events().len(), N, "no duplicate at a");
    assert_eq!(b.events().len(), N, "no duplicate at b");
    assert!(d.try_status().is_none(), "never restarted");
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0),
        "{}",
        d.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_prints_the_outcome_of_its_own_request_not_of_one_already_under_way() {
    let sb = Sandbox::new("reload_nonce");
    let a = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.http_sink("a", &a);
    let config = tc.write("hvac-edge.toml");
    let mut d = DaemonProcess::spawn(&config, sb.path(), &[]);
    let db_path = tc.db_path();
    wait_until_async("the daemon recorded its pid", TIMEOUT, || {
        Db::migrated(&db_path)
            && Db::open(&db_path).count("SELECT COUNT(*) FROM meta WHERE key = 'daemon_pid'") == 1
    })
    .await;
    // A reload someone else asked for (a bare SIGHUP), then ours right behind it.
    d.signal(libc::SIGHUP);
    let out = reload(&config);
    let o = outcome(&out);
    assert_eq!(out.status.code(), Some(0), "{o}");
    let ours = o["request"]
        .as_i64()
        .expect("our request's nonce in the outcome");
    let db = Db::open(&db_path);
    assert_eq!(
        db.count("SELECT value FROM meta WHERE key = 'reload_request'"),
        ours
    );
    let rows: Vec<serde_json::Value> = {
        let n = db.count("SELECT COUNT(*) FROM reloads");
        (0..n)
            .map(|i| {
                serde_json::from_str(&db.text(&format!(
                    "SELECT outcome FROM reloads ORDER BY id LIMIT 1 OFFSET {i}"
                )))
                .unwrap()
            })
            .collect()
    };
    assert_eq!(
        rows.iter()
            .filter(|r| r["request"].as_i64() == Some(ours))
            .count(),
        1,
        "exactly one reload carried our request: {rows:?}"
    );
    d.sigterm();
    assert_eq!(
        d.wait_timeout_async(TIMEOUT).await.and_then(|s| s.code()),
        Some(0)
    );
}
