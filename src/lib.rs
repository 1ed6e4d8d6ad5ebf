//! hvac-edge: thermostat state → change events → durable SQLite outbox → signed upstream delivery.
//!
//! # Layout
//! Data flows one way: device → [`model::Observation`] → change events → outbox → each sink.
//! - [`channel`]: the contract between sources, writer and sinks (envelopes, acks, receipts,
//!   writer messages, source status).
//! - [`config`]: the TOML schema, defaults, validation naming the failing key.
//! - [`model`]: canonical thermostat state, observations, changes, the event envelope.
//! - [`diff`]: the pure diff engine (deadbands, minimum intervals, snapshots).
//! - [`topology`]: every source and sink built from the config first, then run under one
//!   supervisor keyed by name, each with its own cancellation token.
//! - [`sources`]: MQTT (Zigbee2MQTT, generic JSON), serial ports (OpenTherm Gateway, Modbus RTU,
//!   JSON lines) and the simulator; they emit observations and keep a status for `sources`.
//! - [`store`]: the SQLite file: migrations, the writer thread (group commit, acks after commit),
//!   outbox reads, dead letters, garbage collection, the size cap.
//! - [`sinks`]: the delivery loop, retry/ban decisions, Standard Webhooks signing, HTTP transport.
//! - [`daemon`]: wiring, signals, systemd notify, shutdown order.
//! - [`cli`]: technician commands; [`demo`] and [`receiver`]: the self-contained demo.
//! - [`telemetry`], [`tls`]: logging, rate limits, the crypto provider; [`clock`]: wall-clock
//!   steps, so that event ages survive NTP stepping the clock.

pub mod channel;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod diff;
pub mod metrics;
pub mod model;
pub mod receiver;
pub mod reload;
pub mod sinks;
pub mod sources;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod topology;
