//! Zigbee2MQTT and generic JSON through the whole pipeline (real mosquitto → in-process daemon →
//! real SQLite → signed HTTP) to a receiver that verifies signatures, with exact event lists.

use crate::harness::*;
use hvac_edge::model::{
    ClockState, Connectivity, DeviceState, Event, Fixed, Function, LoadState, Measurement, Mode,
    TempUnit, Temperature,
};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};

/// What one received event must be, exactly.
struct Want {
    seq: u64,
    kind: &'static str,
    previous: Value,
    current: Value,
    state: DeviceState,
}

fn want(
    seq: u64,
    kind: &'static str,
    previous: Value,
    current: Value,
    state: &DeviceState,
) -> Want {
    Want {
        seq,
        kind,
        previous,
        current,
        state: state.clone(),
    }
}

fn assert_device_events(device: &str, got: &[&Event], want: &[Want]) {
    let kinds: Vec<(u64, &str)> = got.iter().map(|e| (e.seq, e.kind.as_str())).collect();
    assert_eq!(
        got.len(),
        want.len(),
        "device {device}: wrong number of events, got {kinds:?}"
    );
    // `want.state` is the state after the whole observation; each event must carry the state
    // right after its own change, i.e. the running state with only that field updated.
    let mut running = DeviceState::default();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let at = format!("device {device}, event #{i} ({} seq {})", g.kind, g.seq);
        assert_eq!(g.device, device, "{at}: device");
        assert_eq!(g.seq, w.seq, "{at}: seq");
        assert_eq!(g.kind, w.kind, "{at}: type");
        assert_eq!(g.previous, w.previous, "{at}: previous");
        assert_eq!(g.current, w.current, "{at}: current");
        match hvac_edge::model::Field::parse(&g.kind) {
            None => running = w.state.clone(),
            Some(f) => {
                assert_eq!(
                    running.field_json(f),
                    g.previous,
                    "{at}: previous matches the running state"
                );
                hvac_edge::diff::copy_field(&mut running, &w.state, f);
            }
        }
        assert_eq!(g.state, running, "{at}: state after this change");
    }
    if let Some(last) = want.last() {
        assert_eq!(running, last.state, "device {device}: final state");
    }
}

/// Envelope fields every event must have right: gateway, plant/module from config, a parseable
/// `observed_at` inside the test's time window and non-decreasing per device, a clock state,
/// unique UUIDv7 ids.
fn assert_envelopes(events: &[Event], t0: i64, meta: &HashMap<&str, (Option<&str>, Option<&str>)>) {
    let now = now_ms();
    let mut ids = HashSet::new();
    let mut last_at: HashMap<&str, i64> = HashMap::new();
    for e in events {
        assert!(ids.insert(e.id.clone()), "duplicate id {}", e.id);
        let id =
            uuid::Uuid::parse_str(&e.id).unwrap_or_else(|_| panic!("id {} is not a UUID", e.id));
        assert_eq!(id.get_version_num(), 7, "id {} is not a UUIDv7", e.id);
        assert_eq!(e.gateway, "gw-it");
        let (plant, module) = meta.get(e.device.as_str()).copied().unwrap_or((None, None));
        assert_eq!(e.plant.as_deref(), plant, "plant of {}", e.device);
        assert_eq!(e.module.as_deref(), module, "module of {}", e.device);
        let at = observed_ms(e);
        assert!(
            (t0..=now).contains(&at),
            "observed_at {} outside the test window",
            e.observed_at
        );
        let prev = last_at.insert(e.device.as_str(), at).unwrap_or(i64::MIN);
        assert!(prev <= at, "observed_at goes backwards for {}", e.device);
        assert!(matches!(e.clock, ClockState::Synced | ClockState::Unsynced));
    }
}

