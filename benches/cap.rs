//! Benchmark of the size cap on a full outbox: how long the writer is busy with it per round and
//! per housekeeping run, and what it does to commit (ack) latency of a steady stream.
//!
//! Run: `cargo bench --bench cap -- [--events N] [--secs S]` (defaults 350,000 events, about
//! 256 MiB; 15 s of 200 observations/s). Builds the database with the real writer (a lagging
//! sink holds every event), then restarts the writer with `store.max_bytes` at 90 % of the file,
//! so every housekeeping run has cap work, and feeds 200 temperature changes/s while measuring
//! the time from send to ack. No network; bounded in count and time.

use hvac_edge::diff::DiffPolicy;
use hvac_edge::model::{Fixed, Observation, Reported, TempUnit, Temperature};
use hvac_edge::sources::{Ack, Envelope};
use hvac_edge::store::writer::{Writer, WriterMsg, WriterSettings, WriterStats};
use hvac_edge::store::{self, Mode, Options, outbox};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

const DEVICES: usize = 1000;

fn settings(max_bytes: u64) -> WriterSettings {
    WriterSettings {
        gateway: "gw-bench".into(),
        default_plant: None,
        devices: Default::default(),
        policy: DiffPolicy::default(),
        batch_max: 256,
        commit_delay: Duration::ZERO,
        snapshot_interval_ms: 86_400_000,
        checkpoint_interval: Duration::from_secs(30),
        sinks: vec!["slow".into()],
        max_bytes,
        max_events: 0,
        max_dead_letters: 100_000,
        max_devices: 10_000,
        clock_source: hvac_edge::config::ClockSource::Trusted,
        reserved: Default::default(),
        device_expiry: Duration::from_secs(30 * 86_400),
    }
}

fn temp(device: usize, k: u64, at: i64) -> Observation {
    Observation {
        device: format!("trv-{device:04}"),
        source: "bench".into(),
        observed_at: at,
        reported: Reported {
            // Steps of 0.5 °C, beyond the deadband: every observation is an event.
            temperature: Some(Temperature {
                value: Fixed(1500 + 50 * i64::try_from(k % 20).unwrap_or(0)),
                unit: TempUnit::C,
            }),
            ..Default::default()
        },
    }
}

struct Running {
    tx: mpsc::Sender<WriterMsg>,
    thread: std::thread::JoinHandle<Result<(), store::Error>>,
    stats: Arc<WriterStats>,
}

fn start(rt: &tokio::runtime::Runtime, path: &Path, s: WriterSettings) -> anyhow::Result<Running> {
    let conn = store::open(path, Mode::ReadWrite, &Options::default())?;
    let (ctx, _crx) = watch::channel(0);
    let stats = Arc::new(WriterStats::default());
    let w = Writer::open(conn, path.to_path_buf(), s, ctx, stats.clone())?;
    let (tx, rx) = mpsc::channel(1024);
    let handle = rt.handle().clone();
    let thread = std::thread::spawn(move || w.run(rx, handle));
    Ok(Running { tx, thread, stats })
}

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` builds and runs benches without `--bench`: nothing to do there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("cap bench: skipped (run it with cargo bench --bench cap)");
        return Ok(());
    }
    let events = arg("--events", 350_000);
    let secs = arg("--secs", 15);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cap.db");
    {
        let c = store::open(&path, Mode::ReadWrite, &Options::default())?;
        outbox::ensure_sink(
            &c,
            &path,
            "slow",
            "http",
            hvac_edge::config::StartFrom::Oldest,
            0,
        )?;
    }
    let t0 = Instant::now();
    let base = hvac_edge::telemetry::now_ms() - 3_600_000;
    let r = start(&rt, &path, settings(0))?;
    for i in 0..events {
        let d = usize::try_from(i).unwrap_or(0) % DEVICES;
        let k = i / DEVICES as u64;
        let env = Envelope {
            obs: temp(d, k, base + i64::try_from(i / 100).unwrap_or(0)),
            ack: None,
            receipt: None,
        };
        r.tx.blocking_send(WriterMsg::Observe(env))
            .map_err(|_| anyhow::anyhow!("writer gone"))?;
    }
    drop(r.tx);
    r.thread
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let file = std::fs::metadata(&path)?.len();
    println!(
        "built: {} events, {:.1} MiB in {:.1} s",
        r.stats.events.load(Ordering::Relaxed),
        file as f64 / 1048576.0,
        t0.elapsed().as_secs_f64()
    );

    let cap = file / 10 * 9;
    let r = start(&rt, &path, settings(cap))?;
    let latencies = Arc::new(Mutex::new(Vec::<u64>::new()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut i = 0u64;
    let every = Duration::from_millis(5);
    let mut next = Instant::now();
    while Instant::now() < deadline {
        let sent = Instant::now();
        let l = latencies.clone();
        let env = Envelope {
            obs: temp(
                usize::try_from(i).unwrap_or(0) % DEVICES,
                i + 7,
                hvac_edge::telemetry::now_ms(),
            ),
            ack: Some(Ack::new(move || {
                let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut v) = l.lock() {
                    v.push(us);
                }
            })),
            receipt: None,
        };
        r.tx.blocking_send(WriterMsg::Observe(env))
            .map_err(|_| anyhow::anyhow!("writer gone"))?;
        if i.is_multiple_of(200) {
            let _ = r.tx.try_send(WriterMsg::Tick);
        }
        i += 1;
        next += every;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    drop(r.tx);
    r.thread
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let mut v = latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    v.sort_unstable();
    let q = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let after = std::fs::metadata(&path)?.len();
    println!(
        "cap at {:.1} MiB (90 % of the file); {} observations at 200/s for {secs} s",
        cap as f64 / 1048576.0,
        v.len()
    );
    println!(
        "ack latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        q(0.5) as f64 / 1000.0,
        q(0.99) as f64 / 1000.0,
        q(1.0) as f64 / 1000.0
    );
    println!(
        "longest cap round {:.1} ms (target <= 100 ms), longest housekeeping run {:.1} ms; evicted {} events; file {:.1} MiB after",
        r.stats.cap_round_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
        r.stats.housekeeping_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
        r.stats.evicted.load(Ordering::Relaxed),
        after as f64 / 1048576.0
    );
    Ok(())
}
