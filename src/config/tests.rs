//! Config schema and validation: one test per rule of [`Config::validate`], each asserting the
//! exact `ConfigError { key, problem }`; unknown keys and wrong types per section; secrets; and
//! the shipped configs (`config/hvac-edge.toml`, `config/demo.toml`, `config/examples/*.toml`).

use super::*;
use std::os::unix::fs::PermissionsExt;

/// The reference config shipped in the repo.
const REFERENCE_TOML: &str = include_str!("../../config/hvac-edge.toml");
/// The generic-mapping example shipped in the repo.
const ESPHOME_EXAMPLE_TOML: &str = include_str!("../../config/examples/generic-esphome.toml");

const GATEWAY: &str = "[gateway]\nid = \"gw-1\"\n";
/// A valid Standard Webhooks secret (24 bytes), the one of the spec's test vector.
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// An environment variable no test sets.
const UNSET_VAR: &str = "HVAC_EDGE_TEST_VARIABLE_THAT_IS_NEVER_SET";
/// An environment variable that is set (and not empty) wherever tests run.
const SET_VAR: &str = "PATH";

fn minimal() -> &'static str {
    GATEWAY
}

fn problem(key: &str, problem: &str) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        problem: problem.to_string(),
    }
}

/// Parses a whole config text (it must parse) and returns its validation problems.
#[track_caller]
fn problems_of(text: &str) -> Vec<ConfigError> {
    let cfg: Config =
        toml::from_str(text).unwrap_or_else(|e| panic!("does not parse: {e}\n--\n{text}"));
    cfg.validate().err().unwrap_or_default()
}

/// Asserts the exact problems of `body` placed after a valid `[gateway]`.
#[track_caller]
fn assert_problems(body: &str, expected: &[(&str, &str)]) {
    let got = problems_of(&format!("{GATEWAY}{body}"));
    let want: Vec<ConfigError> = expected.iter().map(|(k, p)| problem(k, p)).collect();
    assert_eq!(got, want, "config body:\n{body}");
}

#[track_caller]
fn assert_valid(body: &str) {
    assert_problems(body, &[]);
}

/// The message of a parse (TOML/type) error; panics if the text parses.
#[track_caller]
fn parse_error(text: &str) -> String {
    match parse(text, Path::new("t.toml")) {
        Err(LoadError::Parse { path, message }) => {
            assert_eq!(path, Path::new("t.toml"));
            message
        }
        Err(other) => panic!("expected a parse error, got: {other}"),
        Ok(_) => panic!("expected a parse error, but it parsed:\n{text}"),
    }
}

/// Asserts that `text` is refused at parse time naming `key` on `line`.
#[track_caller]
fn assert_unknown_key(text: &str, key: &str, line: usize) {
    let msg = parse_error(text);
    assert!(
        msg.contains(&format!("at line {line},")),
        "no line {line} in: {msg}"
    );
    assert!(
        msg.contains(&format!("unknown field `{key}`")),
        "key {key} not named in: {msg}"
    );
}

/// A simulator source with extra keys.
fn sim(extra: &str) -> String {
    format!("[[sources.simulator]]\nname = \"sim\"\n{extra}")
}

/// A zigbee2mqtt MQTT source with extra keys.
fn mqtt(extra: &str) -> String {
    format!("[[sources.mqtt]]\nname = \"z2m\"\n{extra}")
}

/// A generic MQTT source: `source_extra` goes in `[[sources.mqtt]]`, `mapping` is the whole
/// mapping part (tables included).
fn generic(source_extra: &str, mapping: &str) -> String {
    format!("[[sources.mqtt]]\nname = \"esp\"\npreset = \"generic\"\n{source_extra}{mapping}")
}

const TOPICS: &str = "topics = [\"home/+/climate/state\"]\n";
const MAPPING: &str = "[sources.mqtt.mapping]\ndevice = \"{topic:1}\"\n[sources.mqtt.mapping.fields]\nsetpoint = \"/target_temperature\"\n";

/// An HTTP sink with the given URL and extra keys.
fn sink(url: &str, extra: &str) -> String {
    format!("[[sinks.http]]\nname = \"up\"\nurl = \"{url}\"\n{extra}")
}

/// An HTTPS sink with extra keys.
fn https(extra: &str) -> String {
    sink("https://ingest.example.com/v1/events", extra)
}

/// Writes a secret file with the given content and mode; returns its path.
fn secret_file(dir: &tempfile::TempDir, name: &str, content: &str, mode: u32) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, content).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

fn toml_path(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// Test PKI for the MQTT TLS keys (EC P-256, valid until 2126, made with the openssl command
/// line): a CA, a client certificate it signed with that certificate's key, and an unrelated key.
const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBhzCCAS6gAwIBAgIUWCNpi/rXGkD/ZBbae6xB2mkOVE0wCgYIKoZIzj0EAwIw\nITEfMB0GA1UEAwwWaHZhYy1lZGdlLXVuaXQtdGVzdC1jYTAgFw0yNjEyMDMxNTU1\nMjZaGA8yMTI2MTEwOTE1NTUyNlowITEfMB0GA1UEAwwWaHZhYy1lZGdlLXVuaXQt\ndGVzdC1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABLaWnNRoqjZT2NMbikFZ\nb3eosbjo4fiVk3MLunuXrw5f7hIT4Ar0enyqkJAXScN9j15Vmiuojr6X5bEc7RTk\nuiijQjBAMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgEGMB0GA1UdDgQW\nBBS2OQvDX0VOSK8rIEssLBEZu5sZHDAKBggqhkjOPQQDAgNHADBEAiBnudIzcFxW\nqmHM/y80h0mpmM5QvtT/AduQqQFtwVFu8wIgU5VCOW5YuaGqx/Yq5OAx7j9OahRX\n3Xzphed1YyBdNSU=\n-----END CERTIFICATE-----\n";
const TEST_CLIENT_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBrDCCAVKgAwIBAgIBAjAKBggqhkjOPQQDAjAhMR8wHQYDVQQDDBZodmFjLWVk\nZ2UtdW5pdC10ZXN0LWNhMCAXDTI2MTIwMzE1NTUyNloYDzIxMjYxMTA5MTU1NTI2\nWjAlMSMwIQYDVQQDDBpodmFjLWVkZ2UtdW5pdC10ZXN0LWNsaWVudDBZMBMGByqG\nSM49AgEGCCqGSM49AwEHA0IABDqauOkBofpB7+RP88UrxKz6SnfuCPFCvkDlzd2/\nCi2z2UXcxtKTwL9rctpFbS1manIj6W2mLh3ODxIeRu5jAoCjdTBzMAwGA1UdEwEB\n/wQCMAAwDgYDVR0PAQH/BAQDAgeAMBMGA1UdJQQMMAoGCCsGAQUFBwMCMB0GA1Ud\nDgQWBBQEeSlasO9quhhirEx6Qa0PgZ6V3jAfBgNVHSMEGDAWgBS2OQvDX0VOSK8r\nIEssLBEZu5sZHDAKBggqhkjOPQQDAgNIADBFAiEA1iRhWPTkCePEK5b5azpAN4AD\nuWaMoR6hGAhf4G8YHEECIDmRw6MU6XWlqpcNwywNFdA7SaCDsYXuq+BpHUY7aIic\n-----END CERTIFICATE-----\n";
const TEST_CLIENT_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQggKMv68i4KRc4y6uY\n2lu+BzoTCTujCToJsuloZvF7wh2hRANCAAQ6mrjpAaH6Qe/kT/PFK8Ss+kp37gjx\nQr5A5c3dvwots9lF3MbSk8C/a3LaRW0tZmpyI+ltpi4dzg8SHkbuYwKA\n-----END PRIVATE KEY-----\n";
const TEST_OTHER_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg7+oJf/87DL6+2Q0b\n1jf+i7cAvWyFqR6V/3/JkhD9Li2hRANCAATgOR45mE5o8Tv/7+GDBBLzPjf/KuUP\nWASQGnzXV2HXw//cnHYu1Nv+DnrRh5o6aR1xW7ea/AWJm1PWyGfQi5JE\n-----END PRIVATE KEY-----\n";

/// The test CA, client certificate (public, mode 0644) and client key (mode 0600) in `dir`:
/// (ca, cert, key).
fn tls_files(dir: &tempfile::TempDir) -> (PathBuf, PathBuf, PathBuf) {
    (
        secret_file(dir, "ca.pem", TEST_CA_PEM, 0o644),
        secret_file(dir, "client.crt", TEST_CLIENT_CERT_PEM, 0o644),
        secret_file(dir, "client.key", TEST_CLIENT_KEY_PEM, 0o600),
    )
}

// ---------------------------------------------------------------------- defaults

#[test]
fn a_minimal_config_gets_every_default() {
    let c = parse(minimal(), Path::new("t.toml")).unwrap();
    assert_eq!(
        c.store.path,
        PathBuf::from("/var/lib/hvac-edge/hvac-edge.db")
    );
    assert_eq!(c.store.synchronous, Synchronous::Full);
    assert_eq!(c.store.max_bytes, 268_435_456);
    assert_eq!(c.store.max_events, 0);
    assert_eq!(c.store.busy_timeout_ms, 5000);
    assert_eq!(c.pipeline.queue_len, 1024);
    assert_eq!(c.pipeline.batch_max, 256);
    assert_eq!(c.pipeline.commit_delay_ms, 25);
    assert_eq!(c.pipeline.snapshot_interval_secs, 900);
    assert_eq!(c.pipeline.checkpoint_interval_secs, 30);
    assert_eq!(c.pipeline.max_devices, 10_000);
    assert_eq!(c.pipeline.shutdown_grace_secs, 10);
    assert_eq!(c.diff.temperature_deadband, 0.2);
    assert_eq!(c.diff.humidity_deadband, 1.0);
    assert_eq!(c.diff.measurement_min_interval_secs, 0);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Plain);
    assert!(c.devices.is_empty() && c.sources.mqtt.is_empty() && c.sinks.http.is_empty());
}

#[test]
fn component_defaults_match_their_doc_comments() {
    let text = format!("{GATEWAY}{}{}{}", mqtt(""), sim(""), https(""));
    let c = parse(&text, Path::new("t.toml")).unwrap();
    let m = &c.sources.mqtt[0];
    assert_eq!((m.host.as_str(), m.port), ("127.0.0.1", 1883));
    assert_eq!(m.effective_client_id(), "hvac-edge-z2m");
    assert_eq!(m.preset, MqttPreset::Zigbee2mqtt);
    assert_eq!(m.base_topic, "zigbee2mqtt");
    assert_eq!(m.max_payload_bytes, 65536);
    assert_eq!(m.keep_alive_secs, 30);
    assert_eq!((m.reconnect_min_ms, m.reconnect_max_ms), (1000, 30_000));
    let s = &c.sources.simulator[0];
    assert_eq!((s.devices, s.changes_per_sec, s.seed), (5, 2.0, 1));
    assert_eq!((s.device_prefix.as_str(), s.max_observations), ("sim-", 0));
    let h = &c.sinks.http[0];
    assert!(!h.allow_insecure_http);
    assert_eq!((h.batch_max_events, h.batch_max_bytes), (500, 1_048_576));
    assert_eq!(h.request_timeout_ms, 10_000);
    assert_eq!(h.retry_schedule_secs, vec![10, 30, 60, 300, 600]);
    assert_eq!(h.ttl_secs, 86_400);
    assert_eq!(h.api_version, "1");
    assert_eq!(h.from, StartFrom::Oldest);
}

// ---------------------------------------------------------------------- [gateway]

#[test]
fn gateway_id_must_not_be_empty() {
    for id in ["", "   "] {
        assert_eq!(
            problems_of(&format!("[gateway]\nid = \"{id}\"\n")),
            vec![problem("gateway.id", "must not be empty")]
        );
    }
}

#[test]
fn gateway_id_is_at_most_128_characters() {
    let long = "g".repeat(129);
    assert_eq!(
        problems_of(&format!("[gateway]\nid = \"{long}\"\n")),
        vec![problem("gateway.id", "must be at most 128 characters")]
    );
    assert_eq!(
        problems_of(&format!("[gateway]\nid = \"{}\"\n", "g".repeat(128))),
        vec![]
    );
}

#[test]
fn gateway_table_and_gateway_id_are_required() {
    assert!(parse_error("[store]\n").contains("missing field `gateway`"));
    let msg = parse_error("[gateway]\nplant = \"p\"\n");
    assert!(msg.contains("missing field `id`"), "{msg}");
}

// ---------------------------------------------------------------------- [store]

#[test]
fn store_path_must_not_be_empty() {
    assert_problems(
        "[store]\npath = \"\"\n",
        &[("store.path", "must not be empty")],
    );
}

#[test]
fn store_max_bytes_is_zero_or_at_least_one_mib() {
    for v in [1, 1_048_575] {
        assert_problems(
            &format!("[store]\nmax_bytes = {v}\n"),
            &[(
                "store.max_bytes",
                "must be 0 (no cap) or at least 1048576 (1 MiB)",
            )],
        );
    }
    assert_valid("[store]\nmax_bytes = 0\n");
    assert_valid("[store]\nmax_bytes = 1048576\n");
}

