//! The delivery worker end to end inside one process, with real parts: the local spool as the
//! sending queue, the test kit's DNS server on loopback for MX records, and Mailroom inbound
//! listeners on 127.0.0.x as the receiving MX hosts (each with its own spool to look into).

use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mailroom_config::{DeliveryPolicySpec, HumanDuration, ListenerSpec};
use mailroom_inbound::{InboundDeps, Listener, Shutdown};
use mailroom_outbound::shaping::ShapingStore;
use mailroom_outbound::{Worker, WorkerDeps};
use mailroom_queue::local::{LocalOptions, LocalQueue};
use mailroom_queue::{Queue, StoredMessage, contract};
use mailroom_telemetry::DeliveryLog;
use mailroom_testkit::{DnsServer, Zone};
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(2);

/// A free TCP port on 127.0.0.1 (the receivers bind the same port on other 127.0.0.x).
fn free_port() -> u16 {
    StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A Mailroom inbound listener with its own spool, accepting `domains`.
struct Receiver {
    queue: Arc<LocalQueue>,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

impl Receiver {
    async fn start(addr: SocketAddr, domains: &[&str]) -> Receiver {
        Self::start_named(addr, domains, &format!("mx.{}", domains[0])).await
    }

    async fn start_named(addr: SocketAddr, domains: &[&str], hostname: &str) -> Receiver {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Arc::new(
            LocalQueue::open(dir.path().join("spool"), LocalOptions::default())
                .await
                .expect("receiver spool"),
        );
        let mut spec = ListenerSpec::new("mx", addr.to_string());
        spec.accepted_domains = domains.iter().map(|d| d.to_string()).collect();
        spec.hostname = Some(hostname.to_string());
        let deps = InboundDeps {
            queue: Arc::clone(&queue) as Arc<dyn Queue>,
            delivery_log: DeliveryLog::discard(),
            hostname: "mx.test".into(),
            shared: None,
        };
        let listener = Listener::bind(&spec, "listeners[0]", &deps)
            .await
            .expect("bind receiver");
        let shutdown = Shutdown::default();
        tokio::spawn(listener.run(shutdown.clone()));
        Receiver {
            queue,
            shutdown,
            _dir: dir,
        }
    }

    /// Waits until the receiver holds `n` messages; returns them.
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<StoredMessage> {
        let deadline = Instant::now() + within;
        loop {
            let list = self.queue.list(usize::MAX).await.expect("list");
            if list.len() >= n || Instant::now() > deadline {
                let mut out = Vec::new();
                for e in list {
                    out.push(self.queue.get(e.id).await.expect("get").expect("stored"));
                }
                return out;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.stop.cancel();
        self.shutdown.abort.cancel();
    }
}

/// The sending side: a spool and a running worker for `policy`.
struct Sender {
    queue: Arc<LocalQueue>,
    /// The workers' shaping state (rules, last errors).
    shaping: Arc<mailroom_outbound::shaping::MemoryStore>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Sender {
    async fn start(policy: &DeliveryPolicySpec) -> Sender {
        let dir = tempfile::tempdir().expect("tempdir");
        let queue = Arc::new(
            LocalQueue::open(
                dir.path().join("spool"),
                LocalOptions {
                    lease_time: LEASE,
                    ..LocalOptions::default()
                },
            )
            .await
            .expect("sender spool"),
        );
        let log = dir.path().join("delivery.jsonl");
        let shaping = Arc::new(mailroom_outbound::shaping::MemoryStore::default());
        let (stop, task) = Self::run(policy, &queue, &log, &shaping);
        Sender {
            queue,
            shaping,
            stop,
            task,
            log,
            _dir: dir,
        }
    }

    fn run(
        policy: &DeliveryPolicySpec,
        queue: &Arc<LocalQueue>,
        log: &std::path::Path,
        shaping: &Arc<mailroom_outbound::shaping::MemoryStore>,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let deps = WorkerDeps {
            queue: Arc::clone(queue) as Arc<dyn Queue>,
            delivery_log: DeliveryLog::open(Some(log)).expect("delivery log"),
            hostname: "sender.test".into(),
            lease_time: LEASE,
            shaping: Arc::clone(shaping) as Arc<dyn mailroom_outbound::shaping::ShapingStore>,
        };
        let worker = Worker::new(policy, deps).expect("worker");
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker.run(stop.clone(), Duration::from_secs(5)));
        (stop, task)
    }

    async fn wait_empty(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.queue.stats().await.expect("stats").messages == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn log_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A nats-server of the test kit (fails the test saying how to get the binary).
fn nats() -> mailroom_testkit::NatsServer {
    mailroom_testkit::NatsServer::start()
        .unwrap_or_else(|e| panic!("needs a nats-server (run e2e/tools/build.sh): {e}"))
}

/// A JetStream queue handle (its own connection) with the test lease time.
async fn js_queue(
    nats: &mailroom_testkit::NatsServer,
) -> Arc<mailroom_queue::jetstream::JetStreamQueue> {
    use mailroom_queue::jetstream::{JetStreamOptions, JetStreamQueue};
    Arc::new(
        JetStreamQueue::connect(JetStreamOptions {
            urls: vec![nats.url()],
            lease_time: LEASE,
            ..JetStreamOptions::default()
        })
        .await
        .expect("jetstream queue"),
    )
}

fn policy(dns: &DnsServer, port: u16) -> DeliveryPolicySpec {
    let mut p = DeliveryPolicySpec::default();
    p.resolver.nameservers = vec![dns.addr().to_string()];
    p.allow_private_destinations = true;
    p.mx_port = port;
    p.retry.schedule = vec![HumanDuration::from_secs(1)];
    p.timeouts.connect = HumanDuration::from_secs(2);
    p
}

fn message(sender: &str, rcpts: &[&str], body: &str) -> StoredMessage {
    let mut m = contract::message(sender, rcpts);
    m.body = Bytes::from(body.to_string());
    m
}

fn events<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_through_mx_with_fallback_and_reuses_connections() {
    let port = free_port();
    // MX 10 points at an address where nothing listens; MX 20 at the receiver.
    let zone = Zone::new()
        .mx("dest.test", 10, "dead.dest.test")
        .a("dead.dest.test", "127.0.1.9")
        .mx("dest.test", 20, "mx.dest.test")
        .a("mx.dest.test", "127.0.1.2");
    let dns = DnsServer::start(zone).expect("dns");
    let receiver = Receiver::start(SocketAddr::from(([127, 0, 1, 2], port)), &["dest.test"]).await;
    let sender = Sender::start(&policy(&dns, port)).await;
    let body = "Subject: hi\r\n\r\n.leading dot\r\nend\r\n";
    for i in 0..3 {
        let m = message(
            "a@client.test",
            &[&format!("r{i}@dest.test"), "x@dest.test"],
            body,
        );
        sender.queue.enqueue(m).await.expect("enqueue");
    }
    assert!(
        sender.wait_empty(Duration::from_secs(20)).await,
        "all delivered"
    );
    let got = receiver.wait_for(3, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 3);
    for m in &got {
        assert_eq!(m.envelope.sender, "a@client.test");
        assert_eq!(m.envelope.recipients.len(), 2);
        let text = String::from_utf8_lossy(&m.body);
        assert!(
            text.ends_with(body),
            "body intact, dot line unstuffed: {text}"
        );
        assert!(text.contains("from sender.test"), "our EHLO name: {text}");
    }
    let log = sender.log_events();
    let delivered = events(&log, "delivery");
    assert_eq!(delivered.len(), 6, "one line per recipient: {log:?}");
    assert!(
        delivered
            .iter()
            .all(|e| e["host"] == "mx.dest.test" && e["ip"] == "127.0.1.2")
    );
    assert!(
        delivered
            .iter()
            .all(|e| e["response"].as_str().is_some_and(|r| r.starts_with("250")))
    );
    sender.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_bounce_to_the_sender_and_never_bounce_a_bounce() {
    let port = free_port();
    // dest.test's receiver accepts dest.test only: other.test (same MX) gets 550 5.7.1.
    let zone = Zone::new()
        .mx("dest.test", 10, "mx.dest.test")
        .mx("other.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.1.3")
        .mx("client.test", 10, "mx.client.test")
        .a("mx.client.test", "127.0.1.4")
        .null_mx("nullmx.test");
    let dns = DnsServer::start(zone).expect("dns");
    let dest = Receiver::start(SocketAddr::from(([127, 0, 1, 3], port)), &["dest.test"]).await;
    let client = Receiver::start(SocketAddr::from(([127, 0, 1, 4], port)), &["client.test"]).await;
    let sender = Sender::start(&policy(&dns, port)).await;
    let original = message(
        "alice@client.test",
        &["ok@dest.test", "nobody@other.test", "x@nullmx.test"],
        "Subject: will partly bounce\r\n\r\nhello\r\n",
    );
    sender
        .queue
        .enqueue(original.clone())
        .await
        .expect("enqueue");
    // A bounce of a bounce must not happen: a message from <> that fails is dropped with a log line.
    let dsn_like = message("", &["gone@other.test"], "Subject: a report\r\n\r\nx\r\n");
    sender
        .queue
        .enqueue(dsn_like)
        .await
        .expect("enqueue null-sender message");

    assert!(
        sender.wait_empty(Duration::from_secs(20)).await,
        "everything decided"
    );
    let delivered = dest.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].envelope.recipients[0].address, "ok@dest.test");

    // One report per failed domain entry (the unit a worker handles), none for the message
    // from <>.
    let mut reports = client.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(
        reports.len(),
        2,
        "one DSN per failed destination domain: {reports:?}"
    );
    reports.sort_by_key(|r| String::from_utf8_lossy(&r.body).contains("nullmx.test"));
    for dsn in &reports {
        assert_eq!(dsn.envelope.sender, "", "DSNs go out with MAIL FROM:<>");
        assert_eq!(dsn.envelope.recipients[0].address, "alice@client.test");
        let text = String::from_utf8_lossy(&dsn.body);
        assert!(text.contains("report-type=delivery-status"), "{text}");
        assert!(
            text.contains("Subject: will partly bounce"),
            "the original is returned"
        );
        assert!(
            !text.contains("ok@dest.test"),
            "the delivered recipient is not reported"
        );
    }
    let relay_denied = String::from_utf8_lossy(&reports[0].body);
    assert!(relay_denied.contains("Final-Recipient: rfc822; nobody@other.test"));
    assert!(
        relay_denied.contains("Diagnostic-Code: smtp; 550 5.7.1"),
        "{relay_denied}"
    );
    assert!(relay_denied.contains("Remote-MTA: dns; mx.dest.test"));
    let null_mx = String::from_utf8_lossy(&reports[1].body);
    assert!(null_mx.contains("Final-Recipient: rfc822; x@nullmx.test"));
    assert!(null_mx.contains("Status: 5.1.10"), "{null_mx}");

    let log = sender.log_events();
    assert_eq!(events(&log, "bounce").len(), 3, "{log:?}");
    assert_eq!(
        events(&log, "dsn_queued").len(),
        2,
        "no DSN for the null sender: {log:?}"
    );
    sender.stop().await;
    drop((dest, client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_on_schedule_until_delivered() {
    let port = free_port();
    let zone = Zone::new()
        .mx("later.test", 10, "mx.later.test")
        .a("mx.later.test", "127.0.1.5");
    let dns = DnsServer::start(zone).expect("dns");
    let sender = Sender::start(&policy(&dns, port)).await;
    let m = message(
        "a@client.test",
        &["r@later.test"],
        "Subject: later\r\n\r\nx\r\n",
    );
    let id = m.envelope.id;
    sender.queue.enqueue(m).await.expect("enqueue");
    // Nothing listens yet: connection refused, deferred with the 1 s schedule.
    let deadline = Instant::now() + Duration::from_secs(10);
    let attempts = loop {
        let entries = sender.queue.entries(id).await.expect("entries");
        let attempts = entries.first().map_or(0, |e| e.state.attempts);
        if attempts >= 2 || Instant::now() > deadline {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(attempts[0].state.attempts >= 2, "retried: {attempts:?}");
    let last = attempts[0].state.last_response.clone().unwrap_or_default();
    assert!(last.contains("connection refused"), "{last}");
    let failures = events(&sender.log_events(), "transient_failure").len();
    assert!(failures >= 2, "one log line per attempt");
    // The destination's last error is kept for policy status.
    let errors = sender.shaping.last_errors().await.expect("last errors");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].dest, "domain:later.test");
    assert!(
        errors[0].response.contains("connection refused"),
        "{errors:?}"
    );

    // The receiver comes up: the next attempt delivers.
    let receiver = Receiver::start(SocketAddr::from(([127, 0, 1, 5], port)), &["later.test"]).await;
    assert!(
        sender.wait_empty(Duration::from_secs(10)).await,
        "delivered after the retry"
    );
    assert_eq!(receiver.wait_for(1, Duration::from_secs(5)).await.len(), 1);
    sender.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_mid_delivery_loses_nothing() {
    let port = free_port();
    let zone = Zone::new()
        .mx("slow.test", 10, "mx.slow.test")
        .a("mx.slow.test", "127.0.1.6");
    let dns = DnsServer::start(zone).expect("dns");
    // A server that accepts connections and never says a word: the delivery hangs in the
    // greeting until the first worker is killed.
    let silent = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 1, 6], port)))
        .await
        .expect("bind silent server");
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let accept = {
        let held = Arc::clone(&held);
        tokio::spawn(async move {
            while let Ok((stream, _)) = silent.accept().await {
                held.lock().await.push(stream);
            }
        })
    };
    let mut p = policy(&dns, port);
    p.timeouts.greeting = HumanDuration::from_secs(60);
    let sender = Sender::start(&p).await;
    let m = message(
        "a@client.test",
        &["r@slow.test"],
        "Subject: crash\r\n\r\nx\r\n",
    );
    sender.queue.enqueue(m).await.expect("enqueue");
    // Wait until the worker is connected (stuck in the greeting), then kill it hard.
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.lock().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!held.lock().await.is_empty(), "the first worker connected");
    sender.task.abort();
    accept.abort();
    held.lock().await.clear();

    // The real receiver takes the address over; a second worker on the same queue gets the
    // entry once the dead worker's lease has run out.
    let receiver = Receiver::start(SocketAddr::from(([127, 0, 1, 6], port)), &["slow.test"]).await;
    let (stop, task) = Sender::run(
        &policy(&dns, port),
        &sender.queue,
        &sender.log,
        &sender.shaping,
    );
    let got = receiver
        .wait_for(1, LEASE * 3 + Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), 1, "delivered by the second worker");
    assert!(sender.wait_empty(Duration::from_secs(5)).await);
    let log = sender.log_events();
    let delivered = events(&log, "delivery");
    assert_eq!(delivered.len(), 1);
    assert_eq!(
        delivered[0]["deliveries"], 2,
        "the second hand-out of the entry"
    );
    stop.cancel();
    let _ = task.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_from_the_jetstream_queue() {
    let nats = nats();
    let queue: Arc<dyn Queue> = js_queue(&nats).await;
    let port = free_port();
    let zone = Zone::new()
        .mx("one.test", 10, "mx.one.test")
        .mx("two.test", 10, "mx.one.test")
        .a("mx.one.test", "127.0.1.7");
    let dns = DnsServer::start(zone).expect("dns");
    let receiver = Receiver::start(
        SocketAddr::from(([127, 0, 1, 7], port)),
        &["one.test", "two.test"],
    )
    .await;
    let deps = WorkerDeps {
        queue: Arc::clone(&queue),
        delivery_log: DeliveryLog::discard(),
        hostname: "sender.test".into(),
        lease_time: LEASE,
        shaping: Arc::new(mailroom_outbound::shaping::MemoryStore::default()),
    };
    let worker = Worker::new(&policy(&dns, port), deps).expect("worker");
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone(), Duration::from_secs(5)));
    for i in 0..5 {
        let m = message(
            "a@client.test",
            &[&format!("r{i}@one.test"), &format!("r{i}@two.test")],
            "Subject: via jetstream\r\n\r\nx\r\n",
        );
        queue.enqueue(m).await.expect("enqueue");
    }
    // Each message is two domain entries: ten deliveries.
    let got = receiver.wait_for(10, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.stats().await.expect("stats").messages > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        queue.stats().await.expect("stats").messages,
        0,
        "the stream is empty"
    );
    stop.cancel();
    let _ = task.await;
}

/// An SMTP receiver that records how many connections it has open at once and when each
/// message arrives. Answers 250 to everything (354 to DATA).
struct Recorder {
    peak: Arc<std::sync::atomic::AtomicUsize>,
    arrivals: Arc<std::sync::Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(addr: SocketAddr) -> Recorder {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind recorder");
        let peak = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = {
            let (peak, arrivals) = (Arc::clone(&peak), Arc::clone(&arrivals));
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now_open, Ordering::SeqCst);
                    let (open, arrivals) = (Arc::clone(&open), Arc::clone(&arrivals));
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        let mut lines = BufReader::new(read).lines();
                        let _ = write.write_all(b"220 recorder ESMTP\r\n").await;
                        let mut in_data = false;
                        while let Ok(Some(line)) = lines.next_line().await {
                            let reply: &[u8] = if in_data {
                                if line != "." {
                                    continue;
                                }
                                in_data = false;
                                if let Ok(mut a) = arrivals.lock() {
                                    a.push(Instant::now());
                                }
                                b"250 2.0.0 ok\r\n"
                            } else if line.to_ascii_uppercase().starts_with("EHLO") {
                                b"250-recorder\r\n250 PIPELINING\r\n"
                            } else if line.eq_ignore_ascii_case("DATA") {
                                in_data = true;
                                b"354 go on\r\n"
                            } else if line.eq_ignore_ascii_case("QUIT") {
                                let _ = write.write_all(b"221 2.0.0 bye\r\n").await;
                                break;
                            } else {
                                b"250 2.0.0 ok\r\n"
                            };
                            if write.write_all(reply).await.is_err() {
                                break;
                            }
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
        };
        Recorder {
            peak,
            arrivals,
            task,
        }
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_share_connection_and_rate_limits_through_jetstream() {
    use mailroom_config::{DestinationSpec, ShapingLimits};
    use mailroom_outbound::shaping::KvStore;

    let nats = nats();
    let port = free_port();
    let zone = Zone::new()
        .mx("shaped.test", 10, "mx.shaped.test")
        .a("mx.shaped.test", "127.0.1.8")
        .mx("free.test", 10, "mx.free.test")
        .a("mx.free.test", "127.0.1.9");
    let dns = DnsServer::start(zone).expect("dns");
    let shaped = Recorder::start(SocketAddr::from(([127, 0, 1, 8], port))).await;
    let free = Recorder::start(SocketAddr::from(([127, 0, 1, 9], port))).await;

    let mut p = policy(&dns, port);
    p.concurrency = 16;
    p.max_messages_per_connection = 5;
    p.destinations = vec![DestinationSpec {
        name: "shaped".into(),
        domains: vec!["shaped.test".into()],
        mx_suffixes: vec![],
        tls: None,
        limits: ShapingLimits {
            max_connections: Some(2),
            rate: Some("20/s".parse().expect("rate")),
            ..ShapingLimits::default()
        },
    }];
    p.default_limits = ShapingLimits::default();

    // Three workers, each with its own NATS connection, queue handle and shaping store: as
    // separate processes would be.
    let mut workers = Vec::new();
    let mut queues = Vec::new();
    let stop = CancellationToken::new();
    for _ in 0..3 {
        let queue = js_queue(&nats).await;
        let shaping = Arc::new(
            KvStore::open(queue.context(), "MAILROOM", &p.name, 1)
                .await
                .expect("shaping store"),
        );
        let deps = WorkerDeps {
            queue: Arc::clone(&queue) as Arc<dyn Queue>,
            delivery_log: DeliveryLog::discard(),
            hostname: "sender.test".into(),
            lease_time: LEASE,
            shaping,
        };
        let worker = Worker::new(&p, deps).expect("worker");
        workers.push(tokio::spawn(
            worker.run(stop.clone(), Duration::from_secs(5)),
        ));
        queues.push(queue);
    }
    let started = Instant::now();
    for i in 0..40 {
        let m = message(
            "a@client.test",
            &[&format!("r{i}@shaped.test")],
            "Subject: s\r\n\r\nx\r\n",
        );
        queues[0].enqueue(m).await.expect("enqueue shaped");
    }
    for i in 0..20 {
        let m = message(
            "a@client.test",
            &[&format!("r{i}@free.test")],
            "Subject: f\r\n\r\nx\r\n",
        );
        queues[0].enqueue(m).await.expect("enqueue free");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while (shaped.arrivals().len() < 40 || free.arrivals().len() < 20) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shaped_arrivals = shaped.arrivals();
    let free_arrivals = free.arrivals();
    assert_eq!(shaped_arrivals.len(), 40, "all shaped messages delivered");
    assert_eq!(free_arrivals.len(), 20, "all free messages delivered");
    assert!(
        shaped.peak() <= 2,
        "never more than 2 connections: {}",
        shaped.peak()
    );
    // 20/s with a burst of 1: 40 messages take at least 39 intervals of 50 ms.
    let first = shaped_arrivals.iter().min().copied().unwrap_or(started);
    let last = shaped_arrivals.iter().max().copied().unwrap_or(started);
    assert!(
        last - first >= Duration::from_millis(1900),
        "rate held: 40 messages in {:?}",
        last - first
    );
    // In any 1-second window at most 20 (+ burst 1) arrived.
    for a in &shaped_arrivals {
        let in_window = shaped_arrivals
            .iter()
            .filter(|b| **b >= *a && **b < *a + Duration::from_secs(1))
            .count();
        assert!(in_window <= 21, "{in_window} in one second");
    }
    // The destination without limits was not slowed down by the shaped one.
    let free_last = free_arrivals.iter().max().copied().unwrap_or(started);
    assert!(
        free_last < last,
        "free.test finished ({:?}) before shaped.test ({:?})",
        free_last - started,
        last - started
    );
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signs_with_the_from_domains_dkim_key() {
    let port = free_port();
    let zone = Zone::new()
        .mx("dest.test", 10, "mx.dest.test")
        .a("mx.dest.test", "127.0.1.10");
    let dns = DnsServer::start(zone).expect("dns");
    let receiver = Receiver::start(SocketAddr::from(([127, 0, 1, 10], port)), &["dest.test"]).await;
    let mut p = policy(&dns, port);
    let key = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dkim-ed25519-openssl.pem"
    );
    p.dkim = vec![mailroom_config::DkimSpec {
        domain: "client.test".into(),
        selector: "s2026".into(),
        key_file: key.into(),
        algorithm: None,
        headers: vec![],
    }];
    let sender = Sender::start(&p).await;
    let signed = message(
        "a@client.test",
        &["r@dest.test"],
        "From: A <a@news.client.test>\r\nTo: r@dest.test\r\nSubject: signed\r\n\r\nbody\r\n",
    );
    let unsigned = message(
        "a@client.test",
        &["r@dest.test"],
        "From: B <b@elsewhere.test>\r\nSubject: not ours\r\n\r\nbody\r\n",
    );
    sender.queue.enqueue(signed).await.expect("enqueue");
    sender.queue.enqueue(unsigned).await.expect("enqueue");
    assert!(sender.wait_empty(Duration::from_secs(20)).await);
    let got = receiver.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2);
    let texts: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    let signed = texts
        .iter()
        .find(|t| t.contains("Subject: signed"))
        .expect("signed one");
    let unsigned = texts
        .iter()
        .find(|t| t.contains("Subject: not ours"))
        .expect("other");
    assert!(signed.contains("DKIM-Signature:"), "{signed}");
    assert!(
        signed.contains("d=client.test") && signed.contains("s=s2026"),
        "{signed}"
    );
    assert!(
        !unsigned.contains("DKIM-Signature:"),
        "no key for elsewhere.test"
    );
    sender.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_that_would_loop_back_to_this_host_bounces() {
    let port = free_port();
    let zone = Zone::new()
        .mx("loop.test", 10, "mx.loop.test")
        .a("mx.loop.test", "127.0.1.11");
    let dns = DnsServer::start(zone).expect("dns");
    // The MX greets with our own host name: delivering there would loop.
    let receiver = Receiver::start_named(
        SocketAddr::from(([127, 0, 1, 11], port)),
        &["loop.test"],
        "sender.test",
    )
    .await;
    let sender = Sender::start(&policy(&dns, port)).await;
    sender
        .queue
        .enqueue(message("", &["r@loop.test"], "Subject: loop\r\n\r\nx\r\n"))
        .await
        .expect("enqueue");
    assert!(sender.wait_empty(Duration::from_secs(10)).await);
    let log = sender.log_events();
    let bounced = events(&log, "bounce");
    assert_eq!(bounced.len(), 1, "{log:?}");
    let response = bounced[0]["response"].as_str().unwrap_or_default();
    assert!(response.contains("loops back to myself"), "{response}");
    assert!(
        receiver
            .wait_for(1, Duration::from_millis(300))
            .await
            .is_empty(),
        "nothing sent"
    );
    sender.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_can_require_tls() {
    use mailroom_config::{DestinationSpec, OutboundTlsMode};
    let port = free_port();
    let zone = Zone::new()
        .mx("strict.test", 10, "mx.plain.test")
        .mx("lax.test", 10, "mx.plain.test")
        .a("mx.plain.test", "127.0.1.12");
    let dns = DnsServer::start(zone).expect("dns");
    // A receiver without STARTTLS.
    let receiver = Receiver::start(
        SocketAddr::from(([127, 0, 1, 12], port)),
        &["strict.test", "lax.test"],
    )
    .await;
    let mut p = policy(&dns, port);
    p.destinations = vec![DestinationSpec {
        name: "strict".into(),
        domains: vec!["strict.test".into()],
        tls: Some(OutboundTlsMode::Required),
        ..DestinationSpec::default()
    }];
    let sender = Sender::start(&p).await;
    let strict = message(
        "a@client.test",
        &["r@strict.test"],
        "Subject: s\r\n\r\nx\r\n",
    );
    let strict_id = strict.envelope.id;
    sender.queue.enqueue(strict).await.expect("enqueue");
    sender
        .queue
        .enqueue(message(
            "a@client.test",
            &["r@lax.test"],
            "Subject: l\r\n\r\nx\r\n",
        ))
        .await
        .expect("enqueue");
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1, "only lax.test goes out in plaintext");
    assert_eq!(got[0].envelope.recipients[0].address, "r@lax.test");
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let entries = sender.queue.entries(strict_id).await.expect("entries");
        if entries.first().is_some_and(|e| e.state.attempts >= 1) || Instant::now() > deadline {
            break entries;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let last = state[0].state.last_response.clone().unwrap_or_default();
    assert!(
        last.to_ascii_lowercase().contains("starttls"),
        "deferred for want of TLS: {last}"
    );
    assert_eq!(
        receiver.wait_for(2, Duration::from_millis(500)).await.len(),
        1
    );
    sender.stop().await;
}
