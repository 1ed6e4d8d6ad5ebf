//! Per-test sandboxes (temp dir + unique names) and a builder for the daemon's TOML config.
//!
//! The builder writes real TOML and parses it with `hvac_edge::config::parse`, so every test
//! also exercises the config schema and validation. Defaults suit tests: the database in the
//! sandbox, `commit_delay_ms = 0`, a 2 s shutdown grace, one-second retries, a unique MQTT client
//! id per source and a unique Zigbee2MQTT base topic per test.

use super::receiver::Receiver;
use hvac_edge::config::Config;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static SANDBOXES: AtomicU64 = AtomicU64::new(0);

/// A test's own temp dir (removed on drop) and a tag that makes names unique across tests and
/// concurrent test processes.
pub struct Sandbox {
    dir: tempfile::TempDir,
    tag: String,
}

impl Sandbox {
    /// A fresh sandbox; `test` (the test's name) goes into the tag for readable logs.
    pub fn new(test: &str) -> Sandbox {
        let n = SANDBOXES.fetch_add(1, Ordering::Relaxed);
        let clean: String = test
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let tag = format!("{clean}-{}-{n}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("it-{clean}-"))
            .tempdir()
            .expect("sandbox temp dir");
        Sandbox { dir, tag }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The unique tag (`<test>-<pid>-<n>`): use it in client ids and topics.
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

/// Quotes `s` as a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Component {
    /// `http`, `webhook` or `mqtt` for sinks (the `[[sinks.<kind>]]` table).
    kind: &'static str,
    name: String,
    keys: Vec<(String, String)>,
    /// Sub-tables rendered after the keys (the generic mapping).
    tail: String,
}

impl Component {
    fn set(&mut self, key: &str, value: &str) {
        match self.keys.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => self.keys.push((key.to_string(), value.to_string())),
        }
    }
}

/// Builds a config for one test. Values passed to the `set*` methods are TOML values as written
/// (`"2"`, `"[1]"`, `toml_str("x")`).
pub struct TestConfig {
    dir: PathBuf,
    tag: String,
    tables: BTreeMap<String, Vec<(String, String)>>,
    mqtt: Vec<Component>,
    sinks: Vec<Component>,
    raw: Vec<String>,
}

impl TestConfig {
    /// Gateway `gw-it` with `clock = "trusted"`, the database at `<sandbox>/hvac-edge.db`, `commit_delay_ms = 0`,
    /// `shutdown_grace_secs = 2`, log level `info`; no sources, no sinks.
    pub fn new(sandbox: &Sandbox) -> TestConfig {
        let mut c = TestConfig {
            dir: sandbox.path().to_path_buf(),
            tag: sandbox.tag().to_string(),
            tables: BTreeMap::new(),
            mqtt: Vec::new(),
            sinks: Vec::new(),
            raw: Vec::new(),
        };
        let db = sandbox.path().join("hvac-edge.db");
        // The test machine's kernel may report its clock unsynchronised (no NTP daemon): trust it,
        // so that events are stamped "synced" and TTL applies as on a synchronised gateway.
        c.set("gateway", "id", &toml_str("gw-it"))
            .set("gateway", "clock", &toml_str("trusted"))
            .set("store", "path", &toml_str(&db.display().to_string()))
            .set("pipeline", "commit_delay_ms", "0")
            .set("pipeline", "shutdown_grace_secs", "2")
            .set("log", "level", &toml_str("info"));
        c
    }

    /// Sets `key = value` in the top-level table `table` (`gateway`, `store`, `pipeline`, `diff`, `log`).
    pub fn set(&mut self, table: &str, key: &str, value: &str) -> &mut Self {
        let keys = self.tables.entry(table.to_string()).or_default();
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => keys.push((key.to_string(), value.to_string())),
        }
        self
    }

    /// The MQTT client id given to source `name` (unique per test).
    pub fn client_id(&self, name: &str) -> String {
        format!("it-{}-{name}", self.tag)
    }

    /// The Zigbee2MQTT base topic unique to this test: `z2m-<tag>`.
    pub fn base_topic(&self) -> String {
        format!("z2m-{}", self.tag)
    }

    /// Adds a `zigbee2mqtt` MQTT source on 127.0.0.1:`port` with [`TestConfig::base_topic`].
    pub fn z2m_source(&mut self, name: &str, port: u16) -> &mut Self {
        let base = self.base_topic();
        let mut c = self.mqtt_common(name, port);
        c.set("preset", &toml_str("zigbee2mqtt"));
        c.set("base_topic", &toml_str(&base));
        self.mqtt.push(c);
        self
    }

    /// Adds a `generic` MQTT source subscribed to `topics`; `mapping` is the TOML text placed
    /// under `[sources.mqtt.mapping]` (keys, then `[sources.mqtt.mapping.fields]` etc.).
    pub fn generic_source(
        &mut self,
        name: &str,
        port: u16,
        topics: &[&str],
        mapping: &str,
    ) -> &mut Self {
        let mut c = self.mqtt_common(name, port);
        c.set("preset", &toml_str("generic"));
        let list: Vec<String> = topics.iter().map(|t| toml_str(t)).collect();
        c.set("topics", &format!("[{}]", list.join(", ")));
        c.tail = format!("[sources.mqtt.mapping]\n{}\n", mapping.trim());
        self.mqtt.push(c);
        self
    }

    fn mqtt_common(&self, name: &str, port: u16) -> Component {
        let mut c = Component {
            kind: "mqtt",
            name: name.to_string(),
            keys: Vec::new(),
            tail: String::new(),
        };
        c.set("name", &toml_str(name));
        c.set("host", &toml_str("127.0.0.1"));
        c.set("port", &port.to_string());
        c.set("client_id", &toml_str(&self.client_id(name)));
        c.set("reconnect_min_ms", "100");
        c.set("reconnect_max_ms", "1000");
        c
    }

