//! Tests specific to the local spool: rebuild, quarantine, tmp cleanup, locking, read-only view.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use mailroom_queue::contract::message;
use mailroom_queue::local::{IoCounters, LocalOptions, LocalQueue, SyncMode};
use mailroom_queue::{Queue, QueueError, QueueId};

async fn open(dir: &Path) -> LocalQueue {
    LocalQueue::open(dir, LocalOptions::default())
        .await
        .expect("open")
}

fn entry_path(dir: &Path, id: QueueId) -> std::path::PathBuf {
    dir.join("queue").join(format!("{id}.msg"))
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn creates_layout_and_reports_backend() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let queue = open(&spool).await;
    assert_eq!(queue.backend(), "local");
    assert!(queue.is_ready());
    assert!(!queue.is_read_only());
    for sub in ["tmp", "queue", "corrupt"] {
        assert!(spool.join(sub).is_dir(), "{sub}/ exists");
    }
}

#[tokio::test]
async fn file_is_in_queue_dir_and_tmp_is_empty_after_enqueue() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path()).await;
    let m = message("a@x.org", &["b@y.org"]);
    queue.enqueue(m.clone()).await.unwrap();
    assert!(entry_path(dir.path(), m.envelope.id).is_file());
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    let bytes = std::fs::read(entry_path(dir.path(), m.envelope.id)).unwrap();
    assert_eq!(&bytes[..4], b"MRQ1");
    let counters = queue.io_counters();
    assert_eq!(counters.enqueued, 1);
    assert_eq!(counters.fs_syncs, 1, "default mode: one syncfs per batch");
    assert_eq!(counters.file_syncs, 0);
    assert_eq!(counters.dir_syncs, 1);
}

#[tokio::test]
async fn leftovers_in_tmp_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()).await);
    let tmp = dir.path().join("tmp");
    std::fs::write(
        tmp.join(format!("{}.msg", QueueId::new())),
        b"MRQ1 half written",
    )
    .unwrap();
    std::fs::write(tmp.join("junk"), b"x").unwrap();
    std::fs::create_dir(tmp.join("subdir")).unwrap();
    let queue = open(dir.path()).await;
    assert!(files_in(&tmp).is_empty(), "tmp/ emptied");
    assert_eq!(queue.stats().await.unwrap().messages, 0);
}

#[tokio::test]
async fn torn_and_corrupt_files_are_quarantined_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path()).await;
    let good = message("a@x.org", &["b@good.example"]);
    let torn = message("a@x.org", &["b@torn.example"]);
    let flipped = message("a@x.org", &["b@flipped.example"]);
    for m in [&good, &torn, &flipped] {
        queue.enqueue(m.clone()).await.unwrap();
    }
    drop(queue);

    // Torn: the last bytes are missing.
    let torn_path = entry_path(dir.path(), torn.envelope.id);
    let len = std::fs::metadata(&torn_path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&torn_path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    // Flipped: one byte of the envelope changed, length intact.
    let flipped_path = entry_path(dir.path(), flipped.envelope.id);
    let mut bytes = std::fs::read(&flipped_path).unwrap();
    bytes[30] ^= 0x20;
    std::fs::write(&flipped_path, &bytes).unwrap();
    // Garbage with a wrong name, and an empty file.
    std::fs::write(dir.path().join("queue").join("garbage.txt"), b"hello").unwrap();
    std::fs::write(
        dir.path()
            .join("queue")
            .join(format!("{}.msg", QueueId::new())),
        b"",
    )
    .unwrap();

    let queue = open(dir.path()).await;
    let list = queue.list(100).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, good.envelope.id);
    assert_eq!(
        queue.get(good.envelope.id).await.unwrap(),
        Some(good.clone())
    );
    assert_eq!(files_in(&dir.path().join("corrupt")).len(), 4);
    assert_eq!(
        files_in(&dir.path().join("queue")),
        vec![format!("{}.msg", good.envelope.id)]
    );
    drop(queue);

    // Quarantining the same name again does not overwrite the earlier copy.
    std::fs::write(dir.path().join("queue").join("garbage.txt"), b"again").unwrap();
    let _queue = open(dir.path()).await;
    assert_eq!(files_in(&dir.path().join("corrupt")).len(), 5);
}

#[tokio::test]
async fn corrupt_body_is_detected_on_get() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path()).await;
    let m = message("a@x.org", &["b@y.org"]);
    queue.enqueue(m.clone()).await.unwrap();
    let path = entry_path(dir.path(), m.envelope.id);
    let mut bytes = std::fs::read(&path).unwrap();
    let last_body_byte = bytes.len() - 5;
    bytes[last_body_byte] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let err = queue.get(m.envelope.id).await.unwrap_err();
    assert!(
        matches!(&err, QueueError::Corrupt { reason, .. } if reason.contains("body checksum")),
        "{err}"
    );
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(!path.exists(), "moved away");
    assert_eq!(files_in(&dir.path().join("corrupt")).len(), 1);
    assert_eq!(queue.get(m.envelope.id).await.unwrap(), None);
    assert_eq!(queue.stats().await.unwrap().messages, 0);
}

