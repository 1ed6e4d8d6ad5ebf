//! `hvac-edge doctor`: every check a site needs, each `ok`, `warn` or `fail` with what it found
//! and, for warn and fail, the fix in one line.
//!
//! Checks, in the order printed: the config (every problem with its key); the database (exists,
//! `PRAGMA quick_check` on a read-only connection, size and WAL size); who may write the database
//! directory and files, and their modes; free disk on the database's filesystem; each serial
//! source's port (present, a character device, who may open it, its owning group); each MQTT
//! source's broker and each sink's endpoint (DNS, TCP, TLS, then an MQTT CONNECT or an HTTP HEAD);
//! the clock; the service user; whether the daemon runs.
//!
//! It never disturbs the running daemon and never sends anything a receiver could take for an
//! event: serial ports are only looked at (`stat`, `access`), never opened; an HTTP endpoint
//! gets a `HEAD` request; a broker gets a CONNECT with a throwaway client id
//! (`<client id>-doctor`, clean session) and a DISCONNECT, so the daemon's persistent session is
//! never taken over. A plain `http://` URL to another host is never contacted. Network checks run
//! concurrently, each bounded by [`CHECK_TIMEOUT`].
//!
//! Run as root, "who may write or open" is decided from owner, group and mode against the
//! service user (the unit runs it without capabilities, so not even a root service could
//! override them); run as another user, with `access(2)` as that user.
//!
//! Exit codes: 0 nothing failed (warnings allowed); 1 a check failed or the config could not be
//! read; 78 the config is invalid (its problems are fails, and the checks that can run without a
//! valid config still run).

use crate::config::{self, Config, LoadError};
use crate::store;
use serde::Serialize;
use std::ffi::{CStr, CString};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest any one check may take (network checks run concurrently).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The user the unit runs hvac-edge as (`User=` in systemd/hvac-edge.service).
pub const DEFAULT_SERVICE_USER: &str = "hvac-edge";

/// Where the unit is installed: by hand (docs/install.md) or by the Debian package.
pub const UNIT_FILES: [&str; 3] = [
    "/etc/systemd/system/hvac-edge.service",
    "/lib/systemd/system/hvac-edge.service",
    "/usr/lib/systemd/system/hvac-edge.service",
];

/// Below this much free disk SQLite may fail to commit: a fail.
const MIN_FREE_BYTES: u64 = 50 * 1024 * 1024;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable name: `config`, `config:<key>`, `database`, `database-permissions`, `disk`,
    /// `serial:<source>`, `broker:<source>`, `sink:<sink>`, `clock`, `service-user`, `daemon`.
    pub name: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// For warn and fail: what to do, in one line.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn new(name: impl Into<String>, status: Status, detail: String, fix: Option<String>) -> Check {
        Check {
            name: name.into(),
            status,
            detail,
            fix: if status == Status::Ok { None } else { fix },
        }
    }
}

/// Everything `doctor` found (the `--json` document).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub fails: usize,
    pub warns: usize,
}

/// Runs every check, prints them (a table, or JSON with `json`) and returns the exit code.
/// `service_user`: the user the service runs as (default: `User=` of the installed unit, else
/// [`DEFAULT_SERVICE_USER`]).
pub fn run(config_path: &Path, service_user: Option<&str>, json: bool) -> i32 {
    let (report, invalid) = match diagnose(config_path, service_user) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    if json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        }
    } else {
        print_table(&report, use_colour());
    }
    if invalid {
        super::EXIT_CONFIG
    } else if report.fails > 0 {
        1
    } else {
        0
    }
}

/// Runs every check; returns the report and whether the config is invalid (exit 78).
///
/// # Errors
/// Only when the async runtime cannot be started.
pub fn diagnose(config_path: &Path, service_user: Option<&str>) -> anyhow::Result<(Report, bool)> {
    crate::tls::install_crypto_provider();
    let (loaded, mut checks) = load_config(config_path);
    let (cfg, invalid, store_known) = match loaded {
        Loaded::Valid(c) => (Some(*c), false, true),
        Loaded::Invalid(c) => {
            let known = c.is_some();
            (c.map(|c| *c), true, known)
        }
        Loaded::Unreadable => (None, false, false),
    };
    let who = Who::find(service_user);
    let store_cfg = cfg.as_ref().map(|c| c.store.clone()).unwrap_or_default();
    let db = store_cfg.path.clone();
    let unknown_note = if store_known {
        String::new()
    } else {
        format!(
            " (store.path unknown: the config could not be read, so the default {} was checked)",
            db.display()
        )
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut database, mut network) = rt.block_on(async {
        // Everything that waits (database, network) starts now and runs concurrently.
        let database = {
            let db = db.clone();
            let who = who.clone();
            tokio::task::spawn_blocking(move || database_checks(&db, &who))
        };
        let mut network: Vec<(String, tokio::task::JoinHandle<Check>)> = Vec::new();
        if let Some(cfg) = &cfg {
            for (i, s) in cfg.sources.mqtt.iter().enumerate() {
                let t = MqttTarget::source(i, s);
                network.push((t.check.clone(), tokio::spawn(mqtt_check(t))));
            }
            for (i, s) in cfg.sinks.http.iter().enumerate() {
                let t = HttpTarget {
                    check: format!("sink:{}", s.name),
                    key: format!("sinks.http[{i}]"),
                    url: Ok(s.url.clone()),
                    allow_insecure_http: s.allow_insecure_http,
                };
                network.push((t.check.clone(), tokio::spawn(http_check(t))));
            }
            for (i, s) in cfg.sinks.webhook.iter().enumerate() {
                let url = crate::sinks::template::UrlTemplate::parse(&s.url)
                    .map(|t| t.sample().to_string());
                let t = HttpTarget {
                    check: format!("sink:{}", s.name),
                    key: format!("sinks.webhook[{i}]"),
                    url,
                    allow_insecure_http: s.allow_insecure_http,
                };
                network.push((t.check.clone(), tokio::spawn(http_check(t))));
            }
            for (i, s) in cfg.sinks.mqtt.iter().enumerate() {
                let t = MqttTarget::sink(i, s, &cfg.gateway.id);
                network.push((t.check.clone(), tokio::spawn(mqtt_check(t))));
            }
        }
        // A backstop only: every check bounds itself by CHECK_TIMEOUT.
        let backstop = CHECK_TIMEOUT + Duration::from_secs(2);
        let database = match tokio::time::timeout(backstop, database).await {
            Ok(Ok(c)) => c,
            _ => vec![Check::fail(
                "database",
                format!("{}: no answer within {}s", db.display(), backstop.as_secs()),
                "the disk may hang: check `dmesg` for I/O errors",
            )],
        };
        let mut done = Vec::new();
        for (name, task) in network {
            done.push(match tokio::time::timeout(backstop, task).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => Check::fail(name, format!("the check failed: {e}"), "report this"),
                Err(_) => Check::fail(
                    name,
                    format!("no answer within {}s", backstop.as_secs()),
                    "a firewall or a dead route drops the packets: check the network",
                ),
            });
        }
        (database, done)
    });
    // Stop waiting for what is left (a resolver stuck past its timeout).
    rt.shutdown_timeout(Duration::from_millis(200));

    if let Some(first) = database.first_mut() {
        first.detail.push_str(&unknown_note);
    }
    let daemon = database.pop();
    checks.append(&mut database);
    checks.push(database_permissions(&db, &who));
    checks.push(disk_check(&db, store_cfg.max_bytes));
    if let Some(cfg) = &cfg {
        for (i, s) in cfg.sources.otgw.iter().enumerate() {
            checks.push(serial_check(
                &s.name,
                &format!("sources.otgw[{i}]"),
                &s.port,
                &who,
            ));
        }
        for (i, s) in cfg.sources.modbus.iter().enumerate() {
            checks.push(serial_check(
                &s.name,
                &format!("sources.modbus[{i}]"),
                &s.port,
                &who,
            ));
        }
        for (i, s) in cfg.sources.jsonl.iter().enumerate() {
            checks.push(serial_check(
                &s.name,
                &format!("sources.jsonl[{i}]"),
                &s.port,
                &who,
            ));
        }
    }
    checks.append(&mut network);
    checks.push(clock_check(
        cfg.as_ref().map(|c| c.gateway.clock).unwrap_or_default(),
    ));
    checks.push(service_user_check(&who));
    checks.extend(daemon);
    let fails = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = checks.iter().filter(|c| c.status == Status::Warn).count();
    Ok((
        Report {
            checks,
            fails,
            warns,
        },
        invalid,
    ))
}

