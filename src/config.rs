//! The TOML configuration: schema, defaults, loading and validation that names the failing key.
//!
//! Two stages (ripgrep's low/high args): serde parses what the user wrote, rejecting unknown keys
//! and values that are wrong on their own; [`Config::validate`] then checks cross-field rules and
//! reports *every* problem at once, each with its dotted key. Opens only the config file and the
//! secret files it names; never sockets.

mod serial;
mod sinks;

use crate::model::TempUnit;
use serde::Deserialize;
pub use serial::{
    JsonlSourceConfig, ModbusSourceConfig, ModbusUnitConfig, OtgwSourceConfig, OverrideModes,
    Parity, SerialLine, valid_otgw_command,
};
pub(crate) use sinks::some_path;
pub use sinks::{
    MqttSinkConfig, TokenAuth, WebhookAuth, WebhookFormat, WebhookMethod, WebhookSinkConfig,
};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration problem, with the dotted key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path, e.g. `sinks.http[0].url`.
    pub key: String,
    /// What is wrong, as an instruction where possible.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid TOML for hvac-edge: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} is invalid ({} problem{})\n{}", problems.len(), if problems.len() == 1 { "" } else { "s" }, problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigError>,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    #[serde(default)]
    pub diff: DiffConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Local `/metrics` and `/healthz` (off unless `listen` is set).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Optional per-device metadata (plant/module ids).
    #[serde(default)]
    pub devices: Vec<DeviceMetaConfig>,
    #[serde(default)]
    pub sources: SourcesConfig,
    #[serde(default)]
    pub sinks: SinksConfig,
}

/// `[gateway]`: identity stamped on every event.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Required; goes into every event as `gateway`.
    pub id: String,
    /// Default plant id for every device without its own.
    #[serde(default)]
    pub plant: Option<String>,
    /// How the gateway knows its clock is right: `ntp` (default: synchronised when the kernel
    /// says so, as systemd-timesyncd, chrony and busybox ntpd report it) or `trusted` (a clock
    /// set by other means, e.g. a battery RTC or a cellular modem: synchronised once past 2024).
    /// Decides the `clock` stamp of events, and so whether TTL may expire them.
    #[serde(default)]
    pub clock: ClockSource,
}

/// `gateway.clock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ClockSource {
    #[default]
    Ntp,
    Trusted,
}

/// `[store]`: the SQLite outbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Database file. Default `/var/lib/hvac-edge/hvac-edge.db`.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// `full` (default: a committed event survives power loss) or `normal` (fewer fsyncs; a
    /// power cut may roll back the last commits, whose messages were already acknowledged to
    /// the broker: `check-config` warns).
    #[serde(default)]
    pub synchronous: Synchronous,
    /// Cap on the database size in bytes; past it, superseded measurements are evicted first.
    /// Default 268435456 (256 MiB); 0 = no cap.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Cap on the number of stored events; 0 (default) = no cap by count.
    #[serde(default)]
    pub max_events: u64,
    /// Most dead letters kept (all sinks); past it the oldest are deleted, counted and logged.
    /// Default 100000, range 1000-10000000.
    #[serde(default = "default_max_dead_letters")]
    pub max_dead_letters: u64,
    /// How long a connection waits for a lock. Default 5000.
    #[serde(default = "default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
}

/// SQLite `synchronous` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

/// `[pipeline]`: channels, batching, snapshots, shutdown.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Observations waiting for the writer; sources await when it is full. Default 1024.
    #[serde(default = "default_queue_len")]
    pub queue_len: usize,
    /// Observations per transaction (group commit). Default 256.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// How long the writer lingers after the first waiting observation to gather a batch.
    /// Trades latency for fewer fsyncs and bytes written per event. Default 25; 0 = commit at once.
    #[serde(default = "default_commit_delay_ms")]
    pub commit_delay_ms: u64,
    /// Periodic self-healing snapshot, only for devices changed since their last one. Default 900.
    #[serde(default = "default_snapshot_interval_secs")]
    pub snapshot_interval_secs: u64,
    /// How often the device-state cache is checkpointed to the `devices` table. Default 30.
    #[serde(default = "default_checkpoint_interval_secs")]
    pub checkpoint_interval_secs: u64,
    /// Most devices tracked (ids come from topics and payloads); observations of further new
    /// devices are dropped and counted. Default 10000, range 1-1000000.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// On SIGTERM, how long in-flight deliveries may finish before the daemon exits anyway. Default 10.
    #[serde(default = "default_shutdown_grace_secs")]
    pub shutdown_grace_secs: u64,
    /// A device not seen for this long frees its slot under `max_devices`. Default 2592000 (30 days).
    #[serde(default = "default_device_expiry_secs")]
    pub device_expiry_secs: u64,
}

const fn default_device_expiry_secs() -> u64 {
    30 * 24 * 3600
}

/// `[diff]`: defaults for every device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffConfig {
    /// Smallest temperature change emitted, in the device's unit. Default 0.2.
    #[serde(default = "default_temperature_deadband")]
    pub temperature_deadband: f64,
    /// Smallest humidity change emitted, %RH. Default 1.0.
    #[serde(default = "default_humidity_deadband")]
    pub humidity_deadband: f64,
    /// Minimum time between two events of one measurement; 0 (default) = no limit.
    #[serde(default)]
    pub measurement_min_interval_secs: u64,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `error` | `warn` | `info` (default) | `debug` | `trace`; `RUST_LOG` overrides.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `plain` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

/// `[metrics]`: a local HTTP endpoint for Prometheus (`/metrics`) and health checks
/// (`/healthz`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to listen on, e.g. `127.0.0.1:9464`; empty (default) = off.
    #[serde(default)]
    pub listen: String,
    /// A listen address other than loopback needs this (the endpoint has no authentication).
    #[serde(default)]
    pub allow_remote: bool,
}

impl MetricsConfig {
    /// The address to listen on, if the endpoint is on (valid after validation).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        if self.listen.is_empty() {
            None
        } else {
            self.listen.parse().ok()
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// `[[devices]]`: metadata for receivers that need plant/module ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMetaConfig {
    pub id: String,
    #[serde(default)]
    pub plant: Option<String>,
    #[serde(default)]
    pub module: Option<String>,
}

