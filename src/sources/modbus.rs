//! Modbus register maps: the file format (config.md "A Modbus map file"), the presets shipped in
//! `config/modbus/` (embedded), grouping registers into read requests, and decoding register
//! words into canonical fields.
//!
//! Pure: no I/O except reading a map file by path. The poller lives in `modbus_source.rs`.
//!
//! ```toml
//! [[registers]]
//! field = "setpoint"   # canonical field: setpoint, temperature, humidity, function, mode, load_state, program, connectivity
//! address = 102        # raw 0-based PDU address (a manual's 40103 is address 102)
//! function = 3         # 3 = holding (default), 4 = input
//! type = "u16"         # u16 (default), s16, u32, s32, f32
//! word_order = "big"   # 32-bit types: "big" = high word first (default), "little"
//! scale = 0.02         # value = raw × scale + offset
//! offset = 0.0
//! invalid = [65535]    # raw values meaning "no reading": the field is not reported
//! map = { 1 = "MANUAL", 3 = "AUTOMATIC", "*" = "OFF" }   # enum fields; "*" = any other value
//! unit = "C"           # temperatures: C (default) or F
//! ```
//! A field appears in one register, except `load_state`, which may be read from several (heating
//! and cooling outputs): it is ACTIVE when any of them says ACTIVE.

use crate::model::{
    Connectivity, Field, Fixed, Function, LoadState, Mode, Reported, TempUnit, Temperature,
};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Presets shipped in `config/modbus/`, embedded in the binary: (name, TOML).
pub const PRESETS: &[(&str, &str)] = &[
    (
        "siemens-rdf302",
        include_str!("../../config/modbus/siemens-rdf302.toml"),
    ),
    (
        "beca-bht-006",
        include_str!("../../config/modbus/beca-bht-006.toml"),
    ),
    (
        "engo-efan",
        include_str!("../../config/modbus/engo-efan.toml"),
    ),
];

/// Most registers one Modbus read may return (the protocol's limit is 125).
pub const MAX_READ: u16 = 125;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    /// Free text (the device and the manual it follows).
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    registers: Vec<RegisterSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterSpec {
    field: String,
    address: u16,
    #[serde(default = "default_function")]
    function: u8,
    #[serde(default, rename = "type")]
    ty: RegType,
    #[serde(default)]
    word_order: WordOrder,
    #[serde(default = "default_scale")]
    scale: f64,
    #[serde(default)]
    offset: f64,
    #[serde(default)]
    invalid: Vec<i64>,
    #[serde(default)]
    map: BTreeMap<String, String>,
    #[serde(default = "default_unit")]
    unit: TempUnit,
}

const fn default_function() -> u8 {
    3
}
const fn default_scale() -> f64 {
    1.0
}
const fn default_unit() -> TempUnit {
    TempUnit::C
}

/// Register data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RegType {
    #[default]
    U16,
    S16,
    U32,
    S32,
    F32,
}

impl RegType {
    /// Registers (16-bit words) the type occupies.
    pub fn words(self) -> u16 {
        match self {
            RegType::U16 | RegType::S16 => 1,
            _ => 2,
        }
    }
}

/// Order of the two words of a 32-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// High word at the lower address (Modbus convention).
    #[default]
    Big,
    /// Low word at the lower address.
    Little,
}

/// A canonical enum value a register value maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Canon {
    Function(Function),
    Mode(Mode),
    LoadState(LoadState),
    Connectivity(Connectivity),
}

/// One checked register.
#[derive(Debug, Clone)]
pub struct Register {
    pub field: Field,
    pub function: u8,
    pub address: u16,
    pub ty: RegType,
    word_order: WordOrder,
    scale: f64,
    offset: f64,
    invalid: Vec<i64>,
    values: Vec<(i64, Canon)>,
    fallback: Option<Canon>,
    unit: TempUnit,
}

/// One read request: `count` registers from `start` with function 3 or 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub function: u8,
    pub start: u16,
    pub count: u16,
}

/// A checked register map with its read plan.
#[derive(Debug, Clone)]
pub struct RegisterMap {
    pub registers: Vec<Register>,
    /// Contiguous runs of mapped registers, at most [`MAX_READ`] each; never reads an
    /// unmapped gap (devices answer "illegal data address" for unimplemented registers).
    pub requests: Vec<ReadRequest>,
}

