//! Helpers shared by the JetStream integration tests: starting a nats-server, polling, and
//! looking at what the backend stored.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use mailroom_testkit::NatsServer;

/// Starts a nats-server from `builder`, or fails the test saying how to get the binary.
pub fn nats(builder: mailroom_testkit::NatsServerBuilder) -> NatsServer {
    builder.start().unwrap_or_else(|e| {
        panic!("the jetstream tests need a nats-server (run e2e/tools/build.sh): {e}")
    })
}

/// Polls `f` every 50 ms until it is true or `within` has passed.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// True if the body bucket holds no live object with this name.
pub async fn object_gone(js: &jetstream::Context, name: &str) -> bool {
    let store = js
        .get_object_store("MAILROOM_BODIES")
        .await
        .expect("body bucket");
    let gone_by_info = match store.info(name).await {
        Ok(info) => info.deleted,
        Err(_) => true,
    };
    let mut listed = false;
    let mut list = store.list().await.expect("list objects");
    while let Some(info) = list.next().await {
        let info = info.expect("object info");
        if info.name == name && !info.deleted {
            listed = true;
        }
    }
    gone_by_info && !listed
}

/// True if the body reference-count bucket has `key`.
pub async fn refs_key_present(js: &jetstream::Context, key: &str) -> bool {
    let kv = js
        .get_key_value("MAILROOM_BODIES_REFS")
        .await
        .expect("refs bucket");
    kv.get(key).await.expect("read refs").is_some()
}
