//! Runs the backend contract suite (`mailroom_queue::contract`) against the `jetstream`
//! backend, each check on its own real nats-server (`mailroom-testkit`; build the binary with
//! `e2e/tools/build.sh`).

use std::time::Duration;

use mailroom_queue::contract::{self, Backend};
use mailroom_queue::jetstream::{JetStreamOptions, JetStreamQueue};
use mailroom_testkit::NatsServer;

/// The lease time of the contract queues.
const LEASE: Duration = Duration::from_secs(1);

/// The jetstream backend over a fresh nats-server (file storage).
struct JetStream {
    server: NatsServer,
}

impl JetStream {
    fn new() -> Self {
        let server = NatsServer::start().unwrap_or_else(|e| {
            panic!("the jetstream tests need a nats-server (run e2e/tools/build.sh): {e}")
        });
        JetStream { server }
    }
}

#[async_trait::async_trait]
impl Backend for JetStream {
    type Queue = JetStreamQueue;

    async fn open(&mut self) -> JetStreamQueue {
        JetStreamQueue::connect(JetStreamOptions {
            urls: vec![self.server.url()],
            lease_time: LEASE,
            ..JetStreamOptions::default()
        })
        .await
        .expect("connect to nats-server")
    }

    fn lease_time(&self) -> Duration {
        LEASE
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_contract() {
    contract::run_all(JetStream::new).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jetstream_contract_with_object_bodies() {
    // Every body goes through the Object Store (inline_max 0), shared by the domain entries.
    struct Objects(JetStream);
    #[async_trait::async_trait]
    impl Backend for Objects {
        type Queue = JetStreamQueue;
        async fn open(&mut self) -> JetStreamQueue {
            JetStreamQueue::connect(JetStreamOptions {
                urls: vec![self.0.server.url()],
                inline_max: Some(0),
                lease_time: LEASE,
                ..JetStreamOptions::default()
            })
            .await
            .expect("connect to nats-server")
        }
        fn lease_time(&self) -> Duration {
            LEASE
        }
    }
    contract::run_all(|| Objects(JetStream::new())).await;
}
