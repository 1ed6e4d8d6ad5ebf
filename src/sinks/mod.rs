//! Sinks: the one delivery loop (the runner) shared by every sink kind, plus the kinds'
//! transports. A kind is a [`Transport`] (batch → outcome) and a [`RunnerSettings`] built from its
//! config; [`Sink`] runs any of them: HTTP batches ([`HttpSink`]), webhook subscribers
//! ([`WebhookSink`]: filters, bans, `DISABLED_DUE_TO_ERRORS`) and the MQTT upstream
//! ([`MqttSink`]).
//!
//! Loop: wait for the retry time or a new commit mark, read a batch at the sink's own cursor
//! (its own connection), move expired events to dead letters, deliver, record the verdict.
//! Events leave in commit order, so per-device `seq` order is never broken.
//!
//! Only a fault of an event itself makes a dead letter: a TTL expiry (ages re-based over clock
//! steps; events stamped `unsynced` never expire), or a rejection (400, 422, other 4xx) of that
//! one event after the batch was bisected down to it. A fault of the endpoint holds the events
//! and retries on the schedule: 5xx, 408/425/429, the `hold_statuses` (401, 403, 404, …: a key
//! being rotated, a moved route), connection errors, and a receiver that rejects
//! `max_consecutive_rejected` events in a row ("rejecting every event"). A 413 or a timeout
//! halves the batch; it grows back by a quarter per delivered batch. A store error (busy, full,
//! replaced file) reopens the database after a backoff and never stops the daemon. The cursor is persisted at most once a second while
//! delivering (flash wear); after a crash the unpersisted tail is delivered again (same ids).
//! On shutdown an in-flight request finishes within its own timeout; nothing new starts.

pub mod c2c;
pub mod delivery;
pub mod http;
pub mod mqtt;
pub mod oauth2;
pub mod signing;
pub mod template;
pub mod webhook;

use crate::clock::ClockSteps;
use crate::config::{HttpSinkConfig, MqttSinkConfig, WebhookSinkConfig};
use crate::store::outbox::{self, DeadReason, SinkRow};
use crate::store::{self, Options};
use delivery::{RetryPolicy, Verdict, classify};
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `last_error` while deliveries wait for the clock.
const CLOCK_NOT_SET: &str = "gateway clock not set (before 2024); deliveries held";

/// SQLite page cache of a sink's connection, KiB.
const SINK_CACHE_KIB: u32 = 512;

/// How often delivered progress is persisted while events flow.
const PROGRESS_FLUSH: Duration = Duration::from_secs(1);

/// Start of `last_error` while a sink holds because its receiver rejects every event.
const REJECTING_EVERY_EVENT: &str = "rejecting every event";

/// How often a sink disabled by a technician looks whether it was enabled again.
const CONTROL_POLL: Duration = Duration::from_secs(1);

/// A test delivery asked longer ago than this is not sent (the CLI waits at most its
/// `--timeout-secs`, 30 s by default).
const TEST_STALE_MS: i64 = 120_000;

/// Longest wait before a sink tries again after a store error.
const STORE_RETRY_MAX: Duration = Duration::from_secs(60);

/// Errors that stop a sink task. Store errors do not: the sink logs them and tries again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("sink {sink}: blocking task failed: {message}")]
    Join { sink: String, message: String },
    #[error(transparent)]
    Build(#[from] http::BuildError),
    #[error(transparent)]
    BuildWebhook(#[from] webhook::BuildError),
    #[error(transparent)]
    BuildMqtt(#[from] mqtt::BuildError),
}

/// A sink kind's wire: turns one batch into an [`delivery::Outcome`]. Everything else (cursor,
/// batching, retries, TTL, dead letters, holds, statistics) is the runner's, the same for every
/// kind.
pub trait Transport: Send + Sync + 'static {
    /// Bytes a request adds around the events (counted against `batch_max_bytes`).
    fn wrapper_bytes(&self) -> usize;
    /// Delivers one batch, in commit order. Never panics on network input.
    fn deliver(
        &self,
        events: &[outbox::StoredEvent],
    ) -> impl std::future::Future<Output = delivery::Outcome> + Send;
    /// Whether the sink wants `e` (its filters); the runner passes over the others.
    fn accepts(&self, _e: &outbox::StoredEvent) -> bool {
        true
    }
    /// Whether [`Transport::accepts`] can refuse anything (the runner then reads ahead).
    fn filters(&self) -> bool {
        false
    }
    /// Called once when the sink stops (e.g. the MQTT sink's retained `offline`).
    fn close(&self) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }
    /// Resolves when the receiver is reachable again (the MQTT sink's reconnect), so a retry
    /// need not wait out the schedule; never, for kinds that cannot tell.
    fn ready(&self) -> impl std::future::Future<Output = ()> + Send {
        std::future::pending()
    }
    /// Work the transport needs running beside the delivery loop (the MQTT connection), taken
    /// once; the runner polls it in the sink's own task, and its end stops the sink (an error).
    fn take_background(
        &mut self,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        None
    }
}

impl Transport for http::HttpTransport {
    fn wrapper_bytes(&self) -> usize {
        http::HttpTransport::wrapper_bytes(self)
    }

    fn deliver(
        &self,
        events: &[outbox::StoredEvent],
    ) -> impl std::future::Future<Output = delivery::Outcome> + Send {
        http::HttpTransport::deliver(self, events)
    }
}

impl Transport for webhook::WebhookTransport {
    fn wrapper_bytes(&self) -> usize {
        webhook::WebhookTransport::wrapper_bytes(self)
    }

    fn deliver(
        &self,
        events: &[outbox::StoredEvent],
    ) -> impl std::future::Future<Output = delivery::Outcome> + Send {
        webhook::WebhookTransport::deliver(self, events)
    }

    fn accepts(&self, e: &outbox::StoredEvent) -> bool {
        webhook::WebhookTransport::accepts(self, e)
    }

    fn filters(&self) -> bool {
        webhook::WebhookTransport::filters(self)
    }
}

impl Transport for mqtt::MqttTransport {
    fn wrapper_bytes(&self) -> usize {
        0
    }

    fn deliver(
        &self,
        events: &[outbox::StoredEvent],
    ) -> impl std::future::Future<Output = delivery::Outcome> + Send {
        mqtt::MqttTransport::deliver(self, events)
    }

    fn close(&self) -> impl std::future::Future<Output = ()> + Send {
        mqtt::MqttTransport::close(self)
    }

    fn ready(&self) -> impl std::future::Future<Output = ()> + Send {
        mqtt::MqttTransport::connected(self)
    }

    fn take_background(
        &mut self,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        mqtt::MqttTransport::take_link(self)
    }
}

/// Any configured kind behind one type: the daemon runs every sink as a `Sink<AnyTransport>`,
/// so the runner's loop is compiled once rather than once per kind (about 100 KiB of an ARM
/// binary); a match per request costs nothing next to a request.
#[allow(clippy::large_enum_variant)] // One per configured sink, for the life of the process.
pub enum AnyTransport {
    Http(http::HttpTransport),
    Webhook(webhook::WebhookTransport),
    Mqtt(mqtt::MqttTransport),
}

impl From<http::HttpTransport> for AnyTransport {
    fn from(t: http::HttpTransport) -> Self {
        AnyTransport::Http(t)
    }
}

impl From<webhook::WebhookTransport> for AnyTransport {
    fn from(t: webhook::WebhookTransport) -> Self {
        AnyTransport::Webhook(t)
    }
}

impl From<mqtt::MqttTransport> for AnyTransport {
    fn from(t: mqtt::MqttTransport) -> Self {
        AnyTransport::Mqtt(t)
    }
}

impl Transport for AnyTransport {
    fn wrapper_bytes(&self) -> usize {
        match self {
            AnyTransport::Http(t) => Transport::wrapper_bytes(t),
            AnyTransport::Webhook(t) => Transport::wrapper_bytes(t),
            AnyTransport::Mqtt(t) => Transport::wrapper_bytes(t),
        }
    }

    async fn deliver(&self, events: &[outbox::StoredEvent]) -> delivery::Outcome {
        match self {
            AnyTransport::Http(t) => Transport::deliver(t, events).await,
            AnyTransport::Webhook(t) => Transport::deliver(t, events).await,
            AnyTransport::Mqtt(t) => Transport::deliver(t, events).await,
        }
    }

    fn accepts(&self, e: &outbox::StoredEvent) -> bool {
        match self {
            AnyTransport::Http(t) => Transport::accepts(t, e),
            AnyTransport::Webhook(t) => Transport::accepts(t, e),
            AnyTransport::Mqtt(t) => Transport::accepts(t, e),
        }
    }

