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
//! # Design note: what comes next
//!
//! This first cut covers reception (enqueue, inspect, delete). The delivery side follows the
//! JetStream semantics in DESIGN.md and will extend the trait without changing what is here:
//!
//! - **lease / ack / defer / redelivery**: a worker calls `lease(policy, max, lease_for)` and gets
//!   messages nobody else holds; it ends each lease with `ack(id)` (final outcome: delivered or
//!   bounced, the entry is removed; [`Queue::delete`] is the current form of that), or
//!   `defer(id, until, updated_envelope)` (transient failure: the envelope, with the
//!   recipients still pending and the attempt count, is rewritten and becomes leasable again at
//!   `until`). A lease not ended before it expires (crashed worker) is redelivered. In the
//!   local backend leases live in memory only (a restart redelivers everything, which is the
//!   at-least-once contract), `defer` rewrites the file through the same write/fsync/rename
//!   pipeline and group commit as `enqueue`, and a due-time index sits next to the age index.
//! - **expiry**: the policy's maximum queue lifetime is checked by the worker against
//!   [`Envelope::received_at_ms`]; an expired message is bounced and acked.
//! - **jetstream backend** (reception side done, see [`jetstream`]): one stream with work-queue
//!   retention, one entry per message and destination domain on `mailroom.q.<policy>.<domain>`,
//!   `<queue id>.<domain>` as `Nats-Msg-Id`. Consequence for the trait: the unit a worker leases,
//!   acks and defers is one *domain entry* (queue id + domain), not the whole message; the local
//!   backend can lease whole messages and present them per domain.
//! - **one contract**: `contract` (feature `testing`) holds the backend-independent test-suite,
//!   generic over a `contract::Backend` factory; `tests/contract.rs` runs it for `local`,
//!   `tests/jetstream_contract.rs` for `jetstream` (real nats-servers from `mailroom-testkit`).
//!   The lease/ack/defer checks join it with the trait methods.
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

    /// True while the backend can accept messages (for /readyz).
    fn is_ready(&self) -> bool;

    /// The backend's name as used in config and metrics: `"local"`.
    fn backend(&self) -> &'static str;
}
