//! Benchmark of the serial sources (issue 3 figures):
//! 1. OTGW: frames decoded per second by the parser + decoder over a recorded-style byte
//!    stream (split into 64-byte reads like a serial port delivers them), against the most a
//!    9600-baud line can carry;
//! 2. JSON lines: lines mapped per second;
//! 3. Modbus RTU: CPU of the real daemon binary polling 16 units every second over a socat pty
//!    pair with a real pymodbus slave, and the time from a register change on the slave to the
//!    committed event in SQLite.
//!
//! Run: `scripts/bench-serial.sh [--quick]`. Needs socat and `.venv` with pymodbus (created by
//! scripts/test.sh). Loopback/pty only; every loop is bounded in count and time.

use hvac_edge::model::Mode;
use hvac_edge::sources::otgw::{Decoder, Line, LineBuffer, parse_line};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WORKED_EXAMPLE: &str = "T00000300\r\nBC000030A\r\nT90012D80\r\nB50012D80\r\nT90101480\r\nB50101480\r\nT901813FB\r\nB501813FB\r\nT00110000\r\nBC0112580\r\nTT: 21.50\r\nT00090000\r\nBF0090000\r\nAC0091580\r\nT80640000\r\nB70640000\r\nA40640303\r\nError 04\r\nE901813FA\r\nT10101580\r\n";

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs benches as tests with no `--bench`: do nothing then.
    if !argv.iter().any(|a| a == "--bench") {
        return;
    }
    let quick = argv.iter().any(|a| a == "--quick");
    if let Err(e) = run(quick) {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn run(quick: bool) -> anyhow::Result<()> {
    otgw_parser(if quick { 20_000 } else { 200_000 });
    jsonl_mapper(if quick { 20_000 } else { 200_000 })?;
    modbus(if quick { 10 } else { 30 }, if quick { 8 } else { 20 })?;
    Ok(())
}

fn otgw_parser(repeats: usize) {
    let stream = WORKED_EXAMPLE.repeat(repeats).into_bytes();
    let lines_total = 20 * repeats;
    let mut best = f64::MAX;
    let mut frames = 0u64;
    for _ in 0..3 {
        let t = Instant::now();
        let mut buf = LineBuffer::default();
        let mut d = Decoder::new(Mode::Automatic, Mode::Manual, Mode::Manual);
        frames = 0;
        let mut fields = 0u64;
        for chunk in stream.chunks(64) {
            for line in buf.push(chunk) {
                if let Ok(l) = line
                    && let Ok(Line::Frame(f)) = parse_line(&l)
                {
                    frames += 1;
                    fields += d.frame(f).reported.len() as u64;
                }
            }
        }
        std::hint::black_box(fields);
        best = best.min(t.elapsed().as_secs_f64());
    }
    // 9600 baud 8N1 = 960 bytes/s; a frame line is 11 bytes: at most ~87 lines/s.
    let line_max = 960.0 / 11.0;
    let fps = frames as f64 / best;
    println!(
        "otgw parser: {lines_total} lines ({frames} frames, {:.1} MB) in {:.3} s (best of 3): {:.0} frames/s, {:.0} lines/s = {:.0}x a saturated 9600-baud line (~{line_max:.0} lines/s)",
        stream.len() as f64 / 1e6,
        best,
        fps,
        lines_total as f64 / best,
        (lines_total as f64 / best) / line_max
    );
}

fn jsonl_mapper(n: usize) -> anyhow::Result<()> {
    use hvac_edge::sources::payload::{Mapping, MappingSpec};
    let spec = MappingSpec {
        device: "/id".into(),
        availability_topic: None,
        unit: hvac_edge::model::TempUnit::C,
        fields: [
            ("setpoint", "/sp"),
            ("temperature", "/t"),
            ("humidity", "/h"),
            ("load_state", "/relay"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect(),
        values: Default::default(),
    };
    let m = Mapping::compile(&spec).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let lines: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"id":"room-{}","sp":{}.5,"t":{}.25,"h":{},"relay":{}}}"#,
                i % 50,
                18 + i % 5,
                17 + i % 7,
                40 + i % 20,
                i % 2 == 0
            )
        })
        .collect();
    let t = Instant::now();
    let mut ok = 0u64;
    for i in 0..n {
        if m.map("", lines[i % lines.len()].as_bytes()).is_ok() {
            ok += 1;
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "jsonl mapper: {ok} of {n} lines mapped in {s:.3} s: {:.0} lines/s",
        n as f64 / s
    );
    Ok(())
}

