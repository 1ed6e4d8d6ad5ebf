//! The upstream goes away or refuses: events are held in the outbox and retried in commit
//! order, `Retry-After` is honoured, a permanent refusal dead-letters the batch and later
//! events still flow.

use crate::harness::*;
use hvac_edge::model::Event;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

struct Setup {
    broker: Mosquitto,
    receiver: Receiver,
    tc: TestConfig,
    daemon: Daemon,
    publisher: Publisher,
}

/// Broker, a receiver answering `script` then 200, and a daemon with a zigbee2mqtt source `z2m`
/// and a sink `upstream` (`batch_max_events` as given; no checkpoint, hence no garbage
/// collection, during the test, so the `events` table stays whole).
async fn setup(sb: &Sandbox, script: Vec<Reply>, batch_max_events: usize) -> Setup {
    setup_with(sb, script, |tc| {
        tc.sink_set(
            "upstream",
            "batch_max_events",
            &batch_max_events.to_string(),
        );
    })
    .await
}

/// Like [`setup`], with any change to the config instead of `batch_max_events`.
async fn setup_with(
    sb: &Sandbox,
    script: Vec<Reply>,
    tweak: impl FnOnce(&mut TestConfig),
) -> Setup {
    let broker = Mosquitto::start();
    let receiver = Receiver::start(script).await;
    let mut tc = TestConfig::new(sb);
    tc.set("pipeline", "checkpoint_interval_secs", "3600")
        .z2m_source("z2m", broker.port())
        .http_sink("upstream", &receiver);
    tweak(&mut tc);
    let daemon = Daemon::start(tc.build()).await;
    broker
        .wait_subscribed(&tc.client_id("z2m"), 1, TIMEOUT)
        .await;
    let publisher = Publisher::connect(broker.port()).await;
    Setup {
        broker,
        receiver,
        tc,
        daemon,
        publisher,
    }
}

fn trv_state(setpoint: f64) -> String {
    json!({"current_heating_setpoint": setpoint, "local_temperature": 19.5,
        "system_mode": "auto", "preset": "manual", "running_state": "heat", "linkquality": 99})
    .to_string()
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_produced_while_the_receiver_is_down_arrive_once_each_in_seq_order() {
    let sb = Sandbox::new("receiver_down");
    let Setup {
        broker: _broker,
        mut receiver,
        tc,
        daemon,
        publisher: mut p,
    } = setup(&sb, vec![], 7).await;
    let base = tc.base_topic();
    let devices = ["d0", "d1", "d2"];
    for d in devices {
        p.publish(&format!("{base}/{d}"), trv_state(20.0), false)
            .await;
    }
    receiver.wait_unique_events(3, TIMEOUT).await;

    receiver.stop().await;
    let requests_before = receiver.request_count();
    for k in 1..=10 {
        for d in devices {
            let setpoint = 20.0 + 0.5 * f64::from(k);
            p.publish(&format!("{base}/{d}"), trv_state(setpoint), false)
                .await;
        }
    }
    let db = Db::open(&tc.db_path());
    wait_until_async("33 committed events", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM events") == 33
    })
    .await;
    wait_until_async("a failed delivery recorded for the sink", TIMEOUT, || {
        db.sink("upstream")
            .is_some_and(|s| s.consecutive_failures >= 1 && s.last_error.is_some())
    })
    .await;
    assert_eq!(receiver.request_count(), requests_before);

    receiver.restart().await;
    let unique = receiver.wait_unique_events(33, TIMEOUT).await;
    assert_eq!(unique.len(), 33);
    // Every committed event arrived, in commit order; duplicates only as identical resends.
    let rows = db.events();
    let row_ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids(&unique), row_ids);
    let accepted = receiver.accepted_events();
    check_duplicates_identical(&accepted).unwrap();
    check_seq_gap_free(&unique).unwrap();
    for d in devices {
        let seqs: Vec<u64> = of_device(&unique, d).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<u64>>(), "device {d}");
    }
    let kinds: HashSet<&str> = unique[3..].iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, HashSet::from(["setpoint"]));
    assert_eq!(receiver.bad_signatures(), 0);
    for r in receiver.requests() {
        assert!(r.events().len() <= 7, "batch_max_events exceeded");
        assert!(r.accepted());
    }

    daemon.stop().await.unwrap();
    let sink = db.sink("upstream").expect("sink row");
    assert_eq!(sink.cursor, 33);
    assert_eq!(sink.consecutive_failures, 0);
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
}

