//! Pure delivery decisions for a sink: outcome → verdict (delivered / retry after a delay /
//! permanent), the retry backoff schedule, `Retry-After` parsing, response snippets, and the
//! ban/disable accounting of webhook sinks (architecture.md §6, protocols.md Part B §5.2).
//! Must not read the clock, draw random numbers or do I/O: `now` and the jitter unit are passed in,
//! so every schedule is a plain function of its arguments and testable without sockets or timers.

use std::time::{Duration, SystemTime};

/// Schedule used when [`RetryPolicy::schedule_secs`] is empty.
const FALLBACK_SCHEDULE_SECS: [u64; 1] = [10];
/// Smallest delay used when a `Retry-After` says "now" or a past date, so a server cannot make
/// the sink spin.
const MIN_RETRY_AFTER_MS: u64 = 1000;

/// A server's `Retry-After` value, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// `Retry-After: <delta-seconds>`.
    Secs(u64),
    /// `Retry-After: <HTTP-date>`.
    At(SystemTime),
}

/// What one delivery attempt produced, as reported by the sink's transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered with an HTTP status.
    Status {
        /// HTTP status code.
        code: u16,
        /// Parsed `Retry-After` header, if any (see [`parse_retry_after`]).
        retry_after: Option<RetryAfter>,
        /// Start of the response body, already passed through [`snippet`].
        snippet: String,
    },
    /// The receiver acknowledged every event of the batch (MQTT: every PUBACK came back).
    Acked,
    /// No answer within the request timeout.
    Timeout,
    /// The connection could not be made (DNS, TCP, TLS); the transport's message.
    Connect(String),
    /// Any other transport failure; the transport's message.
    Other(String),
    /// The sink could not get credentials (e.g. the OAuth2 token endpoint failed): an endpoint
    /// problem, held and retried.
    Auth(String),
    /// The events cannot be put in the sink's shape (a stored envelope that does not parse):
    /// a fault of the events, treated like a rejection (bisected, then a dead letter).
    Invalid(String),
}

/// The error kind of an attempt for the technician's record: `status`, `timeout`, `dns`,
/// `tls`, `connect`, `auth`, `invalid` or `other`.
#[must_use]
pub fn error_kind(o: &Outcome) -> &'static str {
    match o {
        Outcome::Status { .. } => "status",
        Outcome::Acked => "none",
        Outcome::Timeout => "timeout",
        Outcome::Connect(m) => {
            let m = m.to_ascii_lowercase();
            if m.contains("dns error")
                || m.contains("failed to lookup")
                || m.contains("name or service")
            {
                "dns"
            } else if m.contains("certificate") || m.contains("tls") || m.contains("handshake") {
                "tls"
            } else {
                "connect"
            }
        }
        Outcome::Auth(_) => "auth",
        Outcome::Invalid(_) => "invalid",
        Outcome::Other(m) if m.to_ascii_lowercase().contains("certificate") => "tls",
        Outcome::Other(_) => "other",
    }
}

/// What the sink does with the event after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Acknowledged by the server (2xx); the event leaves the sink's queue.
    Delivered,
    /// Try the same event again after `delay_ms`.
    Retry {
        /// Milliseconds to wait before the next attempt.
        delay_ms: u64,
        /// Short lowercase cause, e.g. `http 503`, `timeout`, `connect: <msg>`.
        reason: String,
    },
    /// The endpoint, route or credentials are wrong (a status in
    /// [`RetryPolicy::hold_statuses`]): keep the events and try again after `delay_ms`; never a
    /// dead letter.
    Hold {
        /// Milliseconds to wait before the next attempt.
        delay_ms: u64,
        /// HTTP status code of the answer.
        status: u16,
        /// Start of the response body, for `queue stats`.
        snippet: String,
    },
    /// The server refused this request for good: one of its events may be bad (the runner
    /// bisects a batch until the event is alone; only then is it a dead letter).
    Permanent {
        /// HTTP status code of the refusal.
        status: u16,
        /// Start of the response body, for the dead-letter record.
        snippet: String,
    },
}

