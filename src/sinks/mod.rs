//! Sinks: the one delivery loop shared by every sink kind, plus the kinds' transports.
//!
//! Loop: wait for the retry time or a new commit mark, read a batch at the sink's own cursor
//! (its own connection), move expired events to dead letters, deliver, record the verdict
//! (advance the cursor / schedule a retry / dead-letter the batch). Events leave in commit order,
//! so per-device `seq` order is never broken. The cursor is persisted at most once a second while
//! delivering (flash wear); after a crash the unpersisted tail is delivered again (same ids).
//! On shutdown an in-flight request finishes within its own timeout; nothing new starts.

pub mod delivery;
pub mod http;
pub mod signing;

use crate::config::HttpSinkConfig;
use crate::store::outbox::{self, DeadReason, SinkRow};
use crate::store::{self, Options};
use delivery::{RetryPolicy, Verdict, classify};
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `last_error` while deliveries wait for the clock.
const CLOCK_NOT_SET: &str = "gateway clock not set (before 2024); deliveries held";

/// SQLite page cache of a sink's connection, KiB.
const SINK_CACHE_KIB: u32 = 512;

/// How often delivered progress is persisted while events flow.
const PROGRESS_FLUSH: Duration = Duration::from_secs(1);

/// Errors that stop a sink task.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("sink {sink}: blocking task failed: {message}")]
    Join { sink: String, message: String },
    #[error(transparent)]
    Build(#[from] http::BuildError),
}

/// A configured HTTP sink, ready to run.
pub struct HttpSink {
    cfg: HttpSinkConfig,
    transport: http::HttpTransport,
    policy: RetryPolicy,
}

impl HttpSink {
    /// Builds the sink (resolves secrets, builds the client).
    ///
    /// # Errors
    /// The sink's config problem, naming it.
    pub fn new(cfg: HttpSinkConfig, gateway: &str) -> Result<HttpSink, Error> {
        let transport = http::HttpTransport::new(&cfg, gateway)?;
        let policy = RetryPolicy {
            schedule_secs: cfg.retry_schedule_secs.clone(),
            jitter_fraction: 0.2,
            max_retry_after_secs: 3600,
        };
        Ok(HttpSink {
            cfg,
            transport,
            policy,
        })
    }

