//! `NatsCluster`: three routed nodes with clustered JetStream survive losing one (the meta
//! leader, to force an election) and take it back on the same ports and store dir.

mod common;

use std::time::Duration;

use common::{RawNats, js_request_until_ok};
use mailroom_testkit::{NatsCluster, TestkitError};

const R3_CREATE: &str = "$JS.API.STREAM.CREATE.CLUSTERED";
const R3_INFO: &str = "$JS.API.STREAM.INFO.CLUSTERED";
const R3_CONFIG: &str =
    r#"{"name":"CLUSTERED","subjects":["clustered.>"],"storage":"file","num_replicas":3}"#;

#[test]
fn three_nodes_survive_killing_the_meta_leader() {
    let mut cluster = NatsCluster::start(3).expect("start 3-node cluster");
    assert_eq!(cluster.size(), 3);
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    for (i, node) in cluster.nodes().iter().enumerate() {
        assert_eq!(urls[i], node.url());
        let client = RawNats::connect(node.port()).expect("connect");
        assert!(
            client.info.contains("\"jetstream\":true"),
            "{}",
            client.info
        );
        assert!(node.is_healthy(), "node {i}");
        assert!(node.cluster_port().is_some());
    }
    assert!(matches!(
        cluster.node(3),
        Err(TestkitError::NoSuchNode { index: 3, size: 3 })
    ));
    let routez = cluster
        .node(0)
        .expect("node 0")
        .monitor_json("/routez")
        .expect("routez");
    assert!(routez["num_routes"].as_u64().unwrap_or(0) >= 2, "{routez}");

    let created = js_request_until_ok(
        cluster.node(0).expect("node 0").port(),
        R3_CREATE,
        R3_CONFIG,
        Duration::from_secs(20),
    )
    .expect("create R3 stream");
    assert!(created.contains("stream_create_response"), "{created}");

    let victim = cluster
        .meta_leader_index()
        .expect("jsz")
        .expect("a meta leader");
    let (port, store) = {
        let node = cluster.node(victim).expect("victim");
        (node.port(), node.store_dir())
    };
    cluster.kill(victim).expect("kill the meta leader");
    assert!(!cluster.node_mut(victim).expect("victim").is_running());

    // The other two elect a new leader and stay healthy.
    cluster.wait_healthy().expect("survivors healthy");
    let leader = cluster
        .meta_leader_index()
        .expect("jsz")
        .expect("a new meta leader");
    assert_ne!(leader, victim);
    let survivor = (victim + 1) % 3;
    let info = js_request_until_ok(
        cluster.node(survivor).expect("survivor").port(),
        R3_INFO,
        "",
        Duration::from_secs(30),
    )
    .expect("R3 stream still served with one node down");
    assert!(info.contains("\"CLUSTERED\""), "{info}");

    // Back on the same port and store; the cluster is whole again.
    cluster.restart(victim).expect("restart the victim");
    let node = cluster.node_mut(victim).expect("victim");
    assert!(node.is_running());
    assert_eq!(node.port(), port);
    assert_eq!(node.store_dir(), store);
    for (i, node) in cluster.nodes().iter().enumerate() {
        assert!(node.is_healthy(), "node {i} healthy after restart");
    }
}

#[test]
fn one_node_cluster_is_refused() {
    let err = NatsCluster::builder()
        .size(1)
        .start()
        .expect_err("a one-node cluster is refused");
    assert!(matches!(err, TestkitError::InvalidOption(_)), "{err}");
}
