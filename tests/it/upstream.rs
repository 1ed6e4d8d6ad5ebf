//! The MQTT upstream sink (`[[sinks.mqtt]]`) against a second, real mosquitto: every committed
//! event arrives by id and in per-device order across an upstream broker restart, the retained
//! `online`/`offline` status and the last will, a client certificate against
//! `require_certificate`, topic templates with plant and module, and PUBACKs withheld past the
//! ack timeout.
//!
//! The source broker (Zigbee2MQTT states from the test's publisher) and the upstream broker are
//! always two separate mosquitto processes. A small rumqttc [`Subscriber`] on the upstream broker
//! plays the cloud: it records every message it gets, in arrival order. Where the daemon must
//! be kept away from the upstream broker, or must lose the broker's PUBACKs, it connects through
//! a [`Gate`] (a TCP forwarder the test opens, closes and mutes).

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::harness::db::EventRow;
use crate::harness::*;
use hvac_edge::model::Event;
use rumqttc::{AsyncClient, MqttOptions, Packet, QoS, SubscribeFilter};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// hostile.rs loads the same file for the MQTT source's TLS tests; it is not in the shared
// harness, and `hostile::tls_broker` is private to that module.
#[path = "tls_broker.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod tls_broker;
use tls_broker::{Pki, TlsBroker};

/// The default status topic for gateway `gw-it`.
const STATUS: &str = "hvac-edge/gw-it/status";
/// How long the subscriber waits before reconnecting after a connection error.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// How long the daemon's binary may take to exit after SIGKILL.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// One message as the subscriber got it.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    payload: Vec<u8>,
    retain: bool,
    at: Instant,
}

