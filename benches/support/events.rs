//! Event envelopes shaped like the ones the writer stores and the sink sends, and z2m payloads.

use hvac_edge::model::{
    ClockState, Connectivity, DeviceState, Event, Fixed, Function, LoadState, Measurement, Mode,
    TempUnit, Temperature, format_rfc3339_ms,
};

/// Gateway id used everywhere in the bench.
pub const GATEWAY: &str = "gw-bench";
/// Devices of the simulated fleet.
pub const DEVICES: usize = 1000;

/// Device id `dev-NNNN` (also the z2m friendly name).
pub fn device_id(i: usize) -> String {
    format!("dev-{i:04}")
}

/// A setpoint-change event of device `dev` (per-device `seq`), as the writer would build it.
pub fn setpoint_event(dev: usize, seq: u64, at_ms: i64) -> Event {
    let from = Fixed(2100 + 50 * (seq as i64 % 2));
    let to = Fixed(2150 - 50 * (seq as i64 % 2));
    let temp = |v: Fixed| serde_json::json!({"value": v.to_string(), "unit": "C"});
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        seq,
        kind: "setpoint".into(),
        gateway: GATEWAY.into(),
        plant: None,
        device: device_id(dev),
        module: None,
        observed_at: format_rfc3339_ms(at_ms),
        clock: ClockState::Synced,
        previous: temp(from),
        current: temp(to),
        state: DeviceState {
            function: Some(Function::Heating),
            mode: Some(Mode::Manual),
            setpoint: Some(Temperature {
                value: to,
                unit: TempUnit::C,
            }),
            program: Some(1),
            activation_time: None,
            load_state: Some(LoadState::Inactive),
            temperature: Some(Measurement {
                value: Fixed(2050),
                unit: "C".into(),
                time: at_ms,
            }),
            humidity: Some(Measurement {
                value: Fixed(4500),
                unit: "%".into(),
                time: at_ms,
            }),
            connectivity: Some(Connectivity::Online),
        },
    }
}

/// `{"gateway": …, "events": [...]}` from serialized envelopes, like the HTTP sink builds it.
pub fn batch_body(payloads: &[String]) -> Vec<u8> {
    let len: usize = payloads.iter().map(|p| p.len() + 1).sum::<usize>() + 64;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(b"{\"gateway\":\"");
    b.extend_from_slice(GATEWAY.as_bytes());
    b.extend_from_slice(b"\",\"events\":[");
    for (i, p) in payloads.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(b"]}");
    b
}

/// A Zigbee2MQTT thermostat state message with the given setpoint (hundredths of °C).
pub fn z2m_payload(setpoint: i64) -> Vec<u8> {
    format!(
        "{{\"local_temperature\":20.5,\"occupied_heating_setpoint\":{},\"system_mode\":\"heat\",\"running_state\":\"idle\"}}",
        Fixed(setpoint)
    )
    .into_bytes()
}

/// The fleet's setpoints, so that "no change" messages repeat the current state exactly.
pub struct Fleet {
    base: String,
    setpoints: Vec<i64>,
}

impl Fleet {
    /// 1000 devices at 21.0 °C under topic prefix `base`.
    pub fn new(base: &str) -> Fleet {
        Fleet {
            base: base.to_string(),
            setpoints: vec![2100; DEVICES],
        }
    }

    /// The current state message of device `dev`, after changing its setpoint by 0.5 when `change`.
    pub fn message(&mut self, dev: usize, change: bool) -> (String, Vec<u8>) {
        let d = dev % DEVICES;
        if change {
            self.setpoints[d] = if self.setpoints[d] == 2100 {
                2150
            } else {
                2100
            };
        }
        (
            format!("{}/{}", self.base, device_id(d)),
            z2m_payload(self.setpoints[d]),
        )
    }

    /// `n` messages round-robin over the fleet; a share `change_pct` of them (spread evenly)
    /// changes the setpoint, the rest repeat the current state.
    pub fn workload(&mut self, n: usize, change_pct: usize) -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                let change = (i * change_pct) / 100 != ((i + 1) * change_pct) / 100;
                self.message(i, change)
            })
            .collect()
    }
}
