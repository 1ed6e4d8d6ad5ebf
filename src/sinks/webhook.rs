//! The webhook sink's transport: one subscriber, single events by default, filtered by type,
//! device and plant, in its own shape (`native`, `smarther_c2c`, a body template), with its own
//! credentials (API key, bearer token, OAuth2) and Standard Webhooks signatures (the current and,
//! during a rotation, the previous secret). Redirects are never followed; `http://` only reaches
//! a loopback host with `allow_insecure_http` (checked at config validation).
//!
//! The rules of failure, retry, ban and disable are the runner's (`mod.rs`): this file only turns
//! a batch into an [`Outcome`].

use super::delivery::Outcome;
use super::oauth2::{self, TokenSource};
use super::signing::{self, SigningKey};
use super::template::{BodyTemplate, UrlTemplate, Vars};
use crate::config::{WebhookAuth, WebhookFormat, WebhookMethod, WebhookSinkConfig};
use crate::store::outbox::StoredEvent;
use std::collections::HashSet;
use std::time::Duration;

/// Largest response body read for the attempt record and dead letters.
const SNIPPET_BYTES: usize = 256;

/// Timeout of a request to the OAuth2 token endpoint (not the 750 ms webhook rule).
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the sink could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("sinks.webhook {name}: {problem}")]
    Config { name: String, problem: String },
    #[error("sinks.webhook {name}: cannot build the HTTP client: {source}")]
    Client {
        name: String,
        source: reqwest::Error,
    },
}

enum Auth {
    None,
    Header(reqwest::header::HeaderName, reqwest::header::HeaderValue),
    Query(String, String),
    Bearer(reqwest::header::HeaderValue),
    OAuth2(Box<TokenSource>),
}

/// A ready-to-use webhook transport.
pub struct WebhookTransport {
    client: reqwest::Client,
    url: UrlTemplate,
    method: reqwest::Method,
    format: WebhookFormat,
    body: Option<BodyTemplate>,
    oids: Vec<String>,
    gateway: String,
    gateway_json: String,
    types: HashSet<String>,
    devices: HashSet<String>,
    plants: HashSet<String>,
    keys: Vec<SigningKey>,
    auth: Auth,
    api_version: reqwest::header::HeaderValue,
    /// The sink's own static credentials, never stored even if a receiver echoes them.
    secrets: Vec<String>,
}

/// Replaces every `secret` (raw and form-encoded) in `text` with `[redacted]`.
fn redact(mut text: String, secrets: &[&str]) -> String {
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        if text.contains(*s) {
            text = text.replace(*s, "[redacted]");
        }
        let enc: String = url::form_urlencoded::byte_serialize(s.as_bytes()).collect();
        if enc != *s && text.contains(&enc) {
            text = text.replace(&enc, "[redacted]");
        }
    }
    text
}

/// The envelope fields a webhook needs beyond the stored columns.
#[derive(serde::Deserialize, Default)]
struct Meta {
    plant: Option<String>,
    module: Option<String>,
}

fn meta(payload: &str) -> Meta {
    serde_json::from_str(payload).unwrap_or_default()
}

