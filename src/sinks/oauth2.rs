//! OAuth2 access tokens for webhook sinks (`auth = "oauth2_client_credentials"` or
//! `"oauth2_refresh_token"`): fetched from the token endpoint (RFC 6749 §4.4 client credentials,
//! §6 refresh token), cached until shortly before they expire, shared by concurrent requests and
//! dropped after a 401 so that the next request carries a fresh one.
//!
//! No secret (client secret, refresh token, access token) ever reaches an error, a log line or
//! `Debug` output; text echoed by the token endpoint is scrubbed of them before it is shown.

use crate::sinks::delivery::snippet;
use base64::Engine as _;
use serde_json::Value;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Largest token endpoint response read: a token response is a few hundred bytes, so anything
/// near this is not one (and must not fill a gateway's memory).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Lifetime assumed for a token whose response has no usable `expires_in` (RFC 6749 §5.1 leaves
/// it optional). Short enough that a server which expires tokens silently costs few 401s, long
/// enough not to hammer the endpoint; a 401 before then still refreshes through `invalidate`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// Longest lifetime believed: keeps `Instant` arithmetic far from overflow whatever the server
/// claims.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Upper bound of the refresh margin: a token is replaced this long before it expires at most.
const MAX_MARGIN: Duration = Duration::from_secs(60);

/// Longest `error` code shown, in bytes.
const MAX_ERROR_CODE: usize = 64;

/// Longest `error_description` (or other response text) shown, in bytes.
const MAX_DESCRIPTION: usize = 200;

/// Longest `token_type` shown in the error refusing it, in bytes.
const MAX_TOKEN_TYPE: usize = 32;

/// Longest content type shown in the error refusing a non-JSON response, in bytes.
const MAX_CONTENT_TYPE: usize = 64;

/// Shown instead of a secret the token endpoint echoed back.
const REDACTED: &str = "[redacted]";

/// The grant used to obtain access tokens.
#[derive(Clone, PartialEq, Eq)]
pub enum Flow {
    /// RFC 6749 §4.4: the client's own credentials buy the token.
    ClientCredentials,
    /// RFC 6749 §6: a long-lived refresh token (issued to the gateway once, out of band) buys
    /// the token. A rotated refresh token replaces it in memory only: after a restart the
    /// configured one is used again.
    RefreshToken { refresh_token: String },
}

impl fmt::Debug for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Flow::ClientCredentials => f.write_str("ClientCredentials"),
            Flow::RefreshToken { .. } => f
                .debug_struct("RefreshToken")
                .field("refresh_token", &REDACTED)
                .finish(),
        }
    }
}

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (`client_secret_post`); the default
    /// because most IoT clouds accept it.
    #[default]
    Post,
    /// HTTP Basic with the form-urlencoded id and secret (`client_secret_basic`).
    Basic,
}

/// A token source's configuration, secrets already resolved.
#[derive(Clone)]
pub struct Settings {
    /// The token endpoint.
    pub token_url: url::Url,
    /// `client_id`.
    pub client_id: String,
    /// `client_secret`; `None` for a public client.
    pub client_secret: Option<String>,
    /// `scope` requested, space-separated; sent with either grant when set.
    pub scope: Option<String>,
    /// The grant.
    pub flow: Flow,
    /// Where the client credentials go.
    pub client_auth: ClientAuth,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("token_url", &display_url(&self.token_url))
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| REDACTED),
            )
            .field("scope", &self.scope)
            .field("flow", &self.flow)
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

/// Why no access token could be obtained. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The endpoint refused: its status and the RFC 6749 §5.2 `error` (`error_description`),
    /// or a scrubbed prefix of its body.
    #[error("token endpoint answered {status}: {detail}")]
    Status { status: u16, detail: String },
    /// No connection (refused, DNS, TLS handshake).
    #[error("token endpoint: connect: {0}")]
    Connect(String),
    /// No (complete) answer within the client's timeout.
    #[error("token endpoint: timeout")]
    Timeout,
    /// Another transport failure.
    #[error("token endpoint: {0}")]
    Request(String),
    /// The response is larger than any token response.
    #[error("token endpoint: response larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    /// A success status but no JSON object; holds the response's content type, never its body
    /// (a form-encoded success response would show the token).
    #[error("token endpoint: response is not a JSON object (content-type {0:?})")]
    NotJson(String),
    /// A JSON object without a string `access_token`.
    #[error("token endpoint: response without access_token")]
    NoAccessToken,
    /// An `access_token` that cannot travel in an `Authorization` header.
    #[error("token endpoint: access_token is not usable in an Authorization header")]
    UnusableToken,
    /// A token type other than Bearer (e.g. `mac`, `DPoP`), which this client cannot use.
    #[error("token endpoint: unsupported token_type {0:?} (only Bearer is supported)")]
    TokenType(String),
    /// The client id or secret cannot be sent (e.g. HTTP Basic of an unusable value).
    #[error("token endpoint: {0}")]
    Client(String),
}

