//! Read-only views for the technician commands (`status`, `devices`, `queue list|show|tail|export`):
//! every query they need, none of which writes. Safe while the daemon runs (WAL readers never
//! block the writer).
//!
//! `events` has no index but its `pos` (the rowid), so every query here is bounded by a `pos`
//! range and a `LIMIT`, never a scan of the whole table:
//! - **Counts** (`status`): without evictions (`meta.evicted_events = 0`) the stored positions are
//!   contiguous (positions are handed out in order, garbage collection and oldest-first eviction
//!   delete a prefix, and the newest row is never deleted), so the number of events after a
//!   cursor is arithmetic. Once superseded measurements were evicted there may be holes: the
//!   ranges are then counted for real, newest first, within a time budget; what the budget did
//!   not reach is reported as an upper bound (`exact: false`).
//! - **Time ranges**: `observed_at` follows commit order (both are the gateway clock at the
//!   time), so the first position observed at or after a time is found by binary search on
//!   `pos` (about 20 rowid look-ups on a million events); the rows found are filtered by their
//!   exact time as well. An event observed out of order by more than the range (a clock step)
//!   may be missed at the range's edges.
//! - **One device**: the last 24 h of events are read between two such positions, filtered by
//!   device; nothing is added to the writer's commits.

use super::{Result, ctx, meta_get, outbox};
use crate::channel::SourceStatus;
use crate::model::{DeviceState, Event};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// Makes a read-only connection read the file through memory mapping (up to 1 GiB): scans of a
/// time range are about a third faster than through `read()`. Best effort: a platform without
/// mmap keeps reading.
pub fn tune_for_scans(conn: &Connection) {
    let _ = conn.execute_batch("PRAGMA mmap_size = 1073741824;");
}

/// The lowest and highest stored `pos` (rowid look-ups), or None when `events` is empty.
///
/// # Errors
/// A store error naming the file.
pub fn pos_bounds(conn: &Connection, path: &Path) -> Result<Option<(i64, i64)>> {
    // Two statements: SQLite answers a lone MIN or MAX of the rowid with one b-tree seek, but
    // both in one statement with a scan of the table.
    let one = |sql: &str| -> Result<Option<i64>> {
        conn.prepare_cached(sql)
            .and_then(|mut st| st.query_row([], |r| r.get(0)))
            .map_err(ctx(path))
    };
    let lo = one("SELECT MIN(pos) FROM events")?;
    let hi = one("SELECT MAX(pos) FROM events")?;
    Ok(lo.zip(hi))
}

