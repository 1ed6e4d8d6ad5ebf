//! Store tests on real SQLite files: the writer's commit/ack order, restart replay, the duplicate
//! filter, garbage collection, the size cap, and the outbox reads sinks use.

use super::outbox;
use super::writer::{Writer, WriterMsg, WriterSettings, WriterStats};
use super::{Mode, Options, open};
use crate::channel::{Ack, Envelope, MqttReceipt};
use crate::config::StartFrom;
use crate::diff::DiffPolicy;
use crate::model::{Event, Fixed, Mode as TMode, Observation, Reported, TempUnit, Temperature};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

fn settings(sinks: &[&str]) -> WriterSettings {
    WriterSettings {
        gateway: "gw-t".into(),
        default_plant: Some("plant-1".into()),
        devices: Default::default(),
        policy: DiffPolicy::default(),
        batch_max: 64,
        commit_delay: Duration::ZERO,
        snapshot_interval_ms: 900_000,
        checkpoint_interval: Duration::from_secs(3600),
        sinks: sinks.iter().map(|s| s.to_string()).collect(),
        max_bytes: 0,
        max_events: 0,
        max_devices: 10_000,
        max_dead_letters: 100_000,
        clock_source: crate::config::ClockSource::Ntp,
        reserved: Default::default(),
        device_expiry: Duration::from_secs(30 * 24 * 3600),
    }
}

/// Observation times are relative to a minute ago, so periodic snapshots are not due.
fn base() -> i64 {
    crate::telemetry::now_ms() - 60_000
}

fn obs(device: &str, setpoint: i64, at: i64) -> Observation {
    Observation {
        device: device.into(),
        source: "src".into(),
        observed_at: base() + at,
        reported: Reported {
            mode: Some(TMode::Manual),
            setpoint: Some(Temperature {
                value: Fixed(setpoint),
                unit: TempUnit::C,
            }),
            ..Default::default()
        },
    }
}

fn temp_obs(device: &str, temp: i64, at: i64) -> Observation {
    Observation {
        device: device.into(),
        source: "src".into(),
        observed_at: base() + at,
        reported: Reported {
            temperature: Some(Temperature {
                value: Fixed(temp),
                unit: TempUnit::C,
            }),
            ..Default::default()
        },
    }
}

/// Runs a writer on its own thread for the duration of `f`, like the daemon does.
struct Harness {
    rt: tokio::runtime::Runtime,
    tx: Option<mpsc::Sender<WriterMsg>>,
    thread: Option<std::thread::JoinHandle<Result<(), super::Error>>>,
    stats: Arc<WriterStats>,
}

impl Harness {
    fn start(path: &Path, s: WriterSettings) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let conn = open(path, Mode::ReadWrite, &Options::default()).unwrap();
        let (ctx, _crx) = watch::channel(0);
        let stats = Arc::new(WriterStats::default());
        let w = Writer::open(conn, path.to_path_buf(), s, ctx, stats.clone()).unwrap();
        let (tx, rx) = mpsc::channel(1024);
        let handle = rt.handle().clone();
        let thread = std::thread::spawn(move || w.run(rx, handle));
        Harness {
            rt,
            tx: Some(tx),
            thread: Some(thread),
            stats,
        }
    }

    fn send(&self, e: Envelope) {
        self.tx
            .as_ref()
            .unwrap()
            .blocking_send(WriterMsg::Observe(e))
            .unwrap();
    }

    fn msg(&self, m: WriterMsg) {
        self.tx.as_ref().unwrap().blocking_send(m).unwrap();
    }

    /// Sends a reload's settings and waits until the writer applied them.
    fn reconfigure(&self, settings: WriterSettings, removed_sources: &[&str]) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.msg(WriterMsg::Reconfigure(Box::new(
            crate::channel::Reconfigure {
                settings,
                removed_sources: removed_sources.iter().map(|s| s.to_string()).collect(),
                applied: Ack::new(move || {
                    let _ = tx.send(());
                }),
            },
        )));
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    fn tick(&self) {
        self.tx
            .as_ref()
            .unwrap()
            .blocking_send(WriterMsg::Tick)
            .unwrap();
    }

    fn wait_events(&self, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.stats.events.load(Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {n} events"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Ticks until `n` devices were forgotten by expiry.
    fn wait_expired(&self, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.stats.devices_expired.load(Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {n} expired devices"
            );
            self.tick();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        drop(self.tx.take());
        self.thread.take().unwrap().join().unwrap().unwrap();
        drop(self.rt);
    }
}

fn plain(o: Observation) -> Envelope {
    Envelope {
        obs: o,
        ack: None,
        receipt: None,
    }
}

fn events(path: &Path) -> Vec<Event> {
    let c = Connection::open(path).unwrap();
    let mut st = c
        .prepare("SELECT payload FROM events ORDER BY pos")
        .unwrap();
    st.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|p| serde_json::from_str(&p.unwrap()).unwrap())
        .collect()
}

fn db() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.db");
    (d, p)
}

#[test]
fn writer_acks_only_after_the_events_are_committed() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    let seen_at_ack = Arc::new(Mutex::new(None));
    let s2 = seen_at_ack.clone();
    let p2 = path.clone();
    let ack = Ack::new(move || {
        // A second connection sees only committed data.
        let c = Connection::open(&p2).unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        *s2.lock().unwrap() = Some(n);
    });
    h.send(Envelope {
        obs: obs("a", 2000, 1_000),
        ack: Some(ack),
        receipt: None,
    });
    h.wait_events(1);
    h.stop();
    assert_eq!(*seen_at_ack.lock().unwrap(), Some(1));
}

