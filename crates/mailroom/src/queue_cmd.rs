//! `mailroom queue stats|list|show ID`: read-only views of the local spool, safe while a
//! server runs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use mailroom_queue::local::LocalQueue;
use mailroom_queue::{Queue, QueueId};

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
    let spool = match spool {
        Some(s) => s,
        None => {
            let c = load_config(config)?;
            PathBuf::from(
                c.queue
                    .local
                    .context("queue.local: no local spool configured; pass --spool")?
                    .path,
            )
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let q = LocalQueue::open_read_only(&spool)
            .await
            .with_context(|| format!("{}: cannot open the spool", spool.display()))?;
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
                let qid: QueueId = id
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{id:?} is not a queue id (a ULID)"))?;
                let m = q
                    .get(qid)
                    .await?
                    .with_context(|| format!("no message {id} in {}", spool.display()))?;
                println!("{}", serde_json::to_string_pretty(&m.envelope)?);
                println!();
                print!("{}", String::from_utf8_lossy(&m.body));
            }
        }
        Ok(())
    })
}
