//! What the worker writes about an attempt: delivery-log lines, and delivery status
//! notifications to the sender (failures, expirations, the optional delay warning), queued
//! before the lease is acked.

use std::net::IpAddr;

use mailroom_queue::{Envelope, Lease, QueueError, QueueId, Recipient, StoredMessage};
use serde_json::{Map, Value, json};

use super::{Attempt, Inner, MAX_RETURNED_BODY};
use crate::dsn::{self, Action, DsnInput, RecipientReport};
use crate::metrics;
use crate::outcome::RecipientOutcome;

impl Inner {
    /// Logs the permanent failures and queues one DSN for those the sender asked to hear of.
    pub(super) async fn bounce(
        &self,
        lease: &Lease,
        bounced: &[(Recipient, RecipientOutcome)],
        attempt: &Attempt,
        expired: bool,
        now: u64,
    ) -> Result<(), QueueError> {
        if bounced.is_empty() {
            return Ok(());
        }
        let event = if expired { "expiration" } else { "bounce" };
        let mut reports = Vec::with_capacity(bounced.len());
        for (recipient, outcome) in bounced {
            self.log(
                event,
                lease,
                recipient,
                outcome.response(),
                attempt,
                Map::new(),
            );
            let status = match outcome {
                RecipientOutcome::Permanent { status, .. } => *status,
                _ => (5, 0, 0),
            };
            reports.push(RecipientReport {
                recipient: recipient.clone(),
                action: Action::Failed,
                status,
                remote_mta: attempt.host.clone(),
                diagnostic: Some(outcome.response().to_string()),
                last_attempt_ms: Some(now),
                will_retry_until_ms: None,
            });
        }
        metrics::RECIPIENTS
            .with_label_values(&[
                self.spec.name.as_str(),
                if expired { "expired" } else { "bounced" },
            ])
            .inc_by(bounced.len() as u64);
        self.report(lease, &reports, now).await
    }

    /// Queues one delivery status notification about `reports` to the message's sender (none
    /// for the null sender or when no recipient asked for it).
    pub(super) async fn report(
        &self,
        lease: &Lease,
        reports: &[RecipientReport],
        now: u64,
    ) -> Result<(), QueueError> {
        let from = self
            .spec
            .bounces
            .from
            .clone()
            .unwrap_or_else(|| format!("MAILER-DAEMON@{}", self.deps.hostname));
        let input = DsnInput {
            reporting_mta: &self.deps.hostname,
            from: &from,
            envelope: &lease.message.envelope,
            original: &lease.message.body,
            reports,
            arrival_ms: lease.message.envelope.received_at_ms,
            now_ms: now,
            message_id_domain: &self.deps.hostname,
            max_returned_body: MAX_RETURNED_BODY,
        };
        let Some(report) = dsn::build(&input) else {
            return Ok(());
        };
        let domain = report
            .recipient
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        let id = QueueId::new();
        let message = StoredMessage {
            envelope: Envelope {
                id,
                sender: report.sender,
                recipients: vec![Recipient {
                    address: report.recipient.clone(),
                    domain,
                    notify: None,
                    orcpt: None,
                }],
                ret: None,
                envid: None,
                body_type: Some(report.body),
                smtputf8: report.smtputf8,
                received_at_ms: now,
                listener: "bounce".into(),
                client_ip: None,
                helo: None,
                auth_user: None,
                policy: self.spec.name.clone(),
                message_id: header_value(&report.message, "Message-ID"),
            },
            body: report.message.into(),
        };
        self.deps.queue.enqueue(message).await?;
        let mut fields = Map::new();
        fields.insert("queue_id".into(), json!(id.to_string()));
        fields.insert("original_queue_id".into(), json!(lease.key.id.to_string()));
        fields.insert("recipient".into(), json!(report.recipient));
        fields.insert("policy".into(), json!(self.spec.name));
        fields.insert(
            "action".into(),
            json!(reports.first().map(|r| r.action.as_str())),
        );
        self.deps.delivery_log.record("dsn_queued", fields);
        Ok(())
    }

    /// Sends the one "delayed" notification when this attempt is the first after the
    /// policy's `bounces.delayWarningAfter` (no state needed: the previous attempt was before
    /// the threshold).
    pub(super) async fn warn_if_delayed(
        &self,
        lease: &Lease,
        pending: &[Recipient],
        response: &str,
        attempt: &Attempt,
        now: u64,
        retry_until: Option<u64>,
    ) -> Result<(), QueueError> {
        let Some(after) = &self.spec.bounces.delay_warning_after else {
            return Ok(());
        };
        let threshold = lease
            .message
            .envelope
            .received_at_ms
            .saturating_add(u64::try_from(after.as_duration().as_millis()).unwrap_or(u64::MAX));
        let crossed_now = now >= threshold
            && lease
                .state
                .last_attempt_ms
                .is_none_or(|last| last < threshold);
        if !crossed_now {
            return Ok(());
        }
        let reports: Vec<RecipientReport> = pending
            .iter()
            .map(|r| RecipientReport {
                recipient: r.clone(),
                action: Action::Delayed,
                status: (4, 0, 0),
                remote_mta: attempt.host.clone(),
                diagnostic: Some(response.to_string()),
                last_attempt_ms: Some(now),
                will_retry_until_ms: retry_until,
            })
            .collect();
        self.report(lease, &reports, now).await
    }

    pub(super) fn log(
        &self,
        event: &str,
        lease: &Lease,
        recipient: &Recipient,
        response: &str,
        attempt: &Attempt,
        extra: Map<String, Value>,
    ) {
        let envelope = &lease.message.envelope;
        let mut fields = Map::new();
        fields.insert("queue_id".into(), json!(lease.key.id.to_string()));
        fields.insert("message_id".into(), json!(envelope.message_id));
        fields.insert("sender".into(), json!(envelope.sender));
        fields.insert("recipient".into(), json!(recipient.address));
        fields.insert("domain".into(), json!(lease.key.domain));
        fields.insert("policy".into(), json!(self.spec.name));
        fields.insert("host".into(), json!(attempt.host));
        fields.insert(
            "ip".into(),
            json!(
                attempt
                    .addr
                    .map(|a| a.ip())
                    .map(|ip: IpAddr| ip.to_string())
            ),
        );
        fields.insert("tls".into(), json!(attempt.tls));
        fields.insert("response".into(), json!(response));
        fields.insert("deliveries".into(), json!(lease.deliveries));
        fields.extend(extra);
        self.deps.delivery_log.record(event, fields);
    }
}

/// The value of the first header field `name` of a message (unfolded lines only).
fn header_value(message: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next()?;
    head.split("\r\n").find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}