#[test]
fn events_carry_gap_free_seq_unique_ids_and_the_full_state() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2000, 1_000)));
    h.send(plain(obs("b", 1900, 1_001)));
    h.send(plain(obs("a", 2050, 1_002)));
    h.send(plain(obs("a", 2050, 1_003)));
    h.send(plain(obs("a", 2100, 1_004)));
    h.wait_events(4);
    h.stop();
    let ev = events(&path);
    let summary: Vec<(&str, u64, &str)> = ev
        .iter()
        .map(|e| (e.device.as_str(), e.seq, e.kind.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("a", 1, "snapshot"),
            ("b", 1, "snapshot"),
            ("a", 2, "setpoint"),
            ("a", 3, "setpoint")
        ]
    );
    assert_eq!(
        ev[2].previous,
        serde_json::json!({"value": "20.0", "unit": "C"})
    );
    assert_eq!(
        ev[2].current,
        serde_json::json!({"value": "20.5", "unit": "C"})
    );
    assert_eq!(ev[3].state.setpoint.unwrap().value, Fixed(2100));
    assert_eq!(ev[0].plant.as_deref(), Some("plant-1"));
    assert_eq!(ev[0].gateway, "gw-t");
    let ids: std::collections::HashSet<_> = ev.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), 4);
    assert!(ev.windows(2).all(
        |w| uuid::Uuid::parse_str(&w[0].id).unwrap() < uuid::Uuid::parse_str(&w[1].id).unwrap()
    ));
}

#[test]
fn a_restart_replays_events_after_the_checkpoint_and_continues_seq() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2000, 1_000)));
    h.send(plain(obs("a", 2100, 1_001)));
    h.wait_events(2);
    h.stop();
    // Simulate a crash after those commits but before any checkpoint: the devices table is stale.
    let c = Connection::open(&path).unwrap();
    c.execute_batch("DELETE FROM devices; UPDATE meta SET value = 0 WHERE key = 'checkpoint_pos';")
        .unwrap();
    drop(c);
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2100, 2_000))); // unchanged: nothing
    h.send(plain(obs("a", 2200, 2_001))); // changed: seq 3
    h.wait_events(1);
    h.stop();
    let ev = events(&path);
    let summary: Vec<(u64, &str)> = ev.iter().map(|e| (e.seq, e.kind.as_str())).collect();
    assert_eq!(
        summary,
        vec![(1, "snapshot"), (2, "setpoint"), (3, "setpoint")]
    );
    assert_eq!(ev[2].previous["value"], "21.0");
}

#[test]
fn a_stale_mqtt_redelivery_of_a_committed_message_is_dropped_not_diffed() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    let r1 = MqttReceipt {
        pkid: 7,
        digest: 111,
        dup: false,
    };
    let r2 = MqttReceipt {
        pkid: 8,
        digest: 222,
        dup: false,
    };
    h.send(Envelope {
        obs: obs("a", 2000, 1_000),
        ack: None,
        receipt: Some(r1),
    });
    h.send(Envelope {
        obs: obs("a", 2100, 1_001),
        ack: None,
        receipt: Some(r2),
    });
    h.wait_events(2);
    h.stop();
    // After a crash the broker redelivers both (DUP set); the writer restarts from the file.
    let h = Harness::start(&path, settings(&[]));
    let acked = Arc::new(AtomicU64::new(0));
    for (o, r) in [(obs("a", 2000, 2_000), r1), (obs("a", 2100, 2_001), r2)] {
        let a = acked.clone();
        let ack = Ack::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
        });
        h.send(Envelope {
            obs: o,
            ack: Some(ack),
            receipt: Some(MqttReceipt { dup: true, ..r }),
        });
    }
    // A genuinely new message after them still goes through.
    h.send(Envelope {
        obs: obs("a", 2200, 2_002),
        ack: None,
        receipt: Some(MqttReceipt {
            pkid: 9,
            digest: 333,
            dup: false,
        }),
    });
    h.wait_events(1);
    let dups = h.stats.duplicates_dropped.load(Ordering::SeqCst);
    h.stop();
    assert_eq!(dups, 2);
    assert_eq!(acked.load(Ordering::SeqCst), 2, "duplicates are acked");
    let kinds: Vec<(u64, String)> = events(&path)
        .into_iter()
        .map(|e| (e.seq, e.current["value"].to_string()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, "null".into()),
            (2, "\"21.0\"".into()),
            (3, "\"22.0\"".into())
        ]
    );
}

#[test]
fn garbage_collection_deletes_only_what_every_sink_passed_and_never_the_newest() {
    let (_d, path) = db();
    // Two sinks: one at pos 3, one at pos 5.
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        outbox::ensure_sink(&c, &path, "s1", "http", StartFrom::Oldest, 0).unwrap();
        outbox::ensure_sink(&c, &path, "s2", "http", StartFrom::Oldest, 0).unwrap();
    }
    let mut s = settings(&["s1", "s2"]);
    s.checkpoint_interval = Duration::ZERO;
    let h = Harness::start(&path, s);
    for i in 0..6 {
        h.send(plain(obs("a", 2000 + 50 * i, 1_000 + i)));
    }
    h.wait_events(6);
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch("UPDATE sinks SET cursor = 3 WHERE name = 's1'; UPDATE sinks SET cursor = 6 WHERE name = 's2';").unwrap();
    }
    h.tick();
    h.tick();
    h.stop();
    let pos: Vec<i64> = {
        let c = Connection::open(&path).unwrap();
        let mut st = c.prepare("SELECT pos FROM events ORDER BY pos").unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(pos, vec![4, 5, 6]);
}

