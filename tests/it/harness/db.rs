//! Reading the daemon's SQLite file directly (a separate connection; WAL lets it read while the
//! daemon writes). Only reads: tests never change the daemon's database behind its back.

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::time::Duration;

/// One row of the `events` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// Commit position.
    pub pos: i64,
    /// Event id.
    pub id: String,
    /// Device id.
    pub device: String,
    /// Per-device sequence number.
    pub seq: i64,
    /// Event type.
    pub kind: String,
    /// The stored envelope JSON.
    pub payload: String,
}

/// One row of the `dead_letters` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    /// Sink name.
    pub sink: String,
    /// Commit position of the event.
    pub event_pos: i64,
    /// Event id.
    pub event_id: String,
    /// Device id.
    pub device: String,
    /// Per-device sequence number.
    pub seq: i64,
    /// Event type.
    pub kind: String,
    /// `rejected` or `expired`.
    pub reason: String,
    /// HTTP status of a rejection.
    pub http_status: Option<i64>,
    /// Start of the rejecting response's body.
    pub response_snippet: Option<String>,
}

/// The delivery state of one sink (`sinks` table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkRow {
    /// Last delivered (or dead-lettered) position.
    pub cursor: i64,
    /// Failures since the last success.
    pub consecutive_failures: i64,
    /// Events delivered in total.
    pub delivered: i64,
    /// Last error text.
    pub last_error: Option<String>,
    /// Last HTTP status.
    pub last_status: Option<i64>,
}

/// A read connection to the daemon's database.
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens an existing database (never creates one).
    pub fn open(path: &Path) -> Db {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        Db { conn }
    }

    /// Whether the daemon's database at `path` exists and is migrated (the file appears a
    /// moment before its tables; migrations run in one transaction with `user_version`).
    pub fn migrated(path: &Path) -> bool {
        path.exists() && Db::open(path).count("PRAGMA user_version") > 0
    }

    /// The single integer `sql` returns (e.g. `SELECT COUNT(*) FROM events`).
    pub fn count(&self, sql: &str) -> i64 {
        self.conn
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The single text `sql` returns.
    pub fn text(&self, sql: &str) -> String {
        self.conn
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Every row of `events`, by position.
    pub fn events(&self) -> Vec<EventRow> {
        let mut st = self
            .conn
            .prepare("SELECT pos, id, device, seq, type, payload FROM events ORDER BY pos")
            .expect("prepare events");
        st.query_map([], |r| {
            Ok(EventRow {
                pos: r.get(0)?,
                id: r.get(1)?,
                device: r.get(2)?,
                seq: r.get(3)?,
                kind: r.get(4)?,
                payload: r.get(5)?,
            })
        })
        .expect("query events")
        .collect::<Result<_, _>>()
        .expect("read events")
    }

    /// Every row of `dead_letters`, in insertion order.
    pub fn dead_letters(&self) -> Vec<DeadLetterRow> {
        let mut st = self
            .conn
            .prepare(
                "SELECT sink, event_pos, event_id, device, seq, type, reason, http_status, response_snippet
                 FROM dead_letters ORDER BY id",
            )
            .expect("prepare dead_letters");
        st.query_map([], |r| {
            Ok(DeadLetterRow {
                sink: r.get(0)?,
                event_pos: r.get(1)?,
                event_id: r.get(2)?,
                device: r.get(3)?,
                seq: r.get(4)?,
                kind: r.get(5)?,
                reason: r.get(6)?,
                http_status: r.get(7)?,
                response_snippet: r.get(8)?,
            })
        })
        .expect("query dead_letters")
        .collect::<Result<_, _>>()
        .expect("read dead_letters")
    }

    /// The persisted row of sink `name`, if the sink has started once.
    pub fn sink(&self, name: &str) -> Option<SinkRow> {
        self.conn
            .query_row(
                "SELECT cursor, consecutive_failures, delivered, last_error, last_status FROM sinks WHERE name = ?1",
                [name],
                |r| {
                    Ok(SinkRow {
                        cursor: r.get(0)?,
                        consecutive_failures: r.get(1)?,
                        delivered: r.get(2)?,
                        last_error: r.get(3)?,
                        last_status: r.get(4)?,
                    })
                },
            )
            .optional()
            .expect("read sinks")
    }
}