/// Every request was a signed POST of a well-formed batch with the expected headers.
fn assert_requests_well_formed(receiver: &Receiver) {
    let requests = receiver.requests();
    assert!(!requests.is_empty(), "no request reached the receiver");
    assert_eq!(
        receiver.bad_signatures(),
        0,
        "requests with a bad signature"
    );
    let mut webhook_ids = HashSet::new();
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(r.method, "POST", "request #{i}");
        assert_eq!(r.path, "/ingest", "request #{i}");
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "request #{i}"
        );
        assert_eq!(r.header("x-api-version"), Some("1"), "request #{i}");
        let Some(id) = r.header("webhook-id") else {
            panic!("request #{i}: no webhook-id header");
        };
        assert!(
            id.starts_with("msg_") && !id.contains('.'),
            "webhook-id {id:?}"
        );
        assert!(r.signature_ok, "request #{i}: signature");
        assert!(
            r.timestamp_ok,
            "request #{i}: webhook-timestamp {:?}",
            r.header("webhook-timestamp")
        );
        assert!(
            r.header("webhook-signature")
                .is_some_and(|s| s.starts_with("v1,")),
            "request #{i}: webhook-signature"
        );
        assert!(
            r.header("user-agent")
                .is_some_and(|u| u.starts_with("hvac-edge/")),
            "request #{i}: user-agent"
        );
        let batch = r
            .batch
            .as_ref()
            .unwrap_or_else(|e| panic!("request #{i}: body: {e}"));
        assert_eq!(batch.gateway, "gw-it");
        assert!(!batch.events.is_empty(), "request #{i}: empty batch");
        assert!(r.accepted(), "request #{i} was answered {}", r.status);
        assert!(
            webhook_ids.insert(id.to_string()),
            "webhook-id {id} reused for another batch"
        );
    }
}

fn c(v: i64) -> Option<Temperature> {
    Some(Temperature {
        value: Fixed(v),
        unit: TempUnit::C,
    })
}

fn measured(v: i64, unit: &str, time: i64) -> Option<Measurement> {
    Some(Measurement {
        value: Fixed(v),
        unit: unit.to_string(),
        time,
    })
}

fn temp_json(v: &str, unit: &str, time: i64) -> Value {
    json!({"value": v, "unit": unit, "time": hvac_edge::model::format_rfc3339_ms(time)})
}

/// Tuya TS0601 TRV state as in protocols.md Part B §1.4 (a), with the varied keys as arguments.
fn ts0601(setpoint: f64, system_mode: &str, running_state: &str, temperature: f64) -> String {
    json!({"current_heating_setpoint": setpoint, "local_temperature": temperature,
        "local_temperature_calibration": 0, "system_mode": system_mode, "preset": "manual",
        "running_state": running_state, "position": 35, "child_lock": "UNLOCK",
        "window_detection": "OFF", "window_open": false, "away_mode": "OFF", "away_preset_days": 1,
        "away_preset_temperature": 15, "boost_time": 300, "comfort_temperature": 21,
        "eco_temperature": 17, "battery_low": false, "linkquality": 120})
    .to_string()
}

/// Bosch BTH-RM state as in protocols.md Part B §1.4 (f), with the varied keys as arguments.
fn bth_rm(cooling_setpoint: f64, running_state: &str, humidity: f64) -> String {
    json!({"local_temperature": 24.6, "humidity": humidity, "occupied_heating_setpoint": 20,
        "occupied_cooling_setpoint": cooling_setpoint, "system_mode": "cool",
        "running_state": running_state, "control_sequence_of_operation": "cooling_only",
        "operating_mode": "manual", "setpoint_change_source": "manual", "window_detection": "OFF",
        "boost_heating": "OFF", "child_lock": "UNLOCK", "battery": 85, "linkquality": 111})
    .to_string()
}

