//! Logging setup (journald-friendly), a rate limiter for repeated warnings, and the wall clock.
//!
//! Levels by operator impact: ERROR = data loss or needs intervention, WARN = unexpected but
//! recovered, INFO = lifecycle. Repeated warnings go through [`RateLimit`]: the first occurrence
//! per key is logged, then at most one line per interval carrying the count suppressed meanwhile,
//! and all limiters together write at most [`WARN_LINES_PER_MIN`] lines a minute ([`Ceiling`]).

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

/// Installs the global tracing subscriber. `RUST_LOG` (`target=level` directives and a bare
/// default level, e.g. `info,hvac_edge::sinks=debug`) overrides `level`; an unreadable
/// `RUST_LOG` is ignored. No ANSI colours unless stderr is a terminal; no timestamps under
/// journald (`JOURNAL_STREAM` set), which adds its own.
pub fn init(level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let default = format!("{level},rumqttc=warn,hyper=warn,reqwest=warn");
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .or_else(|| default.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let ansi = std::io::stderr().is_terminal();
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let res = match (format, journald) {
        (LogFormat::Json, _) => tracing_subscriber::registry()
            .with(layer.json().with_filter(filter))
            .try_init(),
        (LogFormat::Plain, true) => tracing_subscriber::registry()
            .with(layer.without_time().with_filter(filter))
            .try_init(),
        (LogFormat::Plain, false) => tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init(),
    };
    // A second init (tests, demo inside a test) keeps the first subscriber.
    let _ = res;
}

/// Most lines per minute that all [`RateLimit`]s of the process write together: a flood of
/// bad input from any number of sources, topics or devices stays a few lines a minute.
pub const WARN_LINES_PER_MIN: u32 = 60;

/// A ceiling on log lines shared by several [`RateLimit`]s: at most `per_window` lines in each
/// fixed window. The daemon's limiters share [`INPUT_WARNINGS`].
#[derive(Debug)]
pub struct Ceiling {
    per_window: u32,
    window: Duration,
    /// Start of the current window and the lines written in it.
    state: Mutex<Option<(Instant, u32)>>,
}

impl Ceiling {
    /// At most `per_window` lines per `window`.
    pub const fn new(per_window: u32, window: Duration) -> Ceiling {
        Ceiling {
            per_window,
            window,
            state: Mutex::new(None),
        }
    }

    /// Takes one line from the current window; false when it is used up.
    fn take(&self, now: Instant) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, used) = match *st {
            Some((start, used)) if now.duration_since(start) < self.window => (start, used),
            _ => (now, 0),
        };
        let ok = used < self.per_window;
        *st = Some((start, if ok { used + 1 } else { used }));
        ok
    }
}

/// The process-wide ceiling of every [`RateLimit::new`]: [`WARN_LINES_PER_MIN`] per minute.
pub static INPUT_WARNINGS: Ceiling = Ceiling::new(WARN_LINES_PER_MIN, Duration::from_secs(60));

/// Per-key rate limiter for log lines, under a shared [`Ceiling`].
///
/// Key by problem kind (one limiter per source, so the key is (source, kind)), never by
/// something a publisher chooses (topic, device id): distinct keys each get a first line.
/// A line refused by the ceiling is counted as suppressed for its key, like one refused by the
/// interval, and reported with the key's next line.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    ceiling: &'static Ceiling,
    /// Per key: when its last line was written, and how many were suppressed since.
    state: Mutex<HashMap<String, (Option<Instant>, u64)>>,
}

/// Most distinct keys remembered; further keys share one slot (bounded memory, and a flood of
/// new keys cannot buy itself first lines).
const RATE_LIMIT_KEYS: usize = 1_000;

/// The slot shared by keys beyond [`RATE_LIMIT_KEYS`].
const OVERFLOW_KEY: &str = "\u{0}overflow";

impl RateLimit {
    /// Allows one line per key per `interval`, within the process-wide [`INPUT_WARNINGS`].
    pub fn new(interval: Duration) -> RateLimit {
        RateLimit::with_ceiling(interval, &INPUT_WARNINGS)
    }

