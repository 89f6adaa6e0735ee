//! The worker side of the queue: leases of domain entries, their delivery state, and the
//! backlogs an autoscaler reads.
//!
//! The unit a worker handles is one **domain entry**: the recipients of one message at one
//! destination domain ([`EntryKey`]). A worker [`Queue::lease`](crate::Queue::lease)s up to `max`
//! entries that are due now and that nobody else holds, and ends every lease with exactly one of
//!
//! - [`Queue::ack`](crate::Queue::ack): a final outcome (delivered, bounced, expired). The entry
//!   is removed; the message is removed with its last entry.
//! - [`Queue::defer`](crate::Queue::defer): a transient failure. The entry keeps only the
//!   recipients still pending, counts the attempt, remembers the response, and is not leasable
//!   again before [`Retry::at_ms`] (clamped to the entry's expiry, so an entry that will never
//!   make it comes back in time to be bounced).
//!
//! A lease lasts the backend's lease time from the moment it was handed out;
//! [`Queue::extend`](crate::Queue::extend) restarts that time while a delivery runs. A lease that
//! is neither ended nor extended in time (the worker died) is handed out again, with
//! [`Lease::deliveries`] one higher: delivery is at-least-once.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{QueueId, Recipient, StoredMessage};

/// One domain entry: a message's recipients at one destination domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    /// The message.
    pub id: QueueId,
    /// The destination domain (lowercase, as in [`Recipient::domain`]).
    pub domain: String,
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.id, self.domain)
    }
}

/// What the queue remembers of an entry's delivery attempts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct DeliveryState {
    /// Attempts that ended in [`Queue::defer`](crate::Queue::defer).
    #[serde(default)]
    pub attempts: u32,
    /// When the last attempt ended, Unix milliseconds.
    #[serde(default)]
    pub last_attempt_ms: Option<u64>,
    /// The last transient response (e.g. `451 4.7.1 try later`, `connection refused`).
    #[serde(default)]
    pub last_response: Option<String>,
    /// Not leasable before this time, Unix milliseconds (0: due at once).
    #[serde(default)]
    pub next_attempt_ms: u64,
    /// An operator asked for this entry to be bounced (`mailroom queue bounce`): the worker
    /// returns it to the sender with this reason instead of delivering it.
    #[serde(default)]
    pub bounce_requested: Option<String>,
}

/// What a worker asks [`Queue::lease`](crate::Queue::lease) for.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    /// The delivery policy whose entries to lease.
    pub policy: String,
    /// At most this many entries.
    pub max: usize,
    /// When nothing is due, wait up to this long for an entry to become due.
    pub wait: Duration,
    /// The policy's maximum queue lifetime: entries older than this (by reception time) are
    /// handed out with [`Lease::expired`] set, for the worker to bounce them.
    pub max_age: Option<Duration>,
}

impl LeaseRequest {
    /// A request for up to `max` entries of `policy`, waiting up to `wait`, without expiry.
    pub fn new(policy: impl Into<String>, max: usize, wait: Duration) -> Self {
        LeaseRequest {
            policy: policy.into(),
            max,
            wait,
            max_age: None,
        }
    }

    /// Sets the policy's maximum queue lifetime.
    #[must_use]
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = Some(max_age);
        self
    }
}

/// A leased domain entry. End it with exactly one of `ack` or `defer`.
pub struct Lease {
    /// Which entry.
    pub key: EntryKey,
    /// The message with only this entry's pending recipients in its envelope, and its body.
    pub message: StoredMessage,
    /// The entry's delivery history.
    pub state: DeliveryState,
    /// How many times this entry has been handed out, this lease included (more than
    /// `state.attempts + 1` means an earlier worker died or lost its lease).
    pub deliveries: u64,
    /// Reception time plus the request's `max_age`, Unix milliseconds.
    pub expires_at_ms: Option<u64>,
    /// True when the entry was already past `expires_at_ms` when leased.
    pub expired: bool,
    /// The backend's handle on the lease.
    pub(crate) token: Box<dyn Any + Send + Sync>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("recipients", &self.message.envelope.recipients.len())
            .field("state", &self.state)
            .field("deliveries", &self.deliveries)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("expired", &self.expired)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The backend token, if it is of type `T`.
    pub(crate) fn token<T: 'static>(&self) -> Option<&T> {
        self.token.downcast_ref()
    }
}

/// A transient failure: when to try again and what is left to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Not before this time, Unix milliseconds (clamped to the lease's `expires_at_ms`).
    pub at_ms: u64,
    /// The recipients still pending (a subset of the leased envelope's recipients; the others
    /// had a final outcome in this attempt). Must not be empty: ack an entry with none left.
    pub recipients: Vec<Recipient>,
    /// The response of this attempt, kept as [`DeliveryState::last_response`].
    pub response: String,
}

/// The backlog of one delivery policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Entries due now and not leased: what more workers would deliver sooner. The autoscaler
    /// scales on this.
    pub ready: u64,
    /// Entries waiting for a retry time in the future.
    pub deferred: u64,
    /// Entries leased to a worker right now, as far as the backend can tell (0 when it cannot).
    pub leased: u64,
    /// Entries due now (ready or leased) by destination domain: how many deliveries could run
    /// at once if nothing else limited them. The autoscaler caps workers with it. (Not in the
    /// serialized form, which `mailroom queue stats` prints: it has `by_domain` already.)
    #[serde(skip)]
    pub due_by_domain: BTreeMap<String, u64>,
    /// Entries waiting for a retry, by destination domain.
    #[serde(skip)]
    pub deferred_by_domain: BTreeMap<String, u64>,
}

/// The delivery status of one entry of a message, for `mailroom queue show`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EntryStatus {
    /// The entry.
    pub key: EntryKey,
    /// Its pending recipients' addresses.
    pub recipients: Vec<String>,
    /// Its delivery history.
    pub state: DeliveryState,
}

/// Backlogs by policy name.
pub type Backlogs = BTreeMap<String, Backlog>;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