/// `[sources]`: one array of tables per kind.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    #[serde(default)]
    pub mqtt: Vec<MqttSourceConfig>,
    #[serde(default)]
    pub otgw: Vec<OtgwSourceConfig>,
    #[serde(default)]
    pub modbus: Vec<ModbusSourceConfig>,
    #[serde(default)]
    pub jsonl: Vec<JsonlSourceConfig>,
    #[serde(default)]
    pub simulator: Vec<SimulatorConfig>,
}

/// `[[sources.mqtt]]`: a local broker carrying thermostat state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    pub name: String,
    /// Broker host. Default `127.0.0.1`.
    #[serde(default = "default_mqtt_host")]
    pub host: String,
    /// Broker port. Default 1883.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Fixed client id; the persistent session is tied to it. Default `hvac-edge-<name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (must not be readable by group or others).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// `zigbee2mqtt` (default) or `generic`.
    #[serde(default)]
    pub preset: MqttPreset,
    /// zigbee2mqtt preset: base topic. Default `zigbee2mqtt`.
    #[serde(default = "default_base_topic")]
    pub base_topic: String,
    /// generic preset: subscription filters.
    #[serde(default)]
    pub topics: Vec<String>,
    /// generic preset: how payloads map to canonical fields.
    #[serde(default)]
    pub mapping: Option<MappingConfig>,
    /// Allow-list of device ids; empty (default) = all.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Larger payloads are counted as malformed and acked. Default 65536.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// MQTT keep-alive. Default 30.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Reconnect backoff bounds. Defaults 1000 and 30000.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Connect with TLS (rustls). Default false, or true when `ca_file` is set; `tls = false`
    /// with `ca_file` is refused. Credentials to a non-loopback host need TLS.
    #[serde(default)]
    pub tls: Option<bool>,
    /// PEM file of the CA certificate(s) that sign the broker's certificate; implies TLS.
    /// Default none: with `tls = true`, the platform's CA certificates.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain, leaf first) presented to the broker; needs `key_file`
    /// and TLS. Default none.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`, checked like a secret file (mode 0600/0400, owner, at
    /// most 64 KiB). Default none.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Payload preset of an MQTT source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MqttPreset {
    #[default]
    Zigbee2mqtt,
    Generic,
}

/// Generic JSON mapping (also used by `sources.jsonl` later).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// `{topic:N}` (topic level N, 0-based) or a JSON pointer such as `/id`.
    pub device: String,
    /// Optional, e.g. `home/{device}/status`; payload `online`/`offline` or `{"state": …}`.
    #[serde(default)]
    pub availability_topic: Option<String>,
    /// Unit of temperatures in the payload. Default `C`.
    #[serde(default = "default_unit")]
    pub unit: TempUnit,
    /// Canonical field → JSON pointer.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Enum field → { device value → canonical value }.
    #[serde(default)]
    pub values: BTreeMap<String, BTreeMap<String, String>>,
}

/// `[[sources.simulator]]`: a simulated fleet, for the demo, benchmarks and site tests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatorConfig {
    pub name: String,
    /// Number of simulated thermostats. Default 5.
    #[serde(default = "default_sim_devices")]
    pub devices: u32,
    /// Observations per second across the fleet. Default 2.0.
    #[serde(default = "default_sim_rate")]
    pub changes_per_sec: f64,
    /// Random seed; the same seed gives the same sequence. Default 1.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Device id prefix. Default `sim-`.
    #[serde(default = "default_sim_prefix")]
    pub device_prefix: String,
    /// Stop after this many observations; 0 (default) = run until stopped.
    #[serde(default)]
    pub max_observations: u64,
}

/// `[sinks]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    #[serde(default)]
    pub http: Vec<HttpSinkConfig>,
    #[serde(default)]
    pub webhook: Vec<WebhookSinkConfig>,
    #[serde(default)]
    pub mqtt: Vec<MqttSinkConfig>,
}

impl SinksConfig {
    /// Names of every configured sink, of every kind (their cursors hold events back from GC).
    pub fn names(&self) -> Vec<String> {
        self.http
            .iter()
            .map(|s| s.name.clone())
            .chain(self.webhook.iter().map(|s| s.name.clone()))
            .chain(self.mqtt.iter().map(|s| s.name.clone()))
            .collect()
    }

    /// How many sinks are configured.
    pub fn len(&self) -> usize {
        self.http.len() + self.webhook.len() + self.mqtt.len()
    }

    /// Whether no sink is configured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `[[sinks.http]]`: batched HTTPS ingest upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    pub name: String,
    pub url: String,
    /// `true` is accepted only for a loopback host. Default false.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Events per request. Default 500.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// Bytes per request body. Default 1048576.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// Per-request timeout. Default 10000.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Waits after consecutive failures; then every last value, jittered ±20 %. Retry-After wins.
    #[serde(default = "default_retry_schedule")]
    pub retry_schedule_secs: Vec<u64>,
    /// Undelivered events older than this become dead letters with reason `expired`. Default 86400.
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    /// Send the API key in this header …
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// … or in this query parameter.
    #[serde(default)]
    pub api_key_query: Option<String>,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// `whsec_…` secret for Standard Webhooks signatures (file or env).
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub signing_secret_env: Option<String>,
    /// Sent as `x-api-version`. Default "1".
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// A sink new to an existing database starts at the `oldest` (default) event or `now`.
    #[serde(default)]
    pub from: StartFrom,
    /// Statuses that mean the endpoint, route or credentials are wrong, not the event: the batch
    /// is held and retried on the schedule, never dead-lettered.
    /// Default `[401, 403, 404, 405, 407, 410, 421]`.
    #[serde(default = "default_hold_statuses")]
    pub hold_statuses: Vec<u16>,
    /// After this many events in a row rejected one by one (400/422 and other 4xx after
    /// bisection), the sink stops dead-lettering and holds (`rejecting every event`). Default 10.
    #[serde(default = "default_max_consecutive_rejected")]
    pub max_consecutive_rejected: u32,
}

