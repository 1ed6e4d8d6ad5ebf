//! Canonical thermostat model: device state, observations, changes and the event envelope.
//!
//! Owns the vocabulary every other module speaks. Values that are compared are fixed-point
//! ([`Fixed`], hundredths), never floats; a temperature always carries its unit.
//! Must not know SQLite, MQTT, HTTP, tokio or the clock (callers pass times in).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Milliseconds since the Unix epoch, on the gateway clock.
pub type UnixMs = i64;

/// A fixed-point decimal in hundredths (`2150` is `21.50`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Fixed(pub i64);

impl Fixed {
    /// Largest magnitude accepted from a device (1e9); anything larger is not a thermostat value.
    pub const LIMIT: f64 = 1.0e9;

    /// Rounds a finite float to hundredths; `None` for NaN, infinities and absurd magnitudes.
    pub fn from_f64(v: f64) -> Option<Fixed> {
        if !v.is_finite() || v.abs() > Self::LIMIT {
            return None;
        }
        Some(Fixed((v * 100.0).round() as i64))
    }

    /// Parses a decimal string such as `"21"`, `"-0.5"` or `"20.37"` (at most 2 decimals kept, rounded).
    pub fn parse(s: &str) -> Option<Fixed> {
        let s = s.trim();
        if s.is_empty() || s.len() > 24 {
            return None;
        }
        let v: f64 = s.parse().ok()?;
        Self::from_f64(v)
    }

    /// Absolute difference in hundredths.
    pub fn abs_diff(self, other: Fixed) -> u64 {
        self.0.abs_diff(other.0)
    }
}

impl fmt::Display for Fixed {
    /// Shortest decimal with at least one fractional digit: `21.0`, `20.5`, `20.37`, `-0.5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let a = self.0.unsigned_abs();
        let (int, frac) = (a / 100, a % 100);
        if frac % 10 == 0 {
            write!(f, "{sign}{int}.{}", frac / 10)
        } else {
            write!(f, "{sign}{int}.{frac:02}")
        }
    }
}

impl Serialize for Fixed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fixed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Fixed::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("invalid decimal {s:?}")))
    }
}

macro_rules! closed_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The canonical upper-case name used on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            /// Parses the canonical name (case-insensitive).
            pub fn parse(s: &str) -> Option<$name> {
                $(if s.eq_ignore_ascii_case($text) { return Some($name::$variant); })+
                None
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

closed_enum!(
    /// Whether the plant heats or cools.
    Function { Heating => "HEATING", Cooling => "COOLING" }
);
closed_enum!(
    /// Chronothermostat operating mode (the Smarther model's set).
    Mode { Automatic => "AUTOMATIC", Manual => "MANUAL", Boost => "BOOST", Off => "OFF", Protection => "PROTECTION" }
);
closed_enum!(
    /// Whether the heating/cooling load is running.
    LoadState { Active => "ACTIVE", Inactive => "INACTIVE" }
);
closed_enum!(
    /// Whether the device is reachable.
    Connectivity { Online => "ONLINE", Offline => "OFFLINE" }
);
closed_enum!(
    /// Temperature unit; nothing is ever converted silently.
    TempUnit { C => "C", F => "F" }
);

/// A temperature value with its unit (setpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Temperature {
    pub value: Fixed,
    pub unit: TempUnit,
}

/// A measured value with its unit and the time it was taken (for the minimum-interval rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurement {
    pub value: Fixed,
    /// `"C"`, `"F"` or `"%"`.
    pub unit: String,
    /// When this value was observed (RFC 3339 on the wire, ms internally).
    #[serde(with = "rfc3339_ms")]
    pub time: UnixMs,
}

/// The canonical fields, in the fixed order changes are emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Function,
    Mode,
    Setpoint,
    Program,
    ActivationTime,
    LoadState,
    Temperature,
    Humidity,
    Connectivity,
}

impl Field {
    /// Every field in emission order.
    pub const ALL: [Field; 9] = [
        Field::Function,
        Field::Mode,
        Field::Setpoint,
        Field::Program,
        Field::ActivationTime,
        Field::LoadState,
        Field::Temperature,
        Field::Humidity,
        Field::Connectivity,
    ];