impl Msg {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A QoS 1 subscriber (rumqttc, fixed client id, auto acks) that records every message in
/// arrival order. On every CONNACK without a session (first connect, or a broker that lost
/// its sessions) it subscribes again; after a connection error it reconnects by itself. The
/// event loop runs on a background task, aborted on drop.
struct Subscriber {
    client_id: String,
    msgs: Arc<Mutex<Vec<Msg>>>,
    subacks: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects to 127.0.0.1:`port` as `client_id` and waits for the SUBACK of `filters`.
    async fn connect(port: u16, client_id: &str, clean: bool, filters: &[&str]) -> Subscriber {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(AtomicUsize::new(0));
        let filters: Vec<SubscribeFilter> = filters
            .iter()
            .map(|f| SubscribeFilter::new((*f).to_string(), QoS::AtLeastOnce))
            .collect();
        let task = {
            let (msgs, subacks) = (msgs.clone(), subacks.clone());
            tokio::spawn(async move {
                // Runs until the subscriber is dropped (the test's lifetime bounds it).
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Incoming(Packet::ConnAck(ack))) => {
                            if !ack.session_present {
                                client
                                    .try_subscribe_many(filters.clone())
                                    .expect("queue the subscription");
                            }
                        }
                        Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                            subacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                            msgs.lock().unwrap().push(Msg {
                                topic: p.topic.clone(),
                                payload: p.payload.to_vec(),
                                retain: p.retain,
                                at: Instant::now(),
                            });
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(RECONNECT_PAUSE).await,
                    }
                }
            })
        };
        let s = Subscriber {
            client_id: client_id.to_string(),
            msgs,
            subacks,
            task,
        };
        wait_until_async(
            &format!("subscriber {client_id} subscribed"),
            TIMEOUT,
            || s.subacks.load(Ordering::SeqCst) >= 1,
        )
        .await;
        s
    }

    /// A fresh clean-session subscriber with a unique id (for retained messages).
    async fn fresh(port: u16, sb: &Sandbox, n: u32, filter: &str) -> Subscriber {
        Subscriber::connect(port, &format!("it-{}-fresh{n}", sb.tag()), true, &[filter]).await
    }

    /// Every message so far, in arrival order.
    fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    /// The messages on `topic`, in arrival order.
    fn on(&self, topic: &str) -> Vec<Msg> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Every message whose topic does not end with `/status`, as (message, parsed event).
    fn events(&self) -> Vec<(Msg, Event)> {
        self.messages()
            .into_iter()
            .filter(|m| !m.topic.ends_with("/status"))
            .map(|m| {
                let e: Event = serde_json::from_slice(&m.payload).unwrap_or_else(|err| {
                    panic!("{}: not an event envelope ({err}): {}", m.topic, m.text())
                });
                (m, e)
            })
            .collect()
    }

    /// The ids of the events received on topics starting with `prefix`.
    fn ids_under(&self, prefix: &str) -> HashSet<String> {
        self.events()
            .into_iter()
            .filter(|(m, _)| m.topic.starts_with(prefix))
            .map(|(_, e)| e.id)
            .collect()
    }

    /// Waits until every id of `want` arrived on a topic starting with `prefix`.
    async fn wait_ids(&self, prefix: &str, want: &[String], what: &str) {
        wait_until_async(
            &format!("{} event ids ({what}) at {}", want.len(), self.client_id),
            TIMEOUT,
            || {
                let got = self.ids_under(prefix);
                want.iter().all(|id| got.contains(id))
            },
        )
        .await;
    }

    /// Waits for the first message on `topic` and returns it.
    async fn first_on(&self, topic: &str) -> Msg {
        wait_for_async(
            &format!("a message on {topic} at {}", self.client_id),
            TIMEOUT,
            || self.on(topic).into_iter().next(),
        )
        .await
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP forwarder on 127.0.0.1 between the daemon and the upstream broker, which the test
/// opens and closes. While closed it accepts and at once drops new connections (the daemon's
/// reconnects fail as against a dead broker); connections made while open are forwarded until
/// either side ends, so a killed broker ends the daemon's connection as it would directly.
/// While muted it forwards the daemon's packets to the broker but drops everything the broker
/// sends back: the broker forwards the daemon's publishes to subscribers and its PUBACKs are
/// lost on the way, i.e. a batch is in flight when the broker dies.
///
/// Why: mosquitto runs with `persistence false`, so a restarted broker has lost the test
/// subscriber's session, and whatever the daemon publishes before the subscriber has subscribed
/// again is acknowledged to the daemon and dropped by the broker. Keeping the daemon out until
/// the subscriber's new SUBACK makes "every event arrives" a deterministic claim instead of a
/// race between two reconnect timers; muting makes "a batch is cut mid-flight" one too.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    mute: Arc<AtomicBool>,
    dropped: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Gate {
    /// An open, unmuted gate to 127.0.0.1:`target`.
    async fn start(target: u16) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let port = listener.local_addr().expect("gate address").port();
        let open = Arc::new(AtomicBool::new(true));
        let mute = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicUsize::new(0));
        let task = {
            let (open, mute, dropped) = (open.clone(), mute.clone(), dropped.clone());
            tokio::spawn(async move {
                // Runs until the gate is dropped.
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    if !open.load(Ordering::SeqCst) {
                        dropped.fetch_add(1, Ordering::SeqCst);
                        drop(inbound);
                        continue;
                    }
                    tokio::spawn(forward(inbound, target, mute.clone()));
                }
            })
        };
        Gate {
            port,
            open,
            mute,
            dropped,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }

    fn set_mute(&self, mute: bool) {
        self.mute.store(mute, Ordering::SeqCst);
    }

    /// Connections dropped while closed.
    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one connection to 127.0.0.1:`target` until either side ends (then both are
/// closed); the broker's bytes are dropped while `mute` is set.
async fn forward(inbound: tokio::net::TcpStream, target: u16, mute: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (mut from_daemon, mut to_daemon) = inbound.into_split();
    let (mut from_broker, mut to_broker) = outbound.into_split();
    let up = tokio::io::copy(&mut from_daemon, &mut to_broker);
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_broker.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) if mute.load(Ordering::SeqCst) => {}
                Ok(n) => {
                    if to_daemon.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = up => {}
        () = down => {}
    }
}

/// A Zigbee2MQTT TRV state whose setpoint depends on `round`: round 0 makes a snapshot, every
/// later round exactly one `setpoint` event.
fn trv_state(round: u32) -> String {
    json!({"current_heating_setpoint": 16.0 + 0.5 * f64::from(round), "local_temperature": 19.5,
        "system_mode": "heat", "running_state": "heat", "linkquality": 99})
    .to_string()
}

