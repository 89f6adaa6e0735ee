//! JetStream-specific behaviour against real nats-servers (`mailroom-testkit`; build the binary
//! with `e2e/tools/build.sh`): large bodies through the Object Store, de-duplication, one entry
//! per destination domain, and what happens when the server goes away and comes back.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use common::{eventually, nats, object_gone, refs_key_present};
use futures_util::StreamExt;
use mailroom_queue::contract;
use mailroom_queue::jetstream::{JetStreamOptions, JetStreamQueue};
use mailroom_queue::{Queue, QueueError, StoredMessage};
use mailroom_testkit::NatsServer;

async fn open(server: &NatsServer, publish_timeout: Duration) -> JetStreamQueue {
    JetStreamQueue::connect(JetStreamOptions {
        urls: vec![server.url()],
        publish_timeout,
        ..JetStreamOptions::default()
    })
    .await
    .expect("connect to nats-server")
}

/// A plain client on the same server, to look at what the backend stored.
async fn inspect(server: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(server.url())
        .await
        .expect("inspection client");
    jetstream::new(client)
}

/// `len` octets of CRLF text that is not periodic, so truncation or reordering shows.
fn big_body(len: usize) -> Bytes {
    let mut body = Vec::with_capacity(len + 80);
    let mut i = 0u64;
    while body.len() < len {
        body.extend_from_slice(
            format!(
                "line {i:010} {:016x}\r\n",
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            )
            .as_bytes(),
        );
        i += 1;
    }
    body.truncate(len);
    Bytes::from(body)
}

/// Entries per subject in the queue stream (due and deferred).
async fn subjects(js: &jetstream::Context) -> HashMap<String, usize> {
    let stream = js.get_stream("MAILROOM").await.expect("get stream");
    let info = stream
        .info_with_subjects("mailroom.>")
        .await
        .expect("stream info with subjects");
    let mut info = std::pin::pin!(info);
    let mut out = HashMap::new();
    while let Some(item) = info.next().await {
        let (subject, count) = item.expect("subject page");
        out.insert(subject, count);
    }
    out
}

async fn stream_messages(js: &jetstream::Context) -> u64 {
    js.get_stream("MAILROOM")
        .await
        .expect("get stream")
        .get_info()
        .await
        .expect("stream info")
        .state
        .messages
}

