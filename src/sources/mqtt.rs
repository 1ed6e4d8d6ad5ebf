//! The MQTT source: a persistent QoS 1 session on the gateway's broker, acks only after commit.
//!
//! rumqttc's contract: the connection progresses only while `EventLoop::poll` is called, so this
//! loop never awaits anything but `poll` and the bounded hand-off to the writer. Acks are sent by
//! the writer thread after the commit, through a cloned `AsyncClient` (never awaited here).
//! Clean session off and a fixed client id: messages published while the daemon is down or not
//! yet acked stay with the broker and come back. Subscriptions are made on every connection, so
//! topics added to the config take effect; the retained state the broker then replays equals
//! what is committed and yields no event.
//! Parsing lives in `payload.rs`; this file routes topics, enforces bounds and counts.

use super::payload::{self, Mapping, Route};
use super::{Backoff, SharedStats, SourceStats};
use crate::channel::WriterMsg;
use crate::channel::{Ack, Envelope, MqttReceipt};
use crate::config::{MqttPreset, MqttSourceConfig};
use crate::model::{Observation, Reported};
use crate::telemetry::RateLimit;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Room for everything of a PUBLISH but its payload: topic length (2), the longest topic
/// MQTT allows (65535) and the packet id (2). A publish whose payload fits `max_payload_bytes`
/// is therefore never refused by the client, whatever its topic.
pub const TOPIC_ROOM_BYTES: usize = 2 + 65_535 + 2;

/// The payload size the client always accepts, whatever `max_payload_bytes` says: Zigbee2MQTT's
/// own retained messages (`<base>/bridge/devices`, tens of KiB per device) arrive on the
/// subscribed `<base>/#` and are ignored, but must not break the connection.
pub const MIN_CLIENT_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The largest packet the client reads (rumqttc's incoming limit): `max_payload_bytes` (at
/// least [`MIN_CLIENT_PAYLOAD_BYTES`]) plus [`TOPIC_ROOM_BYTES`] (issue 11 item 19). rumqttc
/// checks the length in the fixed header and drops the connection before reading a larger
/// packet, so a huge publish costs nothing; between `max_payload_bytes` and this limit a
/// payload is read, acked and counted as malformed. A packet over it would come back with every
/// reconnect (the broker keeps it in the session), so the broker must refuse it first:
/// `max_packet_size` in `systemd/mosquitto-hvac-edge.conf` is at most this limit.
pub fn incoming_packet_limit(max_payload_bytes: usize) -> usize {
    max_payload_bytes
        .max(MIN_CLIENT_PAYLOAD_BYTES)
        .saturating_add(TOPIC_ROOM_BYTES)
}

/// Largest packet this client sends (subscriptions, acks).
const OUTGOING_PACKET_LIMIT: usize = 64 * 1024;

/// rumqttc request channel capacity (acks and subscriptions).
const ACK_CHANNEL_CAP: usize = 4096;

/// Acks waiting for room in rumqttc's request channel: (packet id, QoS).
type Overflow = Arc<std::sync::Mutex<std::collections::VecDeque<(u16, QoS)>>>;

/// A publish carrying only what rumqttc needs to build the PUBACK (packet id and QoS).
fn puback_of(pkid: u16, qos: QoS) -> Publish {
    let mut a = Publish::new("", qos, Vec::<u8>::new());
    a.pkid = pkid;
    a
}

/// Sends waiting acks until rumqttc's request channel is full again.
fn drain_overflow(client: &AsyncClient, overflow: &Overflow) {
    let mut q = match overflow.lock() {
        Ok(q) => q,
        Err(poisoned) => poisoned.into_inner(),
    };
    while let Some(&(pkid, qos)) = q.front() {
        if client.try_ack(&puback_of(pkid, qos)).is_err() {
            break;
        }
        q.pop_front();
    }
}

/// On shutdown, how long to wait for the writer to commit and ack what this source handed it.
const ACK_DRAIN: Duration = Duration::from_secs(3);

/// Why the source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sources.mqtt {name}: {problem}")]
    Config { name: String, problem: String },
}

/// What one topic carries for this source.
enum Target<'a> {
    /// Zigbee2MQTT state of a device.
    State(String),
    /// Availability (`online`/`offline`) of a device.
    Availability(String),
    /// A payload for the generic mapping.
    Mapped(&'a Mapping),
    /// Not ours: acked and counted as ignored.
    Ignore,
}