/// Publishes `rounds` states to every device (each publish awaits the source broker's PUBACK).
async fn publish_rounds(
    publisher: &mut Publisher,
    base: &str,
    devices: &[&str],
    rounds: Range<u32>,
) {
    for r in rounds {
        for d in devices {
            publisher
                .publish(&format!("{base}/{d}"), trv_state(r), false)
                .await;
        }
    }
}

/// Waits until `n` events are committed.
async fn wait_committed(db: &Db, n: i64) {
    wait_until_async(&format!("{n} committed events"), TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM events") == n
    })
    .await;
}

/// The committed event ids, by position.
fn db_ids(db: &Db) -> Vec<String> {
    db.events().into_iter().map(|r| r.id).collect()
}

/// Checks what the subscriber got against the committed rows: every row arrived; every
/// arrival is a committed event, byte for byte the stored envelope, on `topic(row)`; per
/// device, arrivals are runs of consecutive seqs (each one the next seq, or the start of a
/// resend at or before it), so nothing is skipped or reordered and duplicates are resends.
/// Returns the ids of the duplicate arrivals, in arrival order.
fn check_arrivals(
    rows: &[EventRow],
    got: &[(Msg, Event)],
    topic: impl Fn(&EventRow) -> String,
) -> Vec<String> {
    let by_id: HashMap<&str, &EventRow> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut seen = HashSet::new();
    let mut prev: HashMap<&str, u64> = HashMap::new();
    let mut max: HashMap<&str, u64> = HashMap::new();
    let mut duplicates = Vec::new();
    for (i, (m, e)) in got.iter().enumerate() {
        let at = format!(
            "arrival #{i} ({} {} seq {} id {})",
            e.device, e.kind, e.seq, e.id
        );
        let row = by_id
            .get(e.id.as_str())
            .unwrap_or_else(|| panic!("{at}: not a committed event"));
        assert_eq!(m.topic, topic(row), "{at}: topic");
        assert_eq!(
            m.text(),
            row.payload,
            "{at}: payload is the stored envelope"
        );
        assert_eq!(
            (e.device.as_str(), e.seq as i64, e.kind.as_str()),
            (row.device.as_str(), row.seq, row.kind.as_str()),
            "{at}: envelope matches the row"
        );
        assert!(!m.retain, "{at}: events are not retained");
        if !seen.insert(e.id.clone()) {
            duplicates.push(e.id.clone());
        }
        let p = prev.entry(row.device.as_str()).or_insert(0);
        let x = max.entry(row.device.as_str()).or_insert(0);
        assert!(
            e.seq <= *x + 1,
            "{at}: skips seq {} of {} (highest so far {x})",
            *x + 1,
            e.device
        );
        assert!(
            e.seq == *p + 1 || e.seq <= *p,
            "{at}: out of order after seq {p} of {}",
            e.device
        );
        *p = e.seq;
        *x = (*x).max(e.seq);
    }
    for r in rows {
        assert!(
            seen.contains(&r.id),
            "event {} ({} seq {} {}) never arrived",
            r.id,
            r.device,
            r.seq,
            r.kind
        );
    }
    duplicates
}

