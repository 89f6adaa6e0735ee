//! `mailroom queue stats|list|show|retry|bounce|delete`: the queue as an operator sees it: the
//! local spool or the JetStream stream named by `queue.jetstream`.
//!
//! `stats`, `list` and `show` are read-only and safe while a server runs. `retry`, `bounce`
//! and `delete` change the queue: against JetStream at any time; against the local spool only
//! while no server holds it (its lock file).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use mailroom_queue::QueueId;

use crate::backend::open_queue_and_context;
use crate::load_config;

/// What to show.
#[derive(Debug, Subcommand)]
pub enum QueueAction {
    /// Counts, bytes, oldest message and its age, messages per destination domain, and the
    /// backlog per delivery policy: ready (due now), deferred (waiting for a retry time),
    /// leased (being delivered) (JSON).
    Stats,
    /// Queued messages, oldest first (one JSON object per line).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One message: envelope and the delivery state of each destination entry (attempts,
    /// last response, next attempt) as JSON, then the message text.
    Show {
        /// Queue id (ULID).
        id: String,
    },
    /// Make a message's deferred entries due now (the next worker tries them at once).
    Retry {
        /// Queue id (ULID); omit with --all.
        id: Option<String>,
        /// Every message in the queue.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Return a message to its sender instead of delivering it: every entry is marked, and
    /// the worker that next takes it sends the non-delivery report.
    Bounce {
        /// Queue id (ULID).
        id: String,
        /// The reason given in the report.
        #[arg(long, default_value = "removed from the queue by the postmaster")]
        reason: String,
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

/// The response-driven rules in force, per destination: from JetStream KV for the cluster
/// queue, from the spool's `rules.json` (written by `mailroom serve`) for the local one.
async fn active_rules(
    spec: &mailroom_config::QueueSpec,
    policies: &[mailroom_config::DeliveryPolicySpec],
    spool: Option<&std::path::Path>,
    jetstream: Option<&async_nats::jetstream::Context>,
) -> Vec<serde_json::Value> {
    use mailroom_outbound::shaping::{KvStore, MemoryStore, Override, ShapingStore};
    let mut found: Vec<(String, Override)> = Vec::new();
    match (jetstream, &spec.jetstream) {
        (Some(js), Some(jspec)) => {
            for policy in policies {
                let store =
                    KvStore::open(js, &jspec.stream, &policy.name, usize::from(jspec.replicas))
                        .await;
                match store {
                    Ok(store) => match store.overrides().await {
                        Ok(list) => {
                            found.extend(list.into_iter().map(|o| (policy.name.clone(), o)))
                        }
                        Err(e) => tracing::debug!(error = %e, "no rule state"),
                    },
                    Err(e) => tracing::debug!(error = %e, "no rule state"),
                }
            }
        }
        _ => {
            let dir = spool
                .map(std::path::Path::to_path_buf)
                .or_else(|| spec.local.as_ref().map(|l| PathBuf::from(&l.path)));
            if let Some(dir) = dir {
                let file = dir.join(crate::serve::RULES_FILE);
                found.extend(
                    MemoryStore::read_file(&file)
                        .into_iter()
                        .map(|o| (String::new(), o)),
                );
            }
        }
    }
    found
        .into_iter()
        .map(|(policy, o)| {
            serde_json::json!({
                "policy": if policy.is_empty() { None } else { Some(policy) },
                "destination": o.dest,
                "rule": o.rule,
                "action": if o.rate.is_some() { "throttle" } else { "suspend" },
                "rate": o.rate,
                "until": millis_to_rfc3339(o.until_ms),
                "response": o.response,
            })
        })
        .collect()
}

/// Runs a queue subcommand.
pub fn run(
    config: Option<&std::path::Path>,
    spool: Option<PathBuf>,
    action: QueueAction,
) -> anyhow::Result<()> {
    let (queue_spec, policies) = match (&spool, config) {
        (Some(_), None) => (
            mailroom_config::QueueSpec::default(),
            vec![mailroom_config::DeliveryPolicySpec::default()],
        ),
        _ => {
            let config = load_config(config)?;
            let policies = config.effective_policies();
            (config.queue, policies)
        }
    };
    // Malformed ids are refused before the queue is opened.
    match &action {
        QueueAction::Show { id }
        | QueueAction::Delete { id }
        | QueueAction::Bounce { id, .. }
        | QueueAction::Retry { id: Some(id), .. } => {
            parse_id(id)?;
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let writes = matches!(
            action,
            QueueAction::Delete { .. } | QueueAction::Retry { .. } | QueueAction::Bounce { .. }
        );
        let (q, jetstream) = open_queue_and_context(&queue_spec, spool.as_deref(), !writes)
            .await
            .map_err(|e| {
                let locked = e.chain().any(|c| {
                    matches!(
                        c.downcast_ref::<mailroom_queue::QueueError>(),
                        Some(mailroom_queue::QueueError::Locked { .. })
                    )
                });
                if locked {
                    e.context(
                        "a running mailroom holds this spool: stop it first, or use the \
                         jetstream queue, which allows changes while servers run",
                    )
                } else {
                    e
                }
            })?;
        match action {
            QueueAction::Stats => {
                let s = q.stats().await?;
                let backlog = q.backlogs().await?;
                let rules = active_rules(&queue_spec, &policies, spool.as_deref(), jetstream.as_ref()).await;
                let now = mailroom_queue::now_ms();
                let out = serde_json::json!({
                    "backend": q.backend(),
                    "messages": s.messages,
                    "bytes": s.bytes,
                    "oldest_received_at": s.oldest_received_at_ms.map(millis_to_rfc3339),
                    "oldest_age_seconds": s.oldest_received_at_ms.map(|at| now.saturating_sub(at) / 1000),
                    "by_domain": s.by_domain,
                    "backlog": backlog,
                    "rules": rules,
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
                let entries: Vec<serde_json::Value> = q
                    .entries(qid)
                    .await?
                    .into_iter()
                    .map(|e| {
                        serde_json::json!({
                            "domain": e.key.domain,
                            "recipients": e.recipients,
                            "attempts": e.state.attempts,
                            "last_attempt_at": e.state.last_attempt_ms.map(millis_to_rfc3339),
                            "last_response": e.state.last_response,
                            "next_attempt_at": (e.state.next_attempt_ms > 0)
                                .then(|| millis_to_rfc3339(e.state.next_attempt_ms)),
                            "bounce_requested": e.state.bounce_requested,
                        })
                    })
                    .collect();
                let out = serde_json::json!({ "envelope": m.envelope, "entries": entries });
                println!("{}", serde_json::to_string_pretty(&out)?);
                println!();
                print!("{}", String::from_utf8_lossy(&m.body));
            }
            QueueAction::Retry { id, all } => {
                let ids = match (id, all) {
                    (Some(id), false) => vec![parse_id(&id)?],
                    (None, true) => q.list(usize::MAX).await?.into_iter().map(|e| e.id).collect(),
                    _ => anyhow::bail!("queue retry: give a queue id or --all"),
                };
                let mut entries = 0;
                for id in &ids {
                    entries += q.retry_now(*id).await?;
                }
                println!("{entries} deferred entries of {} messages are due now", ids.len());
            }
            QueueAction::Bounce { id, reason } => {
                let n = q.request_bounce(parse_id(&id)?, &reason).await?;
                if n == 0 {
                    anyhow::bail!("no message {id} in the {} queue", q.backend());
                }
                println!("{n} entries of {id} marked for bounce: {reason}");
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
