//! The error type of every queue operation.

use std::path::PathBuf;

use crate::QueueId;

/// Why a queue operation failed. Messages name the operation and the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// A file-system call failed.
    #[error("queue: {op} {}: {source}", path.display())]
    Io {
        /// The operation, e.g. `"fdatasync"`, `"rename"`, `"fsync directory"`.
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A stored entry failed its format, length or checksum checks.
    #[error("queue: corrupt entry {}: {reason}", path.display())]
    Corrupt {
        /// The offending file (after quarantine, its new place in `corrupt/`).
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// The backend's options are invalid (bad URL, unreadable credentials file, incompatible
    /// existing stream, ...): retrying will not help until the configuration is fixed.
    #[error("queue: invalid configuration: {0}")]
    Config(String),
    /// The backend cannot serve the request now (shutting down, earlier fsync failure, ...).
    #[error("queue unavailable: {0}")]
    Unavailable(String),
    /// The spool is used by another process (its lock file is held).
    #[error("queue: spool {} is locked by another process", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// The queue was opened read-only and the operation would modify it.
    #[error("queue: opened read-only, cannot {0}")]
    ReadOnly(&'static str),
    /// An entry with this id already exists.
    #[error("queue: message {0} is already queued")]
    Duplicate(QueueId),
    /// The lease ended already: it expired and the entry was handed out again, or it was
    /// acked or deferred before. The entry is (or will be) handled through its newer lease.
    #[error("queue: lease of {0} is no longer held")]
    LeaseLost(String),
    /// The caller passed something the queue cannot do (e.g. a retry with no recipients).
    #[error("queue: {0}")]
    Invalid(String),
    /// The envelope could not be encoded.
    #[error("queue: encoding envelope of {id}: {source}")]
    Encode {
        /// The message id.
        id: QueueId,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

impl QueueError {
    /// Shorthand for [`QueueError::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        QueueError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