#[test]
fn the_event_cap_evicts_superseded_measurements_first_and_counts_them() {
    let (_d, path) = db();
    let mut s = settings(&["slow"]);
    s.max_events = 5;
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        outbox::ensure_sink(&c, &path, "slow", "http", StartFrom::Oldest, 0).unwrap();
    }
    let h = Harness::start(&path, s);
    // a: snapshot + 5 temperature changes; b: snapshot + 1 setpoint change.
    for i in 0..6 {
        h.send(plain(temp_obs("a", 2000 + 100 * i, 1_000 + i)));
    }
    h.send(plain(obs("b", 2000, 2_000)));
    h.send(plain(obs("b", 2100, 2_001)));
    h.wait_events(8);
    h.tick();
    h.stop();
    let ev = events(&path);
    let kept: Vec<(String, u64)> = ev.iter().map(|e| (e.device.clone(), e.seq)).collect();
    // 8 stored, cap 5: the 3 oldest superseded temperature events of "a" go; every other kind stays.
    assert_eq!(
        kept,
        vec![
            ("a".into(), 1),
            ("a".into(), 5),
            ("a".into(), 6),
            ("b".into(), 1),
            ("b".into(), 2)
        ]
    );
    let c = Connection::open(&path).unwrap();
    let evicted: i64 = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'evicted_events'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(evicted, 3);
}

#[test]
fn outbox_batches_respect_event_and_byte_limits_and_dead_letters_move_the_cursor() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&["s"]));
    for i in 0..10 {
        h.send(plain(obs("a", 2000 + 50 * i, 1_000 + i)));
    }
    h.wait_events(10);
    h.stop();
    let mut c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
    let mut row = outbox::ensure_sink(&c, &path, "s", "http", StartFrom::Oldest, 0).unwrap();
    let b = outbox::read_batch(&c, &path, 0, 4, 1 << 20).unwrap();
    assert_eq!(
        b.iter().map(|e| e.pos).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let one = outbox::read_batch(&c, &path, 0, 100, 10).unwrap();
    assert_eq!(
        one.len(),
        1,
        "always at least one event, even over the byte limit"
    );
    row.cursor = 4;
    let why = outbox::DeadReason {
        reason: "rejected",
        http_status: Some(400),
        snippet: Some("bad"),
    };
    outbox::dead_letter(&mut c, &path, &row, &b, &why, 5).unwrap();
    let fifth = outbox::read_batch(&c, &path, 4, 1, 1 << 20).unwrap();
    let now = fifth[0].observed_at + 10_000;
    let stats = outbox::queue_stats(&c, &path, now).unwrap();
    assert_eq!(stats.sinks[0].pending, 6);
    assert_eq!(stats.sinks[0].dead_letters, 4);
    assert_eq!(stats.sinks[0].oldest_pending_age_ms, Some(10_000));
    let dl = outbox::dead_letters(&c, &path, Some("s"), 10).unwrap();
    assert_eq!(dl.len(), 4);
    assert_eq!(dl[0].http_status, Some(400));
    assert_eq!(dl[0].reason, "rejected");
}

#[test]
fn a_new_sink_can_start_at_now_instead_of_the_oldest_event() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2000, 1)));
    h.send(plain(obs("a", 2100, 2)));
    h.wait_events(2);
    h.stop();
    let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
    assert_eq!(
        outbox::ensure_sink(&c, &path, "late", "http", StartFrom::Now, 0)
            .unwrap()
            .cursor,
        2
    );
    assert_eq!(
        outbox::ensure_sink(&c, &path, "early", "http", StartFrom::Oldest, 0)
            .unwrap()
            .cursor,
        0
    );
    // Existing sinks keep their cursor whatever `from` says.
    assert_eq!(
        outbox::ensure_sink(&c, &path, "late", "http", StartFrom::Oldest, 0)
            .unwrap()
            .cursor,
        2
    );
}

#[test]
fn a_sink_added_at_run_time_holds_garbage_collection_from_then_on() {
    let (_d, path) = db();
    let mut s = settings(&["up"]);
    s.checkpoint_interval = Duration::ZERO;
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        outbox::ensure_sink(&c, &path, "up", "http", StartFrom::Oldest, 0).unwrap();
        outbox::ensure_sink(&c, &path, "added", "webhook", StartFrom::Oldest, 0).unwrap();
    }
    let h = Harness::start(&path, s);
    // A reload adds a sink at cursor 0 before it starts: nothing may be collected past it.
    let mut with_added = settings(&["up", "added"]);
    with_added.checkpoint_interval = Duration::ZERO;
    h.reconfigure(with_added, &[]);
    for i in 0..10 {
        h.send(plain(obs("a", 2000 + i, i)));
    }
    h.wait_events(10);
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE sinks SET cursor = 10 WHERE name = 'up'", [])
        .unwrap();
    // Held for the added sink through several housekeeping runs (each one a GC attempt).
    let runs = h.stats.housekeeping_runs.load(Ordering::SeqCst);
    while h.stats.housekeeping_runs.load(Ordering::SeqCst) < runs + 5 {
        h.tick();
        assert_eq!(
            count(&path, "SELECT COUNT(*) FROM events"),
            10,
            "held for the added sink"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Removed again: what only it held goes.
    let mut without = settings(&["up"]);
    without.checkpoint_interval = Duration::ZERO;
    h.reconfigure(without, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count(&path, "SELECT COUNT(*) FROM events") > 1 {
        h.tick();
        assert!(std::time::Instant::now() < deadline, "not collected");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_idle_writer_writes_nothing() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2000, 1)));
    h.wait_events(1);
    h.tick();
    std::thread::sleep(Duration::from_millis(50));
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let before = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let ticked = Arc::new(AtomicBool::new(false));
    for _ in 0..5 {
        h.tick();
    }
    ticked.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(100));
    let after = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    h.stop();
    assert_eq!(before, after, "ticks without traffic must not write");
}

