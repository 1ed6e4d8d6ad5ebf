//! What each fuzz target does with one input, shared by the libFuzzer binaries in this folder
//! and by the stable corpus replay `tests/fuzz_corpus.rs` (which includes this file by path), so
//! that a committed reproducer fails the ordinary test suite exactly as it failed the fuzzer.
//!
//! Only the crate's public, high-level entry points are called. Besides "no panic, no hang",
//! each target checks a few documented contracts of the code it drives (named in the asserts).
//! No I/O: the config target never opens files (see [`config`]).

#![allow(dead_code)]

use hvac_edge::config::{self, JsonlSourceConfig, MqttPreset};
use hvac_edge::model::{Reported, TempUnit};
use hvac_edge::sources::check_device_id;
use hvac_edge::sources::jsonl::JsonlLines;
use hvac_edge::sources::modbus::{self, MAX_READ, RegisterMap};
use hvac_edge::sources::otgw::{self, Decoder, Line, LineBuffer, MAX_LINE_BYTES};
use hvac_edge::sources::payload::{self, Mapping, MappingSpec, Route};
use hvac_edge::sources::serial::LineProtocol;
use hvac_edge::sources::{SharedStats, otgw_source::OtgwLines};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

/// What a target does with one input; it panics on a finding.
pub type Target = fn(&[u8]);

/// Every target by name (the name of its binary and of its corpus folder `fuzz/corpus/<name>`).
pub const TARGETS: &[(&str, Target)] = &[
    ("z2m", z2m),
    ("generic_mapping", generic_mapping),
    ("otgw", otgw),
    ("jsonl", jsonl),
    ("modbus_map", modbus_map),
    ("config", config),
];

/// Splits at the first `\n`: (first line, rest). No newline: (everything, empty).
fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// What a successful mapping promises about the id and the fields it returns.
fn check_mapped(device: &str, r: &Reported) {
    // A blank id (" ", from a topic level of spaces) is refused by check_device_id since
    // fafec07; corpus/generic_mapping/regress-blank-device-id-from-topic-level covers it.
    assert!(!device.is_empty(), "mapped an empty device id");
    assert!(
        check_device_id(device).is_ok(),
        "mapped a device id that check_device_id refuses: {device:?}"
    );
    check_reported(r);
    assert!(
        !r.is_empty(),
        "Ok with no canonical field (should be Unmapped)"
    );
}

/// Field ranges every parser promises (humidity is a percentage, values bounded by Fixed::LIMIT).
fn check_reported(r: &Reported) {
    if let Some(h) = r.humidity {
        assert!((0..=10_000).contains(&h.0), "humidity {h} out of 0..=100");
    }
    for t in [r.setpoint, r.temperature].into_iter().flatten() {
        assert!(
            (t.value.0 as f64).abs() <= hvac_edge::model::Fixed::LIMIT * 100.0,
            "temperature {} beyond Fixed::LIMIT",
            t.value
        );
    }
}

// ------------------------------------------------------------------ (1) Zigbee2MQTT

/// Input: `<topic>\n<payload>`. Routes the topic under a few base topics and parses the payload
/// as a device state object and as an availability payload.
pub fn z2m(data: &[u8]) {
    let (topic, payload) = split_line(data);
    let topic = String::from_utf8_lossy(topic);
    for base in ["zigbee2mqtt", "zigbee2mqtt/", "z2m/site a", ""] {
        let base_norm = base.trim_end_matches('/');
        match payload::z2m_route(base, &topic) {
            Route::State(name) => {
                assert!(!name.is_empty());
                assert_eq!(topic, format!("{base_norm}/{name}"), "state route");
            }
            Route::Availability(name) => {
                assert!(!name.is_empty());
                assert_eq!(
                    topic,
                    format!("{base_norm}/{name}/availability"),
                    "availability route"
                );
            }
            Route::Ignore => {}
        }
    }
    if let Ok(r) = payload::z2m_state(payload) {
        check_reported(&r);
        assert!(!r.is_empty(), "z2m_state Ok with nothing mapped");
    }
    let _ = payload::availability(payload);
    // The whole input as one payload too (the seeds are mostly bare JSON objects).
    if let Ok(r) = payload::z2m_state(data) {
        check_reported(&r);
    }
    let _ = payload::availability(data);
}

// ------------------------------------------------------------------ (2) generic JSON mapping

