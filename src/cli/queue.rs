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

// ------------------------------------------------------------ list | show | tail | export

use super::render::{self, Align, Style, Table, emit, paint_for};
use crate::model::format_rfc3339_ms;
use crate::store::views;

/// A filter value that cannot be understood: a usage error (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Which events `queue list|tail|export` select.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EventFilter {
    /// With `--status`: pending for this sink (after its cursor) or delivered to it (at or
    /// before its cursor, including those it gave up on), or its dead letters. Alone: adds
    /// the sink's status to each event.
    #[arg(long)]
    pub sink: Option<String>,
    /// Only this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Only this event type (`setpoint`, `temperature`, `snapshot`, `operational`, …).
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Observed at or after: RFC 3339 (`2026-11-23T08:00:00Z`) or an age (`90s`, `15m`, `2h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Observed at or before: RFC 3339 or an age.
    #[arg(long)]
    pub until: Option<String>,
    /// `pending` (not yet done by the sink; without `--sink`: by at least one sink),
    /// `delivered` (done by the sink; without `--sink`: by every sink) or `dead` (dead letters).
    #[arg(long, value_parser = ["pending", "delivered", "dead"])]
    pub status: Option<String>,
}

/// An RFC 3339 time or an age before `now` (`90s`, `15m`, `2h`, `7d`, `1h30m`), in ms.
///
/// # Errors
/// [`Usage`] naming the flag.
pub fn parse_time(flag: &str, s: &str, now: i64) -> Result<i64, Usage> {
    if let Some(t) = crate::model::parse_rfc3339_ms(s) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
        Err(_) => Err(Usage(format!(
            "{flag} {s:?}: not an RFC 3339 time (2026-11-23T08:00:00Z) nor an age (90s, 15m, 2h, 7d)"
        ))),
    }
}

/// A filter resolved against the database: a `pos` range and the sink's view.
struct Selection {
    filter: views::Filter,
    dead: bool,
    /// The sink named by `--sink`: its cursor, and the positions it dead-lettered.
    sink: Option<(String, i64, std::collections::HashSet<i64>)>,
}

fn resolve(
    conn: &rusqlite::Connection,
    db: &Path,
    f: &EventFilter,
    now: i64,
) -> anyhow::Result<Selection> {
    let since = f
        .since
        .as_deref()
        .map(|s| parse_time("--since", s, now))
        .transpose()?;
    let until = f
        .until
        .as_deref()
        .map(|s| parse_time("--until", s, now))
        .transpose()?;
    let mut filter = views::Filter {
        device: f.device.clone(),
        kind: f.kind.clone(),
        since,
        until,
        ..views::Filter::default()
    };
    if let Some(t) = since {
        filter.after = Some(views::pos_observed_from(conn, db, t)? - 1);
    }
    if let Some(t) = until {
        filter.through = Some(views::pos_observed_from(conn, db, t.saturating_add(1))? - 1);
    }
    let sinks = views::sinks(conn, db)?;
    let sink = match &f.sink {
        Some(name) => {
            let Some(row) = sinks.iter().find(|s| &s.name == name) else {
                anyhow::bail!(
                    "no sink {name:?} has run on {}; `hvac-edge queue stats` lists the sinks",
                    db.display()
                );
            };
            let dead: std::collections::HashSet<i64> = views::dead(
                conn,
                db,
                Some(name),
                &views::Filter::default(),
                false,
                i64::MAX,
            )?
            .into_iter()
            .map(|d| d.event_pos)
            .collect();
            Some((name.clone(), row.cursor, dead))
        }
        None => None,
    };
    let cursor = match &sink {
        Some((_, c, _)) => Some(*c),
        None => sinks.iter().map(|s| s.cursor).min(),
    };
    match (f.status.as_deref(), cursor) {
        (Some("pending"), Some(c)) => filter.after = Some(filter.after.map_or(c, |a| a.max(c))),
        (Some("delivered"), Some(c)) => {
            filter.through = Some(filter.through.map_or(c, |t| t.min(c)));
        }
        // No sink has run: nothing is delivered yet.
        (Some("delivered"), None) => filter.through = Some(i64::MIN),
        _ => {}
    }
    Ok(Selection {
        filter,
        dead: f.status.as_deref() == Some("dead"),
        sink,
    })
}

/// One event as `queue list|tail --json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub pos: i64,
    pub id: String,
    pub device: String,
    pub seq: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub observed_at: i64,
    /// With `--sink`: `pending`, `delivered` or `dead` for that sink.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink_status: Option<&'static str>,
    /// The stored envelope (its text when it is not JSON).
    pub event: serde_json::Value,
}

