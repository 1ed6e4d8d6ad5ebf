//! `hvac-edge devices [DEVICE]`: the last known state of every device, or one device in detail
//! with its recent events and a sparkline of its temperature and setpoint over the last 24 h.
//!
//! Read-only, works while the daemon runs. States come from the writer's checkpoint brought up
//! to date with the events committed since (`store::views::devices`). The sparkline has 48
//! columns; each shows the value after the device's last event in that slice of the window
//! (empty: no event then); temperature and setpoint share one scale, so a room that never
//! reaches its setpoint shows as a temperature row below the setpoint row.

use super::render::{self, Align, Style, Table, emit, paint_for};
use super::{esc, esc_or_dash, human_ms};
use crate::config::Config;
use crate::model::{DeviceState, format_rfc3339_ms};
use crate::store::{self, views};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;

/// Columns of the sparkline.
pub const BUCKETS: usize = 48;
/// Recent events shown for one device.
pub const RECENT: usize = 20;
/// Positions searched back for a device's recent events (`device` has no index): on a fleet
/// of a thousand devices that is a hundred events of each.
const RECENT_ROWS: i64 = 100_000;

/// Which source reports each device: serial units from the stored source status, then the
/// config (reserved ids, simulator prefixes, and the only source open to any device id).
pub struct Sources {
    exact: HashMap<String, String>,
    prefixes: Vec<(String, String)>,
    open: Option<String>,
}

impl Sources {
    /// From the config (if readable) and the stored source status.
    pub fn new(cfg: Option<&Config>, status: &[(crate::channel::SourceStatus, i64)]) -> Sources {
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        let mut open = Vec::new();
        for (s, _) in status {
            for u in &s.units {
                exact.insert(u.device.clone(), s.name.clone());
            }
        }
        if let Some(c) = cfg {
            for s in &c.sources.mqtt {
                if s.devices.is_empty() {
                    open.push(s.name.clone());
                }
                for d in &s.devices {
                    exact.insert(d.clone(), s.name.clone());
                }
            }
            for s in &c.sources.otgw {
                exact.insert(s.device.clone(), s.name.clone());
            }
            for s in &c.sources.modbus {
                for u in &s.units {
                    exact.insert(u.device.clone(), s.name.clone());
                }
            }
            for s in &c.sources.jsonl {
                open.push(s.name.clone());
            }
            for s in &c.sources.simulator {
                prefixes.push((s.device_prefix.clone(), s.name.clone()));
            }
        }
        exact.insert(
            crate::channel::GATEWAY_DEVICE.to_string(),
            "(gateway)".to_string(),
        );
        Sources {
            exact,
            prefixes,
            open: (open.len() == 1).then(|| open.remove(0)),
        }
    }

    /// The source of `device`, when it can be told.
    pub fn of(&self, device: &str) -> Option<String> {
        self.exact
            .get(device)
            .cloned()
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| !p.is_empty() && device.starts_with(p.as_str()))
                    .map(|(_, n)| n.clone())
            })
            .or_else(|| self.open.clone())
    }
}

/// One device in the list.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    pub device: String,
    pub source: Option<String>,
    /// None when its stored state is unreadable.
    pub state: Option<DeviceState>,
    /// Events of this device so far.
    pub seq: i64,
    pub last_seen: Option<i64>,
    pub last_snapshot_at: Option<i64>,
    pub dead_letters: i64,
}

/// The sparkline data of one device: one value per bucket, `null` for a bucket without events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spark {
    pub from_ms: i64,
    pub until_ms: i64,
    pub bucket_ms: i64,
    pub temperature: Vec<Option<f64>>,
    pub setpoint: Vec<Option<f64>>,
}

/// One recent event.
#[derive(Debug, Clone, Serialize)]
pub struct RecentEvent {
    pub pos: i64,
    pub id: String,
    pub seq: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub observed_at: i64,
    /// The stored envelope (JSON), or its text when it is not JSON.
    pub event: serde_json::Value,
}

/// `devices DEVICE`.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: DeviceView,
    pub unit: Option<String>,
    pub history: Spark,
    pub recent_events: Vec<RecentEvent>,
}

/// The sparkline data from the per-bucket states (see `store::views::device_buckets`).
pub fn spark(buckets: &[Option<views::Sample>], from_ms: i64, until_ms: i64) -> Spark {
    let n = i64::try_from(buckets.len().max(1)).unwrap_or(1);
    Spark {
        from_ms,
        until_ms,
        bucket_ms: (until_ms - from_ms).max(n) / n,
        temperature: buckets
            .iter()
            .map(|b| b.and_then(|s| s.temperature))
            .collect(),
        setpoint: buckets.iter().map(|b| b.and_then(|s| s.setpoint)).collect(),
    }
}

