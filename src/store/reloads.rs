//! The running daemon's process id (so the CLI can signal it) and the outcome of each
//! configuration reload (so `hvac-edge reload` can wait for it and print it).

use super::{Result, ctx, meta_get, meta_set};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;

/// Reload outcomes kept; older rows are deleted.
const KEPT: i64 = 100;

/// Records the daemon's pid and start time (ms).
///
/// # Errors
/// A store error.
pub fn record_daemon(conn: &Connection, db: &Path, pid: u32, started_at: i64) -> Result<()> {
    let c = ctx(db);
    meta_set(conn, "daemon_pid", i64::from(pid)).map_err(&c)?;
    meta_set(conn, "daemon_started_at", started_at).map_err(&c)?;
    Ok(())
}

/// The pid and start time (ms) the last daemon recorded, if any (it may have ended since).
///
/// # Errors
/// A store error.
pub fn daemon(conn: &Connection, db: &Path) -> Result<Option<(u32, i64)>> {
    let c = ctx(db);
    let pid = meta_get(conn, "daemon_pid").map_err(&c)?;
    let at = meta_get(conn, "daemon_started_at").map_err(&c)?;
    Ok(u32::try_from(pid).ok().filter(|p| *p > 0).map(|p| (p, at)))
}

/// Records the nonce of a reload request (`hvac-edge reload`), which the daemon copies into
/// the outcome of the reload it runs next: the CLI prints its own reload, not one already under
/// way when it signalled.
///
/// # Errors
/// A store error.
pub fn set_request(conn: &Connection, db: &Path, nonce: i64) -> Result<()> {
    meta_set(conn, "reload_request", nonce).map_err(ctx(db))
}

/// The nonce of the last reload request (0 when none).
///
/// # Errors
/// A store error.
pub fn request(conn: &Connection, db: &Path) -> Result<i64> {
    meta_get(conn, "reload_request").map_err(ctx(db))
}

/// One recorded reload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reload {
    pub id: i64,
    pub at: i64,
    pub pid: u32,
    pub ok: bool,
    /// JSON of `daemon::ReloadOutcome`.
    pub outcome: String,
}

/// Stores a reload's outcome; returns its id.
///
/// # Errors
/// A store error.
pub fn record(
    conn: &Connection,
    db: &Path,
    at: i64,
    pid: u32,
    ok: bool,
    outcome: &str,
) -> Result<i64> {
    let c = ctx(db);
    conn.execute(
        "INSERT INTO reloads (at, pid, ok, outcome) VALUES (?1, ?2, ?3, ?4)",
        params![at, pid, ok, outcome],
    )
    .map_err(&c)?;
    let id = conn.last_insert_rowid();
    conn.execute("DELETE FROM reloads WHERE id <= ?1", [id - KEPT])
        .map_err(&c)?;
    Ok(id)
}

/// The id of the newest recorded reload (0 when none).
///
/// # Errors
/// A store error.
pub fn last_id(conn: &Connection, db: &Path) -> Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM reloads", [], |r| r.get(0))
        .map_err(ctx(db))
}

/// The newest `limit` reloads, newest first.
///
/// # Errors
/// A store error.
pub fn list(conn: &Connection, db: &Path, limit: i64) -> Result<Vec<Reload>> {
    let c = ctx(db);
    let mut st = conn
        .prepare("SELECT id, at, pid, ok, outcome FROM reloads ORDER BY id DESC LIMIT ?1")
        .map_err(&c)?;
    let rows = st
        .query_map([limit], |r| {
            Ok(Reload {
                id: r.get(0)?,
                at: r.get(1)?,
                pid: r.get(2)?,
                ok: r.get(3)?,
                outcome: r.get(4)?,
            })
        })
        .map_err(&c)?;
    rows.collect::<rusqlite::Result<_>>().map_err(&c)
}

/// The first reload after `id` made by process `pid`, if there is one yet.
///
/// # Errors
/// A store error.
pub fn after(conn: &Connection, db: &Path, id: i64, pid: u32) -> Result<Option<Reload>> {
    conn.query_row(
        "SELECT id, at, pid, ok, outcome FROM reloads WHERE id > ?1 AND pid = ?2 ORDER BY id LIMIT 1",
        params![id, pid],
        |r| {
            Ok(Reload {
                id: r.get(0)?,
                at: r.get(1)?,
                pid: r.get(2)?,
                ok: r.get(3)?,
                outcome: r.get(4)?,
            })
        },
    )
    .optional()
    .map_err(ctx(db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Mode, Options, open};

    #[test]
    fn the_daemon_pid_and_reload_outcomes_round_trip_and_only_the_last_hundred_stay() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = d.path().join("q.db");
        let c = open(&db, Mode::ReadWrite, &Options::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(daemon(&c, &db).ok(), Some(None));
        record_daemon(&c, &db, 4242, 1_700_000_000_000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(daemon(&c, &db).ok(), Some(Some((4242, 1_700_000_000_000))));
        assert_eq!(last_id(&c, &db).ok(), Some(0));
        for i in 0..105 {
            record(
                &c,
                &db,
                i,
                if i == 104 { 7 } else { 4242 },
                i % 2 == 0,
                "{}",
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM reloads", [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 100);
        assert_eq!(last_id(&c, &db).ok(), Some(105));
        let r = after(&c, &db, 100, 4242).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.map(|r| (r.id, r.at, r.ok)), Some((101, 100, true)));
        // Another process's reload is not the one waited for.
        assert_eq!(after(&c, &db, 104, 4242).ok(), Some(None));
        assert_eq!(
            after(&c, &db, 104, 7).ok().flatten().map(|r| r.id),
            Some(105)
        );
    }
}