fn listed(e: views::EventRow, sel: &Selection) -> Listed {
    let sink_status = sel.sink.as_ref().map(|(_, cursor, dead)| {
        if dead.contains(&e.pos) {
            "dead"
        } else if e.pos <= *cursor {
            "delivered"
        } else {
            "pending"
        }
    });
    Listed {
        event: serde_json::from_str(&e.payload).unwrap_or(serde_json::Value::String(e.payload)),
        pos: e.pos,
        id: e.id,
        device: e.device,
        seq: e.seq,
        kind: e.kind,
        observed_at: e.observed_at,
        sink_status,
    }
}

/// `previous`/`current` of an envelope for a table: `21.5 C`, `MANUAL`, `-`.
fn value_text(v: Option<&serde_json::Value>) -> String {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => esc(s).into_owned(),
        Some(Value::Object(m)) => match (m.get("value"), m.get("unit")) {
            (Some(Value::String(x)), Some(Value::String(u))) => format!("{} {}", esc(x), esc(u)),
            _ => esc(&Value::Object(m.clone()).to_string()).into_owned(),
        },
        Some(other) => esc(&other.to_string()).into_owned(),
    }
}

fn event_table(rows: &[Listed], with_sink: bool, style: Style) -> String {
    let mut headers = vec![
        ("pos", Align::Right),
        ("observed at", Align::Left),
        ("device", Align::Left),
        ("seq", Align::Right),
        ("type", Align::Left),
        ("current", Align::Right),
    ];
    if with_sink {
        headers.push(("status", Align::Left));
    }
    let mut t = Table::new(&headers);
    for e in rows {
        let mut cells = vec![
            (e.pos.to_string(), None),
            (format_rfc3339_ms(e.observed_at), None),
            (esc(&e.device).into_owned(), None),
            (e.seq.to_string(), None),
            (esc(&e.kind).into_owned(), None),
            (value_text(e.event.get("current")), None),
        ];
        if let Some(s) = e.sink_status {
            cells.push((s.to_string(), paint_for(s)));
        }
        t.painted_row(cells);
    }
    t.render(style, "")
}

fn dead_table(rows: &[views::DeadRow], style: Style) -> String {
    let mut t = Table::new(&[
        ("sink", Align::Left),
        ("pos", Align::Right),
        ("event id", Align::Left),
        ("device", Align::Left),
        ("seq", Align::Right),
        ("type", Align::Left),
        ("reason", Align::Left),
        ("http", Align::Right),
        ("dead since", Align::Left),
        ("response", Align::Left),
    ]);
    for d in rows {
        t.row([
            esc(&d.sink).into_owned(),
            d.event_pos.to_string(),
            esc(&d.event_id).into_owned(),
            esc(&d.device).into_owned(),
            d.seq.to_string(),
            esc(&d.kind).into_owned(),
            esc(&d.reason).into_owned(),
            d.http_status.map_or("-".into(), |s| s.to_string()),
            format_rfc3339_ms(d.at),
            esc(d.response_snippet.as_deref().unwrap_or("")).into_owned(),
        ]);
    }
    t.render(style, "")
}

fn open_ro(db: &Path) -> anyhow::Result<rusqlite::Connection> {
    let conn = store::open(db, store::Mode::ReadOnly, &store::Options::default())?;
    views::tune_for_scans(&conn);
    Ok(conn)
}

