//! The real binary killed (SIGKILL) while publishing and delivering, then restarted on the same
//! database and broker session; a clean stop (SIGTERM); a crash before the first device checkpoint.
//!
//! Every message carries a setpoint unique per device and monotonic, so the exact event list of
//! each device is known in advance: a lost MQTT message shows up as a merged step, a stale
//! redelivery as an extra step backwards, a lost committed event as a seq gap. Duplicates are
//! allowed only as resends of the same stored envelope (same id, same bytes).

use crate::harness::*;
use hvac_edge::model::{Event, Field};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Devices of the SIGKILL test.
const DEVICES: usize = 8;
/// Messages published per device in the SIGKILL test.
const MESSAGES: usize = 60;
/// Pause between two rounds of publishing (one message per device): about 10 rounds a second.
const ROUND_PACE: Duration = Duration::from_millis(100);
/// How long a killed or stopped daemon may take to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Events per request: small, so a backlog takes several requests and a kill can land among them.
const BATCH_MAX_EVENTS: usize = 10;

/// Setpoint of message `k` in tenths of °C: 15.0, 15.5, 16.0, … (unique and monotonic).
fn setpoint_tenths(k: usize) -> i64 {
    150 + 5 * k as i64
}

/// The canonical JSON of a setpoint of `tenths` (as in `previous` / `current`).
fn celsius(tenths: i64) -> Value {
    json!({"value": format!("{}.{}", tenths / 10, tenths % 10), "unit": "C"})
}

/// A Tuya TRV state: only the setpoint varies between messages (`linkquality` is not mapped, so
/// changing it changes the message but not the state).
fn trv_state(tenths: i64, linkquality: u32) -> String {
    json!({"current_heating_setpoint": tenths as f64 / 10.0, "local_temperature": 19.5,
        "system_mode": "auto", "preset": "manual", "running_state": "heat",
        "linkquality": linkquality})
    .to_string()
}

fn device(d: usize) -> String {
    format!("trv-{d}")
}

/// `(seq, type, previous, current)` of an event: what the exact assertions compare.
fn summary(e: &Event) -> (u64, String, Value, Value) {
    (e.seq, e.kind.clone(), e.previous.clone(), e.current.clone())
}

/// The setpoint step `seq` of a device: from message `seq - 2` to message `seq - 1`.
fn step(seq: u64, from_tenths: i64, to_tenths: i64) -> (u64, String, Value, Value) {
    (
        seq,
        "setpoint".to_string(),
        celsius(from_tenths),
        celsius(to_tenths),
    )
}

/// What each device's first `messages` messages must produce: seq 1 the snapshot, then one
/// setpoint step per message.
fn expected_history(messages: usize) -> Vec<(u64, String, Value, Value)> {
    let mut want = vec![(1, "snapshot".to_string(), Value::Null, Value::Null)];
    for k in 1..messages {
        want.push(step(
            k as u64 + 1,
            setpoint_tenths(k - 1),
            setpoint_tenths(k),
        ));
    }
    want
}

/// Checks one device's unique events, in first-arrival order, against [`expected_history`], and
/// that each event's `state` carries the setpoint right after it.
fn assert_device_history(device: &str, got: &[&Event]) {
    let want = expected_history(MESSAGES);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            summary(g),
            *w,
            "device {device}: event #{i} (id {}) differs from the expected history",
            g.id
        );
        let tenths = setpoint_tenths(i);
        assert_eq!(
            g.state.field_json(Field::Setpoint),
            celsius(tenths),
            "device {device}: state.setpoint of seq {}",
            g.seq
        );
    }
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "device {device}: wrong number of unique events; seqs {seqs:?}"
    );
}

/// The raw bytes of each element of a request body's `events` array, as sent: the sink splices
/// the stored envelopes into `{"gateway": …, "events": [ … ]}` without re-serialising them.
fn raw_events(body: &[u8]) -> Vec<&[u8]> {
    const KEY: &[u8] = b"\"events\":[";
    let start = body
        .windows(KEY.len())
        .position(|w| w == KEY)
        .unwrap_or_else(|| panic!("no events array in {}", String::from_utf8_lossy(body)))
        + KEY.len();
    let mut out = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut element_start = 0;
    for (i, &b) in body.iter().enumerate().skip(start) {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                if depth == 0 {
                    element_start = i;
                }
                depth += 1;
            }
            b'}' | b']' if depth == 0 => return out,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    out.push(&body[element_start..=i]);
                }
            }
            _ => {}
        }
    }
    panic!(
        "unterminated events array in {}",
        String::from_utf8_lossy(body)
    );
}

