//! A small signature-checking receiver that records, per event, receive time minus `observed_at`
//! (same machine clock), and counts distinct event ids. The daemon's sink posts to it.

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use hvac_edge::model::{Event, parse_rfc3339_ms};
use hvac_edge::sinks::signing::{self, SigningKey};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(serde::Deserialize)]
struct Batch {
    events: Vec<Event>,
}

#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    latencies_ms: Vec<i64>,
}

struct Shared {
    key: SigningKey,
    recording: AtomicBool,
    unique: AtomicU64,
    rejected: AtomicU64,
    seen: Mutex<Seen>,
}

/// The running receiver; the server task ends with the runtime.
pub struct LatencyReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl LatencyReceiver {
    /// Listens on 127.0.0.1:0.
    pub async fn start(key: SigningKey) -> anyhow::Result<LatencyReceiver> {
        let shared = Arc::new(Shared {
            key,
            recording: AtomicBool::new(false),
            unique: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            seen: Mutex::new(Seen::default()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let s = shared.clone();
        let app = axum::Router::new().fallback(axum::routing::post(
            move |headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move { handle(&s, &headers, &body) }
            },
        ));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(LatencyReceiver { addr, shared, task })
    }

    /// The sink URL.
    pub fn url(&self) -> String {
        format!("http://{}/ingest", self.addr)
    }

    /// Distinct events received so far.
    pub fn unique(&self) -> u64 {
        self.shared.unique.load(Ordering::Relaxed)
    }

    /// Requests refused for a bad signature.
    pub fn rejected(&self) -> u64 {
        self.shared.rejected.load(Ordering::Relaxed)
    }

    /// Starts recording latencies (clearing earlier ones).
    pub fn record(&self, on: bool) {
        if on && let Ok(mut s) = self.shared.seen.lock() {
            s.latencies_ms.clear();
        }
        self.shared.recording.store(on, Ordering::SeqCst);
    }

    /// The recorded latencies, in ms.
    pub fn latencies(&self) -> Vec<i64> {
        match self.shared.seen.lock() {
            Ok(s) => s.latencies_ms.clone(),
            Err(p) => p.into_inner().latencies_ms.clone(),
        }
    }
}

impl Drop for LatencyReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn handle(s: &Shared, headers: &HeaderMap, body: &[u8]) -> StatusCode {
    let now = hvac_edge::telemetry::now_ms();
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ts: i64 = h(signing::HEADER_TIMESTAMP).parse().unwrap_or(0);
    if signing::verify(
        &s.key,
        h(signing::HEADER_ID),
        ts,
        h(signing::HEADER_SIGNATURE),
        body,
        now / 1000,
        signing::DEFAULT_TOLERANCE_SECS,
    )
    .is_err()
    {
        s.rejected.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(batch) = serde_json::from_slice::<Batch>(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let recording = s.recording.load(Ordering::SeqCst);
    let Ok(mut seen) = s.seen.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    for e in batch.events {
        if recording && let Some(at) = parse_rfc3339_ms(&e.observed_at) {
            seen.latencies_ms.push(now - at);
        }
        if seen.ids.insert(e.id) {
            s.unique.fetch_add(1, Ordering::Relaxed);
        }
    }
    StatusCode::NO_CONTENT
}

/// The `q`-quantile (0..=1) of `v` (nearest rank), or None when empty.
pub fn quantile(v: &mut [i64], q: f64) -> Option<i64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}