/// Default [`HttpSinkConfig::hold_statuses`].
pub const DEFAULT_HOLD_STATUSES: [u16; 7] = [401, 403, 404, 405, 407, 410, 421];

fn default_hold_statuses() -> Vec<u16> {
    DEFAULT_HOLD_STATUSES.to_vec()
}
const fn default_max_consecutive_rejected() -> u32 {
    10
}

/// Where a new sink starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    #[default]
    Oldest,
    Now,
}

fn default_store_path() -> PathBuf {
    PathBuf::from("/var/lib/hvac-edge/hvac-edge.db")
}
const fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}
const fn default_max_dead_letters() -> u64 {
    100_000
}
const fn default_busy_timeout_ms() -> u64 {
    5000
}
const fn default_queue_len() -> usize {
    1024
}
const fn default_batch_max() -> usize {
    256
}
const fn default_commit_delay_ms() -> u64 {
    25
}
const fn default_snapshot_interval_secs() -> u64 {
    900
}
const fn default_checkpoint_interval_secs() -> u64 {
    30
}
const fn default_max_devices() -> usize {
    10_000
}
const fn default_shutdown_grace_secs() -> u64 {
    10
}
const fn default_temperature_deadband() -> f64 {
    0.2
}
const fn default_humidity_deadband() -> f64 {
    1.0
}
fn default_log_level() -> String {
    "info".into()
}
fn default_mqtt_host() -> String {
    "127.0.0.1".into()
}
const fn default_mqtt_port() -> u16 {
    1883
}
fn default_base_topic() -> String {
    "zigbee2mqtt".into()
}
const fn default_max_payload_bytes() -> usize {
    65536
}
const fn default_keep_alive_secs() -> u64 {
    30
}
pub(crate) const fn default_reconnect_min_ms() -> u64 {
    1000
}
pub(crate) const fn default_reconnect_max_ms() -> u64 {
    30_000
}
const fn default_unit() -> TempUnit {
    TempUnit::C
}
const fn default_sim_devices() -> u32 {
    5
}
const fn default_sim_rate() -> f64 {
    2.0
}
const fn default_seed() -> u64 {
    1
}
fn default_sim_prefix() -> String {
    "sim-".into()
}
const fn default_batch_max_events() -> usize {
    500
}
const fn default_batch_max_bytes() -> usize {
    1024 * 1024
}
const fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_retry_schedule() -> Vec<u64> {
    vec![10, 30, 60, 300, 600]
}
const fn default_ttl_secs() -> u64 {
    86_400
}
fn default_api_version() -> String {
    "1".into()
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: default_store_path(),
            synchronous: Synchronous::Full,
            max_bytes: default_max_bytes(),
            max_events: 0,
            max_dead_letters: default_max_dead_letters(),
            busy_timeout_ms: default_busy_timeout_ms(),
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            queue_len: default_queue_len(),
            batch_max: default_batch_max(),
            commit_delay_ms: default_commit_delay_ms(),
            snapshot_interval_secs: default_snapshot_interval_secs(),
            checkpoint_interval_secs: default_checkpoint_interval_secs(),
            max_devices: default_max_devices(),
            shutdown_grace_secs: default_shutdown_grace_secs(),
            device_expiry_secs: default_device_expiry_secs(),
        }
    }
}

impl Default for DiffConfig {
    fn default() -> Self {
        DiffConfig {
            temperature_deadband: default_temperature_deadband(),
            humidity_deadband: default_humidity_deadband(),
            measurement_min_interval_secs: 0,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Plain,
        }
    }
}

/// Loads, parses and validates a config file.
///
/// # Errors
/// [`LoadError`] naming the file, with every problem found.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates config text (`path` is used in messages only).
///
/// # Errors
/// [`LoadError::Parse`] for TOML/type errors (with line and column, never the line's text),
/// [`LoadError::Invalid`] for rule violations. URL userinfo is redacted in both.
pub fn parse(text: &str, path: &Path) -> Result<Config, LoadError> {
    let cfg: Config = toml::from_str(text).map_err(|e| LoadError::Parse {
        path: path.to_path_buf(),
        message: toml_error_message(text, &e),
    })?;
    cfg.validate().map_err(|problems| LoadError::Invalid {
        path: path.to_path_buf(),
        problems: problems
            .into_iter()
            .map(|p| ConfigError {
                problem: redact_userinfo(&p.problem),
                ..p
            })
            .collect(),
    })?;
    Ok(cfg)
}

/// The config that `hvac-edge demo` runs (config/demo.toml, embedded).
pub const DEMO_TOML: &str = include_str!("../config/demo.toml");

pub(crate) struct Problems(Vec<ConfigError>);

impl Problems {
    pub(crate) fn add(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            problem: problem.into(),
        });
    }
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