enum Router {
    Z2m {
        base: String,
    },
    Generic {
        filters: Vec<String>,
        mapping: Box<Mapping>,
    },
}

/// A configured MQTT source, ready to run.
pub struct MqttSource {
    cfg: MqttSourceConfig,
    router: Router,
    allow: HashSet<String>,
    stats: SharedStats,
    bad_log: RateLimit,
    /// The rustls client configuration, built once at construction (`None`: plain TCP).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl MqttSource {
    /// Builds the source from its config (compiles the mapping, loads the TLS files; the
    /// password is read when the source starts).
    ///
    /// # Errors
    /// A config problem naming the source and the key.
    pub fn new(cfg: MqttSourceConfig, stats: SharedStats) -> Result<MqttSource, Error> {
        let tls = cfg
            .tls_client_config()
            .map_err(|errs| Error::Config {
                name: cfg.name.clone(),
                problem: errs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            })?
            .map(Arc::new);
        let router = match cfg.preset {
            MqttPreset::Zigbee2mqtt => Router::Z2m {
                base: cfg.base_topic.clone(),
            },
            MqttPreset::Generic => {
                let spec = cfg
                    .mapping
                    .as_ref()
                    .map(|m| m.spec())
                    .ok_or_else(|| Error::Config {
                        name: cfg.name.clone(),
                        problem: "the generic preset needs a mapping".into(),
                    })?;
                let mapping = Mapping::compile(&spec).map_err(|errs| Error::Config {
                    name: cfg.name.clone(),
                    problem: errs
                        .iter()
                        .map(|(k, p)| format!("mapping.{k}: {p}"))
                        .collect::<Vec<_>>()
                        .join("; "),
                })?;
                Router::Generic {
                    filters: cfg.topics.clone(),
                    mapping: Box::new(mapping),
                }
            }
        };
        Ok(MqttSource {
            allow: cfg.devices.iter().cloned().collect(),
            router,
            cfg,
            stats,
            bad_log: RateLimit::new(Duration::from_secs(60)),
            tls,
        })
    }

