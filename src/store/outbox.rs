//! Reads and outcome records for sinks and the CLI: batches at a cursor, sink progress, dead
//! letters, queue statistics.
//!
//! A sink owns its `sinks` row and its `dead_letters`; it never writes `events` or `devices`.
//! Dead-lettering a batch and moving the cursor past it happen in one transaction, so an event is
//! never both skipped and unrecorded.

use super::{Error, ctx, meta_get};
use crate::config::StartFrom;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::path::Path;

/// One committed event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub pos: i64,
    pub id: String,
    pub device: String,
    pub seq: i64,
    pub kind: String,
    pub observed_at: i64,
    /// The event envelope, JSON.
    pub payload: String,
    /// The row could not be read as written (a column of the wrong type, text that is not UTF-8
    /// or a payload that is not JSON): a fault of the event itself, made a dead letter
    /// (`unreadable`) instead of being sent or stopping the sink.
    pub damaged: bool,
}

/// Delivery status of a sink.
pub const STATUS_ACTIVE: &str = "ACTIVE";
/// Status of a sink a technician disabled (`sink_control.enabled = 0`): events are held.
pub const STATUS_PAUSED: &str = "PAUSED";
/// Status of a webhook sink whose endpoint is banned after repeated failures (`banned_until`).
pub const STATUS_BANNED: &str = "BANNED";
/// Status of a webhook sink stopped after `failure_limit` consecutive failures (or a 410): its
/// events are held until a technician re-enables it or its configuration changes.
pub const STATUS_DISABLED: &str = "DISABLED_DUE_TO_ERRORS";

/// What a technician set for a sink (`sink_control`); the daemon only reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkControl {
    pub enabled: bool,
    pub note: Option<String>,
    pub updated_at: i64,
    pub updated_by: Option<String>,
}

/// The technician's settings for sink `name`, if any were ever set.
///
/// # Errors
/// A store error naming the file.
pub fn sink_control(
    conn: &Connection,
    path: &Path,
    name: &str,
) -> Result<Option<SinkControl>, Error> {
    conn.query_row(
        "SELECT enabled, note, updated_at, updated_by FROM sink_control WHERE name = ?1",
        [name],
        |r| {
            Ok(SinkControl {
                enabled: r.get::<_, i64>(0)? != 0,
                note: r.get(1)?,
                updated_at: r.get(2)?,
                updated_by: r.get(3)?,
            })
        },
    )
    .optional()
    .map_err(ctx(path))
}

/// Sets a sink's technician settings (enabled or not, with a note and who did it). Only the
/// technician's side writes this table; the daemon applies it within a second.
///
/// # Errors
/// A store error naming the file.
pub fn set_sink_control(
    conn: &Connection,
    path: &Path,
    name: &str,
    enabled: bool,
    note: Option<&str>,
    by: Option<&str>,
    now: i64,
) -> Result<(), Error> {
    conn.execute(
        "INSERT INTO sink_control (name, enabled, note, updated_at, updated_by) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(name) DO UPDATE SET enabled = excluded.enabled, note = excluded.note,
           updated_at = excluded.updated_at, updated_by = excluded.updated_by",
        params![name, i64::from(enabled), note, now, by],
    )
    .map_err(ctx(path))?;
    Ok(())
}

/// A sink's persisted progress and status (mirrors its `sinks` row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkRow {
    pub name: String,
    pub kind: String,
    /// `pos` of the last event this sink is done with (delivered or dead-lettered).
    pub cursor: i64,
    pub status: String,
    pub consecutive_failures: i64,
    pub attempts: i64,
    pub delivered: i64,
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_status: Option<i64>,
    pub last_success_at: Option<i64>,
    /// Delivered requests (`delivered` counts events).
    pub successes: i64,
    /// While set and in the future the endpoint is banned (webhook sinks).
    pub banned_until: Option<i64>,
    /// When the sink became `DISABLED_DUE_TO_ERRORS`.
    pub disabled_at: Option<i64>,
    /// Digest of the configuration the sink last ran with.
    pub config_digest: Option<String>,
    /// Duration of the last attempt.
    pub last_duration_ms: Option<i64>,
}

fn row_to_sink(r: &rusqlite::Row<'_>) -> rusqlite::Result<SinkRow> {
    Ok(SinkRow {
        name: r.get(0)?,
        kind: r.get(1)?,
        cursor: r.get(2)?,
        status: r.get(3)?,
        consecutive_failures: r.get(4)?,
        attempts: r.get(5)?,
        delivered: r.get(6)?,
        next_attempt_at: r.get(7)?,
        last_error: r.get(8)?,
        last_status: r.get(9)?,
        last_success_at: r.get(10)?,
        successes: r.get(11)?,
        banned_until: r.get(12)?,
        disabled_at: r.get(13)?,
        config_digest: r.get(14)?,
        last_duration_ms: r.get(15)?,
    })
}

