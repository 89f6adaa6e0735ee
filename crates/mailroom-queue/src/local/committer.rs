//! The group committer: one thread that turns every batch of pending enqueues and deletes into
//! durable spool changes with as few syncs as possible, then updates the index and completes
//! every waiter.
//!
//! Per batch: write each new message to `tmp/`; make the data durable (one `syncfs`, or one
//! `fdatasync` per file from a few threads: [`SyncMode`]); rename the files into `queue/`; unlink
//! deleted entries; fsync `queue/` once. While a batch is being synced the next one forms in the
//! channel; an idle queue commits a single message at once (no timer). Doing the file work here,
//! rather than on the blocking pool per message, saves two thread hand-offs per message.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::format::Encoded;
use super::{Shared, SyncMode, rename_noreplace};
use crate::{EntrySummary, Envelope, QueueError, QueueId};

/// Threads that issue fdatasyncs concurrently in [`SyncMode::File`].
const SYNC_THREADS: usize = 8;

/// A change waiting for the next commit.
pub(crate) enum Op {
    /// Store a new message.
    Insert {
        /// Its id (file name).
        id: QueueId,
        /// Its summary for the index.
        summary: EntrySummary,
        /// Header, envelope and trailer.
        encoded: Encoded,
        /// The message body.
        body: Bytes,
        /// Its envelope, for the delivery state.
        envelope: Box<Envelope>,
        /// Completed after the commit.
        reply: oneshot::Sender<Result<(), QueueError>>,
    },
    /// Replace a message's state file (`queue/<id>.state`).
    State {
        /// The message.
        id: QueueId,
        /// The encoded state.
        data: Vec<u8>,
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

/// A new message or state file on its way through the batch.
struct Pending {
    /// The new message's summary and envelope; `None` for a state file (which replaces the
    /// previous one instead of refusing to).
    insert: Option<(EntrySummary, Box<Envelope>)>,
    id: QueueId,
    file: Option<File>,
    tmp: PathBuf,
    dst: PathBuf,
    reply: oneshot::Sender<Result<(), QueueError>>,
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
fn copy_io_error(e: &QueueError) -> io::Error {
    match e {
        QueueError::Io { source, .. } => match source.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(source.kind(), source.to_string()),
        },
        other => io::Error::other(other.to_string()),
    }
}

/// Fails a pending message: its tmp file is removed, the waiter told.
fn fail(p: Pending, e: QueueError) {
    drop(p.file);
    let _ = std::fs::remove_file(&p.tmp);
    let _ = p.reply.send(Err(e));
}

/// Commits one batch, leaving `batch` empty.
fn commit(shared: &Shared, batch: &mut Vec<Op>) {
    shared.batches.fetch_add(1, Ordering::Relaxed);
    if let Err(reason) = shared.check_poisoned() {
        for op in batch.drain(..) {
            match op {
                Op::Insert { reply, .. } => {
                    let _ = reply.send(Err(QueueError::Unavailable(reason.clone())));
                }
                Op::Delete { reply, .. } => {
                    let _ = reply.send(Err(QueueError::Unavailable(reason.clone())));
                }
                Op::State { reply, .. } => {
                    let _ = reply.send(Err(QueueError::Unavailable(reason.clone())));
                }
            }
        }
        return;
    }

    // 1. Write the new messages to tmp/.
    let mut pending = Vec::new();
    let mut deletes = Vec::new();
    for op in batch.drain(..) {
        match op {
            Op::Insert {
                id,
                summary,
                encoded,
                body,
                envelope,
                reply,
            } => match shared.write_tmp(
                &format!("{id}.msg"),
                id,
                [&encoded.head, &body, &encoded.trailer],
            ) {
                Ok((file, tmp)) => {
                    let dst = shared.entry_path(id);
                    pending.push(Pending {
                        insert: Some((summary, envelope)),
                        id,
                        file: Some(file),
                        tmp,
                        dst,
                        reply,
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Op::State { id, data, reply } => {
                let n = shared.state_writes.fetch_add(1, Ordering::Relaxed);
                match shared.write_tmp(&format!("{id}.{n}.state"), id, [&data, &[], &[]]) {
                    Ok((file, tmp)) => pending.push(Pending {
                        insert: None,
                        id,
                        file: Some(file),
                        tmp,
                        dst: shared.state_path(id),
                        reply,
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Op::Delete { id, reply } => deletes.push((id, reply)),
        }
    }

    // 2. Make their data durable.
    if !pending.is_empty() {
        match shared.sync_mode {
            SyncMode::Filesystem => {
                if let Err(e) = shared.sync_filesystem() {
                    poison(shared, &e);
                    let failed = std::mem::take(&mut pending);
                    for p in failed {
                        fail(p, QueueError::io("syncfs", &shared.root, copy_io_error(&e)));
                    }
                }
            }
            SyncMode::File => pending = sync_files(shared, pending),
        }
    }

    // 3. Rename them into queue/.
    let mut renamed = Vec::with_capacity(pending.len());
    for mut p in pending {
        drop(p.file.take());
        let renamed_ok = if p.insert.is_some() {
            rename_noreplace(&p.tmp, &p.dst)
        } else {
            std::fs::rename(&p.tmp, &p.dst)
        };
        match renamed_ok {
            Ok(()) => renamed.push(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let id = p.id;
                fail(p, QueueError::Duplicate(id));
            }
            Err(e) => {
                let err = QueueError::io("rename into queue", &p.tmp, e);
                fail(p, err);
            }
        }
    }

    // 4. Unlink deleted entries.
    let mut unlinked = Vec::with_capacity(deletes.len());
    for (id, reply) in deletes {
        let path = shared.entry_path(id);
        let outcome = match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(QueueError::io("unlink", path, e)),
        };
        // The state file goes after the message (an orphan state file is removed at open).
        let state = shared.state_path(id);
        if let Err(e) = std::fs::remove_file(&state)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %state.display(), error = %e, "could not remove state file");
        }
        unlinked.push((id, outcome, reply));
    }

    // 5. One directory fsync for every rename and unlink of the batch.
    let changed = !renamed.is_empty() || unlinked.iter().any(|(_, o, _)| matches!(o, Ok(true)));
    let synced = if changed {
        shared.sync_queue_dir()
    } else {
        Ok(())
    };
    match synced {
        Ok(()) => {
            let mut inserts = Vec::with_capacity(renamed.len());
            let mut removals = Vec::with_capacity(unlinked.len());
            {
                let mut index = shared.index();
                let mut sched = shared.sched();
                for p in renamed {
                    if let Some((summary, envelope)) = p.insert {
                        index.insert(summary);
                        sched.insert(&envelope, None);
                    }
                    inserts.push(p.reply);
                }
                for (id, outcome, reply) in unlinked {
                    if outcome.is_ok() {
                        index.remove(id);
                        sched.remove(id);
                    }
                    removals.push((reply, outcome));
                }
            }
            shared.notify.notify_waiters();
            // Replies go out after the index lock is released. A waiter that went away
            // (cancelled enqueue) does not undo the commit.
            for reply in inserts {
                let _ = reply.send(Ok(()));
            }
            for (reply, outcome) in removals {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            // After a failed fsync the kernel's view of the directory cannot be trusted: fail the
            // batch, take the renamed files out again (best effort: a file that survives a crash
            // is delivered twice, never lost), and stop accepting messages.
            poison(shared, &e);
            let dir = shared.queue_dir.clone();
            let mut index = shared.index();
            for p in renamed {
                let _ = std::fs::remove_file(&p.dst);
                let _ = p.reply.send(Err(QueueError::io(
                    "fsync directory",
                    &dir,
                    copy_io_error(&e),
                )));
            }
            for (id, outcome, reply) in unlinked {
                if matches!(outcome, Ok(true)) {
                    index.remove(id);
                }
                let _ = reply.send(Err(QueueError::io(
                    "fsync directory",
                    &dir,
                    copy_io_error(&e),
                )));
            }
        }
    }
}

/// Stops the queue after a failed sync.
fn poison(shared: &Shared, e: &QueueError) {
    tracing::error!(error = %e, "queue sync failed; the local queue stops accepting messages");
    shared.poison(format!("{e}"));
}

/// fdatasyncs every pending file, from up to [`SYNC_THREADS`] threads; returns the ones that
/// succeeded and fails the others.
fn sync_files(shared: &Shared, pending: Vec<Pending>) -> Vec<Pending> {
    let chunk = pending.len().div_ceil(SYNC_THREADS).max(1);
    let results: Vec<io::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = pending
            .chunks(chunk)
            .map(|files| {
                scope.spawn(move || {
                    files
                        .iter()
                        .map(|p| p.file.as_ref().map_or(Ok(()), File::sync_data))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![Err(io::Error::other("sync thread panicked"))])
            })
            .collect()
    });
    shared
        .file_syncs
        .fetch_add(pending.len() as u64, Ordering::Relaxed);
    let mut ok = Vec::with_capacity(pending.len());
    let mut results = results.into_iter();
    for p in pending {
        match results
            .next()
            .unwrap_or_else(|| Err(io::Error::other("sync result missing")))
        {
            Ok(()) => ok.push(p),
            Err(e) => {
                let err = QueueError::io("fdatasync", &p.tmp, e);
                fail(p, err);
            }
        }
    }
    ok
}
