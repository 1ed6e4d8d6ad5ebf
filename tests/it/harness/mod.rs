//! The shared integration-test harness: real components on loopback, nothing mocked.
//!
//! - [`mosquitto`]: [`Mosquitto::start`] runs a real broker per test on 127.0.0.1 at a free port;
//!   [`Publisher`] publishes at QoS 1 and awaits every PUBACK.
//! - [`receiver`]: [`Receiver::start`] is a scripted upstream on 127.0.0.1:0 that records every
//!   request, verifies Standard Webhooks signatures itself and parses event batches.
//! - [`config`]: [`Sandbox`] (temp dir + unique tag) and [`TestConfig`], a TOML builder parsed
//!   with `hvac_edge::config::parse`.
//! - [`daemon`]: [`Daemon`] runs `hvac_edge::daemon::run` in-process; [`DaemonProcess`] runs the
//!   real binary for signal, crash and CLI tests.
//! - [`db`]: [`Db`] reads the daemon's SQLite file.
//! - [`serial`]: [`serial::PtyPair`] is a socat pty pair (the daemon opens one end, the test
//!   writes to the other), unpluggable and replugged at the same path; [`modbus::ModbusSlave`]
//!   is a real pymodbus RTU slave on a pty, driven over its stdin.
//! - [`wait`]: [`wait_until`] / [`wait_until_async`] poll every 20 ms and panic naming what was
//!   awaited; tests never sleep a fixed time.
//!
//! A typical test:
//! ```ignore
//! let sb = Sandbox::new("my_test");
//! let broker = Mosquitto::start();
//! let receiver = Receiver::start([]).await;
//! let mut tc = TestConfig::new(&sb);
//! tc.z2m_source("z2m", broker.port()).http_sink("upstream", &receiver);
//! let daemon = Daemon::start(tc.build()).await;
//! broker.wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT).await;
//! let mut publisher = Publisher::connect(broker.port()).await;
//! publisher.publish(&format!("{}/trv", tc.base_topic()), r#"{"local_temperature":20}"#, false).await;
//! let events = receiver.wait_unique_events(1, TIMEOUT).await;
//! ```

// Not every test module uses every helper; the harness is shared by files written separately.
#![allow(dead_code, unused_imports)]
// Test code: a failed expectation should panic with its message (clippy.toml allows this in
// #[test] functions only, and the harness is made of helpers).
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod config;
pub mod daemon;
pub mod db;
pub mod modbus;
pub mod mosquitto;
pub mod receiver;
pub mod serial;
pub mod wait;

pub use config::{Sandbox, TestConfig, toml_str};
pub use daemon::{Daemon, DaemonProcess, get};
pub use db::Db;
pub use mosquitto::{Mosquitto, MosquittoOptions, Publisher, free_port};
pub use receiver::{
    Batch, Receiver, Reply, Request, RequestRule, Rule, check_duplicates_identical,
    check_seq_continues, check_seq_gap_free, dedup_by_id, of_device,
};
pub use wait::{TIMEOUT, assert_holds_for, wait_for_async, wait_until, wait_until_async};

use hvac_edge::model::{Event, UnixMs, parse_rfc3339_ms};

/// The event's `observed_at` in ms since the epoch; panics if it is not RFC 3339.
pub fn observed_ms(e: &Event) -> UnixMs {
    parse_rfc3339_ms(&e.observed_at)
        .unwrap_or_else(|| panic!("observed_at {:?} is not RFC 3339", e.observed_at))
}

/// Wall clock in ms since the epoch (to bound `observed_at`).
pub fn now_ms() -> UnixMs {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