/// `queue list`: matching events newest first, at most `limit`.
///
/// # Errors
/// [`Usage`] for a filter that cannot be understood, else a store error or an unknown sink.
pub fn list(db: &Path, f: &EventFilter, limit: i64, json: bool) -> anyhow::Result<()> {
    let conn = open_ro(db)?;
    let now = crate::telemetry::now_ms();
    let sel = resolve(&conn, db, f, now)?;
    let style = Style::for_stdout();
    if sel.dead {
        let rows = views::dead(&conn, db, f.sink.as_deref(), &sel.filter, true, limit)?;
        if json {
            emit(&format!("{}\n", serde_json::to_string_pretty(&rows)?))?;
        } else if rows.is_empty() {
            emit("no dead letters match\n")?;
        } else {
            emit(&dead_table(&rows, style))?;
        }
        return Ok(());
    }
    let rows: Vec<Listed> = views::events(&conn, db, &sel.filter, true, limit)?
        .into_iter()
        .map(|e| listed(e, &sel))
        .collect();
    if json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&rows)?))?;
    } else if rows.is_empty() {
        emit("no stored events match\n")?;
    } else {
        emit(&event_table(&rows, sel.sink.is_some(), style))?;
    }
    Ok(())
}

/// What `queue show` prints about one sink.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Delivery {
    pub sink: String,
    /// `delivered`, `pending` or `dead`.
    pub status: &'static str,
    pub cursor: i64,
    /// For a dead letter: why, the HTTP status, the start of the answer, when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_snippet: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_at: Option<i64>,
}

/// `queue show ID`: an event's full JSON (by id or `pos`) and its status for every sink.
/// Returns false when no such event is stored.
///
/// # Errors
/// A store error.
pub fn show(db: &Path, id: &str, json: bool) -> anyhow::Result<bool> {
    let conn = open_ro(db)?;
    let row = if let Ok(pos) = id.parse::<i64>() {
        views::event_at(&conn, db, pos)?
    } else {
        views::event_by_id(&conn, db, id, uuid7_ms(id))?
    };
    let (pos, event_id, payload, stored) = match row {
        Some(e) => (e.pos, e.id, e.payload, true),
        None => {
            // Garbage collection removes an event once every sink is done with it; a dead
            // letter keeps its own copy.
            let all = views::dead(&conn, db, None, &views::Filter::default(), true, i64::MAX)?;
            match all
                .into_iter()
                .find(|d| d.event_id == id || d.event_pos.to_string() == id)
            {
                Some(d) => (d.event_pos, d.event_id, d.payload, false),
                None => return Ok(false),
            }
        }
    };
    let dead = views::dead_of_event(&conn, db, &event_id)?;
    let deliveries: Vec<Delivery> = views::sinks(&conn, db)?
        .into_iter()
        .map(|s| {
            let d = dead.iter().find(|d| d.sink == s.name);
            Delivery {
                status: if d.is_some() {
                    "dead"
                } else if pos <= s.cursor {
                    "delivered"
                } else {
                    "pending"
                },
                cursor: s.cursor,
                reason: d.map(|d| d.reason.clone()),
                http_status: d.and_then(|d| d.http_status),
                response_snippet: d.and_then(|d| d.response_snippet.clone()),
                dead_at: d.map(|d| d.at),
                sink: s.name,
            }
        })
        .collect();
    let event: serde_json::Value =
        serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
    if json {
        let v = serde_json::json!({
            "pos": pos,
            "stored": stored,
            "event": event,
            "delivery": deliveries,
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&v)?))?;
        return Ok(true);
    }
    let style = Style::for_stdout();
    let mut o = format!(
        "event at pos {pos}{}\n",
        if stored {
            ""
        } else {
            " (no longer in the outbox; from its dead letter)"
        }
    );
    // serde_json escapes control characters in strings, so the pretty JSON is safe to print.
    o.push_str(&serde_json::to_string_pretty(&event)?);
    o.push_str("\n\n");
    if deliveries.is_empty() {
        o.push_str("no sink has run on this database yet\n");
    } else {
        let mut t = Table::new(&[
            ("sink", Align::Left),
            ("status", Align::Left),
            ("cursor", Align::Right),
            ("why", Align::Left),
        ]);
        for d in &deliveries {
            let why = match &d.reason {
                Some(r) => format!(
                    "{}{}{} at {}",
                    esc(r),
                    d.http_status
                        .map_or(String::new(), |s| format!(" (http {s})")),
                    d.response_snippet
                        .as_deref()
                        .map_or(String::new(), |t| format!(": {}", esc(t))),
                    d.dead_at.map_or("-".into(), format_rfc3339_ms)
                ),
                None => "-".into(),
            };
            t.painted_row(vec![
                (esc(&d.sink).into_owned(), None),
                (d.status.to_string(), paint_for(d.status)),
                (d.cursor.to_string(), None),
                (why, None),
            ]);
        }
        o.push_str(&t.render(style, ""));
    }
    emit(&o)?;
    Ok(true)
}

