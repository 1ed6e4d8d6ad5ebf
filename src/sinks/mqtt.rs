//! The MQTT upstream sink's transport (rumqttc): every event published at QoS 1 to its topic
//! (`hvac-edge/{gateway_id}/{device_id}/{type}` by default), a batch at most
//! [`BATCH_WINDOWS`] × `max_inflight` events with `max_inflight` awaiting PUBACK at a time
//! (rumqttc sends the next as each PUBACK comes back), delivered only when every PUBACK came
//! back. Waiting for a whole batch costs one round trip (and a broker's delayed ACK) per
//! batch, not per window. A retained `online` on the status topic
//! after each connect, `offline` as the last will and on a clean stop. TLS with the broker's CA
//! and a client certificate (AWS IoT Core, Azure IoT Hub), or username/password.
//!
//! One task owns the connection and is the only publisher: it knows the order of its own
//! publishes, so each PUBACK is matched to the event it acknowledges by packet id, never by
//! counting. A connection lost mid-batch fails the batch; publishes rumqttc would resend on the
//! new connection are dropped, and the runner sends the batch again (same event ids:
//! at-least-once, in order). Fleet fan-out is the broker's job.

use super::delivery::Outcome;
use crate::config::MqttSinkConfig;
use crate::store::outbox::StoredEvent;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Placeholders of a topic template.
const TOPIC_PLACEHOLDERS: [&str; 5] = ["gateway_id", "device_id", "type", "plant_id", "module_id"];

/// Windows of `max_inflight` events per batch: the stop-and-wait at the end of a batch (a round
/// trip, and a broker that holds its last PUBACKs behind Nagle until our delayed ACK: ~33 ms on
/// mosquitto's defaults) is paid once per this many windows. Measured on a 318k backlog: one
/// window per batch 0.13x a bare publisher, ten 0.53x. Bounded in bytes too
/// ([`BATCH_MAX_BYTES`]).
pub const BATCH_WINDOWS: usize = 50;

/// Most payload bytes in one batch (the runner's read and rumqttc's queue hold it twice).
pub const BATCH_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Reconnect backoff bounds; each wait is jittered down to half, so that a fleet that lost its
/// broker at the same moment does not come back in lockstep.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// A topic with placeholders, checked once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<TopicPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TopicPart {
    Lit(String),
    Var(&'static str),
}

/// Values of a topic's placeholders.
#[derive(Debug, Clone, Copy)]
pub struct TopicVars<'a> {
    pub gateway_id: &'a str,
    pub device_id: &'a str,
    pub kind: &'a str,
    pub plant_id: Option<&'a str>,
    pub module_id: Option<&'a str>,
}

impl TopicTemplate {
    /// Parses a topic template.
    ///
    /// # Errors
    /// An unknown placeholder, a wildcard (`+`, `#`), an empty topic, or a control character.
    pub fn parse(s: &str) -> Result<TopicTemplate, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > 1024 {
            return Err("must be at most 1024 bytes".into());
        }
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            let lit = &rest[..open];
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in {s:?}"))?;
            let name = &after[..close];
            let var = TOPIC_PLACEHOLDERS
                .iter()
                .find(|p| **p == name)
                .ok_or_else(|| {
                    format!(
                        "unknown placeholder {{{name}}}; known: {}",
                        TOPIC_PLACEHOLDERS
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            if !lit.is_empty() {
                parts.push(TopicPart::Lit(lit.to_string()));
            }
            parts.push(TopicPart::Var(var));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TopicPart::Lit(rest.to_string()));
        }
        for p in &parts {
            if let TopicPart::Lit(l) = p {
                if l.contains('+') || l.contains('#') {
                    return Err(
                        "must not contain the wildcards + or # (a topic to publish to)".into(),
                    );
                }
                if l.contains('}') {
                    return Err(format!("unmatched '}}' in {s:?}"));
                }
                if l.chars().any(char::is_control) {
                    return Err("must not contain control characters".into());
                }
            }
        }
        Ok(TopicTemplate { parts })
    }

    /// Whether the topic needs the plant or module (read from the envelope, per event).
    pub fn needs_meta(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, TopicPart::Var("plant_id" | "module_id")))
    }

    /// The topic for `v`. A value can never add a level or a wildcard: `/`, `+`, `#` and control
    /// characters become `_`, and an empty value is `_`.
    pub fn render(&self, v: &TopicVars<'_>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TopicPart::Lit(l) => out.push_str(l),
                TopicPart::Var(name) => {
                    let value = match *name {
                        "gateway_id" => v.gateway_id,
                        "device_id" => v.device_id,
                        "type" => v.kind,
                        "plant_id" => v.plant_id.unwrap_or(""),
                        _ => v.module_id.unwrap_or(""),
                    };
                    if value.is_empty() {
                        out.push('_');
                    }
                    out.extend(value.chars().map(|c| {
                        if matches!(c, '/' | '+' | '#') || c.is_control() {
                            '_'
                        } else {
                            c
                        }
                    }));
                }
            }
        }
        out
    }
}

