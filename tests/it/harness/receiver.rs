//! A scripted upstream HTTP receiver on 127.0.0.1 that records everything and verifies the
//! Standard Webhooks signature itself (HMAC-SHA256 computed here, not with the daemon's signer).
//!
//! It answers requests from a script (e.g. 503, 503, then the default 200; 429 with
//! `Retry-After`; 400 with a body), records method, path, headers and raw body of every request,
//! parses bodies `{"gateway": …, "events": […]}` into [`Event`]s, and can be stopped (connection
//! refused) and restarted on the same port to simulate an outage.

use super::wait::wait_until_async;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use hvac_edge::model::Event;
use sha2::Sha256;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// Path the daemon is configured to POST to (see [`Receiver::url`]).
pub const INGEST_PATH: &str = "/ingest";
/// Timestamp tolerance of the Standard Webhooks reference libraries (±5 min).
pub const TOLERANCE_SECS: i64 = 300;
/// How long [`Receiver::stop`] waits for open connections to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One scripted answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: String,
    /// How long to wait before answering (the request is recorded on arrival), e.g. to exceed
    /// the sink's `request_timeout_ms`.
    pub delay: Duration,
}

impl Reply {
    /// `200 OK` with an empty body.
    pub fn ok() -> Reply {
        Reply::status(200)
    }

    /// The given status with no headers and an empty body.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets the response body.
    pub fn body(mut self, body: &str) -> Reply {
        self.body = body.to_string();
        self
    }

    /// Answers only after `delay`.
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// The body the daemon sends.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The gateway id.
    pub gateway: String,
    /// The events, in commit order.
    pub events: Vec<Event>,
}

/// One recorded request and what the receiver made of it.
#[derive(Debug, Clone)]
pub struct Request {
    /// When it arrived (for retry-timing asserts).
    pub at: Instant,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Every header, names lower-case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The raw body bytes.
    pub body: Vec<u8>,
    /// The status the receiver answered.
    pub status: u16,
    /// A `v1` entry of `webhook-signature` matched HMAC-SHA256 over `id.timestamp.body`.
    pub signature_ok: bool,
    /// `webhook-timestamp` was an integer within ±[`TOLERANCE_SECS`] of the receiver's clock.
    pub timestamp_ok: bool,
    /// The parsed body, or why it did not parse.
    pub batch: Result<Batch, String>,
}

impl Request {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the answer was 2xx (the daemon counts the batch as delivered).
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The events of this request (empty when the body did not parse).
    pub fn events(&self) -> &[Event] {
        self.batch
            .as_ref()
            .map(|b| b.events.as_slice())
            .unwrap_or(&[])
    }
}

/// A per-request rule: given the parsed body, an answer that wins over the script.
pub type Rule = Arc<dyn Fn(&Result<Batch, String>) -> Option<Reply> + Send + Sync>;

/// Like [`Rule`], also given the request's headers (lower-case names) and path with query.
pub type RequestRule =
    Arc<dyn Fn(&[(String, String)], &str, &Result<Batch, String>) -> Option<Reply> + Send + Sync>;

struct State {
    script: VecDeque<Reply>,
    default: Reply,
    requests: Vec<Request>,
    rule: Option<Rule>,
    request_rule: Option<RequestRule>,
}