// ------------------------------------------------------------------------------------ output

/// Colour only on a terminal, and never with `NO_COLOR` set (no-color.org).
fn use_colour() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn print_table(report: &Report, colour: bool) {
    let width = report
        .checks
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0)
        .min(32);
    let mut out = String::new();
    for c in &report.checks {
        let status = c.status.as_str();
        let shown = if colour {
            let code = match c.status {
                Status::Ok => "32",
                Status::Warn => "33",
                Status::Fail => "1;31",
            };
            format!("\x1b[{code}m{status:<4}\x1b[0m")
        } else {
            format!("{status:<4}")
        };
        out.push_str(&format!(
            "{shown}  {:<width$}  {}\n",
            super::esc(&c.name),
            super::esc(&c.detail)
        ));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("      {:<width$}  fix: {}\n", "", super::esc(fix)));
        }
    }
    let ok = report.checks.len() - report.fails - report.warns;
    out.push_str(&format!(
        "{} fail, {} warn, {ok} ok\n",
        report.fails, report.warns
    ));
    print!("{out}");
}

// ------------------------------------------------------------------------------------ config

enum Loaded {
    Valid(Box<Config>),
    /// Parsed (without validation) when the TOML and types are right.
    Invalid(Option<Box<Config>>),
    Unreadable,
}

fn load_config(path: &Path) -> (Loaded, Vec<Check>) {
    let shown = path.display();
    let recheck = format!("then `hvac-edge check-config -c {shown}`");
    match config::load(path) {
        Ok(cfg) => {
            let sources = cfg.sources.mqtt.len()
                + cfg.sources.otgw.len()
                + cfg.sources.modbus.len()
                + cfg.sources.jsonl.len()
                + cfg.sources.simulator.len();
            let mut checks = vec![Check::ok(
                "config",
                format!(
                    "{shown} is valid: gateway {}, {sources} source(s), {} sink(s), database {}",
                    cfg.gateway.id,
                    cfg.sinks.len(),
                    cfg.store.path.display()
                ),
            )];
            for w in cfg.warnings() {
                checks.push(Check::warn(
                    format!("config:{}", w.key),
                    w.problem,
                    format!("change {} in {shown} unless this is intended", w.key),
                ));
            }
            (Loaded::Valid(Box::new(cfg)), checks)
        }
        Err(LoadError::Read { source, .. }) => {
            let fix = match source.kind() {
                std::io::ErrorKind::PermissionDenied => format!(
                    "run as the service user or root: sudo -u {DEFAULT_SERVICE_USER} hvac-edge doctor -c {shown}"
                ),
                std::io::ErrorKind::NotFound => format!(
                    "pass -c FILE, or create {shown} from /usr/share/doc/hvac-edge/hvac-edge.toml.reference"
                ),
                _ => format!("make {shown} readable, {recheck}"),
            };
            (
                Loaded::Unreadable,
                vec![Check::fail(
                    "config",
                    format!("cannot read {shown}: {source}"),
                    fix,
                )],
            )
        }
        Err(LoadError::Parse { message, .. }) => (
            Loaded::Invalid(None),
            vec![Check::fail(
                "config",
                format!("{shown} is not valid TOML for hvac-edge: {message}"),
                format!("fix the file there, {recheck}"),
            )],
        ),
        Err(LoadError::Invalid { problems, .. }) => {
            let mut checks = vec![Check::fail(
                "config",
                format!(
                    "{shown} is invalid ({} problem(s), below): the daemon refuses to start with it (exit 78)",
                    problems.len()
                ),
                format!("fix every key below, {recheck}"),
            )];
            // SAFETY: geteuid has no preconditions and cannot fail.
            let root = unsafe { libc::geteuid() } == 0;
            for p in problems {
                let fix = if root && p.problem.contains("owned by uid") {
                    format!(
                        "as root, secret files owned by the service user are refused: run sudo -u {DEFAULT_SERVICE_USER} hvac-edge doctor -c {shown}"
                    )
                } else {
                    format!("change {} in {shown}", p.key)
                };
                checks.push(Check::fail(format!("config:{}", p.key), p.problem, fix));
            }
            // The other checks still run on what was written, unvalidated.
            let parsed = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| toml::from_str::<Config>(&t).ok())
                .map(Box::new);
            (Loaded::Invalid(parsed), checks)
        }
    }
}

// ------------------------------------------------------------------------------- accounts

/// A user account as NSS (`/etc/passwd`, `/etc/group`) knows it.
#[derive(Debug, Clone)]
struct Account {
    name: String,
    uid: u32,
    /// The primary group and every supplementary group (plus the unit's `SupplementaryGroups=`).
    gids: Vec<u32>,
}

/// The installed unit, as far as doctor needs it.
#[derive(Debug, Clone)]
struct Unit {
    path: PathBuf,
    user: Option<String>,
    supplementary_groups: Vec<String>,
}

/// Who runs doctor and who the service runs as.
#[derive(Debug, Clone)]
struct Who {
    euid: u32,
    current: String,
    service_name: String,
    service: Option<Account>,
    unit: Option<Unit>,
}

impl Who {
    fn find(service_user: Option<&str>) -> Who {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        let current = user_name(euid).unwrap_or_else(|| format!("uid {euid}"));
        let unit = installed_unit();
        let service_name = service_user
            .map(str::to_string)
            .or_else(|| unit.as_ref().and_then(|u| u.user.clone()))
            .unwrap_or_else(|| DEFAULT_SERVICE_USER.to_string());
        let service = lookup_user(&service_name).map(|(uid, gid)| {
            let mut gids = group_list(&service_name, gid);
            // The unit adds its SupplementaryGroups= (dialout) to the service's process.
            if let Some(u) = &unit {
                gids.extend(u.supplementary_groups.iter().filter_map(|g| group_id(g)));
            }
            gids.sort_unstable();
            gids.dedup();
            Account {
                name: service_name.clone(),
                uid,
                gids,
            }
        });
        Who {
            euid,
            current,
            service_name,
            service,
            unit,
        }
    }

    fn is_root(&self) -> bool {
        self.euid == 0
    }

    /// Whether the checks by `access(2)` speak for the service (doctor runs as that user).
    fn is_service(&self) -> bool {
        self.service.as_ref().is_some_and(|a| a.uid == self.euid)
    }
}

