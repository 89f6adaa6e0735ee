//! Listener counts for the operator: every inbound process puts its running totals per listener
//! (messages accepted, messages refused) into the JetStream KV bucket `<stream>_STATS` every
//! [`REPORT_INTERVAL`]; the operator reads them and shows the counts of the last minutes in the
//! MailListener's status. Totals, not deltas, so a lost write loses nothing; a process that
//! restarts starts again from zero, which the reader notices (its total goes down).

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use prometheus::core::Collector;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::{MESSAGES_ACCEPTED, MESSAGES_REJECTED};

/// How often a process writes its totals.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(15);
/// Entries older than this are gone from the bucket (processes that stopped).
const MAX_AGE: Duration = Duration::from_secs(600);

/// One process's totals for one listener.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenerCounts {
    /// Messages queued and answered with 250 since the process started.
    pub accepted: u64,
    /// Messages refused at or after DATA since the process started.
    pub rejected: u64,
}

/// The KV bucket of `stream`'s listener counts.
pub fn bucket(stream: &str) -> String {
    format!("{stream}_STATS")
}

/// A KV key token: letters, digits, `-` and `_` kept, anything else `_`.
fn key_token(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn key(listener: &str, process: &str) -> String {
    format!("listener.{}.{}", key_token(listener), key_token(process))
}

/// Opens (creating if needed) the counts bucket of `stream`.
pub async fn open(
    js: &jetstream::Context,
    stream: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    js.create_or_update_key_value(kv::Config {
        bucket: bucket(stream),
        description: "Mailroom inbound listener counts (totals per process)".into(),
        history: 1,
        max_age: MAX_AGE,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("bucket {}: {e}", bucket(stream)))
}

/// Writes one process's totals for one listener.
pub async fn publish(
    store: &kv::Store,
    listener: &str,
    process: &str,
    counts: ListenerCounts,
) -> Result<(), String> {
    let value = serde_json::to_vec(&counts).map_err(|e| e.to_string())?;
    store
        .put(key(listener, process), value.into())
        .await
        .map(|_| ())
        .map_err(|e| format!("put {}: {e}", key(listener, process)))
}

/// The totals of every process that reported for `listener`, by process.
pub async fn read(
    store: &kv::Store,
    listener: &str,
) -> Result<Vec<(String, ListenerCounts)>, String> {
    use futures_util::StreamExt;
    let prefix = format!("listener.{}.", key_token(listener));
    let mut keys = store.keys().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| e.to_string())?;
        let Some(process) = key.strip_prefix(&prefix) else {
            continue;
        };
        if let Some(value) = store.get(&key).await.map_err(|e| e.to_string())?
            && let Ok(counts) = serde_json::from_slice::<ListenerCounts>(&value)
        {
            out.push((process.to_owned(), counts));
        }
    }
    Ok(out)
}

/// This process's totals for `listener`, from its metrics.
pub fn current(listener: &str) -> ListenerCounts {
    let rejected = MESSAGES_REJECTED
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "listener" && l.value() == listener)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum();
    ListenerCounts {
        accepted: MESSAGES_ACCEPTED.with_label_values(&[listener]).get(),
        rejected,
    }
}

/// Writes the totals of `listeners` every [`REPORT_INTERVAL`] until `stop`, and once more at
/// the end. Failures are logged; the next round writes the totals again.
pub async fn run(
    store: kv::Store,
    listeners: Vec<String>,
    process: String,
    stop: CancellationToken,
) {
    loop {
        for listener in &listeners {
            if let Err(e) = publish(&store, listener, &process, current(listener)).await {
                tracing::debug!(listener = %listener, error = %e, "cannot report listener counts");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(REPORT_INTERVAL) => {}
        }
    }
    for listener in &listeners {
        let _ = publish(&store, listener, &process, current(listener)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys() {
        assert_eq!(
            key("mx", "mx-inbound-7d9f-abcde"),
            "listener.mx.mx-inbound-7d9f-abcde"
        );
        assert_eq!(key("mx", "host.example:1"), "listener.mx.host_example_1");
    }
}