/// A source broker with the daemon's Zigbee2MQTT source, an upstream broker (killed mid-stream,
/// events committed while it is down, started again on the same port), and a persistent-session
/// subscriber on it: every committed event arrives by id, on its exact topic, byte for byte the
/// stored envelope, per device in seq order with duplicates only as resends of the same event;
/// the events committed during the outage are held (the sink's cursor stays before them, its
/// last error names the connection) and delivered after the daemon's reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_upstream_delivers_every_event_by_id_in_order_across_an_upstream_broker_restart() {
    let t0 = Instant::now();
    let sb = Sandbox::new("upstream_restart");
    let source = Mosquitto::start();
    let mut upstream = Mosquitto::start();
    let gate = Gate::start(upstream.port()).await;
    let sub = Subscriber::connect(
        upstream.port(),
        &format!("it-{}-cloud", sb.tag()),
        false,
        &["hvac-edge/gw-it/#"],
    )
    .await;
    let mut tc = TestConfig::new(&sb);
    // No checkpoint during the test, hence no garbage collection: the events table stays whole.
    tc.set("pipeline", "checkpoint_interval_secs", "3600")
        .z2m_source("z2m", source.port())
        .mqtt_sink("up", gate.port())
        // The cut batch must fail by the lost connection, not by its ack timeout.
        .sink_set("up", "ack_timeout_ms", "60000");
    let daemon_id = tc.client_id("up");
    let connacks = format!("Sending CONNACK to {daemon_id} (");
    let daemon = Daemon::start(tc.build()).await;
    source
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    upstream.wait_connected(&daemon_id, 1, TIMEOUT).await;
    let mut publisher = Publisher::connect(source.port()).await;
    let db = Db::open(&tc.db_path());
    let base = tc.base_topic();
    let devices = ["trv1", "trv2", "trv3"];
    let prefix = "hvac-edge/gw-it/";

    // Phase 1: delivered while the upstream broker is up.
    publish_rounds(&mut publisher, &base, &devices, 0..4).await;
    wait_committed(&db, 12).await;
    sub.wait_ids(prefix, &db_ids(&db), "before the outage")
        .await;

    // Phase 2: a batch in flight when the broker dies. The gate drops the broker's packets to
    // the daemon: the broker forwards the daemon's next publish to the subscriber and
    // acknowledges it, but the PUBACK never reaches the daemon, whose batch stays in flight.
    // One source message makes that batch exactly one event; the rest of phase 2 is committed
    // behind it (the sink sends one batch at a time) while the broker is still up.
    let delivered = db.events()[11].pos;
    // The subscriber has them all, but the daemon may still be reading the last PUBACKs.
    wait_until_async("the daemon's cursor after phase 1", TIMEOUT, || {
        db.sink("up").is_some_and(|s| s.cursor == delivered)
    })
    .await;
    let pubacks = format!("Sending PUBACK to {daemon_id} (");
    let acked_before = upstream.count_lines_containing(&pubacks);
    gate.set_mute(true);
    publisher
        .publish(&format!("{base}/trv1"), trv_state(4), false)
        .await;
    wait_until_async("the cut batch at the subscriber", TIMEOUT, || {
        sub.ids_under(prefix).len() == 13
    })
    .await;
    wait_until_async("the broker's PUBACK of the cut batch", TIMEOUT, || {
        upstream.count_lines_containing(&pubacks) == acked_before + 1
    })
    .await;
    publish_rounds(&mut publisher, &base, &devices[1..], 4..5).await;
    publish_rounds(&mut publisher, &base, &devices, 5..10).await;
    wait_committed(&db, 30).await;
    assert_eq!(
        db.sink("up").map(|s| s.cursor),
        Some(delivered),
        "no PUBACK reached the daemon"
    );
    let cut = db.events()[12].id.clone();
    gate.set_open(false);
    upstream.kill();
    let got = sub.events();
    assert_eq!(got.len(), 13, "only the cut batch went out after phase 1");
    assert_eq!(got[12].1.id, cut);

    // Phase 3: committed while the broker is down, and held.
    publish_rounds(&mut publisher, &base, &devices, 10..16).await;
    wait_committed(&db, 48).await;
    let rows = db.events();
    let sink = wait_for_async("the sink records the lost connection", TIMEOUT, || {
        db.sink("up").filter(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("connect"))
        })
    })
    .await;
    eprintln!("sink while the broker is down: {sink:?}");
    // The first failure is the cut batch: none of its events acknowledged.
    let first_failure = format!(
        "SELECT COUNT(*) FROM sink_attempts WHERE sink = 'up' \
         AND id = (SELECT MIN(id) FROM sink_attempts WHERE sink = 'up') \
         AND first_pos = {} AND events = 1 AND error_kind = 'connect' \
         AND snippet LIKE 'connection lost with 0 of 1 events acknowledged: %'",
        rows[12].pos
    );
    assert_eq!(
        db.count(&first_failure),
        1,
        "the cut batch's failed attempt"
    );
    assert_eq!(
        sink.cursor, delivered,
        "nothing after phase 1 counts as delivered"
    );

    // The broker starts again on its port, without sessions: the subscriber subscribes again,
    // and only then is the daemon let back in.
    upstream.restart();
    upstream.wait_subscribed(&sub.client_id, 2, TIMEOUT).await;
    assert_eq!(
        upstream.count_lines_containing(&connacks),
        1,
        "the daemon reached the restarted broker before the subscriber's SUBACK"
    );
    gate.set_mute(false);
    gate.set_open(true);
    let reopened = Instant::now();
    upstream.wait_connected(&daemon_id, 2, TIMEOUT).await;
    sub.wait_ids(prefix, &db_ids(&db), "after the restart")
        .await;
    eprintln!(
        "held events delivered {:?} after the gate opened ({} reconnects refused meanwhile)",
        reopened.elapsed(),
        gate.dropped()
    );

    // Phase 4: the stream goes on.
    publish_rounds(&mut publisher, &base, &devices, 16..20).await;
    wait_committed(&db, 60).await;
    sub.wait_ids(prefix, &db_ids(&db), "after the restart, new")
        .await;
    daemon.stop().await.expect("clean stop");

    let rows = db.events();
    assert_eq!(rows.len(), 60);
    let got = sub.events();
    let duplicates = check_arrivals(&rows, &got, |r| {
        format!("hvac-edge/gw-it/{}/{}", r.device, r.kind)
    });
    let per_device: Vec<(&str, usize)> = devices
        .iter()
        .map(|d| (*d, rows.iter().filter(|r| r.device == *d).count()))
        .collect();
    assert_eq!(per_device, [("trv1", 20), ("trv2", 20), ("trv3", 20)]);
    // The batch cut mid-flight was sent again after the restart, its one event once more
    // (same id, same bytes: checked above); nothing else was duplicated.
    assert_eq!(duplicates, [cut], "only the cut batch is duplicated");
    let sink = db.sink("up").expect("sink row");
    assert_eq!(sink.cursor, rows[59].pos, "{sink:?}");
    // The broker (both runs) received every event, the cut batch twice.
    let received =
        upstream.count_lines_containing(&format!("Received PUBLISH from {daemon_id} (d0, q1, r0"));
    assert_eq!(received, 61, "event publishes from the daemon");
    eprintln!("{} arrivals for 60 events; {:?}", got.len(), t0.elapsed());
}

