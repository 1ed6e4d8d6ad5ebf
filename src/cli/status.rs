//! `hvac-edge status`: one screen for a technician: is the daemon running, are the sources
//! linked and the devices online, is anything queued or failing, is there room on the disk and
//! is the clock right, and the last three errors.
//!
//! Read-only and cheap (well under 200 ms on a million pending events): counters, rowid
//! look-ups and the small tables only (`store::views`). Exit 0 when nothing needs attention,
//! 1 when something does (every problem is listed with what to run next), 78 when the config
//! cannot be read.

use super::render::{Align, Paint, Style, Table, paint_for};
use super::{esc, esc_or_dash, human_bytes, human_ms};
use crate::config::{ClockSource, Config};
use crate::store::{self, views};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// How long `status` may spend counting events when evictions left holes in the outbox.
const COUNT_BUDGET: Duration = Duration::from_millis(80);

/// Free space below which the disk is a problem.
const LOW_DISK_BYTES: u64 = 64 * 1024 * 1024;

/// The config at `path`, parsed without validation (secrets may be root-only), if readable.
pub fn read_config(path: &Path) -> Option<Config> {
    let text = std::fs::read_to_string(path).ok()?;
    toml::from_str(&text).ok()
}

/// The daemon as `status` sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonView {
    pub running: bool,
    /// The pid the last daemon recorded (it may have ended since).
    pub pid: Option<u32>,
    pub started_at: Option<i64>,
    /// Since the running daemon started.
    pub uptime_ms: Option<i64>,
    /// `systemctl is-active hvac-edge` (`active`, `inactive`, `failed`, …) where systemd runs.
    pub systemd: Option<String>,
}

/// Clock state.
#[derive(Debug, Clone, Serialize)]
pub struct ClockView {
    /// What this gateway says now (`gateway.clock`: the kernel's NTP state, or trusted).
    pub synced: bool,
    /// `ntp` or `trusted` (from the config; `ntp` when it cannot be read).
    pub source: &'static str,
    /// The `clock` stamp of the newest event (`synced`/`unsynced`).
    pub newest_event: Option<String>,
}

/// One source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    pub name: String,
    pub kind: String,
    pub link: String,
    pub since_ms: Option<i64>,
    pub last_valid_ms: Option<i64>,
    pub last_error: Option<String>,
    /// When the daemon stored this status.
    pub updated_at_ms: i64,
}

/// Devices by connectivity.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DeviceCounts {
    pub total: usize,
    pub online: usize,
    pub offline: usize,
    /// Never reported connectivity, or unreadable.
    pub unknown: usize,
}

/// One sink.
#[derive(Debug, Clone, Serialize)]
pub struct SinkView {
    pub name: String,
    pub kind: String,
    /// `ACTIVE`, `PAUSED` (a technician disabled it), `BANNED`, `DISABLED_DUE_TO_ERRORS`.
    pub status: String,
    pub enabled: bool,
    pub note: Option<String>,
    pub pending: i64,
    /// False when `pending` is an upper bound (see `store::views::count_after`).
    pub pending_exact: bool,
    pub oldest_pending_age_ms: Option<i64>,
    pub consecutive_failures: i64,
    pub dead_letters: i64,
    pub banned_until: Option<i64>,
    pub next_attempt_at: Option<i64>,
    pub last_success_at: Option<i64>,
    pub last_error: Option<String>,
}

/// Files and disk.
#[derive(Debug, Clone, Serialize)]
pub struct StorageView {
    pub db_bytes: u64,
    pub wal_bytes: u64,
    /// Free for the service user on the database's filesystem, and its size.
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
    pub events_stored: i64,
    pub events_stored_exact: bool,
    pub last_pos: i64,
    pub evicted_events: i64,
    pub dead_letters_dropped: i64,
    pub quarantined: Vec<String>,
}

/// Everything `status` prints.
#[derive(Debug, Clone, Serialize)]
pub struct StatusView {
    pub version: &'static str,
    pub database: String,
    pub now_ms: i64,
    pub daemon: DaemonView,
    pub clock: ClockView,
    pub sources: Vec<SourceView>,
    pub devices: DeviceCounts,
    pub sinks: Vec<SinkView>,
    pub storage: StorageView,
    pub recent_errors: Vec<views::RecentError>,
    /// What needs attention, each with what to do; empty when all is well (exit 0).
    pub problems: Vec<String>,
}