fn spec(
    device: &str,
    availability: Option<&str>,
    unit: TempUnit,
    fields: &[(&str, &str)],
    values: &[(&str, &[(&str, &str)])],
) -> MappingSpec {
    MappingSpec {
        device: device.to_owned(),
        availability_topic: availability.map(str::to_owned),
        unit,
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        values: values
            .iter()
            .map(|(f, m)| {
                let m = m
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect();
                ((*f).to_owned(), m)
            })
            .collect(),
    }
}

/// Three fixed mappings: ESPHome/Home Assistant style (topic level device), a payload-pointer
/// device in °F with every field kind and `~` escapes, and a device taken from level 0 with an
/// availability topic whose `{device}` is the last level.
fn fixed_mappings() -> &'static [Mapping] {
    static MAPPINGS: OnceLock<Vec<Mapping>> = OnceLock::new();
    MAPPINGS.get_or_init(|| {
        let specs = [
            spec(
                "{topic:1}",
                Some("home/{device}/status"),
                TempUnit::C,
                &[
                    ("setpoint", "/target_temperature"),
                    ("temperature", "/current_temperature"),
                    ("humidity", "/current_humidity"),
                    ("mode", "/mode"),
                    ("load_state", "/action"),
                ],
                &[
                    (
                        "mode",
                        &[("heat", "MANUAL"), ("auto", "AUTOMATIC"), ("off", "OFF")],
                    ),
                    (
                        "load_state",
                        &[
                            ("heating", "ACTIVE"),
                            ("idle", "INACTIVE"),
                            ("off", "INACTIVE"),
                        ],
                    ),
                ],
            ),
            spec(
                "/id",
                None,
                TempUnit::F,
                &[
                    ("setpoint", "/state/sp"),
                    ("temperature", "/state/t"),
                    ("humidity", "/rh"),
                    ("program", "/prog"),
                    ("activation_time", "/since"),
                    ("function", "/fn"),
                    ("mode", "/m~1x"),
                    ("load_state", "/relay"),
                    ("connectivity", "/on~0line"),
                ],
                &[
                    ("function", &[("h", "HEATING"), ("c", "COOLING")]),
                    ("connectivity", &[("up", "ONLINE"), ("down", "OFFLINE")]),
                ],
            ),
            spec(
                "{topic:0}",
                Some("status/{device}"),
                TempUnit::C,
                &[
                    ("temperature", "/t/0"),
                    ("setpoint", "/sp"),
                    ("mode", "/mode"),
                ],
                &[],
            ),
        ];
        specs
            .iter()
            .map(|s| Mapping::compile(s).unwrap_or_else(|e| panic!("harness mapping: {e:?}")))
            .collect()
    })
}

fn exercise_mapping(m: &Mapping, topic: &str, payload: &[u8]) {
    if let Ok((device, r)) = m.map(topic, payload) {
        check_mapped(&device, &r);
    }
    let _ = m.availability_filter();
    if let Some(device) = m.availability_device(topic) {
        assert!(!device.is_empty(), "empty availability device");
        let _ = payload::availability(payload);
    }
}

/// Input: `<selector byte><topic>\n<payload>`. Selectors 0-2 (mod 4) use a fixed mapping;
/// 3 builds the spec from the input itself, lines `device`, `availability topic` (empty = none),
/// `unit` (`F` or anything else = C), then `field=pointer` or `values.field.from=to` lines up to
/// an empty line, then `<topic>\n<payload>`, and compiles it ([`Mapping::compile`]) first.
pub fn generic_mapping(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let fixed = fixed_mappings();
    match usize::from(sel % 4) {
        i @ 0..=2 => {
            let (topic, payload) = split_line(rest);
            exercise_mapping(&fixed[i], &String::from_utf8_lossy(topic), payload);
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let mut lines = text.split('\n');
            let device = lines.next().unwrap_or_default();
            let availability = lines.next().filter(|a| !a.is_empty());
            let unit = match lines.next() {
                Some("F") => TempUnit::F,
                _ => TempUnit::C,
            };
            let mut fields = BTreeMap::new();
            let mut values: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            for line in lines.by_ref() {
                if line.is_empty() {
                    break;
                }
                let (k, v) = line.split_once('=').unwrap_or((line, ""));
                if let Some(v_key) = k.strip_prefix("values.") {
                    let (field, from) = v_key.split_once('.').unwrap_or((v_key, ""));
                    values
                        .entry(field.to_owned())
                        .or_default()
                        .insert(from.to_owned(), v.to_owned());
                } else {
                    fields.insert(k.to_owned(), v.to_owned());
                }
            }
            let topic = lines.next().unwrap_or_default();
            let payload: Vec<&str> = lines.collect();
            let payload = payload.join("\n");
            let s = MappingSpec {
                device: device.to_owned(),
                availability_topic: availability.map(str::to_owned),
                unit,
                fields,
                values,
            };
            match Mapping::compile(&s) {
                Ok(m) => exercise_mapping(&m, topic, payload.as_bytes()),
                Err(problems) => assert!(!problems.is_empty(), "Err without a problem"),
            }
        }
    }
}

