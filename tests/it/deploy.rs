//! Deployment (issue 13): the daemon's topology.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_cannot_be_built_fails_the_start_before_the_database_is_opened() {
    let sb = Sandbox::new("deploy_build_first");
    let broker = Mosquitto::start();
    let receiver = Receiver::start([]).await;
    let mut tc = TestConfig::new(&sb);
    tc.z2m_source("z2m", broker.port())
        .webhook_sink("portal", &receiver);
    // Valid when checked, gone when the daemon builds its sinks (a secret rotated away).
    let cfg = tc.build();
    std::fs::remove_file(sb.path().join("portal.whsec")).unwrap();
    let err = hvac_edge::daemon::run(cfg, tokio_util::sync::CancellationToken::new(), None)
        .await
        .expect_err("the start must fail");
    let msg = format!("{err:#}");
    assert!(msg.starts_with("cannot start sink portal: "), "{msg}");
    assert!(msg.contains("portal.whsec"), "{msg}");
    assert!(
        !tc.db_path().exists(),
        "nothing ran: not even the database was created"
    );
    assert_eq!(
        broker.count_lines_containing(&tc.client_id("z2m")),
        0,
        "the source never connected"
    );
}
