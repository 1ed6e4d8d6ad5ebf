//! The single integration-test binary (one link step, shared harness).
//!
//! Every test runs against real components on loopback: a mosquitto broker started per test,
//! HTTP receivers on 127.0.0.1, real SQLite files in temp dirs, the real binary for process tests.

mod harness;

/// Malformed, oversized, unknown, retained and duplicate messages.
mod bad_input;
/// The CLI: check-config, queue stats.
mod cli;
/// The technician's control path: queue retry/purge, sinks test, audit.
mod control;
/// SIGKILL of the real binary while publishing and delivering; restart on the same database.
mod crash;
/// Deployment: the daemon's topology (build before start).
mod deploy;
/// `hvac-edge doctor`: healthy and broken sites, exact statuses and fixes per check.
mod doctor;
/// Fan-out: webhook, HTTP and MQTT sinks at once; the webhook delivery rules (750 ms, bans,
/// disable, drop_during_ban, expiry, 410), filters, templates and the Smarther C2C body.
mod fanout;
/// Hostile publishers: bad ids, floods, oversize packets, TLS, secrets.
mod hostile;
/// Signatures checked by the reference Standard Webhooks library.
mod interop;
/// /metrics and /healthz.
mod metrics;
/// Receiver down while events are produced, then up.
mod outage;
/// Zigbee2MQTT and generic JSON through the whole pipeline to a verifying receiver.
mod pipeline;
/// Live reload: SIGHUP and `hvac-edge reload` on the real binary.
mod reload;
mod serial;
/// The technician's read-only commands (status, devices, queue list/show/tail/export) on a real daemon's database; screens under tmux.
mod technician;
/// Endpoint errors, bisection, timeouts, clock steps, store errors, corrupt files.
mod trust;
/// The MQTT upstream sink: broker restarts, retained status and last will, client certificates.
mod upstream;
/// Webhook credentials: signatures checked by the reference library during a rotation, OAuth2.
mod webhook_auth;