#[test]
fn new_devices_beyond_max_devices_are_dropped_and_counted_while_known_ones_flow() {
    let (_d, path) = db();
    let mut s = settings(&[]);
    s.max_devices = 2;
    let h = Harness::start(&path, s);
    h.send(plain(obs("a", 2000, 0)));
    h.send(plain(obs("b", 2000, 1)));
    h.send(plain(obs("c", 2000, 2))); // third device: dropped
    h.send(plain(obs("a", 2100, 3)));
    h.wait_events(3);
    let rejected = h.stats.devices_rejected.load(Ordering::SeqCst);
    h.stop();
    assert_eq!(rejected, 1);
    let got: Vec<(String, u64)> = events(&path)
        .into_iter()
        .map(|e| (e.device, e.seq))
        .collect();
    assert_eq!(got, vec![("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]);
}

#[test]
fn dead_letters_beyond_their_cap_are_trimmed_oldest_first_and_counted() {
    let (_d, path) = db();
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        for i in 0..1500 {
            c.execute(
                "INSERT INTO dead_letters (sink, event_pos, event_id, device, seq, type, payload, reason, at)
                 VALUES ('s', ?1, 'id', 'a', ?1, 'setpoint', '{}', 'rejected', 0)",
                [i],
            )
            .unwrap();
        }
    }
    let mut s = settings(&[]);
    s.max_dead_letters = 1000;
    let h = Harness::start(&path, s);
    h.tick();
    h.send(plain(obs("a", 2000, 0)));
    h.wait_events(1);
    h.stop();
    let c = Connection::open(&path).unwrap();
    let (n, min_pos): (i64, i64) = c
        .query_row(
            "SELECT COUNT(*), MIN(event_pos) FROM dead_letters",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((n, min_pos), (1000, 500));
    let stats = outbox::queue_stats(&c, &path, 0).unwrap();
    assert_eq!(stats.dead_letters_dropped, 500);
}

#[test]
fn a_periodic_snapshot_is_emitted_once_for_a_device_that_changed() {
    let (_d, path) = db();
    let mut s = settings(&[]);
    s.snapshot_interval_ms = 50;
    let h = Harness::start(&path, s);
    h.send(plain(obs("a", 2000, 0)));
    h.send(plain(obs("a", 2100, 1)));
    h.send(plain(obs("b", 1900, 2))); // b never changes after its first snapshot
    h.wait_events(3);
    h.tick();
    h.wait_events(4);
    h.tick();
    h.tick();
    h.stop();
    let ev = events(&path);
    let got: Vec<(&str, u64, &str)> = ev
        .iter()
        .map(|e| (e.device.as_str(), e.seq, e.kind.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a", 1, "snapshot"),
            ("a", 2, "setpoint"),
            ("b", 1, "snapshot"),
            ("a", 3, "snapshot")
        ]
    );
    assert_eq!(
        ev[3].state, ev[1].state,
        "the periodic snapshot carries the current state"
    );
    assert_eq!(ev[3].previous, serde_json::Value::Null);
}

#[test]
fn the_byte_cap_evicts_superseded_measurements_and_keeps_each_devices_newest_event() {
    let (_d, path) = db();
    let mut s = settings(&["slow"]);
    s.max_bytes = 256 * 1024;
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        outbox::ensure_sink(&c, &path, "slow", "http", StartFrom::Oldest, 0).unwrap();
    }
    let h = Harness::start(&path, s);
    // ~800 events of ~550 bytes: well over 256 KiB.
    for i in 0..800 {
        h.send(plain(temp_obs("a", 1000 + 30 * i, i)));
    }
    h.send(plain(obs("b", 2000, 900)));
    h.wait_events(801);
    // The cap works in bounded rounds per housekeeping run: tick until it is met.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        h.tick();
        std::thread::sleep(Duration::from_millis(20));
        let c = Connection::open(&path).unwrap();
        let used: i64 = c
            .query_row(
                "SELECT (SELECT page_count FROM pragma_page_count) - (SELECT freelist_count FROM pragma_freelist_count)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if used * 4096 <= 256 * 1024 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {used} pages");
    }
    h.stop();
    let c = Connection::open(&path).unwrap();
    let evicted: i64 = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'evicted_events'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let used: i64 = c
        .query_row(
            "SELECT (SELECT page_count FROM pragma_page_count) - (SELECT freelist_count FROM pragma_freelist_count)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(evicted > 0);
    let n_ev: i64 = c
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert!(
        used * 4096 <= 256 * 1024,
        "used {} bytes, evicted {evicted}, events left {n_ev}",
        used * 4096
    );
    let ev = events(&path);
    // Only superseded temperature events went: a's snapshot, a's newest temperature and b remain.
    assert!(
        ev.iter()
            .all(|e| e.device != "a" || e.kind == "temperature" || e.seq == 1)
    );
    assert_eq!(
        ev.iter().filter(|e| e.device == "a").map(|e| e.seq).max(),
        Some(800)
    );
    assert!(ev.iter().any(|e| e.device == "a" && e.seq == 1));
    assert!(ev.iter().any(|e| e.device == "b" && e.seq == 1));
    assert_eq!(ev.len() as i64 + evicted, 801);
}

#[test]
fn replay_takes_seq_from_the_column_when_the_newest_payload_is_unreadable() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2000, 1_000)));
    h.send(plain(obs("a", 2100, 1_001)));
    h.send(plain(obs("a", 2200, 1_002)));
    h.wait_events(3);
    h.stop();
    // A crash before any checkpoint, and the newest event's payload damaged (not UTF-8).
    let c = Connection::open(&path).unwrap();
    c.execute_batch(
        "DELETE FROM devices; UPDATE meta SET value = 0 WHERE key = 'checkpoint_pos';
         UPDATE events SET payload = X'FFFE7B' WHERE pos = 3;",
    )
    .unwrap();
    drop(c);
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2300, 2_000)));
    h.wait_events(1);
    h.stop();
    let c = Connection::open(&path).unwrap();
    let seqs: Vec<i64> = c
        .prepare("SELECT seq FROM events ORDER BY pos")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "seq 3 is never reused");
}

