//! Scratch: fsync strategies for a batch of new files.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Copy, Debug)]
enum Strategy { ParallelSyncThenRename(usize), RenameThenParallelSync(usize), Syncfs, SerialSync }

struct Job { name: String, data: Vec<u8>, reply: oneshot::Sender<()> }

fn commit(s: Strategy, tmp: &Path, q: &Path, qh: &std::fs::File, batch: Vec<Job>) {
    let mut files = Vec::new();
    for j in &batch {
        let p = tmp.join(&j.name);
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&j.data).unwrap();
        files.push((f, p, q.join(&j.name)));
    }
    let par_sync = |files: &Vec<(std::fs::File, PathBuf, PathBuf)>, k: usize| {
        let chunk = files.len().div_ceil(k).max(1);
        std::thread::scope(|sc| {
            for c in files.chunks(chunk) {
                sc.spawn(move || for (f, _, _) in c { f.sync_data().unwrap(); });
            }
        });
    };
    match s {
        Strategy::ParallelSyncThenRename(k) => {
            par_sync(&files, k);
            for (_, a, b) in &files { std::fs::rename(a, b).unwrap(); }
            qh.sync_all().unwrap();
        }
        Strategy::RenameThenParallelSync(k) => {
            for (_, a, b) in &files { std::fs::rename(a, b).unwrap(); }
            par_sync(&files, k);
            qh.sync_all().unwrap();
        }
        Strategy::SerialSync => {
            for (f, _, _) in &files { f.sync_data().unwrap(); }
            for (_, a, b) in &files { std::fs::rename(a, b).unwrap(); }
            qh.sync_all().unwrap();
        }
        Strategy::Syncfs => {
            for (_, a, b) in &files { std::fs::rename(a, b).unwrap(); }
            rustix::fs::syncfs(qh).unwrap();
        }
    }
    for j in batch { let _ = j.reply.send(()); }
}

async fn run(s: Strategy, dir: &Path, n: usize, tasks: usize) {
    let tmp = dir.join("tmp"); let q = dir.join("queue");
    std::fs::create_dir_all(&tmp).unwrap(); std::fs::create_dir_all(&q).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    let (tmp2, q2) = (tmp.clone(), q.clone());
    let batches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let b2 = batches.clone();
    let th = std::thread::spawn(move || {
        let qh = std::fs::File::open(&q2).unwrap();
        while let Some(j) = rx.blocking_recv() {
            let mut batch = vec![j];
            while batch.len() < 256 { match rx.try_recv() { Ok(j) => batch.push(j), Err(_) => break } }
            b2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            commit(s, &tmp2, &q2, &qh, batch);
        }
    });
    let start = Instant::now();
    let per = n / tasks;
    let mut hs = Vec::new();
    for t in 0..tasks {
        let tx = tx.clone();
        hs.push(tokio::spawn(async move {
            for i in 0..per {
                let (reply, r) = oneshot::channel();
                tx.send(Job { name: format!("{t}-{i}.msg"), data: vec![b'x'; 1100], reply }).unwrap();
                r.await.unwrap();
            }
        }));
    }
    for h in hs { h.await.unwrap(); }
    drop(tx); th.join().unwrap();
    let el = start.elapsed().as_secs_f64();
    let b = batches.load(std::sync::atomic::Ordering::Relaxed);
    println!("{:<32} {:>8.0} msgs/s  avg batch {:.1}", format!("{s:?}"), (per*tasks) as f64 / el, (per*tasks) as f64 / b as f64);
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20000);
    let d = tempfile::tempdir().unwrap();
    // raw latencies
    let p = d.path().join("raw"); std::fs::create_dir_all(&p).unwrap();
    let t = Instant::now();
    for i in 0..200 { let mut f = std::fs::File::create(p.join(format!("{i}"))).unwrap(); f.write_all(&[1; 1024]).unwrap(); f.sync_data().unwrap(); }
    println!("sequential new-file fdatasync: {:?}/file", t.elapsed() / 200);
    let dh = std::fs::File::open(&p).unwrap();
    let t = Instant::now();
    for i in 0..200 { std::fs::rename(p.join(format!("{i}")), p.join(format!("r{i}"))).unwrap(); dh.sync_all().unwrap(); }
    println!("rename + dir fsync: {:?}/op", t.elapsed() / 200);
    for (i, s) in [Strategy::SerialSync, Strategy::ParallelSyncThenRename(8), Strategy::ParallelSyncThenRename(32), Strategy::RenameThenParallelSync(8), Strategy::RenameThenParallelSync(32), Strategy::Syncfs].into_iter().enumerate() {
        run(s, &d.path().join(format!("s{i}")), n, 50).await;
    }
}
