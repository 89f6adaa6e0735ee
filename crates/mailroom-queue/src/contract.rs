//! The backend-independent contract test-suite (feature `testing`).
//!
//! Every backend runs the same checks through a [`Backend`] factory:
//!
//! ```ignore
//! struct Local(tempfile::TempDir);
//! #[async_trait::async_trait]
//! impl mailroom_queue::contract::Backend for Local {
//!     type Queue = LocalQueue;
//!     async fn open(&mut self) -> LocalQueue { LocalQueue::open(self.0.path(), Default::default()).await.unwrap() }
//! }
//! #[tokio::test] async fn contract() { mailroom_queue::contract::run_all(|| Local(tempdir())).await }
//! ```
//!
//! The checks panic with a message on failure (they are test code). Helpers to build messages
//! ([`message`], [`envelope`]) are public for other crates' tests too.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use bytes::Bytes;

use crate::{Envelope, Queue, QueueId, Recipient, StoredMessage};

/// A factory for one backend over one isolated storage (a temp dir, a fresh stream...).
#[async_trait::async_trait]
pub trait Backend: Send {
    /// The queue type under test.
    type Queue: Queue;

    /// Opens a handle on this storage. The suite drops the handle before opening the next one,
    /// and expects the next one to see everything committed through the previous one.
    async fn open(&mut self) -> Self::Queue;
}

/// Unwraps a result in test code, panicking with `what` and the error.
fn ok<T, E: Debug>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

/// An envelope from `sender` to `recipients` (addresses; the domain is taken after the last `@`).
pub fn envelope(sender: &str, recipients: &[&str]) -> Envelope {
    let id = QueueId::new();
    Envelope {
        id,
        sender: sender.to_string(),
        recipients: recipients
            .iter()
            .map(|address| Recipient {
                address: address.to_string(),
                domain: address
                    .rsplit_once('@')
                    .map(|(_, d)| d.to_ascii_lowercase())
                    .unwrap_or_default(),
                notify: None,
                orcpt: None,
            })
            .collect(),
        ret: None,
        envid: None,
        body_type: None,
        smtputf8: false,
        received_at_ms: id.timestamp_ms(),
        listener: "contract".into(),
        client_ip: None,
        helo: None,
        auth_user: None,
        policy: "default".into(),
        message_id: None,
    }
}

/// A message from `sender` to `recipients` with a small CRLF body.
pub fn message(sender: &str, recipients: &[&str]) -> StoredMessage {
    let envelope = envelope(sender, recipients);
    let body = format!(
        "Received: from contract by mailroom with ESMTP id {}\r\nFrom: <{sender}>\r\nSubject: contract\r\n\r\nHello.\r\n",
        envelope.id
    );
    StoredMessage {
        envelope,
        body: Bytes::from(body),
    }
}

/// Runs every check, each on fresh storage from `new_backend`.
pub async fn run_all<B: Backend, F: FnMut() -> B>(mut new_backend: F) {
    enqueue_then_get(&mut new_backend()).await;
    get_unknown_is_none(&mut new_backend()).await;
    list_oldest_first_and_limit(&mut new_backend()).await;
    stats_by_domain(&mut new_backend()).await;
    delete_removes(&mut new_backend()).await;
    reopen_keeps_everything(&mut new_backend()).await;
    concurrent_enqueues(&mut new_backend(), 200).await;
}

/// What `enqueue` stored, `get` returns byte for byte, with every envelope field.
pub async fn enqueue_then_get<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    assert!(queue.is_ready(), "a freshly opened queue is ready");
    let mut message = message(
        "alice@example.org",
        &["bob@Example.COM", "carol@example.net"],
    );
    message.envelope.ret = Some(mailroom_smtp::Ret::Hdrs);
    message.envelope.envid = Some("env-1".into());
    message.envelope.body_type = Some(mailroom_smtp::Body::EightBitMime);
    message.envelope.smtputf8 = true;
    message.envelope.client_ip = Some(std::net::IpAddr::from([192, 0, 2, 1]));
    message.envelope.helo = Some("client.example.org".into());
    message.envelope.auth_user = Some("alice".into());
    message.envelope.message_id = Some("<1@example.org>".into());
    message.envelope.recipients[0].notify = Some(mailroom_smtp::Notify {
        failure: true,
        delay: true,
        ..Default::default()
    });
    message.envelope.recipients[0].orcpt = Some(mailroom_smtp::Orcpt {
        addr_type: "rfc822".into(),
        addr: "bob@example.com".into(),
    });
    // Binary-safe: every byte value, and a lone LF that must not be rewritten.
    let mut body = message.body.to_vec();
    body.extend((0u8..=255).collect::<Vec<u8>>());
    body.extend_from_slice(b"\nend\r\n");
    message.body = Bytes::from(body);

    ok(queue.enqueue(message.clone()).await, "enqueue");
    let got = ok(queue.get(message.envelope.id).await, "get");
    assert_eq!(
        got.as_ref(),
        Some(&message),
        "get returns what was enqueued"
    );
    let list = ok(queue.list(10).await, "list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, message.envelope.id);
    assert_eq!(list[0].sender, "alice@example.org");
    assert_eq!(list[0].recipients, 2);
    assert_eq!(list[0].domains, vec!["example.com", "example.net"]);
    assert_eq!(list[0].size, message.body.len() as u64);
    assert_eq!(list[0].received_at_ms, message.envelope.received_at_ms);
}

