//! The technician's changes: `queue retry`, `queue purge`, `sinks test`, and `audit`, the
//! record of every change (table `control`, see `store::control` for the design: changes go to
//! rows the daemon only reads, so they work the same with or without a running daemon, and a
//! running daemon picks them up within a second).

use super::esc;
use crate::store::control::{self, DeadSelection, Request};
use crate::store::{self, Mode, Options};
use std::io::IsTerminal as _;
use std::path::Path;
use std::time::{Duration, Instant};

/// Parses a time for `--since`/`--until`: RFC 3339 (`2026-12-04T10:00:00Z`) or an age before
/// `now` (`90s`, `15m`, `2h`, `7d`); ms since the epoch.
///
/// # Errors
/// A text that is neither, in words.
pub fn parse_time(s: &str, now: i64) -> anyhow::Result<i64> {
    if let Some(ms) = crate::model::parse_rfc3339_ms(s) {
        return Ok(ms);
    }
    parse_age(s)
        .map(|age| now.saturating_sub(age))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{s:?} is not a time: use RFC 3339 (2026-12-04T10:00:00Z) or an age (90s, 15m, 2h, 7d)"
            )
        })
}

/// `90s`, `15m`, `2h`, `7d` as ms.
pub fn parse_age(s: &str) -> Option<i64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: i64 = num.parse().ok()?;
    let per = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    n.checked_mul(per)
}

/// What `queue retry` and `queue purge` select, from their flags.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub sink: Option<String>,
    pub reason: Option<String>,
    pub events: Vec<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    /// The sinks of the config, when it could be read: `retry` re-queues only for them.
    pub configured: Option<Vec<String>>,
}

impl Selection {
    fn resolve(&self, now: i64) -> anyhow::Result<DeadSelection> {
        Ok(DeadSelection {
            only_sinks: None,
            sink: self.sink.clone(),
            reason: self.reason.clone(),
            events: self.events.clone(),
            since: self
                .since
                .as_deref()
                .map(|s| parse_time(s, now))
                .transpose()?,
            until: self
                .until
                .as_deref()
                .map(|s| parse_time(s, now))
                .transpose()?,
        })
    }
}

fn open_rw(db: &Path) -> anyhow::Result<rusqlite::Connection> {
    Ok(store::open(db, Mode::Existing, &Options::default())?)
}

/// ` (sink n, …)` after a count, or nothing when there is none.
fn per_sink_suffix(counts: &[(String, i64)]) -> String {
    if counts.iter().any(|(_, n)| *n > 0) {
        format!(" ({})", per_sink(counts))
    } else {
        String::new()
    }
}

