//! [`JetStreamError`]: what went wrong talking to NATS, naming the operation and the stream,
//! subject, bucket or key involved. It converts into [`QueueError`] (mostly
//! [`QueueError::Unavailable`], which the SMTP server answers with `451 4.3.0`).

use std::path::PathBuf;
use std::time::Duration;

use crate::QueueError;

/// A boxed error from async-nats (each of its operations has its own error type).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a JetStream operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JetStreamError {
    /// An option is invalid; nothing was tried.
    #[error("jetstream: invalid option {option}: {reason}")]
    Config {
        /// The option (`urls`, `stream`, `auth`, ...).
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The client is not connected to any NATS server right now.
    #[error("jetstream: not connected to NATS ({state})")]
    NotConnected {
        /// The connection state as async-nats reports it.
        state: String,
    },
    /// Connected, but the stream and buckets are not (yet, or no longer) set up.
    #[error("jetstream: stream {stream} is not set up (yet)")]
    NotReady {
        /// The stream name.
        stream: String,
    },
    /// A stream-level operation (create, info, direct get, delete message) failed.
    #[error("jetstream: {op} on stream {stream}: {source}")]
    Stream {
        /// The operation.
        op: &'static str,
        /// The stream.
        stream: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// Publishing an entry (or awaiting its PubAck) failed.
    #[error("jetstream: publish {msg_id} to {subject} (stream {stream}): {source}")]
    Publish {
        /// The stream.
        stream: String,
        /// The entry subject.
        subject: String,
        /// The entry's `Nats-Msg-Id`.
        msg_id: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// An Object Store operation on a body failed.
    #[error("jetstream: {op} object {name} in bucket {bucket}: {source}")]
    Object {
        /// The operation (`put`, `get`, `delete`, `create bucket`).
        op: &'static str,
        /// The bucket.
        bucket: String,
        /// The object name (the queue id).
        name: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// A reference-count (KV) operation failed.
    #[error("jetstream: {op} key {key} in bucket {bucket}: {source}")]
    Kv {
        /// The operation.
        op: &'static str,
        /// The KV bucket.
        bucket: String,
        /// The key (the queue id).
        key: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// An entry in the stream does not have the expected format.
    #[error("jetstream: corrupt entry {seq} ({subject}) in stream {stream}: {reason}")]
    Corrupt {
        /// The stream.
        stream: String,
        /// The entry's stream sequence.
        seq: u64,
        /// The entry's subject.
        subject: String,
        /// What check failed.
        reason: String,
    },
    /// A worker consumer operation failed (create, fetch, ack).
    #[error("jetstream: {op} (consumer {consumer}, stream {stream}): {source}")]
    Consumer {
        /// The operation.
        op: &'static str,
        /// The consumer name.
        consumer: String,
        /// The stream.
        stream: String,
        /// The client error.
        #[source]
        source: BoxError,
    },
    /// The caller passed something the queue cannot do.
    #[error("jetstream: {0}")]
    Invalid(String),
    /// An operation did not complete in time.
    #[error("jetstream: {op} timed out after {after:?}")]
    Timeout {
        /// The operation, with the stream/subject it was applied to.
        op: String,
        /// The time limit.
        after: Duration,
    },
}

impl From<JetStreamError> for QueueError {
    fn from(error: JetStreamError) -> Self {
        match error {
            JetStreamError::Config { .. } => QueueError::Config(error.to_string()),
            JetStreamError::Corrupt {
                stream,
                seq,
                subject,
                reason,
            } => QueueError::Corrupt {
                path: PathBuf::from(format!("nats:{stream}/{seq}")),
                reason: format!("{subject}: {reason}"),
            },
            JetStreamError::Invalid(reason) => QueueError::Invalid(reason),
            other => QueueError::Unavailable(other.to_string()),
        }
    }
}

/// Boxes any client error.
pub(crate) fn boxed(error: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(error)
}

/// A plain message as a [`BoxError`].
pub(crate) fn msg(message: impl Into<String>) -> BoxError {
    message.into().into()
}