/// A device's reading or setting for a table: `21.5 C`, `45.0 %`, `MANUAL`, `-`.
fn show_state(s: Option<&DeviceState>) -> [String; 6] {
    let Some(s) = s else {
        return std::array::from_fn(|_| "?".to_string());
    };
    let dash = || "-".to_string();
    [
        s.connectivity.map_or_else(dash, |c| c.as_str().to_string()),
        s.mode.map_or_else(dash, |m| m.as_str().to_string()),
        s.setpoint
            .map_or_else(dash, |t| format!("{} {}", t.value, t.unit.as_str())),
        s.temperature
            .as_ref()
            .map_or_else(dash, |t| format!("{} {}", t.value, esc(&t.unit))),
        s.humidity
            .as_ref()
            .map_or_else(dash, |t| format!("{} {}", t.value, esc(&t.unit))),
        s.load_state.map_or_else(dash, |l| l.as_str().to_string()),
    ]
}

fn ago(t: Option<i64>, now: i64) -> String {
    t.map_or("never".to_string(), |t| {
        format!("{} ago", human_ms(now - t))
    })
}

/// Reads every device.
///
/// # Errors
/// When the database cannot be opened or read.
pub fn list(
    conn: &rusqlite::Connection,
    db: &Path,
    cfg: Option<&Config>,
) -> anyhow::Result<Vec<DeviceView>> {
    let rows = views::devices(conn, db, views::DEVICE_REPLAY_ROWS)?;
    let sources = Sources::new(cfg, &store::outbox::source_status(conn, db)?);
    Ok(rows
        .into_iter()
        .map(|d| DeviceView {
            source: sources.of(&d.device),
            device: d.device,
            state: d.state,
            seq: d.seq,
            last_seen: d.last_seen,
            last_snapshot_at: d.last_snapshot_at,
            dead_letters: d.dead_letters,
        })
        .collect())
}

/// Reads one device in detail: its history over `window_ms` ending at `until_ms`.
///
/// # Errors
/// When the database cannot be opened or read; None when the device is unknown.
pub fn detail(
    conn: &rusqlite::Connection,
    db: &Path,
    cfg: Option<&Config>,
    device: &str,
    window_ms: i64,
    until_ms: i64,
) -> anyhow::Result<Option<DeviceDetail>> {
    let Some(d) = list(conn, db, cfg)?
        .into_iter()
        .find(|d| d.device == device)
    else {
        return Ok(None);
    };
    let from = until_ms.saturating_sub(window_ms);
    let buckets = views::device_buckets(conn, db, device, from, until_ms, BUCKETS)?;
    let through = views::pos_observed_from(conn, db, until_ms.saturating_add(1))? - 1;
    let recent = views::device_recent(conn, db, device, through, RECENT, RECENT_ROWS)?;
    let unit = d.state.as_ref().and_then(|s| {
        s.temperature
            .as_ref()
            .map(|t| t.unit.clone())
            .or_else(|| s.setpoint.map(|t| t.unit.as_str().to_string()))
    });
    Ok(Some(DeviceDetail {
        history: spark(&buckets, from, until_ms),
        recent_events: recent
            .into_iter()
            .map(|e| RecentEvent {
                event: serde_json::from_str(&e.payload)
                    .unwrap_or(serde_json::Value::String(e.payload)),
                pos: e.pos,
                id: e.id,
                seq: e.seq,
                kind: e.kind,
                observed_at: e.observed_at,
            })
            .collect(),
        unit,
        device: d,
    }))
}

/// Prints the device list or one device; returns the exit code (1 for an unknown device).
pub fn run(
    db: &Path,
    cfg: Option<&Config>,
    device: Option<&str>,
    window_ms: i64,
    until_ms: Option<i64>,
    json: bool,
) -> i32 {
    let res = (|| -> anyhow::Result<i32> {
        let conn = store::open(db, store::Mode::ReadOnly, &store::Options::default())?;
        views::tune_for_scans(&conn);
        let now = crate::telemetry::now_ms();
        let style = Style::for_stdout();
        match device {
            None => {
                let l = list(&conn, db, cfg)?;
                if json {
                    emit(&format!("{}\n", serde_json::to_string_pretty(&l)?))?;
                } else {
                    emit(&render_list(&l, now, style))?;
                }
                Ok(0)
            }
            Some(name) => {
                let Some(d) = detail(&conn, db, cfg, name, window_ms, until_ms.unwrap_or(now))?
                else {
                    eprintln!(
                        "error: no device {:?} in {} (`hvac-edge devices` lists them)",
                        name,
                        db.display()
                    );
                    return Ok(1);
                };
                if json {
                    emit(&format!("{}\n", serde_json::to_string_pretty(&d)?))?;
                } else {
                    emit(&render_detail(&d, now, until_ms.is_some(), style))?;
                }
                Ok(0)
            }
        }
    })();
    res.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        1
    })
}