struct Guard(Vec<Child>);
impl Drop for Guard {
    fn drop(&mut self) {
        // Newest first: the daemon before the slave before socat (no "port lost" noise at the end).
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// utime + stime of `pid` in seconds.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("bad stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz.max(1.0))
}

fn wait_path(p: &Path, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while !p.exists() {
        if Instant::now() > end {
            anyhow::bail!("{} did not appear", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn max_pos(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("SELECT coalesce(max(pos), 0) FROM events", [], |r| r.get(0)))
        .unwrap_or(0)
}

fn modbus(cpu_secs_window: u64, samples: usize) -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        anyhow::bail!(
            "{} missing: run scripts/test.sh first (it creates the venv with pymodbus)",
            python.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let dev = dir.path().join("rs485.dev");
    let test = dir.path().join("rs485.test");
    let mut guard = Guard(Vec::new());
    guard.0.push(
        Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", dev.display()))
            .arg(format!("pty,raw,echo=0,link={}", test.display()))
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_path(&dev, Duration::from_secs(10))?;
    wait_path(&test, Duration::from_secs(10))?;
    let mut slave = Command::new(&python)
        .arg(root.join("tests/support/modbus_slave.py"))
        .args(["--port", &test.display().to_string(), "--units", "1-16"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = slave.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
    let mut stdout = BufReader::new(
        slave
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdout"))?,
    );
    let slave_pid = slave.id();
    guard.0.push(slave);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "ready" {
        anyhow::bail!("slave did not start: {line:?}");
    }
    let mut cmd = |c: &str| -> anyhow::Result<Instant> {
        writeln!(stdin, "{c}")?;
        stdin.flush()?;
        let mut l = String::new();
        stdout.read_line(&mut l)?;
        if !l.starts_with("ok") {
            anyhow::bail!("slave: {c} -> {l}");
        }
        Ok(Instant::now())
    };
    for u in 1..=16 {
        cmd(&format!("set {u} hr 106 1"))?;
        cmd(&format!("set {u} ir 1000 1"))?;
        cmd(&format!("set {u} ir 1002 1075 1100 0 0"))?;
    }
    let db = dir.path().join("bench.db");
    let mut units = String::new();
    for u in 1..=16 {
        units.push_str(&format!(
            "[[sources.modbus.units]]\nunit_id = {u}\ndevice = \"fcu-{u:02}\"\nmap = \"siemens-rdf302\"\n"
        ));
    }
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"bench\"\n[store]\npath = \"{}\"\n[log]\nlevel = \"warn\"\n[[sources.modbus]]\nname = \"fcu\"\nport = \"{}\"\npoll_interval_ms = 1000\nrequest_timeout_ms = 300\n{units}",
            db.display(),
            dev.display()
        ),
    )?;
    let daemon = Command::new(env!("CARGO_BIN_EXE_hvac-edge"))
        .args(["run", "--allow-root", "-c", &config.display().to_string()])
        .stdout(Stdio::null())
        .spawn()?;
    let pid = daemon.id();
    guard.0.push(daemon);
    // Wait for the 16 first-sight snapshots, then measure CPU over the window.
    let end = Instant::now() + Duration::from_secs(30);
    while max_pos(&db) < 16 {
        if Instant::now() > end {
            anyhow::bail!("the daemon did not commit the 16 units' snapshots within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (c0, s0, t0) = (cpu_secs(pid)?, cpu_secs(slave_pid)?, Instant::now());
    std::thread::sleep(Duration::from_secs(cpu_secs_window));
    let wall = t0.elapsed().as_secs_f64();
    let (c1, s1) = (cpu_secs(pid)?, cpu_secs(slave_pid)?);
    println!(
        "modbus: daemon polling 16 units (3 read requests each: 48 requests/s) for {wall:.1} s: {:.2} % of one core ({:.3} s CPU); the pymodbus slave used {:.1} %",
        100.0 * (c1 - c0) / wall,
        c1 - c0,
        100.0 * (s1 - s0) / wall
    );
    // Latency: a setpoint change on one unit → the committed event (max(pos) grows; nothing
    // else changes meanwhile). Changes land at random phases of the 1 s poll cycle.
    let mut lat = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..samples {
        std::thread::sleep(Duration::from_millis(rng.u64(100..1100)));
        let before = max_pos(&db);
        let unit = 1 + i % 16;
        let value = 1100 + 50 * (1 + (i as u32 % 5));
        let sent = Instant::now();
        let acked = cmd(&format!("set {unit} ir 1003 {value}"))?;
        let t_change = sent + (acked - sent) / 2;
        let end = Instant::now() + Duration::from_secs(10);
        while max_pos(&db) <= before {
            if Instant::now() > end {
                anyhow::bail!("no event within 10 s for sample {i}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        lat.push(t_change.elapsed().as_secs_f64() * 1000.0);
        // Put it back so the next sample on this unit is a change again.
        cmd(&format!("set {unit} ir 1003 1100"))?;
        let end = Instant::now() + Duration::from_secs(10);
        let b2 = max_pos(&db);
        while max_pos(&db) <= b2 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    println!(
        "modbus: register change -> committed event, poll interval 1000 ms, {} samples: min {:.0} ms, p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms (bounded by the poll interval + the unit's read round trips + the commit)",
        lat.len(),
        q(0.0),
        q(0.5),
        q(0.95),
        q(1.0)
    );
    Ok(())
}
