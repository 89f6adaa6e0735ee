//! The `jetstream` backend: the shared, durable queue of a Mailroom cluster in NATS JetStream.
//!
//! # Layout
//!
//! - **One stream** (default `MAILROOM`), work-queue retention, subjects `<root>.q.>` and
//!   `<root>.d.>` where the root is the stream name in lowercase (`mailroom.q.>` by default;
//!   streams never overlap, so the operator gives each namespace its own), `allow_direct`
//!   (admin reads use Direct Get), `max_age` as a safety net (default 7 days),
//!   `duplicate_window` (default 2 min), file or memory storage, 1 or 3 replicas. Created or
//!   updated by [`JetStreamQueue::connect`] and again after every reconnect (so a wiped server
//!   gets it back).
//! - **One entry per destination domain**: subject `mailroom.q.<policy>.<domain>` (the domain
//!   keeps its dots; a policy or domain that is not a plain name is hex-encoded as `_<hex>`),
//!   headers `Nats-Msg-Id: <queue-id>.<domain token>` (a retried publish is de-duplicated by the
//!   server within the duplicate window), `Mailroom-Id: <queue-id>`, `Mailroom-Meta-Size: <n>`,
//!   `Nats-Expected-Stream`; payload = `n` octets of JSON metadata (the envelope restricted to
//!   this domain's recipients, their original indices, the number of parts, body size and
//!   where the body is), then the body when it is inline. See `entry.rs`.
//! - **Bodies**: inline in every domain entry when the body fits in `inline_max` (default: the
//!   server's `max_payload` minus 64 KiB; copying a small body into each domain entry is cheaper
//!   than a shared object and needs no reference counting). Larger bodies go to the Object Store
//!   bucket `body_bucket` (default `MAILROOM_BODIES`) under the queue id, chunked below
//!   `max_payload`, and every entry references them. A reference count in the KV bucket
//!   `<body_bucket>_REFS` (key = queue id, value = entries left) frees the object after the last
//!   entry is gone; see `body.rs` for why that is safe under concurrent removals.
//!
//! # Enqueue (the `250` path)
//!
//! Fails fast with [`QueueError::Unavailable`] when the client is not connected. Otherwise: body
//! object (if any) and its count first, then all domain entries are published concurrently and
//! every PubAck is awaited; only when all are in does `enqueue` return `Ok`. The whole publish
//! phase is bounded by `publish_timeout`; within it a failed publish is retried (the
//! `Nats-Msg-Id` makes that safe). A body upload is bounded per chunk (each chunk's PubAck
//! within `publish_timeout`), not as a whole, so a 50 MiB body is not cut off by a short
//! timeout. A PubAck flagged `duplicate` is checked: the entry it points
//! at must still exist (else the id's earlier entries were rolled back or already delivered and
//! the message must be enqueued under a new id). On failure, what this call published is deleted
//! again (best effort) and the error returned: the caller answers `451 4.3.0`.
//!
//! Durability is JetStream's: with 3 replicas a PubAck means a quorum has the entry. A
//! single-node server acknowledges before fsync unless it runs with `sync_interval: always`.
//!
//! # Admin operations and their cost
//!
//! `get`, `list`, `stats` and `delete` read the stream with batched Direct Get (see `scan.rs`;
//! consumers cannot be used on a work-queue stream whose subjects the workers' consumers
//! already cover). `list`/`stats` read every entry (inline bodies included) up to the last
//! sequence at call time: O(entries + inline octets), 256 entries or 8 MiB per round trip.
//! `get`/`delete` start at the queue id's timestamp minus 10 minutes (clock skew allowance)
//! since an entry is never published before its id was made. `stats.by_domain` comes from the
//! stream's per-subject counts (`stream info` with a subject filter), which is cheap.
//!
//! # Readiness
//!
//! [`Queue::is_ready`] is true while async-nats reports `Connected` and the stream and buckets
//! are known. The client retries the initial connection and reconnects forever (at most 1 s
//! between attempts); a server that is down at start-up does not fail [`JetStreamQueue::connect`]
//! (it waits up to `publish_timeout`, then returns a not-ready queue). A supervisor task re-runs
//! the stream/bucket setup after each (re)connection, so readiness comes back by itself.
//!
//! # Workers
//!
//! See `worker.rs`: one durable pull consumer per policy (`mailroom-<policy>`, filter
//! `mailroom.q.<policy>.>`, `ack_wait` = lease time, unlimited deliveries); ack = confirmed
//! `double_ack` plus body release; defer = publish the updated entry as a scheduled message on
//! `mailroom.d.<policy>.<id>.<domain>` (stream option `allow_msg_schedules`, nats-server
//! 2.12+) that the server moves back to `mailroom.q.…` at the retry time, then ack. Measured
//! against nak-with-delay (`bench/RESULTS.md`): schedules keep deferred mail out of the
//! consumers' ack-pending window (a nak'd entry occupies a `max_ack_pending` slot for its
//! whole delay) and make "deferred" a separate, countable backlog.

mod body;
mod entry;
mod error;
mod scan;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::{self, context::ContextBuilder, message::PublishMessage};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{
    Backlogs, DeliveryState, EntryStatus, EntrySummary, Lease, LeaseRequest, Queue, QueueError,
    QueueId, QueueStats, Retry, StoredMessage,
};
use body::Bodies;
use entry::{BodyRef, EntryMeta, PlannedEntry};
pub use error::{BoxError, JetStreamError};
use error::{boxed, msg};