impl Config {
    /// Checks every cross-field rule; returns all problems at once.
    ///
    /// # Errors
    /// The list of problems, each naming its dotted key.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut p = Problems(Vec::new());
        if self.gateway.id.trim().is_empty() {
            p.add("gateway.id", "must not be empty");
        } else if self.gateway.id.chars().count() > 128 {
            p.add("gateway.id", "must be at most 128 characters");
        }
        if self.store.path.as_os_str().is_empty() {
            p.add("store.path", "must not be empty");
        }
        if !(100..=600_000).contains(&self.store.busy_timeout_ms) {
            p.add("store.busy_timeout_ms", "must be between 100 and 600000");
        }
        if !(1000..=10_000_000).contains(&self.store.max_dead_letters) {
            p.add(
                "store.max_dead_letters",
                "must be between 1000 and 10000000",
            );
        }
        if self.store.max_bytes != 0 && self.store.max_bytes < 1024 * 1024 {
            p.add(
                "store.max_bytes",
                "must be 0 (no cap) or at least 1048576 (1 MiB)",
            );
        }
        let pl = &self.pipeline;
        if !(1..=1_000_000).contains(&pl.queue_len) {
            p.add("pipeline.queue_len", "must be between 1 and 1000000");
        }
        if !(1..=100_000).contains(&pl.batch_max) {
            p.add("pipeline.batch_max", "must be between 1 and 100000");
        }
        if pl.commit_delay_ms > 1000 {
            p.add("pipeline.commit_delay_ms", "must be at most 1000");
        }
        if pl.snapshot_interval_secs == 0 {
            p.add("pipeline.snapshot_interval_secs", "must be at least 1");
        }
        if !(1..=25).contains(&pl.shutdown_grace_secs) {
            p.add(
                "pipeline.shutdown_grace_secs",
                "must be between 1 and 25 (below the systemd unit's TimeoutStopSec=30)",
            );
        }
        if !(1..=1_000_000).contains(&pl.max_devices) {
            p.add("pipeline.max_devices", "must be between 1 and 1000000");
        }
        if pl.device_expiry_secs < 60 {
            p.add("pipeline.device_expiry_secs", "must be at least 60");
        }
        if pl.checkpoint_interval_secs == 0 {
            p.add("pipeline.checkpoint_interval_secs", "must be at least 1");
        }
        if !(0.0..=10.0).contains(&self.diff.temperature_deadband) {
            p.add("diff.temperature_deadband", "must be between 0 and 10");
        }
        if !(0.0..=50.0).contains(&self.diff.humidity_deadband) {
            p.add("diff.humidity_deadband", "must be between 0 and 50");
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log.level.as_str()) {
            p.add(
                "log.level",
                format!(
                    "unknown level {:?}; use error, warn, info, debug or trace",
                    self.log.level
                ),
            );
        }
        if !self.metrics.listen.is_empty() {
            match self.metrics.listen.parse::<std::net::SocketAddr>() {
                Err(_) => p.add(
                    "metrics.listen",
                    format!(
                        "{:?} is not an address and port, e.g. \"127.0.0.1:9464\"",
                        self.metrics.listen
                    ),
                ),
                Ok(a) if !a.ip().is_loopback() && !self.metrics.allow_remote => p.add(
                    "metrics.listen",
                    format!(
                        "{a} is not a loopback address; the endpoint has no authentication: use 127.0.0.1, or set metrics.allow_remote = true"
                    ),
                ),
                Ok(_) => {}
            }
        }
        let mut device_ids: HashMap<&str, usize> = HashMap::new();
        for (i, d) in self.devices.iter().enumerate() {
            check_device_id(&mut p, &format!("devices[{i}].id"), &d.id);
            if d.id.is_empty() {
                p.add(format!("devices[{i}].id"), "must not be empty");
            } else if let Some(j) = device_ids.insert(&d.id, i) {
                p.add(
                    format!("devices[{i}].id"),
                    format!("{:?} is already described by devices[{j}]", d.id),
                );
            }
        }
        self.validate_sources(&mut p);
        self.validate_sinks(&mut p);
        if p.0.is_empty() { Ok(()) } else { Err(p.0) }
    }

    fn validate_sources<'a>(&'a self, p: &mut Problems) {
        let mut names: HashMap<&str, String> = HashMap::new();
        let mut client_ids: HashMap<(String, u16, String), String> = HashMap::new();
        let mut claimed: HashMap<&'a str, String> = HashMap::new();
        for (i, s) in self.sources.mqtt.iter().enumerate() {
            let k = format!("sources.mqtt[{i}]");
            unique_name(p, &mut names, &k, &s.name);
            let id = s.effective_client_id();
            match client_ids.entry((s.host.to_ascii_lowercase(), s.port, id.clone())) {
                std::collections::hash_map::Entry::Occupied(o) => p.add(
                    format!("{k}.client_id"),
                    format!("{id:?} is already used by {} on the same broker; each source needs its own client id", o.get()),
                ),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(k.clone());
                }
            }
            for (j, d) in s.devices.iter().enumerate() {
                check_device_id(p, &format!("{k}.devices[{j}]"), d);
                if let Some(prev) = claimed.get(d.as_str()) {
                    if *prev != k {
                        p.add(
                            format!("{k}.devices[{j}]"),
                            format!(
                                "{d:?} is also claimed by {prev}; a device id belongs to one source"
                            ),
                        );
                    }
                } else {
                    claimed.insert(d, k.clone());
                }
            }
            if s.host.trim().is_empty() {
                p.add(format!("{k}.host"), "must not be empty");
            }
            if s.port == 0 {
                p.add(format!("{k}.port"), "must not be 0");
            }
            if s.client_id
                .as_deref()
                .is_some_and(|c| c.is_empty() || c.len() > 128)
            {
                p.add(format!("{k}.client_id"), "must be 1 to 128 characters");
            }
            if s.password_file.is_some() && s.password_env.is_some() {
                p.add(
                    format!("{k}.password_file"),
                    "set password_file or password_env, not both",
                );
            }
            if (s.password_file.is_some() || s.password_env.is_some()) && s.username.is_none() {
                p.add(format!("{k}.username"), "a password is set but no username");
            }
            if let Some(f) = &s.password_file {
                check_secret_file(p, &format!("{k}.password_file"), f);
            }
            if let Some(e) = &s.password_env {
                check_secret_env(p, &format!("{k}.password_env"), e);
            }
            check_mqtt_tls(p, &k, s);
            if !(1024..=16 * 1024 * 1024).contains(&s.max_payload_bytes) {
                p.add(
                    format!("{k}.max_payload_bytes"),
                    "must be between 1024 and 16777216",
                );
            }
            if !(5..=3600).contains(&s.keep_alive_secs) {
                p.add(format!("{k}.keep_alive_secs"), "must be between 5 and 3600");
            }
            if s.reconnect_min_ms == 0 || s.reconnect_min_ms > s.reconnect_max_ms {
                p.add(
                    format!("{k}.reconnect_min_ms"),
                    "must be at least 1 and at most reconnect_max_ms",
                );
            }
            match s.preset {
                MqttPreset::Zigbee2mqtt => {
                    if s.base_topic.is_empty() || s.base_topic.contains(['+', '#']) {
                        p.add(
                            format!("{k}.base_topic"),
                            "must be a non-empty topic without wildcards",
                        );
                    }
                    if !s.topics.is_empty() {
                        p.add(format!("{k}.topics"), "only used with preset = \"generic\"; the zigbee2mqtt preset subscribes to <base_topic>/#");
                    }
                    if s.mapping.is_some() {
                        p.add(
                            format!("{k}.mapping"),
                            "only used with preset = \"generic\"",
                        );
                    }
                }
                MqttPreset::Generic => {
                    if s.topics.is_empty() {
                        p.add(
                            format!("{k}.topics"),
                            "the generic preset needs at least one topic filter",
                        );
                    }
                    for (j, t) in s.topics.iter().enumerate() {
                        if !valid_filter(t) {
                            p.add(
                                format!("{k}.topics[{j}]"),
                                format!("{t:?} is not a valid MQTT topic filter"),
                            );
                        }
                    }
                    match &s.mapping {
                        None => p.add(
                            format!("{k}.mapping"),
                            "the generic preset needs a [sources.mqtt.mapping] table",
                        ),
                        Some(m) => {
                            if let Err(errs) = crate::sources::payload::Mapping::compile(&m.spec())
                            {
                                for (key, problem) in errs {
                                    p.add(format!("{k}.mapping.{key}"), problem);
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut ports: HashMap<PathBuf, String> = HashMap::new();
        let mut port_once = |p: &mut Problems, k: &str, port: &Path| {
            if port.as_os_str().is_empty() {
                return;
            }
            if let Some(prev) = ports.get(port) {
                p.add(
                    format!("{k}.port"),
                    format!("{} is also opened by {prev}; a serial port belongs to one source (put every unit of an RS-485 line in one [[sources.modbus]])", port.display()),
                );
            } else {
                ports.insert(port.to_path_buf(), k.to_string());
            }
        };
        let mut claim = |p: &mut Problems, key: String, device: &'a str, owner: &str| {
            if device.is_empty() {
                return;
            }
            if let Some(prev) = claimed.get(device) {
                if prev != owner {
                    p.add(
                        key,
                        format!("{device:?} is also claimed by {prev}; a device id belongs to one source"),
                    );
                }
            } else {
                claimed.insert(device, owner.to_string());
            }
        };
        for (i, s) in self.sources.otgw.iter().enumerate() {
            let k = format!("sources.otgw[{i}]");
            unique_name(p, &mut names, &k, &s.name);
            port_once(p, &k, &s.port);
            claim(p, format!("{k}.device"), &s.device, &k);
            serial::check_otgw(p, &k, s);
        }
        for (i, s) in self.sources.modbus.iter().enumerate() {
            let k = format!("sources.modbus[{i}]");
            unique_name(p, &mut names, &k, &s.name);
            port_once(p, &k, &s.port);
            for (j, u) in s.units.iter().enumerate() {
                claim(
                    p,
                    format!("{k}.units[{j}].device"),
                    &u.device,
                    &format!("{k}.units[{j}]"),
                );
            }
            serial::check_modbus(p, &k, s);
        }
        for (i, s) in self.sources.jsonl.iter().enumerate() {
            let k = format!("sources.jsonl[{i}]");
            unique_name(p, &mut names, &k, &s.name);
            port_once(p, &k, &s.port);
            serial::check_jsonl(p, &k, s);
        }
        let mut prefixes: HashMap<&str, String> = HashMap::new();
        for (i, s) in self.sources.simulator.iter().enumerate() {
            let k = format!("sources.simulator[{i}]");
            unique_name(p, &mut names, &k, &s.name);
            if let Some(prev) = prefixes.get(s.device_prefix.as_str()) {
                p.add(
                    format!("{k}.device_prefix"),
                    format!(
                        "{:?} is also used by {prev}; their device ids would collide",
                        s.device_prefix
                    ),
                );
            } else {
                prefixes.insert(&s.device_prefix, k.clone());
            }
            if !(1..=100_000).contains(&s.devices) {
                p.add(format!("{k}.devices"), "must be between 1 and 100000");
            }
            if !(s.changes_per_sec > 0.0 && s.changes_per_sec <= 1_000_000.0) {
                p.add(
                    format!("{k}.changes_per_sec"),
                    "must be greater than 0 and at most 1000000",
                );
            }
        }
    }

    fn validate_sinks(&self, p: &mut Problems) {
        let mut names: HashMap<&str, String> = HashMap::new();
        for (i, s) in self.sinks.http.iter().enumerate() {
            let k = format!("sinks.http[{i}]");
            unique_name(p, &mut names, &k, &s.name);
            match url::Url::parse(&s.url) {
                Err(e) => p.add(
                    format!("{k}.url"),
                    format!("{:?} is not a valid URL: {e}", redact_userinfo(&s.url)),
                ),
                Ok(u) if !u.username().is_empty() || u.password().is_some() => p.add(
                    format!("{k}.url"),
                    "must not contain credentials; put the key in api_key_file or api_key_env",
                ),
                Ok(u) => match u.scheme() {
                    "https" => {
                        if s.allow_insecure_http {
                            p.add(
                                format!("{k}.allow_insecure_http"),
                                "only meaningful with an http:// URL; remove it",
                            );
                        }
                    }
                    "http" => {
                        let host = u.host_str().unwrap_or("");
                        if !is_loopback_host(host) {
                            p.add(
                                format!("{k}.url"),
                                "plain http:// is refused for non-loopback hosts; use https://",
                            );
                        } else if !s.allow_insecure_http {
                            p.add(format!("{k}.url"), "plain http:// needs allow_insecure_http = true (accepted for loopback hosts only)");
                        }
                    }
                    other => p.add(
                        format!("{k}.url"),
                        format!("scheme {other:?} is not supported; use https://"),
                    ),
                },
            }
            if !(1..=10_000).contains(&s.batch_max_events) {
                p.add(
                    format!("{k}.batch_max_events"),
                    "must be between 1 and 10000",
                );
            }
            if !(1024..=64 * 1024 * 1024).contains(&s.batch_max_bytes) {
                p.add(
                    format!("{k}.batch_max_bytes"),
                    "must be between 1024 and 67108864",
                );
            }
            if !(100..=600_000).contains(&s.request_timeout_ms) {
                p.add(
                    format!("{k}.request_timeout_ms"),
                    "must be between 100 and 600000",
                );
            }
            if s.retry_schedule_secs.is_empty() {
                p.add(
                    format!("{k}.retry_schedule_secs"),
                    "must list at least one wait, e.g. [10, 30, 60, 300, 600]",
                );
            } else if s.retry_schedule_secs.iter().any(|&w| w == 0 || w > 86_400) {
                p.add(
                    format!("{k}.retry_schedule_secs"),
                    "every wait must be between 1 and 86400 seconds",
                );
            }
            if s.ttl_secs == 0 {
                p.add(format!("{k}.ttl_secs"), "must be at least 1");
            }
            if let Some(bad) = s.hold_statuses.iter().find(|c| !(400..=599).contains(*c)) {
                p.add(
                    format!("{k}.hold_statuses"),
                    format!("{bad} is not an HTTP error status (400-599)"),
                );
            }
            if !(1..=10_000).contains(&s.max_consecutive_rejected) {
                p.add(
                    format!("{k}.max_consecutive_rejected"),
                    "must be between 1 and 10000",
                );
            }
            if s.api_key_query.as_deref().is_some_and(str::is_empty) {
                p.add(format!("{k}.api_key_query"), "must not be empty");
            }
            if s.api_key_header.is_some() && s.api_key_query.is_some() {
                p.add(
                    format!("{k}.api_key_query"),
                    "set api_key_header or api_key_query, not both",
                );
            }
            if let Some(h) = &s.api_key_header
                && reqwest::header::HeaderName::from_bytes(h.as_bytes()).is_err()
            {
                p.add(
                    format!("{k}.api_key_header"),
                    format!("{h:?} is not a valid HTTP header name"),
                );
            }
            let has_key_place = s.api_key_header.is_some() || s.api_key_query.is_some();
            let has_key = s.api_key_file.is_some() || s.api_key_env.is_some();
            if s.api_key_file.is_some() && s.api_key_env.is_some() {
                p.add(
                    format!("{k}.api_key_file"),
                    "set api_key_file or api_key_env, not both",
                );
            }
            if has_key_place && !has_key {
                p.add(
                    format!("{k}.api_key_file"),
                    "api_key_header/api_key_query is set but no api_key_file or api_key_env",
                );
            }
            if has_key && !has_key_place {
                p.add(format!("{k}.api_key_header"), "an API key is configured but neither api_key_header nor api_key_query says where to send it");
            }
            if let Some(f) = &s.api_key_file {
                check_secret_file(p, &format!("{k}.api_key_file"), f);
            }
            if let Some(e) = &s.api_key_env {
                check_secret_env(p, &format!("{k}.api_key_env"), e);
            }
            if s.signing_secret_file.is_some() && s.signing_secret_env.is_some() {
                p.add(
                    format!("{k}.signing_secret_file"),
                    "set signing_secret_file or signing_secret_env, not both",
                );
            }
            let secret = match (&s.signing_secret_file, &s.signing_secret_env) {
                (Some(f), _) => check_secret_file(p, &format!("{k}.signing_secret_file"), f),
                (None, Some(e)) => check_secret_env(p, &format!("{k}.signing_secret_env"), e),
                (None, None) => None,
            };
            if let Some(secret) = secret
                && let Err(e) = crate::sinks::signing::SigningKey::from_whsec(&secret)
            {
                let key = if s.signing_secret_file.is_some() {
                    "signing_secret_file"
                } else {
                    "signing_secret_env"
                };
                p.add(
                    format!("{k}.{key}"),
                    format!("not a usable whsec_ secret: {e}"),
                );
            }
            if s.api_version.is_empty()
                || reqwest::header::HeaderValue::from_str(&s.api_version).is_err()
            {
                p.add(
                    format!("{k}.api_version"),
                    "must be a non-empty header value",
                );
            }
        }
        for (i, s) in self.sinks.webhook.iter().enumerate() {
            let k = format!("sinks.webhook[{i}]");
            unique_name(p, &mut names, &k, &s.name);
            sinks::validate_webhook(p, &k, s);
        }
        for (i, s) in self.sinks.mqtt.iter().enumerate() {
            let k = format!("sinks.mqtt[{i}]");
            unique_name(p, &mut names, &k, &s.name);
            sinks::validate_mqtt(p, &k, s);
        }
    }

    /// Legal but unwise settings, each naming its key (`check-config` prints them as warnings
    /// and still exits 0; ntpd-rs `config.check()`). Never secrets.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut w = Problems(Vec::new());
        // Endpoint problems that would make dead letters of good events if not held.
        let hold = |list: &[u16], key: String, w: &mut Problems| {
            let missing: Vec<String> = [401u16, 403, 404, 410]
                .iter()
                .filter(|c| !list.contains(c))
                .map(u16::to_string)
                .collect();
            if !missing.is_empty() {
                w.add(
                    key,
                    format!(
                        "leaves out {}: an expired key or a moved route would turn good events into dead letters (\"rejected\") instead of holding them",
                        missing.join(", ")
                    ),
                );
            }
        };
        for (i, s) in self.sinks.http.iter().enumerate() {
            hold(
                &s.hold_statuses,
                format!("sinks.http[{i}].hold_statuses"),
                &mut w,
            );
        }
        for (i, s) in self.sinks.webhook.iter().enumerate() {
            hold(
                &s.hold_statuses,
                format!("sinks.webhook[{i}].hold_statuses"),
                &mut w,
            );
            if s.auth == WebhookAuth::Oauth2RefreshToken {
                w.add(
                    format!("sinks.webhook[{i}].auth"),
                    "a refresh token the provider rotates is kept in memory only: after a restart the one in refresh_token_file is used again; if the provider revokes used refresh tokens, update the file",
                );
            }
        }
        if self.store.synchronous == Synchronous::Normal {
            w.add(
                "store.synchronous",
                "\"normal\" does not fsync each commit: a power cut may roll back events that \
                 were already acknowledged to the broker, and they are lost; use \"full\" \
                 (the default) unless the gateway has a UPS or battery-backed storage",
            );
        }
        w.0
    }

    /// Metadata for a device: its own `[[devices]]` entry, else the gateway's default plant.
    pub fn device_meta(&self) -> HashMap<String, crate::model::DeviceMeta> {
        self.devices
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    crate::model::DeviceMeta {
                        plant: d.plant.clone().or_else(|| self.gateway.plant.clone()),
                        module: d.module.clone(),
                    },
                )
            })
            .collect()
    }

    /// The diff policy from `[diff]`.
    pub fn diff_policy(&self) -> crate::diff::DiffPolicy {
        crate::diff::DiffPolicy {
            temperature_deadband: crate::model::Fixed::from_f64(self.diff.temperature_deadband)
                .unwrap_or_default(),
            humidity_deadband: crate::model::Fixed::from_f64(self.diff.humidity_deadband)
                .unwrap_or_default(),
            measurement_min_interval_ms: (self.diff.measurement_min_interval_secs as i64)
                .saturating_mul(1000),
        }
    }
}

