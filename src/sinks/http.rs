//! The HTTP upstream sink's wire format and transport: one signed POST per batch.
//!
//! Body: `{"gateway": "<id>", "events": [<envelope>, …]}` built from the stored envelopes without
//! re-serialising them. Headers: Standard Webhooks (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature`) when a secret is configured, `x-api-version`, and the API key in its
//! header or query parameter. Redirects are not followed (a signed request goes where configured).
//! Must not write device state or events; the sink loop in `mod.rs` records outcomes.

use super::delivery::{Outcome, parse_retry_after, snippet};
use super::signing::{self, SigningKey};
use crate::config::HttpSinkConfig;
use crate::store::outbox::StoredEvent;
use std::time::Duration;

/// Largest response body read for the dead-letter snippet.
const SNIPPET_BYTES: usize = 256;

/// Why the sink could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("sinks.http {name}: {problem}")]
    Config { name: String, problem: String },
    #[error("sinks.http {name}: cannot build the HTTP client: {source}")]
    Client {
        name: String,
        source: reqwest::Error,
    },
}

/// A ready-to-use HTTP sink transport.
pub struct HttpTransport {
    client: reqwest::Client,
    url: url::Url,
    gateway_json: String,
    key: Option<SigningKey>,
    api_key_header: Option<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    api_version: reqwest::header::HeaderValue,
}

impl HttpTransport {
    /// Resolves secrets and builds the client.
    ///
    /// # Errors
    /// [`BuildError`] naming the sink and the problem (unreadable secret, bad URL).
    pub fn new(cfg: &HttpSinkConfig, gateway: &str) -> Result<HttpTransport, BuildError> {
        crate::tls::install_crypto_provider();
        let bad = |problem: String| BuildError::Config {
            name: cfg.name.clone(),
            problem,
        };
        let mut url = url::Url::parse(&cfg.url).map_err(|e| bad(format!("url: {e}")))?;
        let read = |file: &Option<std::path::PathBuf>,
                    env: &Option<String>|
         -> Result<Option<String>, BuildError> {
            match (file, env) {
                (Some(f), _) => crate::config::read_secret_file(f).map(Some).map_err(bad),
                (None, Some(e)) => crate::config::read_secret_env(e).map(Some).map_err(bad),
                (None, None) => Ok(None),
            }
        };
        let key = read(&cfg.signing_secret_file, &cfg.signing_secret_env)?
            .map(|s| SigningKey::from_whsec(&s).map_err(|e| bad(format!("signing secret: {e}"))))
            .transpose()?;
        let api_key = read(&cfg.api_key_file, &cfg.api_key_env)?;
        let mut api_key_header = None;
        if let Some(k) = api_key {
            if let Some(h) = &cfg.api_key_header {
                let name = reqwest::header::HeaderName::from_bytes(h.as_bytes())
                    .map_err(|e| bad(format!("api_key_header: {e}")))?;
                let mut value = reqwest::header::HeaderValue::from_str(&k).map_err(|_| {
                    bad("the API key contains characters not allowed in a header".into())
                })?;
                value.set_sensitive(true);
                api_key_header = Some((name, value));
            } else if let Some(q) = &cfg.api_key_query {
                url.query_pairs_mut().append_pair(q, &k);
            }
        }
        let api_version = reqwest::header::HeaderValue::from_str(&cfg.api_version)
            .map_err(|_| bad("api_version is not a valid header value".into()))?;
        let mut builder = reqwest::Client::builder();
        let host = url
            .host_str()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            // A receiver on this gateway is reached directly: never through an HTTP(S)_PROXY set
            // in the environment (it would see, or drop, every event), and `localhost` is pinned
            // to the loopback address (no resolver or hosts file can send it elsewhere).
            builder = builder.no_proxy();
            if host.eq_ignore_ascii_case("localhost") {
                let port = url.port_or_known_default().unwrap_or(80);
                builder = builder.resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
        let client = builder
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(cfg.request_timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.request_timeout_ms.min(10_000)))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("hvac-edge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| BuildError::Client {
                name: cfg.name.clone(),
                source,
            })?;
        Ok(HttpTransport {
            client,
            url,
            gateway_json: serde_json::Value::String(gateway.to_string()).to_string(),
            key,
            api_key_header,
            api_version,
        })
    }

    /// Bytes the body adds around the events (`{"gateway":…,"events":[` … `]}`).
    pub fn wrapper_bytes(&self) -> usize {
        self.gateway_json.len() + 24
    }

    /// Builds the request body from stored envelopes (no re-serialisation).
    pub fn body(&self, events: &[StoredEvent]) -> Vec<u8> {
        let len: usize = events.iter().map(|e| e.payload.len() + 1).sum::<usize>()
            + self.gateway_json.len()
            + 32;
        let mut b = Vec::with_capacity(len);
        b.extend_from_slice(b"{\"gateway\":");
        b.extend_from_slice(self.gateway_json.as_bytes());
        b.extend_from_slice(b",\"events\":[");
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                b.push(b',');
            }
            b.extend_from_slice(e.payload.as_bytes());
        }
        b.extend_from_slice(b"]}");
        b
    }

    /// POSTs one batch and reports what happened. Never panics on network input.
    pub async fn deliver(&self, events: &[StoredEvent]) -> Outcome {
        let Some(first) = events.first() else {
            return Outcome::Status {
                code: 204,
                retry_after: None,
                snippet: String::new(),
            };
        };
        let body = self.body(events);
        // Stable across retries of the same batch; no '.' (Standard Webhooks).
        let msg_id = format!("msg_{}_{}", first.id, events.len());
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-api-version", self.api_version.clone());
        if let Some((n, v)) = &self.api_key_header {
            req = req.header(n.clone(), v.clone());
        }
        if let Some(key) = &self.key {
            let ts = crate::telemetry::now_ms() / 1000;
            let h = signing::headers(key, &msg_id, ts, &body);
            req = req
                .header(signing::HEADER_ID, h.id)
                .header(signing::HEADER_TIMESTAMP, h.timestamp)
                .header(signing::HEADER_SIGNATURE, h.signature);
        }
        let want = is_test(events);
        outcome_of(req.body(body).send().await, SNIPPET_BYTES, want, |t| t).await
    }
}

