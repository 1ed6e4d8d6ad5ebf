//! The contract between sources, the writer and the sinks: what travels on the channels and
//! what each side may assume of the other. Sources build [`Envelope`]s (an observation, the
//! [`Ack`] to run once it is committed, and the MQTT receipt that recognises a stale
//! redelivery) and send them as [`WriterMsg`]s; the writer commits, runs the acks, then moves
//! the committed position ([`Committed`]) that wakes the sinks. [`SourceStatus`] is the status a
//! source reports for technicians, stored by the writer.
//!
//! No I/O and no protocol code here: `sources` and `store` both depend on this module and not on
//! each other.

use crate::config::ClockSource;
use crate::diff::DiffPolicy;
use crate::model::{DeviceMeta, Observation, UnixMs};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

/// The writer's latest committed `events.pos`, as every sink watches it.
pub type Committed = tokio::sync::watch::Receiver<i64>;

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

/// Connection state of a source's link (broker connection or serial port).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// Not connected yet.
    #[default]
    Starting,
    /// Connected (port open, broker session up).
    Connected,
    /// Lost or never opened; retrying with backoff.
    Disconnected,
    /// A source with no link (the simulator).
    None,
}

impl Link {
    /// The lower-case name shown by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Starting => "starting",
            Link::Connected => "connected",
            Link::Disconnected => "disconnected",
            Link::None => "-",
        }
    }
}

/// Status of one Modbus unit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitStatus {
    /// Modbus address.
    pub unit_id: u8,
    /// Device id of the unit.
    pub device: String,
    /// Answering (set by a good poll, cleared when the unit is reported OFFLINE).
    pub online: bool,
    /// Polls attempted.
    pub polls: u64,
    /// Polls answered in full.
    pub ok: u64,
    /// Requests with no answer within `request_timeout_ms`.
    pub timeouts: u64,
    /// Garbled answers: a CRC that does not match, or an answer that does not match the request
    /// (wrong unit or function, wrong length). The request counts as failed.
    pub crc_errors: u64,
    /// Modbus exception responses (illegal address, device busy, …).
    pub exceptions: u64,
    /// Register values that the map could not translate (no entry in `map`, out of range).
    pub bad_values: u64,
    /// Failed polls in a row (exceptions excluded); OFFLINE at `offline_after_failed_polls`.
    pub consecutive_failures: u32,
    /// Last good poll.
    pub last_ok_ms: Option<UnixMs>,
    /// The last failure, as text.
    pub last_error: Option<String>,
}

/// A source's status as `hvac-edge sources` shows it (stored as JSON in `source_status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// The source's configured name.
    pub name: String,
    /// `mqtt`, `otgw`, `modbus`, `jsonl` or `simulator`.
    pub kind: String,
    /// Port path and line settings (serial sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Current link state.
    pub link: Link,
    /// When the link entered its current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<UnixMs>,
    /// Last valid frame, line or poll answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_valid_ms: Option<UnixMs>,
    /// Why the link is down, or the last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Every counter by name (the common ones and the protocol's).
    pub counters: BTreeMap<String, u64>,
    /// Modbus units, in config order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<UnitStatus>,
    /// Decoded values with no canonical field (OTGW boiler data, firmware version).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
}

/// What the writer receives.
#[derive(Debug)]
pub enum WriterMsg {
    /// An observation to diff and commit.
    Observe(Envelope),
    /// Periodic housekeeping (about once a second): snapshots, checkpoint, GC, cap, watchdog.
    Tick,
    /// The sources' status, to store for `hvac-edge sources` (sent only when it changed).
    Status(Vec<SourceStatus>),
    /// An MQTT source connected without its session (the broker lost it): its receipts describe
    /// packet ids of the old session and must not match messages of the new one.
    SessionLost(String),
    /// A sink was banned, disabled, enabled or recovered: committed as an `operational` event
    /// of the gateway, so the other sinks tell the cloud (which cannot alert on a webhook that
    /// stopped receiving from what never arrives).
    Operational(OperationalNote),
    /// A reload changed the config: the writer takes the new settings (garbage collection
    /// follows the new sinks' cursors, new limits and deadbands apply), then runs `applied`.
    /// Sent after removed components stopped and before added ones start.
    Reconfigure(Box<Reconfigure>),
}

/// New writer settings from a reloaded config.
#[derive(Debug)]
pub struct Reconfigure {
    pub settings: WriterSettings,
    /// Sources no longer configured: the devices they learned may be claimed by another.
    pub removed_sources: Vec<String>,
    /// Runs once the settings are in force.
    pub applied: Ack,
}

/// Settings of the writer, resolved from the config (the parts a reload may change are sent as
/// [`WriterMsg::Reconfigure`]).
#[derive(Debug, Clone)]
pub struct WriterSettings {
    pub gateway: String,
    pub default_plant: Option<String>,
    pub devices: HashMap<String, DeviceMeta>,
    pub policy: DiffPolicy,
    pub batch_max: usize,
    pub commit_delay: Duration,
    pub snapshot_interval_ms: i64,
    pub checkpoint_interval: Duration,
    /// Names of the configured sinks: events are collected once all of them passed.
    pub sinks: Vec<String>,
    /// 0 = no cap.
    pub max_bytes: u64,
    /// 0 = no cap.
    pub max_events: u64,
    /// Most dead letters kept; the oldest beyond it are deleted (counted in `meta`).
    pub max_dead_letters: u64,
    /// Most devices tracked per source (configured devices do not count); observations of
    /// further new devices of that source are dropped (counted).
    pub max_devices: usize,
    /// Device ids configured for a source (serial devices, MQTT allow-lists): only that source
    /// may report them, from the first observation on.
    pub reserved: HashMap<String, String>,
    /// A device not seen for this long is forgotten in memory and frees its slot.
    pub device_expiry: Duration,
    /// How the clock's `synced` state is known (`gateway.clock`).
    pub clock_source: ClockSource,
}

/// Device id of the gateway's own `operational` events; reserved, so no source can claim it.
pub const GATEWAY_DEVICE: &str = "@gateway";

/// A change of a sink's delivery health.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OperationalNote {
    /// The sink's name.
    pub sink: String,
    /// Its kind (`http`, `webhook`, `mqtt`).
    pub kind: String,
    /// `banned`, `disabled`, `enabled` or `recovered`.
    pub state: String,
    /// Why, in words (the last error, or who re-enabled it).
    pub reason: String,
    /// Consecutive failures at that moment.
    pub failures: i64,
    /// End of the ban (RFC 3339), for `banned`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub banned_until: Option<String>,
}
