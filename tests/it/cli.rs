//! The real `hvac-edge` binary as a technician uses it: `check-config` on the fixtures in
//! `tests/fixtures/config/` and on the shipped configs (exit 0 / 78 / 1, offending keys on
//! stderr), and `queue stats` / `queue dead-letters` on a database written by `hvac-edge run`,
//! both while that daemon runs and after it stopped on SIGTERM.
//!
//! Self-contained on purpose (no shared harness): a temp dir per test, loopback only, and every
//! wait is a bounded poll.

use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hvac-edge");
/// sysexits `EX_CONFIG`: what check-config and run return for an invalid config.
const EXIT_CONFIG: i32 = 78;
/// Upper bound of every wait in this file.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The package root: relative paths in fixtures and commands resolve from here.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A config fixture, relative to [`root`] (the commands run there), as a technician types it.
fn fixture(name: &str) -> PathBuf {
    Path::new("tests/fixtures/config").join(name)
}

/// Runs the binary to completion (never inheriting a systemd notify socket or RUST_LOG).
fn hvac_edge(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(root())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls `cond` every 20 ms until it holds; panics naming `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
}

// ---------------------------------------------------------------------- check-config

#[test]
fn check_config_accepts_the_good_fixture() {
    let f = fixture("good.toml");
    let out = hvac_edge(&["check-config", "-c", path_str(&f)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{} is valid: gateway gw-fixture, 1 source(s), 1 sink(s), database /var/lib/hvac-edge/fixture.db\n",
            f.display()
        )
    );
    // The fixture uses synchronous = "normal": valid, with a warning (issue 11 item 15).
    assert_eq!(
        text(&out.stderr),
        "warning: store.synchronous: \"normal\" does not fsync each commit: a power cut may \
         roll back events that were already acknowledged to the broker, and they are lost; use \
         \"full\" (the default) unless the gateway has a UPS or battery-backed storage\n"
    );
}

#[test]
fn check_config_accepts_the_shipped_configs() {
    for config in [
        "config/hvac-edge.toml",
        "config/examples/generic-esphome.toml",
    ] {
        let out = hvac_edge(&["check-config", "-c", config]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{config}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stdout).starts_with(&format!("{config} is valid: ")),
            "{}",
            text(&out.stdout)
        );
    }
}

#[test]
fn check_config_prints_every_offending_key_and_exits_78() {
    let cases: &[(&str, &[&str])] = &[
        (
            "bad-http-url.toml",
            &[
                "is invalid (1 problem)\n",
                "\n  sinks.http[0].url: plain http:// is refused for non-loopback hosts; use https://\n",
            ],
        ),
        (
            "bad-several-problems.toml",
            &[
                "is invalid (4 problems)\n",
                "\n  gateway.id: must not be empty\n",
                "\n  pipeline.batch_max: must be between 1 and 100000\n",
                "\n  sources.simulator[1].name: \"sim\" is already used by sources.simulator[0]\n",
                "\n  sinks.http[0].ttl_secs: must be at least 1\n",
            ],
        ),
        (
            "bad-generic-mapping.toml",
            &[
                "is invalid (2 problems)\n",
                "\n  sources.mqtt[0].mapping.fields.target: unknown canonical field \"target\"",
                "\n  sources.mqtt[0].mapping.values.mode.heat: \"HEATING\" is not a valid value here",
            ],
        ),
        (
            "bad-unknown-key.toml",
            &["at line 11", "unknown field `retry_schedule`"],
        ),
        (
            "bad-wrong-type.toml",
            &["at line 9", "invalid type: string \"1883\", expected u16"],
        ),
        ("bad-missing-gateway-id.toml", &["missing field `id`"]),
    ];
    for (name, wanted) in cases {
        let f = fixture(name);
        let out = hvac_edge(&["check-config", "-c", path_str(&f)]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{name}: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: {}", f.display())),
            "{name}: {stderr}"
        );
        for w in *wanted {
            assert!(stderr.contains(w), "{name}: {w:?} not in:\n{stderr}");
        }
        assert_eq!(text(&out.stdout), "", "{name}");
    }
}

#[test]
fn check_config_on_a_missing_file_exits_1_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("nowhere.toml");
    let out = hvac_edge(&["check-config", "-c", path_str(&f)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!("error: cannot read {}: ", f.display())),
        "{stderr}"
    );
}

#[test]
fn check_config_refuses_a_secret_file_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("whsec");
    std::fs::write(&secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("hvac-edge.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw\"\n[[sinks.http]]\nname = \"up\"\nurl = \"https://ingest.example.com/x\"\nsigning_secret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .unwrap();
    let out = hvac_edge(&["check-config", "-c", path_str(&config)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "\n  sinks.http[0].signing_secret_file: {} is accessible by group or others (mode 644)",
            secret.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("MfKQ9r8G"), "the secret leaked: {stderr}");

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = hvac_edge(&["check-config", "-c", path_str(&config)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn run_refuses_an_invalid_config_with_exit_78() {
    let f = fixture("bad-several-problems.toml");
    let out = hvac_edge(&["run", "--allow-root", "-c", path_str(&f)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_CONFIG), "{stderr}");
    assert!(stderr.contains("gateway.id: must not be empty"), "{stderr}");
}

// ---------------------------------------------------------------------- queue

/// A daemon child process; killed if the test ends while it still runs.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: PathBuf) -> Daemon {
        let file = |p: &Path| {
            std::fs::File::create(p)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()))
        };
        let child = Command::new(BIN)
            .args(["run", "--allow-root", "-c", path_str(config)])
            .current_dir(root())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file(&log.with_extension("stdout")))
            .stderr(file(&log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN}: {e}"));
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "the daemon exited early ({status}); its log:\n{}",
                self.log()
            );
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit code.
    fn terminate(mut self) -> Option<i32> {
        let pid = libc::pid_t::try_from(self.child.id())
            .unwrap_or_else(|e| panic!("pid out of range: {e}"));
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet (no wait since
        // `assert_running` found it alive), so the pid cannot belong to another process.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        let mut status = None;
        wait_until("the daemon to exit after SIGTERM", TIMEOUT, || {
            status = self
                .child
                .try_wait()
                .unwrap_or_else(|e| panic!("wait failed: {e}"));
            status.is_some()
        });
        status.and_then(|s| s.code())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A loopback port nothing listens on (bound once by us, then released).
fn unused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
    l.local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"))
        .port()
}

/// A read-only look at the database; `None` while it does not exist or has no tables yet.
fn query<T>(
    db: &Path,
    sql: &str,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Option<T> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    conn.query_row(sql, [], f).ok()
}

fn event_count(db: &Path) -> i64 {
    query(db, "SELECT COUNT(*) FROM events", |r| r.get(0)).unwrap_or(0)
}

fn sink_last_error(db: &Path, sink: &str) -> Option<String> {
    query(
        db,
        &format!("SELECT last_error FROM sinks WHERE name = '{sink}'"),
        |r| r.get::<_, Option<String>>(0),
    )
    .flatten()
}

fn queue_stats_json(db: &Path) -> serde_json::Value {
    let out = hvac_edge(&["queue", "stats", "--json", "--db", path_str(db)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "queue stats --json is not JSON ({e}):\n{}",
            text(&out.stdout)
        )
    })
}

/// The table row of `sink` in `queue stats` text output, split on whitespace.
fn stats_row(stdout: &str, sink: &str) -> Vec<String> {
    stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(sink))
        .unwrap_or_else(|| panic!("no row for {sink} in:\n{stdout}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn queue_stats_reads_the_outbox_of_a_running_and_of_a_stopped_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outbox.db");
    let config = dir.path().join("hvac-edge.toml");
    let port = unused_port();
    std::fs::write(
        &config,
        format!(
            r#"[gateway]
id = "gw-cli"

[store]
path = "{db}"

[pipeline]
checkpoint_interval_secs = 1

[[sources.simulator]]
name = "sim"
devices = 3
changes_per_sec = 200.0
max_observations = 20

[[sinks.http]]
name = "upstream"
url = "http://127.0.0.1:{port}/x"
allow_insecure_http = true
request_timeout_ms = 2000
retry_schedule_secs = [3600]
"#,
            db = db.display()
        ),
    )
    .unwrap();

    let mut daemon = Daemon::start(&config, dir.path().join("daemon.log"));
    wait_until(
        "the simulator's 20 observations and a failed delivery attempt",
        TIMEOUT,
        || {
            daemon.assert_running();
            daemon.log().contains("Simulator finished")
                && event_count(&db) > 0
                && sink_last_error(&db, "upstream").is_some()
        },
    );

    // Read-only while the daemon holds the database.
    let out = hvac_edge(&["queue", "stats", "--db", path_str(&db)]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.starts_with(&format!("database {}: ", db.display())),
        "{stdout}"
    );
    let row = stats_row(&stdout, "upstream");
    assert_eq!(&row[1..3], ["http", "ACTIVE"], "{stdout}");
    let live = queue_stats_json(&db);
    assert_eq!(live["sinks"][0]["name"], "upstream");
    assert!(live["sinks"][0]["pending"].as_i64().unwrap() > 0, "{live}");
    daemon.assert_running();

    let log_path = daemon.log.clone();
    assert_eq!(
        daemon.terminate(),
        Some(0),
        "exit code after SIGTERM; log:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );

    // The final outbox, straight from SQLite: every event pending, seq gap-free per device.
    let events = event_count(&db);
    assert!(events >= 3, "{events} events");
    let max_pos: i64 = query(&db, "SELECT MAX(pos) FROM events", |r| r.get(0)).unwrap();
    let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut st = conn
        .prepare("SELECT device, seq, type FROM events ORDER BY pos")
        .unwrap();
    let rows: Vec<(String, i64, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut last_seq = std::collections::BTreeMap::<String, i64>::new();
    for (device, seq, kind) in &rows {
        let prev = last_seq.insert(device.clone(), *seq).unwrap_or(0);
        assert_eq!(*seq, prev + 1, "seq gap for {device}: {rows:?}");
        if prev == 0 {
            assert_eq!(kind, "snapshot", "first event of {device}");
        }
    }
    let devices = last_seq.len() as i64;
    assert!(
        last_seq
            .keys()
            .all(|d| ["sim-001", "sim-002", "sim-003"].contains(&d.as_str())),
        "{last_seq:?}"
    );
    drop(st);
    drop(conn);

    let v = queue_stats_json(&db);
    let s = &v["sinks"][0];
    assert_eq!(v["sinks"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(s["name"], "upstream", "{v}");
    assert_eq!(s["kind"], "http", "{v}");
    assert_eq!(s["status"], "ACTIVE", "{v}");
    assert_eq!(s["pending"].as_i64(), Some(events), "{v}");
    assert_eq!(s["cursor"].as_i64(), Some(0), "{v}");
    assert_eq!(s["delivered"].as_i64(), Some(0), "{v}");
    assert_eq!(s["dead_letters"].as_i64(), Some(0), "{v}");
    assert!(s["consecutive_failures"].as_i64().unwrap() >= 1, "{v}");
    assert!(s["next_attempt_at"].is_i64(), "a retry is scheduled: {v}");
    let last_error = s["last_error"].as_str().unwrap_or_default();
    assert!(last_error.starts_with("connect: "), "{v}");
    assert!(
        last_error.to_lowercase().contains("connection refused"),
        "{v}"
    );
    assert_eq!(v["events_stored"].as_i64(), Some(events), "{v}");
    assert_eq!(v["last_pos"].as_i64(), Some(max_pos), "{v}");
    assert_eq!(
        v["devices"].as_i64(),
        Some(devices),
        "checkpointed at shutdown: {v}"
    );
    assert_eq!(v["evicted_events"].as_i64(), Some(0), "{v}");

    let out = hvac_edge(&["queue", "stats", "--db", path_str(&db)]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.contains(&format!(
            ", {events} events stored, {devices} devices, 0 events evicted"
        )),
        "{stdout}"
    );
    let row = stats_row(&stdout, "upstream");
    assert_eq!(
        &row[1..4],
        ["http", "ACTIVE", &events.to_string()],
        "{stdout}"
    );
    assert!(stdout.contains(last_error), "{stdout}");

    let out = hvac_edge(&["queue", "dead-letters", "--db", path_str(&db)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no dead letters\n");
    let out = hvac_edge(&["queue", "dead-letters", "--json", "--db", path_str(&db)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "[]");
}

#[test]
fn queue_stats_on_a_missing_database_exits_1_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("never-ran.db");
    let out = hvac_edge(&["queue", "stats", "--db", path_str(&db)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&db.display().to_string()), "{stderr}");
    assert!(
        !db.exists(),
        "a read-only command must not create the database"
    );
}
