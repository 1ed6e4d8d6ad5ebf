//! The results: a table on stdout and the same figures as JSON.

use serde::Serialize;

/// Parameters the run used (they change what the figures mean).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Params {
    pub quick: bool,
    pub ingest_messages: usize,
    pub bare_messages: usize,
    pub backlog_requested: u64,
    pub backlog_events: Option<u64>,
    pub latency_secs: u64,
    pub latency_rate_per_sec: f64,
    pub idle_secs: u64,
    pub receiver_batches: usize,
    pub cpus: usize,
}

/// Raw limits of this machine, measured in the same run.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Raw {
    /// (a) bare QoS 1 subscriber on the same mosquitto, messages/s.
    pub bare_subscriber_msgs_per_sec: Option<f64>,
    /// Every run of (a); the best one is the reference.
    pub bare_subscriber_runs: Vec<f64>,
    /// The same publisher with nobody subscribed (the load generator's own ceiling), messages/s.
    pub publisher_alone_msgs_per_sec: Option<f64>,
    /// (b) batched SQLite inserts, WAL + synchronous=FULL, 1000-row transactions, rows/s.
    pub sqlite_rows_per_sec: Option<f64>,
    pub sqlite_payload_bytes: Option<f64>,
    /// (c) the receiver under a plain load generator, events/s.
    pub receiver_events_per_sec: Option<f64>,
}

/// The daemon's figures.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DaemonFigures {
    pub ingest10_obs_per_sec: Option<f64>,
    pub ingest10_events_per_sec: Option<f64>,
    pub ingest100_obs_per_sec: Option<f64>,
    pub ingest100_events_per_sec: Option<f64>,
    pub backlog_production_events_per_sec: Option<f64>,
    pub drain_events_per_sec: Option<f64>,
    pub drain_secs: Option<f64>,
    pub drain_first_to_last_events_per_sec: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub latency_samples: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    pub rss_at_end_kib: Option<u64>,
    /// VmHWM after snapshots + the 200 changes/s phase, before any burst.
    pub steady_peak_rss_kib: Option<u64>,
    pub after_burst_latency_p50_ms: Option<f64>,
    pub after_burst_latency_p99_ms: Option<f64>,
    pub after_burst_latency_max_ms: Option<f64>,
    pub bytes_written_per_event: Option<f64>,
    pub commits_window_events: Option<u64>,
    pub idle_cpu_pct_of_core: Option<f64>,
    pub event_payload_bytes: Option<f64>,
}

/// Everything, as written to bench-results/latest.json.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Results {
    pub params: Params,
    pub raw: Raw,
    pub daemon: DaemonFigures,
    pub errors: Vec<String>,
}

struct Row {
    metric: &'static str,
    value: Option<f64>,
    unit: &'static str,
    reference: Option<(&'static str, Option<f64>)>,
    target: &'static str,
    pass: Option<bool>,
}

fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

impl Results {
    /// The target verdicts as (metric, pass).
    fn rows(&self) -> Vec<Row> {
        let d = &self.daemon;
        let r = &self.raw;
        let bare = r.bare_subscriber_msgs_per_sec;
        let rx = r.receiver_events_per_sec;
        let sql = r.sqlite_rows_per_sec;
        let at_least = |v: Option<f64>, limit: f64| v.map(|v| v >= limit);
        let at_most = |v: Option<f64>, limit: f64| v.map(|v| v <= limit);
        vec![
            Row {
                metric: "ingest, 10% changing: observations/s",
                value: d.ingest10_obs_per_sec,
                unit: "msg/s",
                reference: Some(("bare QoS1 subscriber msg/s", bare)),
                target: ">= 0.8x bare subscriber",
                pass: at_least(ratio(d.ingest10_obs_per_sec, bare), 0.8),
            },
            Row {
                metric: "ingest, 10% changing: committed events/s",
                value: d.ingest10_events_per_sec,
                unit: "ev/s",
                reference: Some(("raw SQLite rows/s", sql)),
                target: "(info)",
                pass: None,
            },
            Row {
                metric: "ingest, 100% changing: observations/s",
                value: d.ingest100_obs_per_sec,
                unit: "msg/s",
                reference: Some(("bare QoS1 subscriber msg/s", bare)),
                target: ">= 0.8x bare subscriber",
                pass: at_least(ratio(d.ingest100_obs_per_sec, bare), 0.8),
            },
            Row {
                metric: "ingest, 100% changing: committed events/s",
                value: d.ingest100_events_per_sec,
                unit: "ev/s",
                reference: Some(("raw SQLite rows/s", sql)),
                target: "(info)",
                pass: None,
            },
            Row {
                metric: "backlog production (simulator, sink down)",
                value: d.backlog_production_events_per_sec,
                unit: "ev/s",
                reference: Some(("raw SQLite rows/s", sql)),
                target: "(info)",
                pass: None,
            },
            Row {
                metric: "drain of the backlog after an outage",
                value: d.drain_events_per_sec,
                unit: "ev/s",
                reference: Some(("receiver capacity ev/s", rx)),
                target: ">= 0.4x receiver capacity",
                pass: at_least(ratio(d.drain_events_per_sec, rx), 0.4),
            },
            Row {
                metric: "latency observation->receiver p50",
                value: d.latency_p50_ms,
                unit: "ms",
                reference: None,
                target: "(info)",
                pass: None,
            },
            Row {
                metric: "latency observation->receiver p99",
                value: d.latency_p99_ms,
                unit: "ms",
                reference: None,
                target: "<= 50 ms",
                pass: at_most(d.latency_p99_ms, 50.0),
            },
            Row {
                metric: "latency p99 right after the bursts",
                value: d.after_burst_latency_p99_ms,
                unit: "ms",
                reference: None,
                target: "(info)",
                pass: None,
            },
            Row {
                metric: "peak RSS (VmHWM), 1000 devices, whole run",
                value: d.peak_rss_kib.map(|k| k as f64 * 1024.0 / 1e6),
                unit: "MB",
                reference: None,
                target: "<= 20 MB",
                pass: at_most(d.peak_rss_kib.map(|k| k as f64 * 1024.0), 20e6),
            },
            Row {
                metric: "peak RSS before the bursts (steady 200/s)",
                value: d.steady_peak_rss_kib.map(|k| k as f64 * 1024.0 / 1e6),
                unit: "MB",
                reference: None,
                target: "(info)",
                pass: None,
            },
            Row {
                metric: "bytes written to disk per event @200/s",
                value: d.bytes_written_per_event,
                unit: "B/ev",
                reference: None,
                target: "<= 2 KiB",
                pass: at_most(d.bytes_written_per_event, 2048.0),
            },
            Row {
                metric: "CPU when idle",
                value: d.idle_cpu_pct_of_core,
                unit: "% core",
                reference: None,
                target: "~0 (<= 1%)",
                pass: at_most(d.idle_cpu_pct_of_core, 1.0),
            },
        ]
    }