/// The first stored event at or after `pos`: its position and `observed_at`.
fn first_at_or_after(conn: &Connection, path: &Path, pos: i64) -> Result<Option<(i64, i64)>> {
    conn.prepare_cached("SELECT pos, observed_at FROM events WHERE pos >= ?1 ORDER BY pos LIMIT 1")
        .and_then(|mut st| {
            st.query_row([pos], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(ctx(path))
}

/// The smallest position `p` such that the events at and after `p` were observed at or after
/// `t_ms` (binary search on `pos`; `max + 1` when none was). Assumes `observed_at` grows with
/// `pos`, as it does but for clock steps.
///
/// # Errors
/// A store error naming the file.
pub fn pos_observed_from(conn: &Connection, path: &Path, t_ms: i64) -> Result<i64> {
    let Some((min, max)) = pos_bounds(conn, path)? else {
        return Ok(1);
    };
    let (mut lo, mut hi) = (min, max.saturating_add(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at_or_after = match first_at_or_after(conn, path, mid)? {
            Some((_, obs)) => obs >= t_ms,
            None => true,
        };
        if at_or_after {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// How many events lie in `(lower, max]` for each lower bound, and whether that is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Count {
    pub n: i64,
    /// False when only an upper bound could be given within the time budget (after evictions).
    pub exact: bool,
}

/// Counts the events after each of `lowers` (exclusive lower bounds, e.g. sink cursors): by
/// arithmetic when nothing was ever evicted, else by counting position ranges newest first
/// until `budget` is spent. Returns one [`Count`] per lower bound, in the given order.
///
/// # Errors
/// A store error naming the file.
pub fn count_after(
    conn: &Connection,
    path: &Path,
    lowers: &[i64],
    budget: Duration,
) -> Result<Vec<Count>> {
    let Some((min, max)) = pos_bounds(conn, path)? else {
        return Ok(lowers.iter().map(|_| Count { n: 0, exact: true }).collect());
    };
    let clamp = |l: i64| l.clamp(min - 1, max);
    let evicted = meta_get(conn, "evicted_events").map_err(ctx(path))?;
    if evicted == 0 {
        return Ok(lowers
            .iter()
            .map(|&l| Count {
                n: max - clamp(l),
                exact: true,
            })
            .collect());
    }
    // Holes are possible: count from the top down, in chunks, so that the sinks closest to the
    // head (the smallest ranges) are exact first.
    let deadline = Instant::now() + budget;
    let mut bounds: Vec<i64> = lowers.iter().map(|&l| clamp(l)).collect();
    bounds.sort_unstable();
    bounds.dedup();
    const CHUNK: i64 = 65_536;
    let mut counted_down_to = max; // (counted_down_to, max] is counted
    let mut counted = 0i64;
    let mut exact_at: Vec<(i64, i64)> = Vec::new(); // (bound, count after it)
    let mut st = conn
        .prepare_cached("SELECT COUNT(*) FROM events WHERE pos > ?1 AND pos <= ?2")
        .map_err(ctx(path))?;
    for &b in bounds.iter().rev() {
        while counted_down_to > b {
            if Instant::now() >= deadline {
                break;
            }
            let from = (counted_down_to - CHUNK).max(b);
            let n: i64 = st
                .query_row(params![from, counted_down_to], |r| r.get(0))
                .map_err(ctx(path))?;
            counted += n;
            counted_down_to = from;
        }
        if counted_down_to > b {
            break;
        }
        exact_at.push((b, counted));
    }
    Ok(lowers
        .iter()
        .map(|&l| {
            let b = clamp(l);
            match exact_at.iter().find(|(x, _)| *x == b) {
                Some((_, n)) => Count { n: *n, exact: true },
                None => Count {
                    // What was counted above, plus every position below it.
                    n: counted + (counted_down_to - b).max(0),
                    exact: false,
                },
            }
        })
        .collect())
}

/// One sink as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SinkStatus {
    #[serde(flatten)]
    pub row: outbox::SinkRow,
    pub control: Option<outbox::SinkControl>,
    /// Events after the cursor.
    pub pending: i64,
    /// Whether `pending` is exact (see [`count_after`]).
    pub pending_exact: bool,
    /// `observed_at` of the first pending event (commit order).
    pub oldest_pending_at: Option<i64>,
    pub dead_letters: i64,
}

/// A failed attempt or a source error, for the "last errors" of `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentError {
    pub at: i64,
    /// `sink` or `source`.
    pub component: &'static str,
    pub name: String,
    pub error: String,
}

/// What `status` reads from the database.
#[derive(Debug, Clone, Serialize)]
pub struct StatusData {
    /// The pid and start time (ms) the last daemon recorded.
    pub daemon: Option<(u32, i64)>,
    pub sinks: Vec<SinkStatus>,
    pub sources: Vec<(SourceStatus, i64)>,
    pub devices: Vec<DeviceRow>,
    pub events_stored: Count,
    pub first_pos: Option<i64>,
    pub last_pos: i64,
    /// `observed_at` and `clock` stamp of the newest event.
    pub newest_event: Option<(i64, String)>,
    pub evicted_events: i64,
    pub dead_letters_dropped: i64,
    /// The newest failures of sinks and sources, newest first.
    pub recent_errors: Vec<RecentError>,
}

/// Every sink row, by name.
///
/// # Errors
/// A store error naming the file.
pub fn sinks(conn: &Connection, path: &Path) -> Result<Vec<outbox::SinkRow>> {
    outbox::all_sinks(conn, path)
}

/// Reads what `status` shows; counts take at most about `budget` (see [`count_after`]).
///
/// # Errors
/// A store error naming the file.
pub fn status(conn: &Connection, path: &Path, budget: Duration) -> Result<StatusData> {
    let c = ctx(path);
    let rows = sinks(conn, path)?;
    let bounds = pos_bounds(conn, path)?;
    let mut lowers: Vec<i64> = rows.iter().map(|r| r.cursor).collect();
    lowers.push(bounds.map_or(0, |(min, _)| min - 1));
    let counts = count_after(conn, path, &lowers, budget)?;
    let mut sinks = Vec::new();
    for (row, count) in rows.into_iter().zip(&counts) {
        let oldest_pending_at =
            first_at_or_after(conn, path, row.cursor.saturating_add(1))?.map(|(_, obs)| obs);
        let dead_letters: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM dead_letters WHERE sink = ?1",
                [&row.name],
                |r| r.get(0),
            )
            .map_err(&c)?;
        sinks.push(SinkStatus {
            control: outbox::sink_control(conn, path, &row.name)?,
            row,
            pending: count.n,
            pending_exact: count.exact,
            oldest_pending_at,
            dead_letters,
        });
    }
    let events_stored = counts
        .last()
        .copied()
        .unwrap_or(Count { n: 0, exact: true });
    let newest_event = match bounds {
        Some((_, max)) => conn
            .query_row(
                "SELECT observed_at, payload FROM events WHERE pos = ?1",
                [max],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(&c)?
            .map(|(at, payload)| {
                let clock = serde_json::from_str::<serde_json::Value>(&payload)
                    .ok()
                    .and_then(|v| v.get("clock").and_then(|c| c.as_str()).map(String::from))
                    .unwrap_or_else(|| "unknown".into());
                (at, clock)
            }),
        None => None,
    };
    let sources = outbox::source_status(conn, path)?;
    let mut recent_errors = Vec::new();
    for s in &sinks {
        let attempts = outbox::recent_attempts(conn, path, &s.row.name, 3)?;
        for (i, a) in attempts.iter().enumerate() {
            let what = if a.status == 0 {
                format!("no answer ({})", a.error_kind)
            } else {
                format!("http {}", a.status)
            };
            // The sink's last error describes its newest failed attempt.
            let error = match (&s.row.last_error, a.snippet.as_deref()) {
                (Some(e), _) if i == 0 && s.row.consecutive_failures > 0 => e.clone(),
                (_, Some(t)) if !t.is_empty() => format!("{what}: {t}"),
                _ => what,
            };
            recent_errors.push(RecentError {
                at: a.at,
                component: "sink",
                name: s.row.name.clone(),
                error,
            });
        }
        if let Some(e) = &s.row.last_error
            && s.row.consecutive_failures > 0
            && attempts.is_empty()
        {
            let at: i64 = conn
                .query_row(
                    "SELECT updated_at FROM sinks WHERE name = ?1",
                    [&s.row.name],
                    |r| r.get(0),
                )
                .map_err(&c)?;
            recent_errors.push(RecentError {
                at,
                component: "sink",
                name: s.row.name.clone(),
                error: e.clone(),
            });
        }
    }
    for (s, at) in &sources {
        if let Some(e) = &s.last_error {
            recent_errors.push(RecentError {
                at: s.since_ms.unwrap_or(*at),
                component: "source",
                name: s.name.clone(),
                error: e.clone(),
            });
        }
    }
    recent_errors.sort_by_key(|e| std::cmp::Reverse(e.at));
    recent_errors.truncate(3);
    Ok(StatusData {
        daemon: super::reloads::daemon(conn, path)?,
        sinks,
        sources,
        devices: devices(conn, path, DEVICE_REPLAY_ROWS)?,
        events_stored,
        first_pos: bounds.map(|(min, _)| min),
        last_pos: bounds
            .map_or(0, |(_, max)| max)
            .max(meta_get(conn, "last_pos").map_err(&c)?),
        newest_event,
        evicted_events: meta_get(conn, "evicted_events").map_err(&c)?,
        dead_letters_dropped: meta_get(conn, "dead_letters_dropped").map_err(&c)?,
        recent_errors,
    })
}

/// Events after the devices checkpoint read (newest first) to bring the stored device states up
/// to date; the writer checkpoints every 30 s, so this covers the gap at up to a few hundred
/// events a second.
pub const DEVICE_REPLAY_ROWS: usize = 20_000;

/// The last known state of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRow {
    pub device: String,
    /// None when the stored state cannot be read (damaged row, another version).
    pub state: Option<DeviceState>,
    /// Events of this device so far (its last `seq`).
    pub seq: i64,
    /// Last observation (ms).
    pub last_seen: Option<i64>,
    pub last_snapshot_at: Option<i64>,
    /// Dead letters of this device (all sinks).
    pub dead_letters: i64,
}

/// Every device with its last known state: the `devices` table (the writer's checkpoint) brought
/// up to date with the newest event of each device committed after it (at most `replay_rows`
/// events read, newest first).
///
/// # Errors
/// A store error naming the file.
pub fn devices(conn: &Connection, path: &Path, replay_rows: usize) -> Result<Vec<DeviceRow>> {
    let c = ctx(path);
    let mut out: std::collections::BTreeMap<String, DeviceRow> = conn
        .prepare("SELECT device, state, seq, last_seen, last_snapshot_at FROM devices")
        .and_then(|mut st| {
            st.query_map([], |r| {
                let state: Option<String> = r.get(1).ok();
                Ok(DeviceRow {
                    device: r.get(0)?,
                    state: state.and_then(|s| serde_json::from_str(&s).ok()),
                    seq: r.get::<_, i64>(2).unwrap_or(0),
                    last_seen: r.get(3).ok(),
                    last_snapshot_at: r.get(4).ok(),
                    dead_letters: 0,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(&c)?
        .into_iter()
        .map(|d| (d.device.clone(), d))
        .collect();
    let checkpoint = meta_get(conn, "checkpoint_pos").map_err(&c)?;
    let mut seen = std::collections::HashSet::new();
    let mut st = conn
        .prepare(
            "SELECT device, seq, observed_at, type, payload FROM events WHERE pos > ?1 ORDER BY pos DESC LIMIT ?2",
        )
        .map_err(&c)?;
    let mut rows = st
        .query(params![
            checkpoint,
            i64::try_from(replay_rows).unwrap_or(i64::MAX)
        ])
        .map_err(&c)?;
    while let Some(r) = rows.next().map_err(&c)? {
        let Ok(device) = r.get::<_, String>(0) else {
            continue;
        };
        // The gateway's own notes (a sink banned or recovered) are not a device's.
        if device == crate::channel::GATEWAY_DEVICE || !seen.insert(device.clone()) {
            continue;
        }
        let seq: i64 = r.get(1).unwrap_or(0);
        let at: Option<i64> = r.get(2).ok();
        let snapshot = r.get::<_, String>(3).is_ok_and(|t| t == "snapshot");
        let state = r
            .get::<_, String>(4)
            .ok()
            .and_then(|p| serde_json::from_str::<Event>(&p).ok())
            .map(|e| e.state);
        let d = out.entry(device.clone()).or_insert_with(|| DeviceRow {
            device,
            state: None,
            seq: 0,
            last_seen: None,
            last_snapshot_at: None,
            dead_letters: 0,
        });
        if seq >= d.seq {
            d.seq = seq;
            if state.is_some() {
                d.state = state;
            }
            d.last_seen = d.last_seen.max(at);
            if snapshot {
                d.last_snapshot_at = d.last_snapshot_at.max(at);
            }
        }
    }
    drop(rows);
    let mut dl = conn
        .prepare("SELECT device, COUNT(*) FROM dead_letters GROUP BY device")
        .map_err(&c)?;
    let mut rows = dl.query([]).map_err(&c)?;
    while let Some(r) = rows.next().map_err(&c)? {
        if let (Ok(d), Ok(n)) = (r.get::<_, String>(0), r.get::<_, i64>(1))
            && let Some(row) = out.get_mut(&d)
        {
            row.dead_letters = n;
        }
    }
    Ok(out.into_values().collect())
}

/// One stored event as the CLI lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventRow {
    pub pos: i64,
    pub id: String,
    pub device: String,
    pub seq: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub observed_at: i64,
    /// The envelope as stored (JSON, sent as is).
    pub payload: String,
}

fn event_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        pos: r.get(0)?,
        id: text_lossy(r, 1),
        device: text_lossy(r, 2),
        seq: r.get(3).unwrap_or(0),
        kind: text_lossy(r, 4),
        observed_at: r.get(5).unwrap_or(0),
        payload: text_lossy(r, 6),
    })
}

/// A text column read defensively: a damaged row must not stop a listing.
fn text_lossy(r: &rusqlite::Row<'_>, i: usize) -> String {
    match r.get_ref(i) {
        Ok(rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t)) => {
            String::from_utf8_lossy(t).into_owned()
        }
        Ok(rusqlite::types::ValueRef::Integer(v)) => v.to_string(),
        _ => String::new(),
    }
}

const EVENT_COLUMNS: &str = "pos, id, device, seq, type, observed_at, payload";

/// Which events: a `pos` range (`after < pos <= through`), and optionally a device, a type and
/// an `observed_at` range (ms, inclusive).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub after: Option<i64>,
    pub through: Option<i64>,
    pub device: Option<String>,
    pub kind: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
}

/// Events matching `f`, newest first or oldest first, at most `limit`.
///
/// # Errors
/// A store error naming the file.
pub fn events(
    conn: &Connection,
    path: &Path,
    f: &Filter,
    newest_first: bool,
    limit: i64,
) -> Result<Vec<EventRow>> {
    let order = if newest_first { "DESC" } else { "ASC" };
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE pos > ?1 AND pos <= ?2 AND (?3 IS NULL OR device = ?3) AND (?4 IS NULL OR type = ?4)
           AND observed_at >= ?5 AND observed_at <= ?6
         ORDER BY pos {order} LIMIT ?7"
    );
    let c = ctx(path);
    let mut st = conn.prepare_cached(&sql).map_err(&c)?;
    let rows = st
        .query_map(
            params![
                f.after.unwrap_or(i64::MIN),
                f.through.unwrap_or(i64::MAX),
                f.device,
                f.kind,
                f.since.unwrap_or(i64::MIN),
                f.until.unwrap_or(i64::MAX),
                limit
            ],
            event_row,
        )
        .map_err(&c)?;
    rows.collect::<rusqlite::Result<_>>().map_err(&c)
}

/// The event at `pos`, if stored.
///
/// # Errors
/// A store error naming the file.
pub fn event_at(conn: &Connection, path: &Path, pos: i64) -> Result<Option<EventRow>> {
    conn.query_row(
        &format!("SELECT {EVENT_COLUMNS} FROM events WHERE pos = ?1"),
        [pos],
        event_row,
    )
    .optional()
    .map_err(ctx(path))
}

/// The event with id `id`. `id` has no index: when `hint_ms` (the time in a UUIDv7, close to
/// the observation) is given, the ten minutes around it are searched first, then the rest.
///
/// # Errors
/// A store error naming the file.
pub fn event_by_id(
    conn: &Connection,
    path: &Path,
    id: &str,
    hint_ms: Option<i64>,
) -> Result<Option<EventRow>> {
    let c = ctx(path);
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE pos >= ?1 AND pos < ?2 AND id = ?3 LIMIT 1"
    );
    let find = |lo: i64, hi: i64| -> Result<Option<EventRow>> {
        conn.query_row(&sql, params![lo, hi, id], event_row)
            .optional()
            .map_err(&c)
    };
    if let Some(t) = hint_ms {
        let lo = pos_observed_from(conn, path, t.saturating_sub(600_000))?;
        let hi = pos_observed_from(conn, path, t.saturating_add(600_000))?;
        if let Some(e) = find(lo, hi)? {
            return Ok(Some(e));
        }
        if let Some(e) = find(hi, i64::MAX)? {
            return Ok(Some(e));
        }
        return find(i64::MIN, lo);
    }
    find(i64::MIN, i64::MAX)
}

/// A dead letter with its stored envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadRow {
    pub id: i64,
    pub sink: String,
    pub event_pos: i64,
    pub event_id: String,
    pub device: String,
    pub seq: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub reason: String,
    pub http_status: Option<i64>,
    pub response_snippet: Option<String>,
    /// When it became a dead letter (ms).
    pub at: i64,
    pub payload: String,
}

