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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{
    Envelope, Lease, LeaseRequest, Queue, QueueError, QueueId, Recipient, Retry, StoredMessage,
    now_ms,
};

/// A factory for one backend over one isolated storage (a temp dir, a fresh stream...).
#[async_trait::async_trait]
pub trait Backend: Send {
    /// The queue type under test.
    type Queue: Queue;

    /// Opens a handle on this storage. The suite drops the handle before opening the next one,
    /// and expects the next one to see everything committed through the previous one.
    async fn open(&mut self) -> Self::Queue;

    /// The lease time the queues of [`Backend::open`] use (short, about a second, so the
    /// redelivery checks run fast).
    fn lease_time(&self) -> Duration;
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
    duplicate_enqueue_keeps_one(&mut new_backend()).await;
    lease_per_domain_then_ack(&mut new_backend()).await;
    lease_respects_max_and_policy(&mut new_backend()).await;
    defer_comes_back_after_delay(&mut new_backend()).await;
    expiry(&mut new_backend()).await;
    crashed_worker_is_redelivered(&mut new_backend()).await;
    extend_keeps_the_lease(&mut new_backend()).await;
    retry_now_and_bounce(&mut new_backend()).await;
    postpone_keeps_the_state(&mut new_backend()).await;
    large_body_lease(&mut new_backend()).await;
    concurrent_workers_share_without_overlap(&mut new_backend(), 60).await;
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

/// Leases of `policy`: up to `max`, waiting up to `wait` for the first.
async fn lease_some<Q: Queue>(queue: &Q, policy: &str, max: usize, wait: Duration) -> Vec<Lease> {
    ok(
        queue.lease(&LeaseRequest::new(policy, max, wait)).await,
        "lease",
    )
}

/// Leases until `n` entries of `policy` are held or `within` has passed.
async fn lease_n<Q: Queue>(queue: &Q, policy: &str, n: usize, within: Duration) -> Vec<Lease> {
    let deadline = Instant::now() + within;
    let mut leases = Vec::new();
    while leases.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        leases.extend(lease_some(queue, policy, n - leases.len(), left).await);
    }
    leases
}

/// Defers a lease with all its recipients still pending, until `at_ms`.
async fn defer_all<Q: Queue>(queue: &Q, lease: Lease, at_ms: u64, response: &str, what: &str) {
    let recipients = lease.message.envelope.recipients.clone();
    let retry = Retry {
        at_ms,
        recipients,
        response: response.to_string(),
    };
    ok(queue.defer(lease, retry).await, what);
}

fn addresses(message: &StoredMessage) -> Vec<String> {
    message
        .envelope
        .recipients
        .iter()
        .map(|r| r.address.clone())
        .collect()
}

/// Enqueueing the same message twice keeps one copy (the second call may succeed, as a
/// de-duplicated publish, or fail with `Duplicate`).
pub async fn duplicate_enqueue_keeps_one<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let m = message("a@x.org", &["1@a.example", "2@b.example"]);
    ok(queue.enqueue(m.clone()).await, "enqueue");
    match queue.enqueue(m.clone()).await {
        Ok(()) | Err(QueueError::Duplicate(_)) => {}
        Err(e) => panic!("second enqueue of the same id: {e:?}"),
    }
    assert_eq!(ok(queue.stats().await, "stats").messages, 1);
    let leases = lease_n(&queue, "default", 2, Duration::from_secs(5)).await;
    assert_eq!(leases.len(), 2, "one entry per domain");
    let more = lease_some(&queue, "default", 10, Duration::from_millis(300)).await;
    assert!(more.is_empty(), "not one per enqueue: {more:?}");
}

