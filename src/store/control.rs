//! The technician's control path (schema v7): the record of every change (`control`), and
//! dead letters re-queued for their sink.
//!
//! The daemon keeps no technician-writable state in memory: a technician's changes go to rows
//! the daemon only reads (`sink_control`, `dead_letters.requeued_at`) or deletes once done, so a
//! CLI write under the database's write lock is never undone by the daemon's next save, and
//! works the same whether the daemon runs or not. A running daemon picks such a change up within
//! a second. What only the daemon can do (a test delivery through a running sink) is a
//! `pending` row the daemon applies and completes.

use super::outbox::StoredEvent;
use super::{Result, ctx};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use std::path::Path;

/// A row of `control`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub id: i64,
    /// When it was asked (ms).
    pub at: i64,
    pub by: String,
    /// `retry`, `purge`, `sink_enable`, `sink_disable`, `sink_test`.
    pub action: String,
    pub sink: Option<String>,
    /// The command's selection and options, JSON.
    pub args: String,
    /// `pending`, `done` or `failed`.
    pub state: String,
    pub applied_at: Option<i64>,
    /// `cli` (applied by the command itself) or `daemon pid N`.
    pub applied_by: Option<String>,
    /// How many events it touched.
    pub events: Option<i64>,
    pub outcome: Option<String>,
}

const COLUMNS: &str =
    "id, at, by, action, sink, args, state, applied_at, applied_by, events, outcome";

fn row_to_change(r: &rusqlite::Row<'_>) -> rusqlite::Result<Change> {
    Ok(Change {
        id: r.get(0)?,
        at: r.get(1)?,
        by: r.get(2)?,
        action: r.get(3)?,
        sink: r.get(4)?,
        args: r.get(5)?,
        state: r.get(6)?,
        applied_at: r.get(7)?,
        applied_by: r.get(8)?,
        events: r.get(9)?,
        outcome: r.get(10)?,
    })
}

/// What a new `control` row says.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub at: i64,
    pub by: &'a str,
    pub action: &'a str,
    pub sink: Option<&'a str>,
    pub args: &'a str,
}

/// Inserts a `control` row: `done` by the CLI (with its events and outcome, if known yet) or
/// `pending` for the daemon; returns its id.
fn insert(
    conn: &Connection,
    req: &Request<'_>,
    done: bool,
    events: Option<i64>,
    outcome: Option<&str>,
) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO control (at, by, action, sink, args, state, applied_at, applied_by, events, outcome)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            req.at,
            req.by,
            req.action,
            req.sink,
            req.args,
            if done { "done" } else { "pending" },
            done.then_some(req.at),
            done.then_some("cli"),
            events,
            outcome
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Records a change the caller applied itself (`done`, `applied_by = cli`).
///
/// # Errors
/// A store error.
pub fn record_done(
    conn: &Connection,
    db: &Path,
    req: &Request<'_>,
    events: i64,
    outcome: &str,
) -> Result<i64> {
    insert(conn, req, true, Some(events), Some(outcome)).map_err(ctx(db))
}

/// Records a change for the running daemon to apply (`pending`); returns its id.
///
/// # Errors
/// A store error.
pub fn request(conn: &Connection, db: &Path, req: &Request<'_>) -> Result<i64> {
    insert(conn, req, false, None, None).map_err(ctx(db))
}

/// The oldest pending change for `sink`, if any.
///
/// # Errors
/// A store error.
pub fn next_pending(conn: &Connection, db: &Path, sink: &str) -> Result<Option<Change>> {
    conn.query_row(
        &format!(
            "SELECT {COLUMNS} FROM control WHERE state = 'pending' AND sink = ?1 ORDER BY id LIMIT 1"
        ),
        [sink],
        row_to_change,
    )
    .optional()
    .map_err(ctx(db))
}

/// Completes a pending change (`done` or `failed`), unless something else completed it first;
/// returns whether this call did.
///
/// # Errors
/// A store error.
#[allow(clippy::too_many_arguments)]
pub fn complete(
    conn: &Connection,
    db: &Path,
    id: i64,
    ok: bool,
    applied_by: &str,
    events: i64,
    outcome: &str,
    now: i64,
) -> Result<bool> {
    let n = conn
        .execute(
            "UPDATE control SET state = ?2, applied_at = ?3, applied_by = ?4, events = ?5, outcome = ?6
             WHERE id = ?1 AND state = 'pending'",
            params![id, if ok { "done" } else { "failed" }, now, applied_by, events, outcome],
        )
        .map_err(ctx(db))?;
    Ok(n == 1)
}