/// `observed_at` (ms) of a stored envelope, if it has one.
pub fn payload_observed_at(payload: &str) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct T<'a> {
        #[serde(borrow)]
        observed_at: std::borrow::Cow<'a, str>,
    }
    serde_json::from_str::<T<'_>>(payload)
        .ok()
        .and_then(|t| crate::model::parse_rfc3339_ms(&t.observed_at))
}

/// Dead letters matching `sink` and `f` (device, type, `observed_at` range from the envelope;
/// the `pos` range applies to `event_pos`), newest first or oldest first, at most `limit`.
/// The table is bounded (`store.max_dead_letters`), so it is read whole.
///
/// # Errors
/// A store error naming the file.
pub fn dead(
    conn: &Connection,
    path: &Path,
    sink: Option<&str>,
    f: &Filter,
    newest_first: bool,
    limit: i64,
) -> Result<Vec<DeadRow>> {
    let c = ctx(path);
    let order = if newest_first { "DESC" } else { "ASC" };
    let mut st = conn
        .prepare_cached(&format!(
            "SELECT id, sink, event_pos, event_id, device, seq, type, reason, http_status, response_snippet, at, payload
             FROM dead_letters
             WHERE (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR device = ?2) AND (?3 IS NULL OR type = ?3)
               AND event_pos > ?4 AND event_pos <= ?5
             ORDER BY id {order}"
        ))
        .map_err(&c)?;
    let mut rows = st
        .query(params![
            sink,
            f.device,
            f.kind,
            f.after.unwrap_or(i64::MIN),
            f.through.unwrap_or(i64::MAX)
        ])
        .map_err(&c)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(&c)? {
        if i64::try_from(out.len()).unwrap_or(i64::MAX) >= limit {
            break;
        }
        let d = DeadRow {
            id: r.get(0).map_err(&c)?,
            sink: text_lossy(r, 1),
            event_pos: r.get(2).unwrap_or(0),
            event_id: text_lossy(r, 3),
            device: text_lossy(r, 4),
            seq: r.get(5).unwrap_or(0),
            kind: text_lossy(r, 6),
            reason: text_lossy(r, 7),
            http_status: r.get(8).ok().flatten(),
            response_snippet: r.get(9).ok().flatten(),
            at: r.get(10).unwrap_or(0),
            payload: text_lossy(r, 11),
        };
        if f.since.is_some() || f.until.is_some() {
            let Some(t) = payload_observed_at(&d.payload) else {
                continue;
            };
            if t < f.since.unwrap_or(i64::MIN) || t > f.until.unwrap_or(i64::MAX) {
                continue;
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// The dead letters recorded for event `event_id` (one per sink that gave up on it).
///
/// # Errors
/// A store error naming the file.
pub fn dead_of_event(conn: &Connection, path: &Path, event_id: &str) -> Result<Vec<DeadRow>> {
    let mut all = dead(conn, path, None, &Filter::default(), false, i64::MAX)?;
    all.retain(|d| d.event_id == event_id);
    Ok(all)
}

/// The state of one device after one of its events: only what the sparkline needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub observed_at: i64,
    /// Measured temperature after the event.
    pub temperature: Option<f64>,
    /// Setpoint after the event.
    pub setpoint: Option<f64>,
}

/// Reads temperature and setpoint from a stored envelope's `state`.
pub fn sample_of(observed_at: i64, payload: &str) -> Sample {
    #[derive(serde::Deserialize)]
    struct V<'a> {
        #[serde(borrow)]
        value: std::borrow::Cow<'a, str>,
    }
    #[derive(serde::Deserialize)]
    struct S<'a> {
        #[serde(borrow)]
        temperature: Option<V<'a>>,
        #[serde(borrow)]
        setpoint: Option<V<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct E<'a> {
        #[serde(borrow)]
        state: S<'a>,
    }
    let num = |v: Option<V<'_>>| v.and_then(|v| v.value.parse::<f64>().ok());
    let (temperature, setpoint) = match serde_json::from_str::<E<'_>>(payload) {
        Ok(p) => (num(p.state.temperature), num(p.state.setpoint)),
        Err(_) => (None, None),
    };
    Sample {
        observed_at,
        temperature,
        setpoint,
    }
}

