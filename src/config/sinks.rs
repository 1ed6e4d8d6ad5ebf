//! `[[sinks.webhook]]` and `[[sinks.mqtt]]`: webhook subscribers and the MQTT upstream
//! (config.md). `[[sinks.http]]` stays in `config.rs`; the URL rules are shared.

use super::{
    Problems, StartFrom, check_secret_env, check_secret_file, default_api_version,
    default_batch_max_bytes, default_hold_statuses, default_max_consecutive_rejected,
    default_retry_schedule, default_ttl_secs, is_loopback_host, redact_userinfo,
};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Body format of a webhook sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// The event envelope itself (a batch: `{"gateway":…,"events":[…]}`).
    #[default]
    Native,
    /// `{"data":{"chronothermostats":[…]}}` as the Smarther C2C webhook sends it.
    SmartherC2c,
    /// The sink's `body` template, one event per request.
    Template,
}

/// How a webhook sink authenticates to its receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WebhookAuth {
    #[default]
    None,
    ApiKey,
    Bearer,
    Oauth2RefreshToken,
    Oauth2ClientCredentials,
}

/// How the OAuth2 client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TokenAuth {
    /// `client_id`/`client_secret` in the form body (`client_secret_post`).
    #[default]
    Post,
    /// HTTP Basic (`client_secret_basic`).
    Basic,
}

/// HTTP method of a webhook request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum WebhookMethod {
    #[default]
    Post,
    Put,
    Patch,
}

/// `[[sinks.webhook]]`: one subscriber, single events by default, filtered, in its own shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSinkConfig {
    pub name: String,
    /// Placeholders (`{device_id}`, `{plant_id}`, `{module_id}`, `{gateway_id}`, `{type}`,
    /// `{event_id}`) only in the path and query, percent-encoded there.
    pub url: String,
    /// `POST` (default), `PUT` or `PATCH`.
    #[serde(default)]
    pub method: WebhookMethod,
    /// `native` (default), `smarther_c2c` or `template`.
    #[serde(default)]
    pub format: WebhookFormat,
    /// The body template of `format = "template"` (JSON with placeholders).
    #[serde(default)]
    pub body: Option<String>,
    /// `receiver.oid` of the `smarther_c2c` body; empty (default) leaves `receiver` out.
    #[serde(default)]
    pub c2c_receiver_oids: Vec<String>,
    /// Event types delivered; empty (default) = all.
    #[serde(default)]
    pub types: Vec<String>,
    /// Device ids delivered; empty (default) = all.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Plant ids delivered; empty (default) = all.
    #[serde(default)]
    pub plants: Vec<String>,
    /// `true` is accepted only for a loopback host. Default false.
    #[serde(default)]
    pub allow_insecure_http: bool,
    #[serde(default)]
    pub auth: WebhookAuth,
    #[serde(default)]
    pub api_key_header: Option<String>,
    #[serde(default)]
    pub api_key_query: Option<String>,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub bearer_token_file: Option<PathBuf>,
    #[serde(default)]
    pub bearer_token_env: Option<String>,
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_secret_env: Option<String>,
    #[serde(default)]
    pub refresh_token_file: Option<PathBuf>,
    #[serde(default)]
    pub refresh_token_env: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    /// `post` (default) or `basic`.
    #[serde(default)]
    pub token_auth: TokenAuth,
    #[serde(default)]
    pub signing_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub signing_secret_env: Option<String>,
    /// During a rotation the previous secret signs too (several `v1,` signatures).
    #[serde(default)]
    pub signing_secret_previous_file: Option<PathBuf>,
    #[serde(default)]
    pub signing_secret_previous_env: Option<String>,
    /// Sent as `x-api-version`. Default "1".
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// No answer within this is a failure. Default 750.
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    /// A status at or above this is a failure. Default 300.
    #[serde(default = "default_failure_status_min")]
    pub failure_status_min: u16,
    #[serde(default = "default_retry_schedule")]
    pub retry_schedule_secs: Vec<u64>,
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    /// Every this many consecutive failures bans the endpoint. Default 20; 0 = never.
    #[serde(default = "default_ban_every_failures")]
    pub ban_every_failures: u32,
    /// Ban length per set of `ban_every_failures`. Default 60.
    #[serde(default = "default_ban_step_secs")]
    pub ban_step_secs: u64,
    /// Longest ban. Default 1200.
    #[serde(default = "default_ban_max_secs")]
    pub ban_max_secs: u64,
    /// Consecutive failures after which the sink is `DISABLED_DUE_TO_ERRORS`. Default 100;
    /// 0 = never.
    #[serde(default = "default_failure_limit")]
    pub failure_limit: u32,
    /// `true`: while a ban lasts, every pending event the sink wants (the failing one too)
    /// becomes a dead letter `banned` (the vendors' lossy behaviour, but never silent).
    /// Default false: held and delivered afterwards.
    #[serde(default)]
    pub drop_during_ban: bool,
    #[serde(default = "default_hold_statuses")]
    pub hold_statuses: Vec<u16>,
    #[serde(default = "default_max_consecutive_rejected")]
    pub max_consecutive_rejected: u32,
    /// Events per request. Default 1.
    #[serde(default = "default_webhook_batch")]
    pub batch_max_events: usize,
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    #[serde(default)]
    pub from: StartFrom,
}

