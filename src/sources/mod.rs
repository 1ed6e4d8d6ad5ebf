//! Sources: talking to devices and handing [`Envelope`]s to the writer.
//!
//! This file holds what every source shares: the envelope, the [`Ack`] handle the writer runs after
//! the commit, per-source counters and the reconnect backoff. No protocol code lives here, and no
//! source touches the database or a sink.

pub mod mqtt;
pub mod otgw;
pub mod payload;
pub mod simulator;

use crate::model::Observation;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Runs once, after the observation it travels with is committed (or found to be a committed
/// duplicate). Opaque so that `store` stays free of rumqttc.
pub struct Ack(Box<dyn FnOnce() + Send>);

impl Ack {
    /// Wraps the acknowledgement action.
    pub fn new(f: impl FnOnce() + Send + 'static) -> Ack {
        Ack(Box::new(f))
    }

    /// Acknowledges.
    pub fn run(self) {
        (self.0)()
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ack")
    }
}

/// Identifies an MQTT message so that a stale redelivery of a committed message can be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MqttReceipt {
    /// Packet id the broker used; a redelivery keeps it.
    pub pkid: u16,
    /// 64-bit digest of topic and payload.
    pub digest: u64,
    /// The broker's DUP flag: set on redelivery.
    pub dup: bool,
}

/// One observation on its way to the writer.
#[derive(Debug)]
pub struct Envelope {
    pub obs: Observation,
    /// Run after the commit; `None` for sources with nothing to acknowledge.
    pub ack: Option<Ack>,
    /// Set by the MQTT source for duplicate detection.
    pub receipt: Option<MqttReceipt>,
}

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
}

impl SourceStats {
    /// Increments a counter.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
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
    fn digest_depends_on_topic_and_payload() {
        assert_eq!(digest("a", b"x"), digest("a", b"x"));
        assert_ne!(digest("a", b"x"), digest("b", b"x"));
        assert_ne!(digest("a", b"x"), digest("a", b"y"));
        assert_ne!(digest("ab", b"c"), digest("a", b"bc"));
    }
}