    fn options(&self) -> Result<MqttOptions, Error> {
        let c = &self.cfg;
        let mut o = MqttOptions::new(c.effective_client_id(), c.host.clone(), c.port);
        o.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(c.keep_alive_secs))
            .set_max_packet_size(
                incoming_packet_limit(c.max_payload_bytes),
                OUTGOING_PACKET_LIMIT,
            );
        if let Some(tls) = &self.tls {
            // rumqttc verifies the broker's certificate against `host` (a DNS name or an IP).
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::clone(tls)),
            ));
        }
        if let Some(user) = &c.username {
            let password = match (&c.password_file, &c.password_env) {
                (Some(f), _) => crate::config::read_secret_file(f),
                (None, Some(e)) => crate::config::read_secret_env(e),
                (None, None) => Ok(String::new()),
            }
            .map_err(|problem| Error::Config {
                name: c.name.clone(),
                problem,
            })?;
            o.set_credentials(user.clone(), password);
        }
        Ok(o)
    }

    fn subscriptions(&self) -> Vec<String> {
        match &self.router {
            Router::Z2m { base } => vec![format!("{base}/#")],
            Router::Generic { filters, mapping } => {
                let mut v = filters.clone();
                if let Some(a) = mapping.availability_filter() {
                    v.push(a);
                }
                v
            }
        }
    }

    /// Polls the broker until `shutdown`; hands observations to the writer.
    ///
    /// # Errors
    /// Only configuration problems found at start; network trouble is retried forever.
    pub async fn run(
        self,
        obs_tx: mpsc::Sender<WriterMsg>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let opts = self.options()?;
        let name = self.cfg.name.clone();
        // Requests are acks (plus a few subscriptions). When a flood outruns rumqttc, acks wait
        // in the compact overflow queue (see `ack_for`) rather than as ~100-byte requests here.
        let cap = ACK_CHANNEL_CAP;
        let (client, mut eventloop): (AsyncClient, EventLoop) = AsyncClient::new(opts, cap);
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.reconnect_min_ms),
            Duration::from_millis(self.cfg.reconnect_max_ms),
        );
        let mut connected = false;
        let mut failing = false;
        // Observations handed to the writer whose ack has not run yet.
        let in_flight = Arc::new(AtomicUsize::new(0));
        let overflow: Overflow = Arc::default();
        // Broker session generation: an ack made in one session is never sent in another (its
        // packet id would name a different message there).
        let session = Arc::new(AtomicU64::new(0));
        loop {
            let ev = tokio::select! {
                ev = eventloop.poll() => ev,
                _ = shutdown.cancelled() => break,
            };
            drain_overflow(&client, &overflow);
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    SourceStats::inc(&self.stats.connects);
                    self.stats
                        .set_link(super::Link::Connected, crate::telemetry::now_ms(), None);
                    connected = true;
                    backoff.reset();
                    if failing {
                        tracing::info!(source = %name, host = %self.cfg.host, port = self.cfg.port, "Broker connection restored");
                    } else {
                        tracing::info!(source = %name, host = %self.cfg.host, port = self.cfg.port, session_present = ack.session_present, "Connected to broker");
                    }
                    failing = false;
                    if !ack.session_present {
                        // The broker has no session for us (first start, or it lost it): acks
                        // still pending belong to packet ids of the old session, and so do the
                        // duplicate-filter receipts. Drop both.
                        session.fetch_add(1, Ordering::AcqRel);
                        let dropped = {
                            let mut q = match overflow.lock() {
                                Ok(q) => q,
                                Err(p) => p.into_inner(),
                            };
                            let n = q.len();
                            q.clear();
                            n
                        };
                        if dropped > 0 {
                            tracing::warn!(source = %name, dropped,
                                "Broker session lost: pending acks of the old session dropped (the broker no longer has those messages)");
                        }
                        if obs_tx
                            .send(WriterMsg::SessionLost(name.clone()))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    // Subscribe on every connection, session or not: QoS 1 subscriptions are
                    // idempotent, and topics added to the config since the session was made
                    // are picked up (filters since removed stay in the session; what arrives
                    // on them is routed as "ignored" and acked).
                    for t in self.subscriptions() {
                        if let Err(e) = client.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                            tracing::error!(source = %name, topic = %t, error = %e, "Cannot queue subscription");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(env) = self.handle(&client, p, &in_flight, &overflow, &session) {
                        // The only await besides poll(): backpressure from the writer.
                        if obs_tx.send(WriterMsg::Observe(env)).await.is_err() {
                            break;
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    if s.return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::error!(source = %name, codes = ?s.return_codes,
                            "The broker refused a subscription (check its ACL for this client); those topics will not arrive");
                    } else {
                        tracing::debug!(source = %name, codes = ?s.return_codes, "Subscribed");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if let rumqttc::ConnectionError::MqttState(
                        rumqttc::StateError::Deserialization(
                            rumqttc::Error::PayloadSizeLimitExceeded(n),
                        ),
                    ) = &e
                    {
                        // Not retried away: the broker redelivers it on every connection.
                        tracing::error!(source = %name, packet_bytes = n,
                            limit_bytes = incoming_packet_limit(self.cfg.max_payload_bytes),
                            "The broker sent a packet over this source's limit (max_payload_bytes plus room for the topic) and the client refused it; the broker will send it again after the reconnect. Set max_packet_size in the broker (systemd/mosquitto-hvac-edge.conf) to at most the limit, or raise max_payload_bytes");
                    }
                    if connected || !failing {
                        tracing::warn!(source = %name, host = %self.cfg.host, port = self.cfg.port, error = %e,
                            "Broker connection lost or refused; reconnecting with backoff (unacked messages stay with the broker)");
                    }
                    connected = false;
                    failing = true;
                    self.stats.set_link(
                        super::Link::Disconnected,
                        crate::telemetry::now_ms(),
                        Some(e.to_string()),
                    );
                    let wait = backoff.next_delay();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        // Let the writer commit what we handed it and send those acks before disconnecting, so a
        // clean stop causes no redelivery. New publishes are not taken (the broker keeps them).
        if connected {
            let drained = tokio::time::timeout(ACK_DRAIN, async {
                while in_flight.load(Ordering::Acquire) > 0
                    || overflow.lock().map(|q| !q.is_empty()).unwrap_or(false)
                {
                    drain_overflow(&client, &overflow);
                    if let Ok(Err(_)) =
                        tokio::time::timeout(Duration::from_millis(20), eventloop.poll()).await
                    {
                        break;
                    }
                }
                // One more round so the last queued PUBACKs reach the socket.
                let _ = tokio::time::timeout(Duration::from_millis(50), eventloop.poll()).await;
            })
            .await;
            if drained.is_err() {
                tracing::warn!(source = %name, unacked = in_flight.load(Ordering::Acquire),
                    "Stopping with messages not yet acked; the broker will redeliver them (duplicates are filtered)");
            }
        }
        // Clean DISCONNECT, bounded: unacked messages stay with the broker for the next start.
        if connected && client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Ok(ev) = eventloop.poll().await {
                    if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        tracing::info!(source = %name, "MQTT source stopped");
        Ok(())
    }

    /// What a topic is for this source (decided once per message).
    fn target(&self, topic: &str) -> Target<'_> {
        match &self.router {
            Router::Z2m { base } => match payload::z2m_route(base, topic) {
                Route::Ignore => Target::Ignore,
                Route::State(dev) => Target::State(dev),
                Route::Availability(dev) => Target::Availability(dev),
            },
            Router::Generic { filters, mapping } => {
                if let Some(dev) = mapping.availability_device(topic) {
                    Target::Availability(dev)
                } else if filters.iter().any(|f| payload::topic_matches(f, topic)) {
                    Target::Mapped(mapping)
                } else {
                    Target::Ignore
                }
            }
        }
    }

    /// Turns one publish into an envelope, or acks and counts it when it carries nothing for us.
    fn handle(
        &self,
        client: &AsyncClient,
        p: Publish,
        in_flight: &Arc<AtomicUsize>,
        overflow: &Overflow,
        session: &Arc<AtomicU64>,
    ) -> Option<Envelope> {
        SourceStats::inc(&self.stats.received);
        let ack = self.ack_for(client, &p, in_flight, overflow, session);
        let topic = p.topic.as_str();
        // Route on the topic once, before anything else: a large message on a topic we ignore
        // (e.g. a retained `bridge/devices`) is not malformed, just not ours.
        let target = self.target(topic);
        if matches!(target, Target::Ignore) {
            SourceStats::inc(&self.stats.ignored);
            ack.run();
            return None;
        }
        if p.payload.len() > self.cfg.max_payload_bytes {
            self.bad(
                "too_large",
                None,
                topic,
                &format!(
                    "payload of {} bytes exceeds max_payload_bytes ({})",
                    p.payload.len(),
                    self.cfg.max_payload_bytes
                ),
            );
            ack.run();
            return None;
        }
        // A device id from the topic is checked before the payload is parsed (issue 11 item
        // 18); one from the payload (generic mapping) by the mapping.
        type Parsed = Result<Option<(String, Reported)>, (Option<String>, payload::PayloadError)>;
        let parsed: Parsed = match target {
            Target::Ignore => Ok(None),
            Target::State(dev) => payload::PayloadError::check_device_id(&dev)
                .and_then(|()| payload::z2m_state(&p.payload))
                .map(|r| Some((dev.clone(), r)))
                .map_err(|e| (Some(dev), e)),
            Target::Availability(dev) => payload::PayloadError::check_device_id(&dev)
                .and_then(|()| payload::availability(&p.payload))
                .map(|c| {
                    c.map(|c| {
                        (
                            dev.clone(),
                            Reported {
                                connectivity: Some(c),
                                ..Default::default()
                            },
                        )
                    })
                })
                .map_err(|e| (Some(dev), e)),
            Target::Mapped(mapping) => mapping
                .map(topic, &p.payload)
                .map(Some)
                .map_err(|e| (None, e)),
        };
        match parsed {
            Ok(Some((device, reported)))
                if self.allow.is_empty() || self.allow.contains(&device) =>
            {
                SourceStats::inc(&self.stats.observations);
                let now = crate::telemetry::now_ms();
                // `hvac-edge sources` shows it as "last valid data", as for serial sources.
                self.stats.detail().last_valid_ms = Some(now);
                let receipt = MqttReceipt {
                    pkid: p.pkid,
                    digest: super::digest(topic, &p.payload),
                    dup: p.dup,
                };
                Some(Envelope {
                    obs: Observation {
                        device,
                        source: self.cfg.name.clone(),
                        observed_at: now,
                        reported,
                    },
                    ack: Some(ack),
                    receipt: Some(receipt),
                })
            }
            Ok(_) => {
                SourceStats::inc(&self.stats.ignored);
                ack.run();
                None
            }
            Err((device, payload::PayloadError::Unmapped)) => {
                // A device without thermostat fields (a light, a plug): not ours, not malformed.
                tracing::trace!(source = %self.cfg.name, device = %crate::telemetry::shown(device.as_deref().unwrap_or(topic), 128),
                    "Message without thermostat fields ignored");
                SourceStats::inc(&self.stats.ignored);
                ack.run();
                None
            }
            Err((device, e)) => {
                self.bad(e.kind(), device.as_deref(), topic, &e.to_string());
                ack.run();
                None
            }
        }
    }

    /// Counts a malformed message and logs it, rate-limited by `kind` (this limiter is the
    /// source's own, so the key is (source, kind)) under the process-wide ceiling: a flood of
    /// distinct topics or device ids writes a few lines, not one each. Topic and device are
    /// publisher-chosen: cut and escaped.
    fn bad(&self, kind: &'static str, device: Option<&str>, topic: &str, problem: &str) {
        SourceStats::inc(&self.stats.malformed);
        if let Some(suppressed) = self.bad_log.check(kind) {
            let device = device.map(|d| crate::telemetry::shown(d, 128));
            tracing::warn!(source = %self.cfg.name, kind, device = device.as_deref().unwrap_or("-"),
                topic = %crate::telemetry::shown(topic, 128), error = %problem, suppressed,
                "Dropped a message that does not map to thermostat state (acked, counted)");
        }
    }

    /// The ack for `p`: a PUBACK queued on rumqttc's request channel. If that channel is full
    /// (rumqttc sends one request per loop turn while it reads up to ten packets, so a flood
    /// can outrun it), the packet id waits in `overflow` (a few bytes each, no task) and the
    /// source loop retries it after each poll. An ack is never dropped.
    fn ack_for(
        &self,
        client: &AsyncClient,
        p: &Publish,
        in_flight: &Arc<AtomicUsize>,
        overflow: &Overflow,
        session: &Arc<AtomicU64>,
    ) -> Ack {
        let (pkid, qos) = (p.pkid, p.qos);
        let client = client.clone();
        let overflow = overflow.clone();
        in_flight.fetch_add(1, Ordering::AcqRel);
        let in_flight = in_flight.clone();
        let made_in = session.load(Ordering::Acquire);
        let session = session.clone();
        Ack::new(move || {
            in_flight.fetch_sub(1, Ordering::AcqRel);
            if session.load(Ordering::Acquire) != made_in {
                // The session this packet id belongs to is gone: acking would acknowledge
                // whatever message of the new session has that id.
                return;
            }
            let mut q = match overflow.lock() {
                Ok(q) => q,
                Err(poisoned) => poisoned.into_inner(),
            };
            // Keep order: while older acks wait, newer ones queue behind them.
            if !q.is_empty() || client.try_ack(&puback_of(pkid, qos)).is_err() {
                q.push_back((pkid, qos));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_packet_limit_covers_max_payload_bytes_and_the_longest_topic() {
        assert_eq!(incoming_packet_limit(1024), 1_048_576 + 65_539);
        assert_eq!(incoming_packet_limit(65_536), 1_114_115);
        assert_eq!(
            incoming_packet_limit(16 * 1024 * 1024),
            16 * 1024 * 1024 + 65_539
        );
    }

    /// The broker must refuse what the client would refuse, or the message comes back after
    /// every reconnect (issue 11 item 19).
    #[test]
    fn the_mosquitto_drop_in_sets_max_packet_size_within_the_client_limit() {
        const DROP_IN: &str = include_str!("../../systemd/mosquitto-hvac-edge.conf");
        let set: Vec<usize> = DROP_IN
            .lines()
            .filter_map(|l| l.strip_prefix("max_packet_size "))
            .map(|v| v.trim().parse().expect("a number"))
            .collect();
        assert_eq!(set, [1_048_576]);
        // Within the limit of the smallest accepted max_payload_bytes.
        assert!(set[0] <= incoming_packet_limit(1024));
    }
}
