//! `hvac-edge sinks enable|disable NAME`: the technician's switch of a sink (`sink_control`).
//!
//! The daemon only reads that table (within a second), so this write is never undone by the
//! daemon's own saves: a disabled sink holds its events (`PAUSED`); enabling a sink also
//! re-enables one that stopped itself after errors (`DISABLED_DUE_TO_ERRORS`), and it then
//! delivers everything it held, in order. Works whether or not the daemon runs. Each change is
//! recorded for `hvac-edge audit`.

use crate::store::{self, outbox};
use std::path::Path;

/// Who made the change, for the record: `$SUDO_USER`, else `$USER`, else the uid.
pub fn who() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        // SAFETY: getuid has no preconditions and cannot fail.
        .unwrap_or_else(|_| format!("uid {}", unsafe { libc::getuid() }))
}

/// Sets sink `name` enabled or disabled, with an optional note.
///
/// # Errors
/// An unknown sink (one that never ran on this database), or a store error.
pub fn set(db: &Path, name: &str, enabled: bool, note: Option<&str>) -> anyhow::Result<()> {
    let conn = store::open(db, store::Mode::ReadWrite, &store::Options::default())?;
    let known: bool = conn
        .query_row("SELECT COUNT(*) FROM sinks WHERE name = ?1", [name], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n > 0)
        .map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
    if !known {
        anyhow::bail!(
            "no sink {name:?} has run on {}; `hvac-edge queue stats` lists the sinks",
            db.display()
        );
    }
    let by = who();
    let now = crate::telemetry::now_ms();
    // The switch and its record in one transaction.
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
    outbox::set_sink_control(&tx, db, name, enabled, note, Some(&by), now)?;
    let action = if enabled {
        "sink_enable"
    } else {
        "sink_disable"
    };
    crate::store::control::record_done(
        &tx,
        db,
        &crate::store::control::Request {
            at: now,
            by: &by,
            action,
            sink: Some(name),
            args: &serde_json::json!({ "note": note }).to_string(),
        },
        0,
        if enabled {
            "enabled: it delivers what it held"
        } else {
            "disabled: its events are held"
        },
    )?;
    tx.commit()
        .map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
    if enabled {
        println!(
            "sink {name} enabled by {by}; a running daemon delivers what it held within a second"
        );
    } else {
        println!(
            "sink {name} disabled by {by}; its events are held (nothing is dropped) until `hvac-edge sinks enable {name}`"
        );
    }
    Ok(())
}

/// `hvac-edge sinks [NAME]`: every sink in one line each, or one sink in detail (its row, its
/// technician switch, its last failed attempts). Counters and indexed lookups only.
///
/// # Errors
/// An unknown sink, or a store error.
pub fn show(db: &Path, name: Option<&str>, json: bool) -> anyhow::Result<()> {
    use super::{esc, esc_or_dash, human_ms};
    let conn = store::open(db, store::Mode::ReadOnly, &store::Options::default())?;
    let now = crate::telemetry::now_ms();
    let figures = outbox::sink_figures(&conn, db, 0)?;
    let figures: Vec<_> = figures
        .into_iter()
        .filter(|f| name.is_none_or(|n| n == f.name))
        .collect();
    if let Some(n) = name
        && figures.is_empty()
    {
        anyhow::bail!("no sink {n:?} has run on {}", db.display());
    }
    let mut rows = Vec::new();
    for f in &figures {
        let row = outbox::sink_row(&conn, db, &f.name)?;
        let control = outbox::sink_control(&conn, db, &f.name)?;
        let attempts =
            outbox::recent_attempts(&conn, db, &f.name, if name.is_some() { 10 } else { 1 })?;
        rows.push((f, row, control, attempts));
    }
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(f, row, control, attempts)| {
                serde_json::json!({
                    "name": f.name, "status": f.status, "pending": f.depth,
                    "oldest_pending_age_ms": f.oldest_pending_observed_at.map(|t| (now - t).max(0)),
                    "delivered": f.delivered, "failed_attempts": f.failed, "dead_letters": f.dead,
                    "row": row, "control": control, "recent_attempts": attempts,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if name.is_none() {
        println!(
            "{:<16} {:<8} {:<22} {:>9} {:>10} {:>10} {:>6}  last error",
            "sink", "kind", "status", "pending", "oldest", "delivered", "dead"
        );
    }
    for (f, row, control, attempts) in &rows {
        let oldest = f
            .oldest_pending_observed_at
            .map_or("-".to_string(), |t| human_ms(now - t));
        let kind = row.as_ref().map_or("-", |r| r.kind.as_str());
        let last_error = row.as_ref().and_then(|r| r.last_error.as_deref());
        if name.is_none() {
            println!(
                "{:<16} {:<8} {:<22} {:>9} {:>10} {:>10} {:>6}  {}",
                esc(&f.name),
                kind,
                f.status,
                f.depth,
                oldest,
                f.delivered,
                f.dead,
                esc_or_dash(last_error)
            );
            continue;
        }
        println!("sink {} ({kind}): {}", esc(&f.name), f.status);
        println!("  pending      {} (oldest {oldest})", f.depth);
        println!(
            "  delivered    {} events; failed attempts {}",
            f.delivered, f.failed
        );
        println!("  dead letters {}", f.dead);
        if let Some(r) = row {
            println!("  cursor       {}", r.cursor);
            println!(
                "  last success {}",
                r.last_success_at.map_or("never".to_string(), |t| format!(
                    "{} ago",
                    human_ms(now - t)
                ))
            );
            if let Some(t) = r.next_attempt_at.filter(|t| *t > now) {
                println!("  next try     in {}", human_ms(t - now));
            }
            if let Some(t) = r.banned_until.filter(|t| *t > now) {
                println!("  banned       for {} more", human_ms(t - now));
            }
            println!("  last error   {}", esc_or_dash(r.last_error.as_deref()));
        }
        if let Some(c) = control {
            println!(
                "  switch       {} by {} {} ago{}",
                if c.enabled { "enabled" } else { "disabled" },
                esc_or_dash(c.updated_by.as_deref()),
                human_ms(now - c.updated_at),
                c.note
                    .as_deref()
                    .map_or(String::new(), |n| format!(": {}", esc(n)))
            );
        }
        if !attempts.is_empty() {
            println!("  last failed attempts:");
            for a in attempts {
                println!(
                    "    {:>8}  {}  {} ms  {} event(s)  {}",
                    format!("{} ago", human_ms(now - a.at)),
                    if a.status > 0 {
                        format!("http {}", a.status)
                    } else {
                        format!("no answer ({})", a.error_kind)
                    },
                    a.duration_ms,
                    a.events,
                    esc_or_dash(a.snippet.as_deref())
                );
            }
        }
    }
    Ok(())
}