#[test]
fn store_synchronous_is_full_or_normal() {
    assert_valid("[store]\nsynchronous = \"normal\"\nmax_events = 1000\n");
    let msg = parse_error(&format!("{GATEWAY}[store]\nsynchronous = \"off\"\n"));
    assert!(
        msg.contains("unknown variant `off`, expected `full` or `normal`"),
        "{msg}"
    );
}

/// Issue 11 item 18: configured device ids follow the rule of ids from topics and payloads.
#[test]
fn configured_device_ids_are_at_most_128_bytes_without_control_characters() {
    let long = "d".repeat(129);
    let ok = "d".repeat(128);
    assert_problems(
        &format!(
            "[[devices]]\nid = \"{long}\"\n[[devices]]\nid = \"a\\u001bb\"\n[[devices]]\nid = \"{ok}\"\n"
        ),
        &[
            ("devices[0].id", "must be at most 128 bytes (it is 129)"),
            (
                "devices[1].id",
                "\"a\\u{1b}b\" must not contain control characters",
            ),
        ],
    );
    assert_problems(
        &mqtt(&format!("devices = [\"ok\", \"{long}\", \"x\\ny\"]\n")),
        &[
            (
                "sources.mqtt[0].devices[1]",
                "must be at most 128 bytes (it is 129)",
            ),
            (
                "sources.mqtt[0].devices[2]",
                "\"x\\ny\" must not contain control characters",
            ),
        ],
    );
    assert_problems(
        &format!(
            "{}{}",
            otgw("device = \"boiler\\r\"\n"),
            modbus(&format!(
                "[[sources.modbus.units]]\nunit_id = 1\ndevice = \"{long}\"\nmap = \"siemens-rdf302\"\n"
            ))
        ),
        &[
            (
                "sources.otgw[0].device",
                "\"boiler\\r\" must not contain control characters",
            ),
            (
                "sources.modbus[0].units[0].device",
                "must be at most 128 bytes (it is 129)",
            ),
        ],
    );
}

/// Issue 11 item 15: `normal` is legal but may lose acknowledged events on a power cut.
#[test]
fn store_synchronous_normal_is_a_warning_not_a_problem() {
    let text = format!("{GATEWAY}[store]\nsynchronous = \"normal\"\n");
    assert_eq!(problems_of(&text), vec![]);
    let cfg: Config = toml::from_str(&text).expect("parses");
    assert_eq!(
        cfg.warnings(),
        vec![problem(
            "store.synchronous",
            "\"normal\" does not fsync each commit: a power cut may roll back events that were \
             already acknowledged to the broker, and they are lost; use \"full\" (the default) \
             unless the gateway has a UPS or battery-backed storage"
        )]
    );
    for full in [
        GATEWAY.to_string(),
        format!("{GATEWAY}[store]\nsynchronous = \"full\"\n"),
    ] {
        let cfg: Config = toml::from_str(&full).expect("parses");
        assert_eq!(cfg.warnings(), vec![], "{full}");
    }
}

#[test]
fn store_busy_timeout_ms_of_zero_is_refused() {
    assert_problems(
        "[store]\nbusy_timeout_ms = 0\n",
        &[("store.busy_timeout_ms", "must be between 100 and 600000")],
    );
}

// ---------------------------------------------------------------------- [pipeline]

#[test]
fn pipeline_queue_len_must_be_between_1_and_1000000() {
    for v in [0, 1_000_001] {
        assert_problems(
            &format!("[pipeline]\nqueue_len = {v}\n"),
            &[("pipeline.queue_len", "must be between 1 and 1000000")],
        );
    }
    assert_valid("[pipeline]\nqueue_len = 1\n");
    assert_valid("[pipeline]\nqueue_len = 1000000\n");
}

#[test]
fn pipeline_batch_max_must_be_between_1_and_100000() {
    for v in [0, 100_001] {
        assert_problems(
            &format!("[pipeline]\nbatch_max = {v}\n"),
            &[("pipeline.batch_max", "must be between 1 and 100000")],
        );
    }
    assert_valid("[pipeline]\nbatch_max = 1\n");
    assert_valid("[pipeline]\nbatch_max = 100000\n");
}

#[test]
fn pipeline_commit_delay_ms_is_at_most_1000() {
    assert_problems(
        "[pipeline]\ncommit_delay_ms = 1001\n",
        &[("pipeline.commit_delay_ms", "must be at most 1000")],
    );
    assert_valid("[pipeline]\ncommit_delay_ms = 0\n");
    assert_valid("[pipeline]\ncommit_delay_ms = 1000\n");
}

#[test]
fn pipeline_snapshot_interval_secs_must_be_at_least_1() {
    assert_problems(
        "[pipeline]\nsnapshot_interval_secs = 0\n",
        &[("pipeline.snapshot_interval_secs", "must be at least 1")],
    );
    assert_valid("[pipeline]\nsnapshot_interval_secs = 1\n");
}

#[test]
fn pipeline_checkpoint_interval_secs_must_be_at_least_1() {
    assert_problems(
        "[pipeline]\ncheckpoint_interval_secs = 0\n",
        &[("pipeline.checkpoint_interval_secs", "must be at least 1")],
    );
    assert_valid("[pipeline]\ncheckpoint_interval_secs = 1\n");
}

#[test]
fn store_max_dead_letters_must_be_between_1000_and_10000000() {
    for v in ["999", "10000001"] {
        assert_problems(
            &format!("[store]\nmax_dead_letters = {v}\n"),
            &[(
                "store.max_dead_letters",
                "must be between 1000 and 10000000",
            )],
        );
    }
    assert_valid("[store]\nmax_dead_letters = 1000\n");
}

#[test]
fn pipeline_max_devices_must_be_between_1_and_1000000() {
    for v in ["0", "1000001"] {
        assert_problems(
            &format!("[pipeline]\nmax_devices = {v}\n"),
            &[("pipeline.max_devices", "must be between 1 and 1000000")],
        );
    }
    assert_valid("[pipeline]\nmax_devices = 1\n");
}

#[test]
fn pipeline_shutdown_grace_secs_must_be_between_1_and_25() {
    for v in ["0", "26"] {
        assert_problems(
            &format!("[pipeline]\nshutdown_grace_secs = {v}\n"),
            &[(
                "pipeline.shutdown_grace_secs",
                "must be between 1 and 25 (below the systemd unit's TimeoutStopSec=30)",
            )],
        );
    }
    assert_valid("[pipeline]\nshutdown_grace_secs = 25\n");
}

// ---------------------------------------------------------------------- [diff]

#[test]
fn diff_temperature_deadband_must_be_between_0_and_10() {
    for v in ["-0.1", "10.01", "nan", "inf"] {
        assert_problems(
            &format!("[diff]\ntemperature_deadband = {v}\n"),
            &[("diff.temperature_deadband", "must be between 0 and 10")],
        );
    }
    assert_valid("[diff]\ntemperature_deadband = 0.0\n");
    assert_valid("[diff]\ntemperature_deadband = 10\n");
}

#[test]
fn diff_humidity_deadband_must_be_between_0_and_50() {
    for v in ["-1.0", "50.5", "nan"] {
        assert_problems(
            &format!("[diff]\nhumidity_deadband = {v}\n"),
            &[("diff.humidity_deadband", "must be between 0 and 50")],
        );
    }
    assert_valid("[diff]\nhumidity_deadband = 50.0\nmeasurement_min_interval_secs = 60\n");
}

// ---------------------------------------------------------------------- [log]

#[test]
fn log_level_must_be_a_known_level() {
    assert_problems(
        "[log]\nlevel = \"verbose\"\n",
        &[(
            "log.level",
            "unknown level \"verbose\"; use error, warn, info, debug or trace",
        )],
    );
    for level in ["error", "warn", "info", "debug", "trace"] {
        assert_valid(&format!("[log]\nlevel = \"{level}\"\n"));
    }
}

#[test]
fn log_format_is_plain_or_json() {
    assert_valid("[log]\nformat = \"json\"\n");
    let msg = parse_error(&format!("{GATEWAY}[log]\nformat = \"text\"\n"));
    assert!(
        msg.contains("unknown variant `text`, expected `plain` or `json`"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------- [[devices]]

#[test]
fn device_ids_must_not_be_empty() {
    assert_problems(
        "[[devices]]\nid = \"\"\n",
        &[("devices[0].id", "must not be empty")],
    );
}

#[test]
fn device_ids_must_be_unique() {
    assert_problems(
        "[[devices]]\nid = \"a\"\n[[devices]]\nid = \"b\"\nplant = \"p\"\n[[devices]]\nid = \"a\"\nmodule = \"m\"\n",
        &[("devices[2].id", "\"a\" is already described by devices[0]")],
    );
}

#[test]
fn device_meta_falls_back_to_the_gateway_plant() {
    let c = parse(
        "[gateway]\nid = \"gw\"\nplant = \"P0\"\n[[devices]]\nid = \"a\"\nmodule = \"M\"\n[[devices]]\nid = \"b\"\nplant = \"P1\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let meta = c.device_meta();
    assert_eq!(meta["a"].plant.as_deref(), Some("P0"));
    assert_eq!(meta["a"].module.as_deref(), Some("M"));
    assert_eq!(meta["b"].plant.as_deref(), Some("P1"));
    assert_eq!(meta["b"].module, None);
}

// ---------------------------------------------------------------------- component names

#[test]
fn component_names_must_be_1_to_64_safe_characters() {
    assert_problems(
        "[[sources.simulator]]\nname = \"\"\n",
        &[("sources.simulator[0].name", "must not be empty")],
    );
    let long = "n".repeat(65);
    for bad in ["my sim", "sim/1", "sïm", long.as_str()] {
        assert_problems(
            &format!("[[sources.simulator]]\nname = \"{bad}\"\n"),
            &[(
                "sources.simulator[0].name",
                &format!("{bad:?} must be 1-64 characters of a-z, A-Z, 0-9, - and _"),
            )],
        );
    }
    assert_valid(&format!(
        "[[sources.simulator]]\nname = \"Sim_1-a{}\"\n",
        "n".repeat(57)
    ));
}

#[test]
fn source_names_are_unique_across_source_kinds() {
    assert_problems(
        &format!(
            "{}[[sources.simulator]]\nname = \"z2m\"\n[[sources.simulator]]\nname = \"z2m\"\ndevice_prefix = \"other-\"\n",
            mqtt("")
        ),
        &[
            (
                "sources.simulator[0].name",
                "\"z2m\" is already used by sources.mqtt[0]",
            ),
            (
                "sources.simulator[1].name",
                "\"z2m\" is already used by sources.mqtt[0]",
            ),
        ],
    );
}

#[test]
fn sink_names_are_unique_among_sinks_and_may_repeat_a_source_name() {
    assert_problems(
        &format!("{}{}", https(""), https("")),
        &[(
            "sinks.http[1].name",
            "\"up\" is already used by sinks.http[0]",
        )],
    );
    assert_valid(&format!(
        "[[sources.simulator]]\nname = \"up\"\n{}",
        https("")
    ));
}

// ---------------------------------------------------------------------- [[sources.mqtt]]

#[test]
fn mqtt_host_must_not_be_empty() {
    for host in ["", "  "] {
        assert_problems(
            &mqtt(&format!("host = \"{host}\"\n")),
            &[("sources.mqtt[0].host", "must not be empty")],
        );
    }
}

#[test]
fn mqtt_port_must_not_be_0() {
    assert_problems(
        &mqtt("port = 0\n"),
        &[("sources.mqtt[0].port", "must not be 0")],
    );
    assert_valid(&mqtt("port = 65535\n"));
}

#[test]
fn mqtt_client_id_must_be_1_to_128_characters() {
    for id in [String::new(), "c".repeat(129)] {
        assert_problems(
            &mqtt(&format!("client_id = \"{id}\"\n")),
            &[("sources.mqtt[0].client_id", "must be 1 to 128 characters")],
        );
    }
    assert_valid(&mqtt(&format!("client_id = \"{}\"\n", "c".repeat(128))));
}

#[test]
fn mqtt_password_file_and_password_env_are_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let f = secret_file(&dir, "pw", "s3cret\n", 0o600);
    assert_problems(
        &mqtt(&format!(
            "username = \"u\"\npassword_file = {}\npassword_env = \"{SET_VAR}\"\n",
            toml_path(&f)
        )),
        &[(
            "sources.mqtt[0].password_file",
            "set password_file or password_env, not both",
        )],
    );
}

#[test]
fn mqtt_password_needs_a_username() {
    assert_problems(
        &mqtt(&format!("password_env = \"{SET_VAR}\"\n")),
        &[(
            "sources.mqtt[0].username",
            "a password is set but no username",
        )],
    );
    assert_valid(&mqtt(&format!(
        "username = \"u\"\npassword_env = \"{SET_VAR}\"\n"
    )));
    assert_valid(&mqtt("username = \"u\"\n"));
}

#[test]
fn mqtt_password_env_must_be_set() {
    assert_problems(
        &mqtt(&format!(
            "username = \"u\"\npassword_env = \"{UNSET_VAR}\"\n"
        )),
        &[(
            "sources.mqtt[0].password_env",
            &format!("environment variable {UNSET_VAR} is unset or empty"),
        )],
    );
}

/// Issue 11 item 20: a username (and its password) to a broker on another host would cross the
/// LAN in clear; the loopback needs no TLS.
#[test]
fn mqtt_credentials_to_a_non_loopback_broker_need_tls() {
    let refused = (
        "sources.mqtt[0].username",
        "credentials to a non-loopback broker need TLS (set ca_file or tls = true)",
    );
    for host in ["192.168.1.20", "broker.lan", "[fd00::1]"] {
        assert_problems(
            &mqtt(&format!("host = \"{host}\"\nusername = \"u\"\n")),
            &[refused],
        );
        assert_problems(
            &mqtt(&format!(
                "host = \"{host}\"\nusername = \"u\"\npassword_env = \"{SET_VAR}\"\ntls = false\n"
            )),
            &[refused],
        );
        // Without credentials there is nothing to protect (the data itself is the LAN's).
        assert_valid(&mqtt(&format!("host = \"{host}\"\n")));
    }
    for host in ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"] {
        assert_valid(&mqtt(&format!(
            "host = \"{host}\"\nusername = \"u\"\npassword_env = \"{SET_VAR}\"\n"
        )));
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = tls_files(&dir);
    assert_valid(&mqtt(&format!(
        "host = \"broker.lan\"\nusername = \"u\"\npassword_env = \"{SET_VAR}\"\nca_file = {}\n",
        toml_path(&ca)
    )));
    let c = parse(
        &format!(
            "{GATEWAY}{}",
            mqtt(&format!(
                "host = \"broker.lan\"\nca_file = {}\n",
                toml_path(&ca)
            ))
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    assert!(c.sources.mqtt[0].tls_enabled(), "ca_file implies TLS");
    assert!(matches!(c.sources.mqtt[0].tls_client_config(), Ok(Some(_))));
    let plain = parse(&format!("{GATEWAY}{}", mqtt("")), Path::new("t.toml")).unwrap();
    assert!(
        !plain.sources.mqtt[0].tls_enabled(),
        "TLS is off by default"
    );
    assert!(matches!(
        plain.sources.mqtt[0].tls_client_config(),
        Ok(None)
    ));
}

/// `tls = true` without ca_file trusts the platform's CA certificates (this machine has
/// ca-certificates installed, as every gateway image does).
#[test]
fn mqtt_tls_without_ca_file_trusts_the_platform_roots() {
    assert_valid(&mqtt(
        "host = \"broker.example.com\"\nusername = \"u\"\ntls = true\n",
    ));
}

#[test]
fn mqtt_tls_false_with_ca_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _, _) = tls_files(&dir);
    assert_problems(
        &mqtt(&format!("tls = false\nca_file = {}\n", toml_path(&ca))),
        &[(
            "sources.mqtt[0].tls",
            "is false but ca_file is set; remove ca_file or set tls = true",
        )],
    );
    assert_valid(&mqtt(&format!(
        "tls = true\nca_file = {}\n",
        toml_path(&ca)
    )));
}

/// A CA file is loaded when the config is checked: missing, not a file, not PEM, or PEM with no
/// certificate are each a problem naming `ca_file` and the path, never a panic.
#[test]
fn mqtt_ca_file_must_hold_pem_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("absent.pem");
    let text = secret_file(&dir, "notes.txt", "this is not a certificate\n", 0o644);
    let key_only = secret_file(&dir, "key.pem", TEST_CLIENT_KEY_PEM, 0o644);
    let truncated = secret_file(
        &dir,
        "truncated.pem",
        &TEST_CA_PEM[..TEST_CA_PEM.len() - 30],
        0o644,
    );
    let bad_der = secret_file(
        &dir,
        "bad-der.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        0o644,
    );
    let cases: Vec<(&Path, String)> = vec![
        (
            &absent,
            format!(
                "cannot read {}: No such file or directory (os error 2)",
                absent.display()
            ),
        ),
        (
            dir.path(),
            format!("{} is not a regular file", dir.path().display()),
        ),
        (
            &text,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                text.display()
            ),
        ),
        (
            &key_only,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                key_only.display()
            ),
        ),
        (
            &truncated,
            format!(
                "{} is not valid PEM: a PEM section has no END line",
                truncated.display()
            ),
        ),
        (
            &bad_der,
            format!(
                "certificate 1 in {} is not a usable CA certificate: BadEncoding",
                bad_der.display()
            ),
        ),
    ];
    for (path, want) in cases {
        assert_problems(
            &mqtt(&format!("ca_file = {}\n", toml_path(path))),
            &[("sources.mqtt[0].ca_file", &want)],
        );
    }
}