/// The connection task of an MQTT sink.
pub type LinkFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Why the sink could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("sinks.mqtt {name}: {problem}")]
    Config { name: String, problem: String },
}

/// What the connection task is asked to do.
enum Command {
    Publish {
        items: Vec<(String, Vec<u8>)>,
        reply: oneshot::Sender<Outcome>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// A ready-to-use MQTT upstream transport.
pub struct MqttTransport {
    name: String,
    gateway: String,
    topic: TopicTemplate,
    ack_timeout: Duration,
    max_inflight: usize,
    commands: mpsc::Sender<Command>,
    connected: Arc<std::sync::atomic::AtomicBool>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    /// Woken at every CONNACK.
    connacks: Arc<tokio::sync::Notify>,
    /// The connection task, until the runner takes it (a mutex only to be `Sync`).
    link: std::sync::Mutex<Option<LinkFuture>>,
}

#[derive(serde::Deserialize, Default)]
struct Meta {
    plant: Option<String>,
    module: Option<String>,
}

impl MqttTransport {
    /// Reads the TLS files and secrets; the connection runs once the runner takes it
    /// ([`MqttTransport::take_link`]).
    ///
    /// # Errors
    /// [`BuildError`] naming the sink and the problem.
    pub fn new(cfg: &MqttSinkConfig, gateway: &str) -> Result<MqttTransport, BuildError> {
        crate::tls::install_crypto_provider();
        let bad = |problem: String| BuildError::Config {
            name: cfg.name.clone(),
            problem,
        };
        let topic = TopicTemplate::parse(&cfg.topic).map_err(|e| bad(format!("topic: {e}")))?;
        let status_topic = if cfg.status_topic.is_empty() {
            None
        } else {
            let t = TopicTemplate::parse(&cfg.status_topic)
                .map_err(|e| bad(format!("status_topic: {e}")))?;
            Some(t.render(&TopicVars {
                gateway_id: gateway,
                device_id: "",
                kind: "status",
                plant_id: None,
                module_id: None,
            }))
        };
        let mut o = MqttOptions::new(
            cfg.effective_client_id(gateway),
            cfg.host.clone(),
            cfg.effective_port(),
        );
        let inflight = cfg.max_inflight.max(1);
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(cfg.keep_alive_secs))
            .set_inflight(inflight)
            .set_max_packet_size(1024 * 1024, 1024 * 1024);
        if let Some(t) = &status_topic {
            o.set_last_will(LastWill::new(t.clone(), "offline", QoS::AtLeastOnce, true));
        }
        match cfg.tls_client_config() {
            Ok(Some(tls)) => {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
                ));
            }
            Ok(None) => {}
            Err(errors) => {
                return Err(bad(errors
                    .iter()
                    .map(|e| format!("{}: {}", e.key, e.problem))
                    .collect::<Vec<_>>()
                    .join("; ")));
            }
        }
        if let Some(user) = &cfg.username {
            let password = match (
                crate::config::some_path(&cfg.password_file),
                &cfg.password_env,
            ) {
                (Some(f), _) => crate::config::read_secret_file(f).map_err(&bad)?,
                (None, Some(e)) => crate::config::read_secret_env(e).map_err(&bad)?,
                (None, None) => String::new(),
            };
            o.set_credentials(user.clone(), password);
        }
        let batch = usize::from(inflight) * BATCH_WINDOWS;
        let (client, eventloop) = AsyncClient::new(o, batch + 16);
        let (tx, rx) = mpsc::channel(4);
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let last_error = Arc::new(std::sync::Mutex::new(None));
        let connacks = Arc::new(tokio::sync::Notify::new());
        let link = Link {
            name: cfg.name.clone(),
            host: format!("{}:{}", cfg.host, cfg.effective_port()),
            client,
            eventloop,
            status_topic,
            connected: connected.clone(),
            last_error: last_error.clone(),
            connacks: connacks.clone(),
        };
        Ok(MqttTransport {
            connacks,
            link: std::sync::Mutex::new(Some(Box::pin(link.run(rx)))),
            name: cfg.name.clone(),
            gateway: gateway.to_string(),
            topic,
            ack_timeout: Duration::from_millis(cfg.ack_timeout_ms),
            max_inflight: batch,
            commands: tx,
            connected,
            last_error,
        })
    }

    /// Events per batch at most ([`BATCH_WINDOWS`] in-flight windows).
    pub fn max_inflight(&self) -> usize {
        self.max_inflight
    }

    /// The connection task, once: the runner polls it beside its loop.
    pub fn take_link(&mut self) -> Option<LinkFuture> {
        match self.link.get_mut() {
            Ok(l) => l.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    /// Resolves at the next CONNACK (a reconnect after an outage).
    pub async fn connected(&self) {
        self.connacks.notified().await;
    }

    /// Publishes the batch and waits for every PUBACK (or the first sign that some will not come).
    pub async fn deliver(&self, events: &[StoredEvent]) -> Outcome {
        if !self.connected.load(std::sync::atomic::Ordering::Acquire) {
            let why = self
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "connecting".into());
            return Outcome::Connect(format!("broker not connected: {why}"));
        }
        // The runner's batches are at most BATCH_WINDOWS x `max_inflight` events (the request
        // channel's room; RunnerSettings::mqtt); every
        // event given is published, so `Acked` always covers the whole batch.
        let items = events
            .iter()
            .map(|e| {
                let m: Meta = if self.topic.needs_meta() {
                    serde_json::from_str(&e.payload).unwrap_or_default()
                } else {
                    Meta::default()
                };
                let topic = self.topic.render(&TopicVars {
                    gateway_id: &self.gateway,
                    device_id: &e.device,
                    kind: &e.kind,
                    plant_id: m.plant.as_deref(),
                    module_id: m.module.as_deref(),
                });
                (topic, e.payload.as_bytes().to_vec())
            })
            .collect();
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Publish { items, reply })
            .await
            .is_err()
        {
            return Outcome::Other(format!("sink {}: connection task stopped", self.name));
        }
        match tokio::time::timeout(self.ack_timeout, rx).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => Outcome::Other("connection task stopped".into()),
            Err(_) => Outcome::Timeout,
        }
    }

    /// Publishes the retained `offline` and disconnects (bounded).
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        }
    }
}

