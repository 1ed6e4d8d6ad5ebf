//! `hvac-edge doctor` on the real binary: a healthy site (a real broker, real receivers on
//! 127.0.0.1, a serial port on a socat pty, the real daemon running on its database) reports no
//! fail and exits 0; a broken one (a missing serial port, a broker port with nothing listening,
//! a database directory the service cannot write) reports each as a fail with its fix and exits
//! 1; a plain-http upstream to a non-loopback host is a fail found without any network (the
//! config is then invalid: exit 78, and the other checks still run); a port the service user
//! cannot open names the group to join; a broker that refuses the credentials is told apart from
//! one that is down; a TLS broker is checked through the handshake (a wrong CA and a plain
//! client on the TLS port fail with their fixes). Exact `--json` statuses per check name.
//!
//! Root (containers): the database directory check then works from owner, group and mode (as
//! for the unit, which has no capabilities), which is what a 0500 directory tests either way;
//! nothing here needs to be skipped as root. Every test passes `--service-user` (the current
//! user, or one who is not: `nobody`, or root when running as nobody), since the machine has no
//! `hvac-edge` user. Also passes run as a non-root user (the `access(2)` path).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::harness::serial::PtyPair;
use crate::harness::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hvac-edge");

/// The user running the tests (root in containers).
fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs `hvac-edge doctor -c <config> --service-user <user> [extra]` to completion, without a
/// terminal (so without colour).
fn doctor(config: &Path, user: &str, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("doctor")
        .arg("-c")
        .arg(config)
        .args(["--service-user", user])
        .args(extra)
        .env_remove("NO_COLOR")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"))
}

