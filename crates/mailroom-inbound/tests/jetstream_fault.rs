//! The inbound server on a 3-node NATS cluster (stream replicas 3): SMTP clients send a bounded
//! stream of messages while one nats-server node is killed and restarted. Every message that got
//! a 250 must be in the stream afterwards; every message that got a 4xx is sent again until it
//! gets its 250. Both counts are printed.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, serve, spec};
use mailroom_queue::jetstream::{JetStreamOptions, JetStreamQueue};
use mailroom_queue::{Queue, QueueId};
use mailroom_testkit::{NatsCluster, NatsServer};
use tokio::net::TcpStream;

/// Messages that got 250: (queue id, body).
type Acked = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
/// Messages that got 250, with the time of the reply.
type AckedAt = Arc<Mutex<Vec<(Instant, String, Vec<u8>)>>>;

const CLIENTS: usize = 8;
const PER_CLIENT: usize = 40;

/// Sends one message on an open session; Ok(queue id) on 250, Err(reply) on anything else.
async fn send_one(c: &mut Client<TcpStream>, n: usize) -> Result<(String, Vec<u8>), String> {
    let body = format!("Subject: fault {n}\r\n\r\nmessage number {n}\r\n").into_bytes();
    c.line("MAIL FROM:<sender@client.test>").await;
    c.line("RCPT TO:<rcpt@example.test>").await;
    c.line("DATA").await;
    let mail = c.reply().await.unwrap_or_default();
    let rcpt = c.reply().await.unwrap_or_default();
    let data = c.reply().await.unwrap_or_default();
    if !(mail.starts_with("250") && rcpt.starts_with("250") && data.starts_with("354")) {
        c.line("RSET").await;
        let _ = c.reply().await;
        return Err(format!("{mail} / {rcpt} / {data}"));
    }
    c.send(&body).await;
    c.send(b".\r\n").await;
    let r = c.reply().await.unwrap_or_default();
    match r.strip_prefix("250 2.0.0 Ok: queued as ") {
        Some(id) => Ok((id.to_string(), body)),
        None => Err(r),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_nats_node_loses_no_acknowledged_message() {
    let mut cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .expect("join")
        .expect("3-node nats cluster (run e2e/tools/build.sh)");
    let options = JetStreamOptions {
        urls: cluster.urls(),
        replicas: 3,
        stream: "FAULT".into(),
        publish_timeout: Duration::from_secs(3),
        ..JetStreamOptions::default()
    };
    let queue = Arc::new(
        JetStreamQueue::connect(options)
            .await
            .expect("connect to the cluster"),
    );
    let (addr, shutdown, server) = serve(spec(), Arc::clone(&queue) as Arc<dyn Queue>).await;

    let acked: Acked = Arc::default();
    let refused: Arc<Mutex<Vec<usize>>> = Arc::default();
    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        let (acked, refused) = (Arc::clone(&acked), Arc::clone(&refused));
        clients.push(tokio::spawn(async move {
            let mut c = Client::new(TcpStream::connect(addr).await.expect("connect"));
            c.expect("220").await;
            c.cmd("EHLO client.test", "250").await;
            for i in 0..PER_CLIENT {
                let n = k * PER_CLIENT + i;
                match send_one(&mut c, n).await {
                    Ok(ok) => acked.lock().expect("lock").push(ok),
                    Err(reply) => {
                        assert!(
                            reply.starts_with('4'),
                            "message {n}: a failure must be 4xx, got {reply:?}"
                        );
                        refused.lock().expect("lock").push(n);
                    }
                }
                // Paced so that sending spans the kill and the restart (~4 s in all).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c.cmd("QUIT", "221").await;
        }));
    }
    // Kill a node (the meta leader if known) while the clients are sending, then restart it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        let victim = cluster.meta_leader_index().ok().flatten().unwrap_or(0);
        cluster.kill(victim).expect("kill node");
        std::thread::sleep(Duration::from_secs(2));
        cluster.restart(victim).expect("restart node");
        cluster
    })
    .await
    .expect("join");
    for c in clients {
        c.await.expect("client task");
    }

    // Every 4xx'd message can be sent again once the cluster is healthy.
    let refused_now: Vec<usize> = refused.lock().expect("lock").clone();
    let mut c = Client::new(TcpStream::connect(addr).await.expect("connect"));
    c.expect("220").await;
    c.cmd("EHLO client.test", "250").await;
    for n in &refused_now {
        let mut result = Err(String::new());
        for _ in 0..20 {
            result = send_one(&mut c, *n).await;
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        acked
            .lock()
            .expect("lock")
            .push(result.unwrap_or_else(|e| panic!("message {n} never accepted: {e}")));
    }

    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), CLIENTS * PER_CLIENT);
    for (id, body) in &acked {
        let qid: QueueId = id.parse().expect("queue id");
        let stored = queue
            .get(qid)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("acknowledged message {id} is lost"));
        assert!(stored.body.ends_with(body), "message {id} differs");
    }
    assert_eq!(
        queue.stats().await.expect("stats").messages,
        acked.len() as u64
    );
    println!(
        "fault test: {} messages got 250 at once, {} got 4xx during the failover and were resent, 0 lost",
        acked.len() - refused_now.len(),
        refused_now.len()
    );
    shutdown.stop.cancel();
    shutdown.abort.cancel();
    let _ = server.await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_nats_is_stopped_clients_get_451_never_250() {
    let mut nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("join")
        .expect("nats-server (run e2e/tools/build.sh)");
    let options = JetStreamOptions {
        urls: vec![nats.url()],
        publish_timeout: Duration::from_secs(2),
        ..JetStreamOptions::default()
    };
    let queue = Arc::new(JetStreamQueue::connect(options).await.expect("connect"));
    let (addr, shutdown, server) = serve(spec(), Arc::clone(&queue) as Arc<dyn Queue>).await;

    // (time of the 250, queue id, body) and the times of the 4xx replies.
    let acked: AckedAt = Arc::default();
    let refused: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop_sending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for k in 0..4 {
        let (acked, refused, stop) = (
            Arc::clone(&acked),
            Arc::clone(&refused),
            Arc::clone(&stop_sending),
        );
        clients.push(tokio::spawn(async move {
            let mut c = Client::new(TcpStream::connect(addr).await.expect("connect"));
            c.expect("220").await;
            c.cmd("EHLO client.test", "250").await;
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 400 {
                match send_one(&mut c, k * 1000 + i).await {
                    Ok((id, body)) => acked.lock().expect("lock").push((Instant::now(), id, body)),
                    Err(reply) => {
                        assert!(
                            reply.starts_with("451 4.3.0"),
                            "a queue failure must be 451 4.3.0, got {reply:?}"
                        );
                        refused.lock().expect("lock").push(Instant::now());
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (nats, stopped_at, restarting_at) = tokio::task::spawn_blocking(move || {
        nats.stop().expect("stop nats");
        let stopped_at = Instant::now();
        std::thread::sleep(Duration::from_secs(4));
        let restarting_at = Instant::now();
        nats.restart().expect("restart nats");
        (nats, stopped_at, restarting_at)
    })
    .await
    .expect("join");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_sending.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        c.await.expect("client task");
    }

    let acked = acked.lock().expect("lock").clone();
    let refused = refused.lock().expect("lock").clone();
    // A PubAck that raced the shutdown may still be answered just after the process exited.
    let outage = (stopped_at + Duration::from_millis(300))..restarting_at;
    let during: Vec<_> = acked
        .iter()
        .filter(|(t, _, _)| outage.contains(t))
        .collect();
    assert!(
        during.is_empty(),
        "{} messages got 250 while NATS was down",
        during.len()
    );
    assert!(
        refused.iter().any(|t| outage.contains(t)),
        "no client was refused while NATS was down"
    );
    assert!(
        acked.iter().any(|(t, _, _)| *t > restarting_at),
        "no message was accepted after NATS came back"
    );
    for (_, id, body) in &acked {
        let stored = queue.get(id.parse().expect("id")).await.expect("get");
        let stored = stored.unwrap_or_else(|| panic!("acknowledged message {id} is lost"));
        assert!(stored.body.ends_with(body));
    }
    println!(
        "nats stop test: {} messages got 250 (none during the outage), {} got 451 4.3.0",
        acked.len(),
        refused.len()
    );
    shutdown.stop.cancel();
    shutdown.abort.cancel();
    let _ = server.await;
    drop(nats);
}