    fn filters(&self) -> bool {
        match self {
            AnyTransport::Http(t) => Transport::filters(t),
            AnyTransport::Webhook(t) => Transport::filters(t),
            AnyTransport::Mqtt(t) => Transport::filters(t),
        }
    }

    async fn close(&self) {
        match self {
            AnyTransport::Http(t) => Transport::close(t).await,
            AnyTransport::Webhook(t) => Transport::close(t).await,
            AnyTransport::Mqtt(t) => Transport::close(t).await,
        }
    }

    async fn ready(&self) {
        match self {
            AnyTransport::Http(t) => Transport::ready(t).await,
            AnyTransport::Webhook(t) => Transport::ready(t).await,
            AnyTransport::Mqtt(t) => Transport::ready(t).await,
        }
    }

    fn take_background(
        &mut self,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        match self {
            AnyTransport::Http(t) => Transport::take_background(t),
            AnyTransport::Webhook(t) => Transport::take_background(t),
            AnyTransport::Mqtt(t) => Transport::take_background(t),
        }
    }
}

/// What the runner needs to know of a sink's configuration, whatever its kind.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The sink's name (its `sinks` row and cursor).
    pub name: String,
    /// `kind` of its `sinks` row (`http`, …).
    pub kind: &'static str,
    /// Events per request.
    pub batch_max_events: usize,
    /// Bytes per request body.
    pub batch_max_bytes: usize,
    /// Per-request timeout (for the log line when a timeout halves the batch).
    pub request_timeout_ms: u64,
    /// Events older than this become dead letters `expired`.
    pub ttl_secs: u64,
    /// Rejected events in a row after which the sink holds.
    pub max_consecutive_rejected: u32,
    /// Where a sink new to the database starts.
    pub from: crate::config::StartFrom,
    /// Retry schedule and hold statuses.
    pub policy: RetryPolicy,
    /// Ban and disable thresholds (webhook sinks); `None` = never banned or disabled.
    pub ban: Option<delivery::BanPolicy>,
    /// Events that arrive during a ban become dead letters `banned` instead of waiting.
    pub drop_during_ban: bool,
    /// Digest of the sink's configuration: a change re-enables a sink disabled after errors.
    pub config_digest: String,
    /// The gateway id (for test events).
    pub gateway: String,
}

/// A short digest of a sink's configuration (its `Debug` form: paths and settings, never the
/// secrets themselves, which are read from files).
fn config_digest(cfg: &impl std::fmt::Debug) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{cfg:?}").as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl RunnerSettings {
    /// The runner settings of a `[[sinks.http]]`.
    pub fn http(cfg: &HttpSinkConfig) -> RunnerSettings {
        RunnerSettings {
            name: cfg.name.clone(),
            kind: "http",
            batch_max_events: cfg.batch_max_events,
            batch_max_bytes: cfg.batch_max_bytes,
            request_timeout_ms: cfg.request_timeout_ms,
            ttl_secs: cfg.ttl_secs,
            max_consecutive_rejected: cfg.max_consecutive_rejected,
            from: cfg.from,
            policy: RetryPolicy {
                schedule_secs: cfg.retry_schedule_secs.clone(),
                jitter_fraction: 0.2,
                max_retry_after_secs: 3600,
                hold_statuses: cfg.hold_statuses.clone(),
                failure_status_min: 300,
            },
            ban: None,
            drop_during_ban: false,
            config_digest: config_digest(cfg),
            gateway: String::new(),
        }
    }

    /// The runner settings of a `[[sinks.webhook]]`: the vendors' rules (750 ms, status ≥ 300,
    /// bans, `failure_limit`), with events held rather than lost.
    pub fn webhook(cfg: &WebhookSinkConfig) -> RunnerSettings {
        RunnerSettings {
            name: cfg.name.clone(),
            kind: "webhook",
            batch_max_events: cfg.batch_max_events,
            batch_max_bytes: cfg.batch_max_bytes,
            request_timeout_ms: cfg.failure_timeout_ms,
            ttl_secs: cfg.ttl_secs,
            max_consecutive_rejected: cfg.max_consecutive_rejected,
            from: cfg.from,
            policy: RetryPolicy {
                schedule_secs: cfg.retry_schedule_secs.clone(),
                jitter_fraction: 0.2,
                max_retry_after_secs: 3600,
                hold_statuses: cfg.hold_statuses.clone(),
                failure_status_min: cfg.failure_status_min,
            },
            ban: Some(delivery::BanPolicy {
                ban_every_failures: cfg.ban_every_failures,
                ban_step_secs: cfg.ban_step_secs,
                ban_max_secs: cfg.ban_max_secs,
                failure_limit: cfg.failure_limit,
            }),
            drop_during_ban: cfg.drop_during_ban,
            config_digest: config_digest(cfg),
            gateway: String::new(),
        }
    }

    /// The runner settings of a `[[sinks.mqtt]]`: a batch is at most the in-flight window.
    pub fn mqtt(cfg: &MqttSinkConfig) -> RunnerSettings {
        RunnerSettings {
            name: cfg.name.clone(),
            kind: "mqtt",
            batch_max_events: usize::from(cfg.max_inflight.max(1)) * mqtt::BATCH_WINDOWS,
            batch_max_bytes: mqtt::BATCH_MAX_BYTES,
            request_timeout_ms: cfg.ack_timeout_ms,
            ttl_secs: cfg.ttl_secs,
            max_consecutive_rejected: u32::MAX,
            from: cfg.from,
            policy: RetryPolicy {
                schedule_secs: cfg.retry_schedule_secs.clone(),
                jitter_fraction: 0.2,
                max_retry_after_secs: 3600,
                hold_statuses: Vec::new(),
                failure_status_min: 300,
            },
            ban: None,
            drop_during_ban: false,
            config_digest: config_digest(cfg),
            gateway: String::new(),
        }
    }
}

/// A configured sink, ready to run: the shared runner settings and its kind's transport.
pub struct Sink<T: Transport> {
    cfg: RunnerSettings,
    transport: T,
}

/// An HTTP batch sink.
pub type HttpSink = Sink<http::HttpTransport>;
/// A webhook subscriber.
pub type WebhookSink = Sink<webhook::WebhookTransport>;
/// The MQTT upstream.
pub type MqttSink = Sink<mqtt::MqttTransport>;
/// A sink of any kind, as the daemon runs it.
pub type AnySink = Sink<AnyTransport>;

/// What the delivery loop needs besides the sink itself.
pub struct SinkContext {
    /// The database file.
    pub db: PathBuf,
    /// Connection options.
    pub opts: Options,
    /// The writer's last committed `pos`.
    pub committed: crate::channel::Committed,
    /// Wall-clock steps seen by the writer (event ages).
    pub clock: Arc<ClockSteps>,
    /// How the clock's `synced` state is known (`gateway.clock`).
    pub clock_source: crate::config::ClockSource,
    /// Where `operational` notes go (the writer); `None` = not recorded.
    /// (weak: the writer stops once the sources are gone, whatever the sinks hold).
    pub notes: Option<tokio::sync::mpsc::WeakSender<crate::channel::WriterMsg>>,
    /// Observation-to-acknowledgement latency of this sink's deliveries (`/metrics`).
    pub delivery_latency: Option<crate::telemetry::LatencyHistogram>,
}

impl HttpSink {
    /// Builds the sink (resolves secrets, builds the client).
    ///
    /// # Errors
    /// The sink's config problem, naming it.
    pub fn new(cfg: HttpSinkConfig, gateway: &str) -> Result<HttpSink, Error> {
        let transport = http::HttpTransport::new(&cfg, gateway)?;
        let mut settings = RunnerSettings::http(&cfg);
        settings.gateway = gateway.to_string();
        Ok(Sink::with_transport(settings, transport))
    }
}

impl WebhookSink {
    /// Builds the sink (resolves secrets, builds the client).
    ///
    /// # Errors
    /// The sink's config problem, naming it.
    pub fn new(cfg: WebhookSinkConfig, gateway: &str) -> Result<WebhookSink, Error> {
        let transport = webhook::WebhookTransport::new(&cfg, gateway)?;
        let mut settings = RunnerSettings::webhook(&cfg);
        settings.gateway = gateway.to_string();
        Ok(Sink::with_transport(settings, transport))
    }
}

impl MqttSink {
    /// Builds the sink and starts its connection task (within a Tokio runtime).
    ///
    /// # Errors
    /// The sink's config problem, naming it.
    pub fn new(cfg: MqttSinkConfig, gateway: &str) -> Result<MqttSink, Error> {
        let transport = mqtt::MqttTransport::new(&cfg, gateway)?;
        let mut settings = RunnerSettings::mqtt(&cfg);
        settings.gateway = gateway.to_string();
        Ok(Sink::with_transport(settings, transport))
    }
}

