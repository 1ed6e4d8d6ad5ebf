//! The local observability endpoint (issue 14): `/metrics` read by the reference Prometheus
//! text-format parser (Python `prometheus_client`), `/healthz`, and the loopback rule.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::harness::*;
use std::collections::BTreeMap;

/// GET `path` on 127.0.0.1:`port`: (status, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Parses Prometheus text with the reference parser: `name{labels}` -> value, one per sample.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(crate::interop::python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the reference parser refused /metrics: {}\n---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_with_the_reference_parser_and_count_what_happened() {
    let sb = Sandbox::new("metrics");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let port = free_port();
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("up", &receiver)
        .set("metrics", "listen", &toml_str(&format!("127.0.0.1:{port}")));
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    for (i, sp) in ["20.0", "21.0", "22.0"].iter().enumerate() {
        p.publish(
            &format!("{}/room-{i}", tc.base_topic()),
            format!("{{\"occupied_heating_setpoint\":{sp},\"local_temperature\":19.5}}"),
            false,
        )
        .await;
    }
    receiver.wait_unique_events(3, TIMEOUT).await;
    let (status, body) = get(port, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // The sink saves its progress within a second: wait until /metrics shows it.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let m = loop {
        let (status, text) = get(port, "/metrics").await;
        assert_eq!(status, 200);
        let m = parse(&text);
        if m.get("hvac_edge_sink_delivered_total{sink=up}") == Some(&3.0) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sink_delivered never 3: {m:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(m["hvac_edge_observations_total{}"], 3.0);
    // One event per device (a first observation is a snapshot of its state).
    let committed: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("hvac_edge_events_committed_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(committed, 3.0, "{m:?}");
    assert_eq!(m["hvac_edge_sink_queue_depth{sink=up}"], 0.0);
    assert_eq!(m["hvac_edge_sink_dead_letters{sink=up}"], 0.0);
    assert_eq!(m["hvac_edge_sink_status{sink=up,status=ACTIVE}"], 1.0);
    assert_eq!(m["hvac_edge_source_up{kind=mqtt,source=z2m}"], 1.0);
    assert_eq!(m["hvac_edge_writer_up{}"], 1.0);
    assert!(m["hvac_edge_database_bytes{}"] > 0.0);
    // Histograms: every commit and every delivered event observed once.
    assert!(
        m["hvac_edge_commit_latency_seconds_count{}"] >= 1.0,
        "{m:?}"
    );
    assert_eq!(m["hvac_edge_delivery_latency_seconds_count{sink=up}"], 3.0);
    assert_eq!(
        m["hvac_edge_delivery_latency_seconds_bucket{le=+Inf,sink=up}"],
        3.0
    );
    daemon.stop().await.unwrap();
}

#[test]
fn a_non_loopback_metrics_address_needs_allow_remote() {
    let sb = Sandbox::new("metrics_remote");
    let mut tc = TestConfig::new(&sb);
    tc.set("metrics", "listen", &toml_str("0.0.0.0:9464"));
    let err = hvac_edge::config::parse(&tc.toml(), std::path::Path::new("t.toml"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("metrics.listen: 0.0.0.0:9464 is not a loopback address"),
        "{err}"
    );
    tc.set("metrics", "allow_remote", "true");
    assert!(hvac_edge::config::parse(&tc.toml(), std::path::Path::new("t.toml")).is_ok());
    tc.set("metrics", "listen", &toml_str("localhost"));
    let err = hvac_edge::config::parse(&tc.toml(), std::path::Path::new("t.toml"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("metrics.listen: \"localhost\" is not an address and port"),
        "{err}"
    );
}