/// The device table.
pub fn render_list(l: &[DeviceView], now: i64, style: Style) -> String {
    if l.is_empty() {
        return "no devices yet (the daemon records each device at its first observation)\n".into();
    }
    let mut t = Table::new(&[
        ("device", Align::Left),
        ("source", Align::Left),
        ("link", Align::Left),
        ("mode", Align::Left),
        ("setpoint", Align::Right),
        ("temperature", Align::Right),
        ("humidity", Align::Right),
        ("load", Align::Left),
        ("seq", Align::Right),
        ("dead", Align::Right),
        ("last seen", Align::Right),
    ]);
    for d in l {
        let [conn, mode, sp, temp, hum, load] = show_state(d.state.as_ref());
        let conn_paint = paint_for(&conn);
        t.painted_row(vec![
            (esc(&d.device).into_owned(), None),
            (esc_or_dash(d.source.as_deref()).into_owned(), None),
            (conn, conn_paint),
            (mode, None),
            (sp, None),
            (temp, None),
            (hum, None),
            (load, None),
            (d.seq.to_string(), None),
            (d.dead_letters.to_string(), None),
            (ago(d.last_seen, now), None),
        ]);
    }
    let online = l
        .iter()
        .filter(|d| {
            d.state.as_ref().and_then(|s| s.connectivity)
                == Some(crate::model::Connectivity::Online)
        })
        .count();
    format!(
        "{}{} device(s), {online} online\n",
        t.render(style, ""),
        l.len()
    )
}

/// Formats a `previous`/`current` value of an event: `21.5 C`, `MANUAL`, `-`.
fn value(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "-".into(),
        Value::String(s) => esc(s).into_owned(),
        Value::Object(m) => match (m.get("value"), m.get("unit")) {
            (Some(Value::String(x)), Some(Value::String(u))) => {
                format!("{} {}", esc(x), esc(u))
            }
            _ => esc(&v.to_string()).into_owned(),
        },
        other => esc(&other.to_string()).into_owned(),
    }
}

/// One device in detail: state, sparkline, recent events.
pub fn render_detail(d: &DeviceDetail, now: i64, until_given: bool, style: Style) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let v = &d.device;
    let [conn, mode, sp, temp, hum, load] = show_state(v.state.as_ref());
    let _ = writeln!(
        o,
        "device {} (source {})",
        esc(&v.device),
        esc_or_dash(v.source.as_deref())
    );
    let _ = writeln!(
        o,
        "  {}  mode {mode}  setpoint {sp}  temperature {temp}  humidity {hum}  load {load}",
        style.paint(paint_for(&conn), &conn)
    );
    let _ = writeln!(
        o,
        "  seq {} (events so far)  dead letters {}  last seen {}  last snapshot {}",
        v.seq,
        v.dead_letters,
        ago(v.last_seen, now),
        ago(v.last_snapshot_at, now)
    );
    o.push('\n');
    let h = &d.history;
    let window = h.until_ms - h.from_ms;
    let all: Vec<f64> = h
        .temperature
        .iter()
        .chain(&h.setpoint)
        .flatten()
        .copied()
        .collect();
    let unit = d
        .unit
        .as_deref()
        .map_or(String::new(), |u| format!(" {}", esc(u)));
    let span = if until_given {
        format!(
            "{} until {}",
            render::short_duration(window),
            format_rfc3339_ms(h.until_ms)
        )
    } else {
        format!("last {}", render::short_duration(window))
    };
    if all.is_empty() {
        let _ = writeln!(o, "{span}: no temperature or setpoint reported");
    } else {
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            o,
            "{span}, one column per {}, one scale {lo:.1} .. {hi:.1}{unit}",
            render::short_duration(h.bucket_ms)
        );
        for (name, series) in [("setpoint", &h.setpoint), ("temperature", &h.temperature)] {
            let vals: Vec<f64> = series.iter().flatten().copied().collect();
            let label = match (
                vals.iter().copied().reduce(f64::min),
                vals.iter().copied().reduce(f64::max),
            ) {
                (Some(a), Some(b)) => format!("min {a:.1}  max {b:.1}"),
                _ => "no data".into(),
            };
            let _ = writeln!(
                o,
                "  {name:<12} {}  {label}",
                render::sparkline(series, lo, hi)
            );
        }
        let (ticks, labels) =
            render::time_axis(BUCKETS, window, if until_given { "end" } else { "now" });
        let _ = writeln!(o, "  {:<12} {ticks}", "");
        let _ = writeln!(o, "  {:<12} {labels}", "");
    }
    o.push('\n');
    if d.recent_events.is_empty() {
        o.push_str(
            "no recent events stored (delivered events are removed once every sink has them)\n",
        );
        return o;
    }
    let _ = writeln!(o, "recent events, newest first ({} at most)", RECENT);
    let mut t = Table::new(&[
        ("pos", Align::Right),
        ("observed at", Align::Left),
        ("seq", Align::Right),
        ("type", Align::Left),
        ("previous", Align::Right),
        ("current", Align::Right),
    ]);
    for e in &d.recent_events {
        let (prev, cur) = match &e.event {
            serde_json::Value::Object(m) => (
                m.get("previous").map_or("-".into(), value),
                m.get("current").map_or("-".into(), value),
            ),
            _ => ("?".into(), "unreadable".into()),
        };
        t.row([
            e.pos.to_string(),
            format_rfc3339_ms(e.observed_at),
            e.seq.to_string(),
            esc(&e.kind).into_owned(),
            prev,
            cur,
        ]);
    }
    o.push_str(&t.render(style, "  "));
    o
}

