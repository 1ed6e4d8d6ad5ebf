//! Fan-out benchmark: one outbox, several sinks at once. Measures
//!
//! 1. webhook delivery with 1, 4 and 16 `[[sinks.webhook]]` at once (one event per request, each
//!    to its own path of a loopback receiver): per-sink events/s, total requests/s and the
//!    daemon's CPU (utime + stime) per delivered webhook event;
//! 2. the drain rate of a `[[sinks.http]]` (500-event batches) alone, beside a dead webhook (a
//!    closed port) and beside a webhook whose receiver never answers (750 ms timeout); both dead
//!    webhooks retry every second (`retry_schedule_secs = [1]`) so that they keep failing during
//!    the whole drain. Target: no change within noise;
//! 3. `[[sinks.mqtt]]` throughput at QoS 1 (tls = false, `max_inflight` 100) to a private
//!    mosquitto with a QoS 1 subscriber counting, against a bare rumqttc QoS 1 publisher sending
//!    the same messages (same topics, same payloads) with the same in-flight window of 100.
//!    Target: >= 0.8x. Diagnosis rows beside it: a bare publisher in the sink's own pattern
//!    (a batch of 100, then wait for every PUBACK) with and without TCP_NODELAY, a sliding
//!    window with TCP_NODELAY, and the sink and the stop-and-wait publisher against a mosquitto
//!    with `set_tcp_nodelay true` (docs/fleet.md explains what they show).
//!
//! Method: a backlog is produced once per size by the daemon itself (the seeded simulator as
//! fast as it can, one HTTP sink to a closed port so nothing is collected), the daemon stopped,
//! and each run starts the release binary on a copy of that database with only the sinks under
//! test (`from = "oldest"`, no source) and times until every receiver has every event.
//!
//! Run: `nice -n 10 cargo bench --bench fanout -- [--quick]
//! [--backlog N] [--drain-backlog N] [--sinks 1,4,16] [--rounds R] [--only webhooks,dead,mqtt]
//! [--json PATH]` (`CARGO_TARGET_DIR=target-bench` like scripts/bench.sh keeps it off target/).
//! About 6 minutes on 2 cores (`--quick`: about 2). Needs mosquitto (`scripts/bench.sh` installs
//! it). All traffic on 127.0.0.1; every wait is bounded in count and time.

#[allow(dead_code)]
mod support;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::http::{StatusCode, Uri};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use support::daemon::{Daemon, clk_tck};
use support::{Deadline, check};

/// Gateway id of every daemon in this bench.
const GATEWAY: &str = "gw-fanout";
/// Events the seeded simulator (seed 7, 1000 devices) produces per observation (measured:
/// 20,000 observations gave 20,934 events).
const SIM_EVENTS_PER_OBS: f64 = 1.047;
/// In-flight window of the MQTT sink (its default) and of the bare publisher.
const INFLIGHT: u16 = 100;

#[derive(Debug, Clone)]
struct Args {
    quick: bool,
    backlog: u64,
    drain_backlog: u64,
    sinks: Vec<usize>,
    rounds: usize,
    only: Vec<String>,
    json: Option<PathBuf>,
    argv: Vec<String>,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let argv: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        let quick = argv.iter().any(|a| a == "--quick");
        let mut a = Args {
            quick,
            backlog: if quick { 5_000 } else { 20_000 },
            drain_backlog: if quick { 60_000 } else { 300_000 },
            sinks: vec![1, 4, 16],
            rounds: if quick { 1 } else { 2 },
            only: vec![],
            json: None,
            argv: argv.clone(),
        };
        let mut it = argv.into_iter();
        while let Some(arg) = it.next() {
            let mut val = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--quick" => {}
                "--backlog" => a.backlog = val("--backlog")?.parse()?,
                "--drain-backlog" => a.drain_backlog = val("--drain-backlog")?.parse()?,
                "--rounds" => a.rounds = val("--rounds")?.parse::<usize>()?.clamp(1, 5),
                "--sinks" => {
                    a.sinks = val("--sinks")?
                        .split(',')
                        .map(|s| s.trim().parse::<usize>())
                        .collect::<Result<_, _>>()?;
                    if a.sinks.iter().any(|&k| k == 0 || k > 64) {
                        anyhow::bail!("--sinks: each count must be 1..=64");
                    }
                }
                "--only" => {
                    a.only = val("--only")?
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .collect()
                }
                "--json" => a.json = Some(PathBuf::from(val("--json")?)),
                other => anyhow::bail!(
                    "unknown argument {other:?} (expected --quick, --backlog N, --drain-backlog N, \
                     --sinks 1,4,16, --rounds R, --only webhooks,dead,mqtt, --json PATH)"
                ),
            }
        }
        if a.backlog < 100 || a.drain_backlog < 100 {
            anyhow::bail!("backlogs must be at least 100 events");
        }
        Ok(a)
    }

    fn wants(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }
}

fn main() -> std::process::ExitCode {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "the fan-out benchmark runs with `cargo bench --bench fanout`; skipped under cargo test"
        );
        return std::process::ExitCode::SUCCESS;
    }
    let args = match Args::parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot build the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut res = Results {
        load_start: loadavg(),
        ..Results::default()
    };
    rt.block_on(run(&args, &mut res));
    res.load_end = loadavg();
    res.print(&args);
    if let Some(path) = &args.json {
        let written = serde_json::to_string_pretty(&res.json(&args))
            .map_err(anyhow::Error::from)
            .and_then(|j| {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(path, j)?;
                Ok(())
            });
        match written {
            Ok(()) => println!("\nJSON: {}", path.display()),
            Err(e) => eprintln!("error: cannot write {}: {e:#}", path.display()),
        }
    }
    if res.errors.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