/// Loads a map: a preset name from [`PRESETS`], or the path of a map file.
///
/// # Errors
/// A message naming the preset or file and every problem found (`registers[2].type: …`).
pub fn load_map(name_or_path: &str) -> Result<RegisterMap, String> {
    if let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name_or_path) {
        return parse_map(text).map_err(|e| format!("preset {name_or_path}: {e}"));
    }
    if !name_or_path.contains('/') {
        let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "{name_or_path:?} is not a preset ({}) nor a file path",
            names.join(", ")
        ));
    }
    let text = read_map_file(std::path::Path::new(name_or_path))?;
    parse_map(&text).map_err(|e| format!("{name_or_path}: {e}"))
}

/// Largest map file read (a real map is a few KiB).
const MAX_MAP_BYTES: u64 = 1024 * 1024;

/// Reads a map file: a regular file of at most [`MAX_MAP_BYTES`], UTF-8
/// ([`crate::config::read_regular_file`]: a device node, FIFO or directory is refused before
/// anything is read, so `map = "/dev/zero"` cannot read for ever).
fn read_map_file(path: &std::path::Path) -> Result<String, String> {
    let shown = path.display();
    let buf =
        crate::config::read_regular_file(path, "map file ", MAX_MAP_BYTES, |_| Ok(()), &|| {
            format!("map file {shown} is larger than {MAX_MAP_BYTES} bytes")
        })?;
    String::from_utf8(buf).map_err(|_| format!("map file {shown} is not UTF-8 text"))
}

/// Parses and checks a map file's text.
///
/// # Errors
/// Every problem found, joined with `; `.
pub fn parse_map(text: &str) -> Result<RegisterMap, String> {
    let file: MapFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let mut problems = Vec::new();
    let mut registers = Vec::new();
    let mut fields_seen: BTreeMap<Field, usize> = BTreeMap::new();
    if file.registers.is_empty() {
        problems.push("registers: at least one [[registers]] is needed".to_string());
    }
    for (i, r) in file.registers.iter().enumerate() {
        let k = format!("registers[{i}]");
        let Some(field) = Field::parse(&r.field) else {
            problems.push(format!("{k}.field: unknown field {:?}", r.field));
            continue;
        };
        if field == Field::ActivationTime {
            problems.push(format!(
                "{k}.field: activation_time cannot be read from a register"
            ));
            continue;
        }
        if let Some(j) = fields_seen.insert(field, i)
            && field != Field::LoadState
        {
            problems.push(format!(
                "{k}.field: {} is already read from registers[{j}]",
                field.as_str()
            ));
        }
        if r.function != 3 && r.function != 4 {
            problems.push(format!(
                "{k}.function: must be 3 (holding) or 4 (input), not {}",
                r.function
            ));
        }
        if u32::from(r.address) + u32::from(r.ty.words()) > 65536 {
            problems.push(format!("{k}.address: the value runs past register 65535"));
        }
        if !r.scale.is_finite() || r.scale == 0.0 || !r.offset.is_finite() {
            problems.push(format!(
                "{k}.scale: scale must be a non-zero number and offset a number"
            ));
        }
        let is_enum = matches!(
            field,
            Field::Function | Field::Mode | Field::LoadState | Field::Connectivity
        );
        let mut values = Vec::new();
        let mut fallback = None;
        if is_enum && r.map.is_empty() {
            problems.push(format!(
                "{k}.map: {} needs a map from register values to canonical values",
                field.as_str()
            ));
        }
        if !is_enum && !r.map.is_empty() {
            problems.push(format!(
                "{k}.map: only enum fields (function, mode, load_state, connectivity) take a map"
            ));
        }
        for (raw, canon) in &r.map {
            let Some(c) = canon_of(field, canon) else {
                problems.push(format!(
                    "{k}.map.{raw}: {canon:?} is not a canonical {} value",
                    field.as_str()
                ));
                continue;
            };
            if raw == "*" {
                fallback = Some(c);
            } else if let Ok(v) = raw.parse::<i64>() {
                values.push((v, c));
            } else {
                problems.push(format!(
                    "{k}.map.{raw}: keys are integer register values or \"*\""
                ));
            }
        }
        registers.push(Register {
            field,
            function: r.function,
            address: r.address,
            ty: r.ty,
            word_order: r.word_order,
            scale: r.scale,
            offset: r.offset,
            invalid: r.invalid.clone(),
            values,
            fallback,
            unit: r.unit,
        });
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let requests = plan(&registers);
    Ok(RegisterMap {
        registers,
        requests,
    })
}

fn canon_of(field: Field, s: &str) -> Option<Canon> {
    match field {
        Field::Function => Function::parse(s).map(Canon::Function),
        Field::Mode => Mode::parse(s).map(Canon::Mode),
        Field::LoadState => LoadState::parse(s).map(Canon::LoadState),
        Field::Connectivity => Connectivity::parse(s).map(Canon::Connectivity),
        _ => None,
    }
}

/// Groups registers into contiguous read requests per function.
fn plan(registers: &[Register]) -> Vec<ReadRequest> {
    let mut spans: Vec<(u8, u32, u32)> = registers
        .iter()
        .map(|r| {
            let start = u32::from(r.address);
            (r.function, start, start + u32::from(r.ty.words()))
        })
        .collect();
    spans.sort_unstable();
    let mut out: Vec<ReadRequest> = Vec::new();
    for (function, start, end) in spans {
        if let Some(last) = out.last_mut() {
            let last_end = u32::from(last.start) + u32::from(last.count);
            if last.function == function
                && start <= last_end
                && end.max(last_end) - u32::from(last.start) <= u32::from(MAX_READ)
            {
                last.count = (end.max(last_end) - u32::from(last.start)) as u16;
                continue;
            }
        }
        out.push(ReadRequest {
            function,
            start: start as u16,
            count: (end - start) as u16,
        });
    }
    out
}

/// A register value the map could not use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    pub field: Field,
    pub address: u16,
    pub raw: i64,
    pub why: &'static str,
}