/// Retry timing of one sink.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Wait before retry #1, #2, …, in seconds; past the end the last value repeats.
    /// Default `[10, 30, 60, 300, 600]`; empty means `[10]`.
    pub schedule_secs: Vec<u64>,
    /// Symmetric jitter as a fraction of the delay: 0.2 means ±20 %. Default 0.2; clamped to 0..=1.
    pub jitter_fraction: f64,
    /// Upper bound on an honoured `Retry-After`, in seconds. Default 3600.
    pub max_retry_after_secs: u64,
    /// Statuses that hold the events instead of rejecting them (endpoint problems).
    /// Default [`crate::config::DEFAULT_HOLD_STATUSES`].
    pub hold_statuses: Vec<u16>,
    /// Statuses from 200 up to (not including) this are successes. Default 300.
    pub failure_status_min: u16,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            schedule_secs: vec![10, 30, 60, 300, 600],
            jitter_fraction: 0.2,
            max_retry_after_secs: 3600,
            hold_statuses: crate::config::DEFAULT_HOLD_STATUSES.to_vec(),
            failure_status_min: 300,
        }
    }
}

/// Ban and disable thresholds of a webhook sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanPolicy {
    /// Ban after every this many consecutive failures. Default 20; 0 = never ban.
    pub ban_every_failures: u32,
    /// Ban length per completed set of `ban_every_failures`, in seconds. Default 60.
    pub ban_step_secs: u64,
    /// Longest ban, in seconds. Default 1200.
    pub ban_max_secs: u64,
    /// Consecutive failures after which the sink is disabled until re-enabled. Default 100;
    /// 0 = never disable.
    pub failure_limit: u32,
}

impl Default for BanPolicy {
    fn default() -> Self {
        BanPolicy {
            ban_every_failures: 20,
            ban_step_secs: 60,
            ban_max_secs: 1200,
            failure_limit: 100,
        }
    }
}

/// What to do with a webhook sink after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanDecision {
    /// Keep going (per-event retry backoff still applies).
    None,
    /// Send nothing to this endpoint for `secs` seconds; queued events are held.
    Ban {
        /// Ban length in seconds.
        secs: u64,
    },
    /// Stop the sink (`DISABLED_DUE_TO_ERRORS`) until a technician re-enables it.
    Disable,
}

/// Parses a `Retry-After` header: delta-seconds (`120`) or an HTTP-date
/// (`Wed, 21 Oct 2015 07:28:00 GMT`). Anything else, including negative numbers, gives `None`.
/// A delta too large for `u64` saturates (it is capped by the policy later anyway).
#[must_use]
pub fn parse_retry_after(header: &str) -> Option<RetryAfter> {
    let value = header.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(RetryAfter::Secs(value.parse().unwrap_or(u64::MAX)));
    }
    httpdate::parse_http_date(value).ok().map(RetryAfter::At)
}

/// Delay before the next attempt after `consecutive_failures` failures in a row, in milliseconds.
///
/// Failure #1 waits `schedule_secs[0]`, #2 `schedule_secs[1]`, …; past the end the last value
/// repeats (0 is treated as #1). The delay is scaled by `1 + jitter_fraction × (2 × jitter_unit − 1)`,
/// so `jitter_unit` 0.5 means no jitter and values in `[0, 1)` stay within ±`jitter_fraction`.
/// The result is at least 1 ms unless the schedule entry itself is 0.
#[must_use]
pub fn backoff_ms(policy: &RetryPolicy, consecutive_failures: u32, jitter_unit: f64) -> u64 {
    let schedule: &[u64] = if policy.schedule_secs.is_empty() {
        &FALLBACK_SCHEDULE_SECS
    } else {
        &policy.schedule_secs
    };
    let index = usize::try_from(consecutive_failures.saturating_sub(1))
        .unwrap_or(usize::MAX)
        .min(schedule.len() - 1);
    let base_ms = schedule[index].saturating_mul(1000);
    if base_ms == 0 {
        return 0;
    }
    let fraction = clamp_unit(policy.jitter_fraction, 0.0);
    let unit = clamp_unit(jitter_unit, 0.5);
    let factor = 1.0 + fraction * (2.0 * unit - 1.0);
    // `as` from f64 saturates, and the factor is within 0..=2, so no wrap-around is possible.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let jittered = (base_ms as f64 * factor).round() as u64;
    jittered.max(1)
}