/// A token in the cache.
struct Cached {
    token: String,
    /// Past this instant the token is replaced before use.
    refresh_at: Instant,
    /// Until this instant the token still serves when its replacement cannot be fetched.
    expires_at: Instant,
    /// The fetch that produced it (see [`TokenSource::token`]).
    generation: u64,
}

/// What the single-flight lock guards.
struct State {
    cached: Option<Cached>,
    /// The last fetch failure and its generation, shared with the callers that waited for it.
    failure: Option<(u64, TokenError)>,
    /// The refresh token to use next (the configured one, or the last rotated one).
    refresh_token: Option<String>,
}

impl State {
    /// The cached token if it has not expired yet (even if it is due for replacement).
    fn unexpired(&self) -> Option<String> {
        self.cached
            .as_ref()
            .filter(|c| Instant::now() < c.expires_at)
            .map(|c| c.token.clone())
    }
}

/// A successful token response.
struct Fetched {
    access_token: String,
    lifetime: Option<Duration>,
    refresh_token: Option<String>,
}

/// A sink's access tokens: cached, refreshed before expiry, one fetch at a time.
pub struct TokenSource {
    settings: Settings,
    client: reqwest::Client,
    state: tokio::sync::Mutex<State>,
    /// Fetch attempts completed, successful or not (changed only under `state`).
    completed: AtomicU64,
    fetches: AtomicU64,
    /// Readable without awaiting the fetch lock (sink status).
    last_error: std::sync::Mutex<Option<String>>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cached = match self.state.try_lock() {
            Ok(s) => match &s.cached {
                Some(c) => format!(
                    "{REDACTED}, refresh in {:?}",
                    c.refresh_at.saturating_duration_since(Instant::now())
                ),
                None => "none".to_string(),
            },
            Err(_) => "(fetch in progress)".to_string(),
        };
        f.debug_struct("TokenSource")
            .field("settings", &self.settings)
            .field("cached", &cached)
            .field("fetches", &self.fetches())
            .field("last_error", &self.last_error())
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A source using `client` for the token endpoint (its timeouts and TLS settings apply).
    pub fn new(settings: Settings, client: reqwest::Client) -> TokenSource {
        let refresh_token = match &settings.flow {
            Flow::ClientCredentials => None,
            Flow::RefreshToken { refresh_token } => Some(refresh_token.clone()),
        };
        TokenSource {
            settings,
            client,
            state: tokio::sync::Mutex::new(State {
                cached: None,
                failure: None,
                refresh_token,
            }),
            completed: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            last_error: std::sync::Mutex::new(None),
        }
    }

    /// The cached token, fetched anew when none is cached or it expires within the refresh
    /// margin: min(60 s, a tenth of its lifetime), the lifetime counted from when the request was
    /// sent. A response without a usable `expires_in` is taken to live 300 s. When the early
    /// refresh fails, the old token is returned while it has not expired (the error is still
    /// recorded in [`last_error`](Self::last_error)).
    ///
    /// Concurrent callers share one fetch: whoever waited for the lock while a fetch ran takes
    /// its result, token or error, instead of starting another one.
    ///
    /// # Errors
    /// [`TokenError`] when the token endpoint gives no usable token.
    pub async fn token(&self) -> Result<String, TokenError> {
        // Read before queueing on the lock: any fetch completed after this is one we waited for.
        let seen = self.completed.load(Ordering::SeqCst);
        let mut state = self.state.lock().await;
        if let Some(c) = &state.cached
            && (c.generation > seen || Instant::now() < c.refresh_at)
        {
            return Ok(c.token.clone());
        }
        if let Some((generation, e)) = &state.failure
            && *generation > seen
        {
            return state.unexpired().ok_or_else(|| e.clone());
        }
        let sent_at = Instant::now();
        let result = self.fetch(state.refresh_token.as_deref()).await;
        let generation = self.completed.fetch_add(1, Ordering::SeqCst) + 1;
        match result {
            Ok(f) => {
                let after = refresh_after(f.lifetime);
                tracing::debug!(token_url = %display_url(&self.settings.token_url),
                    refresh_in_secs = after.as_secs(), "Fetched an OAuth2 access token");
                if let (Some(new), Some(old)) = (f.refresh_token, &state.refresh_token)
                    && new != *old
                {
                    tracing::info!(token_url = %display_url(&self.settings.token_url),
                        "Token endpoint rotated the refresh token; using the new one (kept in memory only)");
                    state.refresh_token = Some(new);
                }
                let lifetime = f.lifetime.unwrap_or(DEFAULT_LIFETIME).min(MAX_LIFETIME);
                state.cached = Some(Cached {
                    token: f.access_token.clone(),
                    refresh_at: sent_at.checked_add(after).unwrap_or(sent_at),
                    expires_at: sent_at.checked_add(lifetime).unwrap_or(sent_at),
                    generation,
                });
                state.failure = None;
                self.fetches.fetch_add(1, Ordering::Relaxed);
                *self.last_error_slot() = None;
                Ok(f.access_token)
            }
            Err(e) => {
                let mut slot = self.last_error_slot();
                if slot.is_none() {
                    tracing::warn!(token_url = %display_url(&self.settings.token_url), error = %e,
                        "No OAuth2 access token");
                } else {
                    tracing::debug!(error = %e, "No OAuth2 access token, again");
                }
                *slot = Some(e.to_string());
                drop(slot);
                state.failure = Some((generation, e.clone()));
                // Refreshed early on purpose: the old token serves until it really expires.
                state.unexpired().ok_or(e)
            }
        }
    }