/// Room left in a message below `max_payload` for headers and metadata when deciding whether a
/// body fits inline.
const INLINE_HEADROOM: usize = 64 << 10;
/// Allowance for the NATS headers of an entry.
const HEADER_ALLOWANCE: usize = 1024;
/// Largest Object Store chunk.
const MAX_CHUNK: usize = 1 << 20;
/// How far before its id's timestamp an entry may have been stored (clock skew between the pod
/// that made the id and the NATS server).
const CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;
/// Pause between publish retries within `publish_timeout`.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Pause between stream-setup attempts while connected.
const SETUP_RETRY: Duration = Duration::from_millis(500);
/// Time allowed for each best-effort rollback step.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(2);

/// How the client authenticates to NATS.
#[derive(Clone, Default)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A token (`authorization { token }`).
    Token(String),
    /// User and password.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// A `.creds` file (JWT + nkey seed), as `nsc` writes them.
    CredentialsFile(PathBuf),
    /// An nkey seed (`SU...`).
    NkeySeed(String),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::Token(_) => f.write_str("Token(<redacted>)"),
            NatsAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            NatsAuth::CredentialsFile(path) => {
                f.debug_tuple("CredentialsFile").field(path).finish()
            }
            NatsAuth::NkeySeed(_) => f.write_str("NkeySeed(<redacted>)"),
        }
    }
}

/// TLS towards NATS (rustls). Setting this requires TLS; `tls://` URLs require it too.
#[derive(Clone, Debug, Default)]
pub struct NatsTls {
    /// PEM file with the CA certificate(s) to trust (in addition to none: give it for a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (mutual TLS); needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// Where JetStream keeps the stream and buckets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    /// On disk (the default; survives a server restart).
    #[default]
    File,
    /// In memory (tests, or a cluster that accepts losing the queue with its servers).
    Memory,
}

/// Options of the JetStream backend.
#[derive(Clone, Debug)]
pub struct JetStreamOptions {
    /// Server URLs (`nats://host:4222`, `tls://...`); the client also learns the cluster's other
    /// servers from them. Default `["nats://127.0.0.1:4222"]`.
    pub urls: Vec<String>,
    /// Credentials. Default none.
    pub auth: NatsAuth,
    /// TLS; `None` means plain TCP unless a URL says `tls://`.
    pub tls: Option<NatsTls>,
    /// The stream name. Default `MAILROOM`.
    pub stream: String,
    /// Stream and bucket replicas: 1 or 3 (at most 5). Default 1.
    pub replicas: usize,
    /// Storage of the stream and buckets. Default [`Storage::File`].
    pub storage: Storage,
    /// Safety-net maximum age of entries, bodies and reference counts. Default 7 days.
    pub max_age: Duration,
    /// Window in which a repeated `Nats-Msg-Id` is dropped by the server. Default 2 min.
    pub duplicate_window: Duration,
    /// Bound on the publish phase of `enqueue` (all PubAcks) and on each JetStream API request.
    /// Default 10 s.
    pub publish_timeout: Duration,
    /// The Object Store bucket of large bodies; its reference counts live in the KV bucket
    /// `<body_bucket>_REFS`. Default `MAILROOM_BODIES`.
    pub body_bucket: String,
    /// Largest body stored inline in the entries. Default (and upper bound): the server's
    /// `max_payload` minus 64 KiB.
    pub inline_max: Option<usize>,
    /// A worker's lease on an entry (the consumers' `ack_wait`). Default 5 minutes.
    pub lease_time: Duration,
    /// Entries leased at once per policy, over all workers (the consumers' `max_ack_pending`).
    /// Default 20,000.
    pub max_leased: i64,
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        JetStreamOptions {
            urls: vec!["nats://127.0.0.1:4222".into()],
            auth: NatsAuth::None,
            tls: None,
            stream: "MAILROOM".into(),
            replicas: 1,
            storage: Storage::File,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            publish_timeout: Duration::from_secs(10),
            body_bucket: "MAILROOM_BODIES".into(),
            inline_max: None,
            lease_time: Duration::from_secs(300),
            max_leased: 20_000,
        }
    }
}

impl JetStreamOptions {
    /// The KV bucket of operator requests (`bounce.<queue id>`).
    pub fn admin_bucket(&self) -> String {
        format!("{}_ADMIN", self.stream)
    }

    /// The KV bucket that holds the bodies' reference counts.
    pub fn refs_bucket(&self) -> String {
        format!("{}_REFS", self.body_bucket)
    }