impl MqttSourceConfig {
    /// Whether the source connects with TLS: `tls`, else whether `ca_file` is set.
    pub fn tls_enabled(&self) -> bool {
        self.tls.unwrap_or(self.ca_file.is_some())
    }

    /// The TLS client configuration of the source, or `None` without TLS; reads the files.
    ///
    /// # Errors
    /// Every problem with the TLS files, each naming its key (`ca_file`, `cert_file`,
    /// `key_file`, `tls`).
    pub fn tls_client_config(
        &self,
    ) -> Result<Option<rustls::ClientConfig>, Vec<crate::tls::FileError>> {
        tls_config(
            self.tls_enabled(),
            self.ca_file.as_deref(),
            self.cert_file.as_deref(),
            self.key_file.as_deref(),
        )
    }

    /// The client id in effect.
    pub fn effective_client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("hvac-edge-{}", self.name))
    }
}

impl MappingConfig {
    /// The mapping as the payload parser takes it.
    pub fn spec(&self) -> crate::sources::payload::MappingSpec {
        crate::sources::payload::MappingSpec {
            device: self.device.clone(),
            availability_topic: self.availability_topic.clone(),
            unit: self.unit,
            fields: self.fields.clone(),
            values: self.values.clone(),
        }
    }
}

/// The rustls client configuration of an MQTT connection (a source or the upstream sink), or
/// `None` without TLS; a client certificate needs both files.
pub(crate) fn tls_config(
    tls: bool,
    ca_file: Option<&Path>,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<Option<rustls::ClientConfig>, Vec<crate::tls::FileError>> {
    if !tls {
        return Ok(None);
    }
    crate::tls::client_config(crate::tls::ClientFiles {
        ca_file,
        client_cert: cert_file.zip(key_file),
    })
    .map(Some)
}

fn unique_name<'a>(
    p: &mut Problems,
    names: &mut HashMap<&'a str, String>,
    key: &str,
    name: &'a str,
) {
    if name.is_empty() {
        p.add(format!("{key}.name"), "must not be empty");
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || name.len() > 64
    {
        p.add(
            format!("{key}.name"),
            format!("{name:?} must be 1-64 characters of a-z, A-Z, 0-9, - and _"),
        );
    } else if let Some(prev) = names.get(name) {
        p.add(
            format!("{key}.name"),
            format!("{name:?} is already used by {prev}"),
        );
    } else {
        names.insert(name, key.to_string());
    }
}

/// The device id rule of every source ([`crate::sources::check_device_id`]) for a configured id.
pub(crate) fn check_device_id(p: &mut Problems, key: &str, id: &str) {
    use crate::sources::DeviceIdError;
    if id == crate::channel::GATEWAY_DEVICE {
        p.add(
            key,
            format!("{id:?} is reserved for the gateway's own operational events"),
        );
        return;
    }
    match crate::sources::check_device_id(id) {
        Ok(()) => {}
        Err(DeviceIdError::TooLong(n)) => {
            p.add(key, format!("must be at most 128 bytes (it is {n})"))
        }
        Err(DeviceIdError::Control) => p.add(
            key,
            format!(
                "\"{}\" must not contain control characters",
                crate::telemetry::shown(id, 32)
            ),
        ),
        Err(DeviceIdError::Blank) => p.add(key, "must not be blank"),
    }
}

/// The TLS rules of an MQTT source (issue 11 item 20): credentials never travel in clear to
/// another host, a client certificate comes as a pair and only with TLS, and the TLS files load.
fn check_mqtt_tls(p: &mut Problems, k: &str, s: &MqttSourceConfig) {
    const NEED_TLS: &str = "(set ca_file or tls = true)";
    let tls = s.tls_enabled();
    if s.tls == Some(false) && s.ca_file.is_some() {
        p.add(
            format!("{k}.tls"),
            "is false but ca_file is set; remove ca_file or set tls = true",
        );
    }
    if s.username.is_some() && !tls && !is_loopback_host(&s.host) {
        p.add(
            format!("{k}.username"),
            format!("credentials to a non-loopback broker need TLS {NEED_TLS}"),
        );
    }
    match (&s.cert_file, &s.key_file) {
        (Some(_), None) => p.add(
            format!("{k}.key_file"),
            "cert_file is set but not key_file; a client certificate needs both",
        ),
        (None, Some(_)) => p.add(
            format!("{k}.cert_file"),
            "key_file is set but not cert_file; a client certificate needs both",
        ),
        (Some(_), Some(_)) if !tls => p.add(
            format!("{k}.cert_file"),
            format!("a client certificate needs TLS {NEED_TLS}"),
        ),
        _ => {}
    }
    if let Err(errors) = s.tls_client_config() {
        for e in errors {
            p.add(format!("{k}.{}", e.key), e.problem);
        }
    }
}

fn valid_filter(t: &str) -> bool {
    if t.is_empty() || t.len() > 65535 {
        return false;
    }
    let levels: Vec<&str> = t.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i + 1 != levels.len()) {
            return false;
        }
        if l.contains('+') && *l != "+" {
            return false;
        }
    }
    true
}