    /// Runs the delivery loop until `shutdown` is cancelled (or the writer is gone and the
    /// backlog is delivered as far as possible).
    ///
    /// # Errors
    /// Store errors (the database became unusable).
    pub async fn run(
        self,
        db: PathBuf,
        opts: Options,
        mut committed_rx: watch::Receiver<i64>,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let name = self.cfg.name.clone();
        let conn = store::open(&db, store::Mode::ReadWrite, &opts)?;
        // A sink reads recent pages sequentially (hot in the OS page cache anyway): a small
        // SQLite cache keeps the daemon's resident memory down on small gateways.
        conn.execute_batch(&format!("PRAGMA cache_size = -{SINK_CACHE_KIB};"))
            .map_err(|source| store::Error::Sqlite {
                path: db.clone(),
                source,
            })?;
        let now = crate::telemetry::now_ms();
        let row = outbox::ensure_sink(&conn, &db, &name, "http", self.cfg.from, now)?;
        let mut st = LoopState {
            db: Arc::new(db),
            conn: Arc::new(Mutex::new(conn)),
            name: name.clone(),
            row,
            dirty: false,
            last_flush: Instant::now(),
        };
        // A retry schedule does not survive a restart: the daemon starting is a good moment to try.
        st.row.next_attempt_at = None;
        tracing::info!(sink = %name, cursor = st.row.cursor, "Sink started");
        let mut writer_gone = false;
        // Events per request; halved on 413 Payload Too Large, grown back after successes.
        let mut batch_limit = self.cfg.batch_max_events;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if let Some(at) = st.row.next_attempt_at {
                let wait = Duration::from_millis((at - crate::telemetry::now_ms()).max(0) as u64);
                if !wait.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
            // A gateway without RTC boots with its clock in the past: signatures would carry a
            // timestamp receivers reject, and ages would be wrong. Hold deliveries until it is set.
            if crate::telemetry::now_ms() < crate::telemetry::CLOCK_SANE_MIN_MS {
                if st.row.last_error.as_deref() != Some(CLOCK_NOT_SET) {
                    tracing::warn!(sink = %name, "Gateway clock is not set (before 2024); holding deliveries until it is");
                }
                st.row.last_error = Some(CLOCK_NOT_SET.to_string());
                st.row.next_attempt_at = Some(crate::telemetry::now_ms() + 10_000);
                st.dirty = true;
                st.flush(false).await?;
                continue;
            }
            let cursor = st.row.cursor;
            let (max_n, max_b) = (
                batch_limit,
                self.cfg
                    .batch_max_bytes
                    .saturating_sub(self.transport.wrapper_bytes())
                    .max(1),
            );
            let batch = st
                .blocking(move |c, p| outbox::read_batch(c, p, cursor, max_n, max_b))
                .await??;
            if batch.is_empty() {
                st.flush(false).await?;
                if writer_gone {
                    break;
                }
                // Idle with unsaved progress: save it once the flush interval is up, so that
                // `queue stats` and garbage collection see it without waiting for new events.
                let flush_in = if st.dirty {
                    PROGRESS_FLUSH.saturating_sub(st.last_flush.elapsed())
                } else {
                    Duration::MAX
                };
                tokio::select! {
                    r = committed_rx.changed() => if r.is_err() { writer_gone = true; },
                    _ = tokio::time::sleep(flush_in), if st.dirty => st.flush(true).await?,
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            // TTL: the expired head of the batch becomes dead letters, reason "expired".
            let now = crate::telemetry::now_ms();
            let ttl_ms = (self.cfg.ttl_secs as i64).saturating_mul(1000);
            let expired = batch
                .iter()
                // Events observed before the clock was set have no meaningful age: never expired.
                .take_while(|e| {
                    e.observed_at >= crate::telemetry::CLOCK_SANE_MIN_MS
                        && now - e.observed_at > ttl_ms
                })
                .count();
            if expired > 0 {
                let dead: Vec<_> = batch[..expired].to_vec();
                st.row.cursor = dead[dead.len() - 1].pos;
                tracing::warn!(sink = %name, count = expired, "Events older than ttl_secs moved to dead letters (expired)");
                st.dead_letter(dead, "expired", None, None).await?;
                continue;
            }
            st.row.attempts += 1;
            let outcome = self.transport.deliver(&batch).await;
            let failures = st.row.consecutive_failures as u32 + 1;
            let verdict = classify(
                &outcome,
                &self.policy,
                failures,
                fastrand::f64(),
                std::time::SystemTime::now(),
            );
            let now = crate::telemetry::now_ms();
            let last = batch[batch.len() - 1].pos;
            match verdict {
                Verdict::Permanent { status: 413, .. } if batch.len() > 1 => {
                    // Too large for the receiver, not wrong: retry at once with half as many events.
                    batch_limit = (batch.len() / 2).max(1);
                    tracing::warn!(sink = %name, events = batch.len(), next = batch_limit,
                        "Upstream answered 413 Payload Too Large; retrying with smaller batches");
                    continue;
                }
                Verdict::Delivered => {
                    batch_limit = (batch_limit * 2).min(self.cfg.batch_max_events);
                    if st.row.consecutive_failures > 0 {
                        tracing::info!(sink = %name, after_failures = st.row.consecutive_failures, "Upstream accepts events again");
                    }
                    st.row.cursor = last;
                    st.row.delivered += batch.len() as i64;
                    st.row.consecutive_failures = 0;
                    st.row.next_attempt_at = None;
                    st.row.last_success_at = Some(now);
                    st.row.last_error = None;
                    if let delivery::Outcome::Status { code, .. } = outcome {
                        st.row.last_status = Some(i64::from(code));
                    }
                    st.dirty = true;
                    st.flush(false).await?;
                    tracing::trace!(sink = %name, count = batch.len(), cursor = last, "Delivered");
                }
                Verdict::Retry { delay_ms, reason } => {
                    if st.row.consecutive_failures == 0 {
                        tracing::warn!(sink = %name, error = %reason, retry_in_ms = delay_ms, pending_from = cursor,
                            "Delivery failed; events are held and retried");
                    } else {
                        tracing::debug!(sink = %name, error = %reason, failures, retry_in_ms = delay_ms, "Delivery failed again");
                    }
                    st.row.consecutive_failures = i64::from(failures);
                    st.row.next_attempt_at = Some(now + delay_ms as i64);
                    st.row.last_error = Some(reason);
                    if let delivery::Outcome::Status { code, .. } = outcome {
                        st.row.last_status = Some(i64::from(code));
                    }
                    st.dirty = true;
                    st.flush(true).await?;
                }
                Verdict::Permanent { status, snippet } => {
                    tracing::error!(sink = %name, status, count = batch.len(), response = %snippet,
                        "Upstream rejected the batch permanently; its events moved to dead letters");
                    st.row.cursor = last;
                    st.row.consecutive_failures = 0;
                    st.row.next_attempt_at = None;
                    st.row.last_status = Some(i64::from(status));
                    st.row.last_error = Some(format!("http {status}: {snippet}"));
                    st.dead_letter(batch, "rejected", Some(status), Some(snippet))
                        .await?;
                }
            }
        }
        st.flush(true).await?;
        tracing::info!(sink = %name, cursor = st.row.cursor, "Sink stopped");
        Ok(())
    }
}

struct LoopState {
    db: Arc<PathBuf>,
    conn: Arc<Mutex<Connection>>,
    name: String,
    row: SinkRow,
    dirty: bool,
    last_flush: Instant,
}

impl LoopState {
    /// Runs `f` on the sink's connection on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &std::path::Path) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let conn = self.conn.clone();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = match conn.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            f(&mut c, &db)
        })
        .await
        .map_err(|e| Error::Join {
            sink: self.name.clone(),
            message: e.to_string(),
        })
    }

    /// Persists the row if it changed and (unless `force`) the flush interval passed.
    async fn flush(&mut self, force: bool) -> Result<(), Error> {
        if !self.dirty || (!force && self.last_flush.elapsed() < PROGRESS_FLUSH) {
            return Ok(());
        }
        let row = self.row.clone();
        self.blocking(move |c, p| outbox::save_sink(c, p, &row, crate::telemetry::now_ms()))
            .await??;
        self.dirty = false;
        self.last_flush = Instant::now();
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        events: Vec<outbox::StoredEvent>,
        reason: &'static str,
        status: Option<u16>,
        snippet: Option<String>,
    ) -> Result<(), Error> {
        let row = self.row.clone();
        self.blocking(move |c, p| {
            let why = DeadReason {
                reason,
                http_status: status,
                snippet: snippet.as_deref(),
            };
            outbox::dead_letter(c, p, &row, &events, &why, crate::telemetry::now_ms())
        })
        .await??;
        self.dirty = false;
        self.last_flush = Instant::now();
        Ok(())
    }
}
