//! Opens the configured queue backend (`queue.local` or `queue.jetstream`) for `serve` and the
//! `queue` admin commands. Secrets named by the config (token, password, nkey seed files) are
//! read here, at the edge, and every error names the config field.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use mailroom_config::{JetStreamQueueSpec, QueueSpec, SpoolSync, StreamStorage};
use mailroom_queue::Queue;
use mailroom_queue::jetstream::{JetStreamOptions, JetStreamQueue, NatsAuth, NatsTls, Storage};
use mailroom_queue::local::{LocalOptions, LocalQueue, SyncMode};

/// Reads a secret file, trimmed; the error names the field.
fn secret(path: &str, field: &str) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{field} {path}: cannot read"))?;
    Ok(text.trim().to_string())
}

/// The JetStream backend's options from the config.
pub fn jetstream_options(spec: &JetStreamQueueSpec) -> anyhow::Result<JetStreamOptions> {
    let auth = if let Some(path) = &spec.credentials_file {
        NatsAuth::CredentialsFile(PathBuf::from(path))
    } else if let Some(path) = &spec.nkey_seed_file {
        NatsAuth::NkeySeed(secret(path, "queue.jetstream.nkeySeedFile")?)
    } else if let Some(path) = &spec.token_file {
        NatsAuth::Token(secret(path, "queue.jetstream.tokenFile")?)
    } else if let (Some(user), Some(path)) = (&spec.user, &spec.password_file) {
        NatsAuth::UserPassword {
            user: user.clone(),
            password: secret(path, "queue.jetstream.passwordFile")?,
        }
    } else {
        NatsAuth::None
    };
    let tls = spec.tls.as_ref().map(|t| NatsTls {
        ca_file: t.ca_file.as_ref().map(PathBuf::from),
        cert_file: t.cert_file.as_ref().map(PathBuf::from),
        key_file: t.key_file.as_ref().map(PathBuf::from),
    });
    Ok(JetStreamOptions {
        urls: spec.urls.clone(),
        auth,
        tls,
        stream: spec.stream.clone(),
        replicas: usize::from(spec.replicas),
        storage: match spec.storage {
            StreamStorage::File => Storage::File,
            StreamStorage::Memory => Storage::Memory,
        },
        max_age: spec.max_age.as_duration(),
        publish_timeout: spec.publish_timeout.as_duration(),
        lease_time: spec.lease_time.as_duration(),
        max_leased: i64::from(spec.max_leased),
        ..JetStreamOptions::default()
    })
}

/// Opens the queue for a server (`read_only` false) or for the admin commands, with the
/// JetStream context when the queue is JetStream (the delivery workers keep their
/// traffic-shaping state next to the queue).
pub async fn open_queue_and_context(
    spec: &QueueSpec,
    spool_override: Option<&Path>,
    read_only: bool,
) -> anyhow::Result<(Arc<dyn Queue>, Option<async_nats::jetstream::Context>)> {
    if let (Some(js), None) = (&spec.jetstream, spool_override) {
        let options = jetstream_options(js)?;
        let queue = JetStreamQueue::connect(options).await.with_context(|| {
            format!(
                "queue.jetstream: cannot set up stream {} on {}",
                js.stream,
                js.urls.join(", ")
            )
        })?;
        let context = queue.context().clone();
        return Ok((Arc::new(queue), Some(context)));
    }
    let path = match (spool_override, &spec.local) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(local)) => PathBuf::from(&local.path),
        (None, None) => {
            anyhow::bail!("queue: no local spool configured (queue.local.path); pass --spool")
        }
    };
    let queue = if read_only {
        LocalQueue::open_read_only(&path).await
    } else {
        let local = spec.local.clone().unwrap_or_default();
        let sync = match local.sync {
            SpoolSync::Filesystem => SyncMode::Filesystem,
            SpoolSync::File => SyncMode::File,
        };
        LocalQueue::open(
            &path,
            LocalOptions {
                max_batch: local.max_batch as usize,
                sync,
                lease_time: local.lease_time.as_duration(),
            },
        )
        .await
    };
    let queue = queue
        .with_context(|| format!("queue.local.path {}: cannot open the spool", path.display()))?;
    Ok((Arc::new(queue), None))
}