/// `[[sinks.mqtt]]`: the cloud's MQTT broker (QoS 1, persistent session).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    pub name: String,
    pub host: String,
    /// Default 8883 with TLS, 1883 without.
    #[serde(default)]
    pub port: Option<u16>,
    /// Fixed client id (the persistent session). Default `hvac-edge-<gateway.id>-<name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// Default true; `false` is accepted only for a loopback host.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// CA of the broker's certificate. Default: the platform's CA certificates.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (AWS IoT Core, Azure IoT Hub), with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Topic of each event. Placeholders `{gateway_id}`, `{device_id}`, `{type}`, `{plant_id}`,
    /// `{module_id}`. Default `hvac-edge/{gateway_id}/{device_id}/{type}`.
    #[serde(default = "default_mqtt_topic")]
    pub topic: String,
    /// Retained `online`/`offline` and the last will; "" = none.
    /// Default `hvac-edge/{gateway_id}/status`.
    #[serde(default = "default_status_topic")]
    pub status_topic: String,
    /// QoS 1 publishes awaiting PUBACK at once. Default 100.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Longest wait for the PUBACKs of a batch. Default 10000.
    #[serde(default = "default_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    #[serde(default = "default_retry_schedule")]
    pub retry_schedule_secs: Vec<u64>,
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u64,
    #[serde(default)]
    pub from: StartFrom,
}

impl MqttSinkConfig {
    /// The port in effect.
    pub fn effective_port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 8883 } else { 1883 })
    }

    /// The client id in effect.
    pub fn effective_client_id(&self, gateway: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("hvac-edge-{gateway}-{}", self.name))
    }

    /// The TLS client configuration, or `None` without TLS; reads the files.
    ///
    /// # Errors
    /// Every problem with the TLS files, each naming its key.
    pub fn tls_client_config(
        &self,
    ) -> Result<Option<rustls::ClientConfig>, Vec<crate::tls::FileError>> {
        super::tls_config(
            self.tls,
            self.ca_file.as_deref(),
            self.cert_file.as_deref(),
            self.key_file.as_deref(),
        )
    }
}

const fn default_true() -> bool {
    true
}
const fn default_failure_timeout_ms() -> u64 {
    750
}
const fn default_failure_status_min() -> u16 {
    300
}
const fn default_ban_every_failures() -> u32 {
    20
}
const fn default_ban_step_secs() -> u64 {
    60
}
const fn default_ban_max_secs() -> u64 {
    1200
}
const fn default_failure_limit() -> u32 {
    100
}
const fn default_webhook_batch() -> usize {
    1
}
fn default_mqtt_topic() -> String {
    "hvac-edge/{gateway_id}/{device_id}/{type}".into()
}
fn default_status_topic() -> String {
    "hvac-edge/{gateway_id}/status".into()
}
const fn default_max_inflight() -> u16 {
    100
}
const fn default_keep_alive_secs() -> u64 {
    30
}
const fn default_ack_timeout_ms() -> u64 {
    10_000
}

