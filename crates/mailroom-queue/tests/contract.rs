//! Runs the backend contract suite (`mailroom_queue::contract`) against every backend.

use std::time::Duration;

use mailroom_queue::contract::{self, Backend};
use mailroom_queue::local::{LocalOptions, LocalQueue, SyncMode};

/// The lease time of the contract queues.
const LEASE: Duration = Duration::from_secs(1);

/// The local backend over a temp dir.
struct Local(tempfile::TempDir);

#[async_trait::async_trait]
impl Backend for Local {
    type Queue = LocalQueue;

    async fn open(&mut self) -> LocalQueue {
        LocalQueue::open(
            self.0.path(),
            LocalOptions {
                lease_time: LEASE,
                ..LocalOptions::default()
            },
        )
        .await
        .expect("open local queue")
    }

    fn lease_time(&self) -> Duration {
        LEASE
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
                    lease_time: LEASE,
                },
            )
            .await
            .expect("open local queue")
        }
        fn lease_time(&self) -> Duration {
            LEASE
        }
    }
    contract::run_all(|| Unbatched(tempfile::tempdir().expect("tempdir"))).await;
}
