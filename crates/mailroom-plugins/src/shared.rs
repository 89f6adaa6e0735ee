//! State shared by every inbound process (rate-limit counters, greylist triplets): JetStream KV
//! when the queue is JetStream ([`crate::SharedBackend`]), else memory in this process.
//!
//! A [`SharedStore`] is one bucket of keys with values that expire a fixed time after their
//! last write (the bucket's `max_age` in KV). Plugins change values only through
//! [`SharedStore::update`]: read, decide, write back only if nobody wrote in between
//! (`kv.create` / `kv.update(key, value, revision)`), else read again and decide again. So two
//! pods counting the same key never lose a count, and a greylist triplet passes exactly once.
//!
//! The KV bucket (`<stream>_<SUFFIX>`) is opened on first use, since plugins are built
//! synchronously; a failed open is tried again on the next use. A bucket's `max_age` only
//! grows: a process that needs a longer one raises it, one that needs less leaves it alone.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;
use tokio::sync::OnceCell;

use crate::SharedBackend;

/// Attempts of one compare-and-swap before giving up on a key that others keep changing.
const CAS_ATTEMPTS: usize = 32;
/// How often the memory backend drops expired values.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// A shared-state operation that failed; the plugin then follows its `onError`.
#[derive(Debug, Error)]
pub enum SharedError {
    /// The KV bucket could not be opened or created.
    #[error("KV bucket {bucket}: {reason}")]
    Open {
        /// The bucket's name.
        bucket: String,
        /// What went wrong.
        reason: String,
    },
    /// A read or write failed.
    #[error("KV {op} {key}: {reason}")]
    Kv {
        /// `read`, `create` or `update`.
        op: &'static str,
        /// The key.
        key: String,
        /// What went wrong.
        reason: String,
    },
    /// Others changed the key on every attempt.
    #[error("KV {key}: changed concurrently on each of {CAS_ATTEMPTS} attempts")]
    Contended {
        /// The key.
        key: String,
    },
    /// The store did not answer in time.
    #[error("no answer from the shared state within {0:?}")]
    Timeout(Duration),
}

/// What an [`SharedStore::update`] step decides about the value it was shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<T> {
    /// Leave the value as it is; the update returns the `T`.
    Keep(T),
    /// Store this value (if nobody wrote meanwhile); the update then returns the `T`.
    Put(Vec<u8>, T),
}

/// One bucket of shared state: in JetStream KV or in this process.
pub struct SharedStore {
    backend: Backend,
    timeout: Duration,
}

enum Backend {
    Kv(Box<KvBucket>),
    Memory(MemoryBucket),
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backend {
            Backend::Kv(b) => write!(f, "SharedStore(KV {})", b.bucket),
            Backend::Memory(_) => f.write_str("SharedStore(memory)"),
        }
    }
}

impl SharedStore {
    /// The bucket `<stream>_<suffix>` in `shared`'s JetStream, or one in this process when
    /// `shared` is `None`. Values expire `max_age` after their last write; every operation
    /// gives up after `timeout`.
    pub fn new(
        shared: Option<&SharedBackend>,
        suffix: &str,
        description: &'static str,
        max_age: Duration,
        timeout: Duration,
    ) -> SharedStore {
        let backend = match shared {
            Some(shared) => Backend::Kv(Box::new(KvBucket {
                js: shared.jetstream.clone(),
                bucket: format!("{}_{suffix}", shared.stream),
                description,
                max_age,
                replicas: shared.replicas.max(1),
                store: OnceCell::new(),
            })),
            None => Backend::Memory(MemoryBucket::new(max_age)),
        };
        SharedStore { backend, timeout }
    }

    /// True when the state is shared through JetStream.
    pub fn is_cluster_wide(&self) -> bool {
        matches!(self.backend, Backend::Kv(_))
    }

