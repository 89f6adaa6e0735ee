//! The `local` backend: an embedded on-disk spool for `mailroom serve`.
//!
//! Layout under the spool path:
//!
//! ```text
//! lock            held (flock) by the one writer process
//! tmp/            messages being written; leftovers are deleted at open
//! queue/<ULID>.msg  committed messages (format: see below)
//! corrupt/        files that failed their checks at open, kept for inspection
//! ```
//!
//! # Durability
//!
//! `enqueue` hands the encoded message to the group committer, a dedicated thread. For every
//! batch of pending enqueues (whatever arrived while the previous batch was being synced; no
//! timer) it writes each `tmp/<ULID>.msg`, makes the data durable, renames the files into
//! `queue/` (refusing to replace an existing entry), fsyncs the `queue/` directory once, and only
//! then indexes the entries and answers the waiters. A file in `queue/` is therefore always
//! complete. How the data is made durable is [`SyncMode`]:
//!
//! - `Filesystem` (default): one `syncfs(2)` per batch flushes every file of the batch (and the
//!   journal) at once. Measured here it costs a fraction of per-file fdatasync, but it also
//!   flushes other dirty data of the same file system: give the spool its own volume.
//! - `File`: one `fdatasync(2)` per file, issued from several threads so the journal can commit
//!   them together. For a spool that shares its file system with busy writers.
//!
//! After a failed fsync the queue stops accepting messages ([`Queue::is_ready`] turns false):
//! after such an error the page cache can no longer be trusted, and a restart re-reads the spool.
//!
//! # Index
//!
//! `open` reads every entry's header and envelope (checking length and envelope checksum) into
//! an in-memory index that serves `list` and `stats`; `get` reads the file and checks the body
//! checksum too. Corrupt files are moved to `corrupt/`.

mod committer;
mod format;
mod index;
mod sched;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::{
    Backlogs, EntryKey, EntryStatus, EntrySummary, Lease, LeaseRequest, Queue, QueueError, QueueId,
    QueueStats, Retry, StoredMessage, now_ms,
};
use committer::Op;
use index::Index;
use sched::{LeaseError, Persist, Sched, StateFile, Token};

/// How a batch's message data is made durable before the files are renamed into `queue/`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// One `syncfs(2)` of the spool's file system per batch.
    #[default]
    Filesystem,
    /// One `fdatasync(2)` per message file.
    File,
}

/// Options of the local backend.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Group commit cap: at most this many messages share one sync. Default 256.
    pub max_batch: usize,
    /// How message data is synced. Default [`SyncMode::Filesystem`].
    pub sync: SyncMode,
    /// How long a lease lasts without [`Queue::extend`]. Default 5 minutes.
    pub lease_time: Duration,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            max_batch: 256,
            sync: SyncMode::Filesystem,
            lease_time: Duration::from_secs(300),
        }
    }
}

/// Counts of the synchronous disk flushes done so far (for benchmarks and metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Messages committed by `enqueue`.
    pub enqueued: u64,
    /// fdatasync calls on message files ([`SyncMode::File`]).
    pub file_syncs: u64,
    /// syncfs calls ([`SyncMode::Filesystem`], one per batch with new messages).
    pub fs_syncs: u64,
    /// fsync calls on the `queue/` directory (one per group commit).
    pub dir_syncs: u64,
    /// Group commits (batches), including those that needed no fsync.
    pub batches: u64,
}

/// What the spool open found.
#[derive(Default)]
struct OpenReport {
    tmp_removed: usize,
    quarantined: usize,
}

/// State shared by the queue handle, the writers and the committer thread.
struct Shared {
    root: PathBuf,
    tmp_dir: PathBuf,
    queue_dir: PathBuf,
    corrupt_dir: PathBuf,
    /// Open handle of `queue/` for the directory fsync and syncfs (writer only).
    queue_dir_handle: Option<File>,
    sync_mode: SyncMode,
    read_only: bool,
    index: Mutex<Index>,
    /// Delivery state: pending recipients, due times, leases.
    sched: Mutex<Sched>,
    /// Woken when entries may have become leasable (commit, defer, retry).
    notify: Notify,
    lease_time: Duration,
    /// Numbers the tmp files of state writes.
    state_writes: AtomicU64,
    poisoned: AtomicBool,
    poison_reason: Mutex<String>,
    enqueued: AtomicU64,
    file_syncs: AtomicU64,
    fs_syncs: AtomicU64,
    dir_syncs: AtomicU64,
    batches: AtomicU64,
}

