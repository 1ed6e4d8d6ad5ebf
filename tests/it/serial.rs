//! Serial sources end to end over real ptys (socat pairs): OTGW line traffic, JSON lines and a
//! real Modbus RTU slave (pymodbus) → in-process daemon → SQLite → signed HTTP receiver, with
//! exact event lists; port loss and re-creation at the same path; bad input.

use crate::harness::modbus::ModbusSlave;
use crate::harness::serial::PtyPair;
use crate::harness::*;
use hvac_edge::model::Event;
use serde_json::{Value, json};

/// (type, current) of a device's unique events, in order.
fn changes(events: &[Event], device: &str) -> Vec<(String, Value)> {
    events
        .iter()
        .filter(|e| e.device == device)
        .map(|e| (e.kind.clone(), e.current.clone()))
        .collect()
}

/// A Celsius temperature as the wire carries it (a decimal string).
fn c(v: &str) -> Value {
    json!({"value": v, "unit": "C"})
}

/// A measurement's current value without its time (measurements carry `time`).
fn strip_time(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("time");
    }
    v
}

fn normalized(events: &[Event], device: &str) -> Vec<(String, Value)> {
    changes(events, device)
        .into_iter()
        .map(|(k, v)| {
            if k == "snapshot" {
                (k, Value::Null)
            } else {
                (k, strip_time(v))
            }
        })
        .collect()
}

fn ev(kind: &str, v: Value) -> (String, Value) {
    (kind.to_string(), v)
}

/// Waits until `device` has exactly `want.len()` unique events; asserts they are `want`.
async fn expect_events(receiver: &Receiver, device: &str, want: &[(String, Value)]) -> Vec<Event> {
    let what = format!("{} events of {device}", want.len());
    wait_until_async(&what, TIMEOUT, || {
        normalized(&receiver.unique_events(), device).len() >= want.len()
    })
    .await;
    let events = receiver.unique_events();
    assert_eq!(normalized(&events, device), want, "events of {device}");
    check_seq_gap_free(&events).unwrap_or_else(|e| panic!("{e}"));
    events
}