fn per_sink(counts: &[(String, i64)]) -> String {
    counts
        .iter()
        .map(|(s, n)| format!("{} {n}", esc(s)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `hvac-edge queue retry`: re-queues the selected dead letters for their sink (original ids,
/// seqs and payloads), or with `dry_run` only counts them; with `wait`, waits until the running
/// daemon delivered them (or they were refused again) and says which. Returns the exit code.
///
/// # Errors
/// A store error, or a selection that does not parse.
pub fn retry(
    db: &Path,
    sel: &Selection,
    dry_run: bool,
    wait: Option<Duration>,
    json: bool,
) -> anyhow::Result<i32> {
    let now = crate::telemetry::now_ms();
    let mut dead = sel.resolve(now)?;
    if let (Some(configured), Some(s)) = (&sel.configured, &sel.sink)
        && !configured.contains(s)
    {
        anyhow::bail!(
            "sink {s:?} is not in the config: nothing would send its dead letters (configured: {})",
            configured.join(", ")
        );
    }
    let mut conn = open_rw(db)?;
    // Dead letters of sinks that no longer run are left alone (and said so).
    let unconfigured = match &sel.configured {
        Some(c) => {
            let all = control::count_dead(&conn, db, &dead)?;
            dead.only_sinks = Some(c.clone());
            all.into_iter().filter(|(s, _)| !c.contains(s)).collect()
        }
        None => Vec::new(),
    };
    if !unconfigured.is_empty() && !json {
        eprintln!(
            "left alone: dead letters of sinks no longer configured ({}); `hvac-edge queue purge --sink NAME` removes them",
            per_sink(&unconfigured)
        );
    }
    let counts = control::count_dead(&conn, db, &dead)?;
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    if dry_run {
        if json {
            println!(
                "{}",
                serde_json::json!({ "dry_run": true, "would_requeue": total, "per_sink": counts, "selection": dead })
            );
        } else {
            println!(
                "would re-queue {total} dead letter(s){}; nothing changed (drop --dry-run to do it)",
                per_sink_suffix(&counts)
            );
        }
        return Ok(0);
    }
    let by = super::sinks::who();
    let args = serde_json::to_string(&dead)?;
    let (id, n) = control::requeue(
        &mut conn,
        db,
        &dead,
        &Request {
            at: now,
            by: &by,
            action: "retry",
            sink: dead.sink.as_deref(),
            args: &args,
        },
    )?;
    let running = super::reload::running_daemon(&conn, db)?;
    let mut out = serde_json::json!({
        "control_id": id, "requeued": n, "per_sink": counts, "daemon_running": running.is_some(),
    });
    if !json {
        println!(
            "re-queued {n} dead letter(s){} for redelivery with their original ids (change #{id}, by {}); {}",
            per_sink_suffix(&counts),
            esc(&by),
            if running.is_some() {
                "the running daemon sends them within a second, before the pending events"
            } else {
                "no daemon is running: they are sent when it starts"
            }
        );
    }
    let mut code = 0;
    if let (Some(limit), true, true) = (wait, running.is_some(), n > 0) {
        let deadline = Instant::now() + limit.min(Duration::from_secs(86_400));
        let (waiting, refused) = loop {
            let (waiting, refused) = control::retry_progress(&conn, db, id)?;
            if waiting == 0 || Instant::now() >= deadline {
                break (waiting, refused);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let delivered = n - waiting - refused;
        out["delivered"] = delivered.into();
        out["refused_again"] = refused.into();
        out["still_waiting"] = waiting.into();
        if !json {
            println!(
                "delivered {delivered}, refused again {refused} (dead letters again: `hvac-edge queue dead-letters`), still waiting {waiting}"
            );
        }
        if waiting > 0 || refused > 0 {
            code = 1;
        }
    }
    if json {
        println!("{out}");
    }
    Ok(code)
}

/// `hvac-edge queue purge`: deletes dead letters older than `older_than` (and matching the
/// rest of the selection), after a confirmation on a terminal unless `yes`. Returns the exit
/// code.
///
/// # Errors
/// A store error, a selection that does not parse, or no confirmation possible.
pub fn purge(
    db: &Path,
    sel: &Selection,
    older_than: &str,
    yes: bool,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let now = crate::telemetry::now_ms();
    let age = parse_age(older_than).ok_or_else(|| {
        anyhow::anyhow!("--older-than {older_than:?}: use an age like 90s, 15m, 2h, 7d")
    })?;
    let mut dead = sel.resolve(now)?;
    let bound = now.saturating_sub(age);
    dead.until = Some(dead.until.map_or(bound, |u| u.min(bound)));
    let mut conn = open_rw(db)?;
    let counts = control::count_dead(&conn, db, &dead)?;
    let total: i64 = counts.iter().map(|(_, n)| n).sum();
    if dry_run || total == 0 {
        if json {
            println!(
                "{}",
                serde_json::json!({ "dry_run": dry_run, "would_delete": total, "per_sink": counts })
            );
        } else {
            println!(
                "{} {total} dead letter(s) older than {older_than}{}",
                if dry_run {
                    "would delete"
                } else {
                    "nothing to delete:"
                },
                per_sink_suffix(&counts)
            );
        }
        return Ok(0);
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "{total} dead letter(s) would be deleted for good; confirm with --yes (no terminal to ask on)"
            );
        }
        eprint!(
            "delete {total} dead letter(s) older than {older_than} ({}) for good? [y/N] ",
            per_sink(&counts)
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing deleted");
            return Ok(1);
        }
    }
    let by = super::sinks::who();
    let mut args = serde_json::to_value(&dead)?;
    args["older_than"] = older_than.into();
    let (id, n) = control::purge_dead(
        &mut conn,
        db,
        &dead,
        &Request {
            at: now,
            by: &by,
            action: "purge",
            sink: dead.sink.as_deref(),
            args: &args.to_string(),
        },
    )?;
    if json {
        println!("{}", serde_json::json!({ "control_id": id, "deleted": n }));
    } else {
        println!("deleted {n} dead letter(s) (change #{id}, by {})", esc(&by));
    }
    Ok(0)
}

/// `hvac-edge audit`: every change, newest first.
///
/// # Errors
/// A store error.
pub fn audit(db: &Path, limit: i64, json: bool) -> anyhow::Result<()> {
    let conn = store::open(db, Mode::ReadOnly, &Options::default())?;
    let rows = control::list(&conn, db, limit)?;
    let reloads = crate::store::reloads::list(&conn, db, limit)?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "changes": rows, "reloads": reloads })
        );
        return Ok(());
    }
    let now = crate::telemetry::now_ms();
    if rows.is_empty() {
        println!("no changes recorded");
    } else {
        println!(
            "{:>5}  {:<10} {:<14} {:<12} {:<16} {:<8} {:>6}  outcome",
            "#", "when", "by", "action", "sink", "state", "events"
        );
        for r in &rows {
            println!(
                "{:>5}  {:<10} {:<14} {:<12} {:<16} {:<8} {:>6}  {}",
                r.id,
                format!("{} ago", super::human_ms(now - r.at)),
                esc(&r.by),
                r.action,
                super::esc_or_dash(r.sink.as_deref()),
                r.state,
                r.events.map_or("-".to_string(), |n| n.to_string()),
                super::esc_or_dash(r.outcome.as_deref())
            );
        }
    }
    for r in &reloads {
        println!(
            "reload {} ago by pid {}: {}",
            super::human_ms(now - r.at),
            r.pid,
            if r.ok { "applied" } else { "refused" }
        );
    }
    Ok(())
}