const SINK_COLUMNS: &str = "name, kind, cursor, status, consecutive_failures, attempts, delivered, next_attempt_at, last_error, last_status, last_success_at, successes, banned_until, disabled_at, config_digest, last_duration_ms";

/// Returns the sink's row, creating it (at the oldest event or at `now`) if it is new.
///
/// # Errors
/// A store error naming the file.
pub fn ensure_sink(
    conn: &Connection,
    path: &Path,
    name: &str,
    kind: &str,
    from: StartFrom,
    now: i64,
) -> Result<SinkRow, Error> {
    let c = ctx(path);
    let start = match from {
        StartFrom::Oldest => 0,
        StartFrom::Now => conn
            .query_row("SELECT COALESCE(MAX(pos), 0) FROM events", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(&c)?,
    };
    conn.execute(
        "INSERT INTO sinks (name, kind, cursor, updated_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(name) DO NOTHING",
        params![name, kind, start, now],
    )
    .map_err(&c)?;
    conn.query_row(
        &format!("SELECT {SINK_COLUMNS} FROM sinks WHERE name = ?1"),
        [name],
        row_to_sink,
    )
    .map_err(&c)
}

/// Reads up to `max_events` events after `cursor`, stopping before `max_bytes` of payload
/// (always at least one event).
///
/// # Errors
/// A store error naming the file.
pub fn read_batch(
    conn: &Connection,
    path: &Path,
    cursor: i64,
    max_events: usize,
    max_bytes: usize,
) -> Result<Vec<StoredEvent>, Error> {
    let c = ctx(path);
    let mut st = conn
        .prepare_cached("SELECT pos, id, device, seq, type, observed_at, payload FROM events WHERE pos > ?1 ORDER BY pos LIMIT ?2")
        .map_err(&c)?;
    let mut rows = st.query(params![cursor, max_events as i64]).map_err(&c)?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(r) = rows.next().map_err(&c)? {
        let mut damaged = false;
        let mut text = |i: usize| -> String {
            match r.get_ref(i) {
                Ok(ValueRef::Text(t) | ValueRef::Blob(t)) => match std::str::from_utf8(t) {
                    Ok(s) => s.to_owned(),
                    Err(_) => {
                        damaged = true;
                        String::from_utf8_lossy(t).into_owned()
                    }
                },
                _ => {
                    damaged = true;
                    String::new()
                }
            }
        };
        let (id, device, kind, payload) = (text(1), text(2), text(4), text(6));
        let mut int = |i: usize| -> i64 {
            match r.get_ref(i) {
                Ok(ValueRef::Integer(v)) => v,
                _ => {
                    damaged = true;
                    0
                }
            }
        };
        let (seq, observed_at) = (int(3), int(5));
        let pos: i64 = r.get(0).map_err(&c)?;
        if !out.is_empty() && bytes + payload.len() + 1 > max_bytes {
            break;
        }
        // Cheap structural check: the envelope is spliced into the request body as is.
        if !damaged && serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_err() {
            damaged = true;
        }
        bytes += payload.len() + 1;
        out.push(StoredEvent {
            pos,
            id,
            device,
            seq,
            kind,
            observed_at,
            payload,
            damaged,
        });
    }
    Ok(out)
}

/// Persists a sink's in-memory progress and status.
///
/// # Errors
/// A store error naming the file.
pub fn save_sink(conn: &Connection, path: &Path, s: &SinkRow, now: i64) -> Result<(), Error> {
    conn.execute(
        "UPDATE sinks SET cursor = ?2, status = ?3, consecutive_failures = ?4, attempts = ?5, delivered = ?6,
           next_attempt_at = ?7, last_error = ?8, last_status = ?9, last_success_at = ?10, updated_at = ?11,
           successes = ?12, banned_until = ?13, disabled_at = ?14, config_digest = ?15, last_duration_ms = ?16
         WHERE name = ?1",
        params![
            s.name,
            s.cursor,
            s.status,
            s.consecutive_failures,
            s.attempts,
            s.delivered,
            s.next_attempt_at,
            s.last_error,
            s.last_status,
            s.last_success_at,
            now,
            s.successes,
            s.banned_until,
            s.disabled_at,
            s.config_digest,
            s.last_duration_ms
        ],
    )
    .map_err(ctx(path))?;
    Ok(())
}

/// One failed delivery attempt, as a technician needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub sink: String,
    pub at: i64,
    pub first_pos: i64,
    pub events: i64,
    /// HTTP status; 0 = no answer.
    pub status: i64,
    pub duration_ms: i64,
    /// `timeout`, `connect`, `dns`, `tls`, `status`, `auth`, `invalid` or `other`.
    pub error_kind: String,
    pub snippet: Option<String>,
}