/// `hvac-edge devices [DEVICE]`; returns the exit code (2 for a window or time that cannot be
/// understood).
pub fn cmd(
    db: &super::DbArgs,
    device: Option<&str>,
    window: &str,
    until: Option<&str>,
    json: bool,
) -> i32 {
    let p = match super::queue::db_path(db) {
        Ok(p) => p,
        Err(c) => return c,
    };
    let window_ms = match humantime::parse_duration(window) {
        Ok(d) if d.as_millis() >= BUCKETS as u128 => {
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
        }
        _ => {
            eprintln!("error: --window {window:?}: not a duration of at least 48 ms (24h, 2h, 7d)");
            return 2;
        }
    };
    let until_ms = match until {
        None => None,
        Some(u) => match super::queue::parse_time("--until", u, crate::telemetry::now_ms()) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {e}");
                return 2;
            }
        },
    };
    run(
        &p,
        super::status::read_config(&db.config).as_ref(),
        device,
        window_ms,
        until_ms,
        json,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: i64, t: Option<f64>, sp: Option<f64>) -> views::Sample {
        views::Sample {
            observed_at: at,
            temperature: t,
            setpoint: sp,
        }
    }

    #[test]
    fn a_room_below_its_setpoint_shows_as_a_lower_row() {
        let from = 0;
        let until = 48 * 60_000;
        let mut buckets: Vec<Option<views::Sample>> = (0..48)
            .map(|i| {
                Some(s(
                    i * 60_000 + 1,
                    Some(17.0 + (i as f64) / 24.0),
                    Some(21.0),
                ))
            })
            .collect();
        buckets[10] = None;
        let d = DeviceDetail {
            device: DeviceView {
                device: "trv\u{1b}[2J".into(),
                source: Some("z2m".into()),
                state: None,
                seq: 3,
                last_seen: Some(until),
                last_snapshot_at: None,
                dead_letters: 0,
            },
            unit: Some("C".into()),
            history: spark(&buckets, from, until),
            recent_events: Vec::new(),
        };
        assert_eq!(d.history.bucket_ms, 60_000);
        assert_eq!(d.history.temperature[10], None);
        assert_eq!(d.history.setpoint[0], Some(21.0));
        let text = render_detail(&d, until, false, Style { colour: false });
        assert!(
            text.starts_with("device trv\\x1b[2J (source z2m)\n"),
            "{text}"
        );
        let row = |name: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no {name} row in {text}"))
                .to_string()
        };
        assert!(
            row("setpoint").contains(&format!("{}·{}", "█".repeat(10), "█".repeat(37))),
            "{text}"
        );
        assert!(row("temperature").contains("▁▁▁▁"), "{text}");
        assert!(row("temperature").ends_with("min 17.0  max 19.0"), "{text}");
        assert!(
            text.contains("last 48m, one column per 1m, one scale 17.0 .. 21.0 C"),
            "{text}"
        );
    }
}
