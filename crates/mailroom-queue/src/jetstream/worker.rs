//! The worker side of the JetStream backend: leases, extensions, acks, deferrals, operator
//! requests and backlogs.
//!
//! - **Lease**: one durable pull consumer per policy (`mailroom-<policy>`, filter
//!   `mailroom.q.<policy>.>`, explicit ack, `ack_wait` = lease time, unlimited deliveries).
//!   A lease is a delivered, unacked message; [`Queue::extend`](crate::Queue::extend) sends
//!   `+WPI` (progress), which restarts `ack_wait`; a worker that dies stops acking and the
//!   server hands the entry to another worker after `ack_wait`.
//! - **Ack**: `double_ack` (confirmed by the server; the work-queue stream then drops the
//!   entry), then the body's reference count is released when the body is an object.
//! - **Defer**: the updated entry (pending recipients, attempts, last response, next attempt)
//!   is published to `mailroom.d.<policy>.<id>.<domain>` with `Nats-Schedule: @at <time>` and
//!   `Nats-Schedule-Target: mailroom.q.<policy>.<domain>`; the server moves it back to the
//!   due subject at its time (measured: within about 250 ms; the schedule survives a server
//!   kill). Then the lease is acked. Publish first, ack second: a crash in between delivers
//!   twice, never loses. `Nats-Msg-Id` `<id>.<domain>.a<attempts>` makes a retried deferral
//!   (or two workers deferring the same attempt) store one schedule. Chosen over
//!   nak-with-delay because a nak'd entry stays "ack pending" for the whole delay: it fills
//!   `max_ack_pending` (1,000 by default: measured, the 1,001st entry is then never handed
//!   out), and the deferred backlog cannot be told apart from running deliveries. With
//!   schedules, deferred mail is simply not in the consumers' subjects.
//! - **Operator requests**: `retry_now` deletes the schedule message and publishes its entry
//!   to the due subject at once; `request_bounce` records `bounce.<id>` in the admin KV bucket
//!   (every handle mirrors it with a watcher, so entries leased anywhere carry the mark) and
//!   makes the deferred entries due now.
//! - **Backlogs**: per-subject counts of the stream (`mailroom.q.<policy>.>` = ready +
//!   leased, `mailroom.d.<policy>.>` = deferred) and the consumers' `num_ack_pending`
//!   (leased). The autoscaler's number, ready, is the consumer's `num_pending` in effect; KEDA's
//!   JetStream scaler reading `num_pending` of `mailroom-<policy>` therefore never counts
//!   deferred mail.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::entry::{self, BodyRef, EntryMeta, Place};
use super::error::{JetStreamError, boxed, msg};
use super::{Inner, Outgoing, Resources};
use crate::{
    Backlog, Backlogs, EntryKey, EntryStatus, Lease, LeaseRequest, QueueId, Recipient, Retry,
    StoredMessage, now_ms,
};

/// A worker consumer.
pub(crate) type Consumer = jetstream::consumer::PullConsumer;

/// Most entries asked for in one lease.
const MAX_LEASE: usize = 1024;

/// The JetStream lease token: the delivered message and what it held.
pub(crate) struct Token {
    message: jetstream::Message,
    meta: EntryMeta,
    subject: String,
}

/// The durable consumer name of a policy.
pub(crate) fn consumer_name(policy: &str) -> String {
    format!("mailroom-{}", entry::token(policy, false))
}

impl Inner {
    fn consumer_err(
        &self,
        op: &'static str,
        consumer: &str,
        source: super::BoxError,
    ) -> JetStreamError {
        JetStreamError::Consumer {
            op,
            consumer: consumer.to_string(),
            stream: self.options.stream.clone(),
            source,
        }
    }