/// Clamps `x` to `0.0..=1.0`, mapping NaN to `nan_default`.
fn clamp_unit(x: f64, nan_default: f64) -> f64 {
    if x.is_nan() {
        nan_default
    } else {
        x.clamp(0.0, 1.0)
    }
}

/// Decides what follows an attempt.
///
/// - 2xx → [`Verdict::Delivered`].
/// - A status in `hold_statuses` (any class) → [`Verdict::Hold`] after the backoff (or its
///   `Retry-After`), with the status and snippet.
/// - Other 4xx except 408, 425 and 429 → [`Verdict::Permanent`] with the status and snippet.
/// - Everything else (1xx, 3xx, 408/425/429, 5xx, timeouts, connection and other errors) →
///   [`Verdict::Retry`] after [`backoff_ms`]`(policy, consecutive_failures_after_this, jitter_unit)`,
///   except that a `Retry-After` on a retryable status wins: its delay, capped at
///   `max_retry_after_secs`, and never below 1000 ms (a past date or `0` means 1 s).
#[must_use]
pub fn classify(
    outcome: &Outcome,
    policy: &RetryPolicy,
    consecutive_failures_after_this: u32,
    jitter_unit: f64,
    now: SystemTime,
) -> Verdict {
    let backoff = || backoff_ms(policy, consecutive_failures_after_this, jitter_unit);
    match outcome {
        Outcome::Acked => Verdict::Delivered,
        Outcome::Status { code, .. }
            if *code >= 200 && *code < policy.failure_status_min.max(201) =>
        {
            Verdict::Delivered
        }
        Outcome::Status {
            code,
            retry_after,
            snippet,
        } if policy.hold_statuses.contains(code) => Verdict::Hold {
            delay_ms: retry_after.map_or_else(backoff, |ra| {
                retry_after_ms(ra, policy.max_retry_after_secs, now)
            }),
            status: *code,
            snippet: snippet.clone(),
        },
        Outcome::Status { code, snippet, .. }
            if (400..500).contains(code) && !matches!(code, 408 | 425 | 429) =>
        {
            Verdict::Permanent {
                status: *code,
                snippet: snippet.clone(),
            }
        }
        Outcome::Status {
            code, retry_after, ..
        } => Verdict::Retry {
            delay_ms: retry_after.map_or_else(backoff, |ra| {
                retry_after_ms(ra, policy.max_retry_after_secs, now)
            }),
            reason: format!("http {code}"),
        },
        Outcome::Timeout => Verdict::Retry {
            delay_ms: backoff(),
            reason: "timeout".to_owned(),
        },
        Outcome::Connect(msg) => Verdict::Retry {
            delay_ms: backoff(),
            reason: format!("connect: {msg}"),
        },
        Outcome::Other(msg) => Verdict::Retry {
            delay_ms: backoff(),
            reason: format!("error: {msg}"),
        },
        Outcome::Auth(msg) => Verdict::Retry {
            delay_ms: backoff(),
            reason: format!("auth: {msg}"),
        },
        Outcome::Invalid(msg) => Verdict::Permanent {
            status: 0,
            snippet: msg.clone(),
        },
    }
}

/// Delay asked for by a `Retry-After`, capped at `max_secs`, at least [`MIN_RETRY_AFTER_MS`].
fn retry_after_ms(retry_after: RetryAfter, max_secs: u64, now: SystemTime) -> u64 {
    let cap = Duration::from_secs(max_secs);
    let wanted = match retry_after {
        RetryAfter::Secs(secs) => Duration::from_secs(secs),
        // A date in the past (or equal to now) is an error from `duration_since`: retry at once.
        RetryAfter::At(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
    };
    let ms = u64::try_from(wanted.min(cap).as_millis()).unwrap_or(u64::MAX);
    ms.max(MIN_RETRY_AFTER_MS)
}

/// A printable prefix of a response body for logs and dead letters: lossy UTF-8 (invalid bytes
/// become U+FFFD), control characters replaced by `?`, cut on a char boundary to at most `max`
/// bytes. Reads only as much of `body` as it needs.
#[must_use]
pub fn snippet(body: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(max.min(body.len()));
    let mut push = |c: char| -> bool {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > max {
            return false;
        }
        out.push(c);
        true
    };
    'chunks: for chunk in body.utf8_chunks() {
        for c in chunk.valid().chars() {
            if !push(c) {
                break 'chunks;
            }
        }
        if !chunk.invalid().is_empty() && !push(char::REPLACEMENT_CHARACTER) {
            break;
        }
    }
    out
}