/// The time (ms) in a UUIDv7 (its first 48 bits), if `id` is one.
pub fn uuid7_ms(id: &str) -> Option<i64> {
    let u = uuid::Uuid::parse_str(id).ok()?;
    if u.get_version_num() != 7 {
        return None;
    }
    let b = u.as_bytes();
    let mut ms = 0i64;
    for x in &b[..6] {
        ms = (ms << 8) | i64::from(*x);
    }
    Some(ms)
}

/// How `queue tail` runs.
#[derive(Debug, Clone, Copy)]
pub struct Tail {
    /// The newest this many are printed first.
    pub lines: i64,
    /// Then follow new events (poll every 250 ms).
    pub follow: bool,
    /// Stop following after this many new events.
    pub max: Option<u64>,
    /// Stop following after this long.
    pub timeout: Option<std::time::Duration>,
    pub json: bool,
}

/// Poll interval of `queue tail -f`.
const FOLLOW_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// `queue tail`: the newest events (oldest of them first), then with `follow` every new one as
/// it is committed, until Ctrl-C, `max` events or `timeout`.
///
/// # Errors
/// [`Usage`] for a filter that cannot be understood, else a store error.
pub fn tail(db: &Path, f: &EventFilter, t: Tail) -> anyhow::Result<()> {
    let conn = open_ro(db)?;
    let now = crate::telemetry::now_ms();
    let sel = resolve(&conn, db, f, now)?;
    if sel.dead {
        return Err(Usage(
            "queue tail follows stored events; use `queue list --status dead`".into(),
        )
        .into());
    }
    let style = Style::for_stdout();
    let mut newest = views::events(&conn, db, &sel.filter, true, t.lines)?;
    newest.reverse();
    let mut last = match newest.last() {
        Some(e) => e.pos,
        None => views::pos_bounds(&conn, db)?.map_or(0, |(_, max)| max),
    };
    let line = |e: &Listed| -> anyhow::Result<String> {
        if t.json {
            return Ok(format!("{}\n", serde_json::to_string(e)?));
        }
        Ok(format!(
            "{:>8}  {}  {}  {}  {}  {}{}\n",
            e.pos,
            format_rfc3339_ms(e.observed_at),
            esc(&e.device),
            e.seq,
            esc(&e.kind),
            value_text(e.event.get("current")),
            e.sink_status.map_or(String::new(), |s| format!(
                "  {}",
                style.paint(paint_for(s), s)
            ))
        ))
    };
    for e in newest {
        if !emit(&line(&listed(e, &sel))?)? {
            return Ok(());
        }
    }
    if !t.follow {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut followed = 0u64;
    let mut filter = sel.filter.clone();
    loop {
        if t.max.is_some_and(|m| followed >= m) || t.timeout.is_some_and(|d| started.elapsed() >= d)
        {
            return Ok(());
        }
        filter.after = Some(last.max(sel.filter.after.unwrap_or(i64::MIN)));
        let batch = views::events(&conn, db, &filter, false, 1000)?;
        if batch.is_empty() {
            // Nothing matched: skip ahead to the newest position so that a filter that matches
            // nothing does not rescan the same range.
            if let Some((_, max)) = views::pos_bounds(&conn, db)? {
                last = last.max(max.min(sel.filter.through.unwrap_or(i64::MAX)));
            }
            std::thread::sleep(FOLLOW_POLL);
            continue;
        }
        for e in batch {
            last = e.pos;
            if !emit(&line(&listed(e, &sel))?)? {
                return Ok(());
            }
            followed += 1;
            if t.max.is_some_and(|m| followed >= m) {
                return Ok(());
            }
        }
    }
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One stored envelope per line, exactly as sent upstream.
    Jsonl,
    /// One row per event; the columns are listed in `queue export --help`.
    Csv,
}

/// The CSV header (documented in `queue export --help`).
pub const CSV_COLUMNS: &str = "pos,id,observed_at,device,seq,type,clock,previous,current,function,mode,program,setpoint,setpoint_unit,temperature,temperature_unit,humidity,load_state,connectivity";
/// Extra CSV columns of dead letters (`--status dead`).
pub const CSV_DEAD_COLUMNS: &str = ",sink,reason,http_status,dead_at";

/// Quotes a CSV field (RFC 4180). A text from outside that a spreadsheet would run as a formula
/// (`=`, `+`, `-`, `@`, tab, CR first) gets a leading `'`.
fn csv_field(s: &str, from_outside: bool) -> String {
    let guarded;
    let s = if from_outside && s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        guarded = format!("'{s}");
        guarded.as_str()
    } else {
        s
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// What a CSV line needs of a stored envelope (borrowed: export reads a million of them).
#[derive(serde::Deserialize)]
struct CsvEvent<'a> {
    #[serde(borrow, default)]
    clock: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    previous: serde_json::Value,
    #[serde(default)]
    current: serde_json::Value,
    #[serde(borrow, default)]
    state: Option<CsvState<'a>>,
}

#[derive(serde::Deserialize)]
struct CsvState<'a> {
    #[serde(borrow, default)]
    function: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    mode: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    program: Option<u64>,
    #[serde(borrow, default)]
    setpoint: Option<CsvValue<'a>>,
    #[serde(borrow, default)]
    temperature: Option<CsvValue<'a>>,
    #[serde(borrow, default)]
    humidity: Option<CsvValue<'a>>,
    #[serde(borrow, default)]
    load_state: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    connectivity: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct CsvValue<'a> {
    #[serde(borrow)]
    value: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    unit: Option<std::borrow::Cow<'a, str>>,
}

