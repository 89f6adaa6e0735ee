//! One SMTP session (RFC 5321), generic over its stream so the same code serves plaintext,
//! TLS and in-memory test streams. The session reads a command line, parses it with
//! `mailroom-smtp`, and hands it to the handler of its verb (one file per verb family). STARTTLS
//! ends the plaintext session and returns its stream: the caller performs the handshake and
//! starts a fresh session over TLS, so no buffered plaintext or state survives the upgrade.

mod auth;
mod data;
mod ehlo;
mod mail;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mailroom_plugins::{SessionInfo, Transaction, Verdict};
use mailroom_smtp::{Command, EnhancedCode, LineError, LineReader, Reply, parse_command};
use tokio::time::Instant;

use crate::conn::{COMMAND_READ, Conn, SmtpStream};
use crate::context::ListenerContext;
use crate::metrics;
use crate::server::Shutdown;

pub(crate) use data::BdatState;

/// How a session ended.
pub enum Ended<S> {
    /// The connection is finished.
    Closed(&'static str),
    /// The client asked for STARTTLS and got 220: upgrade this stream and start over.
    StartTls(S),
}

/// What the loop does after a command.
pub(crate) enum Flow {
    Continue,
    Close(&'static str),
    StartTls,
}

/// Outcome of waiting for a line.
pub(crate) enum Input {
    Line(Bytes),
    Closed(&'static str),
}

/// A session over stream `S`.
pub struct Session<S> {
    pub(crate) conn: Conn<S>,
    pub(crate) ctx: Arc<ListenerContext>,
    pub(crate) info: SessionInfo,
    pub(crate) lines: LineReader,
    pub(crate) tx: Option<Transaction>,
    pub(crate) bdat: Option<Box<BdatState>>,
    pub(crate) errors: u32,
    pub(crate) messages: u32,
    pub(crate) refused: bool,
    pub(crate) shutdown: Shutdown,
    pub(crate) deadline: Instant,
}

/// Shorthand for a reply with an enhanced code.
pub(crate) fn reply(code: u16, e: (u8, u16, u16), text: impl Into<String>) -> Reply {
    Reply::new(code, EnhancedCode(e.0, e.1, e.2), text)
}

impl<S: SmtpStream> Session<S> {
    /// A new session. `info.tls` says whether `stream` is already encrypted.
    pub fn new(
        stream: S,
        ctx: Arc<ListenerContext>,
        info: SessionInfo,
        shutdown: Shutdown,
    ) -> Self {
        let lines = LineReader::new(ctx.limits.max_command_length);
        let deadline = Instant::now() + ctx.timeouts.session;
        Session {
            conn: Conn::new(stream),
            ctx,
            info,
            lines,
            tx: None,
            bdat: None,
            errors: 0,
            messages: 0,
            refused: false,
            shutdown,
            deadline,
        }
    }

    /// Queues a reply, counting negative ones towards the error limit.
    pub(crate) fn send(&mut self, r: Reply) {
        if r.code >= 400 {
            self.errors += 1;
        }
        self.conn.push(&r);
    }

    /// Queues a reply that is not the client's fault (not counted as an error).
    pub(crate) fn send_ok(&mut self, r: Reply) {
        self.conn.push(&r);
    }

    fn in_transaction(&self) -> bool {
        self.tx.is_some() || self.bdat.is_some()
    }

    /// Runs the session: greeting (unless `greet` is false after STARTTLS), then commands until
    /// QUIT, EOF, a limit, a timeout or shutdown.
    pub async fn run(mut self, greet: bool) -> Ended<S> {
        if greet {
            match self.ctx.plugins.connect(&self.info).await {
                Verdict::Reject(r) | Verdict::TempFail(r) => {
                    // RFC 5321 §3.1: a 554 greeting; then only QUIT is honoured.
                    metrics::CONNECTIONS
                        .with_label_values(&[&self.ctx.name, "plugin_reject"])
                        .inc();
                    self.send_ok(r);
                    self.refused = true;
                }
                Verdict::Disconnect(r) => {
                    self.send_ok(r);
                    let _ = self.conn.flush().await;
                    return Ended::Closed("plugin");
                }
                Verdict::Continue | Verdict::Accept => {
                    if let Some(why) = self.wait_before_greeting().await {
                        return Ended::Closed(why);
                    }
                    let banner = Reply {
                        code: 220,
                        enhanced: None,
                        lines: vec![format!("{} ESMTP Mailroom", self.ctx.hostname)],
                    };
                    self.send_ok(banner);
                }
            }
        }
        let end = loop {
            let line = match self.next_line(self.ctx.timeouts.command).await {
                Input::Line(l) => l,
                Input::Closed(why) => break why,
            };
            // Boxed: command handling holds large, short-lived state; keeping it out of the
            // session's own future keeps an idle connection small (~1 KiB of task state).
            let flow = Box::pin(self.handle_line(&line)).await;
            match flow {
                Flow::Continue => {}
                Flow::Close(why) => break why,
                Flow::StartTls => {
                    if self.conn.flush().await.is_err() {
                        break "io_error";
                    }
                    return Ended::StartTls(self.conn.into_stream());
                }
            }
            if self.errors > self.ctx.limits.max_errors {
                self.send_ok(reply(
                    421,
                    (4, 7, 0),
                    format!("{} Too many errors, closing connection", self.ctx.hostname),
                ));
                break "too_many_errors";
            }
        };
        let _ = self.conn.flush().await;
        metrics::SESSIONS_CLOSED
            .with_label_values(&[&self.ctx.name, end])
            .inc();
        Ended::Closed(end)
    }

