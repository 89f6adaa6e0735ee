//! The Mailroom queue: the [`Queue`] trait, the queued-message model ([`Envelope`],
//! [`StoredMessage`]) and the backends.
//!
//! A mail system's first duty is to lose nothing. The SMTP server answers
//! `250 2.0.0 Ok: queued as <ULID>` only after [`Queue::enqueue`] has returned `Ok`, and every
//! backend promises that by then the message is on stable storage. An `Err` promises nothing
//! (the server answers `451 4.3.0`); a message may then still show up once (a duplicate is
//! acceptable, a loss is not).
//!
//! Backends:
//! - [`local`]: the embedded on-disk spool of `mailroom serve` (one file per message, write to
//!   `tmp/`, fdatasync, rename into `queue/`, one group-committed directory fsync per batch).
//! - [`jetstream`]: NATS JetStream, the shared queue of the cluster (one work-queue stream, one
//!   entry per destination domain, large bodies in an Object Store bucket).
//!
//! # Delivery side
//!
//! Workers [`Queue::lease`] domain entries (one message's recipients at one destination
//! domain; see [`Lease`] for the whole contract), [`Queue::extend`] the lease while a delivery
//! runs, and end it with [`Queue::ack`] (final outcome) or [`Queue::defer`] (transient failure:
//! pending recipients, attempt count, last response and retry time are stored; the retry time
//! is clamped to the policy's maximum age, and an entry past it is leased with
//! [`Lease::expired`] set so the worker bounces it). A lease not ended in time is handed out
//! again. Operators use [`Queue::retry_now`], [`Queue::request_bounce`], [`Queue::entries`] and
//! [`Queue::backlogs`] (ready / deferred / leased per policy: the autoscaler scales on
//! `ready`).
//!
//! - `local`: delivery state in `queue/<id>.state` next to the immutable message file, written
//!   through the same group commit; leases in memory (a restart hands everything out again).
//! - `jetstream`: one durable pull consumer per policy; deferred entries wait as scheduled
//!   messages outside the consumers' subjects (see [`jetstream`]).
//!
//! One contract test-suite, `contract` (feature `testing`), runs against both backends.
//!
//! The envelope is stored as JSON, so new optional fields (attempts, next attempt, per-recipient
//! state) can be added without rewriting spooled messages.

mod error;
mod id;
pub mod jetstream;
mod lease;
pub mod local;
mod model;

#[cfg(feature = "testing")]
pub mod contract;

pub use error::QueueError;
pub use id::{ParseQueueIdError, QueueId};
pub use lease::{
    Backlog, Backlogs, DeliveryState, EntryKey, EntryStatus, Lease, LeaseRequest, Retry, now_ms,
};
pub use model::{EntrySummary, Envelope, QueueStats, Recipient, StoredMessage};

/// A durable message queue. Implementations are shared between all SMTP sessions and workers
/// (`Arc<dyn Queue>`), so every method takes `&self`.
#[async_trait::async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Stores envelope + body durably. Returns only after both are on stable storage (fsync'd) and the
    /// entry is visible to list/get. On Err nothing was promised (the caller replies 451 4.3.0).
    async fn enqueue(&self, message: StoredMessage) -> Result<(), QueueError>;

    /// Returns the stored message with this id, or `None` if the queue does not hold it.
    async fn get(&self, id: QueueId) -> Result<Option<StoredMessage>, QueueError>;

    /// Summaries of at most `limit` entries, oldest (by [`Envelope::received_at_ms`], then id) first.
    async fn list(&self, limit: usize) -> Result<Vec<EntrySummary>, QueueError>;

    /// Totals over the whole queue.
    async fn stats(&self) -> Result<QueueStats, QueueError>;

    /// Removes the entry durably. Returns `false` if the queue did not hold it.
    async fn delete(&self, id: QueueId) -> Result<bool, QueueError>;

    /// Hands out up to `request.max` domain entries of `request.policy` that are due now and
    /// not leased, waiting up to `request.wait` when there are none. See [`Lease`].
    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<Lease>, QueueError>;

    /// Restarts the lease time of a lease whose delivery is still running.
    async fn extend(&self, lease: &Lease) -> Result<(), QueueError>;

    /// Ends a lease with a final outcome: the entry is removed durably (and the message with its
    /// last entry).
    async fn ack(&self, lease: Lease) -> Result<(), QueueError>;

    /// Ends a lease with a transient failure: the entry keeps `retry.recipients`, counts the
    /// attempt and becomes leasable again at `retry.at_ms` (at the latest at the lease's
    /// expiry). Durable when it returns.
    async fn defer(&self, lease: Lease, retry: Retry) -> Result<(), QueueError>;

    /// Ends a lease without an attempt, for a limit of ours rather than a failure (traffic
    /// shaping): the entry is leasable again at `at_ms`; attempts and last response stay as
    /// they were. Cheap, and not necessarily durable: after a restart the entry may be due at
    /// once.
    async fn postpone(&self, lease: Lease, at_ms: u64) -> Result<(), QueueError>;

    /// The delivery status of each entry of a message (empty if the queue does not hold it).
    async fn entries(&self, id: QueueId) -> Result<Vec<EntryStatus>, QueueError>;

    /// Makes the message's deferred entries due now (`mailroom queue retry`). Returns how many
    /// entries it changed.
    async fn retry_now(&self, id: QueueId) -> Result<usize, QueueError>;

    /// Marks every entry of the message for bounce with `reason` and makes it due now
    /// (`mailroom queue bounce`): the worker that leases it returns it to the sender. Returns
    /// how many entries it changed.
    async fn request_bounce(&self, id: QueueId, reason: &str) -> Result<usize, QueueError>;

    /// The backlog of every policy with queued entries.
    async fn backlogs(&self) -> Result<Backlogs, QueueError>;

    /// When the oldest queued entry (due, leased or deferred) of each of `domains` under
    /// `policy` was accepted, in Unix milliseconds: how long its mail has waited. Domains with
    /// nothing queued are left out. For JetStream this costs one request per domain, so callers
    /// ask only for the destinations they show.
    async fn oldest_queued(
        &self,
        policy: &str,
        domains: &[String],
    ) -> Result<std::collections::BTreeMap<String, u64>, QueueError>;

    /// True while the backend can accept messages (for /readyz).
    fn is_ready(&self) -> bool;

    /// The backend's name as used in config and metrics: `"local"`.
    fn backend(&self) -> &'static str;
}