async fn roundtrip_large(
    queue: &JetStreamQueue,
    js: &jetstream::Context,
    len: usize,
    rcpts: &[&str],
) {
    let mut message = contract::message("big@example.org", rcpts);
    message.body = big_body(len);
    let id = message.envelope.id;
    let started = Instant::now();
    queue.enqueue(message.clone()).await.expect("enqueue large");
    eprintln!("enqueue of {len} octets took {:?}", started.elapsed());
    let got = queue
        .get(id)
        .await
        .expect("get large")
        .expect("large message present");
    assert_eq!(got.body.len(), len);
    assert!(
        got.body == message.body,
        "large body comes back byte for byte"
    );
    assert_eq!(got.envelope, message.envelope);
    assert!(
        !object_gone(js, &id.to_string()).await,
        "body object exists while queued"
    );
    assert!(refs_key_present(js, &id.to_string()).await);
    let list = queue.list(10).await.expect("list");
    assert!(list.iter().any(|s| s.id == id && s.size == len as u64));

    assert!(queue.delete(id).await.expect("delete large"));
    assert_eq!(queue.get(id).await.expect("get after delete"), None);
    assert!(
        object_gone(js, &id.to_string()).await,
        "delete frees the body object"
    );
    assert!(
        !refs_key_present(js, &id.to_string()).await,
        "and its reference count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_go_through_the_object_store() {
    let server = nats(NatsServer::builder().max_payload(1 << 20));
    let queue = open(&server, Duration::from_secs(60)).await;
    let js = inspect(&server).await;
    assert_eq!(
        js.client().server_info().max_payload,
        1 << 20,
        "server runs with max_payload 1 MiB"
    );

    // Just under and over the inline limit (1 MiB - 64 KiB).
    let mut small = contract::message("a@example.org", &["x@one.example"]);
    small.body = big_body((1 << 20) - (64 << 10));
    queue
        .enqueue(small.clone())
        .await
        .expect("enqueue at the inline limit");
    assert!(
        object_gone(&js, &small.envelope.id.to_string()).await,
        "inline: no object"
    );
    assert_eq!(
        queue.get(small.envelope.id).await.expect("get"),
        Some(small.clone())
    );

    roundtrip_large(&queue, &js, 5 << 20, &["a@one.example", "b@two.example"]).await;
    roundtrip_large(&queue, &js, 50 << 20, &["c@three.example"]).await;

    // The inline message is untouched by all that.
    assert_eq!(
        queue.get(small.envelope.id).await.expect("get"),
        Some(small)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_queue_id_twice_is_one_entry_per_domain() {
    let server = nats(NatsServer::builder());
    let queue = open(&server, Duration::from_secs(10)).await;
    let js = inspect(&server).await;
    let message = contract::message("a@example.org", &["x@one.example", "y@two.example"]);
    queue.enqueue(message.clone()).await.expect("first enqueue");
    queue
        .enqueue(message.clone())
        .await
        .expect("second enqueue is de-duplicated, not refused");
    assert_eq!(
        stream_messages(&js).await,
        2,
        "one entry per domain, not two"
    );
    assert_eq!(queue.stats().await.expect("stats").messages, 1);
    assert_eq!(
        queue.get(message.envelope.id).await.expect("get"),
        Some(message.clone())
    );

    // Deleted within the duplicate window: a re-enqueue under the same id must not be
    // swallowed silently as a duplicate of entries that are gone.
    assert!(queue.delete(message.envelope.id).await.expect("delete"));
    let again = queue.enqueue(message.clone()).await;
    assert!(
        matches!(again, Err(QueueError::Unavailable(_))),
        "re-enqueue of a deleted id within the window is refused: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_entry_per_destination_domain_with_its_subject() {
    let server = nats(NatsServer::builder());
    let queue = open(&server, Duration::from_secs(10)).await;
    let js = inspect(&server).await;
    let message = contract::message(
        "a@example.org",
        &[
            "1@one.example",
            "2@two.example",
            "3@one.example",
            "4@mx.three.example",
        ],
    );
    queue.enqueue(message.clone()).await.expect("enqueue");
    let subjects = subjects(&js).await;
    let expected: HashMap<String, usize> = [
        ("mailroom.q.default.one.example", 1),
        ("mailroom.q.default.two.example", 1),
        ("mailroom.q.default.mx.three.example", 1),
    ]
    .into_iter()
    .map(|(s, n)| (s.to_string(), n))
    .collect();
    assert_eq!(subjects, expected);
    // get reassembles all recipients in their original order.
    assert_eq!(
        queue.get(message.envelope.id).await.expect("get"),
        Some(message.clone())
    );
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats.messages, 1);
    assert_eq!(stats.by_domain.len(), 3);

    // A message with a policy name and a domain that are not plain subject tokens.
    let mut odd = contract::message("b@example.org", &["x@bücher.example"]);
    odd.envelope.policy = "bulk.mail".into();
    queue.enqueue(odd.clone()).await.expect("enqueue odd names");
    assert_eq!(
        queue.get(odd.envelope.id).await.expect("get odd"),
        Some(odd)
    );
    assert_eq!(
        queue
            .stats()
            .await
            .expect("stats")
            .by_domain
            .get("bücher.example"),
        Some(&1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_means_451_and_not_ready_until_it_is_back() {
    let mut server = nats(NatsServer::builder());
    let publish_timeout = Duration::from_secs(2);
    let queue = open(&server, publish_timeout).await;
    assert!(queue.is_ready());
    let before = contract::message("a@example.org", &["x@one.example"]);
    queue
        .enqueue(before.clone())
        .await
        .expect("enqueue while up");

    server.kill().expect("kill nats-server");
    assert!(
        eventually(Duration::from_secs(5), || !queue.is_ready()).await,
        "is_ready turns false when the server is gone"
    );
    let started = Instant::now();
    let result = queue
        .enqueue(contract::message("a@example.org", &["y@one.example"]))
        .await;
    let took = started.elapsed();
    assert!(
        matches!(result, Err(QueueError::Unavailable(_))),
        "enqueue fails while down: {result:?}"
    );
    assert!(
        took <= publish_timeout + Duration::from_millis(500),
        "failed within publish_timeout: {took:?}"
    );

    server.restart().expect("restart nats-server");
    assert!(
        eventually(Duration::from_secs(10), || queue.is_ready()).await,
        "is_ready comes back by itself after the restart"
    );
    let after = contract::message("a@example.org", &["z@one.example"]);
    queue
        .enqueue(after.clone())
        .await
        .expect("enqueue after restart");
    assert_eq!(
        queue.get(before.envelope.id).await.expect("get"),
        Some(before)
    );
    assert_eq!(
        queue.get(after.envelope.id).await.expect("get"),
        Some(after)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_the_server_is_down() {
    let mut server = nats(NatsServer::builder());
    server.stop().expect("stop nats-server");
    let started = Instant::now();
    let queue = open(&server, Duration::from_secs(1)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "connect does not hang"
    );
    assert!(!queue.is_ready(), "not ready without a server");
    let message: StoredMessage = contract::message("a@example.org", &["x@one.example"]);
    assert!(queue.enqueue(message.clone()).await.is_err());

    server.restart().expect("start nats-server");
    assert!(
        eventually(Duration::from_secs(10), || queue.is_ready()).await,
        "becomes ready once the server is there"
    );
    queue
        .enqueue(message.clone())
        .await
        .expect("enqueue once up");
    assert_eq!(
        queue.get(message.envelope.id).await.expect("get"),
        Some(message)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_user_password_auth() {
    use mailroom_queue::jetstream::NatsAuth;
    let with_auth = |server: &NatsServer, auth: NatsAuth| JetStreamOptions {
        urls: vec![server.url()],
        auth,
        publish_timeout: Duration::from_secs(1),
        ..JetStreamOptions::default()
    };

    let server = nats(NatsServer::builder().token("s3cret-token"));
    let queue = JetStreamQueue::connect(with_auth(&server, NatsAuth::Token("s3cret-token".into())))
        .await
        .expect("connect with token");
    assert!(queue.is_ready());
    let message = contract::message("a@example.org", &["x@one.example"]);
    queue
        .enqueue(message.clone())
        .await
        .expect("enqueue with token");
    let wrong = JetStreamQueue::connect(with_auth(&server, NatsAuth::Token("wrong".into())))
        .await
        .expect("a wrong token is not a start-up error");
    assert!(!wrong.is_ready(), "a wrong token never gets ready");
    assert!(wrong.enqueue(message).await.is_err());

    let server = nats(NatsServer::builder().user_password("mailroom", "pa55"));
    let queue = JetStreamQueue::connect(with_auth(
        &server,
        NatsAuth::UserPassword {
            user: "mailroom".into(),
            password: "pa55".into(),
        },
    ))
    .await
    .expect("connect with user and password");
    assert!(queue.is_ready());
    queue
        .enqueue(contract::message("a@example.org", &["x@one.example"]))
        .await
        .expect("enqueue with user and password");
    let debug = format!("{:?}", queue.options().auth);
    assert!(
        !debug.contains("pa55"),
        "Debug redacts the password: {debug}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_are_validated_before_connecting() {
    for (options, what) in [
        (
            JetStreamOptions {
                urls: vec![],
                ..JetStreamOptions::default()
            },
            "urls",
        ),
        (
            JetStreamOptions {
                stream: "A.B".into(),
                ..JetStreamOptions::default()
            },
            "stream",
        ),
        (
            JetStreamOptions {
                replicas: 0,
                ..JetStreamOptions::default()
            },
            "replicas",
        ),
        (
            JetStreamOptions {
                duplicate_window: Duration::from_secs(3600 * 24 * 30),
                ..JetStreamOptions::default()
            },
            "duplicate_window",
        ),
        (
            JetStreamOptions {
                auth: mailroom_queue::jetstream::NatsAuth::CredentialsFile(
                    "/nonexistent.creds".into(),
                ),
                ..JetStreamOptions::default()
            },
            "auth",
        ),
    ] {
        match JetStreamQueue::connect(options).await {
            Err(QueueError::Config(message)) => assert!(message.contains(what), "{message}"),
            other => panic!("{what}: expected a configuration error, got {other:?}"),
        }
    }
}

/// Stream replicas 3 on a 3-node cluster: the node that leads the stream is killed while
/// messages are enqueued. Every enqueue that returned Ok is in the queue afterwards; enqueues
/// succeed again after the failover without any intervention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_keeps_every_acknowledged_message() {
    let mut cluster = mailroom_testkit::NatsCluster::start(3).unwrap_or_else(|e| {
        panic!("the jetstream tests need nats-server (run e2e/tools/build.sh): {e}")
    });
    let queue = JetStreamQueue::connect(JetStreamOptions {
        urls: cluster.urls(),
        replicas: 3,
        publish_timeout: Duration::from_secs(5),
        ..JetStreamOptions::default()
    })
    .await
    .expect("connect to the cluster");
    assert!(queue.is_ready());

    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let m = contract::message(
            "a@example.org",
            &[&format!("r{i}@one.example"), "s@two.example"],
        );
        queue
            .enqueue(m.clone())
            .await
            .expect("enqueue before the failure");
        acknowledged.push(m);
    }

    // Kill the stream leader.
    let client = async_nats::connect(cluster.urls())
        .await
        .expect("inspection client");
    let js = jetstream::new(client);
    let mut stream = js.get_stream("MAILROOM").await.expect("stream");
    let leader = stream
        .info()
        .await
        .expect("stream info")
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("stream has a leader");
    let leader_index = cluster
        .nodes()
        .iter()
        .position(|n| n.server_name() == leader)
        .expect("leader is one of the nodes");
    cluster.kill(leader_index).expect("kill the stream leader");

    let mut refused = 0;
    let mut consecutive_ok = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 10;
    while consecutive_ok < 10 && Instant::now() < deadline {
        let m = contract::message(
            "a@example.org",
            &[&format!("r{i}@one.example"), "s@two.example"],
        );
        i += 1;
        match queue.enqueue(m.clone()).await {
            Ok(()) => {
                acknowledged.push(m);
                consecutive_ok += 1;
            }
            Err(_) => {
                refused += 1;
                consecutive_ok = 0;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!(
        "failover: {} acknowledged, {refused} refused (4xx, resendable)",
        acknowledged.len()
    );
    assert_eq!(consecutive_ok, 10, "enqueue works again after the failover");

    for m in &acknowledged {
        assert_eq!(
            queue.get(m.envelope.id).await.expect("get"),
            Some(m.clone()),
            "acknowledged message kept"
        );
    }
    cluster
        .restart(leader_index)
        .expect("restart the killed node");
    for m in &acknowledged {
        assert_eq!(
            queue.get(m.envelope.id).await.expect("get"),
            Some(m.clone()),
            "kept after the restart"
        );
    }
    assert_eq!(
        queue.stats().await.expect("stats").messages,
        acknowledged.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    use mailroom_queue::jetstream::NatsTls;
    let dir = tempfile::tempdir().expect("tempdir");
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("self-signed certificate");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    let server = nats(NatsServer::builder().tls(&cert, &key));
    let options = |ca_file: Option<std::path::PathBuf>| JetStreamOptions {
        urls: vec![server.url()],
        tls: Some(NatsTls {
            ca_file,
            ..NatsTls::default()
        }),
        publish_timeout: Duration::from_secs(2),
        ..JetStreamOptions::default()
    };

    let queue = JetStreamQueue::connect(options(Some(cert.clone())))
        .await
        .expect("connect over TLS");
    assert!(queue.is_ready(), "ready over TLS with the private CA");
    let message = contract::message("a@example.org", &["x@one.example"]);
    queue
        .enqueue(message.clone())
        .await
        .expect("enqueue over TLS");
    assert_eq!(
        queue.get(message.envelope.id).await.expect("get"),
        Some(message)
    );

    let untrusted = JetStreamQueue::connect(options(None))
        .await
        .expect("an untrusted server is not a start-up error");
    assert!(
        !untrusted.is_ready(),
        "never ready when the server certificate is not trusted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_auth() {
    use mailroom_queue::jetstream::NatsAuth;
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let server = nats(NatsServer::builder().extra_config(format!(
        "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}",
        user.public_key()
    )));
    let options = |auth: NatsAuth| JetStreamOptions {
        urls: vec![server.url()],
        auth,
        publish_timeout: Duration::from_secs(1),
        ..JetStreamOptions::default()
    };
    let queue = JetStreamQueue::connect(options(NatsAuth::NkeySeed(seed.clone())))
        .await
        .expect("connect with an nkey");
    assert!(queue.is_ready());
    let message = contract::message("a@example.org", &["x@one.example"]);
    queue
        .enqueue(message.clone())
        .await
        .expect("enqueue with an nkey");
    assert_eq!(
        queue.get(message.envelope.id).await.expect("get"),
        Some(message.clone())
    );
    assert!(
        !format!("{:?}", queue.options().auth).contains(&seed),
        "Debug redacts the seed"
    );

    let stranger = nkeys::KeyPair::new_user().seed().expect("seed");
    let wrong = JetStreamQueue::connect(options(NatsAuth::NkeySeed(stranger)))
        .await
        .expect("an unknown nkey is not a start-up error");
    assert!(!wrong.is_ready(), "an unknown nkey never gets ready");
    assert!(wrong.enqueue(message).await.is_err());
}

/// What KEDA's JetStream scaler reads, the policy consumer's `num_pending` (plus
/// `num_ack_pending`), counts due entries only: deferred entries wait outside the consumer's
/// subjects as scheduled messages, and come back to it at their time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_entries_are_not_consumer_backlog() {
    use mailroom_queue::{LeaseRequest, Retry, now_ms};
    let server = nats(NatsServer::builder());
    let queue = open(&server, Duration::from_secs(5)).await;
    for i in 0..3 {
        queue
            .enqueue(contract::message("a@x.org", &[&format!("{i}@d.example")]))
            .await
            .expect("enqueue");
    }
    let request = LeaseRequest::new("default", 10, Duration::from_secs(5));
    let mut leases = Vec::new();
    while leases.len() < 3 {
        leases.extend(queue.lease(&request).await.expect("lease"));
    }
    let done = leases.pop().expect("lease");
    queue.ack(done).await.expect("ack");
    let at_ms = now_ms() + 3_000;
    for lease in leases {
        let recipients = lease.message.envelope.recipients.clone();
        queue
            .defer(
                lease,
                Retry {
                    at_ms,
                    recipients,
                    response: "451 4.7.1 later".into(),
                },
            )
            .await
            .expect("defer");
    }
    queue
        .enqueue(contract::message("a@x.org", &["new@d.example"]))
        .await
        .expect("enqueue");

    let js = inspect(&server).await;
    let mut stream = js.get_stream("MAILROOM").await.expect("stream");
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_consumer("mailroom-default")
        .await
        .expect("the policy's durable consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(
        (info.num_pending, info.num_ack_pending),
        (1, 0),
        "only the new entry is consumer backlog"
    );
    let backlog = queue.backlogs().await.expect("backlogs")["default"].clone();
    assert_eq!((backlog.ready, backlog.deferred, backlog.leased), (1, 2, 0));
    let deferred: usize = subjects(&js)
        .await
        .iter()
        .filter(|(s, _)| s.starts_with("mailroom.d.default."))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(deferred, 2, "two scheduled messages");
    assert_eq!(stream.info().await.expect("stream info").state.messages, 3);

    // At their time the schedules put them back on the consumer's subjects.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let info = consumer.info().await.expect("consumer info");
        if info.num_pending == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deferred entries did not come back: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backlog = queue.backlogs().await.expect("backlogs")["default"].clone();
    assert_eq!((backlog.ready, backlog.deferred), (3, 0));
}