impl RegisterMap {
    /// Decodes one poll: `words[i]` holds the answer to `requests[i]`. Registers holding an
    /// `invalid` value are skipped; values the map cannot use are returned as [`BadValue`]s and
    /// skipped (the rest of the poll still counts).
    pub fn decode(&self, words: &[Vec<u16>]) -> (Reported, Vec<BadValue>) {
        let mut r = Reported::default();
        let mut bad = Vec::new();
        let mut load_active: Option<bool> = None;
        for reg in &self.registers {
            let Some(raw) = self.raw_value(reg, words) else {
                bad.push(BadValue {
                    field: reg.field,
                    address: reg.address,
                    raw: 0,
                    why: "missing from the answer",
                });
                continue;
            };
            let int_raw = raw as i64;
            if reg.invalid.contains(&int_raw) && raw.fract() == 0.0 {
                continue;
            }
            let mut bad_value = |why| {
                bad.push(BadValue {
                    field: reg.field,
                    address: reg.address,
                    raw: int_raw,
                    why,
                })
            };
            let scaled = raw * reg.scale + reg.offset;
            match reg.field {
                Field::Setpoint | Field::Temperature => {
                    match Fixed::from_f64(scaled).filter(|_| scaled.abs() < 1000.0) {
                        Some(v) => {
                            let t = Some(Temperature {
                                value: v,
                                unit: reg.unit,
                            });
                            if reg.field == Field::Setpoint {
                                r.setpoint = t;
                            } else {
                                r.temperature = t;
                            }
                        }
                        None => bad_value("temperature out of range"),
                    }
                }
                Field::Humidity => match Fixed::from_f64(scaled) {
                    Some(v) if (0.0..=100.0).contains(&scaled) => r.humidity = Some(v),
                    _ => bad_value("humidity outside 0–100 %"),
                },
                Field::Program => {
                    if scaled >= 0.0 && scaled <= f64::from(u32::MAX) && scaled.fract() == 0.0 {
                        r.program = Some(scaled as u32);
                    } else {
                        bad_value("program is not a non-negative integer");
                    }
                }
                _ => {
                    let c = reg
                        .values
                        .iter()
                        .find(|(v, _)| *v == int_raw && raw.fract() == 0.0)
                        .map(|(_, c)| *c)
                        .or(reg.fallback);
                    match c {
                        Some(Canon::Function(f)) => r.function = Some(f),
                        Some(Canon::Mode(m)) => r.mode = Some(m),
                        Some(Canon::LoadState(l)) => {
                            let active = l == LoadState::Active;
                            load_active = Some(load_active.unwrap_or(false) || active);
                        }
                        Some(Canon::Connectivity(c)) => r.connectivity = Some(c),
                        None => bad_value("value not in the register's map"),
                    }
                }
            }
        }
        r.load_state = load_active.map(|a| {
            if a {
                LoadState::Active
            } else {
                LoadState::Inactive
            }
        });
        (r, bad)
    }