/// `statvfs` of `path`'s filesystem: (available to unprivileged users, total), bytes.
pub fn disk_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt as _;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zeroed struct we own; `c` is a valid C string.
    let (rc, st) = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    let frsize = (st.f_frsize as u64).max(1);
    #[allow(clippy::unnecessary_cast)]
    Some((
        (st.f_bavail as u64).saturating_mul(frsize),
        (st.f_blocks as u64).saturating_mul(frsize),
    ))
}

/// `systemctl is-active hvac-edge.service`, if systemctl exists and answers within a second.
fn systemd_state() -> Option<String> {
    let mut child = std::process::Command::new("systemctl")
        .args(["is-active", "hvac-edge.service"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    use std::io::Read as _;
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    let word = out.trim();
    // "offline" / "unknown": systemd does not run here (a container) or has no such unit.
    (!word.is_empty()
        && !word.contains(char::is_whitespace)
        && !matches!(word, "offline" | "unknown"))
    .then(|| word.to_string())
}

/// Reads everything `status` shows.
///
/// # Errors
/// When the database cannot be opened or read.
pub fn collect(db: &Path, config: Option<&Config>, systemd: bool) -> anyhow::Result<StatusView> {
    let conn = store::open(db, store::Mode::ReadOnly, &store::Options::default())?;
    let now = crate::telemetry::now_ms();
    let data = views::status(&conn, db, COUNT_BUDGET)?;
    let pid = super::reload::running_daemon(&conn, db)?;
    let daemon = DaemonView {
        running: pid.is_some(),
        pid: data.daemon.map(|(p, _)| p),
        started_at: data.daemon.map(|(_, at)| at),
        uptime_ms: pid
            .and(data.daemon)
            .map(|(_, at)| now.saturating_sub(at).max(0)),
        systemd: if systemd { systemd_state() } else { None },
    };
    let clock_source = config.map_or(ClockSource::Ntp, |c| c.gateway.clock);
    let clock = ClockView {
        synced: crate::store::writer::clock_state(clock_source) == crate::model::ClockState::Synced,
        source: match clock_source {
            ClockSource::Ntp => "ntp",
            ClockSource::Trusted => "trusted",
        },
        newest_event: data.newest_event.as_ref().map(|(_, c)| c.clone()),
    };
    let sources: Vec<SourceView> = data
        .sources
        .iter()
        .map(|(s, at)| SourceView {
            name: s.name.clone(),
            kind: s.kind.clone(),
            link: s.link.as_str().to_string(),
            since_ms: s.since_ms,
            last_valid_ms: s.last_valid_ms,
            last_error: s.last_error.clone(),
            updated_at_ms: *at,
        })
        .collect();
    let mut devices = DeviceCounts {
        total: data.devices.len(),
        ..DeviceCounts::default()
    };
    for d in &data.devices {
        match d.state.as_ref().and_then(|s| s.connectivity) {
            Some(crate::model::Connectivity::Online) => devices.online += 1,
            Some(crate::model::Connectivity::Offline) => devices.offline += 1,
            None => devices.unknown += 1,
        }
    }
    let sinks: Vec<SinkView> = data
        .sinks
        .iter()
        .map(|s| SinkView {
            name: s.row.name.clone(),
            kind: s.row.kind.clone(),
            status: s.row.status.clone(),
            enabled: s.control.as_ref().is_none_or(|c| c.enabled),
            note: s.control.as_ref().and_then(|c| c.note.clone()),
            pending: s.pending,
            pending_exact: s.pending_exact,
            oldest_pending_age_ms: s.oldest_pending_at.map(|t| now.saturating_sub(t).max(0)),
            consecutive_failures: s.row.consecutive_failures,
            dead_letters: s.dead_letters,
            banned_until: s.row.banned_until,
            next_attempt_at: s.row.next_attempt_at,
            last_success_at: s.row.last_success_at,
            last_error: s.row.last_error.clone(),
        })
        .collect();
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let disk = disk_space(db);
    let storage = StorageView {
        db_bytes: size(db),
        wal_bytes: size(Path::new(&wal)),
        disk_free_bytes: disk.map(|d| d.0),
        disk_total_bytes: disk.map(|d| d.1),
        events_stored: data.events_stored.n,
        events_stored_exact: data.events_stored.exact,
        last_pos: data.last_pos,
        evicted_events: data.evicted_events,
        dead_letters_dropped: data.dead_letters_dropped,
        quarantined: store::quarantined_files(db)
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
    };
    let mut v = StatusView {
        version: env!("CARGO_PKG_VERSION"),
        database: db.display().to_string(),
        now_ms: now,
        daemon,
        clock,
        sources,
        devices,
        sinks,
        storage,
        recent_errors: data.recent_errors,
        problems: Vec::new(),
    };
    v.problems = problems(&v);
    Ok(v)
}

/// What needs attention, each with the next step.
fn problems(v: &StatusView) -> Vec<String> {
    let mut p = Vec::new();
    if !v.daemon.running {
        p.push(match v.daemon.systemd.as_deref() {
            Some(state) => format!(
                "the daemon is not running (systemd: {state}): `systemctl status hvac-edge`, `journalctl -u hvac-edge -n 50`"
            ),
            None => "the daemon is not running: start it (`systemctl start hvac-edge`) and see `journalctl -u hvac-edge -n 50`".into(),
        });
    }
    if !v.clock.synced {
        p.push(format!(
            "the clock is not synchronised ({}): deliveries wait and events are stamped unsynced; check NTP (`timedatectl`)",
            v.clock.source
        ));
    }
    for s in &v.sources {
        if s.link == "disconnected" {
            p.push(format!(
                "source {} is disconnected: `hvac-edge sources` shows why",
                esc(&s.name)
            ));
        }
    }
    for s in &v.sinks {
        let name = esc(&s.name);
        match s.status.as_str() {
            "BANNED" | "DISABLED_DUE_TO_ERRORS" => p.push(format!(
                "sink {name} is {}: fix its endpoint, then `hvac-edge sinks enable {name}`",
                s.status
            )),
            _ if s.consecutive_failures > 0 => p.push(format!(
                "sink {name} is failing ({} in a row): `hvac-edge sinks {name}` shows its last attempts and their answers",
                s.consecutive_failures
            )),
            _ => {}
        }
        if s.dead_letters > 0 {
            p.push(format!(
                "sink {name} gave up on {} event(s): `hvac-edge queue dead-letters --sink {name}`",
                s.dead_letters
            ));
        }
    }
    if let Some(free) = v.storage.disk_free_bytes
        && free < LOW_DISK_BYTES
    {
        p.push(format!(
            "only {} free on the database's disk: commits hold when it is full",
            human_bytes(free)
        ));
    }
    p
}

fn ago(t: Option<i64>, now: i64) -> String {
    t.map_or("-".to_string(), |t| format!("{} ago", human_ms(now - t)))
}

/// Prints the status; returns the exit code (0 all well, 1 problems or an error).
pub fn run(db: &Path, config: Option<&Config>, json: bool) -> i32 {
    let v = match collect(db, config, true) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    let text = if json {
        match serde_json::to_string_pretty(&v) {
            Ok(s) => format!("{s}\n"),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        }
    } else {
        render(&v, Style::for_stdout())
    };
    if let Err(e) = super::render::emit(&text) {
        eprintln!("error: stdout: {e}");
        return 1;
    }
    i32::from(!v.problems.is_empty())
}

/// The status screen (tables escape every text from outside).
pub fn render(v: &StatusView, style: Style) -> String {
    use std::fmt::Write as _;
    let now = v.now_ms;
    let mut o = String::new();
    let word = |w: &str| style.paint(paint_for(w), w);
    let _ = writeln!(o, "hvac-edge {}, database {}", v.version, esc(&v.database));
    let daemon = if v.daemon.running {
        format!(
            "{} (pid {}), up {}",
            word("running"),
            v.daemon.pid.unwrap_or(0),
            v.daemon.uptime_ms.map_or("-".into(), human_ms)
        )
    } else {
        word("not running")
    };
    let systemd = v
        .daemon
        .systemd
        .as_deref()
        .map_or(String::new(), |s| format!("; systemd: {}", esc(s)));
    let _ = writeln!(o, "daemon    {daemon}{systemd}");
    let _ = writeln!(
        o,
        "clock     {} ({}); newest event stamped {}",
        word(if v.clock.synced { "synced" } else { "unsynced" }),
        v.clock.source,
        v.clock
            .newest_event
            .as_deref()
            .map_or("-".to_string(), |c| word(&esc(c)))
    );
    let s = &v.storage;
    let approx = if s.events_stored_exact { "" } else { "≤" };
    let _ = writeln!(
        o,
        "storage   database {} + WAL {}; disk {} free of {}; {approx}{} events stored, {} evicted, {} dead letters dropped",
        human_bytes(s.db_bytes),
        human_bytes(s.wal_bytes),
        s.disk_free_bytes.map_or("?".into(), human_bytes),
        s.disk_total_bytes.map_or("?".into(), human_bytes),
        s.events_stored,
        s.evicted_events,
        s.dead_letters_dropped
    );
    for q in &s.quarantined {
        let _ = writeln!(o, "          quarantined database kept: {}", esc(q));
    }
    let d = &v.devices;
    let _ = writeln!(
        o,
        "devices   {}: {} {}, {} {}{}",
        d.total,
        d.online,
        word("ONLINE"),
        d.offline,
        word("OFFLINE"),
        if d.unknown > 0 {
            format!(", {} unknown", d.unknown)
        } else {
            String::new()
        }
    );
    o.push('\n');
    if v.sources.is_empty() {
        o.push_str(
            "sources   none stored yet (the daemon stores them a few seconds after start)\n",
        );
    } else {
        let mut t = Table::new(&[
            ("source", Align::Left),
            ("kind", Align::Left),
            ("link", Align::Left),
            ("for", Align::Right),
            ("last valid data", Align::Right),
            ("last error", Align::Left),
        ]);
        for src in &v.sources {
            t.painted_row(vec![
                (esc(&src.name).into_owned(), None),
                (esc(&src.kind).into_owned(), None),
                (src.link.clone(), paint_for(&src.link)),
                (src.since_ms.map_or("-".into(), |t| human_ms(now - t)), None),
                (ago(src.last_valid_ms, now), None),
                (esc_or_dash(src.last_error.as_deref()).into_owned(), None),
            ]);
        }
        o.push_str(&t.render(style, ""));
    }
    o.push('\n');
    if v.sinks.is_empty() {
        o.push_str("sinks     none has run on this database yet\n");
    } else {
        let mut t = Table::new(&[
            ("sink", Align::Left),
            ("kind", Align::Left),
            ("status", Align::Left),
            ("pending", Align::Right),
            ("oldest", Align::Right),
            ("failures", Align::Right),
            ("dead", Align::Right),
            ("next try", Align::Right),
            ("last error", Align::Left),
        ]);
        for k in &v.sinks {
            let next = match k
                .banned_until
                .filter(|&b| b > now && k.status == "BANNED")
                .or(k.next_attempt_at)
            {
                Some(t) if t > now => format!("in {}", human_ms(t - now)),
                Some(_) => "due".into(),
                None if k.pending > 0 => "now".into(),
                None => "-".into(),
            };
            let status_paint = if k.status == "ACTIVE" && k.consecutive_failures > 0 {
                Some(Paint::Warn)
            } else {
                paint_for(&k.status)
            };
            let last_error = match (&k.note, k.status.as_str()) {
                (Some(n), "PAUSED") => format!("disabled by a technician: {}", esc(n)),
                _ => esc_or_dash(k.last_error.as_deref()).into_owned(),
            };
            t.painted_row(vec![
                (esc(&k.name).into_owned(), None),
                (esc(&k.kind).into_owned(), None),
                (esc(&k.status).into_owned(), status_paint),
                (
                    format!("{}{}", if k.pending_exact { "" } else { "≤" }, k.pending),
                    None,
                ),
                (k.oldest_pending_age_ms.map_or("-".into(), human_ms), None),
                (
                    k.consecutive_failures.to_string(),
                    (k.consecutive_failures > 0).then_some(Paint::Bad),
                ),
                (
                    k.dead_letters.to_string(),
                    (k.dead_letters > 0).then_some(Paint::Bad),
                ),
                (next, None),
                (last_error, None),
            ]);
        }
        o.push_str(&t.render(style, ""));
    }
    o.push('\n');
    if v.recent_errors.is_empty() {
        o.push_str("last errors: none recorded\n");
    } else {
        o.push_str("last errors\n");
        for e in &v.recent_errors {
            let _ = writeln!(
                o,
                "  {:>10} ago  {} {}: {}",
                human_ms(now - e.at),
                e.component,
                esc(&e.name),
                esc(&e.error)
            );
        }
    }
    o.push('\n');
    if v.problems.is_empty() {
        let _ = writeln!(o, "{}: nothing needs attention", word("ok"));
    } else {
        let _ = writeln!(
            o,
            "{} problem(s):",
            style.paint(Some(Paint::Bad), &v.problems.len().to_string())
        );
        for p in &v.problems {
            let _ = writeln!(o, "  - {p}");
        }
    }
    o
}

/// `hvac-edge status`; returns the exit code.
pub fn cmd(db: &super::DbArgs, json: bool) -> i32 {
    match super::queue::db_path(db) {
        Ok(p) => run(&p, read_config(&db.config).as_ref(), json),
        Err(c) => c,
    }
}
