//! Runs the backend contract suite (`mailroom_queue::contract`) against every backend.

use mailroom_queue::contract::{self, Backend};
use mailroom_queue::local::{LocalOptions, LocalQueue, SyncMode};

/// The local backend over a temp dir.
struct Local(tempfile::TempDir);

#[async_trait::async_trait]
impl Backend for Local {
    type Queue = LocalQueue;

    async fn open(&mut self) -> LocalQueue {
        LocalQueue::open(self.0.path(), LocalOptions::default())
            .await
            .expect("open local queue")
    }
}

fn local() -> Local {
    Local(tempfile::tempdir().expect("tempdir"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_contract() {
    contract::run_all(local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_contract_without_batching_and_with_file_syncs() {
    struct Unbatched(tempfile::TempDir);
    #[async_trait::async_trait]
    impl Backend for Unbatched {
        type Queue = LocalQueue;
        async fn open(&mut self) -> LocalQueue {
            LocalQueue::open(
                self.0.path(),
                LocalOptions {
                    max_batch: 1,
                    sync: SyncMode::File,
                },
            )
            .await
            .expect("open local queue")
        }
    }
    contract::run_all(|| Unbatched(tempfile::tempdir().expect("tempdir"))).await;
}