/// `get` of an id never enqueued is `None`.
pub async fn get_unknown_is_none<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    assert_eq!(ok(queue.get(QueueId::new()).await, "get"), None);
    assert!(!ok(queue.delete(QueueId::new()).await, "delete unknown"));
}

/// `list` is oldest first and honours its limit.
pub async fn list_oldest_first_and_limit<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let mut ids = Vec::new();
    // Enqueued newest first, so the order must come from received_at_ms, not from arrival.
    for age in 0..5u64 {
        let mut m = message("", &["x@example.org"]);
        m.envelope.received_at_ms = 1_700_000_000_000 - age * 1000;
        ids.push(m.envelope.id);
        ok(queue.enqueue(m).await, "enqueue");
    }
    ids.reverse();
    let listed: Vec<QueueId> = ok(queue.list(100).await, "list")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(listed, ids, "oldest first");
    let listed: Vec<QueueId> = ok(queue.list(2).await, "list")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(listed, ids[..2], "limit");
    assert!(ok(queue.list(0).await, "list").is_empty());
}

/// `stats` counts messages, bytes, the oldest, and messages per domain.
pub async fn stats_by_domain<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let empty = ok(queue.stats().await, "stats");
    assert_eq!(empty.messages, 0);
    assert_eq!(empty.bytes, 0);
    assert_eq!(empty.oldest_received_at_ms, None);
    assert!(empty.by_domain.is_empty());

    let mut a = message("a@x.org", &["1@a.example", "2@a.example", "3@b.example"]);
    a.envelope.received_at_ms = 1000;
    let b = message("b@x.org", &["1@b.example"]);
    let c = message("c@x.org", &["1@c.example"]);
    let bytes = (a.body.len() + b.body.len() + c.body.len()) as u64;
    for m in [&a, &b, &c] {
        ok(queue.enqueue(m.clone()).await, "enqueue");
    }
    let stats = ok(queue.stats().await, "stats");
    assert_eq!(stats.messages, 3);
    assert_eq!(stats.bytes, bytes);
    assert_eq!(stats.oldest_received_at_ms, Some(1000));
    let expected: BTreeMap<String, u64> = [("a.example", 1), ("b.example", 2), ("c.example", 1)]
        .into_iter()
        .map(|(d, n)| (d.to_string(), n))
        .collect();
    assert_eq!(stats.by_domain, expected);

    assert!(ok(queue.delete(c.envelope.id).await, "delete"));
    let stats = ok(queue.stats().await, "stats");
    assert_eq!(stats.messages, 2);
    assert!(!stats.by_domain.contains_key("c.example"));
}

/// `delete` removes the entry from get, list and stats, and reports whether it existed.
pub async fn delete_removes<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let keep = message("a@x.org", &["k@keep.example"]);
    let gone = message("a@x.org", &["g@gone.example"]);
    ok(queue.enqueue(keep.clone()).await, "enqueue");
    ok(queue.enqueue(gone.clone()).await, "enqueue");
    assert!(ok(queue.delete(gone.envelope.id).await, "delete"));
    assert!(
        !ok(queue.delete(gone.envelope.id).await, "delete again"),
        "second delete finds nothing"
    );
    assert_eq!(ok(queue.get(gone.envelope.id).await, "get"), None);
    let ids: Vec<QueueId> = ok(queue.list(10).await, "list")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, vec![keep.envelope.id]);
    drop(queue);
    let queue = backend.open().await;
    assert_eq!(
        ok(queue.get(gone.envelope.id).await, "get after reopen"),
        None,
        "delete is durable"
    );
    assert_eq!(
        ok(queue.get(keep.envelope.id).await, "get after reopen"),
        Some(keep)
    );
}

/// A new handle on the same storage sees the same entries, list and stats.
pub async fn reopen_keeps_everything<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let mut messages = Vec::new();
    for i in 0..20 {
        let m = message(&format!("s{i}@x.org"), &[&format!("r@d{}.example", i % 3)]);
        ok(queue.enqueue(m.clone()).await, "enqueue");
        messages.push(m);
    }
    let list = ok(queue.list(usize::MAX).await, "list");
    let stats = ok(queue.stats().await, "stats");
    drop(queue);
    let queue = backend.open().await;
    assert_eq!(ok(queue.list(usize::MAX).await, "list after reopen"), list);
    assert_eq!(ok(queue.stats().await, "stats after reopen"), stats);
    for m in messages {
        assert_eq!(
            ok(queue.get(m.envelope.id).await, "get after reopen"),
            Some(m)
        );
    }
}

/// `n` concurrent enqueues all succeed and are all visible.
pub async fn concurrent_enqueues<B: Backend>(backend: &mut B, n: usize) {
    let queue = Arc::new(backend.open().await);
    let mut tasks = Vec::new();
    for i in 0..n {
        let queue = Arc::clone(&queue);
        tasks.push(tokio::spawn(async move {
            let m = message("c@x.org", &[&format!("r{i}@d{}.example", i % 7)]);
            let id = m.envelope.id;
            queue.enqueue(m).await.map(|()| id)
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(ok(ok(task.await, "join"), "concurrent enqueue"));
    }
    let stats = ok(queue.stats().await, "stats");
    assert_eq!(stats.messages, n as u64);
    assert_eq!(stats.by_domain.values().sum::<u64>(), n as u64);
    let listed = ok(queue.list(usize::MAX).await, "list");
    assert_eq!(listed.len(), n);
    for id in ids {
        assert!(
            ok(queue.get(id).await, "get").is_some(),
            "{id} visible after enqueue returned"
        );
    }
}