#[test]
fn mqtt_client_certificate_needs_both_files_and_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(&dir);
    let ca_line = format!("ca_file = {}\n", toml_path(&ca));
    let cert_line = format!("cert_file = {}\n", toml_path(&cert));
    let key_line = format!("key_file = {}\n", toml_path(&key));
    assert_problems(
        &mqtt(&format!("{ca_line}{cert_line}")),
        &[(
            "sources.mqtt[0].key_file",
            "cert_file is set but not key_file; a client certificate needs both",
        )],
    );
    assert_problems(
        &mqtt(&format!("{ca_line}{key_line}")),
        &[(
            "sources.mqtt[0].cert_file",
            "key_file is set but not cert_file; a client certificate needs both",
        )],
    );
    assert_problems(
        &mqtt(&format!("{cert_line}{key_line}")),
        &[(
            "sources.mqtt[0].cert_file",
            "a client certificate needs TLS (set ca_file or tls = true)",
        )],
    );
    assert_valid(&mqtt(&format!("{ca_line}{cert_line}{key_line}")));
    assert_valid(&mqtt(&format!("tls = true\n{cert_line}{key_line}")));
}

/// The client key is a secret: checked like password_file on the open descriptor, never
/// quoted in an error; it must be a private key, and the certificate's.
#[test]
fn mqtt_key_file_is_a_secret_that_must_belong_to_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, _) = tls_files(&dir);
    let open_key = secret_file(&dir, "open.key", TEST_CLIENT_KEY_PEM, 0o640);
    let other_key = secret_file(&dir, "other.key", TEST_OTHER_KEY_PEM, 0o600);
    let cert_as_key = secret_file(&dir, "cert-as-key.pem", TEST_CLIENT_CERT_PEM, 0o600);
    let broken = secret_file(
        &dir,
        "broken.key",
        "-----BEGIN PRIVATE KEY-----\nnot base64 at all: s3cret!\n-----END PRIVATE KEY-----\n",
        0o600,
    );
    let big = secret_file(&dir, "big.key", &"A".repeat(65_537), 0o600);
    let cases: Vec<(&Path, String)> = vec![
        (
            &open_key,
            format!(
                "{} is accessible by group or others (mode 640); run chmod 600 {}",
                open_key.display(),
                open_key.display()
            ),
        ),
        (
            &other_key,
            format!(
                "{} is not the key of the certificate in {}",
                other_key.display(),
                cert.display()
            ),
        ),
        (
            &cert_as_key,
            format!(
                "{} holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or \
                 EC PRIVATE KEY)",
                cert_as_key.display()
            ),
        ),
        (
            &broken,
            format!(
                "{} is not valid PEM: a PEM section is not valid base64",
                broken.display()
            ),
        ),
        (
            &big,
            format!(
                "{} is larger than 65536 bytes; it must hold only the secret",
                big.display()
            ),
        ),
    ];
    for (key, want) in cases {
        let body = mqtt(&format!(
            "ca_file = {}\ncert_file = {}\nkey_file = {}\n",
            toml_path(&ca),
            toml_path(&cert),
            toml_path(key)
        ));
        assert_problems(&body, &[("sources.mqtt[0].key_file", &want)]);
        let err = parse(&format!("{GATEWAY}{body}"), Path::new("t.toml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            !err.contains("s3cret") && !err.contains("MIGHAgEA"),
            "{err}"
        );
    }
    // Every TLS problem of a source is reported at once.
    let absent = dir.path().join("absent.crt");
    assert_problems(
        &mqtt(&format!(
            "ca_file = {}\ncert_file = {}\nkey_file = {}\n",
            toml_path(&absent),
            toml_path(&absent),
            toml_path(&open_key)
        )),
        &[
            (
                "sources.mqtt[0].ca_file",
                &format!(
                    "cannot read {}: No such file or directory (os error 2)",
                    absent.display()
                ),
            ),
            (
                "sources.mqtt[0].cert_file",
                &format!(
                    "cannot read {}: No such file or directory (os error 2)",
                    absent.display()
                ),
            ),
            (
                "sources.mqtt[0].key_file",
                &format!(
                    "{} is accessible by group or others (mode 640); run chmod 600 {}",
                    open_key.display(),
                    open_key.display()
                ),
            ),
        ],
    );
}

#[test]
fn mqtt_max_payload_bytes_must_be_between_1024_and_16777216() {
    for v in [1023, 16_777_217] {
        assert_problems(
            &mqtt(&format!("max_payload_bytes = {v}\n")),
            &[(
                "sources.mqtt[0].max_payload_bytes",
                "must be between 1024 and 16777216",
            )],
        );
    }
    assert_valid(&mqtt("max_payload_bytes = 1024\n"));
    assert_valid(&mqtt("max_payload_bytes = 16777216\n"));
}

#[test]
fn mqtt_keep_alive_secs_must_be_between_5_and_3600() {
    for v in [0, 4, 3601] {
        assert_problems(
            &mqtt(&format!("keep_alive_secs = {v}\n")),
            &[(
                "sources.mqtt[0].keep_alive_secs",
                "must be between 5 and 3600",
            )],
        );
    }
    assert_valid(&mqtt("keep_alive_secs = 5\n"));
    assert_valid(&mqtt("keep_alive_secs = 3600\n"));
}

#[test]
fn mqtt_max_inflight_is_not_a_key_the_broker_sets_the_window() {
    // rumqttc's in-flight limit only concerns messages we publish; the window of messages sent
    // to us is the broker's max_inflight_messages. A key that does nothing is refused.
    let err = parse_error(&format!("{GATEWAY}{}", mqtt("max_inflight = 1000\n")));
    assert!(err.contains("max_inflight"), "{err}");
}

#[test]
fn mqtt_reconnect_min_ms_must_be_positive_and_at_most_reconnect_max_ms() {
    for extra in [
        "reconnect_min_ms = 0\n",
        "reconnect_min_ms = 5000\nreconnect_max_ms = 1000\n",
    ] {
        assert_problems(
            &mqtt(extra),
            &[(
                "sources.mqtt[0].reconnect_min_ms",
                "must be at least 1 and at most reconnect_max_ms",
            )],
        );
    }
    assert_valid(&mqtt("reconnect_min_ms = 1000\nreconnect_max_ms = 1000\n"));
}

#[test]
fn zigbee2mqtt_base_topic_must_be_non_empty_without_wildcards() {
    for base in ["", "zigbee2mqtt/+", "z/#", "z+"] {
        assert_problems(
            &mqtt(&format!("base_topic = \"{base}\"\n")),
            &[(
                "sources.mqtt[0].base_topic",
                "must be a non-empty topic without wildcards",
            )],
        );
    }
    assert_valid(&mqtt("base_topic = \"site/zigbee\"\n"));
}

#[test]
fn zigbee2mqtt_preset_refuses_topics() {
    assert_problems(
        &mqtt("topics = [\"a/+\"]\n"),
        &[(
            "sources.mqtt[0].topics",
            "only used with preset = \"generic\"; the zigbee2mqtt preset subscribes to <base_topic>/#",
        )],
    );
}

#[test]
fn zigbee2mqtt_preset_refuses_a_mapping() {
    assert_problems(
        &mqtt("[sources.mqtt.mapping]\ndevice = \"/id\"\n"),
        &[(
            "sources.mqtt[0].mapping",
            "only used with preset = \"generic\"",
        )],
    );
}

#[test]
fn mqtt_preset_is_zigbee2mqtt_or_generic() {
    let msg = parse_error(&format!("{GATEWAY}{}", mqtt("preset = \"z2m\"\n")));
    assert!(
        msg.contains("unknown variant `z2m`, expected `zigbee2mqtt` or `generic`"),
        "{msg}"
    );
}

#[test]
fn generic_preset_needs_at_least_one_topic() {
    assert_problems(
        &generic("", MAPPING),
        &[(
            "sources.mqtt[0].topics",
            "the generic preset needs at least one topic filter",
        )],
    );
}

#[test]
fn generic_topic_filters_must_be_valid() {
    assert_problems(
        &generic(
            "topics = [\"a/#/b\", \"home/+/state\", \"a+/b\", \"\", \"#\", \"+/+/x\"]\n",
            MAPPING,
        ),
        &[
            (
                "sources.mqtt[0].topics[0]",
                "\"a/#/b\" is not a valid MQTT topic filter",
            ),
            (
                "sources.mqtt[0].topics[2]",
                "\"a+/b\" is not a valid MQTT topic filter",
            ),
            (
                "sources.mqtt[0].topics[3]",
                "\"\" is not a valid MQTT topic filter",
            ),
        ],
    );
}

#[test]
fn generic_preset_needs_a_mapping() {
    assert_problems(
        &generic(TOPICS, ""),
        &[(
            "sources.mqtt[0].mapping",
            "the generic preset needs a [sources.mqtt.mapping] table",
        )],
    );
    assert_valid(&generic(TOPICS, MAPPING));
}

