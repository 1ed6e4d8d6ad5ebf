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

pub mod control;
pub mod outbox;
pub mod reloads;
pub mod schema;
pub mod views;
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
    #[error("database {path}: {what} out of range")]
    Overflow { path: PathBuf, what: &'static str },
    #[error("database {path} has an invalid schema version {found}")]
    BadVersion { path: PathBuf, found: i64 },
    #[error("database {path} failed its integrity check: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot move the unusable database {path} aside: {source}")]
    Quarantine {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create or make private (0600) the database {path}: {source}")]
    Private {
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

    /// The file is damaged or not a database (SQLITE_CORRUPT, SQLITE_NOTADB, a failed integrity
    /// check): retrying cannot help.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
            || matches!(
                self.sqlite_code(),
                Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
            )
    }

    /// The daemon cannot use this file and must not change it: damaged, another program's, or
    /// of a schema it does not know. It is moved aside (kept) and a fresh database started.
    pub fn quarantine_kind(&self) -> Option<&'static str> {
        match self {
            Error::TooNew { .. } => Some("newer"),
            Error::ForeignFile { .. } => Some("foreign"),
            Error::BadVersion { .. } => Some("unknown"),
            e if e.is_corrupt() => Some("corrupt"),
            _ => None,
        }
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
/// Creates the database file with mode 0600 if it is missing (SQLite gives its WAL and shared
/// memory files the database's mode), and takes group and other access away from an existing one.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let err = |source| Error::Private {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(err)?;
        }
        Err(e) => return Err(err(e)),
        Ok(m) if m.is_file() && m.permissions().mode() & 0o077 != 0 => {
            let mode = m.permissions().mode() & 0o700;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        }
        Ok(_) => {}
    }
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = std::path::PathBuf::from(side);
        if let Ok(m) = std::fs::metadata(&side)
            && m.is_file()
            && m.permissions().mode() & 0o077 != 0
        {
            let mode = m.permissions().mode() & 0o700;
            std::fs::set_permissions(&side, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        }
    }
    Ok(())
}

