//! The queued-message model: envelope, recipients, the stored message and the summaries that
//! `list` and `stats` return.

use std::collections::BTreeMap;
use std::net::IpAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::QueueId;

/// The SMTP envelope of a queued message plus what we know about its reception.
/// Stored as JSON next to the body; new fields must be optional so old entries still load.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Envelope {
    /// The queue id (`queued as <id>`).
    pub id: QueueId,
    /// The reverse-path (MAIL FROM); `""` is the null reverse-path `<>`.
    pub sender: String,
    /// The recipients still to deliver to.
    pub recipients: Vec<Recipient>,
    /// DSN `RET=` (RFC 3461).
    pub ret: Option<mailroom_smtp::Ret>,
    /// DSN `ENVID=` (RFC 3461), xtext-decoded.
    pub envid: Option<String>,
    /// `BODY=` of MAIL FROM.
    pub body_type: Option<mailroom_smtp::Body>,
    /// The message was sent with `SMTPUTF8`.
    pub smtputf8: bool,
    /// Reception time, Unix milliseconds.
    pub received_at_ms: u64,
    /// Name of the listener that received it.
    pub listener: String,
    /// The client's address (after PROXY protocol), if known.
    pub client_ip: Option<IpAddr>,
    /// The HELO/EHLO argument.
    pub helo: Option<String>,
    /// The authenticated user, if the session authenticated.
    pub auth_user: Option<String>,
    /// The delivery policy name (`"default"` for now).
    pub policy: String,
    /// The `Message-ID` header value, if the message had one.
    pub message_id: Option<String>,
}

/// One envelope recipient (RCPT TO) with its DSN parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Recipient {
    /// The forward-path as received (without angle brackets).
    pub address: String,
    /// The domain part, lowercased (the delivery destination).
    pub domain: String,
    /// DSN `NOTIFY=`.
    pub notify: Option<mailroom_smtp::Notify>,
    /// DSN `ORCPT=`.
    pub orcpt: Option<mailroom_smtp::Orcpt>,
}

/// A message as the queue stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredMessage {
    /// The envelope.
    pub envelope: Envelope,
    /// The complete RFC 5322 message including our `Received` header, CRLF line endings.
    pub body: Bytes,
}

/// One line of `list`: what an operator needs to see without reading the body.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EntrySummary {
    /// The queue id.
    pub id: QueueId,
    /// The reverse-path (`""` for `<>`).
    pub sender: String,
    /// Number of recipients.
    pub recipients: usize,
    /// The distinct recipient domains, sorted.
    pub domains: Vec<String>,
    /// Body size in octets.
    pub size: u64,
    /// Reception time, Unix milliseconds.
    pub received_at_ms: u64,
}

impl EntrySummary {
    /// The summary of an envelope whose body has `size` octets.
    pub fn of(envelope: &Envelope, size: u64) -> Self {
        let mut domains: Vec<String> = envelope
            .recipients
            .iter()
            .map(|r| r.domain.clone())
            .collect();
        domains.sort();
        domains.dedup();
        EntrySummary {
            id: envelope.id,
            sender: envelope.sender.clone(),
            recipients: envelope.recipients.len(),
            domains,
            size,
            received_at_ms: envelope.received_at_ms,
        }
    }
}

/// Totals over a queue.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Number of queued messages.
    pub messages: u64,
    /// Sum of their body sizes in octets.
    pub bytes: u64,
    /// Reception time of the oldest message.
    pub oldest_received_at_ms: Option<u64>,
    /// Number of queued messages with at least one recipient in each domain.
    pub by_domain: BTreeMap<String, u64>,
}
