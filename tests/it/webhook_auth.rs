//! Webhook credentials and shapes end to end: Standard Webhooks signatures checked by the
//! reference library while the signing secret is rotated, OAuth2 tokens from a real token
//! endpoint on loopback (cached, refreshed before expiry, renewed once on a 401, a failing
//! endpoint holding the events), API keys and bearer tokens as the receiver sees them (and never
//! in the database), and the filters, URL placeholders, body templates and Smarther C2C body.

// Helpers below panic on a failed expectation like the tests they serve (clippy.toml allows
// unwrap/expect in #[test] functions only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::harness::receiver::verify_signature;
use crate::harness::*;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hvac_edge::model::Event;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The device the daemon files its own `operational` notes under.
const GATEWAY_DEVICE: &str = "@gateway";

/// A Zigbee2MQTT thermostat state: heating, manual (system_mode heat), setpoint and temperature.
fn trv(setpoint: f64, temperature: f64) -> String {
    json!({
        "occupied_heating_setpoint": setpoint,
        "local_temperature": temperature,
        "system_mode": "heat",
    })
    .to_string()
}

/// A fresh Standard Webhooks secret: `whsec_` + base64 of 32 random bytes; also the key bytes.
fn whsec() -> (String, Vec<u8>) {
    let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    (format!("whsec_{}", STANDARD.encode(&key)), key)
}

/// A random lower-case hex string of `n` bytes.
fn hex(n: usize) -> String {
    (0..n)
        .map(|_| format!("{:02x}", fastrand::u8(..)))
        .collect()
}

/// The key bytes of a `whsec_` secret.
fn whsec_key(secret: &str) -> Vec<u8> {
    STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("whsec base64")
}

/// RFC 3986 percent-encoding of everything but the unreserved set (what URL placeholders get).
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The bearer token of an `Authorization` header in a receiver's header list.
fn bearer_of(headers: &[(String, String)]) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .and_then(|(_, v)| v.strip_prefix("Bearer "))
        .map(str::to_string)
}

/// The `webhook-id` a single event is sent with.
fn msg_id(event_id: &str) -> String {
    format!("msg_{event_id}")
}

