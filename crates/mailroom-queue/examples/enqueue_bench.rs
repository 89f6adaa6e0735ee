//! Enqueue throughput of the local spool: N x 1 KiB messages from C concurrent tasks, with group
//! commit (the default), without it (`max_batch = 1`), and a naive one-at-a-time writer
//! (write, fdatasync, rename, fsync directory under one lock) for comparison.
//!
//! ```text
//! cargo run --release -p mailroom-queue --example enqueue_bench -- [messages] [tasks] [dir]
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mailroom_queue::local::{LocalOptions, LocalQueue};
use mailroom_queue::{Envelope, Queue, QueueId, Recipient, StoredMessage};

fn message(i: usize) -> StoredMessage {
    let id = QueueId::new();
    let mut body = format!(
        "Received: from bench by mailroom id {id}\r\nFrom: <bench@example.org>\r\nTo: <r{i}@example.net>\r\nSubject: bench {i}\r\n\r\n"
    )
    .into_bytes();
    while body.len() < 1024 - 2 {
        body.push(b'x');
    }
    body.extend_from_slice(b"\r\n");
    StoredMessage {
        envelope: Envelope {
            id,
            sender: "bench@example.org".into(),
            recipients: vec![Recipient {
                address: format!("r{i}@d{}.example", i % 10),
                domain: format!("d{}.example", i % 10),
                notify: None,
                orcpt: None,
            }],
            ret: None,
            envid: None,
            body_type: None,
            smtputf8: false,
            received_at_ms: id.timestamp_ms(),
            listener: "bench".into(),
            client_ip: None,
            helo: Some("bench".into()),
            auth_user: None,
            policy: "default".into(),
            message_id: None,
        },
        body: Bytes::from(body),
    }
}

/// Latency percentiles of a sorted sample.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied().unwrap_or_default()
}

async fn run_local(dir: &Path, max_batch: usize, messages: usize, tasks: usize) {
    let queue = Arc::new(
        LocalQueue::open(
            dir,
            LocalOptions {
                max_batch,
                ..LocalOptions::default()
            },
        )
        .await
        .expect("open"),
    );
    let per_task = messages / tasks;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let queue = Arc::clone(&queue);
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let m = message(t * per_task + i);
                let began = Instant::now();
                queue.enqueue(m).await.expect("enqueue");
                latencies.push(began.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for h in handles {
        latencies.extend(h.await.expect("join"));
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let n = latencies.len() as f64;
    let c = queue.io_counters();
    println!(
        "local max_batch={max_batch:<4} {:>8.0} msgs/s  {:.3} file fsyncs/msg  {:.4} dir fsyncs/msg  avg batch {:>6.1}  latency p50 {:>7.2?} p99 {:>7.2?}",
        n / elapsed.as_secs_f64(),
        c.file_syncs as f64 / n,
        c.dir_syncs as f64 / n,
        n / c.dir_syncs.max(1) as f64,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );
}

/// The naive writer: every message is written, fdatasync'd, renamed and its directory fsync'd
/// while holding one lock.
async fn run_naive(dir: &Path, messages: usize, tasks: usize) {
    let tmp = dir.join("tmp");
    let queue_dir = dir.join("queue");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    std::fs::create_dir_all(&queue_dir).expect("mkdir");
    let lock = Arc::new(std::sync::Mutex::new((tmp, queue_dir)));
    let per_task = messages / tasks;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let lock = Arc::clone(&lock);
        handles.push(tokio::spawn(async move {
            for i in 0..per_task {
                let m = message(t * per_task + i);
                let lock = Arc::clone(&lock);
                tokio::task::spawn_blocking(move || {
                    let guard = lock.lock().expect("lock");
                    let (tmp, queue_dir): &(PathBuf, PathBuf) = &guard;
                    let name = format!("{}.msg", m.envelope.id);
                    let json = serde_json::to_vec(&m.envelope).expect("json");
                    let mut f = std::fs::File::create(tmp.join(&name)).expect("create");
                    f.write_all(&json).expect("write");
                    f.write_all(&m.body).expect("write");
                    f.sync_data().expect("fdatasync");
                    std::fs::rename(tmp.join(&name), queue_dir.join(&name)).expect("rename");
                    std::fs::File::open(queue_dir)
                        .and_then(|d| d.sync_all())
                        .expect("fsync dir");
                })
                .await
                .expect("join");
            }
        }));
    }
    for h in handles {
        h.await.expect("join");
    }
    let elapsed = start.elapsed();
    let n = (per_task * tasks) as f64;
    println!(
        "naive one-at-a-time {:>8.0} msgs/s  1.000 file fsyncs/msg  1.0000 dir fsyncs/msg",
        n / elapsed.as_secs_f64()
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let base = args.next().map(PathBuf::from);
    let scratch = match &base {
        Some(base) => tempfile::tempdir_in(base).expect("tempdir"),
        None => tempfile::tempdir().expect("tempdir"),
    };
    println!(
        "{messages} x 1 KiB messages from {tasks} tasks in {}",
        scratch.path().display()
    );
    run_local(&scratch.path().join("grouped"), 256, messages, tasks).await;
    run_local(&scratch.path().join("unbatched"), 1, messages, tasks).await;
    run_naive(&scratch.path().join("naive"), messages, tasks).await;
}