#[test]
fn generic_mapping_device_is_a_topic_level_or_a_json_pointer() {
    let with_device = |d: &str| {
        generic(
            TOPICS,
            &format!(
                "[sources.mqtt.mapping]\ndevice = \"{d}\"\n[sources.mqtt.mapping.fields]\nmode = \"/mode\"\n"
            ),
        )
    };
    assert_problems(
        &with_device("id"),
        &[(
            "sources.mqtt[0].mapping.device",
            "\"id\" is neither {topic:N} (0-based topic level) nor a JSON pointer like /id",
        )],
    );
    assert_problems(
        &with_device("{topic:x}"),
        &[(
            "sources.mqtt[0].mapping.device",
            "\"{topic:x}\": the topic level must be a small non-negative integer, e.g. {topic:1}",
        )],
    );
    assert_valid(&with_device("/id"));
    assert_valid(&with_device("{topic:0}"));
}

#[test]
fn generic_mapping_needs_at_least_one_field() {
    assert_problems(
        &generic(TOPICS, "[sources.mqtt.mapping]\ndevice = \"/id\"\n"),
        &[(
            "sources.mqtt[0].mapping.fields",
            "map at least one canonical field to a JSON pointer",
        )],
    );
}

#[test]
fn generic_mapping_fields_must_be_canonical_fields() {
    assert_problems(
        &generic(
            TOPICS,
            "[sources.mqtt.mapping]\ndevice = \"/id\"\n[sources.mqtt.mapping.fields]\ntarget = \"/t\"\nsetpoint = \"/sp\"\n",
        ),
        &[(
            "sources.mqtt[0].mapping.fields.target",
            "unknown canonical field \"target\"; expected one of function, mode, setpoint, program, activation_time, load_state, temperature, humidity, connectivity",
        )],
    );
}

#[test]
fn generic_mapping_fields_must_be_json_pointers() {
    assert_problems(
        &generic(
            TOPICS,
            "[sources.mqtt.mapping]\ndevice = \"/id\"\n[sources.mqtt.mapping.fields]\nsetpoint = \"target\"\ntemperature = \"/a~2b\"\nhumidity = \"/a~1b/~0c\"\n",
        ),
        &[
            (
                "sources.mqtt[0].mapping.fields.setpoint",
                "JSON pointer \"target\" must start with /",
            ),
            (
                "sources.mqtt[0].mapping.fields.temperature",
                "JSON pointer \"/a~2b\": ~ must be followed by 0 (for ~) or 1 (for /)",
            ),
        ],
    );
}

#[test]
fn generic_mapping_value_maps_apply_to_enum_fields_only() {
    assert_problems(
        &generic(
            TOPICS,
            "[sources.mqtt.mapping]\ndevice = \"/id\"\n[sources.mqtt.mapping.fields]\nsetpoint = \"/sp\"\n[sources.mqtt.mapping.values.setpoint]\nhigh = \"ACTIVE\"\n[sources.mqtt.mapping.values.fan]\nauto = \"ON\"\n",
        ),
        &[
            (
                "sources.mqtt[0].mapping.values.fan",
                "unknown enum field \"fan\"; expected one of function, mode, load_state, connectivity",
            ),
            (
                "sources.mqtt[0].mapping.values.setpoint",
                "setpoint is not an enum field; value maps apply to function, mode, load_state, connectivity",
            ),
        ],
    );
}

#[test]
fn generic_mapping_values_must_be_canonical_values() {
    assert_problems(
        &generic(
            TOPICS,
            "[sources.mqtt.mapping]\ndevice = \"/id\"\n[sources.mqtt.mapping.fields]\nmode = \"/mode\"\nload_state = \"/action\"\n[sources.mqtt.mapping.values.mode]\nheat = \"HEATING\"\nauto = \"automatic\"\n[sources.mqtt.mapping.values.load_state]\nidle = \"IDLE\"\n",
        ),
        &[
            (
                "sources.mqtt[0].mapping.values.load_state.idle",
                "\"IDLE\" is not a valid value here; expected one of ACTIVE, INACTIVE",
            ),
            (
                "sources.mqtt[0].mapping.values.mode.heat",
                "\"HEATING\" is not a valid value here; expected one of AUTOMATIC, MANUAL, BOOST, OFF, PROTECTION",
            ),
        ],
    );
}

#[test]
fn generic_mapping_value_map_without_its_field_is_refused() {
    assert_problems(
        &generic(
            TOPICS,
            "[sources.mqtt.mapping]\ndevice = \"/id\"\n[sources.mqtt.mapping.fields]\nsetpoint = \"/sp\"\n[sources.mqtt.mapping.values.mode]\nheat = \"MANUAL\"\n",
        ),
        &[(
            "sources.mqtt[0].mapping.values.mode",
            "mode has no JSON pointer in fields, so this value map is never used",
        )],
    );
}

#[test]
fn generic_mapping_availability_topic_holds_device_once_as_a_whole_level() {
    let with_availability = |a: &str| {
        generic(
            TOPICS,
            &format!(
                "[sources.mqtt.mapping]\ndevice = \"{{topic:1}}\"\navailability_topic = \"{a}\"\n[sources.mqtt.mapping.fields]\nmode = \"/mode\"\n"
            ),
        )
    };
    for bad in [
        "home/status",
        "home/dev-{device}/status",
        "{device}/{device}",
    ] {
        assert_problems(
            &with_availability(bad),
            &[(
                "sources.mqtt[0].mapping.availability_topic",
                &format!("{bad:?} must contain {{device}} exactly once, as a whole topic level"),
            )],
        );
    }
    assert_problems(
        &with_availability("+/{device}/status"),
        &[(
            "sources.mqtt[0].mapping.availability_topic",
            "\"+/{device}/status\": use {device}, not MQTT wildcards",
        )],
    );
    assert_valid(&with_availability("home/{device}/status"));
    assert_valid(&with_availability("{device}/availability"));
}

#[test]
fn generic_mapping_unit_is_c_or_f() {
    assert_valid(&generic(
        TOPICS,
        "[sources.mqtt.mapping]\ndevice = \"/id\"\nunit = \"F\"\n[sources.mqtt.mapping.fields]\nsetpoint = \"/sp\"\n",
    ));
    let msg = parse_error(&format!(
        "{GATEWAY}{}",
        generic(
            TOPICS,
            "[sources.mqtt.mapping]\ndevice = \"/id\"\nunit = \"K\"\n"
        )
    ));
    assert!(msg.contains("unknown variant `K`"), "{msg}");
}

