//! Bodies that do not fit inline: the JetStream Object Store, plus a reference count in a KV
//! bucket so the object is freed after the last domain entry of its message is gone.
//!
//! Scheme (correct under concurrent deletes by several workers/admins):
//!
//! 1. enqueue: `put` the object under the queue id, then `put` the key `<queue id>` = number of
//!    domain entries `N` in the refs bucket, then publish the N entries.
//! 2. removing `k` entries of a message (admin delete now, a worker's final ack later): FIRST
//!    delete the entries from the stream, THEN decrement the count by `k` with a CAS loop
//!    (`update` expecting the revision read; `WrongLastRevision` re-reads and retries). The one
//!    caller that takes the count to 0 purges the key (also CAS) and deletes the object.
//!
//! Deleting entries before decrementing means a crash in between leaks the object (until the
//! bucket's `max_age`, the same safety net as the stream's) but can never free a body that an
//! entry still references. A missing key is treated as "no references left".

use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::object_store::{self, ObjectMetadata};
use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::error::{JetStreamError, boxed, msg};

/// How many times a reference-count CAS is retried under contention.
const CAS_ATTEMPTS: usize = 64;

/// The body store of one queue: Object Store bucket + refs KV bucket.
#[derive(Clone)]
pub(crate) struct Bodies {
    pub objects: object_store::ObjectStore,
    pub bucket: String,
    pub refs: kv::Store,
    pub refs_bucket: String,
}

impl Bodies {
    /// Stores `body` under `name` and sets its reference count to `refs`.
    pub async fn put(
        &self,
        name: &str,
        body: &Bytes,
        refs: usize,
        chunk_size: usize,
    ) -> Result<(), JetStreamError> {
        let meta = ObjectMetadata {
            name: name.to_string(),
            description: Some("mailroom message body".into()),
            chunk_size: Some(chunk_size),
            ..Default::default()
        };
        let mut reader: &[u8] = body;
        self.objects
            .put(meta, &mut reader)
            .await
            .map_err(|e| self.object_err("put", name, boxed(e)))?;
        self.refs
            .put(name, Bytes::from(refs.to_string()))
            .await
            .map_err(|e| self.kv_err("put", name, boxed(e)))?;
        Ok(())
    }

    /// Reads the whole body stored under `name`; checks its size.
    pub async fn get(&self, name: &str, size: u64) -> Result<Bytes, JetStreamError> {
        let mut object = self
            .objects
            .get(name)
            .await
            .map_err(|e| self.object_err("get", name, boxed(e)))?;
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        object
            .read_to_end(&mut buf)
            .await
            .map_err(|e| self.object_err("read", name, boxed(e)))?;
        if buf.len() as u64 != size {
            return Err(self.object_err(
                "read",
                name,
                msg(format!(
                    "object has {} octets, entry says {size}",
                    buf.len()
                )),
            ));
        }
        Ok(Bytes::from(buf))
    }

    /// Drops `count` references to `name`; deletes the object when none are left.
    /// Returns whether the object was deleted by this call.
    pub async fn release(&self, name: &str, count: usize) -> Result<bool, JetStreamError> {
        for attempt in 0..CAS_ATTEMPTS {
            let entry = self
                .refs
                .entry(name)
                .await
                .map_err(|e| self.kv_err("read", name, boxed(e)))?;
            let entry = match entry {
                Some(entry) if entry.operation == Operation::Put => entry,
                _ => {
                    self.delete_object(name).await?;
                    return Ok(true);
                }
            };
            let left = std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let result = if left <= count {
                self.refs
                    .purge_expect_revision(name, Some(entry.revision))
                    .await
                    .map(|()| true)
            } else {
                self.refs
                    .update(
                        name,
                        Bytes::from((left - count).to_string()),
                        entry.revision,
                    )
                    .await
                    .map(|_| false)
            };
            match result {
                Ok(true) => {
                    self.delete_object(name).await?;
                    return Ok(true);
                }
                Ok(false) => return Ok(false),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    // Another remover won the race: re-read and retry, with a little jitter.
                    let pause = Duration::from_millis(1 + (attempt as u64 % 7) * 3);
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(self.kv_err("decrement", name, boxed(e))),
            }
        }
        Err(self.kv_err(
            "decrement",
            name,
            msg(format!("still contended after {CAS_ATTEMPTS} attempts")),
        ))
    }

    /// Deletes the object and its reference count, ignoring "not found" (rollback of a failed
    /// enqueue).
    pub async fn discard(&self, name: &str) -> Result<(), JetStreamError> {
        let purge = self.refs.purge(name).await;
        self.delete_object(name).await?;
        purge.map_err(|e| self.kv_err("purge", name, boxed(e)))
    }

    /// Deletes the object; an object that is not there is not an error.
    async fn delete_object(&self, name: &str) -> Result<(), JetStreamError> {
        match self.objects.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.object_err("delete", name, boxed(e))),
        }
    }

    fn object_err(
        &self,
        op: &'static str,
        name: &str,
        source: super::error::BoxError,
    ) -> JetStreamError {
        JetStreamError::Object {
            op,
            bucket: self.bucket.clone(),
            name: name.to_string(),
            source,
        }
    }

    fn kv_err(
        &self,
        op: &'static str,
        key: &str,
        source: super::error::BoxError,
    ) -> JetStreamError {
        JetStreamError::Kv {
            op,
            bucket: self.refs_bucket.clone(),
            key: key.to_string(),
            source,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use async_nats::jetstream;

    async fn bodies(js: &jetstream::Context) -> Bodies {
        let objects = js
            .create_object_store(object_store::Config {
                bucket: "B".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let refs = js
            .create_key_value(kv::Config {
                bucket: "B_REFS".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        Bodies {
            objects,
            bucket: "B".into(),
            refs,
            refs_bucket: "B_REFS".into(),
        }
    }

    /// Concurrent releases of one reference each: exactly one of them frees the object, and
    /// only after the last one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_releases_free_the_object_exactly_once() {
        let server = mailroom_testkit::NatsServer::start().unwrap_or_else(|e| {
            panic!("this test needs a nats-server (run e2e/tools/build.sh): {e}")
        });
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let bodies = bodies(&js).await;
        let body = Bytes::from(vec![7u8; 300_000]);
        bodies.put("m1", &body, 8, 64 << 10).await.unwrap();
        assert_eq!(bodies.get("m1", body.len() as u64).await.unwrap(), body);

        // Two references go in one call, as a delete of two domain entries does.
        assert!(!bodies.release("m1", 2).await.unwrap());
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let bodies = bodies.clone();
            tasks.push(tokio::spawn(async move {
                bodies.release("m1", 1).await.unwrap()
            }));
        }
        let mut freed = 0;
        for task in tasks {
            if task.await.unwrap() {
                freed += 1;
            }
        }
        assert_eq!(freed, 1, "exactly one release frees the body");
        let gone = match bodies.objects.info("m1").await {
            Ok(info) => info.deleted,
            Err(_) => true,
        };
        assert!(gone, "object deleted");
        assert_eq!(bodies.refs.get("m1").await.unwrap(), None, "count purged");
        assert!(bodies.get("m1", body.len() as u64).await.is_err());
    }
}
