//! Pure parsing of MQTT payloads (Zigbee2MQTT preset, generic JSON mapping) into [`Reported`].
//!
//! Owns Zigbee2MQTT topic routing, availability payloads and the compiled generic mapping.
//! Must not do I/O, log, read a clock or keep state between messages; the MQTT source calls it.
//! Invariants: a message maps whole or is rejected whole (one mapped key of the wrong type
//! rejects it); a missing key or `null` means "not reported"; `Ok` never carries an empty
//! [`Reported`]; no input, however malformed or deeply nested, makes it panic.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::model::{
    Connectivity, Field, Fixed, Function, LoadState, Mode, Reported, TempUnit, Temperature, UnixMs,
    parse_rfc3339_ms,
};

/// Why a payload could not be turned into a [`Reported`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The bytes are not JSON (or nest deeper than the JSON parser's recursion limit).
    #[error("payload is not valid JSON")]
    NotJson,
    /// Valid JSON, but not an object.
    #[error("payload is not a JSON object")]
    NotObject,
    /// A mapped key holds the wrong JSON type.
    #[error("{field}: expected {expected}, got {got}")]
    WrongType {
        /// The JSON key (Zigbee2MQTT) or `pointer (canonical field)` (generic mapping).
        field: String,
        /// What the parser accepts there, e.g. `"a number"`.
        expected: &'static str,
        /// The JSON type that was found, e.g. `"a string"`.
        got: &'static str,
    },
    /// A value of the right type that names nothing the parser knows.
    #[error("{field}: unknown value {value:?}")]
    UnknownValue {
        /// The key, pointer or `availability`.
        field: String,
        /// The offending value, cut to 64 characters.
        value: String,
    },
    /// The device id rule found nothing (or an empty id).
    #[error("no device id at {at}")]
    NoDevice {
        /// The rule that was applied: a JSON pointer such as `/id`, or `topic level N`.
        at: String,
    },
    /// The device id is too long or holds a control character (issue 11 item 18).
    #[error("device id {id}: {problem}")]
    BadDeviceId {
        /// The id as shown in logs: quoted, escaped, cut to 32 characters.
        id: String,
        /// Which rule it breaks.
        problem: super::DeviceIdError,
    },
    /// The message reported no canonical thermostat field at all.
    #[error("no thermostat field in payload")]
    Unmapped,
    /// A number that is not finite or not plausible for its field.
    #[error("{field}: value {value} is out of range")]
    OutOfRange {
        /// The key or pointer.
        field: String,
        /// The value as it appeared, cut to 64 characters.
        value: String,
    },
}

impl PayloadError {
    /// The kind of problem, a fixed word: what warnings are rate-limited by (never the topic
    /// or the device, which a publisher chooses).
    pub fn kind(&self) -> &'static str {
        match self {
            PayloadError::NotJson => "not_json",
            PayloadError::NotObject => "not_object",
            PayloadError::WrongType { .. } => "wrong_type",
            PayloadError::UnknownValue { .. } => "unknown_value",
            PayloadError::NoDevice { .. } => "no_device",
            PayloadError::BadDeviceId { .. } => "bad_device_id",
            PayloadError::Unmapped => "unmapped",
            PayloadError::OutOfRange { .. } => "out_of_range",
        }
    }

    /// [`PayloadError::BadDeviceId`] for `id`, if it breaks a rule of
    /// [`super::check_device_id`].
    ///
    /// # Errors
    /// The error describing the id.
    pub fn check_device_id(id: &str) -> Result<(), PayloadError> {
        super::check_device_id(id).map_err(|problem| PayloadError::BadDeviceId {
            id: format!("\"{}\"", crate::telemetry::shown(id, 32)),
            problem,
        })
    }
}

/// Lowest accepted temperature in °C (absolute zero); below it a value is a sensor sentinel.
const MIN_CELSIUS: f64 = -273.15;
/// Lowest accepted temperature in °F (absolute zero).
const MIN_FAHRENHEIT: f64 = -459.67;
/// Latest accepted epoch second for `activation_time` (9999-12-31T23:59:59Z).
const MAX_EPOCH_SECS: i64 = 253_402_300_799;
/// Longest value quoted back in an error message, in characters.
const SNIPPET_CHARS: usize = 64;

// ------------------------------------------------------------------ Zigbee2MQTT

/// What a topic under the Zigbee2MQTT base topic carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `<base>/<friendly name>`: a device state object; holds the friendly name.
    State(String),
    /// `<base>/<friendly name>/availability`: holds the friendly name.
    Availability(String),
    /// Bridge topics, `/set` and `/get` commands, and topics outside the base.
    Ignore,
}

/// Classifies a topic received by a Zigbee2MQTT source (protocols.md Part B §1.2).
///
/// Friendly names may contain `/`, so everything after `<base>/` that is not a bridge topic,
/// an availability topic or a set/get command is a state topic.
pub fn z2m_route(base_topic: &str, topic: &str) -> Route {
    let base = base_topic.trim_end_matches('/');
    let Some(rest) = topic.strip_prefix(base).and_then(|r| r.strip_prefix('/')) else {
        return Route::Ignore;
    };
    if rest.is_empty() || rest == "bridge" || rest.starts_with("bridge/") {
        return Route::Ignore;
    }
    if let Some(name) = rest.strip_suffix("/availability") {
        return if name.is_empty() {
            Route::Ignore
        } else {
            Route::Availability(name.to_owned())
        };
    }
    // Z2M's own regex is `^<base>/(?!bridge)(.+?)/(get|set)(?:/(.+))?$` (§1.2): a `set` or `get`
    // level after the name, optionally followed by an attribute, is a command, never state.
    if rest
        .split('/')
        .skip(1)
        .any(|level| level == "set" || level == "get")
    {
        return Route::Ignore;
    }
    Route::State(rest.to_owned())
}

/// Parses a Zigbee2MQTT device state object (protocols.md Part B §1.3, §1.4).
///
/// Temperatures and setpoints are °C. Unknown keys are ignored, including the Tuya property
/// literally named `online`, which is not connectivity (§1.3 "Pitfall"): connectivity comes from
/// [`availability`] only.
///
/// # Errors
/// [`PayloadError::NotJson`] / [`PayloadError::NotObject`] for a payload that is not a JSON
/// object; [`PayloadError::WrongType`] when any mapped key has the wrong JSON type (numbers may be
/// numeric strings); [`PayloadError::OutOfRange`] for non-finite or implausible numbers;
/// [`PayloadError::Unmapped`] when nothing canonical could be derived.
pub fn z2m_state(payload: &[u8]) -> Result<Reported, PayloadError> {
    // Only the keys read below are kept; everything else is skipped without building a tree.
    let obj = parse_known(payload, &Z2M_KEYS)?;
    // Every mapped key is read and type-checked before any rule runs, so that one bad key
    // rejects the whole message even when a rule would not have needed it.
    // §1.3: `local_temperature` and every setpoint property are in °C.
    let local_temperature = z2m_number(&obj, "local_temperature", MIN_CELSIUS, Fixed::LIMIT)?;
    // §1.3 common exposes: `humidity` in %.
    let humidity = z2m_number(&obj, "humidity", 0.0, 100.0)?;
    let heating_setpoint =
        z2m_number(&obj, "occupied_heating_setpoint", MIN_CELSIUS, Fixed::LIMIT)?;
    let tuya_setpoint = z2m_number(&obj, "current_heating_setpoint", MIN_CELSIUS, Fixed::LIMIT)?;
    let cooling_setpoint =
        z2m_number(&obj, "occupied_cooling_setpoint", MIN_CELSIUS, Fixed::LIMIT)?;
    let system_mode = z2m_text(&obj, "system_mode")?;
    let running_state = z2m_text(&obj, "running_state")?;
    let sequence = z2m_text(&obj, "control_sequence_of_operation")?;
    let operating_mode = z2m_text(&obj, "operating_mode")?;
    let preset = z2m_text(&obj, "preset")?;
    let boost_heating = z2m_switch(&obj, "boost_heating")?;
    let frost_protection = z2m_switch(&obj, "frost_protection")?;
    // §1.3 "Demand": `pi_heating_demand` is 0–100 %.
    let heating_demand = z2m_number(&obj, "pi_heating_demand", 0.0, 100.0)?;

    use Function::{Cooling, Heating};
    // function, §1.3 enums: system_mode heat/cool says it outright; otherwise what is running
    // (running_state heat/cool); otherwise the configured control sequence (§1.4 (f)).
    let function = pick(system_mode, &[("heat", Heating), ("cool", Cooling)])
        .or_else(|| pick(running_state, &[("heat", Heating), ("cool", Cooling)]))
        .or_else(|| {
            pick(
                sequence,
                &[("heating_only", Heating), ("cooling_only", Cooling)],
            )
        });

    // setpoint, §1.4 mapping hints: occupied_heating_setpoint, or current_heating_setpoint on
    // Tuya (§1.4 (a), (b)); occupied_cooling_setpoint when the function is COOLING (§1.4 (f)).
    let setpoint = match (function, cooling_setpoint) {
        (Some(Cooling), Some(cooling)) => Some(cooling),
        _ => heating_setpoint.or(tuya_setpoint),
    }
    .map(|value| Temperature {
        value,
        unit: TempUnit::C,
    });

    use Mode::{Automatic, Boost, Manual, Off, Protection};
    // mode, §1.4 mapping hints, first rule that applies:
    // OFF ← system_mode off / Bosch operating_mode pause (§1.4 (d), (f));
    // BOOST ← preset boost (Tuya, §1.4 (a)) / Bosch boost_heating ON (§1.4 (d));
    // PROTECTION ← preset away (Tuya) / holiday (TV02, §1.4 (b)) / frost_protection ON (§1.4 (b));
    // then the device's real mode (Bosch operating_mode, §1.4 (d)), then the Tuya preset, and
    // last system_mode, which on single-mode TRVs only says "heat" (§1.4 (c), (e)).
    let mode = if is_one_of(system_mode, &["off"]) || is_one_of(operating_mode, &["pause"]) {
        Some(Off)
    } else if is_one_of(preset, &["boost"]) || boost_heating == Some(true) {
        Some(Boost)
    } else if is_one_of(preset, &["away", "holiday"]) || frost_protection == Some(true) {
        Some(Protection)
    } else {
        pick(
            operating_mode,
            &[("schedule", Automatic), ("manual", Manual)],
        )
        .or_else(|| {
            pick(
                preset,
                &[
                    ("schedule", Automatic),
                    ("auto", Automatic),
                    ("program", Automatic),
                    ("manual", Manual),
                    ("comfort", Manual),
                    ("eco", Manual),
                ],
            )
        })
        .or_else(|| {
            pick(
                system_mode,
                &[("auto", Automatic), ("heat", Manual), ("cool", Manual)],
            )
        })
    };

    use LoadState::{Active, Inactive};
    // load_state, §1.3 running_state (idle/heat/cool/fan_only) and §1.4 mapping hints: the
    // heating demand decides only on devices that publish no running_state (§1.4 (b)-style TRVs).
    let load_state = if running_state.is_some() {
        pick(
            running_state,
            &[
                ("heat", Active),
                ("cool", Active),
                ("idle", Inactive),
                ("fan_only", Inactive),
            ],
        )
    } else {
        heating_demand.map(|demand| if demand > Fixed(0) { Active } else { Inactive })
    };

    let reported = Reported {
        function,
        mode,
        setpoint,
        load_state,
        temperature: local_temperature.map(|value| Temperature {
            value,
            unit: TempUnit::C,
        }),
        humidity,
        ..Reported::default()
    };
    non_empty(reported)
}

