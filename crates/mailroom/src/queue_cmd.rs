//! `mailroom queue stats|list|show ID`: read-only views of the queue: the local spool (safe
//! while a server runs) or the JetStream stream named by `queue.jetstream`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use mailroom_queue::QueueId;

use crate::backend::open_queue;
use crate::load_config;

/// What to show.
#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// Counts, bytes, oldest message, messages per destination domain (JSON).
    Stats,
    /// Queued messages, oldest first (one JSON object per line).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One message: envelope (JSON) then the message text.
    Show {
        /// Queue id (ULID).
        id: String,
    },
    /// Remove a message for good (every destination entry and its body). The local spool
    /// allows this only while no server holds it.
    Delete {
        /// Queue id (ULID).
        id: String,
    },
}

fn parse_id(id: &str) -> anyhow::Result<QueueId> {
    id.parse()
        .map_err(|_| anyhow::anyhow!("{id:?} is not a queue id (a ULID)"))
}

fn millis_to_rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Runs a queue subcommand.
pub fn run(
    config: Option<&std::path::Path>,
    spool: Option<PathBuf>,
    action: QueueAction,
) -> anyhow::Result<()> {
    let queue_spec = match (&spool, config) {
        (Some(_), None) => mailroom_config::QueueSpec::default(),
        _ => load_config(config)?.queue,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let writes = matches!(action, QueueAction::Delete { .. });
        let q = open_queue(&queue_spec, spool.as_deref(), !writes).await?;
        match action {
            QueueAction::Stats => {
                let s = q.stats().await?;
                let out = serde_json::json!({
                    "backend": q.backend(),
                    "messages": s.messages,
                    "bytes": s.bytes,
                    "oldest_received_at": s.oldest_received_at_ms.map(millis_to_rfc3339),
                    "by_domain": s.by_domain,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            QueueAction::List { limit } => {
                for e in q.list(limit).await? {
                    let out = serde_json::json!({
                        "id": e.id.to_string(),
                        "sender": e.sender,
                        "recipients": e.recipients,
                        "domains": e.domains,
                        "size": e.size,
                        "received_at": millis_to_rfc3339(e.received_at_ms),
                    });
                    println!("{out}");
                }
            }
            QueueAction::Show { id } => {
                let qid = parse_id(&id)?;
                let m = q
                    .get(qid)
                    .await?
                    .with_context(|| format!("no message {id} in the {} queue", q.backend()))?;
                println!("{}", serde_json::to_string_pretty(&m.envelope)?);
                println!();
                print!("{}", String::from_utf8_lossy(&m.body));
            }
            QueueAction::Delete { id } => {
                if !q.delete(parse_id(&id)?).await? {
                    anyhow::bail!("no message {id} in the {} queue", q.backend());
                }
                println!("deleted {id}");
            }
        }
        Ok(())
    })
}
