//! The wire format of one stream entry: subjects, headers and the JSON metadata that precedes
//! an inline body in the payload.
//!
//! An entry is the part of a message for ONE destination domain:
//!
//! - subject `<root>.q.<policy>.<domain>` (see [`Subjects`]; tokens that are not plain DNS
//!   names are hex-encoded so the subject stays valid and the mapping stays injective);
//! - headers `Nats-Msg-Id: <queue-id>.<domain-token>` (server-side de-duplication),
//!   `Mailroom-Id: <queue-id>` (so scans can pick an id's entries without parsing JSON) and
//!   `Mailroom-Meta-Size: <n>`;
//! - payload: `n` octets of [`EntryMeta`] JSON, then the body octets when the body is inline
//!   (nothing when it lives in the Object Store).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{DeliveryState, Envelope, QueueId, Recipient};

/// The subjects of one queue stream. Their root is the stream's name in lowercase
/// (`MAILROOM` -> `mailroom`), so streams never overlap (NATS refuses two streams with
/// overlapping subjects) and each stream's mail stays its own: the operator gives every
/// namespace a stream, and a policy of the same name in two namespaces shares nothing.
///
/// - `<root>.q.<policy>.<domain>`: entries due now (what the workers' consumers read);
/// - `<root>.d.<policy>.<queue-id>.<domain>`: a deferred entry, one message with a
///   `Nats-Schedule` that publishes it to its `q` subject at its retry time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Subjects {
    due: String,
    deferred: String,
}

impl Subjects {
    /// The subjects of stream `stream`.
    pub(crate) fn for_stream(stream: &str) -> Self {
        let root = stream.to_ascii_lowercase();
        Self {
            due: format!("{root}.q."),
            deferred: format!("{root}.d."),
        }
    }

    /// The stream's subjects: every due and every deferred entry.
    pub(crate) fn stream_subjects(&self) -> Vec<String> {
        vec![format!("{}>", self.due), format!("{}>", self.deferred)]
    }

    /// The subject of the entry for `policy` and `domain`: `<root>.q.<policy>.<domain>`.
    pub(crate) fn subject(&self, policy: &str, domain: &str) -> String {
        format!(
            "{}{}.{}",
            self.due,
            token(policy, false),
            token(domain, true)
        )
    }

    /// The subject filter of every due entry of `policy`: `<root>.q.<policy>.>`.
    pub(crate) fn policy_filter(&self, policy: &str) -> String {
        format!("{}{}.>", self.due, token(policy, false))
    }

    /// The subject filter of every deferred entry of `policy`: `<root>.d.<policy>.>`.
    pub(crate) fn deferred_filter(&self, policy: &str) -> String {
        format!("{}{}.>", self.deferred, token(policy, false))
    }

    /// The subject of a deferred entry.
    pub(crate) fn deferred_subject(&self, policy: &str, id: QueueId, domain: &str) -> String {
        format!(
            "{}{}.{id}.{}",
            self.deferred,
            token(policy, false),
            token(domain, true)
        )
    }

    /// The (policy, domain) of a due entry subject, decoded; `None` for a subject outside the
    /// layout.
    pub(crate) fn parse_subject(&self, subject: &str) -> Option<(String, String)> {
        let rest = subject.strip_prefix(&self.due)?;
        let (policy, domain) = rest.split_once('.')?;
        Some((untoken(policy)?, untoken(domain)?))
    }

    /// Parses a due or deferred entry subject.
    pub(crate) fn parse_place(&self, subject: &str) -> Option<Place> {
        if let Some((policy, domain)) = self.parse_subject(subject) {
            return Some(Place::Due { policy, domain });
        }
        let rest = subject.strip_prefix(&self.deferred)?;
        let (policy, rest) = rest.split_once('.')?;
        let (id, domain) = rest.split_once('.')?;
        Some(Place::Deferred {
            policy: untoken(policy)?,
            id: id.parse().ok()?,
            domain: untoken(domain)?,
        })
    }
}