/// Failed attempts kept per sink.
pub const ATTEMPTS_KEPT: i64 = 50;

/// Records a failed attempt and trims the sink's record to the last [`ATTEMPTS_KEPT`].
///
/// # Errors
/// A store error naming the file.
pub fn record_attempt(conn: &mut Connection, path: &Path, a: &Attempt) -> Result<(), Error> {
    let c = ctx(path);
    let tx = conn.transaction().map_err(&c)?;
    tx.execute(
        "INSERT INTO sink_attempts (sink, at, first_pos, events, status, duration_ms, error_kind, snippet)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![a.sink, a.at, a.first_pos, a.events, a.status, a.duration_ms, a.error_kind, a.snippet],
    )
    .map_err(&c)?;
    tx.execute(
        "DELETE FROM sink_attempts WHERE sink = ?1 AND id <= (SELECT id FROM sink_attempts WHERE sink = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
        params![a.sink, ATTEMPTS_KEPT],
    )
    .map_err(&c)?;
    tx.commit().map_err(&c)
}

/// The last `n` failed attempts of a sink, newest first.
///
/// # Errors
/// A store error naming the file.
pub fn recent_attempts(
    conn: &Connection,
    path: &Path,
    sink: &str,
    n: usize,
) -> Result<Vec<Attempt>, Error> {
    let c = ctx(path);
    let mut st = conn
        .prepare(
            "SELECT sink, at, first_pos, events, status, duration_ms, error_kind, snippet
             FROM sink_attempts WHERE sink = ?1 ORDER BY id DESC LIMIT ?2",
        )
        .map_err(&c)?;
    let rows = st
        .query_map(params![sink, i64::try_from(n).unwrap_or(i64::MAX)], |r| {
            Ok(Attempt {
                sink: r.get(0)?,
                at: r.get(1)?,
                first_pos: r.get(2)?,
                events: r.get(3)?,
                status: r.get(4)?,
                duration_ms: r.get(5)?,
                error_kind: r.get(6)?,
                snippet: r.get(7)?,
            })
        })
        .map_err(&c)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(&c)
}

/// Why an event became a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadReason<'a> {
    /// `rejected` (a permanent refusal of that event), `expired` (TTL), `unreadable` (a damaged
    /// row), `banned` (a webhook with `drop_during_ban`) or `invalid` (it cannot take the
    /// sink's shape).
    pub reason: &'a str,
    pub http_status: Option<u16>,
    pub snippet: Option<&'a str>,
}

