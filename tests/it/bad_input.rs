//! Malformed, oversized, unknown, retained and duplicate MQTT messages: counted, acknowledged,
//! never fatal, never blocking what comes after them.

use crate::harness::*;
use hvac_edge::model::{
    Connectivity, DeviceState, Event, Fixed, Function, LoadState, Measurement, Mode, TempUnit,
    Temperature,
};
use serde_json::{Value, json};

/// A valid TS0601 state (protocols.md Part B §1.4 (a)) with the given setpoint and temperature.
fn trv_state(setpoint: f64, temperature: f64) -> String {
    json!({"current_heating_setpoint": setpoint, "local_temperature": temperature,
        "system_mode": "auto", "preset": "manual", "running_state": "heat", "battery_low": false,
        "linkquality": 120})
    .to_string()
}

/// The state the daemon derives from [`trv_state`], the temperature observed at `time`.
fn trv_derived(setpoint: i64, temperature: i64, time: i64) -> DeviceState {
    DeviceState {
        function: Some(Function::Heating),
        mode: Some(Mode::Manual),
        setpoint: Some(Temperature {
            value: Fixed(setpoint),
            unit: TempUnit::C,
        }),
        load_state: Some(LoadState::Active),
        temperature: Some(Measurement {
            value: Fixed(temperature),
            unit: "C".into(),
            time,
        }),
        ..Default::default()
    }
}

fn kinds(events: &[Event]) -> Vec<(&str, u64, &str)> {
    events
        .iter()
        .map(|e| (e.device.as_str(), e.seq, e.kind.as_str()))
        .collect()
}

struct Setup {
    broker: Mosquitto,
    receiver: Receiver,
    tc: TestConfig,
    daemon: Daemon,
    publisher: Publisher,
}