    /// The change type / JSON key for this field.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Function => "function",
            Field::Mode => "mode",
            Field::Setpoint => "setpoint",
            Field::Program => "program",
            Field::ActivationTime => "activation_time",
            Field::LoadState => "load_state",
            Field::Temperature => "temperature",
            Field::Humidity => "humidity",
            Field::Connectivity => "connectivity",
        }
    }

    /// Parses a field name as used in config mappings.
    pub fn parse(s: &str) -> Option<Field> {
        Field::ALL.iter().copied().find(|f| f.as_str() == s)
    }

    /// Measurements are subject to deadbands and minimum intervals, and are evictable when superseded.
    pub fn is_measurement(self) -> bool {
        matches!(self, Field::Temperature | Field::Humidity)
    }
}

/// Every `type` an event can have: the fields, `snapshot`, and `operational` (the gateway's own
/// notes, e.g. a sink banned or recovered).
pub const EVENT_TYPES: [&str; 11] = [
    "function",
    "mode",
    "setpoint",
    "program",
    "activation_time",
    "load_state",
    "temperature",
    "humidity",
    "connectivity",
    "snapshot",
    "operational",
];

/// Full canonical state of one device; `None` means "never reported".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    pub function: Option<Function>,
    pub mode: Option<Mode>,
    pub setpoint: Option<Temperature>,
    pub program: Option<u32>,
    #[serde(with = "rfc3339_ms_opt")]
    pub activation_time: Option<UnixMs>,
    pub load_state: Option<LoadState>,
    pub temperature: Option<Measurement>,
    pub humidity: Option<Measurement>,
    pub connectivity: Option<Connectivity>,
}

/// What one source message reported about one device; `None` fields were not reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reported {
    pub function: Option<Function>,
    pub mode: Option<Mode>,
    pub setpoint: Option<Temperature>,
    pub program: Option<u32>,
    pub activation_time: Option<UnixMs>,
    pub load_state: Option<LoadState>,
    /// Measured temperature and its unit.
    pub temperature: Option<Temperature>,
    /// Relative humidity, %RH.
    pub humidity: Option<Fixed>,
    pub connectivity: Option<Connectivity>,
}

impl Reported {
    /// True when the message reported no canonical field at all.
    pub fn is_empty(&self) -> bool {
        *self == Reported::default()
    }
}

/// One observation of one device, as a source hands it to the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// Device id (Zigbee2MQTT friendly name, configured alias, …).
    pub device: String,
    /// Name of the source that saw it (for logs and run-time conflict detection).
    pub source: String,
    /// Gateway clock when the source received it.
    pub observed_at: UnixMs,
    pub reported: Reported,
}

/// A field-level change produced by the diff; `previous`/`current` as they appear on the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Change type: a field name or `"snapshot"`.
    pub kind: ChangeKind,
    pub previous: serde_json::Value,
    pub current: serde_json::Value,
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Field(Field),
    /// First sight of a device, or the periodic self-healing resend.
    Snapshot,
}

impl ChangeKind {
    /// The `type` string of the event envelope.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Field(f) => f.as_str(),
            ChangeKind::Snapshot => "snapshot",
        }
    }
}

impl DeviceState {
    /// The wire value of one field (`null` when unknown): enums as strings, temperatures as
    /// `{"value","unit"}`, measurements with their time, times as RFC 3339.
    pub fn field_json(&self, field: Field) -> serde_json::Value {
        use serde_json::{Value, json};
        match field {
            Field::Function => self.function.map_or(Value::Null, |v| json!(v.as_str())),
            Field::Mode => self.mode.map_or(Value::Null, |v| json!(v.as_str())),
            Field::Setpoint => self.setpoint.map_or(
                Value::Null,
                |t| json!({"value": t.value.to_string(), "unit": t.unit.as_str()}),
            ),
            Field::Program => self.program.map_or(Value::Null, |p| json!(p)),
            Field::ActivationTime => self
                .activation_time
                .map_or(Value::Null, |t| json!(format_rfc3339_ms(t))),
            Field::LoadState => self.load_state.map_or(Value::Null, |v| json!(v.as_str())),
            Field::Temperature => measurement_json(self.temperature.as_ref()),
            Field::Humidity => measurement_json(self.humidity.as_ref()),
            Field::Connectivity => self.connectivity.map_or(Value::Null, |v| json!(v.as_str())),
        }
    }
}

fn measurement_json(m: Option<&Measurement>) -> serde_json::Value {
    m.map_or(serde_json::Value::Null, |m| {
        serde_json::json!({"value": m.value.to_string(), "unit": m.unit, "time": format_rfc3339_ms(m.time)})
    })
}

/// Metadata the writer stamps on every event of a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMeta {
    pub plant: Option<String>,
    pub module: Option<String>,
}