    /// The register's raw value as a number, from the answers.
    fn raw_value(&self, reg: &Register, words: &[Vec<u16>]) -> Option<f64> {
        let (i, req) = self.requests.iter().enumerate().find(|(_, q)| {
            q.function == reg.function
                && reg.address >= q.start
                && u32::from(reg.address) + u32::from(reg.ty.words())
                    <= u32::from(q.start) + u32::from(q.count)
        })?;
        let data = words.get(i)?;
        let at = usize::from(reg.address - req.start);
        let w0 = *data.get(at)?;
        if reg.ty.words() == 1 {
            return Some(match reg.ty {
                RegType::S16 => f64::from(w0 as i16),
                _ => f64::from(w0),
            });
        }
        let w1 = *data.get(at + 1)?;
        let (hi, lo) = match reg.word_order {
            WordOrder::Big => (w0, w1),
            WordOrder::Little => (w1, w0),
        };
        let v = (u32::from(hi) << 16) | u32::from(lo);
        let f = match reg.ty {
            RegType::S32 => f64::from(v as i32),
            RegType::F32 => f64::from(f32::from_bits(v)),
            _ => f64::from(v),
        };
        f.is_finite().then_some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> RegisterMap {
        parse_map(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_preset_loads() {
        for (name, _) in PRESETS {
            let m = load_map(name).unwrap_or_else(|e| panic!("{e}"));
            assert!(!m.requests.is_empty(), "{name}");
            assert!(
                m.requests
                    .iter()
                    .all(|r| r.count >= 1 && r.count <= MAX_READ)
            );
        }
    }

    #[test]
    fn rdf302_plan_and_decode() {
        let m = load_map("siemens-rdf302").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            m.requests,
            vec![
                ReadRequest {
                    function: 3,
                    start: 106,
                    count: 1
                },
                ReadRequest {
                    function: 4,
                    start: 1000,
                    count: 1
                },
                ReadRequest {
                    function: 4,
                    start: 1002,
                    count: 5
                },
            ]
        );
        // Heating (changeover 1), Comfort, 21.5 °C room (×50 = 1075), setpoint 22 (1100),
        // heating output 40 %, cooling output 0.
        let (r, bad) = m.decode(&[vec![1], vec![1], vec![1075, 1100, 40, 0, 0]]);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(r.function, Some(Function::Heating));
        assert_eq!(r.mode, Some(Mode::Manual));
        assert_eq!(r.temperature.map(|t| t.value), Some(Fixed(2150)));
        assert_eq!(r.setpoint.map(|t| t.value), Some(Fixed(2200)));
        assert_eq!(r.load_state, Some(LoadState::Active));
        // Out-of-service sensor (0xFFFF) is not reported; cooling output alone is ACTIVE.
        let (r, _) = m.decode(&[vec![0], vec![4], vec![0xFFFF, 1100, 0, 100, 0]]);
        assert_eq!(r.temperature, None);
        assert_eq!(r.function, Some(Function::Cooling));
        assert_eq!(r.mode, Some(Mode::Protection));
        assert_eq!(r.load_state, Some(LoadState::Active));
        let (r, _) = m.decode(&[vec![0], vec![3], vec![1000, 1100, 0, 0, 0]]);
        assert_eq!(r.load_state, Some(LoadState::Inactive));
    }

    #[test]
    fn types_word_order_and_scale() {
        let m = map(r#"
[[registers]]
field = "temperature"
address = 0
type = "s16"
scale = 0.1
[[registers]]
field = "setpoint"
address = 1
type = "f32"
[[registers]]
field = "humidity"
address = 3
type = "u32"
word_order = "little"
scale = 0.01
[[registers]]
field = "program"
address = 5
type = "s32"
"#);
        assert_eq!(
            m.requests,
            vec![ReadRequest {
                function: 3,
                start: 0,
                count: 7
            }]
        );
        let f = 21.5f32.to_bits();
        let words = vec![(-55i16) as u16, (f >> 16) as u16, f as u16, 4550, 0, 0, 3];
        let (r, bad) = m.decode(&[words]);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(r.temperature.map(|t| t.value), Some(Fixed(-550)));
        assert_eq!(r.setpoint.map(|t| t.value), Some(Fixed(2150)));
        assert_eq!(r.humidity, Some(Fixed(4550)));
        assert_eq!(r.program, Some(3));
    }

    #[test]
    fn unmapped_enum_values_are_reported_not_guessed() {
        let m = map(r#"
[[registers]]
field = "mode"
address = 2
map = { 0 = "AUTOMATIC", 1 = "MANUAL" }
[[registers]]
field = "setpoint"
address = 4
scale = 0.1
"#);
        let (r, bad) = m.decode(&[vec![7], vec![215]]);
        assert_eq!(r.mode, None);
        assert_eq!(r.setpoint.map(|t| t.value), Some(Fixed(2150)));
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].raw, 7);
    }

    #[test]
    fn problems_name_the_register_and_key() {
        let e = parse_map(
            r#"
[[registers]]
field = "colour"
address = 1
[[registers]]
field = "mode"
address = 2
function = 5
[[registers]]
field = "setpoint"
address = 3
map = { 1 = "MANUAL" }
[[registers]]
field = "mode"
address = 4
map = { x = "MANUAL", 2 = "WARM" }
"#,
        )
        .err()
        .unwrap_or_default();
        for want in [
            "registers[0].field: unknown field \"colour\"",
            "registers[1].function: must be 3 (holding) or 4 (input), not 5",
            "registers[1].map: mode needs a map",
            "registers[2].map: only enum fields",
            "registers[3].field: mode is already read from registers[1]",
            "registers[3].map.x: keys are integer register values or \"*\"",
            "registers[3].map.2: \"WARM\" is not a canonical mode value",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let e = load_map("no-such-preset").err().unwrap_or_default();
        assert!(e.contains("is not a preset (siemens-rdf302"), "{e}");
        let e = parse_map("registers = 1").err().unwrap_or_default();
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn plan_splits_long_runs_and_functions() {
        let mut text = String::new();
        for a in 0..130u16 {
            let field = if a == 0 { "temperature" } else { "load_state" };
            let extra = if a == 0 {
                ""
            } else {
                "map = { 0 = \"INACTIVE\", \"*\" = \"ACTIVE\" }"
            };
            text.push_str(&format!(
                "[[registers]]\nfield = \"{field}\"\naddress = {a}\n{extra}\n"
            ));
        }
        let m = map(&text);
        assert_eq!(m.requests.len(), 2);
        assert_eq!(m.requests[0].count, 125);
        assert_eq!(m.requests[1].start, 125);
        assert_eq!(m.requests[1].count, 5);
    }
}

#[cfg(test)]
mod map_file_tests {
    use super::*;

    /// Found by the config fuzz target: `map = "/dev/zero"` read for ever (fuzz/findings/config).
    #[test]
    fn a_map_path_that_is_not_a_small_regular_file_is_refused_without_reading_it() {
        assert_eq!(
            load_map("/dev/zero").err(),
            Some("map file /dev/zero is not a regular file".to_string())
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load_map(&dir.path().display().to_string()).err(),
            Some(format!(
                "map file {} is not a regular file",
                dir.path().display()
            ))
        );
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; 1024 * 1024 + 1]).unwrap();
        assert_eq!(
            load_map(&big.display().to_string()).err(),
            Some(format!(
                "map file {} is larger than 1048576 bytes",
                big.display()
            ))
        );
        let bin = dir.path().join("bin.toml");
        std::fs::write(&bin, [0xffu8, 0xfe]).unwrap();
        assert_eq!(
            load_map(&bin.display().to_string()).err(),
            Some(format!("map file {} is not UTF-8 text", bin.display()))
        );
    }
}