/// The first installed unit file, with `User=` and `SupplementaryGroups=` from it and its
/// drop-ins (`/etc/systemd/system/hvac-edge.service.d/*.conf`, `systemctl edit`).
fn installed_unit() -> Option<Unit> {
    let path = UNIT_FILES.iter().map(PathBuf::from).find(|p| p.is_file())?;
    let mut texts = vec![std::fs::read_to_string(&path).unwrap_or_default()];
    if let Ok(rd) = std::fs::read_dir("/etc/systemd/system/hvac-edge.service.d") {
        let mut drop_ins: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        drop_ins.sort();
        texts.extend(
            drop_ins
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok()),
        );
    }
    let mut unit = Unit {
        path,
        user: None,
        supplementary_groups: Vec::new(),
    };
    for line in texts.iter().flat_map(|t| t.lines()) {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("User=") {
            unit.user = Some(v.trim().to_string()).filter(|v| !v.is_empty());
        } else if let Some(v) = line.strip_prefix("SupplementaryGroups=") {
            if v.trim().is_empty() {
                // An empty assignment resets the list (systemd.exec(5)).
                unit.supplementary_groups.clear();
            } else {
                unit.supplementary_groups
                    .extend(v.split_whitespace().map(str::to_string));
            }
        }
    }
    Some(unit)
}

/// Runs a `get*_r` lookup with a growing buffer; `f` returns the call's result code and
/// whether an entry was found.
fn with_buffer<T>(mut f: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, Option<T>)) -> Option<T> {
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        let (rc, found) = f(&mut buf);
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return if rc == 0 { found } else { None };
    }
}

/// uid and primary gid of `name`.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: a zeroed passwd is a valid out-parameter; `buf` outlives the call and its
        // length is passed; `result` is read only after the call returned.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        (rc, (!result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
    })
}

/// The name of user `uid`.
fn user_name(uid: u32) -> Option<String> {
    with_buffer(|buf| {
        // SAFETY: as in lookup_user; pw_name points into `buf`, read before it is reused.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc =
            unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
        let name = (!result.is_null() && !pwd.pw_name.is_null())
            // SAFETY: a NUL-terminated string in `buf`, set by getpwuid_r.
            .then(|| {
                unsafe { CStr::from_ptr(pwd.pw_name) }
                    .to_string_lossy()
                    .into_owned()
            });
        (rc, name)
    })
}

/// The name of group `gid`.
fn group_name(gid: u32) -> Option<String> {
    with_buffer(|buf| {
        // SAFETY: as in lookup_user, for getgrgid_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc =
            unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
        let name = (!result.is_null() && !grp.gr_name.is_null())
            // SAFETY: a NUL-terminated string in `buf`, set by getgrgid_r.
            .then(|| {
                unsafe { CStr::from_ptr(grp.gr_name) }
                    .to_string_lossy()
                    .into_owned()
            });
        (rc, name)
    })
}

/// The gid of group `name`.
fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    with_buffer(|buf| {
        // SAFETY: as in lookup_user, for getgrnam_r.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                c.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        (rc, (!result.is_null()).then_some(grp.gr_gid))
    })
}

/// The primary group `gid` and every group listing `user` as a member.
fn group_list(user: &str, gid: u32) -> Vec<u32> {
    let Ok(c) = CString::new(user) else {
        return vec![gid];
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; usize::try_from(n).unwrap_or(64)];
        let mut count = n;
        // SAFETY: `groups` holds `count` entries; getgrouplist writes at most that many and
        // sets `count` to the number needed.
        let rc = unsafe { libc::getgrouplist(c.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(usize::try_from(count).unwrap_or(0));
            return groups;
        }
        if count <= n || count > 65_536 {
            return vec![gid];
        }
        n = count;
    }
}

fn group_label(gid: u32) -> String {
    group_name(gid).unwrap_or_else(|| gid.to_string())
}

fn owner_label(meta: &std::fs::Metadata) -> String {
    format!(
        "{}:{}",
        user_name(meta.uid()).unwrap_or_else(|| meta.uid().to_string()),
        group_label(meta.gid())
    )
}