    /// The value at `key`, if one is there and not expired.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, SharedError> {
        self.within(async {
            match &self.backend {
                Backend::Kv(b) => b.get(key).await,
                Backend::Memory(m) => Ok(m.get(key)),
            }
        })
        .await
    }

    /// Changes the value at `key` atomically: `decide` sees the current value (`None` when
    /// there is none) and says what to do. When another writer got in between, `decide` runs
    /// again on the newer value, so it must not have side effects.
    pub async fn update<T>(
        &self,
        key: &str,
        mut decide: impl FnMut(Option<&[u8]>) -> Change<T> + Send,
    ) -> Result<T, SharedError>
    where
        T: Send,
    {
        self.within(async {
            match &self.backend {
                Backend::Kv(b) => b.update(key, &mut decide).await,
                Backend::Memory(m) => Ok(m.update(key, &mut decide)),
            }
        })
        .await
    }

    /// Counts one more at `key` unless the count there plus `extra` has reached `limit`.
    /// Returns whether it counted. The count is stored as decimal text.
    pub async fn increment_below(
        &self,
        key: &str,
        limit: u64,
        extra: u64,
    ) -> Result<bool, SharedError> {
        self.update(key, |value| {
            let count = value.map_or(0, parse_count);
            if count.saturating_add(extra) >= limit {
                Change::Keep(false)
            } else {
                Change::Put((count + 1).to_string().into_bytes(), true)
            }
        })
        .await
    }

    async fn within<T>(
        &self,
        op: impl Future<Output = Result<T, SharedError>>,
    ) -> Result<T, SharedError> {
        tokio::time::timeout(self.timeout, op)
            .await
            .unwrap_or(Err(SharedError::Timeout(self.timeout)))
    }
}

/// A counter written by [`SharedStore::increment_below`] (0 when unreadable).
pub fn parse_count(value: &[u8]) -> u64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (wall clock, which every pod shares).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A KV key token from any text: letters, digits, `-` and `_` are kept, every other byte is
/// written `=xx` (hex), so distinct texts give distinct tokens. Never empty.
pub fn key_token(text: &str) -> String {
    if text.is_empty() {
        return "=".to_owned();
    }
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("={b:02x}"));
        }
    }
    out
}

/// The client's network as greylisting and rate limits see it: the /24 of an IPv4 address,
/// the /64 of an IPv6 one (an IPv4-mapped IPv6 address counts as IPv4).
pub fn client_network(ip: IpAddr) -> IpNet {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Ipv4Net::new(v4, 24).map_or(IpNet::from(ip), |n| n.trunc().into()),
        IpAddr::V6(v6) => Ipv6Net::new(v6, 64).map_or(IpNet::from(ip), |n| n.trunc().into()),
    }
}

// ---------------------------------------------------------------------------------------------
// JetStream KV

struct KvBucket {
    js: jetstream::Context,
    bucket: String,
    description: &'static str,
    max_age: Duration,
    replicas: usize,
    store: OnceCell<kv::Store>,
}

impl KvBucket {
    /// The bucket, opened (and created or its `max_age` raised) on first use.
    async fn store(&self) -> Result<&kv::Store, SharedError> {
        self.store.get_or_try_init(|| self.open()).await
    }

    async fn open(&self) -> Result<kv::Store, SharedError> {
        if let Ok(store) = self.js.get_key_value(&self.bucket).await
            && let Ok(status) = store.status().await
            && (status.max_age().is_zero() || status.max_age() >= self.max_age)
        {
            return Ok(store);
        }
        self.js
            .create_or_update_key_value(kv::Config {
                bucket: self.bucket.clone(),
                description: self.description.to_owned(),
                history: 1,
                max_age: self.max_age,
                num_replicas: self.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| SharedError::Open {
                bucket: self.bucket.clone(),
                reason: e.to_string(),
            })
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, SharedError> {
        let entry = self
            .store()
            .await?
            .entry(key)
            .await
            .map_err(|e| kv_error("read", key, e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| e.value))
    }

    async fn update<T>(
        &self,
        key: &str,
        decide: &mut (impl FnMut(Option<&[u8]>) -> Change<T> + Send),
    ) -> Result<T, SharedError> {
        let store = self.store().await?;
        for _ in 0..CAS_ATTEMPTS {
            let entry = store
                .entry(key)
                .await
                .map_err(|e| kv_error("read", key, e))?;
            let (value, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    (Some(&e.value[..]), Some(e.revision))
                }
                // A deleted or purged key: absent, but its revision guards the write.
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            let (new, result) = match decide(value) {
                Change::Keep(result) => return Ok(result),
                Change::Put(new, result) => (Bytes::from(new), result),
            };
            let written = match revision {
                Some(revision) => match store.update(key, new, revision).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                    Err(e) => return Err(kv_error("update", key, e)),
                },
                None => match store.create(key, new).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(kv_error("create", key, e)),
                },
            };
            if written {
                return Ok(result);
            }
            // Someone else wrote first: look again.
            tokio::task::yield_now().await;
        }
        Err(SharedError::Contended {
            key: key.to_owned(),
        })
    }
}