/// Largest secret file accepted, in bytes (a key, a password, a `whsec_` secret).
pub const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// Where a `*_file` value points: a bare name (no `/`) is a systemd credential, looked up in
/// `$CREDENTIALS_DIRECTORY` (`LoadCredential=name:/path` in the unit); anything else is a path.
///
/// # Errors
/// A bare name while `$CREDENTIALS_DIRECTORY` is not set.
pub fn resolve_secret_path(path: &Path) -> Result<PathBuf, String> {
    use std::os::unix::ffi::OsStrExt;
    let raw = path.as_os_str().as_bytes();
    if raw.is_empty() || raw.contains(&b'/') {
        return Ok(path.to_path_buf());
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) if !dir.is_empty() => Ok(Path::new(&dir).join(path)),
        _ => Err(format!(
            "{} is a bare name, which names a systemd credential in $CREDENTIALS_DIRECTORY \
             (LoadCredential=), but $CREDENTIALS_DIRECTORY is not set; give an absolute path",
            path.display()
        )),
    }
}

/// Reads a secret file (`*_file` keys; a bare name is looked up with
/// [`resolve_secret_path`]). The file is opened once and every check is made on the open
/// descriptor (`fstat`), then the secret is read from that same descriptor, so the file
/// cannot be swapped between check and read: a regular file (never a FIFO or a device: opened
/// non-blocking), no permission for group or others, owned by the user running hvac-edge or
/// by root (systemd credentials are root-owned, mode 0400), at most
/// [`MAX_SECRET_FILE_BYTES`]. Returns the trimmed secret.
///
/// # Errors
/// A message naming the file and what is wrong (never the secret).
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let (path, buf) = read_private_file(path, MAX_SECRET_FILE_BYTES)?;
    let shown = path.display();
    let s = String::from_utf8(buf).map_err(|_| format!("{shown} is not UTF-8 text"))?;
    let s = s.trim().to_string();
    if s.is_empty() {
        return Err(format!("{shown} is empty"));
    }
    Ok(s)
}