/// What a publish of the connection task stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Status,
    /// An event of batch number `.0`.
    Item(u64),
}

struct Batch {
    /// Number of this batch: a PUBACK of an older one (given up after `ack_timeout_ms`) never
    /// counts for it.
    number: u64,
    total: usize,
    acked: usize,
    reply: oneshot::Sender<Outcome>,
}

struct Link {
    name: String,
    host: String,
    client: AsyncClient,
    eventloop: EventLoop,
    status_topic: Option<String>,
    connected: Arc<std::sync::atomic::AtomicBool>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    connacks: Arc<tokio::sync::Notify>,
}

impl Link {
    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        // Our publishes in the order rumqttc will send them; each Outgoing::Publish names the
        // packet id of the front one.
        let mut queued: VecDeque<Tag> = VecDeque::new();
        let mut by_pkid: HashMap<u16, Tag> = HashMap::new();
        let mut batch: Option<Batch> = None;
        let mut numbers = 0u64;
        let mut backoff = RECONNECT_MIN;
        let mut failing = false;
        let mut closing: Option<oneshot::Sender<()>> = None;
        loop {
            let ev = tokio::select! {
                ev = self.eventloop.poll() => ev,
                // The runner gave up waiting (ack_timeout_ms): the batch is sent again later,
                // and its late PUBACKs never count for another batch.
                () = async {
                    match batch.as_mut() {
                        Some(b) => b.reply.closed().await,
                        None => std::future::pending().await,
                    }
                }, if batch.is_some() => {
                    batch = None;
                    continue;
                }
                cmd = commands.recv(), if batch.is_none() && closing.is_none() => {
                    match cmd {
                        // Asked for, then given up on (ack timeout) before it was read: never sent.
                        Some(Command::Publish { reply, .. }) if reply.is_closed() => {}
                        Some(Command::Publish { reply, .. })
                            if !self.connected.load(std::sync::atomic::Ordering::Acquire) =>
                        {
                            // Between a lost connection and the next CONNACK nothing is queued:
                            // every publish must map to a packet of the connection it goes out on.
                            let _ = reply.send(Outcome::Connect("broker not connected".into()));
                        }
                        Some(Command::Publish { items, reply }) => {
                            numbers += 1;
                            let total = items.len();
                            let mut failed = None;
                            for (topic, payload) in items {
                                if let Err(e) = self.client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                                    failed = Some(e.to_string());
                                    break;
                                }
                                queued.push_back(Tag::Item(numbers));
                            }
                            match failed {
                                Some(e) => {
                                    let _ = reply.send(Outcome::Other(format!("publish: {e}")));
                                }
                                None if total == 0 => {
                                    let _ = reply.send(Outcome::Acked);
                                }
                                None => batch = Some(Batch { number: numbers, total, acked: 0, reply }),
                            }
                        }
                        Some(Command::Close { done }) => {
                            let sent = self.connected.load(std::sync::atomic::Ordering::Acquire)
                                && self.status_topic.as_ref().is_none_or(|t| {
                                    self.client.try_publish(t.clone(), QoS::AtLeastOnce, true, "offline").is_ok()
                                });
                            if sent && self.client.try_disconnect().is_ok() {
                                closing = Some(done);
                            } else {
                                let _ = done.send(());
                                return;
                            }
                        }
                        None => return,
                    }
                    continue;
                }
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = RECONNECT_MIN;
                    if failing {
                        tracing::info!(sink = %self.name, host = %self.host, session_present = ack.session_present, "Upstream broker connected again");
                    } else {
                        tracing::info!(sink = %self.name, host = %self.host, session_present = ack.session_present, "Upstream broker connected");
                    }
                    failing = false;
                    self.set_error(None);
                    self.connected
                        .store(true, std::sync::atomic::Ordering::Release);
                    self.connacks.notify_waiters();
                    if let Some(t) = &self.status_topic
                        && self
                            .client
                            .try_publish(t.clone(), QoS::AtLeastOnce, true, "online")
                            .is_ok()
                    {
                        queued.push_back(Tag::Status);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(tag) = queued.pop_front() {
                        by_pkid.insert(pkid, tag);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(Tag::Item(n)) = by_pkid.remove(&ack.pkid)
                        && let Some(b) = batch.as_mut().filter(|b| b.number == n)
                    {
                        b.acked += 1;
                        if b.acked >= b.total
                            && let Some(b) = batch.take()
                        {
                            let _ = b.reply.send(Outcome::Acked);
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) if closing.is_some() => {
                    if let Some(d) = closing.take() {
                        let _ = d.send(());
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    if closing.is_some() {
                        if let Some(d) = closing.take() {
                            let _ = d.send(());
                        }
                        return;
                    }
                    let msg = e.to_string();
                    if !failing {
                        tracing::warn!(sink = %self.name, host = %self.host, error = %msg,
                            "Upstream broker connection lost or refused; reconnecting (undelivered events stay in the outbox)");
                    }
                    failing = true;
                    self.connected
                        .store(false, std::sync::atomic::Ordering::Release);
                    self.set_error(Some(msg.clone()));
                    // Whatever was not acknowledged is sent again by the runner, in order: drop
                    // rumqttc's own resends so that no PUBACK is ever matched to a stale publish.
                    self.eventloop
                        .pending
                        .retain(|r| !matches!(r, rumqttc::Request::Publish(_)));
                    queued.clear();
                    by_pkid.clear();
                    if let Some(b) = batch.take() {
                        let _ = b.reply.send(Outcome::Connect(format!(
                            "connection lost with {} of {} events acknowledged: {msg}",
                            b.acked, b.total
                        )));
                    }
                    let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                    tokio::select! {
                        _ = tokio::time::sleep(jittered) => {}
                        cmd = commands.recv() => match cmd {
                            Some(Command::Publish { reply, .. }) => {
                                let _ = reply.send(Outcome::Connect(format!("broker not connected: {msg}")));
                            }
                            Some(Command::Close { done }) => {
                                let _ = done.send(());
                                return;
                            }
                            None => return,
                        },
                    }
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(device: &'a str) -> TopicVars<'a> {
        TopicVars {
            gateway_id: "gw-1",
            device_id: device,
            kind: "setpoint",
            plant_id: Some("p"),
            module_id: None,
        }
    }

    #[test]
    fn topic_placeholders_are_filled_and_values_cannot_add_levels_or_wildcards() {
        let t = TopicTemplate::parse("hvac-edge/{gateway_id}/{device_id}/{type}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.render(&vars("living")), "hvac-edge/gw-1/living/setpoint");
        assert_eq!(t.render(&vars("a/b+#c")), "hvac-edge/gw-1/a_b__c/setpoint");
        assert_eq!(t.render(&vars("")), "hvac-edge/gw-1/_/setpoint");
        let t = TopicTemplate::parse("x/{plant_id}/{module_id}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.render(&vars("d")), "x/p/_");
    }

    #[test]
    fn bad_topic_templates_are_refused_with_the_reason() {
        for (t, want) in [
            ("", "empty"),
            ("a/+/b", "wildcards"),
            ("a/#", "wildcards"),
            ("a/{device}", "unknown placeholder {device}"),
            ("a/{device_id", "unclosed"),
            ("a/}b", "unmatched"),
        ] {
            let e = TopicTemplate::parse(t).err().unwrap_or_default();
            assert!(e.contains(want), "{t:?}: {e}");
        }
    }
}