#[test]
fn damaged_rows_and_counters_in_the_file_never_stop_the_writer() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2000, 1_000)));
    h.send(plain(obs("b", 2000, 1_000)));
    h.wait_events(2);
    h.stop();
    let c = Connection::open(&path).unwrap();
    c.execute_batch(
        "UPDATE devices SET state = 'not json', seq = 'x', last_seen = -1 WHERE device = 'a';
         UPDATE devices SET seq = 9223372036854775807 WHERE device = 'b';
         INSERT INTO devices (device, state, seq, last_snapshot_at, changed_since_snapshot, last_seen)
           VALUES (X'FF', '{}', -7, 'y', 1, 0);
         UPDATE meta SET value = 'garbage' WHERE key = 'evicted_events';
         INSERT INTO mqtt_recent (receipts) VALUES ('text, not a blob');
         UPDATE events SET receipts = 42 WHERE pos = 1;",
    )
    .unwrap();
    drop(c);
    let h = Harness::start(&path, settings(&[]));
    h.send(plain(obs("a", 2100, 2_000)));
    h.send(plain(obs("b", 2100, 2_000)));
    h.wait_events(2);
    let stats = h.stats.clone();
    h.stop();
    assert_eq!(stats.devices_rejected.load(Ordering::SeqCst), 1);
    let ev = events(&path);
    let seqs =
        |d: &str| -> Vec<u64> { ev.iter().filter(|e| e.device == d).map(|e| e.seq).collect() };
    // `a` starts afresh (its state is unreadable) but its seq continues from the largest stored
    // one; `b` stays at the largest seq a column holds instead of wrapping to a negative one.
    let a = seqs("a");
    assert_eq!(a[0], 1);
    assert!(
        a.len() >= 2 && a.windows(2).all(|w| w[1] == w[0] + 1),
        "{a:?}"
    );
    // `b` is at the end of the seq range: its observation is dropped, never a repeated seq.
    assert_eq!(seqs("b"), vec![1]);
}

/// Inserts `n` dead letters of about `bytes` bytes each for sink `sink`.
fn add_dead_letters(path: &Path, sink: &str, n: i64, bytes: i64) {
    let c = Connection::open(path).unwrap();
    c.execute(
        "WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?1)
         INSERT INTO dead_letters (sink, event_pos, event_id, device, seq, type, payload, reason, at)
         SELECT ?2, i, 'id' || i, 'old', i, 'setpoint', hex(randomblob(?3 / 2)), 'rejected', 0 FROM k",
        rusqlite::params![n, sink, bytes],
    )
    .unwrap();
}

fn count(path: &Path, sql: &str) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[test]
fn dead_letters_never_make_the_cap_evict_undelivered_events() {
    let (_d, path) = db();
    let mut s = settings(&["slow"]);
    s.max_bytes = 2 * 1024 * 1024;
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        outbox::ensure_sink(&c, &path, "slow", "http", StartFrom::Oldest, 0).unwrap();
    }
    // 3 MiB of dead letters: the store is over its cap before any event.
    add_dead_letters(&path, "slow", 3000, 1000);
    let h = Harness::start(&path, s);
    for i in 0..50 {
        h.send(plain(obs(&format!("d{i}"), 2000, i)));
    }
    h.wait_events(50);
    for _ in 0..40 {
        h.tick();
    }
    h.stop();
    assert_eq!(
        count(&path, "SELECT COUNT(*) FROM events"),
        50,
        "no event evicted"
    );
    assert_eq!(
        count(
            &path,
            "SELECT COALESCE((SELECT value FROM meta WHERE key = 'evicted_events'), 0)"
        ),
        0
    );
    let left = count(&path, "SELECT COUNT(*) FROM dead_letters");
    let dropped = count(
        &path,
        "SELECT value FROM meta WHERE key = 'dead_letters_dropped'",
    );
    assert_eq!(left + dropped, 3000);
    // At most a tenth of the cap (~2 KiB each with overhead): about 200 left.
    assert!(left <= 220, "{left} dead letters left");
    // The oldest went first.
    assert_eq!(
        count(&path, "SELECT MIN(event_pos) FROM dead_letters"),
        3000 - left + 1
    );
}