/// `crw-rw----` style.
fn mode_string(meta: &std::fs::Metadata) -> String {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_file() {
        '-'
    } else {
        '?'
    };
    let mode = meta.mode();
    let mut s = String::from(kind);
    for shift in [6, 3, 0] {
        let b = (mode >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// Which permission class applies to `who` on a file: owner, group (and which) or others.
enum Class {
    Owner,
    Group,
    Others,
}

/// Whether `who` has every permission bit of `want` (4 read, 2 write, 1 execute/search) by
/// owner, group and mode alone. Deliberately without root's override: the unit runs the daemon
/// with no capabilities (`CapabilityBoundingSet=`), so mode bits are the truth for it.
fn allowed(meta: &std::fs::Metadata, who: &Account, want: u32) -> (bool, Class) {
    let mode = meta.mode();
    let (bits, class) = if meta.uid() == who.uid {
        ((mode >> 6) & 7, Class::Owner)
    } else if who.gids.contains(&meta.gid()) {
        ((mode >> 3) & 7, Class::Group)
    } else {
        (mode & 7, Class::Others)
    };
    (bits & want == want, class)
}

/// `access(2)` as the current user (`R_OK`, `W_OK`, `X_OK` bits).
fn access(path: &Path, mode: libc::c_int) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; access has no other preconditions.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

// ------------------------------------------------------------------------------ database

/// `database` and `daemon` (the latter last in the returned list).
fn database_checks(db: &Path, who: &Who) -> Vec<Check> {
    let shown = db.display().to_string();
    let unit_installed = who.unit.is_some();
    let not_running = |why: &str| {
        if unit_installed {
            Check::warn(
                "daemon",
                format!("not running ({why})"),
                "systemctl start hvac-edge; `journalctl -u hvac-edge` says why it stopped",
            )
        } else {
            Check::ok("daemon", format!("not running ({why})"))
        }
    };
    match std::fs::metadata(db) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![
                Check::warn(
                    "database",
                    format!("{shown} does not exist yet: created at first start"),
                    "nothing to do before the first start; if the service ran, store.path points elsewhere than its database",
                ),
                not_running("no database yet"),
            ];
        }
        Err(e) => {
            return vec![
                unreadable(who, format!("cannot look at {shown}: {e}")),
                not_running("its database cannot be read"),
            ];
        }
        Ok(_) => {}
    }
    let mut detail_tail = String::new();
    let size = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    let wal = std::fs::metadata(side_file(db, "-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    detail_tail.push_str(&format!(
        "{}, WAL {}",
        super::human_bytes(size),
        super::human_bytes(wal)
    ));
    let opts = store::Options {
        busy_timeout: Duration::from_secs(2),
        ..store::Options::default()
    };
    let conn = match store::open(db, store::Mode::ReadOnly, &opts) {
        Ok(c) => c,
        Err(e) => {
            let detail = format!("{e}; {detail_tail}");
            let check = match &e {
                store::Error::TooOld { .. } => Check::warn(
                    "database",
                    detail,
                    "the daemon migrates it when it starts: systemctl restart hvac-edge",
                ),
                store::Error::TooNew { .. } => Check::fail(
                    "database",
                    detail,
                    "install the hvac-edge version that wrote it (the daemon would move it aside as .newer-… and start empty)",
                ),
                store::Error::ForeignFile { .. } => Check::fail(
                    "database",
                    detail,
                    "store.path names another program's file: point it elsewhere (the daemon would move it aside as .foreign-…)",
                ),
                e if e.is_corrupt() => Check::fail(
                    "database",
                    detail,
                    "the daemon moves a damaged file aside (.corrupt-…, kept) at its next start: systemctl restart hvac-edge",
                ),
                _ if !who.is_root() && !access(db, libc::R_OK) => unreadable(who, detail),
                _ => Check::fail(
                    "database",
                    detail,
                    "see the error; `hvac-edge support-bundle` collects it for the integrator",
                ),
            };
            return vec![check, not_running("its database cannot be opened")];
        }
    };
    let integrity = quick_check(&conn, CHECK_TIMEOUT);
    let moved = store::quarantined_files(db);
    let mut checks = vec![match integrity {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => {
            if moved.is_empty() {
                Check::ok(
                    "database",
                    format!("{shown}: quick_check ok, {detail_tail}"),
                )
            } else {
                Check::warn(
                    "database",
                    format!(
                        "{shown}: quick_check ok, {detail_tail}; {} unusable database(s) were moved aside: {}",
                        moved.len(),
                        moved
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "inspect them (`hvac-edge queue stats --db FILE`), hand them to the integrator with `hvac-edge support-bundle`, then delete them",
                )
            }
        }
        Ok(rows) => Check::fail(
            "database",
            format!(
                "{shown}: quick_check found damage: {}; {detail_tail}",
                rows.join("; ")
            ),
            "the daemon moves a damaged file aside (.corrupt-…, kept) at its next start: systemctl restart hvac-edge",
        ),
        Err(e) => Check::warn(
            "database",
            format!("{shown}: quick_check did not complete: {e}; {detail_tail}"),
            "run it again when the disk is less busy; `hvac-edge support-bundle` runs it without a time limit",
        ),
    }];
    checks.push(match crate::cli::reload::running_daemon(&conn, db) {
        Ok(Some(pid)) => Check::ok("daemon", format!("running (pid {pid})")),
        Ok(None) => not_running("no live hvac-edge process recorded in the database"),
        Err(e) => Check::warn(
            "daemon",
            format!("cannot tell: {e}"),
            "systemctl status hvac-edge",
        ),
    });
    checks
}

/// A database the current user may not read: a fail only if doctor runs as the service user.
fn unreadable(who: &Who, detail: String) -> Check {
    if who.is_root() || who.is_service() {
        Check::fail(
            "database",
            detail,
            format!(
                "chown {u}:{u} the database and chmod 0600 it",
                u = who.service_name
            ),
        )
    } else {
        Check::warn(
            "database",
            format!(
                "{detail} (as user {}; the service runs as {})",
                who.current, who.service_name
            ),
            format!(
                "check it as the service user: sudo -u {} hvac-edge doctor",
                who.service_name
            ),
        )
    }
}

/// `PRAGMA quick_check(5)` on `conn`, interrupted after `limit`.
fn quick_check(conn: &rusqlite::Connection, limit: Duration) -> Result<Vec<String>, String> {
    let handle = conn.get_interrupt_handle();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let timer = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            handle.interrupt();
            return true;
        }
        false
    });
    let rows = conn.prepare("PRAGMA quick_check(5)").and_then(|mut st| {
        st.query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()
    });
    drop(done);
    let interrupted = timer.join().unwrap_or(false);
    match rows {
        Ok(r) => Ok(r),
        Err(_) if interrupted => Err(format!(
            "stopped after {}s (a large database on slow storage)",
            limit.as_secs()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn side_file(db: &Path, suffix: &str) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn db_dir(db: &Path) -> &Path {
    db.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Who may write the database directory and files, and their modes.
fn database_permissions(db: &Path, who: &Who) -> Check {
    const NAME: &str = "database-permissions";
    let dir = db_dir(db);
    let d = dir.display().to_string();
    let u = &who.service_name;
    let meta = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            return Check::fail(
                NAME,
                format!("{d} is not a directory"),
                "set store.path to a file in a directory, e.g. /var/lib/hvac-edge/hvac-edge.db",
            );
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::warn(
                NAME,
                format!("{d} does not exist"),
                format!(
                    "the unit creates /var/lib/hvac-edge (StateDirectory=); elsewhere: install -d -m 0750 -o {u} -g {u} {d}"
                ),
            );
        }
        Err(e) => {
            return Check::fail(
                NAME,
                format!("cannot look at {d}: {e}"),
                "check the permissions of the directories above it",
            );
        }
    };
    let mut found: Vec<(Status, String, String)> = Vec::new();
    let mut fine: Vec<String> = Vec::new();
    let how = if who.is_root() {
        format!("{u} (judged by owner and mode)")
    } else {
        format!("user {}", who.current)
    };
    // The directory: SQLite creates the WAL, the shared-memory file and journals beside the
    // database, so the service must be able to create files in it.
    let dir_ok = writable(&meta, dir, who, 3, libc::W_OK | libc::X_OK);
    let dir_label = format!("{d} ({} {})", mode_string(&meta), owner_label(&meta));
    match dir_ok {
        Some(true) => fine.push(format!("{dir_label} writable by {how}")),
        Some(false) => found.push((
            if who.is_root() || who.is_service() {
                Status::Fail
            } else {
                Status::Warn
            },
            format!(
                "{dir_label} is not writable by {how}: the database, its WAL and journal cannot be created or written"
            ),
            if who.is_root() || who.is_service() {
                format!("chown {u}:{u} {d} && chmod 0750 {d}")
            } else {
                format!("check as the service user or root: sudo -u {u} hvac-edge doctor")
            },
        )),
        None => found.push((
            Status::Warn,
            format!("{dir_label}: user {u} does not exist, so who may write it was not checked"),
            "create the service user (systemd-sysusers), or pass --service-user NAME".to_string(),
        )),
    }
    if meta.mode() & 0o027 != 0 {
        found.push((
            Status::Warn,
            format!(
                "{d} is mode {:04o}: others can look in it (or its group can write), expected 0750",
                meta.mode() & 0o7777
            ),
            format!("chmod 0750 {d}"),
        ));
    }
    for f in [
        db.to_path_buf(),
        side_file(db, "-wal"),
        side_file(db, "-shm"),
    ] {
        let Ok(m) = std::fs::metadata(&f) else {
            continue;
        };
        let fs = f.display().to_string();
        let label = format!("{fs} ({} {})", mode_string(&m), owner_label(&m));
        match writable(&m, &f, who, 6, libc::R_OK | libc::W_OK) {
            Some(false) => found.push((
                if who.is_root() || who.is_service() {
                    Status::Fail
                } else {
                    Status::Warn
                },
                format!("{label} is not readable and writable by {how}"),
                if who.is_root() || who.is_service() {
                    format!("chown {u}:{u} {fs} && chmod 0600 {fs}")
                } else {
                    format!("check as the service user or root: sudo -u {u} hvac-edge doctor")
                },
            )),
            _ if m.mode() & 0o077 != 0 => found.push((
                Status::Warn,
                format!(
                    "{label} is mode {:04o}: readable by others, and events name the household's devices and habits (expected 0600)",
                    m.mode() & 0o7777
                ),
                format!("chmod 0600 {fs} (the daemon also does at its next start)"),
            )),
            _ => fine.push(label),
        }
    }
    match found.iter().map(|f| f.0).max() {
        None => Check::ok(NAME, fine.join("; ")),
        Some(status) => {
            let detail = found
                .iter()
                .map(|f| f.1.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            // The fix of the worst problem first.
            let mut fixes: Vec<&(Status, String, String)> = found.iter().collect();
            fixes.sort_by_key(|f| std::cmp::Reverse(f.0));
            let fix = fixes
                .iter()
                .map(|f| f.2.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            Check::new(NAME, status, detail, Some(fix))
        }
    }
}

/// Whether the service may use `path` with `want` bits: by mode against the service user as
/// root, by `access(2)` otherwise. None when the service user does not exist and doctor runs
/// as root (nothing to check against).
fn writable(
    meta: &std::fs::Metadata,
    path: &Path,
    who: &Who,
    want: u32,
    access_mode: libc::c_int,
) -> Option<bool> {
    if who.is_root() {
        who.service.as_ref().map(|a| allowed(meta, a, want).0)
    } else {
        Some(access(path, access_mode))
    }
}

// ------------------------------------------------------------------------------------ disk

fn disk_check(db: &Path, max_bytes: u64) -> Check {
    const NAME: &str = "disk";
    // The nearest existing directory: the database's own may not exist yet.
    let mut dir = db_dir(db).to_path_buf();
    while !dir.is_dir() {
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => dir = p.to_path_buf(),
            _ => {
                dir = PathBuf::from(".");
                break;
            }
        }
    }
    let d = dir.display().to_string();
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return Check::warn(NAME, format!("cannot check {d}"), "check with df -h");
    };
    // SAFETY: a zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Check::warn(NAME, format!("statvfs {d}: {e}"), "check with df -h");
    }
    let frsize = st.f_frsize as u64;
    let free = (st.f_bavail as u64).saturating_mul(frsize);
    let total = (st.f_blocks as u64).saturating_mul(frsize);
    let pct = if total == 0 {
        100.0
    } else {
        free as f64 * 100.0 / total as f64
    };
    let cap = if max_bytes == 0 {
        "store.max_bytes = 0 (no cap: the database may fill the disk)".to_string()
    } else {
        format!("store.max_bytes {}", super::human_bytes(max_bytes))
    };
    let detail = format!(
        "{} free of {} ({pct:.0} %) on the filesystem of {d}; {cap}",
        super::human_bytes(free),
        super::human_bytes(total)
    );
    if free < MIN_FREE_BYTES {
        Check::fail(
            NAME,
            detail,
            "free space now (journalctl --vacuum-size=50M, old logs and packages): below 50 MiB commits fail and sources are held",
        )
    } else if pct < 10.0 || (max_bytes > 0 && free < max_bytes.saturating_mul(2)) {
        Check::warn(
            NAME,
            format!("{detail}; less than 10 % or 2x store.max_bytes free"),
            "free space on that filesystem, or lower store.max_bytes (the database grows to it and needs room beside it)",
        )
    } else {
        Check::ok(NAME, detail)
    }
}

// ---------------------------------------------------------------------------------- serial

/// `/dev/serial/by-id/*`, sorted.
fn by_id_links() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/dev/serial/by-id")
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn serial_check(source: &str, key: &str, port: &Path, who: &Who) -> Check {
    let name = format!("serial:{source}");
    let p = port.display().to_string();
    let meta = match std::fs::metadata(port) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let detail = match std::fs::read_link(port) {
                Ok(target) => format!("{p} is a link to {}, which is gone", target.display()),
                Err(_) => format!("{p} does not exist"),
            };
            let present = by_id_links();
            let fix = if present.is_empty() {
                format!(
                    "use /dev/serial/by-id/… in {key}.port (the path is gone: adapter unplugged?)"
                )
            } else {
                format!(
                    "adapter unplugged or renamed? set {key}.port to one of: {}",
                    present
                        .iter()
                        .take(4)
                        .map(|l| l.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Check::fail(name, detail, fix);
        }
        Err(e) => {
            return Check::fail(
                name,
                format!("cannot look at {p}: {e}"),
                "check the permissions of the directories above it",
            );
        }
    };
    let label = format!("{p} ({} {})", mode_string(&meta), owner_label(&meta));
    if !meta.file_type().is_char_device() {
        return Check::fail(
            name,
            format!("{label} is not a character device"),
            format!("set {key}.port to the serial adapter, e.g. /dev/serial/by-id/…"),
        );
    }
    let group = group_label(meta.gid());
    let group_rw = (meta.mode() >> 3) & 6 == 6;
    let fix_for = |user: &str| {
        if group_rw {
            format!(
                "add {user} to group {group}: usermod -aG {group} {user} (then systemctl restart hvac-edge)"
            )
        } else {
            format!(
                "the port's group has no read-write access: a udev rule with GROUP=\"dialout\", MODE=\"0660\" for this adapter, then add {user} to dialout"
            )
        }
    };
    let stable = stable_name(port);
    let mut detail = label.clone();
    let status = match &who.service {
        Some(acct) => match allowed(&meta, acct, 6) {
            (true, class) => {
                detail.push_str(&format!(
                    ": {} can read and write it ({})",
                    acct.name,
                    match class {
                        Class::Owner => "its owner".to_string(),
                        Class::Group => format!("group {group}"),
                        Class::Others => "anyone may".to_string(),
                    }
                ));
                Ok(())
            }
            (false, _) => Err((
                format!(
                    "{label}: {} cannot open it (not its owner, not in group {group} with read-write access)",
                    acct.name
                ),
                fix_for(&acct.name),
            )),
        },
        None if !who.is_root() => {
            if access(port, libc::R_OK | libc::W_OK) {
                detail.push_str(&format!(
                    ": user {} can read and write it; user {} does not exist, so the service's access was not checked",
                    who.current, who.service_name
                ));
                Ok(())
            } else {
                Err((
                    format!("{label}: user {} cannot open it", who.current),
                    fix_for(&who.current),
                ))
            }
        }
        None => {
            detail.push_str(&format!(
                ": user {} does not exist, so who may open it was not checked",
                who.service_name
            ));
            Ok(())
        }
    };
    match status {
        Ok(()) => {
            if let Some(s) = stable {
                detail.push_str(&format!("; stable name: {}", s.display()));
            }
            Check::ok(name, detail)
        }
        Err((detail, fix)) => Check::fail(name, detail, fix),
    }
}

/// A `/dev/serial/by-id/…` link to the same device, when the port is not already one.
fn stable_name(port: &Path) -> Option<PathBuf> {
    if port.starts_with("/dev/serial/by-id") {
        return None;
    }
    let real = std::fs::canonicalize(port).ok()?;
    by_id_links()
        .into_iter()
        .find(|l| std::fs::canonicalize(l).is_ok_and(|r| r == real))
}

// --------------------------------------------------------------------------------- network

/// A deadline shared by the stages of one check.
#[derive(Clone, Copy)]
struct Deadline(Instant);

impl Deadline {
    fn new() -> Deadline {
        Deadline(Instant::now() + CHECK_TIMEOUT)
    }

    fn left(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A failed stage: what was found and the fix.
type Stage<T> = Result<T, (String, String)>;

/// Addresses of `host:port`: an IP literal as is, `localhost` as 127.0.0.1 (as the sinks pin
/// it), anything else through the resolver.
async fn resolve(host: &str, port: u16, deadline: Deadline) -> Stage<(Vec<SocketAddr>, String)> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok((vec![SocketAddr::new(ip, port)], String::new()));
    }
    if h.eq_ignore_ascii_case("localhost") {
        return Ok((
            vec![SocketAddr::from(([127, 0, 0, 1], port))],
            String::new(),
        ));
    }
    let dns_fix = format!(
        "check the host name, /etc/resolv.conf and the uplink: `getent hosts {h}` must answer"
    );
    match tokio::time::timeout(deadline.left(), tokio::net::lookup_host((h, port))).await {
        Err(_) => Err((
            format!("DNS: no answer for {h} within {}s", CHECK_TIMEOUT.as_secs()),
            dns_fix,
        )),
        Ok(Err(e)) => Err((format!("DNS: cannot resolve {h}: {e}"), dns_fix)),
        Ok(Ok(addrs)) => {
            let v: Vec<SocketAddr> = addrs.collect();
            if v.is_empty() {
                return Err((format!("DNS: {h} has no address"), dns_fix));
            }
            let shown = v
                .iter()
                .take(3)
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            Ok((v, format!("{h} is {shown}; ")))
        }
    }
}

/// TCP to the first address that answers (blocking).
fn tcp_connect(addrs: &[SocketAddr], deadline: Deadline, refused_fix: &str) -> Stage<TcpStream> {
    let mut last = String::new();
    let mut timed_out = false;
    for a in addrs {
        let left = deadline.left();
        if left.is_zero() {
            timed_out = true;
            break;
        }
        match TcpStream::connect_timeout(a, left) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => {
                timed_out |= matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                );
                last = format!("{a}: {e}");
            }
        }
    }
    let shown = addrs
        .first()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "?".to_string());
    if timed_out {
        Err((
            format!(
                "TCP: no answer from {shown} within {}s",
                CHECK_TIMEOUT.as_secs()
            ),
            "a firewall drops the packets or the host is down: check routing and outbound rules for this port".to_string(),
        ))
    } else {
        Err((
            format!("TCP: cannot connect ({last})"),
            refused_fix.to_string(),
        ))
    }
}