/// Reads a file that must be private (a secret, a TLS private key) with the checks of
/// [`read_secret_file`], at most `max_bytes`; returns the resolved path and the bytes.
///
/// # Errors
/// A message naming the file and what is wrong (never its content).
pub fn read_private_file(path: &Path, max_bytes: u64) -> Result<(PathBuf, Vec<u8>), String> {
    use std::os::unix::fs::MetadataExt;
    let path = resolve_secret_path(path)?;
    let shown = path.display().to_string();
    let buf = read_regular_file(
        &path,
        "",
        max_bytes,
        |meta| {
            let mode = meta.mode();
            if mode & 0o077 != 0 {
                return Err(format!(
                    "{shown} is accessible by group or others (mode {:o}); run chmod 600 {shown}",
                    mode & 0o777,
                ));
            }
            // SAFETY: geteuid(2) has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            if meta.uid() != euid && meta.uid() != 0 {
                return Err(format!(
                    "{shown} is owned by uid {}; it must be owned by the user running hvac-edge \
                     (uid {euid}) or by root",
                    meta.uid()
                ));
            }
            Ok(())
        },
        &|| format!("{shown} is larger than {max_bytes} bytes; it must hold only the secret"),
    )?;
    Ok((path, buf))
}

/// Reads a file named in the configuration (secrets, certificates, Modbus maps) the one safe
/// way: opened once without blocking (a FIFO or device is refused, never waited on or read
/// endlessly), checked on the open descriptor (a regular file; then `check`), at most
/// `max_bytes` (one byte more is read, so that a file that grew since fstat is noticed).
/// Messages name the file as `{label}{path}`; `too_big` is the message past the size.
///
/// # Errors
/// A message naming the file and what is wrong (never its content).
pub fn read_regular_file(
    path: &Path,
    label: &str,
    max_bytes: u64,
    check: impl FnOnce(&std::fs::Metadata) -> Result<(), String>,
    too_big: &dyn Fn() -> String,
) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot read {label}{shown}: {e}"))?;
    // fstat(2) on the descriptor just opened.
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {label}{shown}: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!("{label}{shown} is not a regular file"));
    }
    check(&meta)?;
    if meta.len() > max_bytes {
        return Err(too_big());
    }
    let mut buf = Vec::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {label}{shown}: {e}"))?;
    if buf.len() as u64 > max_bytes {
        return Err(too_big());
    }
    Ok(buf)
}

