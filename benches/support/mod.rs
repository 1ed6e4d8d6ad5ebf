//! Helpers of the pipeline benchmark: a private mosquitto, MQTT load, the raw SQLite reference,
//! signed-batch load against the receiver, a latency-recording receiver, the daemon process and
//! its /proc counters, and the report.

pub mod broker;
pub mod daemon;
pub mod events;
pub mod latency_receiver;
pub mod mqtt;
pub mod raw_sqlite;
pub mod receiver_load;
pub mod report;

use std::time::{Duration, Instant};

/// A point in time after which a bounded loop gives up.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// `d` from now.
    pub fn after(d: Duration) -> Deadline {
        Deadline(Instant::now() + d)
    }

    /// Whether it has passed.
    pub fn passed(self) -> bool {
        Instant::now() >= self.0
    }

    /// As a tokio instant (for `sleep_until` / `timeout_at`).
    pub fn tokio(self) -> tokio::time::Instant {
        self.0.into()
    }
}

/// Bails with `what` when the deadline passed.
pub fn check(deadline: Deadline, what: &str) -> anyhow::Result<()> {
    if deadline.passed() {
        anyhow::bail!("timed out: {what}");
    }
    Ok(())
}
