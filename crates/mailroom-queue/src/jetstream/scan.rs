//! Reading the stream without a consumer: batched Direct Get (`$JS.API.DIRECT.GET.<stream>`
//! with `next_by_subj`, `batch`, `max_bytes`, `start_time`; nats-server 2.11+).
//!
//! A work-queue stream refuses consumers whose filters overlap (the workers' pull consumers
//! will cover `mailroom.q.<policy>.>`) and consumers without explicit acks, so the admin
//! operations cannot use an ordered consumer; Direct Get reads any message without touching
//! consumer state. async-nats 0.51 has no batch Direct Get, so this sends the request itself and
//! reads the replies from an inbox until the `204 EOB` (or `404`, nothing left).
//!
//! Cost: every entry from the start point up to the stream's last sequence at scan start is
//! transferred once, inline bodies included (at most `max_bytes` per round trip).

use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;

use super::entry::{self, EntryMeta};
use super::error::{JetStreamError, msg};
use crate::QueueId;

/// Messages asked for per Direct Get request.
const BATCH: usize = 256;
/// Payload octets asked for per Direct Get request (the server sends at least one message).
const MAX_BYTES: usize = 8 << 20;

/// One entry read from the stream.
#[derive(Debug)]
pub(crate) struct Scanned {
    /// Stream sequence.
    pub seq: u64,
    /// Entry subject.
    pub subject: String,
    /// The queue id (`Mailroom-Id`).
    pub id: QueueId,
    /// The decoded metadata.
    pub meta: EntryMeta,
    /// The inline body (empty for object bodies); only kept when asked for.
    pub body: Bytes,
}

/// Where a scan starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Start {
    /// The first entry of the stream.
    First,
    /// The first entry stored at or after this Unix time in milliseconds.
    Time(u64),
}

#[derive(Serialize)]
struct Request<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_time: Option<String>,
    next_by_subj: &'a str,
    batch: usize,
    max_bytes: usize,
}

/// Scans `stream` from `start` up to sequence `last_seq`, calling `keep` with each entry's
/// queue id to decide whether to decode it (`Some(true)`: decode and keep its body too,
/// `Some(false)`: decode metadata only, `None`: skip). Entries without a readable queue id are
/// logged and skipped; a wanted entry that does not decode is an error when `strict`, else
/// logged and skipped.
pub(crate) async fn scan(
    client: &Client,
    stream: &str,
    last_seq: u64,
    start: Start,
    timeout: Duration,
    mut keep: impl FnMut(QueueId) -> Option<bool>,
    strict: bool,
) -> Result<Vec<Scanned>, JetStreamError> {
    let mut out = Vec::new();
    if last_seq == 0 {
        return Ok(out);
    }
    let api = format!("$JS.API.DIRECT.GET.{stream}");
    let stream_err = |op: &'static str, e: async_nats::Error| JetStreamError::Stream {
        op,
        stream: stream.to_string(),
        source: e,
    };
    let mut next: Option<u64> = None;
    loop {
        let request = Request {
            seq: next,
            start_time: match (next, start) {
                (None, Start::Time(ms)) => Some(entry::rfc3339_from_ms(ms)),
                _ => None,
            },
            // Every subject of the stream is a queue entry's.
            next_by_subj: ">",
            batch: BATCH,
            max_bytes: MAX_BYTES,
        };
        let payload = serde_json::to_vec(&request)
            .map_err(|e| stream_err("encode direct get request", Box::new(e)))?;
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| stream_err("subscribe for direct get", Box::new(e)))?;
        client
            .publish_with_reply(api.clone(), inbox, Bytes::from(payload))
            .await
            .map_err(|e| stream_err("direct get", Box::new(e)))?;
        let mut received = 0usize;
        let mut exhausted = false;
        loop {
            let reply = match tokio::time::timeout(timeout, replies.next()).await {
                Ok(Some(reply)) => reply,
                Ok(None) => {
                    return Err(stream_err("direct get", msg("reply subscription closed")));
                }
                Err(_) => {
                    return Err(JetStreamError::Timeout {
                        op: format!("direct get on stream {stream}"),
                        after: timeout,
                    });
                }
            };
            match reply.status.map(u16::from) {
                None | Some(200) => {}
                Some(204) => break,
                Some(404) => {
                    exhausted = true;
                    break;
                }
                Some(code) => {
                    return Err(stream_err(
                        "direct get",
                        msg(format!(
                            "status {code} {}",
                            reply.description.as_deref().unwrap_or_default()
                        )),
                    ));
                }
            }
            received += 1;
            let headers = reply.headers.unwrap_or_default();
            let seq = header(&headers, "Nats-Sequence")
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| stream_err("direct get", msg("reply without Nats-Sequence")))?;
            next = Some(seq + 1);
            if seq > last_seq {
                // Stored after the scan started: not part of this snapshot.
                continue;
            }
            let subject = header(&headers, "Nats-Subject")
                .unwrap_or_default()
                .to_string();
            let decoded = decode(&headers, &reply.payload, &mut keep);
            match decoded {
                Ok(None) => {}
                Ok(Some((id, meta, body))) => out.push(Scanned {
                    seq,
                    subject,
                    id,
                    meta,
                    body,
                }),
                Err(Undecodable {
                    wanted: true,
                    reason,
                }) if strict => {
                    return Err(JetStreamError::Corrupt {
                        stream: stream.to_string(),
                        seq,
                        subject,
                        reason,
                    });
                }
                Err(Undecodable { reason, .. }) => {
                    tracing::warn!(stream, seq, %subject, %reason, "skipping unreadable queue entry");
                }
            }
        }
        drop(replies);
        if exhausted || received == 0 || next.is_some_and(|n| n > last_seq) {
            return Ok(out);
        }
    }
}

