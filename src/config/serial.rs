//! `[[sources.otgw]]`, `[[sources.modbus]]` and `[[sources.jsonl]]`: serial sources (config.md).
//!
//! The serial line keys (`port`, `baud`, `data_bits`, `parity`, `stop_bits`, reconnect bounds) are
//! repeated in each table rather than flattened, because serde cannot combine `flatten` with
//! `deny_unknown_fields`; [`SerialLine`] is what the source code sees.

use super::{MappingConfig, Problems, default_reconnect_max_ms, default_reconnect_min_ms};
use serde::Deserialize;
use std::path::PathBuf;

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

impl Parity {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Parity::None => "none",
            Parity::Even => "even",
            Parity::Odd => "odd",
        }
    }
}

/// Serial line settings shared by the serial sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialLine {
    pub port: PathBuf,
    pub baud: u32,
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: u8,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl SerialLine {
    /// `9600 8N1` style summary for logs and status.
    pub fn describe(&self) -> String {
        let p = match self.parity {
            Parity::None => 'N',
            Parity::Even => 'E',
            Parity::Odd => 'O',
        };
        format!("{} {}{}{}", self.baud, self.data_bits, p, self.stop_bits)
    }
}

const fn default_otgw_baud() -> u32 {
    9600
}
const fn default_modbus_baud() -> u32 {
    9600
}
const fn default_jsonl_baud() -> u32 {
    115_200
}
const fn default_data_bits() -> u8 {
    8
}
const fn default_stop_bits() -> u8 {
    1
}
fn default_otgw_device() -> String {
    "otgw".into()
}
const fn default_silence_timeout_secs() -> u64 {
    60
}
const fn default_poll_interval_ms() -> u64 {
    1000
}
const fn default_modbus_request_timeout_ms() -> u64 {
    300
}
const fn default_offline_after_failed_polls() -> u32 {
    3
}
const fn default_max_line_bytes() -> usize {
    4096
}
fn default_mode_none() -> String {
    "AUTOMATIC".into()
}
fn default_mode_override() -> String {
    "MANUAL".into()
}

/// `[[sources.otgw]]`: an OpenTherm Gateway on a serial port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtgwSourceConfig {
    pub name: String,
    pub port: PathBuf,
    /// Default 9600 (8N1, no flow control).
    #[serde(default = "default_otgw_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Device id of the thermostat behind the gateway. Default `otgw`.
    #[serde(default = "default_otgw_device")]
    pub device: String,
    /// No valid frame for this long → connectivity OFFLINE. Default 60 (otmonitor's "flatline").
    #[serde(default = "default_silence_timeout_secs")]
    pub silence_timeout_secs: u64,
    /// Commands sent after each open, e.g. `["PS=0"]`; nothing is sent unless listed.
    #[serde(default)]
    pub setup_commands: Vec<String>,
    /// Canonical `mode` for the gateway's remote-override state (ids 9 and 100).
    #[serde(default)]
    pub override_modes: OverrideModes,
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

/// `[sources.otgw.override_modes]`: which canonical mode each override state reports.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OverrideModes {
    /// No remote override (id 9 = 0): the thermostat follows its own program. Default AUTOMATIC.
    #[serde(default = "default_mode_none")]
    pub none: String,
    /// Temporary override (`TT`, id 100 bit 1): until the next program change. Default MANUAL.
    #[serde(default = "default_mode_override")]
    pub temporary: String,
    /// Constant override (`TC`, id 100 bit 0 only): until changed by hand. Default MANUAL.
    #[serde(default = "default_mode_override")]
    pub constant: String,
}

impl Default for OverrideModes {
    fn default() -> Self {
        OverrideModes {
            none: default_mode_none(),
            temporary: default_mode_override(),
            constant: default_mode_override(),
        }
    }
}

/// `[[sources.modbus]]`: Modbus RTU units polled on one RS-485 line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSourceConfig {
    pub name: String,
    pub port: PathBuf,
    #[serde(default = "default_modbus_baud")]
    pub baud: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Each unit is polled once per interval. Default 1000.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// One request's deadline. Default 300.
    #[serde(default = "default_modbus_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Consecutive failed polls before the unit's device goes OFFLINE. Default 3.
    #[serde(default = "default_offline_after_failed_polls")]
    pub offline_after_failed_polls: u32,
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    #[serde(default)]
    pub units: Vec<ModbusUnitConfig>,
}

