//! The Smarther C2C webhook body (`format = "smarther_c2c"`): each event as a chronothermostat
//! of Legrand's Smarther v2 notifications (shared/design/protocols.md §4.3, §4.4), so a receiver
//! built for Legrand's cloud can read the gateway's thermostats.
//!
//! The body is `{"data":{"chronothermostats":[…]}}`, one chronothermostat per event, built from
//! the event's full `state`: a receiver that only keeps the latest notification still has every
//! field. Unknown values are left out, never `null`, as the vendor's payloads do.

use crate::model::{Event, Measurement, Mode, TempUnit, format_rfc3339_ms, parse_rfc3339_ms};
use serde_json::{Map, Value, json};

/// One event as a Smarther chronothermostat object. `receiver_oids` become `receiver.oid`
/// (left out when empty).
pub fn chronothermostat(event: &Event, receiver_oids: &[String]) -> Value {
    let s = &event.state;
    let mut o = Map::new();
    if let Some(f) = s.function {
        o.insert("function".into(), json!(f.as_str()));
    }
    if let Some(m) = s.mode {
        o.insert("mode".into(), json!(m.as_str()));
    }
    // A boost runs the load flat out for a while; Smarther sends no setpoint with it.
    if let Some(sp) = s.setpoint.filter(|_| s.mode != Some(Mode::Boost)) {
        o.insert(
            "setPoint".into(),
            json!({"value": sp.value.to_string(), "unit": sp.unit.as_str()}),
        );
    }
    // Only the automatic mode follows a program; a remembered one would mislead otherwise.
    if let Some(p) = s.program.filter(|_| s.mode == Some(Mode::Automatic)) {
        // A string, as in Legrand's example; openHAB reads it as an int either way.
        o.insert("programs".into(), json!([{"number": p.to_string()}]));
    }
    // The end of a manual or boost override; a remembered one would be stale in other modes.
    if let Some(t) = s
        .activation_time
        .filter(|_| matches!(s.mode, Some(Mode::Manual | Mode::Boost)))
    {
        o.insert("activationTime".into(), json!(rfc3339_secs(t)));
    }
    o.insert(
        "temperatureFormat".into(),
        json!(temperature_format(event).as_str()),
    );
    if let Some(l) = s.load_state {
        o.insert("loadState".into(), json!(l.as_str()));
    }
    // `observed_at` is always RFC 3339 (the writer formats it); if not, there is no time to send.
    if let Some(t) = parse_rfc3339_ms(&event.observed_at) {
        o.insert("time".into(), json!(rfc3339_secs(t)));
    }
    if let Some(m) = &s.temperature {
        o.insert("thermometer".into(), sensor(m, &m.unit));
    }
    if let Some(m) = &s.humidity {
        o.insert("hygrometer".into(), sensor(m, "%"));
    }
    // Receivers route by plant and module id; a device without them still needs stable ids.
    let plant = event.plant.as_deref().unwrap_or(&event.gateway);
    let module = event.module.as_deref().unwrap_or(&event.device);
    o.insert(
        "sender".into(),
        json!({
            "addressType": "AddressLocation",
            "system": "thermoregulation",
            "plant": {"id": plant, "module": {"id": module}},
        }),
    );
    if !receiver_oids.is_empty() {
        o.insert("receiver".into(), json!({"oid": receiver_oids}));
    }
    Value::Object(o)
}

/// The request body for a batch: `{"data":{"chronothermostats":[…]}}`, in event order. Keys are
/// sorted, so a retry of the same events sends the same bytes.
pub fn body(events: &[Event], receiver_oids: &[String]) -> Vec<u8> {
    let list: Vec<Value> = events
        .iter()
        .map(|e| chronothermostat(e, receiver_oids))
        .collect();
    json!({"data": {"chronothermostats": list}})
        .to_string()
        .into_bytes()
}

/// The unit the thermostat displays: the setpoint's, else the measured temperature's, else `C`.
fn temperature_format(event: &Event) -> TempUnit {
    let s = &event.state;
    s.setpoint
        .map(|t| t.unit)
        .or_else(|| {
            s.temperature
                .as_ref()
                .and_then(|m| TempUnit::parse(&m.unit))
        })
        .unwrap_or(TempUnit::C)
}

/// A `thermometer` / `hygrometer` object holding one measure.
fn sensor(m: &Measurement, unit: &str) -> Value {
    json!({"measures": [{
        "timeStamp": rfc3339_secs(m.time),
        "value": m.value.to_string(),
        "unit": unit,
    }]})
}