/// Waits until the upstream broker has received `n` retained status publishes of `payload`
/// from `client_id` (the broker logs the payload's length).
async fn wait_status_publishes(log: impl Fn() -> String, client_id: &str, payload: &str, n: usize) {
    let from = format!("Received PUBLISH from {client_id} (d0, q1, r1, ");
    let what = format!("'{STATUS}', ... ({} bytes))", payload.len());
    wait_until_async(
        &format!("{n} retained {payload:?} from {client_id}"),
        TIMEOUT,
        || {
            log()
                .lines()
                .filter(|l| l.contains(&from) && l.ends_with(&what))
                .count()
                >= n
        },
    )
    .await;
}

/// The status topic: after the daemon connects, a new subscriber gets the retained `online`;
/// after a clean stop (the daemon publishes `offline`, then DISCONNECTs, so the broker drops
/// the will) the retained `offline`. The real binary on the same config: `online` again; after
/// SIGKILL the broker sees the socket close and publishes the last will, retained `offline`, at
/// once (long before a keep-alive of 60 s would expire), and the daemon sent no `offline`
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_upstream_status_is_retained_online_and_offline_on_clean_stop_and_by_last_will_on_kill()
 {
    let t0 = Instant::now();
    let sb = Sandbox::new("upstream_status");
    let source = Mosquitto::start();
    let upstream = Mosquitto::start();
    let port = upstream.port();
    let watch = Subscriber::connect(port, &format!("it-{}-watch", sb.tag()), true, &[STATUS]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", source.port())
        .mqtt_sink("up", port)
        .sink_set("up", "keep_alive_secs", "60");
    let id = tc.client_id("up");
    let log = || upstream.log();

    let daemon = Daemon::start(tc.build()).await;
    wait_status_publishes(log, &id, "online", 1).await;
    let s1 = Subscriber::fresh(port, &sb, 1, STATUS).await;
    let m = s1.first_on(STATUS).await;
    assert_eq!((m.text().as_str(), m.retain), ("online", true));

    daemon.stop().await.expect("clean stop");
    wait_status_publishes(log, &id, "offline", 1).await;
    assert_eq!(
        upstream.count_lines_containing(&format!("Received DISCONNECT from {id}")),
        1,
        "a clean stop disconnects"
    );
    let s2 = Subscriber::fresh(port, &sb, 2, STATUS).await;
    let m = s2.first_on(STATUS).await;
    assert_eq!((m.text().as_str(), m.retain), ("offline", true));

    // The real binary, same upstream and database.
    let config = tc.write("hvac-edge.toml");
    let mut process = DaemonProcess::spawn(&config, sb.path(), &[]);
    upstream.wait_connected(&id, 2, TIMEOUT).await;
    wait_status_publishes(log, &id, "online", 2).await;
    let s3 = Subscriber::fresh(port, &sb, 3, STATUS).await;
    let m = s3.first_on(STATUS).await;
    assert_eq!(
        (m.text().as_str(), m.retain),
        ("online", true),
        "{}",
        process.stderr()
    );
    wait_until_async("the watcher saw the third status", TIMEOUT, || {
        watch.on(STATUS).len() >= 3
    })
    .await;

    process.sigkill();
    let killed = Instant::now();
    assert!(
        process.wait_timeout_async(EXIT_TIMEOUT).await.is_some(),
        "the binary did not die of SIGKILL"
    );
    let will = wait_for_async("the last will at the watcher", TIMEOUT, || {
        watch.on(STATUS).get(3).cloned()
    })
    .await;
    let after = will.at.saturating_duration_since(killed);
    assert_eq!(will.text(), "offline");
    assert!(
        after < Duration::from_secs(20),
        "the will came {after:?} after the kill: the broker waited for the keep-alive"
    );
    let s4 = Subscriber::fresh(port, &sb, 4, STATUS).await;
    let m = s4.first_on(STATUS).await;
    assert_eq!(
        (m.text().as_str(), m.retain),
        ("offline", true),
        "the will is retained"
    );
    // The killed daemon published no `offline` itself and never disconnected cleanly.
    assert_eq!(
        upstream.count_lines_containing(&format!("Received PUBLISH from {id} (d0, q1, r1, ")),
        3,
        "{}",
        upstream.log()
    );
    assert_eq!(
        upstream.count_lines_containing(&format!("Received DISCONNECT from {id}")),
        1
    );
    let seen: Vec<String> = watch.on(STATUS).iter().map(Msg::text).collect();
    assert_eq!(seen, ["online", "offline", "online", "offline"]);
    eprintln!("will {after:?} after SIGKILL; {:?}", t0.elapsed());
}

/// A broker with `require_certificate true`: the sink with `ca_file`, `cert_file` and
/// `key_file` (host `localhost`, the server certificate's name) connects over TLS and delivers
/// every event; a second sink with only `ca_file` is refused in the handshake, never gets a
/// CONNACK, delivers nothing, and holds its events (cursor 0, the error in its row); given the
/// certificate and restarted, it delivers every held event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_upstream_with_a_client_certificate_against_require_certificate() {
    let t0 = Instant::now();
    let sb = Sandbox::new("upstream_client_cert");
    let pki = Pki::create(&sb);
    let source = Mosquitto::start();
    let upstream = TlsBroker::start(&pki, true);
    let sub = Subscriber::connect(
        upstream.plain_port(),
        &format!("it-{}-cloud", sb.tag()),
        true,
        &["hvac-edge/gw-it/#", "nocert/#"],
    )
    .await;
    let path = |p: &std::path::Path| toml_str(&p.display().to_string());
    let mut tc = TestConfig::new(&sb);
    tc.set("pipeline", "checkpoint_interval_secs", "3600")
        .z2m_source("z2m", source.port());
    for name in ["cert", "nocert"] {
        tc.mqtt_sink(name, upstream.tls_port())
            .sink_set(name, "host", &toml_str("localhost"))
            .sink_set(name, "tls", "true")
            .sink_set(name, "ca_file", &path(&pki.ca));
    }
    tc.sink_set("cert", "cert_file", &path(&pki.client_cert))
        .sink_set("cert", "key_file", &path(&pki.client_key))
        .sink_set("nocert", "topic", &toml_str("nocert/{device_id}/{type}"))
        .sink_set("nocert", "status_topic", &toml_str("nocert/status"));
    let daemon = Daemon::start(tc.build()).await;
    source
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut publisher = Publisher::connect(source.port()).await;
    publish_rounds(&mut publisher, &tc.base_topic(), &["trv1", "trv2"], 0..3).await;
    let db = Db::open(&tc.db_path());
    wait_committed(&db, 6).await;
    sub.wait_ids("hvac-edge/gw-it/", &db_ids(&db), "with a certificate")
        .await;
    let status = sub.first_on(STATUS).await;
    assert_eq!(status.text(), "online");

    let held = wait_for_async("the refused sink's error", TIMEOUT, || {
        db.sink("nocert").filter(|s| s.last_error.is_some())
    })
    .await;
    eprintln!("refused sink: {held:?}");
    let err = held.last_error.clone().unwrap_or_default();
    assert!(
        err.starts_with("connect: ") && err.contains("CertificateRequired"),
        "{held:?}"
    );
    assert_eq!((held.cursor, held.delivered), (0, 0), "{held:?}");
    let nocert = tc.client_id("nocert");
    assert_eq!(
        upstream.count_lines_containing(&format!("Sending CONNACK to {nocert}")),
        0,
        "{}",
        upstream.log()
    );
    assert_eq!(
        upstream.count_lines_containing(&format!("Sending CONNACK to {}", tc.client_id("cert"))),
        1
    );
    daemon.stop().await.expect("clean stop");
    assert!(sub.ids_under("nocert/").is_empty());
    assert_eq!(db.sink("nocert").map(|s| s.cursor), Some(0));

    // Given its certificate, the held sink delivers everything it held.
    tc.sink_set("nocert", "cert_file", &path(&pki.client_cert))
        .sink_set("nocert", "key_file", &path(&pki.client_key));
    let daemon = Daemon::start(tc.build()).await;
    let rows = db.events();
    sub.wait_ids("nocert/", &db_ids(&db), "after the fix").await;
    daemon.stop().await.expect("clean stop");
    let got = sub.events();
    let (cert, fixed): (Vec<_>, Vec<_>) = got
        .into_iter()
        .partition(|(m, _)| m.topic.starts_with("hvac-edge/"));
    check_arrivals(&rows, &cert, |r| {
        format!("hvac-edge/gw-it/{}/{}", r.device, r.kind)
    });
    check_arrivals(&rows, &fixed, |r| format!("nocert/{}/{}", r.device, r.kind));
    let sink = db.sink("nocert").expect("row");
    assert_eq!(sink.cursor, rows[5].pos, "{sink:?}");
    eprintln!("{:?}", t0.elapsed());
}