/// Something to speak MQTT over: a TCP stream, plain or in TLS.
trait Io: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> Io for T {}

/// The TLS handshake on `sock` (blocking, bounded by the socket timeouts).
fn tls_handshake(
    sock: TcpStream,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
    deadline: Deadline,
) -> Stage<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    let tls_fix = format!(
        "the server's certificate must name {h} and be signed by a trusted CA (ca_file, or the system's CA store); is the port a TLS port? is the clock right?"
    );
    let name = rustls::pki_types::ServerName::try_from(h.to_string()).map_err(|e| {
        (
            format!("TLS: {h:?} is not a valid server name: {e}"),
            tls_fix.clone(),
        )
    })?;
    let conn = rustls::ClientConnection::new(cfg, name)
        .map_err(|e| (format!("TLS: {e}"), tls_fix.clone()))?;
    set_timeouts(&sock, deadline);
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        if let Err(e) = s.conn.complete_io(&mut s.sock) {
            let what = if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) {
                format!("no handshake within {}s", CHECK_TIMEOUT.as_secs())
            } else {
                e.to_string()
            };
            return Err((format!("TLS handshake with {h} failed: {what}"), tls_fix));
        }
    }
    Ok(s)
}

fn set_timeouts(sock: &TcpStream, deadline: Deadline) {
    let left = deadline.left().max(Duration::from_millis(1));
    let _ = sock.set_read_timeout(Some(left));
    let _ = sock.set_write_timeout(Some(left));
}

