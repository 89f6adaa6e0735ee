//! Standalone `NatsServer`: start, JetStream on, options, restart on the same port and store,
//! kill, drop. Needs the nats-server binary (`e2e/tools/build.sh`).

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::{RawNats, js_request_until_ok};
use mailroom_testkit::NatsServer;

const STREAM_CREATE: &str = "$JS.API.STREAM.CREATE.TESTKIT";
const STREAM_INFO: &str = "$JS.API.STREAM.INFO.TESTKIT";
const STREAM_CONFIG: &str =
    r#"{"name":"TESTKIT","subjects":["testkit.>"],"storage":"file","num_replicas":1}"#;

fn port_is_closed(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_millis(500),
    )
    .is_err()
}

#[test]
fn single_node_announces_jetstream_in_info() {
    let mut nats = NatsServer::start().expect("start nats-server");
    assert!(nats.is_running());
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
    assert_ne!(nats.port(), nats.monitor_port());

    let mut client = RawNats::connect(nats.port()).expect("connect");
    assert!(client.info.starts_with("INFO {"), "{}", client.info);
    assert!(
        client.info.contains("\"jetstream\":true"),
        "{}",
        client.info
    );
    assert_eq!(client.handshake("").expect("handshake"), "PONG");

    let varz = nats.monitor_json("/varz").expect("varz");
    assert_eq!(varz["server_name"], nats.server_name());
    assert!(nats.is_healthy());
    assert!(nats.store_dir().starts_with(nats.dir()));
}

#[test]
fn restart_keeps_port_and_jetstream_store() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let (port, monitor_port, store) = (nats.port(), nats.monitor_port(), nats.store_dir());
    let created = js_request_until_ok(port, STREAM_CREATE, STREAM_CONFIG, Duration::from_secs(10))
        .expect("create stream");
    assert!(created.contains("stream_create_response"), "{created}");

    nats.restart().expect("graceful restart");
    assert_eq!(nats.port(), port);
    assert_eq!(nats.monitor_port(), monitor_port);
    assert_eq!(nats.store_dir(), store);
    let info = js_request_until_ok(port, STREAM_INFO, "", Duration::from_secs(10))
        .expect("stream survives a graceful restart");
    assert!(info.contains("\"TESTKIT\""), "{info}");

    nats.kill().expect("SIGKILL");
    assert!(!nats.is_running());
    assert!(port_is_closed(port));
    nats.restart().expect("restart after kill");
    assert_eq!(nats.port(), port);
    let info = js_request_until_ok(port, STREAM_INFO, "", Duration::from_secs(10))
        .expect("stream survives a crash");
    assert!(info.contains("\"TESTKIT\""), "{info}");
    assert!(nats.log().contains("mailroom-testkit: starting"));
}

#[test]
fn stop_and_drop_end_the_process() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let port = nats.port();
    nats.stop().expect("stop");
    assert!(!nats.is_running());
    assert!(nats.pid().is_none());
    assert!(port_is_closed(port));
    nats.stop().expect("second stop is a no-op");

    let nats = NatsServer::start().expect("start nats-server");
    let (port, dir) = (nats.port(), nats.dir().to_path_buf());
    drop(nats);
    assert!(port_is_closed(port));
    assert!(!dir.exists(), "temp dir {} removed", dir.display());
}

#[test]
fn max_payload_is_announced() {
    let nats = NatsServer::builder()
        .max_payload(2048)
        .start()
        .expect("start nats-server");
    let client = RawNats::connect(nats.port()).expect("connect");
    assert!(
        client.info.contains("\"max_payload\":2048"),
        "{}",
        client.info
    );
}

#[test]
fn token_auth_is_enforced() {
    let nats = NatsServer::builder()
        .token("s3cret-token")
        .start()
        .expect("start nats-server");
    let mut client = RawNats::connect(nats.port()).expect("connect");
    assert!(
        client.info.contains("\"auth_required\":true"),
        "{}",
        client.info
    );
    let reply = client.handshake(r#""auth_token":"wrong""#).expect("reply");
    assert!(reply.contains("Authorization Violation"), "{reply}");

    let mut client = RawNats::connect(nats.port()).expect("connect");
    assert_eq!(
        client
            .handshake(r#""auth_token":"s3cret-token""#)
            .expect("reply"),
        "PONG"
    );
}

#[test]
fn user_password_auth_is_enforced() {
    let nats = NatsServer::builder()
        .user_password("mailroom", "pa55")
        .start()
        .expect("start nats-server");
    let mut client = RawNats::connect(nats.port()).expect("connect");
    let reply = client
        .handshake(r#""user":"mailroom","pass":"nope""#)
        .expect("reply");
    assert!(reply.contains("Authorization Violation"), "{reply}");

    let mut client = RawNats::connect(nats.port()).expect("connect");
    assert_eq!(
        client
            .handshake(r#""user":"mailroom","pass":"pa55""#)
            .expect("reply"),
        "PONG"
    );
}

#[test]
fn many_servers_start_in_parallel() {
    let handles: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(|| NatsServer::start().expect("start nats-server")))
        .collect();
    let servers: Vec<NatsServer> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let mut ports: Vec<u16> = servers
        .iter()
        .flat_map(|s| [s.port(), s.monitor_port()])
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 8);
    for s in &servers {
        let client = RawNats::connect(s.port()).expect("connect");
        assert!(client.info.contains("\"jetstream\":true"));
    }
}

#[test]
fn tls_is_required_when_configured() {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("self-signed");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");

    let nats = NatsServer::builder()
        .tls(&cert, &key)
        .start()
        .expect("start nats-server with TLS");
    let client = RawNats::connect(nats.port()).expect("connect");
    assert!(
        client.info.contains("\"tls_required\":true"),
        "{}",
        client.info
    );
}
