//! `hvac-edge sources`: each source's link, last valid data and error counters, as the daemon
//! last stored them (every few seconds while something changes). Read-only; works while the
//! daemon runs. Tables escape every text that came from outside ([`super::esc`]): device ids,
//! port paths, error texts, decoded values; `--json` prints it exactly.

use super::{esc, esc_or_dash, human_ms};
use crate::sources::{SourceStatus, UnitStatus};
use crate::store::{self, outbox};
use std::path::Path;

/// Prints the sources' status.
///
/// # Errors
/// When the database cannot be opened or read.
pub fn run(db: &Path, json: bool) -> anyhow::Result<()> {
    let conn = store::open(db, store::Mode::ReadOnly, &store::Options::default())?;
    let list = outbox::source_status(&conn, db)?;
    let now = crate::telemetry::now_ms();
    if json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|(s, at)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("updated_at_ms".into(), (*at).into());
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no source status stored yet (the daemon stores it a few seconds after start)");
        return Ok(());
    }
    for (s, at) in &list {
        print_source(s, *at, now);
    }
    Ok(())
}

fn ago(t: Option<i64>, now: i64) -> String {
    t.map_or("never".to_string(), |t| {
        format!("{} ago", human_ms(now - t))
    })
}

fn print_source(s: &SourceStatus, at: i64, now: i64) {
    println!(
        "{} ({}){}: {}{}; last valid data {}; status as of {} ago",
        esc(&s.name),
        esc(&s.kind),
        s.port
            .as_ref()
            .map_or(String::new(), |p| format!(" on {}", esc(p))),
        s.link.as_str(),
        s.since_ms
            .map_or(String::new(), |t| format!(" for {}", human_ms(now - t))),
        ago(s.last_valid_ms, now),
        human_ms(now - at)
    );
    if let Some(e) = &s.last_error {
        println!("  last error: {}", esc(e));
    }
    let counters: Vec<String> = s
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{} {v}", esc(k)))
        .collect();
    if !counters.is_empty() {
        println!("  counters: {}", counters.join(", "));
    }
    if !s.values.is_empty() {
        let values: Vec<String> = s
            .values
            .iter()
            .map(|(k, v)| format!("{} {}", esc(k), esc(v)))
            .collect();
        println!("  values: {}", values.join(", "));
    }
    if !s.units.is_empty() {
        println!(
            "  {:>4} {:<20} {:<8} {:>7} {:>7} {:>8} {:>5} {:>5} {:>5} {:>12}  last error",
            "unit", "device", "state", "polls", "ok", "timeouts", "crc", "exc", "bad", "last ok"
        );
        for u in &s.units {
            print_unit(u, now);
        }
    }
}

fn print_unit(u: &UnitStatus, now: i64) {
    let state = if u.online {
        "ONLINE"
    } else if u.polls == 0 {
        "-"
    } else {
        "OFFLINE"
    };
    println!(
        "  {:>4} {:<20} {:<8} {:>7} {:>7} {:>8} {:>5} {:>5} {:>5} {:>12}  {}",
        u.unit_id,
        esc(&u.device),
        state,
        u.polls,
        u.ok,
        u.timeouts,
        u.crc_errors,
        u.exceptions,
        u.bad_values,
        ago(u.last_ok_ms, now),
        esc_or_dash(u.last_error.as_deref())
    );
}