#[test]
fn a_drained_outage_is_vacuumed_until_the_freelist_is_empty_then_nothing_is_written() {
    let (_d, path) = db();
    let mut s = settings(&["up"]);
    s.checkpoint_interval = Duration::ZERO;
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        outbox::ensure_sink(&c, &path, "up", "http", StartFrom::Oldest, 0).unwrap();
    }
    let h = Harness::start(&path, s);
    for i in 0..4000 {
        h.send(plain(obs(&format!("d{}", i % 200), 1000 + i, i)));
    }
    h.wait_events(4000);
    h.tick();
    let pages_full = count(&path, "SELECT page_count FROM pragma_page_count");
    // The sink delivered everything: garbage collection frees the pages, the vacuum returns them.
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE sinks SET cursor = 4000 WHERE name = 'up'", [])
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        h.tick();
        std::thread::sleep(Duration::from_millis(20));
        // One statement, one read snapshot: two queries could see the freelist before garbage
        // collection and the events after it.
        let both = count(
            &path,
            "SELECT (SELECT freelist_count FROM pragma_freelist_count) * 1000000 + (SELECT COUNT(*) FROM events)",
        );
        let (free, events) = (both / 1_000_000, both % 1_000_000);
        if free == 0 && events == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "freelist {free}, events {events}"
        );
    }
    let pages = count(&path, "SELECT page_count FROM pragma_page_count");
    assert!(
        pages * 10 < pages_full,
        "{pages} pages left of {pages_full}"
    );
    // Done: further housekeeping runs write nothing (no other connection's commit shows in
    // `data_version` of a connection that stays open meanwhile).
    let watch = Connection::open(&path).unwrap();
    let version = || -> i64 {
        watch
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .unwrap()
    };
    let runs = || h.stats.housekeeping_runs.load(Ordering::SeqCst);
    let before = version();
    let start = runs();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while runs() < start + 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "housekeeping did not run"
        );
        h.tick();
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = version();
    h.stop();
    assert_eq!(before, after, "an idle, vacuumed writer writes nothing");
}

#[test]
fn a_wal_grown_behind_a_long_reader_is_truncated_once_the_reader_is_gone() {
    let (_d, path) = db();
    let mut s = settings(&[]);
    s.max_bytes = 2 * 1024 * 1024; // WAL limit 256 KiB
    let h = Harness::start(&path, s);
    h.send(plain(obs("warm", 2000, 0)));
    h.wait_events(1);
    // A reader (a technician's query, a slow sink) keeps a snapshot open: checkpoints cannot
    // reset the WAL, which grows with every commit.
    let reader = Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .unwrap();
    for i in 0..1500 {
        h.send(plain(obs(&format!("d{}", i % 50), 1000 + i, i)));
    }
    h.wait_events(1501);
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    let grown = std::fs::metadata(&wal).unwrap().len();
    assert!(grown > 512 * 1024, "WAL only {grown} bytes");
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        h.tick();
        std::thread::sleep(Duration::from_millis(20));
        let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        if size <= 256 * 1024 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "WAL still {size} bytes (was {grown})"
        );
    }
    h.stop();
}

fn obs_from(source: &str, device: &str, setpoint: i64, at: i64) -> Observation {
    Observation {
        source: source.into(),
        ..obs(device, setpoint, at)
    }
}