/// An optional path where `""` (as config.md writes "none") means none.
pub(crate) fn some_path(p: &Option<PathBuf>) -> Option<&Path> {
    p.as_deref().filter(|p| !p.as_os_str().is_empty())
}

/// The https-only rule of every URL a sink calls: `http://` only for a loopback host with
/// `allow_insecure_http = true`; no credentials in the URL. Returns the parsed URL if usable.
pub(crate) fn check_https_url(
    p: &mut Problems,
    key: &str,
    raw: &str,
    allow_insecure_http: bool,
    allow_key: &str,
) -> Option<url::Url> {
    match url::Url::parse(raw) {
        Err(e) => {
            p.add(
                key,
                format!("{:?} is not a valid URL: {e}", redact_userinfo(raw)),
            );
            None
        }
        Ok(u) if !u.username().is_empty() || u.password().is_some() => {
            p.add(
                key,
                "must not contain credentials; put the key in a secret file or environment variable",
            );
            None
        }
        Ok(u) => match u.scheme() {
            "https" => Some(u),
            "http" => {
                let host = u.host_str().unwrap_or("");
                if !is_loopback_host(host) {
                    p.add(
                        key,
                        "plain http:// is refused for non-loopback hosts; use https://",
                    );
                    None
                } else if !allow_insecure_http {
                    p.add(
                        key,
                        format!("plain http:// needs {allow_key} = true (accepted for loopback hosts only)"),
                    );
                    None
                } else {
                    Some(u)
                }
            }
            other => {
                p.add(
                    key,
                    format!("scheme {other:?} is not supported; use https://"),
                );
                None
            }
        },
    }
}

/// Exactly one of a secret's `_file` / `_env` (when `required`), read and checked.
fn secret(
    p: &mut Problems,
    k: &str,
    base: &str,
    file: &Option<PathBuf>,
    env: &Option<String>,
    required: Option<&str>,
) -> Option<String> {
    match (some_path(file), env) {
        (Some(_), Some(_)) => {
            p.add(
                format!("{k}.{base}_file"),
                format!("set {base}_file or {base}_env, not both"),
            );
            None
        }
        (Some(f), None) => check_secret_file(p, &format!("{k}.{base}_file"), f),
        (None, Some(e)) => check_secret_env(p, &format!("{k}.{base}_env"), e),
        (None, None) => {
            if let Some(why) = required {
                p.add(
                    format!("{k}.{base}_file"),
                    format!("{why} needs {base}_file or {base}_env"),
                );
            }
            None
        }
    }
}

/// Flags keys that do nothing under the chosen `auth`.
fn unused(p: &mut Problems, k: &str, auth: &str, keys: &[(&str, bool)]) {
    for (key, set) in keys {
        if *set {
            p.add(
                format!("{k}.{key}"),
                format!("is not used with auth = \"{auth}\"; remove it or change auth"),
            );
        }
    }
}

fn check_schedule(p: &mut Problems, k: &str, s: &[u64]) {
    if s.is_empty() {
        p.add(
            format!("{k}.retry_schedule_secs"),
            "must list at least one wait, e.g. [10, 30, 60, 300, 600]",
        );
    } else if s.iter().any(|&w| w == 0 || w > 86_400) {
        p.add(
            format!("{k}.retry_schedule_secs"),
            "every wait must be between 1 and 86400 seconds",
        );
    }
}