/// Parses an availability payload: `online` / `offline` as plain text (trimmed,
/// case-insensitive; Z2M 1.x, ESPHome) or `{"state":"online"}` / `{"state":"offline"}` (Z2M 2.x),
/// protocols.md Part B §1.2 and §2.3.
///
/// Returns `Ok(None)` for an empty payload: a cleared retained message (Z2M publishes one on the
/// old name's topic after a rename), which says nothing about the device.
///
/// # Errors
/// [`PayloadError::UnknownValue`] for any other text or a JSON object without a known `state`;
/// [`PayloadError::WrongType`] when `state` is not a string; [`PayloadError::NotJson`] for a
/// broken JSON object.
pub fn availability(payload: &[u8]) -> Result<Option<Connectivity>, PayloadError> {
    let text = payload.trim_ascii();
    if text.is_empty() {
        return Ok(None);
    }
    if text.starts_with(b"{") {
        let obj = parse_known(text, &["state"])?;
        return match obj.get("state") {
            Some(Value::String(s)) => connectivity_word(s)
                .map(Some)
                .ok_or_else(|| unknown("state", s)),
            Some(other) => Err(wrong_type("state", "a string", other)),
            None => Err(unknown("availability", &String::from_utf8_lossy(text))),
        };
    }
    let word = String::from_utf8_lossy(text);
    connectivity_word(&word)
        .map(Some)
        .ok_or_else(|| unknown("availability", &word))
}

fn connectivity_word(s: &str) -> Option<Connectivity> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("online") {
        Some(Connectivity::Online)
    } else if s.eq_ignore_ascii_case("offline") {
        Some(Connectivity::Offline)
    } else {
        None
    }
}

/// A present, non-null value.
fn present<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn z2m_number(
    obj: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<Option<Fixed>, PayloadError> {
    present(obj, key)
        .map(|v| bounded_number(key, v, min, max))
        .transpose()
}

fn z2m_text<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, PayloadError> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(wrong_type(key, "a string", other)),
    }
}

/// A Z2M switch property: `"ON"`/`"OFF"` (§1.3), or a boolean on some converters.
fn z2m_switch(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, PayloadError> {
    match present(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.eq_ignore_ascii_case("on"))),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong_type(key, "\"ON\"/\"OFF\" or a boolean", other)),
    }
}

fn is_one_of(value: Option<&str>, set: &[&str]) -> bool {
    value.is_some_and(|v| set.iter().any(|s| v.eq_ignore_ascii_case(s)))
}

fn pick<T: Copy>(value: Option<&str>, table: &[(&str, T)]) -> Option<T> {
    let value = value?;
    table
        .iter()
        .find(|(key, _)| value.eq_ignore_ascii_case(key))
        .map(|&(_, t)| t)
}

// ------------------------------------------------------------------ generic mapping

/// A generic JSON mapping as configured (`[sources.mqtt.mapping]`, `[sources.jsonl.mapping]`,
/// config.md); the config module fills it and [`Mapping::compile`] checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingSpec {
    /// Device id rule: `{topic:N}` (0-based topic level) or a JSON pointer such as `/id`.
    pub device: String,
    /// Optional availability topic pattern holding `{device}`, e.g. `home/{device}/status`.
    pub availability_topic: Option<String>,
    /// Unit of every temperature and setpoint in the payload.
    pub unit: TempUnit,
    /// Canonical field name → JSON pointer.
    pub fields: BTreeMap<String, String>,
    /// Enum field name (`function`, `mode`, `load_state`, `connectivity`) → {device value → canonical value}.
    pub values: BTreeMap<String, BTreeMap<String, String>>,
}

/// A checked [`MappingSpec`], ready to map payloads.
#[derive(Debug, Clone)]
pub struct Mapping {
    device: DeviceRule,
    availability: Option<TopicPattern>,
    unit: TempUnit,
    /// In [`Field`] order, so the first error a message hits is deterministic.
    fields: BTreeMap<Field, String>,
    function: ValueMap<Function>,
    mode: ValueMap<Mode>,
    load_state: ValueMap<LoadState>,
    connectivity: ValueMap<Connectivity>,
}

#[derive(Debug, Clone)]
enum DeviceRule {
    TopicLevel(usize),
    Pointer(String),
}

/// `prefix/{device}/suffix`, where `{device}` stands for one or more whole levels.
#[derive(Debug, Clone)]
struct TopicPattern {
    prefix: Vec<String>,
    suffix: Vec<String>,
}

/// Device value → canonical value, looked up exactly first, then ignoring ASCII case.
#[derive(Debug, Clone)]
struct ValueMap<T> {
    entries: Vec<(String, T)>,
}

impl<T: Copy> ValueMap<T> {
    fn lookup(&self, value: &str) -> Option<T> {
        self.entries
            .iter()
            .find(|(k, _)| k == value)
            .or_else(|| {
                self.entries
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(value))
            })
            .map(|&(_, t)| t)
    }
}

/// The closed canonical enums a value map can target.
trait Canonical: Copy + 'static {
    fn all() -> &'static [Self];
    fn name(self) -> &'static str;
    fn from_name(s: &str) -> Option<Self>;
}

macro_rules! canonical {
    ($($t:ty),+) => {$(
        impl Canonical for $t {
            fn all() -> &'static [Self] {
                <$t>::ALL
            }
            fn name(self) -> &'static str {
                self.as_str()
            }
            fn from_name(s: &str) -> Option<Self> {
                <$t>::parse(s)
            }
        }
    )+};
}
canonical!(Function, Mode, LoadState, Connectivity);

/// A configuration problem: the key relative to the mapping (e.g. `values.mode.heat`) and what is wrong.
type Problem = (String, String);

impl Mapping {
    /// Checks a spec and compiles it.
    ///
    /// # Errors
    /// Every problem found, each as (key relative to the mapping, problem): an unknown canonical
    /// field, a pointer not starting with `/` (or with a bad `~` escape), a value map for a
    /// non-enum field or for a field with no pointer, a canonical value that does not exist, a
    /// bad device rule, an availability topic without exactly one whole-level `{device}`.
    pub fn compile(spec: &MappingSpec) -> Result<Mapping, Vec<(String, String)>> {
        let mut problems: Vec<Problem> = Vec::new();

        let device =
            compile_device_rule(&spec.device).map_err(|p| problems.push(("device".to_owned(), p)));
        let availability = match &spec.availability_topic {
            None => Ok(None),
            Some(pattern) => compile_topic_pattern(pattern)
                .map(Some)
                .map_err(|p| problems.push(("availability_topic".to_owned(), p))),
        };

        let mut fields = BTreeMap::new();
        if spec.fields.is_empty() {
            problems.push((
                "fields".to_owned(),
                "map at least one canonical field to a JSON pointer".to_owned(),
            ));
        }
        for (name, pointer) in &spec.fields {
            let key = format!("fields.{name}");
            let field = Field::parse(name);
            if field.is_none() {
                problems.push((
                    key.clone(),
                    format!(
                        "unknown canonical field {name:?}; expected one of {}",
                        field_names()
                    ),
                ));
            }
            if let Err(p) = check_pointer(pointer) {
                problems.push((key, p));
            }
            if let Some(field) = field {
                fields.insert(field, pointer.clone());
            }
        }

        let mut function = ValueMap {
            entries: Vec::new(),
        };
        let mut mode = ValueMap {
            entries: Vec::new(),
        };
        let mut load_state = ValueMap {
            entries: Vec::new(),
        };
        let mut connectivity = ValueMap {
            entries: Vec::new(),
        };
        for (name, map) in &spec.values {
            let key = format!("values.{name}");
            let field = Field::parse(name);
            match field {
                Some(Field::Function) => function = compile_values(&key, map, &mut problems),
                Some(Field::Mode) => mode = compile_values(&key, map, &mut problems),
                Some(Field::LoadState) => load_state = compile_values(&key, map, &mut problems),
                Some(Field::Connectivity) => connectivity = compile_values(&key, map, &mut problems),
                Some(_) => problems.push((
                    key.clone(),
                    format!("{name} is not an enum field; value maps apply to function, mode, load_state, connectivity"),
                )),
                None => problems.push((
                    key.clone(),
                    format!("unknown enum field {name:?}; expected one of function, mode, load_state, connectivity"),
                )),
            }
            // A value map nothing reads is almost certainly a typo in `fields`.
            if field.is_some_and(|f| is_enum(f) && !spec.fields.contains_key(name)) {
                problems.push((
                    key,
                    format!(
                        "{name} has no JSON pointer in fields, so this value map is never used"
                    ),
                ));
            }
        }

        match (device, availability) {
            (Ok(device), Ok(availability)) if problems.is_empty() => Ok(Mapping {
                device,
                availability,
                unit: spec.unit,
                fields,
                function,
                mode,
                load_state,
                connectivity,
            }),
            _ => Err(problems),
        }
    }