/// Header: the queue id of the message the entry belongs to.
pub(crate) const HEADER_ID: &str = "Mailroom-Id";
/// Header: length of the JSON metadata at the start of the payload.
pub(crate) const HEADER_META_SIZE: &str = "Mailroom-Meta-Size";
/// The current entry format.
pub(crate) const FORMAT: u32 = 1;

/// Where an entry's body is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum BodyRef {
    /// After the metadata, in the same payload.
    Inline,
    /// In the Object Store: bucket and object name (the queue id).
    Object { bucket: String, name: String },
}

/// The JSON metadata at the start of every entry's payload.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(crate) struct EntryMeta {
    /// Entry format version ([`FORMAT`]).
    pub format: u32,
    /// Number of domain entries the message was split into at enqueue.
    pub parts: usize,
    /// For each recipient of `envelope`, its index in the original envelope (so `get` restores
    /// the original recipient order).
    pub rcpt_index: Vec<usize>,
    /// Body size in octets.
    pub body_size: u64,
    /// Where the body is.
    pub body: BodyRef,
    /// The envelope, with only this domain's recipients.
    pub envelope: Envelope,
    /// The delivery history (absent in entries never deferred).
    #[serde(default, skip_serializing_if = "is_fresh")]
    pub state: DeliveryState,
}

fn is_fresh(state: &DeliveryState) -> bool {
    *state == DeliveryState::default()
}

/// Where an entry is: due (`<root>.q.<policy>.<domain>`) or deferred
/// (`<root>.d.<policy>.<id>.<domain>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    Due {
        policy: String,
        domain: String,
    },
    Deferred {
        policy: String,
        id: QueueId,
        domain: String,
    },
}

/// One entry to publish: the recipients of one destination domain.
#[derive(Clone, Debug)]
pub(crate) struct PlannedEntry {
    /// The destination domain as in [`Recipient::domain`].
    pub domain: String,
    /// The entry subject.
    pub subject: String,
    /// The `Nats-Msg-Id`.
    pub msg_id: String,
    /// Indices of this domain's recipients in the original envelope.
    pub rcpt_index: Vec<usize>,
    /// The envelope restricted to this domain's recipients.
    pub envelope: Envelope,
}

/// Splits an envelope into one entry per destination domain, in order of first appearance.
/// An envelope without recipients still yields one entry (domain `""`), so nothing is dropped.
pub(crate) fn plan(subjects: &Subjects, envelope: &Envelope) -> Vec<PlannedEntry> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, recipient) in envelope.recipients.iter().enumerate() {
        match groups.iter_mut().find(|(d, _)| *d == recipient.domain) {
            Some((_, indices)) => indices.push(i),
            None => groups.push((recipient.domain.clone(), vec![i])),
        }
    }
    if groups.is_empty() {
        groups.push((String::new(), Vec::new()));
    }
    groups
        .into_iter()
        .map(|(domain, rcpt_index)| {
            let mut part = envelope.clone();
            part.recipients = rcpt_index
                .iter()
                .filter_map(|&i| envelope.recipients.get(i).cloned())
                .collect();
            let token = token(&domain, true);
            PlannedEntry {
                subject: subjects.subject(&envelope.policy, &domain),
                msg_id: format!("{}.{token}", envelope.id),
                domain,
                rcpt_index,
                envelope: part,
            }
        })
        .collect()
}

/// Encodes a name as subject token(s). Plain names (ASCII letters, digits, `-`, `[`, `]`, `:`,
/// and `.` between non-empty labels when `dotted`) are used as they are; anything else
/// (empty, spaces, wildcards, non-ASCII, a leading `_`) becomes `_` + lowercase hex of its
/// UTF-8 octets, a single token. Plain names never start with `_`, so the mapping is injective.
pub(crate) fn token(name: &str, dotted: bool) -> String {
    let plain = !name.is_empty()
        && !name.starts_with('_')
        && name.split('.').all(|label| !label.is_empty())
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '[' | ']' | ':')
                || (dotted && c == '.')
        });
    if plain {
        return name.to_string();
    }
    let mut out = String::with_capacity(1 + 2 * name.len());
    out.push('_');
    for b in name.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Inverse of [`token`]; `None` for a malformed hex token.