    /// Checks the options without contacting a server.
    pub fn validate(&self) -> Result<(), JetStreamError> {
        let config =
            |option: &'static str, reason: String| JetStreamError::Config { option, reason };
        if self.urls.is_empty() {
            return Err(config("urls", "at least one NATS URL is required".into()));
        }
        for url in &self.urls {
            url.parse::<ServerAddr>()
                .map_err(|e| config("urls", format!("{url:?}: {e}")))?;
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !name_ok(&self.stream) {
            return Err(config(
                "stream",
                format!("{:?}: use letters, digits, '_' and '-'", self.stream),
            ));
        }
        if !name_ok(&self.body_bucket) {
            return Err(config(
                "body_bucket",
                format!("{:?}: use letters, digits, '_' and '-'", self.body_bucket),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(config(
                "replicas",
                format!("{} (use 1 or 3; JetStream allows at most 5)", self.replicas),
            ));
        }
        if self.max_age.is_zero() {
            return Err(config("max_age", "must be positive".into()));
        }
        if self.duplicate_window.is_zero() || self.duplicate_window > self.max_age {
            return Err(config(
                "duplicate_window",
                format!(
                    "{:?} must be positive and at most max_age ({:?})",
                    self.duplicate_window, self.max_age
                ),
            ));
        }
        if self.publish_timeout.is_zero() {
            return Err(config("publish_timeout", "must be positive".into()));
        }
        if self.lease_time < Duration::from_millis(100) {
            return Err(config(
                "lease_time",
                format!("{:?} is too short (at least 100ms)", self.lease_time),
            ));
        }
        if self.max_leased < 1 {
            return Err(config("max_leased", "must be positive".into()));
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(config(
                    "tls",
                    "a client certificate needs both cert_file and key_file".into(),
                ));
            }
            for path in [&tls.ca_file, &tls.cert_file, &tls.key_file]
                .into_iter()
                .flatten()
            {
                std::fs::metadata(path)
                    .map_err(|e| config("tls", format!("{}: {e}", path.display())))?;
            }
        }
        if let NatsAuth::CredentialsFile(path) = &self.auth {
            std::fs::metadata(path)
                .map_err(|e| config("auth", format!("{}: {e}", path.display())))?;
        }
        Ok(())
    }
}

/// The subject filter of every due entry of a delivery policy in `stream`
/// (`<stream in lowercase>.q.<policy>.>`), e.g. for NATS permissions.
pub fn policy_subject_filter(stream: &str, policy: &str) -> String {
    entry::Subjects::for_stream(stream).policy_filter(policy)
}

/// The subject of the entries of `policy` for `domain` in `stream`
/// (`<stream in lowercase>.q.<policy>.<domain>`).
pub fn entry_subject(stream: &str, policy: &str, domain: &str) -> String {
    entry::Subjects::for_stream(stream).subject(policy, domain)
}

/// State shared with the connection's event callback.
#[derive(Default)]
struct Shared {
    /// Stream and buckets set up on the current connection.
    ready: AtomicBool,
    /// Wakes the supervisor (after a (re)connection, or when the stream went missing).
    wake: Notify,
}

/// The stream and buckets, once set up.
#[derive(Clone)]
struct Resources {
    stream: jetstream::stream::Stream,
    bodies: Bodies,
    /// Operator requests (`bounce.<queue id>` = reason).
    admin: jetstream::kv::Store,
}

struct Inner {
    options: JetStreamOptions,
    /// The subjects of `options.stream`.
    subjects: entry::Subjects,
    client: Client,
    js: jetstream::Context,
    shared: Arc<Shared>,
    resources: RwLock<Option<Resources>>,
    setup_lock: tokio::sync::Mutex<()>,
    /// The workers' pull consumers, by policy.
    consumers: tokio::sync::Mutex<HashMap<String, worker::Consumer>>,
    /// Bounce requests by queue id, mirrored from the admin bucket by a watcher.
    bounces: Arc<RwLock<HashMap<QueueId, String>>>,
    /// The admin bucket watcher, once started.
    watcher: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The JetStream queue. Cheap to share behind an `Arc`; dropping it stops its supervisor task
/// (the NATS connection closes when the last clone of its client is gone).
pub struct JetStreamQueue {
    inner: Arc<Inner>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for JetStreamQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamQueue")
            .field("stream", &self.inner.options.stream)
            .field("state", &self.inner.client.connection_state())
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Drop for JetStreamQueue {
    fn drop(&mut self) {
        self.supervisor.abort();
        if let Some(watcher) = self
            .inner
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            watcher.abort();
        }
    }
}

impl JetStreamQueue {
    /// Connects to NATS and sets up the stream and buckets.
    ///
    /// Invalid options, an unreadable credentials file, or a server that rejects the stream
    /// configuration (e.g. an existing stream with other retention) are errors
    /// ([`QueueError::Config`]). A server that cannot be reached is not: after waiting up to
    /// `publish_timeout` this returns a queue that is not ready yet and connects in the
    /// background.
    pub async fn connect(options: JetStreamOptions) -> Result<Self, QueueError> {
        options.validate()?;
        let shared = Arc::new(Shared::default());
        let connect_options = connect_options(&options, Arc::clone(&shared)).await?;
        let client = connect_options
            .connect(options.urls.clone())
            .await
            .map_err(|e| JetStreamError::Config {
                option: "urls",
                reason: e.to_string(),
            })?;
        let js = ContextBuilder::new()
            .timeout(options.publish_timeout)
            .build(client.clone());
        let inner = Arc::new(Inner {
            subjects: entry::Subjects::for_stream(&options.stream),
            options,
            client,
            js,
            shared: Arc::clone(&shared),
            resources: RwLock::new(None),
            setup_lock: tokio::sync::Mutex::new(()),
            consumers: tokio::sync::Mutex::new(HashMap::new()),
            bounces: Arc::new(RwLock::new(HashMap::new())),
            watcher: std::sync::Mutex::new(None),
        });
        let supervisor = tokio::spawn(supervise(Arc::downgrade(&inner), shared));
        let queue = JetStreamQueue { inner, supervisor };

        let deadline = Instant::now() + queue.inner.options.publish_timeout;
        while queue.inner.client.connection_state() != State::Connected && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if queue.inner.client.connection_state() != State::Connected {
            tracing::warn!(
                urls = ?queue.inner.options.urls,
                "NATS not reachable yet; the jetstream queue starts not ready and keeps connecting"
            );
            return Ok(queue);
        }
        match queue.inner.setup().await {
            Ok(()) => {}
            Err(Setup::Fatal(e)) => return Err(e.into()),
            Err(Setup::Transient(e)) => {
                tracing::warn!(error = %e, "jetstream setup failed; retrying in the background");
            }
        }
        Ok(queue)
    }

    /// The stream name.
    pub fn stream_name(&self) -> &str {
        &self.inner.options.stream
    }

    /// The JetStream context of this queue's connection (for other state kept next to the
    /// queue, such as the outbound workers' traffic shaping).
    pub fn context(&self) -> &jetstream::Context {
        &self.inner.js
    }

    /// The options this queue was opened with.
    pub fn options(&self) -> &JetStreamOptions {
        &self.inner.options
    }
}

/// Builds the async-nats connect options: auth, TLS, reconnect policy, event callback.
async fn connect_options(
    options: &JetStreamOptions,
    shared: Arc<Shared>,
) -> Result<ConnectOptions, JetStreamError> {
    let mut connect = match &options.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::Token(token) => ConnectOptions::with_token(token.clone()),
        NatsAuth::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        NatsAuth::CredentialsFile(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| JetStreamError::Config {
                option: "auth",
                reason: format!("credentials file {}: {e}", path.display()),
            })?,
        NatsAuth::NkeySeed(seed) => ConnectOptions::with_nkey(seed.clone()),
    };
    if let Some(tls) = &options.tls {
        connect = connect.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            connect = connect.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let callback_shared = shared;
    Ok(connect
        .name("mailroom")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(options.publish_timeout.min(Duration::from_secs(5)))
        .request_timeout(Some(options.publish_timeout))
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(|attempts| Duration::from_millis(100 * attempts.min(10) as u64))
        .event_callback(move |event| {
            let shared = Arc::clone(&callback_shared);
            async move {
                match event {
                    Event::Connected => {
                        tracing::info!("connected to NATS");
                        shared.wake.notify_one();
                    }
                    Event::Disconnected => {
                        tracing::warn!("disconnected from NATS");
                        shared.ready.store(false, Ordering::SeqCst);
                    }
                    Event::Closed => {
                        shared.ready.store(false, Ordering::SeqCst);
                    }
                    other => tracing::info!(event = %other, "NATS connection event"),
                }
            }
        }))
}

/// Re-runs the stream setup after every (re)connection until it succeeds.
async fn supervise(inner: Weak<Inner>, shared: Arc<Shared>) {
    loop {
        shared.wake.notified().await;
        loop {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            if inner.client.connection_state() != State::Connected {
                break;
            }
            match inner.setup().await {
                Ok(()) => break,
                Err(Setup::Fatal(e) | Setup::Transient(e)) => {
                    tracing::warn!(error = %e, "jetstream setup failed; retrying");
                }
            }
            drop(inner);
            tokio::time::sleep(SETUP_RETRY).await;
        }
    }
}

/// A setup failure: `Fatal` when the server rejected the configuration.
enum Setup {
    Fatal(JetStreamError),
    Transient(JetStreamError),
}

/// One entry ready to publish.
struct Outgoing {
    subject: String,
    msg_id: String,
    headers: HeaderMap,
    payload: Bytes,
    /// A `duplicate` PubAck must point at an entry that still exists (enqueue: else the id
    /// was used before). Not for deferrals: a duplicate there is our own earlier attempt.
    verify_duplicate: bool,
}

impl Inner {
    /// Creates or updates the stream and the body buckets (idempotent); marks the queue ready.
    async fn setup(&self) -> Result<(), Setup> {
        let _guard = self.setup_lock.lock().await;
        if self.shared.ready.load(Ordering::SeqCst) && self.current().is_some() {
            return Ok(());
        }
        let o = &self.options;
        let storage = match o.storage {
            Storage::File => jetstream::stream::StorageType::File,
            Storage::Memory => jetstream::stream::StorageType::Memory,
        };
        let stream_err = |op: &'static str, source: BoxError| JetStreamError::Stream {
            op,
            stream: o.stream.clone(),
            source,
        };
        let config = jetstream::stream::Config {
            name: o.stream.clone(),
            description: Some(
                "Mailroom queue: one entry per message and destination domain".into(),
            ),
            subjects: self.subjects.stream_subjects(),
            // Deferred entries wait as scheduled messages (ADR-51, nats-server 2.12+).
            allow_message_schedules: true,
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage,
            num_replicas: o.replicas,
            max_age: o.max_age,
            duplicate_window: o.duplicate_window,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::Old,
            ..Default::default()
        };
        if let Err(e) = self.js.create_or_update_stream(config).await {
            use jetstream::context::CreateStreamErrorKind as K;
            let fatal = matches!(
                e.kind(),
                K::JetStream(_)
                    | K::JetStreamUnavailable
                    | K::InvalidStreamName
                    | K::EmptyStreamName
            );
            let err = stream_err("create or update", boxed(e));
            return Err(if fatal {
                Setup::Fatal(err)
            } else {
                Setup::Transient(err)
            });
        }
        let stream = self
            .js
            .get_stream(&o.stream)
            .await
            .map_err(|e| Setup::Transient(stream_err("get", boxed(e))))?;

        let objects_config = jetstream::object_store::Config {
            bucket: o.body_bucket.clone(),
            description: Some("Mailroom message bodies too large to inline".into()),
            max_age: o.max_age,
            storage,
            num_replicas: o.replicas,
            ..Default::default()
        };
        let object_err = |op: &'static str, source: BoxError| JetStreamError::Object {
            op,
            bucket: o.body_bucket.clone(),
            name: String::new(),
            source,
        };
        let objects = match self.js.create_object_store(objects_config).await {
            Ok(store) => store,
            // Exists with another configuration (e.g. created by an older version): use it.
            Err(create) => self
                .js
                .get_object_store(&o.body_bucket)
                .await
                .map_err(|e| {
                    Setup::Transient(object_err(
                        "create bucket",
                        msg(format!("create: {create}; open: {e}")),
                    ))
                })?,
        };
        let refs_bucket = o.refs_bucket();
        let refs = self
            .kv_bucket(
                &refs_bucket,
                "Mailroom body reference counts (entries left per queue id)",
            )
            .await?;
        let admin = self
            .kv_bucket(
                &o.admin_bucket(),
                "Mailroom operator requests (bounce.<queue id>)",
            )
            .await?;
        let resources = Resources {
            stream,
            admin,
            bodies: Bodies {
                objects,
                bucket: o.body_bucket.clone(),
                refs,
                refs_bucket,
            },
        };
        match self.resources.write() {
            Ok(mut slot) => *slot = Some(resources),
            Err(poisoned) => *poisoned.into_inner() = Some(resources),
        }
        self.shared.ready.store(true, Ordering::SeqCst);
        tracing::info!(stream = %o.stream, "jetstream queue ready");
        Ok(())
    }

    /// Creates or updates a KV bucket with the stream's storage, replicas and max age.
    async fn kv_bucket(
        &self,
        bucket: &str,
        description: &str,
    ) -> Result<jetstream::kv::Store, Setup> {
        let o = &self.options;
        self.js
            .create_or_update_key_value(jetstream::kv::Config {
                bucket: bucket.to_string(),
                description: description.to_string(),
                history: 1,
                max_age: o.max_age,
                storage: match o.storage {
                    Storage::File => jetstream::stream::StorageType::File,
                    Storage::Memory => jetstream::stream::StorageType::Memory,
                },
                num_replicas: o.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Setup::Transient(JetStreamError::Kv {
                    op: "create bucket",
                    bucket: bucket.to_string(),
                    key: String::new(),
                    source: boxed(e),
                })
            })
    }

    /// The stream's entry count per subject, parsed (due or deferred).
    async fn subject_counts(
        &self,
        resources: &Resources,
        filter: &str,
    ) -> Result<Vec<(entry::Place, u64)>, JetStreamError> {
        let stream_err = |source: BoxError| JetStreamError::Stream {
            op: "info with subjects",
            stream: self.options.stream.clone(),
            source,
        };
        let subjects = resources
            .stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| stream_err(boxed(e)))?;
        let mut subjects = std::pin::pin!(subjects);
        let mut out = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, count) = item.map_err(|e| stream_err(boxed(e)))?;
            match self.subjects.parse_place(&subject) {
                Some(place) => out.push((place, count as u64)),
                None => tracing::warn!(%subject, "unexpected subject in the queue stream"),
            }
        }
        Ok(out)
    }

    /// The resources of the last successful setup.
    fn current(&self) -> Option<Resources> {
        match self.resources.read() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The resources, setting them up first if this connection has not yet. Fails fast when
    /// not connected.
    async fn ready(&self) -> Result<Resources, JetStreamError> {
        let state = self.client.connection_state();
        if state != State::Connected {
            return Err(JetStreamError::NotConnected {
                state: format!("{state:?}").to_lowercase(),
            });
        }
        if !self.shared.ready.load(Ordering::SeqCst) {
            match self.setup().await {
                Ok(()) => {}
                Err(Setup::Fatal(e) | Setup::Transient(e)) => return Err(e),
            }
        }
        self.current().ok_or_else(|| JetStreamError::NotReady {
            stream: self.options.stream.clone(),
        })
    }

    /// Largest body that is stored inline.
    fn inline_limit(&self) -> usize {
        let fits = self.client.max_payload().saturating_sub(INLINE_HEADROOM);
        self.options.inline_max.map_or(fits, |max| max.min(fits))
    }

    async fn enqueue(&self, message: StoredMessage) -> Result<(), JetStreamError> {
        let resources = self.ready().await?;
        let id = message.envelope.id;
        let name = id.to_string();
        let plan = entry::plan(&self.subjects, &message.envelope);
        let parts = plan.len();
        let body_size = message.body.len() as u64;
        let max_payload = self.client.max_payload();

        let encode = |p: &PlannedEntry, body: BodyRef| -> Result<Vec<u8>, JetStreamError> {
            let meta = EntryMeta {
                format: entry::FORMAT,
                parts,
                rcpt_index: p.rcpt_index.clone(),
                body_size,
                body,
                envelope: p.envelope.clone(),
                state: DeliveryState::default(),
            };
            serde_json::to_vec(&meta).map_err(|e| JetStreamError::Publish {
                stream: self.options.stream.clone(),
                subject: p.subject.clone(),
                msg_id: p.msg_id.clone(),
                source: boxed(e),
            })
        };
        let mut metas = plan
            .iter()
            .map(|p| encode(p, BodyRef::Inline))
            .collect::<Result<Vec<_>, _>>()?;
        let inline = message.body.len() <= self.inline_limit()
            && metas
                .iter()
                .all(|m| m.len() + message.body.len() + HEADER_ALLOWANCE <= max_payload);
        let object = if inline {
            None
        } else {
            let reference = BodyRef::Object {
                bucket: self.options.body_bucket.clone(),
                name: name.clone(),
            };
            metas = plan
                .iter()
                .map(|p| encode(p, reference.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            if let Some((p, m)) = plan
                .iter()
                .zip(&metas)
                .find(|(_, m)| m.len() + HEADER_ALLOWANCE > max_payload)
            {
                return Err(JetStreamError::Publish {
                    stream: self.options.stream.clone(),
                    subject: p.subject.clone(),
                    msg_id: p.msg_id.clone(),
                    source: msg(format!(
                        "envelope metadata for domain {:?} has {} octets, more than the \
                         server's max_payload {max_payload} allows",
                        p.domain,
                        m.len()
                    )),
                });
            }
            let chunk = max_payload
                .saturating_sub(HEADER_ALLOWANCE)
                .clamp(1024, MAX_CHUNK);
            if let Err(e) = resources
                .bodies
                .put(&name, &message.body, parts, chunk)
                .await
            {
                let _ =
                    tokio::time::timeout(ROLLBACK_TIMEOUT, resources.bodies.discard(&name)).await;
                return Err(e);
            }
            Some(name.clone())
        };

        let outgoing: Vec<Outgoing> = plan
            .iter()
            .zip(metas)
            .map(|(p, meta)| {
                let mut headers = HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, p.msg_id.as_str());
                headers.insert(
                    async_nats::header::NATS_EXPECTED_STREAM,
                    self.options.stream.as_str(),
                );
                headers.insert(entry::HEADER_ID, name.as_str());
                headers.insert(entry::HEADER_META_SIZE, meta.len().to_string());
                let payload = entry::encode_payload(&meta, inline.then_some(&message.body));
                Outgoing {
                    subject: p.subject.clone(),
                    msg_id: p.msg_id.clone(),
                    headers,
                    payload,
                    verify_duplicate: true,
                }
            })
            .collect();

        let deadline = Instant::now() + self.options.publish_timeout;
        let results = futures_util::future::join_all(
            outgoing
                .iter()
                .map(|o| self.publish_entry(&resources, o, id, deadline)),
        )
        .await;
        let mut published = Vec::new();
        let mut duplicate = false;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(ack) if ack.duplicate => duplicate = true,
                Ok(ack) => published.push(ack.sequence),
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(e);
                    }
                }
            }
        }
        let Some(error) = first_error else {
            return Ok(());
        };
        // Roll back what this call stored; never the body of an earlier enqueue of the same id.
        for seq in published {
            match tokio::time::timeout(ROLLBACK_TIMEOUT, resources.stream.delete_message(seq)).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%id, seq, error = %e, "rollback: deleting entry failed")
                }
                Err(_) => tracing::warn!(%id, seq, "rollback: deleting entry timed out"),
            }
        }
        if let (Some(name), false) = (&object, duplicate) {
            match tokio::time::timeout(ROLLBACK_TIMEOUT, resources.bodies.discard(name)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(%id, error = %e, "rollback: deleting body failed"),
                Err(_) => tracing::warn!(%id, "rollback: deleting body timed out"),
            }
        }
        Err(error)
    }

    /// Publishes one entry and awaits its PubAck, retrying until `deadline`.
    async fn publish_entry(
        &self,
        resources: &Resources,
        outgoing: &Outgoing,
        id: QueueId,
        deadline: Instant,
    ) -> Result<jetstream::publish::PublishAck, JetStreamError> {
        use jetstream::context::PublishErrorKind as K;
        let publish_err = |source: BoxError| JetStreamError::Publish {
            stream: self.options.stream.clone(),
            subject: outgoing.subject.clone(),
            msg_id: outgoing.msg_id.clone(),
            source,
        };
        loop {
            let attempt = async {
                let future = self
                    .js
                    .send_publish(
                        outgoing.subject.clone(),
                        PublishMessage::build()
                            .payload(outgoing.payload.clone())
                            .headers(outgoing.headers.clone()),
                    )
                    .await?;
                future.await
            };
            let error = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(ack)) => {
                    if ack.duplicate && outgoing.verify_duplicate {
                        self.check_duplicate(resources, outgoing, id, ack.sequence)
                            .await
                            .map_err(publish_err)?;
                    }
                    return Ok(ack);
                }
                Ok(Err(e)) => {
                    match e.kind() {
                        K::MaxPayloadExceeded | K::WrongLastMessageId | K::WrongLastSequence => {
                            return Err(publish_err(boxed(e)));
                        }
                        K::StreamNotFound => {
                            // The stream is gone (server wiped?) or not reachable: set it up again.
                            self.shared.ready.store(false, Ordering::SeqCst);
                            self.shared.wake.notify_one();
                        }
                        _ => {}
                    }
                    e
                }
                Err(_) => {
                    return Err(JetStreamError::Timeout {
                        op: format!(
                            "publish {} to {} (stream {})",
                            outgoing.msg_id, outgoing.subject, self.options.stream
                        ),
                        after: self.options.publish_timeout,
                    });
                }
            };
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(publish_err(boxed(error)));
            }
            tracing::debug!(msg_id = %outgoing.msg_id, error = %error, "publish failed; retrying");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// A PubAck said "duplicate": the entry it names must still be there, else the id was used
    /// before and its entries are gone (rolled back or delivered).
    async fn check_duplicate(
        &self,
        resources: &Resources,
        outgoing: &Outgoing,
        id: QueueId,
        seq: u64,
    ) -> Result<(), BoxError> {
        use jetstream::stream::DirectGetErrorKind as K;
        match resources.stream.direct_get(seq).await {
            Ok(found)
                if found.subject.as_str() == outgoing.subject
                    && found.headers.get(entry::HEADER_ID).map(|v| v.as_str())
                        == Some(id.to_string().as_str()) =>
            {
                Ok(())
            }
            Ok(_) => Err(msg(format!(
                "duplicate of sequence {seq}, which holds another message"
            ))),
            Err(e) if e.kind() == K::NotFound => Err(msg(format!(
                "queue id {id} was published within the duplicate window and its entry (sequence \
                 {seq}) is gone; enqueue the message under a new id"
            ))),
            Err(e) => Err(boxed(e)),
        }
    }

    /// The last stream sequence now (scans stop there).
    async fn last_seq(&self, resources: &Resources) -> Result<u64, JetStreamError> {
        resources
            .stream
            .get_info()
            .await
            .map(|info| info.state.last_sequence)
            .map_err(|e| JetStreamError::Stream {
                op: "info",
                stream: self.options.stream.clone(),
                source: boxed(e),
            })
    }

    /// Every entry of `id` (metadata; with bodies if `with_body`).
    async fn entries_of(
        &self,
        resources: &Resources,
        id: QueueId,
        with_body: bool,
        strict: bool,
    ) -> Result<Vec<scan::Scanned>, JetStreamError> {
        let last = self.last_seq(resources).await?;
        let start = scan::Start::Time(id.timestamp_ms().saturating_sub(CLOCK_SKEW_MS));
        scan::scan(
            &self.client,
            &self.options.stream,
            last,
            start,
            self.options.publish_timeout,
            |entry_id| (entry_id == id).then_some(with_body),
            strict,
        )
        .await
    }

    /// Every entry's metadata, grouped by queue id.
    async fn all_messages(
        &self,
        resources: &Resources,
    ) -> Result<BTreeMap<QueueId, Vec<EntryMeta>>, JetStreamError> {
        let last = self.last_seq(resources).await?;
        let entries = scan::scan(
            &self.client,
            &self.options.stream,
            last,
            scan::Start::First,
            self.options.publish_timeout,
            |_| Some(false),
            false,
        )
        .await?;
        let mut messages: BTreeMap<QueueId, Vec<EntryMeta>> = BTreeMap::new();
        for e in entries {
            messages.entry(e.id).or_default().push(e.meta);
        }
        Ok(messages)
    }

    async fn get(&self, id: QueueId) -> Result<Option<StoredMessage>, JetStreamError> {
        let resources = self.ready().await?;
        let entries = self.entries_of(&resources, id, true, true).await?;
        let Some(envelope) = entry::merge_envelopes(entries.iter().map(|e| &e.meta)) else {
            return Ok(None);
        };
        let body = match entries.iter().find(|e| e.meta.body == BodyRef::Inline) {
            Some(inline) => inline.body.clone(),
            None => {
                let Some(first) = entries.first() else {
                    return Ok(None);
                };
                match &first.meta.body {
                    BodyRef::Object { name, .. } => {
                        resources.bodies.get(name, first.meta.body_size).await?
                    }
                    BodyRef::Inline => first.body.clone(),
                }
            }
        };
        Ok(Some(StoredMessage { envelope, body }))
    }

    async fn list(&self, limit: usize) -> Result<Vec<EntrySummary>, JetStreamError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let resources = self.ready().await?;
        let messages = self.all_messages(&resources).await?;
        let mut summaries: Vec<EntrySummary> = messages
            .values()
            .filter_map(|metas| {
                let size = metas.first()?.body_size;
                let envelope = entry::merge_envelopes(metas)?;
                Some(EntrySummary::of(&envelope, size))
            })
            .collect();
        summaries.sort_by_key(|s| (s.received_at_ms, s.id));
        summaries.truncate(limit);
        Ok(summaries)
    }

    async fn stats(&self) -> Result<QueueStats, JetStreamError> {
        let resources = self.ready().await?;
        let messages = self.all_messages(&resources).await?;
        let mut stats = QueueStats::default();
        for metas in messages.values() {
            let Some(first) = metas.first() else {
                continue;
            };
            stats.messages += 1;
            stats.bytes += first.body_size;
            let received = first.envelope.received_at_ms;
            stats.oldest_received_at_ms = Some(
                stats
                    .oldest_received_at_ms
                    .map_or(received, |oldest| oldest.min(received)),
            );
        }
        stats.by_domain = self.entries_by_domain(&resources).await?;
        Ok(stats)
    }

    /// Entries per destination domain (summed over policies) from the stream's per-subject
    /// counts: one entry per message and domain, so this is "messages with a recipient there".
    async fn entries_by_domain(
        &self,
        resources: &Resources,
    ) -> Result<BTreeMap<String, u64>, JetStreamError> {
        let mut by_domain: BTreeMap<String, u64> = BTreeMap::new();
        for (place, count) in self.subject_counts(resources, ">").await? {
            let (entry::Place::Due { domain, .. } | entry::Place::Deferred { domain, .. }) = place;
            *by_domain.entry(domain).or_default() += count;
        }
        by_domain.retain(|_, n| *n > 0);
        Ok(by_domain)
    }

    async fn delete(&self, id: QueueId) -> Result<bool, JetStreamError> {
        let resources = self.ready().await?;
        let entries = self.entries_of(&resources, id, false, false).await?;
        let mut deleted = 0usize;
        let mut objects: HashMap<String, usize> = HashMap::new();
        for e in &entries {
            match resources.stream.delete_message(e.seq).await {
                Ok(true) => {
                    tracing::debug!(%id, seq = e.seq, subject = %e.subject, "deleted queue entry");
                    deleted += 1;
                    if let BodyRef::Object { name, .. } = &e.meta.body {
                        *objects.entry(name.clone()).or_default() += 1;
                    }
                }
                Ok(false) => {}
                Err(err) => {
                    use jetstream::stream::DeleteMessageErrorKind as K;
                    // Gone meanwhile (a worker acked it, a concurrent delete): not ours to count.
                    if let K::JetStream(js) = err.kind() {
                        // 10057 (stream msg delete failed) wraps any failure: only "no
                        // message found" means it is gone.
                        if js.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
                            || (js.error_code() == jetstream::ErrorCode(10057)
                                && js.to_string().contains("no message found"))
                        {
                            continue;
                        }
                    }
                    return Err(JetStreamError::Stream {
                        op: "delete message",
                        stream: self.options.stream.clone(),
                        source: boxed(err),
                    });
                }
            }
        }
        for (name, count) in objects {
            resources.bodies.release(&name, count).await?;
        }
        Ok(deleted > 0)
    }
}

