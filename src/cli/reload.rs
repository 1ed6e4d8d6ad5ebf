//! `hvac-edge reload`: validate the config here, then ask the running daemon to apply it
//! (SIGHUP) and print the outcome the daemon recorded (what it started, stopped and restarted,
//! or every problem that kept the old config running). `systemctl reload hvac-edge` runs this
//! (`ExecReload=`), so a refused reload fails the systemctl command too.
//!
//! Exit codes: 0 applied; 1 refused, partly applied or no answer in time; 3 no daemon running
//! (the config is valid and applies at the next start); 78 the config is invalid here (the
//! daemon is not asked; it keeps running on its old config).

use crate::config;
use crate::reload::ReloadOutcome;
use crate::store::{self, reloads};
use std::path::Path;
use std::time::{Duration, Instant};

/// No daemon runs on this database.
pub const EXIT_NOT_RUNNING: i32 = 3;

/// Validates `path`, signals the daemon (`pid`, else the one recorded in the database), waits
/// at most `timeout` for its outcome and prints it; returns the exit code.
pub fn run(path: &Path, pid: Option<u32>, timeout: Duration, json: bool) -> i32 {
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("the running daemon was not asked to reload and keeps its configuration");
            return if matches!(e, config::LoadError::Read { .. }) {
                1
            } else {
                super::EXIT_CONFIG
            };
        }
    };
    match ask(&cfg.store.path, pid, timeout) {
        Ok(Asked::NotRunning(why)) => {
            eprintln!(
                "no hvac-edge daemon is running on {} ({why}); {} is valid and applies at the next start",
                cfg.store.path.display(),
                path.display()
            );
            EXIT_NOT_RUNNING
        }
        Ok(Asked::Answer(pid, outcome)) => print(pid, &outcome, json),
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

enum Asked {
    NotRunning(String),
    Answer(u32, ReloadOutcome),
}

fn ask(db: &Path, pid: Option<u32>, timeout: Duration) -> anyhow::Result<Asked> {
    if !db.exists() {
        // A changed store.path (which needs a restart) also ends here.
        return Ok(Asked::NotRunning(
            "its database does not exist; if store.path was changed, the running daemon keeps its old database until a restart".into(),
        ));
    }
    let conn = store::open(db, store::Mode::ReadOnly, &store::Options::default())?;
    let recorded = reloads::daemon(&conn, db)?.map(|(p, _)| p);
    let pid = match (pid, recorded) {
        (Some(p), Some(r)) if p != r => anyhow::bail!(
            "pid {p} is not the daemon of {} (that is pid {r}); if store.path was changed, restart the service instead",
            db.display()
        ),
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => return Ok(Asked::NotRunning("no daemon has recorded its pid".into())),
    };
    if let Some(why) = not_hvac_edge(pid) {
        return Ok(Asked::NotRunning(why));
    }
    let mut last = reloads::last_id(&conn, db)?;
    // Our own request, so that the outcome printed is of the reload this call asked for.
    let nonce = fastrand::i64(1..i64::MAX);
    {
        let rw = store::open(db, store::Mode::Existing, &store::Options::default())?;
        reloads::set_request(&rw, db, nonce)?;
    }
    let pid_t =
        libc::pid_t::try_from(pid).map_err(|_| anyhow::anyhow!("pid {pid} is out of range"))?;
    // SAFETY: kill has no memory preconditions; the pid was checked to be hvac-edge.
    if unsafe { libc::kill(pid_t, libc::SIGHUP) } != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!(
            "cannot signal the daemon (pid {pid}): {e}; run this as the service user or root (or use `systemctl reload hvac-edge`)"
        );
    }
    let deadline = Instant::now() + timeout.min(Duration::from_secs(86_400));
    loop {
        while let Some(r) = reloads::after(&conn, db, last, pid)? {
            last = r.id;
            let outcome: ReloadOutcome = serde_json::from_str(&r.outcome)
                .map_err(|e| anyhow::anyhow!("the daemon's reload record is unreadable: {e}"))?;
            // A reload already under way when we signalled read the file before our change.
            if outcome.request == Some(nonce) {
                return Ok(Asked::Answer(pid, outcome));
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the daemon (pid {pid}) was signalled but recorded no outcome within {}s; see `journalctl -u hvac-edge`",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the daemon running on the database `conn` is open on (the pid it recorded, if
/// that process is alive and is hvac-edge), or None.
///
/// # Errors
/// A store error.
pub fn running_daemon(conn: &rusqlite::Connection, db: &Path) -> anyhow::Result<Option<u32>> {
    Ok(reloads::daemon(conn, db)?
        .map(|(p, _)| p)
        .filter(|p| not_hvac_edge(*p).is_none()))
}

/// Why `pid` is not a running hvac-edge, or None when it is.
pub fn not_hvac_edge(pid: u32) -> Option<String> {
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) if comm.trim_end() == "hvac-edge" => None,
        Ok(comm) => Some(format!(
            "pid {pid} is {:?}, not hvac-edge: the recorded pid is stale",
            comm.trim_end()
        )),
        Err(_) => Some(format!("pid {pid} is not running")),
    }
}

fn print(pid: u32, o: &ReloadOutcome, json: bool) -> i32 {
    let code = if o.applied && o.problems.is_empty() {
        0
    } else {
        1
    };
    if json {
        let mut v = serde_json::to_value(o).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert("pid".into(), pid.into());
        }
        println!("{v}");
        return code;
    }
    let out = o.summary();
    if o.applied {
        println!("daemon pid {pid} {out}");
    } else {
        eprintln!("daemon pid {pid}: {out}");
    }
    for p in &o.problems {
        eprintln!("  problem: {}", super::esc(p));
    }
    for w in &o.warnings {
        eprintln!("  warning: {}", super::esc(w));
    }
    code
}
