//! Logging setup (journald-friendly), a rate limiter for repeated warnings, and the wall clock.
//!
//! Levels by operator impact: ERROR = data loss or needs intervention, WARN = unexpected but
//! recovered, INFO = lifecycle. Repeated warnings go through [`RateLimit`]: the first occurrence
//! per key is logged, then at most one line per interval carrying the count suppressed meanwhile.

use crate::config::LogFormat;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// 2024-01-01T00:00:00Z: a gateway clock before this has not been set (no RTC, no NTP yet).
pub const CLOCK_SANE_MIN_MS: i64 = 1_704_067_200_000;

/// Milliseconds since the Unix epoch on the gateway clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides `level`. No ANSI colours unless
/// stderr is a terminal; no timestamps under journald (`JOURNAL_STREAM` set), which adds its own.
pub fn init(level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!("{level},rumqttc=warn,hyper=warn,reqwest=warn"))
    });
    let ansi = std::io::stderr().is_terminal();
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let res = match (format, journald) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Plain, true) => builder.without_time().try_init(),
        (LogFormat::Plain, false) => builder.try_init(),
    };
    // A second init (tests, demo inside a test) keeps the first subscriber.
    let _ = res;
}

/// Per-key rate limiter for log lines.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    state: Mutex<HashMap<String, (Instant, u64)>>,
}

/// Most distinct keys remembered; beyond it the table is cleared (bounded memory under noise).
const RATE_LIMIT_KEYS: usize = 10_000;

impl RateLimit {
    /// Allows one line per key per `interval`.
    pub fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` when a line may be logged now (with the count suppressed since the last
    /// one), `None` when it should be suppressed.
    pub fn check(&self, key: &str) -> Option<u64> {
        let Ok(mut map) = self.state.lock() else {
            return Some(0);
        };
        let now = Instant::now();
        if map.len() >= RATE_LIMIT_KEYS && !map.contains_key(key) {
            map.clear();
        }
        match map.get_mut(key) {
            None => {
                map.insert(key.to_string(), (now, 0));
                Some(0)
            }
            Some((last, suppressed)) => {
                if now.duration_since(*last) >= self.interval {
                    let n = *suppressed;
                    *last = now;
                    *suppressed = 0;
                    Some(n)
                } else {
                    *suppressed += 1;
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_logs_first_then_suppresses_and_counts() {
        let r = RateLimit::new(Duration::from_millis(50));
        assert_eq!(r.check("a"), Some(0));
        assert_eq!(r.check("a"), None);
        assert_eq!(r.check("a"), None);
        assert_eq!(r.check("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.check("a"), Some(2));
    }
}