/// One CSV line (without newline) of a stored event; a payload that is not an envelope leaves
/// the envelope's columns empty.
fn csv_line(
    pos: i64,
    id: &str,
    device: &str,
    seq: i64,
    kind: &str,
    observed_at: i64,
    payload: &str,
) -> String {
    let e: Option<CsvEvent<'_>> = serde_json::from_str(payload).ok();
    let cow = |c: &Option<std::borrow::Cow<'_, str>>| c.as_deref().unwrap_or("").to_string();
    let json = |v: &serde_json::Value| match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let st = e.as_ref().and_then(|e| e.state.as_ref());
    let val = |v: Option<&CsvValue<'_>>| v.map_or(String::new(), |v| v.value.to_string());
    let unit = |v: Option<&CsvValue<'_>>| v.map_or(String::new(), |v| cow(&v.unit));
    let fields: [(String, bool); 19] = [
        (pos.to_string(), false),
        (id.to_string(), true),
        (format_rfc3339_ms(observed_at), false),
        (device.to_string(), true),
        (seq.to_string(), false),
        (kind.to_string(), true),
        (e.as_ref().map_or(String::new(), |e| cow(&e.clock)), false),
        (
            e.as_ref().map_or(String::new(), |e| json(&e.previous)),
            true,
        ),
        (e.as_ref().map_or(String::new(), |e| json(&e.current)), true),
        (st.map_or(String::new(), |s| cow(&s.function)), false),
        (st.map_or(String::new(), |s| cow(&s.mode)), false),
        (
            st.and_then(|s| s.program)
                .map_or(String::new(), |p| p.to_string()),
            false,
        ),
        (val(st.and_then(|s| s.setpoint.as_ref())), false),
        (unit(st.and_then(|s| s.setpoint.as_ref())), false),
        (val(st.and_then(|s| s.temperature.as_ref())), false),
        (unit(st.and_then(|s| s.temperature.as_ref())), true),
        (val(st.and_then(|s| s.humidity.as_ref())), false),
        (st.map_or(String::new(), |s| cow(&s.load_state)), false),
        (st.map_or(String::new(), |s| cow(&s.connectivity)), false),
    ];
    let mut line = String::with_capacity(256);
    for (i, (s, outside)) in fields.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&csv_field(s, *outside));
    }
    line
}