// ------------------------------------------------------------------------------------ MQTT

/// A broker to try: an MQTT source's or the MQTT sink's.
struct MqttTarget {
    check: String,
    key: String,
    host: String,
    port: u16,
    tls: Result<Option<Arc<rustls::ClientConfig>>, String>,
    client_id: String,
    username: Option<String>,
    password: Result<Option<String>, String>,
    keep_alive_secs: u64,
}

fn password(file: Option<&Path>, env: Option<&str>) -> Result<Option<String>, String> {
    match (file, env) {
        (Some(f), _) => config::read_secret_file(f).map(Some),
        (None, Some(e)) => config::read_secret_env(e).map(Some),
        (None, None) => Ok(None),
    }
}

fn tls_of(
    r: Result<Option<rustls::ClientConfig>, Vec<crate::tls::FileError>>,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    r.map(|c| c.map(Arc::new)).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

impl MqttTarget {
    fn source(i: usize, s: &config::MqttSourceConfig) -> MqttTarget {
        MqttTarget {
            check: format!("broker:{}", s.name),
            key: format!("sources.mqtt[{i}]"),
            host: s.host.clone(),
            port: s.port,
            tls: tls_of(s.tls_client_config()),
            client_id: format!("{}-doctor", s.effective_client_id()),
            username: s.username.clone(),
            password: password(
                config::some_path(&s.password_file),
                s.password_env.as_deref(),
            ),
            keep_alive_secs: s.keep_alive_secs,
        }
    }

    fn sink(i: usize, s: &config::MqttSinkConfig, gateway: &str) -> MqttTarget {
        MqttTarget {
            check: format!("sink:{}", s.name),
            key: format!("sinks.mqtt[{i}]"),
            host: s.host.clone(),
            port: s.effective_port(),
            tls: tls_of(s.tls_client_config()),
            client_id: format!("{}-doctor", s.effective_client_id(gateway)),
            username: s.username.clone(),
            password: password(
                config::some_path(&s.password_file),
                s.password_env.as_deref(),
            ),
            keep_alive_secs: s.keep_alive_secs,
        }
    }
}

async fn mqtt_check(t: MqttTarget) -> Check {
    let deadline = Deadline::new();
    let started = Instant::now();
    let MqttTarget {
        check,
        key,
        host,
        port,
        tls,
        client_id,
        username,
        password,
        keep_alive_secs,
    } = t;
    let target = format!("{host}:{port}");
    let tls = match tls {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                check,
                format!("{target}: TLS files unusable: {e}"),
                format!(
                    "fix {key}.ca_file / cert_file / key_file (`hvac-edge check-config` names each)"
                ),
            );
        }
    };
    let (addrs, resolved) = match resolve(&host, port, deadline).await {
        Ok(a) => a,
        Err((d, f)) => return Check::fail(check, format!("{target}: {d}"), f),
    };
    let host2 = host.clone();
    let user = username
        .clone()
        .unwrap_or_else(|| "(anonymous)".to_string());
    let refused = if key.starts_with("sources.") {
        format!(
            "nothing listens on {target}: start the broker (systemctl status mosquitto) or fix {key}.host / {key}.port"
        )
    } else {
        format!(
            "nothing listens on {target}: is the cloud broker up? check {key}.host / {key}.port"
        )
    };
    let blocking = tokio::task::spawn_blocking(move || -> Stage<(String, u8)> {
        let sock = tcp_connect(&addrs, deadline, &refused)?;
        let mut steps = String::from("TCP ok");
        let mut io: Box<dyn Io> = match tls {
            Some(cfg) => {
                let s = tls_handshake(sock, cfg, &host2, deadline)?;
                steps.push_str(", TLS ok");
                Box::new(s)
            }
            None => {
                set_timeouts(&sock, deadline);
                Box::new(sock)
            }
        };
        let pass = match password {
            Ok(p) => p,
            Err(e) => {
                return Err((
                    format!("{steps}; CONNECT not tried: cannot read the password: {e}"),
                    "run doctor as the service user, who can read it: sudo -u hvac-edge hvac-edge doctor".to_string(),
                ));
            }
        };
        let rc = mqtt_connect(
            &mut io,
            &client_id,
            username.as_deref(),
            pass.as_deref(),
            keep_alive_secs,
        )
        .map_err(|e| {
            (
                format!("{steps}; {e}"),
                "is this an MQTT port (a TLS port needs tls = true, a plain one tls = false)? see the broker's log".to_string(),
            )
        })?;
        Ok((
            format!("{steps}, CONNECT as {client_id} (clean session)"),
            rc,
        ))
    });
    let (steps, rc) = match blocking.await {
        Ok(Ok(r)) => r,
        Ok(Err((d, f))) => return Check::fail(check, format!("{target}: {resolved}{d}"), f),
        Err(e) => return Check::fail(check, format!("{target}: {e}"), "report this"),
    };
    let ms = started.elapsed().as_millis();
    let detail = format!("{target}: {resolved}{steps}");
    match rc {
        0 => Check::ok(check, format!("{detail}: accepted in {ms} ms")),
        1 => Check::fail(
            check,
            format!("{detail}: refused: MQTT 3.1.1 not accepted (CONNACK 1)"),
            "the broker must accept MQTT 3.1.1 (mosquitto does): check its listener settings",
        ),
        2 => Check::fail(
            check,
            format!("{detail}: refused: client id rejected (CONNACK 2)"),
            format!("the broker limits client ids: set a shorter {key}.client_id"),
        ),
        3 => Check::fail(
            check,
            format!("{detail}: refused: server unavailable (CONNACK 3)"),
            "the broker is up but not accepting clients: see its log",
        ),
        4 => Check::fail(
            check,
            format!("{detail}: refused: bad user name or password for {user} (CONNACK 4)"),
            format!(
                "check {key}.username and its password_file/password_env against the broker's password file (mosquitto_passwd)"
            ),
        ),
        5 => Check::fail(
            check,
            format!("{detail}: refused: not authorised as {user} (CONNACK 5)"),
            format!(
                "the broker refuses this client: set {key}.username and a password, or allow it in the broker's ACL"
            ),
        ),
        n => Check::fail(
            check,
            format!("{detail}: refused (CONNACK {n})"),
            "see the broker's log",
        ),
    }
}