/// The answer to a technician's test delivery (`hvac-edge sinks test`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TestOutcome {
    /// The receiver accepted it (a 2xx below the sink's failure status; MQTT: the PUBACK).
    pub ok: bool,
    /// The HTTP status, if there was an answer.
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// The first bytes of the answer, or what went wrong.
    pub answer: String,
    /// The test event's id (type `test`, device `@gateway`, seq 0).
    pub event_id: String,
}

/// The event a test delivery sends: type `test`, the gateway's own device id, seq 0 (outside
/// every sequence), `current` naming who asked; never stored in the outbox.
pub fn test_event(
    gateway: &str,
    by: &str,
    control_id: i64,
    clock: crate::model::ClockState,
) -> outbox::StoredEvent {
    let now = crate::telemetry::now_ms();
    let ev = crate::model::Event {
        id: uuid::Uuid::now_v7().to_string(),
        seq: 0,
        kind: "test".to_string(),
        gateway: gateway.to_string(),
        plant: None,
        device: crate::channel::GATEWAY_DEVICE.to_string(),
        module: None,
        observed_at: crate::model::format_rfc3339_ms(now),
        clock,
        previous: serde_json::Value::Null,
        current: serde_json::json!({ "test": true, "requested_by": by, "control_id": control_id }),
        state: crate::model::DeviceState::default(),
    };
    outbox::StoredEvent {
        pos: 0,
        id: ev.id.clone(),
        device: ev.device.clone(),
        seq: 0,
        kind: ev.kind.clone(),
        observed_at: now,
        payload: serde_json::to_string(&ev).unwrap_or_default(),
        damaged: false,
    }
}

/// What a test delivery's outcome tells a technician.
fn test_outcome(
    o: &delivery::Outcome,
    policy: &RetryPolicy,
    latency_ms: u64,
    event_id: String,
) -> TestOutcome {
    let (ok, status, answer) = match o {
        delivery::Outcome::Acked => (true, None, "acknowledged".to_string()),
        delivery::Outcome::Status { code, snippet, .. } => (
            (200..policy.failure_status_min).contains(code),
            Some(*code),
            snippet.clone(),
        ),
        delivery::Outcome::Timeout => (false, None, "no answer within the timeout".to_string()),
        delivery::Outcome::Connect(m) => (false, None, format!("cannot connect: {m}")),
        delivery::Outcome::Other(m) => (false, None, m.clone()),
        delivery::Outcome::Auth(m) => (false, None, format!("no credentials: {m}")),
        delivery::Outcome::Invalid(m) => {
            (false, None, format!("cannot take the sink's shape: {m}"))
        }
    };
    TestOutcome {
        ok,
        status,
        latency_ms,
        answer,
        event_id,
    }
}

impl<T: Transport> Sink<T> {
    /// A sink of any kind: its runner settings and its transport.
    pub fn with_transport(cfg: RunnerSettings, transport: T) -> Sink<T> {
        Sink { cfg, transport }
    }

    /// The same sink as an [`AnySink`].
    pub fn erase(self) -> AnySink
    where
        T: Into<AnyTransport>,
    {
        Sink {
            cfg: self.cfg,
            transport: self.transport.into(),
        }
    }

    /// One test delivery through this sink's transport (signed like any delivery).
    pub async fn test_delivery(
        &mut self,
        by: &str,
        control_id: i64,
        clock: crate::model::ClockState,
    ) -> TestOutcome {
        let ev = test_event(&self.cfg.gateway, by, control_id, clock);
        let id = ev.id.clone();
        let started = Instant::now();
        let outcome = self.transport.deliver(std::slice::from_ref(&ev)).await;
        let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        test_outcome(&outcome, &self.cfg.policy, ms, id)
    }

    /// A test delivery without a running daemon (the CLI): runs the transport's connection
    /// task beside it when it has one (MQTT), then closes the transport.
    pub async fn test_alone(
        mut self,
        by: &str,
        control_id: i64,
        clock: crate::model::ClockState,
    ) -> TestOutcome {
        let background = self.transport.take_background();
        let out = match background {
            Some(bg) => {
                tokio::select! {
                    o = self.test_delivery(by, control_id, clock) => o,
                    () = bg => TestOutcome {
                        ok: false,
                        status: None,
                        latency_ms: 0,
                        answer: "the connection task ended".into(),
                        event_id: String::new(),
                    },
                }
            }
            None => self.test_delivery(by, control_id, clock).await,
        };
        self.transport.close().await;
        out
    }

    /// Runs the delivery loop until `shutdown` is cancelled (or the writer is gone and the
    /// backlog is delivered as far as possible). A store error (a busy or full database, a file
    /// replaced after quarantine) never ends it: the sink reopens the database and carries on
    /// after a backoff; at worst the last second of progress is delivered again (same ids).
    ///
    /// # Errors
    /// A blocking task that panicked, or a corrupt database (the daemon quarantines it).
    pub async fn run(mut self, ctx: SinkContext, shutdown: CancellationToken) -> Result<(), Error> {
        let name = self.cfg.name.clone();
        let Some(background) = self.transport.take_background() else {
            return self.run_loop(ctx, shutdown).await;
        };
        // The transport's connection runs in this task beside the loop (and outlives it until
        // `close` is done); if it ever ends first, the sink stops and the daemon reports it.
        tokio::select! {
            r = self.run_loop(ctx, shutdown) => r,
            () = background => Err(Error::Join {
                sink: name,
                message: "the connection task ended".into(),
            }),
        }
    }