/// `doctor --json` run off the async runtime (the receivers answer meanwhile).
async fn doctor_json(config: &Path, user: &str) -> (Option<i32>, Value) {
    let config = config.to_path_buf();
    let user = user.to_string();
    let out = tokio::task::spawn_blocking(move || doctor(&config, &user, &["--json"]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "doctor --json is not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

/// The human table, off the async runtime.
async fn doctor_text(config: &Path, user: &str) -> (Option<i32>, String) {
    let config = config.to_path_buf();
    let user = user.to_string();
    let out = tokio::task::spawn_blocking(move || doctor(&config, &user, &[]))
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// name → status, in the order printed (names are unique in these setups).
fn statuses(v: &Value) -> BTreeMap<String, String> {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn check<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {v:#}"))
}

fn fix(v: &Value, name: &str) -> String {
    check(v, name)["fix"]
        .as_str()
        .unwrap_or_else(|| panic!("check {name} has no fix: {v:#}"))
        .to_string()
}

fn detail(v: &Value, name: &str) -> String {
    check(v, name)["detail"].as_str().unwrap().to_string()
}

/// What the disk check must say for the filesystem of `dir` (statvfs here too): `ok` unless it
/// is nearly full (store.max_bytes is 1 MiB in these configs, so only the 10 % and 50 MiB
/// rules can apply).
fn expected_disk(dir: &Path) -> &'static str {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    let total = st.f_blocks as u64 * st.f_frsize as u64;
    if free < 50 * 1024 * 1024 {
        "fail"
    } else if free * 10 < total {
        "warn"
    } else {
        "ok"
    }
}

fn want(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `<sandbox>/state` with `mode` (the unit's StateDirectoryMode= is 0750) as the database's
/// directory; returns it.
fn state_dir(sb: &Sandbox, tc: &mut TestConfig, mode: u32) -> std::path::PathBuf {
    let state = sb.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(mode)).unwrap();
    tc.set(
        "store",
        "path",
        &toml_str(&state.join("hvac-edge.db").display().to_string()),
    );
    state
}

/// A `[[sources.jsonl]]` on `port`.
fn jsonl_source(name: &str, port: &Path) -> String {
    format!(
        "[[sources.jsonl]]\nname = {}\nport = {}\n[sources.jsonl.mapping]\ndevice = \"/id\"\n[sources.jsonl.mapping.fields]\nsetpoint = \"/sp\"\n",
        toml_str(name),
        toml_str(&port.display().to_string())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_site_reports_no_fail_and_exits_0_without_disturbing_the_daemon() {
    let sb = Sandbox::new("doctor_healthy");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let pty = PtyPair::start(sb.path(), "fw");
    let mut tc = TestConfig::new(&sb);
    let state = state_dir(&sb, &mut tc, 0o750);
    tc.set("store", "max_bytes", "1048576")
        .z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver)
        .webhook_sink("hook", &receiver)
        .mqtt_sink("cloud", broker.port())
        .raw(&jsonl_source("fw", &pty.device_path()));
    tc.build();
    let config = tc.write("hvac-edge.toml");
    // The real daemon, running on its database while doctor looks.
    let mut daemon = DaemonProcess::spawn(&config, sb.path(), &[]);
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    broker
        .wait_connected(&tc.client_id("cloud"), 1, TIMEOUT)
        .await;
    let db = state.join("hvac-edge.db");
    let pid = daemon.pid();
    // The daemon records its pid once every component runs, after subscribing.
    wait_until("the daemon's pid in its database", TIMEOUT, || {
        let opts = hvac_edge::store::Options::default();
        hvac_edge::store::open(&db, hvac_edge::store::Mode::ReadOnly, &opts)
            .ok()
            .and_then(|c| hvac_edge::store::reloads::daemon(&c, &db).ok().flatten())
            .is_some_and(|(p, _)| p == pid)
    });
    let requests_before = receiver.request_count();

    let user = current_user();
    let started = Instant::now();
    let (code, v) = doctor_json(&config, &user).await;
    let took = started.elapsed();
    assert_eq!(code, Some(0), "{v:#}");
    assert_eq!(v["fails"], 0, "{v:#}");
    // Loopback plain http with allow_insecure_http = true: a warning each, nothing else.
    assert_eq!(v["warns"], 2, "{v:#}");
    assert_eq!(
        statuses(&v),
        want(&[
            ("config", "ok"),
            ("database", "ok"),
            ("database-permissions", "ok"),
            ("disk", expected_disk(sb.path())),
            ("serial:fw", "ok"),
            ("broker:z2m", "ok"),
            ("sink:upstream", "warn"),
            ("sink:hook", "warn"),
            ("sink:cloud", "ok"),
            ("clock", "ok"),
            ("service-user", "ok"),
            ("daemon", "ok"),
        ]),
        "{v:#}"
    );
    assert!(took < Duration::from_secs(4), "doctor took {took:?}");
    assert!(
        detail(&v, "database").contains("quick_check ok"),
        "{}",
        detail(&v, "database")
    );
    assert_eq!(
        detail(&v, "daemon"),
        format!("running (pid {})", daemon.pid())
    );
    assert!(
        detail(&v, "serial:fw").contains(&format!("{user} can read and write it (its owner)")),
        "{}",
        detail(&v, "serial:fw")
    );
    let up = detail(&v, "sink:upstream");
    assert!(up.contains("TCP ok, HEAD answered 200 OK"), "{up}");
    assert!(up.ends_with("; plain http:// (loopback)"), "{up}");
    assert_eq!(
        fix(&v, "sink:upstream"),
        "plain http:// is only for a receiver on this gateway; use https:// otherwise"
    );
    assert!(check(&v, "config")["fix"].is_null());

    // No event was sent: only HEAD requests, without a body.
    let requests = receiver.requests();
    let new: Vec<_> = requests[requests_before..]
        .iter()
        .filter(|r| r.method == "HEAD")
        .collect();
    assert_eq!(new.len(), 2, "one HEAD per HTTP sink");
    assert!(new.iter().all(|r| r.body.is_empty()));
    // Both brokers saw a clean-session MQTT 3.1.1 CONNECT under a throwaway id, and neither of
    // the daemon's sessions was taken over.
    let log = broker.log();
    for name in ["z2m", "cloud"] {
        let id = tc.client_id(name);
        assert!(
            log.contains(&format!("as {id}-doctor (p2, c1")),
            "no clean-session CONNECT as {id}-doctor in the broker log:\n{log}"
        );
    }
    assert!(
        !log.contains("already connected, closing old connection"),
        "doctor kicked a session:\n{log}"
    );
    assert_eq!(daemon.try_status(), None, "the daemon must keep running");

    // The table: no colour without a terminal, a fix line under each warning, a summary.
    let (code, text) = doctor_text(&config, &user).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour without a terminal: {text}"
    );
    assert!(text.ends_with("0 fail, 2 warn, 10 ok\n"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("ok    broker:z2m"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("accepted in"), "{line}");
    assert!(
        text.contains("fix: plain http:// is only for a receiver on this gateway"),
        "{text}"
    );

    daemon.sigterm();
    let status = daemon.wait_timeout_async(TIMEOUT).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_site_reports_each_problem_as_a_fail_with_its_fix_and_exits_1() {
    let sb = Sandbox::new("doctor_broken");
    let dead = free_port();
    let gone = sb.path().join("ttyUSB-gone");
    let mut tc = TestConfig::new(&sb);
    // Read and search only: nothing can be created in it.
    let state = state_dir(&sb, &mut tc, 0o500);
    tc.set("store", "max_bytes", "1048576")
        .z2m_source("z2m", dead)
        .raw(&jsonl_source("fw", &gone));
    tc.build();
    let config = tc.write("hvac-edge.toml");

    let user = current_user();
    let (code, v) = doctor_json(&config, &user).await;
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(v["fails"], 3, "{v:#}");
    assert_eq!(
        statuses(&v),
        want(&[
            ("config", "ok"),
            ("database", "warn"),
            ("database-permissions", "fail"),
            ("disk", expected_disk(sb.path())),
            ("serial:fw", "fail"),
            ("broker:z2m", "fail"),
            ("clock", "ok"),
            ("service-user", "ok"),
            ("daemon", "ok"),
        ]),
        "{v:#}"
    );
    let s = state.display();
    assert_eq!(
        detail(&v, "database"),
        format!("{s}/hvac-edge.db does not exist yet: created at first start")
    );
    let perms = detail(&v, "database-permissions");
    assert!(
        perms.starts_with(&format!("{s} (dr-x------ ")) && perms.contains("is not writable by"),
        "{perms}"
    );
    assert_eq!(
        fix(&v, "database-permissions"),
        format!("chown {user}:{user} {s} && chmod 0750 {s}")
    );
    assert_eq!(
        detail(&v, "serial:fw"),
        format!("{} does not exist", gone.display())
    );
    assert_eq!(
        fix(&v, "serial:fw"),
        "use /dev/serial/by-id/… in sources.jsonl[0].port (the path is gone: adapter unplugged?)"
    );
    assert!(
        detail(&v, "broker:z2m").starts_with(&format!(
            "127.0.0.1:{dead}: TCP: cannot connect (127.0.0.1:{dead}: Connection refused"
        )),
        "{}",
        detail(&v, "broker:z2m")
    );
    assert_eq!(
        fix(&v, "broker:z2m"),
        format!(
            "nothing listens on 127.0.0.1:{dead}: start the broker (systemctl status mosquitto) or fix sources.mqtt[0].host / sources.mqtt[0].port"
        )
    );

    let (code, text) = doctor_text(&config, &user).await;
    assert_eq!(code, Some(1));
    println!("{text}");
    assert!(text.ends_with("3 fail, 1 warn, 5 ok\n"), "{text}");
    let serial = text
        .lines()
        .position(|l| l.starts_with("fail  serial:fw"))
        .unwrap_or_else(|| panic!("{text}"));
    let next = text.lines().nth(serial + 1).unwrap();
    assert!(
        next.trim_start().starts_with("fix: use /dev/serial/by-id/"),
        "{next}"
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_upstream_to_another_host_fails_without_any_network_and_the_rest_still_runs() {
    let sb = Sandbox::new("doctor_plain_http");
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    state_dir(&sb, &mut tc, 0o750);
    tc.set("store", "max_bytes", "1048576")
        .http_sink("upstream", &receiver)
        // TEST-NET-1: unroutable; doctor must not even try.
        .sink_set("upstream", "url", &toml_str("http://192.0.2.1/ingest"))
        .sink_set("upstream", "allow_insecure_http", "false");
    let config = tc.write("hvac-edge.toml");

    let user = current_user();
    let started = Instant::now();
    let (code, v) = doctor_json(&config, &user).await;
    let took = started.elapsed();
    // The config itself is invalid (the daemon refuses plain http to another host): 78.
    assert_eq!(code, Some(78), "{v:#}");
    assert!(
        took < Duration::from_secs(2),
        "it waited on the network: {took:?}"
    );
    assert_eq!(
        statuses(&v),
        want(&[
            ("config", "fail"),
            ("config:sinks.http[0].url", "fail"),
            ("database", "warn"),
            ("database-permissions", "ok"),
            ("disk", expected_disk(sb.path())),
            ("sink:upstream", "fail"),
            ("clock", "ok"),
            ("service-user", "ok"),
            ("daemon", "ok"),
        ]),
        "{v:#}"
    );
    assert_eq!(
        detail(&v, "config:sinks.http[0].url"),
        "plain http:// is refused for non-loopback hosts; use https://"
    );
    let d = detail(&v, "sink:upstream");
    assert!(
        d.starts_with("http://192.0.2.1/ingest: plain http:// to 192.0.2.1")
            && d.ends_with("(not contacted)"),
        "{d}"
    );
    assert_eq!(
        fix(&v, "sink:upstream"),
        "use https:// in sinks.http[0].url"
    );
    assert_eq!(v["fails"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_does_not_parse_still_checks_disk_clock_and_user() {
    let sb = Sandbox::new("doctor_unparsable");
    let config = sb.path().join("hvac-edge.toml");
    std::fs::write(
        &config,
        "[gateway]\nid = \"gw\"\n[[sources.mqtt]]\nname = 1\n",
    )
    .unwrap();
    let (code, v) = doctor_json(&config, &current_user()).await;
    assert_eq!(code, Some(78), "{v:#}");
    let names: Vec<String> = statuses(&v).into_keys().collect();
    for n in ["config", "disk", "clock", "service-user", "database"] {
        assert!(names.iter().any(|x| x == n), "{n} missing: {v:#}");
    }
    assert_eq!(check(&v, "config")["status"], "fail");
    assert!(
        detail(&v, "config").contains("at line 4, column"),
        "{}",
        detail(&v, "config")
    );
    assert!(
        detail(&v, "database").contains("store.path unknown"),
        "{}",
        detail(&v, "database")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_the_service_user_cannot_open_names_the_group_to_join() {
    let sb = Sandbox::new("doctor_group");
    let pty = PtyPair::start(sb.path(), "fw");
    // Group read-write, as udev sets up /dev/ttyUSB* for dialout.
    let pts = pty.device_pts();
    std::fs::set_permissions(&pts, std::fs::Permissions::from_mode(0o660)).unwrap();
    let gid = std::fs::metadata(&pts).unwrap().gid();
    let out = Command::new("getent")
        .args(["group", &gid.to_string()])
        .output()
        .unwrap();
    let group = String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .filter(|g| !g.is_empty())
        .map_or_else(|| gid.to_string(), str::to_string);
    let mut tc = TestConfig::new(&sb);
    tc.set("store", "max_bytes", "1048576")
        .raw(&jsonl_source("fw", &pty.device_path()));
    let config = tc.write("hvac-edge.toml");
    // Someone who is neither the port's owner nor in its group.
    let other = if current_user() == "nobody" {
        "root"
    } else {
        "nobody"
    };
    let (code, v) = doctor_json(&config, other).await;
    assert_eq!(
        check(&v, "service-user")["status"],
        "ok",
        "no user {other} here? {v:#}"
    );
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(check(&v, "serial:fw")["status"], "fail", "{v:#}");
    assert!(
        detail(&v, "serial:fw").contains(&format!(
            "{other} cannot open it (not its owner, not in group {group} with read-write access)"
        )),
        "{}",
        detail(&v, "serial:fw")
    );
    assert_eq!(
        fix(&v, "serial:fw"),
        format!(
            "add {other} to group {group}: usermod -aG {group} {other} (then systemctl restart hvac-edge)"
        )
    );
}

/// A one-shot fake broker on 127.0.0.1: reads one CONNECT, answers CONNACK `rc`, and hands back
/// the CONNECT's bytes.
fn fake_broker(rc: u8) -> (u16, std::sync::mpsc::Receiver<Vec<u8>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 2];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 0x10, "not a CONNECT");
        assert!(head[1] < 128, "a short CONNECT");
        let mut body = vec![0u8; usize::from(head[1])];
        s.read_exact(&mut body).unwrap();
        s.write_all(&[0x20, 0x02, 0x00, rc]).unwrap();
        let _ = tx.send(body);
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_refuses_the_credentials_is_told_apart_from_one_that_is_down() {
    let sb = Sandbox::new("doctor_refused");
    let (port, connect) = fake_broker(4);
    let mut tc = TestConfig::new(&sb);
    let pw = tc.secret_file("z2m.pw", "s3cret");
    tc.set("store", "max_bytes", "1048576")
        .z2m_source("z2m", port)
        .source_set("z2m", "username", &toml_str("tech"))
        .source_set("z2m", "password_file", &toml_str(&pw.display().to_string()));
    tc.build();
    let config = tc.write("hvac-edge.toml");
    let (code, v) = doctor_json(&config, &current_user()).await;
    assert_eq!(code, Some(1), "{v:#}");
    assert_eq!(check(&v, "broker:z2m")["status"], "fail");
    assert!(
        detail(&v, "broker:z2m").ends_with(&format!(
            "TCP ok, CONNECT as {}-doctor (clean session): refused: bad user name or password for tech (CONNACK 4)",
            tc.client_id("z2m")
        )),
        "{}",
        detail(&v, "broker:z2m")
    );
    assert_eq!(
        fix(&v, "broker:z2m"),
        "check sources.mqtt[0].username and its password_file/password_env against the broker's password file (mosquitto_passwd)"
    );
    // What went over the wire: MQTT 3.1.1, user name + password + clean session, the throwaway id.
    let body = connect.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(&body[..8], &[0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2]);
    let id = format!("{}-doctor", tc.client_id("z2m"));
    let rest = &body[10..];
    assert_eq!(usize::from(rest[1]), id.len());
    assert_eq!(&rest[2..2 + id.len()], id.as_bytes());
    assert!(rest.ends_with(&[
        0, 4, b't', b'e', b'c', b'h', 0, 6, b's', b'3', b'c', b'r', b'e', b't'
    ]));
}

// The TLS broker and its PKI, shared with the hostile and upstream tests (their module is
// private to them, so it is included here the same way).
#[path = "tls_broker.rs"]
#[allow(dead_code, clippy::duplicate_mod)]
mod tls_broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_broker_is_checked_through_the_handshake_and_a_wrong_ca_or_plain_client_fails() {
    let sb = Sandbox::new("doctor_tls");
    let pki = tls_broker::Pki::create(&sb);
    let broker = tls_broker::TlsBroker::start(&pki, false);
    let mut tc = TestConfig::new(&sb);
    state_dir(&sb, &mut tc, 0o750);
    let path = |p: &Path| toml_str(&p.display().to_string());
    tc.set("store", "max_bytes", "1048576")
        .z2m_source("good", broker.tls_port())
        .source_set("good", "ca_file", &path(&pki.ca))
        .z2m_source("wrongca", broker.tls_port())
        .source_set("wrongca", "ca_file", &path(&pki.other_ca))
        .z2m_source("plain", broker.tls_port());
    tc.build();
    let config = tc.write("hvac-edge.toml");
    let (code, v) = doctor_json(&config, &current_user()).await;
    assert_eq!(code, Some(1), "{v:#}");
    let good = detail(&v, "broker:good");
    assert_eq!(check(&v, "broker:good")["status"], "ok", "{good}");
    assert!(
        good.contains(&format!(
            "TCP ok, TLS ok, CONNECT as {}-doctor (clean session): accepted in",
            tc.client_id("good")
        )),
        "{good}"
    );
    assert_eq!(check(&v, "broker:wrongca")["status"], "fail");
    let wrong = detail(&v, "broker:wrongca");
    assert!(
        wrong.contains("TLS handshake with 127.0.0.1 failed: invalid peer certificate"),
        "{wrong}"
    );
    assert!(
        fix(&v, "broker:wrongca").starts_with(
            "the server's certificate must name 127.0.0.1 and be signed by a trusted CA"
        ),
        "{}",
        fix(&v, "broker:wrongca")
    );
    assert_eq!(check(&v, "broker:plain")["status"], "fail");
    assert!(
        fix(&v, "broker:plain").starts_with("is this an MQTT port (a TLS port needs tls = true"),
        "{}",
        fix(&v, "broker:plain")
    );
    assert!(
        broker
            .log()
            .contains(&format!("as {}-doctor (p2, c1", tc.client_id("good"))),
        "{}",
        broker.log()
    );
}