impl Shared {
    fn new(root: PathBuf, read_only: bool) -> Self {
        Shared {
            tmp_dir: root.join("tmp"),
            queue_dir: root.join("queue"),
            corrupt_dir: root.join("corrupt"),
            root,
            queue_dir_handle: None,
            sync_mode: SyncMode::default(),
            read_only,
            index: Mutex::new(Index::default()),
            sched: Mutex::new(Sched::default()),
            notify: Notify::new(),
            lease_time: LocalOptions::default().lease_time,
            state_writes: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(String::new()),
            enqueued: AtomicU64::new(0),
            file_syncs: AtomicU64::new(0),
            fs_syncs: AtomicU64::new(0),
            dir_syncs: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        }
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sched(&self) -> MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry_path(&self, id: QueueId) -> PathBuf {
        self.queue_dir.join(format!("{id}.msg"))
    }

    fn state_path(&self, id: QueueId) -> PathBuf {
        self.queue_dir.join(format!("{id}.state"))
    }

    fn poison(&self, reason: String) {
        *self.poison_reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.poisoned.store(true, Ordering::SeqCst);
    }

    /// `Err(reason)` once an fsync failed.
    fn check_poisoned(&self) -> Result<(), String> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(self
                .poison_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone())
        } else {
            Ok(())
        }
    }

    /// fsyncs `queue/` (one per group commit).
    fn sync_queue_dir(&self) -> Result<(), QueueError> {
        let Some(handle) = &self.queue_dir_handle else {
            return Err(QueueError::ReadOnly("sync"));
        };
        self.dir_syncs.fetch_add(1, Ordering::Relaxed);
        handle
            .sync_all()
            .map_err(|e| QueueError::io("fsync directory", &self.queue_dir, e))
    }

    /// Creates `tmp/<name>` and writes the parts into it (not yet synced). On error the
    /// tmp file is removed again. `id` is the message the file belongs to.
    fn write_tmp(
        &self,
        name: &str,
        id: QueueId,
        parts: [&[u8]; 3],
    ) -> Result<(File, PathBuf), QueueError> {
        let tmp = self.tmp_dir.join(name);
        let mut file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| {
                // A concurrent enqueue of the same id owns this tmp file: not ours to remove.
                if e.kind() == io::ErrorKind::AlreadyExists {
                    QueueError::Duplicate(id)
                } else {
                    QueueError::io("create", &tmp, e)
                }
            })?;
        let written = write_all_vectored(&mut file, parts);
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(&tmp);
            return Err(QueueError::io("write", &tmp, e));
        }
        Ok((file, tmp))
    }

    /// `syncfs(2)` of the spool's file system: every written file and directory entry is
    /// durable afterwards.
    fn sync_filesystem(&self) -> Result<(), QueueError> {
        let Some(handle) = &self.queue_dir_handle else {
            return Err(QueueError::ReadOnly("sync"));
        };
        self.fs_syncs.fetch_add(1, Ordering::Relaxed);
        rustix::fs::syncfs(handle).map_err(|e| QueueError::io("syncfs", &self.root, e.into()))
    }

    /// Moves a corrupt file to `corrupt/`, never replacing an earlier one; returns its new path.
    fn quarantine(&self, path: &Path) -> PathBuf {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unnamed".into());
        let mut target = self.corrupt_dir.join(&name);
        let mut result = rename_noreplace(path, &target);
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::AlreadyExists) {
            target = self.corrupt_dir.join(format!("{name}.{}", QueueId::new()));
            result = rename_noreplace(path, &target);
        }
        match result {
            Ok(()) => target,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "could not move corrupt queue file to corrupt/");
                path.to_path_buf()
            }
        }
    }

    /// Reads every entry of `queue/` into the index. In writer mode corrupt files are
    /// quarantined, in read-only mode skipped.
    fn scan(&self, report: &mut OpenReport) -> Result<(), QueueError> {
        let entries = std::fs::read_dir(&self.queue_dir)
            .map_err(|e| QueueError::io("read directory", &self.queue_dir, e))?;
        let mut index = Index::default();
        let mut envelopes = Vec::new();
        let mut states = std::collections::HashMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| QueueError::io("read directory", &self.queue_dir, e))?;
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                tracing::warn!(path = %path.display(), "unexpected directory in queue/, ignored");
                continue;
            }
            if let Some(id) = state_file_id(&path) {
                states.insert(id, path);
                continue;
            }
            let named_like_entry = path.extension().is_some_and(|ext| ext == "msg")
                && path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .is_some_and(|s| s.parse::<QueueId>().is_ok());
            let result = if named_like_entry {
                format::read_envelope(&path)
            } else {
                Err(QueueError::Corrupt {
                    path: path.clone(),
                    reason: "file name is not <ULID>.msg".into(),
                })
            };
            match result {
                Ok((envelope, body_len)) => {
                    index.insert(EntrySummary::of(&envelope, body_len));
                    envelopes.push(envelope);
                }
                Err(QueueError::Io { source, .. })
                    if self.read_only && source.kind() == io::ErrorKind::NotFound =>
                {
                    // Deleted by the running server since we listed the directory.
                }
                Err(QueueError::Corrupt { path, reason }) => {
                    if self.read_only {
                        tracing::warn!(path = %path.display(), %reason, "corrupt queue file skipped");
                    } else {
                        let moved = self.quarantine(&path);
                        report.quarantined += 1;
                        tracing::error!(path = %path.display(), moved_to = %moved.display(), %reason, "corrupt queue file quarantined");
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let mut sched = Sched::default();
        for envelope in envelopes {
            let state = states
                .remove(&envelope.id)
                .and_then(|path| self.read_state(&path));
            let has_state = state.is_some();
            sched.insert(&envelope, state);
            if has_state && let Some(pending) = sched.pending(envelope.id) {
                // What `list` and `stats` show follows the pending recipients.
                index.set_recipients(envelope.id, &pending);
            }
        }
        if !self.read_only {
            for path in states.into_values() {
                // The message was deleted and the crash came before its state file went.
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove orphan state file");
                }
            }
        }
        *self.index() = index;
        *self.sched() = sched;
        Ok(())
    }

    /// Reads a state file; a bad one is logged (and quarantined in writer mode) and ignored,
    /// which hands every recipient of the message out again: a duplicate, never a loss.
    fn read_state(&self, path: &Path) -> Option<StateFile> {
        let parsed = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|data| StateFile::parse(&data));
        match parsed {
            Ok(state) => Some(state),
            Err(reason) => {
                if self.read_only {
                    tracing::warn!(path = %path.display(), %reason, "unreadable state file skipped");
                } else {
                    let moved = self.quarantine(path);
                    tracing::error!(path = %path.display(), moved_to = %moved.display(), %reason, "unreadable state file quarantined; all its recipients will be delivered again");
                }
                None
            }
        }
    }

    /// Deletes everything in `tmp/` (writes that never committed).
    fn clean_tmp(&self, report: &mut OpenReport) -> Result<(), QueueError> {
        let entries = std::fs::read_dir(&self.tmp_dir)
            .map_err(|e| QueueError::io("read directory", &self.tmp_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| QueueError::io("read directory", &self.tmp_dir, e))?;
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| QueueError::io("remove leftover", &path, e))?;
            report.tmp_removed += 1;
        }
        Ok(())
    }

    /// Reads and checks one entry completely. In writer mode a corrupt entry is quarantined
    /// and dropped from the index.
    fn read_entry(&self, id: QueueId) -> Result<Option<StoredMessage>, QueueError> {
        let path = self.entry_path(id);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(QueueError::io("read", &path, e)),
        };
        match format::decode(&path, Bytes::from(data)) {
            Ok(message) => Ok(Some(message)),
            Err(QueueError::Corrupt { path, reason }) if !self.read_only => {
                let moved = self.quarantine(&path);
                self.index().remove(id);
                tracing::error!(path = %path.display(), moved_to = %moved.display(), %reason, "corrupt queue file quarantined");
                Err(QueueError::Corrupt {
                    path: moved,
                    reason,
                })
            }
            Err(e) => Err(e),
        }
    }
}