/// Every event of every accepted request with its raw bytes, in arrival order; checks that the
/// raw elements parse to exactly the events the receiver parsed.
fn accepted_raw(receiver: &Receiver) -> Vec<(Event, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, r) in receiver.requests().iter().enumerate() {
        if !r.accepted() {
            continue;
        }
        let raw = raw_events(&r.body);
        assert_eq!(raw.len(), r.events().len(), "request #{i}: events array");
        for (bytes, parsed) in raw.iter().zip(r.events()) {
            let again: Event = serde_json::from_slice(bytes).unwrap_or_else(|e| {
                panic!(
                    "request #{i}: element {} does not parse: {e}",
                    String::from_utf8_lossy(bytes)
                )
            });
            assert_eq!(&again, parsed, "request #{i}: raw element vs parsed event");
            out.push((parsed.clone(), bytes.to_vec()));
        }
    }
    out
}

/// Checks that every repeated id arrived with exactly the bytes of its first arrival; returns
/// how many duplicates there were.
fn assert_duplicates_byte_identical(events: &[(Event, Vec<u8>)]) -> usize {
    let mut first: HashMap<&str, &[u8]> = HashMap::new();
    let mut duplicates = 0;
    for (e, bytes) in events {
        match first.get(e.id.as_str()) {
            Some(f) => {
                duplicates += 1;
                assert_eq!(
                    String::from_utf8_lossy(f),
                    String::from_utf8_lossy(bytes),
                    "id {} arrived again with different bytes",
                    e.id
                );
            }
            None => {
                first.insert(&e.id, bytes);
            }
        }
    }
    duplicates
}

/// The latest committed position (0 before the first event); never garbage-collected.
fn max_pos(db: &Db) -> i64 {
    db.count("SELECT COALESCE(MAX(pos), 0) FROM events")
}

/// The successive runs of the real binary on one config, database and MQTT session. On a
/// failing test, prints the tail of every run's log.
struct Runs {
    config: PathBuf,
    logs: PathBuf,
    client_id: String,
    current: DaemonProcess,
    done: Vec<DaemonProcess>,
}

impl Runs {
    /// Spawns the first run.
    fn start(config: PathBuf, logs: PathBuf, client_id: String) -> Runs {
        let current = DaemonProcess::spawn(&config, &logs, &[]);
        Runs {
            config,
            logs,
            client_id,
            current,
            done: Vec::new(),
        }
    }

    /// How many times the binary was started.
    fn starts(&self) -> usize {
        self.done.len() + 1
    }

    /// Panics if the current run exited on its own.
    fn assert_running(&mut self, before: &str) {
        if let Some(status) = self.current.try_status() {
            panic!(
                "run #{} exited by itself ({status}) before {before}",
                self.starts()
            );
        }
    }

    /// SIGKILL the current run and wait until it is gone.
    async fn sigkill(&mut self, why: &str) {
        self.assert_running(why);
        self.current.sigkill();
        let status = self
            .current
            .wait_timeout_async(EXIT_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("run #{} survived SIGKILL", self.starts()));
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "run #{}",
            self.starts()
        );
        eprintln!("SIGKILL of run #{}: {why}", self.starts());
    }

    /// Starts the next run on the same config and waits until the broker accepted its
    /// connection (the persistent session is resumed: no new subscription).
    async fn restart(&mut self, broker: &Mosquitto) {
        assert!(
            self.current.try_status().is_some(),
            "restart of a running daemon"
        );
        let next = DaemonProcess::spawn(&self.config, &self.logs, &[]);
        self.done.push(std::mem::replace(&mut self.current, next));
        broker
            .wait_connected(&self.client_id, self.starts(), TIMEOUT)
            .await;
    }

    /// SIGTERM the current run and wait for its exit status.
    async fn sigterm(&mut self) -> ExitStatus {
        self.assert_running("SIGTERM");
        self.current.sigterm();
        self.current
            .wait_timeout_async(EXIT_TIMEOUT)
            .await
            .unwrap_or_else(|| {
                panic!(
                    "run #{} still running {EXIT_TIMEOUT:?} after SIGTERM",
                    self.starts()
                )
            })
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, run) in self.done.iter().chain([&self.current]).enumerate() {
            let log = run.stderr();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("--- log of run #{} (last 40 lines) ---\n{tail}", i + 1);
        }
    }
}