/// One change by id.
///
/// # Errors
/// A store error.
pub fn get(conn: &Connection, db: &Path, id: i64) -> Result<Option<Change>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM control WHERE id = ?1"),
        [id],
        row_to_change,
    )
    .optional()
    .map_err(ctx(db))
}

/// The newest `limit` changes, newest first.
///
/// # Errors
/// A store error.
pub fn list(conn: &Connection, db: &Path, limit: i64) -> Result<Vec<Change>> {
    let c = ctx(db);
    let mut st = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM control ORDER BY id DESC LIMIT ?1"
        ))
        .map_err(&c)?;
    let rows = st.query_map([limit], row_to_change).map_err(&c)?;
    rows.collect::<rusqlite::Result<_>>().map_err(&c)
}

/// Which dead letters a `queue retry` or `queue purge` selects.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeadSelection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Event ids.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// Dead since (ms, inclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Dead before (ms, exclusive).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<i64>,
    /// Only dead letters of these sinks (the configured ones: a retry for a sink that no
    /// longer runs would wait forever).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_sinks: Option<Vec<String>>,
}

impl DeadSelection {
    /// The WHERE clause (dead letters not already re-queued) and its parameters.
    fn clause(&self) -> (String, Vec<rusqlite::types::Value>) {
        use rusqlite::types::Value;
        let mut w = vec!["requeued_at IS NULL".to_string()];
        let mut p: Vec<Value> = Vec::new();
        if let Some(s) = &self.sink {
            p.push(Value::Text(s.clone()));
            w.push(format!("sink = ?{}", p.len()));
        }
        if let Some(r) = &self.reason {
            p.push(Value::Text(r.clone()));
            w.push(format!("reason = ?{}", p.len()));
        }
        if !self.events.is_empty() {
            let mut marks = Vec::new();
            for e in &self.events {
                p.push(Value::Text(e.clone()));
                marks.push(format!("?{}", p.len()));
            }
            w.push(format!("event_id IN ({})", marks.join(", ")));
        }
        if let Some(only) = &self.only_sinks {
            let mut marks = Vec::new();
            for n in only {
                p.push(Value::Text(n.clone()));
                marks.push(format!("?{}", p.len()));
            }
            if marks.is_empty() {
                w.push("0".to_string());
            } else {
                w.push(format!("sink IN ({})", marks.join(", ")));
            }
        }
        if let Some(t) = self.since {
            p.push(Value::Integer(t));
            w.push(format!("at >= ?{}", p.len()));
        }
        if let Some(t) = self.until {
            p.push(Value::Integer(t));
            w.push(format!("at < ?{}", p.len()));
        }
        (w.join(" AND "), p)
    }
}

/// How many dead letters `sel` selects, per sink.
///
/// # Errors
/// A store error.
pub fn count_dead(conn: &Connection, db: &Path, sel: &DeadSelection) -> Result<Vec<(String, i64)>> {
    let c = ctx(db);
    let (w, p) = sel.clause();
    let mut st = conn
        .prepare(&format!(
            "SELECT sink, COUNT(*) FROM dead_letters WHERE {w} GROUP BY sink ORDER BY sink"
        ))
        .map_err(&c)?;
    let rows = st
        .query_map(rusqlite::params_from_iter(p), |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(&c)?;
    rows.collect::<rusqlite::Result<_>>().map_err(&c)
}

/// Re-queues the dead letters `sel` selects for their sink and records the change, in one
/// transaction; returns (control id, count).
///
/// # Errors
/// A store error.
pub fn requeue(
    conn: &mut Connection,
    db: &Path,
    sel: &DeadSelection,
    req: &Request<'_>,
) -> Result<(i64, i64)> {
    let c = ctx(db);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&c)?;
    // The row first: the re-queued dead letters point at it.
    let id = insert(&tx, req, true, None, None).map_err(&c)?;
    let (w, mut p) = sel.clause();
    p.push(rusqlite::types::Value::Integer(req.at));
    p.push(rusqlite::types::Value::Integer(id));
    let n = p.len();
    let changed = tx
        .execute(
            &format!(
                "UPDATE dead_letters SET requeued_at = ?{}, requeued_by = ?{n} WHERE {w}",
                n - 1
            ),
            rusqlite::params_from_iter(p),
        )
        .map_err(&c)?;
    let changed = i64::try_from(changed).unwrap_or(i64::MAX);
    tx.execute(
        "UPDATE control SET events = ?2, outcome = ?3 WHERE id = ?1",
        params![
            id,
            changed,
            format!("{changed} dead letter(s) re-queued for redelivery")
        ],
    )
    .map_err(&c)?;
    tx.commit().map_err(&c)?;
    Ok((id, changed))
}