pub(crate) fn validate_webhook(p: &mut Problems, k: &str, s: &WebhookSinkConfig) {
    use crate::sinks::template::{BodyTemplate, UrlTemplate};
    match UrlTemplate::parse(&s.url) {
        Err(e) => p.add(format!("{k}.url"), e),
        Ok(t) => {
            if t.has_placeholders() && s.batch_max_events > 1 {
                p.add(
                    format!("{k}.batch_max_events"),
                    "must be 1 when the url has placeholders (each event may go to another URL)",
                );
            }
            let sample = t.sample();
            let token_is_http = s
                .token_url
                .as_deref()
                .is_some_and(|u| u.starts_with("http://"));
            if let Some(u) = check_https_url(
                p,
                &format!("{k}.url"),
                sample.as_str(),
                s.allow_insecure_http,
                "allow_insecure_http",
            ) && u.scheme() == "https"
                && s.allow_insecure_http
                && !token_is_http
            {
                p.add(
                    format!("{k}.allow_insecure_http"),
                    "only meaningful with an http:// URL; remove it",
                );
            }
        }
    }
    match (s.format, &s.body) {
        (WebhookFormat::Template, None) => p.add(
            format!("{k}.body"),
            "format = \"template\" needs a body template, e.g. body = '{\"device\":\"{device_id}\"}'",
        ),
        (WebhookFormat::Template, Some(b)) => {
            if let Err(e) = BodyTemplate::parse(b) {
                p.add(format!("{k}.body"), e);
            }
            if s.batch_max_events != 1 {
                p.add(
                    format!("{k}.batch_max_events"),
                    "must be 1 with format = \"template\" (a template describes one event)",
                );
            }
        }
        (_, Some(_)) => p.add(
            format!("{k}.body"),
            "is only used with format = \"template\"; remove it or set the format",
        ),
        (_, None) => {}
    }
    if s.format != WebhookFormat::SmartherC2c && !s.c2c_receiver_oids.is_empty() {
        p.add(
            format!("{k}.c2c_receiver_oids"),
            "is only used with format = \"smarther_c2c\"",
        );
    }
    let known: Vec<&str> = crate::model::EVENT_TYPES.to_vec();
    for (i, t) in s.types.iter().enumerate() {
        if !known.contains(&t.as_str()) {
            p.add(
                format!("{k}.types[{i}]"),
                format!("{t:?} is not an event type; known: {}", known.join(", ")),
            );
        }
    }
    for (i, d) in s.devices.iter().enumerate() {
        super::check_device_id(p, &format!("{k}.devices[{i}]"), d);
        if d.is_empty() {
            p.add(format!("{k}.devices[{i}]"), "must not be empty");
        }
    }
    for (i, d) in s.plants.iter().enumerate() {
        if d.is_empty() {
            p.add(format!("{k}.plants[{i}]"), "must not be empty");
        }
    }
    // Auth: exactly the keys of the chosen scheme.
    let api_key_set = s.api_key_header.is_some()
        || s.api_key_query.is_some()
        || some_path(&s.api_key_file).is_some()
        || s.api_key_env.is_some();
    let bearer_set = some_path(&s.bearer_token_file).is_some() || s.bearer_token_env.is_some();
    let oauth_set = s.token_url.is_some()
        || s.client_id.is_some()
        || some_path(&s.client_secret_file).is_some()
        || s.client_secret_env.is_some()
        || s.scope.is_some();
    let refresh_set = some_path(&s.refresh_token_file).is_some() || s.refresh_token_env.is_some();
    match s.auth {
        WebhookAuth::None => unused(
            p,
            k,
            "none",
            &[
                ("api_key_file", api_key_set),
                ("bearer_token_file", bearer_set),
                ("token_url", oauth_set),
                ("refresh_token_file", refresh_set),
            ],
        ),
        WebhookAuth::ApiKey => {
            unused(
                p,
                k,
                "api_key",
                &[
                    ("bearer_token_file", bearer_set),
                    ("token_url", oauth_set),
                    ("refresh_token_file", refresh_set),
                ],
            );
            match (&s.api_key_header, &s.api_key_query) {
                (Some(_), Some(_)) => p.add(
                    format!("{k}.api_key_query"),
                    "set api_key_header or api_key_query, not both",
                ),
                (None, None) => p.add(
                    format!("{k}.api_key_header"),
                    "auth = \"api_key\" needs api_key_header (e.g. \"x-api-key\") or api_key_query",
                ),
                (Some(h), None) => {
                    if reqwest::header::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        p.add(
                            format!("{k}.api_key_header"),
                            format!("{h:?} is not a valid HTTP header name"),
                        );
                    }
                }
                (None, Some(q)) => {
                    if q.is_empty() {
                        p.add(format!("{k}.api_key_query"), "must not be empty");
                    }
                }
            }
            let key = secret(
                p,
                k,
                "api_key",
                &s.api_key_file,
                &s.api_key_env,
                Some("auth = \"api_key\""),
            );
            if let Some(key) = key
                && s.api_key_header.is_some()
                && reqwest::header::HeaderValue::from_str(&key).is_err()
            {
                p.add(
                    format!("{k}.api_key_file"),
                    "the API key contains characters not allowed in a header",
                );
            }
        }
        WebhookAuth::Bearer => {
            unused(
                p,
                k,
                "bearer",
                &[
                    ("api_key_file", api_key_set),
                    ("token_url", oauth_set),
                    ("refresh_token_file", refresh_set),
                ],
            );
            secret(
                p,
                k,
                "bearer_token",
                &s.bearer_token_file,
                &s.bearer_token_env,
                Some("auth = \"bearer\""),
            );
        }
        WebhookAuth::Oauth2RefreshToken | WebhookAuth::Oauth2ClientCredentials => {
            let refresh = s.auth == WebhookAuth::Oauth2RefreshToken;
            let name = if refresh {
                "oauth2_refresh_token"
            } else {
                "oauth2_client_credentials"
            };
            unused(
                p,
                k,
                name,
                &[
                    ("api_key_file", api_key_set),
                    ("bearer_token_file", bearer_set),
                    ("refresh_token_file", refresh_set && !refresh),
                ],
            );
            match &s.token_url {
                None => p.add(
                    format!("{k}.token_url"),
                    format!("auth = \"{name}\" needs the token endpoint's URL"),
                ),
                Some(u) => {
                    check_https_url(
                        p,
                        &format!("{k}.token_url"),
                        u,
                        s.allow_insecure_http,
                        "allow_insecure_http",
                    );
                }
            }
            if s.client_id.as_deref().is_none_or(str::is_empty) {
                p.add(
                    format!("{k}.client_id"),
                    format!("auth = \"{name}\" needs client_id"),
                );
            }
            secret(
                p,
                k,
                "client_secret",
                &s.client_secret_file,
                &s.client_secret_env,
                (!refresh).then_some("auth = \"oauth2_client_credentials\""),
            );
            if refresh {
                secret(
                    p,
                    k,
                    "refresh_token",
                    &s.refresh_token_file,
                    &s.refresh_token_env,
                    Some("auth = \"oauth2_refresh_token\""),
                );
            }
        }
    }
    for (base, file, env) in [
        (
            "signing_secret",
            &s.signing_secret_file,
            &s.signing_secret_env,
        ),
        (
            "signing_secret_previous",
            &s.signing_secret_previous_file,
            &s.signing_secret_previous_env,
        ),
    ] {
        if let Some(v) = secret(p, k, base, file, env, None)
            && let Err(e) = crate::sinks::signing::SigningKey::from_whsec(&v)
        {
            p.add(
                format!("{k}.{base}_file"),
                format!("not a usable whsec_ secret: {e}"),
            );
        }
    }
    if (some_path(&s.signing_secret_previous_file).is_some()
        || s.signing_secret_previous_env.is_some())
        && some_path(&s.signing_secret_file).is_none()
        && s.signing_secret_env.is_none()
    {
        p.add(
            format!("{k}.signing_secret_previous_file"),
            "a previous secret needs the current one (signing_secret_file or signing_secret_env)",
        );
    }
    if s.api_version.is_empty() || reqwest::header::HeaderValue::from_str(&s.api_version).is_err() {
        p.add(
            format!("{k}.api_version"),
            "must be a non-empty header value",
        );
    }
    if !(100..=60_000).contains(&s.failure_timeout_ms) {
        p.add(
            format!("{k}.failure_timeout_ms"),
            "must be between 100 and 60000",
        );
    }
    // Above 300 a redirect, a 401 of a rotated key or a 404 would count as delivered: lost.
    if !(201..=300).contains(&s.failure_status_min) {
        p.add(
            format!("{k}.failure_status_min"),
            "must be between 201 and 300 (statuses from 200 up to it are successes; a redirect or an error is never one)",
        );
    }
    check_schedule(p, k, &s.retry_schedule_secs);
    if s.ttl_secs == 0 {
        p.add(format!("{k}.ttl_secs"), "must be at least 1");
    }
    if s.ban_every_failures != 0 && (s.ban_step_secs == 0 || s.ban_step_secs > 86_400) {
        p.add(format!("{k}.ban_step_secs"), "must be between 1 and 86400");
    }
    if s.ban_max_secs < s.ban_step_secs || s.ban_max_secs > 7 * 86_400 {
        p.add(
            format!("{k}.ban_max_secs"),
            "must be at least ban_step_secs and at most 604800",
        );
    }
    if s.failure_limit != 0 && s.failure_limit > 1_000_000 {
        p.add(
            format!("{k}.failure_limit"),
            "must be at most 1000000 (0 = never disable)",
        );
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
}