/// Records `events` as dead letters of the sink and saves the sink row (whose cursor the caller
/// already moved past them), in one transaction.
///
/// # Errors
/// A store error naming the file.
pub fn dead_letter(
    conn: &mut Connection,
    path: &Path,
    sink: &SinkRow,
    events: &[StoredEvent],
    why: &DeadReason<'_>,
    now: i64,
) -> Result<(), Error> {
    let c = ctx(path);
    let tx = conn.transaction().map_err(&c)?;
    {
        let mut ins = tx
            .prepare_cached(
                "INSERT INTO dead_letters (sink, event_pos, event_id, device, seq, type, payload, reason, http_status, response_snippet, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .map_err(&c)?;
        for e in events {
            ins.execute(params![
                sink.name,
                e.pos,
                e.id,
                e.device,
                e.seq,
                e.kind,
                e.payload,
                why.reason,
                why.http_status,
                why.snippet,
                now
            ])
            .map_err(&c)?;
        }
    }
    save_sink(&tx, path, sink, now)?;
    tx.commit().map_err(&c)?;
    Ok(())
}

/// `observed_at` of the first event after `cursor` (one indexed lookup), if any.
fn oldest_after(conn: &Connection, path: &Path, cursor: i64) -> Result<Option<i64>, Error> {
    conn.query_row(
        "SELECT observed_at FROM events WHERE pos > ?1 ORDER BY pos LIMIT 1",
        [cursor],
        |r| r.get(0),
    )
    .optional()
    .map_err(ctx(path))
}

/// A sink's dead letters: (not re-queued, re-queued and waiting).
fn dead_counts(conn: &Connection, path: &Path, sink: &str) -> Result<(i64, i64), Error> {
    conn.query_row(
        "SELECT COALESCE(SUM(requeued_at IS NULL), 0), COALESCE(SUM(requeued_at IS NOT NULL), 0) FROM dead_letters WHERE sink = ?1",
        [sink],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .map_err(ctx(path))
}

/// Every sink row, by name.
///
/// # Errors
/// A store error naming the file.
pub fn all_sinks(conn: &Connection, path: &Path) -> Result<Vec<SinkRow>, Error> {
    let c = ctx(path);
    let mut st = conn
        .prepare(&format!("SELECT {SINK_COLUMNS} FROM sinks ORDER BY name"))
        .map_err(&c)?;
    let rows = st
        .query_map([], row_to_sink)
        .map_err(&c)?
        .collect::<Result<_, _>>()
        .map_err(&c)?;
    Ok(rows)
}

/// Time `queue stats` may spend counting events after holes left by the size cap.
const COUNT_BUDGET: std::time::Duration = std::time::Duration::from_millis(80);

/// Per-sink queue figures.
#[derive(Debug, Clone, Serialize)]
pub struct SinkQueue {
    #[serde(flatten)]
    pub row: SinkRow,
    /// Events after the cursor.
    pub pending: i64,
    /// False when the size cap left holes and counting them ran out of time (`pending` is then
    /// an upper bound).
    pub pending_exact: bool,
    /// Age of the oldest pending event, ms (by its observation time).
    pub oldest_pending_age_ms: Option<i64>,
    /// Dead letters (not counting the re-queued ones).
    pub dead_letters: i64,
    /// Dead letters re-queued by `queue retry`, waiting to be sent again.
    pub requeued: i64,
    /// What a technician set for it, if anything.
    pub control: Option<SinkControl>,
    /// Its last failed attempts, newest first (at most three).
    pub recent_attempts: Vec<Attempt>,
}

/// What `hvac-edge queue stats` shows.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    pub sinks: Vec<SinkQueue>,
    pub events_stored: i64,
    pub last_pos: i64,
    pub devices: i64,
    pub evicted_events: i64,
    /// Dead letters deleted because `store.max_dead_letters` was reached.
    pub dead_letters_dropped: i64,
    /// Main file + WAL, bytes.
    pub db_file_bytes: u64,
    pub wal_bytes: u64,
    /// Unusable databases moved aside next to this one (`<file>.corrupt-<time>`, …), kept for
    /// inspection (`--db` opens them read-only).
    pub quarantined: Vec<String>,
}

/// Computes queue statistics (read-only; safe while the daemon runs).
///
/// # Errors
/// A store error naming the file.
pub fn queue_stats(conn: &Connection, path: &Path, now: i64) -> Result<QueueStats, Error> {
    let c = ctx(path);
    let rows = all_sinks(conn, path)?;
    // Counts by position arithmetic (exact unless the size cap left holes; then counted within
    // a budget, `pending_exact` false beyond it): never a scan of a million pending events.
    let mut lowers: Vec<i64> = rows.iter().map(|r| r.cursor).collect();
    lowers.push(i64::MIN);
    let counts = super::views::count_after(conn, path, &lowers, COUNT_BUDGET)?;
    let mut sinks = Vec::new();
    for (row, count) in rows.into_iter().zip(counts.iter()) {
        let oldest = oldest_after(conn, path, row.cursor)?;
        let (dead, requeued) = dead_counts(conn, path, &row.name)?;
        let control = sink_control(conn, path, &row.name)?;
        let recent_attempts = recent_attempts(conn, path, &row.name, 3)?;
        sinks.push(SinkQueue {
            control,
            recent_attempts,
            row,
            pending: count.n,
            pending_exact: count.exact,
            oldest_pending_age_ms: oldest.map(|o| now.saturating_sub(o).max(0)),
            dead_letters: dead,
            requeued,
        });
    }
    let events_stored = counts.last().map_or(0, |c| c.n);
    let last_pos: i64 = conn
        .query_row("SELECT COALESCE(MAX(pos), 0) FROM events", [], |r| r.get(0))
        .map_err(&c)?;
    let devices: i64 = conn
        .query_row("SELECT COUNT(*) FROM devices", [], |r| r.get(0))
        .map_err(&c)?;
    let last_pos = last_pos.max(meta_get(conn, "last_pos").map_err(&c)?);
    let evicted_events = meta_get(conn, "evicted_events").map_err(&c)?;
    let dead_letters_dropped = meta_get(conn, "dead_letters_dropped").map_err(&c)?;
    let db_file_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal_bytes = std::fs::metadata(std::path::PathBuf::from(wal))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok(QueueStats {
        sinks,
        events_stored,
        last_pos,
        devices,
        evicted_events,
        dead_letters_dropped,
        db_file_bytes,
        wal_bytes,
        quarantined: super::quarantined_files(path)
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    })
}

/// Dead letters of one sink (or all), newest first, at most `limit`.
///
/// # Errors
/// A store error naming the file.
pub fn dead_letters(
    conn: &Connection,
    path: &Path,
    sink: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, Error> {
    let c = ctx(path);
    let mut st = conn
        .prepare(
            "SELECT id, sink, event_id, device, seq, type, reason, http_status, response_snippet, at
             FROM dead_letters WHERE (?1 IS NULL OR sink = ?1) ORDER BY id DESC LIMIT ?2",
        )
        .map_err(&c)?;
    let rows = st
        .query_map(params![sink, limit], |r| {
            Ok(DeadLetter {
                id: r.get(0)?,
                sink: r.get(1)?,
                event_id: r.get(2)?,
                device: r.get(3)?,
                seq: r.get(4)?,
                kind: r.get(5)?,
                reason: r.get(6)?,
                http_status: r.get(7)?,
                response_snippet: r.get(8)?,
                at: r.get(9)?,
            })
        })
        .map_err(&c)?;
    rows.collect::<Result<_, _>>().map_err(&c)
}

/// One dead letter, as the CLI lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub sink: String,
    pub event_id: String,
    pub device: String,
    pub seq: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub reason: String,
    pub http_status: Option<i64>,
    pub response_snippet: Option<String>,
    pub at: i64,
}

/// The sink row by name, if any.
///
/// # Errors
/// A store error naming the file.
pub fn sink_row(conn: &Connection, path: &Path, name: &str) -> Result<Option<SinkRow>, Error> {
    conn.query_row(
        &format!("SELECT {SINK_COLUMNS} FROM sinks WHERE name = ?1"),
        [name],
        row_to_sink,
    )
    .optional()
    .map_err(ctx(path))
}

/// The sources' status as the daemon last stored it, with when it was stored, by name.
/// A row that does not parse (written by another version) is returned as a status with only
/// name and kind, rather than failing the whole listing.
///
/// # Errors
/// A store error naming the file.
pub fn source_status(
    conn: &Connection,
    path: &Path,
) -> Result<Vec<(crate::channel::SourceStatus, i64)>, Error> {
    let c = ctx(path);
    let mut st = conn
        .prepare("SELECT name, kind, status, updated_at FROM source_status ORDER BY name")
        .map_err(&c)?;
    let rows = st
        .query_map([], |r| {
            let name: String = r.get(0)?;
            let kind: String = r.get(1)?;
            let json: String = r.get(2)?;
            let at: i64 = r.get(3)?;
            let status = serde_json::from_str(&json).unwrap_or(crate::channel::SourceStatus {
                name,
                kind,
                ..Default::default()
            });
            Ok((status, at))
        })
        .map_err(&c)?;
    rows.collect::<Result<_, _>>().map_err(&c)
}

/// One sink's figures for `/metrics`: counters from its row, depth from the commit position,
/// the oldest waiting event by one indexed lookup (no scan of `events`).
#[derive(Debug, Clone)]
pub struct SinkFigures {
    pub name: String,
    pub status: String,
    pub delivered: i64,
    /// Attempts that did not succeed.
    pub failed: i64,
    /// Dead letters now (re-queued ones not counted).
    pub dead: i64,
    /// Events after its cursor (an upper bound once the size cap evicted some).
    pub depth: i64,
    pub oldest_pending_observed_at: Option<i64>,
}

/// [`SinkFigures`] of every sink; `last_pos` is the writer's commit position.
///
/// # Errors
/// A store error naming the file.
pub fn sink_figures(
    conn: &Connection,
    path: &Path,
    last_pos: i64,
) -> Result<Vec<SinkFigures>, Error> {
    let c = ctx(path);
    let rows = all_sinks(conn, path)?;
    let last_pos = if last_pos > 0 {
        last_pos
    } else {
        conn.query_row("SELECT COALESCE(MAX(pos), 0) FROM events", [], |r| r.get(0))
            .map_err(&c)?
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (dead, _requeued) = dead_counts(conn, path, &row.name)?;
        let oldest = oldest_after(conn, path, row.cursor)?;
        out.push(SinkFigures {
            depth: (last_pos - row.cursor).max(0),
            failed: (row.attempts - row.successes).max(0),
            name: row.name,
            status: row.status,
            delivered: row.delivered,
            dead,
            oldest_pending_observed_at: oldest,
        });
    }
    Ok(out)
}