    /// Called after a 401 with the token that was refused: drops it if it is still the cached
    /// one, so the next [`token`](Self::token) fetches a new one. A token already replaced (by a
    /// concurrent request's 401) is left alone, so one 401 costs one fetch, not a loop.
    pub async fn invalidate(&self, refused: &str) {
        let mut state = self.state.lock().await;
        if state.cached.as_ref().is_some_and(|c| c.token == refused) {
            state.cached = None;
            tracing::debug!(token_url = %display_url(&self.settings.token_url),
                "Access token refused; fetching a new one for the next request");
        }
    }

    /// The last token endpoint error, for the sink status (`None` after a success).
    pub fn last_error(&self) -> Option<String> {
        self.last_error_slot().clone()
    }

    /// Tokens fetched so far (successful fetches; statistics and tests).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    fn last_error_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        match self.last_error.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// One token request; `refresh_token` is the one to present in the refresh flow.
    async fn fetch(&self, refresh_token: Option<&str>) -> Result<Fetched, TokenError> {
        let resp = self
            .request(refresh_token)?
            .send()
            .await
            .map_err(transport_error)?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| snippet(v.as_bytes(), MAX_CONTENT_TYPE))
            .unwrap_or_default();
        let (body, complete) = read_bounded(resp).await?;
        if !status.is_success() {
            return Err(TokenError::Status {
                status: status.as_u16(),
                detail: self.error_detail(&body, refresh_token),
            });
        }
        if !complete {
            return Err(TokenError::TooLarge);
        }
        let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&body) else {
            return Err(TokenError::NotJson(content_type));
        };
        let Some(Value::String(access_token)) = obj.get("access_token") else {
            // Some servers answer an error with 200.
            if obj.get("error").is_some_and(Value::is_string) {
                return Err(TokenError::Status {
                    status: status.as_u16(),
                    detail: self.error_detail(&body, refresh_token),
                });
            }
            return Err(TokenError::NoAccessToken);
        };
        match obj.get("token_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
            Some(Value::String(t)) => {
                return Err(TokenError::TokenType(snippet(t.as_bytes(), MAX_TOKEN_TYPE)));
            }
            Some(other) => {
                return Err(TokenError::TokenType(snippet(
                    other.to_string().as_bytes(),
                    MAX_TOKEN_TYPE,
                )));
            }
        }
        // RFC 6750 b64token: visible ASCII only, so it always makes a valid header value.
        if access_token.is_empty() || !access_token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::UnusableToken);
        }
        let refresh_token = match obj.get("refresh_token") {
            Some(Value::String(rt)) if !rt.is_empty() => Some(rt.clone()),
            _ => None,
        };
        Ok(Fetched {
            access_token: access_token.clone(),
            lifetime: parse_expires_in(obj.get("expires_in")),
            refresh_token,
        })
    }

    /// The token request: the grant's form fields and the client authentication.
    fn request(&self, refresh_token: Option<&str>) -> Result<reqwest::RequestBuilder, TokenError> {
        let s = &self.settings;
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        match (&s.flow, refresh_token) {
            (Flow::RefreshToken { .. }, Some(rt)) => {
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", rt);
            }
            _ => {
                form.append_pair("grant_type", "client_credentials");
            }
        }
        if let Some(scope) = &s.scope {
            form.append_pair("scope", scope);
        }
        let mut req = self
            .client
            .post(s.token_url.clone())
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(reqwest::header::ACCEPT, "application/json");
        match s.client_auth {
            ClientAuth::Post => {
                form.append_pair("client_id", &s.client_id);
                if let Some(secret) = &s.client_secret {
                    form.append_pair("client_secret", secret);
                }
            }
            ClientAuth::Basic => req = req.header(reqwest::header::AUTHORIZATION, self.basic()?),
        }
        Ok(req.body(form.finish()))
    }

    /// `Authorization: Basic` of the form-urlencoded id and secret (RFC 6749 §2.3.1).
    fn basic(&self) -> Result<reqwest::header::HeaderValue, TokenError> {
        let s = &self.settings;
        let enc = |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        let pair = format!(
            "{}:{}",
            enc(&s.client_id),
            enc(s.client_secret.as_deref().unwrap_or(""))
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(pair);
        let mut v = reqwest::header::HeaderValue::try_from(format!("Basic {b64}"))
            .map_err(|_| TokenError::Client("client credentials not usable in a header".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }

    /// The `error (error_description)` of an RFC 6749 §5.2 error response, or a scrubbed prefix
    /// of whatever else came back.
    fn error_detail(&self, body: &[u8], refresh_token: Option<&str>) -> String {
        let obj = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(obj)) => Some(obj),
            _ => None,
        };
        let field = |name: &str| match obj.as_ref().and_then(|o| o.get(name)) {
            Some(Value::String(v)) if !v.is_empty() => Some(v.clone()),
            _ => None,
        };
        match (field("error"), field("error_description")) {
            (Some(code), Some(desc)) => format!(
                "{} ({})",
                self.scrub_capped(code.as_bytes(), refresh_token, MAX_ERROR_CODE),
                self.scrub(desc.as_bytes(), refresh_token)
            ),
            (Some(code), None) => self.scrub_capped(code.as_bytes(), refresh_token, MAX_ERROR_CODE),
            (None, _) if body.iter().all(u8::is_ascii_whitespace) => "empty response".into(),
            (None, _) => self.scrub(body, refresh_token),
        }
    }

    fn scrub(&self, text: &[u8], refresh_token: Option<&str>) -> String {
        self.scrub_capped(text, refresh_token, MAX_DESCRIPTION)
    }

    /// Response text made safe to show: every secret this source knows replaced (as sent, raw
    /// or form-urlencoded, in case the server echoes the request), then control characters
    /// replaced and the length capped (after redaction, so no prefix of a secret survives).
    fn scrub_capped(&self, text: &[u8], refresh_token: Option<&str>, max: usize) -> String {
        let mut s = String::from_utf8_lossy(text).into_owned();
        let configured = match &self.settings.flow {
            Flow::RefreshToken { refresh_token } => Some(refresh_token.as_str()),
            Flow::ClientCredentials => None,
        };
        for secret in [
            self.settings.client_secret.as_deref(),
            refresh_token,
            configured,
        ]
        .into_iter()
        .flatten()
        .filter(|v| !v.is_empty())
        {
            let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
            s = s.replace(secret, REDACTED).replace(&encoded, REDACTED);
        }
        snippet(s.trim().as_bytes(), max)
    }
}