/// Sends an MQTT 3.1.1 CONNECT (clean session) and returns the CONNACK's return code; after an
/// accepted one, sends DISCONNECT (so no will is published and the session ends at once).
fn mqtt_connect(
    io: &mut Box<dyn Io>,
    client_id: &str,
    username: Option<&str>,
    password: Option<&str>,
    keep_alive_secs: u64,
) -> Result<u8, String> {
    fn put_str(out: &mut Vec<u8>, s: &[u8]) -> Result<(), String> {
        let n = u16::try_from(s.len()).map_err(|_| "a CONNECT field is too long".to_string())?;
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(s);
        Ok(())
    }
    let mut flags = 0x02u8; // clean session
    if username.is_some() {
        flags |= 0x80;
    }
    if password.is_some() && username.is_some() {
        flags |= 0x40;
    }
    let keep_alive = u16::try_from(keep_alive_secs).unwrap_or(u16::MAX);
    let mut body = Vec::with_capacity(64);
    put_str(&mut body, b"MQTT")?;
    body.push(4); // protocol level 4 = MQTT 3.1.1
    body.push(flags);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_str(&mut body, client_id.as_bytes())?;
    if let Some(u) = username {
        put_str(&mut body, u.as_bytes())?;
        if let Some(p) = password {
            put_str(&mut body, p.as_bytes())?;
        }
    }
    let mut packet = vec![0x10u8];
    let mut n = body.len();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if n == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    let io_err = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ) {
            format!("no CONNACK within {}s", CHECK_TIMEOUT.as_secs())
        } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "the broker closed the connection without a CONNACK".to_string()
        } else {
            format!("CONNECT failed: {e}")
        }
    };
    io.write_all(&packet).map_err(io_err)?;
    io.flush().map_err(io_err)?;
    let mut ack = [0u8; 4];
    io.read_exact(&mut ack).map_err(io_err)?;
    if ack[0] != 0x20 || ack[1] != 0x02 {
        return Err(format!(
            "not an MQTT answer (first bytes {:02x} {:02x})",
            ack[0], ack[1]
        ));
    }
    if ack[3] == 0 {
        let _ = io.write_all(&[0xE0, 0x00]);
        let _ = io.flush();
    }
    Ok(ack[3])
}

// ------------------------------------------------------------------------------------ HTTP

/// An HTTP or webhook sink's endpoint.
struct HttpTarget {
    check: String,
    key: String,
    /// The URL (a webhook's with sample values for its placeholders), or why it is unusable.
    url: Result<String, String>,
    allow_insecure_http: bool,
}

