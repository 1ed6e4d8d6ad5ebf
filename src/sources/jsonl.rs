//! The JSON-lines source: one JSON object per line on a serial port (custom firmware), mapped
//! to canonical fields by the same [`Mapping`] as the generic MQTT source, with the device id
//! taken from a JSON pointer.
//!
//! A line that is not JSON, not an object, has no device or a bad mapped value is counted as
//! malformed and logged (rate-limited per kind of problem, under the process-wide ceiling); it never stops the source.

use super::otgw::LineError;
use super::payload::Mapping;
use super::serial::{LineOutcome, LineProtocol, LineSourceSettings};
use super::{SharedStats, SourceStats};
use crate::config::JsonlSourceConfig;
use crate::model::UnixMs;
use crate::telemetry::RateLimit;
use std::collections::BTreeSet;
use std::time::Duration;

/// Most distinct devices one JSON-lines source remembers (for OFFLINE on port loss).
const MAX_DEVICES: usize = 10_000;

/// The JSON-lines protocol of one port.
pub struct JsonlLines {
    name: String,
    mapping: Mapping,
    seen: BTreeSet<String>,
    stats: SharedStats,
    bad_log: RateLimit,
}

impl JsonlLines {
    /// The protocol and the read loop's settings for `cfg`.
    ///
    /// # Errors
    /// The mapping's problems (already reported by `check-config`), as one message.
    pub fn new(
        cfg: &JsonlSourceConfig,
        stats: SharedStats,
    ) -> Result<(JsonlLines, LineSourceSettings), String> {
        let mapping = Mapping::compile(&cfg.mapping.spec()).map_err(|errs| {
            errs.iter()
                .map(|(k, p)| format!("mapping.{k}: {p}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let settings = LineSourceSettings {
            name: cfg.name.clone(),
            line: cfg.line(),
            max_line_bytes: cfg.max_line_bytes,
            silence: (cfg.silence_timeout_secs > 0)
                .then(|| Duration::from_secs(cfg.silence_timeout_secs)),
        };
        Ok((
            JsonlLines {
                name: cfg.name.clone(),
                mapping,
                seen: BTreeSet::new(),
                stats,
                bad_log: RateLimit::new(Duration::from_secs(60)),
            },
            settings,
        ))
    }

    /// Counts a malformed line and logs it, rate-limited by `kind` (a fixed word: never text
    /// from the line) under the process-wide ceiling.
    fn bad(&self, kind: &'static str, line: &str, problem: &str) {
        SourceStats::inc(&self.stats.malformed);
        if let Some(suppressed) = self.bad_log.check(kind) {
            tracing::warn!(source = %self.name, kind, line = %crate::telemetry::shown(line, 120), error = %problem, suppressed,
                "Dropped a JSON line that does not map to thermostat state (counted)");
        }
    }
}

impl LineProtocol for JsonlLines {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    fn on_open(&mut self) -> Vec<u8> {
        Vec::new()
    }

    fn line(&mut self, line: Result<String, LineError>, _now: UnixMs) -> LineOutcome {
        let mut out = LineOutcome::default();
        let text = match line {
            Ok(t) => t,
            Err(e) => {
                self.stats.count("too_long", 1);
                self.bad("too_long", "", &e.to_string());
                return out;
            }
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return out;
        }
        if trimmed.contains('\u{FFFD}') {
            // The line buffer replaced bytes that are not UTF-8: noise or a wrong baud rate.
            self.bad(
                "not_utf8",
                trimmed,
                "not UTF-8 (noise, or a wrong baud rate)",
            );
            return out;
        }
        match self.mapping.map("", trimmed.as_bytes()) {
            Ok((device, reported)) => {
                out.valid = true;
                if self.seen.len() < MAX_DEVICES || self.seen.contains(&device) {
                    self.seen.insert(device.clone());
                }
                out.observations.push((device, reported));
            }
            Err(e) => self.bad(e.kind(), trimmed, &e.to_string()),
        }
        out
    }

    fn devices(&self) -> Vec<String> {
        self.seen.iter().cloned().collect()
    }
}

impl std::fmt::Debug for JsonlLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlLines")
            .field("name", &self.name)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Fixed, LoadState, TempUnit, Temperature};
    use proptest::prelude::*;

    fn cfg() -> JsonlSourceConfig {
        let toml = r#"
name = "fw"
port = "/dev/ttyACM0"
[mapping]
device = "/id"
[mapping.fields]
setpoint = "/sp"
temperature = "/t"
load_state = "/relay"
"#;
        toml::from_str(toml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn lines() -> (JsonlLines, SharedStats) {
        let stats = SharedStats::default();
        let (l, _) = JsonlLines::new(&cfg(), stats.clone()).unwrap_or_else(|e| panic!("{e}"));
        (l, stats)
    }

    #[test]
    fn maps_a_line_and_remembers_the_device() {
        let (mut l, _) = lines();
        let out = l.line(
            Ok(r#"{"id":"room-1","sp":21.5,"t":19.98,"relay":true}"#.into()),
            0,
        );
        assert!(out.valid);
        assert_eq!(out.observations.len(), 1);
        let (d, r) = &out.observations[0];
        assert_eq!(d, "room-1");
        assert_eq!(
            r.setpoint,
            Some(Temperature {
                value: Fixed(2150),
                unit: TempUnit::C
            })
        );
        assert_eq!(r.temperature.map(|t| t.value), Some(Fixed(1998)));
        assert_eq!(r.load_state, Some(LoadState::Active));
        assert_eq!(l.devices(), vec!["room-1".to_string()]);
    }

    #[test]
    fn bad_lines_are_counted_not_fatal() {
        let (mut l, stats) = lines();
        for bad in [
            "not json",
            "[1,2]",
            r#"{"sp":20}"#,
            r#"{"id":"x","sp":"warm"}"#,
            r#"{"id":"x","other":1}"#,
            "{\"id\":\"x\",\"sp\":\u{fffd}}",
        ] {
            let out = l.line(Ok(bad.into()), 0);
            assert!(!out.valid, "{bad}");
            assert!(out.observations.is_empty(), "{bad}");
        }
        let out = l.line(Err(LineError::TooLong), 0);
        assert!(!out.valid);
        let st = stats.snapshot("fw", "jsonl");
        assert_eq!(st.counters.get("malformed"), Some(&7));
        assert_eq!(st.counters.get("too_long"), Some(&1));
        assert!(l.devices().is_empty());
        let ok = l.line(Ok(r#"{"id":"x","sp":20}"#.into()), 0);
        assert!(ok.valid);
    }

    proptest! {
        /// Any line: no panic; valid only with a device and at least one mapped field.
        #[test]
        fn any_line_is_handled(s in ".{0,300}") {
            let (mut l, _) = lines();
            let out = l.line(Ok(s), 0);
            prop_assert_eq!(out.valid, out.observations.len() == 1);
            for (d, _) in out.observations {
                prop_assert!(!d.is_empty());
            }
        }

        /// Objects with arbitrary values under the mapped keys: no panic, and a mapped
        /// setpoint comes out exactly when it is a number in range. (U+FFFD is excluded: the
        /// line buffer uses it for bytes that are not UTF-8, so such lines are refused.)
        #[test]
        fn arbitrary_objects(id in "[a-z0-9-]{1,12}", sp in proptest::num::f64::ANY, junk in "[^\u{FFFD}]{0,20}") {
            let (mut l, _) = lines();
            let v = serde_json::json!({"id": id, "sp": sp, "junk": junk});
            let out = l.line(Ok(v.to_string()), 0);
            if sp.is_finite() && (-273.15..=1000.0).contains(&sp) {
                prop_assert!(out.valid);
            }
        }
    }
}