/// Broker, receiver and config (z2m source `z2m`, sink `upstream`) written to the sandbox.
async fn setup(
    sb: &Sandbox,
    tweak: impl FnOnce(&mut TestConfig),
) -> (Mosquitto, Receiver, TestConfig, PathBuf) {
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver)
        .set("pipeline", "commit_delay_ms", "0")
        .sink_set("upstream", "retry_schedule_secs", "[1]");
    tweak(&mut tc);
    tc.build();
    let path = tc.write("hvac-edge.toml");
    (broker, receiver, tc, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_several_points_loses_no_message_and_breaks_no_seq() {
    let sb = Sandbox::new("crash_sigkill");
    let (broker, mut receiver, tc, config) = setup(&sb, |tc| {
        // Checkpoints (and garbage collection) happen between the kills, so restarts rebuild
        // state both from the devices table and from the replayed event log.
        // A short group-commit linger: a kill can land between receiving and committing.
        tc.set("pipeline", "checkpoint_interval_secs", "2")
            .set("pipeline", "commit_delay_ms", "10")
            .sink_set(
                "upstream",
                "batch_max_events",
                &BATCH_MAX_EVENTS.to_string(),
            );
    })
    .await;
    let client = tc.client_id("z2m");
    let base = tc.base_topic();
    let total = (DEVICES * MESSAGES) as i64;
    let t0 = Instant::now();

    let mut runs = Runs::start(config, sb.path().to_path_buf(), client.clone());
    broker.wait_subscribed(&client, 1, TIMEOUT).await;
    let db = Db::open(&tc.db_path());

    // Publisher: rounds of one message per device, devices shuffled within a round, each message
    // acked by the broker before the next; `rounds` counts completed rounds.
    let rounds = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (rounds, port, base) = (rounds.clone(), broker.port(), base.clone());
        tokio::spawn(async move {
            let mut p = Publisher::connect(port).await;
            let mut order: Vec<usize> = (0..DEVICES).collect();
            for k in 0..MESSAGES {
                fastrand::shuffle(&mut order);
                for &d in &order {
                    let topic = format!("{base}/{}", device(d));
                    p.publish(&topic, trv_state(setpoint_tenths(k), 100), false)
                        .await;
                }
                rounds.store(k + 1, Ordering::Release);
                tokio::time::sleep(ROUND_PACE).await;
            }
        })
    };
    let rounds_at_least = |n: usize| {
        let rounds = rounds.clone();
        move || rounds.load(Ordering::Acquire) >= n
    };
    // A random instant shortly after the condition, so kill points differ between runs.
    let jitter = |max_ms: u64| tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=max_ms)));

    // 1. Mid-publishing, receiver up.
    wait_until_async("6 rounds published", TIMEOUT, rounds_at_least(6)).await;
    jitter(150).await;
    runs.sigkill("mid-publishing").await;
    runs.restart(&broker).await;

    // 2. Right after a burst was acked by the broker: the daemon is committing and acking it.
    wait_until_async("14 rounds published", TIMEOUT, rounds_at_least(14)).await;
    runs.sigkill("right after a burst").await;
    runs.restart(&broker).await;

    // 3. Receiver stopped: committed events are pending in the outbox.
    wait_until_async("20 rounds published", TIMEOUT, rounds_at_least(20)).await;
    receiver.stop().await;
    let pos_at_stop = max_pos(&db);
    wait_until_async(
        "3 rounds committed while the receiver is down",
        TIMEOUT,
        || max_pos(&db) >= (pos_at_stop + 3 * DEVICES as i64).min(total),
    )
    .await;
    jitter(100).await;
    runs.sigkill("receiver down, events pending").await;
    runs.restart(&broker).await;
    wait_until_async("a backlog of 10 rounds", TIMEOUT, || {
        max_pos(&db) >= (pos_at_stop + 10 * DEVICES as i64).min(total)
    })
    .await;

    // 4. The receiver is back and slow: kill while it accepts the backlog.
    receiver.set_default(Reply::ok().delay(Duration::from_millis(150)));
    let requests_before = receiver.request_count();
    receiver.restart().await;
    wait_until_async(
        "3 backlog requests (or the backlog delivered)",
        TIMEOUT,
        || {
            receiver.request_count() >= requests_before + 3
                || receiver.unique_events().len() as i64 >= max_pos(&db)
        },
    )
    .await;
    jitter(100).await;
    runs.sigkill("receiver accepting the backlog").await;
    receiver.set_default(Reply::ok());
    runs.restart(&broker).await;

    // 5. Late in publishing (or during the final delivery).
    wait_until_async(
        "45+ rounds published",
        TIMEOUT,
        rounds_at_least(45 + fastrand::usize(0..8)),
    )
    .await;
    jitter(200).await;
    runs.sigkill("late in publishing").await;

    // 6. A flood: the broker holds several messages per device while the daemon is down and
    // sends them at once on restart; the daemon is killed right after its first commit of them.
    let rounds_down = rounds.load(Ordering::Acquire);
    wait_until_async(
        "4 rounds published while the daemon is down",
        TIMEOUT,
        rounds_at_least((rounds_down + 4).min(MESSAGES)),
    )
    .await;
    let pos_before_flood = max_pos(&db);
    runs.restart(&broker).await;
    wait_until_async("a commit from the flood", TIMEOUT, || {
        max_pos(&db) > pos_before_flood || pos_before_flood >= total
    })
    .await;
    runs.sigkill("first commit of a flood").await;
    runs.restart(&broker).await;

    tokio::time::timeout(TIMEOUT, publisher)
        .await
        .expect("publisher done in time")
        .expect("publisher task");
    let n = DEVICES * MESSAGES;
    // Not the panicking wait: if events are missing, the exact assertions below say which.
    let all_delivered = tokio::time::timeout(Duration::from_secs(30), async {
        while receiver.unique_events().len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    let status = runs.sigterm().await;

    let requests = receiver.requests();
    assert_eq!(
        receiver.bad_signatures(),
        0,
        "requests with a bad signature"
    );
    for (i, r) in requests.iter().enumerate() {
        assert!(r.timestamp_ok, "request #{i}: webhook-timestamp");
        assert!(r.accepted(), "request #{i} answered {}", r.status);
        assert!(
            r.events().len() <= BATCH_MAX_EVENTS,
            "request #{i}: batch size"
        );
    }
    let accepted = accepted_raw(&receiver);
    let duplicates = assert_duplicates_byte_identical(&accepted);
    let events: Vec<Event> = accepted.into_iter().map(|(e, _)| e).collect();
    check_duplicates_identical(&events).unwrap();
    let unique = dedup_by_id(&events);
    check_seq_gap_free(&unique).unwrap();
    for d in 0..DEVICES {
        let name = device(d);
        assert_device_history(&name, &of_device(&unique, &name));
    }
    let devices: HashSet<&str> = unique.iter().map(|e| e.device.as_str()).collect();
    assert_eq!(devices.len(), DEVICES, "devices seen: {devices:?}");
    assert_eq!(unique.len(), n, "unique events");
    assert!(all_delivered);
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );

    // Exactly one event per message was ever committed (none lost, none from a redelivery),
    // and the final delivered position was saved on the clean stop.
    assert_eq!(max_pos(&db), total);
    let sink = db.sink("upstream").expect("sink row");
    assert_eq!((sink.cursor, sink.consecutive_failures), (total, 0));
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    let redelivered = broker.count_lines_containing(&format!("Sending PUBLISH to {client} (d1"));
    eprintln!(
        "{} runs, {} MQTT redeliveries (DUP), {} requests, {} events received, {} duplicates \
         (same id, same bytes), {:.1} s",
        runs.starts(),
        redelivered,
        requests.len(),
        events.len(),
        duplicates,
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_with_exit_0_and_nothing_is_redelivered() {
    let sb = Sandbox::new("crash_sigterm");
    let (broker, receiver, tc, config) = setup(&sb, |_| {}).await;
    let client = tc.client_id("z2m");
    let topic = |d: usize| format!("{}/{}", tc.base_topic(), device(d));
    let mut runs = Runs::start(config, sb.path().to_path_buf(), client.clone());
    broker.wait_subscribed(&client, 1, TIMEOUT).await;

    let mut p = Publisher::connect(broker.port()).await;
    for (d, k) in [(0, 0), (1, 0), (0, 1), (0, 2)] {
        p.publish(&topic(d), trv_state(setpoint_tenths(k), 100), false)
            .await;
    }
    receiver.wait_unique_events(4, TIMEOUT).await;
    let status = runs.sigterm().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    assert!(
        runs.current.stderr().contains("hvac-edge stopped"),
        "no clean-stop line in the log:\n{}",
        runs.current.stderr()
    );
    // Everything was acked before the disconnect and the delivered position was saved.
    wait_until_async("4 PUBACKs logged by the broker", TIMEOUT, || {
        broker.pubacks_from(&client) >= 4
    })
    .await;
    assert_eq!(broker.publishes_sent_to(&client), 4);
    assert_eq!(broker.pubacks_from(&client), 4);
    let db = Db::open(&tc.db_path());
    assert_eq!(max_pos(&db), 4);
    assert_eq!(db.sink("upstream").expect("sink row").cursor, 4);
    let before = receiver.accepted_events().len();
    assert_eq!(before, 4, "each event delivered once");

    runs.restart(&broker).await;
    // d1's current state again (a different message, the same state): no event. Then changes.
    p.publish(&topic(1), trv_state(setpoint_tenths(0), 42), false)
        .await;
    p.publish(&topic(1), trv_state(setpoint_tenths(1), 100), false)
        .await;
    p.publish(&topic(0), trv_state(setpoint_tenths(3), 100), false)
        .await;
    wait_until_async("an event of trv-0 after the restart", TIMEOUT, || {
        receiver.accepted_events()[before..]
            .iter()
            .any(|e| e.device == device(0))
    })
    .await;
    let status = runs.sigterm().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );

    // Nothing was redelivered by the broker nor resent by the sink: only the two changes.
    let after: Vec<_> = receiver.accepted_events()[before..]
        .iter()
        .map(|e| (e.device.clone(), summary(e)))
        .collect();
    assert_eq!(
        after,
        [
            (device(1), step(2, setpoint_tenths(0), setpoint_tenths(1))),
            (device(0), step(4, setpoint_tenths(2), setpoint_tenths(3))),
        ]
    );
    wait_until_async("7 PUBACKs logged by the broker", TIMEOUT, || {
        broker.pubacks_from(&client) >= 7
    })
    .await;
    assert_eq!(broker.publishes_sent_to(&client), 7);
    assert_eq!(broker.pubacks_from(&client), 7);
    assert_eq!(max_pos(&db), 6);
    assert_eq!(receiver.bad_signatures(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_first_checkpoint_restarts_with_the_right_state() {
    let sb = Sandbox::new("crash_no_checkpoint");
    let (broker, receiver, tc, config) = setup(&sb, |tc| {
        tc.set("pipeline", "checkpoint_interval_secs", "3600");
    })
    .await;
    let client = tc.client_id("z2m");
    let topic = |d: usize| format!("{}/{}", tc.base_topic(), device(d));
    let mut runs = Runs::start(config, sb.path().to_path_buf(), client.clone());
    broker.wait_subscribed(&client, 1, TIMEOUT).await;

    let mut p = Publisher::connect(broker.port()).await;
    for (d, k) in [(0, 0), (0, 1), (1, 0), (0, 2)] {
        p.publish(&topic(d), trv_state(setpoint_tenths(k), 100), false)
            .await;
    }
    let delivered = receiver.wait_unique_events(4, TIMEOUT).await;
    let db = Db::open(&tc.db_path());
    // The devices table was never written: the state lives only in the event log.
    assert_eq!(db.count("SELECT COUNT(*) FROM devices"), 0);
    assert_eq!(max_pos(&db), 4);
    runs.sigkill("right after the first commits, before any checkpoint")
        .await;
    runs.restart(&broker).await;

    // The current state of both devices again (different messages, same state): no event.
    p.publish(&topic(0), trv_state(setpoint_tenths(2), 42), false)
        .await;
    p.publish(&topic(1), trv_state(setpoint_tenths(0), 42), false)
        .await;
    // A change: the next seq, from the right previous value.
    p.publish(&topic(0), trv_state(setpoint_tenths(3), 42), false)
        .await;
    let old: HashSet<String> = delivered.iter().map(|e| e.id.clone()).collect();
    let new_events = || -> Vec<Event> {
        receiver
            .unique_events()
            .into_iter()
            .filter(|e| !old.contains(&e.id))
            .collect()
    };
    wait_until_async("an event of trv-0 after the restart", TIMEOUT, || {
        new_events().iter().any(|e| e.device == device(0))
    })
    .await;
    let status = runs.sigterm().await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );

    let got: Vec<_> = new_events()
        .iter()
        .map(|e| (e.device.clone(), summary(e)))
        .collect();
    assert_eq!(
        got,
        [(device(0), step(4, setpoint_tenths(2), setpoint_tenths(3)))]
    );
    assert!(
        runs.current
            .stderr()
            .contains("Replayed events committed after the last device checkpoint"),
        "the restart did not replay the event log:\n{}",
        runs.current.stderr()
    );
    // Resends of events delivered before the crash (cursor saved at most once a second) are
    // identical; the per-device seq stays gap-free.
    let accepted = accepted_raw(&receiver);
    assert_duplicates_byte_identical(&accepted);
    let unique = receiver.unique_events();
    check_seq_gap_free(&unique).unwrap();
    assert_eq!(max_pos(&db), 5);
    assert_eq!(receiver.bad_signatures(), 0);
}