/// A message with recipients in two domains is leased as two entries, each with its
/// recipients and the whole body; a held entry is not handed out twice; acking both removes
/// the message.
pub async fn lease_per_domain_then_ack<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let m = message("a@x.org", &["1@a.example", "1@b.example", "2@a.example"]);
    let id = m.envelope.id;
    ok(queue.enqueue(m.clone()).await, "enqueue");
    let mut leases = lease_n(&queue, "default", 2, Duration::from_secs(5)).await;
    assert_eq!(leases.len(), 2, "two domain entries");
    leases.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(leases[0].key.id, id);
    assert_eq!(leases[0].key.domain, "a.example");
    assert_eq!(
        addresses(&leases[0].message),
        ["1@a.example", "2@a.example"]
    );
    assert_eq!(leases[1].key.domain, "b.example");
    assert_eq!(addresses(&leases[1].message), ["1@b.example"]);
    for lease in &leases {
        assert_eq!(
            lease.message.body, m.body,
            "the whole body with every entry"
        );
        assert_eq!(lease.message.envelope.sender, "a@x.org");
        assert_eq!(lease.deliveries, 1);
        assert_eq!(lease.state.attempts, 0);
        assert!(!lease.expired);
    }
    assert!(
        lease_some(&queue, "default", 10, Duration::from_millis(300))
            .await
            .is_empty(),
        "held entries are not handed out again"
    );
    let backlog = ok(queue.backlogs().await, "backlogs")
        .get("default")
        .cloned()
        .unwrap_or_default();
    assert_eq!((backlog.ready, backlog.deferred), (0, 0), "{backlog:?}");

    let b = leases.pop().expect("b lease");
    ok(queue.ack(b).await, "ack b.example");
    let left = ok(queue.entries(id).await, "entries");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].key.domain, "a.example");
    let got = ok(queue.get(id).await, "get").expect("message still queued");
    assert_eq!(
        addresses(&got),
        ["1@a.example", "2@a.example"],
        "get shows what is pending"
    );

    let a = leases.pop().expect("a lease");
    ok(queue.ack(a).await, "ack a.example");
    assert_eq!(
        ok(queue.get(id).await, "get"),
        None,
        "gone with its last entry"
    );
    assert_eq!(ok(queue.stats().await, "stats").messages, 0);
    assert!(ok(queue.entries(id).await, "entries").is_empty());
    drop(queue);
    let queue = backend.open().await;
    assert_eq!(
        ok(queue.get(id).await, "get after reopen"),
        None,
        "ack is durable"
    );
    assert!(
        lease_some(&queue, "default", 10, Duration::from_millis(300))
            .await
            .is_empty()
    );
}

/// `max` bounds a lease; a policy's entries are only handed to that policy's workers.
pub async fn lease_respects_max_and_policy<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    for i in 0..5 {
        ok(
            queue
                .enqueue(message("a@x.org", &[&format!("{i}@d.example")]))
                .await,
            "enqueue",
        );
    }
    for i in 0..2 {
        let mut m = message("a@x.org", &[&format!("{i}@d.example")]);
        m.envelope.policy = "bulk".into();
        ok(queue.enqueue(m).await, "enqueue bulk");
    }
    let first = lease_some(&queue, "default", 3, Duration::from_secs(5)).await;
    assert!(!first.is_empty() && first.len() <= 3, "{}", first.len());
    let rest = lease_n(&queue, "default", 5 - first.len(), Duration::from_secs(5)).await;
    assert_eq!(first.len() + rest.len(), 5);
    assert!(
        first
            .iter()
            .chain(&rest)
            .all(|l| l.message.envelope.policy == "default")
    );
    let bulk = lease_n(&queue, "bulk", 2, Duration::from_secs(5)).await;
    assert_eq!(bulk.len(), 2);
    assert!(bulk.iter().all(|l| l.message.envelope.policy == "bulk"));
    assert!(
        lease_some(&queue, "nobody", 10, Duration::from_millis(200))
            .await
            .is_empty()
    );
    for lease in first.into_iter().chain(rest).chain(bulk) {
        ok(queue.ack(lease).await, "ack");
    }
    assert_eq!(ok(queue.stats().await, "stats").messages, 0);
}