    /// Allows one line per key per `interval`, within `ceiling`.
    pub fn with_ceiling(interval: Duration, ceiling: &'static Ceiling) -> RateLimit {
        RateLimit {
            interval,
            ceiling,
            state: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(suppressed)` when a line may be logged now (with the count suppressed since the last
    /// one), `None` when it should be suppressed.
    pub fn check(&self, key: &str) -> Option<u64> {
        let mut map = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let key = if map.len() >= RATE_LIMIT_KEYS && !map.contains_key(key) {
            OVERFLOW_KEY
        } else {
            key
        };
        let slot = map.entry(key.to_string()).or_insert((None, 0));
        let due = slot
            .0
            .is_none_or(|last| now.duration_since(last) >= self.interval);
        if due && self.ceiling.take(now) {
            let n = slot.1;
            *slot = (Some(now), 0);
            Some(n)
        } else {
            slot.1 = slot.1.saturating_add(1);
            None
        }
    }
}

/// `s` for a log line: cut to `max_chars` characters (with `…` when cut) and escaped
/// (`escape_debug`), so input cannot forge log lines or send terminal escapes.
pub fn shown(s: &str, max_chars: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max_chars)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_logs_first_then_suppresses_and_counts() {
        static C: Ceiling = Ceiling::new(1000, Duration::from_secs(60));
        let r = RateLimit::with_ceiling(Duration::from_millis(50), &C);
        assert_eq!(r.check("a"), Some(0));
        assert_eq!(r.check("a"), None);
        assert_eq!(r.check("a"), None);
        assert_eq!(r.check("b"), Some(0));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.check("a"), Some(2));
    }

    /// Issue 11 item 18: 10,001 distinct keys (a flood of bogus topics, had they been keys)
    /// across three sources write exactly the ceiling's 60 lines, and the suppressed lines are
    /// counted for the next line of their key.
    #[test]
    fn the_ceiling_bounds_lines_across_keys_and_limiters() {
        static C: Ceiling = Ceiling::new(60, Duration::from_secs(60));
        let limiters: Vec<RateLimit> = (0..3)
            .map(|_| RateLimit::with_ceiling(Duration::from_secs(60), &C))
            .collect();
        let mut lines = 0;
        for i in 0..10_001 {
            if limiters[i % 3].check(&format!("topic-{i}")).is_some() {
                lines += 1;
            }
        }
        assert_eq!(lines, 60);
        // Keys past the table's size share one slot: memory stays bounded.
        for r in &limiters {
            let n = r.state.lock().map(|m| m.len()).unwrap_or(0);
            assert_eq!(n, RATE_LIMIT_KEYS + 1);
        }
        // A new window: the ceiling allows lines again; a key blocked by the ceiling reports
        // what it lost.
        {
            let mut st = C.state.lock().unwrap_or_else(|e| e.into_inner());
            *st = st.map(|(start, used)| {
                let earlier = start.checked_sub(Duration::from_secs(61));
                (earlier.expect("an instant a minute ago"), used)
            });
        }
        // topic-60 was the first key the ceiling refused (limiter 0 holds keys 0, 3, 6, …).
        let r = &limiters[0];
        assert_eq!(r.check("topic-60"), Some(1));
        assert_eq!(r.check("topic-0"), None);
    }

    #[test]
    fn one_key_per_kind_writes_one_line_per_interval() {
        static C: Ceiling = Ceiling::new(60, Duration::from_secs(60));
        let r = RateLimit::with_ceiling(Duration::from_secs(60), &C);
        let logged = (0..10_001)
            .filter(|_| r.check("bad_device_id").is_some())
            .count();
        assert_eq!(logged, 1);
    }

    #[test]
    fn shown_cuts_and_escapes() {
        assert_eq!(shown("plain", 10), "plain");
        assert_eq!(shown("a\nb\u{1b}[2J", 10), "a\\nb\\u{1b}[2J");
        assert_eq!(shown("abcdef", 3), "abc…");
        assert_eq!(shown("abc", 3), "abc");
    }
}

/// Latency buckets (seconds) of the `/metrics` histograms: 0.5 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A latency histogram (seconds) shared between the code that measures and `/metrics`.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(pub prometheus_client::metrics::histogram::Histogram);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(prometheus_client::metrics::histogram::Histogram::new(
            LATENCY_BUCKETS,
        ))
    }
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        self.0.observe(d.as_secs_f64());
    }

    /// Records one duration given in ms (negative values, from a clock step, count as 0).
    pub fn observe_ms(&self, ms: i64) {
        self.0.observe(ms.max(0) as f64 / 1000.0);
    }
}