fn counter(d: &Daemon, source: &str, name: &str) -> u64 {
    let kind = "-";
    d.source(source)
        .snapshot(source, kind)
        .counters
        .get(name)
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otgw_stream_with_noise_silence_and_unplug_yields_exact_changes() {
    let sb = Sandbox::new("otgw_stream");
    let mut pty = PtyPair::start(sb.path(), "otgw");
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.http_sink("upstream", &receiver).raw(&format!(
        "[[sources.otgw]]\nname = \"boiler\"\nport = {}\nsilence_timeout_secs = 6\nsetup_commands = [\"PS=0\"]\nreconnect_min_ms = 100\nreconnect_max_ms = 300\n",
        toml_str(&pty.device_path().display().to_string())
    ));
    let daemon = Daemon::start(tc.build()).await;
    let mut end = pty.open_test_end();
    // The configured setup command arrives, CR-terminated, once the port is open.
    let got = tokio::task::block_in_place(|| end.read_until(b"PS=0\r", TIMEOUT));
    assert!(got.ends_with(b"PS=0\r"), "{got:?}");

    // A recorded-style stream: a partial frame and stray bytes before an EOT, the protocols.md
    // §8 sequence split at odd places, noise, an over-long line, invalid hex, a parity error.
    let mut stream: Vec<u8> = Vec::new();
    stream.extend_from_slice(b"13FB\r\nignorethis\x04T00000300\r\n");
    stream.extend_from_slice(b"BC000030A\r\nT90012D80\r\nB50012D80\r\nT90101480\r\nB50101480\r\n");
    stream.extend_from_slice(b"T901813FB\r\nB501813FB\r\nT00110000\r\nBC0112580\r\n");
    stream.extend_from_slice(b"\x00\xff\x13\x80garbage\r\n");
    stream.extend_from_slice(&[b'A'; 700]);
    stream.extend_from_slice(
        b"\r\nError 01\r\nError 04\r\nE901813FA\r\nTT: 21.50\r\nT9xyz0000\r\nT901813FA\r\n",
    );
    stream.extend_from_slice(b"T00090000\r\nBF0090000\r\nAC0091580\r\n");
    stream.extend_from_slice(b"T80640000\r\nB70640000\r\nA40640303\r\n");
    stream.extend_from_slice(b"T10101580\r\nBC0000300\r\n");
    for chunk in stream.chunks(7) {
        end.write_all(chunk);
    }
    let want = vec![
        ev("snapshot", Value::Null),
        ev("setpoint", c("20.5")),
        ev("temperature", c("19.98")),
        ev("mode", json!("MANUAL")),
        ev("setpoint", c("21.5")),
        ev("load_state", json!("INACTIVE")),
    ];
    let events = expect_events(&receiver, "otgw", &want).await;
    let snap = &events[0].state;
    assert_eq!(
        (snap.load_state, snap.function, snap.connectivity),
        (
            Some(hvac_edge::model::LoadState::Active),
            Some(hvac_edge::model::Function::Heating),
            Some(hvac_edge::model::Connectivity::Online)
        )
    );
    // Everything that was not a frame was counted by kind.
    let st = daemon.source("boiler").snapshot("boiler", "otgw");
    let n = |k: &str| st.counters.get(k).copied().unwrap_or(0);
    assert_eq!(
        (
            n("bus_errors"),
            n("rejected_frames"),
            n("responses"),
            n("too_long"),
            n("parity_errors")
        ),
        (2, 1, 1, 1, 1),
        "{:?}",
        st.counters
    );
    assert!(
        n("noise") >= 3,
        "partial frame, garbage, bad hex: {:?}",
        st.counters
    );
    assert_eq!(
        st.values.get("control_setpoint").map(String::as_str),
        Some("45.5")
    );
    assert_eq!(
        st.values.get("relative_modulation").map(String::as_str),
        Some("37.5")
    );

    // Silence for longer than silence_timeout_secs → OFFLINE; a valid frame → ONLINE.
    let mut want = want;
    want.push(ev("connectivity", json!("OFFLINE")));
    expect_events(&receiver, "otgw", &want).await;
    end.write_all(b"T901813FB\r\n");
    want.push(ev("connectivity", json!("ONLINE")));
    expect_events(&receiver, "otgw", &want).await;

    // Unplug: the pty goes away → OFFLINE; re-created at the same path → the source reopens it
    // (the setup command is sent again) and the next frames decode, without a daemon restart.
    drop(end);
    tokio::task::block_in_place(|| pty.unplug());
    want.push(ev("connectivity", json!("OFFLINE")));
    expect_events(&receiver, "otgw", &want).await;
    // This OFFLINE is the port loss (not silence): the link is down, with the reason.
    let st = daemon.source("boiler").snapshot("boiler", "otgw");
    assert_eq!(st.link, hvac_edge::sources::Link::Disconnected);
    let err = st.last_error.unwrap_or_default();
    assert!(
        err.contains("end of file") || err.contains("does not exist"),
        "{err}"
    );
    tokio::task::block_in_place(|| pty.replug());
    let mut end = pty.open_test_end();
    let got = tokio::task::block_in_place(|| end.read_until(b"PS=0\r", TIMEOUT));
    assert!(got.ends_with(b"PS=0\r"), "{got:?}");
    end.write_all(b"T90101600\r\n");
    want.push(ev("setpoint", c("22.0")));
    want.push(ev("connectivity", json!("ONLINE")));
    expect_events(&receiver, "otgw", &want).await;
    assert!(counter(&daemon, "boiler", "connects") >= 2);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_serial_port_does_not_stop_the_other_sources() {
    let sb = Sandbox::new("missing_port");
    let receiver = Receiver::start([]).await;
    let pty = PtyPair::start(sb.path(), "fw");
    let mut tc = TestConfig::new(&sb);
    let missing = sb.path().join("no-such-tty");
    tc.http_sink("upstream", &receiver).raw(&format!(
        "[[sources.otgw]]\nname = \"boiler\"\nport = {}\n\n[[sources.jsonl]]\nname = \"fw\"\nport = {}\n[sources.jsonl.mapping]\ndevice = \"/id\"\n[sources.jsonl.mapping.fields]\nsetpoint = \"/sp\"\n",
        toml_str(&missing.display().to_string()),
        toml_str(&pty.device_path().display().to_string())
    ));
    let daemon = Daemon::start(tc.build()).await;
    let mut end = pty.open_test_end();
    end.write_all(b"{\"id\":\"room-1\",\"sp\":20.5}\n");
    expect_events(&receiver, "room-1", &[ev("snapshot", Value::Null)]).await;
    let st = daemon.source("boiler").snapshot("boiler", "otgw");
    assert_eq!(st.link, hvac_edge::sources::Link::Disconnected);
    let err = st.last_error.unwrap_or_default();
    assert!(
        err.contains(&format!("{} does not exist", missing.display())),
        "{err}"
    );
    // The technician's view: `hvac-edge sources` (another process, read-only) shows both.
    let db = tc.db_path().display().to_string();
    let mut out = String::new();
    wait_until_async(
        "`hvac-edge sources` shows the missing port",
        TIMEOUT,
        || {
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
                .args(["sources", "--db", &db])
                .output()
                .expect("run hvac-edge sources");
            out = String::from_utf8_lossy(&o.stdout).into_owned();
            out.contains("does not exist") && out.contains("received 1")
        },
    )
    .await;
    assert!(out.contains("boiler (otgw) on "), "{out}");
    assert!(out.contains(": disconnected for "), "{out}");
    assert!(out.contains("fw (jsonl) on "), "{out}");
    assert!(out.contains(": connected for "), "{out}");
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_map_like_mqtt_and_survive_bad_input() {
    let sb = Sandbox::new("jsonl");
    let pty = PtyPair::start(sb.path(), "fw");
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.http_sink("upstream", &receiver).raw(&format!(
        "[[sources.jsonl]]\nname = \"fw\"\nport = {}\nmax_line_bytes = 256\n[sources.jsonl.mapping]\ndevice = \"/id\"\n[sources.jsonl.mapping.fields]\nsetpoint = \"/sp\"\ntemperature = \"/t\"\nmode = \"/mode\"\nload_state = \"/relay\"\n[sources.jsonl.mapping.values.mode]\nauto = \"AUTOMATIC\"\nheat = \"MANUAL\"\n",
        toml_str(&pty.device_path().display().to_string())
    ));
    let daemon = Daemon::start(tc.build()).await;
    let mut end = pty.open_test_end();
    let mut bytes: Vec<u8> = Vec::new();
    bytes.extend_from_slice(
        b"{\"id\":\"a\",\"sp\":20.5,\"t\":19.5,\"mode\":\"auto\",\"relay\":false}\n",
    );
    // Bad input: random bytes, a half object, not an object, an unknown mode, an over-long
    // line, no device, a wrong type; then valid lines again, split across writes.
    bytes.extend_from_slice(b"\x00\x01\xfe\xff\r\n{\"id\":\"a\",\"sp\":\n[1,2,3]\n");
    bytes.extend_from_slice(b"{\"id\":\"a\",\"mode\":\"party\"}\n");
    bytes.extend_from_slice(&[b'x'; 1000]);
    bytes.extend_from_slice(b"\n{\"sp\":21}\n{\"id\":\"a\",\"sp\":\"warm\"}\n");
    bytes.extend_from_slice(
        b"{\"id\":\"a\",\"sp\":21.0,\"mode\":\"heat\"}\n{\"id\":\"b\",\"t\":18.25}\r\n",
    );
    bytes.extend_from_slice(b"{\"id\":\"a\",\"relay\":true,\"t\":19.5}\n");
    for chunk in bytes.chunks(13) {
        end.write_all(chunk);
    }
    expect_events(
        &receiver,
        "a",
        &[
            ev("snapshot", Value::Null),
            ev("mode", json!("MANUAL")),
            ev("setpoint", c("21.0")),
            ev("load_state", json!("ACTIVE")),
        ],
    )
    .await;
    expect_events(&receiver, "b", &[ev("snapshot", Value::Null)]).await;
    let st = daemon.source("fw").snapshot("fw", "jsonl");
    let n = |k: &str| st.counters.get(k).copied().unwrap_or(0);
    assert_eq!((n("malformed"), n("too_long")), (7, 1), "{:?}", st.counters);
    assert_eq!(n("observations"), 4);
    daemon.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_units_report_changes_go_offline_and_come_back() {
    let sb = Sandbox::new("modbus");
    let pty = PtyPair::start(sb.path(), "rs485");
    let mut slave = ModbusSlave::start(&pty.test_path(), &[1, 2]);
    // Unit 1: an RDF302 in heating, Comfort, 21.50 °C room, 22.00 °C setpoint, output 0.
    slave.set(1, "hr", 106, &[1]);
    slave.set(1, "ir", 1000, &[1]);
    slave.set(1, "ir", 1002, &[1075, 1100, 0, 0]);
    // Unit 2: a BHT-006: 19.8 °C, program mode, heating, setpoint 20.0.
    slave.set(2, "hr", 1, &[198, 0, 1, 200]);
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.http_sink("upstream", &receiver).raw(&format!(
        "[[sources.modbus]]\nname = \"fcu\"\nport = {}\npoll_interval_ms = 200\nrequest_timeout_ms = 800\noffline_after_failed_polls = 2\nreconnect_min_ms = 100\nreconnect_max_ms = 300\n[[sources.modbus.units]]\nunit_id = 1\ndevice = \"office\"\nmap = \"siemens-rdf302\"\n[[sources.modbus.units]]\nunit_id = 2\ndevice = \"floor\"\nmap = \"beca-bht-006\"\n",
        toml_str(&pty.device_path().display().to_string())
    ));
    let daemon = Daemon::start(tc.build()).await;
    let events = expect_events(&receiver, "office", &[ev("snapshot", Value::Null)]).await;
    let s = &events
        .iter()
        .find(|e| e.device == "office")
        .expect("office")
        .state;
    assert_eq!(
        serde_json::to_value(s).expect("state json")["setpoint"],
        c("22.0")
    );
    expect_events(&receiver, "floor", &[ev("snapshot", Value::Null)]).await;

    // A change on the slave appears as an event: setpoint 23.00 (×50 = 1150), heating output.
    slave.set(1, "ir", 1003, &[1150, 30]);
    let mut office = vec![
        ev("snapshot", Value::Null),
        ev("setpoint", c("23.0")),
        ev("load_state", json!("ACTIVE")),
    ];
    expect_events(&receiver, "office", &office).await;

    // Unit 2 stops answering → OFFLINE after 2 failed polls; unit 1 keeps reporting.
    slave.mute(2);
    let mut floor = vec![
        ev("snapshot", Value::Null),
        ev("connectivity", json!("OFFLINE")),
    ];
    expect_events(&receiver, "floor", &floor).await;
    slave.set(1, "ir", 1000, &[4]);
    office.push(ev("mode", json!("PROTECTION")));
    expect_events(&receiver, "office", &office).await;
    slave.unmute(2);
    floor.push(ev("connectivity", json!("ONLINE")));
    expect_events(&receiver, "floor", &floor).await;

    // Corrupted answers are counted as CRC errors for that unit and do not change state.
    slave.crc(1, 1);
    wait_until_async("a CRC error counted for unit 1", TIMEOUT, || {
        let st = daemon.source("fcu").snapshot("fcu", "modbus");
        st.units.first().is_some_and(|u| u.crc_errors >= 1)
    })
    .await;
    let st = daemon.source("fcu").snapshot("fcu", "modbus");
    assert!(st.units[1].timeouts >= 2, "{:?}", st.units[1]);
    assert_eq!(st.units[0].device, "office");
    assert!(st.units[0].online);
    slave.set(1, "ir", 1002, &[1100]);
    office.push(ev("temperature", c("22.0")));
    expect_events(&receiver, "office", &office).await;
    daemon.stop().await.expect("clean stop");
}