// ------------------------------------------------------------------ (3) OTGW

fn otgw_lines() -> OtgwLines {
    static CFG: OnceLock<config::OtgwSourceConfig> = OnceLock::new();
    let cfg = CFG.get_or_init(|| {
        toml::from_str("name = \"otgw\"\nport = \"/dev/null\"\n")
            .unwrap_or_else(|e| panic!("harness otgw config: {e}"))
    });
    OtgwLines::new(cfg, SharedStats::default()).0
}

/// Input: `<chunk byte><serial bytes>`. The bytes go through [`LineBuffer`] in reads of
/// `chunk % 64 + 1` bytes, each line through [`otgw::parse_line`], each frame through
/// [`otgw::to_reported`] and a [`Decoder`], and each line also through the source's
/// [`LineProtocol::line`] ([`OtgwLines`], which owns a second decoder and the counters).
pub fn otgw(data: &[u8]) {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    let mut buf = LineBuffer::new(MAX_LINE_BYTES);
    let mut decoder = Decoder::new(
        hvac_edge::model::Mode::Automatic,
        hvac_edge::model::Mode::Manual,
        hvac_edge::model::Mode::Boost,
    );
    let mut source = otgw_lines();
    let mut now = 0;
    for read in bytes.chunks(chunk) {
        for line in buf.push(read) {
            if let Ok(text) = &line {
                // At most MAX_LINE_BYTES bytes, each of which may have become a 3-byte U+FFFD.
                assert!(
                    text.len() <= 3 * MAX_LINE_BYTES,
                    "LineBuffer gave a long line"
                );
                assert!(!text.contains(['\r', '\n']), "LineBuffer kept a terminator");
                if let Ok(Line::Frame(f)) = otgw::parse_line(text) {
                    let _ = f.parity_is_even();
                    if let Some(r) = otgw::to_reported(&f) {
                        check_reported(&r);
                    }
                    for r in decoder.frame(f).reported {
                        check_reported(&r);
                    }
                    let _ = decoder.override_state();
                }
            }
            now += 1;
            let out = source.line(line, now);
            for (_, r) in &out.observations {
                check_reported(r);
            }
        }
        assert!(buf.pending_bytes() <= MAX_LINE_BYTES);
    }
    // Every line of the input as a whole too, as parse_line is also given unsplit text.
    let _ = otgw::parse_line(&String::from_utf8_lossy(bytes));
}

// ------------------------------------------------------------------ (4) JSON lines

/// A JSON-lines source like the one in the jsonl module's tests plus the remaining field kinds.
fn jsonl_config() -> &'static JsonlSourceConfig {
    static CFG: OnceLock<JsonlSourceConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let text = r#"
name = "fw"
port = "/dev/null"
max_line_bytes = 4096
[mapping]
device = "/id"
[mapping.fields]
setpoint = "/sp"
temperature = "/t"
humidity = "/rh"
load_state = "/relay"
mode = "/mode"
function = "/fn"
program = "/p"
activation_time = "/at"
connectivity = "/link"
[mapping.values.mode]
auto = "AUTOMATIC"
man = "MANUAL"
[mapping.values.function]
heat = "HEATING"
cool = "COOLING"
"#;
        toml::from_str(text).unwrap_or_else(|e| panic!("harness jsonl config: {e}"))
    })
}

/// Input: `<chunk byte><serial bytes>`: split into lines by a [`LineBuffer`] of the source's
/// `max_line_bytes`, in reads of `chunk % 64 + 1` bytes, each line handled by [`JsonlLines`].
pub fn jsonl(data: &[u8]) {
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let cfg = jsonl_config();
    let (mut source, settings) = JsonlLines::new(cfg, SharedStats::default())
        .unwrap_or_else(|e| panic!("harness jsonl source: {e}"));
    let mut buf = LineBuffer::new(settings.max_line_bytes);
    let mut now = 0;
    for read in bytes.chunks(usize::from(chunk % 64) + 1) {
        for line in buf.push(read) {
            now += 1;
            let out = source.line(line, now);
            assert!(out.valid || out.observations.is_empty());
            for (device, r) in &out.observations {
                check_mapped(device, r);
            }
        }
    }
    let _ = source.devices();
}

