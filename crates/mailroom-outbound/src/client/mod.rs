//! The outbound SMTP client (RFC 5321), over `mailroom-smtp` for replies, addresses and
//! parameters. A delivery worker opens a [`Connection`] to one address of an MX host or relay
//! ([`Target`]) with the settings of its policy ([`ClientConfig`]), sends one or more
//! [`Transaction`]s over it, and classifies what comes back:
//!
//! ```text
//! Connection::connect: TCP -> [implicit TLS] -> 220 greeting -> EHLO (HELO on 5xx)
//!                      -> [STARTTLS -> handshake -> EHLO again] -> [AUTH]
//! Connection::send:    plan (SIZE, SMTPUTF8, BODY, DSN; refusals before any byte is sent)
//!                      -> MAIL, RCPT..., DATA (pipelined when offered) -> body -> final reply
//!                      or BDAT for BINARYMIME; RSET when the transaction stopped early
//! Connection::reset / quit
//! ```
//!
//! - `Ok(SendOutcome)`: per recipient a reply and a [`ReplyClass`] (2xx delivered, 4xx
//!   deferred, 5xx failed); the reply after the final dot applies to every accepted recipient.
//! - `Err(ClientError)`: the whole transaction failed; [`ClientError::is_permanent`] says
//!   bounce or defer, [`ClientError::try_next_host`] whether another MX may do better, and
//!   [`Connection::is_usable`] whether the connection can carry the next message.
//!
//! Choices, each documented where it is made:
//! - A failed STARTTLS handshake is a transient [`ClientError::Tls`], never a silent
//!   plaintext retry; the caller may reconnect with [`TlsPolicy::Disabled`] if its policy
//!   allows (`config`).
//! - Bare LF and bare CR in a DATA body are sent as CRLF; a missing final CRLF is added
//!   (`data`). BINARYMIME bodies go unchanged with BDAT.
//! - An 8bit body goes unchanged to a server without 8BITMIME (no 7bit downgrade, like
//!   Postfix); SMTPUTF8 is required only for non-ASCII addresses or header fields
//!   (`transaction`).
//! - Credentials are sent only over TLS, PLAIN before LOGIN (`auth`).
//!
//! Files: `config` (settings), `tls` (roots, verifiers, handshake), `io` (stream, reply
//! reading, timeouts), `session` (connection setup), `capabilities` (EHLO keywords), `auth`,
//! `transaction` (the pure plan and the outcome types), `send` (the transaction on the wire),
//! `data` (dot-stuffing), `error`.

mod auth;
mod capabilities;
mod config;
mod data;
mod error;
mod io;
mod send;
mod session;
mod tls;
mod transaction;

use std::net::SocketAddr;
use std::time::Duration;

use mailroom_smtp::Reply;

pub use capabilities::Capabilities;
pub use config::{ClientConfig, Credentials, DEFAULT_MAX_REPLY_LINE, Target, Timeouts, TlsPolicy};
pub use error::{ClientError, ConnectFailure, Missing, Peer, ProtocolError, Stage};
pub use tls::{RootsError, TlsInfo, TlsRoots};
pub use transaction::{RcptTo, RecipientResult, ReplyClass, SendOutcome, Transaction};

use io::Io;

/// Longest wait for the server's answer to QUIT, at most the command timeout.
const QUIT_WAIT: Duration = Duration::from_secs(10);

/// An open SMTP session with one server, ready for transactions.
pub struct Connection {
    io: Io,
    greeting: Reply,
    capabilities: Capabilities,
    tls: Option<TlsInfo>,
    timeouts: Timeouts,
    messages_sent: u32,
    usable: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.io.peer().to_string())
            .field("tls", &self.tls)
            .field("messages_sent", &self.messages_sent)
            .field("usable", &self.usable)
            .finish()
    }
}