#[test]
fn two_mqtt_sources_with_one_client_id_on_one_broker_are_refused() {
    let got = problems_of(&format!(
        "{GATEWAY}[[sources.mqtt]]\nname = \"a\"\nclient_id = \"hvac-edge-b\"\n[[sources.mqtt]]\nname = \"b\"\n"
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sources.mqtt[1].client_id");
    assert!(got[0].problem.contains("sources.mqtt[0]"), "{got:?}");
}

#[test]
fn two_sources_claiming_the_same_device_ids_are_refused() {
    let got = problems_of(&format!(
        "{GATEWAY}[[sources.simulator]]\nname = \"a\"\n[[sources.simulator]]\nname = \"b\"\ndevices = 2\n"
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sources.simulator[1].device_prefix");
    assert!(got[0].problem.contains("sources.simulator[0]"), "{got:?}");

    let got = problems_of(&format!(
        "{GATEWAY}[[sources.mqtt]]\nname = \"a\"\ndevices = [\"kitchen\"]\n[[sources.mqtt]]\nname = \"b\"\nbase_topic = \"z2\"\ndevices = [\"hall\", \"kitchen\"]\n"
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sources.mqtt[1].devices[1]");
    assert!(got[0].problem.contains("sources.mqtt[0]"), "{got:?}");
}

// ---------------------------------------------------------------------- [[sources.simulator]]

#[test]
fn simulator_devices_must_be_between_1_and_100000() {
    for v in [0, 100_001] {
        assert_problems(
            &sim(&format!("devices = {v}\n")),
            &[(
                "sources.simulator[0].devices",
                "must be between 1 and 100000",
            )],
        );
    }
    assert_valid(&sim("devices = 100000\n"));
}

#[test]
fn simulator_changes_per_sec_must_be_positive_and_at_most_1000000() {
    for v in ["0.0", "-1.0", "1000000.5", "nan", "inf"] {
        assert_problems(
            &sim(&format!("changes_per_sec = {v}\n")),
            &[(
                "sources.simulator[0].changes_per_sec",
                "must be greater than 0 and at most 1000000",
            )],
        );
    }
    assert_valid(&sim(
        "changes_per_sec = 1000000.0\nseed = 9\ndevice_prefix = \"t-\"\nmax_observations = 20\n",
    ));
}

// ---------------------------------------------------------------------- [[sinks.http]]

#[test]
fn sink_url_must_be_a_url() {
    assert_problems(
        &sink("not a url", ""),
        &[(
            "sinks.http[0].url",
            "\"not a url\" is not a valid URL: relative URL without a base",
        )],
    );
}

#[test]
fn sink_url_scheme_must_be_https_or_http() {
    assert_problems(
        &sink("ftp://ingest.example.com/x", ""),
        &[(
            "sinks.http[0].url",
            "scheme \"ftp\" is not supported; use https://",
        )],
    );
}

#[test]
fn plain_http_is_refused_for_non_loopback_hosts_even_when_allowed() {
    for url in [
        "http://ingest.example.com/v1/events",
        "http://10.0.0.1/x",
        "http://192.168.1.10:8080/x",
        "http://localhost.example.com/x",
        "http://[fe80::1]/x",
    ] {
        for allow in ["", "allow_insecure_http = true\n"] {
            assert_problems(
                &sink(url, allow),
                &[(
                    "sinks.http[0].url",
                    "plain http:// is refused for non-loopback hosts; use https://",
                )],
            );
        }
    }
}

#[test]
fn plain_http_to_loopback_needs_allow_insecure_http() {
    for url in [
        "http://127.0.0.1:8080/x",
        "http://[::1]:8080/x",
        "http://localhost/x",
    ] {
        assert_problems(
            &sink(url, ""),
            &[(
                "sinks.http[0].url",
                "plain http:// needs allow_insecure_http = true (accepted for loopback hosts only)",
            )],
        );
        assert_problems(
            &sink(url, "allow_insecure_http = false\n"),
            &[(
                "sinks.http[0].url",
                "plain http:// needs allow_insecure_http = true (accepted for loopback hosts only)",
            )],
        );
    }
}

#[test]
fn plain_http_to_loopback_is_accepted_with_allow_insecure_http() {
    for url in [
        "http://127.0.0.1:8080/x",
        "http://127.0.0.2/x",
        "http://[::1]:8080/x",
        "http://localhost/x",
        "http://LOCALHOST:9/x",
    ] {
        assert_valid(&sink(url, "allow_insecure_http = true\n"));
    }
}

#[test]
fn allow_insecure_http_with_https_is_refused() {
    assert_problems(
        &https("allow_insecure_http = true\n"),
        &[(
            "sinks.http[0].allow_insecure_http",
            "only meaningful with an http:// URL; remove it",
        )],
    );
    assert_valid(&https("allow_insecure_http = false\n"));
}

#[test]
fn credentials_in_the_sink_url_are_refused() {
    let got = problems_of(&format!(
        "{GATEWAY}{}",
        sink("https://user:s3cret@ingest.example.com/v1/events", "")
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sinks.http[0].url");
    assert!(!got[0].problem.contains("s3cret"), "{got:?}");
}

#[test]
fn sink_batch_max_events_must_be_between_1_and_10000() {
    for v in [0, 10_001] {
        assert_problems(
            &https(&format!("batch_max_events = {v}\n")),
            &[(
                "sinks.http[0].batch_max_events",
                "must be between 1 and 10000",
            )],
        );
    }
    assert_valid(&https("batch_max_events = 10000\n"));
}

#[test]
fn sink_batch_max_bytes_must_be_between_1024_and_67108864() {
    for v in [1023, 67_108_865] {
        assert_problems(
            &https(&format!("batch_max_bytes = {v}\n")),
            &[(
                "sinks.http[0].batch_max_bytes",
                "must be between 1024 and 67108864",
            )],
        );
    }
    assert_valid(&https("batch_max_bytes = 1024\n"));
}

#[test]
fn sink_request_timeout_ms_must_be_between_100_and_600000() {
    for v in [99, 600_001] {
        assert_problems(
            &https(&format!("request_timeout_ms = {v}\n")),
            &[(
                "sinks.http[0].request_timeout_ms",
                "must be between 100 and 600000",
            )],
        );
    }
    assert_valid(&https("request_timeout_ms = 100\n"));
}

#[test]
fn sink_retry_schedule_must_list_waits_between_1_and_86400_secs() {
    assert_problems(
        &https("retry_schedule_secs = []\n"),
        &[(
            "sinks.http[0].retry_schedule_secs",
            "must list at least one wait, e.g. [10, 30, 60, 300, 600]",
        )],
    );
    for v in ["[10, 0]", "[86401]"] {
        assert_problems(
            &https(&format!("retry_schedule_secs = {v}\n")),
            &[(
                "sinks.http[0].retry_schedule_secs",
                "every wait must be between 1 and 86400 seconds",
            )],
        );
    }
    assert_valid(&https("retry_schedule_secs = [1, 86400]\n"));
}

#[test]
fn sink_ttl_secs_must_be_at_least_1() {
    assert_problems(
        &https("ttl_secs = 0\n"),
        &[("sinks.http[0].ttl_secs", "must be at least 1")],
    );
    assert_valid(&https("ttl_secs = 1\n"));
}

#[test]
fn sink_api_key_header_and_api_key_query_are_exclusive() {
    assert_problems(
        &https(&format!(
            "api_key_header = \"X-Key\"\napi_key_query = \"key\"\napi_key_env = \"{SET_VAR}\"\n"
        )),
        &[(
            "sinks.http[0].api_key_query",
            "set api_key_header or api_key_query, not both",
        )],
    );
}

#[test]
fn sink_api_key_header_must_be_a_header_name() {
    assert_problems(
        &https(&format!(
            "api_key_header = \"Bad Header\"\napi_key_env = \"{SET_VAR}\"\n"
        )),
        &[(
            "sinks.http[0].api_key_header",
            "\"Bad Header\" is not a valid HTTP header name",
        )],
    );
}

#[test]
fn sink_api_key_file_and_api_key_env_are_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let f = secret_file(&dir, "key", "k3y", 0o600);
    assert_problems(
        &https(&format!(
            "api_key_header = \"X-Key\"\napi_key_file = {}\napi_key_env = \"{SET_VAR}\"\n",
            toml_path(&f)
        )),
        &[(
            "sinks.http[0].api_key_file",
            "set api_key_file or api_key_env, not both",
        )],
    );
}

#[test]
fn sink_api_key_place_needs_a_key() {
    for place in ["api_key_header = \"X-Key\"\n", "api_key_query = \"key\"\n"] {
        assert_problems(
            &https(place),
            &[(
                "sinks.http[0].api_key_file",
                "api_key_header/api_key_query is set but no api_key_file or api_key_env",
            )],
        );
    }
}

#[test]
fn sink_api_key_needs_a_place() {
    assert_problems(
        &https(&format!("api_key_env = \"{SET_VAR}\"\n")),
        &[(
            "sinks.http[0].api_key_header",
            "an API key is configured but neither api_key_header nor api_key_query says where to send it",
        )],
    );
    assert_valid(&https(&format!(
        "api_key_query = \"key\"\napi_key_env = \"{SET_VAR}\"\n"
    )));
}

#[test]
fn sink_api_key_env_must_be_set() {
    assert_problems(
        &https(&format!(
            "api_key_header = \"X-Key\"\napi_key_env = \"{UNSET_VAR}\"\n"
        )),
        &[(
            "sinks.http[0].api_key_env",
            &format!("environment variable {UNSET_VAR} is unset or empty"),
        )],
    );
}

#[test]
fn sink_api_key_query_must_not_be_empty() {
    assert_problems(
        &https(&format!(
            "api_key_query = \"\"\napi_key_env = \"{SET_VAR}\"\n"
        )),
        &[("sinks.http[0].api_key_query", "must not be empty")],
    );
}

#[test]
fn sink_signing_secret_file_and_env_are_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let f = secret_file(&dir, "whsec", WHSEC, 0o600);
    assert_problems(
        &https(&format!(
            "signing_secret_file = {}\nsigning_secret_env = \"{SET_VAR}\"\n",
            toml_path(&f)
        )),
        &[(
            "sinks.http[0].signing_secret_file",
            "set signing_secret_file or signing_secret_env, not both",
        )],
    );
}

#[test]
fn a_bad_whsec_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "whsec_not*base64!",
            "not a usable whsec_ secret: webhook secret is not valid base64 (expected whsec_<base64>)",
        ),
        (
            // 8 bytes decoded.
            "whsec_AAAAAAAAAAA=",
            "not a usable whsec_ secret: webhook secret is 8 bytes; at least 16 bytes are required",
        ),
        (
            "whsec_\n",
            "not a usable whsec_ secret: webhook secret is empty",
        ),
    ];
    for (i, (content, want)) in cases.iter().enumerate() {
        let f = secret_file(&dir, &format!("whsec-{i}"), content, 0o600);
        assert_problems(
            &https(&format!("signing_secret_file = {}\n", toml_path(&f))),
            &[("sinks.http[0].signing_secret_file", want)],
        );
    }
    // The secret itself never appears in the message.
    let f = secret_file(&dir, "leak", "whsec_SECRETSECRET*", 0o600);
    let got = problems_of(&format!(
        "{GATEWAY}{}",
        https(&format!("signing_secret_file = {}\n", toml_path(&f)))
    ));
    assert!(!got[0].problem.contains("SECRETSECRET"), "{got:?}");
}

#[test]
fn a_bad_whsec_secret_from_the_environment_is_refused() {
    // PATH is no whsec_ secret (not base64, or far too short).
    let got = problems_of(&format!(
        "{GATEWAY}{}",
        https(&format!("signing_secret_env = \"{SET_VAR}\"\n"))
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sinks.http[0].signing_secret_env");
    assert!(
        got[0].problem.starts_with("not a usable whsec_ secret: "),
        "{got:?}"
    );
    assert_problems(
        &https(&format!("signing_secret_env = \"{UNSET_VAR}\"\n")),
        &[(
            "sinks.http[0].signing_secret_env",
            &format!("environment variable {UNSET_VAR} is unset or empty"),
        )],
    );
}

#[test]
fn a_good_whsec_secret_is_accepted_with_or_without_prefix_and_newline() {
    let dir = tempfile::tempdir().unwrap();
    for (i, content) in [
        WHSEC.to_string(),
        format!("{WHSEC}\n"),
        WHSEC.trim_start_matches("whsec_").to_string(),
    ]
    .iter()
    .enumerate()
    {
        let f = secret_file(&dir, &format!("ok-{i}"), content, 0o600);
        assert_valid(&https(&format!(
            "signing_secret_file = {}\n",
            toml_path(&f)
        )));
    }
}

#[test]
fn sink_api_version_must_be_a_non_empty_header_value() {
    for v in ["", "1\\n"] {
        assert_problems(
            &https(&format!("api_version = \"{v}\"\n")),
            &[(
                "sinks.http[0].api_version",
                "must be a non-empty header value",
            )],
        );
    }
    assert_valid(&https("api_version = \"2026-11-23\"\n"));
}

#[test]
fn sink_from_is_oldest_or_now() {
    assert_valid(&https("from = \"now\"\n"));
    let msg = parse_error(&format!("{GATEWAY}{}", https("from = \"latest\"\n")));
    assert!(
        msg.contains("unknown variant `latest`, expected `oldest` or `now`"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------- secret files

#[test]
fn secret_files_readable_by_group_or_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o644, 0o640, 0o604, 0o660, 0o606] {
        let f = secret_file(&dir, &format!("whsec-{mode:o}"), WHSEC, mode);
        let want = format!(
            "{} is accessible by group or others (mode {mode:o}); run chmod 600 {}",
            f.display(),
            f.display()
        );
        assert_problems(
            &https(&format!("signing_secret_file = {}\n", toml_path(&f))),
            &[("sinks.http[0].signing_secret_file", &want)],
        );
    }
    let key = secret_file(&dir, "api-key", "k3y", 0o644);
    let pw = secret_file(&dir, "mqtt-pw", "pw", 0o644);
    let mode_msg = |p: &Path| {
        format!(
            "{} is accessible by group or others (mode 644); run chmod 600 {}",
            p.display(),
            p.display()
        )
    };
    assert_problems(
        &format!(
            "{}{}",
            mqtt(&format!(
                "username = \"u\"\npassword_file = {}\n",
                toml_path(&pw)
            )),
            https(&format!(
                "api_key_header = \"X-Key\"\napi_key_file = {}\n",
                toml_path(&key)
            ))
        ),
        &[
            ("sources.mqtt[0].password_file", &mode_msg(&pw)),
            ("sinks.http[0].api_key_file", &mode_msg(&key)),
        ],
    );
}

#[test]
fn secret_files_readable_by_their_owner_only_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o600, 0o400] {
        let whsec = secret_file(&dir, &format!("whsec-{mode:o}"), WHSEC, mode);
        let key = secret_file(&dir, &format!("key-{mode:o}"), "k3y\n", mode);
        let pw = secret_file(&dir, &format!("pw-{mode:o}"), "pw", mode);
        assert_valid(&format!(
            "{}{}",
            mqtt(&format!(
                "username = \"u\"\npassword_file = {}\n",
                toml_path(&pw)
            )),
            https(&format!(
                "api_key_header = \"X-Key\"\napi_key_file = {}\nsigning_secret_file = {}\n",
                toml_path(&key),
                toml_path(&whsec)
            ))
        ));
    }
}

#[test]
fn a_missing_secret_file_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("absent");
    assert_problems(
        &https(&format!("signing_secret_file = {}\n", toml_path(&f))),
        &[(
            "sinks.http[0].signing_secret_file",
            &format!(
                "cannot read {}: No such file or directory (os error 2)",
                f.display()
            ),
        )],
    );
}

#[test]
fn an_empty_secret_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = secret_file(&dir, "blank", " \n", 0o600);
    assert_problems(
        &https(&format!(
            "api_key_header = \"X-Key\"\napi_key_file = {}\n",
            toml_path(&f)
        )),
        &[(
            "sinks.http[0].api_key_file",
            &format!("{} is empty", f.display()),
        )],
    );
}

#[test]
fn read_secret_file_trims_surrounding_whitespace() {
    let dir = tempfile::tempdir().unwrap();
    let f = secret_file(&dir, "s", "  s3cret \n", 0o600);
    assert_eq!(read_secret_file(&f), Ok("s3cret".to_string()));
}

// ---------------------------------------------------------------------- several problems

#[test]
fn every_problem_is_reported_at_once_in_key_order() {
    let text = format!(
        "[gateway]\nid = \"\"\n[pipeline]\nqueue_len = 0\n[log]\nlevel = \"loud\"\n{}{}",
        mqtt("port = 0\nkeep_alive_secs = 1\n"),
        sink("http://ingest.example.com/x", "ttl_secs = 0\n")
    );
    let want = vec![
        problem("gateway.id", "must not be empty"),
        problem("pipeline.queue_len", "must be between 1 and 1000000"),
        problem(
            "log.level",
            "unknown level \"loud\"; use error, warn, info, debug or trace",
        ),
        problem("sources.mqtt[0].port", "must not be 0"),
        problem(
            "sources.mqtt[0].keep_alive_secs",
            "must be between 5 and 3600",
        ),
        problem(
            "sinks.http[0].url",
            "plain http:// is refused for non-loopback hosts; use https://",
        ),
        problem("sinks.http[0].ttl_secs", "must be at least 1"),
    ];
    assert_eq!(problems_of(&text), want);
    let err = parse(&text, Path::new("site.toml")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "site.toml is invalid (7 problems)\n\
         \x20 gateway.id: must not be empty\n\
         \x20 pipeline.queue_len: must be between 1 and 1000000\n\
         \x20 log.level: unknown level \"loud\"; use error, warn, info, debug or trace\n\
         \x20 sources.mqtt[0].port: must not be 0\n\
         \x20 sources.mqtt[0].keep_alive_secs: must be between 5 and 3600\n\
         \x20 sinks.http[0].url: plain http:// is refused for non-loopback hosts; use https://\n\
         \x20 sinks.http[0].ttl_secs: must be at least 1"
    );
    match err {
        LoadError::Invalid { path, problems } => {
            assert_eq!(path, Path::new("site.toml"));
            assert_eq!(problems, want);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_single_problem_is_counted_in_the_singular() {
    let err = parse("[gateway]\nid = \"\"\n", Path::new("a.toml")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a.toml is invalid (1 problem)\n  gateway.id: must not be empty"
    );
}

#[test]
fn load_names_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("missing.toml");
    let err = load(&p).unwrap_err();
    assert!(matches!(err, LoadError::Read { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read {}: ", p.display())),
        "{err}"
    );
}

// ---------------------------------------------------------------------- unknown keys

#[test]
fn unknown_top_level_key_is_rejected() {
    assert_unknown_key("typo = 1\n[gateway]\nid = \"gw\"\n", "typo", 1);
}

#[test]
fn unknown_key_in_gateway_is_rejected() {
    assert_unknown_key("[gateway]\nid = \"gw\"\nname = \"x\"\n", "name", 3);
}

#[test]
fn unknown_key_in_store_is_rejected() {
    assert_unknown_key(&format!("{GATEWAY}[store]\nfile = \"x.db\"\n"), "file", 4);
}

#[test]
fn unknown_key_in_pipeline_is_rejected() {
    assert_unknown_key(
        &format!("{GATEWAY}[pipeline]\nqueue_size = 10\n"),
        "queue_size",
        4,
    );
}

#[test]
fn unknown_key_in_diff_is_rejected() {
    assert_unknown_key(
        &format!("{GATEWAY}[diff]\ntemperature_deadband_c = 0.5\n"),
        "temperature_deadband_c",
        4,
    );
}

#[test]
fn unknown_key_in_log_is_rejected() {
    assert_unknown_key(&format!("{GATEWAY}[log]\nlevels = \"info\"\n"), "levels", 4);
}

#[test]
fn unknown_key_in_devices_is_rejected() {
    assert_unknown_key(
        &format!("{GATEWAY}[[devices]]\nid = \"a\"\nplant_id = \"p\"\n"),
        "plant_id",
        5,
    );
}

#[test]
fn unknown_key_in_sources_mqtt_is_rejected() {
    assert_unknown_key(
        &format!("{GATEWAY}{}", mqtt("port = 1883\npasword_file = \"/x\"\n")),
        "pasword_file",
        6,
    );
}

#[test]
fn unknown_key_in_sources_mqtt_mapping_is_rejected() {
    assert_unknown_key(
        &format!(
            "{GATEWAY}{}",
            generic(
                TOPICS,
                "[sources.mqtt.mapping]\ndevice = \"/id\"\nunits = \"C\"\n"
            )
        ),
        "units",
        9,
    );
}

#[test]
fn unknown_key_in_sources_simulator_is_rejected() {
    assert_unknown_key(&format!("{GATEWAY}{}", sim("rate = 2.0\n")), "rate", 5);
}

#[test]
fn unknown_key_in_sinks_http_is_rejected() {
    assert_unknown_key(
        &format!("{GATEWAY}{}", https("timeout_ms = 100\n")),
        "timeout_ms",
        6,
    );
}

#[test]
fn source_and_sink_kinds_of_later_releases_are_rejected() {
    assert_unknown_key(
        &format!("{GATEWAY}[commands]\nenabled = true\n"),
        "commands",
        3,
    );
}

fn webhook(url: &str, extra: &str) -> String {
    format!("[[sinks.webhook]]\nname = \"portal\"\nurl = \"{url}\"\n{extra}")
}

#[test]
fn a_webhook_sink_gets_the_vendor_rules_as_defaults() {
    let cfg: Config = toml::from_str(&format!(
        "{GATEWAY}{}",
        webhook(
            "https://portal.example.com/hooks/{plant_id}/{device_id}",
            ""
        )
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.validate().is_ok());
    let w = &cfg.sinks.webhook[0];
    assert_eq!(
        (
            w.failure_timeout_ms,
            w.failure_status_min,
            w.batch_max_events
        ),
        (750, 300, 1)
    );
    assert_eq!(w.retry_schedule_secs, vec![10, 30, 60, 300, 600]);
    assert_eq!(
        (
            w.ttl_secs,
            w.ban_every_failures,
            w.ban_step_secs,
            w.ban_max_secs
        ),
        (86_400, 20, 60, 1200)
    );
    assert_eq!((w.failure_limit, w.drop_during_ban), (100, false));
    assert_eq!(w.hold_statuses, DEFAULT_HOLD_STATUSES.to_vec());
    assert_eq!(
        (w.format, w.auth, w.method),
        (
            WebhookFormat::Native,
            WebhookAuth::None,
            WebhookMethod::Post
        )
    );
    assert_eq!(cfg.sinks.names(), vec!["portal".to_string()]);
}

#[test]
fn webhook_urls_are_https_with_placeholders_only_in_path_and_query() {
    assert_problems(
        &webhook("http://portal.example.com/h", ""),
        &[(
            "sinks.webhook[0].url",
            "plain http:// is refused for non-loopback hosts; use https://",
        )],
    );
    assert_problems(
        &webhook("http://127.0.0.1:9/h", ""),
        &[(
            "sinks.webhook[0].url",
            "plain http:// needs allow_insecure_http = true (accepted for loopback hosts only)",
        )],
    );
    assert_valid(&webhook(
        "http://127.0.0.1:9/h/{device_id}?t={type}",
        "allow_insecure_http = true\n",
    ));
    let got = problems_of(&format!(
        "{GATEWAY}{}",
        webhook("https://{device_id}.example.com/h", "")
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sinks.webhook[0].url");
    assert!(got[0].problem.contains("path"), "{}", got[0].problem);
    let got = problems_of(&format!(
        "{GATEWAY}{}",
        webhook("https://x.example.com/{device}", "")
    ));
    assert!(got[0].problem.contains("{device}"), "{}", got[0].problem);
    assert_problems(
        &webhook(
            "https://x.example.com/{device_id}",
            "batch_max_events = 5\n",
        ),
        &[(
            "sinks.webhook[0].batch_max_events",
            "must be 1 when the url has placeholders (each event may go to another URL)",
        )],
    );
}

#[test]
fn webhook_body_templates_must_give_json_and_filters_name_real_types() {
    let got = problems_of(&format!(
        "{GATEWAY}{}",
        webhook(
            "https://x.example.com/h",
            "format = \"template\"\nbody = '{\"d\":{device_id}}'\n"
        )
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sinks.webhook[0].body");
    assert!(
        got[0].problem.contains("invalid JSON"),
        "{}",
        got[0].problem
    );
    assert_valid(&webhook(
        "https://x.example.com/h",
        "format = \"template\"\nbody = '{\"d\":\"{device_id}\",\"e\":{event}}'\n",
    ));
    assert_problems(
        &webhook("https://x.example.com/h", "format = \"template\"\n"),
        &[(
            "sinks.webhook[0].body",
            "format = \"template\" needs a body template, e.g. body = '{\"device\":\"{device_id}\"}'",
        )],
    );
    let got = problems_of(&format!(
        "{GATEWAY}{}",
        webhook(
            "https://x.example.com/h",
            "types = [\"setpoint\", \"temprature\"]\n"
        )
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sinks.webhook[0].types[1]");
    assert!(
        got[0]
            .problem
            .starts_with("\"temprature\" is not an event type; known: function,")
    );
}

#[test]
fn webhook_auth_needs_exactly_the_keys_of_its_scheme() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let key = secret_file(&dir, "k", "abc", 0o600);
    assert_problems(
        &webhook("https://x.example.com/h", "auth = \"api_key\"\n"),
        &[
            (
                "sinks.webhook[0].api_key_header",
                "auth = \"api_key\" needs api_key_header (e.g. \"x-api-key\") or api_key_query",
            ),
            (
                "sinks.webhook[0].api_key_file",
                "auth = \"api_key\" needs api_key_file or api_key_env",
            ),
        ],
    );
    assert_valid(&webhook(
        "https://x.example.com/h",
        &format!(
            "auth = \"api_key\"\napi_key_header = \"Ocp-Apim-Subscription-Key\"\napi_key_file = {}\n",
            toml_path(&key)
        ),
    ));
    assert_problems(
        &webhook(
            "https://x.example.com/h",
            &format!("api_key_file = {}\n", toml_path(&key)),
        ),
        &[(
            "sinks.webhook[0].api_key_file",
            "is not used with auth = \"none\"; remove it or change auth",
        )],
    );
    assert_problems(
        &webhook(
            "https://x.example.com/h",
            "auth = \"oauth2_client_credentials\"\ntoken_url = \"http://auth.example.com/t\"\n",
        ),
        &[
            (
                "sinks.webhook[0].token_url",
                "plain http:// is refused for non-loopback hosts; use https://",
            ),
            (
                "sinks.webhook[0].client_id",
                "auth = \"oauth2_client_credentials\" needs client_id",
            ),
            (
                "sinks.webhook[0].client_secret_file",
                "auth = \"oauth2_client_credentials\" needs client_secret_file or client_secret_env",
            ),
        ],
    );
    assert_valid(&webhook(
        "https://x.example.com/h",
        &format!(
            "auth = \"oauth2_refresh_token\"\ntoken_url = \"https://auth.example.com/t\"\nclient_id = \"c\"\nrefresh_token_file = {}\nsigning_secret_env = \"{SET_VAR}\"\n",
            toml_path(&key)
        ),
    ).replace(&format!("signing_secret_env = \"{SET_VAR}\"\n"), ""));
    let prev = secret_file(&dir, "prev", WHSEC, 0o600);
    assert_problems(
        &webhook(
            "https://x.example.com/h",
            &format!("signing_secret_previous_file = {}\n", toml_path(&prev)),
        ),
        &[(
            "sinks.webhook[0].signing_secret_previous_file",
            "a previous secret needs the current one (signing_secret_file or signing_secret_env)",
        )],
    );
    // config.md writes "no previous secret" as "".
    let cur = secret_file(&dir, "cur", WHSEC, 0o600);
    assert_valid(&webhook(
        "https://x.example.com/h",
        &format!(
            "signing_secret_file = {}\nsigning_secret_previous_file = \"\"\n",
            toml_path(&cur)
        ),
    ));
}

#[test]
fn hold_statuses_without_the_endpoint_statuses_are_a_warning() {
    let text = format!(
        "{GATEWAY}{}",
        webhook("https://x.example.com/h", "hold_statuses = [401, 403]\n")
    );
    assert_eq!(problems_of(&text), vec![]);
    let cfg: Config = toml::from_str(&text).unwrap();
    assert_eq!(
        cfg.warnings(),
        vec![problem(
            "sinks.webhook[0].hold_statuses",
            "leaves out 404, 410: an expired key or a moved route would turn good events into \
             dead letters (\"rejected\") instead of holding them"
        )]
    );
    let cfg: Config = toml::from_str(&format!("{GATEWAY}{}", https(""))).unwrap();
    assert_eq!(
        cfg.warnings(),
        vec![],
        "the defaults hold every endpoint status"
    );
}

#[test]
fn mqtt_upstream_needs_tls_except_on_loopback_and_names_are_unique_across_kinds() {
    assert_problems(
        "[[sinks.mqtt]]\nname = \"cloud\"\nhost = \"broker.example.com\"\ntls = false\n",
        &[(
            "sinks.mqtt[0].tls",
            "false is accepted only for a loopback broker; the upstream broker needs TLS",
        )],
    );
    assert_valid(
        "[[sinks.mqtt]]\nname = \"cloud\"\nhost = \"127.0.0.1\"\ntls = false\nport = 1883\n",
    );
    assert_problems(
        "[[sinks.mqtt]]\nname = \"cloud\"\nhost = \"127.0.0.1\"\ntls = false\ntopic = \"a/+/b\"\n",
        &[(
            "sinks.mqtt[0].topic",
            "must not contain the wildcards + or # (a topic to publish to)",
        )],
    );
    assert_problems(
        &format!(
            "{}[[sinks.mqtt]]\nname = \"portal\"\nhost = \"127.0.0.1\"\ntls = false\n",
            webhook("https://x.example.com/h", "")
        ),
        &[(
            "sinks.mqtt[0].name",
            "\"portal\" is already used by sinks.webhook[0]",
        )],
    );
}

// ---------------------------------------------------------------------- wrong types

#[test]
fn wrong_types_are_rejected_with_the_line() {
    let cases: [(String, usize, &str); 7] = [
        (
            mqtt("port = \"1883\"\n"),
            5,
            "invalid type: string \"1883\", expected u16",
        ),
        (
            mqtt("port = 70000\n"),
            5,
            "invalid value: integer `70000`, expected u16",
        ),
        (
            "[pipeline]\nqueue_len = -1\n".into(),
            4,
            "invalid value: integer `-1`, expected usize",
        ),
        (
            https("allow_insecure_http = \"yes\"\n"),
            6,
            "invalid type: string \"yes\", expected a boolean",
        ),
        (
            https("retry_schedule_secs = [10, \"x\"]\n"),
            6,
            "invalid type: string \"x\", expected u64",
        ),
        (
            mqtt("topics = \"a/+\"\n"),
            5,
            "invalid type: string \"a/+\", expected a sequence",
        ),
        (
            "[[devices]]\nid = 5\n".into(),
            4,
            "invalid type: integer `5`, expected a string",
        ),
    ];
    for (body, line, want) in cases {
        let msg = parse_error(&format!("{GATEWAY}{body}"));
        assert!(msg.contains(&format!("at line {line},")), "{msg}");
        assert!(msg.contains(want), "{msg}");
    }
}

#[test]
fn integers_are_accepted_where_a_decimal_is_expected() {
    assert_valid("[diff]\ntemperature_deadband = 1\nhumidity_deadband = 2\n");
}

// ---------------------------------------------------------------------- shipped configs

/// Uncomments the optional `# key = value` lines and commented-out tables of the reference
/// config (prose comments and the `#   alternative = …` lines stay comments) and points the
/// secret files at owner-only files in `dir`.
fn reference_with_optional_lines(dir: &tempfile::TempDir) -> String {
    secret_file(dir, "mqtt-password", "s3cret\n", 0o600);
    secret_file(dir, "upstream-api-key", "k3y\n", 0o600);
    secret_file(dir, "upstream-whsec", WHSEC, 0o600);
    secret_file(dir, "portal-client-secret", "c1ient\n", 0o600);
    secret_file(dir, "portal-refresh-token", "r3fresh\n", 0o600);
    secret_file(dir, "portal-whsec", WHSEC, 0o600);
    secret_file(
        dir,
        "portal-whsec-previous",
        "whsec_dGhpcyBpcyBhIHNlY29uZCBzZWNyZXQga2V5IQ==",
        0o600,
    );
    secret_file(dir, "mqtt-ca.pem", TEST_CA_PEM, 0o644);
    secret_file(dir, "gw-0042.crt", TEST_CLIENT_CERT_PEM, 0o644);
    secret_file(dir, "gw-0042.key", TEST_CLIENT_KEY_PEM, 0o600);
    let is_key_line = |rest: &str| {
        rest.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
    };
    let is_table = |rest: &str| rest.starts_with('[') && rest.ends_with(']') && !rest.contains(' ');
    REFERENCE_TOML
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_key_line(rest) || is_table(rest) || rest.starts_with("# ") => {
                rest.to_string()
            }
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            "/etc/hvac-edge/secrets/",
            &format!("{}/", dir.path().display()),
        )
        .replace("/etc/hvac-edge/tls/", &format!("{}/", dir.path().display()))
}

#[test]
fn the_reference_config_is_valid_as_shipped() {
    let c = parse(REFERENCE_TOML, Path::new("config/hvac-edge.toml")).unwrap();
    assert_eq!(c.gateway.id, "gw-0042");
    assert_eq!(c.sources.mqtt.len(), 2);
    assert_eq!(c.sources.mqtt[0].preset, MqttPreset::Zigbee2mqtt);
    assert_eq!(c.sources.mqtt[1].preset, MqttPreset::Generic);
    assert!(
        c.sources.simulator.is_empty(),
        "no invented data by default"
    );
    assert_eq!(c.sinks.http.len(), 1);
    let h = &c.sinks.http[0];
    assert!(h.signing_secret_file.is_none() && h.api_key_file.is_none());
}

#[test]
fn the_reference_config_states_the_code_defaults() {
    let reference = parse(REFERENCE_TOML, Path::new("config/hvac-edge.toml")).unwrap();
    let defaults = parse(
        &format!(
            "{GATEWAY}{}{}",
            mqtt(""),
            sink("https://ingest.example.com/v1/events", "")
        ),
        Path::new("t.toml"),
    )
    .unwrap();
    let dbg = |v: &dyn std::fmt::Debug| format!("{v:?}");
    assert_eq!(dbg(&reference.store), dbg(&defaults.store));
    assert_eq!(dbg(&reference.pipeline), dbg(&defaults.pipeline));
    assert_eq!(dbg(&reference.diff), dbg(&defaults.diff));
    assert_eq!(dbg(&reference.log), dbg(&defaults.log));
    let mut z2m = reference.sources.mqtt[0].clone();
    assert_eq!(z2m.effective_client_id(), "hvac-edge-z2m");
    z2m.client_id = None;
    assert_eq!(dbg(&z2m), dbg(&defaults.sources.mqtt[0]));
    let mut up = reference.sinks.http[0].clone();
    up.name = "up".into();
    assert_eq!(dbg(&up), dbg(&defaults.sinks.http[0]));

    let dir = tempfile::tempdir().unwrap();
    let full = parse(&reference_with_optional_lines(&dir), Path::new("t.toml")).unwrap();
    let sim_defaults = parse(&format!("{GATEWAY}{}", sim("")), Path::new("t.toml")).unwrap();
    assert_eq!(
        dbg(&full.sources.simulator[0]),
        dbg(&sim_defaults.sources.simulator[0])
    );
}

#[test]
fn the_reference_config_is_valid_with_its_optional_lines_uncommented() {
    let dir = tempfile::tempdir().unwrap();
    let text = reference_with_optional_lines(&dir);
    let c = parse(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}\n--\n{text}"));
    assert_eq!(c.sources.mqtt[0].username.as_deref(), Some("hvac-edge"));
    assert_eq!(
        c.sources.mqtt[0].password_file.as_deref(),
        Some(dir.path().join("mqtt-password").as_path())
    );
    let z2m = &c.sources.mqtt[0];
    assert_eq!(z2m.tls, Some(true));
    assert_eq!(
        z2m.ca_file.as_deref(),
        Some(dir.path().join("mqtt-ca.pem").as_path())
    );
    assert_eq!(
        z2m.cert_file.as_deref(),
        Some(dir.path().join("gw-0042.crt").as_path())
    );
    assert_eq!(
        z2m.key_file.as_deref(),
        Some(dir.path().join("gw-0042.key").as_path())
    );
    assert_eq!(c.sources.simulator.len(), 1);
    // The commented-out webhook and MQTT upstream, uncommented, are valid with the code defaults.
    let w = &c.sinks.webhook[0];
    assert_eq!(w.auth, WebhookAuth::Oauth2RefreshToken);
    assert!(w.signing_secret_previous_file.is_some());
    let wd = parse(
        &format!("{GATEWAY}{}", webhook("https://x.example.com/h", "")),
        Path::new("t.toml"),
    )
    .unwrap();
    let d = &wd.sinks.webhook[0];
    assert_eq!(
        (
            w.failure_timeout_ms,
            w.failure_status_min,
            w.ban_every_failures,
            w.ban_step_secs
        ),
        (
            d.failure_timeout_ms,
            d.failure_status_min,
            d.ban_every_failures,
            d.ban_step_secs
        )
    );
    assert_eq!(
        (
            w.ban_max_secs,
            w.failure_limit,
            w.drop_during_ban,
            w.batch_max_events
        ),
        (
            d.ban_max_secs,
            d.failure_limit,
            d.drop_during_ban,
            d.batch_max_events
        )
    );
    let m = &c.sinks.mqtt[0];
    assert!(m.tls && m.cert_file.is_some() && m.key_file.is_some());
    assert_eq!(
        (m.topic.as_str(), m.max_inflight),
        ("hvac-edge/{gateway_id}/{device_id}/{type}", 100)
    );
    let h = &c.sinks.http[0];
    assert_eq!(
        h.api_key_header.as_deref(),
        Some("Ocp-Apim-Subscription-Key")
    );
    assert!(h.api_key_file.is_some() && h.signing_secret_file.is_some());
    assert!(h.api_key_query.is_none() && h.api_key_env.is_none() && h.signing_secret_env.is_none());
}

/// The keys serde accepts in a section, read from its "unknown field" error.
fn accepted_keys(section_text: &str) -> Vec<String> {
    let msg = parse_error(section_text);
    let expected = msg
        .split_once("expected ")
        .map(|(_, e)| e.to_string())
        .unwrap_or_else(|| panic!("no key list in: {msg}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_reference_config_mentions_every_accepted_key() {
    let probe = "zz_probe = 1\n";
    let sections = [
        ("gateway", format!("[gateway]\nid = \"g\"\n{probe}")),
        ("store", format!("{GATEWAY}[store]\n{probe}")),
        ("pipeline", format!("{GATEWAY}[pipeline]\n{probe}")),
        ("diff", format!("{GATEWAY}[diff]\n{probe}")),
        ("log", format!("{GATEWAY}[log]\n{probe}")),
        (
            "devices",
            format!("{GATEWAY}[[devices]]\nid = \"a\"\n{probe}"),
        ),
        ("sources.mqtt", format!("{GATEWAY}{}", mqtt(probe))),
        (
            "sources.mqtt.mapping",
            format!(
                "{GATEWAY}{}",
                generic(
                    TOPICS,
                    &format!("[sources.mqtt.mapping]\ndevice = \"/id\"\n{probe}")
                )
            ),
        ),
        ("sources.simulator", format!("{GATEWAY}{}", sim(probe))),
        ("sources.otgw", format!("{GATEWAY}{}", otgw(probe))),
        (
            "sources.otgw.override_modes",
            format!(
                "{GATEWAY}{}[sources.otgw.override_modes]\n{probe}",
                otgw("")
            ),
        ),
        ("sources.modbus", format!("{GATEWAY}{}", modbus(probe))),
        (
            "sources.modbus.units",
            format!(
                "{GATEWAY}{}",
                modbus(&format!("[[sources.modbus.units]]\n{probe}"))
            ),
        ),
        ("sources.jsonl", format!("{GATEWAY}{}", jsonl(probe, ""))),
        (
            "sources.jsonl.mapping",
            format!("{GATEWAY}{}", jsonl("", probe)),
        ),
        ("sinks.http", format!("{GATEWAY}{}", https(probe))),
        (
            "sinks.webhook",
            format!("{GATEWAY}{}", webhook("https://x.example.com/h", probe)),
        ),
        (
            "sinks.mqtt",
            format!("{GATEWAY}[[sinks.mqtt]]\nname = \"c\"\nhost = \"h\"\n{probe}"),
        ),
    ];
    let lines: Vec<&str> = REFERENCE_TOML
        .lines()
        .map(|l| l.trim_start_matches('#').trim_start())
        .collect();
    for (section, text) in sections {
        let keys = accepted_keys(&text);
        assert!(keys.len() >= 2, "{section}: {keys:?}");
        for key in keys {
            let as_value = format!("{key} =");
            let as_table = format!("[{section}.{key}");
            let as_array = format!("[[{section}.{key}]]");
            assert!(
                lines.iter().any(|l| l.starts_with(&as_value)
                    || l.starts_with(&as_table)
                    || l.starts_with(&as_array)),
                "config/hvac-edge.toml does not mention {section}.{key}"
            );
        }
    }
}

#[test]
fn the_embedded_demo_config_parses() {
    let _: Config = toml::from_str(DEMO_TOML).unwrap();
}

#[test]
fn the_demo_config_is_valid_once_its_secret_is_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let f = secret_file(&dir, "whsec", WHSEC, 0o600);
    let text = DEMO_TOML.replace("\"replaced-by-the-demo\"", &toml_path(&f));
    let c = parse(&text, Path::new("config/demo.toml")).unwrap();
    assert_eq!(c.sources.simulator.len(), 1);
    assert!(c.sinks.http[0].allow_insecure_http);
    // And the way `hvac-edge demo` itself fills it in.
    let c = crate::demo::demo_config(dir.path(), "http://127.0.0.1:9/v1/events", WHSEC).unwrap();
    assert_eq!(c.store.path, dir.path().join("hvac-edge-demo.db"));
}

#[test]
fn the_generic_esphome_example_is_valid() {
    let c = parse(
        ESPHOME_EXAMPLE_TOML,
        Path::new("config/examples/generic-esphome.toml"),
    )
    .unwrap();
    let m = &c.sources.mqtt[0];
    assert_eq!(m.preset, MqttPreset::Generic);
    let mapping =
        crate::sources::payload::Mapping::compile(&m.mapping.as_ref().unwrap().spec()).unwrap();
    let (device, reported) = mapping
        .map(
            "home/living-room/climate/state",
            br#"{"mode":"heat_cool","target_temperature":21.5,"current_temperature":"20.1","current_humidity":45,"action":"preheating"}"#,
        )
        .unwrap();
    assert_eq!(device, "living-room");
    assert_eq!(reported.mode, Some(crate::model::Mode::Manual));
    assert_eq!(reported.load_state, Some(crate::model::LoadState::Active));
    assert_eq!(
        mapping.availability_device("home/living-room/status"),
        Some("living-room".to_string())
    );
}

// ------------------------------------------------------------------ serial sources

/// An OTGW source with extra keys.
fn otgw(extra: &str) -> String {
    format!("[[sources.otgw]]\nname = \"boiler\"\nport = \"/dev/ttyUSB0\"\n{extra}")
}

/// A Modbus source (no units) with extra keys; units go in `extra`, after the source keys.
fn modbus(extra: &str) -> String {
    format!("[[sources.modbus]]\nname = \"fcu\"\nport = \"/dev/ttyUSB1\"\n{extra}")
}

const UNIT: &str =
    "[[sources.modbus.units]]\nunit_id = 1\ndevice = \"office\"\nmap = \"siemens-rdf302\"\n";

/// A JSON-lines source: `extra` in the source table, `mapping_extra` in its mapping table.
fn jsonl(extra: &str, mapping_extra: &str) -> String {
    format!(
        "[[sources.jsonl]]\nname = \"fw\"\nport = \"/dev/ttyACM0\"\n{extra}[sources.jsonl.mapping]\ndevice = \"/id\"\n{mapping_extra}[sources.jsonl.mapping.fields]\nsetpoint = \"/sp\"\n"
    )
}

#[test]
fn serial_sources_parse_with_their_defaults() {
    let c = parse(
        &format!("{GATEWAY}{}{}{}", otgw(""), modbus(UNIT), jsonl("", "")),
        Path::new("t.toml"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let o = &c.sources.otgw[0];
    assert_eq!(o.line().describe(), "9600 8N1");
    assert_eq!((o.device.as_str(), o.silence_timeout_secs), ("otgw", 60));
    assert!(o.setup_commands.is_empty());
    assert_eq!(o.override_modes, OverrideModes::default());
    let m = &c.sources.modbus[0];
    assert_eq!(m.line().describe(), "9600 8N1");
    assert_eq!(
        (
            m.poll_interval_ms,
            m.request_timeout_ms,
            m.offline_after_failed_polls
        ),
        (1000, 300, 3)
    );
    let j = &c.sources.jsonl[0];
    assert_eq!(j.line().describe(), "115200 8N1");
    assert_eq!((j.max_line_bytes, j.silence_timeout_secs), (4096, 0));
}

#[test]
fn serial_line_settings_are_checked() {
    assert_problems(
        &otgw("baud = 100\ndata_bits = 9\nstop_bits = 3\nreconnect_min_ms = 0\n"),
        &[
            ("sources.otgw[0].baud", "must be between 300 and 4000000"),
            ("sources.otgw[0].data_bits", "must be 5, 6, 7 or 8"),
            ("sources.otgw[0].stop_bits", "must be 1 or 2"),
            (
                "sources.otgw[0].reconnect_min_ms",
                "must be at least 1 and at most reconnect_max_ms",
            ),
        ],
    );
    assert_problems(
        "[[sources.otgw]]\nname = \"b\"\nport = \"ttyUSB0\"\n",
        &[(
            "sources.otgw[0].port",
            "\"ttyUSB0\" must be an absolute path such as /dev/ttyUSB0 or /dev/serial/by-id/…",
        )],
    );
    let e = parse_error(&format!("{GATEWAY}{}", modbus("parity = \"mark\"\n")));
    assert!(e.contains("unknown variant `mark`"), "{e}");
    assert_valid(&modbus(&format!(
        "parity = \"even\"\nbaud = 19200\nstop_bits = 2\n{UNIT}"
    )));
}

#[test]
fn a_port_belongs_to_one_source() {
    assert_problems(
        &format!(
            "{}{}",
            otgw(""),
            "[[sources.jsonl]]\nname = \"fw\"\nport = \"/dev/ttyUSB0\"\n[sources.jsonl.mapping]\ndevice = \"/id\"\n[sources.jsonl.mapping.fields]\nsetpoint = \"/sp\"\n"
        ),
        &[(
            "sources.jsonl[0].port",
            "/dev/ttyUSB0 is also opened by sources.otgw[0]; a serial port belongs to one source (put every unit of an RS-485 line in one [[sources.modbus]])",
        )],
    );
}

#[test]
fn otgw_keys_are_checked() {
    assert_problems(
        &otgw(
            "device = \"\"\nsilence_timeout_secs = 1\nsetup_commands = [\"PS=0\", \"ps=0\", \"PS=0\\r\\nGW=1\"]\n[sources.otgw.override_modes]\ntemporary = \"HOLD\"\n",
        ),
        &[
            ("sources.otgw[0].device", "must not be empty"),
            (
                "sources.otgw[0].silence_timeout_secs",
                "must be between 2 and 86400 (the gateway prints a line about every second)",
            ),
            (
                "sources.otgw[0].setup_commands[1]",
                "\"ps=0\" is not an OTGW command; expected two capital letters, '=', a value (e.g. \"PS=0\")",
            ),
            (
                "sources.otgw[0].setup_commands[2]",
                "\"PS=0\\r\\nGW=1\" is not an OTGW command; expected two capital letters, '=', a value (e.g. \"PS=0\")",
            ),
            (
                "sources.otgw[0].override_modes.temporary",
                "unknown mode \"HOLD\"; use AUTOMATIC, MANUAL, BOOST, OFF or PROTECTION",
            ),
        ],
    );
    assert_problems(
        &otgw("setup_commands = [\"PS=1\"]\n"),
        &[(
            "sources.otgw[0].setup_commands[0]",
            "\"PS=1\" switches the gateway to summary mode, which stops the frame reports this source decodes; use \"PS=0\"",
        )],
    );
    assert_valid(&otgw(
        "setup_commands = [\"PS=0\", \"PR=O\", \"TT=21.50\"]\n[sources.otgw.override_modes]\nnone = \"AUTOMATIC\"\ntemporary = \"BOOST\"\nconstant = \"MANUAL\"\n",
    ));
}

#[test]
fn modbus_keys_are_checked() {
    assert_problems(
        &modbus("poll_interval_ms = 50\nrequest_timeout_ms = 5\noffline_after_failed_polls = 0\n"),
        &[
            (
                "sources.modbus[0].poll_interval_ms",
                "must be between 100 and 3600000",
            ),
            (
                "sources.modbus[0].request_timeout_ms",
                "must be between 20 and 10000",
            ),
            (
                "sources.modbus[0].offline_after_failed_polls",
                "must be between 1 and 1000",
            ),
            (
                "sources.modbus[0].units",
                "at least one [[sources.modbus.units]] is needed",
            ),
        ],
    );
    assert_problems(
        &modbus(&format!(
            "{UNIT}[[sources.modbus.units]]\nunit_id = 1\ndevice = \"\"\nmap = \"no-such\"\n[[sources.modbus.units]]\nunit_id = 0\ndevice = \"b\"\nmap = \"/nonexistent/map.toml\"\n"
        )),
        &[
            (
                "sources.modbus[0].units[1].unit_id",
                "1 is already used by sources.modbus[0].units[0] on this line",
            ),
            ("sources.modbus[0].units[1].device", "must not be empty"),
            (
                "sources.modbus[0].units[1].map",
                "\"no-such\" is not a preset (siemens-rdf302, beca-bht-006, engo-efan) nor a file path",
            ),
            (
                "sources.modbus[0].units[2].unit_id",
                "must be between 1 and 247",
            ),
            (
                "sources.modbus[0].units[2].map",
                "cannot read map file /nonexistent/map.toml: No such file or directory (os error 2)",
            ),
        ],
    );
}

#[test]
fn a_modbus_map_file_problem_names_the_file_and_register() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("map.toml");
    std::fs::write(
        &f,
        "[[registers]]\nfield = \"setpoint\"\naddress = 3\ntype = \"u64\"\n",
    )
    .unwrap();
    let got = problems_of(&format!(
        "{GATEWAY}{}",
        modbus(&format!(
            "[[sources.modbus.units]]\nunit_id = 2\ndevice = \"x\"\nmap = \"{}\"\n",
            f.display()
        ))
    ));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, "sources.modbus[0].units[0].map");
    assert!(
        got[0].problem.starts_with(&format!("{}: ", f.display())),
        "{}",
        got[0].problem
    );
    assert!(
        got[0].problem.contains("unknown variant `u64`"),
        "{}",
        got[0].problem
    );
}

#[test]
fn device_ids_are_unique_across_serial_sources() {
    assert_problems(
        &format!("{}{}", otgw("device = \"office\"\n"), modbus(UNIT)),
        &[(
            "sources.modbus[0].units[0].device",
            "\"office\" is also claimed by sources.otgw[0]; a device id belongs to one source",
        )],
    );
}

#[test]
fn jsonl_keys_are_checked() {
    assert_problems(
        &jsonl("max_line_bytes = 10\nsilence_timeout_secs = 100000\n", ""),
        &[
            (
                "sources.jsonl[0].max_line_bytes",
                "must be between 64 and 1048576",
            ),
            (
                "sources.jsonl[0].silence_timeout_secs",
                "must be at most 86400 (0 = never)",
            ),
        ],
    );
    let text = jsonl("", "availability_topic = \"x/{device}\"\n")
        .replace("device = \"/id\"", "device = \"{topic:1}\"");
    let got = problems_of(&format!("{GATEWAY}{text}"));
    let keys: Vec<&str> = got.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        &keys[..2],
        [
            "sources.jsonl[0].mapping.device",
            "sources.jsonl[0].mapping.availability_topic"
        ],
        "{got:?}"
    );
    assert_eq!(
        got[0].problem,
        "\"{topic:1}\": a JSON-lines source has no topic; use a JSON pointer such as \"/id\""
    );
    assert_valid(&jsonl("", "unit = \"F\"\n"));
}

#[test]
fn sink_hold_statuses_and_reject_limit_have_defaults_and_bounds() {
    let c: Config = toml::from_str(&format!("{GATEWAY}{}", https(""))).unwrap();
    let s = &c.sinks.http[0];
    assert_eq!(s.hold_statuses, vec![401, 403, 404, 405, 407, 410, 421]);
    assert_eq!(s.max_consecutive_rejected, 10);
    assert_eq!(c.pipeline.device_expiry_secs, 2_592_000);
    assert_problems(
        &https("hold_statuses = [401, 200]\nmax_consecutive_rejected = 0\n"),
        &[
            (
                "sinks.http[0].hold_statuses",
                "200 is not an HTTP error status (400-599)",
            ),
            (
                "sinks.http[0].max_consecutive_rejected",
                "must be between 1 and 10000",
            ),
        ],
    );
    assert_problems(
        "[pipeline]\ndevice_expiry_secs = 5\n",
        &[("pipeline.device_expiry_secs", "must be at least 60")],
    );
}

#[test]
fn gateway_clock_is_ntp_by_default_or_trusted() {
    let c: Config = toml::from_str(GATEWAY).unwrap();
    assert_eq!(c.gateway.clock, crate::config::ClockSource::Ntp);
    let c: Config = toml::from_str(&format!("{GATEWAY}clock = \"trusted\"\n")).unwrap();
    assert_eq!(c.gateway.clock, crate::config::ClockSource::Trusted);
    let msg = parse_error(&format!("{GATEWAY}clock = \"gps\"\n"));
    assert!(msg.contains("unknown variant `gps`"), "{msg}");
}

// ---------------------------------------------------------------------- secrets never echoed

/// Issue 11 item 21: toml's error Display quotes the offending source line; a secret pasted
/// into the config (an unknown key, a bare value) would be printed by `check-config`.
#[test]
fn parse_errors_name_line_and_column_but_never_quote_the_line() {
    let text = format!("{GATEWAY}{}", https("password = \"hunter2-s3cret\"\n"));
    let msg = parse_error(&text);
    assert!(
        msg.starts_with("at line 6, column 1: unknown field `password`, expected one of "),
        "{msg}"
    );
    assert!(!msg.contains("hunter2"), "{msg}");
    assert!(!msg.contains('|'), "no source snippet: {msg}");

    let text = format!("{GATEWAY}[store]\npath = hunter2-s3cret\n");
    let msg = parse_error(&text);
    assert!(msg.starts_with("at line 4, column 8: "), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");

    // A missing table is reported at the start of the document.
    assert_eq!(
        parse_error("[store]\n"),
        "at line 1, column 1: missing field `gateway`"
    );
}

#[test]
fn redact_userinfo_hides_credentials_in_every_url_of_a_text() {
    assert_eq!(
        redact_userinfo("https://user:pass@host/x"),
        "https://***@host/x"
    );
    assert_eq!(
        redact_userinfo("\"mqtts://u@broker:8883\" and http://a:b@c?d=e@f"),
        "\"mqtts://***@broker:8883\" and http://***@c?d=e@f"
    );
    assert_eq!(
        redact_userinfo("https://ingest.example.com/p@th"),
        "https://ingest.example.com/p@th"
    );
    assert_eq!(redact_userinfo("no url here: a@b"), "no url here: a@b");
    assert_eq!(redact_userinfo("https://u:p@"), "https://***@");
}

#[test]
fn config_errors_redact_url_userinfo() {
    let url_problem = problems_of(&format!(
        "{GATEWAY}{}",
        sink("https://user:p4ss@exa mple.com/v1", "")
    ));
    assert_eq!(
        url_problem,
        vec![problem(
            "sinks.http[0].url",
            "\"https://***@exa mple.com/v1\" is not a valid URL: invalid international domain name"
        )]
    );
    // A URL in a serde message (a value of the wrong kind) through `parse`.
    let msg = parse_error(&format!(
        "{GATEWAY}{}",
        https("from = \"https://user:p4ss@example.com\"\n")
    ));
    assert!(
        msg.contains("unknown variant `https://***@example.com`"),
        "{msg}"
    );
    assert!(!msg.contains("p4ss"), "{msg}");
}

/// Issue 11 item 21: a secret file is opened once and checked on the open descriptor:
/// regular file, no group/other bits, owner, size; a FIFO does not hang the check.
#[test]
fn secret_files_are_checked_on_the_open_descriptor() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let at_most = secret_file(&dir, "4096", &"k".repeat(4096), 0o600);
    assert_eq!(read_secret_file(&at_most), Ok("k".repeat(4096)));
    let over = secret_file(&dir, "4097", &"k".repeat(4097), 0o600);
    assert_eq!(
        read_secret_file(&over),
        Err(format!(
            "{} is larger than 4096 bytes; it must hold only the secret",
            over.display()
        ))
    );
    let fifo = dir.path().join("fifo");
    let st = std::process::Command::new("mkfifo")
        .arg("-m")
        .arg("600")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        read_secret_file(&fifo),
        Err(format!("{} is not a regular file", fifo.display()))
    );
    let sub = dir.path().join("dir");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(
        read_secret_file(&sub),
        Err(format!("{} is not a regular file", sub.display()))
    );
    let binary = dir.path().join("binary");
    std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        read_secret_file(&binary),
        Err(format!("{} is not UTF-8 text", binary.display()))
    );
    // Owned by someone else (needs root to chown; the tests run as root in CI).
    let theirs = secret_file(&dir, "theirs", "k3y", 0o600);
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        std::os::unix::fs::chown(&theirs, Some(12345), None).unwrap();
        assert_eq!(std::fs::metadata(&theirs).unwrap().uid(), 12345);
        assert_eq!(
            read_secret_file(&theirs),
            Err(format!(
                "{} is owned by uid 12345; it must be owned by the user running hvac-edge (uid 0) or by root",
                theirs.display()
            ))
        );
    } else {
        assert_eq!(read_secret_file(&theirs), Ok("k3y".to_string()));
    }
}

#[test]
fn a_path_with_a_slash_is_never_a_credential_name() {
    let dir = tempfile::tempdir().unwrap();
    let f = secret_file(&dir, "pw", "x", 0o600);
    assert_eq!(resolve_secret_path(&f), Ok(f.clone()));
    assert_eq!(
        resolve_secret_path(Path::new("./pw")),
        Ok(PathBuf::from("./pw"))
    );
}
