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
    outbox::set_sink_control(&conn, db, name, enabled, note, Some(&by), now)?;
    let action = if enabled {
        "sink_enable"
    } else {
        "sink_disable"
    };
    crate::store::control::record_done(
        &conn,
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