/// For each of `buckets` equal slices of `from_ms..until_ms`, the device's state after its last
/// event in that slice (None: no event of it then). Each slice is read newest first and only
/// until the device's last event in it: on a fleet of N devices about N rows per slice, not the
/// whole window (a slice in which the device sent nothing is read whole).
///
/// # Errors
/// A store error naming the file.
pub fn device_buckets(
    conn: &Connection,
    path: &Path,
    device: &str,
    from_ms: i64,
    until_ms: i64,
    buckets: usize,
) -> Result<Vec<Option<Sample>>> {
    let c = ctx(path);
    let n = i64::try_from(buckets.max(1)).unwrap_or(1);
    let span = (until_ms - from_ms).max(n);
    // Slice k is [edge(k), edge(k + 1)); the last one also holds `until_ms`.
    let edge = |k: i64| from_ms + span * k / n + i64::from(k == n);
    let mut bounds = Vec::with_capacity(buckets + 1);
    for k in 0..=n {
        bounds.push(pos_observed_from(conn, path, edge(k))?);
    }
    let mut st = conn
        .prepare_cached(
            "SELECT observed_at, payload FROM events
             WHERE pos >= ?1 AND pos < ?2 AND device = ?3 AND observed_at >= ?4 AND observed_at < ?5
             ORDER BY pos DESC LIMIT 1",
        )
        .map_err(&c)?;
    let mut out = Vec::with_capacity(buckets);
    for k in 0..n {
        let (lo, hi) = (bounds[k as usize], bounds[k as usize + 1]);
        let row: Option<(i64, String)> = if lo >= hi {
            None
        } else {
            st.query_row(params![lo, hi, device, edge(k), edge(k + 1)], |r| {
                Ok((r.get(0)?, text_lossy(r, 1)))
            })
            .optional()
            .map_err(&c)?
        };
        out.push(row.map(|(at, p)| sample_of(at, &p)));
    }
    Ok(out)
}