/// Replaces the userinfo of every URL in `text` (`https://user:pass@host` → `https://***@host`),
/// so that config errors and logs never echo a credential pasted into a URL.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, query or fragment, or where the URL ends in prose.
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '"' | '\'' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// A TOML or type error as `at line L, column C: message`, without toml's quote of the source
/// line (a secret pasted into the config would be printed) and with URL userinfo redacted.
pub fn toml_error_message(text: &str, e: &toml::de::Error) -> String {
    let message = redact_userinfo(e.message().trim_end());
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("at line {line}, column {column}: {message}")
        }
        None => message,
    }
}

/// Reads a secret from an environment variable.
///
/// # Errors
/// A message naming the variable when it is unset or empty.
pub fn read_secret_env(var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
        _ => Err(format!("environment variable {var} is unset or empty")),
    }
}

fn check_secret_file(p: &mut Problems, key: &str, path: &Path) -> Option<String> {
    match read_secret_file(path) {
        Ok(s) => Some(s),
        Err(e) => {
            p.add(key, e);
            None
        }
    }
}

fn check_secret_env(p: &mut Problems, key: &str, var: &str) -> Option<String> {
    match read_secret_env(var) {
        Ok(s) => Some(s),
        Err(e) => {
            p.add(key, e);
            None
        }
    }
}

#[cfg(test)]
mod tests;
