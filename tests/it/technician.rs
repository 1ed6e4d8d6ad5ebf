//! The technician's read-only commands on a database written by the real daemon (`hvac-edge run`
//! fed by a real mosquitto): `status`, `devices [DEVICE]`, `queue list|show|tail|export`.
//!
//! `--json` is checked row by row against the daemon's SQLite file; tables against plain files
//! in `tests/screens/` (times, ids and ages normalised; `UPDATE_SCREENS=1` rewrites them); the
//! sparkline in a real terminal: the command runs in a `tmux` pane (Debian package `tmux`) and
//! the captured screen is compared with `tests/screens/device-sparkline.txt`.
//! `a_million_events_bench` (ignored) builds a 1,000,000-event / 1,000-device outbox with the
//! simulator and times the commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::harness::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hvac-edge");

fn hvac_edge(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command that must exit `code`; returns its stdout.
#[track_caller]
fn run_ok(args: &[&str], code: i32) -> String {
    let out = hvac_edge(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "hvac-edge {}: stderr {}\nstdout {}",
        args.join(" "),
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

#[track_caller]
fn json(args: &[&str], code: i32) -> Value {
    let s = run_ok(args, code);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// Replaces what changes from run to run by fixed tokens: RFC 3339 times, UUIDs, ages before
/// ` ago` (`800ms`, `5s`, `1m05s`, `2h03m`, `1d02h`), then runs of blanks by two blanks
/// (alignment is checked by the unit tests of `cli::render`, with fixed data) and drops
/// trailing blank lines (an empty terminal).
pub fn normalise(s: &str) -> String {
    fn is_time(w: &[char]) -> bool {
        let p = "dddd-dd-ddTdd:dd:dd.dddZ";
        w.len() == p.len()
            && p.chars().zip(w).all(|(p, c)| {
                if p == 'd' {
                    c.is_ascii_digit()
                } else {
                    p == *c
                }
            })
    }
    fn is_uuid(w: &[char]) -> bool {
        w.len() == 36
            && w.iter().enumerate().all(|(i, c)| {
                if [8, 13, 18, 23].contains(&i) {
                    *c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            })
    }
    fn is_age(w: &str) -> bool {
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if let Some(n) = w.strip_suffix("ms") {
            return digits(n);
        }
        for (a, b) in [('m', 's'), ('h', 'm'), ('d', 'h')] {
            if let Some(rest) = w.strip_suffix(b)
                && let Some((n, m)) = rest.split_once(a)
            {
                return digits(n) && m.len() == 2 && digits(m);
            }
        }
        w.strip_suffix('s').is_some_and(digits)
    }
    let mut out = String::new();
    for line in s.lines() {
        let chars: Vec<char> = line.chars().collect();
        let mut l = String::new();
        let mut i = 0;
        while i < chars.len() {
            if i + 24 <= chars.len() && is_time(&chars[i..i + 24]) {
                l.push_str("<time>");
                i += 24;
                continue;
            }
            if i + 36 <= chars.len() && is_uuid(&chars[i..i + 36]) {
                l.push_str("<uuid>");
                i += 36;
                continue;
            }
            let boundary = i == 0 || !chars[i - 1].is_alphanumeric();
            if boundary && chars[i].is_ascii_digit() {
                let mut j = i;
                while j < chars.len() && chars[j].is_ascii_alphanumeric() {
                    j += 1;
                }
                let w: String = chars[i..j].iter().collect();
                let ago = chars[j..].iter().take(4).collect::<String>() == " ago";
                if ago && is_age(&w) {
                    l.push_str("<t>");
                    i = j;
                    continue;
                }
            }
            l.push(chars[i]);
            i += 1;
        }
        let mut collapsed = String::new();
        let mut blanks = 0;
        for c in l.trim_end().chars() {
            if c == ' ' {
                blanks += 1;
                continue;
            }
            if blanks > 0 {
                collapsed.push_str(if blanks > 1 { "  " } else { " " });
                blanks = 0;
            }
            collapsed.push(c);
        }
        out.push_str(&collapsed);
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

/// Compares `actual` (normalised) with `tests/screens/<name>`; `UPDATE_SCREENS=1` writes it.
#[track_caller]
fn assert_screen(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/screens")
        .join(name);
    let actual = normalise(actual);
    if std::env::var_os("UPDATE_SCREENS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SCREENS=1 writes it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "screen {name} differs from {}:\n{actual}",
        path.display()
    );
}

/// A Zigbee2MQTT thermostat message.
fn trv(setpoint: f64, temperature: f64, running: &str) -> String {
    format!(
        r#"{{"occupied_heating_setpoint":{setpoint},"local_temperature":{temperature},"system_mode":"heat","running_state":"{running}","humidity":48}}"#
    )
}

struct Site {
    sb: Sandbox,
    _broker: Mosquitto,
    receiver: Receiver,
    tc: TestConfig,
    config: PathBuf,
    daemon: DaemonProcess,
    publisher: Publisher,
}

impl Site {
    /// The real binary with a Zigbee2MQTT source, a working sink `portal` and a sink
    /// `upstream` whose receiver is gone (everything stays pending for it, with failures).
    async fn start(test: &str) -> Site {
        let sb = Sandbox::new(test);
        let broker = Mosquitto::start();
        let receiver = Receiver::start([]).await;
        let mut gone = Receiver::start([]).await;
        let mut tc = TestConfig::new(&sb);
        tc.z2m_source("z2m", broker.port())
            .http_sink("portal", &receiver)
            .http_sink("upstream", &gone)
            .sink_set("upstream", "retry_schedule_secs", "[3600]")
            .set("pipeline", "checkpoint_interval_secs", "1");
        gone.stop().await;
        let config = tc.write("hvac-edge.toml");
        let daemon = DaemonProcess::spawn(&config, sb.path(), &[]);
        broker
            .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
            .await;
        let publisher = Publisher::connect(broker.port()).await;
        Site {
            sb,
            _broker: broker,
            receiver,
            tc,
            config,
            daemon,
            publisher,
        }
    }

    fn db(&self) -> PathBuf {
        self.tc.db_path()
    }

    fn c(&self) -> &str {
        self.config.to_str().unwrap()
    }

    async fn publish(&mut self, device: &str, payload: &str) {
        let topic = format!("{}/{device}", self.tc.base_topic());
        self.publisher.publish(&topic, payload, false).await;
    }

    async fn online(&mut self, device: &str) {
        let topic = format!("{}/{device}/availability", self.tc.base_topic());
        self.publisher.publish(&topic, "online", false).await;
    }

    /// Waits until `n` events are stored and delivered to `portal`.
    async fn wait_events(&self, n: usize) {
        let db = self.db();
        wait_until_async(&format!("{n} events stored"), TIMEOUT, || {
            Db::migrated(&db) && Db::open(&db).count("SELECT COUNT(*) FROM events") as usize >= n
        })
        .await;
        self.receiver.wait_unique_events(n, TIMEOUT).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_reads_the_real_daemons_outbox_exactly() {
    let mut site = Site::start("tech_commands").await;
    site.online("living-room").await;
    site.online("kitchen").await;
    site.publish("living-room", &trv(21.0, 17.5, "heat")).await;
    site.publish("kitchen", &trv(19.0, 19.5, "idle")).await;
    site.publish("living-room", &trv(21.0, 18.0, "heat")).await;
    site.publish("living-room", &trv(21.0, 18.5, "heat")).await;
    site.publish("kitchen", &trv(20.0, 19.5, "heat")).await;
    // Each device: a snapshot at its first sight (availability), one event per field of its
    // first message (function, mode, setpoint, load, temperature, humidity); then living-room
    // two temperatures, kitchen a setpoint and its load.
    site.wait_events(18).await;
    let c = site.c().to_string();
    let db = Db::open(&site.db());
    let rows = db.events();
    assert_eq!(rows.len(), 18, "{rows:?}");
    // The daemon has stored its source status and checkpointed its devices.
    let dbp = site.db();
    wait_until_async(
        "the checkpoint, the source status and the saved cursors",
        TIMEOUT,
        || {
            let d = Db::open(&dbp);
            d.count("SELECT COUNT(*) FROM devices") == 2
            && d.count(r#"SELECT COUNT(*) FROM source_status WHERE status LIKE '%"link":"connected"%'"#) == 1
            && d.count("SELECT cursor FROM sinks WHERE name = 'portal'") == 18
            && d.count(
                "SELECT COUNT(*) FROM sinks WHERE name = 'upstream' AND consecutive_failures > 0",
            ) == 1
        },
    )
    .await;

    // status --json: the running daemon, its sinks and devices, exactly.
    let v = json(&["status", "-c", &c, "--json"], 1);
    assert_eq!(v["daemon"]["running"], true, "{v}");
    assert_eq!(
        v["daemon"]["pid"].as_u64(),
        Some(u64::from(site.daemon.pid())),
        "{v}"
    );
    assert!(v["daemon"]["uptime_ms"].as_i64().unwrap() > 0, "{v}");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["clock"]["source"], "trusted", "from the config: {v}");
    assert_eq!(v["clock"]["synced"], true, "{v}");
    assert_eq!(v["clock"]["newest_event"], "synced", "{v}");
    assert_eq!(v["devices"]["total"], 2, "{v}");
    assert_eq!(v["devices"]["online"], 2, "{v}");
    assert_eq!(v["sources"][0]["name"], "z2m", "{v}");
    assert_eq!(v["sources"][0]["link"], "connected", "{v}");
    let sink = |name: &str| {
        v["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no sink {name}: {v}"))
            .clone()
    };
    let (portal, upstream) = (sink("portal"), sink("upstream"));
    assert_eq!(portal["pending"], 0, "{v}");
    assert_eq!(portal["pending_exact"], true, "{v}");
    assert_eq!(upstream["pending"], 18, "{v}");
    assert_eq!(upstream["pending_exact"], true, "{v}");
    assert!(upstream["oldest_pending_age_ms"].as_i64().is_some(), "{v}");
    assert!(
        upstream["consecutive_failures"].as_i64().unwrap() >= 1,
        "{v}"
    );
    assert_eq!(v["storage"]["events_stored"], 18, "{v}");
    assert_eq!(v["storage"]["last_pos"], 18, "{v}");
    assert!(v["storage"]["disk_free_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["storage"]["db_bytes"].as_u64().unwrap() > 0, "{v}");
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), 1, "only the failing sink: {v}");
    assert!(problems[0].starts_with("sink upstream is failing"), "{v}");
    assert_eq!(v["recent_errors"][0]["name"], "upstream", "{v}");
    assert!(
        v["recent_errors"][0]["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("connect"),
        "{v}"
    );
    let table = run_ok(&["status", "-c", &c], 1);
    assert!(table.contains("daemon    running (pid "), "{table}");
    assert!(
        !table.contains('\u{1b}'),
        "no colour when not a terminal: {table}"
    );
    assert!(table.contains("1 problem(s):"), "{table}");

    // devices --json: each device's state and seq as the database has them.
    let d = json(&["devices", "-c", &c, "--json"], 0);
    let list = d.as_array().unwrap();
    assert_eq!(
        list.iter()
            .map(|x| x["device"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["kitchen", "living-room"]
    );
    for x in list {
        let name = x["device"].as_str().unwrap();
        let seq = rows
            .iter()
            .filter(|r| r.device == name)
            .map(|r| r.seq)
            .max();
        assert_eq!(x["seq"].as_i64(), seq, "{x}");
        assert_eq!(x["source"], "z2m", "the only source open to any id: {x}");
        let newest = rows.iter().rev().find(|r| r.device == name).unwrap();
        let ev: Value = serde_json::from_str(&newest.payload).unwrap();
        assert_eq!(x["state"], ev["state"], "the state after its newest event");
        assert_eq!(x["dead_letters"], 0);
    }
    assert_eq!(list[1]["state"]["temperature"]["value"], "18.5");
    assert_eq!(list[0]["state"]["setpoint"]["value"], "20.0");
    assert_screen("devices.txt", &run_ok(&["devices", "-c", &c], 0));

    // devices DEVICE --json: 48 buckets, the last one holds the newest state; recent events
    // are the device's events, newest first.
    let one = json(&["devices", "living-room", "-c", &c, "--json"], 0);
    let temps = one["history"]["temperature"].as_array().unwrap();
    assert_eq!(temps.len(), 48);
    assert_eq!(temps[47], 18.5, "{one}");
    assert!(temps[..47].iter().all(Value::is_null), "{one}");
    assert_eq!(one["history"]["setpoint"][47], 21.0, "{one}");
    assert_eq!(one["history"]["bucket_ms"], 1_800_000);
    let recent: Vec<i64> = one["recent_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pos"].as_i64().unwrap())
        .collect();
    let mut expected: Vec<i64> = rows
        .iter()
        .filter(|r| r.device == "living-room")
        .map(|r| r.pos)
        .collect();
    expected.reverse();
    assert_eq!(recent, expected);
    let out = hvac_edge(&["devices", "nowhere", "-c", &c]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no device \"nowhere\""),
        "{}",
        text(&out.stderr)
    );

    // queue list: per sink and status, device, type.
    let pos_of = |v: &Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["pos"].as_i64().unwrap())
            .collect()
    };
    let all: Vec<i64> = rows.iter().rev().map(|r| r.pos).collect();
    let l = json(
        &[
            "queue", "list", "-c", &c, "--sink", "upstream", "--status", "pending", "--json",
        ],
        0,
    );
    assert_eq!(pos_of(&l), all);
    assert!(
        l.as_array()
            .unwrap()
            .iter()
            .all(|e| e["sink_status"] == "pending")
    );
    assert_eq!(
        l[0]["event"],
        serde_json::from_str::<Value>(&rows[17].payload).unwrap()
    );
    let l = json(
        &[
            "queue",
            "list",
            "-c",
            &c,
            "--sink",
            "portal",
            "--status",
            "delivered",
            "--json",
        ],
        0,
    );
    assert_eq!(pos_of(&l), all);
    let l = json(
        &[
            "queue", "list", "-c", &c, "--sink", "portal", "--status", "pending", "--json",
        ],
        0,
    );
    assert_eq!(pos_of(&l), Vec::<i64>::new());
    let l = json(
        &["queue", "list", "-c", &c, "--status", "delivered", "--json"],
        0,
    );
    assert_eq!(pos_of(&l), Vec::<i64>::new(), "not delivered to every sink");
    let l = json(
        &[
            "queue", "list", "-c", &c, "--device", "kitchen", "--type", "setpoint", "--json",
        ],
        0,
    );
    let kitchen_sp: Vec<i64> = rows
        .iter()
        .rev()
        .filter(|r| r.device == "kitchen" && r.kind == "setpoint")
        .map(|r| r.pos)
        .collect();
    assert_eq!(pos_of(&l), kitchen_sp);
    assert_eq!(kitchen_sp.len(), 2);
    let l = json(
        &[
            "queue", "list", "-c", &c, "--limit", "3", "--since", "1h", "--json",
        ],
        0,
    );
    assert_eq!(pos_of(&l), all[..3]);
    let l = json(&["queue", "list", "-c", &c, "--until", "1h", "--json"], 0);
    assert_eq!(pos_of(&l), Vec::<i64>::new());
    let l = json(
        &["queue", "list", "-c", &c, "--status", "dead", "--json"],
        0,
    );
    assert_eq!(l, serde_json::json!([]));
    assert_screen(
        "queue-list.txt",
        &run_ok(&["queue", "list", "-c", &c, "--sink", "upstream"], 0),
    );
    let out = hvac_edge(&["queue", "list", "-c", &c, "--since", "yesterday-ish"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a filter that cannot be understood is usage"
    );
    let out = hvac_edge(&["queue", "list", "-c", &c, "--sink", "nope"]);
    assert_eq!(out.status.code(), Some(1));

    // queue show: by id and by pos, with every sink's view.
    let s = json(&["queue", "show", &rows[2].id, "-c", &c, "--json"], 0);
    assert_eq!(s["pos"], rows[2].pos);
    assert_eq!(
        s["event"],
        serde_json::from_str::<Value>(&rows[2].payload).unwrap()
    );
    let delivery = s["delivery"].as_array().unwrap();
    assert_eq!(delivery.len(), 2);
    assert_eq!(delivery[0]["sink"], "portal");
    assert_eq!(delivery[0]["status"], "delivered");
    assert_eq!(delivery[1]["sink"], "upstream");
    assert_eq!(delivery[1]["status"], "pending");
    let by_pos = json(
        &[
            "queue",
            "show",
            &rows[2].pos.to_string(),
            "-c",
            &c,
            "--json",
        ],
        0,
    );
    assert_eq!(by_pos, s);
    let shown = run_ok(&["queue", "show", &rows[2].id, "-c", &c], 0);
    assert!(
        shown.contains(&format!("\"id\": \"{}\"", rows[2].id)),
        "{shown}"
    );
    assert!(shown.contains("portal    delivered"), "{shown}");
    let out = hvac_edge(&[
        "queue",
        "show",
        "0193a5c4-0000-7000-8000-000000000000",
        "-c",
        &c,
    ]);
    assert_eq!(out.status.code(), Some(1));

    // queue tail: the newest, then one more followed live.
    let t = run_ok(&["queue", "tail", "-n", "2", "-c", &c, "--json"], 0);
    let tailed: Vec<i64> = t
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["pos"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(tailed, [17, 18]);
    let follower = Command::new(BIN)
        .args([
            "queue",
            "tail",
            "-f",
            "-n",
            "0",
            "--max",
            "1",
            "--timeout-secs",
            "30",
            "--json",
            "-c",
            &c,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Give the follower time to take its starting point, then commit one more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    site.publish("kitchen", &trv(20.0, 21.0, "heat")).await;
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || follower.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "it stopped after --max, not the timeout"
    );
    let line: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(line["pos"], 19);
    assert_eq!(line["device"], "kitchen");
    assert_eq!(line["type"], "temperature");

    // queue export: the stored envelopes, exactly; CSV with its header.
    site.wait_events(19).await;
    let rows = Db::open(&site.db()).events();
    let out_file = site.sb.path().join("export.jsonl");
    let out = hvac_edge(&[
        "queue",
        "export",
        "--format",
        "jsonl",
        "--out",
        out_file.to_str().unwrap(),
        "-c",
        &c,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).starts_with("exported 19 event(s) to "),
        "{}",
        text(&out.stderr)
    );
    let exported = std::fs::read_to_string(&out_file).unwrap();
    let expected: String = rows.iter().map(|r| format!("{}\n", r.payload)).collect();
    assert_eq!(exported, expected);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let csv = run_ok(
        &[
            "queue",
            "export",
            "--format",
            "csv",
            "--device",
            "living-room",
            "-c",
            &c,
        ],
        0,
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "pos,id,observed_at,device,seq,type,clock,previous,current,function,mode,program,setpoint,setpoint_unit,temperature,temperature_unit,humidity,load_state,connectivity"
    );
    let lr: Vec<_> = rows.iter().filter(|r| r.device == "living-room").collect();
    assert_eq!(lines.len(), 1 + lr.len());
    let last: Vec<&str> = lines.last().unwrap().split(',').collect();
    assert_eq!(last[0], lr.last().unwrap().pos.to_string());
    assert_eq!(last[1], lr.last().unwrap().id);
    assert_eq!(
        &last[3..6],
        [
            "living-room",
            &lr.last().unwrap().seq.to_string(),
            "temperature"
        ]
    );
    // The state columns are the last seven (previous/current before them are quoted JSON).
    let n = last.len();
    assert_eq!(
        &last[n - 7..],
        ["21.0", "C", "18.5", "C", "48.0", "ACTIVE", "ONLINE"],
        "{csv}"
    );

    // Config problems are 78; a stopped daemon is a problem (exit 1).
    let out = hvac_edge(&["status", "-c", "/nonexistent/hvac-edge.toml"]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    site.daemon.sigterm();
    assert_eq!(
        site.daemon
            .wait_timeout_async(TIMEOUT)
            .await
            .and_then(|s| s.code()),
        Some(0)
    );
    let v = json(&["status", "-c", &c, "--json"], 1);
    assert_eq!(v["daemon"]["running"], false, "{v}");
    assert!(
        v["problems"][0]
            .as_str()
            .unwrap()
            .starts_with("the daemon is not running"),
        "{v}"
    );
}

/// `tmux` on a private socket (killed on drop).
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Tmux {
        assert!(
            Command::new("tmux")
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success()),
            "tmux not found: install the Debian package tmux"
        );
        Tmux {
            socket: format!("hvac-{tag}"),
        }
    }

    /// Runs `cmd` in a detached 120x40 pane that stays open after it ends.
    fn run(&self, cmd: &[&str]) {
        let line = cmd
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
            .collect::<Vec<_>>()
            .join(" ");
        let st = Command::new("tmux")
            .args([
                "-L",
                &self.socket,
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "120",
                "-y",
                "40",
            ])
            .arg(format!(
                "env -u NO_COLOR TERM=xterm-256color {line}; sleep 60"
            ))
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn capture(&self) -> String {
        text(
            &Command::new("tmux")
                .args(["-L", &self.socket, "capture-pane", "-p"])
                .output()
                .unwrap()
                .stdout,
        )
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sparkline_of_a_room_that_never_reaches_its_setpoint_in_a_real_terminal() {
    let mut site = Site::start("tech_sparkline").await;
    site.online("bedroom").await;
    // Slices of 2 s over 96 s: each reading is published in the middle of its own slice.
    let start = (now_ms() / 1000 + 1) * 1000;
    for (k, t) in [17.0, 17.5, 18.0, 18.5, 19.0, 18.5].iter().enumerate() {
        let at = start + 2000 * k as i64 + 1000;
        let wait = at - now_ms();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        site.publish("bedroom", &trv(21.0, *t, "heat")).await;
    }
    // The snapshot, one event per field of the first message, five temperatures.
    site.wait_events(12).await;
    let until = hvac_edge::model::format_rfc3339_ms(start + 96_000);
    let c = site.c().to_string();
    let v = json(
        &[
            "devices", "bedroom", "-c", &c, "--window", "96s", "--until", &until, "--json",
        ],
        0,
    );
    let temps: Vec<Option<f64>> = v["history"]["temperature"]
        .as_array()
        .unwrap()
        .iter()
        .map(Value::as_f64)
        .collect();
    assert_eq!(
        &temps[..7],
        [
            Some(17.0),
            Some(17.5),
            Some(18.0),
            Some(18.5),
            Some(19.0),
            Some(18.5),
            None
        ],
        "{v}"
    );
    assert!(temps[6..].iter().all(Option::is_none));
    let tmux = Tmux::new(site.sb.tag());
    tmux.run(&[
        BIN, "devices", "bedroom", "-c", &c, "--window", "96s", "--until", &until,
    ]);
    let mut screen = String::new();
    wait_until_async("the device screen in tmux", TIMEOUT, || {
        screen = tmux.capture();
        screen.contains("recent events")
    })
    .await;
    assert!(screen.contains("█"), "{screen}");
    assert_screen("device-sparkline.txt", &screen);
}

/// Builds a 1,000,000-event outbox of 1,000 simulated devices with the real daemon (every event
/// pending for a sink whose receiver is gone), then times the commands. Run with
/// `cargo test --test it technician::a_million -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: about 2 minutes and 1 GB of disk"]
fn a_million_events_bench() {
    let sb = Sandbox::new("tech_bench");
    let db = sb.path().join("fleet.db");
    let config = sb.path().join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            r#"[gateway]
id = "gw-bench"
clock = "trusted"
[store]
path = {}
max_bytes = 4294967296
synchronous = "normal"
[pipeline]
commit_delay_ms = 20
batch_max = 4096
max_devices = 2000
[[sources.simulator]]
name = "sim"
devices = 1000
changes_per_sec = 1000000.0
max_observations = 905000
[[sinks.http]]
name = "upstream"
url = "http://127.0.0.1:9/x"
allow_insecure_http = true
retry_schedule_secs = [3600]
"#,
            toml_str(&db.display().to_string())
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut daemon = DaemonProcess::spawn(&config, sb.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(900);
    while !daemon.stderr().contains("Simulator finished") {
        assert!(Instant::now() < deadline, "the simulator did not finish");
        assert!(daemon.try_status().is_none(), "{}", daemon.stderr());
        std::thread::sleep(Duration::from_millis(500));
    }
    daemon.sigterm();
    assert_eq!(
        daemon
            .wait_timeout(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(0)
    );
    let events = Db::open(&db).count("SELECT COUNT(*) FROM events");
    println!(
        "built {events} events of 1000 devices in {:.0} s ({} MiB)",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(&db).unwrap().len() >> 20
    );
    assert!(events >= 1_000_000, "{events}");
    let d = db.to_str().unwrap();
    let out = sb.path().join("export");
    let out_jsonl = format!("{}.jsonl", out.display());
    let out_csv = format!("{}.csv", out.display());
    let cmds: Vec<Vec<&str>> = vec![
        vec!["status", "--db", d],
        vec!["status", "--db", d, "--json"],
        vec!["queue", "stats", "--db", d],
        vec!["devices", "--db", d],
        vec!["devices", "sim-042", "--db", d],
        vec!["devices", "sim-042", "--db", d, "--json"],
        vec![
            "queue", "list", "--db", d, "--device", "sim-042", "--limit", "20",
        ],
        vec![
            "queue", "export", "--db", d, "--format", "jsonl", "--out", &out_jsonl,
        ],
        vec![
            "queue", "export", "--db", d, "--format", "csv", "--out", &out_csv,
        ],
    ];
    for args in cmds {
        let mut best = Duration::MAX;
        let runs = if args.contains(&"export") { 1 } else { 3 };
        let mut last = None;
        for _ in 0..runs {
            let t = Instant::now();
            let o = hvac_edge(&args);
            best = best.min(t.elapsed());
            last = Some(o);
        }
        let o = last.unwrap();
        assert!(
            matches!(o.status.code(), Some(0 | 1)),
            "{args:?}: {}",
            text(&o.stderr)
        );
        println!(
            "{:>8.1} ms  hvac-edge {}{}",
            best.as_secs_f64() * 1000.0,
            args.join(" "),
            if args.contains(&"export") {
                format!("  ({})", text(&o.stderr).trim())
            } else {
                String::new()
            }
        );
    }
}

#[test]
fn normalise_replaces_times_ids_and_ages_and_collapses_blanks() {
    assert_eq!(
        normalise(
            "a  2026-12-04T19:11:12.455Z    01a24276-99c4-722b-a8c1-757a3011fec3  5m12s ago  800ms 12s x1s  \n"
        ),
        "a  <time>  <uuid>  <t> ago  800ms 12s x1s\n"
    );
}
