//! Running a planned transaction on the wire: MAIL, RCPT, DATA (or BDAT), the body.
//!
//! With PIPELINING (RFC 2920) MAIL, every RCPT and DATA are written in one go and the replies
//! read in order; commands are grouped into writes of at most [`PIPELINE_WINDOW`] octets, with
//! the replies of a group read before the next is written, so a long recipient list can never
//! deadlock two full socket buffers (RFC 2920 §3.1's caution). Without PIPELINING each command
//! waits for its reply, and nothing after a refused MAIL is sent.
//!
//! The transaction always ends in a known state (RFC 5321 §4.1.1.5, §3.3): after the final
//! dot's reply the server has reset; when the transaction stopped earlier with MAIL accepted,
//! RSET is sent; a DATA accepted with 354 despite no accepted recipient gets a lone dot
//! (RFC 2920 §3.1). A 421 anywhere means the server is closing the connection.

use mailroom_smtp::Reply;

use super::config::Timeouts;
use super::data::DotStuffer;
use super::error::{ClientError, Stage};
use super::io::Io;
use super::session::unexpected;
use super::transaction::{Plan, PlannedRcpt, RecipientResult, SendOutcome, Transaction};

/// Largest group of pipelined commands written before reading their replies.
pub(crate) const PIPELINE_WINDOW: usize = 16 * 1024;

/// Body octets encoded and written at a time (each write under `data_block`).
const BODY_CHUNK: usize = 64 * 1024;

/// How the transaction ended, as far as the connection is concerned.
pub(crate) struct Finished {
    pub(crate) outcome: SendOutcome,
    /// RSET failed or the server said 421: the outcome stands, but the connection must not
    /// be used again.
    pub(crate) connection_done: bool,
}

struct Command {
    line: String,
    stage: Stage,
}

/// Runs `plan` (made from `tx`) and sends `body`.
pub(crate) async fn run(
    io: &mut Io,
    tx: &Transaction,
    plan: Plan,
    body: &[u8],
    pipelining: bool,
    t: &Timeouts,
) -> Result<Finished, ClientError> {
    let mut refused_locally: Vec<Option<Reply>> = Vec::with_capacity(plan.rcpts.len());
    let mut commands = vec![Command {
        line: plan.mail,
        stage: Stage::Mail,
    }];
    for r in plan.rcpts {
        match r {
            PlannedRcpt::Send(line) => {
                refused_locally.push(None);
                commands.push(Command {
                    line,
                    stage: Stage::Rcpt,
                });
            }
            PlannedRcpt::Refused(reply) => refused_locally.push(Some(reply)),
        }
    }
    if commands.len() == 1 {
        // No usable recipient: nothing to send.
        return Ok(Finished {
            outcome: outcome(tx, None, refused_locally, Vec::new(), None),
            connection_done: false,
        });
    }
    // DATA joins the last pipelined group; BDAT waits for the RCPT replies, so that a body is
    // never sent for nobody.
    if !plan.bdat && pipelining {
        commands.push(Command {
            line: "DATA".to_owned(),
            stage: Stage::Data,
        });
    }

    let replies = if pipelining {
        pipelined(io, &commands, t).await?
    } else {
        one_by_one(io, &commands, t).await?
    };
    let mut replies = replies.into_iter();
    let Some(mail) = replies.next() else {
        return Err(unexpected_end(io));
    };
    let rcpt_count = commands.iter().filter(|c| c.stage == Stage::Rcpt).count();
    let rcpt_replies: Vec<Reply> = replies.by_ref().take(rcpt_count).collect();
    let data_reply = replies.next();

    if !is_2xx(&mail) {
        // Pipelined DATA after a refused MAIL should get 503; if a server still said 354,
        // end the empty data.
        if data_reply.as_ref().is_some_and(|r| r.code == 354) {
            io.command(".", Stage::DataEnd, t.data_end).await?;
        }
        return Err(unexpected(io, Stage::Mail, mail));
    }
    let accepted = rcpt_replies.iter().filter(|r| is_2xx(r)).count();
    if accepted == 0 {
        let connection_done = match data_reply {
            Some(r) if r.code == 354 => {
                io.command(".", Stage::DataEnd, t.data_end).await?;
                false
            }
            _ => !rset(io, t).await,
        };
        return Ok(Finished {
            outcome: outcome(tx, Some(mail), refused_locally, rcpt_replies, None),
            connection_done,
        });
    }

    let end = if plan.bdat {
        bdat(io, body, t).await?
    } else {
        let go = match data_reply {
            Some(r) => r,
            None => io.command("DATA", Stage::Data, t.data_start).await?,
        };
        match go.code {
            354 => send_body(io, body, t).await?,
            // The transaction is still open on the server: reset it. The refusal applies to
            // every accepted recipient.
            400..=599 => {
                let connection_done = go.code == 421 || !rset(io, t).await;
                return Ok(Finished {
                    outcome: outcome(tx, Some(mail), refused_locally, rcpt_replies, Some(go)),
                    connection_done,
                });
            }
            _ => return Err(unexpected(io, Stage::Data, go)),
        }
    };
    let connection_done = end.code == 421;
    Ok(Finished {
        outcome: outcome(tx, Some(mail), refused_locally, rcpt_replies, Some(end)),
        connection_done,
    })
}

fn is_2xx(reply: &Reply) -> bool {
    (200..300).contains(&reply.code)
}

fn unexpected_end(io: &Io) -> ClientError {
    ClientError::Closed {
        peer: io.peer().clone(),
        stage: Stage::Mail,
    }
}