/// `[[sources.modbus.units]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusUnitConfig {
    /// Modbus slave address, 1–247.
    pub unit_id: u8,
    /// Device id of the thermostat.
    pub device: String,
    /// A preset shipped in config/modbus/ (embedded) or the path of a map file.
    pub map: String,
}

/// `[[sources.jsonl]]`: newline-delimited JSON objects on a serial port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlSourceConfig {
    pub name: String,
    pub port: PathBuf,
    #[serde(default = "default_jsonl_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// Longer lines are counted as malformed and dropped. Default 4096.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// No valid line for this long → every device seen goes OFFLINE; 0 (default) = never
    /// (firmware that reports only on change is silent for long stretches).
    #[serde(default)]
    pub silence_timeout_secs: u64,
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How each object maps to canonical fields; `device` must be a JSON pointer.
    pub mapping: MappingConfig,
}

macro_rules! serial_line {
    ($t:ty) => {
        impl $t {
            /// The serial line settings.
            pub fn line(&self) -> SerialLine {
                SerialLine {
                    port: self.port.clone(),
                    baud: self.baud,
                    data_bits: self.data_bits,
                    parity: self.parity,
                    stop_bits: self.stop_bits,
                    reconnect_min_ms: self.reconnect_min_ms,
                    reconnect_max_ms: self.reconnect_max_ms,
                }
            }
        }
    };
}
serial_line!(OtgwSourceConfig);
serial_line!(ModbusSourceConfig);
serial_line!(JsonlSourceConfig);

/// Checks the serial line keys of source `k`.
pub(super) fn check_line(p: &mut Problems, k: &str, l: &SerialLine) {
    if l.port.as_os_str().is_empty() {
        p.add(format!("{k}.port"), "must not be empty");
    } else if !l.port.is_absolute() {
        p.add(
            format!("{k}.port"),
            format!(
                "{:?} must be an absolute path such as /dev/ttyUSB0 or /dev/serial/by-id/…",
                l.port
            ),
        );
    }
    if !(300..=4_000_000).contains(&l.baud) {
        p.add(format!("{k}.baud"), "must be between 300 and 4000000");
    }
    if !(5..=8).contains(&l.data_bits) {
        p.add(format!("{k}.data_bits"), "must be 5, 6, 7 or 8");
    }
    if !(1..=2).contains(&l.stop_bits) {
        p.add(format!("{k}.stop_bits"), "must be 1 or 2");
    }
    if l.reconnect_min_ms == 0 || l.reconnect_min_ms > l.reconnect_max_ms {
        p.add(
            format!("{k}.reconnect_min_ms"),
            "must be at least 1 and at most reconnect_max_ms",
        );
    }
}

/// An OTGW command as the gateway's grammar takes it: two upper-case letters, `=`, then up to 30
/// printable characters (protocols.md §5.1). Anything else is refused, so the daemon can never
/// send a line the gateway would misread (and never a BREAK).
pub fn valid_otgw_command(c: &str) -> bool {
    let b = c.as_bytes();
    b.len() >= 3
        && b.len() <= 33
        && b[0].is_ascii_uppercase()
        && b[1].is_ascii_uppercase()
        && b[2] == b'='
        && b[3..].iter().all(|&x| (0x21..=0x7E).contains(&x))
}