/// The requests after the first accepted one, with the scripted failures before it: all must
/// carry the same batch under the same `webhook-id`, each signed with its own timestamp.
fn assert_same_batch_retried(requests: &[Request], statuses: &[u16]) {
    let got: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(got, statuses);
    let first = &requests[0];
    for r in requests {
        assert!(r.signature_ok && r.timestamp_ok, "signature of a retry");
        assert_eq!(r.body, first.body, "a retry must resend the same body");
        assert_eq!(r.header("webhook-id"), first.header("webhook-id"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_503_then_200_is_retried_with_the_same_webhook_id_and_body() {
    let sb = Sandbox::new("retry_503");
    let script = vec![Reply::status(503).body("busy"), Reply::status(503)];
    let Setup {
        broker: _broker,
        receiver,
        tc,
        daemon,
        publisher: mut p,
    } = setup(&sb, script, 500).await;
    p.publish(&format!("{}/trv", tc.base_topic()), trv_state(21.0), false)
        .await;

    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(events[0].kind, "snapshot");
    let requests = receiver.requests();
    assert_same_batch_retried(&requests, &[503, 503, 200]);
    assert_eq!(requests[0].events(), events.as_slice());
    // retry_schedule_secs = [1] with ±20 % jitter.
    for w in requests.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(gap >= Duration::from_millis(750), "retried after {gap:?}");
    }

    daemon.stop().await.unwrap();
    assert_eq!(receiver.request_count(), 3);
    let sink = Db::open(&tc.db_path()).sink("upstream").expect("sink row");
    assert_eq!(
        (sink.cursor, sink.delivered, sink.consecutive_failures),
        (1, 1, 0)
    );
    assert_eq!(sink.last_status, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_429_with_retry_after_is_retried_no_sooner_than_asked() {
    let sb = Sandbox::new("retry_429");
    // Retry-After 2 s, longer than the 1 s (±20 %) schedule: it must win.
    let script = vec![Reply::status(429).header("retry-after", "2")];
    let Setup {
        broker: _broker,
        receiver,
        tc,
        daemon,
        publisher: mut p,
    } = setup(&sb, script, 500).await;
    p.publish(&format!("{}/trv", tc.base_topic()), trv_state(21.0), false)
        .await;

    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    let requests = receiver.requests();
    assert_same_batch_retried(&requests, &[429, 200]);
    assert_eq!(requests[1].events(), events.as_slice());
    let gap = requests[1].at - requests[0].at;
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    daemon.stop().await.unwrap();
    assert_eq!(
        Db::open(&tc.db_path()).count("SELECT COUNT(*) FROM dead_letters"),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_dead_letters_the_batch_and_later_events_still_flow() {
    let sb = Sandbox::new("dead_letter");
    let script = vec![Reply::status(400).body("unknown device trv")];
    let Setup {
        broker: _broker,
        receiver,
        tc,
        daemon,
        publisher: mut p,
    } = setup(&sb, script, 500).await;
    let topic = format!("{}/trv", tc.base_topic());
    p.publish(&topic, trv_state(21.0), false).await;

    let db = Db::open(&tc.db_path());
    wait_until_async("one dead letter", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM dead_letters") == 1
    })
    .await;
    let rejected = receiver.requests();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].status, 400);
    let snapshot = rejected[0].events()[0].clone();
    let dead = db.dead_letters();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.sink, "upstream");
    assert_eq!(d.event_pos, 1);
    assert_eq!(d.event_id, snapshot.id);
    assert_eq!(
        (d.device.as_str(), d.seq, d.kind.as_str()),
        ("trv", 1, "snapshot")
    );
    assert_eq!(d.reason, "rejected");
    assert_eq!(d.http_status, Some(400));
    assert_eq!(d.response_snippet.as_deref(), Some("unknown device trv"));

    p.publish(&topic, trv_state(21.5), false).await;
    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].seq, events[0].kind.as_str()), (2, "setpoint"));
    assert_eq!(events[0].previous, json!({"value": "21.0", "unit": "C"}));
    assert_eq!(
        receiver.request_count(),
        2,
        "the rejected batch is not resent"
    );
    assert_eq!(receiver.bad_signatures(), 0);

    daemon.stop().await.unwrap();
    assert_eq!(receiver.request_count(), 2);
    let sink = db.sink("upstream").expect("sink row");
    assert_eq!(sink.cursor, 2);
    assert_eq!(db.dead_letters().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_slower_than_the_request_timeout_is_resent_as_an_identical_duplicate() {
    let sb = Sandbox::new("slow_upstream");
    // The receiver stores the first request but answers after the sink gave up on it.
    let script = vec![Reply::ok().delay(Duration::from_millis(1500))];
    let Setup {
        broker: _broker,
        receiver,
        tc,
        daemon,
        publisher: mut p,
    } = setup_with(&sb, script, |tc| {
        tc.sink_set("upstream", "request_timeout_ms", "300");
    })
    .await;
    p.publish(&format!("{}/trv", tc.base_topic()), trv_state(21.0), false)
        .await;

    wait_until_async("the batch sent twice", TIMEOUT, || {
        receiver.request_count() >= 2
    })
    .await;
    let requests = receiver.requests();
    assert_same_batch_retried(&requests[..2], &[200, 200]);
    let accepted = receiver.accepted_events();
    assert_eq!(accepted.len(), 2);
    check_duplicates_identical(&accepted).unwrap();
    let unique = receiver.unique_events();
    assert_eq!(unique.len(), 1);
    assert_eq!((unique[0].seq, unique[0].kind.as_str()), (1, "snapshot"));

    daemon.stop().await.unwrap();
    assert_eq!(
        receiver.request_count(),
        2,
        "delivered once the second answer came"
    );
    let db = Db::open(&tc.db_path());
    let sink = db.sink("upstream").expect("sink row");
    assert_eq!((sink.cursor, sink.delivered), (1, 1));
    assert_eq!(db.count("SELECT COUNT(*) FROM dead_letters"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_ttl_become_expired_dead_letters_and_newer_ones_still_flow() {
    let sb = Sandbox::new("ttl_expiry");
    let Setup {
        broker: _broker,
        mut receiver,
        tc,
        daemon,
        publisher: mut p,
    } = setup_with(&sb, vec![], |tc| {
        tc.sink_set("upstream", "ttl_secs", "1");
    })
    .await;
    receiver.stop().await;
    let topic = format!("{}/trv", tc.base_topic());
    p.publish(&topic, trv_state(21.0), false).await;
    p.publish(&topic, trv_state(21.5), false).await;
    let db = Db::open(&tc.db_path());
    wait_until_async("two events committed", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM events") == 2
    })
    .await;
    // The sink keeps retrying every second; once the events are older than 1 s the next
    // attempt moves them to dead letters instead of sending them.
    wait_until_async("two expired dead letters", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM dead_letters WHERE reason = 'expired'") == 2
    })
    .await;
    let dead = db.dead_letters();
    let got: Vec<(i64, &str, &str, Option<i64>)> = dead
        .iter()
        .map(|d| (d.seq, d.kind.as_str(), d.reason.as_str(), d.http_status))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "snapshot", "expired", None),
            (2, "setpoint", "expired", None)
        ]
    );
    receiver.restart().await;
    p.publish(&topic, trv_state(22.0), false).await;
    let events = receiver.wait_unique_events(1, TIMEOUT).await;
    assert_eq!((events[0].seq, events[0].kind.as_str()), (3, "setpoint"));
    assert_eq!(events[0].previous, json!({"value": "21.5", "unit": "C"}));
    assert_eq!(
        receiver.unique_events().len(),
        1,
        "expired events are never sent"
    );
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_halves_the_batch_instead_of_dead_lettering_it() {
    let sb = Sandbox::new("payload_too_large");
    let Setup {
        broker: _broker,
        mut receiver,
        tc,
        daemon,
        publisher: mut p,
    } = setup(&sb, vec![Reply::status(413).body("too large")], 500).await;
    receiver.stop().await;
    let topic = format!("{}/trv", tc.base_topic());
    for sp in [20.0, 20.5, 21.0, 21.5] {
        p.publish(&topic, trv_state(sp), false).await;
    }
    let db = Db::open(&tc.db_path());
    wait_until_async("four events committed", TIMEOUT, || {
        db.count("SELECT COUNT(*) FROM events") == 4
    })
    .await;
    receiver.restart().await;
    let events = receiver.wait_unique_events(4, TIMEOUT).await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    let requests = receiver.requests();
    assert_eq!(requests[0].status, 413);
    assert_eq!(requests[0].events().len(), 4);
    assert_eq!(
        requests[1].events().len(),
        2,
        "retried with half the events"
    );
    assert!(db.dead_letters().is_empty(), "a 413 dead-letters nothing");
    daemon.stop().await.unwrap();
}