/// When a token of `lifetime` (from `expires_in`) is replaced, counted from its request:
/// min(60 s, a tenth of the lifetime) before it expires.
fn refresh_after(lifetime: Option<Duration>) -> Duration {
    let lifetime = lifetime.unwrap_or(DEFAULT_LIFETIME).min(MAX_LIFETIME);
    lifetime - (lifetime / 10).min(MAX_MARGIN)
}

/// `expires_in` as a number (integer or not) or a numeric string; negative counts as 0 (already
/// expired). Anything else counts as absent.
fn parse_expires_in(v: Option<&Value>) -> Option<Duration> {
    let secs = match v? {
        Value::Number(n) => match n.as_u64() {
            Some(u) => return Some(Duration::from_secs(u).min(MAX_LIFETIME)),
            None => n.as_f64()?,
        },
        Value::String(s) => {
            let s = s.trim();
            match s.parse::<u64>() {
                Ok(u) => return Some(Duration::from_secs(u).min(MAX_LIFETIME)),
                Err(_) => s.parse::<f64>().ok()?,
            }
        }
        _ => return None,
    };
    if !secs.is_finite() {
        return None;
    }
    let capped = secs.clamp(0.0, MAX_LIFETIME.as_secs_f64());
    Duration::try_from_secs_f64(capped).ok()
}

/// Reads at most [`MAX_RESPONSE_BYTES`]; `false` when the body was longer.
async fn read_bounded(mut resp: reqwest::Response) -> Result<(Vec<u8>, bool), TokenError> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
        && resp.status().is_success()
    {
        return Err(TokenError::TooLarge);
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport_error)? {
        let room = MAX_RESPONSE_BYTES - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return Ok((buf, false));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf, true))
}

fn transport_error(e: reqwest::Error) -> TokenError {
    if e.is_timeout() {
        return TokenError::Timeout;
    }
    let connect = e.is_connect();
    // Without the URL: its query is the operator's to keep private.
    let s = super::http::error_chain(e);
    if connect {
        TokenError::Connect(s)
    } else {
        TokenError::Request(s)
    }
}