    /// Prints the table.
    pub fn print(&self) {
        let p = &self.params;
        let r = &self.raw;
        println!();
        println!(
            "hvac-edge pipeline benchmark ({} CPUs{}; ingest {} msgs/case, backlog {} events, latency {} s @ {}/s, idle {} s)",
            p.cpus,
            if p.quick { ", QUICK" } else { "" },
            p.ingest_messages,
            p.backlog_events.map_or_else(
                || format!("{} requested", p.backlog_requested),
                |b| b.to_string()
            ),
            p.latency_secs,
            p.latency_rate_per_sec,
            p.idle_secs
        );
        println!();
        println!("Raw limits of this machine (same run):");
        println!(
            "  (a) bare QoS1 subscriber, same mosquitto   {:>10} msg/s",
            num(r.bare_subscriber_msgs_per_sec)
        );
        println!(
            "      publisher alone, nobody subscribed     {:>10} msg/s  (load generator ceiling)",
            num(r.publisher_alone_msgs_per_sec)
        );
        println!(
            "  (b) SQLite WAL+FULL, 1000-row txns         {:>10} rows/s  (payload {} B)",
            num(r.sqlite_rows_per_sec),
            num(r.sqlite_payload_bytes)
        );
        println!(
            "  (c) receiver, signed 500-event batches     {:>10} ev/s",
            num(r.receiver_events_per_sec)
        );
        println!();
        println!(
            "| {:<44} | {:>10} | {:<6} | {:<28} | {:>10} | {:>6} | {:<26} | {:<4} |",
            "metric", "daemon", "unit", "raw-limit reference", "reference", "ratio", "target", "ok"
        );
        println!(
            "|{}|{}|{}|{}|{}|{}|{}|{}|",
            "-".repeat(46),
            "-".repeat(12),
            "-".repeat(8),
            "-".repeat(30),
            "-".repeat(12),
            "-".repeat(8),
            "-".repeat(28),
            "-".repeat(6)
        );
        for row in self.rows() {
            let (rname, rval) = row.reference.unwrap_or(("-", None));
            let ratio = ratio(row.value, rval).map_or("-".into(), |x| format!("{x:.2}x"));
            let ok = match row.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "",
            };
            println!(
                "| {:<44} | {:>10} | {:<6} | {:<28} | {:>10} | {:>6} | {:<26} | {:<4} |",
                row.metric,
                num(row.value),
                row.unit,
                rname,
                num(rval),
                ratio,
                row.target,
                ok
            );
        }
        let d = &self.daemon;
        println!();
        println!(
            "Notes: bare subscriber runs {:?} msg/s (best is the reference); drain took {} s \
             ({} ev/s first-to-last event); latency max {} ms over {} samples; {} events in the \
             bytes/event window; RSS at the end {} MB; stored event payload {} B.",
            r.bare_subscriber_runs
                .iter()
                .map(|v| v.round() as u64)
                .collect::<Vec<_>>(),
            num(d.drain_secs),
            num(d.drain_first_to_last_events_per_sec),
            num(d.latency_max_ms),
            d.latency_samples.map_or("-".into(), |n| n.to_string()),
            d.commits_window_events
                .map_or("-".into(), |n| n.to_string()),
            num(d.rss_at_end_kib.map(|k| k as f64 * 1024.0 / 1e6)),
            num(d.event_payload_bytes)
        );
        for e in &self.errors {
            println!("ERROR: {e}");
        }
    }

    /// The results as pretty JSON, with the verdicts.
    pub fn to_json(&self) -> anyhow::Result<String> {
        let mut v = serde_json::to_value(self)?;
        let verdicts: serde_json::Map<String, serde_json::Value> = self
            .rows()
            .into_iter()
            .filter(|r| r.pass.is_some())
            .map(|r| (r.metric.to_string(), serde_json::json!(r.pass)))
            .collect();
        if let Some(o) = v.as_object_mut() {
            o.insert("targets_met".into(), serde_json::Value::Object(verdicts));
        }
        Ok(serde_json::to_string_pretty(&v)?)
    }
}