/// The timeout for the reply to a command at `stage`.
fn reply_timeout(stage: Stage, t: &Timeouts) -> std::time::Duration {
    match stage {
        Stage::Data => t.data_start,
        _ => t.command,
    }
}

/// A 421 to MAIL or RCPT: the server is closing, the replies still expected will not come.
/// A 421 to DATA is the last reply anyway and becomes the outcome of the accepted recipients.
fn closing(c: &Command, reply: &Reply) -> bool {
    reply.code == 421 && c.stage != Stage::Data
}

/// Writes the commands in groups of at most [`PIPELINE_WINDOW`] octets and reads each group's
/// replies in order. Stops early after a 421 to MAIL or RCPT (error) or when MAIL was refused
/// (the rest is not written).
async fn pipelined(
    io: &mut Io,
    commands: &[Command],
    t: &Timeouts,
) -> Result<Vec<Reply>, ClientError> {
    let mut replies = Vec::with_capacity(commands.len());
    let mut rest = commands;
    while !rest.is_empty() {
        let mut buf = Vec::new();
        let mut n = 0;
        for c in rest {
            if n > 0 && buf.len() + c.line.len() + 2 > PIPELINE_WINDOW {
                break;
            }
            buf.extend_from_slice(c.line.as_bytes());
            buf.extend_from_slice(b"\r\n");
            n += 1;
        }
        let (group, tail) = rest.split_at(n);
        let stage = group.first().map_or(Stage::Mail, |c| c.stage);
        io.write_all(&buf, stage, t.command).await?;
        for c in group {
            let reply = io.read_reply(c.stage, reply_timeout(c.stage, t)).await?;
            if closing(c, &reply) {
                return Err(unexpected(io, c.stage, reply));
            }
            replies.push(reply);
        }
        if replies.first().is_some_and(|mail| !is_2xx(mail)) {
            break;
        }
        rest = tail;
    }
    Ok(replies)
}

/// One command at a time; nothing after a refused MAIL.
async fn one_by_one(
    io: &mut Io,
    commands: &[Command],
    t: &Timeouts,
) -> Result<Vec<Reply>, ClientError> {
    let mut replies = Vec::with_capacity(commands.len());
    for c in commands {
        let reply = io
            .command(&c.line, c.stage, reply_timeout(c.stage, t))
            .await?;
        if closing(c, &reply) {
            return Err(unexpected(io, c.stage, reply));
        }
        let refused_mail = c.stage == Stage::Mail && !is_2xx(&reply);
        replies.push(reply);
        if refused_mail {
            break;
        }
    }
    Ok(replies)
}

/// RSET; false when the connection should not be used any more.
pub(crate) async fn rset(io: &mut Io, t: &Timeouts) -> bool {
    matches!(io.command("RSET", Stage::Rset, t.command).await, Ok(r) if is_2xx(&r))
}

/// The body after 354: encoded in chunks, each written under `data_block`, then the final
/// reply under `data_end`.
async fn send_body(io: &mut Io, body: &[u8], t: &Timeouts) -> Result<Reply, ClientError> {
    let mut encoder = DotStuffer::new();
    let mut out = Vec::with_capacity(BODY_CHUNK + BODY_CHUNK / 16);
    let mut chunks = body.chunks(BODY_CHUNK).peekable();
    while let Some(chunk) = chunks.next() {
        encoder.encode(chunk, &mut out);
        if chunks.peek().is_some() {
            io.write_all(&out, Stage::DataBody, t.data_block).await?;
            out.clear();
        }
    }
    encoder.finish(&mut out);
    io.write_all(&out, Stage::DataBody, t.data_block).await?;
    io.read_reply(Stage::DataEnd, t.data_end).await
}

/// `BDAT <size> LAST` and the body as it is (RFC 3030 §2: no dot-stuffing, no line-ending
/// changes), then the reply under `data_end`.
async fn bdat(io: &mut Io, body: &[u8], t: &Timeouts) -> Result<Reply, ClientError> {
    let mut first = format!("BDAT {} LAST\r\n", body.len()).into_bytes();
    let mut chunks = body.chunks(BODY_CHUNK);
    if let Some(chunk) = chunks.next() {
        first.extend_from_slice(chunk);
    }
    io.write_all(&first, Stage::Bdat, t.data_block).await?;
    for chunk in chunks {
        io.write_all(chunk, Stage::DataBody, t.data_block).await?;
    }
    io.read_reply(Stage::Bdat, t.data_end).await
}

/// Assembles the per-recipient outcome: local refusals, RCPT replies, and the data reply for
/// the accepted ones.
fn outcome(
    tx: &Transaction,
    mail: Option<Reply>,
    refused_locally: Vec<Option<Reply>>,
    rcpt_replies: Vec<Reply>,
    data: Option<Reply>,
) -> SendOutcome {
    let mut sent = rcpt_replies.into_iter();
    let recipients = tx
        .recipients
        .iter()
        .zip(refused_locally)
        .map(|(r, local)| {
            let rcpt = local
                .or_else(|| sent.next())
                .unwrap_or_else(|| Reply::plain(451, "no reply to RCPT TO"));
            let reply = match &data {
                Some(d) if is_2xx(&rcpt) => d.clone(),
                _ => rcpt.clone(),
            };
            RecipientResult {
                address: r.address.clone(),
                rcpt,
                reply,
            }
        })
        .collect();
    SendOutcome {
        mail,
        recipients,
        data,
    }
}