    /// Maps one message to (device id, what it reported).
    ///
    /// # Errors
    /// [`PayloadError::NotJson`] / [`PayloadError::NotObject`]; [`PayloadError::NoDevice`] when the
    /// device rule finds no non-empty id; [`PayloadError::WrongType`], [`PayloadError::OutOfRange`]
    /// or [`PayloadError::UnknownValue`] for the first bad mapped field (the whole message is
    /// rejected); [`PayloadError::Unmapped`] when no mapped field was reported.
    pub fn map(&self, topic: &str, payload: &[u8]) -> Result<(String, Reported), PayloadError> {
        let root = parse_json(payload)?;
        if !root.is_object() {
            return Err(PayloadError::NotObject);
        }
        let device = self.device_id(topic, &root)?;
        let mut r = Reported::default();
        for (&field, pointer) in &self.fields {
            let Some(v) = root.pointer(pointer).filter(|v| !v.is_null()) else {
                continue;
            };
            let name = format!("{pointer} ({})", field.as_str());
            let min = match self.unit {
                TempUnit::C => MIN_CELSIUS,
                TempUnit::F => MIN_FAHRENHEIT,
            };
            let temperature = |v| -> Result<Temperature, PayloadError> {
                Ok(Temperature {
                    value: bounded_number(&name, v, min, Fixed::LIMIT)?,
                    unit: self.unit,
                })
            };
            match field {
                Field::Setpoint => r.setpoint = Some(temperature(v)?),
                Field::Temperature => r.temperature = Some(temperature(v)?),
                Field::Humidity => r.humidity = Some(bounded_number(&name, v, 0.0, 100.0)?),
                Field::Program => r.program = Some(program(&name, v)?),
                Field::ActivationTime => r.activation_time = Some(activation_time(&name, v)?),
                Field::Function => r.function = Some(enum_value(&name, v, &self.function, None)?),
                Field::Mode => r.mode = Some(enum_value(&name, v, &self.mode, None)?),
                Field::LoadState => {
                    let bools = Some((LoadState::Active, LoadState::Inactive));
                    r.load_state = Some(enum_value(&name, v, &self.load_state, bools)?);
                }
                Field::Connectivity => {
                    let bools = Some((Connectivity::Online, Connectivity::Offline));
                    r.connectivity = Some(enum_value(&name, v, &self.connectivity, bools)?);
                }
            }
        }
        non_empty(r).map(|r| (device, r))
    }

    /// The subscription filter for the availability topic (`{device}` as one `+` level, or `#`
    /// when the device is the last part), if a pattern is configured.
    pub fn availability_filter(&self) -> Option<String> {
        let pattern = self.availability.as_ref()?;
        let mut levels: Vec<&str> = pattern.prefix.iter().map(String::as_str).collect();
        if pattern.suffix.is_empty() {
            levels.push("#");
        } else {
            levels.push("+");
            levels.extend(pattern.suffix.iter().map(String::as_str));
        }
        Some(levels.join("/"))
    }

    /// The device named by `topic` if it matches the availability topic pattern, where
    /// `{device}` matches one or more whole topic levels; `None` otherwise or without a pattern.
    pub fn availability_device(&self, topic: &str) -> Option<String> {
        let pattern = self.availability.as_ref()?;
        let levels: Vec<&str> = topic.split('/').collect();
        let fixed = pattern.prefix.len() + pattern.suffix.len();
        if levels.len() <= fixed {
            return None;
        }
        let (head, rest) = levels.split_at(pattern.prefix.len());
        let (middle, tail) = rest.split_at(rest.len() - pattern.suffix.len());
        let same = |a: &[&str], b: &[String]| a.iter().zip(b).all(|(x, y)| *x == y.as_str());
        if !same(head, &pattern.prefix) || !same(tail, &pattern.suffix) {
            return None;
        }
        let device = middle.join("/");
        (!device.is_empty()).then_some(device)
    }

    fn device_id(&self, topic: &str, root: &Value) -> Result<String, PayloadError> {
        match &self.device {
            DeviceRule::TopicLevel(n) => topic
                .split('/')
                .nth(*n)
                .filter(|level| !level.is_empty())
                .ok_or_else(|| PayloadError::NoDevice {
                    at: format!("topic level {n}"),
                })
                .and_then(|level| {
                    PayloadError::check_device_id(level)?;
                    Ok(level.to_owned())
                }),
            DeviceRule::Pointer(pointer) => {
                let no_device = || PayloadError::NoDevice {
                    at: pointer.clone(),
                };
                match root.pointer(pointer) {
                    None | Some(Value::Null) => Err(no_device()),
                    Some(Value::String(s)) if s.trim().is_empty() => Err(no_device()),
                    Some(Value::String(s)) => {
                        PayloadError::check_device_id(s)?;
                        Ok(s.clone())
                    }
                    Some(Value::Number(n)) if !n.is_f64() => Ok(n.to_string()),
                    Some(other) => Err(wrong_type(pointer, "a string or an integer", other)),
                }
            }
        }
    }
}

fn is_enum(field: Field) -> bool {
    matches!(
        field,
        Field::Function | Field::Mode | Field::LoadState | Field::Connectivity
    )
}

fn field_names() -> String {
    Field::ALL
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn compile_device_rule(rule: &str) -> Result<DeviceRule, String> {
    if let Some(level) = rule
        .strip_prefix("{topic:")
        .and_then(|r| r.strip_suffix('}'))
    {
        if !level.is_empty()
            && level.bytes().all(|b| b.is_ascii_digit())
            && let Ok(n) = level.parse::<usize>()
        {
            return Ok(DeviceRule::TopicLevel(n));
        }
        return Err(format!(
            "{rule:?}: the topic level must be a small non-negative integer, e.g. {{topic:1}}"
        ));
    }
    if rule.starts_with('/') {
        check_pointer(rule)?;
        return Ok(DeviceRule::Pointer(rule.to_owned()));
    }
    Err(format!(
        "{rule:?} is neither {{topic:N}} (0-based topic level) nor a JSON pointer like /id"
    ))
}

fn check_pointer(pointer: &str) -> Result<(), String> {
    if !pointer.starts_with('/') {
        return Err(format!("JSON pointer {pointer:?} must start with /"));
    }
    let mut chars = pointer.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "JSON pointer {pointer:?}: ~ must be followed by 0 (for ~) or 1 (for /)"
            ));
        }
    }
    Ok(())
}

fn compile_topic_pattern(pattern: &str) -> Result<TopicPattern, String> {
    let levels: Vec<&str> = pattern.split('/').collect();
    let at = levels.iter().position(|l| *l == "{device}");
    let Some(at) = at.filter(|_| pattern.matches("{device}").count() == 1) else {
        return Err(format!(
            "{pattern:?} must contain {{device}} exactly once, as a whole topic level"
        ));
    };
    if levels.iter().any(|l| l.contains(['+', '#'])) {
        return Err(format!("{pattern:?}: use {{device}}, not MQTT wildcards"));
    }
    Ok(TopicPattern {
        prefix: levels[..at].iter().map(|l| (*l).to_owned()).collect(),
        suffix: levels[at + 1..].iter().map(|l| (*l).to_owned()).collect(),
    })
}

fn compile_values<T: Canonical>(
    key: &str,
    map: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) -> ValueMap<T> {
    let mut entries = Vec::new();
    for (device_value, canonical) in map {
        match T::from_name(canonical) {
            Some(t) => entries.push((device_value.clone(), t)),
            None => {
                let names: Vec<&str> = T::all().iter().map(|t| t.name()).collect();
                problems.push((
                    format!("{key}.{device_value}"),
                    format!(
                        "{canonical:?} is not a valid value here; expected one of {}",
                        names.join(", ")
                    ),
                ));
            }
        }
    }
    ValueMap { entries }
}

fn program(field: &str, v: &Value) -> Result<u32, PayloadError> {
    let n: i128 = match v {
        Value::Number(n) if n.is_f64() => return Err(wrong_type(field, "an integer", v)),
        Value::Number(n) => match n.as_u64() {
            Some(u) => i128::from(u),
            None => n.as_i64().map_or(-1, i128::from),
        },
        Value::String(s) => s.trim().parse().map_err(|_| PayloadError::WrongType {
            field: field.to_owned(),
            expected: "an integer",
            got: "a non-numeric string",
        })?,
        other => return Err(wrong_type(field, "an integer", other)),
    };
    u32::try_from(n).map_err(|_| out_of_range(field, v))
}

fn activation_time(field: &str, v: &Value) -> Result<UnixMs, PayloadError> {
    match v {
        Value::String(s) => parse_rfc3339_ms(s.trim()).ok_or_else(|| unknown(field, s)),
        Value::Number(n) if n.is_f64() => Err(wrong_type(
            field,
            "an RFC 3339 string or integer epoch seconds",
            v,
        )),
        Value::Number(n) => n
            .as_i64()
            .filter(|secs| (0..=MAX_EPOCH_SECS).contains(secs))
            .map(|secs| secs * 1000)
            .ok_or_else(|| out_of_range(field, v)),
        other => Err(wrong_type(
            field,
            "an RFC 3339 string or integer epoch seconds",
            other,
        )),
    }
}

/// A string (value map first, exact then case-insensitive, then the canonical name), a boolean
/// where `bools` gives (true, false) values, or an integer looked up in the value map by its text.
fn enum_value<T: Canonical>(
    field: &str,
    v: &Value,
    map: &ValueMap<T>,
    bools: Option<(T, T)>,
) -> Result<T, PayloadError> {
    let expected = if bools.is_some() {
        "a string or a boolean"
    } else {
        "a string"
    };
    match (v, bools) {
        (Value::String(s), _) => map
            .lookup(s)
            .or_else(|| T::from_name(s))
            .ok_or_else(|| unknown(field, s)),
        (Value::Bool(b), Some((yes, no))) => Ok(if *b { yes } else { no }),
        (Value::Number(n), _) if !n.is_f64() => {
            let text = n.to_string();
            map.lookup(&text).ok_or_else(|| unknown(field, &text))
        }
        (other, _) => Err(wrong_type(field, expected, other)),
    }
}