fn step(msg: &str) {
    eprintln!(
        "[fanout {}] {msg}",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hvac-edge"))
}

// ---------------------------------------------------------------------------------------------
// Results

#[derive(Debug, Clone, Default)]
struct WebhookFig {
    sinks: usize,
    events: u64,
    secs: f64,
    first_to_last_secs: f64,
    requests: u64,
    duplicates: u64,
    cpu_secs: f64,
    peak_rss_kib: u64,
    slowest_sink_secs: f64,
    fastest_sink_secs: f64,
}

impl WebhookFig {
    fn per_sink_eps(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-6)
    }
    fn total_rps(&self) -> f64 {
        self.requests as f64 / self.secs.max(1e-6)
    }
    fn cpu_us_per_event(&self) -> f64 {
        self.cpu_secs * 1e6 / (self.events * self.sinks as u64).max(1) as f64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Beside {
    Nothing,
    Refused,
    Hung,
}

impl Beside {
    fn label(self) -> &'static str {
        match self {
            Beside::Nothing => "http sink alone",
            Beside::Refused => "http + dead webhook (port closed)",
            Beside::Hung => "http + webhook never answering",
        }
    }
}

#[derive(Debug, Clone)]
struct DrainFig {
    beside: Beside,
    events: u64,
    secs: f64,
    cpu_secs: f64,
    dead_attempts: i64,
    dead_status: String,
}

#[derive(Debug, Clone)]
struct MqttFig {
    daemon: bool,
    /// The bare publisher's way of sending (`None` for the daemon).
    mode: Option<BareMode>,
    /// On the diagnosis broker with `set_tcp_nodelay true`.
    broker_nodelay: bool,
    msgs: u64,
    /// From the daemon's start (or the publisher's first publish) to the last message received.
    secs: f64,
    first_to_last_secs: f64,
    cpu_secs: f64,
}

impl MqttFig {
    fn rate(&self) -> f64 {
        self.msgs as f64 / self.first_to_last_secs.max(1e-6)
    }
}

#[derive(Debug, Default)]
struct Results {
    backlog_events: Option<u64>,
    backlog_production_eps: Option<f64>,
    drain_backlog_events: Option<u64>,
    drain_backlog_production_eps: Option<f64>,
    webhooks: Vec<WebhookFig>,
    drains: Vec<DrainFig>,
    mqtt: Vec<MqttFig>,
    errors: Vec<String>,
    load_start: String,
    load_end: String,
}

fn num(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn best(v: impl Iterator<Item = f64>) -> Option<f64> {
    v.fold(None, |b, x| Some(b.map_or(x, |b: f64| b.max(x))))
}

impl Results {
    fn drain_best(&self, b: Beside) -> Option<f64> {
        best(
            self.drains
                .iter()
                .filter(|d| d.beside == b)
                .map(|d| d.events as f64 / d.secs.max(1e-6)),
        )
    }

    fn drain_runs(&self, b: Beside) -> Vec<u64> {
        self.drains
            .iter()
            .filter(|d| d.beside == b)
            .map(|d| (d.events as f64 / d.secs.max(1e-6)).round() as u64)
            .collect()
    }

    fn mqtt_best(&self, daemon: bool) -> Option<f64> {
        best(
            self.mqtt
                .iter()
                .filter(|m| {
                    m.daemon == daemon
                        && !m.broker_nodelay
                        && (daemon || m.mode == Some(BareMode::WINDOW))
                })
                .map(MqttFig::rate),
        )
    }

    fn print(&self, args: &Args) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!();
        println!(
            "hvac-edge fan-out benchmark: `nice -n 10 cargo bench --bench fanout -- {}`",
            args.argv.join(" ")
        );
        println!(
            "machine: {cpus} CPUs, shared with other builds and tests (load average {} at start, {} at end); \
             noisy: compare ratios within this run, not absolute numbers across runs.",
            self.load_start, self.load_end
        );
        println!(
            "backlogs: {} events for the webhooks ({} ev/s to produce), {} events for the http/mqtt drains ({} ev/s to produce){}",
            self.backlog_events.map_or("-".into(), |v| v.to_string()),
            self.backlog_production_eps.map_or("-".into(), num),
            self.drain_backlog_events
                .map_or("-".into(), |v| v.to_string()),
            self.drain_backlog_production_eps.map_or("-".into(), num),
            if args.quick { "; QUICK sizes" } else { "" }
        );
        println!();
        println!(
            "| {:<68} | {:>10} | {:<8} | {:<26} | {:>10} | {:>6} | {:<16} |",
            "figure", "value", "unit", "reference", "ref value", "ratio", "target"
        );
        println!(
            "|{}|{}|{}|{}|{}|{}|{}|",
            "-".repeat(70),
            "-".repeat(12),
            "-".repeat(10),
            "-".repeat(28),
            "-".repeat(12),
            "-".repeat(8),
            "-".repeat(18)
        );
        let row = |fig: &str, v: f64, unit: &str, rname: &str, rv: Option<f64>, target: &str| {
            let ratio = rv
                .filter(|r| *r > 0.0)
                .map_or("-".into(), |r| format!("{:.2}x", v / r));
            println!(
                "| {:<68} | {:>10} | {:<8} | {:<26} | {:>10} | {:>6} | {:<16} |",
                fig,
                num(v),
                unit,
                rname,
                rv.map_or("-".into(), num),
                ratio,
                target
            );
        };
        let one = self.webhooks.iter().find(|w| w.sinks == 1);
        for w in &self.webhooks {
            let r1 = one.filter(|o| o.sinks != w.sinks);
            row(
                &format!("{} webhook(s): events/s per sink", w.sinks),
                w.per_sink_eps(),
                "ev/s",
                if r1.is_some() {
                    "1 webhook, per sink"
                } else {
                    "-"
                },
                r1.map(WebhookFig::per_sink_eps),
                "(info)",
            );
            row(
                &format!("{} webhook(s): requests/s, all sinks", w.sinks),
                w.total_rps(),
                "req/s",
                if r1.is_some() { "1 webhook" } else { "-" },
                r1.map(WebhookFig::total_rps),
                "(info)",
            );
            row(
                &format!("{} webhook(s): daemon CPU per webhook event", w.sinks),
                w.cpu_us_per_event(),
                "us/ev",
                if r1.is_some() { "1 webhook" } else { "-" },
                r1.map(WebhookFig::cpu_us_per_event),
                "(info)",
            );
        }
        let alone = self.drain_best(Beside::Nothing);
        for b in [Beside::Nothing, Beside::Refused, Beside::Hung] {
            if let Some(v) = self.drain_best(b) {
                let reference = (b != Beside::Nothing).then_some(alone).flatten();
                row(
                    &format!("drain, {} (best)", b.label()),
                    v,
                    "ev/s",
                    if b == Beside::Nothing {
                        "-"
                    } else {
                        "http sink alone"
                    },
                    reference,
                    if b == Beside::Nothing {
                        "(reference)"
                    } else {
                        "~1.0x (noise)"
                    },
                );
            }
        }
        let bare = self.mqtt_best(false);
        if let Some(v) = bare {
            row(
                "bare rumqttc QoS1 publisher, window 100 (best)",
                v,
                "msg/s",
                "-",
                None,
                "(reference)",
            );
        }
        if let Some(v) = self.mqtt_best(true) {
            row(
                "[[sinks.mqtt]] QoS1 drain, max_inflight 100 (best)",
                v,
                "msg/s",
                "bare QoS1 publisher",
                bare,
                ">= 0.8x",
            );
        }
        for m in self
            .mqtt
            .iter()
            .filter(|m| m.broker_nodelay || m.mode.is_some_and(|md| md != BareMode::WINDOW))
        {
            row(
                &format!(
                    "diag: {}{}",
                    m.mode
                        .map_or_else(|| "[[sinks.mqtt]]".to_string(), BareMode::label),
                    if m.broker_nodelay {
                        ", broker nodelay"
                    } else {
                        ""
                    }
                ),
                m.rate(),
                "msg/s",
                "bare QoS1 publisher",
                bare,
                "(diagnosis)",
            );
        }
        println!();
        println!("Notes:");
        for w in &self.webhooks {
            println!(
                "  {} webhook(s): {} events each in {:.2} s from the daemon's start ({:.2} s first-to-last); \
                 sinks finished between {:.2} and {:.2} s; {} requests, {} duplicate events; \
                 daemon CPU {:.2} s; peak RSS {:.1} MiB",
                w.sinks,
                w.events,
                w.secs,
                w.first_to_last_secs,
                w.fastest_sink_secs,
                w.slowest_sink_secs,
                w.requests,
                w.duplicates,
                w.cpu_secs,
                w.peak_rss_kib as f64 / 1024.0
            );
        }
        for b in [Beside::Nothing, Beside::Refused, Beside::Hung] {
            let runs = self.drain_runs(b);
            if runs.is_empty() {
                continue;
            }
            let extra: Vec<String> = self
                .drains
                .iter()
                .filter(|d| d.beside == b)
                .map(|d| {
                    if b == Beside::Nothing {
                        format!("cpu {:.2} s", d.cpu_secs)
                    } else {
                        format!(
                            "cpu {:.2} s, dead webhook {} attempts, {}",
                            d.cpu_secs, d.dead_attempts, d.dead_status
                        )
                    }
                })
                .collect();
            println!(
                "  drain, {}: runs {:?} ev/s ({})",
                b.label(),
                runs,
                extra.join("; ")
            );
        }
        for m in &self.mqtt {
            println!(
                "  mqtt {}{}: {} msgs, {:.0} msg/s first-to-last at the subscriber, {:.2} s from start{}",
                m.mode
                    .map_or_else(|| "daemon sink".to_string(), BareMode::label),
                if m.broker_nodelay {
                    " (broker set_tcp_nodelay true)"
                } else {
                    ""
                },
                m.msgs,
                m.rate(),
                m.secs,
                if m.daemon {
                    format!(", daemon CPU {:.2} s", m.cpu_secs)
                } else {
                    String::new()
                }
            );
        }
        for e in &self.errors {
            println!("ERROR: {e}");
        }
    }

    fn json(&self, args: &Args) -> serde_json::Value {
        serde_json::json!({
            "args": args.argv,
            "quick": args.quick,
            "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "load_start": self.load_start,
            "load_end": self.load_end,
            "backlog_events": self.backlog_events,
            "drain_backlog_events": self.drain_backlog_events,
            "webhooks": self.webhooks.iter().map(|w| serde_json::json!({
                "sinks": w.sinks,
                "events_per_sink": w.events,
                "secs": w.secs,
                "per_sink_events_per_sec": w.per_sink_eps(),
                "total_requests_per_sec": w.total_rps(),
                "cpu_us_per_webhook_event": w.cpu_us_per_event(),
                "duplicates": w.duplicates,
                "peak_rss_kib": w.peak_rss_kib,
            })).collect::<Vec<_>>(),
            "drain": self.drains.iter().map(|d| serde_json::json!({
                "case": d.beside.label(),
                "events": d.events,
                "secs": d.secs,
                "events_per_sec": d.events as f64 / d.secs.max(1e-6),
                "cpu_secs": d.cpu_secs,
                "dead_attempts": d.dead_attempts,
            })).collect::<Vec<_>>(),
            "mqtt": self.mqtt.iter().map(|m| serde_json::json!({
                "daemon": m.daemon,
                "bare_mode": m.mode.map(BareMode::label),
                "broker_tcp_nodelay": m.broker_nodelay,
                "msgs": m.msgs,
                "msgs_per_sec": m.rate(),
                "secs_from_start": m.secs,
                "cpu_secs": m.cpu_secs,
            })).collect::<Vec<_>>(),
            "errors": self.errors,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Run

async fn run(args: &Args, res: &mut Results) {
    hvac_edge::tls::install_crypto_provider();
    if args.wants("webhooks") {
        match prefill(args.backlog).await {
            Ok(b) => {
                res.backlog_events = Some(b.events);
                res.backlog_production_eps = Some(b.production_eps);
                for &k in &args.sinks {
                    step(&format!("webhooks: {k} sink(s), {} events each", b.events));
                    match webhooks_run(&b, k).await {
                        Ok(w) => {
                            step(&format!(
                                "webhooks: {k} sink(s) done in {:.2} s ({:.0} ev/s per sink)",
                                w.secs,
                                w.per_sink_eps()
                            ));
                            res.webhooks.push(w);
                        }
                        Err(e) => res.errors.push(format!("webhooks x{k}: {e:#}")),
                    }
                }
            }
            Err(e) => res.errors.push(format!("backlog: {e:#}")),
        }
    }
    if !(args.wants("dead") || args.wants("mqtt")) {
        return;
    }
    let big = match prefill(args.drain_backlog).await {
        Ok(b) => b,
        Err(e) => {
            res.errors.push(format!("drain backlog: {e:#}"));
            return;
        }
    };
    res.drain_backlog_events = Some(big.events);
    res.drain_backlog_production_eps = Some(big.production_eps);
    if args.wants("dead") {
        for round in 1..=args.rounds {
            for b in [Beside::Nothing, Beside::Refused, Beside::Hung] {
                step(&format!("drain: {}, round {round}", b.label()));
                match drain_run(&big, b).await {
                    Ok(d) => {
                        step(&format!(
                            "drain: {} in {:.2} s ({:.0} ev/s)",
                            b.label(),
                            d.secs,
                            d.events as f64 / d.secs
                        ));
                        res.drains.push(d);
                    }
                    Err(e) => res.errors.push(format!("drain ({}): {e:#}", b.label())),
                }
            }
        }
    }
    if args.wants("mqtt") {
        let broker = match support::broker::Broker::start() {
            Ok(b) => b,
            Err(e) => {
                res.errors.push(format!("broker: {e:#}"));
                return;
            }
        };
        let msgs = match big.messages() {
            Ok(m) => Arc::new(m),
            Err(e) => {
                res.errors.push(format!("reading the backlog: {e:#}"));
                return;
            }
        };
        for round in 1..=args.rounds {
            step(&format!("mqtt: bare publisher, round {round}"));
            match bare_mqtt_run(broker.port, &msgs, round, BareMode::WINDOW).await {
                Ok(m) => res.mqtt.push(m),
                Err(e) => res.errors.push(format!("mqtt bare: {e:#}")),
            }
            step(&format!("mqtt: daemon sink, round {round}"));
            match daemon_mqtt_run(&big, broker.port, round).await {
                Ok(m) => res.mqtt.push(m),
                Err(e) => res.errors.push(format!("mqtt daemon: {e:#}")),
            }
        }
        // Diagnosis of the gap between the two: the sink's pattern (a batch of max_inflight,
        // then wait for every PUBACK) with and without Nagle, on at most 20,000 messages.
        let few = &msgs[..msgs.len().min(20_000)];
        for mode in [
            BareMode {
                batch: Some(usize::from(INFLIGHT)),
                nodelay: false,
            },
            BareMode {
                batch: Some(usize::from(INFLIGHT)),
                nodelay: true,
            },
            BareMode {
                batch: None,
                nodelay: true,
            },
        ] {
            step(&format!("mqtt: {}", mode.label()));
            match bare_mqtt_run(broker.port, few, 0, mode).await {
                Ok(m) => res.mqtt.push(m),
                Err(e) => res.errors.push(format!("mqtt {}: {e:#}", mode.label())),
            }
        }
        drop(broker);
        step("mqtt: daemon sink and stop-and-wait publisher, broker with set_tcp_nodelay true");
        match support::broker::Broker::start_with("set_tcp_nodelay true") {
            Ok(nb) => {
                let mode = BareMode {
                    batch: Some(usize::from(INFLIGHT)),
                    nodelay: false,
                };
                match bare_mqtt_run(nb.port, few, 0, mode).await {
                    Ok(mut m) => {
                        m.broker_nodelay = true;
                        res.mqtt.push(m);
                    }
                    Err(e) => res.errors.push(format!("mqtt nodelay broker, bare: {e:#}")),
                }
                match daemon_mqtt_run(&big, nb.port, 99).await {
                    Ok(mut m) => {
                        m.broker_nodelay = true;
                        res.mqtt.push(m);
                    }
                    Err(e) => res
                        .errors
                        .push(format!("mqtt nodelay broker, daemon: {e:#}")),
                }
            }
            Err(e) => res.errors.push(format!("nodelay broker: {e:#}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Configs and the backlog

/// `[gateway]`, `[store]`, `[pipeline]` and `[log]` of every daemon here.
fn base_config(dir: &Path, level: &str) -> String {
    format!(
        "[gateway]\nid = \"{GATEWAY}\"\n\n\
         [store]\npath = \"{db}\"\nsynchronous = \"full\"\nmax_bytes = 0\n\n\
         [pipeline]\nbatch_max = 256\n\n\
         [log]\nlevel = \"{level}\"\n\n",
        db = dir.join("hvac-edge.db").display()
    )
}

fn webhook_toml(name: &str, url: &str, retry_every_sec: bool) -> String {
    format!(
        "[[sinks.webhook]]\nname = \"{name}\"\nurl = \"{url}\"\nallow_insecure_http = true\nfrom = \"oldest\"\n{}\n",
        if retry_every_sec {
            "retry_schedule_secs = [1]\n"
        } else {
            ""
        }
    )
}

fn write_config(dir: &Path, toml: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join("hvac-edge.toml");
    std::fs::write(&p, toml)?;
    Ok(p)
}

/// A stopped daemon's database full of undelivered events (nothing ever collected).
struct Backlog {
    dir: tempfile::TempDir,
    /// Events other than the gateway's `operational` notes.
    events: u64,
    production_eps: f64,
}

const DB_FILES: [&str; 3] = ["hvac-edge.db", "hvac-edge.db-wal", "hvac-edge.db-shm"];

impl Backlog {
    /// Copies the database into `dst`.
    fn copy_to(&self, dst: &Path) -> anyhow::Result<()> {
        for f in DB_FILES {
            let src = self.dir.path().join(f);
            if src.exists() {
                std::fs::copy(&src, dst.join(f)).with_context(|| format!("copy {f}"))?;
            }
        }
        Ok(())
    }

    /// (topic, payload) of every event, in commit order, as the MQTT sink publishes them.
    fn messages(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let c = rusqlite::Connection::open_with_flags(
            self.dir.path().join("hvac-edge.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        let mut st = c.prepare(
            "SELECT device, type, payload FROM events WHERE type != 'operational' ORDER BY pos",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                format!(
                    "hvac-edge/{GATEWAY}/{}/{}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?
                ),
                r.get::<_, String>(2)?.into_bytes(),
            ))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// Runs the daemon with the simulator as fast as it goes and one HTTP sink to a closed port
/// until about `n` events are committed, then stops it.
async fn prefill(n: u64) -> anyhow::Result<Backlog> {
    step(&format!("backlog: producing ~{n} events (sink down)"));
    let dir = tempfile::Builder::new()
        .prefix("hvac-fanout-backlog-")
        .tempdir()?;
    let dead = support::broker::free_port()?;
    let max_obs = ((n as f64) / SIM_EVENTS_PER_OBS).ceil() as u64;
    let toml = format!(
        "{}[[sources.simulator]]\nname = \"sim\"\ndevices = 1000\nchanges_per_sec = 1000000.0\n\
         max_observations = {max_obs}\nseed = 7\n\n\
         [[sinks.http]]\nname = \"prefill-dead\"\nurl = \"http://127.0.0.1:{dead}/ingest\"\n\
         allow_insecure_http = true\nretry_schedule_secs = [600]\n",
        base_config(dir.path(), "info")
    );
    let cfg = write_config(dir.path(), &toml)?;
    let mut d = Daemon::start(&bin(), &cfg, dir.path())?;
    let t0 = Instant::now();
    let db = support::daemon::Db::open(&mut d, Deadline::after(Duration::from_secs(20)))?;
    let deadline = Deadline::after(Duration::from_secs(60 + n / 2000));
    let mut last = (db.max_pos()?, Instant::now());
    loop {
        d.check_alive()?;
        check(deadline, "the simulator to produce the backlog")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let p = db.max_pos()?;
        if p != last.0 {
            last = (p, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(1000)
            && d.log().contains("Simulator finished")
        {
            break;
        }
    }
    let secs = last.1.duration_since(t0).as_secs_f64();
    drop(db);
    d.stop(Duration::from_secs(20))?;
    let c = rusqlite::Connection::open_with_flags(
        dir.path().join("hvac-edge.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let events: i64 = c.query_row(
        "SELECT COUNT(*) FROM events WHERE type != 'operational'",
        [],
        |r| r.get(0),
    )?;
    drop(c);
    let events = u64::try_from(events)?;
    step(&format!("backlog: {events} events in {secs:.1} s"));
    Ok(Backlog {
        dir,
        events,
        production_eps: events as f64 / secs.max(1e-3),
    })
}

/// A daemon started on a copy of `backlog` with the sinks in `sinks_toml` (no source).
fn start_on_copy(
    backlog: &Backlog,
    prefix: &str,
    sinks_toml: &str,
) -> anyhow::Result<(tempfile::TempDir, Daemon, Instant)> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    backlog.copy_to(dir.path())?;
    let toml = format!("{}{sinks_toml}", base_config(dir.path(), "warn"));
    let cfg = write_config(dir.path(), &toml)?;
    let d = Daemon::start(&bin(), &cfg, dir.path())?;
    Ok((dir, d, Instant::now()))
}

fn cpu_secs(d: &Daemon) -> f64 {
    d.cpu_ticks().map_or(f64::NAN, |t| t as f64 / clk_tck())
}

// ---------------------------------------------------------------------------------------------
// Receivers

/// One sink's view at the receiver.
#[derive(Default)]
struct Counter {
    requests: AtomicU64,
    unique: AtomicU64,
    received: AtomicU64,
    ids: Mutex<HashSet<String>>,
    done_at: OnceLock<Instant>,
}

struct HubState {
    counters: Vec<Counter>,
    target: u64,
    first: OnceLock<Instant>,
}

/// A loopback receiver with one path per sink (`/s/{i}`): answers 200, counts distinct event
/// ids per path (the gateway's own `operational` notes are not counted).
struct Hub {
    addr: std::net::SocketAddr,
    state: Arc<HubState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(serde::Deserialize)]
struct Ev {
    id: String,
    #[serde(rename = "type")]
    kind: String,
}

/// A native webhook body (one envelope) or a batch (`{"gateway":…,"events":[…]}`).
#[derive(serde::Deserialize)]
struct Body {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    events: Option<Vec<Ev>>,
}

impl Hub {
    async fn start(paths: usize, target: u64) -> anyhow::Result<Hub> {
        let state = Arc::new(HubState {
            counters: (0..paths).map(|_| Counter::default()).collect(),
            target,
            first: OnceLock::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let s = state.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, body: Bytes| {
            let s = s.clone();
            async move { handle(&s, &uri, &body) }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Hub { addr, state, task })
    }

    fn url(&self, i: usize) -> String {
        format!("http://{}/s/{i}", self.addr)
    }

    fn counter(&self, i: usize) -> Option<&Counter> {
        self.state.counters.get(i)
    }

    fn all_done(&self) -> bool {
        self.state
            .counters
            .iter()
            .all(|c| c.unique.load(Ordering::Relaxed) >= self.state.target)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn handle(s: &HubState, uri: &Uri, body: &[u8]) -> StatusCode {
    let now = Instant::now();
    let Some(c) = uri
        .path()
        .strip_prefix("/s/")
        .and_then(|i| i.parse::<usize>().ok())
        .and_then(|i| s.counters.get(i))
    else {
        return StatusCode::NOT_FOUND;
    };
    let Ok(b) = serde_json::from_slice::<Body>(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let _ = s.first.set(now);
    c.requests.fetch_add(1, Ordering::Relaxed);
    let mut evs: Vec<Ev> = b.events.unwrap_or_default();
    if let (Some(id), Some(kind)) = (b.id, b.kind) {
        evs.push(Ev { id, kind });
    }
    let Ok(mut ids) = c.ids.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    for e in evs {
        if e.kind == "operational" {
            continue;
        }
        c.received.fetch_add(1, Ordering::Relaxed);
        if ids.insert(e.id) {
            let u = c.unique.fetch_add(1, Ordering::Relaxed) + 1;
            if u == s.target {
                let _ = c.done_at.set(now);
            }
        }
    }
    StatusCode::OK
}

/// A TCP listener that accepts and reads but never answers (connections dropped after 30 s).
struct Hung {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Hung {
    async fn start() -> anyhow::Result<Hung> {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it aborts every held connection.
            let mut held = tokio::task::JoinSet::new();
            for _ in 0..10_000 {
                let Ok((mut sock, _)) = listener.accept().await else {
                    break;
                };
                held.spawn(async move {
                    let until = tokio::time::Instant::now() + Duration::from_secs(30);
                    let mut buf = [0u8; 4096];
                    while let Ok(Ok(n)) = tokio::time::timeout_at(until, sock.read(&mut buf)).await
                    {
                        if n == 0 {
                            break;
                        }
                    }
                });
                while held.try_join_next().is_some() {}
            }
        });
        Ok(Hung { addr, task })
    }
}

impl Drop for Hung {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Figure 1: webhooks

async fn webhooks_run(backlog: &Backlog, k: usize) -> anyhow::Result<WebhookFig> {
    let hub = Hub::start(k, backlog.events).await?;
    let sinks: String = (0..k)
        .map(|i| webhook_toml(&format!("wh{i:02}"), &hub.url(i), false))
        .collect();
    let (_dir, mut d, t0) = start_on_copy(backlog, "hvac-fanout-wh-", &sinks)?;
    let deadline = Deadline::after(Duration::from_secs(60 + (k as u64 * backlog.events) / 400));
    while !hub.all_done() {
        d.check_alive()?;
        if deadline.passed() {
            let got: Vec<u64> = (0..k)
                .filter_map(|i| hub.counter(i))
                .map(|c| c.unique.load(Ordering::Relaxed))
                .collect();
            anyhow::bail!(
                "timed out: receivers have {got:?} of {} events",
                backlog.events
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = Instant::now();
    let cpu = cpu_secs(&d);
    let hwm = d.vm_hwm_kib().unwrap_or(0);
    d.stop(Duration::from_secs(20))?;
    let mut requests = 0;
    let mut dups = 0;
    let mut done = Vec::new();
    for i in 0..k {
        if let Some(c) = hub.counter(i) {
            requests += c.requests.load(Ordering::Relaxed);
            dups += c.received.load(Ordering::Relaxed) - c.unique.load(Ordering::Relaxed);
            if let Some(t) = c.done_at.get() {
                done.push(t.duration_since(t0).as_secs_f64());
            }
        }
    }
    let first = hub.state.first.get().copied().unwrap_or(t0);
    Ok(WebhookFig {
        sinks: k,
        events: backlog.events,
        secs: end.duration_since(t0).as_secs_f64(),
        first_to_last_secs: end.duration_since(first).as_secs_f64(),
        requests,
        duplicates: dups,
        cpu_secs: cpu,
        peak_rss_kib: hwm,
        slowest_sink_secs: done.iter().copied().fold(0.0, f64::max),
        fastest_sink_secs: done.iter().copied().fold(f64::INFINITY, f64::min),
    })
}

// ---------------------------------------------------------------------------------------------
// Figure 2: HTTP drain beside a dead webhook

async fn drain_run(backlog: &Backlog, beside: Beside) -> anyhow::Result<DrainFig> {
    let hub = Hub::start(1, backlog.events).await?;
    let hung = if beside == Beside::Hung {
        Some(Hung::start().await?)
    } else {
        None
    };
    let mut sinks = format!(
        "[[sinks.http]]\nname = \"upstream\"\nurl = \"{}\"\nallow_insecure_http = true\n\
         batch_max_events = 500\nfrom = \"oldest\"\n\n",
        hub.url(0)
    );
    match beside {
        Beside::Nothing => {}
        Beside::Refused => {
            let port = support::broker::free_port()?;
            sinks.push_str(&webhook_toml(
                "dead",
                &format!("http://127.0.0.1:{port}/hook"),
                true,
            ));
        }
        Beside::Hung => {
            let addr = hung.as_ref().map(|h| h.addr).context("hung receiver")?;
            sinks.push_str(&webhook_toml("dead", &format!("http://{addr}/hook"), true));
        }
    }
    let (dir, mut d, t0) = start_on_copy(backlog, "hvac-fanout-drain-", &sinks)?;
    let deadline = Deadline::after(Duration::from_secs(60 + backlog.events / 2000));
    while !hub.all_done() {
        d.check_alive()?;
        check(deadline, "the receiver to get the whole backlog")?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = hub
        .counter(0)
        .and_then(|c| c.done_at.get().copied())
        .unwrap_or_else(Instant::now);
    let cpu = cpu_secs(&d);
    d.stop(Duration::from_secs(20))?;
    drop(hung);
    let (dead_attempts, dead_status) = if beside == Beside::Nothing {
        (0, String::new())
    } else {
        let c = rusqlite::Connection::open_with_flags(
            dir.path().join("hvac-edge.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        c.query_row(
            "SELECT attempts, status || ' / ' || COALESCE(last_error, '') FROM sinks WHERE name = 'dead'",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )
        .unwrap_or((-1, "no row".into()))
    };
    Ok(DrainFig {
        beside,
        events: backlog.events,
        secs: end.duration_since(t0).as_secs_f64(),
        cpu_secs: cpu,
        dead_attempts,
        dead_status: dead_status.chars().take(80).collect(),
    })
}

// ---------------------------------------------------------------------------------------------
// Figure 3: MQTT upstream vs a bare publisher

/// What the counting subscriber saw.
struct SubSeen {
    got: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// A QoS 1 subscriber on `hvac-edge/#` on its own thread and runtime, counting event messages
/// (four topic levels, not `operational`) until `expected` arrived or the deadline passed.
/// Returns once subscribed; join the handle for the counts.
async fn counting_subscriber(
    port: u16,
    expected: u64,
    deadline: Deadline,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<SubSeen>>> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let h = std::thread::Builder::new()
        .name("fanout-sub".into())
        .spawn(move || -> anyhow::Result<SubSeen> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut o = MqttOptions::new(
                    format!("fanout-sub-{}", fastrand::u32(..)),
                    "127.0.0.1",
                    port,
                );
                o.set_keep_alive(Duration::from_secs(30))
                    .set_clean_session(true)
                    .set_max_packet_size(1024 * 1024, 1024 * 1024);
                let (client, mut el) = AsyncClient::new(o, 64);
                client.subscribe("hvac-edge/#", QoS::AtLeastOnce).await?;
                let mut ready = Some(ready_tx);
                let mut seen = SubSeen {
                    got: 0,
                    first: None,
                    last: None,
                };
                while seen.got < expected {
                    match tokio::time::timeout_at(deadline.tokio(), el.poll()).await {
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(Ok(()));
                            }
                        }
                        Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                            let levels = p.topic.split('/').count();
                            if levels == 4 && !p.topic.ends_with("/operational") {
                                let now = Instant::now();
                                seen.first.get_or_insert(now);
                                seen.last = Some(now);
                                seen.got += 1;
                            }
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(Err(e.to_string()));
                            }
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let _ = client.try_disconnect();
                Ok(seen)
            })
        })?;
    match tokio::time::timeout_at(deadline.tokio(), ready_rx).await {
        Ok(Ok(Ok(()))) => Ok(h),
        Ok(Ok(Err(e))) => anyhow::bail!("subscriber: {e}"),
        _ => anyhow::bail!("subscriber: not subscribed in time"),
    }
}

async fn join_sub(h: std::thread::JoinHandle<anyhow::Result<SubSeen>>) -> anyhow::Result<SubSeen> {
    tokio::task::spawn_blocking(move || h.join())
        .await?
        .map_err(|_| anyhow::anyhow!("subscriber thread panicked"))?
}

/// How the bare publisher sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BareMode {
    /// `Some(b)`: batches of `b`, each waiting for all its PUBACKs before the next (the MQTT
    /// sink's pattern); `None`: a sliding window of [`INFLIGHT`].
    batch: Option<usize>,
    /// TCP_NODELAY on the publisher's socket (rumqttc's default, and the sink's, is off).
    nodelay: bool,
}

impl BareMode {
    const WINDOW: BareMode = BareMode {
        batch: None,
        nodelay: false,
    };

    fn label(self) -> String {
        format!(
            "bare publisher, {}{}",
            match self.batch {
                None => format!("sliding window {INFLIGHT}"),
                Some(b) => format!("stop-and-wait batches of {b}"),
            },
            if self.nodelay { ", TCP_NODELAY" } else { "" }
        )
    }
}

/// Publishes every message at QoS 1 on one connection (persistent session like the sink's,
/// in-flight window [`INFLIGHT`]) as fast as `mode` allows and waits for every PUBACK.
async fn bare_mqtt_run(
    port: u16,
    msgs: &[(String, Vec<u8>)],
    round: usize,
    mode: BareMode,
) -> anyhow::Result<MqttFig> {
    let n = msgs.len() as u64;
    let deadline = Deadline::after(Duration::from_secs(60 + n / 1000));
    let sub = counting_subscriber(port, n, deadline).await?;
    let mut o = MqttOptions::new(
        format!("fanout-bare-{round}-{}", fastrand::u32(..)),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_inflight(INFLIGHT)
        .set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, mut el) = AsyncClient::new(o, usize::from(INFLIGHT) + 16);
    let mut net = el.network_options();
    net.set_tcp_nodelay(mode.nodelay);
    el.set_network_options(net);
    let (acks_tx, mut acks) = tokio::sync::watch::channel(0u64);
    let connected = Arc::new(AtomicBool::new(false));
    let c2 = connected.clone();
    let poller = tokio::spawn(async move {
        let mut acked = 0u64;
        while acked < n {
            match tokio::time::timeout_at(deadline.tokio(), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => c2.store(true, Ordering::SeqCst),
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                    acked += 1;
                    let _ = acks_tx.send(acked);
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        (acked, el)
    });
    while !connected.load(Ordering::SeqCst) {
        check(deadline, "the bare publisher to connect")?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let mut sent = 0u64;
    for (topic, payload) in msgs {
        if deadline.passed() {
            break;
        }
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .context("publish")?;
        sent += 1;
        if let Some(b) = mode.batch
            && (sent.is_multiple_of(b as u64) || sent == n)
        {
            let _ = tokio::time::timeout_at(deadline.tokio(), acks.wait_for(|&a| a >= sent)).await;
        }
    }
    let (acked, mut el) = poller.await.context("publisher event loop panicked")?;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(300), el.poll()).await;
    let seen = join_sub(sub).await?;
    if acked < n || seen.got < n {
        anyhow::bail!(
            "bare publisher: {acked} of {n} acknowledged, subscriber got {}",
            seen.got
        );
    }
    let (first, last) = (seen.first.unwrap_or(t0), seen.last.unwrap_or(t0));
    Ok(MqttFig {
        daemon: false,
        mode: Some(mode),
        broker_nodelay: false,
        msgs: n,
        secs: last.duration_since(t0).as_secs_f64(),
        first_to_last_secs: last.duration_since(first).as_secs_f64(),
        cpu_secs: f64::NAN,
    })
}

async fn daemon_mqtt_run(backlog: &Backlog, port: u16, round: usize) -> anyhow::Result<MqttFig> {
    let n = backlog.events;
    let deadline = Deadline::after(Duration::from_secs(60 + n / 1000));
    let sub = counting_subscriber(port, n, deadline).await?;
    let sinks = format!(
        "[[sinks.mqtt]]\nname = \"upstream\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = false\n\
         client_id = \"fanout-daemon-{round}\"\nmax_inflight = {INFLIGHT}\nfrom = \"oldest\"\n"
    );
    let (_dir, mut d, t0) = start_on_copy(backlog, "hvac-fanout-mqtt-", &sinks)?;
    while !sub.is_finished() {
        d.check_alive()?;
        check(deadline, "the subscriber to get the whole backlog")?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = cpu_secs(&d);
    let seen = join_sub(sub).await?;
    d.stop(Duration::from_secs(20))?;
    if seen.got < n {
        anyhow::bail!("subscriber got {} of {n} messages", seen.got);
    }
    let (first, last) = (seen.first.unwrap_or(t0), seen.last.unwrap_or(t0));
    Ok(MqttFig {
        daemon: true,
        mode: None,
        broker_nodelay: false,
        msgs: n,
        secs: last.duration_since(t0).as_secs_f64(),
        first_to_last_secs: last.duration_since(first).as_secs_f64(),
        cpu_secs: cpu,
    })
}