    async fn run_loop(self, ctx: SinkContext, shutdown: CancellationToken) -> Result<(), Error> {
        let name = self.cfg.name.clone();
        let mut runner = Runner {
            batch: BatchControl::new(self.cfg.batch_max_events),
            sink: self,
            ctx,
            consecutive_rejected: 0,
            store_failures: 0,
            owes_recovery: false,
            requeued: false,
            requeue_single: false,
        };
        loop {
            match runner.deliver(&shutdown).await {
                Ok(()) => return Ok(()),
                // A damaged file cannot heal by waiting: the daemon moves it aside and restarts.
                Err(Error::Store(e)) if e.is_corrupt() => return Err(Error::Store(e)),
                Err(Error::Store(e)) => {
                    runner.store_failures = runner.store_failures.saturating_add(1);
                    let wait = store_backoff(runner.store_failures);
                    tracing::error!(sink = %name, error = %e, retry_in_secs = wait.as_secs(),
                        "Store error in the sink; retrying (undelivered events stay in the outbox)");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Wait after the `n`th store error in a row: 1, 2, 4, … seconds, at most [`STORE_RETRY_MAX`].
fn store_backoff(n: u32) -> Duration {
    let secs = 1u64 << n.saturating_sub(1).min(6);
    Duration::from_secs(secs).min(STORE_RETRY_MAX)
}

/// Events per request: halved on 413, on a timeout and while bisecting a rejected batch; grown
/// back by a quarter per delivered batch (not while bisecting).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BatchControl {
    max: usize,
    limit: usize,
    /// While set, a rejected batch up to this `pos` is being narrowed down to its bad event.
    bisect_until: Option<i64>,
}

impl BatchControl {
    fn new(max: usize) -> BatchControl {
        let max = max.max(1);
        BatchControl {
            max,
            limit: max,
            bisect_until: None,
        }
    }

    /// Halves the limit below the `sent` events of the last request.
    fn shrink(&mut self, sent: usize) {
        self.limit = (sent / 2).max(1);
    }

    /// A batch ending at `last_pos` was rejected: narrow it down.
    fn rejected(&mut self, sent: usize, last_pos: i64) {
        self.shrink(sent);
        self.bisect_until = Some(self.bisect_until.map_or(last_pos, |b| b.max(last_pos)));
    }

    /// Events up to `last_pos` are done with (delivered or dead-lettered).
    fn done(&mut self, last_pos: i64, dead_lettered: bool) {
        if let Some(b) = self.bisect_until {
            if last_pos < b && !dead_lettered {
                return;
            }
            self.bisect_until = None;
        }
        if !dead_lettered {
            self.limit = self
                .limit
                .saturating_add((self.limit / 4).max(1))
                .min(self.max);
        }
    }
}

/// Whether TTL expires `e` now: its age (re-based over clock steps) passed `ttl_ms`, and its
/// time means something: stamped after the clock was set, and not two unsynchronised readings
/// compared (an event stamped `unsynced` expires only once the clock is synchronised).
fn is_expired(
    e: &outbox::StoredEvent,
    now: i64,
    now_synced: bool,
    ttl_ms: i64,
    clock: &ClockSteps,
) -> bool {
    if e.observed_at < crate::telemetry::CLOCK_SANE_MIN_MS {
        return false;
    }
    if clock.age_ms(now, e.observed_at, e.pos) <= ttl_ms {
        return false;
    }
    now_synced || !stamped_unsynced(&e.payload)
}

/// Whether an envelope says `"clock": "unsynced"` (its `observed_at` is a guess).
fn stamped_unsynced(payload: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct ClockOnly {
        clock: Option<crate::model::ClockState>,
    }
    matches!(
        serde_json::from_str::<ClockOnly>(payload),
        Ok(ClockOnly {
            clock: Some(crate::model::ClockState::Unsynced)
        })
    )
}

/// What one delivery attempt gave.
struct Attempt {
    outcome: delivery::Outcome,
    verdict: Verdict,
    duration_ms: i64,
    failures: u32,
}

struct Runner<T: Transport> {
    sink: Sink<T>,
    ctx: SinkContext,
    batch: BatchControl,
    /// Events dead-lettered one by one in a row (reset by any delivery).
    consecutive_rejected: u32,
    store_failures: u32,
    /// Banned, disabled or re-enabled since the last delivery: the next one is a `recovered`.
    owes_recovery: bool,
    /// Re-queued dead letters are waiting (looked up with the technician's switch).
    requeued: bool,
    /// A re-queued batch was refused or too slow: send them one by one.
    requeue_single: bool,
}

impl<T: Transport> Runner<T> {
    /// Opens the database off the async workers and loads (or creates) the sink's row.
    async fn open(&self) -> Result<LoopState, Error> {
        let name = self.sink.cfg.name.clone();
        let kind = self.sink.cfg.kind;
        let (db, opts, from) = (
            self.ctx.db.clone(),
            self.ctx.opts.clone(),
            self.sink.cfg.from,
        );
        let n = name.clone();
        let (conn, row) = tokio::task::spawn_blocking(move || -> Result<_, Error> {
            let conn = store::open(&db, store::Mode::ReadWrite, &opts)?;
            // A sink reads recent pages sequentially (hot in the OS page cache anyway): a small
            // SQLite cache keeps the daemon's resident memory down on small gateways.
            conn.execute_batch(&format!("PRAGMA cache_size = -{SINK_CACHE_KIB};"))
                .map_err(|source| store::Error::Sqlite {
                    path: db.clone(),
                    source,
                })?;
            let now = crate::telemetry::now_ms();
            let row = outbox::ensure_sink(&conn, &db, &n, kind, from, now)?;
            Ok((conn, row))
        })
        .await
        .map_err(|e| Error::Join {
            sink: name.clone(),
            message: e.to_string(),
        })??;
        Ok(LoopState {
            db: Arc::new(self.ctx.db.clone()),
            conn: Arc::new(Mutex::new(conn)),
            name,
            row,
            dirty: false,
            last_flush: Instant::now(),
        })
    }

    /// The delivery loop proper; returns on shutdown, or with the first store error.
    async fn deliver(&mut self, shutdown: &CancellationToken) -> Result<(), Error> {
        let name = self.sink.cfg.name.clone();
        let mut st = self.open().await?;
        // A retry schedule does not survive a restart: the daemon starting is a good moment to
        // try. A ban does (it protects the endpoint), and so does a disable.
        st.row.next_attempt_at = st
            .row
            .banned_until
            .filter(|&b| b > crate::telemetry::now_ms() && st.row.status == outbox::STATUS_BANNED);
        if st.row.status == outbox::STATUS_DISABLED
            && st.row.config_digest.as_deref() != Some(self.sink.cfg.config_digest.as_str())
        {
            tracing::info!(sink = %name, "Sink configuration changed; re-enabling a sink disabled after errors");
            self.reenable(&mut st, "configuration changed").await;
        }
        if st.row.status == outbox::STATUS_BANNED
            || st.row.status == outbox::STATUS_DISABLED
            || st.row.banned_until.is_some()
        {
            self.owes_recovery = true;
        }
        if st.row.config_digest.as_deref() != Some(self.sink.cfg.config_digest.as_str()) {
            st.row.config_digest = Some(self.sink.cfg.config_digest.clone());
            st.dirty = true;
        }
        tracing::info!(sink = %name, kind = self.sink.cfg.kind, cursor = st.row.cursor, status = %st.row.status, "Sink started");
        let mut writer_gone = false;
        let max_rejected = self.sink.cfg.max_consecutive_rejected;
        if st
            .row
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with(REJECTING_EVERY_EVENT))
        {
            // Still holding from before the restart: a restart must not dead-letter another
            // `max_consecutive_rejected` good events.
            self.consecutive_rejected = max_rejected;
        }
        // The technician's switch as it was when this sink started: any later write to it is
        // the technician's, whatever the two clocks say.
        let me = name.clone();
        let mut control_seen = st
            .blocking(move |c, p| outbox::sink_control(c, p, &me))
            .await??
            .map(|c| c.updated_at);
        let mut control_read: Option<(Instant, Option<outbox::SinkControl>)> = None;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            // A technician's switch (`sink_control`), which the daemon only reads: a disabled
            // sink holds its events (nothing is skipped, nothing dropped, even during a ban with
            // `drop_during_ban`) and looks again every second. Read at most once a second while
            // delivering (one query less per webhook event).
            if control_read
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= CONTROL_POLL)
            {
                let me = name.clone();
                let (c, requeued) = st
                    .blocking(move |c, p| -> Result<_, store::Error> {
                        Ok((
                            outbox::sink_control(c, p, &me)?,
                            store::control::has_requeued(c, p, &me)?,
                        ))
                    })
                    .await??;
                control_read = Some((Instant::now(), c));
                self.requeued = requeued;
                self.run_pending_tests(&st).await?;
            }
            let control = control_read.as_ref().and_then(|(_, c)| c.clone());
            if let Some(ctl) = control.as_ref().filter(|c| !c.enabled) {
                if st.row.status != outbox::STATUS_PAUSED {
                    tracing::warn!(sink = %name, note = ?ctl.note, by = ?ctl.updated_by,
                        "Sink disabled by a technician; its events are held until it is enabled");
                    st.row.status = outbox::STATUS_PAUSED.to_string();
                    st.row.last_error = Some(match &ctl.note {
                        Some(n) => format!("disabled by a technician: {n}"),
                        None => "disabled by a technician".to_string(),
                    });
                    st.dirty = true;
                    st.flush(true).await?;
                }
                control_seen = Some(ctl.updated_at);
                tokio::select! {
                    _ = tokio::time::sleep(CONTROL_POLL) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let now = crate::telemetry::now_ms();
            if st.row.status == outbox::STATUS_PAUSED {
                // Back from a pause: to what the sink was before it (disabled after errors, a
                // ban still running), and enabling a sink disabled after errors re-enables it.
                let by = control
                    .as_ref()
                    .and_then(|c| c.updated_by.clone())
                    .unwrap_or_else(|| "a technician".into());
                tracing::info!(sink = %name, by = %by, "Sink enabled again by a technician; delivering what it held");
                st.row.last_error = None;
                st.dirty = true;
                if st.row.disabled_at.is_some() {
                    self.reenable(&mut st, &format!("enabled by {by}")).await;
                } else if st.row.banned_until.is_some_and(|b| b > now) {
                    st.row.status = outbox::STATUS_BANNED.to_string();
                    st.row.next_attempt_at = st.row.banned_until;
                } else {
                    st.row.status = outbox::STATUS_ACTIVE.to_string();
                }
                control_seen = control.as_ref().map(|c| c.updated_at);
            }
            // Disabled after errors: held until a technician enables it (a `sink_control` write
            // since the disable) or the configuration changes (checked at start).
            if st.row.status == outbox::STATUS_DISABLED {
                let disabled_at = st.row.disabled_at.unwrap_or(0);
                let enabled_since = control.as_ref().filter(|c| {
                    c.enabled && (Some(c.updated_at) != control_seen || c.updated_at > disabled_at)
                });
                if let Some(ctl) = enabled_since {
                    let by = ctl
                        .updated_by
                        .clone()
                        .unwrap_or_else(|| "a technician".into());
                    tracing::info!(sink = %name, by = %by, "Sink re-enabled after errors; delivering what it held");
                    control_seen = Some(ctl.updated_at);
                    self.reenable(&mut st, &format!("enabled by {by}")).await;
                } else {
                    st.flush(false).await?;
                    tokio::select! {
                        _ = tokio::time::sleep(CONTROL_POLL) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            }
            // A ban ends by itself; with `drop_during_ban` the events meanwhile are dead letters
            // `banned` (the vendors' behaviour, never silent), else they wait.
            if st.row.status == outbox::STATUS_BANNED {
                let until = st.row.banned_until.unwrap_or(0);
                if now >= until {
                    tracing::info!(sink = %name, "Ban over; delivering again");
                    st.row.status = outbox::STATUS_ACTIVE.to_string();
                    st.row.next_attempt_at = None;
                    st.dirty = true;
                } else if self.sink.cfg.drop_during_ban {
                    let wait = Duration::from_millis(u64::try_from(until - now).unwrap_or(0))
                        .min(CONTROL_POLL);
                    if !self.drop_banned(&mut st).await? {
                        tokio::select! {
                            r = self.ctx.committed.changed() => if r.is_err() { writer_gone = true; },
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.cancelled() => break,
                        }
                        if writer_gone {
                            break;
                        }
                    }
                    continue;
                }
            }
            if let Some(at) = st.row.next_attempt_at {
                let wait =
                    Duration::from_millis(u64::try_from(at.saturating_sub(now)).unwrap_or(0));
                if !wait.is_zero() {
                    // Looked at again every second (a technician's switch), and at once when the
                    // transport says the receiver is back (an MQTT reconnect) outside a ban.
                    let banned = st.row.status == outbox::STATUS_BANNED;
                    tokio::select! {
                        _ = tokio::time::sleep(wait.min(CONTROL_POLL)) => {}
                        () = self.sink.transport.ready(), if !banned => {
                            st.row.next_attempt_at = None;
                        }
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            }
            // A gateway without RTC boots with its clock in the past: signatures would carry a
            // timestamp receivers reject, and ages would be wrong. Hold deliveries until it is set.
            if now < crate::telemetry::CLOCK_SANE_MIN_MS {
                if st.row.last_error.as_deref() != Some(CLOCK_NOT_SET) {
                    tracing::warn!(sink = %name, "Gateway clock is not set (before 2024); holding deliveries until it is");
                }
                st.row.last_error = Some(CLOCK_NOT_SET.to_string());
                st.row.next_attempt_at = Some((now + 10_000).max(st.row.banned_until.unwrap_or(0)));
                st.dirty = true;
                st.flush(false).await?;
                continue;
            }
            // A technician's `queue retry`: those go first.
            if self.requeued && self.deliver_requeued(&mut st).await? {
                continue;
            }
            let cursor = st.row.cursor;
            let filtered = self.sink.transport.filters();
            let limit = self.batch.limit;
            // With a filter, read ahead so that a rare matching event is found in few reads.
            let (max_n, max_b) = (
                if filtered {
                    limit.max(FILTER_READ_AHEAD)
                } else {
                    limit
                },
                self.sink
                    .cfg
                    .batch_max_bytes
                    .saturating_sub(self.sink.transport.wrapper_bytes())
                    .max(1),
            );
            let batch = st
                .blocking(move |c, p| outbox::read_batch(c, p, cursor, max_n, max_b))
                .await??;
            self.store_failures = 0;
            if batch.is_empty() {
                st.flush(false).await?;
                if writer_gone {
                    break;
                }
                // Idle with unsaved progress: save it once the flush interval is up, so that
                // `queue stats` and garbage collection see it without waiting for new events.
                let flush_in = if st.dirty {
                    PROGRESS_FLUSH.saturating_sub(st.last_flush.elapsed())
                } else {
                    Duration::MAX
                };
                // Also wakes every CONTROL_POLL for a technician's retry or test (reads only).
                tokio::select! {
                    r = self.ctx.committed.changed() => if r.is_err() { writer_gone = true; },
                    _ = tokio::time::sleep(flush_in), if st.dirty => st.flush(true).await?,
                    _ = tokio::time::sleep(CONTROL_POLL) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            // A row that cannot be read as written is a fault of that event: a dead letter.
            let unreadable = batch.iter().take_while(|e| e.damaged).count();
            if unreadable > 0 {
                let dead: Vec<_> = batch[..unreadable].to_vec();
                st.row.cursor = dead[dead.len() - 1].pos;
                tracing::error!(sink = %name, count = unreadable, first_pos = dead[0].pos,
                    "Stored events are unreadable (damaged rows); moved to dead letters (unreadable)");
                st.dead_letter(dead, "unreadable", None, None).await?;
                continue;
            }
            // Send only up to the next damaged row; it is dealt with at the head of the next batch.
            let mut batch = batch;
            if let Some(i) = batch.iter().position(|e| e.damaged) {
                batch.truncate(i);
            }
            // Filters: events this sink does not want are passed over (never dead letters), and
            // so are the gateway's notes about this sink itself (they are for the others).
            let batch = match select(batch, limit, |e| {
                !is_note_about(e, &name) && self.sink.transport.accepts(e)
            }) {
                Selected::None { last_pos } => {
                    st.row.cursor = last_pos;
                    st.dirty = true;
                    st.flush(false).await?;
                    continue;
                }
                Selected::Some(b) => b,
            };
            // TTL: the expired head of the batch becomes dead letters, reason "expired".
            let now = crate::telemetry::now_ms();
            let ttl_ms = i64::try_from(self.sink.cfg.ttl_secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            let synced = crate::store::writer::clock_state(self.ctx.clock_source)
                == crate::model::ClockState::Synced;
            let expired = batch
                .iter()
                .take_while(|e| is_expired(e, now, synced, ttl_ms, &self.ctx.clock))
                .count();
            if expired > 0 {
                let dead: Vec<_> = batch[..expired].to_vec();
                st.row.cursor = dead[dead.len() - 1].pos;
                tracing::warn!(sink = %name, count = expired, "Events older than ttl_secs moved to dead letters (expired)");
                st.dead_letter(dead, "expired", None, None).await?;
                continue;
            }
            let Attempt {
                outcome,
                verdict,
                duration_ms,
                failures,
            } = self.attempt(&mut st, &batch).await;
            let now = crate::telemetry::now_ms();
            let last = batch[batch.len() - 1].pos;
            match &outcome {
                delivery::Outcome::Status { code, .. } => {
                    st.row.last_status = Some(i64::from(*code))
                }
                delivery::Outcome::Acked => st.row.last_status = None,
                _ => st.row.last_status = Some(0),
            }
            if verdict != Verdict::Delivered {
                self.record_attempt(&st, &batch, &outcome, duration_ms, now)
                    .await?;
            }
            match verdict {
                Verdict::Delivered => {
                    self.batch.done(last, false);
                    self.consecutive_rejected = 0;
                    if st.row.consecutive_failures > 0 {
                        tracing::info!(sink = %name, after_failures = st.row.consecutive_failures, "Upstream accepts events again");
                    }
                    let was_banned = st.row.banned_until.take().is_some();
                    let mut recovered = false;
                    if was_banned || self.owes_recovery {
                        self.owes_recovery = false;
                        recovered = true;
                        let failures = st.row.consecutive_failures;
                        st.row.status = outbox::STATUS_ACTIVE.to_string();
                        self.note(
                            &st,
                            "recovered",
                            format!("delivering again after {failures} failures"),
                            None,
                        )
                        .await;
                    }
                    if let Some(h) = &self.ctx.delivery_latency {
                        for e in &batch {
                            h.observe_ms(now - e.observed_at);
                        }
                    }
                    st.row.cursor = last;
                    st.row.delivered = st
                        .row
                        .delivered
                        .saturating_add(i64::try_from(batch.len()).unwrap_or(i64::MAX));
                    st.row.successes = st.row.successes.saturating_add(1);
                    st.row.consecutive_failures = 0;
                    st.row.next_attempt_at = None;
                    st.row.last_success_at = Some(now);
                    st.row.last_error = None;
                    st.dirty = true;
                    // A recovery is shown at once; progress at most once a second.
                    st.flush(recovered).await?;
                    tracing::trace!(sink = %name, count = batch.len(), cursor = last, "Delivered");
                }
                Verdict::Retry { .. }
                    if outcome == delivery::Outcome::Timeout && batch.len() > 1 =>
                {
                    // Too slow for this many events, not necessarily down: retry at once with half.
                    self.batch.shrink(batch.len());
                    tracing::warn!(sink = %name, events = batch.len(), next = self.batch.limit,
                        timeout_ms = self.sink.cfg.request_timeout_ms,
                        "No answer within the request timeout; retrying with smaller batches");
                    st.row.last_error = Some(format!(
                        "timeout with {} events; retrying with {}",
                        batch.len(),
                        self.batch.limit
                    ));
                    st.dirty = true;
                }
                Verdict::Retry { delay_ms, reason } => {
                    st.hold(failures, delay_ms, reason, now, cursor).await?;
                    self.after_failure(&mut st, failures, None, now).await?;
                }
                Verdict::Hold {
                    delay_ms,
                    status,
                    snippet,
                } => {
                    if st.row.consecutive_failures == 0 {
                        tracing::error!(sink = %name, status, response = %snippet,
                            "Upstream refuses the endpoint or its credentials; events are held and retried, never dead-lettered (hold_statuses)");
                    }
                    let reason =
                        format!("http {status}: {snippet} (endpoint problem; events held)");
                    st.hold(failures, delay_ms, reason, now, cursor).await?;
                    self.after_failure(&mut st, failures, Some(status), now)
                        .await?;
                }
                Verdict::Permanent { status: 413, .. } if batch.len() > 1 => {
                    // Too large for the receiver, not wrong: retry at once with half as many events.
                    self.batch.shrink(batch.len());
                    tracing::warn!(sink = %name, events = batch.len(), next = self.batch.limit,
                        "Upstream answered 413 Payload Too Large; retrying with smaller batches");
                }
                Verdict::Permanent { status, snippet } if batch.len() > 1 => {
                    // Perhaps one bad event: narrow the batch down until it is alone.
                    self.batch.rejected(batch.len(), last);
                    tracing::warn!(sink = %name, status, events = batch.len(), next = self.batch.limit, response = %snippet,
                        "Upstream rejected a batch; bisecting it to find the event it refuses");
                }
                Verdict::Permanent { status: 0, snippet } => {
                    // Refused here, not by the receiver: this event cannot take the sink's shape
                    // (a URL value that is a dot segment, an envelope that does not parse). A
                    // fault of the event alone: a dead letter, and no sign about the receiver.
                    let ev = &batch[0];
                    tracing::error!(sink = %name, event = %ev.id, device = %ev.device, seq = ev.seq, problem = %snippet,
                        "Event cannot be sent in this sink's shape; it moved to dead letters (invalid)");
                    self.batch.done(last, true);
                    st.row.cursor = last;
                    st.row.next_attempt_at = None;
                    st.row.last_error = Some(format!("invalid event: {snippet}"));
                    st.dead_letter(batch, "invalid", None, Some(snippet))
                        .await?;
                }
                Verdict::Permanent { status, snippet }
                    if self.consecutive_rejected >= max_rejected =>
                {
                    // A receiver that rejects every event is broken, not picky: hold.
                    if st.row.consecutive_failures == 0 {
                        tracing::error!(sink = %name, status, rejected_in_a_row = self.consecutive_rejected, response = %snippet,
                            "Upstream rejects every event; holding instead of dead-lettering (max_consecutive_rejected)");
                    }
                    let reason = format!("{REJECTING_EVERY_EVENT}: http {status}: {snippet}");
                    let delay_ms =
                        delivery::backoff_ms(&self.sink.cfg.policy, failures, fastrand::f64());
                    st.hold(failures, delay_ms, reason, now, cursor).await?;
                    self.after_failure(&mut st, failures, Some(status), now)
                        .await?;
                }
                Verdict::Permanent { status, snippet } => {
                    let ev = &batch[0];
                    tracing::error!(sink = %name, status, event = %ev.id, device = %ev.device, seq = ev.seq, response = %snippet,
                        "Upstream rejected an event permanently; it moved to dead letters");
                    self.consecutive_rejected = self.consecutive_rejected.saturating_add(1);
                    self.batch.done(last, true);
                    st.row.cursor = last;
                    st.row.next_attempt_at = None;
                    st.row.last_error = Some(format!("http {status}: {snippet}"));
                    // A rejection is a failure of the endpoint's deliveries for the ban rules
                    // (the event itself is a dead letter; the next one goes at once).
                    st.row.consecutive_failures = if self.sink.cfg.ban.is_some() {
                        i64::from(failures)
                    } else {
                        0
                    };
                    st.dead_letter(batch, "rejected", Some(status), Some(snippet))
                        .await?;
                    self.after_failure(&mut st, failures, Some(status), now)
                        .await?;
                }
            }
        }
        st.flush(true).await?;
        self.sink.transport.close().await;
        tracing::info!(sink = %name, cursor = st.row.cursor, "Sink stopped");
        Ok(())
    }

    /// One delivery attempt of `batch`: counted, timed and classified against the retry policy
    /// (`failures` includes this one if it failed).
    async fn attempt(&mut self, st: &mut LoopState, batch: &[outbox::StoredEvent]) -> Attempt {
        st.row.attempts = st.row.attempts.saturating_add(1);
        let started = Instant::now();
        let outcome = self.sink.transport.deliver(batch).await;
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        st.row.last_duration_ms = Some(duration_ms);
        let failures = u32::try_from(st.row.consecutive_failures)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let verdict = classify(
            &outcome,
            &self.sink.cfg.policy,
            failures,
            fastrand::f64(),
            std::time::SystemTime::now(),
        );
        Attempt {
            outcome,
            verdict,
            duration_ms,
            failures,
        }
    }

    /// A technician's `sinks test` waiting for this sink (a `pending` row of `control`): one
    /// test delivery each, whatever the sink's state (a paused or banned endpoint can be tested
    /// before it is enabled), the outcome recorded in the row.
    async fn run_pending_tests(&mut self, st: &LoopState) -> Result<(), Error> {
        for _ in 0..4 {
            let me = st.name.clone();
            let Some(change) = st
                .blocking(move |c, p| store::control::next_pending(c, p, &me))
                .await??
            else {
                return Ok(());
            };
            let clock = crate::store::writer::clock_state(self.ctx.clock_source);
            let age_ms = crate::telemetry::now_ms() - change.at;
            let (ok, events, outcome) = if age_ms > TEST_STALE_MS {
                // Nobody waits for it any more (the CLI was interrupted): never sent late.
                (
                    false,
                    0,
                    format!(
                        "not sent: asked {} s ago and nobody waited for it",
                        age_ms / 1000
                    ),
                )
            } else if change.action == "sink_test" {
                let t = self.sink.test_delivery(&change.by, change.id, clock).await;
                tracing::info!(sink = %st.name, ok = t.ok, status = ?t.status, latency_ms = t.latency_ms, by = %change.by, "Test delivery");
                (t.ok, 1, serde_json::to_string(&t).unwrap_or_default())
            } else {
                (
                    false,
                    0,
                    format!("unknown action {:?} for a sink", change.action),
                )
            };
            let by = format!("daemon pid {}", std::process::id());
            st.blocking(move |c, p| {
                store::control::complete(
                    c,
                    p,
                    change.id,
                    ok,
                    &by,
                    events,
                    &outcome,
                    crate::telemetry::now_ms(),
                )
            })
            .await??;
        }
        Ok(())
    }

    /// Sends re-queued dead letters (a technician's `queue retry`) with their original id, seq
    /// and payload, ahead of the pending events and without the cursor: no filter and no TTL
    /// (a technician asked for them). Delivered, they leave `dead_letters`; refused again, each
    /// is a dead letter again with the new reason; any other failure holds the sink as usual.
    /// Returns false when none were left.
    async fn deliver_requeued(&mut self, st: &mut LoopState) -> Result<bool, Error> {
        let name = st.name.clone();
        let limit = if self.requeue_single {
            1
        } else {
            self.batch.limit
        };
        let max_b = self
            .sink
            .cfg
            .batch_max_bytes
            .saturating_sub(self.sink.transport.wrapper_bytes())
            .max(1);
        let me = name.clone();
        let rows = st
            .blocking(move |c, p| store::control::requeued_batch(c, p, &me, limit, max_b))
            .await??;
        if rows.is_empty() {
            self.requeued = false;
            self.requeue_single = false;
            return Ok(false);
        }
        // A row that cannot be read is a fault of that event: never sent, a dead letter again.
        if rows.iter().any(|(_, e)| e.damaged) {
            let damaged: Vec<i64> = rows
                .iter()
                .filter(|(_, e)| e.damaged)
                .map(|(id, _)| *id)
                .collect();
            tracing::error!(sink = %name, count = damaged.len(), "Re-queued dead letters are unreadable; they stay dead letters (unreadable)");
            let now = crate::telemetry::now_ms();
            st.blocking(move |c, p| -> Result<(), store::Error> {
                for id in damaged {
                    store::control::requeued_refused(
                        c,
                        p,
                        id,
                        "unreadable",
                        None,
                        Some("the stored event cannot be read"),
                        now,
                    )?;
                }
                Ok(())
            })
            .await??;
            return Ok(true);
        }
        let (ids, batch): (Vec<i64>, Vec<outbox::StoredEvent>) = rows.into_iter().unzip();
        let Attempt {
            outcome,
            verdict,
            duration_ms,
            failures,
        } = self.attempt(st, &batch).await;
        let now = crate::telemetry::now_ms();
        if verdict != Verdict::Delivered {
            self.record_attempt(st, &batch, &outcome, duration_ms, now)
                .await?;
        }
        let cursor = st.row.cursor;
        match verdict {
            Verdict::Delivered => {
                let n = ids.len();
                st.blocking(move |c, p| store::control::requeued_delivered(c, p, &ids))
                    .await??;
                tracing::info!(sink = %name, count = n, "Re-queued dead letters delivered");
                st.row.delivered = st
                    .row
                    .delivered
                    .saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
                st.row.successes = st.row.successes.saturating_add(1);
                st.row.consecutive_failures = 0;
                st.row.next_attempt_at = None;
                st.row.last_success_at = Some(now);
                st.row.last_error = None;
                st.row.last_status = None;
                st.dirty = true;
                st.flush(false).await?;
            }
            Verdict::Retry { .. } | Verdict::Permanent { .. }
                if batch.len() > 1
                    && (outcome == delivery::Outcome::Timeout
                        || matches!(verdict, Verdict::Permanent { .. })) =>
            {
                // Too slow or refused as a batch: one by one, so a refusal names one event.
                self.requeue_single = true;
            }
            Verdict::Retry { delay_ms, reason } => {
                st.hold(failures, delay_ms, reason, now, cursor).await?;
                self.after_failure(st, failures, None, now).await?;
            }
            Verdict::Hold {
                delay_ms,
                status,
                snippet,
            } => {
                let reason = format!("http {status}: {snippet} (endpoint problem; events held)");
                st.hold(failures, delay_ms, reason, now, cursor).await?;
                self.after_failure(st, failures, Some(status), now).await?;
            }
            Verdict::Permanent { status, snippet } => {
                let (id, ev) = (ids[0], &batch[0]);
                let reason = if status == 0 { "invalid" } else { "rejected" };
                tracing::error!(sink = %name, status, event = %ev.id, device = %ev.device, seq = ev.seq, response = %snippet,
                    "A re-queued dead letter was refused again; it stays a dead letter");
                let http = (status != 0).then_some(status);
                st.blocking(move |c, p| {
                    store::control::requeued_refused(c, p, id, reason, http, Some(&snippet), now)
                })
                .await??;
            }
        }
        Ok(true)
    }

    /// The ban and disable rules after a failed attempt (`failures` in a row, this one
    /// included): every `ban_every_failures` bans the endpoint for `ban_step_secs` per set, at
    /// most `ban_max_secs`; `failure_limit` in a row, or a 410, disables the sink.
    async fn after_failure(
        &mut self,
        st: &mut LoopState,
        failures: u32,
        status: Option<u16>,
        now: i64,
    ) -> Result<(), Error> {
        let Some(policy) = self.sink.cfg.ban else {
            return Ok(());
        };
        let decision = if status == Some(410) {
            delivery::BanDecision::Disable
        } else {
            delivery::ban_after_failure(&policy, failures)
        };
        let name = self.sink.cfg.name.clone();
        let reason = st.row.last_error.clone().unwrap_or_default();
        match decision {
            delivery::BanDecision::None => return Ok(()),
            delivery::BanDecision::Ban { secs } => {
                let until = now
                    .saturating_add(i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000));
                tracing::warn!(sink = %name, failures, ban_secs = secs, error = %reason,
                    "Endpoint banned after repeated failures; its events are {}", if self.sink.cfg.drop_during_ban { "dead-lettered (banned) until the ban ends (drop_during_ban)" } else { "held and delivered after the ban" });
                st.row.status = outbox::STATUS_BANNED.to_string();
                st.row.banned_until = Some(until);
                st.row.next_attempt_at = Some(st.row.next_attempt_at.unwrap_or(until).max(until));
                self.note(st, "banned", reason, Some(until)).await;
            }
            delivery::BanDecision::Disable => {
                tracing::error!(sink = %name, failures, status, error = %reason,
                    "Sink disabled after errors (DISABLED_DUE_TO_ERRORS); its events are held until it is re-enabled or its configuration changes");
                st.row.status = outbox::STATUS_DISABLED.to_string();
                st.row.disabled_at = Some(now);
                st.row.next_attempt_at = None;
                self.note(st, "disabled", reason, None).await;
            }
        }
        st.dirty = true;
        st.flush(true).await
    }

    /// Back to `ACTIVE` after a disable: the failure count starts again.
    async fn reenable(&mut self, st: &mut LoopState, why: &str) {
        st.row.status = outbox::STATUS_ACTIVE.to_string();
        st.row.disabled_at = None;
        st.row.consecutive_failures = 0;
        st.row.next_attempt_at = None;
        st.row.last_error = None;
        st.dirty = true;
        self.owes_recovery = true;
        self.note(st, "enabled", why.to_string(), None).await;
    }

    /// During a ban with `drop_during_ban`: the pending events this sink wants become dead
    /// letters `banned`. Returns whether there were any.
    async fn drop_banned(&mut self, st: &mut LoopState) -> Result<bool, Error> {
        let cursor = st.row.cursor;
        let batch = st
            .blocking(move |c, p| outbox::read_batch(c, p, cursor, FILTER_READ_AHEAD, 1 << 20))
            .await??;
        let Some(last) = batch.last().map(|e| e.pos) else {
            return Ok(false);
        };
        let dead: Vec<_> = batch
            .into_iter()
            .filter(|e| {
                e.damaged
                    || (!is_note_about(e, &self.sink.cfg.name) && self.sink.transport.accepts(e))
            })
            .collect();
        st.row.cursor = last;
        if dead.is_empty() {
            st.dirty = true;
            st.flush(false).await?;
        } else {
            tracing::warn!(sink = %self.sink.cfg.name, count = dead.len(),
                "Endpoint banned: events dropped into dead letters (banned) as drop_during_ban asks");
            st.dead_letter(dead, "banned", None, None).await?;
        }
        Ok(true)
    }

    /// Records a failed attempt for `queue stats` / a technician.
    async fn record_attempt(
        &self,
        st: &LoopState,
        batch: &[outbox::StoredEvent],
        outcome: &delivery::Outcome,
        duration_ms: i64,
        now: i64,
    ) -> Result<(), Error> {
        let (status, snippet) = match outcome {
            delivery::Outcome::Status { code, snippet, .. } => {
                (i64::from(*code), Some(snippet.clone()))
            }
            delivery::Outcome::Connect(m)
            | delivery::Outcome::Other(m)
            | delivery::Outcome::Auth(m)
            | delivery::Outcome::Invalid(m) => (0, Some(delivery::snippet(m.as_bytes(), 256))),
            delivery::Outcome::Timeout | delivery::Outcome::Acked => (0, None),
        };
        let a = outbox::Attempt {
            sink: self.sink.cfg.name.clone(),
            at: now,
            first_pos: batch.first().map_or(0, |e| e.pos),
            events: i64::try_from(batch.len()).unwrap_or(i64::MAX),
            status,
            duration_ms,
            error_kind: delivery::error_kind(outcome).to_string(),
            snippet: snippet.filter(|s| !s.is_empty()),
        };
        st.blocking(move |c, p| outbox::record_attempt(c, p, &a))
            .await??;
        Ok(())
    }

    /// Hands an `operational` note to the writer (a durable event for the other sinks).
    async fn note(&self, st: &LoopState, state: &str, reason: String, banned_until: Option<i64>) {
        let Some(tx) = self.ctx.notes.as_ref().and_then(|w| w.upgrade()) else {
            return;
        };
        let n = crate::channel::OperationalNote {
            sink: self.sink.cfg.name.clone(),
            kind: self.sink.cfg.kind.to_string(),
            state: state.to_string(),
            reason,
            failures: st.row.consecutive_failures,
            banned_until: banned_until.map(crate::model::format_rfc3339_ms),
        };
        if tx
            .send(crate::channel::WriterMsg::Operational(n))
            .await
            .is_err()
        {
            tracing::debug!(sink = %self.sink.cfg.name, "Writer gone; operational note not recorded");
        }
    }
}

/// Whether `e` is an `operational` note of the gateway about sink `name`.
fn is_note_about(e: &outbox::StoredEvent, name: &str) -> bool {
    #[derive(serde::Deserialize)]
    struct Current {
        sink: String,
    }
    #[derive(serde::Deserialize)]
    struct Note {
        current: Current,
    }
    e.kind == "operational"
        && e.device == crate::channel::GATEWAY_DEVICE
        && serde_json::from_str::<Note>(&e.payload).is_ok_and(|n| n.current.sink == name)
}

/// Events read ahead by a filtered sink (and per round while dropping during a ban).
const FILTER_READ_AHEAD: usize = 256;

/// What a filtered sink takes from a batch.
#[derive(Debug, PartialEq)]
enum Selected {
    /// Nothing wanted up to `last_pos`: pass over it.
    None { last_pos: i64 },
    /// The first `limit` wanted events (those skipped between them are passed over with them).
    Some(Vec<outbox::StoredEvent>),
}

fn select(
    batch: Vec<outbox::StoredEvent>,
    limit: usize,
    accepts: impl Fn(&outbox::StoredEvent) -> bool,
) -> Selected {
    let last_pos = batch.last().map_or(0, |e| e.pos);
    let picked: Vec<_> = batch
        .into_iter()
        .filter(|e| accepts(e))
        .take(limit.max(1))
        .collect();
    if picked.is_empty() {
        Selected::None { last_pos }
    } else {
        Selected::Some(picked)
    }
}

struct LoopState {
    db: Arc<PathBuf>,
    conn: Arc<Mutex<Connection>>,
    name: String,
    row: SinkRow,
    dirty: bool,
    last_flush: Instant,
}

impl LoopState {
    /// Keeps the events and schedules the next attempt after `delay_ms` (a retryable failure or
    /// an endpoint problem); saved at once so that `queue stats` shows it.
    async fn hold(
        &mut self,
        failures: u32,
        delay_ms: u64,
        reason: String,
        now: i64,
        cursor: i64,
    ) -> Result<(), Error> {
        if self.row.consecutive_failures == 0 {
            tracing::warn!(sink = %self.name, error = %reason, retry_in_ms = delay_ms, pending_from = cursor,
                "Delivery failed; events are held and retried");
        } else {
            tracing::debug!(sink = %self.name, error = %reason, failures, retry_in_ms = delay_ms, "Delivery failed again");
        }
        self.row.consecutive_failures = i64::from(failures);
        self.row.next_attempt_at =
            Some(now.saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX)));
        self.row.last_error = Some(reason);
        self.dirty = true;
        self.flush(true).await
    }

    /// Runs `f` on the sink's connection on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &std::path::Path) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let conn = self.conn.clone();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = match conn.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            f(&mut c, &db)
        })
        .await
        .map_err(|e| Error::Join {
            sink: self.name.clone(),
            message: e.to_string(),
        })
    }

    /// Persists the row if it changed and (unless `force`) the flush interval passed.
    async fn flush(&mut self, force: bool) -> Result<(), Error> {
        if !self.dirty || (!force && self.last_flush.elapsed() < PROGRESS_FLUSH) {
            return Ok(());
        }
        let row = self.row.clone();
        self.blocking(move |c, p| outbox::save_sink(c, p, &row, crate::telemetry::now_ms()))
            .await??;
        self.dirty = false;
        self.last_flush = Instant::now();
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        events: Vec<outbox::StoredEvent>,
        reason: &'static str,
        status: Option<u16>,
        snippet: Option<String>,
    ) -> Result<(), Error> {
        let row = self.row.clone();
        self.blocking(move |c, p| {
            let why = DeadReason {
                reason,
                http_status: status,
                snippet: snippet.as_deref(),
            };
            outbox::dead_letter(c, p, &row, &events, &why, crate::telemetry::now_ms())
        })
        .await??;
        self.dirty = false;
        self.last_flush = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox::StoredEvent;

    const NOW: i64 = 1_800_000_000_000;
    const DAY: i64 = 86_400_000;

    fn event(pos: i64, observed_at: i64, clock: &str) -> StoredEvent {
        StoredEvent {
            pos,
            id: format!("e{pos}"),
            device: "trv".into(),
            seq: pos,
            kind: "setpoint".into(),
            observed_at,
            payload: format!(r#"{{"id":"e{pos}","seq":{pos},"clock":"{clock}","state":{{}}}}"#),
            damaged: false,
        }
    }

    #[test]
    fn ttl_expires_only_synced_events_older_than_the_ttl() {
        let c = ClockSteps::default();
        let ttl = 3_600_000;
        for now_synced in [true, false] {
            assert!(is_expired(
                &event(1, NOW - ttl - 1, "synced"),
                NOW,
                now_synced,
                ttl,
                &c
            ));
            assert!(!is_expired(
                &event(1, NOW - ttl, "synced"),
                NOW,
                now_synced,
                ttl,
                &c
            ));
            assert!(
                !is_expired(&event(1, 1_000, "synced"), NOW, now_synced, ttl, &c),
                "stamped before the clock was set"
            );
            // A payload that does not parse is judged by its time alone.
            let mut e = event(1, NOW - ttl - 1, "synced");
            e.payload = "{not json".into();
            assert!(is_expired(&e, NOW, now_synced, ttl, &c));
        }
        let old_unsynced = event(1, NOW - 30 * DAY, "unsynced");
        assert!(
            !is_expired(&old_unsynced, NOW, false, ttl, &c),
            "two unsynchronised readings are never compared"
        );
        assert!(
            is_expired(&old_unsynced, NOW, true, ttl, &c),
            "once the clock is synchronised (and steps re-based) the age counts"
        );
    }

    #[test]
    fn a_forward_clock_step_does_not_expire_the_events_committed_before_it() {
        let c = ClockSteps::default();
        let t0 = Instant::now();
        let boot = NOW - DAY;
        c.check(boot, t0, 0);
        // Ten events observed in the first minute; then the clock jumps a day ahead.
        c.check(boot + 60_000 + DAY, t0 + Duration::from_secs(60), 10);
        let ttl = 3_600_000;
        let now = boot + 120_000 + DAY;
        let held: Vec<StoredEvent> = (1..=10)
            .map(|p| event(p, boot + p * 1000, "synced"))
            .collect();
        assert!(held.iter().all(|e| !is_expired(e, now, true, ttl, &c)));
        // Without the step record the same events would all look a day old.
        let naive = ClockSteps::default();
        assert!(held.iter().all(|e| is_expired(e, now, true, ttl, &naive)));
        // An hour and a bit later (in the new clock's terms) they expire normally.
        assert!(is_expired(&held[0], now + ttl, true, ttl, &c));
    }

    #[test]
    fn batch_limit_halves_bisects_and_grows_back_by_a_quarter() {
        let mut b = BatchControl::new(500);
        b.shrink(500);
        assert_eq!(b.limit, 250);
        b.done(10, false);
        assert_eq!(b.limit, 312);
        // A rejected batch of 8 ending at pos 108: halves until the bad event is found.
        let mut b = BatchControl::new(8);
        b.rejected(8, 108);
        assert_eq!((b.limit, b.bisect_until), (4, Some(108)));
        b.done(104, false);
        assert_eq!(b.limit, 4, "no growth while bisecting");
        b.rejected(4, 108);
        b.rejected(2, 106);
        assert_eq!((b.limit, b.bisect_until), (1, Some(108)));
        b.done(105, true);
        assert_eq!((b.limit, b.bisect_until), (1, None), "the bad event found");
        for want in [2, 3, 4, 5, 6, 7, 8, 8] {
            b.done(200, false);
            assert_eq!(b.limit, want);
        }
        // Passing the end of the rejected range also ends bisection (a batch-level refusal).
        let mut b = BatchControl::new(4);
        b.rejected(4, 4);
        b.done(2, false);
        b.done(4, false);
        assert_eq!((b.limit, b.bisect_until), (3, None));
        assert_eq!(BatchControl::new(0).limit, 1);
    }

    #[test]
    fn a_filtered_batch_takes_the_first_wanted_events_and_passes_over_the_rest() {
        let batch: Vec<StoredEvent> = (1..=6).map(|p| event(p, NOW, "synced")).collect();
        let even = |e: &StoredEvent| e.pos % 2 == 0;
        let got = select(batch.clone(), 2, even);
        assert_eq!(
            got,
            Selected::Some(vec![batch[1].clone(), batch[3].clone()]),
            "pos 2 and 4; pos 1 and 3 are passed over with them, 5 and 6 wait"
        );
        assert_eq!(
            select(batch.clone(), 10, |_| false),
            Selected::None { last_pos: 6 }
        );
        assert_eq!(
            select(batch.clone(), 0, |_| true),
            Selected::Some(vec![batch[0].clone()])
        );
    }

    #[test]
    fn a_sink_is_not_sent_the_notes_about_itself() {
        let mut e = event(1, NOW, "synced");
        e.kind = "operational".into();
        e.device = crate::channel::GATEWAY_DEVICE.into();
        e.payload = r#"{"current":{"sink":"hook","state":"banned"}}"#.into();
        assert!(is_note_about(&e, "hook"));
        assert!(!is_note_about(&e, "other"));
        e.device = "hall".into();
        assert!(!is_note_about(&e, "hook"), "only the gateway's own notes");
    }

    #[test]
    fn store_errors_back_off_exponentially_to_a_minute() {
        let got: Vec<u64> = [1, 2, 3, 4, 5, 6, 7, 8, 100, u32::MAX]
            .iter()
            .map(|&n| store_backoff(n).as_secs())
            .collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(store_backoff(0).as_secs(), 1);
    }
}