// ------------------------------------------------------------------ MQTT topics

/// Whether `topic` matches the subscription `filter`: `+` is exactly one level, a final `#` is the
/// parent level and everything below it; filters starting with a wildcard do not match `$` topics.
/// Invalid filters (wildcards mixed into a level, `#` not last) match nothing.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    if filter.is_empty() || topic.is_empty() || topic.contains(['+', '#']) {
        return false;
    }
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return filter_levels.next().is_none(),
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) => {
                if f.contains(['+', '#']) || f != t {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
    }
}

// ------------------------------------------------------------------ shared helpers

fn parse_json(payload: &[u8]) -> Result<Value, PayloadError> {
    // serde_json stops at 128 levels of nesting, so hostile depth is an error, not a stack overflow.
    serde_json::from_slice(payload).map_err(|_| PayloadError::NotJson)
}

/// Every key [`z2m_state`] reads.
const Z2M_KEYS: [&str; 13] = [
    "local_temperature",
    "humidity",
    "occupied_heating_setpoint",
    "current_heating_setpoint",
    "occupied_cooling_setpoint",
    "system_mode",
    "running_state",
    "control_sequence_of_operation",
    "operating_mode",
    "preset",
    "boost_heating",
    "frost_protection",
    "pi_heating_demand",
];

/// Parses a JSON object keeping only `keys`, with a cost bounded by the payload's size and
/// not by its shape (issue 11 item 19): other keys' values are skipped by the streaming parser
/// ([`Skip`], no allocation), and a kept key whose value is an array or an
/// object keeps only an empty one of that kind (the parsers need its type, never its
/// contents). A full [`Value`] tree of a hostile 16 MiB array costs about 16 times its size.
/// Same verdicts as parsing a whole [`Value`]: [`PayloadError::NotJson`] for broken or too deeply
/// nested JSON or trailing bytes, [`PayloadError::NotObject`] for other JSON; a repeated key
/// keeps its last value, as [`Value`] does.
fn parse_known(payload: &[u8], keys: &[&str]) -> Result<Map<String, Value>, PayloadError> {
    use serde::de::DeserializeSeed;
    let mut de = serde_json::Deserializer::from_slice(payload);
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Valid JSON that is not an object, or not JSON at all: tell them apart without a tree.
        return match Skip.deserialize(&mut de).and_then(|()| de.end()) {
            Ok(()) => Err(PayloadError::NotObject),
            Err(_) => Err(PayloadError::NotJson),
        };
    }
    let map = KnownKeys(keys)
        .deserialize(&mut de)
        .map_err(|_| PayloadError::NotJson)?;
    de.end().map_err(|_| PayloadError::NotJson)?;
    Ok(map)
}

/// Skips one JSON value without keeping anything. Unlike [`serde::de::IgnoredAny`] (which
/// serde_json skips without a depth limit) it goes through `deserialize_any`, so serde_json's
/// recursion limit of 128 levels applies as it does for [`Value`]: the same payloads are
/// refused as too deep.
struct Skip;

impl<'de> serde::de::DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        while s.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        while m.next_key_seed(Skip)?.is_some() {
            m.next_value_seed(Skip)?;
        }
        Ok(())
    }
}

/// Seed of [`parse_known`]: a JSON object reduced to the listed keys.
struct KnownKeys<'k>(&'k [&'k str]);

impl<'de> serde::de::DeserializeSeed<'de> for KnownKeys<'_> {
    type Value = Map<String, Value>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KnownKeys<'_> {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = m.next_key::<String>()? {
            if self.0.contains(&key.as_str()) {
                let v = m.next_value_seed(Shallow)?;
                out.insert(key, v);
            } else {
                m.next_value_seed(Skip)?;
            }
        }
        Ok(out)
    }
}

/// A JSON value kept whole when it is a scalar; an array or object is skipped and kept as an
/// empty one (its type is all a parser needs to refuse it).
struct Shallow;

impl<'de> serde::de::DeserializeSeed<'de> for Shallow {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Shallow {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, s: A) -> Result<Value, A::Error> {
        serde::de::Visitor::visit_seq(Skip, s)?;
        Ok(Value::Array(Vec::new()))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<Value, A::Error> {
        serde::de::Visitor::visit_map(Skip, m)?;
        Ok(Value::Object(Map::new()))
    }
}

fn non_empty(reported: Reported) -> Result<Reported, PayloadError> {
    if reported.is_empty() {
        Err(PayloadError::Unmapped)
    } else {
        Ok(reported)
    }
}

/// A JSON number, or a numeric string (`"21.5"`), within `min..=max` and representable as [`Fixed`].
fn bounded_number(field: &str, v: &Value, min: f64, max: f64) -> Result<Fixed, PayloadError> {
    let x = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => Some(
            s.trim()
                .parse::<f64>()
                .map_err(|_| PayloadError::WrongType {
                    field: field.to_owned(),
                    expected: "a number",
                    got: "a non-numeric string",
                })?,
        ),
        other => return Err(wrong_type(field, "a number", other)),
    };
    x.filter(|x| (min..=max).contains(x))
        .and_then(Fixed::from_f64)
        .ok_or_else(|| out_of_range(field, v))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a floating-point number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &str, expected: &'static str, got: &Value) -> PayloadError {
    PayloadError::WrongType {
        field: field.to_owned(),
        expected,
        got: type_name(got),
    }
}

fn unknown(field: &str, value: &str) -> PayloadError {
    PayloadError::UnknownValue {
        field: field.to_owned(),
        value: snippet(value),
    }
}

fn out_of_range(field: &str, v: &Value) -> PayloadError {
    let value = match v {
        Value::String(s) => snippet(s),
        other => snippet(&other.to_string()),
    };
    PayloadError::OutOfRange {
        field: field.to_owned(),
        value,
    }
}