/// `topic = "t/{plant_id}/{module_id}/{device_id}"` with `[[devices]]` metadata and a gateway
/// default plant: each event goes to the topic of its own plant and module, `_` for a missing
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_upstream_topic_template_places_plant_and_module() {
    let sb = Sandbox::new("upstream_topic_template");
    let source = Mosquitto::start();
    let upstream = Mosquitto::start();
    let sub = Subscriber::connect(
        upstream.port(),
        &format!("it-{}-cloud", sb.tag()),
        true,
        &["t/#"],
    )
    .await;
    let mut tc = TestConfig::new(&sb);
    tc.set("pipeline", "checkpoint_interval_secs", "3600")
        .set("gateway", "plant", &toml_str("pg"))
        .z2m_source("z2m", source.port())
        .mqtt_sink("up", upstream.port())
        .sink_set(
            "up",
            "topic",
            &toml_str("t/{plant_id}/{module_id}/{device_id}"),
        )
        .raw(
            r#"
[[devices]]
id = "trv1"
plant = "p1"
module = "m1"

[[devices]]
id = "trv2"
module = "m2"
"#,
        );
    let daemon = Daemon::start(tc.build()).await;
    source
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut publisher = Publisher::connect(source.port()).await;
    publish_rounds(
        &mut publisher,
        &tc.base_topic(),
        &["trv1", "trv2", "trv3"],
        0..2,
    )
    .await;
    let db = Db::open(&tc.db_path());
    wait_committed(&db, 6).await;
    sub.wait_ids("t/", &db_ids(&db), "templated topics").await;
    daemon.stop().await.expect("clean stop");
    let topic_of = |device: &str| match device {
        "trv1" => "t/p1/m1/trv1",
        "trv2" => "t/pg/m2/trv2",
        "trv3" => "t/pg/_/trv3",
        d => panic!("unexpected device {d}"),
    };
    let rows = db.events();
    let got = sub.events();
    assert_eq!(
        check_arrivals(&rows, &got, |r| topic_of(&r.device).to_string()),
        Vec::<String>::new(),
        "no duplicates without a failure"
    );
    let places: HashSet<(String, Option<String>, Option<String>)> = got
        .iter()
        .map(|(_, e)| (e.device.clone(), e.plant.clone(), e.module.clone()))
        .collect();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        places,
        HashSet::from([
            ("trv1".to_string(), s("p1"), s("m1")),
            ("trv2".to_string(), s("pg"), s("m2")),
            ("trv3".to_string(), s("pg"), None),
        ])
    );
}