/// A technician's test delivery (`hvac-edge sinks test`): the answer's first bytes are read
/// even on success, to be shown; an ordinary delivery never reads a successful body.
pub(crate) fn is_test(events: &[StoredEvent]) -> bool {
    matches!(events, [e] if e.kind == "test" && e.seq == 0 && e.pos == 0)
}

/// What a sent request produced: the status, its `Retry-After`, and for a failure the start
/// of the response (at most `snippet_bytes`, passed through `clean`, e.g. to redact);
/// or the transport error.
pub(crate) async fn outcome_of(
    sent: Result<reqwest::Response, reqwest::Error>,
    snippet_bytes: usize,
    success_body: bool,
    clean: impl FnOnce(String) -> String,
) -> Outcome {
    match sent {
        Ok(resp) => {
            let code = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let text = if resp.status().is_success() && !success_body {
                String::new()
            } else {
                clean(read_prefix(resp, snippet_bytes).await)
            };
            Outcome::Status {
                code,
                retry_after,
                snippet: text,
            }
        }
        Err(e) if e.is_timeout() => Outcome::Timeout,
        Err(e) if e.is_connect() => Outcome::Connect(error_chain(e)),
        Err(e) => Outcome::Other(error_chain(e)),
    }
}

pub(crate) async fn read_prefix(mut resp: reqwest::Response, max: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < max {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    snippet(&buf, max)
}

/// The error and its causes on one line, without the URL (its query may hold an API key).
pub(crate) fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}