/// Checks the OTGW-specific keys.
pub(super) fn check_otgw(p: &mut Problems, k: &str, s: &OtgwSourceConfig) {
    check_line(p, k, &s.line());
    if s.device.is_empty() {
        p.add(format!("{k}.device"), "must not be empty");
    }
    super::check_device_id(p, &format!("{k}.device"), &s.device);
    if !(2..=86_400).contains(&s.silence_timeout_secs) {
        p.add(
            format!("{k}.silence_timeout_secs"),
            "must be between 2 and 86400 (the gateway prints a line about every second)",
        );
    }
    for (i, c) in s.setup_commands.iter().enumerate() {
        if valid_otgw_command(c) && c.starts_with("PS=") && c != "PS=0" {
            p.add(
                format!("{k}.setup_commands[{i}]"),
                format!("{c:?} switches the gateway to summary mode, which stops the frame reports this source decodes; use \"PS=0\""),
            );
        } else if !valid_otgw_command(c) {
            p.add(
                format!("{k}.setup_commands[{i}]"),
                format!("{c:?} is not an OTGW command; expected two capital letters, '=', a value (e.g. \"PS=0\")"),
            );
        }
    }
    for (key, v) in [
        ("none", &s.override_modes.none),
        ("temporary", &s.override_modes.temporary),
        ("constant", &s.override_modes.constant),
    ] {
        if crate::model::Mode::parse(v).is_none() {
            p.add(
                format!("{k}.override_modes.{key}"),
                format!("unknown mode {v:?}; use AUTOMATIC, MANUAL, BOOST, OFF or PROTECTION"),
            );
        }
    }
}

/// Checks the Modbus-specific keys, loading every unit's map.
pub(super) fn check_modbus(p: &mut Problems, k: &str, s: &ModbusSourceConfig) {
    check_line(p, k, &s.line());
    if !(100..=3_600_000).contains(&s.poll_interval_ms) {
        p.add(
            format!("{k}.poll_interval_ms"),
            "must be between 100 and 3600000",
        );
    }
    if !(20..=10_000).contains(&s.request_timeout_ms) {
        p.add(
            format!("{k}.request_timeout_ms"),
            "must be between 20 and 10000",
        );
    }
    if !(1..=1000).contains(&s.offline_after_failed_polls) {
        p.add(
            format!("{k}.offline_after_failed_polls"),
            "must be between 1 and 1000",
        );
    }
    if s.units.is_empty() {
        p.add(
            format!("{k}.units"),
            "at least one [[sources.modbus.units]] is needed",
        );
    }
    let mut ids = std::collections::HashMap::new();
    for (i, u) in s.units.iter().enumerate() {
        let uk = format!("{k}.units[{i}]");
        if !(1..=247).contains(&u.unit_id) {
            p.add(format!("{uk}.unit_id"), "must be between 1 and 247");
        } else if let Some(j) = ids.insert(u.unit_id, i) {
            p.add(
                format!("{uk}.unit_id"),
                format!(
                    "{} is already used by {k}.units[{j}] on this line",
                    u.unit_id
                ),
            );
        }
        if u.device.is_empty() {
            p.add(format!("{uk}.device"), "must not be empty");
        }
        super::check_device_id(p, &format!("{uk}.device"), &u.device);
        if let Err(e) = crate::sources::modbus::load_map(&u.map) {
            p.add(format!("{uk}.map"), e);
        }
    }
}

/// Checks the JSON-lines-specific keys.
pub(super) fn check_jsonl(p: &mut Problems, k: &str, s: &JsonlSourceConfig) {
    check_line(p, k, &s.line());
    if !(64..=1024 * 1024).contains(&s.max_line_bytes) {
        p.add(
            format!("{k}.max_line_bytes"),
            "must be between 64 and 1048576",
        );
    }
    if s.silence_timeout_secs > 86_400 {
        p.add(
            format!("{k}.silence_timeout_secs"),
            "must be at most 86400 (0 = never)",
        );
    }
    if !s.mapping.device.starts_with('/') {
        p.add(
            format!("{k}.mapping.device"),
            format!(
                "{:?}: a JSON-lines source has no topic; use a JSON pointer such as \"/id\"",
                s.mapping.device
            ),
        );
    }
    if s.mapping.availability_topic.is_some() {
        p.add(
            format!("{k}.mapping.availability_topic"),
            "a JSON-lines source has no topics; map a field to connectivity instead",
        );
    }
    if let Err(errs) = crate::sources::payload::Mapping::compile(&s.mapping.spec()) {
        for (key, problem) in errs {
            p.add(format!("{k}.mapping.{key}"), problem);
        }
    }
}