/// Starts broker, receiver and daemon with one zigbee2mqtt source `z2m` and one sink `upstream`
/// (no checkpoint, hence no garbage collection, during the test: the `events` table stays whole),
/// and waits until the daemon's subscription is in place.
async fn z2m_setup(
    sb: &Sandbox,
    extra: &str,
) -> (Mosquitto, Receiver, TestConfig, Daemon, Publisher) {
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(sb);
    tc.set("pipeline", "checkpoint_interval_secs", "3600")
        .z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver)
        .raw(extra);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let publisher = Publisher::connect(broker.port()).await;
    (broker, receiver, tc, daemon, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zigbee2mqtt_state_and_availability_become_exact_signed_events() {
    let t0 = now_ms();
    let sb = Sandbox::new("z2m_exact");
    let trv = "ground/living-trv"; // friendly names may contain '/'
    let rm = "hall-rm";
    let (_broker, receiver, tc, daemon, mut p) = z2m_setup(
        &sb,
        &format!(
            "[[devices]]\nid = {}\nplant = \"plant-a\"\nmodule = \"module-a\"",
            toml_str(trv)
        ),
    )
    .await;
    let base = tc.base_topic();
    let trv_t = format!("{base}/{trv}");
    let trv_a = format!("{trv_t}/availability");
    let rm_t = format!("{base}/{rm}");
    let rm_a = format!("{rm_t}/availability");

    p.publish(&trv_a, r#"{"state":"online"}"#, false).await;
    p.publish(&trv_t, ts0601(21.0, "auto", "heat", 19.5), false)
        .await;
    p.publish(&rm_t, bth_rm(25.0, "idle", 52.0), false).await;
    p.publish(&rm_a, "online", false).await; // Z2M 1.x plain-text availability
    p.publish(&trv_t, ts0601(21.5, "auto", "heat", 19.5), false)
        .await;
    p.publish(&rm_t, bth_rm(25.0, "cool", 52.0), false).await;
    p.publish(&trv_t, ts0601(21.5, "off", "heat", 19.5), false)
        .await;
    p.publish(&trv_t, ts0601(21.5, "off", "idle", 19.5), false)
        .await;
    p.publish(&trv_t, ts0601(21.5, "off", "idle", 19.6), false)
        .await; // inside the 0.2 deadband
    p.publish(&rm_t, bth_rm(25.0, "cool", 52.5), false).await; // inside the 1.0 %RH deadband
    p.publish(&trv_t, ts0601(21.5, "off", "idle", 19.8), false)
        .await; // 0.3 from the last emitted
    p.publish(&rm_t, bth_rm(25.0, "cool", 54.0), false).await;
    p.publish(&trv_a, r#"{"state":"offline"}"#, false).await; // the last event: a sentinel

    let events = receiver
        .wait_event("the TRV going OFFLINE", TIMEOUT, |e| {
            e.device == trv && e.kind == "connectivity" && e.current == json!("OFFLINE")
        })
        .await;
    // Order is preserved end to end, so nothing can arrive after the sentinel.
    assert_eq!(events.len(), 15, "events: {:#?}", events);
    assert_eq!(
        receiver.accepted_events(),
        events,
        "no duplicates on a healthy path"
    );

    let a = of_device(&events, trv);
    let t = |i: usize| observed_ms(a[i]);
    // One message reporting five fields: five events with one observation time, each carrying
    // the state right after its own change (checked in assert_device_events).
    for i in 1..6 {
        assert_eq!(a[i].observed_at, a[1].observed_at);
    }
    let mut s = DeviceState {
        connectivity: Some(Connectivity::Online),
        ..Default::default()
    };
    let mut w = vec![want(1, "snapshot", Value::Null, Value::Null, &s)];
    s.function = Some(Function::Heating);
    s.mode = Some(Mode::Manual);
    s.setpoint = c(2100);
    s.load_state = Some(LoadState::Active);
    s.temperature = measured(1950, "C", t(5));
    w.push(want(2, "function", Value::Null, json!("HEATING"), &s));
    w.push(want(3, "mode", Value::Null, json!("MANUAL"), &s));
    w.push(want(
        4,
        "setpoint",
        Value::Null,
        json!({"value": "21.0", "unit": "C"}),
        &s,
    ));
    w.push(want(5, "load_state", Value::Null, json!("ACTIVE"), &s));
    w.push(want(
        6,
        "temperature",
        Value::Null,
        temp_json("19.5", "C", t(5)),
        &s,
    ));
    s.setpoint = c(2150);
    w.push(want(
        7,
        "setpoint",
        json!({"value": "21.0", "unit": "C"}),
        json!({"value": "21.5", "unit": "C"}),
        &s,
    ));
    s.mode = Some(Mode::Off);
    w.push(want(8, "mode", json!("MANUAL"), json!("OFF"), &s));
    s.load_state = Some(LoadState::Inactive);
    w.push(want(
        9,
        "load_state",
        json!("ACTIVE"),
        json!("INACTIVE"),
        &s,
    ));
    s.temperature = measured(1980, "C", t(9));
    w.push(want(
        10,
        "temperature",
        temp_json("19.5", "C", t(5)),
        temp_json("19.8", "C", t(9)),
        &s,
    ));
    s.connectivity = Some(Connectivity::Offline);
    w.push(want(
        11,
        "connectivity",
        json!("ONLINE"),
        json!("OFFLINE"),
        &s,
    ));
    assert_device_events(trv, &a, &w);

    let b = of_device(&events, rm);
    let t = |i: usize| observed_ms(b[i]);
    let mut s = DeviceState {
        function: Some(Function::Cooling),
        mode: Some(Mode::Manual),
        setpoint: c(2500), // cooling function: the cooling setpoint
        load_state: Some(LoadState::Inactive),
        temperature: measured(2460, "C", t(0)),
        humidity: measured(5200, "%", t(0)),
        ..Default::default()
    };
    let mut w = vec![want(1, "snapshot", Value::Null, Value::Null, &s)];
    s.connectivity = Some(Connectivity::Online);
    w.push(want(2, "connectivity", Value::Null, json!("ONLINE"), &s));
    s.load_state = Some(LoadState::Active);
    w.push(want(
        3,
        "load_state",
        json!("INACTIVE"),
        json!("ACTIVE"),
        &s,
    ));
    s.humidity = measured(5400, "%", t(3));
    w.push(want(
        4,
        "humidity",
        temp_json("52.0", "%", t(0)),
        temp_json("54.0", "%", t(3)),
        &s,
    ));
    assert_device_events(rm, &b, &w);

    let meta = HashMap::from([
        (trv, (Some("plant-a"), Some("module-a"))),
        (rm, (None, None)),
    ]);
    assert_envelopes(&events, t0, &meta);
    check_seq_gap_free(&events).unwrap();
    assert_requests_well_formed(&receiver);

    // The receiver got exactly the committed events, in commit order.
    let rows = Db::open(&tc.db_path()).events();
    let row_ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let got_ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(got_ids, row_ids);

    let src = daemon.source("z2m");
    assert_eq!(get(&src.received), 13);
    assert_eq!(get(&src.observations), 13);
    assert_eq!(get(&src.malformed), 0);
    assert_eq!(get(&src.ignored), 0);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_json_mapping_turns_an_esphome_like_payload_into_events() {
    let t0 = now_ms();
    let sb = Sandbox::new("generic_mapping");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let prefix = format!("home-{}", sb.tag());
    let mapping = format!(
        r#"
device = "{{topic:1}}"
availability_topic = "{prefix}/{{device}}/status"
unit = "C"
[sources.mqtt.mapping.fields]
setpoint = "/target_temperature"
temperature = "/current_temperature"
humidity = "/current_humidity"
mode = "/mode"
load_state = "/action"
[sources.mqtt.mapping.values.mode]
heat = "MANUAL"
auto = "AUTOMATIC"
off = "OFF"
[sources.mqtt.mapping.values.load_state]
heating = "ACTIVE"
cooling = "ACTIVE"
idle = "INACTIVE"
off = "INACTIVE"
"#
    );
    let mut tc = TestConfig::new(&sb);
    tc.generic_source(
        "esphome",
        broker.port(),
        &[&format!("{prefix}/+/climate/state")],
        &mapping,
    )
    .http_sink("upstream", &receiver);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("esphome"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    let office = "esp-office";
    let bedroom = "esp-bedroom";
    let state = |d: &str| format!("{prefix}/{d}/climate/state");

    p.publish(
        &state(office),
        r#"{"target_temperature":21.5,"current_temperature":20.4,"current_humidity":45.0,"mode":"heat","action":"heating","fan_mode":"auto"}"#,
        false,
    )
    .await;
    p.publish(
        &state(office),
        r#"{"target_temperature":21.5,"current_temperature":20.5,"current_humidity":45.4,"mode":"auto","action":"idle","fan_mode":"auto"}"#,
        false,
    )
    .await;
    p.publish(&format!("{prefix}/{office}/status"), "offline", false)
        .await;
    p.publish(
        &state(bedroom),
        r#"{"target_temperature":19,"current_temperature":18.25,"mode":"off","action":"off"}"#,
        false,
    )
    .await;
    // Numbers may arrive as numeric strings.
    p.publish(
        &state(office),
        r#"{"target_temperature":"22","current_temperature":20.5,"current_humidity":45.4,"mode":"auto","action":"idle"}"#,
        false,
    )
    .await;

    let events = receiver
        .wait_event("the office setpoint 22.0", TIMEOUT, |e| {
            e.device == office && e.kind == "setpoint"
        })
        .await;
    assert_eq!(events.len(), 6, "events: {events:#?}");

    let a = of_device(&events, office);
    let t1 = observed_ms(a[0]);
    let mut s = DeviceState {
        mode: Some(Mode::Manual),
        setpoint: c(2150),
        load_state: Some(LoadState::Active),
        temperature: measured(2040, "C", t1),
        humidity: measured(4500, "%", t1),
        ..Default::default()
    };
    let mut w = vec![want(1, "snapshot", Value::Null, Value::Null, &s)];
    s.mode = Some(Mode::Automatic);
    s.load_state = Some(LoadState::Inactive);
    w.push(want(2, "mode", json!("MANUAL"), json!("AUTOMATIC"), &s));
    w.push(want(
        3,
        "load_state",
        json!("ACTIVE"),
        json!("INACTIVE"),
        &s,
    ));
    s.connectivity = Some(Connectivity::Offline);
    w.push(want(4, "connectivity", Value::Null, json!("OFFLINE"), &s));
    s.setpoint = c(2200);
    w.push(want(
        5,
        "setpoint",
        json!({"value": "21.5", "unit": "C"}),
        json!({"value": "22.0", "unit": "C"}),
        &s,
    ));
    assert_device_events(office, &a, &w);

    let b = of_device(&events, bedroom);
    let s = DeviceState {
        mode: Some(Mode::Off),
        setpoint: c(1900),
        load_state: Some(LoadState::Inactive),
        temperature: measured(1825, "C", observed_ms(b[0])),
        ..Default::default()
    };
    assert_device_events(
        bedroom,
        &b,
        &[want(1, "snapshot", Value::Null, Value::Null, &s)],
    );

    assert_envelopes(&events, t0, &HashMap::new());
    check_seq_gap_free(&events).unwrap();
    assert_requests_well_formed(&receiver);
    let src = daemon.source("esphome");
    assert_eq!(get(&src.received), 5);
    assert_eq!(get(&src.malformed), 0);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republishing_the_same_state_emits_nothing() {
    let sb = Sandbox::new("republish");
    let (_broker, receiver, tc, daemon, mut p) = z2m_setup(&sb, "").await;
    let topic = format!("{}/trv", tc.base_topic());
    for _ in 0..4 {
        p.publish(&topic, ts0601(21.0, "auto", "heat", 19.5), false)
            .await;
    }
    p.publish(&format!("{topic}/availability"), "online", false)
        .await;

    let events = receiver
        .wait_event("connectivity ONLINE", TIMEOUT, |e| e.kind == "connectivity")
        .await;
    let kinds: Vec<(u64, &str)> = events.iter().map(|e| (e.seq, e.kind.as_str())).collect();
    assert_eq!(kinds, [(1, "snapshot"), (2, "connectivity")]);
    assert_eq!(events[1].previous, Value::Null);
    assert_eq!(events[1].current, json!("ONLINE"));
    assert_eq!(get(&daemon.writer().observations), 5);
    assert_eq!(get(&daemon.writer().events), 2);
    assert_eq!(
        Db::open(&tc.db_path()).count("SELECT COUNT(*) FROM events"),
        2
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_emits_nothing_for_unchanged_state_and_continues_seq() {
    let sb = Sandbox::new("restart");
    let (broker, receiver, tc, daemon, mut p) = z2m_setup(&sb, "").await;
    let base = tc.base_topic();
    let trv = format!("{base}/trv");
    let rm = format!("{base}/rm");
    p.publish(&trv, ts0601(21.0, "auto", "heat", 19.5), false)
        .await;
    p.publish(&rm, bth_rm(25.0, "idle", 52.0), false).await;
    p.publish(&trv, ts0601(21.5, "auto", "heat", 19.5), false)
        .await;
    let before = receiver.wait_unique_events(3, TIMEOUT).await;
    daemon.stop().await.unwrap();

    // While the daemon is down the broker queues for its persistent session.
    p.publish(&trv, ts0601(21.5, "auto", "heat", 19.5), false)
        .await; // unchanged
    p.publish(&rm, bth_rm(24.5, "idle", 52.0), false).await; // cooling setpoint 25 -> 24.5

    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_connected(&tc.client_id("z2m"), 2, TIMEOUT)
        .await;
    p.publish(&trv, ts0601(21.5, "auto", "heat", 19.5), false)
        .await; // unchanged
    p.publish(&rm, bth_rm(24.5, "idle", 52.0), false).await; // unchanged
    p.publish(&format!("{trv}/availability"), "online", false)
        .await;

    let all = receiver
        .wait_event("the TRV connectivity event", TIMEOUT, |e| {
            e.device == "trv" && e.kind == "connectivity"
        })
        .await;
    check_duplicates_identical(&receiver.accepted_events()).unwrap();
    check_seq_gap_free(&all).unwrap();
    let old: HashSet<&str> = before.iter().map(|e| e.id.as_str()).collect();
    let new: Vec<(&str, u64, &str)> = all
        .iter()
        .filter(|e| !old.contains(e.id.as_str()))
        .map(|e| (e.device.as_str(), e.seq, e.kind.as_str()))
        .collect();
    assert_eq!(new, [("rm", 2, "setpoint"), ("trv", 3, "connectivity")]);
    let rm_change = all.iter().find(|e| e.device == "rm" && e.seq == 2).unwrap();
    assert_eq!(rm_change.previous, json!({"value": "25.0", "unit": "C"}));
    assert_eq!(rm_change.current, json!({"value": "24.5", "unit": "C"}));

    // The second run received the two queued messages and the three new ones, and emitted
    // events for the two real changes only.
    let src = daemon.source("z2m");
    assert_eq!(get(&src.received), 5);
    assert_eq!(get(&daemon.writer().events), 2);
    daemon.stop().await.unwrap();
    // The device cache checkpointed at stop continues from the same numbers.
    let db = Db::open(&tc.db_path());
    assert_eq!(db.count("SELECT seq FROM devices WHERE device = 'trv'"), 3);
    assert_eq!(db.count("SELECT seq FROM devices WHERE device = 'rm'"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_reconnects_after_a_broker_restart_and_resumes() {
    let sb = Sandbox::new("broker_restart");
    let mut broker = Mosquitto::start();
    let receiver = Receiver::start(vec![]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .source_set("z2m", "reconnect_min_ms", "100")
        .source_set("z2m", "reconnect_max_ms", "500")
        .http_sink("upstream", &receiver);
    let daemon = Daemon::start(tc.build()).await;
    let client = tc.client_id("z2m");
    broker.wait_subscribed(&client, 1, TIMEOUT).await;
    let topic = format!("{}/hall", tc.base_topic());
    let mut p = Publisher::connect(broker.port()).await;
    p.publish(&topic, r#"{"occupied_heating_setpoint":20}"#, false)
        .await;
    receiver.wait_unique_events(1, TIMEOUT).await;

    // The broker dies and comes back empty (no persistence): the source must reconnect on its
    // own, subscribe again (no session), and carry on with the next seq.
    broker.restart();
    let before = get(&daemon.source("z2m").connects);
    wait_until_async("the source reconnected", TIMEOUT, || {
        get(&daemon.source("z2m").connects) > before
    })
    .await;
    broker.wait_subscribed(&client, 1, TIMEOUT).await;
    let mut p = Publisher::connect(broker.port()).await;
    p.publish(&topic, r#"{"occupied_heating_setpoint":21}"#, false)
        .await;
    let events = receiver.wait_unique_events(2, TIMEOUT).await;
    assert_eq!((events[1].seq, events[1].kind.as_str()), (2, "setpoint"));
    assert_eq!(events[1].previous, json!({"value": "20.0", "unit": "C"}));
    assert_eq!(events[1].current, json!({"value": "21.0", "unit": "C"}));
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_goes_in_the_configured_header_or_query_parameter() {
    let sb = Sandbox::new("api_key");
    let broker = Mosquitto::start();
    let receiver = Receiver::start(vec![]).await;
    let key_file = sb.path().join("api-key");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key_file)
            .unwrap();
        std::io::Write::write_all(&mut f, b"k3y-value\n").unwrap();
    }
    let key_path = toml_str(&key_file.display().to_string());
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("by-header", &receiver)
        .sink_set(
            "by-header",
            "api_key_header",
            "\"Ocp-Apim-Subscription-Key\"",
        )
        .sink_set("by-header", "api_key_file", &key_path)
        .http_sink("by-query", &receiver)
        .sink_set("by-query", "api_key_query", "\"key\"")
        .sink_set("by-query", "api_key_file", &key_path);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    p.publish(
        &format!("{}/hall", tc.base_topic()),
        r#"{"occupied_heating_setpoint":20}"#,
        false,
    )
    .await;
    wait_until_async("both sinks delivered", TIMEOUT, || {
        receiver.requests().len() >= 2
    })
    .await;
    daemon.stop().await.unwrap();
    let requests = receiver.requests();
    let by_header = requests
        .iter()
        .find(|r| r.header("ocp-apim-subscription-key").is_some())
        .expect("a request with the key header");
    assert_eq!(
        by_header.header("ocp-apim-subscription-key"),
        Some("k3y-value")
    );
    assert!(!by_header.path.contains("k3y"), "{}", by_header.path);
    let by_query = requests
        .iter()
        .find(|r| r.path.contains("key="))
        .expect("a request with the key parameter");
    assert!(
        by_query.path.ends_with("?key=k3y-value"),
        "{}",
        by_query.path
    );
    assert_eq!(by_query.header("ocp-apim-subscription-key"), None);
    assert_eq!(receiver.bad_signatures(), 0);
}