fn snippet(s: &str) -> String {
    match s.char_indices().nth(SNIPPET_CHARS) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn celsius(hundredths: i64) -> Temperature {
        Temperature {
            value: Fixed(hundredths),
            unit: TempUnit::C,
        }
    }

    fn z2m(json: &str) -> Result<Reported, PayloadError> {
        z2m_state(json.as_bytes())
    }

    /// Counts the bytes allocated by the current thread, for cost tests.
    mod alloc_count {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static NOW: Cell<usize> = const { Cell::new(0) };
            static PEAK: Cell<usize> = const { Cell::new(0) };
        }

        pub struct Counting;

        fn add(n: usize) {
            let _ = NOW.try_with(|c| {
                let v = c.get().saturating_add(n);
                c.set(v);
                let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
            });
        }

        fn sub(n: usize) {
            let _ = NOW.try_with(|c| c.set(c.get().saturating_sub(n)));
        }

        // SAFETY: forwards to the system allocator unchanged; the counters are thread-local
        // `Cell`s with const initialisers (no allocation, no destructor).
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, l: Layout) -> *mut u8 {
                // SAFETY: same contract as the caller's.
                let p = unsafe { System.alloc(l) };
                if !p.is_null() {
                    add(l.size());
                }
                p
            }
            unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
                // SAFETY: same contract as the caller's.
                unsafe { System.dealloc(p, l) };
                sub(l.size());
            }
        }

        /// Runs `f`; returns its result and the most bytes it held allocated at once.
        pub fn peak<T>(f: impl FnOnce() -> T) -> (T, usize) {
            let base = NOW.with(Cell::get);
            PEAK.with(|p| p.set(base));
            let r = f();
            let top = PEAK.with(Cell::get);
            (r, top.saturating_sub(base))
        }
    }

    #[global_allocator]
    static COUNTING: alloc_count::Counting = alloc_count::Counting;

    /// Issue 11 item 19: a 16 MiB Zigbee2MQTT payload (the largest `max_payload_bytes`) costs a
    /// small multiple of its size whatever its shape. A full `Value` tree of the same payload
    /// holds about 8 million 32-byte values (over 16 times its size).
    #[test]
    fn a_16_mib_z2m_payload_costs_a_small_multiple_of_its_size() {
        const SIZE: usize = 16 * 1024 * 1024;
        let filled = |head: &str, item: &str, tail: &str| {
            let mut p = String::with_capacity(SIZE);
            p.push_str(head);
            let mut i = 0u64;
            while p.len() + tail.len() + 32 < SIZE {
                if item.contains('N') {
                    p.push_str(&item.replace('N', &i.to_string()));
                } else {
                    p.push_str(item);
                }
                i += 1;
            }
            p.push_str(tail);
            p
        };
        let expected = z2m(r#"{"local_temperature":21.5}"#);
        assert!(expected.is_ok());
        let cases = [
            // A huge array under an unknown key.
            (
                filled(r#"{"local_temperature":21.5,"junk":[0"#, ",0", "]}"),
                expected.clone(),
            ),
            // Millions of unknown keys.
            (
                filled(r#"{"local_temperature":21.5"#, r#","kN":{"a":[1]}"#, "}"),
                expected.clone(),
            ),
            // A huge array under a key the parser reads: refused by its type.
            (
                filled(r#"{"local_temperature":[0"#, ",0", "]}"),
                Err(PayloadError::WrongType {
                    field: "local_temperature".into(),
                    expected: "a number",
                    got: "an array",
                }),
            ),
            // Not an object at all.
            (filled("[0", ",0", "]"), Err(PayloadError::NotObject)),
        ];
        for (payload, want) in cases {
            assert!(payload.len() > SIZE - 64 && payload.len() <= SIZE);
            let (got, peak) = alloc_count::peak(|| z2m_state(payload.as_bytes()));
            assert_eq!(got, want, "{}", &payload[..40]);
            assert!(
                peak <= payload.len() / 4,
                "{peak} bytes allocated at once for a {} byte payload",
                payload.len()
            );
        }
    }

    // ---- protocols.md Part B §1.4 examples, verbatim

    #[test]
    fn example_a_tuya_ts0601_maps_to_heating_manual_active() {
        let payload = r#"{"current_heating_setpoint":21,"local_temperature":19.5,"local_temperature_calibration":0,"system_mode":"auto",
 "preset":"manual","running_state":"heat","position":35,"child_lock":"UNLOCK","window_detection":"OFF","window_open":false,
 "away_mode":"OFF","away_preset_days":1,"away_preset_temperature":15,"boost_time":300,"comfort_temperature":21,
 "eco_temperature":17,"battery_low":false,"linkquality":120}"#;
        let expected = Reported {
            function: Some(Function::Heating),
            mode: Some(Mode::Manual),
            setpoint: Some(celsius(2100)),
            load_state: Some(LoadState::Active),
            temperature: Some(celsius(1950)),
            ..Reported::default()
        };
        assert_eq!(z2m(payload), Ok(expected));
    }

    #[test]
    fn example_b_tuya_tv02_maps_to_heating_automatic_without_load_state() {
        let payload = r#"{"current_heating_setpoint":20.5,"local_temperature":18.9,"local_temperature_calibration":-0.5,"preset":"auto",
 "system_mode":"heat","heating_stop":"OFF","frost_protection":"OFF","open_window":"OFF","child_lock":"UNLOCK",
 "battery_low":false,"comfort_temperature":21,"eco_temperature":17,"linkquality":98}"#;
        let expected = Reported {
            function: Some(Function::Heating),
            mode: Some(Mode::Automatic),
            setpoint: Some(celsius(2050)),
            temperature: Some(celsius(1890)),
            ..Reported::default()
        };
        assert_eq!(z2m(payload), Ok(expected));
    }

    #[test]
    fn example_c_danfoss_ally_maps_to_heating_manual_active() {
        let payload = r#"{"occupied_heating_setpoint":21,"local_temperature":20.37,"pi_heating_demand":18,"system_mode":"heat","running_state":"heat",
 "programming_operation_mode":"setpoint","setpoint_change_source":"externally","keypad_lockout":"unlock",
 "heat_required":true,"window_open_internal":1,"mounted_mode_active":false,"battery":78,"linkquality":87}"#;
        let expected = Reported {
            function: Some(Function::Heating),
            mode: Some(Mode::Manual),
            setpoint: Some(celsius(2100)),
            load_state: Some(LoadState::Active),
            temperature: Some(celsius(2037)),
            ..Reported::default()
        };
        assert_eq!(z2m(payload), Ok(expected));
    }

    #[test]
    fn example_d_bosch_bth_ra_maps_operating_mode_manual() {
        let payload = r#"{"occupied_heating_setpoint":21.5,"local_temperature":20.8,"local_temperature_calibration":0,"system_mode":"heat",
 "operating_mode":"manual","running_state":"heat","pi_heating_demand":42,"boost_heating":"OFF","window_detection":"OFF",
 "child_lock":"UNLOCK","setpoint_change_source":"manual","battery":90,"battery_low":false,"linkquality":156}"#;
        let expected = Reported {
            function: Some(Function::Heating),
            mode: Some(Mode::Manual),
            setpoint: Some(celsius(2150)),
            load_state: Some(LoadState::Active),
            temperature: Some(celsius(2080)),
            ..Reported::default()
        };
        assert_eq!(z2m(payload), Ok(expected));
    }

    #[test]
    fn example_e_sonoff_trvzb_maps_idle_to_inactive() {
        let payload = r#"{"occupied_heating_setpoint":22,"local_temperature":21.1,"local_temperature_calibration":0,"system_mode":"heat",
 "running_state":"idle","child_lock":"UNLOCK","open_window":"ON","frost_protection_temperature":7,
 "valve_opening_degree":100,"valve_closing_degree":100,"temperature_sensor_select":"internal","battery":100,"linkquality":145}"#;
        let expected = Reported {
            function: Some(Function::Heating),
            mode: Some(Mode::Manual),
            setpoint: Some(celsius(2200)),
            load_state: Some(LoadState::Inactive),
            temperature: Some(celsius(2110)),
            ..Reported::default()
        };
        assert_eq!(z2m(payload), Ok(expected));
    }

    #[test]
    fn example_f_bosch_bth_rm_in_cool_uses_the_cooling_setpoint_and_humidity() {
        let payload = r#"{"local_temperature":24.6,"humidity":52,"occupied_heating_setpoint":20,"occupied_cooling_setpoint":25,"system_mode":"cool",
 "running_state":"idle","control_sequence_of_operation":"cooling_only","operating_mode":"manual","setpoint_change_source":"manual",
 "window_detection":"OFF","boost_heating":"OFF","child_lock":"UNLOCK","battery":85,"linkquality":111}"#;
        let expected = Reported {
            function: Some(Function::Cooling),
            mode: Some(Mode::Manual),
            setpoint: Some(celsius(2500)),
            load_state: Some(LoadState::Inactive),
            temperature: Some(celsius(2460)),
            humidity: Some(Fixed(5200)),
            ..Reported::default()
        };
        assert_eq!(z2m(payload), Ok(expected));
    }

    // ---- Zigbee2MQTT rules

    #[test]
    fn tuya_property_named_online_is_not_connectivity() {
        let r = z2m(r#"{"local_temperature":20,"online":"OFF"}"#).unwrap();
        assert_eq!(
            r,
            Reported {
                temperature: Some(celsius(2000)),
                ..Reported::default()
            }
        );
        assert_eq!(
            z2m(r#"{"online":"ON","linkquality":9}"#),
            Err(PayloadError::Unmapped)
        );
    }

    #[test]
    fn function_falls_back_from_system_mode_to_running_state_to_control_sequence() {
        let cases = [
            (
                r#"{"system_mode":"heat","running_state":"cool"}"#,
                Some(Function::Heating),
            ),
            (
                r#"{"system_mode":"auto","running_state":"cool"}"#,
                Some(Function::Cooling),
            ),
            (
                r#"{"running_state":"idle","control_sequence_of_operation":"cooling_only"}"#,
                Some(Function::Cooling),
            ),
            (
                r#"{"control_sequence_of_operation":"heating_only"}"#,
                Some(Function::Heating),
            ),
            (
                r#"{"control_sequence_of_operation":"cooling_and_heating_4-pipes","local_temperature":1}"#,
                None,
            ),
        ];
        for (payload, function) in cases {
            assert_eq!(z2m(payload).unwrap().function, function, "{payload}");
        }
    }

    #[test]
    fn cooling_setpoint_is_used_only_when_function_is_cooling() {
        let cases = [
            (
                r#"{"system_mode":"heat","occupied_heating_setpoint":20,"occupied_cooling_setpoint":25}"#,
                Some(2000),
            ),
            (
                r#"{"system_mode":"cool","occupied_heating_setpoint":20}"#,
                Some(2000),
            ),
            (
                r#"{"occupied_cooling_setpoint":25,"current_heating_setpoint":19}"#,
                Some(1900),
            ),
            (
                r#"{"occupied_cooling_setpoint":25,"local_temperature":19}"#,
                None,
            ),
            (
                r#"{"occupied_heating_setpoint":20,"current_heating_setpoint":19}"#,
                Some(2000),
            ),
        ];
        for (payload, setpoint) in cases {
            assert_eq!(
                z2m(payload).unwrap().setpoint,
                setpoint.map(celsius),
                "{payload}"
            );
        }
    }

    #[test]
    fn mode_takes_the_first_rule_that_applies() {
        use Mode::*;
        let cases = [
            (r#"{"system_mode":"off","preset":"boost"}"#, Some(Off)),
            (
                r#"{"operating_mode":"pause","boost_heating":"ON"}"#,
                Some(Off),
            ),
            (r#"{"preset":"boost","frost_protection":"ON"}"#, Some(Boost)),
            (
                r#"{"boost_heating":"ON","operating_mode":"schedule"}"#,
                Some(Boost),
            ),
            (r#"{"preset":"away"}"#, Some(Protection)),
            (
                r#"{"preset":"holiday","system_mode":"heat"}"#,
                Some(Protection),
            ),
            (
                r#"{"frost_protection":"ON","preset":"manual"}"#,
                Some(Protection),
            ),
            (
                r#"{"operating_mode":"schedule","preset":"manual"}"#,
                Some(Automatic),
            ),
            (
                r#"{"operating_mode":"manual","system_mode":"auto"}"#,
                Some(Manual),
            ),
            (
                r#"{"preset":"program","system_mode":"heat"}"#,
                Some(Automatic),
            ),
            (r#"{"preset":"schedule"}"#, Some(Automatic)),
            (r#"{"preset":"comfort","system_mode":"auto"}"#, Some(Manual)),
            (r#"{"preset":"eco"}"#, Some(Manual)),
            (
                r#"{"preset":"complex","system_mode":"auto"}"#,
                Some(Automatic),
            ),
            (r#"{"system_mode":"cool"}"#, Some(Manual)),
            (r#"{"system_mode":"dry","local_temperature":20}"#, None),
        ];
        for (payload, mode) in cases {
            assert_eq!(z2m(payload).unwrap().mode, mode, "{payload}");
        }
    }

    #[test]
    fn heating_demand_decides_load_state_only_without_running_state() {
        use LoadState::*;
        let cases = [
            (r#"{"pi_heating_demand":18}"#, Some(Active)),
            (
                r#"{"pi_heating_demand":0,"local_temperature":20}"#,
                Some(Inactive),
            ),
            (
                r#"{"pi_heating_demand":50,"running_state":"idle"}"#,
                Some(Inactive),
            ),
            (r#"{"running_state":"fan_only"}"#, Some(Inactive)),
            (r#"{"running_state":"cool"}"#, Some(Active)),
            (
                r#"{"pi_heating_demand":null,"running_state":null,"local_temperature":20}"#,
                None,
            ),
        ];
        for (payload, load) in cases {
            assert_eq!(z2m(payload).unwrap().load_state, load, "{payload}");
        }
    }

    #[test]
    fn numeric_strings_are_accepted_as_numbers() {
        let r = z2m(
            r#"{"local_temperature":"21.5","occupied_heating_setpoint":" 20 ","humidity":"40.25"}"#,
        )
        .unwrap();
        let expected = Reported {
            setpoint: Some(celsius(2000)),
            temperature: Some(celsius(2150)),
            humidity: Some(Fixed(4025)),
            ..Reported::default()
        };
        assert_eq!(r, expected);
    }

    #[test]
    fn a_mapped_key_of_the_wrong_type_rejects_the_whole_message() {
        let err = z2m(r#"{"local_temperature":"abc","occupied_heating_setpoint":21}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "local_temperature: expected a number, got a non-numeric string"
        );
        let err = z2m(r#"{"local_temperature":20,"system_mode":3}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "system_mode: expected a string, got an integer"
        );
        // Even a key no rule ends up using: the heating function ignores the cooling setpoint.
        let err = z2m(r#"{"system_mode":"heat","occupied_cooling_setpoint":[25]}"#).unwrap_err();
        assert_eq!(
            err,
            PayloadError::WrongType {
                field: "occupied_cooling_setpoint".into(),
                expected: "a number",
                got: "an array"
            }
        );
        assert!(matches!(
            z2m(r#"{"boost_heating":1}"#),
            Err(PayloadError::WrongType { .. })
        ));
    }

    #[test]
    fn non_finite_and_absurd_numbers_are_out_of_range() {
        for payload in [
            r#"{"local_temperature":"NaN"}"#,
            r#"{"local_temperature":"inf"}"#,
            r#"{"local_temperature":1e300}"#,
            r#"{"local_temperature":-300}"#,
            r#"{"humidity":101}"#,
            r#"{"pi_heating_demand":-1}"#,
        ] {
            assert!(
                matches!(z2m(payload), Err(PayloadError::OutOfRange { .. })),
                "{payload}"
            );
        }
        assert_eq!(
            z2m(r#"{"local_temperature":1e300}"#)
                .unwrap_err()
                .to_string(),
            "local_temperature: value 1e+300 is out of range"
        );
    }

    #[test]
    fn null_values_are_not_reported() {
        let r =
            z2m(r#"{"local_temperature":null,"occupied_heating_setpoint":21,"system_mode":null}"#)
                .unwrap();
        assert_eq!(
            r,
            Reported {
                setpoint: Some(celsius(2100)),
                ..Reported::default()
            }
        );
        assert_eq!(
            z2m(r#"{"local_temperature":null}"#),
            Err(PayloadError::Unmapped)
        );
    }

    #[test]
    fn an_object_without_mapped_keys_is_unmapped() {
        assert_eq!(
            z2m(r#"{"battery":90,"linkquality":100,"contact":true}"#),
            Err(PayloadError::Unmapped)
        );
        assert_eq!(z2m("{}"), Err(PayloadError::Unmapped));
        assert_eq!(
            PayloadError::Unmapped.to_string(),
            "no thermostat field in payload"
        );
    }

    #[test]
    fn non_json_and_non_object_payloads_are_rejected() {
        assert_eq!(z2m("heat"), Err(PayloadError::NotJson));
        assert_eq!(z2m(""), Err(PayloadError::NotJson));
        assert_eq!(z2m_state(&[0xff, 0xfe, b'{']), Err(PayloadError::NotJson));
        assert_eq!(z2m("[1,2]"), Err(PayloadError::NotObject));
        assert_eq!(z2m("21.5"), Err(PayloadError::NotObject));
        assert_eq!(
            PayloadError::NotJson.to_string(),
            "payload is not valid JSON"
        );
        assert_eq!(
            PayloadError::NotObject.to_string(),
            "payload is not a JSON object"
        );
    }

    #[test]
    fn hugely_nested_payloads_are_rejected_without_panicking() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(z2m(&deep), Err(PayloadError::NotJson));
        let deep_inside = format!(
            r#"{{"local_temperature":20,"x":{}1{}}}"#,
            "{\"a\":".repeat(50_000),
            "}".repeat(50_000)
        );
        assert_eq!(z2m(&deep_inside), Err(PayloadError::NotJson));
        let mapping = Mapping::compile(&esphome_spec()).unwrap();
        assert_eq!(
            mapping.map("home/x/climate/state", deep.as_bytes()),
            Err(PayloadError::NotJson)
        );
        assert!(availability(deep.as_bytes()).is_err());
    }

    // ---- availability

    #[test]
    fn availability_accepts_plain_and_json_forms() {
        let cases: [(&[u8], Connectivity); 7] = [
            (b"online", Connectivity::Online),
            (b"offline", Connectivity::Offline),
            (b" Online\n", Connectivity::Online),
            (b"OFFLINE", Connectivity::Offline),
            (br#"{"state":"online"}"#, Connectivity::Online),
            (br#"{"state":"offline"}"#, Connectivity::Offline),
            (br#" { "state" : "offline" } "#, Connectivity::Offline),
        ];
        for (payload, expected) in cases {
            assert_eq!(
                availability(payload),
                Ok(Some(expected)),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn empty_availability_payload_is_a_cleared_retained_message() {
        assert_eq!(availability(b""), Ok(None));
        assert_eq!(availability(b"  \r\n"), Ok(None));
    }

    #[test]
    fn availability_rejects_anything_else() {
        assert_eq!(
            availability(b"maybe"),
            Err(PayloadError::UnknownValue {
                field: "availability".into(),
                value: "maybe".into()
            })
        );
        assert_eq!(
            availability(b"maybe").unwrap_err().to_string(),
            r#"availability: unknown value "maybe""#
        );
        assert_eq!(
            availability(br#"{"state":"asleep"}"#),
            Err(PayloadError::UnknownValue {
                field: "state".into(),
                value: "asleep".into()
            })
        );
        assert_eq!(
            availability(br#"{"state":true}"#),
            Err(PayloadError::WrongType {
                field: "state".into(),
                expected: "a string",
                got: "a boolean"
            })
        );
        assert!(matches!(
            availability(br#"{"online":true}"#),
            Err(PayloadError::UnknownValue { .. })
        ));
        assert_eq!(availability(br#"{"state":"#), Err(PayloadError::NotJson));
        assert!(availability(br#""online""#).is_err());
        assert!(availability(b"1").is_err());
        assert!(availability(&[0xff, 0x00]).is_err());
    }

    // ---- routing

    #[test]
    fn z2m_topics_route_to_state_availability_or_ignore() {
        let state = |s: &str| Route::State(s.to_owned());
        let avail = |s: &str| Route::Availability(s.to_owned());
        let cases = [
            ("zigbee2mqtt/living-room", state("living-room")),
            (
                "zigbee2mqtt/0x00158d0001234567",
                state("0x00158d0001234567"),
            ),
            (
                "zigbee2mqtt/floor1/living room",
                state("floor1/living room"),
            ),
            ("zigbee2mqtt/bridgeroom", state("bridgeroom")),
            ("zigbee2mqtt/settings/trv", state("settings/trv")),
            ("zigbee2mqtt/living-room/availability", avail("living-room")),
            ("zigbee2mqtt/floor1/trv/availability", avail("floor1/trv")),
            ("zigbee2mqtt/availability", state("availability")),
            ("zigbee2mqtt//availability", Route::Ignore),
            ("zigbee2mqtt/living-room/set", Route::Ignore),
            ("zigbee2mqtt/living-room/get", Route::Ignore),
            ("zigbee2mqtt/living-room/set/system_mode", Route::Ignore),
            (
                "zigbee2mqtt/living-room/get/local_temperature",
                Route::Ignore,
            ),
            ("zigbee2mqtt/floor1/trv/l1/set", Route::Ignore),
            ("zigbee2mqtt/bridge/state", Route::Ignore),
            ("zigbee2mqtt/bridge/response/device/rename", Route::Ignore),
            ("zigbee2mqtt/bridge", Route::Ignore),
            ("zigbee2mqtt/", Route::Ignore),
            ("zigbee2mqtt", Route::Ignore),
            ("zigbee2mqttx/trv", Route::Ignore),
            ("other/trv", Route::Ignore),
        ];
        for (topic, route) in cases {
            assert_eq!(z2m_route("zigbee2mqtt", topic), route, "{topic}");
        }
        assert_eq!(z2m_route("site/z2m/", "site/z2m/trv"), state("trv"));
    }

    #[test]
    fn topic_filters_follow_mqtt_wildcard_rules() {
        let cases = [
            ("home/+/climate/state", "home/living/climate/state", true),
            (
                "home/+/climate/state",
                "home/living/room/climate/state",
                false,
            ),
            ("home/+/climate/state", "home//climate/state", true),
            ("home/#", "home", true),
            ("home/#", "home/a/b/c", true),
            ("#", "anything/at/all", true),
            ("+", "one", true),
            ("+", "one/two", false),
            ("+/+", "/x", true),
            ("home/+", "home", false),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/#/b", "a/x/b", false),
            ("a/b+", "a/b+", false),
            ("a/b#", "a/b", false),
            ("#", "$SYS/broker/uptime", false),
            ("+/broker/uptime", "$SYS/broker/uptime", false),
            ("$SYS/#", "$SYS/broker/uptime", true),
            ("", "a", false),
            ("a/+", "a/+", false),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(
                topic_matches(filter, topic),
                expected,
                "{filter} vs {topic}"
            );
        }
    }

    // ---- generic mapping

    /// The `[sources.mqtt.mapping]` of the "esphome" source in config.md, as the config module fills it.
    fn esphome_spec() -> MappingSpec {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        MappingSpec {
            device: "{topic:1}".into(),
            availability_topic: Some("home/{device}/status".into()),
            unit: TempUnit::C,
            fields: map(&[
                ("setpoint", "/target_temperature"),
                ("temperature", "/current_temperature"),
                ("humidity", "/current_humidity"),
                ("mode", "/mode"),
                ("load_state", "/action"),
            ]),
            values: BTreeMap::from([
                (
                    "mode".to_owned(),
                    map(&[("heat", "MANUAL"), ("auto", "AUTOMATIC"), ("off", "OFF")]),
                ),
                (
                    "load_state".to_owned(),
                    map(&[
                        ("heating", "ACTIVE"),
                        ("cooling", "ACTIVE"),
                        ("idle", "INACTIVE"),
                        ("off", "INACTIVE"),
                    ]),
                ),
            ]),
        }
    }

    /// A mapping with every canonical field, the device id in the payload.
    fn full_spec() -> MappingSpec {
        let fields = Field::ALL
            .iter()
            .map(|f| (f.as_str().to_owned(), format!("/{}", f.as_str())))
            .collect();
        MappingSpec {
            device: "/id".into(),
            availability_topic: None,
            unit: TempUnit::F,
            fields,
            values: BTreeMap::from([(
                "function".to_owned(),
                BTreeMap::from([
                    ("1".to_owned(), "HEATING".to_owned()),
                    ("2".to_owned(), "COOLING".to_owned()),
                ]),
            )]),
        }
    }

    #[test]
    fn config_example_maps_an_esphome_like_payload() {
        let mapping = Mapping::compile(&esphome_spec()).unwrap();
        let topic = "home/living-room/climate/state";
        assert!(topic_matches("home/+/climate/state", topic));
        let payload = br#"{"mode":"heat","target_temperature":21.5,"current_temperature":"20.1",
            "current_humidity":45,"action":"heating","fan_mode":"auto","preset":"comfort"}"#;
        let expected = Reported {
            mode: Some(Mode::Manual),
            setpoint: Some(celsius(2150)),
            load_state: Some(LoadState::Active),
            temperature: Some(celsius(2010)),
            humidity: Some(Fixed(4500)),
            ..Reported::default()
        };
        assert_eq!(
            mapping.map(topic, payload),
            Ok(("living-room".to_owned(), expected))
        );
        let off = mapping
            .map(
                "home/office/climate/state",
                br#"{"mode":"OFF","action":"off"}"#,
            )
            .unwrap();
        let expected = Reported {
            mode: Some(Mode::Off),
            load_state: Some(LoadState::Inactive),
            ..Reported::default()
        };
        assert_eq!(off, ("office".to_owned(), expected));
    }

    #[test]
    fn enum_values_use_the_value_map_then_the_canonical_name() {
        let mut spec = esphome_spec();
        spec.values
            .get_mut("mode")
            .unwrap()
            .insert("Auto".into(), "BOOST".into());
        let mapping = Mapping::compile(&spec).unwrap();
        let mode = |v: &str| {
            mapping
                .map("home/x/y", format!(r#"{{"mode":{v}}}"#).as_bytes())
                .map(|(_, r)| r.mode)
        };
        assert_eq!(mode(r#""Auto""#), Ok(Some(Mode::Boost)), "exact match wins");
        assert_eq!(
            mode(r#""auto""#),
            Ok(Some(Mode::Automatic)),
            "exact match wins"
        );
        assert_eq!(
            mode(r#""HEAT""#),
            Ok(Some(Mode::Manual)),
            "case-insensitive match"
        );
        assert_eq!(
            mode(r#""protection""#),
            Ok(Some(Mode::Protection)),
            "canonical name"
        );
        assert_eq!(
            mode(r#""fan_only""#),
            Err(PayloadError::UnknownValue {
                field: "/mode (mode)".into(),
                value: "fan_only".into()
            })
        );
        assert_eq!(
            mode("true"),
            Err(PayloadError::WrongType {
                field: "/mode (mode)".into(),
                expected: "a string",
                got: "a boolean"
            })
        );
    }

    #[test]
    fn booleans_map_connectivity_and_load_state_and_integers_use_the_value_map() {
        let mapping = Mapping::compile(&full_spec()).unwrap();
        let payload = br#"{"id":"fcu-1","connectivity":true,"load_state":false,"function":2}"#;
        let expected = Reported {
            function: Some(Function::Cooling),
            load_state: Some(LoadState::Inactive),
            connectivity: Some(Connectivity::Online),
            ..Reported::default()
        };
        assert_eq!(
            mapping.map("t", payload),
            Ok(("fcu-1".to_owned(), expected))
        );
        assert_eq!(
            mapping.map("t", br#"{"id":"x","function":3}"#),
            Err(PayloadError::UnknownValue {
                field: "/function (function)".into(),
                value: "3".into()
            })
        );
        assert!(matches!(
            mapping.map("t", br#"{"id":"x","function":true}"#),
            Err(PayloadError::WrongType { .. })
        ));
    }

    #[test]
    fn every_field_kind_maps_with_the_configured_unit() {
        let mapping = Mapping::compile(&full_spec()).unwrap();
        let payload =
            br#"{"id":42,"function":"heating","mode":"manual","setpoint":70.5,"program":3,
            "activation_time":"2026-11-23T10:15:02.481Z","load_state":"ACTIVE","temperature":"68",
            "humidity":40,"connectivity":"offline","extra":[1,2]}"#;
        let fahrenheit = |h| Temperature {
            value: Fixed(h),
            unit: TempUnit::F,
        };
        let expected = Reported {
            function: Some(Function::Heating),
            mode: Some(Mode::Manual),
            setpoint: Some(fahrenheit(7050)),
            program: Some(3),
            activation_time: parse_rfc3339_ms("2026-11-23T10:15:02.481Z"),
            load_state: Some(LoadState::Active),
            temperature: Some(fahrenheit(6800)),
            humidity: Some(Fixed(4000)),
            connectivity: Some(Connectivity::Offline),
        };
        assert_eq!(mapping.map("t", payload), Ok(("42".to_owned(), expected)));
        let epoch = mapping
            .map(
                "t",
                br#"{"id":"a","activation_time":1700000000,"program":"7"}"#,
            )
            .unwrap()
            .1;
        assert_eq!(epoch.activation_time, Some(1_700_000_000_000));
        assert_eq!(epoch.program, Some(7));
    }

    #[test]
    fn bad_generic_values_name_the_pointer_and_field() {
        let mapping = Mapping::compile(&full_spec()).unwrap();
        let err = |payload: &str| mapping.map("t", payload.as_bytes()).unwrap_err();
        assert_eq!(
            err(r#"{"id":"a","setpoint":"warm"}"#).to_string(),
            "/setpoint (setpoint): expected a number, got a non-numeric string"
        );
        assert_eq!(
            err(r#"{"id":"a","temperature":-500}"#).to_string(),
            "/temperature (temperature): value -500 is out of range"
        );
        assert!(matches!(
            err(r#"{"id":"a","program":-1}"#),
            PayloadError::OutOfRange { .. }
        ));
        assert!(matches!(
            err(r#"{"id":"a","program":4294967296}"#),
            PayloadError::OutOfRange { .. }
        ));
        assert!(matches!(
            err(r#"{"id":"a","program":1.5}"#),
            PayloadError::WrongType {
                got: "a floating-point number",
                ..
            }
        ));
        assert!(matches!(
            err(r#"{"id":"a","activation_time":"yesterday"}"#),
            PayloadError::UnknownValue { .. }
        ));
        assert!(matches!(
            err(r#"{"id":"a","activation_time":-5}"#),
            PayloadError::OutOfRange { .. }
        ));
        assert!(matches!(
            err(r#"{"id":"a","activation_time":1.5}"#),
            PayloadError::WrongType { .. }
        ));
        assert!(matches!(
            err(r#"{"id":"a","humidity":true}"#),
            PayloadError::WrongType {
                got: "a boolean",
                ..
            }
        ));
    }

    /// Issue 11 item 18: an id over 128 bytes or with a control character is malformed,
    /// whether it comes from a topic level or from the payload.
    #[test]
    fn device_ids_over_128_bytes_or_with_control_characters_are_refused() {
        use crate::sources::DeviceIdError;
        let by_topic = Mapping::compile(&esphome_spec()).unwrap();
        let payload = br#"{"mode":"heat"}"#;
        let long = "x".repeat(129);
        let err = by_topic
            .map(&format!("home/{long}/climate/state"), payload)
            .unwrap_err();
        assert_eq!(
            err,
            PayloadError::BadDeviceId {
                id: format!("\"{}…\"", "x".repeat(32)),
                problem: DeviceIdError::TooLong(129)
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "device id \"{}…\": is 129 bytes long; at most 128 are accepted",
                "x".repeat(32)
            )
        );
        assert_eq!(err.kind(), "bad_device_id");
        let ok = "x".repeat(128);
        assert_eq!(
            by_topic
                .map(&format!("home/{ok}/climate/state"), payload)
                .map(|(d, _)| d),
            Ok(ok)
        );
        let by_pointer = Mapping::compile(&full_spec()).unwrap();
        let device = |p: &str| by_pointer.map("t", p.as_bytes()).map(|(d, _)| d);
        let err = device(r#"{"id":"evil\u001b[2J\nroom","mode":"OFF"}"#).unwrap_err();
        assert_eq!(
            err,
            PayloadError::BadDeviceId {
                id: r#""evil\u{1b}[2J\nroom""#.into(),
                problem: DeviceIdError::Control
            }
        );
        assert_eq!(
            err.to_string(),
            r#"device id "evil\u{1b}[2J\nroom": contains a control character"#
        );
        assert_eq!(
            device(&format!(r#"{{"id":"{}","mode":"OFF"}}"#, "é".repeat(65))),
            Err(PayloadError::BadDeviceId {
                id: format!("\"{}…\"", "é".repeat(32)),
                problem: DeviceIdError::TooLong(130)
            })
        );
    }

    #[test]
    fn device_id_comes_from_a_topic_level_or_a_pointer_and_must_not_be_empty() {
        let by_topic = Mapping::compile(&esphome_spec()).unwrap();
        let payload = br#"{"mode":"heat"}"#;
        assert_eq!(
            by_topic.map("home//climate/state", payload),
            Err(PayloadError::NoDevice {
                at: "topic level 1".into()
            })
        );
        assert_eq!(
            by_topic.map("home", payload),
            Err(PayloadError::NoDevice {
                at: "topic level 1".into()
            })
        );
        let by_pointer = Mapping::compile(&full_spec()).unwrap();
        let device = |p: &str| by_pointer.map("t", p.as_bytes()).map(|(d, _)| d);
        assert_eq!(device(r#"{"id":"trv-1","mode":"OFF"}"#), Ok("trv-1".into()));
        assert_eq!(device(r#"{"id":-7,"mode":"OFF"}"#), Ok("-7".into()));
        assert_eq!(
            device(r#"{"mode":"OFF"}"#),
            Err(PayloadError::NoDevice { at: "/id".into() })
        );
        assert_eq!(
            device(r#"{"id":"","mode":"OFF"}"#),
            Err(PayloadError::NoDevice { at: "/id".into() })
        );
        assert_eq!(
            device(r#"{"id":null,"mode":"OFF"}"#)
                .unwrap_err()
                .to_string(),
            "no device id at /id"
        );
        assert_eq!(
            device(r#"{"id":1.5,"mode":"OFF"}"#),
            Err(PayloadError::WrongType {
                field: "/id".into(),
                expected: "a string or an integer",
                got: "a floating-point number"
            })
        );
        assert_eq!(
            device(r#"{"id":"x","battery":3}"#),
            Err(PayloadError::Unmapped)
        );
        assert_eq!(
            device(r#"{"id":"x","mode":null}"#),
            Err(PayloadError::Unmapped)
        );
        assert_eq!(by_pointer.map("t", b"[]"), Err(PayloadError::NotObject));
    }

    #[test]
    fn nested_pointers_and_escapes_reach_into_the_payload() {
        let spec = MappingSpec {
            device: "/dev/name".into(),
            availability_topic: None,
            unit: TempUnit::C,
            fields: BTreeMap::from([
                ("temperature".to_owned(), "/sensors/0/t".to_owned()),
                ("setpoint".to_owned(), "/a~1b/sp".to_owned()),
            ]),
            values: BTreeMap::new(),
        };
        let mapping = Mapping::compile(&spec).unwrap();
        let payload = br#"{"dev":{"name":"n"},"sensors":[{"t":19}],"a/b":{"sp":21}}"#;
        let expected = Reported {
            setpoint: Some(celsius(2100)),
            temperature: Some(celsius(1900)),
            ..Reported::default()
        };
        assert_eq!(mapping.map("t", payload), Ok(("n".to_owned(), expected)));
    }

    #[test]
    fn availability_topic_device_spans_one_or_more_whole_levels() {
        let mapping = Mapping::compile(&esphome_spec()).unwrap();
        assert_eq!(
            mapping.availability_device("home/living-room/status"),
            Some("living-room".into())
        );
        assert_eq!(
            mapping.availability_device("home/floor1/office/status"),
            Some("floor1/office".into())
        );
        assert_eq!(mapping.availability_device("home/status"), None);
        assert_eq!(mapping.availability_device("home//status"), None);
        assert_eq!(mapping.availability_device("home/x/state"), None);
        assert_eq!(mapping.availability_device("office/x/status"), None);
        let mut spec = esphome_spec();
        spec.availability_topic = Some("{device}".into());
        let whole = Mapping::compile(&spec).unwrap();
        assert_eq!(whole.availability_device("a/b"), Some("a/b".into()));
        assert_eq!(
            Mapping::compile(&full_spec())
                .unwrap()
                .availability_device("home/x/status"),
            None
        );
    }

    #[test]
    fn compile_reports_every_problem_with_its_key() {
        let spec = MappingSpec {
            device: "topic1".into(),
            availability_topic: Some("home/status".into()),
            unit: TempUnit::C,
            fields: BTreeMap::from([
                ("setpointx".to_owned(), "/sp".to_owned()),
                ("temperature".to_owned(), "current".to_owned()),
                ("humidity".to_owned(), "/h~2".to_owned()),
                ("load_state".to_owned(), "/action".to_owned()),
            ]),
            values: BTreeMap::from([
                (
                    "mode".to_owned(),
                    BTreeMap::from([("heat".to_owned(), "HEATING".to_owned())]),
                ),
                (
                    "setpoint".to_owned(),
                    BTreeMap::from([("x".to_owned(), "y".to_owned())]),
                ),
                ("fan".to_owned(), BTreeMap::new()),
                (
                    "load_state".to_owned(),
                    BTreeMap::from([
                        ("on".to_owned(), "RUNNING".to_owned()),
                        ("idle".to_owned(), "inactive".to_owned()),
                    ]),
                ),
            ]),
        };
        let problems = Mapping::compile(&spec).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "device",
                "availability_topic",
                "fields.humidity",
                "fields.setpointx",
                "fields.temperature",
                "values.fan",
                "values.load_state.on",
                "values.mode.heat",
                "values.mode",
                "values.setpoint",
            ]
        );
        let problem = |key: &str| {
            problems
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, p)| p.as_str())
                .unwrap()
        };
        assert_eq!(
            problem("values.mode.heat"),
            r#""HEATING" is not a valid value here; expected one of AUTOMATIC, MANUAL, BOOST, OFF, PROTECTION"#
        );
        assert_eq!(
            problem("fields.temperature"),
            r#"JSON pointer "current" must start with /"#
        );
        assert!(problem("fields.setpointx").starts_with(r#"unknown canonical field "setpointx""#));
        assert!(problem("values.setpoint").contains("not an enum field"));
        assert!(problem("values.mode").contains("no JSON pointer"));
        assert!(problem("availability_topic").contains("{device}"));
    }

    #[test]
    fn compile_rejects_bad_device_rules_and_availability_patterns() {
        let problems_for = |device: &str, availability: Option<&str>| {
            let mut spec = esphome_spec();
            spec.device = device.into();
            spec.availability_topic = availability.map(str::to_owned);
            Mapping::compile(&spec).err().unwrap_or_default()
        };
        for device in [
            "{topic:}",
            "{topic:-1}",
            "{topic:+1}",
            "{topic:x}",
            "{topic:99999999999999999999999}",
            "",
            "id",
            "/a~",
        ] {
            assert_eq!(problems_for(device, None).len(), 1, "{device}");
        }
        for ok in ["{topic:0}", "/id", "/a~0b"] {
            assert!(problems_for(ok, None).is_empty(), "{ok}");
        }
        for pattern in [
            "home/x{device}/status",
            "home/{device}/{device}",
            "+/{device}",
            "{device}/#",
            "",
        ] {
            assert_eq!(problems_for("/id", Some(pattern)).len(), 1, "{pattern}");
        }
        let mut spec = esphome_spec();
        spec.fields.clear();
        spec.values.clear();
        assert_eq!(
            Mapping::compile(&spec).unwrap_err(),
            [(
                "fields".to_owned(),
                "map at least one canonical field to a JSON pointer".to_owned()
            )]
        );
    }

    #[test]
    fn long_values_are_cut_in_error_messages() {
        let long = "x".repeat(500);
        let err = availability(long.as_bytes()).unwrap_err();
        let PayloadError::UnknownValue { value, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(value.chars().count(), SNIPPET_CHARS + 1);
        assert!(value.ends_with('…'));
    }

    // ---- never panics

    fn json_value() -> impl Strategy<Value = Value> {
        let words = prop::sample::select(vec![
            "heat",
            "cool",
            "auto",
            "off",
            "idle",
            "fan_only",
            "ON",
            "OFF",
            "boost",
            "away",
            "holiday",
            "manual",
            "schedule",
            "pause",
            "comfort",
            "heating_only",
            "cooling_only",
            "online",
            "offline",
            "21.5",
            " 7 ",
            "NaN",
            "-inf",
            "1e400",
            "",
            "2026-11-23T10:15:02Z",
            "MANUAL",
            "ACTIVE",
            "é",
            "~1",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            (-50.0f64..150.0).prop_map(Value::from),
            words.prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn key() -> impl Strategy<Value = String> {
        let known = prop::sample::select(vec![
            "local_temperature",
            "humidity",
            "occupied_heating_setpoint",
            "current_heating_setpoint",
            "occupied_cooling_setpoint",
            "system_mode",
            "running_state",
            "control_sequence_of_operation",
            "operating_mode",
            "preset",
            "boost_heating",
            "frost_protection",
            "pi_heating_demand",
            "online",
            "id",
            "function",
            "mode",
            "setpoint",
            "program",
            "activation_time",
            "load_state",
            "temperature",
            "connectivity",
            "target_temperature",
            "current_temperature",
            "current_humidity",
            "action",
            "state",
        ]);
        prop_oneof![4 => known.prop_map(str::to_owned), 1 => "[a-z_/~]{0,6}"]
    }

    fn payload_object() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::btree_map(key(), json_value(), 0..14).prop_map(|m| {
            serde_json::to_vec(&Value::Object(m.into_iter().collect())).unwrap_or_default()
        })
    }

    /// Ok must never carry an empty report, whatever the input.
    fn check_all(topic: &str, payload: &[u8]) {
        if let Ok(r) = z2m_state(payload) {
            assert!(!r.is_empty());
        }
        for spec in [esphome_spec(), full_spec()] {
            let mapping = Mapping::compile(&spec).unwrap();
            if let Ok((device, r)) = mapping.map(topic, payload) {
                assert!(!device.is_empty() && !r.is_empty());
            }
            let _ = mapping.availability_device(topic);
        }
        let _ = availability(payload);
        let _ = z2m_route("zigbee2mqtt", topic);
        let _ = topic_matches(topic, "home/a/climate/state");
    }

    proptest! {
        #[test]
        fn parsers_never_panic_on_arbitrary_bytes(payload in prop::collection::vec(any::<u8>(), 0..300), topic in ".{0,40}") {
            check_all(&topic, &payload);
        }

        #[test]
        fn parsers_never_panic_on_arbitrary_json(payload in payload_object(), topic in "[a-z/+#$]{0,24}") {
            check_all(&topic, &payload);
        }

        #[test]
        fn parsers_never_panic_on_arbitrary_json_values(value in json_value()) {
            check_all("home/x/climate/state", &serde_json::to_vec(&value).unwrap_or_default());
        }
    }
}