    /// The policy's consumer, created (or updated to the current lease time) on first use.
    async fn consumer(
        &self,
        resources: &Resources,
        policy: &str,
    ) -> Result<Consumer, JetStreamError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(c) = consumers.get(policy) {
            return Ok(c.clone());
        }
        let name = consumer_name(policy);
        let config = jetstream::consumer::pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("Mailroom workers of delivery policy {policy}")),
            filter_subject: self.subjects.policy_filter(policy),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.options.lease_time,
            max_deliver: -1,
            max_ack_pending: self.options.max_leased,
            num_replicas: self.options.replicas,
            ..Default::default()
        };
        let consumer: Consumer = resources
            .stream
            .create_consumer(config)
            .await
            .map_err(|e| self.consumer_err("create", &name, boxed(e)))?;
        consumers.insert(policy.to_string(), consumer.clone());
        Ok(consumer)
    }

    /// Forgets a policy's consumer after an error, so the next lease looks it up again.
    async fn forget_consumer(&self, policy: &str) {
        self.consumers.lock().await.remove(policy);
    }

    /// Starts mirroring the admin bucket's bounce requests (once per handle).
    fn watch_admin(&self, resources: &Resources) {
        let mut watcher = self.watcher.lock().unwrap_or_else(|e| e.into_inner());
        if watcher.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        let admin = resources.admin.clone();
        let bounces = Arc::clone(&self.bounces);
        *watcher = Some(tokio::spawn(async move {
            loop {
                match admin.watch_with_history("bounce.>").await {
                    Ok(mut entries) => {
                        while let Some(item) = entries.next().await {
                            let Ok(item) = item else { break };
                            let Some(id) = item
                                .key
                                .strip_prefix("bounce.")
                                .and_then(|k| k.parse::<QueueId>().ok())
                            else {
                                continue;
                            };
                            let mut map = bounces.write().unwrap_or_else(|e| e.into_inner());
                            match item.operation {
                                jetstream::kv::Operation::Put => {
                                    map.insert(
                                        id,
                                        String::from_utf8_lossy(&item.value).into_owned(),
                                    );
                                }
                                _ => {
                                    map.remove(&id);
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "admin bucket watch failed; retrying"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }

    fn bounce_reason(&self, id: QueueId) -> Option<String> {
        self.bounces
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Messages the consumer has now (no waiting), at most `max`.
    async fn fetch(
        &self,
        consumer: &Consumer,
        max: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<jetstream::Message>, JetStreamError> {
        let name = consumer.cached_info().name.clone();
        let batch = match wait {
            None => consumer.fetch().max_messages(max).messages().await,
            Some(wait) => {
                consumer
                    .batch()
                    .max_messages(max)
                    .expires(wait)
                    .messages()
                    .await
            }
        }
        .map_err(|e| self.consumer_err("fetch", &name, boxed(e)))?;
        let mut batch = std::pin::pin!(batch);
        let mut out = Vec::new();
        while let Some(item) = batch.next().await {
            match item {
                Ok(message) => out.push(message),
                Err(e) => {
                    // A timeout or a status at the end of the batch: keep what arrived.
                    if out.is_empty() {
                        tracing::debug!(consumer = %name, error = %e, "fetch ended");
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    pub(super) async fn lease(&self, request: &LeaseRequest) -> Result<Vec<Lease>, JetStreamError> {
        let resources = self.ready().await?;
        self.watch_admin(&resources);
        let consumer = self.consumer(&resources, &request.policy).await?;
        let max = request.max.clamp(1, MAX_LEASE);
        let fetched = async {
            let mut messages = self.fetch(&consumer, max, None).await?;
            if messages.is_empty() && request.wait >= Duration::from_millis(10) {
                messages = self.fetch(&consumer, 1, Some(request.wait)).await?;
                if !messages.is_empty() && max > 1 {
                    messages.extend(self.fetch(&consumer, max - 1, None).await?);
                }
            }
            Ok::<_, JetStreamError>(messages)
        }
        .await;
        let messages = match fetched {
            Ok(m) => m,
            Err(e) => {
                self.forget_consumer(&request.policy).await;
                return Err(e);
            }
        };
        let mut leases = Vec::with_capacity(messages.len());
        for message in messages {
            if let Some(lease) = self.to_lease(&resources, message, request).await? {
                leases.push(lease);
            }
        }
        Ok(leases)
    }

    /// Decodes a delivered entry into a lease; a corrupt entry is logged and terminated.
    async fn to_lease(
        &self,
        resources: &Resources,
        message: jetstream::Message,
        request: &LeaseRequest,
    ) -> Result<Option<Lease>, JetStreamError> {
        let subject = message.subject.to_string();
        let (seq, deliveries) = message
            .info()
            .map(|i| (i.stream_sequence, i.delivered.max(1) as u64))
            .unwrap_or((0, 1));
        let decoded = message
            .headers
            .as_ref()
            .and_then(|h| h.get(entry::HEADER_META_SIZE))
            .and_then(|v| v.as_str().parse::<usize>().ok())
            .ok_or_else(|| "no Mailroom-Meta-Size header".to_string())
            .and_then(|size| entry::decode_payload(&message.payload, size));
        let (meta, inline) = match decoded {
            Ok(d) => d,
            Err(reason) => {
                tracing::error!(stream = %self.options.stream, seq, %subject, %reason, "corrupt queue entry removed");
                let _ = message.double_ack_with(AckKind::Term).await;
                return Ok(None);
            }
        };
        let body = match &meta.body {
            BodyRef::Inline => inline,
            BodyRef::Object { name, .. } => resources.bodies.get(name, meta.body_size).await?,
        };
        let id = meta.envelope.id;
        let domain = match self.subjects.parse_place(&subject) {
            Some(Place::Due { domain, .. }) => domain,
            _ => meta
                .envelope
                .recipients
                .first()
                .map(|r| r.domain.clone())
                .unwrap_or_default(),
        };
        let mut state = meta.state.clone();
        if state.bounce_requested.is_none() {
            state.bounce_requested = self.bounce_reason(id);
        }
        let expires_at_ms = request.max_age.map(|age| {
            meta.envelope
                .received_at_ms
                .saturating_add(u64::try_from(age.as_millis()).unwrap_or(u64::MAX))
        });
        Ok(Some(Lease {
            key: EntryKey { id, domain },
            message: StoredMessage {
                envelope: meta.envelope.clone(),
                body,
            },
            state,
            deliveries,
            expired: expires_at_ms.is_some_and(|at| now_ms() >= at),
            expires_at_ms,
            token: Box::new(Token {
                message,
                meta,
                subject,
            }),
        }))
    }

    fn token<'a>(&self, lease: &'a Lease) -> Result<&'a Token, JetStreamError> {
        lease.token::<Token>().ok_or_else(|| {
            JetStreamError::Invalid(format!("lease {} is not from a jetstream queue", lease.key))
        })
    }

    fn ack_err(&self, op: &'static str, lease: &Lease, e: async_nats::Error) -> JetStreamError {
        self.consumer_err(
            op,
            &consumer_name(&lease.message.envelope.policy),
            msg(format!("{}: {e}", lease.key)),
        )
    }

    pub(super) async fn extend(&self, lease: &Lease) -> Result<(), JetStreamError> {
        let token = self.token(lease)?;
        token
            .message
            .double_ack_with(AckKind::Progress)
            .await
            .map_err(|e| self.ack_err("extend lease", lease, e))
    }

    pub(super) async fn ack(&self, lease: Lease) -> Result<(), JetStreamError> {
        let resources = self.ready().await?;
        let token = self.token(&lease)?;
        token
            .message
            .double_ack()
            .await
            .map_err(|e| self.ack_err("ack", &lease, e))?;
        if let BodyRef::Object { name, .. } = &token.meta.body {
            resources.bodies.release(name, 1).await?;
        }
        Ok(())
    }

    /// Postpones without an attempt: a nak with delay. A throttling delay is short (seconds),
    /// so the entry holding an ack-pending slot meanwhile is fine (see the module docs on why
    /// deferrals use schedules instead).
    pub(super) async fn postpone(&self, lease: Lease, at_ms: u64) -> Result<(), JetStreamError> {
        let token = self.token(&lease)?;
        let delay = Duration::from_millis(at_ms.saturating_sub(now_ms()));
        token
            .message
            .double_ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| self.ack_err("postpone", &lease, e))
    }

    pub(super) async fn defer(&self, lease: Lease, retry: Retry) -> Result<(), JetStreamError> {
        let resources = self.ready().await?;
        let token = self.token(&lease)?;
        if retry.recipients.is_empty() {
            return Err(JetStreamError::Invalid(format!(
                "retry of {} without recipients: ack it instead",
                lease.key
            )));
        }
        // The pending recipients keep their original indices.
        let mut meta = token.meta.clone();
        let mut recipients: Vec<Recipient> = Vec::with_capacity(retry.recipients.len());
        let mut indices = Vec::with_capacity(retry.recipients.len());
        for r in &retry.recipients {
            let position = token
                .meta
                .envelope
                .recipients
                .iter()
                .position(|have| have.address == r.address)
                .ok_or_else(|| {
                    JetStreamError::Invalid(format!(
                        "retry of {}: {} is not a pending recipient of the lease",
                        lease.key, r.address
                    ))
                })?;
            if indices.contains(&token.meta.rcpt_index[position]) {
                continue;
            }
            indices.push(token.meta.rcpt_index[position]);
            recipients.push(token.meta.envelope.recipients[position].clone());
        }
        meta.envelope.recipients = recipients;
        meta.rcpt_index = indices;
        let now = now_ms();
        let bounce = lease
            .state
            .bounce_requested
            .clone()
            .or_else(|| self.bounce_reason(lease.key.id));
        let at_ms = lease
            .expires_at_ms
            .map_or(retry.at_ms, |expiry| retry.at_ms.min(expiry));
        meta.state = lease.state.clone();
        meta.state.attempts = meta.state.attempts.saturating_add(1);
        meta.state.last_attempt_ms = Some(now);
        meta.state.last_response = Some(retry.response.clone());
        meta.state.next_attempt_ms = if bounce.is_some() { now } else { at_ms };
        meta.state.bounce_requested = bounce;
        let inline = (meta.body == BodyRef::Inline).then_some(&lease.message.body);
        let msg_id = format!(
            "{}.{}.a{}",
            lease.key.id,
            entry::token(&lease.key.domain, true),
            meta.state.attempts
        );
        self.publish_meta(&resources, &meta, inline, &token.subject, msg_id)
            .await?;
        token
            .message
            .double_ack()
            .await
            .map_err(|e| self.ack_err("ack deferred", &lease, e))
    }

    /// Publishes an entry with `meta` for the due subject `target`: directly when it is due,
    /// else as a schedule on its deferred subject.
    async fn publish_meta(
        &self,
        resources: &Resources,
        meta: &EntryMeta,
        inline: Option<&Bytes>,
        target: &str,
        msg_id: String,
    ) -> Result<(), JetStreamError> {
        let json = serde_json::to_vec(meta).map_err(|e| JetStreamError::Publish {
            stream: self.options.stream.clone(),
            subject: target.to_string(),
            msg_id: msg_id.clone(),
            source: boxed(e),
        })?;
        let id = meta.envelope.id;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id.as_str());
        headers.insert(
            async_nats::header::NATS_EXPECTED_STREAM,
            self.options.stream.as_str(),
        );
        headers.insert(entry::HEADER_ID, id.to_string().as_str());
        headers.insert(entry::HEADER_META_SIZE, json.len().to_string());
        let due = meta.state.next_attempt_ms <= now_ms();
        let subject = if due {
            target.to_string()
        } else {
            let (policy, domain) = match self.subjects.parse_place(target) {
                Some(Place::Due { policy, domain }) => (policy, domain),
                _ => {
                    return Err(JetStreamError::Invalid(format!(
                        "{target} is not an entry subject"
                    )));
                }
            };
            headers.insert(
                async_nats::header::NATS_SCHEDULE,
                format!("@at {}", entry::rfc3339_from_ms(meta.state.next_attempt_ms)).as_str(),
            );
            headers.insert(async_nats::header::NATS_SCHEDULE_TARGET, target);
            self.subjects.deferred_subject(&policy, id, &domain)
        };
        let outgoing = Outgoing {
            subject,
            msg_id,
            headers,
            payload: entry::encode_payload(&json, inline),
            verify_duplicate: false,
        };
        let deadline = Instant::now() + self.options.publish_timeout;
        self.publish_entry(resources, &outgoing, id, deadline)
            .await
            .map(|_| ())
    }

    pub(super) async fn entry_statuses(
        &self,
        id: QueueId,
    ) -> Result<Vec<EntryStatus>, JetStreamError> {
        let resources = self.ready().await?;
        self.watch_admin(&resources);
        let entries = self.entries_of(&resources, id, false, false).await?;
        let bounce = self.admin_bounce(&resources, id).await?;
        let mut out: Vec<EntryStatus> = entries
            .into_iter()
            .map(|e| {
                let domain = match self.subjects.parse_place(&e.subject) {
                    Some(Place::Due { domain, .. } | Place::Deferred { domain, .. }) => domain,
                    None => String::new(),
                };
                let mut state = e.meta.state;
                if state.bounce_requested.is_none() {
                    state.bounce_requested = bounce.clone();
                }
                EntryStatus {
                    key: EntryKey { id, domain },
                    recipients: e
                        .meta
                        .envelope
                        .recipients
                        .iter()
                        .map(|r| r.address.clone())
                        .collect(),
                    state,
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// The bounce request of `id` straight from the admin bucket.
    async fn admin_bounce(
        &self,
        resources: &Resources,
        id: QueueId,
    ) -> Result<Option<String>, JetStreamError> {
        let key = format!("bounce.{id}");
        resources
            .admin
            .get(&key)
            .await
            .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(|e| JetStreamError::Kv {
                op: "get",
                bucket: self.options.admin_bucket(),
                key,
                source: boxed(e),
            })
    }

    /// Makes the deferred entries of `id` due now (with the bounce mark when given). Returns
    /// how many it moved.
    pub(super) async fn retry_now(
        &self,
        id: QueueId,
        bounce: Option<&str>,
    ) -> Result<usize, JetStreamError> {
        let resources = self.ready().await?;
        let entries = self.entries_of(&resources, id, true, false).await?;
        let mut moved = 0;
        for e in entries {
            let Some(Place::Deferred { policy, domain, .. }) =
                self.subjects.parse_place(&e.subject)
            else {
                continue;
            };
            // Whoever deletes the schedule message moves the entry; if it fired meanwhile
            // it is due already.
            match resources.stream.delete_message(e.seq).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => {
                    tracing::debug!(%id, seq = e.seq, error = %err, "schedule gone before retry");
                    continue;
                }
            }
            let mut meta = e.meta;
            meta.state.next_attempt_ms = now_ms();
            if let Some(reason) = bounce {
                meta.state.bounce_requested = Some(reason.to_string());
            }
            let inline = (meta.body == BodyRef::Inline).then_some(&e.body);
            let target = self.subjects.subject(&policy, &domain);
            let msg_id = format!("{id}.{}.r{}", entry::token(&domain, true), QueueId::new());
            self.publish_meta(&resources, &meta, inline, &target, msg_id)
                .await?;
            moved += 1;
        }
        Ok(moved)
    }

    pub(super) async fn request_bounce(
        &self,
        id: QueueId,
        reason: &str,
    ) -> Result<usize, JetStreamError> {
        let resources = self.ready().await?;
        let entries = self.entries_of(&resources, id, false, false).await?;
        if entries.is_empty() {
            return Ok(0);
        }
        let key = format!("bounce.{id}");
        resources
            .admin
            .put(&key, Bytes::from(reason.to_string()))
            .await
            .map_err(|e| JetStreamError::Kv {
                op: "put",
                bucket: self.options.admin_bucket(),
                key,
                source: boxed(e),
            })?;
        self.bounces
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, reason.to_string());
        self.retry_now(id, Some(reason)).await?;
        Ok(entries.len())
    }

    pub(super) async fn backlogs(&self) -> Result<Backlogs, JetStreamError> {
        let resources = self.ready().await?;
        let mut due: HashMap<String, u64> = HashMap::new();
        let mut out = Backlogs::new();
        for (place, count) in self.subject_counts(&resources, ">").await? {
            match place {
                Place::Due { policy, domain } => {
                    *due.entry(policy.clone()).or_default() += count;
                    *out.entry(policy)
                        .or_default()
                        .due_by_domain
                        .entry(domain)
                        .or_default() += count;
                }
                Place::Deferred { policy, domain, .. } => {
                    let b = out.entry(policy).or_default();
                    b.deferred += count;
                    *b.deferred_by_domain.entry(domain).or_default() += count;
                }
            }
        }
        for (policy, count) in due {
            let leased = match resources.stream.consumer_info(consumer_name(&policy)).await {
                Ok(info) => info.num_ack_pending as u64,
                Err(_) => 0,
            };
            let b: &mut Backlog = out.entry(policy).or_default();
            b.leased = leased.min(count);
            b.ready = count - b.leased;
        }
        Ok(out)
    }

    /// Deferred entries carry their queue id in the subject; for due entries (one subject per
    /// domain, in arrival order) the first message's `Mailroom-Id` is the oldest. An entry
    /// retried after a deferral goes to the end of its due subject, so for due mail this is
    /// the oldest entry still on its first wait, which a deferred one older than it outranks.
    pub(super) async fn oldest_queued(
        &self,
        policy: &str,
        domains: &[String],
    ) -> Result<BTreeMap<String, u64>, JetStreamError> {
        use jetstream::stream::DirectGetErrorKind as K;
        let resources = self.ready().await?;
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        let mut note = |domain: &str, at: u64| {
            let slot = out.entry(domain.to_owned()).or_insert(u64::MAX);
            *slot = (*slot).min(at);
        };
        let filter = self.subjects.deferred_filter(policy);
        for (place, _) in self.subject_counts(&resources, &filter).await? {
            if let Place::Deferred { id, domain, .. } = place
                && domains.contains(&domain)
            {
                note(&domain, id.timestamp_ms());
            }
        }
        for domain in domains {
            let subject = self.subjects.subject(policy, domain);
            match resources.stream.direct_get_first_for_subject(subject).await {
                Ok(first) => {
                    if let Some(id) = first
                        .headers
                        .get(entry::HEADER_ID)
                        .and_then(|v| entry::parse_id(v.as_str()))
                    {
                        note(domain, id.timestamp_ms());
                    }
                }
                Err(e) if e.kind() == K::NotFound => {}
                Err(e) => {
                    return Err(JetStreamError::Stream {
                        op: "direct get",
                        stream: self.options.stream.clone(),
                        source: boxed(e),
                    });
                }
            }
        }
        Ok(out)
    }
}