pub(crate) fn untoken(token: &str) -> Option<String> {
    let Some(hex) = token.strip_prefix('_') else {
        return Some(token.to_string());
    };
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Encodes the payload: metadata JSON, then the inline body (if any).
pub(crate) fn encode_payload(meta_json: &[u8], inline_body: Option<&Bytes>) -> Bytes {
    let mut payload =
        Vec::with_capacity(meta_json.len() + inline_body.map(|b| b.len()).unwrap_or(0));
    payload.extend_from_slice(meta_json);
    if let Some(body) = inline_body {
        payload.extend_from_slice(body);
    }
    Bytes::from(payload)
}

/// Splits a payload into its metadata and the bytes after it (the inline body, or nothing).
pub(crate) fn decode_payload(
    payload: &Bytes,
    meta_size: usize,
) -> Result<(EntryMeta, Bytes), String> {
    let json = payload.get(..meta_size).ok_or_else(|| {
        format!(
            "payload of {} octets is shorter than its metadata ({meta_size})",
            payload.len()
        )
    })?;
    let meta: EntryMeta =
        serde_json::from_slice(json).map_err(|e| format!("metadata JSON: {e}"))?;
    if meta.format != FORMAT {
        return Err(format!("unknown entry format {}", meta.format));
    }
    if meta.rcpt_index.len() != meta.envelope.recipients.len() {
        return Err("recipient index does not match the recipients".into());
    }
    let rest = payload.slice(meta_size..);
    if meta.body == BodyRef::Inline && rest.len() as u64 != meta.body_size {
        return Err(format!(
            "inline body has {} octets, metadata says {}",
            rest.len(),
            meta.body_size
        ));
    }
    Ok((meta, rest))
}

/// Merges the domain entries of one message back into one envelope: the first entry's fields,
/// every entry's recipients in their original order.
pub(crate) fn merge_envelopes<'a>(
    parts: impl IntoIterator<Item = &'a EntryMeta>,
) -> Option<Envelope> {
    let mut base: Option<Envelope> = None;
    let mut recipients: Vec<(usize, Recipient)> = Vec::new();
    for meta in parts {
        recipients.extend(
            meta.rcpt_index
                .iter()
                .copied()
                .zip(meta.envelope.recipients.iter().cloned()),
        );
        if base.is_none() {
            base = Some(meta.envelope.clone());
        }
    }
    let mut envelope = base?;
    recipients.sort_by_key(|(i, _)| *i);
    recipients.dedup_by_key(|(i, _)| *i);
    envelope.recipients = recipients.into_iter().map(|(_, r)| r).collect();
    Some(envelope)
}

/// Parses the `Mailroom-Id` header value.
pub(crate) fn parse_id(value: &str) -> Option<QueueId> {
    value.parse().ok()
}

