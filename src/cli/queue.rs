//! `hvac-edge queue stats|dead-letters`: read-only views of the outbox, safe while the daemon runs.
//! Tables escape every text that came from outside ([`super::esc`]); `--json` prints it exactly.

use super::{esc, esc_or_dash, human_bytes, human_ms};
use crate::store::{self, outbox};
use std::path::Path;

/// Prints queue statistics.
///
/// # Errors
/// When the database cannot be opened or read.
pub fn stats(db: &Path, json: bool) -> anyhow::Result<()> {
    let conn = store::open(db, store::Mode::ReadOnly, &store::Options::default())?;
    let now = crate::telemetry::now_ms();
    let q = outbox::queue_stats(&conn, db, now)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&q)?);
        return Ok(());
    }
    println!(
        "database {}: {} (+ WAL {}), {} events stored, {} devices, {} events evicted by the size cap, {} dead letters dropped by their cap",
        esc(&db.display().to_string()),
        human_bytes(q.db_file_bytes),
        human_bytes(q.wal_bytes),
        q.events_stored,
        q.devices,
        q.evicted_events,
        q.dead_letters_dropped
    );
    for f in &q.quarantined {
        println!(
            "quarantined database (unusable, moved aside, kept): {}",
            esc(f)
        );
    }
    if q.sinks.is_empty() {
        println!("no sinks have run on this database yet");
        return Ok(());
    }
    println!(
        "{:<16} {:<7} {:<22} {:>9} {:>10} {:>6} {:>9} {:>12}  last error",
        "sink", "kind", "status", "pending", "oldest", "dead", "failures", "next try"
    );
    for s in &q.sinks {
        let next = match s
            .row
            .banned_until
            .filter(|&b| b > now && s.row.status == "BANNED")
        {
            Some(b) => Some(b),
            None => s.row.next_attempt_at,
        };
        let next = match next {
            Some(t) if t > now => format!("in {}", human_ms(t - now)),
            Some(_) => "due".to_string(),
            None if s.pending > 0 => "now".to_string(),
            None => "-".to_string(),
        };
        println!(
            "{:<16} {:<7} {:<22} {:>9} {:>10} {:>6} {:>9} {:>12}  {}",
            esc(&s.row.name),
            esc(&s.row.kind),
            esc(&s.row.status),
            s.pending,
            s.oldest_pending_age_ms.map_or("-".to_string(), human_ms),
            s.dead_letters,
            s.row.consecutive_failures,
            next,
            esc_or_dash(s.row.last_error.as_deref())
        );
        // The last failed attempts, newest first: what a technician needs to call the receiver's owner.
        for a in &s.recent_attempts {
            let what = if a.status == 0 {
                format!("no answer ({})", esc(&a.error_kind))
            } else {
                format!("http {}", a.status)
            };
            println!(
                "    {} ago: {what} after {} ms, {} event(s) from pos {}{}",
                human_ms(now.saturating_sub(a.at).max(0)),
                a.duration_ms,
                a.events,
                a.first_pos,
                a.snippet
                    .as_deref()
                    .map(|t| format!(": {}", esc(t)))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Lists dead letters.
///
/// # Errors
/// When the database cannot be opened or read.
pub fn dead_letters(db: &Path, sink: Option<&str>, limit: i64, json: bool) -> anyhow::Result<()> {
    let conn = store::open(db, store::Mode::ReadOnly, &store::Options::default())?;
    let list = outbox::dead_letters(&conn, db, sink, limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!(
        "{:<16} {:<38} {:<16} {:>6} {:<14} {:<8} {:>6}  response",
        "sink", "event id", "device", "seq", "type", "reason", "status"
    );
    for d in list {
        println!(
            "{:<16} {:<38} {:<16} {:>6} {:<14} {:<8} {:>6}  {}",
            esc(&d.sink),
            esc(&d.event_id),
            esc(&d.device),
            d.seq,
            esc(&d.kind),
            esc(&d.reason),
            d.http_status.map_or("-".to_string(), |s| s.to_string()),
            esc(d.response_snippet.as_deref().unwrap_or(""))
        );
    }
    Ok(())
}
