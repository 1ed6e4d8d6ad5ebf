//! Technician commands: clap definitions and one file per subcommand.
//!
//! Commands are synchronous and call `store`/`config`; they never write SQL themselves.
//! Exit codes: 0 ok, 1 runtime failure, 2 usage (clap), 78 config error (sysexits `EX_CONFIG`).

pub mod check_config;
pub mod control;
pub mod devices;
pub mod doctor;
pub mod queue;
pub mod reload;
pub mod render;
pub mod sinks;
pub mod sources;
pub mod status;
pub mod support_bundle;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Exit code for an invalid configuration (sysexits `EX_CONFIG`); systemd does not restart on it.
pub const EXIT_CONFIG: i32 = 78;

/// Default config path on a gateway.
pub const DEFAULT_CONFIG: &str = "/etc/hvac-edge/hvac-edge.toml";

/// hvac-edge: thermostat state to a durable outbox to signed upstream delivery.
#[derive(Debug, Parser)]
#[command(name = "hvac-edge", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Config file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Run even as root (the systemd unit runs it as the user hvac-edge; as root a bug in a
        /// parser of device input would own the gateway).
        #[arg(long)]
        allow_root: bool,
    },
    /// Run the whole pipeline on an embedded config with a simulated fleet and an in-process
    /// receiver that verifies signatures and goes away for a while.
    Demo {
        /// Seconds of simulated traffic.
        #[arg(long, default_value_t = 20)]
        duration_secs: u64,
        /// When the receiver goes away (seconds after start).
        #[arg(long, default_value_t = 6)]
        outage_at_secs: u64,
        /// How long the receiver stays away.
        #[arg(long, default_value_t = 7)]
        outage_secs: u64,
        /// Print only status lines and the summary, not every event.
        #[arg(long)]
        quiet: bool,
    },
    /// Validate the config, then make the running daemon apply it without a restart and print
    /// what changed (or every problem that kept the old config running).
    ///
    /// Sources and sinks added, removed or changed are started, stopped or restarted; the
    /// others keep running; nothing queued is lost. `[gateway]`, `[store]`, `[log]`,
    /// `[metrics]` and `pipeline.queue_len` need a restart, and so does a secret file renewed in
    /// place. Exit 0 applied, 1 refused, 3 not running, 78 invalid.
    ///
    /// Example: `sudo -u hvac-edge hvac-edge reload` (or `systemctl reload hvac-edge`)
    Reload {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The daemon's process id (default: the one recorded in the database).
        #[arg(long)]
        pid: Option<u32>,
        /// How long to wait for the daemon's answer.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Validate a config file and print every problem, each with its key.
    CheckConfig {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check everything the site needs and say what to fix: each check `ok`, `warn` or `fail`,
    /// what it found, and for warn and fail the fix in one line.
    ///
    /// The config; the database (read-only `quick_check`, size, WAL, who may write it); free
    /// disk; serial ports (present, a character device, owning group, whether the service user
    /// may open them); each MQTT broker (TCP, TLS, a CONNECT as `<client id>-doctor`, never the
    /// daemon's own session); each sink (DNS, TCP, TLS, an HTTP HEAD: no event is sent); the
    /// clock; the service user and whether the daemon runs. Works while the daemon runs; every
    /// check takes at most 3 s. Exit 0 nothing failed, 1 a check failed, 78 the config is invalid.
    ///
    /// Example: `sudo -u hvac-edge hvac-edge doctor` (or `sudo hvac-edge doctor --json`)
    Doctor {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The user the service runs as (default: `User=` of the installed unit, else hvac-edge).
        #[arg(long)]
        service_user: Option<String>,
        /// Machine-readable output: `{"checks":[{"name","status","detail","fix"}],"fails":N,"warns":N}`.
        #[arg(long)]
        json: bool,
    },
    /// Each source's link, last valid data and error counters (serial ports, Modbus units).
    Sources {
        #[command(flatten)]
        db: DbArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// One screen: daemon, version, uptime, sources, devices online/offline, per sink the
    /// queue, failures and dead letters, database and disk, clock, the last three errors.
    ///
    /// Read-only and cheap (counters and indexes only), safe while the daemon runs. Exit 0 when
    /// nothing needs attention, 1 when something does (each problem with what to run next).
    ///
    /// Example: `hvac-edge status` (or `hvac-edge status --json | jq .problems`)
    Status {
        #[command(flatten)]
        db: DbArgs,
        /// Machine-readable output (exact values: ms, bytes).
        #[arg(long)]
        json: bool,
    },
    /// Every device's last known state (link, mode, setpoint, temperature, humidity, load),
    /// last seen, source and counters; with DEVICE, that device with its last 20 events and a
    /// sparkline of its temperature and setpoint over the last 24 h on one scale (a room that
    /// never reaches its setpoint shows as a lower temperature row).
    ///
    /// Example: `hvac-edge devices living-room-trv` (or `--json` for the numbers per column)
    Devices {
        /// One device in detail.
        device: Option<String>,
        #[command(flatten)]
        db: DbArgs,
        /// The sparkline's window (`24h`, `2h`, `7d`).
        #[arg(long, default_value = "24h")]
        window: String,
        /// The window ends here (RFC 3339 or an age: `2h` = two hours ago). Default: now.
        #[arg(long)]
        until: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the outbox (works while the daemon runs).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Write a tar file for the integrator: the config (secrets redacted), check-config,
    /// queue stats, sources, database integrity and the service's recent journal.
    ///
    /// Example: `hvac-edge support-bundle -o /tmp/site-42.tar`
    SupportBundle {
        #[command(flatten)]
        db: DbArgs,
        /// Where to write it. Default: hvac-edge-support-<unix time>.tar here.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Every change a technician made (retry, purge, sinks enable/disable/test) and every
    /// reload: who, when, what, how many events, the outcome. Newest first.
    ///
    /// Example: `hvac-edge audit --limit 20`
    Audit {
        #[command(flatten)]
        db: DbArgs,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show the sinks, switch one off (its events are held) or on again (also after
    /// DISABLED_DUE_TO_ERRORS), or send it a test event.
    ///
    /// Without a subcommand: every sink in one line (status, pending, oldest, delivered, dead
    /// letters, last error), or one sink in detail with its last failed attempts.
    ///
    /// Example: `hvac-edge sinks installer-portal`
    #[command(args_conflicts_with_subcommands = true)]
    Sinks {
        /// One sink in detail.
        name: Option<String>,
        #[command(flatten)]
        db: DbArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        command: Option<SinksCommand>,
    },
}

/// `hvac-edge sinks …`
#[derive(Debug, Subcommand)]
pub enum SinksCommand {
    /// Send one signed test event (type `test`, device `@gateway`, seq 0) to a sink's endpoint
    /// and print the status, the latency and the first bytes of the answer. Goes through the
    /// running daemon's sink (its connection, its tokens) when it runs; exit 1 when refused.
    ///
    /// Example: `hvac-edge sinks test installer-portal`
    Test {
        /// The sink's name (as in the config).
        name: String,
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// How long to wait for the daemon to run it.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        #[arg(long)]
        json: bool,
    },
    /// Deliver again: a paused sink, or one disabled after errors, sends what it held, in order.
    ///
    /// Example: `hvac-edge sinks enable installer-portal --note "portal fixed, ticket 4711"`
    Enable {
        /// The sink's name (as in `queue stats`).
        name: String,
        /// Why, for the record.
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Hold a sink's events (nothing is dropped) until it is enabled again.
    ///
    /// Example: `hvac-edge sinks disable installer-portal --note "portal migrating"`
    Disable {
        /// The sink's name (as in `queue stats`).
        name: String,
        /// Why, for the record.
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        db: DbArgs,
    },
}

/// `hvac-edge queue …`
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Re-queue dead letters for redelivery to their sink, with their original ids, seqs and
    /// payloads (sent before the pending events; works while the daemon runs, within a second).
    ///
    /// Select by sink, reason, event id and when they died; `--dry-run` only counts.
    ///
    /// Example: `hvac-edge queue retry --sink portal --reason rejected --since 2h --wait 30`
    Retry {
        #[command(flatten)]
        db: DbArgs,
        /// Only this sink's dead letters.
        #[arg(long)]
        sink: Option<String>,
        /// Only this reason (`rejected`, `expired`, `invalid`, `banned`, `unreadable`).
        #[arg(long)]
        reason: Option<String>,
        /// Only these event ids (repeat the flag).
        #[arg(long = "event")]
        events: Vec<String>,
        /// Dead since (RFC 3339 or an age: 90s, 15m, 2h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Dead before (RFC 3339 or an age).
        #[arg(long)]
        until: Option<String>,
        /// Count what would be re-queued; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Wait up to this many seconds for the running daemon to deliver them; exit 1 if some
        /// were refused again or are still waiting.
        #[arg(long)]
        wait: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters older than a bound, for good (asks first on a terminal).
    ///
    /// Example: `hvac-edge queue purge --older-than 30d --sink old-portal --yes`
    Purge {
        #[command(flatten)]
        db: DbArgs,
        /// Only dead letters older than this age (90s, 15m, 2h, 7d).
        #[arg(long)]
        older_than: String,
        /// Only this sink's.
        #[arg(long)]
        sink: Option<String>,
        /// Only this reason.
        #[arg(long)]
        reason: Option<String>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Count what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Stored events, newest first, filtered by sink and status, device, type and time.
    ///
    /// Example: `hvac-edge queue list --sink portal --status pending --since 2h --limit 20`
    List {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        filter: queue::EventFilter,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One event's full JSON (by event id or pos) and its delivery status for every sink
    /// (delivered, pending, or dead with the reason and the receiver's answer).
    ///
    /// Example: `hvac-edge queue show 01927f3a-5c1e-7d40-9b8e-2f6a1c0d4e55`
    Show {
        /// Event id (UUID) or pos.
        id: String,
        #[command(flatten)]
        db: DbArgs,
        #[arg(long)]
        json: bool,
    },
    /// The newest events, oldest of them first; with `-f`, then every new one as it is
    /// committed (polled every 250 ms) until Ctrl-C.
    ///
    /// Example: `hvac-edge queue tail -f --device living-room-trv`
    Tail {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        filter: queue::EventFilter,
        /// How many of the newest to print first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: i64,
        /// Follow new events.
        #[arg(short, long)]
        follow: bool,
        /// Stop following after this many new events.
        #[arg(long)]
        max: Option<u64>,
        /// Stop following after this many seconds.
        #[arg(long)]
        timeout_secs: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Write the selected events, oldest first, for support: JSON lines (each the envelope as
    /// stored and sent) or CSV; a progress bar on stderr when it is a terminal; the count and
    /// rate at the end (stderr). The file is created 0600.
    ///
    /// CSV columns: pos, id, observed_at (RFC 3339), device, seq, type, clock, previous,
    /// current (JSON text), then the state after the event: function, mode, program,
    /// setpoint, setpoint_unit, temperature, temperature_unit, humidity (%), load_state,
    /// connectivity; with `--status dead` also sink, reason, http_status, dead_at. Texts from
    /// devices that a spreadsheet would run as a formula start with `'`.
    ///
    /// Example: `hvac-edge queue export --format csv --since 24h --device living-room-trv --out /tmp/trv.csv`
    Export {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        filter: queue::EventFilter,
        /// `jsonl` or `csv`.
        #[arg(long, value_enum)]
        format: queue::Format,
        /// Output file (default: stdout).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// At most this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Per sink: pending events, oldest pending age, dead letters, next attempt; database size.
    Stats {
        #[command(flatten)]
        db: DbArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List dead letters, newest first.
    DeadLetters {
        #[command(flatten)]
        db: DbArgs,
        /// Only this sink.
        #[arg(long)]
        sink: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

/// Where the database is: from the config (default) or given directly.
#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// Config file whose `store.path` names the database.
    #[arg(short, long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Database file (overrides the config).
    #[arg(long)]
    pub db: Option<PathBuf>,
}

impl DbArgs {
    /// The sink names of the config, if it can be read (`--db` alone may come without one).
    pub fn sink_names(&self) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(&self.config).ok()?;
        let cfg: crate::config::Config = toml::from_str(&text).ok()?;
        Some(cfg.sinks.names())
    }

    /// The database path.
    ///
    /// # Errors
    /// When the config cannot be read or parsed.
    pub fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.db {
            return Ok(p.clone());
        }
        // Only store.path is needed: parse without validating secrets (they may be root-only).
        let text = std::fs::read_to_string(&self.config).map_err(|e| {
            anyhow::anyhow!(
                "cannot read {}: {e} (or pass --db PATH)",
                self.config.display()
            )
        })?;
        let cfg: crate::config::Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not valid TOML for hvac-edge: {}",
                self.config.display(),
                crate::config::toml_error_message(&text, &e)
            )
        })?;
        Ok(cfg.store.path)
    }
}

/// Escapes text for a technician's terminal: control characters (C0, DEL, C1) become `\n`,
/// `\r`, `\t` or `\xNN` / `\u{NN}`, the bidirectional overrides and isolates (U+202A–U+202E,
/// U+2066–U+2069) become `\u{NNNN}`, and a backslash becomes `\\`, so an escape can never be
/// mistaken for the text itself. Device ids, response snippets and error texts come from
/// devices and upstreams: printed raw, an ESC sequence could rewrite the screen or hide a line.
/// Tables only; JSON output is serde's and stays exact.
pub fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    fn needs(c: char) -> bool {
        c == '\\'
            || c.is_control()
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(needs) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && needs(c) => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if needs(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// [`esc`] for an optional text, `-` when absent.
pub fn esc_or_dash(s: Option<&str>) -> std::borrow::Cow<'_, str> {
    s.map_or(std::borrow::Cow::Borrowed("-"), esc)
}

/// Formats a duration in ms as `3d4h`, `5m12s`, `800ms`.
pub fn human_ms(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    if s == 0 {
        format!("{ms}ms")
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3600, (s / 60) % 60)
    } else {
        format!("{}d{:02}h", s / 86_400, (s / 3600) % 24)
    }
}

/// Formats a byte count as `12.3 MiB`.
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esc_escapes_control_characters_and_backslash_only() {
        assert_eq!(esc("living-room °C ü"), "living-room °C ü");
        assert!(matches!(esc("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(esc("a\u{1b}[2Jb"), "a\\x1b[2Jb");
        assert_eq!(esc("one\ntwo\r\tthree"), "one\\ntwo\\r\\tthree");
        assert_eq!(esc("\u{0}\u{7f}"), "\\x00\\x7f");
        // C1 CSI (a terminal may take it as ESC [) and a right-to-left override.
        assert_eq!(esc("x\u{9b}31m\u{202e}y"), "x\\u{9b}31m\\u{202e}y");
        // A literal backslash cannot pass for an escape.
        assert_eq!(esc("a\\nb"), "a\\\\nb");
        assert_eq!(esc_or_dash(None), "-");
        assert_eq!(esc_or_dash(Some("e\u{7}")), "e\\x07");
    }
}
