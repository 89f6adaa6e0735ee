//! DATA and BDAT (RFC 5321 §4.1.1.4, RFC 3030) and the durable hand-off to the queue.
//!
//! The invariant of this file: `250 2.0.0 Ok: queued as <id>` is sent only after
//! `Queue::enqueue` returned Ok, which the queue backends promise only once the message is on
//! stable storage (local: fsync'd file and directory; JetStream: PubAck). Any failure is a
//! `451 4.3.0`, which tells the client to keep the message and retry.

use bytes::Buf;
use mailroom_plugins::{MessageEdits, builtin::header_value};
use mailroom_queue::{Envelope, QueueId, Recipient, StoredMessage};
use mailroom_smtp::{BdatReceiver, Body, DataError, DataReceiver, ForwardPath, Reply, ReversePath};

use super::{Flow, Session, reply};
use crate::conn::{DATA_READ, SmtpStream};
use crate::{metrics, received};

/// A BDAT transaction in progress.
pub(crate) struct BdatState {
    receiver: BdatReceiver,
    body: Vec<u8>,
}

fn error_reason(e: &DataError) -> &'static str {
    match e {
        DataError::TooLarge => "too_large",
        DataError::BareLineEnding => "bare_line_ending",
        DataError::LineTooLong => "line_too_long",
        DataError::NulByte => "nul",
    }
}