/// The token URL for logs and `Debug`: without a password or query.
fn display_url(u: &url::Url) -> String {
    let mut u = u.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some(REDACTED));
    }
    if u.query().is_some() {
        u.set_query(Some(REDACTED));
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::{Arc, Mutex};

    /// One request as the token endpoint saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        authorization: Option<String>,
        form: Vec<(String, String)>,
    }

    impl Seen {
        fn get(&self, key: &str) -> Option<&str> {
            self.form
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    type Respond = dyn Fn(&Seen, usize) -> (u16, String) + Send + Sync;

    struct Endpoint {
        seen: Mutex<Vec<Seen>>,
        respond: Box<Respond>,
        delay: Duration,
    }

    /// A loopback token endpoint: records every request and answers with `respond(request, n)`
    /// (n counted from 0) after `delay`.
    struct Server {
        url: url::Url,
        endpoint: Arc<Endpoint>,
    }

    impl Server {
        async fn start(
            delay: Duration,
            respond: impl Fn(&Seen, usize) -> (u16, String) + Send + Sync + 'static,
        ) -> Server {
            let endpoint = Arc::new(Endpoint {
                seen: Mutex::new(Vec::new()),
                respond: Box::new(respond),
                delay,
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let ep = endpoint.clone();
            let app = axum::Router::new().route(
                "/token",
                axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                    let ep = ep.clone();
                    async move {
                        let seen = Seen {
                            authorization: headers
                                .get("authorization")
                                .map(|v| v.to_str().unwrap().to_string()),
                            form: url::form_urlencoded::parse(&body).into_owned().collect(),
                        };
                        let n = {
                            let mut s = ep.seen.lock().unwrap();
                            s.push(seen.clone());
                            s.len() - 1
                        };
                        tokio::time::sleep(ep.delay).await;
                        let (status, body) = (ep.respond)(&seen, n);
                        (
                            StatusCode::from_u16(status).unwrap(),
                            [("content-type", "application/json")],
                            body,
                        )
                    }
                }),
            );
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            Server {
                url: format!("http://{addr}/token").parse().unwrap(),
                endpoint,
            }
        }

        fn seen(&self) -> Vec<Seen> {
            self.endpoint.seen.lock().unwrap().clone()
        }
    }

    /// A bearer token response: `tok-<n>`, living `expires_in` seconds.
    fn issue(n: usize, expires_in: u64) -> (u16, String) {
        (
            200,
            format!(
                r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":{expires_in}}}"#
            ),
        )
    }

    fn client(timeout: Duration) -> reqwest::Client {
        crate::tls::install_crypto_provider();
        reqwest::Client::builder().timeout(timeout).build().unwrap()
    }

    fn settings(url: &url::Url, flow: Flow, client_auth: ClientAuth) -> Settings {
        Settings {
            token_url: url.clone(),
            client_id: "gw-17".into(),
            client_secret: Some("cs-SECRET-9f2".into()),
            scope: Some("telemetry.write".into()),
            flow,
            client_auth,
        }
    }

    fn source(server: &Server, flow: Flow, client_auth: ClientAuth) -> TokenSource {
        TokenSource::new(
            settings(&server.url, flow, client_auth),
            client(Duration::from_secs(5)),
        )
    }

    #[tokio::test]
    async fn client_credentials_token_is_fetched_once_and_cached() {
        let server = Server::start(Duration::ZERO, |_, n| issue(n, 3600)).await;
        let ts = source(&server, Flow::ClientCredentials, ClientAuth::Post);
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        assert_eq!(ts.fetches(), 1);
        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].get("grant_type"), Some("client_credentials"));
        assert_eq!(seen[0].get("scope"), Some("telemetry.write"));
        assert_eq!(seen[0].get("refresh_token"), None);
        assert_eq!(ts.last_error(), None);
    }

    #[tokio::test]
    async fn the_refresh_margin_refetches_before_expiry() {
        let server = Server::start(Duration::ZERO, |_, n| issue(n, 2)).await;
        let ts = source(&server, Flow::ClientCredentials, ClientAuth::Post);
        let start = Instant::now();
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        // A 2 s token is replaced 0.2 s before it expires.
        let replaced = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if ts.token().await.unwrap() != "tok-0" {
                    return start.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        assert!(replaced >= Duration::from_millis(1500), "{replaced:?}");
        assert!(replaced < Duration::from_secs(2), "{replaced:?}");
        assert_eq!(ts.fetches(), 2);
        assert_eq!(ts.token().await.unwrap(), "tok-1");
    }

    #[test]
    fn refresh_margin_is_a_tenth_of_the_lifetime_at_most_a_minute() {
        let s = Duration::from_secs;
        assert_eq!(refresh_after(Some(s(3600))), s(3540));
        assert_eq!(refresh_after(Some(s(300))), s(270));
        assert_eq!(refresh_after(Some(s(2))), Duration::from_millis(1800));
        assert_eq!(refresh_after(Some(Duration::ZERO)), Duration::ZERO);
        assert_eq!(refresh_after(None), s(270), "no expires_in: 300 s assumed");
        assert_eq!(refresh_after(Some(s(u64::MAX))), MAX_LIFETIME - MAX_MARGIN);
    }

    #[test]
    fn expires_in_is_a_number_or_a_numeric_string() {
        let p = |j: &str| parse_expires_in(Some(&serde_json::from_str::<Value>(j).unwrap()));
        let s = Duration::from_secs;
        assert_eq!(p("3600"), Some(s(3600)));
        assert_eq!(p(r#""3600""#), Some(s(3600)));
        assert_eq!(p(r#"" 60 ""#), Some(s(60)));
        assert_eq!(p("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(p(r#""2.5""#), Some(Duration::from_millis(2500)));
        assert_eq!(p("-5"), Some(Duration::ZERO));
        assert_eq!(p("1e300"), Some(MAX_LIFETIME));
        assert_eq!(p(r#""soon""#), None);
        assert_eq!(p("true"), None);
        assert_eq!(p("null"), None);
        assert_eq!(parse_expires_in(None), None);
    }

    #[tokio::test]
    async fn a_401_refetches_once_and_a_stale_token_is_not_invalidated() {
        let server = Server::start(Duration::ZERO, |_, n| issue(n, 3600)).await;
        let ts = source(&server, Flow::ClientCredentials, ClientAuth::Post);
        let first = ts.token().await.unwrap();
        // The upstream answered 401 with `first`.
        ts.invalidate(&first).await;
        let second = ts.token().await.unwrap();
        assert_ne!(first, second);
        assert_eq!(ts.token().await.unwrap(), second);
        assert_eq!(ts.fetches(), 2);
        // A concurrent request's late 401 for the old token changes nothing.
        ts.invalidate(&first).await;
        assert_eq!(ts.token().await.unwrap(), second);
        assert_eq!(ts.fetches(), 2);
        assert_eq!(server.seen().len(), 2);
    }

    #[tokio::test]
    async fn a_failed_early_refresh_keeps_serving_the_unexpired_token() {
        let server = Server::start(Duration::ZERO, |_, n| {
            if n == 0 {
                issue(n, 3600)
            } else {
                (503, r#"{"error":"temporarily_unavailable"}"#.into())
            }
        })
        .await;
        let ts = source(&server, Flow::ClientCredentials, ClientAuth::Post);
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        // Due for replacement (within the margin) but not expired.
        ts.state.lock().await.cached.as_mut().unwrap().refresh_at = Instant::now();
        assert_eq!(ts.token().await.unwrap(), "tok-0");
        assert_eq!(
            ts.last_error().as_deref(),
            Some("token endpoint answered 503: temporarily_unavailable")
        );
        assert_eq!(server.seen().len(), 2);
        // Expired: now the error reaches the caller.
        ts.state.lock().await.cached.as_mut().unwrap().expires_at = Instant::now();
        assert!(ts.token().await.is_err());
        assert_eq!(server.seen().len(), 3);
    }

    #[tokio::test]
    async fn the_refresh_token_flow_sends_it_and_adopts_a_rotated_one() {
        // Request n must present rt-n and is issued rt-(n+1): a reused token is refused.
        let server = Server::start(Duration::ZERO, |seen, n| {
            if seen.get("refresh_token") != Some(&format!("rt-{n}")) {
                return (400, r#"{"error":"invalid_grant"}"#.into());
            }
            (
                200,
                format!(
                    r#"{{"access_token":"tok-{n}","token_type":"bearer","expires_in":"3600","refresh_token":"rt-{}"}}"#,
                    n + 1
                ),
            )
        })
        .await;
        let flow = Flow::RefreshToken {
            refresh_token: "rt-0".into(),
        };
        let ts = source(&server, flow, ClientAuth::Post);
        let first = ts.token().await.unwrap();
        ts.invalidate(&first).await;
        assert_eq!(ts.token().await.unwrap(), "tok-1");
        let seen = server.seen();
        assert_eq!(seen.len(), 2);
        for (n, s) in seen.iter().enumerate() {
            assert_eq!(s.get("grant_type"), Some("refresh_token"));
            assert_eq!(s.get("refresh_token"), Some(format!("rt-{n}").as_str()));
            assert_eq!(s.get("scope"), Some("telemetry.write"));
        }
        let debug = format!("{ts:?}");
        assert!(!debug.contains("rt-"), "{debug}");
        assert!(!debug.contains("tok-"), "{debug}");
    }

    #[tokio::test]
    async fn basic_and_post_client_auth_reach_the_server_exactly() {
        let server = Server::start(Duration::ZERO, |_, n| issue(n, 3600)).await;
        let mut s = settings(&server.url, Flow::ClientCredentials, ClientAuth::Basic);
        s.client_id = "gw 17".into();
        s.client_secret = Some("p:ss/+w".into());
        let basic = TokenSource::new(s.clone(), client(Duration::from_secs(5)));
        basic.token().await.unwrap();
        s.client_auth = ClientAuth::Post;
        let post = TokenSource::new(s, client(Duration::from_secs(5)));
        post.token().await.unwrap();

        let seen = server.seen();
        // base64("gw+17:p%3Ass%2F%2Bw"): each part form-urlencoded first (RFC 6749 §2.3.1).
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("gw+17:p%3Ass%2F%2Bw")
        );
        assert_eq!(seen[0].authorization.as_deref(), Some(want.as_str()));
        assert_eq!(seen[0].get("client_id"), None);
        assert_eq!(seen[0].get("client_secret"), None);
        assert_eq!(seen[1].authorization, None);
        assert_eq!(seen[1].get("client_id"), Some("gw 17"));
        assert_eq!(seen[1].get("client_secret"), Some("p:ss/+w"));
        assert_eq!(
            seen[1]
                .form
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["grant_type", "scope", "client_id", "client_secret"]
        );
    }

    #[tokio::test]
    async fn a_public_client_sends_no_secret() {
        let server = Server::start(Duration::ZERO, |_, n| issue(n, 3600)).await;
        for auth in [ClientAuth::Post, ClientAuth::Basic] {
            let mut s = settings(&server.url, Flow::ClientCredentials, auth);
            s.client_secret = None;
            s.scope = None;
            TokenSource::new(s, client(Duration::from_secs(5)))
                .token()
                .await
                .unwrap();
        }
        let seen = server.seen();
        assert_eq!(
            seen[0].form,
            [
                ("grant_type".into(), "client_credentials".into()),
                ("client_id".into(), "gw-17".into())
            ]
        );
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("gw-17:")
        );
        assert_eq!(seen[1].authorization.as_deref(), Some(want.as_str()));
        assert_eq!(
            seen[1].form,
            [("grant_type".into(), "client_credentials".into())]
        );
    }

    #[tokio::test]
    async fn an_error_response_is_reported_and_cleared_after_a_success() {
        let server = Server::start(Duration::ZERO, |_, n| {
            if n == 0 {
                (
                    400,
                    r#"{"error":"invalid_grant","error_description":"expired"}"#.into(),
                )
            } else {
                issue(n, 3600)
            }
        })
        .await;
        let ts = source(&server, Flow::ClientCredentials, ClientAuth::Post);
        let e = ts.token().await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "token endpoint answered 400: invalid_grant (expired)"
        );
        assert_eq!(ts.last_error(), Some(e.to_string()));
        assert_eq!(ts.fetches(), 0);
        assert_eq!(ts.token().await.unwrap(), "tok-1");
        assert_eq!(ts.last_error(), None);
        assert_eq!(ts.fetches(), 1);
    }

    #[tokio::test]
    async fn odd_responses_give_clear_errors() {
        let cases: Vec<(u16, String, &str)> = vec![
            (
                200,
                r#"{"access_token":"t","token_type":"mac"}"#.into(),
                r#"token endpoint: unsupported token_type "mac" (only Bearer is supported)"#,
            ),
            (
                200,
                r#"{"token_type":"Bearer"}"#.into(),
                "token endpoint: response without access_token",
            ),
            (
                200,
                r#"{"access_token":"a b"}"#.into(),
                "token endpoint: access_token is not usable in an Authorization header",
            ),
            (
                200,
                "<html>".into(),
                r#"token endpoint: response is not a JSON object (content-type "application/json")"#,
            ),
            (
                200,
                r#"{"error":"unauthorized_client"}"#.into(),
                "token endpoint answered 200: unauthorized_client",
            ),
            (
                503,
                "upstream\r\ndown\u{1b}[31m".into(),
                "token endpoint answered 503: upstream??down?[31m",
            ),
            (
                502,
                String::new(),
                "token endpoint answered 502: empty response",
            ),
            (
                200,
                format!(r#"{{"access_token":"{}"}}"#, "x".repeat(MAX_RESPONSE_BYTES)),
                "token endpoint: response larger than 65536 bytes",
            ),
        ];
        let responses: Vec<(u16, String)> = cases.iter().map(|(s, b, _)| (*s, b.clone())).collect();
        let server = Server::start(Duration::ZERO, move |_, n| responses[n].clone()).await;
        let ts = source(&server, Flow::ClientCredentials, ClientAuth::Post);
        for (_, _, want) in &cases {
            assert_eq!(ts.token().await.unwrap_err().to_string(), *want);
        }
        // A description is capped and its control characters replaced.
        let long = format!(
            r#"{{"error":"e","error_description":"{}\n"}}"#,
            "d".repeat(500)
        );
        let d = ts.error_detail(long.as_bytes(), None);
        assert_eq!(d, format!("e ({})", "d".repeat(MAX_DESCRIPTION)));
        let d = ts.error_detail(br#"{"error":"bad\u0007code"}"#, None);
        assert_eq!(d, "bad?code");
    }

    #[tokio::test]
    async fn bearer_token_type_is_case_insensitive_or_may_be_absent() {
        let server = Server::start(Duration::ZERO, |_, n| {
            let tt = [r#","token_type":"BEARER""#, "", r#","token_type":"bearer""#][n % 3];
            (200, format!(r#"{{"access_token":"tok-{n}"{tt}}}"#))
        })
        .await;
        let ts = source(&server, Flow::ClientCredentials, ClientAuth::Post);
        for n in 0..3 {
            let t = ts.token().await.unwrap();
            assert_eq!(t, format!("tok-{n}"));
            ts.invalidate(&t).await;
        }
    }

    #[tokio::test]
    async fn secrets_never_appear_in_errors_or_debug_output() {
        // A broken endpoint that echoes the request back, raw and parsed.
        let server = Server::start(Duration::ZERO, |seen, n| {
            if n == 0 {
                let echo = seen
                    .form
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                let body = serde_json::json!({"error": "invalid_client", "error_description": echo});
                (401, body.to_string())
            } else if n == 1 {
                let raw = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(seen.form.iter())
                    .finish();
                (500, raw)
            } else {
                (200, r#"{"access_token":"AT-SECRET-77","expires_in":3600,"refresh_token":"RT-ROTATED-55"}"#.into())
            }
        })
        .await;
        let flow = Flow::RefreshToken {
            refresh_token: "RT-SECRET-31".into(),
        };
        let mut s = settings(&server.url, flow, ClientAuth::Post);
        s.client_secret = Some("cs SECRET&9f2".into());
        let ts = TokenSource::new(s.clone(), client(Duration::from_secs(5)));
        let secrets = [
            "cs SECRET&9f2",
            "cs+SECRET%269f2",
            "RT-SECRET-31",
            "AT-SECRET-77",
            "RT-ROTATED-55",
        ];
        let mut shown = vec![format!("{s:?}"), format!("{:?}", s.flow), format!("{ts:?}")];
        for _ in 0..2 {
            let e = ts.token().await.unwrap_err();
            assert!(e.to_string().contains(REDACTED), "{e}");
            shown.extend([e.to_string(), format!("{e:?}"), format!("{ts:?}")]);
            shown.extend(ts.last_error());
        }
        assert_eq!(ts.token().await.unwrap(), "AT-SECRET-77");
        shown.push(format!("{ts:?}"));
        for text in &shown {
            for secret in secrets {
                assert!(!text.contains(secret), "{secret:?} in {text}");
            }
        }
        assert!(shown[0].contains("gw-17"), "{}", shown[0]);
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_fetch() {
        let server = Server::start(Duration::from_millis(200), |_, n| issue(n, 3600)).await;
        let ts = Arc::new(source(&server, Flow::ClientCredentials, ClientAuth::Post));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let ts = ts.clone();
                tokio::spawn(async move { ts.token().await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "tok-0");
        }
        assert_eq!(ts.fetches(), 1);
        assert_eq!(server.seen().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_failure_and_the_next_call_tries_again() {
        let server = Server::start(Duration::from_millis(200), |_, _| {
            (503, r#"{"error":"temporarily_unavailable"}"#.into())
        })
        .await;
        let ts = Arc::new(source(&server, Flow::ClientCredentials, ClientAuth::Post));
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let ts = ts.clone();
                tokio::spawn(async move { ts.token().await })
            })
            .collect();
        for t in tasks {
            let e = t.await.unwrap().unwrap_err();
            assert_eq!(
                e.to_string(),
                "token endpoint answered 503: temporarily_unavailable"
            );
        }
        assert_eq!(server.seen().len(), 1);
        assert!(ts.token().await.is_err());
        assert_eq!(server.seen().len(), 2);
    }

    #[tokio::test]
    async fn connect_failures_and_timeouts_are_named() {
        // A port that was just free: nothing listens.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url: url::Url = format!("http://{addr}/token").parse().unwrap();
        let s = settings(&url, Flow::ClientCredentials, ClientAuth::Post);
        let e = TokenSource::new(s, client(Duration::from_secs(5)))
            .token()
            .await
            .unwrap_err();
        assert!(matches!(e, TokenError::Connect(_)), "{e:?}");
        assert!(
            e.to_string().starts_with("token endpoint: connect: "),
            "{e}"
        );
        assert!(!e.to_string().contains("SECRET"), "{e}");

        let server = Server::start(Duration::from_secs(3), |_, n| issue(n, 3600)).await;
        let s = settings(&server.url, Flow::ClientCredentials, ClientAuth::Post);
        let ts = TokenSource::new(s, client(Duration::from_millis(200)));
        let e = ts.token().await.unwrap_err();
        assert_eq!(e.to_string(), "token endpoint: timeout");
        assert_eq!(ts.last_error().as_deref(), Some("token endpoint: timeout"));
    }

    #[test]
    fn the_token_url_is_shown_without_password_or_query() {
        let u: url::Url = "https://u:pw@auth.example/token?key=k".parse().unwrap();
        let shown = display_url(&u);
        assert!(!shown.contains("pw") && !shown.contains("key=k"), "{shown}");
        let plain: url::Url = "https://auth.example/oauth/token".parse().unwrap();
        assert_eq!(display_url(&plain), "https://auth.example/oauth/token");
    }
}