/// PUBACKs withheld longer than `ack_timeout_ms` (the gate drops the broker's packets to the
/// daemon while the broker forwards its publishes): the sink times out again and again and
/// holds its cursor; once the PUBACKs flow again, every event is delivered, the cursor reaches
/// the end, and per device the arrivals are in order, duplicates being resends of the same
/// bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_upstream_pubacks_withheld_past_the_ack_timeout_hold_the_cursor_then_all_arrive_in_order()
 {
    let t0 = Instant::now();
    let sb = Sandbox::new("upstream_ack_timeout");
    let source = Mosquitto::start();
    let upstream = Mosquitto::start();
    let gate = Gate::start(upstream.port()).await;
    let sub = Subscriber::connect(
        upstream.port(),
        &format!("it-{}-cloud", sb.tag()),
        false,
        &["hvac-edge/gw-it/#"],
    )
    .await;
    let mut tc = TestConfig::new(&sb);
    tc.set("pipeline", "checkpoint_interval_secs", "3600")
        .z2m_source("z2m", source.port())
        .mqtt_sink("up", gate.port())
        .sink_set("up", "ack_timeout_ms", "500");
    let daemon_id = tc.client_id("up");
    let daemon = Daemon::start(tc.build()).await;
    source
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    upstream.wait_connected(&daemon_id, 1, TIMEOUT).await;
    let mut publisher = Publisher::connect(source.port()).await;
    let db = Db::open(&tc.db_path());
    let base = tc.base_topic();
    let devices = ["trv1", "trv2"];
    publish_rounds(&mut publisher, &base, &devices, 0..2).await;
    wait_committed(&db, 4).await;
    let delivered = db.events()[3].pos;
    wait_until_async("the cursor after the first events", TIMEOUT, || {
        db.sink("up").is_some_and(|s| s.cursor == delivered)
    })
    .await;

    gate.set_mute(true);
    publish_rounds(&mut publisher, &base, &devices, 2..6).await;
    wait_committed(&db, 12).await;
    let sink = wait_for_async("three ack timeouts", TIMEOUT, || {
        db.sink("up").filter(|s| s.consecutive_failures >= 3)
    })
    .await;
    assert_eq!(
        (sink.cursor, sink.last_error.as_deref()),
        (delivered, Some("timeout")),
        "{sink:?}"
    );
    gate.set_mute(false);

    let last = db.events()[11].pos;
    wait_until_async("the cursor at the last event", TIMEOUT, || {
        db.sink("up").is_some_and(|s| s.cursor == last)
    })
    .await;
    sub.wait_ids("hvac-edge/gw-it/", &db_ids(&db), "after the stall")
        .await;
    daemon.stop().await.expect("clean stop");
    let rows = db.events();
    let got = sub.events();
    let duplicates = check_arrivals(&rows, &got, |r| {
        format!("hvac-edge/gw-it/{}/{}", r.device, r.kind)
    });
    eprintln!(
        "{} arrivals for 12 events ({} duplicates) after {} ack timeouts; {:?}",
        got.len(),
        duplicates.len(),
        sink.consecutive_failures,
        t0.elapsed()
    );
}