#[async_trait::async_trait]
impl Queue for JetStreamQueue {
    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<Lease>, QueueError> {
        Ok(self.inner.lease(request).await?)
    }

    async fn extend(&self, lease: &Lease) -> Result<(), QueueError> {
        Ok(self.inner.extend(lease).await?)
    }

    async fn ack(&self, lease: Lease) -> Result<(), QueueError> {
        Ok(self.inner.ack(lease).await?)
    }

    async fn defer(&self, lease: Lease, retry: Retry) -> Result<(), QueueError> {
        Ok(self.inner.defer(lease, retry).await?)
    }

    async fn postpone(&self, lease: Lease, at_ms: u64) -> Result<(), QueueError> {
        Ok(self.inner.postpone(lease, at_ms).await?)
    }

    async fn entries(&self, id: QueueId) -> Result<Vec<EntryStatus>, QueueError> {
        Ok(self.inner.entry_statuses(id).await?)
    }

    async fn retry_now(&self, id: QueueId) -> Result<usize, QueueError> {
        Ok(self.inner.retry_now(id, None).await?)
    }

    async fn request_bounce(&self, id: QueueId, reason: &str) -> Result<usize, QueueError> {
        Ok(self.inner.request_bounce(id, reason).await?)
    }

    async fn backlogs(&self) -> Result<Backlogs, QueueError> {
        Ok(self.inner.backlogs().await?)
    }

    async fn oldest_queued(
        &self,
        policy: &str,
        domains: &[String],
    ) -> Result<BTreeMap<String, u64>, QueueError> {
        Ok(self.inner.oldest_queued(policy, domains).await?)
    }

    async fn enqueue(&self, message: StoredMessage) -> Result<(), QueueError> {
        let id = message.envelope.id;
        self.inner.enqueue(message).await.map_err(|e| {
            tracing::warn!(%id, error = %e, "jetstream enqueue failed");
            QueueError::Unavailable(e.to_string())
        })
    }

    async fn get(&self, id: QueueId) -> Result<Option<StoredMessage>, QueueError> {
        Ok(self.inner.get(id).await?)
    }

    async fn list(&self, limit: usize) -> Result<Vec<EntrySummary>, QueueError> {
        Ok(self.inner.list(limit).await?)
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        Ok(self.inner.stats().await?)
    }

    async fn delete(&self, id: QueueId) -> Result<bool, QueueError> {
        Ok(self.inner.delete(id).await?)
    }

    fn is_ready(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
            && self.inner.shared.ready.load(Ordering::SeqCst)
    }

    fn backend(&self) -> &'static str {
        "jetstream"
    }
}
