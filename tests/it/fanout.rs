//! Fan-out: several sinks of every kind on their own cursors, and the webhook delivery rules of
//! the vendor clouds (750 ms, status >= 300, bans, DISABLED_DUE_TO_ERRORS, 410, drop_during_ban,
//! expiry) with none of their losses: events are held, and `operational` events tell the other
//! sinks when a webhook is banned, disabled or recovers.

// Test helpers: a failed expectation panics with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::harness::*;
use hvac_edge::model::Event;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GW_DEVICE: &str = "@gateway";

/// A plain MQTT subscriber on the upstream broker collecting (topic, event) in arrival order.
struct Upstream {
    got: Arc<Mutex<Vec<(String, Event)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn subscribe(broker: &Mosquitto, client_id: &str, filter: &str) -> Upstream {
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", broker.port());
        o.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
        client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let got: Arc<Mutex<Vec<(String, Event)>>> = Arc::default();
        let sink = got.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            for _ in 0..1_000_000 {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if let Ok(e) = serde_json::from_slice::<Event>(&p.payload) {
                            sink.lock().unwrap().push((p.topic.clone(), e));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        broker.wait_subscribed(client_id, 1, TIMEOUT).await;
        Upstream { got, task }
    }

    fn events(&self) -> Vec<(String, Event)> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Device events (not the gateway's own) in the database, by position.
fn device_events(db: &Db) -> Vec<EventRow> {
    db.events()
        .into_iter()
        .filter(|e| e.device != GW_DEVICE)
        .collect()
}

use crate::harness::db::EventRow;

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

fn device_only(events: Vec<Event>) -> Vec<Event> {
    events
        .into_iter()
        .filter(|e| e.device != GW_DEVICE)
        .collect()
}

/// The `operational` notes (state, sink) a receiver got, in order, without duplicates.
fn notes(r: &Receiver) -> Vec<(String, String)> {
    dedup_by_id(&r.accepted_events())
        .into_iter()
        .filter(|e| e.kind == "operational")
        .map(|e| {
            (
                e.current["state"].as_str().unwrap_or("").to_string(),
                e.current["sink"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// One column of the sink's row as text (or NULL as None).
fn sink_col(tc: &TestConfig, sink: &str, col: &str) -> Option<String> {
    let c = rusqlite::Connection::open(tc.db_path()).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row(
        &format!("SELECT CAST({col} AS TEXT) FROM sinks WHERE name = ?1"),
        [sink],
        |r| r.get::<_, Option<String>>(0),
    )
    .unwrap_or(None)
}

/// (status, error_kind) of the failed attempts of `sink`, oldest first.
fn attempts(tc: &TestConfig, sink: &str) -> Vec<(i64, String)> {
    let c = rusqlite::Connection::open(tc.db_path()).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = c
        .prepare("SELECT status, error_kind FROM sink_attempts WHERE sink = ?1 ORDER BY id")
        .unwrap();
    st.query_map([sink], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

struct Site {
    /// Keeps the temp dir alive.
    _sb: Sandbox,
    broker: Mosquitto,
    tc: TestConfig,
}

impl Site {
    fn new(test: &str) -> Site {
        let sb = Sandbox::new(test);
        let broker = Mosquitto::start();
        let mut tc = TestConfig::new(&sb);
        tc.z2m_source("z2m", broker.port());
        Site {
            _sb: sb,
            broker,
            tc,
        }
    }

    async fn start(&self) -> (Daemon, Publisher) {
        let daemon = Daemon::start(self.tc.build()).await;
        self.broker
            .wait_subscribed(&self.tc.client_id("z2m"), 1, TIMEOUT)
            .await;
        let p = Publisher::connect(self.broker.port()).await;
        (daemon, p)
    }

    /// Publishes a setpoint for `device` and waits until the daemon committed its event.
    async fn setpoint(&self, p: &mut Publisher, daemon: &Daemon, device: &str, sp: f64) {
        let before = daemon.committed();
        p.publish(
            &format!("{}/{device}", self.tc.base_topic()),
            format!(r#"{{"occupied_heating_setpoint":{sp},"local_temperature":19.0}}"#),
            false,
        )
        .await;
        wait_until_async("the change committed", TIMEOUT, || {
            daemon.committed() > before
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_sinks_at_once_a_dead_webhook_delays_no_one_and_gets_everything_held_in_order() {
    let mut site = Site::new("fanout_four");
    let upstream_broker = Mosquitto::start();
    let (a, mut b, batch) = (
        Receiver::start([]).await,
        Receiver::start([]).await,
        Receiver::start([]).await,
    );
    site.tc
        .webhook_sink("hook-a", &a)
        .webhook_sink("hook-b", &b)
        .http_sink("ingest", &batch)
        .mqtt_sink("cloud", upstream_broker.port());
    let sub = Upstream::subscribe(&upstream_broker, "it-fanout-sub", "hvac-edge/#").await;
    let (daemon, mut p) = site.start().await;
    let devices = ["hall", "kitchen"];
    let mut published = 0;
    for (i, d) in devices.iter().enumerate() {
        site.setpoint(&mut p, &daemon, d, 20.0 + i as f64).await;
        published += 1;
    }
    a.wait_unique_events(published, TIMEOUT).await;
    b.wait_unique_events(published, TIMEOUT).await;
    // B goes down for a stretch: A, the batch sink and the MQTT upstream keep receiving at once.
    b.stop().await;
    let mut latencies = Vec::new();
    for k in 0..8 {
        let d = devices[k % 2];
        let t0 = Instant::now();
        site.setpoint(&mut p, &daemon, d, 21.0 + k as f64 * 0.5)
            .await;
        published += 1;
        a.wait_unique_events(published, TIMEOUT).await;
        latencies.push(t0.elapsed());
        batch.wait_unique_events(published, TIMEOUT).await;
    }
    let worst = latencies.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(900),
        "a dead webhook beside it must not delay webhook A (retry schedule is 1 s): worst {worst:?}"
    );
    let db = Db::open(&site.tc.db_path());
    let committed = device_events(&db);
    assert_eq!(committed.len(), published);
    wait_until_async("every event on the MQTT upstream", TIMEOUT, || {
        let got: std::collections::HashSet<String> =
            sub.events().into_iter().map(|(_, e)| e.id).collect();
        committed.iter().all(|e| got.contains(&e.id))
    })
    .await;
    // B held everything it missed (failures recorded, no dead letters); back, it gets it all in order.
    assert!(
        attempts(&site.tc, "hook-b")
            .iter()
            .all(|(s, k)| *s == 0 && k == "connect"),
        "{:?}",
        attempts(&site.tc, "hook-b")
    );
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    b.restart().await;
    let got_b = b.wait_unique_events(published, TIMEOUT).await;
    let want: Vec<String> = committed.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        ids(&device_only(got_b.clone())),
        want,
        "every event, in commit order"
    );
    check_seq_gap_free(&got_b).unwrap();
    // One event per webhook request, signed, with the event id as webhook-id.
    for r in b.requests().iter().filter(|r| r.accepted()) {
        assert_eq!(r.events().len(), 1);
        assert!(r.signature_ok);
        assert_eq!(
            r.header("webhook-id"),
            Some(format!("msg_{}", r.events()[0].id).as_str())
        );
    }
    // The MQTT topics are the documented template.
    for (topic, e) in sub.events() {
        assert_eq!(topic, format!("hvac-edge/gw-it/{}/{}", e.device, e.kind));
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_750_ms_is_a_failure_and_the_retry_carries_the_same_ids() {
    let mut site = Site::new("fanout_750");
    let r = Receiver::start([Reply::ok().delay(Duration::from_millis(1000))]).await;
    site.tc.webhook_sink("hook", &r);
    let (daemon, mut p) = site.start().await;
    site.setpoint(&mut p, &daemon, "hall", 21.0).await;
    wait_until_async("the retry", TIMEOUT, || r.request_count() >= 2).await;
    let reqs = r.requests();
    // The receiver processed the first request (after 1 s), but the daemon gave up at 750 ms.
    assert_eq!(reqs[0].status, 200);
    assert_eq!(reqs[0].header("webhook-id"), reqs[1].header("webhook-id"));
    assert_eq!(ids(reqs[0].events()), ids(reqs[1].events()));
    let gap = reqs[1].at - reqs[0].at;
    assert!(
        gap >= Duration::from_millis(750 + 800),
        "timeout then the 1 s (±20 %) schedule: {gap:?}"
    );
    assert_eq!(attempts(&site.tc, "hook"), vec![(0, "timeout".to_string())]);
    wait_until_async("delivered", TIMEOUT, || {
        sink_col(&site.tc, "hook", "successes").as_deref() == Some("1")
    })
    .await;
    assert_eq!(
        sink_col(&site.tc, "hook", "consecutive_failures").as_deref(),
        Some("0")
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_404_and_500_are_failures_held_never_followed_and_retry_after_is_honoured() {
    let mut site = Site::new("fanout_statuses");
    let other = Receiver::start([]).await;
    let r = Receiver::start([
        Reply::status(301).header("location", &other.url()),
        Reply::status(404).body("no such hook"),
        Reply::status(500),
        Reply::status(503).header("retry-after", "3"),
    ])
    .await;
    site.tc.webhook_sink("hook", &r);
    let (daemon, mut p) = site.start().await;
    site.setpoint(&mut p, &daemon, "hall", 21.0).await;
    let got = r.wait_unique_events(1, TIMEOUT).await;
    wait_until_async("the fifth request accepted", TIMEOUT, || {
        r.requests().iter().any(|q| q.accepted())
    })
    .await;
    let reqs = r.requests();
    assert_eq!(
        reqs.iter().map(|q| q.status).collect::<Vec<_>>(),
        vec![301, 404, 500, 503, 200]
    );
    assert!(
        reqs.iter().all(|q| ids(q.events()) == ids(&got)),
        "the same event every time"
    );
    assert_eq!(other.request_count(), 0, "a redirect is never followed");
    let gap = reqs[4].at - reqs[3].at;
    assert!(
        gap >= Duration::from_millis(2900),
        "Retry-After: 3 honoured: {gap:?}"
    );
    for w in reqs[..4].windows(2) {
        assert!(
            w[1].at - w[0].at >= Duration::from_millis(750),
            "the 1 s schedule"
        );
    }
    assert_eq!(
        attempts(&site.tc, "hook"),
        [301, 404, 500, 503]
            .map(|s| (s, "status".to_string()))
            .to_vec()
    );
    let db = Db::open(&site.tc.db_path());
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_ban_the_endpoint_for_a_growing_time_and_the_other_sinks_are_told() {
    let mut site = Site::new("fanout_ban");
    let r = Receiver::start_with_default([], Reply::status(500)).await;
    let watcher = Receiver::start([]).await;
    site.tc
        .webhook_sink("hook", &r)
        .sink_set("hook", "ban_every_failures", "3")
        .sink_set("hook", "ban_step_secs", "2")
        .sink_set("hook", "ban_max_secs", "3")
        .http_sink("ingest", &watcher);
    let (daemon, mut p) = site.start().await;
    site.setpoint(&mut p, &daemon, "hall", 21.0).await;
    wait_until_async("seven failed requests", Duration::from_secs(60), || {
        r.request_count() >= 7
    })
    .await;
    let reqs = r.requests();
    let gaps: Vec<Duration> = reqs.windows(2).map(|w| w[1].at - w[0].at).collect();
    // Failures 1, 2 wait the 1 s schedule; the 3rd bans for 2 s (one set of 3), the 6th for
    // 2 x 2 = 4 s, capped at ban_max_secs = 3.
    assert!(
        gaps[0] < Duration::from_millis(1900) && gaps[1] < Duration::from_millis(1900),
        "{gaps:?}"
    );
    assert!(
        gaps[2] >= Duration::from_millis(1950),
        "first ban, 2 s: {gaps:?}"
    );
    assert!(
        gaps[5] >= Duration::from_millis(2950),
        "second ban capped at 3 s: {gaps:?}"
    );
    assert!(gaps[3] < Duration::from_millis(1900), "{gaps:?}");
    // During a ban the status says so, with the end of the ban.
    wait_until_async("banned twice, told the other sink", TIMEOUT, || {
        notes(&watcher)
            .iter()
            .filter(|(s, _)| s == "banned")
            .count()
            >= 2
    })
    .await;
    // Events that arrive during a ban are held, not lost.
    site.setpoint(&mut p, &daemon, "hall", 22.0).await;
    r.set_default(Reply::ok());
    let got = r.wait_unique_events(2, Duration::from_secs(30)).await;
    let db = Db::open(&site.tc.db_path());
    assert_eq!(
        ids(&device_only(got)),
        device_events(&db)
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>()
    );
    wait_until_async("recovered, told the other sink", TIMEOUT, || {
        notes(&watcher).last() == Some(&("recovered".to_string(), "hook".to_string()))
    })
    .await;
    // The note goes out before the sink saves its row: wait for the row.
    wait_until_async("ACTIVE, ban cleared", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("ACTIVE")
            && sink_col(&site.tc, "hook", "banned_until").is_none()
    })
    .await;
    let op = watcher
        .accepted_events()
        .into_iter()
        .find(|e| e.kind == "operational")
        .unwrap();
    assert_eq!(op.device, GW_DEVICE);
    assert_eq!(op.current["kind"], "webhook");
    assert_eq!(op.current["failures"], 3);
    assert!(
        op.current["reason"].as_str().unwrap().contains("http 500"),
        "{}",
        op.current
    );
    assert!(op.current["banned_until"].is_string());
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    // The gateway's own events have their own gap-free seq.
    let ops: Vec<Event> = dedup_by_id(&watcher.accepted_events())
        .into_iter()
        .filter(|e| e.device == GW_DEVICE)
        .collect();
    check_seq_gap_free(&ops).unwrap();
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_limit_disables_the_sink_until_a_technician_or_a_config_change_enables_it() {
    let mut site = Site::new("fanout_disable");
    let r = Receiver::start_with_default([], Reply::status(503)).await;
    let watcher = Receiver::start([]).await;
    site.tc
        .webhook_sink("hook", &r)
        .sink_set("hook", "failure_limit", "3")
        .http_sink("ingest", &watcher);
    let (daemon, mut p) = site.start().await;
    site.setpoint(&mut p, &daemon, "hall", 21.0).await;
    wait_until_async("disabled", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("DISABLED_DUE_TO_ERRORS")
    })
    .await;
    assert_eq!(r.request_count(), 3);
    // Held while disabled: new events wait, nothing is sent, nothing is dropped.
    site.setpoint(&mut p, &daemon, "hall", 22.0).await;
    r.set_default(Reply::ok());
    let quiet = Instant::now();
    wait_until_async("the disable note on the other sink", TIMEOUT, || {
        notes(&watcher).contains(&("disabled".to_string(), "hook".to_string()))
    })
    .await;
    assert_holds_for(
        "a disabled sink sends nothing",
        Duration::from_secs(2).saturating_sub(quiet.elapsed()),
        || r.request_count() == 3,
    )
    .await;
    // A technician enables it with the CLI while the daemon runs.
    let path = site.tc.db_path();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args([
            "sinks",
            "enable",
            "hook",
            "--note",
            "receiver fixed",
            "--db",
        ])
        .arg(&path)
        .env("USER", "tech-anna")
        .env_remove("SUDO_USER")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sink hook enabled by tech-anna; a running daemon delivers what it held within a second\n"
    );
    let got = r.wait_unique_events(2, TIMEOUT).await;
    let db = Db::open(&path);
    assert_eq!(
        ids(&device_only(got)),
        device_events(&db)
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>(),
        "what it held, in order"
    );
    wait_until_async("enabled and recovered notes", TIMEOUT, || {
        let n = notes(&watcher);
        n.contains(&("enabled".to_string(), "hook".to_string()))
            && n.contains(&("recovered".to_string(), "hook".to_string()))
    })
    .await;
    let enabled = dedup_by_id(&watcher.accepted_events())
        .into_iter()
        .find(|e| e.kind == "operational" && e.current["state"] == "enabled")
        .unwrap();
    assert_eq!(enabled.current["reason"], "enabled by tech-anna");
    // An unknown sink is an error naming it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["sinks", "disable", "nope", "--db"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sink \"nope\" has run on"));
    // Disabled again; a restart with the same config keeps it disabled, a changed config enables it.
    r.set_default(Reply::status(503));
    site.setpoint(&mut p, &daemon, "hall", 23.0).await;
    wait_until_async("disabled again", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("DISABLED_DUE_TO_ERRORS")
    })
    .await;
    daemon.stop().await.unwrap();
    let (daemon, _p) = site.start().await;
    let n = r.request_count();
    assert_holds_for(
        "still disabled after a restart",
        Duration::from_millis(1500),
        || r.request_count() == n,
    )
    .await;
    daemon.stop().await.unwrap();
    r.set_default(Reply::ok());
    site.tc.sink_set("hook", "failure_limit", "4");
    let (daemon, _p) = site.start().await;
    r.wait_unique_events(3, TIMEOUT).await;
    // The sink saves its row right after the delivery the receiver has already seen.
    wait_until_async("ACTIVE again", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("ACTIVE")
    })
    .await;
    assert_eq!(
        Db::open(&path).count("SELECT COUNT(*) FROM dead_letters"),
        0
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_disables_the_sink_at_once_and_holds_its_events() {
    let mut site = Site::new("fanout_410");
    let r = Receiver::start_with_default([], Reply::status(410)).await;
    site.tc.webhook_sink("hook", &r);
    let (daemon, mut p) = site.start().await;
    site.setpoint(&mut p, &daemon, "hall", 21.0).await;
    wait_until_async("disabled", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("DISABLED_DUE_TO_ERRORS")
    })
    .await;
    assert_eq!(r.request_count(), 1);
    assert_eq!(
        attempts(&site.tc, "hook"),
        vec![(410, "status".to_string())]
    );
    let db = Db::open(&site.tc.db_path());
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    assert_eq!(
        sink_col(&site.tc, "hook", "cursor").as_deref(),
        Some("0"),
        "held"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_during_ban_makes_every_dropped_event_a_dead_letter_banned() {
    let mut site = Site::new("fanout_drop");
    let r = Receiver::start_with_default([], Reply::status(500)).await;
    site.tc
        .webhook_sink("hook", &r)
        .sink_set("hook", "ban_every_failures", "2")
        .sink_set("hook", "ban_step_secs", "4")
        .sink_set("hook", "drop_during_ban", "true");
    let (daemon, mut p) = site.start().await;
    site.setpoint(&mut p, &daemon, "hall", 21.0).await;
    wait_until_async("banned", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("BANNED")
    })
    .await;
    r.set_default(Reply::ok());
    site.setpoint(&mut p, &daemon, "hall", 22.0).await;
    site.setpoint(&mut p, &daemon, "kitchen", 19.0).await;
    let db = Db::open(&site.tc.db_path());
    let all = device_events(&db);
    assert_eq!(all.len(), 3);
    wait_until_async("three dead letters", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM dead_letters") == 3
    })
    .await;
    let dl = db.dead_letters();
    assert_eq!(
        dl.iter()
            .map(|d| (d.event_id.clone(), d.reason.clone()))
            .collect::<Vec<_>>(),
        all.iter()
            .map(|e| (e.id.clone(), "banned".to_string()))
            .collect::<Vec<_>>(),
        "the failing event and those that came during the ban: dead letters, never silence"
    );
    // After the ban, new events are delivered again.
    wait_until_async("ban over", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("ACTIVE")
    })
    .await;
    site.setpoint(&mut p, &daemon, "hall", 23.0).await;
    let got = r.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(got[0].device, "hall");
    assert_eq!(got[0].current["value"], "23.0");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_webhook_events_expire_into_dead_letters() {
    let mut site = Site::new("fanout_ttl");
    let mut r = Receiver::start([]).await;
    r.stop().await;
    site.tc
        .webhook_sink("hook", &r)
        .sink_set("hook", "ttl_secs", "2");
    let (daemon, mut p) = site.start().await;
    site.setpoint(&mut p, &daemon, "hall", 21.0).await;
    let db = Db::open(&site.tc.db_path());
    wait_until_async("expired", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM dead_letters") == 1
    })
    .await;
    let dl = db.dead_letters();
    assert_eq!(dl[0].reason, "expired");
    assert_eq!(dl[0].event_id, device_events(&db)[0].id);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_sink_frees_what_only_it_held_and_a_new_sink_starts_from_now_or_oldest() {
    let mut site = Site::new("fanout_gc");
    let live = Receiver::start([]).await;
    let mut dead = Receiver::start([]).await;
    dead.stop().await;
    site.tc
        .http_sink("live", &live)
        .webhook_sink("dead", &dead)
        .set("pipeline", "checkpoint_interval_secs", "1");
    let (daemon, mut p) = site.start().await;
    for (i, sp) in [20.0, 20.5, 21.0].iter().enumerate() {
        site.setpoint(&mut p, &daemon, "hall", *sp).await;
        live.wait_unique_events(i + 1, TIMEOUT).await;
    }
    daemon.stop().await.unwrap();
    let db = Db::open(&site.tc.db_path());
    assert_eq!(device_events(&db).len(), 3, "held for the dead sink");
    // A sink added with from = "oldest" gets what is still stored; one with "now" only new events.
    let (old, new) = (Receiver::start([]).await, Receiver::start([]).await);
    site.tc
        .webhook_sink("added-oldest", &old)
        .webhook_sink("added-now", &new)
        .sink_set("added-oldest", "from", "\"oldest\"")
        .sink_set("added-now", "from", "\"now\"");
    let (daemon, mut p) = site.start().await;
    old.wait_unique_events(3, TIMEOUT).await;
    site.setpoint(&mut p, &daemon, "hall", 21.5).await;
    let got_new = new.wait_unique_events(1, TIMEOUT).await;
    old.wait_unique_events(4, TIMEOUT).await;
    assert_eq!(got_new.len(), 1);
    assert_eq!(got_new[0].current["value"], "21.5");
    daemon.stop().await.unwrap();
    assert_eq!(device_events(&db).len(), 4, "still held for the dead sink");
    // Removing the dead sink frees what only it held.
    site.tc.remove_sink("dead");
    let (daemon, _p) = site.start().await;
    wait_until_async("garbage collected", TIMEOUT, || {
        device_events(&db).len() <= 1
    })
    .await;
    daemon.stop().await.unwrap();
}

/// `hvac-edge sinks <verb> <name> --db <path>` as a technician would type it.
fn cli(verb: &str, sink: &str, db: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["sinks", verb, sink, "--db"])
        .arg(db)
        .env("USER", "tech-bo")
        .env_remove("SUDO_USER")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_over_a_disabled_sink_keeps_it_disabled_and_enabling_starts_it_afresh() {
    let mut site = Site::new("fanout_pause_disabled");
    let r = Receiver::start_with_default([], Reply::status(503)).await;
    let watcher = Receiver::start([]).await;
    site.tc
        .webhook_sink("hook", &r)
        .sink_set("hook", "failure_limit", "2")
        .http_sink("ingest", &watcher);
    let (daemon, mut p) = site.start().await;
    site.setpoint(&mut p, &daemon, "hall", 21.0).await;
    wait_until_async("disabled", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("DISABLED_DUE_TO_ERRORS")
    })
    .await;
    let path = site.tc.db_path();
    assert!(cli("disable", "hook", &path).status.success());
    wait_until_async("paused", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("PAUSED")
    })
    .await;
    assert!(
        sink_col(&site.tc, "hook", "disabled_at").is_some(),
        "the disable is kept under the pause"
    );
    // Enabling now is a re-enable: the failure count starts again (one more failure does not
    // disable it at once), the others are told, and the held event is delivered.
    r.set_default(Reply::ok());
    assert!(cli("enable", "hook", &path).status.success());
    let got = r.wait_unique_events(1, TIMEOUT).await;
    let db = Db::open(&path);
    assert_eq!(
        ids(&got),
        vec![device_events(&db)[0].id.clone()],
        "the held event"
    );
    wait_until_async("enabled and recovered notes", TIMEOUT, || {
        let n = notes(&watcher);
        n.contains(&("enabled".to_string(), "hook".to_string()))
            && n.contains(&("recovered".to_string(), "hook".to_string()))
    })
    .await;
    // The notes go out before the sink saves its row: wait for the row.
    wait_until_async("ACTIVE, not disabled", TIMEOUT, || {
        sink_col(&site.tc, "hook", "status").as_deref() == Some("ACTIVE")
            && sink_col(&site.tc, "hook", "disabled_at").is_none()
    })
    .await;
    r.set_default(Reply::status(503));
    site.setpoint(&mut p, &daemon, "hall", 22.0).await;
    wait_until_async("one failure", TIMEOUT, || {
        sink_col(&site.tc, "hook", "consecutive_failures").as_deref() == Some("1")
    })
    .await;
    assert_eq!(
        sink_col(&site.tc, "hook", "status").as_deref(),
        Some("ACTIVE")
    );
    daemon.stop().await.unwrap();
}