pub(crate) fn validate_mqtt(p: &mut Problems, k: &str, s: &MqttSinkConfig) {
    if s.host.trim().is_empty() {
        p.add(format!("{k}.host"), "must not be empty");
    } else if s.host.contains("://") || s.host.contains('/') {
        p.add(
            format!("{k}.host"),
            "must be a host name or address only (no scheme or path); TLS is set by tls, the port by port",
        );
    }
    if s.port == Some(0) {
        p.add(format!("{k}.port"), "must not be 0");
    }
    if !s.tls && !is_loopback_host(&s.host) {
        p.add(
            format!("{k}.tls"),
            "false is accepted only for a loopback broker; the upstream broker needs TLS",
        );
    }
    if !s.tls {
        for (key, set) in [
            ("ca_file", s.ca_file.is_some()),
            ("cert_file", s.cert_file.is_some()),
            ("key_file", s.key_file.is_some()),
        ] {
            if set {
                p.add(format!("{k}.{key}"), "needs tls = true");
            }
        }
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
        _ => {}
    }
    if s.tls
        && let Err(errors) = s.tls_client_config()
    {
        for e in errors {
            p.add(format!("{k}.{}", e.key), e.problem);
        }
    }
    if s.password_file.is_some() || s.password_env.is_some() {
        if s.username.is_none() {
            p.add(
                format!("{k}.username"),
                "a password is configured but no username",
            );
        }
        secret(p, k, "password", &s.password_file, &s.password_env, None);
    }
    if let Some(id) = &s.client_id
        && (id.is_empty() || id.len() > 128)
    {
        p.add(format!("{k}.client_id"), "must be 1-128 characters");
    }
    if let Err(e) = crate::sinks::mqtt::TopicTemplate::parse(&s.topic) {
        p.add(format!("{k}.topic"), e);
    }
    if !s.status_topic.is_empty()
        && let Err(e) = crate::sinks::mqtt::TopicTemplate::parse(&s.status_topic)
    {
        p.add(format!("{k}.status_topic"), e);
    }
    if !(1..=1000).contains(&s.max_inflight) {
        p.add(format!("{k}.max_inflight"), "must be between 1 and 1000");
    }
    if !(5..=3600).contains(&s.keep_alive_secs) {
        p.add(format!("{k}.keep_alive_secs"), "must be between 5 and 3600");
    }
    if !(100..=600_000).contains(&s.ack_timeout_ms) {
        p.add(
            format!("{k}.ack_timeout_ms"),
            "must be between 100 and 600000",
        );
    }
    check_schedule(p, k, &s.retry_schedule_secs);
    if s.ttl_secs == 0 {
        p.add(format!("{k}.ttl_secs"), "must be at least 1");
    }
}