struct Shared {
    key: Vec<u8>,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// A running receiver on 127.0.0.1.
pub struct Receiver {
    addr: SocketAddr,
    whsec: String,
    shared: Arc<Shared>,
    server: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Receiver {
    /// Starts on 127.0.0.1:0 answering `script` in order, then `200 OK` for ever.
    pub async fn start(script: impl IntoIterator<Item = Reply>) -> Receiver {
        Receiver::start_with_default(script, Reply::ok()).await
    }

    /// Starts on 127.0.0.1:0 answering `script` in order, then `default` for ever.
    pub async fn start_with_default(
        script: impl IntoIterator<Item = Reply>,
        default: Reply,
    ) -> Receiver {
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        let whsec = format!("whsec_{}", STANDARD.encode(&key));
        let shared = Arc::new(Shared {
            key,
            state: Mutex::new(State {
                script: script.into_iter().collect(),
                default,
                requests: Vec::new(),
                rule: None,
                request_rule: None,
            }),
        });
        let mut r = Receiver {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            whsec,
            shared,
            server: None,
        };
        r.bind().await;
        r
    }

    async fn bind(&mut self) {
        // Restarting on the same port can race with the old socket's teardown: retry briefly.
        let mut attempt = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) if attempt < 50 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("receiver cannot bind {}: {e}", self.addr),
            }
        };
        self.addr = listener.local_addr().expect("receiver local addr");
        let shared = self.shared.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move {
                    let (delay, response) = handle(&shared, method, uri, headers, body);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    response
                }
            },
        );
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.server = Some((stop_tx, task));
    }

    /// `http://127.0.0.1:<port>/ingest`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}{INGEST_PATH}", self.addr.port())
    }

    /// The bound port (kept across [`Receiver::stop`] / [`Receiver::restart`]).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The signing secret in its `whsec_<base64 of 32 random bytes>` form, for the sink config.
    pub fn whsec(&self) -> &str {
        &self.whsec
    }

    /// Whether the receiver is listening.
    pub fn is_up(&self) -> bool {
        self.server.is_some()
    }

    /// Goes away: stops accepting, closes idle keep-alive connections, lets in-flight requests
    /// finish, then returns; new connections are refused until [`Receiver::restart`].
    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            if tokio::time::timeout(STOP_TIMEOUT, task).await.is_err() {
                panic!(
                    "receiver on {} did not stop within {STOP_TIMEOUT:?}",
                    self.addr
                );
            }
        }
    }

    /// Comes back on the same port.
    pub async fn restart(&mut self) {
        assert!(self.server.is_none(), "restart() of a running receiver");
        self.bind().await;
    }

    /// Appends replies to the script (used before the default again).
    pub fn push_replies(&self, replies: impl IntoIterator<Item = Reply>) {
        self.shared.lock().script.extend(replies);
    }

    /// Answers with `rule(body)` when it returns a reply (before the script); `None` removes it.
    /// E.g. reject every batch holding one event, or answer slowly when a batch is large.
    pub fn set_rule(&self, rule: Option<Rule>) {
        self.shared.lock().rule = rule;
    }

    /// Answers with `rule(headers, path, body)` when it returns a reply (before [`Rule`] and the
    /// script); `None` removes it. E.g. check an `Authorization` header.
    pub fn set_request_rule(&self, rule: Option<RequestRule>) {
        self.shared.lock().request_rule = rule;
    }

    /// Replaces the answer given once the script is used up.
    pub fn set_default(&self, reply: Reply) {
        self.shared.lock().default = reply;
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Number of requests so far.
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Requests whose signature did not verify (or had no signature headers).
    pub fn bad_signatures(&self) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| !r.signature_ok)
            .count()
    }

    /// Every event of every request, whatever the answer was, in arrival order.
    pub fn events(&self) -> Vec<Event> {
        let st = self.shared.lock();
        st.requests
            .iter()
            .flat_map(|r| r.events().iter().cloned())
            .collect()
    }

    /// Events of the requests answered 2xx (what the daemon counts as delivered), in arrival
    /// order, duplicates included.
    pub fn accepted_events(&self) -> Vec<Event> {
        let st = self.shared.lock();
        st.requests
            .iter()
            .filter(|r| r.accepted())
            .flat_map(|r| r.events().iter().cloned())
            .collect()
    }

    /// [`Receiver::accepted_events`] deduplicated by id, in first-arrival order: what an
    /// idempotent receiver stores.
    pub fn unique_events(&self) -> Vec<Event> {
        dedup_by_id(&self.accepted_events())
    }

    /// Waits until at least `n` unique accepted events arrived; returns them.
    pub async fn wait_unique_events(&self, n: usize, timeout: Duration) -> Vec<Event> {
        wait_until_async(
            &format!("{n} unique events at the receiver"),
            timeout,
            || self.unique_events().len() >= n,
        )
        .await;
        self.unique_events()
    }

    /// Waits until an accepted event matches `pred`; returns all unique events at that moment.
    pub async fn wait_event(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Vec<Event> {
        wait_until_async(what, timeout, || self.accepted_events().iter().any(&pred)).await;
        self.unique_events()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            task.abort();
        }
    }
}