pub fn open(path: &Path, mode: Mode, opts: &Options) -> Result<Connection> {
    let c = ctx(path);
    let flags = match mode {
        Mode::ReadWrite => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                // Directories it creates are 0750 and the database 0600, whatever the umask:
                // events name the household's devices and habits.
                use std::os::unix::fs::DirBuilderExt as _;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o750)
                    .create(dir)
                    .map_err(|source| Error::CreateDir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
            }
            private_file(path)?;
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
    if version < 0 {
        return Err(Error::BadVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    if app_id == 0 && version == 0 {
        // hvac-edge sets application_id in its first migration: tables without it are another
        // program's file.
        let tables: i64 = conn
            .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(&c)?;
        if tables > 0 {
            return Err(Error::ForeignFile {
                path: path.to_path_buf(),
                found: 0,
            });
        }
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

/// Opens the daemon's database: like [`open`] in [`Mode::ReadWrite`], then `PRAGMA quick_check`.
/// A file the daemon cannot use (damaged, another program's, a schema it does not know) is moved
/// aside with its WAL as `<file>.<kind>-<UTC time>` (kept, never deleted; kind `corrupt`,
/// `foreign`, `newer` or `unknown`), logged at ERROR, and a fresh database is started, so the
/// site keeps reporting: sources redeliver what was not acknowledged. Returns the connection and
/// the quarantined file, if any.
///
/// # Errors
/// A store error that moving the file aside cannot cure (permissions, I/O).
pub fn open_for_daemon(path: &Path, opts: &Options) -> Result<(Connection, Option<PathBuf>)> {
    let first = open(path, Mode::ReadWrite, opts).and_then(|conn| {
        check_integrity(&conn, path)?;
        Ok(conn)
    });
    let err = match first {
        Ok(conn) => return Ok((conn, None)),
        Err(e) => e,
    };
    let Some(kind) = err.quarantine_kind() else {
        return Err(err);
    };
    let moved = quarantine(path, kind)?;
    tracing::error!(error = %err, moved_to = %moved.display(),
        "Database unusable: moved aside (kept for inspection) and starting a fresh one; unacknowledged data is redelivered by the sources");
    let conn = open(path, Mode::ReadWrite, opts)?;
    if kind != "foreign" {
        let n = salvage_devices(&moved, &conn);
        if n > 0 {
            tracing::warn!(
                devices = n,
                "Carried each device's last state and seq over from the moved file, so seq goes on"
            );
        }
    }
    Ok((conn, Some(moved)))
}

/// Best effort: copies each device's stored state and its largest seq (of `devices` and of the
/// stored events) from the moved-aside file `from` into the fresh `to`, so that a device's `seq`
/// continues instead of restarting at 1. Whatever cannot be read is skipped. Returns the devices
/// carried over.
fn salvage_devices(from: &Path, to: &Connection) -> usize {
    let Ok(old) = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    let mut seqs: std::collections::HashMap<String, (i64, String)> =
        std::collections::HashMap::new();
    if let Ok(mut st) = old.prepare("SELECT device, state, seq FROM devices")
        && let Ok(mut rows) = st.query([])
    {
        {
            while let Ok(Some(r)) = rows.next() {
                if let (Ok(d), Ok(state), Ok(seq)) = (
                    r.get::<_, String>(0),
                    r.get::<_, String>(1),
                    r.get::<_, i64>(2),
                ) {
                    seqs.insert(d, (seq.max(0), state));
                }
            }
        }
    }
    if let Ok(mut st) = old.prepare("SELECT device, MAX(seq) FROM events GROUP BY device")
        && let Ok(mut rows) = st.query([])
    {
        {
            while let Ok(Some(r)) = rows.next() {
                if let (Ok(d), Ok(seq)) = (r.get::<_, String>(0), r.get::<_, i64>(1)) {
                    let e = seqs.entry(d).or_insert((0, "{}".to_string()));
                    e.0 = e.0.max(seq);
                }
            }
        }
    }
    let mut n = 0;
    for (device, (seq, state)) in &seqs {
        // A state that does not parse is stored as empty: the device's next report is a snapshot.
        let state = if serde_json::from_str::<crate::model::DeviceState>(state).is_ok() {
            state.as_str()
        } else {
            "{}"
        };
        if to
            .execute(
                "INSERT INTO devices (device, state, seq, last_snapshot_at, changed_since_snapshot, last_seen)
                 VALUES (?1, ?2, ?3, 0, 1, ?4) ON CONFLICT(device) DO NOTHING",
                rusqlite::params![device, state, seq, crate::telemetry::now_ms()],
            )
            .is_ok()
        {
            n += 1;
        }
    }
    n
}

/// `PRAGMA quick_check`: `Err(Corrupt)` unless it says `ok`.
fn check_integrity(conn: &Connection, path: &Path) -> Result<()> {
    let mut st = conn.prepare("PRAGMA quick_check(5)").map_err(ctx(path))?;
    let rows: Vec<String> = st
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(ctx(path))?
        .collect::<rusqlite::Result<_>>()
        .map_err(ctx(path))?;
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(());
    }
    Err(Error::Corrupt {
        path: path.to_path_buf(),
        detail: rows.join("; "),
    })
}

/// Suffixes of files moved aside by [`quarantine`].
pub const QUARANTINE_KINDS: [&str; 4] = ["corrupt", "foreign", "newer", "unknown"];

/// Moves `path` (and its `-wal`/`-shm`) to `<path>.<kind>-<UTC yyyymmddThhmmssZ>`.
///
/// # Errors
/// [`Error::Quarantine`] when the rename fails.
pub fn quarantine(path: &Path, kind: &str) -> Result<PathBuf> {
    let stamp: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let mut target = path.as_os_str().to_owned();
    target.push(format!(".{kind}-{stamp}"));
    let mut target = PathBuf::from(target);
    let mut n = 1;
    while target.exists() {
        let mut t = target.clone().into_os_string();
        t.push(format!(".{n}"));
        target = PathBuf::from(t);
        n += 1;
    }
    let err = |source| Error::Quarantine {
        path: path.to_path_buf(),
        source,
    };
    for suffix in ["-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let from = PathBuf::from(from);
        if from.exists() {
            let mut to = target.clone().into_os_string();
            to.push(suffix);
            std::fs::rename(&from, PathBuf::from(to)).map_err(err)?;
        }
    }
    std::fs::rename(path, &target).map_err(err)?;
    Ok(target)
}

/// Files moved aside by [`quarantine`] next to `path`, by name.
pub fn quarantined_files(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let name = name.to_string_lossy();
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().to_string_lossy().into_owned();
            let rest = f.strip_prefix(name.as_ref())?.strip_prefix('.')?;
            let is_ours = QUARANTINE_KINDS
                .iter()
                .any(|k| rest.strip_prefix(k).is_some_and(|r| r.starts_with('-')));
            (is_ours && !f.ends_with("-wal") && !f.ends_with("-shm")).then(|| e.path())
        })
        .collect();
    out.sort();
    out
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
        // Read again under the lock: another process may have migrated meanwhile.
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let from = usize::try_from(version)
            .unwrap_or(0)
            .min(schema::MIGRATIONS.len());
        for m in &schema::MIGRATIONS[from..] {
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

/// Reads a counter from `meta` (0 when absent or not an integer: a damaged counter must not
/// stop the daemon).
pub(crate) fn meta_get(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            Ok(match r.get_ref(0)? {
                rusqlite::types::ValueRef::Integer(v) => v,
                _ => 0,
            })
        })
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
    fn a_v4_database_with_a_sink_migrates_to_the_current_schema_keeping_the_sink_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v4.db");
        {
            // A database as release v4 left it: its migrations, a sink row, a control row.
            let c = Connection::open(&p).unwrap();
            c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA auto_vacuum = INCREMENTAL;")
                .unwrap();
            for m in &schema::MIGRATIONS[..4] {
                c.execute_batch(m).unwrap();
            }
            c.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 4;
                 INSERT INTO sinks (name, kind, cursor, status, consecutive_failures, attempts, delivered, updated_at)
                 VALUES ('up', 'http', 41, 'ACTIVE', 2, 50, 40, 1);
                 INSERT INTO sink_control (name, enabled, updated_at) VALUES ('up', 0, 5);"
            ))
            .unwrap();
        }
        let c = open(&p, Mode::ReadWrite, &Options::default()).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::MIGRATIONS.len() as i64);
        let row =
            outbox::ensure_sink(&c, &p, "up", "http", crate::config::StartFrom::Oldest, 9).unwrap();
        assert_eq!(
            (
                row.cursor,
                row.consecutive_failures,
                row.attempts,
                row.delivered
            ),
            (41, 2, 50, 40)
        );
        assert_eq!(
            (
                row.successes,
                row.banned_until,
                row.disabled_at,
                row.config_digest,
                row.last_duration_ms
            ),
            (0, None, None, None, None),
            "new columns start empty: no ban, no disable, and the first start records the digest"
        );
        let ctl = outbox::sink_control(&c, &p, "up").unwrap().unwrap();
        assert!(!ctl.enabled);
        assert!(outbox::recent_attempts(&c, &p, "up", 3).unwrap().is_empty());
    }

    #[test]
    fn the_database_directory_is_0750_and_its_files_0600_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/sub/db.sqlite");
        let c = open(&p, Mode::ReadWrite, &Options::default()).unwrap();
        c.execute_batch("CREATE TABLE IF NOT EXISTS t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        let mode = |q: &Path| std::fs::metadata(q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("state")), 0o750);
        assert_eq!(mode(&dir.path().join("state/sub")), 0o750);
        assert_eq!(mode(&p), 0o600);
        assert_eq!(
            mode(&dir.path().join("state/sub/db.sqlite-wal")),
            0o600,
            "SQLite copies it"
        );
        drop(c);
        // A file left readable by others (copied in by hand) is made private at the next open.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        open(&p, Mode::ReadWrite, &Options::default()).unwrap();
        assert_eq!(mode(&p), 0o600);
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

#[cfg(test)]
mod quarantine_tests {
    use super::*;

    fn fresh(p: &Path) {
        let c = open(p, Mode::ReadWrite, &Options::default()).unwrap();
        c.execute_batch("INSERT INTO meta (key, value) VALUES ('marker', 7)")
            .unwrap();
    }

    #[track_caller]
    fn assert_quarantined(p: &Path, kind: &str) {
        let (c, moved) = open_for_daemon(p, &Options::default()).unwrap();
        let moved = moved.expect("moved aside");
        let name = moved.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("db.{kind}-")), "{name}");
        assert!(moved.exists());
        assert_eq!(quarantined_files(p), vec![moved]);
        // The fresh file is a current, empty hvac-edge database.
        assert_eq!(meta_get(&c, "marker").unwrap(), 0);
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::MIGRATIONS.len() as i64);
        drop(c);
        let (_, again) = open_for_daemon(p, &Options::default()).unwrap();
        assert_eq!(again, None, "a healthy file stays where it is");
    }

    #[test]
    fn a_healthy_database_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        fresh(&p);
        let (c, moved) = open_for_daemon(&p, &Options::default()).unwrap();
        assert_eq!(moved, None);
        assert_eq!(meta_get(&c, "marker").unwrap(), 7);
        assert!(quarantined_files(&p).is_empty());
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_with_its_wal_and_a_fresh_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        fresh(&p);
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); CREATE TABLE filler(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 2000) INSERT INTO filler SELECT randomblob(200) FROM n; PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
        }
        // Overwrite pages 2.. with garbage: the b-trees no longer parse.
        let mut bytes = std::fs::read(&p).unwrap();
        for b in bytes.iter_mut().skip(4096).take(8192) {
            *b = 0xA5;
        }
        std::fs::write(&p, bytes).unwrap();
        assert_quarantined(&p, "corrupt");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        std::fs::write(&p, vec![0x42u8; 10_000]).unwrap();
        assert_quarantined(&p, "corrupt");
    }

    #[test]
    fn a_negative_schema_version_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        fresh(&p);
        Connection::open(&p)
            .unwrap()
            .execute_batch("PRAGMA user_version = -3")
            .unwrap();
        assert_quarantined(&p, "unknown");
    }

    #[test]
    fn another_programs_tables_without_application_id_are_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        Connection::open(&p)
            .unwrap()
            .execute_batch("CREATE TABLE photos(id, path); INSERT INTO photos VALUES (1, 'a');")
            .unwrap();
        assert_quarantined(&p, "foreign");
    }

    #[test]
    fn devices_and_their_seq_are_carried_over_from_a_moved_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        fresh(&p);
        {
            let c = Connection::open(&p).unwrap();
            c.execute_batch(
                "INSERT INTO devices (device, state, seq, last_snapshot_at, changed_since_snapshot, last_seen)
                   VALUES ('a', '{}', 7, 0, 0, 0), ('b', 'garbage', 3, 0, 0, 0);
                 INSERT INTO events (pos, id, device, seq, type, observed_at, payload)
                   VALUES (1, 'x', 'a', 9, 'setpoint', 0, '{}'), (2, 'y', 'c', 4, 'mode', 0, '{}');
                 PRAGMA user_version = -1;",
            )
            .unwrap();
        }
        let (c, moved) = open_for_daemon(&p, &Options::default()).unwrap();
        assert!(moved.is_some());
        let mut rows: Vec<(String, String, i64)> = c
            .prepare("SELECT device, state, seq FROM devices ORDER BY device")
            .unwrap()
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        rows.sort();
        assert_eq!(
            rows,
            vec![
                ("a".into(), "{}".into(), 9),
                ("b".into(), "{}".into(), 3),
                ("c".into(), "{}".into(), 4)
            ]
        );
    }

    #[test]
    fn a_newer_schema_is_moved_aside_by_the_daemon_not_changed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        fresh(&p);
        Connection::open(&p)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99")
            .unwrap();
        let (_c, moved) = open_for_daemon(&p, &Options::default()).unwrap();
        let moved = moved.unwrap();
        let v: i64 = Connection::open(&moved)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 99, "kept as it was");
    }
}