/// `2025-01-15T10:30:00Z`: Legrand's times carry no fraction (cut, not rounded).
fn rfc3339_secs(ms: i64) -> String {
    let mut s = format_rfc3339_ms(ms);
    // Drop `.mmmZ`, put the `Z` back.
    s.truncate(s.len().saturating_sub(5));
    s.push('Z');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        ClockState, Connectivity, DeviceState, Fixed, Function, LoadState, Temperature,
    };

    const OID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

    fn ms(s: &str) -> i64 {
        parse_rfc3339_ms(s).unwrap()
    }

    fn event(device: &str, plant: Option<&str>, module: Option<&str>, at: &str) -> Event {
        Event {
            id: "01947e3a-5c00-7000-8000-000000000001".into(),
            seq: 12,
            kind: "setpoint".into(),
            gateway: "gw-0042".into(),
            plant: plant.map(str::to_owned),
            device: device.into(),
            module: module.map(str::to_owned),
            observed_at: at.into(),
            clock: ClockState::Synced,
            previous: json!({"value": "20.0", "unit": "C"}),
            current: json!({"value": "21.5", "unit": "C"}),
            state: DeviceState::default(),
        }
    }

    /// The living room of the fixture: everything known, manual until 10:30.
    fn living_room() -> Event {
        let mut e = event(
            "living-room",
            Some("b5e48d6f-cbad-2711-e053-27182d0ad74c"),
            Some("0c4f2a1e-7d3b-4e5a-9f61-2b8c3d4e5f60"),
            "2025-01-15T08:30:00.481Z",
        );
        e.state = DeviceState {
            function: Some(Function::Heating),
            mode: Some(Mode::Manual),
            setpoint: Some(Temperature {
                value: Fixed(2150),
                unit: TempUnit::C,
            }),
            program: Some(1),
            activation_time: Some(ms("2025-01-15T10:30:00.000Z")),
            load_state: Some(LoadState::Active),
            temperature: Some(Measurement {
                value: Fixed(1980),
                unit: "C".into(),
                time: ms("2025-01-15T08:29:55.912Z"),
            }),
            humidity: Some(Measurement {
                value: Fixed(4700),
                unit: "%".into(),
                time: ms("2025-01-15T08:29:55.120Z"),
            }),
            connectivity: Some(Connectivity::Online),
        };
        e
    }

    /// The bedroom of the fixture: no plant nor module configured, cooling in °F on a program.
    fn bedroom() -> Event {
        let mut e = event("bedroom", None, None, "2025-01-15T08:31:12.007Z");
        e.kind = "mode".into();
        e.state = DeviceState {
            function: Some(Function::Cooling),
            mode: Some(Mode::Automatic),
            setpoint: Some(Temperature {
                value: Fixed(7550),
                unit: TempUnit::F,
            }),
            program: Some(3),
            load_state: Some(LoadState::Inactive),
            temperature: Some(Measurement {
                value: Fixed(7725),
                unit: "F".into(),
                time: ms("2025-01-15T08:31:11.999Z"),
            }),
            ..Default::default()
        };
        e
    }

    fn with_state(state: DeviceState) -> Value {
        let mut e = living_room();
        e.state = state;
        chronothermostat(&e, &[])
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn body_matches_the_fixture_field_by_field() {
        let want: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/smarther_c2c.json")).unwrap();
        let got: Value =
            serde_json::from_slice(&body(&[living_room(), bedroom()], &[OID.to_owned()])).unwrap();
        assert_eq!(keys(&got), ["data"]);
        assert_eq!(keys(&got["data"]), ["chronothermostats"]);
        let want = want["data"]["chronothermostats"].as_array().unwrap();
        let got = got["data"]["chronothermostats"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let mut names = keys(w);
            names.extend(keys(g));
            names.sort_unstable();
            names.dedup();
            for k in names {
                assert_eq!(g.get(k), w.get(k), "chronothermostat {i}, field {k}");
            }
        }
    }

    #[test]
    fn body_is_exactly_data_chronothermostats_one_per_event() {
        assert_eq!(body(&[], &[]), br#"{"data":{"chronothermostats":[]}}"#);
        let e = event("d", Some("p"), Some("m"), "2025-01-15T08:30:00.481Z");
        assert_eq!(
            String::from_utf8(body(&[e.clone(), e], &[])).unwrap(),
            concat!(
                r#"{"data":{"chronothermostats":["#,
                r#"{"sender":{"addressType":"AddressLocation","plant":{"id":"p","module":{"id":"m"}},"system":"thermoregulation"},"temperatureFormat":"C","time":"2025-01-15T08:30:00Z"},"#,
                r#"{"sender":{"addressType":"AddressLocation","plant":{"id":"p","module":{"id":"m"}},"system":"thermoregulation"},"temperatureFormat":"C","time":"2025-01-15T08:30:00Z"}"#,
                "]}}"
            )
        );
    }

    #[test]
    fn boost_has_no_set_point() {
        let mut e = living_room();
        e.state.mode = Some(Mode::Boost);
        let c = chronothermostat(&e, &[]);
        assert_eq!(c["mode"], "BOOST");
        assert!(c.get("setPoint").is_none());
        assert!(c.get("programs").is_none());
        assert_eq!(c["activationTime"], "2025-01-15T10:30:00Z");
        assert_eq!(c["temperatureFormat"], "C", "still the setpoint's unit");
    }

    #[test]
    fn activation_time_only_with_a_manual_or_boost_override() {
        let mut e = living_room();
        e.state.mode = Some(Mode::Automatic);
        assert!(chronothermostat(&e, &[]).get("activationTime").is_none());
        e.state.mode = Some(Mode::Manual);
        assert_eq!(
            chronothermostat(&e, &[])["activationTime"],
            "2025-01-15T10:30:00Z"
        );
    }

    #[test]
    fn manual_has_no_programs() {
        let c = chronothermostat(&living_room(), &[]);
        assert_eq!(c["mode"], "MANUAL");
        assert!(c.get("programs").is_none());
        assert_eq!(c["setPoint"], json!({"value": "21.5", "unit": "C"}));
    }

    #[test]
    fn automatic_has_programs_with_the_number_as_a_string() {
        let mut e = living_room();
        e.state.mode = Some(Mode::Automatic);
        e.state.program = Some(0);
        assert_eq!(
            chronothermostat(&e, &[])["programs"],
            json!([{"number": "0"}])
        );
        e.state.program = None;
        assert!(chronothermostat(&e, &[]).get("programs").is_none());
    }

    #[test]
    fn off_and_protection_keep_a_known_set_point() {
        for mode in [Mode::Off, Mode::Protection] {
            let mut e = living_room();
            e.state.mode = Some(mode);
            let c = chronothermostat(&e, &[]);
            assert_eq!(c["setPoint"]["value"], "21.5", "{mode}");
            assert!(c.get("programs").is_none(), "{mode}");
        }
    }

    #[test]
    fn missing_temperature_omits_thermometer() {
        let mut e = living_room();
        e.state.temperature = None;
        let c = chronothermostat(&e, &[]);
        assert!(c.get("thermometer").is_none());
        assert_eq!(
            c["hygrometer"],
            json!({"measures": [{"timeStamp": "2025-01-15T08:29:55Z", "value": "47.0", "unit": "%"}]})
        );
        e.state.humidity = None;
        assert!(chronothermostat(&e, &[]).get("hygrometer").is_none());
    }

    #[test]
    fn unknown_fields_are_omitted_never_null() {
        let c = with_state(DeviceState::default());
        assert_eq!(keys(&c), ["sender", "temperatureFormat", "time"]);
        assert_eq!(c["temperatureFormat"], "C");
        // Connectivity has no Smarther field; it never shows.
        let c = with_state(DeviceState {
            connectivity: Some(Connectivity::Offline),
            load_state: Some(LoadState::Inactive),
            ..Default::default()
        });
        assert_eq!(
            keys(&c),
            ["loadState", "sender", "temperatureFormat", "time"]
        );
        assert!(!c.to_string().contains("null"));
    }

    #[test]
    fn receiver_omitted_when_empty() {
        assert!(
            chronothermostat(&living_room(), &[])
                .get("receiver")
                .is_none()
        );
        let oids = [OID.to_owned(), "second".to_owned()];
        assert_eq!(
            chronothermostat(&living_room(), &oids)["receiver"],
            json!({"oid": [OID, "second"]})
        );
    }

    #[test]
    fn sender_falls_back_to_the_device_and_the_gateway_ids() {
        let plant_only = event("hall", Some("plant-1"), None, "2025-01-15T08:30:00.000Z");
        assert_eq!(
            chronothermostat(&plant_only, &[])["sender"]["plant"],
            json!({"id": "plant-1", "module": {"id": "hall"}})
        );
        let module_only = event("hall", None, Some("mod-1"), "2025-01-15T08:30:00.000Z");
        assert_eq!(
            chronothermostat(&module_only, &[])["sender"]["plant"],
            json!({"id": "gw-0042", "module": {"id": "mod-1"}})
        );
    }

    #[test]
    fn temperature_format_follows_the_setpoint_then_the_temperature() {
        let f = |unit: &str| Measurement {
            value: Fixed(7000),
            unit: unit.into(),
            time: 0,
        };
        let c = with_state(DeviceState {
            temperature: Some(f("F")),
            ..Default::default()
        });
        assert_eq!(c["temperatureFormat"], "F");
        assert_eq!(c["thermometer"]["measures"][0]["unit"], "F");
        let c = with_state(DeviceState {
            setpoint: Some(Temperature {
                value: Fixed(2000),
                unit: TempUnit::C,
            }),
            temperature: Some(f("F")),
            ..Default::default()
        });
        assert_eq!(c["temperatureFormat"], "C");
    }

    #[test]
    fn times_are_cut_to_whole_seconds() {
        assert_eq!(
            rfc3339_secs(ms("2025-01-15T08:29:59.999Z")),
            "2025-01-15T08:29:59Z"
        );
        assert_eq!(rfc3339_secs(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_secs(-1), "1969-12-31T23:59:59Z");
        // An unparsable observed_at leaves `time` out rather than sending something wrong.
        let e = event("d", None, None, "yesterday");
        assert!(chronothermostat(&e, &[]).get("time").is_none());
    }
}