impl Connection {
    /// Connects to `target` and runs the session setup: greeting, EHLO (HELO fallback),
    /// STARTTLS by `config.tls` with EHLO again, AUTH when `config.credentials` is set.
    pub async fn connect(
        target: &Target,
        config: &ClientConfig,
    ) -> Result<Connection, ClientError> {
        let peer = Peer::new(target.addr, &target.host);
        let established = session::establish(peer, config).await?;
        Ok(Connection {
            io: established.io,
            greeting: established.greeting,
            capabilities: established.capabilities,
            tls: established.tls,
            timeouts: config.timeouts,
            messages_sent: 0,
            usable: true,
        })
    }

    /// Sends one message. `body` is the complete message (header and body); line endings are
    /// normalized to CRLF and dot-stuffed on the way (see `data`), except for BINARYMIME,
    /// which goes with BDAT exactly as given.
    ///
    /// Errors are per transaction (see [`ClientError`]); when one leaves the connection in an
    /// unknown state, [`Connection::is_usable`] turns false and later calls fail with
    /// [`ClientError::Unusable`].
    pub async fn send(
        &mut self,
        tx: &Transaction,
        body: &[u8],
    ) -> Result<SendOutcome, ClientError> {
        self.check_usable()?;
        let plan = transaction::plan(tx, body, &self.capabilities, self.io.peer())?;
        let result = send::run(
            &mut self.io,
            tx,
            plan,
            body,
            self.capabilities.pipelining,
            &self.timeouts,
        )
        .await;
        match result {
            Ok(finished) => {
                if finished.connection_done {
                    self.usable = false;
                }
                if finished
                    .outcome
                    .data
                    .as_ref()
                    .is_some_and(|r| (200..300).contains(&r.code))
                {
                    self.messages_sent += 1;
                }
                Ok(finished.outcome)
            }
            Err(e) => {
                if e.breaks_connection() {
                    self.usable = false;
                }
                Err(e)
            }
        }
    }

    /// RSET (RFC 5321 §4.1.1.5): a cheap check that the server still listens before the
    /// connection is reused. `send` already leaves no transaction open.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        self.check_usable()?;
        let result = self
            .io
            .command("RSET", Stage::Rset, self.timeouts.command)
            .await;
        match result {
            Ok(r) if (200..300).contains(&r.code) => Ok(()),
            Ok(r) => {
                self.usable = false;
                Err(session::unexpected(&self.io, Stage::Rset, r))
            }
            Err(e) => {
                self.usable = false;
                Err(e)
            }
        }
    }

    /// QUIT and close. On a connection that is no longer usable only the socket is closed
    /// (a QUIT could be taken for message data).
    pub async fn quit(mut self) -> Result<(), ClientError> {
        let wait = self.timeouts.command.min(QUIT_WAIT);
        let result = if self.usable {
            match self.io.command("QUIT", Stage::Quit, wait).await {
                Ok(r) if (200..300).contains(&r.code) => Ok(()),
                Ok(r) => Err(session::unexpected(&self.io, Stage::Quit, r)),
                Err(e) => Err(e),
            }
        } else {
            Ok(())
        };
        self.io.shutdown(wait).await;
        result
    }

    /// Messages the server accepted (2xx after the data) on this connection.
    pub fn messages_sent(&self) -> u32 {
        self.messages_sent
    }

    /// The TLS session, `None` for plaintext.
    pub fn tls_info(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// The server's address.
    pub fn peer(&self) -> SocketAddr {
        self.io.peer_addr()
    }

    /// The server as named in errors: address and host name.
    pub fn peer_name(&self) -> &Peer {
        self.io.peer()
    }

    /// The 220 greeting.
    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }

    /// What the server offers, from the last EHLO (after STARTTLS: the one over TLS).
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// False once an error left the connection in an unknown state, or the server closed it.
    pub fn is_usable(&self) -> bool {
        self.usable
    }

    fn check_usable(&self) -> Result<(), ClientError> {
        if self.usable {
            Ok(())
        } else {
            Err(ClientError::Unusable {
                peer: self.io.peer().clone(),
            })
        }
    }
}
