//! The OpenTherm Gateway source: the serial read loop ([`super::serial`]) driving the pure
//! parser and decoder ([`super::otgw`]), with the counters and rate-limited logs of a source.
//!
//! Everything the gateway prints that is not a frame is counted by kind (bus errors, rejected
//! frames, command responses, error tokens, noise) and never stops the source.

use super::SharedStats;
use super::otgw::{Decoder, Line, LineError, Source, is_known_id, parse_line};
use super::serial::{LineOutcome, LineProtocol, LineSourceSettings};
use crate::config::OtgwSourceConfig;
use crate::model::{Mode, UnixMs};
use crate::telemetry::RateLimit;
use std::time::Duration;

/// The OTGW line protocol of one gateway.
pub struct OtgwLines {
    name: String,
    device: String,
    setup: Vec<String>,
    decoder: Decoder,
    stats: SharedStats,
    noise_log: RateLimit,
}

impl OtgwLines {
    /// The protocol and the read loop's settings for `cfg`.
    pub fn new(cfg: &OtgwSourceConfig, stats: SharedStats) -> (OtgwLines, LineSourceSettings) {
        let mode = |s: &str, default| Mode::parse(s).unwrap_or(default);
        let m = &cfg.override_modes;
        let decoder = Decoder::new(
            mode(&m.none, Mode::Automatic),
            mode(&m.temporary, Mode::Manual),
            mode(&m.constant, Mode::Manual),
        );
        let settings = LineSourceSettings {
            name: cfg.name.clone(),
            line: cfg.line(),
            max_line_bytes: super::otgw::MAX_LINE_BYTES,
            silence: Some(Duration::from_secs(cfg.silence_timeout_secs)),
        };
        let lines = OtgwLines {
            name: cfg.name.clone(),
            device: cfg.device.clone(),
            setup: cfg.setup_commands.clone(),
            decoder,
            stats,
            noise_log: RateLimit::new(Duration::from_secs(60)),
        };
        (lines, settings)
    }

    fn noise(&self, counter: &'static str, line: &str, why: &str) {
        self.stats.count(counter, 1);
        if let Some(suppressed) = self.noise_log.check(counter) {
            let shown: String = line.chars().take(80).collect();
            tracing::info!(source = %self.name, line = %shown.escape_debug(), why, suppressed,
                "Ignored OTGW output (counted)");
        }
    }
}

impl LineProtocol for OtgwLines {
    fn kind(&self) -> &'static str {
        "otgw"
    }

    /// Each command followed by CR, the gateway's terminator (it ignores LF).
    fn on_open(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for c in &self.setup {
            out.extend_from_slice(c.as_bytes());
            out.push(b'\r');
        }
        out
    }

    fn line(&mut self, line: Result<String, LineError>, _now: UnixMs) -> LineOutcome {
        let mut out = LineOutcome::default();
        let text = match line {
            Ok(t) => t,
            Err(e) => {
                self.noise("too_long", "", &e.to_string());
                return out;
            }
        };
        match parse_line(&text) {
            Ok(Line::Frame(f)) => {
                out.valid = true;
                self.stats.count("frames", 1);
                if !is_known_id(f.data_id()) {
                    self.stats.count("unknown_ids", 1);
                }
                if matches!(f.source, Source::Request | Source::Answer) {
                    self.stats.count("gateway_frames", 1);
                }
                let decoded = self.decoder.frame(f);
                if !decoded.values.is_empty() {
                    let mut d = self.stats.detail();
                    for (k, v) in decoded.values {
                        d.values.insert(k.to_string(), v.to_string());
                    }
                }
                out.observations = decoded
                    .reported
                    .into_iter()
                    .map(|r| (self.device.clone(), r))
                    .collect();
            }
            // Only frames count as valid data for the silence timeout: a gateway that prints
            // nothing but bus errors has lost its thermostat.
            Ok(Line::Rejected { .. }) => {
                self.stats.count("rejected_frames", 1);
            }
            Ok(Line::BusError(_)) => {
                self.stats.count("bus_errors", 1);
            }
            Ok(Line::Response { command, reply }) => {
                self.stats.count("responses", 1);
                if let super::otgw::Reply::Error(e) = reply {
                    self.stats.count("command_errors", 1);
                    tracing::warn!(source = %self.name, command = %command, error = ?e,
                        "The gateway refused a command");
                }
            }
            Ok(Line::BareError(_)) => {
                self.stats.count("command_errors", 1);
            }
            Ok(Line::Greeting { version }) => {
                self.stats
                    .detail()
                    .values
                    .insert("firmware".into(), version.clone());
                tracing::info!(source = %self.name, version = %version, "OpenTherm Gateway (re)started");
            }
            Ok(Line::ThermostatDisconnected) => {
                self.stats.count("thermostat_disconnects", 1);
                tracing::warn!(source = %self.name, "The gateway reports the thermostat disconnected");
            }
            Ok(_) => {
                self.stats.count("other_lines", 1);
            }
            Err(LineError::Parity) => self.noise("parity_errors", &text, "odd parity"),
            Err(e) => self.noise("noise", &text, &e.to_string()),
        }
        out
    }

    fn devices(&self) -> Vec<String> {
        vec![self.device.clone()]
    }
}

impl std::fmt::Debug for OtgwLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtgwLines")
            .field("name", &self.name)
            .field("device", &self.device)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Connectivity, Reported};

    fn cfg() -> OtgwSourceConfig {
        let toml = r#"
name = "boiler"
port = "/dev/ttyUSB0"
setup_commands = ["PS=0", "PR=O"]
"#;
        toml::from_str(toml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn feed(p: &mut OtgwLines, lines: &[&str]) -> Vec<Reported> {
        lines
            .iter()
            .flat_map(|l| p.line(Ok((*l).to_string()), 0).observations)
            .map(|(d, r)| {
                assert_eq!(d, "otgw");
                r
            })
            .collect()
    }

    #[test]
    fn setup_commands_end_with_cr_only() {
        let (mut p, s) = OtgwLines::new(&cfg(), SharedStats::default());
        assert_eq!(p.on_open(), b"PS=0\rPR=O\r");
        assert_eq!(s.silence, Some(Duration::from_secs(60)));
        assert_eq!(s.line.describe(), "9600 8N1");
    }

    #[test]
    fn counts_each_kind_of_non_frame_output() {
        let stats = SharedStats::default();
        let (mut p, _) = OtgwLines::new(&cfg(), stats.clone());
        let out = feed(
            &mut p,
            &[
                "Error 01",
                "E901813FA",
                "TT: 21.50",
                "TT: BV",
                "SE",
                "OpenTherm Gateway 6.6",
                "T9xyz0000",
                "12345",
                "T901813FA",
                "T80C80000",
                "T901813FB",
            ],
        );
        let st = stats.snapshot("boiler", "otgw");
        let c = |k: &str| st.counters.get(k).copied().unwrap_or(0);
        assert_eq!(c("bus_errors"), 1);
        assert_eq!(c("rejected_frames"), 1);
        assert_eq!(c("responses"), 2);
        assert_eq!(c("command_errors"), 2);
        assert_eq!(c("noise"), 2);
        assert_eq!(c("parity_errors"), 1);
        assert_eq!(c("frames"), 2);
        assert_eq!(c("unknown_ids"), 1);
        assert_eq!(st.values.get("firmware").map(String::as_str), Some("6.6"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].connectivity, None::<Connectivity>);
    }
}