/// `hvac-edge sinks test NAME`: one signed test delivery (type `test`), through the running
/// daemon's sink when it runs (its live connection, its tokens), else built from the config
/// here. Prints status, latency and the first bytes of the answer; returns the exit code.
///
/// # Errors
/// An unknown sink, a config or store error, or no answer from the daemon in time.
pub fn test_sink(config: &Path, name: &str, timeout: Duration, json: bool) -> anyhow::Result<i32> {
    let cfg = crate::config::load(config)?;
    if !cfg.sinks.names().iter().any(|n| n == name) {
        anyhow::bail!(
            "no sink {name:?} in {}; configured: {}",
            config.display(),
            cfg.sinks.names().join(", ")
        );
    }
    let db = cfg.store.path.clone();
    let by = super::sinks::who();
    let now = crate::telemetry::now_ms();
    let running = if db.exists() {
        let conn = store::open(&db, Mode::ReadOnly, &Options::default())?;
        super::reload::running_daemon(&conn, &db)?
    } else {
        None
    };
    let req = Request {
        at: now,
        by: &by,
        action: "sink_test",
        sink: Some(name),
        args: "{}",
    };
    let (outcome, via): (crate::sinks::TestOutcome, String) = match running {
        Some(pid) => {
            let conn = open_rw(&db)?;
            let id = control::request(&conn, &db, &req)?;
            let deadline = Instant::now() + timeout.min(Duration::from_secs(86_400));
            loop {
                if let Some(c) = control::get(&conn, &db, id)?.filter(|c| c.state != "pending") {
                    let t = serde_json::from_str(c.outcome.as_deref().unwrap_or_default())
                        .map_err(|e| anyhow::anyhow!("change #{id}: {e}"))?;
                    break (t, format!("the running daemon (pid {pid})"));
                }
                if Instant::now() >= deadline {
                    // Leave no pending test behind for a daemon that answers later.
                    control::complete(
                        &conn,
                        &db,
                        id,
                        false,
                        "cli",
                        0,
                        "no answer from the daemon",
                        crate::telemetry::now_ms(),
                    )?;
                    anyhow::bail!(
                        "the daemon (pid {pid}) did not run the test within {}s; see `journalctl -u hvac-edge`",
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        None => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let clock = crate::store::writer::clock_state(cfg.gateway.clock);
            let t = rt.block_on(test_here(&cfg, name, &by, clock))?;
            if db.exists() {
                let conn = open_rw(&db)?;
                control::record_done(&conn, &db, &req, 1, &serde_json::to_string(&t)?)?;
            }
            (t, "this command (no daemon is running)".to_string())
        }
    };
    if json {
        let mut v = serde_json::to_value(&outcome)?;
        v["via"] = via.into();
        println!("{v}");
    } else {
        println!(
            "sink {}: {} — status {}, {} ms, answer: {}  (test event {}, sent by {via})",
            esc(name),
            if outcome.ok { "OK" } else { "FAILED" },
            outcome.status.map_or("-".to_string(), |s| s.to_string()),
            outcome.latency_ms,
            esc(&outcome.answer),
            outcome.event_id
        );
    }
    Ok(if outcome.ok { 0 } else { 1 })
}

async fn test_here(
    cfg: &crate::config::Config,
    name: &str,
    by: &str,
    clock: crate::model::ClockState,
) -> anyhow::Result<crate::sinks::TestOutcome> {
    use crate::sinks::{HttpSink, MqttSink, WebhookSink};
    let gw = &cfg.gateway.id;
    if let Some(s) = cfg.sinks.http.iter().find(|s| s.name == name) {
        return Ok(HttpSink::new(s.clone(), gw)?
            .erase()
            .test_alone(by, 0, clock)
            .await);
    }
    if let Some(s) = cfg.sinks.webhook.iter().find(|s| s.name == name) {
        return Ok(WebhookSink::new(s.clone(), gw)?
            .erase()
            .test_alone(by, 0, clock)
            .await);
    }
    if let Some(s) = cfg.sinks.mqtt.iter().find(|s| s.name == name) {
        return Ok(MqttSink::new(s.clone(), gw)?
            .erase()
            .test_alone(by, 0, clock)
            .await);
    }
    anyhow::bail!("no sink {name:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_an_age_and_anything_else_is_explained() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("2h", now).ok(), Some(now - 7_200_000));
        assert_eq!(parse_time("90s", now).ok(), Some(now - 90_000));
        assert_eq!(parse_time("7d", now).ok(), Some(now - 604_800_000));
        assert_eq!(
            parse_time("2026-12-04T10:00:00Z", now).ok(),
            crate::model::parse_rfc3339_ms("2026-12-04T10:00:00Z")
        );
        let e = parse_time("yesterday", now).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("RFC 3339")));
        assert_eq!(parse_age("5x"), None);
        assert_eq!(parse_age("m"), None);
    }
}
