//! The SQLite file: opening with the right pragmas, migrations, and the typed store error.
//!
//! # Design constraints
//! - An event is acknowledged to its source only after the transaction holding it committed with
//!   the configured durability (`synchronous=FULL` by default: it survives power loss).
//! - `events.pos` is commit order; it never goes backwards and is never reused: garbage collection
//!   and eviction never delete the newest row, so SQLite's rowid allocation cannot hand out a `pos`
//!   that a sink cursor has already passed.
//! - Only the writer thread writes `devices`, `events` and `mqtt_recent`; a sink writes only its
//!   own `sinks` row and its `dead_letters`; the CLI writes only on explicit technician commands.
//! - A file written by a newer hvac-edge (higher `user_version`) or by another program
//!   (`application_id`) is refused and left untouched.
//!
//! All SQL of the crate lives under `store/`.

pub mod outbox;
pub mod schema;
pub mod writer;

#[cfg(test)]
mod writer_tests;

use crate::config::Synchronous;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `PRAGMA application_id` of hvac-edge databases ("HVAC").
pub const APPLICATION_ID: i32 = 0x4856_4143;

/// Errors of the store, each naming the database file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this hvac-edge understands ({supported}); upgrade hvac-edge or restore the previous binary"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{path} is not an hvac-edge database (application_id {found:#x})")]
    ForeignFile { path: PathBuf, found: i32 },
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database {path} does not exist (has the daemon run yet?)")]
    Missing { path: PathBuf },
    #[error("database {path} has schema version {found}; run the daemon once to migrate it")]
    TooOld { path: PathBuf, found: i64 },
}

impl Error {
    /// The SQLite result code behind the error, if any.
    fn sqlite_code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            Error::Sqlite {
                source: rusqlite::Error::SqliteFailure(f, _),
                ..
            } => Some(f.code),
            _ => None,
        }
    }

    /// The file is damaged or not a database (SQLITE_CORRUPT, SQLITE_NOTADB): retrying cannot help.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self.sqlite_code(),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        )
    }

    /// The disk is full (SQLITE_FULL): not corruption; hold and retry.
    pub fn is_full(&self) -> bool {
        matches!(self.sqlite_code(), Some(rusqlite::ErrorCode::DiskFull))
    }
}

/// Result alias for store operations.
pub type Result<T> = std::result::Result<T, Error>;

/// How to open the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The daemon: create if missing, migrate.
    ReadWrite,
    /// Technician commands that change something: the file must exist at the current version.
    Existing,
    /// Inspection only: never writes, works while the daemon runs.
    ReadOnly,
}

/// Connection settings from `[store]`.
#[derive(Debug, Clone)]
pub struct Options {
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// Wraps a rusqlite error with the file name.
pub(crate) fn ctx(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| Error::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens the database with the project's pragmas; in [`Mode::ReadWrite`] creates and migrates it.
///
/// # Errors
/// [`Error`] naming the file: cannot open, foreign or newer schema, failed migration (rolled back).
pub fn open(path: &Path, mode: Mode, opts: &Options) -> Result<Connection> {
    let c = ctx(path);
    let flags = match mode {
        Mode::ReadWrite => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| Error::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        }
        Mode::Existing | Mode::ReadOnly => {
            if !path.exists() {
                return Err(Error::Missing {
                    path: path.to_path_buf(),
                });
            }
            if mode == Mode::ReadOnly {
                OpenFlags::SQLITE_OPEN_READ_ONLY
            } else {
                OpenFlags::SQLITE_OPEN_READ_WRITE
            }
        }
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(&c)?;
    conn.busy_timeout(opts.busy_timeout).map_err(&c)?;
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(&c)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(&c)?;
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(Error::ForeignFile {
            path: path.to_path_buf(),
            found: app_id,
        });
    }
    let supported = schema::MIGRATIONS.len() as i64;
    if version > supported {
        return Err(Error::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported,
        });
    }
    if mode == Mode::ReadOnly {
        if version < supported {
            return Err(Error::TooOld {
                path: path.to_path_buf(),
                found: version,
            });
        }
        return Ok(conn);
    }
    let sync = match opts.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    if version == 0 {
        // Must precede the first table: only then does auto_vacuum take effect without VACUUM.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL;")
            .map_err(&c)?;
    }
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(&c)?;
    if mode == Mode::Existing && version < supported {
        return Err(Error::TooOld {
            path: path.to_path_buf(),
            found: version,
        });
    }
    migrate(&conn).map_err(&c)?;
    Ok(conn)
}

/// Runs the pending migrations in one exclusive transaction.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let target = schema::MIGRATIONS.len() as i64;
    if version >= target {
        return Ok(());
    }
    conn.execute_batch("BEGIN EXCLUSIVE")?;
    let run = || -> rusqlite::Result<()> {
        for m in &schema::MIGRATIONS[version as usize..] {
            conn.execute_batch(m)?;
        }
        conn.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {target};"
        ))
    };
    match run() {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Reads a counter from `meta` (0 when absent).
pub(crate) fn meta_get(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Sets a counter in `meta`.
pub(crate) fn meta_set(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        rusqlite::params![key, value],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_migrates_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/db.sqlite");
        let c = open(&p, Mode::ReadWrite, &Options::default()).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::MIGRATIONS.len() as i64);
        let av: i64 = c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0)).unwrap();
        assert_eq!(av, 2, "incremental auto_vacuum");
        let jm: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(jm, "wal");
        drop(c);
        open(&p, Mode::ReadWrite, &Options::default()).unwrap();
        open(&p, Mode::ReadOnly, &Options::default()).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let c = open(&p, Mode::ReadWrite, &Options::default()).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
        drop(c);
        let err = open(&p, Mode::ReadWrite, &Options::default()).unwrap_err();
        assert!(matches!(err, Error::TooNew { found: 99, .. }), "{err}");
        let c = Connection::open(&p).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 99);
    }

    #[test]
    fn a_foreign_sqlite_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let c = Connection::open(&p).unwrap();
        c.execute_batch("PRAGMA application_id = 42; CREATE TABLE x(y);")
            .unwrap();
        drop(c);
        let err = open(&p, Mode::ReadWrite, &Options::default()).unwrap_err();
        assert!(matches!(err, Error::ForeignFile { found: 42, .. }), "{err}");
    }

    #[test]
    fn read_only_open_of_a_missing_file_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope.db");
        let err = open(&p, Mode::ReadOnly, &Options::default()).unwrap_err();
        assert!(err.to_string().contains("nope.db"), "{err}");
        assert!(!p.exists());
    }
}
