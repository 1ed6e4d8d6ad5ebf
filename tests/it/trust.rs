//! The trust issue's delivery and store regressions: endpoint errors hold, bad events are
//! bisected out, timeouts shrink the batch, unreadable or corrupt data never stops the daemon.

use crate::harness::*;
use hvac_edge::model::Event;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    _broker: Mosquitto,
    receiver: Receiver,
    tc: TestConfig,
    daemon: Daemon,
    publisher: Publisher,
}

/// Broker, a receiver answering `default` (after an empty script), and a daemon with a
/// zigbee2mqtt source `z2m` and a sink `upstream` tweaked by `tweak` (no checkpoint, hence no
/// garbage collection, during the test, so the `events` table stays whole).
async fn setup(sb: &Sandbox, default: Reply, tweak: impl FnOnce(&mut TestConfig)) -> Setup {
    let broker = Mosquitto::start();
    let receiver = Receiver::start_with_default([], default).await;
    let mut tc = TestConfig::new(sb);
    tc.set("pipeline", "checkpoint_interval_secs", "3600")
        .z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver);
    tweak(&mut tc);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let publisher = Publisher::connect(broker.port()).await;
    Setup {
        _broker: broker,
        receiver,
        tc,
        daemon,
        publisher,
    }
}

fn trv_state(setpoint: f64) -> String {
    json!({"current_heating_setpoint": setpoint, "local_temperature": 19.5,
        "system_mode": "auto", "preset": "manual", "running_state": "heat", "linkquality": 99})
    .to_string()
}

/// Publishes `changes` states to each device: one snapshot then `changes - 1` setpoint events
/// per device; waits until `devices.len() × changes` events are committed.
async fn publish_events(s: &mut Setup, devices: &[&str], changes: u32) -> Db {
    let base = s.tc.base_topic();
    for k in 0..changes {
        for d in devices {
            let sp = 18.0 + 0.5 * f64::from(k);
            s.publisher
                .publish(&format!("{base}/{d}"), trv_state(sp), false)
                .await;
        }
    }
    let want = devices.len() as i64 * i64::from(changes);
    let db = Db::open(&s.tc.db_path());
    wait_until_async(&format!("{want} committed events"), TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM events") == want
    })
    .await;
    db
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