/// A client that never follows redirects and, for a loopback host, never uses a proxy from the
/// environment.
fn client_for(url: &url::Url, timeout: Duration) -> reqwest::ClientBuilder {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        // The 750 ms rule includes DNS, TCP and TLS of a new connection: keep connections warm
        // so that a quiet hour does not make the next event's request fail on a slow uplink.
        .pool_idle_timeout(Duration::from_secs(600))
        .tcp_keepalive(Duration::from_secs(30))
        .tcp_nodelay(true)
        .user_agent(concat!("hvac-edge/", env!("CARGO_PKG_VERSION")));
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let localhost = host.eq_ignore_ascii_case("localhost");
    if localhost
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    {
        b = b.no_proxy();
        if localhost {
            let port = url.port_or_known_default().unwrap_or(80);
            b = b.resolve(host, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    b
}

impl WebhookTransport {
    /// Resolves secrets and builds the client.
    ///
    /// # Errors
    /// [`BuildError`] naming the sink and the problem.
    pub fn new(cfg: &WebhookSinkConfig, gateway: &str) -> Result<WebhookTransport, BuildError> {
        crate::tls::install_crypto_provider();
        let bad = |problem: String| BuildError::Config {
            name: cfg.name.clone(),
            problem,
        };
        let read = |file: &Option<std::path::PathBuf>,
                    env: &Option<String>|
         -> Result<Option<String>, BuildError> {
            match (crate::config::some_path(file), env) {
                (Some(f), _) => crate::config::read_secret_file(f).map(Some).map_err(bad),
                (None, Some(e)) => crate::config::read_secret_env(e).map(Some).map_err(bad),
                (None, None) => Ok(None),
            }
        };
        let url = UrlTemplate::parse(&cfg.url).map_err(|e| bad(format!("url: {e}")))?;
        let body = cfg
            .body
            .as_deref()
            .map(BodyTemplate::parse)
            .transpose()
            .map_err(|e| bad(format!("body: {e}")))?;
        let mut keys = Vec::new();
        for (file, env) in [
            (&cfg.signing_secret_file, &cfg.signing_secret_env),
            (
                &cfg.signing_secret_previous_file,
                &cfg.signing_secret_previous_env,
            ),
        ] {
            if let Some(s) = read(file, env)? {
                keys.push(
                    SigningKey::from_whsec(&s).map_err(|e| bad(format!("signing secret: {e}")))?,
                );
            }
        }
        let timeout = Duration::from_millis(cfg.failure_timeout_ms);
        let sample = url.sample();
        let client = client_for(&sample, timeout)
            .build()
            .map_err(|source| BuildError::Client {
                name: cfg.name.clone(),
                source,
            })?;
        let auth = match cfg.auth {
            WebhookAuth::None => Auth::None,
            WebhookAuth::ApiKey => {
                let key = read(&cfg.api_key_file, &cfg.api_key_env)?.ok_or_else(|| {
                    bad("auth = \"api_key\" needs api_key_file or api_key_env".into())
                })?;
                match (&cfg.api_key_header, &cfg.api_key_query) {
                    (Some(h), _) => {
                        let name = reqwest::header::HeaderName::from_bytes(h.as_bytes())
                            .map_err(|e| bad(format!("api_key_header: {e}")))?;
                        let mut value =
                            reqwest::header::HeaderValue::from_str(&key).map_err(|_| {
                                bad("the API key contains characters not allowed in a header"
                                    .into())
                            })?;
                        value.set_sensitive(true);
                        Auth::Header(name, value)
                    }
                    (None, Some(q)) => Auth::Query(q.clone(), key),
                    (None, None) => {
                        return Err(bad(
                            "auth = \"api_key\" needs api_key_header or api_key_query".into(),
                        ));
                    }
                }
            }
            WebhookAuth::Bearer => {
                let token =
                    read(&cfg.bearer_token_file, &cfg.bearer_token_env)?.ok_or_else(|| {
                        bad("auth = \"bearer\" needs bearer_token_file or bearer_token_env".into())
                    })?;
                let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| {
                        bad("the bearer token contains characters not allowed in a header".into())
                    })?;
                v.set_sensitive(true);
                Auth::Bearer(v)
            }
            WebhookAuth::Oauth2RefreshToken | WebhookAuth::Oauth2ClientCredentials => {
                let token_url = cfg
                    .token_url
                    .as_deref()
                    .ok_or_else(|| bad("token_url is missing".into()))
                    .and_then(|u| url::Url::parse(u).map_err(|e| bad(format!("token_url: {e}"))))?;
                let flow = if cfg.auth == WebhookAuth::Oauth2RefreshToken {
                    oauth2::Flow::RefreshToken {
                        refresh_token: read(&cfg.refresh_token_file, &cfg.refresh_token_env)?
                            .ok_or_else(|| {
                                bad("refresh_token_file or refresh_token_env is missing".into())
                            })?,
                    }
                } else {
                    oauth2::Flow::ClientCredentials
                };
                let token_client =
                    client_for(&token_url, TOKEN_TIMEOUT)
                        .build()
                        .map_err(|source| BuildError::Client {
                            name: cfg.name.clone(),
                            source,
                        })?;
                Auth::OAuth2(Box::new(TokenSource::new(
                    oauth2::Settings {
                        token_url,
                        client_id: cfg.client_id.clone().unwrap_or_default(),
                        client_secret: read(&cfg.client_secret_file, &cfg.client_secret_env)?,
                        scope: cfg.scope.clone(),
                        flow,
                        client_auth: match cfg.token_auth {
                            crate::config::TokenAuth::Post => oauth2::ClientAuth::Post,
                            crate::config::TokenAuth::Basic => oauth2::ClientAuth::Basic,
                        },
                    },
                    token_client,
                )))
            }
        };
        let api_version = reqwest::header::HeaderValue::from_str(&cfg.api_version)
            .map_err(|_| bad("api_version is not a valid header value".into()))?;
        let secrets = match &auth {
            Auth::Header(_, v) | Auth::Bearer(v) => v
                .to_str()
                .map(|t| vec![t.trim_start_matches("Bearer ").to_string()])
                .unwrap_or_default(),
            Auth::Query(_, k) => vec![k.clone()],
            Auth::None | Auth::OAuth2(_) => Vec::new(),
        };
        Ok(WebhookTransport {
            secrets,
            client,
            url,
            method: match cfg.method {
                WebhookMethod::Post => reqwest::Method::POST,
                WebhookMethod::Put => reqwest::Method::PUT,
                WebhookMethod::Patch => reqwest::Method::PATCH,
            },
            format: cfg.format,
            body,
            oids: cfg.c2c_receiver_oids.clone(),
            gateway: gateway.to_string(),
            gateway_json: serde_json::Value::String(gateway.to_string()).to_string(),
            types: cfg.types.iter().cloned().collect(),
            devices: cfg.devices.iter().cloned().collect(),
            plants: cfg.plants.iter().cloned().collect(),
            keys,
            auth,
            api_version,
        })
    }

    /// Whether the subscriber wants `e` (its types, devices and plants; empty = all).
    pub fn accepts(&self, e: &StoredEvent) -> bool {
        // The gateway's own notes have no chronothermostat shape.
        if self.format == WebhookFormat::SmartherC2c && e.kind == "operational" {
            return false;
        }
        (self.types.is_empty() || self.types.contains(&e.kind))
            && (self.devices.is_empty() || self.devices.contains(&e.device))
            && (self.plants.is_empty()
                || meta(&e.payload)
                    .plant
                    .is_some_and(|p| self.plants.contains(&p)))
    }

    /// Whether a filter is configured (the runner then reads ahead to find matching events).
    pub fn filters(&self) -> bool {
        self.format == WebhookFormat::SmartherC2c
            || !(self.types.is_empty() && self.devices.is_empty() && self.plants.is_empty())
    }

    /// Bytes a request adds around the events.
    pub fn wrapper_bytes(&self) -> usize {
        self.gateway_json.len() + 24
    }

    /// The request body, or why the stored events cannot be put in this shape.
    fn body(&self, events: &[StoredEvent]) -> Result<Vec<u8>, String> {
        match self.format {
            WebhookFormat::Native if events.len() == 1 => Ok(events[0].payload.as_bytes().to_vec()),
            WebhookFormat::Native => {
                let mut b = Vec::with_capacity(
                    events.iter().map(|e| e.payload.len() + 1).sum::<usize>() + 64,
                );
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
                Ok(b)
            }
            WebhookFormat::SmartherC2c => {
                let parsed = events
                    .iter()
                    .map(|e| {
                        serde_json::from_str::<crate::model::Event>(&e.payload)
                            .map_err(|err| format!("event {} is not a valid envelope: {err}", e.id))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(super::c2c::body(&parsed, &self.oids))
            }
            WebhookFormat::Template => {
                let Some(t) = &self.body else {
                    return Err("format = \"template\" without a body".into());
                };
                let e = &events[0];
                let m = meta(&e.payload);
                let at = crate::model::format_rfc3339_ms(e.observed_at);
                Ok(t.render(&self.vars(e, &m, &at)).into_bytes())
            }
        }
    }

    fn vars<'a>(&'a self, e: &'a StoredEvent, m: &'a Meta, at: &'a str) -> Vars<'a> {
        Vars {
            device_id: &e.device,
            plant_id: m.plant.as_deref(),
            module_id: m.module.as_deref(),
            gateway_id: &self.gateway,
            kind: &e.kind,
            event_id: &e.id,
            seq: u64::try_from(e.seq).unwrap_or(0),
            observed_at: at,
            event_json: &e.payload,
        }
    }

    /// Sends one batch (one event by default) and reports what happened. Never panics on
    /// network input. An OAuth2 token refused with 401 is refreshed once and the request sent
    /// again.
    pub async fn deliver(&self, events: &[StoredEvent]) -> Outcome {
        let Some(first) = events.first() else {
            return Outcome::Status {
                code: 204,
                retry_after: None,
                snippet: String::new(),
            };
        };
        let body = match self.body(events) {
            Ok(b) => b,
            Err(e) => return Outcome::Invalid(e),
        };
        let m = meta(&first.payload);
        let at = crate::model::format_rfc3339_ms(first.observed_at);
        let mut url = match self.url.render(&self.vars(first, &m, &at)) {
            Ok(u) => u,
            Err(e) => return Outcome::Invalid(format!("url: {e}")),
        };
        if let Auth::Query(q, k) = &self.auth {
            url.query_pairs_mut().append_pair(q, k);
        }
        // Stable across retries, replays and restarts; no '.' (Standard Webhooks).
        let msg_id = if events.len() == 1 {
            format!("msg_{}", first.id)
        } else {
            format!("msg_{}_{}", first.id, events.len())
        };
        let mut refreshed = false;
        loop {
            let bearer = match &self.auth {
                Auth::OAuth2(ts) => match ts.token().await {
                    Ok(t) => Some(t),
                    Err(e) => return Outcome::Auth(e.to_string()),
                },
                _ => None,
            };
            let outcome = self
                .send(
                    url.clone(),
                    &msg_id,
                    body.clone(),
                    bearer.as_deref(),
                    super::http::is_test(events),
                )
                .await;
            match (&self.auth, &outcome, bearer) {
                (Auth::OAuth2(ts), Outcome::Status { code: 401, .. }, Some(t)) if !refreshed => {
                    // The token may have been revoked or expired early: one fresh token, once.
                    ts.invalidate(&t).await;
                    refreshed = true;
                }
                _ => return outcome,
            }
        }
    }

    async fn send(
        &self,
        url: url::Url,
        msg_id: &str,
        body: Vec<u8>,
        bearer: Option<&str>,
        test: bool,
    ) -> Outcome {
        let mut req = self
            .client
            .request(self.method.clone(), url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-api-version", self.api_version.clone());
        match &self.auth {
            Auth::Header(n, v) => req = req.header(n.clone(), v.clone()),
            Auth::Bearer(v) => req = req.header(reqwest::header::AUTHORIZATION, v.clone()),
            _ => {}
        }
        if let Some(t) = bearer {
            match reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    req = req.header(reqwest::header::AUTHORIZATION, v);
                }
                Err(_) => {
                    return Outcome::Auth(
                        "oauth2: the token endpoint issued a token that is not a valid header value"
                            .into(),
                    );
                }
            }
        }
        if !self.keys.is_empty() {
            let ts = crate::telemetry::now_ms() / 1000;
            let h = signing::headers_multi(&self.keys, msg_id, ts, &body);
            req = req
                .header(signing::HEADER_ID, h.id)
                .header(signing::HEADER_TIMESTAMP, h.timestamp)
                .header(signing::HEADER_SIGNATURE, h.signature);
        }
        // A receiver may echo what it got: never store the sink's credentials.
        let mut known: Vec<&str> = self.secrets.iter().map(String::as_str).collect();
        known.extend(bearer);
        super::http::outcome_of(req.body(body).send().await, SNIPPET_BYTES, test, |t| {
            redact(t, &known)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(kind: &str, device: &str, plant: Option<&str>) -> StoredEvent {
        let plant = plant.map_or("null".to_string(), |p| format!("\"{p}\""));
        StoredEvent {
            pos: 1,
            id: "0190a0a0-0000-7000-8000-000000000001".into(),
            device: device.into(),
            seq: 1,
            kind: kind.into(),
            observed_at: 1_800_000_000_000,
            payload: format!(r#"{{"plant":{plant},"module":null}}"#),
            damaged: false,
        }
    }

    fn transport(extra: &str) -> WebhookTransport {
        let toml = format!(
            "name = \"w\"\nurl = \"http://127.0.0.1:9/h/{{device_id}}\"\nallow_insecure_http = true\n{extra}"
        );
        let cfg: WebhookSinkConfig = toml::from_str(&toml).unwrap_or_else(|e| panic!("{e}"));
        WebhookTransport::new(&cfg, "gw").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn echoed_credentials_are_redacted_raw_and_form_encoded() {
        let got = redact(
            "bad key k3y+/= (k3y%2B%2F%3D) for t0ken".to_string(),
            &["k3y+/=", "t0ken", "ab"],
        );
        assert_eq!(got, "bad key [redacted] ([redacted]) for [redacted]");
    }

    #[test]
    fn filters_match_types_devices_and_plants_and_empty_means_all() {
        let all = transport("");
        assert!(!all.filters());
        assert!(all.accepts(&stored("mode", "a", None)));
        let t = transport("types = [\"mode\", \"setpoint\"]\ndevices = [\"a\"]\nplants = [\"p1\"]");
        assert!(t.filters());
        assert!(t.accepts(&stored("mode", "a", Some("p1"))));
        assert!(!t.accepts(&stored("temperature", "a", Some("p1"))));
        assert!(!t.accepts(&stored("mode", "b", Some("p1"))));
        assert!(!t.accepts(&stored("mode", "a", Some("p2"))));
        assert!(
            !t.accepts(&stored("mode", "a", None)),
            "no plant never matches a plant filter"
        );
    }
}
