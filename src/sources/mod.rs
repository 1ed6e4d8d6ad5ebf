//! Sources: talking to devices and handing [`Envelope`]s to the writer.
//!
//! This file holds what every source shares: per-source counters, the reconnect backoff and the
//! device-id rule; the envelope, the [`Ack`] and the status types are the channel contract
//! ([`crate::channel`], re-exported here). No protocol code lives here, and no
//! source touches the database or a sink.

pub mod jsonl;
pub mod modbus;
pub mod modbus_source;
pub mod mqtt;
pub mod otgw;
pub mod otgw_source;
pub mod payload;
pub mod serial;
pub mod simulator;

pub use crate::channel::{Ack, Envelope, Link, MqttReceipt, SourceStatus, UnitStatus};
use crate::model::UnixMs;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Counters of one source, shared with the daemon for status output.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Messages received.
    pub received: AtomicU64,
    /// Observations handed to the writer.
    pub observations: AtomicU64,
    /// Messages that did not parse or map (acked and dropped).
    pub malformed: AtomicU64,
    /// Messages ignored on purpose (other topics, devices not in the allow-list, empty retained).
    pub ignored: AtomicU64,
    /// Connections established.
    pub connects: AtomicU64,
    /// Link state, protocol counters and per-unit status (see [`SourceStatus`]).
    detail: Mutex<Detail>,
}

/// The non-atomic part of a source's status.
#[derive(Debug, Default)]
pub struct Detail {
    /// Port path and line settings (`/dev/ttyUSB0 (9600 8N1)`), for serial sources.
    pub port: Option<String>,
    /// Current link state.
    pub link: Link,
    /// When the link entered its current state.
    pub since_ms: Option<UnixMs>,
    /// Last valid frame, line or poll answer.
    pub last_valid_ms: Option<UnixMs>,
    /// Why the link is down (or the last failure), as shown to technicians.
    pub last_error: Option<String>,
    /// Protocol-specific counters (`bus_errors`, `unknown_ids`, `timeouts`, …).
    pub counters: BTreeMap<&'static str, u64>,
    /// Modbus units, in config order.
    pub units: Vec<UnitStatus>,
    /// Decoded values with no canonical field (OTGW boiler data), for technicians.
    pub values: BTreeMap<String, String>,
}

impl SourceStats {
    /// Increments a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Locks the non-atomic status (a poisoned lock still yields the data: it is only status).
    pub fn detail(&self) -> MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `n` to a protocol counter.
    pub fn count(&self, counter: &'static str, n: u64) {
        *self.detail().counters.entry(counter).or_default() += n;
    }

    /// Records a link state change; returns true when the state actually changed (log it then).
    pub fn set_link(&self, link: Link, now: UnixMs, error: Option<String>) -> bool {
        let mut d = self.detail();
        let changed = d.link != link;
        if changed {
            d.link = link;
            d.since_ms = Some(now);
        }
        if error.is_some() || link == Link::Connected {
            d.last_error = error;
        }
        changed
    }

    /// A snapshot for display and storage.
    pub fn snapshot(&self, name: &str, kind: &str) -> SourceStatus {
        let d = self.detail();
        let mut counters: BTreeMap<String, u64> = d
            .counters
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect();
        for (k, c) in [
            ("received", &self.received),
            ("observations", &self.observations),
            ("malformed", &self.malformed),
            ("ignored", &self.ignored),
            ("connects", &self.connects),
        ] {
            counters.insert(k.to_string(), c.load(Ordering::Relaxed));
        }
        SourceStatus {
            name: name.to_string(),
            kind: kind.to_string(),
            port: d.port.clone(),
            link: d.link,
            since_ms: d.since_ms,
            last_valid_ms: d.last_valid_ms,
            last_error: d.last_error.clone(),
            counters,
            units: d.units.clone(),
            values: d.values.clone(),
        }
    }
}

/// Shared handle to a source's counters.
pub type SharedStats = Arc<SourceStats>;

/// Capped exponential backoff with full jitter for reconnects.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            attempt: 0,
        }
    }

    /// The next wait: `min·2^attempt` capped at `max`, jittered to 50–100 %.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let capped = exp.min(self.max);
        capped.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    /// Resets after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Longest device id accepted from any source (topic, payload or config), in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// Why a device id is refused (issue 11 item 18). Device ids come from topics and payloads a
/// LAN publisher controls; they end up in every event, in logs and on technicians' terminals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    /// Over [`MAX_DEVICE_ID_BYTES`].
    #[error("is {0} bytes long; at most 128 are accepted")]
    TooLong(usize),
    /// A control character (C0, DEL or C1: newline, ESC, NUL …).
    #[error("contains a control character")]
    Control,
    /// Only white space (a topic level of spaces): not an id anyone can tell apart.
    #[error("is blank")]
    Blank,
}

/// Checks a device id: at most [`MAX_DEVICE_ID_BYTES`] bytes, no control characters.
/// (Emptiness is the caller's rule: a mapping reports it as "no device id".)
///
/// # Errors
/// The first rule the id breaks.
pub fn check_device_id(id: &str) -> Result<(), DeviceIdError> {
    if id.len() > MAX_DEVICE_ID_BYTES {
        return Err(DeviceIdError::TooLong(id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(DeviceIdError::Control);
    }
    if !id.is_empty() && id.trim().is_empty() {
        return Err(DeviceIdError::Blank);
    }
    Ok(())
}

/// Stable 64-bit digest (first 8 bytes of SHA-256) of an MQTT topic and payload.
pub fn digest(topic: &str, payload: &[u8]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((topic.len() as u64).to_be_bytes());
    h.update(topic.as_bytes());
    h.update(payload);
    let out = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&out[..8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let d: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[7] >= Duration::from_millis(500) && d[7] <= Duration::from_millis(1000));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn device_ids_are_at_most_128_bytes_without_control_characters() {
        assert_eq!(check_device_id("living-room"), Ok(()));
        assert_eq!(check_device_id(&"a".repeat(128)), Ok(()));
        // 64 two-byte characters: 128 bytes.
        assert_eq!(check_device_id(&"é".repeat(64)), Ok(()));
        assert_eq!(check_device_id("Küche/Heizkörper 1"), Ok(()));
        assert_eq!(
            check_device_id(&"a".repeat(129)),
            Err(DeviceIdError::TooLong(129))
        );
        assert_eq!(
            check_device_id(&"é".repeat(65)),
            Err(DeviceIdError::TooLong(130))
        );
        for bad in [
            "a\nb",
            "\u{1b}[2J",
            "nul\u{0}",
            "del\u{7f}",
            "csi\u{9b}",
            "tab\t",
        ] {
            assert_eq!(check_device_id(bad), Err(DeviceIdError::Control), "{bad:?}");
        }
        for blank in [" ", "   ", "\u{a0}", "\u{2003} "] {
            assert_eq!(
                check_device_id(blank),
                Err(DeviceIdError::Blank),
                "{blank:?}"
            );
        }
    }

    #[test]
    fn digest_depends_on_topic_and_payload() {
        assert_eq!(digest("a", b"x"), digest("a", b"x"));
        assert_ne!(digest("a", b"x"), digest("b", b"x"));
        assert_ne!(digest("a", b"x"), digest("a", b"y"));
        assert_ne!(digest("ab", b"c"), digest("a", b"bc"));
    }
}
