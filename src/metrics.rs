//! The local observability endpoint (opt-in `[metrics] listen`): `GET /metrics` in the
//! Prometheus text format and `GET /healthz`.
//!
//! Counters the daemon already keeps (the writer's, the sources') are read at scrape time by a
//! collector, so nothing on the hot paths changes for an endpoint nobody scrapes; per-sink
//! figures come from the `sinks` and `dead_letters` rows and the commit position (counters and
//! indexed lookups: no scan of `events`). The two latency histograms are observed where the
//! time is known: commit latency in the writer, observation-to-acknowledgement latency in each
//! sink.

use crate::channel::Link;
use crate::sources::SharedStats;
use crate::store::writer::WriterStats;
use crate::store::{self, Mode, Options};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The sources as the daemon runs them (a reload changes the list).
pub type SourceList = Arc<Mutex<Vec<(String, &'static str, SharedStats)>>>;

type Labels = Vec<(String, String)>;
type LatencyFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn new_latency() -> Histogram {
    Histogram::new(crate::telemetry::LATENCY_BUCKETS)
}

/// A writer alive but without a housekeeping run for this long is reported unhealthy.
const HOUSEKEEPING_STALE_MS: i64 = 15_000;

/// The sinks' delivery latency histograms, one per sink name (made before the sinks are
/// built, read by the endpoint).
#[derive(Clone, Debug)]
pub struct Latencies(LatencyFamily);

impl Default for Latencies {
    fn default() -> Self {
        Latencies(Family::new_with_constructor(new_latency))
    }
}

impl Latencies {
    /// The histogram of sink `name` (observation to acknowledgement).
    pub fn for_sink(&self, name: &str) -> crate::telemetry::LatencyHistogram {
        let labels = vec![("sink".to_string(), name.to_string())];
        crate::telemetry::LatencyHistogram(self.0.get_or_create(&labels).clone())
    }
}

/// What the endpoint reads.
#[derive(Clone)]
pub struct Metrics {
    writer: Arc<WriterStats>,
    db: PathBuf,
    opts: Options,
    committed: watch::Receiver<i64>,
    sources: SourceList,
    delivery: LatencyFamily,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("db", &self.db).finish()
    }
}

impl Metrics {
    /// The endpoint's view of a running daemon.
    pub fn new(
        writer: Arc<WriterStats>,
        db: PathBuf,
        opts: Options,
        committed: watch::Receiver<i64>,
        sources: SourceList,
        latencies: &Latencies,
    ) -> Metrics {
        Metrics {
            writer,
            db,
            opts,
            committed,
            sources,
            delivery: latencies.0.clone(),
        }
    }

    /// The text of `GET /metrics` (blocking: reads the database).
    pub fn render(&self) -> String {
        let mut reg = Registry::with_prefix("hvac_edge");
        reg.register(
            "commit_latency_seconds",
            "Time to diff, write and commit one group of observations",
            self.writer.commit_latency.0.clone(),
        );
        reg.register(
            "delivery_latency_seconds",
            "Time from an observation to its acknowledgement by a sink's receiver",
            self.delivery.clone(),
        );
        reg.register_collector(Box::new(Scrape(self.clone())));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            tracing::warn!(error = %e, "Cannot encode /metrics");
        }
        out
    }

    /// `GET /healthz`: None when healthy, else why not.
    pub fn unhealthy(&self) -> Option<String> {
        if !self.writer.alive.load(Ordering::SeqCst) {
            return Some("the writer is not running".into());
        }
        let age =
            crate::telemetry::now_ms() - self.writer.last_housekeeping_ms.load(Ordering::Relaxed);
        if age > HOUSEKEEPING_STALE_MS {
            return Some(format!(
                "the writer has not run its housekeeping for {} s (stuck on the disk?)",
                age / 1000
            ));
        }
        if let Some(e) = self.writer.commit_error() {
            return Some(format!("the database is not writable: {e}"));
        }
        None
    }
}

/// Scrape-time values.
#[derive(Debug)]
struct Scrape(Metrics);

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