#[tokio::test]
async fn duplicate_id_is_rejected_and_original_kept() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path()).await;
    let m = message("a@x.org", &["b@y.org"]);
    queue.enqueue(m.clone()).await.unwrap();
    let mut other = m.clone();
    other.body = bytes::Bytes::from_static(b"Subject: other\r\n\r\nother\r\n");
    let err = queue.enqueue(other).await.unwrap_err();
    assert!(
        matches!(err, QueueError::Duplicate(id) if id == m.envelope.id),
        "{err}"
    );
    assert_eq!(queue.get(m.envelope.id).await.unwrap(), Some(m));
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[tokio::test]
async fn second_writer_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path()).await;
    let err = LocalQueue::open(dir.path(), LocalOptions::default())
        .await
        .err()
        .expect("second open must fail");
    assert!(matches!(err, QueueError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("locked"), "{err}");
    drop(queue);
    open(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_only_sees_entries_of_a_running_writer() {
    let dir = tempfile::tempdir().unwrap();
    let writer = open(dir.path()).await;
    let mut messages = Vec::new();
    for i in 0..10 {
        let m = message("a@x.org", &[&format!("r@d{}.example", i % 2)]);
        writer.enqueue(m.clone()).await.unwrap();
        messages.push(m);
    }
    // A leftover of the writer in tmp/ must survive the read-only open.
    let leftover = dir.path().join("tmp").join("in-flight.msg");
    std::fs::write(&leftover, b"x").unwrap();

    let reader = LocalQueue::open_read_only(dir.path()).await.unwrap();
    assert!(reader.is_read_only());
    assert!(!reader.is_ready());
    assert!(leftover.exists(), "read-only open leaves tmp/ alone");
    assert_eq!(
        reader.list(100).await.unwrap(),
        writer.list(100).await.unwrap()
    );
    assert_eq!(reader.stats().await.unwrap(), writer.stats().await.unwrap());
    assert_eq!(
        reader.get(messages[3].envelope.id).await.unwrap(),
        Some(messages[3].clone())
    );
    // get reads the current files, so it sees a message enqueued after the read-only open...
    let late = message("late@x.org", &["r@late.example"]);
    writer.enqueue(late.clone()).await.unwrap();
    assert_eq!(reader.get(late.envelope.id).await.unwrap(), Some(late));
    // ...and no longer finds a deleted one.
    assert!(writer.delete(messages[0].envelope.id).await.unwrap());
    assert_eq!(reader.get(messages[0].envelope.id).await.unwrap(), None);

    let m = message("a@x.org", &["b@y.org"]);
    assert!(matches!(
        reader.enqueue(m).await,
        Err(QueueError::ReadOnly(_))
    ));
    assert!(matches!(
        reader.delete(messages[1].envelope.id).await,
        Err(QueueError::ReadOnly(_))
    ));
    // A corrupt file is skipped, not moved, by the reader.
    let bad = dir
        .path()
        .join("queue")
        .join(format!("{}.msg", QueueId::new()));
    std::fs::write(&bad, b"MRQ1").unwrap();
    let reader = LocalQueue::open_read_only(dir.path()).await.unwrap();
    assert!(bad.exists());
    assert_eq!(reader.stats().await.unwrap().messages, 10);
}

#[tokio::test]
async fn read_only_of_missing_spool_fails_with_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = LocalQueue::open_read_only(dir.path().join("nope"))
        .await
        .err()
        .expect("must fail");
    let text = err.to_string();
    assert!(
        text.contains("read directory") && text.contains("nope"),
        "{text}"
    );
}

/// 200 concurrent enqueues; returns the counters and checks everything survives a reopen.
async fn enqueue_200_concurrently(options: LocalOptions) -> IoCounters {
    let dir = tempfile::tempdir().unwrap();
    let queue = std::sync::Arc::new(LocalQueue::open(dir.path(), options.clone()).await.unwrap());
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            queue.enqueue(message("a@x.org", &["b@y.org"])).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let c = queue.io_counters();
    assert_eq!(c.enqueued, 200);
    assert_eq!(queue.stats().await.unwrap().messages, 200);
    drop(queue);
    let queue = LocalQueue::open(dir.path(), options).await.unwrap();
    assert_eq!(queue.stats().await.unwrap().messages, 200);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_share_one_syncfs_per_batch() {
    let c = enqueue_200_concurrently(LocalOptions::default()).await;
    assert_eq!(c.file_syncs, 0);
    assert_eq!(c.fs_syncs, c.dir_syncs, "{c:?}");
    assert!(c.fs_syncs < 200, "no batching happened: {c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_mode_syncs_every_file_and_shares_directory_fsyncs() {
    let c = enqueue_200_concurrently(LocalOptions {
        sync: SyncMode::File,
        ..LocalOptions::default()
    })
    .await;
    assert_eq!(c.file_syncs, 200);
    assert_eq!(c.fs_syncs, 0);
    assert!(c.dir_syncs < 200, "no batching happened: {c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicates_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let queue = std::sync::Arc::new(open(dir.path()).await);
    let m = message("a@x.org", &["b@y.org"]);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (queue, m) = (queue.clone(), m.clone());
        tasks.push(tokio::spawn(async move { queue.enqueue(m).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(QueueError::Duplicate(id)) => assert_eq!(id, m.envelope.id),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(queue.get(m.envelope.id).await.unwrap(), Some(m));
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_enqueue_still_completes_and_leaves_no_tmp() {
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path()).await;
    let m = message("a@x.org", &["b@y.org"]);
    // Poll the enqueue once (the write starts on the blocking pool), then drop it.
    let enqueue = queue.enqueue(m.clone());
    tokio::select! {
        biased;
        _ = enqueue => {}
        () = std::future::ready(()) => {}
    }
    for _ in 0..500 {
        if queue.stats().await.unwrap().messages == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(queue.get(m.envelope.id).await.unwrap(), Some(m));
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}