/// The thermostats' events in the database (not the gateway's own notes), by position.
fn device_rows(db: &Db) -> Vec<crate::harness::db::EventRow> {
    db.events()
        .into_iter()
        .filter(|e| e.device != GATEWAY_DEVICE)
        .collect()
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

/// A read connection of our own for the tables the harness has no reader for.
fn sql(tc: &TestConfig) -> rusqlite::Connection {
    let c = rusqlite::Connection::open_with_flags(
        tc.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .expect("open the daemon's database");
    c.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    c
}

/// One row of `sink_attempts` (a failed attempt).
#[derive(Debug, Clone)]
struct Attempt {
    first_pos: i64,
    status: i64,
    error_kind: String,
    snippet: Option<String>,
}

/// The failed attempts recorded for `sink`, oldest first.
fn attempts(tc: &TestConfig, sink: &str) -> Vec<Attempt> {
    let c = sql(tc);
    let mut st = c
        .prepare(
            "SELECT first_pos, status, error_kind, snippet FROM sink_attempts WHERE sink = ?1 ORDER BY id",
        )
        .expect("prepare sink_attempts");
    st.query_map([sink], |r| {
        Ok(Attempt {
            first_pos: r.get(0)?,
            status: r.get(1)?,
            error_kind: r.get(2)?,
            snippet: r.get(3)?,
        })
    })
    .expect("query sink_attempts")
    .collect::<Result<_, _>>()
    .expect("read sink_attempts")
}

/// Every text and blob value of the tables a technician reads about sinks (`sinks`,
/// `sink_attempts`, `dead_letters`), one per line.
fn sink_tables_text(tc: &TestConfig) -> String {
    let c = sql(tc);
    let mut out = String::new();
    for table in ["sinks", "sink_attempts", "dead_letters"] {
        let mut st = c
            .prepare(&format!("SELECT * FROM {table}"))
            .expect("prepare select *");
        let n = st.column_count();
        let mut rows = st.query([]).expect("select *");
        while let Some(r) = rows.next().expect("next row") {
            for i in 0..n {
                match r.get_ref(i).expect("column") {
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        out.push_str(&String::from_utf8_lossy(t));
                        out.push('\n');
                    }
                    _ => {}
                }
            }
        }
    }
    out
}

/// The raw bytes of the database file and its WAL (old row versions included).
fn db_bytes(tc: &TestConfig) -> Vec<u8> {
    let db = tc.db_path();
    let mut out = std::fs::read(&db).expect("read the database file");
    let mut wal = db.clone().into_os_string();
    wal.push("-wal");
    if let Ok(b) = std::fs::read(Path::new(&wal)) {
        out.extend_from_slice(&b);
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Starts the daemon, waits until the z2m source is subscribed, connects a publisher.
async fn start(tc: &TestConfig, broker: &Mosquitto) -> (Daemon, Publisher) {
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let publisher = Publisher::connect(broker.port()).await;
    (daemon, publisher)
}

/// A broker, a config with a z2m source `z2m` and no checkpoint during the test (so no garbage
/// collection: the `events` table stays whole to compare with).
fn base(sb: &Sandbox, broker: &Mosquitto) -> TestConfig {
    let mut tc = TestConfig::new(sb);
    tc.set("pipeline", "checkpoint_interval_secs", "3600")
        .z2m_source("z2m", broker.port());
    tc
}

// ------------------------------------------------------------------ OAuth2 token endpoint

/// One request the token endpoint received.
#[derive(Debug, Clone)]
struct TokenRequest {
    at: Instant,
    method: String,
    path: String,
    content_type: Option<String>,
    accept: Option<String>,
    authorization: Option<String>,
    form: Vec<(String, String)>,
}

impl TokenRequest {
    fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One access token the endpoint issued.
#[derive(Debug, Clone)]
struct Issued {
    token: String,
    issued: Instant,
    expires: Instant,
    lifetime_secs: u64,
    revoked: bool,
}

struct TokenState {
    /// `expires_in` of the tokens issued from now on.
    expires_in: u64,
    /// Answer every request with this status and JSON body instead of a token.
    failure: Option<(u16, String)>,
    /// A `refresh_token` returned with every token (rotation), if set.
    rotated_refresh_token: Option<String>,
    issued: Vec<Issued>,
    requests: Vec<TokenRequest>,
}

impl TokenState {
    /// Whether `token` was issued here, is not revoked and has not expired at `now`.
    fn valid(&self, token: &str, now: Instant) -> bool {
        self.issued
            .iter()
            .any(|i| i.token == token && !i.revoked && now < i.expires)
    }

    fn find(&self, token: &str) -> Option<&Issued> {
        self.issued.iter().find(|i| i.token == token)
    }
}

/// A real OAuth2 token endpoint on 127.0.0.1:0 (axum), recording every request and token.
struct TokenServer {
    addr: SocketAddr,
    state: Arc<Mutex<TokenState>>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    async fn start(expires_in: u64) -> TokenServer {
        let state = Arc::new(Mutex::new(TokenState {
            expires_in,
            failure: None,
            rotated_refresh_token: None,
            issued: Vec::new(),
            requests: Vec::new(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the token endpoint");
        let addr = listener.local_addr().expect("token endpoint address");
        let shared = state.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move { token_endpoint(&shared, method, uri, headers, body) }
            },
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenServer { addr, state, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/oauth2/token", self.addr.port())
    }

    fn lock(&self) -> MutexGuard<'_, TokenState> {
        lock(&self.state)
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.lock().requests.clone()
    }

    fn issued(&self) -> Vec<Issued> {
        self.lock().issued.clone()
    }

    /// A receiver rule: 401 unless the request carries a currently valid bearer token.
    fn bearer_rule(&self) -> RequestRule {
        let state = self.state.clone();
        Arc::new(move |headers, _path, _batch| {
            let now = Instant::now();
            let ok = bearer_of(headers).is_some_and(|t| lock(&state).valid(&t, now));
            (!ok).then(|| Reply::status(401).body(r#"{"error":"invalid_token"}"#))
        })
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<TokenState>) -> MutexGuard<'_, TokenState> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn token_endpoint(
    state: &Mutex<TokenState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let req = TokenRequest {
        at: Instant::now(),
        method: method.to_string(),
        path: uri.path().to_string(),
        content_type: header("content-type"),
        accept: header("accept"),
        authorization: header("authorization"),
        form: url::form_urlencoded::parse(&body).into_owned().collect(),
    };
    let mut st = lock(state);
    st.requests.push(req);
    let json_type = [(axum::http::header::CONTENT_TYPE, "application/json")];
    if let Some((status, body)) = st.failure.clone() {
        let status = StatusCode::from_u16(status).expect("status");
        return (status, json_type, body).into_response();
    }
    let token = format!("at-{}-{}", st.issued.len() + 1, hex(16));
    let now = Instant::now();
    let lifetime_secs = st.expires_in;
    st.issued.push(Issued {
        token: token.clone(),
        issued: now,
        expires: now + Duration::from_secs(lifetime_secs),
        lifetime_secs,
        revoked: false,
    });
    let mut answer = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": lifetime_secs,
    });
    if let Some(rt) = &st.rotated_refresh_token {
        answer["refresh_token"] = json!(rt);
    }
    (StatusCode::OK, json_type, answer.to_string()).into_response()
}

/// Sets the keys of an OAuth2 webhook sink.
fn oauth2_sink(
    tc: &mut TestConfig,
    name: &str,
    auth: &str,
    tokens: &TokenServer,
    client_id: &str,
    client_secret: &str,
) {
    let secret = tc.secret_file(&format!("{name}.client_secret"), client_secret);
    tc.sink_set(name, "auth", &toml_str(auth))
        .sink_set(name, "token_url", &toml_str(&tokens.url()))
        .sink_set(name, "client_id", &toml_str(client_id))
        .sink_set(
            name,
            "client_secret_file",
            &toml_str(&secret.display().to_string()),
        );
}

// ------------------------------------------------------------------ 1. signatures

/// Verifies every case (base64 body, webhook-* headers) with every secret using the reference
/// library; prints, per case, "ok" or the exception per secret, as JSON.
const VERIFY_ALL: &str = r#"
import sys, json, base64
from standardwebhooks import Webhook
cases = json.load(open(sys.argv[1]))
secrets = json.load(open(sys.argv[2]))
out = []
for c in cases:
    body = base64.b64decode(c["body"]).decode()
    row = []
    for s in secrets:
        try:
            Webhook(s).verify(body, c["headers"])
            row.append("ok")
        except Exception as e:
            row.append(type(e).__name__ + ": " + str(e))
    out.append(row)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_with_the_reference_library_during_a_key_rotation() {
    let sb = Sandbox::new("webhook_rotation");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    // The receiver signs-checks with its own secret: the new one. The old one is ours.
    let new_secret = receiver.whsec().to_string();
    let (old_secret, old_key) = whsec();
    let (unrelated, _) = whsec();
    let mut tc = base(&sb, &broker);
    tc.webhook_sink("hook", &receiver);
    let previous = tc.secret_file("hook.previous.whsec", &old_secret);
    tc.sink_set(
        "hook",
        "signing_secret_previous_file",
        &toml_str(&previous.display().to_string()),
    );
    let (daemon, mut p) = start(&tc, &broker).await;
    let topic = format!("{}/hall", tc.base_topic());
    for (i, sp) in [20.0, 20.5, 21.0, 21.5].into_iter().enumerate() {
        p.publish(&topic, trv(sp, 19.0), false).await;
        receiver.wait_unique_events(i + 1, TIMEOUT).await;
    }
    daemon.stop().await.unwrap();

    let db = Db::open(&tc.db_path());
    let rows = device_rows(&db);
    let requests = receiver.requests();
    assert!(requests.len() >= 4, "{} requests", requests.len());
    let new_key = whsec_key(&new_secret);
    let mut cases = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        assert_eq!(r.events().len(), 1, "request {i}: one event per request");
        let e = &r.events()[0];
        let row = rows
            .iter()
            .find(|row| row.id == e.id)
            .expect("a stored event");
        assert_eq!(
            r.body,
            row.payload.as_bytes(),
            "request {i}: the native body of a single event is its envelope"
        );
        assert_eq!(r.header("webhook-id"), Some(msg_id(&e.id).as_str()));
        assert_eq!(r.header("x-api-version"), Some("1"));
        assert!(r.signature_ok && r.timestamp_ok, "request {i}: {r:?}");
        let sig = r.header("webhook-signature").expect("webhook-signature");
        let entries: Vec<&str> = sig.split(' ').collect();
        assert_eq!(
            entries.len(),
            2,
            "two signatures during a rotation: {sig:?}"
        );
        assert!(entries.iter().all(|s| s.starts_with("v1,")), "{sig:?}");
        let (id, ts) = (
            r.header("webhook-id").unwrap(),
            r.header("webhook-timestamp").unwrap(),
        );
        let by_new: Vec<bool> = entries
            .iter()
            .map(|s| verify_signature(&new_key, id, ts, s, &r.body))
            .collect();
        let by_old: Vec<bool> = entries
            .iter()
            .map(|s| verify_signature(&old_key, id, ts, s, &r.body))
            .collect();
        assert_eq!(
            by_new.iter().filter(|b| **b).count(),
            1,
            "one entry is the new secret's: {sig:?}"
        );
        assert_eq!(
            by_old.iter().filter(|b| **b).count(),
            1,
            "one entry is the old secret's: {sig:?}"
        );
        assert_ne!(by_new, by_old, "two different entries");
        let headers: serde_json::Map<String, Value> = r
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with("webhook-"))
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        cases.push(json!({"headers": headers, "body": STANDARD.encode(&r.body)}));
    }
    let cases_file = sb.path().join("cases.json");
    let secrets_file = sb.path().join("secrets.json");
    std::fs::write(&cases_file, serde_json::to_vec(&cases).unwrap()).unwrap();
    std::fs::write(
        &secrets_file,
        serde_json::to_vec(&json!([old_secret, new_secret, unrelated])).unwrap(),
    )
    .unwrap();
    let out = Command::new(crate::interop::python())
        .args(["-c", VERIFY_ALL])
        .arg(&cases_file)
        .arg(&secrets_file)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "verifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Vec<String>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(results.len(), requests.len());
    for (i, row) in results.iter().enumerate() {
        assert_eq!(row[0], "ok", "request {i} with the old secret");
        assert_eq!(row[1], "ok", "request {i} with the new secret");
        assert!(
            row[2].starts_with("WebhookVerificationError"),
            "request {i} must fail with an unrelated secret: {}",
            row[2]
        );
    }
}

// ------------------------------------------------------------------ 2. OAuth2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_client_credentials_tokens_are_cached_refreshed_before_expiry_and_renewed_once_on_401()
 {
    const CLIENT_ID: &str = "gw-it edge";
    const SCOPE: &str = "events:write thermostats";
    const PERIOD: Duration = Duration::from_millis(100);
    const SPREAD: Duration = Duration::from_secs(5);
    let client_secret = format!("cs:{}/+", hex(12));
    let sb = Sandbox::new("oauth2_cc");
    let broker = Mosquitto::start();
    let tokens = TokenServer::start(2).await;
    let receiver = Receiver::start([]).await;
    receiver.set_request_rule(Some(tokens.bearer_rule()));
    let mut tc = base(&sb, &broker);
    tc.webhook_sink("hook", &receiver);
    oauth2_sink(
        &mut tc,
        "hook",
        "oauth2_client_credentials",
        &tokens,
        CLIENT_ID,
        &client_secret,
    );
    // A retry on the schedule would take >= 8 s (10 s, 20 % jitter): a renewal within the
    // attempt is told apart from it by time.
    tc.sink_set("hook", "scope", &toml_str(SCOPE))
        .sink_set("hook", "token_auth", &toml_str("basic"))
        .sink_set("hook", "retry_schedule_secs", "[10]");
    let (daemon, mut p) = start(&tc, &broker).await;
    let topic = format!("{}/living", tc.base_topic());

    // Phase 1: one event every 100 ms for 5 s, each awaited at the receiver.
    let began = Instant::now();
    let mut n = 0usize;
    while began.elapsed() < SPREAD && n < 200 {
        let sp = if n.is_multiple_of(2) { 20.0 } else { 20.5 };
        p.publish(&topic, trv(sp, 19.0), false).await;
        n += 1;
        receiver.wait_unique_events(n, TIMEOUT).await;
        tokio::time::sleep_until(tokio::time::Instant::from_std(began + PERIOD * n as u32)).await;
    }
    let db = Db::open(&tc.db_path());
    let rows = device_rows(&db);
    assert_eq!(rows.len(), n);
    let unique = receiver.unique_events();
    assert_eq!(
        ids(&unique),
        rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        "every event accepted, by id, in commit order"
    );
    check_duplicates_identical(&receiver.accepted_events()).unwrap();
    let phase1 = receiver.requests();
    let refused: Vec<&Request> = phase1.iter().filter(|r| r.status == 401).collect();
    assert!(
        refused.is_empty(),
        "no request carried an expired or unknown token while the daemon refreshed before expiry: {:?}",
        refused
            .iter()
            .map(|r| (bearer_of(&r.headers), r.at))
            .collect::<Vec<_>>()
    );
    let issued = tokens.issued();
    let token_requests = tokens.requests();
    assert_eq!(token_requests.len(), issued.len());
    assert!(
        issued.len() >= 2,
        "2 s tokens over 5 s need refreshing: {} fetched",
        issued.len()
    );
    assert!(
        issued.len() * 5 <= phase1.len(),
        "tokens are cached: {} fetched for {} requests",
        issued.len(),
        phase1.len()
    );
    // Refreshed before expiry: some token was replaced while it was still valid.
    assert!(
        issued.windows(2).any(|w| w[1].issued < w[0].expires),
        "no token was replaced before it expired: {:?}",
        issued
            .windows(2)
            .map(|w| w[1].issued.duration_since(w[0].issued))
            .collect::<Vec<_>>()
    );
    let used: std::collections::HashSet<String> = phase1
        .iter()
        .filter_map(|r| bearer_of(&r.headers))
        .collect();
    assert!(used.len() >= 2, "requests used {} tokens", used.len());
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!(
            "{}:{}",
            form_enc(CLIENT_ID),
            form_enc(&client_secret)
        ))
    );
    for (i, t) in token_requests.iter().enumerate() {
        assert_eq!(
            (t.method.as_str(), t.path.as_str()),
            ("POST", "/oauth2/token")
        );
        assert_eq!(
            t.content_type.as_deref(),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(t.accept.as_deref(), Some("application/json"));
        assert_eq!(
            t.authorization.as_deref(),
            Some(basic.as_str()),
            "token request {i}: client_secret_basic"
        );
        assert_eq!(t.field("grant_type"), Some("client_credentials"));
        assert_eq!(t.field("scope"), Some(SCOPE));
        assert_eq!(
            (t.field("client_id"), t.field("client_secret")),
            (None, None),
            "basic auth puts no credentials in the body"
        );
    }

    // Phase 2: long-lived tokens from now on; wait until the daemon uses one, then revoke it.
    tokens.lock().expires_in = 3600;
    let mut long = None;
    for _ in 0..100 {
        let sp = if n.is_multiple_of(2) { 20.0 } else { 20.5 };
        p.publish(&topic, trv(sp, 19.0), false).await;
        n += 1;
        receiver.wait_unique_events(n, TIMEOUT).await;
        let last = receiver
            .requests()
            .into_iter()
            .rev()
            .find(|r| r.accepted())
            .and_then(|r| bearer_of(&r.headers));
        long = last.filter(|t| {
            tokens
                .lock()
                .find(t)
                .is_some_and(|i| i.lifetime_secs == 3600)
        });
        if long.is_some() {
            break;
        }
        tokio::time::sleep(PERIOD).await;
    }
    let old = long.expect("the daemon took a long-lived token within 100 events");
    let fetched_before = tokens.issued().len();
    for i in &mut tokens.lock().issued {
        i.revoked = true;
    }
    let seen = receiver.request_count();
    p.publish(&topic, trv(22.0, 19.0), false).await;
    n += 1;
    let unique = receiver.wait_unique_events(n, TIMEOUT).await;
    let event = unique.last().unwrap().clone();
    assert_eq!(event.current["value"], "22.0");
    let after: Vec<Request> = receiver.requests().split_off(seen);
    assert_eq!(
        after.len(),
        2,
        "one refusal, one success: {:?}",
        after
            .iter()
            .map(|r| (r.status, bearer_of(&r.headers)))
            .collect::<Vec<_>>()
    );
    let (refusal, success) = (&after[0], &after[1]);
    assert_eq!(refusal.status, 401);
    assert_eq!(bearer_of(&refusal.headers).as_deref(), Some(old.as_str()));
    assert_eq!(success.status, 200);
    let issued = tokens.issued();
    assert_eq!(
        issued.len(),
        fetched_before + 1,
        "exactly one new token after the 401"
    );
    let fresh = issued.last().unwrap();
    assert_eq!(
        bearer_of(&success.headers).as_deref(),
        Some(fresh.token.as_str())
    );
    assert!(fresh.issued > refusal.at && fresh.issued < success.at);
    for r in [refusal, success] {
        assert_eq!(r.events().len(), 1);
        assert_eq!(r.events()[0].id, event.id);
        assert_eq!(r.header("webhook-id"), Some(msg_id(&event.id).as_str()));
    }
    assert_eq!(refusal.body, success.body);
    assert!(
        success.at.duration_since(refusal.at) < Duration::from_secs(5),
        "renewed within the attempt, not on the 10 s retry schedule: {:?}",
        success.at.duration_since(refusal.at)
    );
    daemon.stop().await.unwrap();
    let pos = device_rows(&db)
        .iter()
        .find(|r| r.id == event.id)
        .unwrap()
        .pos;
    assert!(
        attempts(&tc, "hook").iter().all(|a| a.first_pos != pos),
        "the 401 renewed within one attempt: no failed attempt recorded: {:?}",
        attempts(&tc, "hook")
    );
    let sink = db.sink("hook").expect("sink row");
    assert_eq!(
        (sink.consecutive_failures, sink.last_status, sink.last_error),
        (0, Some(200), None)
    );
    assert_eq!(sink.delivered, n as i64);
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    assert!(
        !sink_tables_text(&tc).contains(&client_secret),
        "the client secret is never stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_refresh_token_flow_sends_the_refresh_token() {
    const CLIENT_ID: &str = "gw-it";
    let refresh_token = format!("rt-{}", hex(16));
    let client_secret = format!("cs-{}", hex(8));
    let sb = Sandbox::new("oauth2_rt");
    let broker = Mosquitto::start();
    let tokens = TokenServer::start(3600).await;
    let receiver = Receiver::start([]).await;
    receiver.set_request_rule(Some(tokens.bearer_rule()));
    let mut tc = base(&sb, &broker);
    tc.webhook_sink("hook", &receiver);
    oauth2_sink(
        &mut tc,
        "hook",
        "oauth2_refresh_token",
        &tokens,
        CLIENT_ID,
        &client_secret,
    );
    let rt_file = tc.secret_file("hook.refresh_token", &refresh_token);
    tc.sink_set(
        "hook",
        "refresh_token_file",
        &toml_str(&rt_file.display().to_string()),
    );
    // The endpoint rotates the refresh token with every access token.
    let rotated = format!("rt-rotated-{}", hex(16));
    tokens.lock().rotated_refresh_token = Some(rotated.clone());
    let (daemon, mut p) = start(&tc, &broker).await;
    let topic = format!("{}/office", tc.base_topic());
    p.publish(&topic, trv(20.0, 19.0), false).await;
    receiver.wait_unique_events(1, TIMEOUT).await;
    p.publish(&topic, trv(21.0, 19.0), false).await;
    receiver.wait_unique_events(2, TIMEOUT).await;
    let requests = tokens.requests();
    assert_eq!(requests.len(), 1, "one token serves both events");
    let t = &requests[0];
    assert_eq!(t.field("grant_type"), Some("refresh_token"));
    assert_eq!(t.field("refresh_token"), Some(refresh_token.as_str()));
    assert_eq!(t.field("client_id"), Some(CLIENT_ID));
    assert_eq!(t.field("client_secret"), Some(client_secret.as_str()));
    assert_eq!(t.field("scope"), None, "no scope configured");
    assert_eq!(t.authorization, None, "client_secret_post: no Basic header");
    let first = tokens.issued()[0].token.clone();
    for r in receiver.requests() {
        assert_eq!(r.status, 200);
        assert_eq!(bearer_of(&r.headers).as_deref(), Some(first.as_str()));
    }

    // The access token is revoked: the 401 makes the daemon ask again, with the rotated token.
    for i in &mut tokens.lock().issued {
        i.revoked = true;
    }
    p.publish(&topic, trv(21.5, 19.0), false).await;
    receiver.wait_unique_events(3, TIMEOUT).await;
    daemon.stop().await.unwrap();
    let requests = tokens.requests();
    assert_eq!(requests.len(), 2, "one new token after the 401");
    assert_eq!(requests[1].field("grant_type"), Some("refresh_token"));
    assert_eq!(
        requests[1].field("refresh_token"),
        Some(rotated.as_str()),
        "the rotated refresh token replaces the configured one"
    );
    let second = tokens.issued()[1].token.clone();
    let statuses: Vec<(u16, Option<String>)> = receiver.requests()[2..]
        .iter()
        .map(|r| (r.status, bearer_of(&r.headers)))
        .collect();
    assert_eq!(
        statuses,
        vec![(401, Some(first.clone())), (200, Some(second.clone()))]
    );
    let text = sink_tables_text(&tc);
    for secret in [&refresh_token, &rotated, &first, &second, &client_secret] {
        assert!(
            !text.contains(secret.as_str()),
            "{secret:?} in the sink tables"
        );
    }
}

// ------------------------------------------------------------------ 3. token endpoint down

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_fails_holds_the_events_and_reports_it_in_the_sink_status() {
    let client_secret = format!("cs-{}", hex(12));
    let sb = Sandbox::new("oauth2_down");
    let broker = Mosquitto::start();
    let tokens = TokenServer::start(3600).await;
    tokens.lock().failure = Some((400, r#"{"error":"invalid_client"}"#.to_string()));
    let receiver = Receiver::start([]).await;
    receiver.set_request_rule(Some(tokens.bearer_rule()));
    let mut tc = base(&sb, &broker);
    tc.webhook_sink("hook", &receiver);
    oauth2_sink(
        &mut tc,
        "hook",
        "oauth2_client_credentials",
        &tokens,
        "gw-it",
        &client_secret,
    );
    let (daemon, mut p) = start(&tc, &broker).await;
    let topic = format!("{}/bath", tc.base_topic());
    for sp in [20.0, 20.5, 21.0] {
        p.publish(&topic, trv(sp, 19.0), false).await;
    }
    let db = Db::open(&tc.db_path());
    wait_until_async("3 committed events", TIMEOUT, || {
        device_rows(&db).len() == 3
    })
    .await;
    // The sink row is saved after the attempt row: 3 failures there means 3 attempts recorded.
    wait_until_async("3 failures in the sink row", TIMEOUT, || {
        db.sink("hook").is_some_and(|s| s.consecutive_failures >= 3)
    })
    .await;
    let rows = device_rows(&db);
    assert_eq!(receiver.request_count(), 0, "no token, no request");
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    let sink = db.sink("hook").expect("sink row");
    assert_eq!(sink.cursor, 0, "nothing skipped: {sink:?}");
    assert!(sink.consecutive_failures >= 3, "{sink:?}");
    let err = sink.last_error.clone().unwrap_or_default();
    assert!(err.contains("invalid_client"), "last_error: {err:?}");
    assert!(!err.contains(&client_secret));
    for a in attempts(&tc, "hook") {
        assert_eq!(a.error_kind, "auth", "{a:?}");
        assert_eq!(a.status, 0, "no HTTP answer from the webhook: {a:?}");
        assert_eq!(a.first_pos, rows[0].pos, "held from the first event: {a:?}");
        assert!(
            a.snippet
                .as_deref()
                .is_some_and(|s| s.contains("invalid_client")),
            "{a:?}"
        );
    }
    let asked = tokens.requests();
    assert!(
        asked.len() >= 3,
        "each attempt asks the endpoint again: {}",
        asked.len()
    );
    // On the retry schedule (1 s, 20 % jitter), not in a loop.
    for w in asked.windows(2) {
        let gap = w[1].at.duration_since(w[0].at);
        assert!(
            gap >= Duration::from_millis(700),
            "token requests {gap:?} apart"
        );
    }

    // The endpoint recovers: everything held is delivered, in order.
    tokens.lock().failure = None;
    let unique = receiver.wait_unique_events(3, TIMEOUT).await;
    assert_eq!(
        ids(&unique),
        rows.iter().map(|r| r.id.clone()).collect::<Vec<_>>()
    );
    check_seq_gap_free(&unique).unwrap();
    check_duplicates_identical(&receiver.accepted_events()).unwrap();
    daemon.stop().await.unwrap();
    let sink = db.sink("hook").expect("sink row");
    assert_eq!(
        (sink.cursor, sink.delivered, sink.consecutive_failures),
        (rows[2].pos, 3, 0)
    );
    assert_eq!(sink.last_error, None);
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    assert!(!sink_tables_text(&tc).contains(&client_secret));
}

// ------------------------------------------------------------------ 4. API keys and bearer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_in_a_header_or_query_and_bearer_tokens_reach_the_receiver() {
    let header_key = format!("hk-{}", hex(16));
    let query_key = format!("qk-{}+/=&%", hex(16));
    let bearer = format!("bt-{}.{}", hex(12), hex(12));
    let sb = Sandbox::new("webhook_keys");
    let broker = Mosquitto::start();
    // Each receiver refuses the first request it gets, so each sink records a failure.
    let refuse = || [Reply::status(401).body("credential refused")];
    let r_hdr = Receiver::start(refuse()).await;
    let mut r_qry = Receiver::start(refuse()).await;
    let r_bear = Receiver::start(refuse()).await;
    let mut tc = base(&sb, &broker);
    tc.webhook_sink("hdr", &r_hdr)
        .webhook_sink("qry", &r_qry)
        .webhook_sink("bear", &r_bear);
    let f = tc.secret_file("hdr.key", &header_key);
    tc.sink_set("hdr", "auth", &toml_str("api_key"))
        .sink_set(
            "hdr",
            "api_key_header",
            &toml_str("Ocp-Apim-Subscription-Key"),
        )
        .sink_set("hdr", "api_key_file", &toml_str(&f.display().to_string()));
    let f = tc.secret_file("qry.key", &query_key);
    tc.sink_set("qry", "auth", &toml_str("api_key"))
        .sink_set("qry", "api_key_query", &toml_str("key"))
        .sink_set("qry", "api_key_file", &toml_str(&f.display().to_string()));
    let f = tc.secret_file("bear.token", &bearer);
    tc.sink_set("bear", "auth", &toml_str("bearer")).sink_set(
        "bear",
        "bearer_token_file",
        &toml_str(&f.display().to_string()),
    );
    // The query-key receiver is down at first: a connection error must not show the URL's key.
    r_qry.stop().await;
    let (daemon, mut p) = start(&tc, &broker).await;
    let topic = format!("{}/den", tc.base_topic());
    p.publish(&topic, trv(20.0, 19.0), false).await;
    let db = Db::open(&tc.db_path());
    // The attempt row is written before the sink row: wait for both.
    let err = wait_for_async("a connection error recorded for qry", TIMEOUT, || {
        let err = db.sink("qry").and_then(|s| s.last_error)?;
        (err.starts_with("connect")
            && attempts(&tc, "qry")
                .iter()
                .any(|a| a.error_kind == "connect"))
        .then_some(err)
    })
    .await;
    assert!(
        !err.contains(&query_key) && !err.contains(&form_enc(&query_key)),
        "{err:?}"
    );
    r_qry.restart().await;
    for r in [&r_hdr, &r_qry, &r_bear] {
        r.wait_unique_events(1, TIMEOUT).await;
    }
    p.publish(&topic, trv(21.0, 19.0), false).await;
    for r in [&r_hdr, &r_qry, &r_bear] {
        r.wait_unique_events(2, TIMEOUT).await;
    }
    daemon.stop().await.unwrap();

    let expected_query = format!("/ingest?key={}", form_enc(&query_key));
    let auth_headers = ["authorization", "ocp-apim-subscription-key"];
    let seen = |r: &Receiver| -> Vec<(String, Option<String>, Option<String>)> {
        r.requests()
            .iter()
            .map(|q| {
                (
                    q.path.clone(),
                    q.header(auth_headers[0]).map(str::to_string),
                    q.header(auth_headers[1]).map(str::to_string),
                )
            })
            .collect()
    };
    for (name, r, want) in [
        (
            "hdr",
            &r_hdr,
            ("/ingest".to_string(), None, Some(header_key.clone())),
        ),
        ("qry", &r_qry, (expected_query.clone(), None, None)),
        (
            "bear",
            &r_bear,
            (
                "/ingest".to_string(),
                Some(format!("Bearer {bearer}")),
                None,
            ),
        ),
    ] {
        let got = seen(r);
        assert!(
            got.len() >= 3,
            "{name}: refused once, then two events: {got:?}"
        );
        assert!(got.iter().all(|g| *g == want), "{name}: {got:?}");
        assert_eq!(r.requests()[0].status, 401, "{name}");
        assert!(r.requests().iter().all(|q| q.signature_ok), "{name}");
        assert_eq!(r.unique_events().len(), 2, "{name}");
    }
    let url = url::Url::parse(&format!("http://h{expected_query}")).unwrap();
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert_eq!(pairs, vec![("key".to_string(), query_key.clone())]);
    for name in ["hdr", "qry", "bear"] {
        let a = attempts(&tc, name);
        assert!(
            a.iter()
                .any(|a| a.status == 401 && a.snippet.as_deref() == Some("credential refused")),
            "{name}: {a:?}"
        );
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
    let text = sink_tables_text(&tc);
    let raw = db_bytes(&tc);
    for secret in [
        header_key.clone(),
        query_key.clone(),
        form_enc(&query_key),
        bearer.clone(),
    ] {
        assert!(!text.contains(&secret), "{secret:?} in the sink tables");
        assert!(
            !contains(&raw, secret.as_bytes()),
            "{secret:?} somewhere in the database file"
        );
    }
}

// ------------------------------------------------------------------ 5. filters and shapes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_templates_deliver_exactly_the_matching_events_with_placeholders_encoded() {
    // Zigbee2MQTT friendly names may hold spaces, '/', '?', '&', '=', '%' and non-ASCII (not the
    // MQTT wildcards '+' and '#'); the whole topic after `<base>/` is the device id.
    const D1: &str = "Salon 1/TRV?x=1&y=%41é";
    const D2: &str = "kitchen"; // in the plant, not in `devices`
    const D3: &str = "bedroom"; // in `devices`, another plant
    const D4: &str = "hall"; // in `devices`, no plant
    const D5: &str = "Büro (2)"; // in `devices` and the plant
    const P1: &str = "plant A&B/1";
    const P2: &str = "plant-2";
    let module = |d: &str| match d {
        D1 => "module-1",
        D2 => "module-2",
        D3 => "module-3",
        _ => "module-5",
    };
    let devices = [D1, D2, D3, D4, D5];
    let wanted_devices = [D1, D3, D4, D5];
    // (setpoint, temperature) per step: snapshot, setpoint, temperature, setpoint, temperature,
    // setpoint.
    let steps = [
        (20.0, 19.0),
        (21.5, 19.0),
        (21.5, 19.6),
        (22.0, 19.6),
        (22.0, 20.4),
        (21.0, 20.4),
    ];

    let sb = Sandbox::new("webhook_filters");
    let broker = Mosquitto::start();
    let r_tpl = Receiver::start([]).await;
    let r_c2c = Receiver::start([]).await;
    let mut tc = base(&sb, &broker);
    let toml_list = |v: &[&str]| {
        format!(
            "[{}]",
            v.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ")
        )
    };
    for (name, r) in [("tpl", &r_tpl), ("c2c", &r_c2c)] {
        tc.webhook_sink(name, r)
            .sink_set(name, "types", &toml_list(&["setpoint"]))
            .sink_set(name, "devices", &toml_list(&wanted_devices))
            .sink_set(name, "plants", &toml_list(&[P1]));
    }
    let url = format!(
        "http://127.0.0.1:{}/h/{{plant_id}}/{{device_id}}?t={{type}}&e={{event_id}}",
        r_tpl.port()
    );
    tc.sink_set("tpl", "url", &toml_str(&url))
        .sink_set("tpl", "format", &toml_str("template"))
        .sink_set(
            "tpl",
            "body",
            &toml_str(r#"{"dev":"{device_id}","seq":{seq},"e":{event}}"#),
        )
        .sink_set("c2c", "format", &toml_str("smarther_c2c"));
    for (d, plant) in [(D1, P1), (D2, P1), (D3, P2), (D5, P1)] {
        tc.raw(&format!(
            "[[devices]]\nid = {}\nplant = {}\nmodule = {}",
            toml_str(d),
            toml_str(plant),
            toml_str(module(d))
        ));
    }
    let (daemon, mut p) = start(&tc, &broker).await;
    for (sp, t) in steps {
        for d in devices {
            p.publish(&format!("{}/{d}", tc.base_topic()), trv(sp, t), false)
                .await;
        }
    }
    let db = Db::open(&tc.db_path());
    let total = devices.len() * steps.len();
    wait_until_async(&format!("{total} committed events"), TIMEOUT, || {
        device_rows(&db).len() == total
    })
    .await;
    let rows = device_rows(&db);
    let stored: Vec<Event> = rows
        .iter()
        .map(|r| serde_json::from_str(&r.payload).unwrap())
        .collect();
    // The same filter over the database: setpoint events of a listed device in plant P1.
    let matching: Vec<(usize, &Event)> = stored
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            e.kind == "setpoint"
                && wanted_devices.contains(&e.device.as_str())
                && e.plant.as_deref() == Some(P1)
        })
        .collect();
    let want_ids: Vec<String> = matching.iter().map(|(_, e)| e.id.clone()).collect();
    assert_eq!(want_ids.len(), 6, "3 setpoint changes of D1 and of D5");
    // Every rule of the filter turned something away.
    for (what, excluded) in [
        (
            "type",
            stored
                .iter()
                .any(|e| e.device == D1 && e.kind != "setpoint"),
        ),
        (
            "device",
            stored
                .iter()
                .any(|e| e.device == D2 && e.kind == "setpoint"),
        ),
        (
            "plant",
            stored
                .iter()
                .any(|e| e.device == D3 && e.kind == "setpoint"),
        ),
        (
            "no plant",
            stored
                .iter()
                .any(|e| e.device == D4 && e.kind == "setpoint"),
        ),
    ] {
        assert!(excluded, "the {what} filter has something to exclude");
    }

    // Template webhook: event ids from the `e=` query parameter.
    let tpl_id = |r: &Request| -> Option<String> {
        url::Url::parse(&format!("http://h{}", r.path))
            .ok()?
            .query_pairs()
            .find(|(k, _)| k == "e")
            .map(|(_, v)| v.into_owned())
    };
    let c2c_id = |r: &Request| -> Option<String> {
        r.header("webhook-id")
            .and_then(|h| h.strip_prefix("msg_"))
            .map(str::to_string)
    };
    let unique_ids = |r: &Receiver, id: &dyn Fn(&Request) -> Option<String>| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for q in r.requests().iter().filter(|q| q.accepted()) {
            let i = id(q).expect("an event id in every request");
            if !out.contains(&i) {
                out.push(i);
            }
        }
        out
    };
    wait_until_async("the matching events at both receivers", TIMEOUT, || {
        unique_ids(&r_tpl, &tpl_id).len() >= want_ids.len()
            && unique_ids(&r_c2c, &c2c_id).len() >= want_ids.len()
    })
    .await;
    // Both sinks have passed over everything committed (nothing further is on its way).
    let last = rows.last().unwrap().pos;
    wait_until_async("both cursors at the last event", TIMEOUT, || {
        ["tpl", "c2c"]
            .iter()
            .all(|s| db.sink(s).is_some_and(|r| r.cursor >= last))
    })
    .await;
    daemon.stop().await.unwrap();
    assert_eq!(
        unique_ids(&r_tpl, &tpl_id),
        want_ids,
        "template: exactly the matching events, in order"
    );
    assert_eq!(
        unique_ids(&r_c2c, &c2c_id),
        want_ids,
        "smarther_c2c: exactly the matching events, in order"
    );

    for q in r_tpl.requests() {
        let id = tpl_id(&q).unwrap();
        let (i, e) = matching.iter().find(|(_, e)| e.id == id).unwrap();
        let row = &rows[*i];
        assert_eq!(q.method, "POST");
        assert_eq!(
            q.path,
            format!(
                "/h/{}/{}?t=setpoint&e={}",
                pct(P1),
                pct(&e.device),
                pct(&e.id)
            )
        );
        if e.device == D1 {
            assert!(
                q.path.starts_with(
                    "/h/plant%20A%26B%2F1/Salon%201%2FTRV%3Fx%3D1%26y%3D%2541%C3%A9?t=setpoint&e="
                ),
                "{}",
                q.path
            );
        }
        let body = format!(
            r#"{{"dev":{},"seq":{},"e":{}}}"#,
            serde_json::to_string(&e.device).unwrap(),
            e.seq,
            row.payload
        );
        assert_eq!(
            String::from_utf8_lossy(&q.body),
            body,
            "exact template body"
        );
        let v: Value = serde_json::from_slice(&q.body).unwrap();
        assert_eq!(v["dev"], e.device.as_str());
        assert_eq!(v["seq"], e.seq);
        assert_eq!(v["e"], serde_json::from_str::<Value>(&row.payload).unwrap());
        assert_eq!(q.header("webhook-id"), Some(msg_id(&e.id).as_str()));
        assert!(q.signature_ok, "{q:?}");
    }

    // Smarther C2C: field by field against what was published and configured.
    let secs = |rfc: &str| format!("{}Z", &rfc[..19]);
    for q in r_c2c.requests() {
        let id = c2c_id(&q).unwrap();
        let (_, e) = matching.iter().find(|(_, e)| e.id == id).unwrap();
        assert_eq!(q.path, "/ingest");
        assert!(q.signature_ok, "{q:?}");
        let v: Value = serde_json::from_slice(&q.body).unwrap();
        let list = v["data"]["chronothermostats"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{v}");
        // Seq 2, 4, 6 of a device are the setpoint steps 1, 3, 5.
        let (sp, t) = steps[usize::try_from(e.seq).unwrap() - 1];
        let sp = format!("{sp:.1}");
        let t = format!("{t:.1}");
        assert_eq!(
            e.current["value"],
            sp.as_str(),
            "the event is the published setpoint"
        );
        let temp = e.state.temperature.as_ref().unwrap();
        let want = json!({
            "function": "HEATING",
            "mode": "MANUAL",
            "setPoint": {"value": sp, "unit": "C"},
            "temperatureFormat": "C",
            "time": secs(&e.observed_at),
            "thermometer": {"measures": [{
                "timeStamp": secs(&hvac_edge::model::format_rfc3339_ms(temp.time)),
                "value": t,
                "unit": "C",
            }]},
            "sender": {
                "addressType": "AddressLocation",
                "system": "thermoregulation",
                "plant": {"id": P1, "module": {"id": module(&e.device)}},
            },
        });
        assert_eq!(
            list[0], want,
            "chronothermostat of {} seq {}",
            e.device, e.seq
        );
        assert_eq!(list[0]["setPoint"]["value"], sp.as_str());
        assert_eq!(list[0]["thermometer"]["measures"][0]["value"], t.as_str());
    }
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
}