/// One labelled family of counters.
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// One labelled family of gauges.
fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Per-sink figures read from the database.
struct SinkFigures {
    name: String,
    status: String,
    delivered: i64,
    failed: i64,
    dead: i64,
    depth: i64,
    oldest_age_ms: i64,
}

impl Scrape {
    fn sinks(&self) -> Result<(Vec<SinkFigures>, u64, u64), store::Error> {
        let m = &self.0;
        let conn = store::open(&m.db, Mode::ReadOnly, &m.opts)?;
        let q = crate::store::outbox::sink_figures(&conn, &m.db, *m.committed.borrow())?;
        let now = crate::telemetry::now_ms();
        let rows = q
            .into_iter()
            .map(|f| SinkFigures {
                oldest_age_ms: f.oldest_pending_observed_at.map_or(0, |t| (now - t).max(0)),
                name: f.name,
                status: f.status,
                delivered: f.delivered,
                failed: f.failed,
                dead: f.dead,
                depth: f.depth,
            })
            .collect();
        let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut wal = m.db.clone().into_os_string();
        wal.push("-wal");
        Ok((rows, size(&m.db), size(std::path::Path::new(&wal))))
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let w = &self.0.writer;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut enc,
            "observations",
            "Observations the writer received",
            get(&w.observations),
        )?;
        counter(&mut enc, "commits", "Group commits", get(&w.commits))?;
        counter(
            &mut enc,
            "duplicates_dropped",
            "MQTT redeliveries of committed messages dropped",
            get(&w.duplicates_dropped),
        )?;
        counter(
            &mut enc,
            "device_conflicts",
            "Observations of a device owned by another source, dropped",
            get(&w.conflicts),
        )?;
        counter(
            &mut enc,
            "devices_rejected",
            "Observations of new devices over pipeline.max_devices, dropped",
            get(&w.devices_rejected),
        )?;
        counter(
            &mut enc,
            "events_evicted",
            "Events evicted by the size cap",
            get(&w.evicted),
        )?;
        gauge(
            &mut enc,
            "events_stored",
            "Events in the outbox",
            i64::try_from(get(&w.stored)).unwrap_or(i64::MAX),
        )?;
        let by_type: Vec<(Labels, u64)> = match w.events_by_type.lock() {
            Ok(m) => m.iter().map(|(k, v)| (l(&[("type", k)]), *v)).collect(),
            Err(p) => p
                .into_inner()
                .iter()
                .map(|(k, v)| (l(&[("type", k)]), *v))
                .collect(),
        };
        counters(
            &mut enc,
            "events_committed",
            "Events committed, by type",
            &by_type,
        )?;
        gauge(
            &mut enc,
            "writer_up",
            "1 while the writer runs and can commit",
            i64::from(self.0.unhealthy().is_none()),
        )?;
        // Sources.
        let sources: Vec<(String, &'static str, SharedStats)> = match self.0.sources.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut link = Vec::new();
        let mut counts = Vec::new();
        for (name, kind, st) in &sources {
            let snap = st.snapshot(name, kind);
            let up = i64::from(matches!(snap.link, Link::Connected | Link::None));
            link.push((l(&[("source", name), ("kind", kind)]), up));
            for (c, v) in &snap.counters {
                counts.push((l(&[("source", name), ("counter", c)]), *v));
            }
        }
        gauges(
            &mut enc,
            "source_up",
            "1 when the source's link is up (port open, broker connected)",
            &link,
        )?;
        counters(
            &mut enc,
            "source_events",
            "Per-source counters (messages, malformed, timeouts, …)",
            &counts,
        )?;
        // Sinks and the file, from the database.
        match self.sinks() {
            Ok((rows, db, wal)) => {
                let pick = |f: &dyn Fn(&SinkFigures) -> i64| -> Vec<(Labels, i64)> {
                    rows.iter()
                        .map(|r| (l(&[("sink", &r.name)]), f(r)))
                        .collect()
                };
                let pick_u = |f: &dyn Fn(&SinkFigures) -> i64| -> Vec<(Labels, u64)> {
                    rows.iter()
                        .map(|r| (l(&[("sink", &r.name)]), u64::try_from(f(r)).unwrap_or(0)))
                        .collect()
                };
                counters(
                    &mut enc,
                    "sink_delivered",
                    "Events delivered",
                    &pick_u(&|r| r.delivered),
                )?;
                counters(
                    &mut enc,
                    "sink_failed_attempts",
                    "Delivery attempts that failed",
                    &pick_u(&|r| r.failed),
                )?;
                gauges(
                    &mut enc,
                    "sink_dead_letters",
                    "Dead letters now",
                    &pick(&|r| r.dead),
                )?;
                gauges(
                    &mut enc,
                    "sink_queue_depth",
                    "Events waiting for the sink",
                    &pick(&|r| r.depth),
                )?;
                gauges(
                    &mut enc,
                    "sink_oldest_pending_age_seconds",
                    "Age of the oldest waiting event",
                    &pick(&|r| r.oldest_age_ms / 1000),
                )?;
                let status: Vec<(Labels, i64)> = rows
                    .iter()
                    .map(|r| (l(&[("sink", &r.name), ("status", &r.status)]), 1))
                    .collect();
                gauges(
                    &mut enc,
                    "sink_status",
                    "The sink's status (ACTIVE, BANNED, PAUSED, DISABLED_DUE_TO_ERRORS)",
                    &status,
                )?;
                gauge(
                    &mut enc,
                    "database_bytes",
                    "Database file size",
                    i64::try_from(db).unwrap_or(i64::MAX),
                )?;
                gauge(
                    &mut enc,
                    "wal_bytes",
                    "WAL file size",
                    i64::try_from(wal).unwrap_or(i64::MAX),
                )?;
            }
            Err(e) => tracing::warn!(error = %e, "/metrics: cannot read the database"),
        }
        Ok(())
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown`.
pub async fn serve(
    metrics: Metrics,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let m1 = metrics.clone();
    let m2 = metrics;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = m1.clone();
                async move {
                    match tokio::task::spawn_blocking(move || m.render()).await {
                        Ok(body) => (
                            StatusCode::OK,
                            [(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            body,
                        )
                            .into_response(),
                        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || {
                let m = m2.clone();
                async move {
                    match m.unhealthy() {
                        None => (StatusCode::OK, "ok\n".to_string()),
                        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    }
                }
            }),
        );
    let stop = shutdown.clone();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "The metrics endpoint stopped");
    }
}

/// Binds the endpoint's address (a failure names the key).
///
/// # Errors
/// The address cannot be bound.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen: cannot listen on {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(stats: Arc<WriterStats>) -> Metrics {
        let (_tx, rx) = watch::channel(0);
        Metrics::new(
            stats,
            PathBuf::from("/nonexistent/hvac-edge.db"),
            Options::default(),
            rx,
            SourceList::default(),
            &Latencies::default(),
        )
    }

    #[test]
    fn healthz_says_why_the_writer_is_not_healthy() {
        let st = Arc::new(WriterStats::default());
        let m = metrics(st.clone());
        assert_eq!(m.unhealthy().as_deref(), Some("the writer is not running"));
        st.alive.store(true, Ordering::SeqCst);
        st.last_housekeeping_ms
            .store(crate::telemetry::now_ms(), Ordering::Relaxed);
        assert_eq!(m.unhealthy(), None);
        if let Ok(mut e) = st.commit_error.lock() {
            *e = Some("database or disk is full".into());
        }
        assert_eq!(
            m.unhealthy().as_deref(),
            Some("the database is not writable: database or disk is full")
        );
        if let Ok(mut e) = st.commit_error.lock() {
            *e = None;
        }
        st.last_housekeeping_ms
            .store(crate::telemetry::now_ms() - 60_000, Ordering::Relaxed);
        assert!(
            m.unhealthy()
                .is_some_and(|w| w.starts_with("the writer has not run its housekeeping for 60 s"))
        );
    }

    #[test]
    fn a_scrape_without_a_database_still_renders_the_writer_figures() {
        let st = Arc::new(WriterStats::default());
        st.observations.store(7, Ordering::Relaxed);
        let text = metrics(st).render();
        assert!(text.contains("hvac_edge_observations_total 7\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