/// A deferred entry keeps only its pending recipients, counts the attempt, is invisible until
/// its time, shows as deferred (not ready) backlog, survives a reopen, and then comes back.
pub async fn defer_comes_back_after_delay<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let m = message("a@x.org", &["1@a.example", "2@a.example", "3@a.example"]);
    let id = m.envelope.id;
    ok(queue.enqueue(m.clone()).await, "enqueue");
    let second = message("a@x.org", &["x@b.example"]);
    let second_id = second.envelope.id;
    ok(queue.enqueue(second).await, "enqueue other");
    let mut leases = lease_n(&queue, "default", 2, Duration::from_secs(5)).await;
    assert_eq!(leases.len(), 2);
    leases.sort_by_key(|l| l.key.domain.clone());
    let other = leases.pop().expect("b.example");
    let lease = leases.pop().expect("a.example");
    let pending: Vec<Recipient> = lease.message.envelope.recipients[1..].to_vec();
    let delay = Duration::from_millis(2500);
    let at_ms = now_ms() + delay.as_millis() as u64;
    let deferred_at = Instant::now();
    ok(
        queue
            .defer(
                lease,
                Retry {
                    at_ms,
                    recipients: pending.clone(),
                    response: "451 4.7.1 greylisted".into(),
                },
            )
            .await,
        "defer",
    );
    // Give the other entry back as well, due at once, so `ready` has something to count.
    ok(
        queue
            .defer(
                other,
                Retry {
                    at_ms: 0,
                    recipients: vec![Recipient {
                        address: "x@b.example".into(),
                        domain: "b.example".into(),
                        notify: None,
                        orcpt: None,
                    }],
                    response: "421 4.4.2 timeout".into(),
                },
            )
            .await,
        "defer due now",
    );
    let status = ok(queue.entries(id).await, "entries");
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].recipients, ["2@a.example", "3@a.example"]);
    assert_eq!(status[0].state.attempts, 1);
    assert_eq!(
        status[0].state.last_response.as_deref(),
        Some("451 4.7.1 greylisted")
    );
    assert_eq!(status[0].state.next_attempt_ms, at_ms);
    // Backlog counts may lag a little in a distributed backend: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let backlog = ok(queue.backlogs().await, "backlogs")
            .get("default")
            .cloned()
            .unwrap_or_default();
        // Each entry counts by domain too, under due or deferred.
        let due: u64 = backlog.due_by_domain.values().sum();
        let deferred: u64 = backlog.deferred_by_domain.values().sum();
        if (backlog.ready, backlog.deferred, due, deferred) == (1, 1, 1, 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backlog of one due and one deferred entry: {backlog:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The oldest entry per domain is the message's acceptance time, due or deferred alike;
    // domains not asked for, and asked for without mail, are left out.
    let wanted = ["a.example", "b.example", "none.example"].map(String::from);
    let oldest = ok(
        queue.oldest_queued("default", &wanted).await,
        "oldest_queued",
    );
    assert_eq!(
        oldest,
        [
            ("a.example".to_owned(), id.timestamp_ms()),
            ("b.example".to_owned(), second_id.timestamp_ms())
        ]
        .into()
    );
    let other_policy = ok(queue.oldest_queued("other", &wanted).await, "oldest_queued");
    assert!(other_policy.is_empty(), "{other_policy:?}");
    drop(queue);
    let queue = backend.open().await;

    let mut again = lease_n(&queue, "default", 1, Duration::from_secs(2)).await;
    assert_eq!(again.len(), 1, "the entry due now");
    let other = again.pop().expect("other");
    assert_eq!(other.key.domain, "b.example");
    assert_eq!(other.state.attempts, 1);
    ok(queue.ack(other).await, "ack other");
    let early = lease_some(&queue, "default", 10, Duration::from_millis(200)).await;
    assert!(early.is_empty(), "deferred entry is not due yet");

    let back = lease_n(&queue, "default", 1, delay + Duration::from_secs(10)).await;
    let waited = deferred_at.elapsed();
    assert_eq!(back.len(), 1, "the deferred entry comes back");
    assert!(
        waited + Duration::from_millis(100) >= delay,
        "not before its time: {waited:?}"
    );
    let lease = back.into_iter().next().expect("lease");
    assert_eq!(lease.key.id, id);
    assert_eq!(lease.message.envelope.recipients, pending);
    assert_eq!(lease.message.body, m.body);
    assert_eq!(lease.state.attempts, 1);
    assert_eq!(
        lease.state.last_response.as_deref(),
        Some("451 4.7.1 greylisted")
    );
    let got = ok(queue.get(id).await, "get").expect("queued");
    assert_eq!(addresses(&got), ["2@a.example", "3@a.example"]);
    ok(queue.ack(lease).await, "ack");
    assert_eq!(ok(queue.get(id).await, "get"), None);

    let empty = Retry {
        at_ms: 0,
        recipients: Vec::new(),
        response: String::new(),
    };
    ok(
        queue.enqueue(message("a@x.org", &["1@c.example"])).await,
        "enqueue",
    );
    let lease = lease_n(&queue, "default", 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("lease");
    assert!(
        matches!(queue.defer(lease, empty).await, Err(QueueError::Invalid(_))),
        "a retry without recipients is refused"
    );
}

/// An entry older than the request's `max_age` is handed out as expired; a retry time past the
/// expiry is clamped to it, so the entry comes back in time to be bounced.
pub async fn expiry<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let mut old = message("a@x.org", &["1@old.example"]);
    old.envelope.received_at_ms = now_ms() - 3_600_000;
    ok(queue.enqueue(old.clone()).await, "enqueue old");
    let leases = ok(
        queue
            .lease(
                &LeaseRequest::new("default", 10, Duration::from_secs(5))
                    .max_age(Duration::from_secs(1800)),
            )
            .await,
        "lease",
    );
    assert_eq!(leases.len(), 1);
    assert!(leases[0].expired, "older than max_age");
    assert_eq!(
        leases[0].expires_at_ms,
        Some(old.envelope.received_at_ms + 1_800_000)
    );
    for lease in leases {
        ok(queue.ack(lease).await, "ack expired");
    }

    let young = message("a@x.org", &["1@young.example"]);
    ok(queue.enqueue(young.clone()).await, "enqueue young");
    let max_age = Duration::from_millis(now_ms() - young.envelope.received_at_ms + 2000);
    let request = LeaseRequest::new("default", 10, Duration::from_secs(5)).max_age(max_age);
    let lease = ok(queue.lease(&request).await, "lease")
        .pop()
        .expect("young lease");
    assert!(!lease.expired);
    let started = Instant::now();
    defer_all(
        &queue,
        lease,
        now_ms() + 3_600_000,
        "451 4.4.1 no answer",
        "defer past expiry",
    )
    .await;
    let request = LeaseRequest {
        wait: Duration::from_secs(10),
        ..request
    };
    let mut back = Vec::new();
    while back.is_empty() && started.elapsed() < Duration::from_secs(15) {
        back = ok(queue.lease(&request).await, "lease");
    }
    assert_eq!(back.len(), 1, "clamped to the expiry, not an hour");
    assert!(back[0].expired, "and handed out as expired");
    for lease in back {
        ok(queue.ack(lease).await, "ack");
    }
}

/// A lease that is neither ended nor extended is handed out again after the lease time, with
/// `deliveries` counting; a worker whose queue handle is gone loses its leases too.
pub async fn crashed_worker_is_redelivered<B: Backend>(backend: &mut B) {
    let lease_time = backend.lease_time();
    let queue = backend.open().await;
    let m = message("a@x.org", &["1@a.example"]);
    ok(queue.enqueue(m.clone()).await, "enqueue");
    let first = lease_n(&queue, "default", 1, Duration::from_secs(5)).await;
    assert_eq!(first.len(), 1);
    let started = Instant::now();
    std::mem::forget(first); // the worker "dies" holding it
    let again = lease_n(
        &queue,
        "default",
        1,
        lease_time * 3 + Duration::from_secs(5),
    )
    .await;
    assert_eq!(again.len(), 1, "redelivered after the lease time");
    assert!(
        started.elapsed() + Duration::from_millis(100) >= lease_time,
        "not before the lease time: {:?}",
        started.elapsed()
    );
    assert_eq!(again[0].key.id, m.envelope.id);
    assert_eq!(again[0].deliveries, 2);
    assert_eq!(again[0].message.body, m.body);
    std::mem::forget(again);
    drop(queue);

    // A new handle (another worker, or the same process after a restart) gets it too.
    let queue = backend.open().await;
    let third = lease_n(
        &queue,
        "default",
        1,
        lease_time * 3 + Duration::from_secs(5),
    )
    .await;
    assert_eq!(third.len(), 1, "redelivered to the next worker");
    assert_eq!(third[0].key.id, m.envelope.id);
    for lease in third {
        ok(queue.ack(lease).await, "ack");
    }
    assert_eq!(ok(queue.get(m.envelope.id).await, "get"), None);
}

/// Extending a lease keeps it beyond the lease time; no one else gets the entry meanwhile.
pub async fn extend_keeps_the_lease<B: Backend>(backend: &mut B) {
    let lease_time = backend.lease_time();
    let queue = backend.open().await;
    ok(
        queue.enqueue(message("a@x.org", &["1@a.example"])).await,
        "enqueue",
    );
    let lease = lease_n(&queue, "default", 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("lease");
    let until = Instant::now() + lease_time * 3;
    while Instant::now() < until {
        ok(queue.extend(&lease).await, "extend");
        let stolen = lease_some(&queue, "default", 1, lease_time / 3).await;
        assert!(stolen.is_empty(), "an extended lease is not handed out");
    }
    ok(queue.ack(lease).await, "ack after extensions");
    assert_eq!(ok(queue.stats().await, "stats").messages, 0);
}

/// `retry_now` makes a deferred entry due at once, keeping its history; `request_bounce`
/// hands the entry out marked for bounce.
pub async fn retry_now_and_bounce<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let m = message("a@x.org", &["1@a.example", "1@b.example"]);
    let id = m.envelope.id;
    ok(queue.enqueue(m).await, "enqueue");
    for lease in lease_n(&queue, "default", 2, Duration::from_secs(5)).await {
        defer_all(
            &queue,
            lease,
            now_ms() + 3_600_000,
            "452 4.2.2 mailbox full",
            "defer an hour",
        )
        .await;
    }
    assert!(
        lease_some(&queue, "default", 10, Duration::from_millis(200))
            .await
            .is_empty()
    );
    assert_eq!(ok(queue.retry_now(id).await, "retry"), 2);
    assert_eq!(
        ok(queue.retry_now(QueueId::new()).await, "retry unknown"),
        0
    );
    let mut back = lease_n(&queue, "default", 2, Duration::from_secs(5)).await;
    assert_eq!(back.len(), 2, "both entries due after retry");
    assert!(back.iter().all(|l| l.state.attempts == 1));
    assert!(back.iter().all(|l| l.state.bounce_requested.is_none()));
    let lease = back.pop().expect("lease");
    defer_all(
        &queue,
        lease,
        now_ms() + 3_600_000,
        "452 4.2.2 mailbox full",
        "defer again",
    )
    .await;
    // One entry deferred, one leased: bounce marks both; the deferred one is due at once, the
    // leased one carries the mark when it comes back.
    assert_eq!(
        ok(
            queue.request_bounce(id, "removed by the operator").await,
            "bounce"
        ),
        2
    );
    let bounced = lease_n(&queue, "default", 1, Duration::from_secs(5)).await;
    assert_eq!(bounced.len(), 1);
    assert_eq!(
        bounced[0].state.bounce_requested.as_deref(),
        Some("removed by the operator")
    );
    assert_eq!(bounced[0].state.attempts, 2);
    let statuses = ok(queue.entries(id).await, "entries");
    assert!(
        statuses
            .iter()
            .all(|s| s.state.bounce_requested.as_deref() == Some("removed by the operator")),
        "{statuses:?}"
    );
    for lease in bounced.into_iter().chain(back) {
        ok(queue.ack(lease).await, "ack");
    }
    assert_eq!(ok(queue.get(id).await, "get"), None);
}

/// A body of several MiB (above a NATS server's default payload limit) is leased whole and
/// can be deferred and acked like any other.
pub async fn large_body_lease<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    let mut m = message("a@x.org", &["1@a.example", "1@b.example"]);
    let mut body = m.body.to_vec();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while body.len() < 6 << 20 {
        body.extend_from_slice(line);
    }
    m.body = Bytes::from(body);
    ok(queue.enqueue(m.clone()).await, "enqueue large");
    let leases = lease_n(&queue, "default", 2, Duration::from_secs(10)).await;
    assert_eq!(leases.len(), 2);
    let mut leases = leases.into_iter();
    let first = leases.next().expect("first");
    let second = leases.next().expect("second");
    assert_eq!(first.message.body, m.body);
    assert_eq!(second.message.body, m.body);
    defer_all(&queue, first, 0, "421 4.3.0 later", "defer large").await;
    ok(queue.ack(second).await, "ack large");
    let back = lease_n(&queue, "default", 1, Duration::from_secs(10)).await;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].message.body, m.body, "body intact after defer");
    for lease in back {
        ok(queue.ack(lease).await, "ack");
    }
    assert_eq!(ok(queue.get(m.envelope.id).await, "get"), None);
    assert_eq!(ok(queue.stats().await, "stats").messages, 0);
}