/// Ban/disable decision after a failure, given the consecutive failures including this one.
///
/// At `failure_limit` or beyond → [`BanDecision::Disable`] (never when `failure_limit` is 0).
/// Otherwise every `ban_every_failures`-th failure bans for
/// `ban_step_secs × (consecutive_failures / ban_every_failures)`, capped at `ban_max_secs`.
#[must_use]
pub fn ban_after_failure(p: &BanPolicy, consecutive_failures: u32) -> BanDecision {
    if p.failure_limit != 0 && consecutive_failures >= p.failure_limit {
        return BanDecision::Disable;
    }
    if p.ban_every_failures == 0
        || consecutive_failures == 0
        || !consecutive_failures.is_multiple_of(p.ban_every_failures)
    {
        return BanDecision::None;
    }
    let sets = u64::from(consecutive_failures / p.ban_every_failures);
    BanDecision::Ban {
        secs: p.ban_step_secs.saturating_mul(sets).min(p.ban_max_secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NO_JITTER: f64 = 0.5;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn status(code: u16) -> Outcome {
        Outcome::Status {
            code,
            retry_after: None,
            snippet: format!("body of {code}"),
        }
    }

    fn status_with_retry_after(code: u16, ra: RetryAfter) -> Outcome {
        Outcome::Status {
            code,
            retry_after: Some(ra),
            snippet: String::new(),
        }
    }

    fn classify_default(outcome: &Outcome, failures: u32) -> Verdict {
        classify(outcome, &RetryPolicy::default(), failures, NO_JITTER, now())
    }

    #[test]
    fn schedule_progresses_10_30_60_300_600_then_stays_at_600() {
        let p = RetryPolicy::default();
        let cases = [
            (0, 10_000),
            (1, 10_000),
            (2, 30_000),
            (3, 60_000),
            (4, 300_000),
            (5, 600_000),
            (6, 600_000),
            (50, 600_000),
            (u32::MAX, 600_000),
        ];
        for (failures, want) in cases {
            assert_eq!(
                backoff_ms(&p, failures, NO_JITTER),
                want,
                "failure #{failures}"
            );
        }
    }

    #[test]
    fn empty_schedule_behaves_like_ten_seconds() {
        let p = RetryPolicy {
            schedule_secs: vec![],
            ..RetryPolicy::default()
        };
        assert_eq!(backoff_ms(&p, 1, NO_JITTER), 10_000);
        assert_eq!(backoff_ms(&p, 7, NO_JITTER), 10_000);
    }

    #[test]
    fn jitter_stays_within_the_fraction_and_is_centred_on_half() {
        let p = RetryPolicy::default();
        let cases = [
            (0.0, 8_000),
            (0.25, 9_000),
            (0.5, 10_000),
            (0.75, 11_000),
            (0.999_999, 12_000),
        ];
        for (unit, want) in cases {
            assert_eq!(backoff_ms(&p, 1, unit), want, "jitter unit {unit}");
        }
    }

    #[test]
    fn out_of_range_jitter_inputs_are_clamped() {
        let p = RetryPolicy {
            jitter_fraction: 5.0,
            ..RetryPolicy::default()
        };
        assert_eq!(
            backoff_ms(&p, 1, 0.0),
            1,
            "full jitter down still waits at least 1 ms"
        );
        assert_eq!(backoff_ms(&p, 1, 1.0), 20_000);
        let p = RetryPolicy {
            jitter_fraction: f64::NAN,
            ..RetryPolicy::default()
        };
        assert_eq!(backoff_ms(&p, 1, 0.0), 10_000);
        assert_eq!(backoff_ms(&RetryPolicy::default(), 1, f64::NAN), 10_000);
        assert_eq!(backoff_ms(&RetryPolicy::default(), 1, -3.0), 8_000);
    }

    #[test]
    fn zero_schedule_entry_means_no_wait_and_huge_entries_saturate() {
        let p = RetryPolicy {
            schedule_secs: vec![0, u64::MAX],
            ..RetryPolicy::default()
        };
        assert_eq!(backoff_ms(&p, 1, 0.0), 0);
        assert_eq!(backoff_ms(&p, 2, 0.999), u64::MAX);
    }

    #[test]
    fn two_hundreds_are_delivered() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(
                classify_default(&status(code), 1),
                Verdict::Delivered,
                "status {code}"
            );
        }
    }

    #[test]
    fn endpoint_statuses_hold_the_events_and_are_never_permanent() {
        for code in [401, 403, 404, 405, 407, 410, 421] {
            assert_eq!(
                classify_default(&status(code), 2),
                Verdict::Hold {
                    delay_ms: 30_000,
                    status: code,
                    snippet: format!("body of {code}")
                },
                "status {code}"
            );
        }
        // A configured list replaces the default; Retry-After is honoured on a hold.
        let p = RetryPolicy {
            hold_statuses: vec![400, 503],
            ..RetryPolicy::default()
        };
        assert_eq!(
            classify(&status(401), &p, 1, NO_JITTER, now()),
            Verdict::Permanent {
                status: 401,
                snippet: "body of 401".into()
            }
        );
        assert_eq!(
            classify(
                &status_with_retry_after(503, RetryAfter::Secs(7)),
                &p,
                1,
                NO_JITTER,
                now()
            ),
            Verdict::Hold {
                delay_ms: 7_000,
                status: 503,
                snippet: String::new()
            }
        );
    }

    #[test]
    fn client_errors_other_than_holds_and_408_425_429_are_permanent_with_status_and_snippet() {
        for code in [400, 402, 409, 413, 415, 422, 499] {
            assert_eq!(
                classify_default(&status(code), 1),
                Verdict::Permanent {
                    status: code,
                    snippet: format!("body of {code}")
                },
                "status {code}"
            );
        }
    }

    #[test]
    fn server_errors_throttling_redirects_and_odd_codes_are_retried_with_backoff() {
        for code in [408, 425, 429, 500, 502, 503, 504, 301, 302, 100, 600] {
            assert_eq!(
                classify_default(&status(code), 2),
                Verdict::Retry {
                    delay_ms: 30_000,
                    reason: format!("http {code}")
                },
                "status {code}"
            );
        }
    }

    #[test]
    fn transport_failures_are_retried_with_a_readable_reason() {
        let cases = [
            (Outcome::Timeout, "timeout"),
            (
                Outcome::Connect("connection refused".into()),
                "connect: connection refused",
            ),
            (
                Outcome::Other("tls handshake eof".into()),
                "error: tls handshake eof",
            ),
        ];
        for (outcome, reason) in cases {
            assert_eq!(
                classify_default(&outcome, 3),
                Verdict::Retry {
                    delay_ms: 60_000,
                    reason: reason.to_owned()
                }
            );
        }
    }

    #[test]
    fn retry_after_wins_over_backoff_and_is_capped() {
        let in_90s = now() + Duration::from_secs(90);
        let in_2h = now() + Duration::from_secs(7200);
        let past = now() - Duration::from_secs(5);
        let cases = [
            (RetryAfter::Secs(5), 5_000),
            (RetryAfter::Secs(120), 120_000),
            (RetryAfter::Secs(3600), 3_600_000),
            (RetryAfter::Secs(86_400), 3_600_000),
            (RetryAfter::Secs(u64::MAX), 3_600_000),
            (RetryAfter::Secs(0), 1_000),
            (RetryAfter::At(in_90s), 90_000),
            (RetryAfter::At(in_2h), 3_600_000),
            (RetryAfter::At(now()), 1_000),
            (RetryAfter::At(past), 1_000),
        ];
        for (ra, want) in cases {
            for code in [429, 503] {
                assert_eq!(
                    classify_default(&status_with_retry_after(code, ra), 4),
                    Verdict::Retry {
                        delay_ms: want,
                        reason: format!("http {code}")
                    },
                    "{ra:?} on {code}"
                );
            }
        }
    }

    #[test]
    fn retry_after_on_success_or_permanent_status_is_ignored() {
        let ra = RetryAfter::Secs(60);
        assert_eq!(
            classify_default(&status_with_retry_after(200, ra), 1),
            Verdict::Delivered
        );
        assert_eq!(
            classify_default(&status_with_retry_after(400, ra), 1),
            Verdict::Permanent {
                status: 400,
                snippet: String::new()
            }
        );
    }

    #[test]
    fn retry_after_cap_comes_from_the_policy() {
        let p = RetryPolicy {
            max_retry_after_secs: 30,
            ..RetryPolicy::default()
        };
        let v = classify(
            &status_with_retry_after(503, RetryAfter::Secs(600)),
            &p,
            1,
            0.0,
            now(),
        );
        assert_eq!(
            v,
            Verdict::Retry {
                delay_ms: 30_000,
                reason: "http 503".into()
            }
        );
    }

    #[test]
    fn retry_after_header_parses_seconds_and_http_dates() {
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let cases = [
            ("120", Some(RetryAfter::Secs(120))),
            (" 0 ", Some(RetryAfter::Secs(0))),
            ("99999999999999999999999", Some(RetryAfter::Secs(u64::MAX))),
            ("Wed, 21 Oct 2015 07:28:00 GMT", Some(RetryAfter::At(date))),
            (
                "Wednesday, 21-Oct-15 07:28:00 GMT",
                Some(RetryAfter::At(date)),
            ),
            ("Wed Oct 21 07:28:00 2015", Some(RetryAfter::At(date))),
            ("-5", None),
            ("1.5", None),
            ("", None),
            ("soon", None),
        ];
        for (header, want) in cases {
            assert_eq!(parse_retry_after(header), want, "header {header:?}");
        }
    }

    #[test]
    fn snippet_truncates_on_a_char_boundary() {
        // "é" is 2 bytes, "€" 3: a 4-byte limit cannot split either.
        let cases: [(&[u8], usize, &str); 7] = [
            ("héllo".as_bytes(), 2, "h"),
            ("héllo".as_bytes(), 3, "hé"),
            ("€€".as_bytes(), 4, "€"),
            ("€€".as_bytes(), 6, "€€"),
            (b"short", 256, "short"),
            (b"anything", 0, ""),
            (b"", 10, ""),
        ];
        for (body, max, want) in cases {
            assert_eq!(snippet(body, max), want, "body {body:?} max {max}");
        }
    }

    #[test]
    fn snippet_replaces_controls_and_invalid_utf8() {
        assert_eq!(
            snippet(b"line1\r\nline2\tend\x1b[0m", 256),
            "line1??line2?end?[0m"
        );
        assert_eq!(snippet("a\u{85}b\u{7f}".as_bytes(), 256), "a?b?");
        assert_eq!(
            snippet(b"ok \xff\xfe done", 256),
            "ok \u{fffd}\u{fffd} done"
        );
        assert_eq!(
            snippet(b"ab\xff", 4),
            "ab",
            "U+FFFD is 3 bytes and does not fit"
        );
    }

    #[test]
    fn webhook_bans_every_twenty_failures_and_disables_at_the_limit() {
        let p = BanPolicy::default();
        let cases = [
            (0, BanDecision::None),
            (1, BanDecision::None),
            (19, BanDecision::None),
            (20, BanDecision::Ban { secs: 60 }),
            (21, BanDecision::None),
            (40, BanDecision::Ban { secs: 120 }),
            (60, BanDecision::Ban { secs: 180 }),
            (80, BanDecision::Ban { secs: 240 }),
            (99, BanDecision::None),
            (100, BanDecision::Disable),
            (101, BanDecision::Disable),
        ];
        for (failures, want) in cases {
            assert_eq!(ban_after_failure(&p, failures), want, "failures {failures}");
        }
    }

    #[test]
    fn ban_length_is_capped_and_zero_limit_never_disables() {
        let p = BanPolicy {
            failure_limit: 0,
            ..BanPolicy::default()
        };
        let cases = [
            (380, BanDecision::Ban { secs: 1140 }),
            (400, BanDecision::Ban { secs: 1200 }),
            (420, BanDecision::Ban { secs: 1200 }),
            (u32::MAX - u32::MAX % 20, BanDecision::Ban { secs: 1200 }),
            (u32::MAX, BanDecision::None),
        ];
        for (failures, want) in cases {
            assert_eq!(ban_after_failure(&p, failures), want, "failures {failures}");
        }
    }

    #[test]
    fn zero_ban_interval_never_bans_but_still_disables() {
        let p = BanPolicy {
            ban_every_failures: 0,
            ..BanPolicy::default()
        };
        assert_eq!(ban_after_failure(&p, 20), BanDecision::None);
        assert_eq!(ban_after_failure(&p, 100), BanDecision::Disable);
    }

    proptest! {
        #[test]
        fn backoff_stays_within_jitter_bounds_of_the_schedule(
            schedule in proptest::collection::vec(0u64..100_000, 0..8),
            fraction in 0.0f64..=1.0,
            failures in any::<u32>(),
            unit in 0.0f64..1.0,
        ) {
            let p = RetryPolicy { schedule_secs: schedule.clone(), jitter_fraction: fraction, max_retry_after_secs: 3600, hold_statuses: vec![], failure_status_min: 300 };
            let effective = if schedule.is_empty() { vec![10] } else { schedule };
            let idx = (failures.saturating_sub(1) as usize).min(effective.len() - 1);
            let base = effective[idx] as f64 * 1000.0;
            let got = backoff_ms(&p, failures, unit);
            if base == 0.0 {
                prop_assert_eq!(got, 0);
            } else {
                prop_assert!(got >= 1);
                prop_assert!(got as f64 >= (base * (1.0 - fraction)).floor(), "{} < lower bound", got);
                prop_assert!(got as f64 <= (base * (1.0 + fraction)).ceil(), "{} > upper bound", got);
            }
        }

        #[test]
        fn every_status_gets_exactly_one_consistent_verdict(
            code in 0u16..1000,
            ra_secs in proptest::option::of(0u64..100_000),
            failures in 1u32..200,
            unit in 0.0f64..1.0,
        ) {
            let outcome = Outcome::Status { code, retry_after: ra_secs.map(RetryAfter::Secs), snippet: "s".into() };
            let p = RetryPolicy::default();
            match classify(&outcome, &p, failures, unit, now()) {
                Verdict::Delivered => prop_assert!((200..300).contains(&code)),
                Verdict::Hold { status, snippet, .. } => {
                    prop_assert!(p.hold_statuses.contains(&code));
                    prop_assert_eq!(status, code);
                    prop_assert_eq!(snippet, "s");
                }
                Verdict::Permanent { status, snippet } => {
                    prop_assert!((400..500).contains(&code) && ![408, 425, 429].contains(&code));
                    prop_assert!(!p.hold_statuses.contains(&code));
                    prop_assert_eq!(status, code);
                    prop_assert_eq!(snippet, "s");
                }
                Verdict::Retry { delay_ms, reason } => {
                    prop_assert!(!(200..300).contains(&code));
                    prop_assert_eq!(reason, format!("http {code}"));
                    match ra_secs {
                        Some(s) => prop_assert_eq!(delay_ms, s.min(3600).saturating_mul(1000).max(1000)),
                        None => prop_assert!((8_000..=720_000).contains(&delay_ms)),
                    }
                }
            }
        }

        #[test]
        fn snippet_is_bounded_printable_and_a_prefix_of_the_lossy_text(
            body in proptest::collection::vec(any::<u8>(), 0..600),
            max in 0usize..300,
        ) {
            let s = snippet(&body, max);
            prop_assert!(s.len() <= max);
            prop_assert!(!s.chars().any(char::is_control));
            let full: String = String::from_utf8_lossy(&body)
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            prop_assert!(full.starts_with(&s));
            // Maximal: the next char would not have fitted.
            if let Some(next) = full[s.len()..].chars().next() {
                prop_assert!(s.len() + next.len_utf8() > max);
            }
        }

        #[test]
        fn ban_never_exceeds_the_cap_and_only_lands_on_multiples(failures in any::<u32>()) {
            let p = BanPolicy::default();
            match ban_after_failure(&p, failures) {
                BanDecision::Disable => prop_assert!(failures >= 100),
                BanDecision::Ban { secs } => {
                    prop_assert!(failures % 20 == 0 && failures > 0 && failures < 100);
                    prop_assert!(secs <= 1200 && secs == 60 * u64::from(failures / 20));
                }
                BanDecision::None => prop_assert!((failures < 100 && failures % 20 != 0) || failures == 0),
            }
        }
    }
}
