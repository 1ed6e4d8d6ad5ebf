//! The receiver's own capacity: pre-built signed batches of 500 events POSTed over one
//! keep-alive connection to `hvac_edge::receiver::Receiver`.

use super::Deadline;
use super::events::{DEVICES, batch_body, setpoint_event};
use anyhow::Context as _;
use hvac_edge::receiver::Receiver;
use hvac_edge::sinks::signing::{self, SigningKey};
use std::time::{Duration, Instant};

/// Events per request, like the sink's `batch_max_events`.
pub const BATCH: usize = 500;

/// A signed request ready to send.
struct Prebuilt {
    body: Vec<u8>,
    headers: signing::SignedHeaders,
}

/// Outcome of the load run.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub events: u64,
    pub secs: f64,
    pub events_per_sec: f64,
}

/// Builds `batches` signed bodies of unique events (per-device `seq` gap-free).
fn prebuild(key: &SigningKey, batches: usize) -> anyhow::Result<Vec<Prebuilt>> {
    let now = hvac_edge::telemetry::now_ms();
    let mut seqs = vec![0u64; DEVICES];
    let mut out = Vec::with_capacity(batches);
    for b in 0..batches {
        let mut payloads = Vec::with_capacity(BATCH);
        for i in 0..BATCH {
            let d = (b * BATCH + i) % DEVICES;
            seqs[d] += 1;
            payloads.push(serde_json::to_string(&setpoint_event(d, seqs[d], now))?);
        }
        let body = batch_body(&payloads);
        let headers = signing::headers(key, &format!("msg_bench_{b}"), now / 1000, &body);
        out.push(Prebuilt { body, headers });
    }
    Ok(out)
}

/// Starts a quiet, signature-checking receiver on 127.0.0.1:0 and loads it with up to `batches`
/// requests (sent one after the other on one connection) or `max_time`, whichever comes first.
pub async fn capacity(
    key: SigningKey,
    batches: usize,
    max_time: Duration,
) -> anyhow::Result<Capacity> {
    hvac_edge::tls::install_crypto_provider();
    let reqs = prebuild(&key, batches)?;
    let receiver = Receiver::start(([127, 0, 0, 1], 0).into(), Some(key), false).await?;
    let url = format!("http://{}/ingest", receiver.addr());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()?;
    let deadline = Deadline::after(max_time);
    let start = Instant::now();
    let mut sent = 0u64;
    for r in reqs {
        if deadline.passed() {
            break;
        }
        let resp = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-api-version", "1")
            .header(signing::HEADER_ID, r.headers.id)
            .header(signing::HEADER_TIMESTAMP, r.headers.timestamp)
            .header(signing::HEADER_SIGNATURE, r.headers.signature)
            .body(r.body)
            .send()
            .await
            .context("POST to the receiver")?;
        if !resp.status().is_success() {
            anyhow::bail!("receiver answered {}", resp.status());
        }
        sent += BATCH as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let s = receiver.summary();
    if s.unique_events != sent || s.signatures_rejected != 0 {
        anyhow::bail!(
            "receiver load check failed: sent {sent}, unique {}, rejected signatures {}",
            s.unique_events,
            s.signatures_rejected
        );
    }
    Ok(Capacity {
        events: sent,
        secs,
        events_per_sec: sent as f64 / secs,
    })
}
