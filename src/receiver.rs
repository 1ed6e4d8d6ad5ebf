//! A loopback upstream receiver: verifies Standard Webhooks signatures and checks what arrives.
//!
//! Used by `hvac-edge demo` (and the benchmark) as the far end of the HTTP sink. It drops
//! duplicate event ids, checks that every device's `seq` arrives gap-free and in order, and can be
//! taken down and brought back on the same port to show an outage. Not a production ingest.

use crate::model::Event;
use crate::sinks::signing::{self, SigningKey};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the receiver has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub requests: u64,
    pub signatures_verified: u64,
    pub signatures_rejected: u64,
    pub refused_while_down: u64,
    /// Distinct event ids received.
    pub unique_events: u64,
    /// Events received again (same id): expected after retries or a crash.
    pub duplicate_events: u64,
    /// Per-device `seq` jumps (missing events).
    pub gaps: u64,
    /// Per-device `seq` going backwards with a new id.
    pub out_of_order: u64,
}

#[derive(Default)]
struct Log {
    seen: HashSet<String>,
    last_seq: HashMap<String, u64>,
    summary: Summary,
}

struct Shared {
    key: Option<SigningKey>,
    up: AtomicBool,
    verbose: bool,
    log: Mutex<Log>,
    events_total: AtomicU64,
}

/// A running receiver.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Deserialize)]
struct Batch {
    gateway: String,
    events: Vec<Event>,
}

impl Receiver {
    /// Listens on `addr` (port 0 for any); verifies signatures when `key` is set; prints each
    /// event when `verbose`.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn start(
        addr: SocketAddr,
        key: Option<SigningKey>,
        verbose: bool,
    ) -> std::io::Result<Receiver> {
        let shared = Arc::new(Shared {
            key,
            up: AtomicBool::new(true),
            verbose,
            log: Mutex::new(Log::default()),
            events_total: AtomicU64::new(0),
        });
        let mut r = Receiver {
            addr,
            shared,
            server: None,
        };
        r.bind().await?;
        Ok(r)
    }

    async fn bind(&mut self) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        self.addr = listener.local_addr()?;
        let shared = self.shared.clone();
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move { handle(&shared, &headers, &body) }
            },
        ));
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
        self.shared.up.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Goes away: closes the listener (new connections are refused) and answers 503 on any
    /// connection still open.
    pub fn stop(&mut self) {
        self.shared.up.store(false, Ordering::SeqCst);
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }

    /// Comes back on the same address.
    ///
    /// # Errors
    /// When the address cannot be bound again.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.bind().await
    }

    /// Counters so far.
    pub fn summary(&self) -> Summary {
        match self.shared.log.lock() {
            Ok(l) => l.summary.clone(),
            Err(p) => p.into_inner().summary.clone(),
        }
    }

    /// Events received (including duplicates), cheap to read.
    pub fn events_total(&self) -> u64 {
        self.shared.events_total.load(Ordering::Relaxed)
    }
}

fn handle(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> (StatusCode, &'static str) {
    if !shared.up.load(Ordering::SeqCst) {
        if let Ok(mut l) = shared.log.lock() {
            l.summary.refused_while_down += 1;
        }
        return (StatusCode::SERVICE_UNAVAILABLE, "receiver is down");
    }
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    if let Some(key) = &shared.key {
        let ts: i64 = header(signing::HEADER_TIMESTAMP).parse().unwrap_or(0);
        let now = crate::telemetry::now_ms() / 1000;
        let ok = signing::verify(
            key,
            header(signing::HEADER_ID),
            ts,
            header(signing::HEADER_SIGNATURE),
            body,
            now,
            signing::DEFAULT_TOLERANCE_SECS,
        )
        .is_ok();
        if let Ok(mut l) = shared.log.lock() {
            l.summary.requests += 1;
            if ok {
                l.summary.signatures_verified += 1;
            } else {
                l.summary.signatures_rejected += 1;
            }
        }
        if !ok {
            return (StatusCode::UNAUTHORIZED, "bad signature");
        }
    }
    let batch: Batch = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(_) => return (StatusCode::BAD_REQUEST, "body is not an hvac-edge batch"),
    };
    shared
        .events_total
        .fetch_add(batch.events.len() as u64, Ordering::Relaxed);
    let Ok(mut l) = shared.log.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "lock");
    };
    if shared.key.is_none() {
        l.summary.requests += 1;
    }
    for e in &batch.events {
        if !l.seen.insert(e.id.clone()) {
            l.summary.duplicate_events += 1;
            continue;
        }
        l.summary.unique_events += 1;
        let last = l.last_seq.get(&e.device).copied().unwrap_or(0);
        if e.seq == last + 1 {
        } else if e.seq > last + 1 {
            l.summary.gaps += 1;
        } else {
            l.summary.out_of_order += 1;
        }
        l.last_seq.insert(e.device.clone(), e.seq.max(last));
        if shared.verbose {
            println!(
                "  receiver <- {} {:<11} {:>4}  {:<15} {}",
                batch.gateway,
                e.device,
                e.seq,
                e.kind,
                describe(e)
            );
        }
    }
    (StatusCode::NO_CONTENT, "")
}

fn describe(e: &Event) -> String {
    let show = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => match (o.get("value"), o.get("unit")) {
            (Some(serde_json::Value::String(v)), Some(serde_json::Value::String(u))) => {
                format!("{v} {u}")
            }
            _ => v.to_string(),
        },
        other => other.to_string(),
    };
    if e.kind == "snapshot" {
        let s = &e.state;
        format!(
            "mode {} setpoint {} temperature {}",
            s.mode.map_or("-".into(), |m| m.to_string()),
            show(&s.field_json(crate::model::Field::Setpoint)),
            show(&s.field_json(crate::model::Field::Temperature)),
        )
    } else {
        format!(
            "{} -> {}   (observed {})",
            show(&e.previous),
            show(&e.current),
            e.observed_at.get(11..23).unwrap_or(&e.observed_at)
        )
    }
}