fn row_ids(db: &Db) -> Vec<String> {
    db.events().iter().map(|r| r.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_while_the_key_is_rotated_holds_every_event_then_delivers_all_with_no_dead_letter() {
    let sb = Sandbox::new("hold_401");
    let mut s = setup(&sb, Reply::status(401).body("invalid api key"), |tc| {
        tc.sink_set("upstream", "batch_max_events", "50");
    })
    .await;
    let devices: Vec<String> = (0..20).map(|i| format!("trv{i:02}")).collect();
    let names: Vec<&str> = devices.iter().map(String::as_str).collect();
    let db = publish_events(&mut s, &names, 10).await;
    wait_until_async("three refused attempts", TIMEOUT, || {
        s.receiver.request_count() >= 3
    })
    .await;
    let sink = db.sink("upstream").expect("sink row");
    assert_eq!(
        sink.cursor, 0,
        "nothing is skipped while the endpoint refuses"
    );
    assert_eq!(sink.last_status, Some(401));
    assert_eq!(
        sink.last_error.as_deref(),
        Some("http 401: invalid api key (endpoint problem; events held)")
    );
    assert!(sink.consecutive_failures >= 2, "{sink:?}");
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    let first = db.events()[0].id.clone();
    for r in s.receiver.requests() {
        assert_eq!(r.status, 401);
        assert_eq!(
            r.events()[0].id,
            first,
            "the held batch is resent from its start"
        );
    }

    // The key is fixed: everything held is delivered, in commit order.
    s.receiver.set_default(Reply::ok());
    let unique = s.receiver.wait_unique_events(200, TIMEOUT).await;
    assert_eq!(ids(&unique), row_ids(&db));
    check_seq_gap_free(&unique).unwrap();
    check_duplicates_identical(&s.receiver.accepted_events()).unwrap();
    s.daemon.stop().await.unwrap();
    let sink = db.sink("upstream").expect("sink row");
    assert_eq!(
        (sink.cursor, sink.delivered, sink.consecutive_failures),
        (200, 200, 0)
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_batch_is_bisected_until_only_the_bad_event_becomes_a_dead_letter() {
    let sb = Sandbox::new("bisect_400");
    let mut s = setup(&sb, Reply::ok(), |tc| {
        tc.sink_set("upstream", "batch_max_events", "64");
    })
    .await;
    s.receiver.stop().await;
    let db = publish_events(&mut s, &["a", "b", "bad", "c", "d"], 5).await;
    let bad = db
        .events()
        .into_iter()
        .find(|r| r.device == "bad" && r.seq == 3)
        .expect("the bad event");
    let bad_id = bad.id.clone();
    let rule_id = bad_id.clone();
    s.receiver.set_rule(Some(Arc::new(move |b| {
        let b = b.as_ref().ok()?;
        b.events
            .iter()
            .any(|e| e.id == rule_id)
            .then(|| Reply::status(400).body("unknown field in setpoint"))
    })));
    s.receiver.restart().await;
    let want: Vec<String> = row_ids(&db).into_iter().filter(|i| *i != bad_id).collect();
    let unique = s.receiver.wait_unique_events(want.len(), TIMEOUT).await;
    assert_eq!(ids(&unique), want, "every other event, in commit order");
    wait_until_async("the dead letter", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM dead_letters") == 1
    })
    .await;
    let dead = db.dead_letters();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (
            d.event_id.as_str(),
            d.device.as_str(),
            d.seq,
            d.kind.as_str()
        ),
        (bad_id.as_str(), "bad", 3, "setpoint")
    );
    assert_eq!(
        (
            d.reason.as_str(),
            d.http_status,
            d.response_snippet.as_deref()
        ),
        ("rejected", Some(400), Some("unknown field in setpoint"))
    );
    let requests = s.receiver.requests();
    assert_eq!(requests[0].events().len(), 25, "the whole backlog first");
    for r in &requests {
        let has_bad = r.events().iter().any(|e| e.id == bad_id);
        assert_eq!(
            r.status == 400,
            has_bad,
            "only batches holding the bad event are refused"
        );
    }
    assert!(
        requests.len() <= 16,
        "bisection took {} requests",
        requests.len()
    );
    s.daemon.stop().await.unwrap();
    assert_eq!(db.sink("upstream").expect("sink row").cursor, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_rejecting_every_event_is_held_after_max_consecutive_rejected() {
    let sb = Sandbox::new("reject_all");
    let mut s = setup(&sb, Reply::status(422).body("schema mismatch"), |tc| {
        tc.sink_set("upstream", "max_consecutive_rejected", "3");
    })
    .await;
    s.receiver.stop().await;
    let db = publish_events(&mut s, &["trv"], 6).await;
    s.receiver.restart().await;
    wait_until_async("the sink holds, rejecting every event", TIMEOUT, || {
        db.sink("upstream").is_some_and(|r| {
            r.last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("rejecting every event"))
        })
    })
    .await;
    let rows = db.events();
    let dead: Vec<(String, i64)> = db
        .dead_letters()
        .iter()
        .map(|d| (d.event_id.clone(), d.seq))
        .collect();
    let first3: Vec<(String, i64)> = rows[..3].iter().map(|r| (r.id.clone(), r.seq)).collect();
    assert_eq!(dead, first3, "exactly the first three, one by one");
    let sink = db.sink("upstream").expect("sink row");
    assert_eq!(sink.cursor, 3);
    assert_eq!(
        sink.last_error.as_deref(),
        Some("rejecting every event: http 422: schema mismatch")
    );
    // A further attempt still dead-letters nothing.
    let n = s.receiver.request_count();
    wait_until_async("another held attempt", TIMEOUT, || {
        s.receiver.request_count() > n
    })
    .await;
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 3);

    s.receiver.set_default(Reply::ok());
    let unique = s.receiver.wait_unique_events(3, TIMEOUT).await;
    let rest: Vec<String> = rows[3..].iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids(&unique), rest);
    s.daemon.stop().await.unwrap();
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 3);
    assert_eq!(db.sink("upstream").expect("sink row").cursor, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_halve_the_batch_so_a_slow_receiver_still_gets_everything() {
    let sb = Sandbox::new("timeout_halves");
    let mut s = setup(&sb, Reply::ok(), |tc| {
        tc.sink_set("upstream", "batch_max_events", "40")
            .sink_set("upstream", "request_timeout_ms", "400")
            .sink_set("upstream", "retry_schedule_secs", "[5]");
    })
    .await;
    s.receiver.stop().await;
    let names = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
    let db = publish_events(&mut s, &names, 5).await;
    // More than 10 events take the receiver longer than the sink waits.
    s.receiver.set_rule(Some(Arc::new(|b| {
        let n = b.as_ref().map_or(0, |b| b.events.len());
        (n > 10).then(|| Reply::status(503).delay(Duration::from_millis(1500)))
    })));
    s.receiver.restart().await;
    let unique = s.receiver.wait_unique_events(40, TIMEOUT).await;
    assert_eq!(ids(&unique), row_ids(&db));
    let requests = s.receiver.requests();
    let sizes: Vec<usize> = requests.iter().map(|r| r.events().len()).collect();
    assert_eq!(sizes[..3], [40, 20, 10], "all sizes: {sizes:?}");
    // Halving retries at once: no wait on the retry schedule ([5] s, ±20 %) after a timeout.
    for w in requests[..3].windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(gap < Duration::from_secs(3), "retried after {gap:?}");
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    s.daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_delays_the_sink_but_never_stops_the_daemon() {
    let sb = Sandbox::new("sink_busy");
    let mut s = setup(&sb, Reply::ok(), |tc| {
        tc.set("store", "busy_timeout_ms", "100");
    })
    .await;
    s.receiver.stop().await;
    let db = publish_events(&mut s, &["trv"], 3).await;
    wait_until_async("a failed attempt recorded", TIMEOUT, || {
        db.sink("upstream")
            .is_some_and(|r| r.consecutive_failures >= 1)
    })
    .await;
    // Another process holds the write lock for 3 s: every write of the sink is SQLITE_BUSY.
    let locker = rusqlite::Connection::open(sb.path().join("hvac-edge.db")).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    s.receiver.restart().await;
    s.receiver.wait_unique_events(3, TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);
    wait_until_async("the sink's progress saved", TIMEOUT, || {
        db.sink("upstream").is_some_and(|r| r.cursor == 3)
    })
    .await;
    let unique = s.receiver.unique_events();
    assert_eq!(ids(&unique), row_ids(&db));
    check_duplicates_identical(&s.receiver.accepted_events()).unwrap();
    // Still running: new events flow, and the daemon stops cleanly (no component failed).
    s.publisher
        .publish(
            &format!("{}/trv", s.tc.base_topic()),
            trv_state(25.0),
            false,
        )
        .await;
    s.receiver.wait_unique_events(4, TIMEOUT).await;
    s.daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_stored_event_becomes_an_unreadable_dead_letter_and_the_rest_flow() {
    let sb = Sandbox::new("unreadable_row");
    let mut s = setup(&sb, Reply::ok(), |_| {}).await;
    s.receiver.stop().await;
    let db = publish_events(&mut s, &["trv"], 3).await;
    let rows = db.events();
    // Paused while the row is damaged, so that no attempt holds the intact row in memory.
    let dbfile = sb.path().join("hvac-edge.db");
    let switch = |on: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
            .args(["sinks", on, "upstream", "--db"])
            .arg(&dbfile)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    switch("disable");
    wait_until_async("paused", TIMEOUT, || {
        db.text("SELECT status FROM sinks WHERE name = 'upstream'") == "PAUSED"
    })
    .await;
    // Damage the middle event on disk: its payload is no longer UTF-8.
    let c = rusqlite::Connection::open(&dbfile).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.execute("UPDATE events SET payload = X'FF7B22' WHERE pos = 2", [])
        .unwrap();
    drop(c);
    s.receiver.restart().await;
    switch("enable");
    let unique = s.receiver.wait_unique_events(2, TIMEOUT).await;
    assert_eq!(ids(&unique), vec![rows[0].id.clone(), rows[2].id.clone()]);
    wait_until_async("the dead letter", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM dead_letters") == 1
    })
    .await;
    let d = &db.dead_letters()[0];
    assert_eq!(
        (d.event_id.as_str(), d.seq, d.reason.as_str(), d.http_status),
        (rows[1].id.as_str(), 2, "unreadable", None)
    );
    s.daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_is_quarantined_at_start_and_the_daemon_serves_on_a_fresh_one() {
    let sb = Sandbox::new("corrupt_start");
    let mut s = setup(&sb, Reply::ok(), |_| {}).await;
    let devices: Vec<String> = (0..40).map(|i| format!("trv{i:02}")).collect();
    let names: Vec<&str> = devices.iter().map(String::as_str).collect();
    publish_events(&mut s, &names, 5).await;
    s.receiver.wait_unique_events(200, TIMEOUT).await;
    let Setup {
        _broker: broker,
        receiver,
        tc,
        daemon,
        mut publisher,
    } = s;
    daemon.stop().await.unwrap();
    let path = tc.db_path();
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 8 * 4096, "{} bytes", bytes.len());
    for b in bytes.iter_mut().skip(4096).take(4 * 4096) {
        *b = 0x5A;
    }
    std::fs::write(&path, bytes).unwrap();

    let daemon = Daemon::start(tc.build()).await;
    let dir = sb.path();
    let moved: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.starts_with("hvac-edge.db.corrupt-") && !n.ends_with("-wal") && !n.ends_with("-shm")
        })
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    broker
        .wait_subscribed(&tc.client_id("z2m"), 2, TIMEOUT)
        .await;
    publisher
        .publish(
            &format!("{}/fresh", tc.base_topic()),
            trv_state(21.0),
            false,
        )
        .await;
    receiver
        .wait_event("the fresh database delivers", TIMEOUT, |e| {
            e.device == "fresh" && e.seq == 1
        })
        .await;
    // The technician sees it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["queue", "stats", "--json", "--db"])
        .arg(&path)
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let q = stats["quarantined"].as_array().unwrap();
    assert_eq!(q.len(), 1);
    assert!(q[0].as_str().unwrap().ends_with(&moved[0]), "{q:?}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bogus_ids_and_a_squatted_configured_id_leave_real_devices_working() {
    let sb = Sandbox::new("id_flood");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    let base = tc.base_topic();
    let trusted_base = format!("{base}-b");
    tc.set("pipeline", "max_devices", "100")
        .z2m_source("z2m", broker.port())
        .z2m_source("trusted", broker.port())
        .source_set("trusted", "base_topic", &toml_str(&trusted_base))
        .source_set("trusted", "devices", "[\"boiler\"]")
        .http_sink("upstream", &receiver)
        .sink_set("upstream", "batch_max_events", "500");
    let mut p = Publisher::connect(broker.port()).await;
    // Before the daemon starts, a LAN publisher squats the configured id (retained).
    p.publish(&format!("{base}/boiler"), trv_state(5.0), true)
        .await;
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    broker
        .wait_subscribed(&tc.client_id("trusted"), 1, TIMEOUT)
        .await;
    p.publish(&format!("{base}/living"), trv_state(20.0), false)
        .await;
    receiver
        .wait_event("living's snapshot", TIMEOUT, |e| e.device == "living")
        .await;
    for i in 0..10_001 {
        p.publish(&format!("{base}/bogus-{i:05}"), trv_state(20.0), false)
            .await;
    }
    p.publish(&format!("{base}/living"), trv_state(21.0), false)
        .await;
    p.publish(&format!("{trusted_base}/boiler"), trv_state(19.0), false)
        .await;
    let unique = receiver
        .wait_event("living's change after the flood", TIMEOUT, |e| {
            e.device == "living" && e.seq == 2
        })
        .await;
    let unique = if unique.iter().any(|e| e.device == "boiler") {
        unique
    } else {
        receiver
            .wait_event("the boiler from its own source", TIMEOUT, |e| {
                e.device == "boiler"
            })
            .await
    };
    let bogus = unique
        .iter()
        .filter(|e| e.device.starts_with("bogus-"))
        .count();
    assert_eq!(bogus, 99, "the source's cap (living is one of its 100)");
    let boiler: Vec<(u64, Option<String>)> = unique
        .iter()
        .filter(|e| e.device == "boiler")
        .map(|e| (e.seq, e.state.setpoint.map(|t| t.value.to_string())))
        .collect();
    assert_eq!(
        boiler,
        vec![(1, Some("19.0".to_string()))],
        "never the squatter's 5.0"
    );
    let living: Vec<(u64, String)> = unique
        .iter()
        .filter(|e| e.device == "living")
        .map(|e| (e.seq, e.kind.clone()))
        .collect();
    assert_eq!(
        living,
        vec![(1, "snapshot".to_string()), (2, "setpoint".to_string())]
    );
    assert_eq!(get(&daemon.writer().devices_rejected), 10_001 - 99);
    assert!(get(&daemon.writer().conflicts) >= 1);
    p.clear_retained(&format!("{base}/boiler")).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_sink_ignores_proxy_variables_and_pins_localhost() {
    let sb = Sandbox::new("loopback_proxy");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver)
        .sink_set(
            "upstream",
            "url",
            &toml_str(&format!("http://localhost:{}/ingest", receiver.port())),
        );
    let config = tc.write("hvac-edge.toml");
    // A proxy nobody listens on: a sink that used it would never deliver.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let envs = [
        ("HTTP_PROXY", dead.as_str()),
        ("http_proxy", dead.as_str()),
        ("ALL_PROXY", dead.as_str()),
        ("all_proxy", dead.as_str()),
        ("NO_PROXY", ""),
        ("no_proxy", ""),
    ];
    let mut daemon = DaemonProcess::spawn(&config, sb.path(), &envs);
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    p.publish(&format!("{}/trv", tc.base_topic()), trv_state(21.0), false)
        .await;
    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!((events[0].device.as_str(), events[0].seq), ("trv", 1));
    daemon.sigterm();
    assert!(daemon.wait_timeout_async(TIMEOUT).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restarted_without_its_sessions_voids_the_old_receipts_and_events_flow() {
    let sb = Sandbox::new("session_lost");
    let mut s = setup(&sb, Reply::ok(), |_| {}).await;
    let topic = format!("{}/trv", s.tc.base_topic());
    s.publisher.publish(&topic, trv_state(20.0), false).await;
    s.receiver.wait_unique_events(1, TIMEOUT).await;
    let db = Db::open(&s.tc.db_path());
    let receipts =
        |db: &Db| db.count("SELECT COALESCE(length(receipts), -1) FROM events WHERE pos = 1");
    assert!(receipts(&db) > 0, "the commit's receipt rides on its event");
    // The first connection had no session either (a new client id).
    wait_until_async("the first sessionless connect", TIMEOUT, || {
        get(&s.daemon.writer().sessions_lost) == 1
    })
    .await;
    // mosquitto without persistence: sessions are gone after the restart.
    s._broker.restart();
    s._broker
        .wait_connected(&s.tc.client_id("z2m"), 2, TIMEOUT)
        .await;
    wait_until_async(
        "the sessionless reconnect seen by the writer",
        TIMEOUT,
        || get(&s.daemon.writer().sessions_lost) == 2,
    )
    .await;
    assert_eq!(
        receipts(&db),
        0,
        "the old session's receipts are gone from the file"
    );
    let mut p = Publisher::connect(s._broker.port()).await;
    s._broker
        .wait_subscribed(&s.tc.client_id("z2m"), 2, TIMEOUT)
        .await;
    p.publish(&topic, trv_state(20.0), false).await; // same bytes, maybe the same packet id
    p.publish(&topic, trv_state(21.5), false).await;
    let unique = s
        .receiver
        .wait_event("the change after the restart", TIMEOUT, |e| e.seq == 2)
        .await;
    let got: Vec<(u64, String)> = unique.iter().map(|e| (e.seq, e.kind.clone())).collect();
    assert_eq!(
        got,
        vec![(1, "snapshot".to_string()), (2, "setpoint".to_string())]
    );
    s.daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_disabled_by_a_technician_holds_its_events_and_the_daemon_never_undoes_the_switch() {
    let sb = Sandbox::new("sink_control");
    let mut s = setup(&sb, Reply::ok(), |_| {}).await;
    let path = s.tc.db_path();
    let db = publish_events(&mut s, &["trv"], 1).await;
    s.receiver.wait_unique_events(1, TIMEOUT).await;
    // The technician's side (the CLI, later) writes only `sink_control`.
    let tech = rusqlite::Connection::open(&path).unwrap();
    tech.busy_timeout(Duration::from_secs(5)).unwrap();
    hvac_edge::store::outbox::set_sink_control(
        &tech,
        &path,
        "upstream",
        false,
        Some("receiver maintenance"),
        Some("tech-1"),
        now_ms(),
    )
    .unwrap();
    // The switch applies within a second (the sink reads it at most once a second while it
    // delivers); from then on nothing is sent.
    wait_until_async("the sink shows the technician's switch", TIMEOUT, || {
        db.sink("upstream").is_some_and(|r| {
            r.last_error.as_deref() == Some("disabled by a technician: receiver maintenance")
        })
    })
    .await;
    let topic = format!("{}/trv", s.tc.base_topic());
    for sp in [21.0, 21.5, 22.0] {
        s.publisher.publish(&topic, trv_state(sp), false).await;
    }
    wait_until_async("four events committed", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM events") == 4
    })
    .await;
    assert_eq!(
        db.count("SELECT COUNT(*) FROM sinks WHERE name = 'upstream' AND status = 'PAUSED'"),
        1
    );
    // The daemon saved its own row since (status, last_error): the switch is still the
    // technician's, with their note and name.
    let ctl = hvac_edge::store::outbox::sink_control(&tech, &path, "upstream")
        .unwrap()
        .unwrap();
    assert_eq!(
        (ctl.enabled, ctl.note.as_deref(), ctl.updated_by.as_deref()),
        (false, Some("receiver maintenance"), Some("tech-1"))
    );
    assert_eq!(
        s.receiver.unique_events().len(),
        1,
        "nothing sent while disabled"
    );
    assert_eq!(
        db.sink("upstream").unwrap().cursor,
        1,
        "nothing skipped either"
    );

    hvac_edge::store::outbox::set_sink_control(
        &tech,
        &path,
        "upstream",
        true,
        None,
        Some("tech-1"),
        now_ms(),
    )
    .unwrap();
    let unique = s.receiver.wait_unique_events(4, TIMEOUT).await;
    assert_eq!(ids(&unique), row_ids(&db));
    wait_until_async("active again", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM sinks WHERE name = 'upstream' AND status = 'ACTIVE' AND last_error IS NULL") == 1
    })
    .await;
    s.daemon.stop().await.unwrap();
}