    /// Holds the greeting back as long as a plugin asks (`earlyTalker`). A client that sends
    /// anything meanwhile is not waiting for the greeting as RFC 5321 §3.1 requires (the mark
    /// of spam software): it gets 554 5.5.1 and the connection closes. Returns why the session
    /// ended, or None to greet.
    async fn wait_before_greeting(&mut self) -> Option<&'static str> {
        let delay = self.ctx.plugins.greeting_delay(&self.info);
        if delay.is_zero() {
            return None;
        }
        let talked = if self.conn.rbuf.is_empty() {
            match tokio::time::timeout(delay, self.conn.fill(COMMAND_READ)).await {
                Err(_) => false,
                Ok(Ok(0)) | Ok(Err(_)) => return Some("eof"),
                Ok(Ok(_)) => true,
            }
        } else {
            true
        };
        if !talked {
            return None;
        }
        metrics::CONNECTIONS
            .with_label_values(&[&self.ctx.name, "early_talker"])
            .inc();
        self.send_ok(reply(
            554,
            (5, 5, 1),
            format!(
                "{} Protocol error: you talked before my greeting",
                self.ctx.hostname
            ),
        ));
        let _ = self.conn.flush().await;
        Some("early_talker")
    }

    /// Waits for one command line. Replies are flushed before waiting (RFC 2920 §3.1). On
    /// timeout or shutdown the 421 reply is queued and the session is told to close.
    pub(crate) async fn next_line(&mut self, timeout: Duration) -> Input {
        loop {
            if let Some(res) = self.lines.read_line(&mut self.conn.rbuf) {
                match res {
                    Ok(line) => return Input::Line(line),
                    Err(e) => {
                        let (kind, r) = match e {
                            LineError::TooLong => {
                                ("line_too_long", reply(500, (5, 5, 2), "Line too long"))
                            }
                            LineError::BareLf => (
                                "bare_lf",
                                reply(500, (5, 5, 2), "Bare LF in command line; use CRLF"),
                            ),
                        };
                        metrics::PROTOCOL_ERRORS
                            .with_label_values(&[&self.ctx.name, kind])
                            .inc();
                        self.send(r);
                        if self.errors > self.ctx.limits.max_errors {
                            self.send_ok(reply(
                                421,
                                (4, 7, 0),
                                format!(
                                    "{} Too many errors, closing connection",
                                    self.ctx.hostname
                                ),
                            ));
                            return Input::Closed("too_many_errors");
                        }
                        continue;
                    }
                }
            }
            if self.conn.has_output() {
                let delay = self.ctx.plugins.reply_delay(&self.info);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
            if let Err(_e) = self.conn.flush().await {
                return Input::Closed("io_error");
            }
            match self
                .read_more(COMMAND_READ, timeout, !self.in_transaction())
                .await
            {
                Ok(()) => {}
                Err(why) => return Input::Closed(why),
            }
        }
    }

    /// Reads more bytes into the buffer with a timeout. `idle` marks a wait between
    /// transactions, which a graceful shutdown may interrupt; inside a transaction only the
    /// hard abort does.
    pub(crate) async fn read_more(
        &mut self,
        chunk: usize,
        timeout: Duration,
        idle: bool,
    ) -> Result<(), &'static str> {
        let until = (Instant::now() + timeout).min(self.deadline);
        let stop = self.shutdown.stop.clone();
        let abort = self.shutdown.abort.clone();
        let read = tokio::time::timeout_at(until, self.conn.fill(chunk));
        tokio::select! {
            biased;
            _ = abort.cancelled() => {
                self.send_ok(reply(421, (4, 3, 2), format!("{} Service shutting down", self.ctx.hostname)));
                Err("shutdown")
            }
            _ = stop.cancelled(), if idle => {
                self.send_ok(reply(421, (4, 3, 2), format!("{} Service shutting down", self.ctx.hostname)));
                Err("shutdown")
            }
            r = read => match r {
                Err(_) => {
                    self.send_ok(reply(421, (4, 4, 2), format!("{} Timeout exceeded, closing connection", self.ctx.hostname)));
                    Err("timeout")
                }
                Ok(Ok(0)) => Err("eof"),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err("io_error"),
            }
        }
    }