/// Broker (with `max_inflight_messages` as given), receiver, and a daemon with one zigbee2mqtt
/// source `z2m` (after `tweak`), subscribed before anything is published.
async fn setup(
    sb: &Sandbox,
    max_inflight_messages: u32,
    tweak: impl FnOnce(&mut TestConfig),
) -> Setup {
    let broker = Mosquitto::start_with(MosquittoOptions {
        max_inflight_messages,
    });
    let receiver = Receiver::start([]).await;
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
        broker,
        receiver,
        tc,
        daemon,
        publisher,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_bad_messages_are_counted_acked_and_a_later_valid_one_still_flows() {
    let sb = Sandbox::new("malformed");
    // The broker sends at most 10 unacknowledged messages: had the daemon not acked the bad
    // ones, the valid message after them could never arrive.
    let Setup {
        broker,
        receiver,
        tc,
        daemon,
        publisher: mut p,
    } = setup(&sb, 10, |_| {}).await;
    let state = format!("{}/trv", tc.base_topic());
    let avail = format!("{state}/availability");
    let deep = format!("{}{}", "[".repeat(300), "]".repeat(300));
    let bad: Vec<(&str, Vec<u8>)> = vec![
        (&state, b"not json at all".to_vec()),
        (&state, vec![0xff, 0xfe, 0x7b, 0x00]), // not UTF-8
        (&state, b"[1,2,3]".to_vec()),
        (&state, br#""a string""#.to_vec()),
        (&state, deep.into_bytes()), // deeper than the JSON parser's limit
        (&state, br#"{"local_temperature":"abc"}"#.to_vec()),
        (
            &state,
            br#"{"current_heating_setpoint":21,"system_mode":5}"#.to_vec(),
        ),
        (&state, br#"{"linkquality":120,"battery":90}"#.to_vec()), // no thermostat field: ignored
        (&state, br#"{"current_heating_setpoint":1e12}"#.to_vec()),
        (&avail, b"maybe".to_vec()),
    ];
    for _ in 0..5 {
        for (topic, payload) in &bad {
            p.publish(topic, payload.clone(), false).await;
        }
    }
    p.publish(&state, trv_state(21.0, 19.5), false).await;

    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(kinds(&events), [("trv", 1, "snapshot")]);
    assert_eq!(
        events[0].state,
        trv_derived(2100, 1950, observed_ms(&events[0]))
    );
    let src = daemon.source("z2m");
    assert_eq!(get(&src.malformed), 45);
    assert_eq!(get(&src.received), 51);
    assert_eq!(get(&src.observations), 1);
    // A JSON object without thermostat fields (a plug, a light) is not malformed: ignored.
    assert_eq!(get(&src.ignored), 5);
    assert_eq!(get(&daemon.writer().events), 1);

    // The broker delivered all 51 messages once and got a PUBACK for each.
    let client = tc.client_id("z2m");
    wait_until_async("51 PUBACKs from the daemon", TIMEOUT, || {
        broker.pubacks_from(&client) >= 51
    })
    .await;
    assert_eq!(broker.publishes_sent_to(&client), 51);
    assert_eq!(broker.pubacks_from(&client), 51);

    // A restart on the same session gets nothing redelivered: everything was acked.
    daemon.stop().await.unwrap();
    let daemon = Daemon::start(tc.build()).await;
    broker.wait_connected(&client, 2, TIMEOUT).await;
    p.publish(&state, trv_state(21.5, 19.5), false).await;
    let events = receiver.wait_unique_events(2, TIMEOUT).await;
    assert_eq!(
        kinds(&events),
        [("trv", 1, "snapshot"), ("trv", 2, "setpoint")]
    );
    let src = daemon.source("z2m");
    assert_eq!(get(&src.received), 1);
    assert_eq!(get(&src.malformed), 0);
    assert_eq!(receiver.bad_signatures(), 0);
    daemon.stop().await.unwrap();
}

/// `{"local_temperature":<t>,"pad":"xxx…"}` of exactly `len` bytes.
fn padded(temperature: f64, len: usize) -> Vec<u8> {
    let head = format!(r#"{{"local_temperature":{temperature},"pad":""#);
    let tail = "\"}";
    assert!(len >= head.len() + tail.len());
    let s = format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()));
    assert_eq!(s.len(), len);
    s.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_max_payload_bytes_is_counted_and_dropped() {
    let sb = Sandbox::new("oversized");
    let Setup {
        receiver,
        tc,
        daemon,
        publisher: mut p,
        broker: _broker, // `..` would drop (kill) the broker right here
    } = setup(&sb, 1000, |tc| {
        tc.source_set("z2m", "max_payload_bytes", "1024");
    })
    .await;
    let topic = format!("{}/sensor", tc.base_topic());
    p.publish(&topic, padded(30.0, 5000), false).await;
    p.publish(&topic, padded(29.0, 1025), false).await;
    p.publish(&topic, padded(21.5, 1024), false).await; // exactly the limit: accepted

    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(kinds(&events), [("sensor", 1, "snapshot")]);
    let want = DeviceState {
        temperature: Some(Measurement {
            value: Fixed(2150),
            unit: "C".into(),
            time: observed_ms(&events[0]),
        }),
        ..Default::default()
    };
    assert_eq!(events[0].state, want);
    let src = daemon.source("z2m");
    assert_eq!(get(&src.malformed), 2);
    assert_eq!(get(&src.received), 3);
    assert_eq!(get(&src.observations), 1);

    // Later messages still flow.
    p.publish(&topic, padded(22.0, 100), false).await;
    let events = receiver.wait_unique_events(2, TIMEOUT).await;
    assert_eq!(
        kinds(&events),
        [("sensor", 1, "snapshot"), ("sensor", 2, "temperature")]
    );
    assert_eq!(get(&src.malformed), 2);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_and_command_topics_are_ignored_not_counted_as_malformed() {
    let sb = Sandbox::new("irrelevant");
    let Setup {
        receiver,
        tc,
        daemon,
        publisher: mut p,
        broker: _broker, // `..` would drop (kill) the broker right here
    } = setup(&sb, 1000, |_| {}).await;
    let base = tc.base_topic();
    let irrelevant = [
        (format!("{base}/bridge/state"), r#"{"state":"online"}"#),
        (format!("{base}/bridge/devices"), "[]"),
        (
            format!("{base}/bridge/response/device/rename"),
            r#"{"status":"ok"}"#,
        ),
        (
            format!("{base}/x/set"),
            r#"{"current_heating_setpoint":30}"#,
        ),
        (format!("{base}/x/set/system_mode"), "off"),
        (format!("{base}/x/get"), r#"{"local_temperature":""}"#),
        (
            format!("{base}/x/l1/set"),
            r#"{"current_heating_setpoint":31}"#,
        ),
        (base.clone(), r#"{"current_heating_setpoint":32}"#),
    ];
    for (topic, payload) in &irrelevant {
        p.publish(topic, *payload, false).await;
    }
    p.publish(&format!("{base}/x"), trv_state(21.0, 19.5), false)
        .await;

    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(kinds(&events), [("x", 1, "snapshot")]);
    // The /set payloads (setpoints 30, 31, 32) were commands, not state.
    assert_eq!(
        events[0].state,
        trv_derived(2100, 1950, observed_ms(&events[0]))
    );
    let src = daemon.source("z2m");
    assert_eq!(get(&src.ignored), irrelevant.len() as u64);
    assert_eq!(get(&src.malformed), 0);
    assert_eq!(get(&src.observations), 1);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_state_published_before_the_daemon_subscribes_produces_the_snapshot() {
    let sb = Sandbox::new("retained");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver);
    let base = tc.base_topic();
    let mut p = Publisher::connect(broker.port()).await;
    p.publish(&format!("{base}/trv"), trv_state(20.5, 18.5), true)
        .await;

    let t_start = now_ms();
    let daemon = Daemon::start(tc.build()).await;
    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(kinds(&events), [("trv", 1, "snapshot")]);
    let t = observed_ms(&events[0]);
    assert!(t >= t_start, "observed when received, not when published");
    assert_eq!(events[0].state, trv_derived(2050, 1850, t));

    p.publish(
        &format!("{base}/trv/availability"),
        r#"{"state":"online"}"#,
        false,
    )
    .await;
    let events = receiver.wait_unique_events(2, TIMEOUT).await;
    assert_eq!(
        kinds(&events),
        [("trv", 1, "snapshot"), ("trv", 2, "connectivity")]
    );
    let mut s = trv_derived(2050, 1850, t);
    s.connectivity = Some(Connectivity::Online);
    assert_eq!(events[1].state, s);

    // A restart subscribes again (so config changes to topics take effect): the broker replays
    // the retained state, which equals what is committed, so it yields no event.
    daemon.stop().await.unwrap();
    let daemon = Daemon::start(tc.build()).await;
    let client = tc.client_id("z2m");
    broker.wait_connected(&client, 2, TIMEOUT).await;
    p.publish(&format!("{base}/trv/availability"), "offline", false)
        .await;
    let events = receiver.wait_unique_events(3, TIMEOUT).await;
    assert_eq!(events[2].kind, "connectivity");
    assert_eq!(events[2].seq, 3);
    assert_eq!(get(&daemon.source("z2m").received), 2);
    assert_eq!(
        broker.count_lines_ending_with(&format!("Sending SUBACK to {client}")),
        2
    );
    assert_eq!(events.len(), 3);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_messages_yield_one_event() {
    let sb = Sandbox::new("duplicates");
    let Setup {
        receiver,
        tc,
        daemon,
        publisher: mut p,
        broker: _broker, // `..` would drop (kill) the broker right here
    } = setup(&sb, 1000, |_| {}).await;
    let topic = format!("{}/trv", tc.base_topic());
    for payload in [
        trv_state(21.0, 19.5),
        trv_state(21.0, 19.5),
        trv_state(22.0, 19.5),
        trv_state(22.0, 19.5),
    ] {
        p.publish(&topic, payload, false).await;
    }
    p.publish(&format!("{topic}/availability"), "offline", false)
        .await;

    let events = receiver
        .wait_event("the OFFLINE sentinel", TIMEOUT, |e| {
            e.kind == "connectivity"
        })
        .await;
    assert_eq!(
        kinds(&events),
        [
            ("trv", 1, "snapshot"),
            ("trv", 2, "setpoint"),
            ("trv", 3, "connectivity")
        ]
    );
    assert_eq!(events[1].previous, json!({"value": "21.0", "unit": "C"}));
    assert_eq!(events[1].current, json!({"value": "22.0", "unit": "C"}));
    assert_eq!(events[2].previous, Value::Null);
    assert_eq!(receiver.accepted_events(), events);
    let src = daemon.source("z2m");
    assert_eq!(get(&src.observations), 5);
    assert_eq!(get(&src.malformed), 0);
    daemon.stop().await.unwrap();
}