fn handle(
    shared: &Shared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (Duration, axum::response::Response) {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let (signature_ok, timestamp_ok) = match (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) {
        (Some(id), Some(ts), Some(sig)) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let ts_ok = ts
                .parse::<i64>()
                .is_ok_and(|t| (t - now).abs() <= TOLERANCE_SECS);
            (verify_signature(&shared.key, id, ts, sig, &body), ts_ok)
        }
        _ => (false, false),
    };
    // A batch `{"gateway","events"}`, or one event alone (a webhook's native body).
    let batch = serde_json::from_slice::<Batch>(&body).or_else(|e| {
        serde_json::from_slice::<Event>(&body)
            .map(|ev| Batch {
                gateway: ev.gateway.clone(),
                events: vec![ev],
            })
            .map_err(|_| e.to_string())
    });
    let path = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |p| p.to_string());
    let header_list: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut st = shared.lock();
    let ruled = st
        .request_rule
        .as_ref()
        .and_then(|r| r(&header_list, &path, &batch))
        .or_else(|| st.rule.as_ref().and_then(|r| r(&batch)));
    let reply = match ruled {
        Some(r) => r,
        None => st.script.pop_front().unwrap_or_else(|| st.default.clone()),
    };
    st.requests.push(Request {
        at: Instant::now(),
        method: method.to_string(),
        path,
        headers: header_list,
        body: body.to_vec(),
        status: reply.status,
        signature_ok,
        timestamp_ok,
        batch,
    });
    drop(st);
    let mut out = HeaderMap::new();
    for (k, v) in &reply.headers {
        out.insert(
            HeaderName::from_bytes(k.as_bytes()).expect("scripted header name"),
            HeaderValue::from_str(v).expect("scripted header value"),
        );
    }
    let status = StatusCode::from_u16(reply.status).expect("scripted status");
    (reply.delay, (status, out, reply.body).into_response())
}

/// Standard Webhooks `v1` check, computed independently of the daemon: base64(HMAC-SHA256(key,
/// `id.timestamp.body`)) compared with every `v1,` entry of the space-separated header.
pub fn verify_signature(key: &[u8], id: &str, timestamp: &str, header: &str, body: &[u8]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    header
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .any(|sig| sig == expected)
}

/// Deduplicates by event id, keeping first arrivals in order.
pub fn dedup_by_id(events: &[Event]) -> Vec<Event> {
    let mut seen = HashSet::new();
    events
        .iter()
        .filter(|e| seen.insert(e.id.clone()))
        .cloned()
        .collect()
}

/// Checks that every repeated id carries exactly the same event as its first arrival
/// (duplicates are allowed only as resends).
pub fn check_duplicates_identical(events: &[Event]) -> Result<(), String> {
    let mut first: HashMap<&str, &Event> = HashMap::new();
    for e in events {
        match first.get(e.id.as_str()) {
            Some(f) if *f != e => {
                return Err(format!(
                    "id {} arrived twice with different content:\n{f:#?}\n{e:#?}",
                    e.id
                ));
            }
            Some(_) => {}
            None => {
                first.insert(&e.id, e);
            }
        }
    }
    Ok(())
}

/// Checks that, per device, `seq` runs 1, 2, …, n in order without gaps or repeats.
pub fn check_seq_gap_free(events: &[Event]) -> Result<(), String> {
    check_seq_continues(events, &HashMap::new())
}

/// Like [`check_seq_gap_free`], but each device in `last` continues from its given seq
/// (devices not in `last` start at 1).
pub fn check_seq_continues(events: &[Event], last: &HashMap<String, u64>) -> Result<(), String> {
    let mut next: HashMap<&str, u64> = HashMap::new();
    for e in events {
        let want = next
            .entry(e.device.as_str())
            .or_insert_with(|| last.get(&e.device).copied().unwrap_or(0) + 1);
        if e.seq != *want {
            return Err(format!(
                "device {}: expected seq {} next, got {} (event {} of type {})",
                e.device, want, e.seq, e.id, e.kind
            ));
        }
        *want += 1;
    }
    Ok(())
}

/// The events of `device`, in the given order.
pub fn of_device<'a>(events: &'a [Event], device: &str) -> Vec<&'a Event> {
    events.iter().filter(|e| e.device == device).collect()
}