    /// Sets `key = value` in MQTT source `name`.
    pub fn source_set(&mut self, name: &str, key: &str, value: &str) -> &mut Self {
        self.mqtt
            .iter_mut()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no MQTT source {name:?} in the test config"))
            .set(key, value);
        self
    }

    /// Adds an HTTP sink posting to `receiver`: `allow_insecure_http = true`, the receiver's
    /// secret in a mode-0600 file, `retry_schedule_secs = [1]`, `request_timeout_ms = 2000`.
    pub fn http_sink(&mut self, name: &str, receiver: &Receiver) -> &mut Self {
        self.signed_sink("http", name, receiver);
        self.sink_set(name, "request_timeout_ms", "2000")
    }

    /// Adds a webhook sink posting to `receiver` (one event per request): `allow_insecure_http
    /// = true`, the receiver's secret in a mode-0600 file, `retry_schedule_secs = [1]`; the
    /// vendor defaults otherwise (750 ms, bans every 20 failures, `failure_limit = 100`).
    pub fn webhook_sink(&mut self, name: &str, receiver: &Receiver) -> &mut Self {
        self.signed_sink("webhook", name, receiver)
    }

    /// A `[[sinks.<kind>]]` to `receiver` over loopback http, signed with its secret.
    fn signed_sink(&mut self, kind: &'static str, name: &str, receiver: &Receiver) -> &mut Self {
        let secret = self.secret_file(&format!("{name}.whsec"), receiver.whsec());
        let mut c = Component {
            kind,
            name: name.to_string(),
            keys: Vec::new(),
            tail: String::new(),
        };
        c.set("name", &toml_str(name));
        c.set("url", &toml_str(&receiver.url()));
        c.set("allow_insecure_http", "true");
        c.set(
            "signing_secret_file",
            &toml_str(&secret.display().to_string()),
        );
        c.set("retry_schedule_secs", "[1]");
        self.sinks.push(c);
        self
    }

    /// Adds an MQTT upstream sink to the plain broker on 127.0.0.1:`port` (`tls = false`),
    /// client id `it-<tag>-<name>`, `retry_schedule_secs = [1]`.
    pub fn mqtt_sink(&mut self, name: &str, port: u16) -> &mut Self {
        let mut c = Component {
            kind: "mqtt",
            name: name.to_string(),
            keys: Vec::new(),
            tail: String::new(),
        };
        c.set("name", &toml_str(name));
        c.set("host", &toml_str("127.0.0.1"));
        c.set("port", &port.to_string());
        c.set("tls", "false");
        c.set("client_id", &toml_str(&self.client_id(name)));
        c.set("retry_schedule_secs", "[1]");
        self.sinks.push(c);
        self
    }

    /// Writes `content` to `<sandbox>/<file>` with mode 0600 (a secret file) and returns its path.
    pub fn secret_file(&self, file: &str, content: &str) -> PathBuf {
        let path = self.dir.join(file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .expect("create the secret file");
        writeln!(f, "{content}").expect("write the secret file");
        path
    }

    /// Removes MQTT source `name` (to add it again with other settings).
    pub fn remove_source(&mut self, name: &str) -> &mut Self {
        self.mqtt.retain(|c| c.name != name);
        self
    }

    /// Removes sink `name` (to restart the daemon without it).
    pub fn remove_sink(&mut self, name: &str) -> &mut Self {
        self.sinks.retain(|c| c.name != name);
        self
    }

    /// Sets `key = value` in sink `name` (any kind).
    pub fn sink_set(&mut self, name: &str, key: &str, value: &str) -> &mut Self {
        self.sinks
            .iter_mut()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no sink {name:?} in the test config"))
            .set(key, value);
        self
    }

    /// Appends raw TOML at the end (e.g. `[[devices]]` tables).
    pub fn raw(&mut self, text: &str) -> &mut Self {
        self.raw.push(text.trim().to_string());
        self
    }

    /// The database path (`store.path`).
    pub fn db_path(&self) -> PathBuf {
        self.dir.join("hvac-edge.db")
    }

    /// The TOML text.
    pub fn toml(&self) -> String {
        let mut out = String::new();
        for (table, keys) in &self.tables {
            out.push_str(&format!("[{table}]\n"));
            for (k, v) in keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
            out.push('\n');
        }
        for c in &self.mqtt {
            out.push_str("[[sources.mqtt]]\n");
            for (k, v) in &c.keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
            out.push_str(&c.tail);
            out.push('\n');
        }
        for c in &self.sinks {
            out.push_str(&format!("[[sinks.{}]]\n", c.kind));
            for (k, v) in &c.keys {
                out.push_str(&format!("{k} = {v}\n"));
            }
            out.push('\n');
        }
        for r in &self.raw {
            out.push_str(r);
            out.push_str("\n\n");
        }
        out
    }

    /// Writes the TOML to `<sandbox>/<file>` and returns the path (for the real binary).
    pub fn write(&self, file: &str) -> PathBuf {
        let path = self.dir.join(file);
        std::fs::write(&path, self.toml()).expect("write the test config");
        path
    }

    /// Parses and validates the TOML with `hvac_edge::config::parse`; panics with the text and
    /// every problem if it is refused.
    pub fn build(&self) -> Config {
        let text = self.toml();
        hvac_edge::config::parse(&text, &self.dir.join("test.toml"))
            .unwrap_or_else(|e| panic!("test config refused: {e}\n---\n{text}"))
    }
}
