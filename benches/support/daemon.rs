//! The daemon under test: its generated config, the release binary as a child process, its
//! /proc counters and a read-only view of its database.

use super::{Deadline, check};
use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What feeds the daemon.
pub enum Feed {
    /// A zigbee2mqtt-preset MQTT source on the bench broker.
    Mqtt { port: u16, base_topic: String },
    /// A simulated fleet.
    Simulator {
        devices: u32,
        changes_per_sec: f64,
        max_observations: u64,
    },
}

/// Writes the whsec secret (mode 600) and the config into `dir`; returns the config path.
pub fn write_config(
    dir: &Path,
    feed: &Feed,
    sink_url: &str,
    whsec: &str,
    log_level: &str,
) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let secret = dir.join("whsec");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&secret)?;
    std::io::Write::write_all(&mut f, whsec.as_bytes())?;
    let source = match feed {
        Feed::Mqtt { port, base_topic } => format!(
            "[[sources.mqtt]]\nname = \"z2m\"\nhost = \"127.0.0.1\"\nport = {port}\n\
             preset = \"zigbee2mqtt\"\nbase_topic = \"{base_topic}\"\n"
        ),
        Feed::Simulator {
            devices,
            changes_per_sec,
            max_observations,
        } => format!(
            "[[sources.simulator]]\nname = \"sim\"\ndevices = {devices}\n\
             changes_per_sec = {changes_per_sec:.1}\nmax_observations = {max_observations}\nseed = 7\n"
        ),
    };
    let toml = format!(
        "[gateway]\nid = \"{gw}\"\n\n\
         [store]\npath = \"{db}\"\nsynchronous = \"full\"\nmax_bytes = 0\n\n\
         [pipeline]\nbatch_max = 256\n\n\
         [log]\nlevel = \"{log_level}\"\n\n\
         {source}\n\
         [[sinks.http]]\nname = \"upstream\"\nurl = \"{sink_url}\"\nallow_insecure_http = true\n\
         batch_max_events = 500\nretry_schedule_secs = [1]\nsigning_secret_file = \"{secret}\"\n",
        gw = super::events::GATEWAY,
        db = dir.join("hvac-edge.db").display(),
        secret = secret.display(),
    );
    let path = dir.join("hvac-edge.toml");
    std::fs::write(&path, toml)?;
    Ok(path)
}

/// The daemon process; SIGKILLed on drop if still running.
pub struct Daemon {
    child: Child,
    /// Its pid, for /proc.
    pub pid: u32,
    /// Its database.
    pub db: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `hvac-edge run -c <config>` with stderr/stdout to `dir/daemon.log`.
    pub fn start(bin: &Path, config: &Path, dir: &Path) -> anyhow::Result<Daemon> {
        let log = dir.join("daemon.log");
        let f = std::fs::File::create(&log)?;
        // Diagnostics only: HVAC_BENCH_DAEMON_PREFIX="heaptrack -o /tmp/h" runs the daemon under
        // a tool (the /proc figures then describe the tool's process, not the daemon).
        let prefix: Vec<String> = std::env::var("HVAC_BENCH_DAEMON_PREFIX")
            .map(|p| p.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut cmd = match prefix.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("run")
            // The bench may run as root (containers); the daemon refuses that without the flag.
            .arg("--allow-root")
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Daemon {
            pid: child.id(),
            child,
            db: dir.join("hvac-edge.db"),
            log,
        })
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the daemon exited ({status}); log:\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let s = self.log();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then wait (bounded); SIGKILL when it does not exit in time.
    pub fn stop(&mut self, grace: Duration) -> anyhow::Result<()> {
        // SAFETY: sending a signal to our own child by pid has no memory-safety implications.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Deadline::after(grace);
        while !deadline.passed() {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        anyhow::bail!("the daemon did not stop within {grace:?} of SIGTERM")
    }

    /// Peak resident set (VmHWM) in KiB.
    pub fn vm_hwm_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmHWM:")
    }

    /// Current resident set (VmRSS) in KiB.
    pub fn vm_rss_kib(&self) -> anyhow::Result<u64> {
        self.status_kib("VmRSS:")
    }

    /// The `n` mappings with the most resident memory, as (RSS KiB, mapping line), from
    /// /proc/PID/smaps (diagnostics: heap vs. thread arenas vs. file mappings).
    pub fn top_mappings(&self, n: usize) -> anyhow::Result<Vec<(u64, String)>> {
        let s = std::fs::read_to_string(format!("/proc/{}/smaps", self.pid))?;
        let mut out: Vec<(u64, String)> = Vec::new();
        let mut current = String::new();
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("Rss:") {
                let kib = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                out.push((kib, current.clone()));
            } else if line
                .split_whitespace()
                .next()
                .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
            {
                current = line.to_string();
            }
        }
        out.sort_by_key(|m| std::cmp::Reverse(m.0));
        out.truncate(n);
        Ok(out)
    }

    fn status_kib(&self, key: &str) -> anyhow::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        s.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {key} in /proc/PID/status"))
    }

    /// Bytes the process caused to be written to storage (`write_bytes` of /proc/PID/io).
    pub fn write_bytes(&self) -> anyhow::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/io", self.pid))?;
        s.lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no write_bytes in /proc/PID/io")
    }

    /// utime + stime in clock ticks (/proc/PID/stat fields 14 and 15).
    pub fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        let rest = s.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
        // After the command name: field 3 (state) is index 0, so utime (14) is index 11.
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ut: u64 = f.get(11).context("no utime")?.parse()?;
        let st: u64 = f.get(12).context("no stime")?.parse()?;
        Ok(ut + st)
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

/// Clock ticks per second.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// A read-only connection to the daemon's database (opened once the daemon created it).
pub struct Db(Connection);

impl Db {
    /// Waits (bounded) until the daemon created and migrated the file, then opens it read-only.
    pub fn open(daemon: &mut Daemon, deadline: Deadline) -> anyhow::Result<Db> {
        loop {
            daemon.check_alive()?;
            if daemon.db.exists()
                && let Ok(c) = Connection::open_with_flags(
                    &daemon.db,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                && c.query_row("SELECT COUNT(*) FROM sinks", [], |r| r.get::<_, i64>(0))
                    .is_ok()
            {
                c.busy_timeout(Duration::from_secs(5))?;
                return Ok(Db(c));
            }
            check(deadline, "the daemon to create its database")?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `MAX(pos)` of `events` (the newest event is never collected).
    pub fn max_pos(&self) -> anyhow::Result<i64> {
        Ok(self
            .0
            .query_row("SELECT COALESCE(MAX(pos), 0) FROM events", [], |r| r.get(0))?)
    }

    /// The position of the first event of `device` after `after`, if committed yet.
    pub fn find_device(&self, after: i64, device: &str) -> anyhow::Result<Option<i64>> {
        Ok(self
            .0
            .query_row(
                "SELECT pos FROM events WHERE pos > ?1 AND device = ?2 ORDER BY pos LIMIT 1",
                rusqlite::params![after, device],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Average stored payload size over the newest `n` events.
    pub fn avg_payload(&self, n: i64) -> anyhow::Result<f64> {
        Ok(self.0.query_row(
            "SELECT COALESCE(AVG(LENGTH(payload)), 0) FROM (SELECT payload FROM events ORDER BY pos DESC LIMIT ?1)",
            [n],
            |r| r.get(0),
        )?)
    }
}