/// Rows read per query by `queue export`.
const EXPORT_CHUNK: i64 = 2000;

/// What `queue export` did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exported {
    pub events: u64,
    pub secs: f64,
}

/// `queue export`: every matching event, oldest first, as JSON lines or CSV, to `out` (mode
/// 0600: events describe a household) or stdout; a progress bar on stderr when it is a
/// terminal.
///
/// # Errors
/// [`Usage`] for a filter that cannot be understood, else a store or write error.
pub fn export(
    db: &Path,
    f: &EventFilter,
    format: Format,
    out: Option<&Path>,
    limit: Option<u64>,
) -> anyhow::Result<Exported> {
    use std::io::Write as _;
    let conn = open_ro(db)?;
    let started = std::time::Instant::now();
    let now = crate::telemetry::now_ms();
    let sel = resolve(&conn, db, f, now)?;
    let mut w: Box<dyn std::io::Write> = match out {
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
            Box::new(std::io::BufWriter::with_capacity(1 << 16, file))
        }
        None => Box::new(std::io::BufWriter::with_capacity(
            1 << 16,
            std::io::stdout().lock(),
        )),
    };
    let limit = limit.unwrap_or(u64::MAX);
    let mut n = 0u64;
    let write = |w: &mut Box<dyn std::io::Write>, s: &str| -> anyhow::Result<bool> {
        match w.write_all(s.as_bytes()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(e) => Err(anyhow::anyhow!("write: {e}")),
        }
    };
    if format == Format::Csv {
        let header = if sel.dead {
            format!("{CSV_COLUMNS}{CSV_DEAD_COLUMNS}\n")
        } else {
            format!("{CSV_COLUMNS}\n")
        };
        write(&mut w, &header)?;
    }
    if sel.dead {
        let rows = views::dead(&conn, db, f.sink.as_deref(), &sel.filter, false, i64::MAX)?;
        for d in rows
            .iter()
            .take(usize::try_from(limit).unwrap_or(usize::MAX))
        {
            let line = match format {
                Format::Jsonl => format!("{}\n", d.payload.trim_end()),
                Format::Csv => {
                    let observed = views::payload_observed_at(&d.payload).unwrap_or(0);
                    format!(
                        "{},{},{},{},{}\n",
                        csv_line(
                            d.event_pos,
                            &d.event_id,
                            &d.device,
                            d.seq,
                            &d.kind,
                            observed,
                            &d.payload
                        ),
                        csv_field(&d.sink, true),
                        csv_field(&d.reason, false),
                        d.http_status.map_or(String::new(), |s| s.to_string()),
                        format_rfc3339_ms(d.at)
                    )
                }
            };
            if !write(&mut w, &line)? {
                break;
            }
            n += 1;
        }
    } else {
        let bounds = views::pos_bounds(&conn, db)?;
        let (min, max) = bounds.unwrap_or((1, 0));
        let from = sel.filter.after.unwrap_or(min - 1).max(min - 1);
        let to = sel.filter.through.unwrap_or(max).min(max);
        let bar = render::progress(u64::try_from(to - from).unwrap_or(0), "exporting");
        let mut filter = sel.filter.clone();
        filter.through = Some(to);
        let mut after = from;
        'outer: while after < to && n < limit {
            filter.after = Some(after);
            // A chunk of positions, so that a selective filter never reads far past what it needs
            // before the bar moves.
            filter.through = Some(after.saturating_add(EXPORT_CHUNK * 8).min(to));
            let rows = views::events(&conn, db, &filter, false, EXPORT_CHUNK)?;
            let next = match rows.last() {
                Some(e) if rows.len() == usize::try_from(EXPORT_CHUNK).unwrap_or(usize::MAX) => {
                    e.pos
                }
                _ => filter.through.unwrap_or(to),
            };
            for e in rows {
                let line = match format {
                    Format::Jsonl => format!("{}\n", e.payload.trim_end()),
                    Format::Csv => format!(
                        "{}\n",
                        csv_line(
                            e.pos,
                            &e.id,
                            &e.device,
                            e.seq,
                            &e.kind,
                            e.observed_at,
                            &e.payload
                        )
                    ),
                };
                if !write(&mut w, &line)? {
                    break 'outer;
                }
                n += 1;
                if n >= limit {
                    break 'outer;
                }
            }
            bar.set_position(u64::try_from(next - from).unwrap_or(0));
            after = next;
        }
        bar.finish_and_clear();
    }
    match w.flush() {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => anyhow::bail!("write: {e}"),
    }
    Ok(Exported {
        events: n,
        secs: started.elapsed().as_secs_f64(),
    })
}

