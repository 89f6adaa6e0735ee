//! The group committer: one thread that makes renames and unlinks in `queue/` durable with one
//! directory fsync per batch, then updates the index and completes every waiter.
//!
//! Writers (one `spawn_blocking` task per enqueue) write their tmp file, fdatasync it and rename
//! it into `queue/` in parallel, then hand an [`Op::Insert`] to this thread. The thread takes
//! whatever is pending (up to `max_batch`), fsyncs the directory once, and answers them all.
//! While that fsync runs, the next batch forms in the channel; an idle queue commits a single
//! message at once (no timer).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};

use super::Shared;
use crate::{EntrySummary, QueueError, QueueId};

/// A change waiting for the next directory fsync.
pub(crate) enum Op {
    /// A message file was renamed into `queue/`; index it once the directory is synced.
    Insert {
        /// Its summary for the index.
        summary: EntrySummary,
        /// Its path in `queue/` (removed again if the commit fails).
        path: PathBuf,
        /// Completed after the commit.
        reply: oneshot::Sender<Result<(), QueueError>>,
    },
    /// Unlink a message file and drop it from the index.
    Delete {
        /// The message.
        id: QueueId,
        /// Completed after the commit: whether the file existed.
        reply: oneshot::Sender<Result<bool, QueueError>>,
    },
}

/// What happened to one op before the directory fsync.
enum Outcome {
    Insert {
        summary: EntrySummary,
        path: PathBuf,
        reply: oneshot::Sender<Result<(), QueueError>>,
    },
    Delete {
        id: QueueId,
        unlinked: Result<bool, QueueError>,
        reply: oneshot::Sender<Result<bool, QueueError>>,
    },
}

/// The committer thread's loop; returns when every sender is gone.
pub(crate) fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Op>, max_batch: usize) {
    let max_batch = max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch.min(1024));
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit(&shared, &mut batch);
    }
    tracing::debug!(path = %shared.root.display(), "queue committer stopped");
}

/// A copy of an I/O error (they are not `Clone`) for each waiter of a failed batch.
fn copy_io_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Commits one batch, leaving `batch` empty.
fn commit(shared: &Shared, batch: &mut Vec<Op>) {
    shared.batches.fetch_add(1, Ordering::Relaxed);
    if let Err(reason) = shared.check_poisoned() {
        for op in batch.drain(..) {
            match op {
                Op::Insert { path, reply, .. } => {
                    let _ = std::fs::remove_file(&path);
                    let _ = reply.send(Err(QueueError::Unavailable(reason.clone())));
                }
                Op::Delete { reply, .. } => {
                    let _ = reply.send(Err(QueueError::Unavailable(reason.clone())));
                }
            }
        }
        return;
    }

    let mut changed = false;
    let outcomes: Vec<Outcome> = batch
        .drain(..)
        .map(|op| match op {
            Op::Insert {
                summary,
                path,
                reply,
            } => {
                changed = true;
                Outcome::Insert {
                    summary,
                    path,
                    reply,
                }
            }
            Op::Delete { id, reply } => {
                let path = shared.entry_path(id);
                let unlinked = match std::fs::remove_file(&path) {
                    Ok(()) => {
                        changed = true;
                        Ok(true)
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(QueueError::io("unlink", path, e)),
                };
                Outcome::Delete {
                    id,
                    unlinked,
                    reply,
                }
            }
        })
        .collect();

    let synced = if changed {
        shared.sync_queue_dir()
    } else {
        Ok(())
    };

    match synced {
        Ok(()) => {
            let mut replies = Vec::with_capacity(outcomes.len());
            {
                let mut index = shared.index();
                for outcome in outcomes {
                    match outcome {
                        Outcome::Insert { summary, reply, .. } => {
                            index.insert(summary);
                            replies.push(Reply::Insert(reply, Ok(())));
                        }
                        Outcome::Delete {
                            id,
                            unlinked,
                            reply,
                        } => {
                            if unlinked.is_ok() {
                                index.remove(id);
                            }
                            replies.push(Reply::Delete(reply, unlinked));
                        }
                    }
                }
            }
            for reply in replies {
                reply.send();
            }
        }
        Err(e) => {
            // After a failed fsync the kernel's view of the directory cannot be trusted: fail the
            // batch, take the renamed files out again (best effort: a file that survives a crash
            // is delivered twice, never lost), and stop accepting messages.
            let dir = shared.queue_dir.clone();
            let source = match &e {
                QueueError::Io { source, .. } => copy_io_error(source),
                other => io::Error::other(other.to_string()),
            };
            tracing::error!(error = %e, "queue directory fsync failed; the local queue stops accepting messages");
            shared.poison(format!("fsync of {} failed: {source}", dir.display()));
            let mut index = shared.index();
            for outcome in outcomes {
                let err = QueueError::io("fsync directory", &dir, copy_io_error(&source));
                match outcome {
                    Outcome::Insert { path, reply, .. } => {
                        let _ = std::fs::remove_file(&path);
                        let _ = reply.send(Err(err));
                    }
                    Outcome::Delete {
                        id,
                        reply,
                        unlinked,
                        ..
                    } => {
                        if matches!(unlinked, Ok(true)) {
                            index.remove(id);
                        }
                        let _ = reply.send(Err(err));
                    }
                }
            }
        }
    }
}

/// A reply to send once the index lock is released.
enum Reply {
    Insert(
        oneshot::Sender<Result<(), QueueError>>,
        Result<(), QueueError>,
    ),
    Delete(
        oneshot::Sender<Result<bool, QueueError>>,
        Result<bool, QueueError>,
    ),
}

impl Reply {
    fn send(self) {
        // A waiter that went away (cancelled enqueue) does not undo the commit.
        match self {
            Reply::Insert(tx, result) => {
                let _ = tx.send(result);
            }
            Reply::Delete(tx, result) => {
                let _ = tx.send(result);
            }
        }
    }
}