/// The value of a header, if present.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

type Decoded = Option<(QueueId, EntryMeta, Bytes)>;

/// An entry that could not be decoded; `wanted` when its id was one the caller asked for.
struct Undecodable {
    wanted: bool,
    reason: String,
}

fn decode(
    headers: &HeaderMap,
    payload: &Bytes,
    keep: &mut impl FnMut(QueueId) -> Option<bool>,
) -> Result<Decoded, Undecodable> {
    let foreign = |reason: String| Undecodable {
        wanted: false,
        reason,
    };
    let id = header(headers, entry::HEADER_ID)
        .ok_or_else(|| foreign(format!("no {} header", entry::HEADER_ID)))?;
    let id = entry::parse_id(id)
        .ok_or_else(|| foreign(format!("bad {} header {id:?}", entry::HEADER_ID)))?;
    let Some(with_body) = keep(id) else {
        return Ok(None);
    };
    let corrupt = |reason: String| Undecodable {
        wanted: true,
        reason,
    };
    let meta_size = header(headers, entry::HEADER_META_SIZE)
        .and_then(|s| s.parse::<usize>().ok())
        .ok_or_else(|| corrupt(format!("no or bad {} header", entry::HEADER_META_SIZE)))?;
    let (meta, body) = entry::decode_payload(payload, meta_size).map_err(corrupt)?;
    if meta.envelope.id != id {
        return Err(corrupt(format!(
            "{} header {id} does not match the envelope id {}",
            entry::HEADER_ID,
            meta.envelope.id
        )));
    }
    let body = if with_body { body } else { Bytes::new() };
    Ok(Some((id, meta, body)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::jetstream::{JetStreamOptions, JetStreamQueue};
    use crate::{Queue, contract};

    /// The scan honours its start time and its last sequence, and batches past 256 entries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scan_start_time_and_snapshot() {
        let server = mailroom_testkit::NatsServer::start().unwrap_or_else(|e| {
            panic!("this test needs a nats-server (run e2e/tools/build.sh): {e}")
        });
        let queue = JetStreamQueue::connect(JetStreamOptions {
            urls: vec![server.url()],
            ..JetStreamOptions::default()
        })
        .await
        .unwrap();
        for i in 0..300 {
            let m = contract::message("a@example.org", &[&format!("r{i}@d{}.example", i % 3)]);
            queue.enqueue(m).await.unwrap();
        }
        let client = async_nats::connect(server.url()).await.unwrap();
        let timeout = Duration::from_secs(5);
        let all = |start| {
            scan(
                &client,
                "MAILROOM",
                300,
                start,
                timeout,
                |_| Some(false),
                true,
            )
        };
        assert_eq!(all(Start::First).await.unwrap().len(), 300);
        assert_eq!(all(Start::Time(0)).await.unwrap().len(), 300);
        let now_ms = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        assert!(
            all(Start::Time(now_ms + 3_600_000))
                .await
                .unwrap()
                .is_empty()
        );
        let snapshot = scan(
            &client,
            "MAILROOM",
            120,
            Start::First,
            timeout,
            |_| Some(false),
            true,
        )
        .await
        .unwrap();
        assert_eq!(snapshot.len(), 120);
        assert!(snapshot.windows(2).all(|w| w[0].seq < w[1].seq));
        let none = scan(
            &client,
            "MAILROOM",
            300,
            Start::First,
            timeout,
            |_| None,
            true,
        )
        .await
        .unwrap();
        assert!(none.is_empty());
    }
}
