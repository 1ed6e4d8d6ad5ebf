//! Interoperability: the signatures the HTTP sink sends are accepted by the reference Standard
//! Webhooks library (Python `standardwebhooks`, installed in `.venv` by `scripts/test.sh`).

use crate::harness::*;
use std::path::PathBuf;
use std::process::Command;

/// The venv interpreter `scripts/test.sh` prepares (or `HVAC_EDGE_TEST_PYTHON`).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("HVAC_EDGE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} not found: run scripts/test.sh (it creates the venv with `pip install standardwebhooks`)",
        p.display()
    );
    p
}

const VERIFY: &str = r#"
import sys, json
from standardwebhooks import Webhook
secret, headers_file, body_file = sys.argv[1:4]
headers = json.load(open(headers_file))
body = open(body_file, "rb").read().decode()
payload = Webhook(secret).verify(body, headers)
print(len(payload["events"]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_python_verifier_accepts_every_signed_batch() {
    let sb = Sandbox::new("interop");
    let broker = Mosquitto::start();
    let receiver = Receiver::start(vec![]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let mut p = Publisher::connect(broker.port()).await;
    let topic = format!("{}/hall", tc.base_topic());
    for sp in [20.0, 20.5, 21.0] {
        p.publish(
            &topic,
            format!(r#"{{"occupied_heating_setpoint":{sp},"local_temperature":19.0}}"#),
            false,
        )
        .await;
        // One request per change, so several distinct signatures are checked.
        let n = receiver.unique_events().len() + 1;
        receiver.wait_unique_events(n, TIMEOUT).await;
    }
    daemon.stop().await.unwrap();
    let requests = receiver.requests();
    assert!(requests.len() >= 3);
    for (i, r) in requests.iter().enumerate() {
        let headers: serde_json::Map<String, serde_json::Value> = r
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with("webhook-"))
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let hf = sb.path().join(format!("headers-{i}.json"));
        let bf = sb.path().join(format!("body-{i}.json"));
        std::fs::write(&hf, serde_json::to_vec(&headers).unwrap()).unwrap();
        std::fs::write(&bf, &r.body).unwrap();
        let out = Command::new(python())
            .args(["-c", VERIFY, receiver.whsec()])
            .arg(&hf)
            .arg(&bf)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "request {i} rejected by standardwebhooks: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            r.events().len().to_string()
        );
        // Control: the same verifier rejects a tampered body, so the check above can fail.
        let mut tampered = r.body.clone();
        tampered.push(b' ');
        std::fs::write(&bf, &tampered).unwrap();
        let out = Command::new(python())
            .args(["-c", VERIFY, receiver.whsec()])
            .arg(&hf)
            .arg(&bf)
            .output()
            .expect("run python");
        assert!(!out.status.success(), "a tampered body must be rejected");
    }
}