/// The id of a `queue/<ULID>.state` file.
fn state_file_id(path: &Path) -> Option<QueueId> {
    if path.extension().is_some_and(|ext| ext == "state") {
        path.file_stem()?.to_str()?.parse().ok()
    } else {
        None
    }
}

/// Writes every part with as few `writev(2)` calls as the kernel allows (one, normally).
fn write_all_vectored(file: &mut File, parts: [&[u8]; 3]) -> io::Result<()> {
    let mut slices = parts.map(io::IoSlice::new);
    let mut slices: &mut [io::IoSlice<'_>] = &mut slices;
    io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to`.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            // File system without RENAME_NOREPLACE: check, then rename (racy only between two
            // writers of the same id, which the spool lock and unique ids rule out).
            if to.try_exists()? {
                Err(io::Error::from(io::ErrorKind::AlreadyExists))
            } else {
                std::fs::rename(from, to)
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// fsyncs a directory so that entries created in it survive a crash.
fn sync_dir(path: &Path) -> Result<(), QueueError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| QueueError::io("fsync directory", path, e))
}

fn create_dir(path: &Path) -> Result<(), QueueError> {
    std::fs::create_dir_all(path).map_err(|e| QueueError::io("create directory", path, e))
}

/// The local spool queue. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct LocalQueue {
    shared: Arc<Shared>,
    /// To the committer thread; `None` when read-only.
    tx: Option<mpsc::UnboundedSender<Op>>,
    /// The spool lock, held while this handle lives; `None` when read-only.
    _lock: Option<File>,
}

impl LocalQueue {
    /// Opens (creating if needed) the spool at `path`, deletes leftovers in tmp/, rebuilds the in-memory index
    /// by reading every entry's envelope; corrupt/partial files are moved to `corrupt/` and logged, never panics.
    ///
    /// Fails with [`QueueError::Locked`] if another handle (in this or another process) has the
    /// spool open for writing.
    pub async fn open(
        path: impl Into<PathBuf>,
        options: LocalOptions,
    ) -> Result<LocalQueue, QueueError> {
        let root = path.into();
        tokio::task::spawn_blocking(move || Self::open_blocking(root, options))
            .await
            .map_err(|e| QueueError::Unavailable(format!("opening the spool: task failed: {e}")))?
    }

    fn open_blocking(root: PathBuf, options: LocalOptions) -> Result<LocalQueue, QueueError> {
        let mut shared = Shared::new(root, false);
        for dir in [
            &shared.root,
            &shared.tmp_dir,
            &shared.queue_dir,
            &shared.corrupt_dir,
        ] {
            create_dir(dir)?;
        }
        let lock_path = shared.root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| QueueError::io("open lock file", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(QueueError::Locked { path: lock_path });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(QueueError::io("lock", &lock_path, e));
            }
        }
        // Make the directories themselves durable.
        sync_dir(&shared.root)?;

        let mut report = OpenReport::default();
        shared.clean_tmp(&mut report)?;
        shared.scan(&mut report)?;
        if report.quarantined > 0 {
            sync_dir(&shared.queue_dir)?;
            sync_dir(&shared.corrupt_dir)?;
        }
        shared.sync_mode = options.sync;
        shared.lease_time = options.lease_time;
        shared.queue_dir_handle = Some(
            File::open(&shared.queue_dir)
                .map_err(|e| QueueError::io("open directory", &shared.queue_dir, e))?,
        );

        let shared = Arc::new(shared);
        let (tx, rx) = mpsc::unbounded_channel();
        let committer_shared = Arc::clone(&shared);
        let max_batch = options.max_batch;
        std::thread::Builder::new()
            .name("mailroom-queue-commit".into())
            .spawn(move || committer::run(committer_shared, rx, max_batch))
            .map_err(|e| QueueError::io("spawn committer thread", &shared.root, e))?;

        let stats = shared.index().stats();
        tracing::info!(
            path = %shared.root.display(),
            messages = stats.messages,
            bytes = stats.bytes,
            tmp_removed = report.tmp_removed,
            quarantined = report.quarantined,
            "local queue opened"
        );
        Ok(LocalQueue {
            shared,
            tx: Some(tx),
            _lock: Some(lock),
        })
    }

    /// Read-only view for the CLI (`mailroom queue stats|list|show`) while a server may be running: no tmp cleanup, no writer.
    ///
    /// `list` and `stats` show the spool as it was at open; `get` reads the current files.
    /// Corrupt entries are skipped (and logged), not moved.
    pub async fn open_read_only(path: impl Into<PathBuf>) -> Result<LocalQueue, QueueError> {
        let root = path.into();
        tokio::task::spawn_blocking(move || {
            let shared = Shared::new(root, true);
            shared.scan(&mut OpenReport::default())?;
            Ok(LocalQueue {
                shared: Arc::new(shared),
                tx: None,
                _lock: None,
            })
        })
        .await
        .map_err(|e| QueueError::Unavailable(format!("opening the spool: task failed: {e}")))?
    }

    /// The spool directory.
    pub fn path(&self) -> &Path {
        &self.shared.root
    }

    /// Whether this handle was opened with [`LocalQueue::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    /// How many flushes the queue has done so far.
    pub fn io_counters(&self) -> IoCounters {
        IoCounters {
            enqueued: self.shared.enqueued.load(Ordering::Relaxed),
            file_syncs: self.shared.file_syncs.load(Ordering::Relaxed),
            fs_syncs: self.shared.fs_syncs.load(Ordering::Relaxed),
            dir_syncs: self.shared.dir_syncs.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
        }
    }

    /// The message with only the recipients still pending in its envelope.
    fn only_pending(&self, mut message: StoredMessage) -> StoredMessage {
        if let Some(pending) = self.shared.sched().pending(message.envelope.id) {
            message.envelope.recipients = pending;
        }
        message
    }

    /// Writes a message's new state durably (or deletes it when no entry is left), and
    /// updates what `list` and `stats` show.
    async fn persist(&self, id: QueueId, persist: Persist) -> Result<(), QueueError> {
        let tx = self.sender("change delivery state")?;
        match persist {
            Persist::Delete => {
                let (reply, rx) = oneshot::channel();
                tx.send(Op::Delete { id, reply }).map_err(committer_gone)?;
                rx.await.map_err(committer_gone)?.map(|_| ())
            }
            Persist::State(state) => {
                let (reply, rx) = oneshot::channel();
                tx.send(Op::State {
                    id,
                    data: state.encode(),
                    reply,
                })
                .map_err(committer_gone)?;
                rx.await.map_err(committer_gone)??;
                let pending = self.shared.sched().pending(id);
                if let Some(pending) = pending {
                    self.shared.index().set_recipients(id, &pending);
                }
                Ok(())
            }
        }
    }

    fn lease_error(&self, key: &EntryKey, e: LeaseError) -> QueueError {
        match e {
            LeaseError::Lost => QueueError::LeaseLost(key.to_string()),
            LeaseError::UnknownRecipient(address) => QueueError::Invalid(format!(
                "retry of {key}: {address} is not a pending recipient of the lease"
            )),
        }
    }

    fn token(lease: &Lease) -> Result<Token, QueueError> {
        lease.token::<Token>().copied().ok_or_else(|| {
            QueueError::Invalid(format!("lease {} is not from a local queue", lease.key))
        })
    }

    /// Builds the leases of entries taken from the scheduler (reads their files).
    async fn build_leases(
        &self,
        taken: Vec<sched::Taken>,
        max_age: Option<Duration>,
    ) -> Result<Vec<Lease>, QueueError> {
        let shared = Arc::clone(&self.shared);
        let ids: Vec<QueueId> = taken.iter().map(|t| t.key.id).collect();
        let read = tokio::task::spawn_blocking(move || {
            let mut out = std::collections::HashMap::new();
            for id in ids {
                if let std::collections::hash_map::Entry::Vacant(slot) = out.entry(id) {
                    slot.insert(shared.read_entry(id));
                }
            }
            out
        })
        .await
        .map_err(join_error)?;
        let now = now_ms();
        let mut leases = Vec::with_capacity(taken.len());
        for t in taken {
            let message = match read.get(&t.key.id) {
                Some(Ok(Some(m))) => m,
                Some(Err(e)) => {
                    // Corrupt (now quarantined) or unreadable: forget the entry, log, go on.
                    tracing::error!(entry = %t.key, error = %e, "queued message unreadable; not delivered");
                    self.shared.sched().remove(t.key.id);
                    continue;
                }
                _ => continue,
            };
            let mut envelope = message.envelope.clone();
            envelope.recipients = t
                .pending
                .iter()
                .filter_map(|&i| message.envelope.recipients.get(i).cloned())
                .collect();
            let expires_at_ms = max_age.map(|age| {
                t.received_at_ms
                    .saturating_add(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
            });
            leases.push(Lease {
                expired: expires_at_ms.is_some_and(|at| now >= at),
                expires_at_ms,
                key: t.key,
                message: StoredMessage {
                    envelope,
                    body: message.body.clone(),
                },
                state: t.state,
                deliveries: t.deliveries,
                token: Box::new(t.token),
            });
        }
        Ok(leases)
    }

    fn sender(&self, op: &'static str) -> Result<&mpsc::UnboundedSender<Op>, QueueError> {
        let tx = self.tx.as_ref().ok_or(QueueError::ReadOnly(op))?;
        self.shared
            .check_poisoned()
            .map_err(QueueError::Unavailable)?;
        Ok(tx)
    }
}

fn join_error(e: tokio::task::JoinError) -> QueueError {
    QueueError::Unavailable(format!("queue I/O task failed: {e}"))
}

fn committer_gone<T>(_: T) -> QueueError {
    QueueError::Unavailable("queue committer stopped".into())
}

#[async_trait::async_trait]
impl Queue for LocalQueue {
    async fn enqueue(&self, message: StoredMessage) -> Result<(), QueueError> {
        let tx = self.sender("enqueue")?;
        let id = message.envelope.id;
        if self.shared.index().contains(id) {
            return Err(QueueError::Duplicate(id));
        }
        let encoded = format::encode(&message)?;
        let (reply, committed) = oneshot::channel();
        let summary = EntrySummary::of(&message.envelope, message.body.len() as u64);
        // Once sent, the write completes even if this future is dropped.
        tx.send(Op::Insert {
            id,
            summary,
            encoded,
            body: message.body,
            envelope: Box::new(message.envelope),
            reply,
        })
        .map_err(committer_gone)?;
        committed.await.map_err(committer_gone)??;
        self.shared.enqueued.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn get(&self, id: QueueId) -> Result<Option<StoredMessage>, QueueError> {
        if !self.shared.read_only && !self.shared.index().contains(id) {
            return Ok(None);
        }
        let shared = Arc::clone(&self.shared);
        let message = tokio::task::spawn_blocking(move || shared.read_entry(id))
            .await
            .map_err(join_error)??;
        Ok(message.map(|m| self.only_pending(m)))
    }

    async fn list(&self, limit: usize) -> Result<Vec<EntrySummary>, QueueError> {
        Ok(self.shared.index().list(limit))
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        Ok(self.shared.index().stats())
    }

    async fn delete(&self, id: QueueId) -> Result<bool, QueueError> {
        let tx = self.sender("delete")?;
        let (reply, rx) = oneshot::channel();
        tx.send(Op::Delete { id, reply }).map_err(committer_gone)?;
        rx.await.map_err(committer_gone)?
    }

    async fn lease(&self, request: &LeaseRequest) -> Result<Vec<Lease>, QueueError> {
        self.sender("lease")?;
        let deadline = Instant::now() + request.wait;
        loop {
            // Register for wake-ups before looking, so a commit in between is not missed.
            let notified = self.shared.notify.notified();
            let now = Instant::now();
            let (taken, next) = {
                let mut sched = self.shared.sched();
                let taken = sched.take(
                    &request.policy,
                    request.max,
                    now,
                    now_ms(),
                    self.shared.lease_time,
                );
                (taken, sched.next_change(&request.policy))
            };
            if !taken.is_empty() {
                let leases = self.build_leases(taken, request.max_age).await?;
                if !leases.is_empty() {
                    return Ok(leases);
                }
                continue;
            }
            if now >= deadline {
                return Ok(Vec::new());
            }
            // Sleep until something may be due: the earliest retry time, the earliest lease
            // deadline, a commit/defer/retry (notify), or the end of the wait.
            let mut wake = deadline;
            if let Some(at_ms) = next.0 {
                let in_ms = at_ms.saturating_sub(now_ms());
                wake = wake.min(now + Duration::from_millis(in_ms));
            }
            if let Some(at) = next.1 {
                wake = wake.min(at);
            }
            let _ = tokio::time::timeout_at(tokio::time::Instant::from_std(wake), notified).await;
        }
    }

    async fn extend(&self, lease: &Lease) -> Result<(), QueueError> {
        let token = Self::token(lease)?;
        self.shared
            .sched()
            .extend(&lease.key, token, Instant::now(), self.shared.lease_time)
            .map_err(|e| self.lease_error(&lease.key, e))
    }

    async fn ack(&self, lease: Lease) -> Result<(), QueueError> {
        let token = Self::token(&lease)?;
        self.sender("ack")?;
        let persist = self
            .shared
            .sched()
            .ack(&lease.key, token)
            .map_err(|e| self.lease_error(&lease.key, e))?;
        self.persist(lease.key.id, persist).await
    }

    async fn defer(&self, lease: Lease, retry: Retry) -> Result<(), QueueError> {
        let token = Self::token(&lease)?;
        self.sender("defer")?;
        if retry.recipients.is_empty() {
            return Err(QueueError::Invalid(format!(
                "retry of {} without recipients: ack it instead",
                lease.key
            )));
        }
        let at_ms = lease
            .expires_at_ms
            .map_or(retry.at_ms, |expiry| retry.at_ms.min(expiry));
        let persist = self
            .shared
            .sched()
            .defer(
                &lease.key,
                token,
                &retry.recipients,
                at_ms,
                now_ms(),
                &retry.response,
            )
            .map_err(|e| self.lease_error(&lease.key, e))?;
        self.persist(lease.key.id, persist).await?;
        self.shared.notify.notify_waiters();
        Ok(())
    }

    async fn postpone(&self, lease: Lease, at_ms: u64) -> Result<(), QueueError> {
        let token = Self::token(&lease)?;
        self.sender("postpone")?;
        self.shared
            .sched()
            .postpone(&lease.key, token, at_ms)
            .map_err(|e| self.lease_error(&lease.key, e))?;
        self.shared.notify.notify_waiters();
        Ok(())
    }

    async fn entries(&self, id: QueueId) -> Result<Vec<EntryStatus>, QueueError> {
        Ok(self.shared.sched().entries(id))
    }

    async fn retry_now(&self, id: QueueId) -> Result<usize, QueueError> {
        self.sender("retry")?;
        let (n, state) = self.shared.sched().retry_now(id, now_ms());
        if let Some(state) = state {
            self.persist(id, Persist::State(state)).await?;
            self.shared.notify.notify_waiters();
        }
        Ok(n)
    }

    async fn request_bounce(&self, id: QueueId, reason: &str) -> Result<usize, QueueError> {
        self.sender("bounce")?;
        let (n, state) = self.shared.sched().request_bounce(id, reason, now_ms());
        if let Some(state) = state {
            self.persist(id, Persist::State(state)).await?;
            self.shared.notify.notify_waiters();
        }
        Ok(n)
    }

    async fn backlogs(&self) -> Result<Backlogs, QueueError> {
        let mut sched = self.shared.sched();
        sched.reclaim(Instant::now());
        Ok(sched.backlogs(now_ms()))
    }

    async fn oldest_queued(
        &self,
        policy: &str,
        domains: &[String],
    ) -> Result<BTreeMap<String, u64>, QueueError> {
        Ok(self.shared.sched().oldest_queued(policy, domains))
    }

    fn is_ready(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| !tx.is_closed())
            && !self.shared.poisoned.load(Ordering::SeqCst)
    }

    fn backend(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rename_noreplace_refuses_to_replace() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert!(!a.exists());
    }
}