/// The reply for a refused body; the line limit is the listener's, not the RFC default.
fn refusal(e: &DataError, max_line: usize) -> Reply {
    match e {
        DataError::LineTooLong => reply(
            550,
            (5, 5, 2),
            format!("Message contains a line longer than {max_line} octets"),
        ),
        other => other.reply(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl<S: SmtpStream> Session<S> {
    /// Checks that a transaction can take data; queues the refusal otherwise.
    fn data_allowed(&mut self) -> bool {
        match &self.tx {
            None => {
                self.send(reply(503, (5, 5, 1), "Need MAIL and RCPT commands first"));
                false
            }
            Some(tx) if tx.recipients.is_empty() => {
                // RFC 2920 §3.1: with pipelining, DATA after failed RCPTs gets 554.
                self.send(reply(554, (5, 5, 1), "No valid recipients"));
                false
            }
            Some(_) => true,
        }
    }

    pub(crate) async fn data(&mut self) -> Flow {
        if self.bdat.is_some() {
            self.send(reply(503, (5, 5, 1), "DATA not allowed after BDAT"));
            return Flow::Continue;
        }
        if !self.data_allowed() {
            return Flow::Continue;
        }
        if self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.mail_params.body == Some(Body::BinaryMime))
        {
            self.send(reply(
                503,
                (5, 5, 1),
                "BODY=BINARYMIME requires BDAT (RFC 3030)",
            ));
            return Flow::Continue;
        }
        // RFC 2034 §3: 354 is not a 2xx/4xx/5xx reply and carries no enhanced code.
        self.send_ok(Reply {
            code: 354,
            enhanced: None,
            lines: vec!["End data with <CR><LF>.<CR><LF>".into()],
        });
        if self.conn.flush().await.is_err() {
            return Flow::Close("io_error");
        }
        let limits = &self.ctx.limits;
        let mut receiver = DataReceiver::new(limits.max_message_size, limits.max_line_length);
        let mut body = Vec::new();
        loop {
            if receiver.ingest(&mut self.conn.rbuf, &mut body) {
                break;
            }
            if let Err(why) = self
                .read_more(DATA_READ, self.ctx.timeouts.data_block, false)
                .await
            {
                return Flow::Close(why);
            }
        }
        match receiver.finish() {
            Ok(_) => self.finish_message(body).await,
            Err(e) => self.refuse_body(&e),
        }
    }

    pub(crate) async fn bdat(&mut self, size: u64, last: bool) -> Flow {
        if self.tx.is_none() || self.tx.as_ref().is_some_and(|tx| tx.recipients.is_empty()) {
            // The chunk must be read anyway, or its bytes would be taken for commands.
            if let Err(why) = self.skip_bytes(size).await {
                return Flow::Close(why);
            }
            self.data_allowed();
            return Flow::Continue;
        }
        let mut state = match self.bdat.take() {
            Some(s) => s,
            None => {
                let binary = self
                    .tx
                    .as_ref()
                    .is_some_and(|tx| tx.mail_params.body == Some(Body::BinaryMime));
                let l = &self.ctx.limits;
                Box::new(BdatState {
                    receiver: BdatReceiver::new(l.max_message_size, l.max_line_length, binary),
                    body: Vec::new(),
                })
            }
        };
        state.receiver.start_chunk(size);
        loop {
            if state.receiver.ingest(&mut self.conn.rbuf, &mut state.body) {
                break;
            }
            if let Err(why) = self
                .read_more(DATA_READ, self.ctx.timeouts.data_block, false)
                .await
            {
                return Flow::Close(why);
            }
        }
        if let Err(DataError::TooLarge) = state.receiver.finish() {
            return self.refuse_body(&DataError::TooLarge);
        }
        if !last {
            self.send_ok(reply(250, (2, 0, 0), format!("{size} octets received")));
            self.bdat = Some(state);
            return Flow::Continue;
        }
        match state.receiver.finish() {
            Ok(_) => self.finish_message(state.body).await,
            Err(e) => self.refuse_body(&e),
        }
    }

    /// Refuses the received body: counts it, forgets the transaction, replies.
    fn refuse_body(&mut self, e: &DataError) -> Flow {
        metrics::MESSAGES_REJECTED
            .with_label_values(&[&self.ctx.name, error_reason(e)])
            .inc();
        self.reset_transaction();
        self.send(refusal(e, self.ctx.limits.max_line_length));
        Flow::Continue
    }

    /// Reads and drops `n` bytes (a BDAT chunk that is refused).
    pub(crate) async fn skip_bytes(&mut self, mut n: u64) -> Result<(), &'static str> {
        loop {
            let take = (self.conn.rbuf.len() as u64).min(n) as usize;
            self.conn.rbuf.advance(take);
            n -= take as u64;
            if n == 0 {
                return Ok(());
            }
            self.read_more(DATA_READ, self.ctx.timeouts.data_block, false)
                .await?;
        }
    }

    /// Runs the data hook, then queues the message durably and answers.
    async fn finish_message(&mut self, body: Vec<u8>) -> Flow {
        self.bdat = None;
        let Some(tx) = self.tx.take() else {
            self.send(reply(503, (5, 5, 1), "No transaction"));
            return Flow::Continue;
        };
        self.messages += 1;
        let name = self.ctx.name.clone();
        let mut edits = MessageEdits::default();
        let verdict = self
            .ctx
            .plugins
            .data(&self.info, &tx, &body, &mut edits)
            .await;
        if !verdict.is_pass() {
            metrics::MESSAGES_REJECTED
                .with_label_values(&[&name, "plugin"])
                .inc();
        }
        if let Some(flow) = self.refused(verdict) {
            return flow;
        }
        let id = QueueId::new();
        let id_text = id.to_string();
        let message = received::assemble(&self.info, &tx, &id_text, &edits, &body);
        drop(body);
        let message_id = header_value(&message, "Message-ID");
        let sender = match &tx.sender {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(m) => m.to_string(),
        };
        // An address given twice, or reached through two aliases, is queued once.
        let mut seen = std::collections::HashSet::new();
        let recipients: Vec<Recipient> = tx
            .recipients
            .iter()
            .flat_map(|(to, p)| {
                let (address, domain) = match to {
                    ForwardPath::Postmaster => (
                        format!("postmaster@{}", self.ctx.hostname),
                        self.ctx.hostname.to_ascii_lowercase(),
                    ),
                    ForwardPath::Mailbox(m) => {
                        (m.to_string(), m.domain.trim_end_matches('.').to_lowercase())
                    }
                };
                let rewritten = edits
                    .recipient_rewrites
                    .iter()
                    .find(|(from, _)| from.eq_ignore_ascii_case(&address));
                let addresses = match rewritten {
                    Some((_, targets)) => targets
                        .iter()
                        .map(|t| {
                            let domain = t.rsplit_once('@').map_or("", |(_, d)| d);
                            (t.clone(), domain.trim_end_matches('.').to_lowercase())
                        })
                        .collect(),
                    None => vec![(address, domain)],
                };
                addresses.into_iter().map(|(address, domain)| Recipient {
                    address,
                    domain,
                    notify: p.notify,
                    orcpt: p.orcpt.clone(),
                })
            })
            .filter(|r| seen.insert(r.address.to_ascii_lowercase()))
            .collect();
        let size = message.len() as u64;
        let envelope = Envelope {
            id,
            sender,
            recipients,
            ret: tx.mail_params.ret,
            envid: tx.mail_params.envid.clone(),
            body_type: tx.mail_params.body,
            smtputf8: tx.mail_params.smtputf8,
            received_at_ms: now_ms(),
            listener: name.clone(),
            client_ip: Some(self.info.client_ip()),
            helo: self.info.helo.clone(),
            auth_user: self.info.auth_user.clone(),
            policy: self.ctx.policy.clone(),
            message_id,
        };
        let log_fields = reception_fields(&envelope, size, self.info.tls);
        let timer = metrics::ENQUEUE_SECONDS.start_timer();
        let stored = StoredMessage {
            envelope,
            body: message.into(),
        };
        let outcome = tokio::time::timeout(
            self.ctx.timeouts.data_termination,
            self.ctx.queue.enqueue(stored),
        )
        .await;
        timer.observe_duration();
        match outcome {
            Ok(Ok(())) => {
                metrics::MESSAGES_ACCEPTED.with_label_values(&[&name]).inc();
                self.ctx.delivery_log.record("reception", log_fields);
                self.ctx.plugins.queued(&self.info, &tx, &id_text).await;
                self.send_ok(reply(250, (2, 0, 0), format!("Ok: queued as {id_text}")));
            }
            failed => {
                let (reason, text) = match failed {
                    Ok(Err(e)) => (
                        e.to_string(),
                        "Queue temporarily unavailable; try again later",
                    ),
                    _ => (
                        "no answer in time".to_string(),
                        "Queue did not answer in time; try again later",
                    ),
                };
                tracing::error!(listener = %name, queue_id = %id_text, error = %reason, "enqueue failed; answered 451");
                metrics::MESSAGES_REJECTED
                    .with_label_values(&[&name, "queue_error"])
                    .inc();
                self.send_ok(reply(451, (4, 3, 0), text));
            }
        }
        Flow::Continue
    }
}

fn reception_fields(
    e: &Envelope,
    size: u64,
    tls: bool,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("queue_id".into(), e.id.to_string().into());
    m.insert("message_id".into(), e.message_id.clone().into());
    m.insert("sender".into(), e.sender.clone().into());
    m.insert(
        "recipients".into(),
        e.recipients
            .iter()
            .map(|r| serde_json::Value::from(r.address.clone()))
            .collect(),
    );
    m.insert("listener".into(), e.listener.clone().into());
    m.insert(
        "client_ip".into(),
        e.client_ip.map(|ip| ip.to_string()).into(),
    );
    m.insert("helo".into(), e.helo.clone().into());
    m.insert("auth_user".into(), e.auth_user.clone().into());
    m.insert("size".into(), size.into());
    m.insert("tls".into(), tls.into());
    m
}