/// The newest `n` events of `device` at or before position `through`, newest first, searching
/// at most `max_rows` positions back (`device` has no index).
///
/// # Errors
/// A store error naming the file.
pub fn device_recent(
    conn: &Connection,
    path: &Path,
    device: &str,
    through: i64,
    n: usize,
    max_rows: i64,
) -> Result<Vec<EventRow>> {
    events(
        conn,
        path,
        &Filter {
            after: Some(through.saturating_sub(max_rows)),
            through: Some(through),
            device: Some(device.to_string()),
            ..Filter::default()
        },
        true,
        i64::try_from(n).unwrap_or(i64::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Mode, Options, open};

    fn payload(device: &str, seq: i64, at: i64, temp: &str, sp: &str) -> String {
        format!(
            r#"{{"id":"e{seq}","seq":{seq},"type":"temperature","gateway":"gw","plant":null,"device":"{device}","module":null,"observed_at":"{}","clock":"synced","previous":null,"current":{{"value":"{temp}","unit":"C","time":"{}"}},"state":{{"function":null,"mode":"MANUAL","setpoint":{{"value":"{sp}","unit":"C"}},"program":null,"activation_time":null,"load_state":null,"temperature":{{"value":"{temp}","unit":"C","time":"{}"}},"humidity":null,"connectivity":"ONLINE"}}}}"#,
            crate::model::format_rfc3339_ms(at),
            crate::model::format_rfc3339_ms(at),
            crate::model::format_rfc3339_ms(at)
        )
    }

    /// A database with events at pos 1..=n, one a second from t0, alternating devices a and b;
    /// a's temperature climbs from 17.0 by 0.1 per event, its setpoint is 21.0.
    fn db(n: i64) -> (tempfile::TempDir, std::path::PathBuf, Connection, i64) {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = d.path().join("v.db");
        let c = open(&p, Mode::ReadWrite, &Options::default()).unwrap_or_else(|e| panic!("{e}"));
        let t0 = 1_800_000_000_000;
        for pos in 1..=n {
            let dev = if pos % 2 == 1 { "a" } else { "b" };
            let seq = (pos + 1) / 2;
            let temp = format!("{:.1}", 17.0 + 0.1 * (seq - 1) as f64);
            c.execute(
                "INSERT INTO events (pos, id, device, seq, type, observed_at, payload) VALUES (?1, ?2, ?3, ?4, 'temperature', ?5, ?6)",
                params![pos, format!("id-{pos}"), dev, seq, t0 + (pos - 1) * 1000, payload(dev, seq, t0 + (pos - 1) * 1000, &temp, "21.0")],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        (d, p, c, t0)
    }

    #[test]
    fn the_first_position_of_a_time_is_found_by_binary_search_across_holes() {
        let (_d, p, c, t0) = db(100);
        assert_eq!(pos_bounds(&c, &p).ok(), Some(Some((1, 100))));
        assert_eq!(pos_observed_from(&c, &p, t0).ok(), Some(1));
        assert_eq!(pos_observed_from(&c, &p, t0 + 41_500).ok(), Some(43));
        assert_eq!(pos_observed_from(&c, &p, t0 + 10_000_000).ok(), Some(101));
        c.execute("DELETE FROM events WHERE pos BETWEEN 40 AND 45", [])
            .unwrap_or_else(|e| panic!("{e}"));
        let from = pos_observed_from(&c, &p, t0 + 41_500).unwrap_or_else(|e| panic!("{e}"));
        assert!((40..=46).contains(&from), "{from}");
        let first = events(
            &c,
            &p,
            &Filter {
                after: Some(from - 1),
                ..Filter::default()
            },
            false,
            1,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first[0].pos, 46, "the first event at or after the time");
    }

    #[test]
    fn counts_are_arithmetic_without_evictions_and_counted_with_them() {
        let (_d, p, c, _) = db(1000);
        let n = count_after(&c, &p, &[0, 400, 1000, 5000], Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n.iter().map(|c| c.n).collect::<Vec<_>>(), [1000, 600, 0, 0]);
        assert!(n.iter().all(|c| c.exact));
        // Superseded measurements evicted: holes, and the counter says so.
        c.execute_batch(
            "DELETE FROM events WHERE pos % 10 = 0 AND pos < 1000; INSERT INTO meta (key, value) VALUES ('evicted_events', 99);",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let n = count_after(&c, &p, &[0, 400], Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            n,
            [
                Count {
                    n: 901,
                    exact: true
                },
                Count {
                    n: 541,
                    exact: true
                }
            ]
        );
        // No time to count: an upper bound, marked as such.
        let n = count_after(&c, &p, &[0], Duration::ZERO).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            n,
            [Count {
                n: 1000,
                exact: false
            }]
        );
    }

    #[test]
    fn the_buckets_hold_the_devices_last_state_in_each_slice() {
        let (_d, p, c, t0) = db(96);
        // 96 s of events, 48 slices of 2 s: a's events are at the even seconds 0, 2, 4, …
        let b = device_buckets(&c, &p, "a", t0, t0 + 96_000, 48).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.len(), 48);
        assert!(b.iter().all(Option::is_some));
        assert_eq!(b[0].and_then(|s| s.temperature), Some(17.0));
        assert_eq!(b[47].and_then(|s| s.temperature), Some(21.7));
        assert_eq!(b[5].and_then(|s| s.setpoint), Some(21.0));
        // A window after the data: nothing.
        let b = device_buckets(&c, &p, "a", t0 + 200_000, t0 + 300_000, 48)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(b.iter().all(Option::is_none));
        // b's events are at the odd seconds: slices of 1 s alternate.
        let b = device_buckets(&c, &p, "b", t0, t0 + 48_000, 48).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.iter().filter(|s| s.is_some()).count(), 24);
        assert!(b[0].is_none() && b[1].is_some());
        let recent = device_recent(&c, &p, "b", 96, 3, 1000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            recent.iter().map(|e| e.pos).collect::<Vec<_>>(),
            [96, 94, 92]
        );
    }

    #[test]
    fn devices_are_the_checkpoint_brought_up_to_date_by_newer_events() {
        let (_d, p, c, t0) = db(10);
        // Checkpointed at pos 4: a with seq 2, b with seq 2; then events 5..10 came.
        c.execute_batch(&format!(
            "INSERT INTO devices (device, state, seq, last_snapshot_at, changed_since_snapshot, last_seen)
               VALUES ('a', '{{}}', 2, 0, 0, {t0}), ('b', 'not json', 2, 0, 0, {t0}), ('quiet', '{{\"function\":null,\"mode\":null,\"setpoint\":null,\"program\":null,\"activation_time\":null,\"load_state\":null,\"temperature\":null,\"humidity\":null,\"connectivity\":null}}', 7, 0, 0, 5);
             INSERT INTO meta (key, value) VALUES ('checkpoint_pos', 4);
             INSERT INTO events (pos, id, device, seq, type, observed_at, payload)
               VALUES (11, 'op', '@gateway', 1, 'operational', {t0}, '{{}}');
             INSERT INTO dead_letters (sink, event_pos, event_id, device, seq, type, payload, reason, at)
               VALUES ('up', 3, 'id-3', 'a', 2, 'temperature', '{{}}', 'rejected', 1);"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let d = devices(&c, &p, 1000).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<&str> = d.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(names, ["a", "b", "quiet"]);
        assert_eq!(
            (d[0].seq, d[0].last_seen, d[0].dead_letters),
            (5, Some(t0 + 8000), 1)
        );
        assert_eq!(
            d[0].state
                .as_ref()
                .and_then(|s| s.temperature.as_ref())
                .map(|t| t.value),
            Some(crate::model::Fixed(1740))
        );
        assert_eq!(d[1].seq, 5);
        assert!(
            d[1].state.is_some(),
            "the damaged row is replaced by its newer event"
        );
        assert_eq!(
            (d[2].seq, d[2].state.clone()),
            (7, Some(DeviceState::default()))
        );
    }

    #[test]
    fn events_and_dead_letters_filter_by_device_type_and_time_and_ids_are_found() {
        let (_d, p, c, t0) = db(50);
        let f = Filter {
            device: Some("b".into()),
            since: Some(t0 + 10_000),
            until: Some(t0 + 20_000),
            after: Some(pos_observed_from(&c, &p, t0 + 10_000).unwrap_or(0) - 1),
            ..Filter::default()
        };
        let e = events(&c, &p, &f, true, 100).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            e.iter().map(|e| e.pos).collect::<Vec<_>>(),
            [20, 18, 16, 14, 12]
        );
        let e = events(&c, &p, &f, false, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.iter().map(|e| e.pos).collect::<Vec<_>>(), [12, 14]);
        assert_eq!(
            event_by_id(&c, &p, "id-33", Some(t0 + 32_000))
                .ok()
                .flatten()
                .map(|e| e.pos),
            Some(33)
        );
        assert_eq!(
            event_by_id(&c, &p, "id-33", Some(t0 + 99_000_000))
                .ok()
                .flatten()
                .map(|e| e.pos),
            Some(33),
            "a wrong hint still finds it"
        );
        assert_eq!(event_by_id(&c, &p, "nope", None).ok(), Some(None));
        for (pos, sink) in [(3, "up"), (4, "up"), (5, "other")] {
            c.execute(
                "INSERT INTO dead_letters (sink, event_pos, event_id, device, seq, type, payload, reason, http_status, at)
                 SELECT ?2, pos, id, device, seq, type, payload, 'rejected', 400, 7 FROM events WHERE pos = ?1",
                params![pos, sink],
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let d = dead(&c, &p, Some("up"), &Filter::default(), true, 10)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.iter().map(|d| d.event_pos).collect::<Vec<_>>(), [4, 3]);
        let d = dead(
            &c,
            &p,
            None,
            &Filter {
                since: Some(t0 + 3_000),
                ..Filter::default()
            },
            false,
            10,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.iter().map(|d| d.event_pos).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(dead_of_event(&c, &p, "id-5").ok().map(|d| d.len()), Some(1));
    }
}