async fn http_check(t: HttpTarget) -> Check {
    let HttpTarget {
        check,
        key,
        url,
        allow_insecure_http,
    } = t;
    let parsed = url.and_then(|u| url::Url::parse(&u).map_err(|e| e.to_string()));
    let u = match parsed {
        Ok(u) => u,
        Err(e) => {
            return Check::fail(
                check,
                format!("the url is unusable: {}", config::redact_userinfo(&e)),
                format!("fix {key}.url"),
            );
        }
    };
    let host = u.host_str().unwrap_or("").to_string();
    let port = u.port_or_known_default().unwrap_or(443);
    // Scheme, host, port and path only: never userinfo or a query that may hold a key.
    let shown = format!("{}://{}{}", u.scheme(), u.host_str().unwrap_or(""), {
        let p = u.port().map(|p| format!(":{p}")).unwrap_or_default();
        format!("{p}{}", u.path())
    });
    let loopback = is_loopback(&host);
    let plain = match u.scheme() {
        "https" => None,
        "http" if !loopback => {
            // Never contacted: this config sends events and signatures in clear across the network.
            return Check::fail(
                check,
                format!(
                    "{shown}: plain http:// to {host}, which is not this gateway: events, signatures and keys would cross the network in clear, and the daemon refuses this config (not contacted)"
                ),
                format!("use https:// in {key}.url"),
            );
        }
        "http" if allow_insecure_http => Some(Check::warn(
            check.clone(),
            String::new(),
            "plain http:// is only for a receiver on this gateway; use https:// otherwise",
        )),
        "http" => Some(Check::fail(
            check.clone(),
            String::new(),
            format!("set {key}.allow_insecure_http = true (loopback only) or use https://"),
        )),
        other => {
            return Check::fail(
                check,
                format!("{shown}: scheme {other:?} is not supported"),
                format!("use https:// in {key}.url"),
            );
        }
    };
    let deadline = Deadline::new();
    let (addrs, resolved) = match resolve(&host, port, deadline).await {
        Ok(a) => a,
        Err((d, f)) => return Check::fail(check, format!("{shown}: {d}"), f),
    };
    let https = u.scheme() == "https";
    let host2 = host.clone();
    let refused = format!(
        "nothing listens on {host}:{port}: is the receiver up? check the host and port of {key}.url"
    );
    let transport = tokio::task::spawn_blocking(move || -> Stage<String> {
        let sock = tcp_connect(&addrs, deadline, &refused)?;
        if !https {
            return Ok("TCP ok".to_string());
        }
        let cfg = crate::tls::client_config(crate::tls::ClientFiles {
            ca_file: None,
            client_cert: None,
        })
        .map_err(|errs| {
            (
                format!(
                    "TLS: {}",
                    errs.iter()
                        .map(|e| e.problem.clone())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                "install the system's CA certificates (apt-get install ca-certificates)"
                    .to_string(),
            )
        })?;
        let mut s = tls_handshake(sock, Arc::new(cfg), &host2, deadline)?;
        s.conn.send_close_notify();
        let _ = s.flush();
        Ok("TCP ok, TLS ok".to_string())
    })
    .await;
    let steps = match transport {
        Ok(Ok(s)) => s,
        Ok(Err((d, f))) => return Check::fail(check, format!("{shown}: {resolved}{d}"), f),
        Err(e) => return Check::fail(check, format!("{shown}: {e}"), "report this"),
    };
    let started = Instant::now();
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(deadline.left().max(Duration::from_millis(1)))
        .user_agent(concat!("hvac-edge-doctor/", env!("CARGO_PKG_VERSION")));
    if loopback {
        // As the sinks do: never through a proxy from the environment, localhost pinned.
        b = b.no_proxy();
        if host.eq_ignore_ascii_case("localhost") {
            b = b.resolve(&host, SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    let probe = match b.build() {
        Ok(client) => client.head(u.clone()).send().await,
        Err(e) => return Check::fail(check, format!("{shown}: {e}"), "report this"),
    };
    let (status, detail, fix) = match probe {
        Ok(resp) => {
            let st = resp.status();
            let ms = started.elapsed().as_millis();
            let answer = format!(
                "{shown}: {resolved}{steps}, HEAD answered {} {} in {ms} ms",
                st.as_u16(),
                st.canonical_reason().unwrap_or("")
            );
            if st.is_server_error() {
                (
                    Status::Warn,
                    format!("{answer}: reachable, but the receiver reports an error"),
                    Some(format!(
                        "the receiver has a problem: tell its operator; `hvac-edge sinks test {}` sends a real test event",
                        check.trim_start_matches("sink:")
                    )),
                )
            } else {
                (
                    Status::Ok,
                    format!(
                        "{answer}: reachable (credentials are not checked here: `hvac-edge sinks test {}`)",
                        check.trim_start_matches("sink:")
                    ),
                    None,
                )
            }
        }
        Err(e) => {
            let what = if e.is_timeout() {
                format!("no HTTP answer within {}s", CHECK_TIMEOUT.as_secs())
            } else {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(inner) = src {
                    s.push_str(&format!(": {inner}"));
                    src = inner.source();
                }
                s
            };
            (
                Status::Fail,
                format!("{shown}: {resolved}{steps}, HTTP: {what}"),
                Some("the endpoint accepts connections but does not answer HTTP: check the URL's port and scheme".to_string()),
            )
        }
    };
    match plain {
        Some(p) if p.status >= status => Check::new(
            check,
            p.status,
            format!("{detail}; plain http:// (loopback)"),
            p.fix,
        ),
        _ => Check::new(check, status, detail, fix),
    }
}

// ----------------------------------------------------------------------------------- clock

fn clock_check(source: config::ClockSource) -> Check {
    const NAME: &str = "clock";
    use crate::model::ClockState;
    let now = crate::telemetry::now_ms();
    let shown = crate::model::format_rfc3339_ms(now);
    let kernel = crate::store::writer::clock_state(config::ClockSource::Ntp);
    if now < crate::telemetry::CLOCK_SANE_MIN_MS {
        return Check::fail(
            NAME,
            format!(
                "the gateway clock reads {shown}, before 2024: it was never set (no RTC, no NTP yet); deliveries are held"
            ),
            "set the time: enable NTP (timedatectl set-ntp true) and check the uplink, or timedatectl set-time",
        );
    }
    let kernel_says = if kernel == ClockState::Synced {
        "the kernel reports it synchronised"
    } else {
        "the kernel reports it not synchronised"
    };
    match source {
        config::ClockSource::Trusted => Check::ok(
            NAME,
            format!(
                "{shown}; gateway.clock = \"trusted\" (taken as right once past 2024); {kernel_says}"
            ),
        ),
        config::ClockSource::Ntp if kernel == ClockState::Synced => Check::ok(
            NAME,
            format!("{shown}; gateway.clock = \"ntp\": {kernel_says}"),
        ),
        config::ClockSource::Ntp => Check::warn(
            NAME,
            format!(
                "{shown}; gateway.clock = \"ntp\": {kernel_says}: events are stamped \"clock\": \"unsynced\""
            ),
            "enable time sync (timedatectl set-ntp true; systemd-timesyncd or chrony) and check that NTP can reach its servers; with a battery RTC set gateway.clock = \"trusted\"",
        ),
    }
}

// ---------------------------------------------------------------------------- service user

fn service_user_check(who: &Who) -> Check {
    const NAME: &str = "service-user";
    let u = &who.service_name;
    match (&who.service, &who.unit) {
        (Some(acct), unit) => {
            let groups: Vec<String> = acct.gids.iter().map(|g| group_label(*g)).collect();
            let unit_note = match unit {
                Some(unit) if !unit.supplementary_groups.is_empty() => format!(
                    " (with SupplementaryGroups={} of {})",
                    unit.supplementary_groups.join(" "),
                    unit.path.display()
                ),
                Some(unit) => format!(" ({} installed)", unit.path.display()),
                None => " (no hvac-edge unit installed)".to_string(),
            };
            Check::ok(
                NAME,
                format!(
                    "user {u} (uid {}) exists; groups: {}{unit_note}",
                    acct.uid,
                    groups.join(", ")
                ),
            )
        }
        (None, Some(unit)) => Check::fail(
            NAME,
            format!(
                "user {u} does not exist, but {} is installed and runs the daemon as it: the service cannot start",
                unit.path.display()
            ),
            format!(
                "create it: systemd-sysusers (with /usr/lib/sysusers.d/hvac-edge.conf), or useradd --system --home-dir /var/lib/hvac-edge --shell /usr/sbin/nologin --groups dialout {u}"
            ),
        ),
        (None, None) => Check::ok(
            NAME,
            format!(
                "user {u} does not exist and no hvac-edge unit is installed here (not installed as a service)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker that answers `reply` and records what it was sent.
    struct Fake {
        written: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        reply: std::io::Cursor<Vec<u8>>,
    }

    impl std::io::Write for Fake {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.written.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl std::io::Read for Fake {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.reply.read(b)
        }
    }

    fn connect_bytes(user: Option<&str>, pass: Option<&str>) -> Vec<u8> {
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut io: Box<dyn Io> = Box::new(Fake {
            written: written.clone(),
            reply: std::io::Cursor::new(vec![0x20, 0x02, 0, 0]),
        });
        assert_eq!(mqtt_connect(&mut io, "gw-doctor", user, pass, 30), Ok(0));
        written.lock().unwrap().clone()
    }

    #[test]
    fn connect_is_mqtt_311_clean_session_then_disconnect() {
        let b = connect_bytes(None, None);
        let mut want = vec![0x10, 21, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 9];
        want.extend_from_slice(b"gw-doctor");
        want.extend_from_slice(&[0xE0, 0x00]);
        assert_eq!(b, want);
        let b = connect_bytes(Some("u"), Some("p"));
        assert_eq!(b[9], 0xC2, "user name, password and clean session flags");
        assert_eq!(&b[b.len() - 8..b.len() - 2], &[0, 1, b'u', 0, 1, b'p']);
    }

    fn answer(reply: &[u8]) -> (Result<u8, String>, Vec<u8>) {
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut io: Box<dyn Io> = Box::new(Fake {
            written: written.clone(),
            reply: std::io::Cursor::new(reply.to_vec()),
        });
        let r = mqtt_connect(&mut io, "x", None, None, 30);
        let w = written.lock().unwrap().clone();
        (r, w)
    }

    #[test]
    fn a_refusal_is_returned_and_not_followed_by_disconnect() {
        let (r, w) = answer(&[0x20, 0x02, 0, 5]);
        assert_eq!(r, Ok(5));
        assert_eq!(w[0], 0x10);
        assert!(!w.ends_with(&[0xE0, 0x00]), "DISCONNECT after a refusal");
        assert_eq!(
            answer(b"HTTP").0,
            Err("not an MQTT answer (first bytes 48 54)".to_string())
        );
        assert_eq!(
            answer(&[0x20]).0,
            Err("the broker closed the connection without a CONNACK".to_string())
        );
    }

    #[test]
    fn mode_bits_decide_for_the_service_user() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let m = std::fs::metadata(&f).unwrap();
        let owner = Account {
            name: "o".into(),
            uid: m.uid(),
            gids: vec![],
        };
        let member = Account {
            name: "g".into(),
            uid: m.uid().wrapping_add(1),
            gids: vec![m.gid()],
        };
        let other = Account {
            name: "x".into(),
            uid: m.uid().wrapping_add(1),
            gids: vec![m.gid().wrapping_add(1)],
        };
        assert!(allowed(&m, &owner, 6).0);
        assert!(allowed(&m, &member, 4).0);
        assert!(!allowed(&m, &member, 6).0);
        assert!(!allowed(&m, &other, 4).0);
        assert_eq!(mode_string(&m), "-rw-r-----");
    }
}