/// Workers leasing concurrently get disjoint entries that together cover the queue, whatever
/// order they ack in.
pub async fn concurrent_workers_share_without_overlap<B: Backend>(backend: &mut B, n: usize) {
    let queue = Arc::new(backend.open().await);
    let mut expected = BTreeSet::new();
    for i in 0..n {
        let m = message("a@x.org", &[&format!("{i}@d{}.example", i % 5)]);
        expected.insert(m.envelope.id);
        ok(queue.enqueue(m).await, "enqueue");
    }
    let mut workers = Vec::new();
    for w in 0..3u64 {
        let queue = Arc::clone(&queue);
        workers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                let leases = queue
                    .lease(&LeaseRequest::new("default", 7, Duration::from_millis(500)))
                    .await?;
                if leases.is_empty() {
                    return Ok::<_, QueueError>(seen);
                }
                // Ack in reverse order, with a pause that varies per worker.
                for lease in leases.into_iter().rev() {
                    seen.push(lease.key.id);
                    tokio::time::sleep(Duration::from_millis(w)).await;
                    queue.ack(lease).await?;
                }
            }
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(ok(ok(worker.await, "join"), "worker"));
    }
    let unique: BTreeSet<QueueId> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "no entry handed to two workers");
    assert_eq!(unique, expected, "every entry handed out");
    assert_eq!(ok(queue.stats().await, "stats").messages, 0);
}

/// `postpone` hands the entry out again at its time without counting an attempt.
pub async fn postpone_keeps_the_state<B: Backend>(backend: &mut B) {
    let queue = backend.open().await;
    ok(
        queue.enqueue(message("a@x.org", &["1@a.example"])).await,
        "enqueue",
    );
    let lease = lease_n(&queue, "default", 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("lease");
    defer_all(&queue, lease, 0, "451 4.7.1 once", "defer").await;
    let lease = lease_n(&queue, "default", 1, Duration::from_secs(5))
        .await
        .pop()
        .expect("lease after defer");
    assert_eq!(lease.state.attempts, 1);
    let started = Instant::now();
    ok(queue.postpone(lease, now_ms() + 1500).await, "postpone");
    assert!(
        lease_some(&queue, "default", 10, Duration::from_millis(300))
            .await
            .is_empty(),
        "not before its time"
    );
    let back = lease_n(&queue, "default", 1, Duration::from_secs(10)).await;
    assert_eq!(back.len(), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(back[0].state.attempts, 1, "no attempt counted");
    assert_eq!(
        back[0].state.last_response.as_deref(),
        Some("451 4.7.1 once")
    );
    for lease in back {
        ok(queue.ack(lease).await, "ack");
    }
}