/// Whether the gateway clock was known to be synchronised when the event was observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockState {
    Synced,
    Unsynced,
}

/// The event envelope every sink receives (see docs/event-format.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// UUIDv7, minted once at commit; stable across retries.
    pub id: String,
    /// Per-device, strictly increasing, gap-free from 1.
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub gateway: String,
    pub plant: Option<String>,
    pub device: String,
    pub module: Option<String>,
    /// Gateway clock at observation, RFC 3339 with milliseconds, UTC.
    pub observed_at: String,
    pub clock: ClockState,
    pub previous: serde_json::Value,
    pub current: serde_json::Value,
    /// Full canonical state after the change.
    pub state: DeviceState,
}

/// Formats ms since the epoch as `2026-11-23T10:15:02.481Z`.
pub fn format_rfc3339_ms(ms: UnixMs) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    )
}

/// Parses RFC 3339 (`Z` or numeric offset, optional fraction) into ms since the epoch.
pub fn parse_rfc3339_ms(s: &str) -> Option<UnixMs> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't' || b[10] == b' ')
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_secs = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let o = oh * 3600 + om * 60;
            if *c == b'+' { o } else { -o }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some((days * 86_400 + h * 3600 + mi * 60 + se - offset_secs) * 1000 + millis)
}

// Howard Hinnant's civil-date algorithms (public domain description, written here from the math).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

mod rfc3339_ms {
    use super::UnixMs;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &UnixMs, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_rfc3339_ms(*v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UnixMs, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_rfc3339_ms(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid RFC 3339 time {s:?}")))
    }
}

mod rfc3339_ms_opt {
    use super::UnixMs;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<UnixMs>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => s.serialize_str(&super::format_rfc3339_ms(*t)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<UnixMs>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        match s {
            None => Ok(None),
            Some(s) => super::parse_rfc3339_ms(&s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("invalid RFC 3339 time {s:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_formats_shortest_with_one_decimal() {
        assert_eq!(Fixed(2100).to_string(), "21.0");
        assert_eq!(Fixed(2050).to_string(), "20.5");
        assert_eq!(Fixed(2037).to_string(), "20.37");
        assert_eq!(Fixed(-50).to_string(), "-0.5");
        assert_eq!(Fixed(-5).to_string(), "-0.05");
        assert_eq!(Fixed(0).to_string(), "0.0");
    }

    #[test]
    fn fixed_parses_and_rejects() {
        assert_eq!(Fixed::parse("21"), Some(Fixed(2100)));
        assert_eq!(Fixed::parse(" 20.37 "), Some(Fixed(2037)));
        assert_eq!(Fixed::parse("-0.5"), Some(Fixed(-50)));
        assert_eq!(Fixed::parse("20.375"), Some(Fixed(2038)));
        assert_eq!(Fixed::parse("abc"), None);
        assert_eq!(Fixed::parse("NaN"), None);
        assert_eq!(Fixed::parse("1e300"), None);
        assert_eq!(Fixed::from_f64(19.5), Some(Fixed(1950)));
    }

    #[test]
    fn rfc3339_round_trips() {
        let t = parse_rfc3339_ms("2026-11-23T10:15:02.481Z").unwrap();
        assert_eq!(format_rfc3339_ms(t), "2026-11-23T10:15:02.481Z");
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(
            parse_rfc3339_ms("2000-02-29T00:00:00.5Z"),
            Some(951_782_400_500)
        );
        assert_eq!(parse_rfc3339_ms("2000-02-29"), None);
        assert_eq!(parse_rfc3339_ms("2000-13-01T00:00:00Z"), None);
        assert_eq!(format_rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn state_serializes_with_nulls_and_round_trips() {
        let s = DeviceState {
            mode: Some(Mode::Manual),
            setpoint: Some(Temperature {
                value: Fixed(2100),
                unit: TempUnit::C,
            }),
            temperature: Some(Measurement {
                value: Fixed(1950),
                unit: "C".into(),
                time: 1_000,
            }),
            ..Default::default()
        };
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["mode"], "MANUAL");
        assert_eq!(
            j["setpoint"],
            serde_json::json!({"value": "21.0", "unit": "C"})
        );
        assert_eq!(j["temperature"]["time"], "1970-01-01T00:00:01.000Z");
        assert_eq!(j["function"], serde_json::Value::Null);
        let back: DeviceState = serde_json::from_value(j).unwrap();
        assert_eq!(back, s);
    }
}