/// Deletes the dead letters `sel` selects and records the change, in one transaction;
/// returns (control id, count).
///
/// # Errors
/// A store error.
pub fn purge_dead(
    conn: &mut Connection,
    db: &Path,
    sel: &DeadSelection,
    req: &Request<'_>,
) -> Result<(i64, i64)> {
    let c = ctx(db);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&c)?;
    let (w, p) = sel.clause();
    let n = tx
        .execute(
            &format!("DELETE FROM dead_letters WHERE {w}"),
            rusqlite::params_from_iter(p),
        )
        .map_err(&c)?;
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    let id = insert(
        &tx,
        req,
        true,
        Some(n),
        Some(&format!("{n} dead letter(s) deleted")),
    )
    .map_err(&c)?;
    tx.commit().map_err(&c)?;
    Ok((id, n))
}

/// Whether `sink` has re-queued dead letters waiting.
///
/// # Errors
/// A store error.
pub fn has_requeued(conn: &Connection, db: &Path, sink: &str) -> Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM dead_letters WHERE sink = ?1 AND requeued_at IS NOT NULL)",
        [sink],
        |r| r.get(0),
    )
    .map_err(ctx(db))
}

/// The oldest re-queued dead letters of `sink` as events to send (at most `max_n`, and at most
/// `max_bytes` of payload, but at least one), each with its dead letter id.
///
/// # Errors
/// A store error.
pub fn requeued_batch(
    conn: &Connection,
    db: &Path,
    sink: &str,
    max_n: usize,
    max_bytes: usize,
) -> Result<Vec<(i64, StoredEvent)>> {
    let c = ctx(db);
    let mut st = conn
        .prepare_cached(
            "SELECT id, event_pos, event_id, device, seq, type, payload FROM dead_letters
             WHERE sink = ?1 AND requeued_at IS NOT NULL ORDER BY id LIMIT ?2",
        )
        .map_err(&c)?;
    let rows = st
        .query_map(
            params![sink, i64::try_from(max_n).unwrap_or(i64::MAX)],
            |r| {
                let payload: String = r.get(6)?;
                let damaged = serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_err();
                let observed_at = super::views::payload_observed_at(&payload).unwrap_or(0);
                Ok((
                    r.get::<_, i64>(0)?,
                    StoredEvent {
                        pos: r.get(1)?,
                        id: r.get(2)?,
                        device: r.get(3)?,
                        seq: r.get(4)?,
                        kind: r.get(5)?,
                        observed_at,
                        damaged,
                        payload,
                    },
                ))
            },
        )
        .map_err(&c)?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    for r in rows {
        let (id, e) = r.map_err(&c)?;
        bytes = bytes.saturating_add(e.payload.len());
        if !out.is_empty() && bytes > max_bytes {
            break;
        }
        out.push((id, e));
    }
    Ok(out)
}

/// Deletes re-queued dead letters that were delivered.
///
/// # Errors
/// A store error.
pub fn requeued_delivered(conn: &mut Connection, db: &Path, ids: &[i64]) -> Result<()> {
    let c = ctx(db);
    let tx = conn.transaction().map_err(&c)?;
    {
        let mut del = tx
            .prepare_cached("DELETE FROM dead_letters WHERE id = ?1")
            .map_err(&c)?;
        for id in ids {
            del.execute([id]).map_err(&c)?;
        }
    }
    tx.commit().map_err(&c)
}

/// A re-queued dead letter refused again: a dead letter again, with the new reason.
///
/// # Errors
/// A store error.
pub fn requeued_refused(
    conn: &Connection,
    db: &Path,
    id: i64,
    reason: &str,
    http_status: Option<u16>,
    snippet: Option<&str>,
    now: i64,
) -> Result<()> {
    conn.execute(
        "UPDATE dead_letters SET requeued_at = NULL, reason = ?2, http_status = ?3, response_snippet = ?4, at = ?5 WHERE id = ?1",
        params![id, reason, http_status, snippet, now],
    )
    .map_err(ctx(db))?;
    Ok(())
}

/// For `queue retry --wait`: of the dead letters a retry re-queued, how many are still waiting
/// and how many were refused again (the delivered ones are gone).
///
/// # Errors
/// A store error.
pub fn retry_progress(conn: &Connection, db: &Path, control_id: i64) -> Result<(i64, i64)> {
    conn.query_row(
        "SELECT COALESCE(SUM(requeued_at IS NOT NULL), 0), COALESCE(SUM(requeued_at IS NULL), 0)
         FROM dead_letters WHERE requeued_by = ?1",
        [control_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .map_err(ctx(db))
}