fn kv_error(op: &'static str, key: &str, e: impl std::fmt::Display) -> SharedError {
    SharedError::Kv {
        op,
        key: key.to_owned(),
        reason: e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Memory

struct MemoryBucket {
    max_age: Duration,
    state: Mutex<MemoryState>,
}

struct MemoryState {
    /// Value and when it expires (`None`: never, for an age beyond what `Instant` holds).
    values: HashMap<String, (Vec<u8>, Option<Instant>)>,
    next_sweep: Instant,
}

impl MemoryBucket {
    fn new(max_age: Duration) -> MemoryBucket {
        MemoryBucket {
            max_age,
            state: Mutex::new(MemoryState {
                values: HashMap::new(),
                next_sweep: Instant::now() + SWEEP_EVERY,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &str) -> Option<Bytes> {
        let now = Instant::now();
        self.lock()
            .values
            .get(key)
            .filter(|(_, expires)| expires.is_none_or(|at| at > now))
            .map(|(value, _)| Bytes::copy_from_slice(value))
    }

    fn update<T>(&self, key: &str, decide: &mut impl FnMut(Option<&[u8]>) -> Change<T>) -> T {
        let now = Instant::now();
        let mut state = self.lock();
        if now >= state.next_sweep {
            state
                .values
                .retain(|_, (_, expires)| expires.is_none_or(|at| at > now));
            state.next_sweep = now + SWEEP_EVERY;
        }
        let current = state
            .values
            .get(key)
            .filter(|(_, expires)| expires.is_none_or(|at| at > now))
            .map(|(value, _)| value.as_slice());
        match decide(current) {
            Change::Keep(result) => result,
            Change::Put(value, result) => {
                let expires = now.checked_add(self.max_age);
                state.values.insert(key.to_owned(), (value, expires));
                result
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_keep_distinct_texts_distinct() {
        assert_eq!(key_token("a.b@x"), "a=2eb=40x");
        assert_eq!(key_token("a_b@x"), "a_b=40x");
        assert_eq!(key_token(""), "=");
        assert_eq!(key_token("Ünï"), "=c3=9cn=c3=af");
        assert_ne!(key_token("a=2e"), key_token("a."));
    }

    #[test]
    fn client_networks_are_a_slash_24_or_a_slash_64() {
        let net = |ip: &str| client_network(ip.parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(net("192.0.2.77").to_string(), "192.0.2.0/24");
        assert_eq!(net("::ffff:192.0.2.77").to_string(), "192.0.2.0/24");
        assert_eq!(net("2001:db8:1:2:3:4:5:6").to_string(), "2001:db8:1:2::/64");
    }

    #[tokio::test]
    async fn memory_counts_up_to_the_limit_and_values_expire() {
        let store = SharedStore::new(
            None,
            "T",
            "test",
            Duration::from_millis(200),
            Duration::from_secs(1),
        );
        assert!(!store.is_cluster_wide());
        for _ in 0..3 {
            assert!(store.increment_below("k", 3, 0).await.unwrap_or(false));
        }
        assert!(!store.increment_below("k", 3, 0).await.unwrap_or(true));
        assert_eq!(
            store.get("k").await.ok().flatten().as_deref(),
            Some(&b"3"[..])
        );
        // `extra` (a sliding window's share of the previous one) counts against the limit.
        assert!(!store.increment_below("j", 3, 3).await.unwrap_or(true));
        assert!(store.increment_below("j", 3, 2).await.unwrap_or(false));
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(store.get("k").await.ok().flatten(), None, "expired");
        assert!(store.increment_below("k", 3, 0).await.unwrap_or(false));
    }

    /// A KV store of bucket `S_<suffix>` on its own connection (another "pod").
    async fn kv_store(
        server: &mailroom_testkit::NatsServer,
        suffix: &str,
        max_age: Duration,
    ) -> SharedStore {
        let client = async_nats::connect(server.url())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let shared = SharedBackend {
            jetstream: jetstream::new(client),
            stream: "S".into(),
            replicas: 1,
        };
        SharedStore::new(
            Some(&shared),
            suffix,
            "test",
            max_age,
            Duration::from_secs(5),
        )
    }

    fn nats() -> mailroom_testkit::NatsServer {
        mailroom_testkit::NatsServer::start().unwrap_or_else(|e| {
            panic!("this test needs a nats-server (run e2e/tools/build.sh): {e}")
        })
    }

    /// Two "pods" counting the same key at once: the compare-and-swap loses no count and lets
    /// exactly `limit` through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn kv_counts_concurrently_from_two_processes_exactly_to_the_limit() {
        let server = nats();
        let pods = [
            std::sync::Arc::new(kv_store(&server, "RATELIMIT", Duration::from_secs(600)).await),
            std::sync::Arc::new(kv_store(&server, "RATELIMIT", Duration::from_secs(600)).await),
        ];
        assert!(pods[0].is_cluster_wide());
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = std::sync::Arc::clone(&pods[i % 2]);
            tasks.push(tokio::spawn(async move {
                store.increment_below("mx.limit.key.1", 25, 0).await
            }));
        }
        let mut counted = 0;
        for task in tasks {
            match task.await.unwrap_or_else(|e| panic!("{e}")) {
                Ok(true) => counted += 1,
                Ok(false) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(counted, 25);
        let value = pods[1]
            .get("mx.limit.key.1")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(value.as_deref(), Some(&b"25"[..]));
        // Exactly one of many concurrent first writers creates a value.
        let mut tasks = Vec::new();
        for i in 0..10 {
            let store = std::sync::Arc::clone(&pods[i % 2]);
            tasks.push(tokio::spawn(async move {
                store
                    .update("first", |v| match v {
                        None => Change::Put(format!("{i}").into_bytes(), true),
                        Some(_) => Change::Keep(false),
                    })
                    .await
            }));
        }
        let mut created = 0;
        for task in tasks {
            if task
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("{e}"))
            {
                created += 1;
            }
        }
        assert_eq!(created, 1);
    }

    /// The bucket is created on first use; its max_age grows for a process that needs more
    /// and never shrinks.
    #[tokio::test]
    async fn kv_bucket_is_made_lazily_and_its_max_age_only_grows() {
        let server = nats();
        let client = async_nats::connect(server.url())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let js = jetstream::new(client);
        let max_age = |js: jetstream::Context| async move {
            let store = js.get_key_value("S_GREYLIST").await.ok()?;
            Some(store.status().await.ok()?.max_age())
        };
        let hour = Duration::from_secs(3600);
        let first = kv_store(&server, "GREYLIST", hour).await;
        assert_eq!(max_age(js.clone()).await, None, "not before first use");
        assert_eq!(first.get("k").await.unwrap_or_else(|e| panic!("{e}")), None);
        assert_eq!(max_age(js.clone()).await, Some(hour));
        let longer = kv_store(&server, "GREYLIST", 2 * hour).await;
        assert_eq!(
            longer.get("k").await.unwrap_or_else(|e| panic!("{e}")),
            None
        );
        assert_eq!(max_age(js.clone()).await, Some(2 * hour));
        let shorter = kv_store(&server, "GREYLIST", hour / 2).await;
        assert_eq!(
            shorter.get("k").await.unwrap_or_else(|e| panic!("{e}")),
            None
        );
        assert_eq!(max_age(js.clone()).await, Some(2 * hour));
    }

    /// With the server down an operation fails within the timeout; once it is back, the
    /// bucket is opened on the next use.
    #[tokio::test]
    async fn kv_errors_within_the_timeout_and_recovers() {
        let mut server = nats();
        let client = async_nats::connect(server.url())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let shared = SharedBackend {
            jetstream: jetstream::new(client),
            stream: "S".into(),
            replicas: 1,
        };
        let store = SharedStore::new(
            Some(&shared),
            "RATELIMIT",
            "test",
            Duration::from_secs(60),
            Duration::from_millis(500),
        );
        server.stop().unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        let failed = store.increment_below("k", 1, 0).await;
        assert!(failed.is_err(), "{failed:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        server.restart().unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match store.increment_below("k", 1, 0).await {
                Ok(counted) => {
                    assert!(counted);
                    break;
                }
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("did not recover: {e}"),
            }
        }
        assert_eq!(store.increment_below("k", 1, 0).await.ok(), Some(false));
    }
}