    async fn handle_line(&mut self, line: &[u8]) -> Flow {
        let cmd = match parse_command(line) {
            Ok(c) => c,
            Err(e) => {
                metrics::PROTOCOL_ERRORS
                    .with_label_values(&[&self.ctx.name, "syntax"])
                    .inc();
                self.send(e.reply());
                return Flow::Continue;
            }
        };
        if self.refused && !matches!(cmd, Command::Quit) {
            // A BDAT chunk must still be consumed to keep the stream in step.
            if let Command::Bdat { size, .. } = cmd
                && let Err(why) = self.skip_bytes(size).await
            {
                return Flow::Close(why);
            }
            self.send(reply(
                503,
                (5, 7, 1),
                "Connection refused by policy; only QUIT is accepted",
            ));
            return Flow::Continue;
        }
        match cmd {
            Command::Ehlo { domain } => self.ehlo(domain, true).await,
            Command::Helo { domain } => self.ehlo(domain, false).await,
            Command::Mail { from, params } => self.mail(from, params).await,
            Command::Rcpt { to, params } => self.rcpt(to, params).await,
            Command::Data => self.data().await,
            Command::Bdat { size, last } => self.bdat(size, last).await,
            Command::Rset => {
                self.reset_transaction();
                self.send_ok(reply(250, (2, 0, 0), "Ok"));
                Flow::Continue
            }
            Command::Noop => {
                self.send_ok(reply(250, (2, 0, 0), "Ok"));
                Flow::Continue
            }
            Command::Quit => {
                self.send_ok(reply(221, (2, 0, 0), format!("{} Bye", self.ctx.hostname)));
                Flow::Close("quit")
            }
            Command::Vrfy { .. } => {
                // RFC 5321 §3.5.3: VRFY disabled, but the address may still be tried.
                self.send_ok(reply(
                    252,
                    (2, 5, 0),
                    "Cannot VRFY user, but will accept message and attempt delivery",
                ));
                Flow::Continue
            }
            Command::Expn { .. } => {
                self.send(reply(502, (5, 5, 1), "EXPN is disabled"));
                Flow::Continue
            }
            Command::Help { .. } => {
                self.send_ok(reply(
                    214,
                    (2, 0, 0),
                    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
                ));
                Flow::Continue
            }
            Command::StartTls => self.starttls(),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response).await,
        }
    }

    fn starttls(&mut self) -> Flow {
        if self.info.tls {
            self.send(reply(503, (5, 5, 1), "TLS already active"));
            return Flow::Continue;
        }
        if self.ctx.tls.is_none() {
            self.send(reply(502, (5, 5, 1), "STARTTLS not available"));
            return Flow::Continue;
        }
        if self.in_transaction() {
            self.send(reply(
                503,
                (5, 5, 1),
                "STARTTLS not allowed during a mail transaction",
            ));
            return Flow::Continue;
        }
        self.send_ok(reply(220, (2, 0, 0), "Ready to start TLS"));
        Flow::StartTls
    }

    /// Applies a plugin verdict: a refusal is sent and the flow to return is given back;
    /// `Continue` and `Accept` give None (go on).
    pub(crate) fn refused(&mut self, verdict: Verdict) -> Option<Flow> {
        match verdict {
            Verdict::Continue | Verdict::Accept => None,
            Verdict::Reject(r) | Verdict::TempFail(r) => {
                self.send(r);
                Some(Flow::Continue)
            }
            Verdict::Disconnect(r) => {
                self.send(r);
                Some(Flow::Close("plugin"))
            }
        }
    }

    /// Forgets the current transaction (RSET, EHLO, errors).
    pub(crate) fn reset_transaction(&mut self) {
        self.tx = None;
        self.bdat = None;
    }
}