// ------------------------------------------------------------ entry points (exit codes)

/// The database path of `db`, or exit code 78 (the config cannot be read) after saying why.
pub fn db_path(db: &super::DbArgs) -> Result<std::path::PathBuf, i32> {
    db.path().map_err(|e| {
        eprintln!("error: {e:#}");
        super::EXIT_CONFIG
    })
}

/// Prints an error and maps it to an exit code: 2 for a [`Usage`] error, else 1.
pub fn exit_code(res: anyhow::Result<i32>) -> i32 {
    match res {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                2
            } else {
                1
            }
        }
    }
}

/// `queue list`; returns the exit code.
pub fn list_cmd(db: &super::DbArgs, f: &EventFilter, limit: i64, json: bool) -> i32 {
    match db_path(db) {
        Ok(p) => exit_code(list(&p, f, limit, json).map(|()| 0)),
        Err(c) => c,
    }
}

/// `queue show`; returns the exit code (1 when no such event is stored).
pub fn show_cmd(db: &super::DbArgs, id: &str, json: bool) -> i32 {
    let p = match db_path(db) {
        Ok(p) => p,
        Err(c) => return c,
    };
    exit_code(show(&p, id, json).map(|found| {
        if found {
            0
        } else {
            eprintln!(
                "error: no event {:?} in {} (an event every sink is done with is removed)",
                id,
                p.display()
            );
            1
        }
    }))
}

/// `queue tail`; returns the exit code.
pub fn tail_cmd(db: &super::DbArgs, f: &EventFilter, t: Tail) -> i32 {
    match db_path(db) {
        Ok(p) => exit_code(tail(&p, f, t).map(|()| 0)),
        Err(c) => c,
    }
}

/// `queue export`; prints the count and rate on stderr; returns the exit code.
pub fn export_cmd(
    db: &super::DbArgs,
    f: &EventFilter,
    format: Format,
    out: Option<&Path>,
    limit: Option<u64>,
) -> i32 {
    let p = match db_path(db) {
        Ok(p) => p,
        Err(c) => return c,
    };
    exit_code(export(&p, f, format, out, limit).map(|x| {
        let rate = if x.secs > 0.0 {
            x.events as f64 / x.secs
        } else {
            0.0
        };
        eprintln!(
            "exported {} event(s){} in {:.2} s ({:.0} events/s)",
            x.events,
            out.map_or(String::new(), |o| format!(
                " to {}",
                esc(&o.display().to_string())
            )),
            x.secs,
            rate
        );
        0
    }))
}