// ------------------------------------------------------------------ (5) Modbus maps

/// The shipped presets, loaded once.
fn presets() -> &'static [RegisterMap] {
    static MAPS: OnceLock<Vec<RegisterMap>> = OnceLock::new();
    MAPS.get_or_init(|| {
        modbus::PRESETS
            .iter()
            .map(|(name, _)| {
                modbus::load_map(name).unwrap_or_else(|e| panic!("preset {name}: {e}"))
            })
            .collect()
    })
}

/// The read-plan contract of [`RegisterMap::requests`]: 1..=MAX_READ registers each, inside
/// the 16-bit address space, and every register's words inside one request of its function.
fn check_plan(map: &RegisterMap) {
    for q in &map.requests {
        assert!(
            (1..=MAX_READ).contains(&q.count),
            "request of {} registers",
            q.count
        );
        assert!(
            u32::from(q.start) + u32::from(q.count) <= 0x1_0000,
            "request past address 65535: {q:?}"
        );
    }
    for r in &map.registers {
        let end = u32::from(r.address) + u32::from(r.ty.words());
        assert!(
            map.requests.iter().any(|q| q.function == r.function
                && q.start <= r.address
                && end <= u32::from(q.start) + u32::from(q.count)),
            "register {:?} at {} not covered by the read plan {:?}",
            r.field,
            r.address,
            map.requests
        );
    }
}

/// Answers for `map.requests` from big-endian byte pairs; when the bytes run out the answers
/// are short (or missing), which the decoder must survive.
fn answers(map: &RegisterMap, bytes: &[u8]) -> Vec<Vec<u16>> {
    let mut words = bytes
        .chunks_exact(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]));
    let mut out = Vec::new();
    for q in &map.requests {
        let answer: Vec<u16> = words.by_ref().take(usize::from(q.count)).collect();
        if answer.is_empty() {
            break;
        }
        out.push(answer);
    }
    out
}

fn decode(map: &RegisterMap, bytes: &[u8]) {
    let (r, _bad) = map.decode(&answers(map, bytes));
    check_reported(&r);
}

/// Input: `<map TOML>\0<register bytes>`. The text goes through [`modbus::parse_map`]; a map it
/// accepts must have a sound read plan and decodes the register bytes. The register bytes (the
/// whole input when there is no NUL) are also decoded by every preset.
pub fn modbus_map(data: &[u8]) {
    let (text, regs) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    if let Ok(text) = std::str::from_utf8(text)
        && let Ok(map) = modbus::parse_map(text)
    {
        check_plan(&map);
        decode(&map, regs);
    }
    for map in presets() {
        decode(map, regs);
    }
}

// ------------------------------------------------------------------ (6) config

/// Input: a config file's text, through [`config::parse`] (TOML → serde → validate). An
/// accepted config must also give its warnings, diff policy and device metadata, and the
/// mappings and JSON-lines sources it names must build (validation promised they would).
///
/// Validation reads files the config names (secret files, Modbus map paths): the fuzzer runs
/// with stdin closed and the files named are whatever exists on the machine, so a finding that
/// depends on a path is checked by hand before it is reported.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = config::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    let _ = cfg.warnings();
    let _ = cfg.diff_policy();
    let _ = cfg.device_meta();
    for m in &cfg.sources.mqtt {
        let _ = m.effective_client_id();
        if m.preset == MqttPreset::Generic
            && let Some(mapping) = &m.mapping
        {
            let compiled = Mapping::compile(&mapping.spec());
            assert!(
                compiled.is_ok(),
                "validated mapping fails to compile: {compiled:?}"
            );
        }
    }
    for j in &cfg.sources.jsonl {
        let built = JsonlLines::new(j, SharedStats::default());
        assert!(
            built.is_ok(),
            "validated jsonl source fails: {:?}",
            built.err()
        );
    }
    for o in &cfg.sources.otgw {
        let _ = OtgwLines::new(o, SharedStats::default());
    }
    for s in &cfg.sources.modbus {
        for u in &s.units {
            if !u.map.contains('/') {
                let loaded = modbus::load_map(&u.map);
                assert!(loaded.is_ok(), "validated preset fails: {:?}", loaded.err());
            }
        }
    }
}