/// RFC 3339 UTC timestamp (`2026-11-28T18:30:00.123Z`) of Unix milliseconds, for the
/// `start_time` of a direct-get request.
pub(crate) fn rfc3339_from_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let millis = ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::contract::envelope;

    #[test]
    fn tokens_roundtrip_and_stay_valid() {
        for name in [
            "example.com",
            "a-b.example",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "",
            "bad domain",
            "a..b",
            ".lead",
            "trail.",
            "wild*",
            "gt>",
            "_dmarc.example",
            "bücher.example",
        ] {
            let t = token(name, true);
            assert_eq!(untoken(&t).as_deref(), Some(name), "{name:?} -> {t:?}");
            assert!(!t.is_empty());
            assert!(!t.contains(['*', '>', ' ', '\t', '\r', '\n']));
            assert!(t.split('.').all(|label| !label.is_empty()), "{t:?}");
        }
        assert_eq!(token("example.com", true), "example.com");
        assert_eq!(token("example.com", false), "_6578616d706c652e636f6d");
        assert_eq!(token("", true), "_");
        assert_eq!(token("default", false), "default");
    }

    #[test]
    fn subjects() {
        let s = Subjects::for_stream("MAILROOM");
        assert_eq!(
            s.subject("default", "example.com"),
            "mailroom.q.default.example.com"
        );
        assert_eq!(s.policy_filter("default"), "mailroom.q.default.>");
        assert_eq!(
            s.parse_subject("mailroom.q.default.example.com"),
            Some(("default".into(), "example.com".into()))
        );
        assert_eq!(s.parse_subject("other.subject"), None);
        let id = QueueId::new();
        assert_eq!(
            s.parse_place(&s.deferred_subject("default", id, "example.com")),
            Some(Place::Deferred {
                policy: "default".into(),
                id,
                domain: "example.com".into()
            })
        );
        // Another stream (another namespace) has subjects of its own.
        let other = Subjects::for_stream("MAILROOM-team-b");
        assert_eq!(
            other.subject("default", "example.com"),
            "mailroom-team-b.q.default.example.com"
        );
        assert_eq!(other.parse_subject("mailroom.q.default.example.com"), None);
        assert_eq!(
            other.stream_subjects(),
            ["mailroom-team-b.q.>", "mailroom-team-b.d.>"]
        );
    }

    #[test]
    fn plan_splits_per_domain_and_merge_restores_order() {
        let envelope = envelope(
            "s@x.org",
            &[
                "a@one.example",
                "b@two.example",
                "c@one.example",
                "d@three.example",
            ],
        );
        let plan = plan(&Subjects::for_stream("MAILROOM"), &envelope);
        assert_eq!(plan.len(), 3);
        assert_eq!(plan[0].domain, "one.example");
        assert_eq!(plan[0].rcpt_index, vec![0, 2]);
        assert_eq!(plan[0].subject, "mailroom.q.default.one.example");
        assert_eq!(plan[0].msg_id, format!("{}.one.example", envelope.id));
        let metas: Vec<EntryMeta> = plan
            .iter()
            .rev()
            .map(|p| EntryMeta {
                format: FORMAT,
                parts: 3,
                rcpt_index: p.rcpt_index.clone(),
                body_size: 0,
                body: BodyRef::Inline,
                envelope: p.envelope.clone(),
                state: DeliveryState::default(),
            })
            .collect();
        assert_eq!(merge_envelopes(&metas), Some(envelope));
    }

    #[test]
    fn plan_without_recipients_keeps_one_entry() {
        let envelope = envelope("s@x.org", &[]);
        let plan = plan(&Subjects::for_stream("MAILROOM"), &envelope);
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].subject, "mailroom.q.default._");
    }

    #[test]
    fn payload_roundtrip() {
        let envelope = envelope("s@x.org", &["a@one.example"]);
        let meta = EntryMeta {
            format: FORMAT,
            parts: 1,
            rcpt_index: vec![0],
            body_size: 5,
            body: BodyRef::Inline,
            envelope,
            state: DeliveryState::default(),
        };
        let json = serde_json::to_vec(&meta).unwrap();
        let payload = encode_payload(&json, Some(&Bytes::from_static(b"hello")));
        let (decoded, body) = decode_payload(&payload, json.len()).unwrap();
        assert_eq!(decoded, meta);
        assert_eq!(&body[..], b"hello");
        assert!(decode_payload(&payload, json.len() + 1).is_err());
        assert!(decode_payload(&payload, payload.len() + 1).is_err());
    }

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_from_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_from_ms(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(rfc3339_from_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