#[test]
fn reserved_devices_belong_to_their_source_and_the_device_cap_is_per_source() {
    let (_d, path) = db();
    let mut s = settings(&[]);
    s.max_devices = 2;
    s.reserved = [("otgw".to_string(), "serial".to_string())].into();
    let h = Harness::start(&path, s);
    // A LAN publisher claims the OTGW's id first (e.g. a retained message after a restart).
    h.send(plain(obs_from("mqtt", "otgw", 3000, 0)));
    h.send(plain(obs_from("mqtt", "x1", 2000, 1)));
    h.send(plain(obs_from("mqtt", "x2", 2000, 2)));
    h.send(plain(obs_from("mqtt", "x3", 2000, 3))); // over mqtt's cap
    h.send(plain(obs_from("other", "y1", 2000, 4))); // its own cap
    h.send(plain(obs_from("serial", "otgw", 2100, 5))); // configured: never counted
    h.send(plain(obs_from("serial", "otgw", 2200, 6)));
    h.wait_events(5);
    let rejected = h.stats.devices_rejected.load(Ordering::SeqCst);
    let conflicts = h.stats.conflicts.load(Ordering::SeqCst);
    h.stop();
    assert_eq!((rejected, conflicts), (1, 1));
    let got: Vec<(String, u64, String)> = events(&path)
        .into_iter()
        .map(|e| {
            (
                e.device,
                e.seq,
                e.state
                    .setpoint
                    .map(|t| t.value.to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let want: Vec<(String, u64, String)> = [
        ("x1", 1, "20.0"),
        ("x2", 1, "20.0"),
        ("y1", 1, "20.0"),
        ("otgw", 1, "21.0"),
        ("otgw", 2, "22.0"),
    ]
    .iter()
    .map(|(d, q, v)| (d.to_string(), *q, v.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn a_device_silent_past_its_expiry_frees_its_slot_and_keeps_its_seq_when_it_returns() {
    let (_d, path) = db();
    let mut s = settings(&["slow"]);
    s.max_devices = 1;
    s.device_expiry = Duration::from_secs(10);
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        outbox::ensure_sink(&c, &path, "slow", "http", StartFrom::Oldest, 0).unwrap();
    }
    let h = Harness::start(&path, s);
    // Observation times are a minute old: past the expiry at once.
    h.send(plain(obs("a", 2000, 0)));
    h.wait_events(1);
    h.wait_expired(1);
    h.send(plain(obs("b", 2000, 1))); // a's slot is free again
    h.wait_events(2);
    h.wait_expired(2);
    h.send(plain(obs("a", 2100, 2))); // back, with its stored state and seq
    h.wait_events(3);
    let rejected = h.stats.devices_rejected.load(Ordering::SeqCst);
    h.stop();
    assert_eq!(rejected, 0);
    let got: Vec<(String, u64, String)> = events(&path)
        .into_iter()
        .map(|e| (e.device, e.seq, e.kind))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".into(), 1, "snapshot".into()),
            ("b".into(), 1, "snapshot".into()),
            ("a".into(), 2, "setpoint".into())
        ]
    );
}

fn with_receipt(o: Observation, pkid: u16, digest: u64, dup: bool) -> Envelope {
    Envelope {
        obs: o,
        ack: None,
        receipt: Some(MqttReceipt { pkid, digest, dup }),
    }
}

/// M1 changes nothing (its receipt goes to `mqtt_recent`), M2 changes the setpoint (its receipt
/// rides on the event row), after more receipts than the per-source filter keeps. After a crash
/// the broker redelivers both: both must be recognised, whichever table holds them.
#[test]
fn receipts_are_loaded_in_commit_order_so_the_newest_survive_a_restart() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    h.send(with_receipt(obs("a", 2000, 0), 1, 1, false));
    for i in 0..4200u16 {
        // Other devices' changes: one event and one receipt each.
        h.send(with_receipt(
            obs(&format!("o{}", i % 100), 1000 + i64::from(i), 1),
            2 + i,
            10_000 + u64::from(i),
            false,
        ));
    }
    h.send(with_receipt(obs("a", 2000, 2), 5000, 77, false)); // M1: unchanged, no event
    h.send(with_receipt(obs("a", 2100, 3), 5001, 78, false)); // M2: setpoint 21.0
    h.wait_events(1 + 4200 + 1);
    h.stop();
    let h = Harness::start(&path, settings(&[]));
    h.send(with_receipt(obs("a", 2000, 4), 5000, 77, true));
    h.send(with_receipt(obs("a", 2100, 5), 5001, 78, true));
    h.send(with_receipt(obs("a", 2200, 6), 5002, 79, false));
    h.wait_events(1);
    let stats = h.stats.clone();
    h.stop();
    let dups = stats.duplicates_dropped.load(Ordering::SeqCst);
    assert_eq!(dups, 2, "M1 and M2 recognised");
    let a: Vec<(u64, String)> = events(&path)
        .into_iter()
        .filter(|e| e.device == "a")
        .map(|e| (e.seq, e.current["value"].to_string()))
        .collect();
    // No stale step back to 20.0 from M1.
    assert_eq!(
        a,
        vec![
            (1, "null".into()),
            (2, "\"21.0\"".into()),
            (3, "\"22.0\"".into())
        ]
    );
}

#[test]
fn a_lost_broker_session_voids_its_receipts_in_memory_and_in_the_file() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    h.send(with_receipt(obs("a", 2000, 0), 5, 55, false));
    h.send(with_receipt(obs("a", 2000, 1), 6, 66, false)); // no event: mqtt_recent
    h.wait_events(1);
    h.tx.as_ref()
        .unwrap()
        .blocking_send(WriterMsg::SessionLost("src".into()))
        .unwrap();
    // In the new session packet id 5 names another message; redelivered (DUP) with the same
    // bytes as the old one, it must still be diffed: 20.0 again after a change to 21.0.
    h.send(with_receipt(obs("a", 2100, 2), 9, 99, false));
    h.send(with_receipt(obs("a", 2000, 3), 5, 55, true));
    h.wait_events(3);
    let stats = h.stats.clone();
    h.stop();
    let dups = stats.duplicates_dropped.load(Ordering::SeqCst);
    assert_eq!(dups, 0);
    // After a restart the old session's receipts stay void; the new session's are kept.
    let h = Harness::start(&path, settings(&[]));
    h.send(with_receipt(obs("a", 2100, 4), 6, 66, true)); // old session's id: diffed
    h.send(with_receipt(obs("a", 2000, 5), 5, 55, true)); // new session's: a duplicate
    h.wait_events(1);
    let stats = h.stats.clone();
    h.stop();
    let dups = stats.duplicates_dropped.load(Ordering::SeqCst);
    assert_eq!(dups, 1);
    let a: Vec<String> = events(&path)
        .into_iter()
        .map(|e| e.current["value"].to_string())
        .collect();
    assert_eq!(a, vec!["null", "\"21.0\"", "\"20.0\"", "\"21.0\""]);
}

/// Measurements that keep superseding each other must not keep the cap from evicting the
/// oldest events when superseded ones are not enough (setpoints are never superseded).
#[test]
fn the_cap_holds_while_new_measurements_keep_superseding_old_ones() {
    let (_d, path) = db();
    let mut s = settings(&["slow"]);
    s.max_bytes = 1024 * 1024;
    {
        let c = open(&path, Mode::ReadWrite, &Options::default()).unwrap();
        outbox::ensure_sink(&c, &path, "slow", "http", StartFrom::Oldest, 0).unwrap();
    }
    let h = Harness::start(&path, s);
    let used = |p: &Path| {
        count(
            p,
            "SELECT (SELECT page_count FROM pragma_page_count) - (SELECT freelist_count FROM pragma_freelist_count)",
        ) * 4096
    };
    let mut n = 0u64;
    for round in 0..40i64 {
        for d in 0..100i64 {
            h.send(plain(obs(&format!("s{d}"), 1000 + 10 * round, round)));
        }
        h.send(plain(temp_obs("t", 1000 + 50 * (round % 2), round)));
        n += 101;
        h.wait_events(n);
        h.tick();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut k = 0i64;
    while used(&path) > 1024 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "still {} bytes",
            used(&path)
        );
        k += 1;
        h.send(plain(temp_obs("t", 1000 + 50 * (k % 2), 100 + k)));
        h.tick();
        std::thread::sleep(Duration::from_millis(20));
    }
    let evicted = h.stats.evicted.load(Ordering::SeqCst);
    h.stop();
    assert!(evicted > 0);
    // The newest setpoint of every device is still there (never the newest row of a device
    // whose older events were evicted is what replay needs: it carries the full state).
    let c = Connection::open(&path).unwrap();
    let newest: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM events WHERE pos = (SELECT MAX(pos) FROM events)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(newest, 1);
}

#[test]
fn a_reload_hands_devices_of_a_removed_source_and_newly_reserved_ids_to_their_new_owner() {
    let (_d, path) = db();
    let h = Harness::start(&path, settings(&[]));
    // "old" learns two devices; "serial" is not configured yet.
    h.send(plain(obs_from("old", "a", 2000, 0)));
    h.send(plain(obs_from("old", "b", 2000, 1)));
    h.wait_events(2);
    // Refused while "old" owns them.
    h.send(plain(obs_from("new", "a", 2100, 2)));
    h.send(plain(obs_from("serial", "b", 2100, 3)));
    h.send(plain(obs_from("old", "a", 2050, 4)));
    h.wait_events(3);
    assert_eq!(h.stats.conflicts.load(Ordering::SeqCst), 2);
    // The reload renames the source "old" to "new" and reserves "b" for "serial".
    let mut s = settings(&[]);
    s.reserved = [("b".to_string(), "serial".to_string())].into();
    h.reconfigure(s, &["old"]);
    h.send(plain(obs_from("new", "a", 2200, 5)));
    h.send(plain(obs_from("serial", "b", 2200, 6)));
    h.send(plain(obs_from("new", "b", 2300, 7))); // "b" is reserved for serial now
    h.wait_events(5);
    let conflicts = h.stats.conflicts.load(Ordering::SeqCst);
    h.stop();
    assert_eq!(conflicts, 3);
    let got: Vec<(String, u64, String)> = events(&path)
        .into_iter()
        .map(|e| {
            let sp = e.state.setpoint.map(|t| t.value.to_string());
            (e.device, e.seq, sp.unwrap_or_default())
        })
        .collect();
    // a@20.5 came from "old"; a@22.0 from "new" and b@22.0 from "serial" after the reload.
    let want: Vec<(String, u64, String)> = [
        ("a", 1, "20.0"),
        ("b", 1, "20.0"),
        ("a", 2, "20.5"),
        ("a", 3, "22.0"),
        ("b", 2, "22.0"),
    ]
    .iter()
    .map(|(d, q, v)| (d.to_string(), *q, v.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn a_reload_in_the_middle_of_a_batch_applies_after_the_observations_before_it_are_committed() {
    let (_d, path) = db();
    let mut s = settings(&[]);
    // One batch gathers for 300 ms: the removed source's observation, the reload and the new
    // source's observation all arrive inside it.
    s.commit_delay = Duration::from_millis(300);
    let h = Harness::start(&path, s);
    h.send(plain(obs_from("old", "a", 2000, 0)));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut next = settings(&[]);
    next.commit_delay = Duration::from_millis(300);
    h.msg(WriterMsg::Reconfigure(Box::new(
        crate::channel::Reconfigure {
            settings: next,
            removed_sources: vec!["old".into()],
            applied: Ack::new(move || {
                let _ = tx.send(());
            }),
        },
    )));
    h.send(plain(obs_from("new", "a", 2100, 1)));
    rx.recv_timeout(Duration::from_secs(10)).unwrap();
    h.wait_events(2);
    let conflicts = h.stats.conflicts.load(Ordering::SeqCst);
    h.stop();
    assert_eq!(
        conflicts, 0,
        "the renamed source owns the device after the reload"
    );
    let sps: Vec<String> = events(&path)
        .into_iter()
        .map(|e| {
            e.state
                .setpoint
                .map(|t| t.value.to_string())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(sps, vec!["20.0", "21.0"]);
}
