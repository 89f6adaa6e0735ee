//! What can go wrong on an outbound connection, worded for the delivery log and classified for
//! the retry logic.
//!
//! Every error names the peer (`192.0.2.1:25 (mx.example.com)`) and, where it applies, the
//! [`Stage`] of the dialogue. The classification follows Postfix smtp(8):
//!
//! - [`ClientError::is_permanent`] is true only when the *message* can never be delivered this
//!   way: a 5xx reply to `MAIL FROM` (or, unusually, to `DATA` / end of data / `BDAT` when the
//!   reply comes as an error), a message larger than the server's `SIZE`, a message that needs
//!   `SMTPUTF8` or `BINARYMIME` from a server that does not offer it, an unusable sender
//!   address. The caller bounces.
//! - Everything else is transient: the caller defers, and for errors before the mail
//!   transaction ([`ClientError::try_next_host`]) first tries the next MX host. That includes a
//!   5xx greeting or a 5xx to EHLO *and* HELO: it means "this host will not talk to us", not
//!   "this message is undeliverable" (RFC 5321 §3.1 lets a server refuse with 554 for reasons
//!   unrelated to the message; Postfix's `smtp_skip_5xx_greeting`). It also includes every TLS
//!   policy failure (RFC 7672/8461 style: TLS problems defer, never bounce) and a failed AUTH
//!   (Postfix's `smtp_sasl_auth_soft_bounce`: a wrong relay password is an operator problem).
//!
//! Recipient-level answers (RCPT replies, the reply after the final dot) are not errors: they
//! come back in [`SendOutcome`](super::SendOutcome).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailroom_smtp::{AddressError, EnhancedCode, Reply, ReplyError};

/// The server a connection talks to, as it appears in log lines:
/// `192.0.2.1:25 (mx.example.com)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The socket address connected to.
    pub addr: SocketAddr,
    /// The host name the address was found for (MX host or relay); may be empty.
    pub host: Arc<str>,
}

impl Peer {
    /// A peer for `addr`, found under `host`.
    pub fn new(addr: SocketAddr, host: &str) -> Peer {
        Peer {
            addr,
            host: Arc::from(host),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = self.host.trim_end_matches('.');
        if host.is_empty() || host == self.addr.ip().to_string() {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{} ({host})", self.addr)
        }
    }
}

/// A step of the SMTP dialogue, named in errors and usable as a metric label
/// ([`Stage::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The TCP connection.
    Connect,
    /// A TLS handshake (implicit TLS or after STARTTLS).
    TlsHandshake,
    /// The server's greeting.
    Greeting,
    /// `EHLO`.
    Ehlo,
    /// `HELO` (after EHLO got a 5xx).
    Helo,
    /// `STARTTLS`.
    StartTls,
    /// `AUTH`.
    Auth,
    /// `MAIL FROM`.
    Mail,
    /// `RCPT TO`.
    Rcpt,
    /// `DATA` and its 354.
    Data,
    /// Writing the message body.
    DataBody,
    /// The reply after the final dot.
    DataEnd,
    /// `BDAT` with the message (BINARYMIME).
    Bdat,
    /// `RSET`.
    Rset,
    /// `QUIT`.
    Quit,
}

impl Stage {
    /// A short lower-case name for metric labels: `connect`, `tls`, `greeting`, `ehlo`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::TlsHandshake => "tls",
            Stage::Greeting => "greeting",
            Stage::Ehlo => "ehlo",
            Stage::Helo => "helo",
            Stage::StartTls => "starttls",
            Stage::Auth => "auth",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::DataBody => "data_body",
            Stage::DataEnd => "data_end",
            Stage::Bdat => "bdat",
            Stage::Rset => "rset",
            Stage::Quit => "quit",
        }
    }

    /// What was said or done at this stage, for "in reply to ..." and "while ...".
    fn subject(self) -> &'static str {
        match self {
            Stage::Connect => "connecting",
            Stage::TlsHandshake => "the TLS handshake",
            Stage::Greeting => "the greeting",
            Stage::Ehlo => "EHLO",
            Stage::Helo => "HELO",
            Stage::StartTls => "STARTTLS",
            Stage::Auth => "AUTH",
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::DataBody => "the message body",
            Stage::DataEnd => "end of DATA",
            Stage::Bdat => "BDAT",
            Stage::Rset => "RSET",
            Stage::Quit => "QUIT",
        }
    }

    /// Stages before the mail transaction: a failure there is about the host, not the message.
    pub fn is_session_setup(self) -> bool {
        matches!(
            self,
            Stage::Connect
                | Stage::TlsHandshake
                | Stage::Greeting
                | Stage::Ehlo
                | Stage::Helo
                | Stage::StartTls
                | Stage::Auth
        )
    }

    fn waiting(self) -> String {
        match self {
            Stage::Connect => "connecting".to_owned(),
            Stage::TlsHandshake => "in the TLS handshake".to_owned(),
            Stage::Greeting => "waiting for the greeting".to_owned(),
            Stage::DataBody => "sending the message body".to_owned(),
            s => format!("waiting for the reply to {}", s.subject()),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.subject())
    }
}

/// Why the TCP connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    /// The peer answered with a reset (nothing listens on the port).
    #[error("connection refused")]
    Refused,
    /// No route to the host or network.
    #[error("{0}")]
    Unreachable(io::Error),
    /// No answer within the connect timeout.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// Any other socket error.
    #[error("{0}")]
    Other(io::Error),
}

impl ConnectFailure {
    pub(crate) fn from_io(e: io::Error) -> ConnectFailure {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectFailure::Unreachable(e)
            }
            _ => ConnectFailure::Other(e),
        }
    }
}

/// A reply stream that breaks the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A reply line longer than the configured limit.
    #[error("reply line longer than {max} octets")]
    LineTooLong {
        /// The limit, CRLF included.
        max: usize,
    },
    /// A line that is not `ddd`, `ddd text` or `ddd-text`.
    #[error("malformed reply line")]
    Malformed,
    /// A multi-line reply whose lines carry different codes.
    #[error("multi-line reply with inconsistent codes")]
    InconsistentCode,
    /// More lines in one reply than `mailroom_smtp` accepts.
    #[error("reply with too many lines")]
    TooManyLines,
    /// Bytes that arrived after the 220 to STARTTLS, before the handshake: a response
    /// injection attempt (the client-side twin of CVE-2011-0411).
    #[error("unexpected data after the reply to STARTTLS")]
    DataAfterStartTls,
}

impl ProtocolError {
    pub(crate) fn from_reply_error(e: ReplyError, max: usize) -> ProtocolError {
        match e {
            ReplyError::TooLong => ProtocolError::LineTooLong { max },
            ReplyError::Malformed => ProtocolError::Malformed,
            ReplyError::InconsistentCode => ProtocolError::InconsistentCode,
            ReplyError::TooManyLines => ProtocolError::TooManyLines,
        }
    }
}

/// What a message needs that the server does not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// A non-ASCII envelope address needs SMTPUTF8 (RFC 6531 §3.2).
    Smtputf8Address,
    /// UTF-8 header fields need SMTPUTF8 (RFC 6532).
    Smtputf8Headers,
    /// A `BODY=BINARYMIME` message needs BINARYMIME and CHUNKING (RFC 3030 §3); this client
    /// does not convert it to 7bit.
    BinaryMime,
}

impl Missing {
    /// The enhanced status code for the bounce: 5.6.7 and 5.6.9 (RFC 6531 §3.2 / §3.3),
    /// 5.6.3 conversion required but not supported (RFC 3463).
    pub fn status(self) -> EnhancedCode {
        match self {
            Missing::Smtputf8Address => EnhancedCode(5, 6, 7),
            Missing::Smtputf8Headers => EnhancedCode(5, 6, 9),
            Missing::BinaryMime => EnhancedCode(5, 6, 3),
        }
    }
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Missing::Smtputf8Address => {
                "the message has a non-ASCII envelope address, which needs SMTPUTF8, but the server does not offer SMTPUTF8"
            }
            Missing::Smtputf8Headers => {
                "the message has UTF-8 header fields, which need SMTPUTF8, but the server does not offer SMTPUTF8"
            }
            Missing::BinaryMime => {
                "the message is BODY=BINARYMIME, but the server does not offer BINARYMIME with CHUNKING"
            }
        })
    }
}

/// An outbound SMTP failure. See the module documentation for the classification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection failed.
    #[error("connect to {peer}: {failure}")]
    Connect {
        /// The server.
        peer: Peer,
        /// Why.
        failure: ConnectFailure,
    },
    /// The TLS handshake failed (including certificate verification).
    #[error("{peer}: TLS handshake failed: {reason}")]
    Tls {
        /// The server.
        peer: Peer,
        /// rustls' description.
        reason: String,
    },
    /// The policy requires TLS but the server does not offer STARTTLS.
    #[error("{peer}: TLS is required, but the server does not offer STARTTLS")]
    TlsNotOffered {
        /// The server.
        peer: Peer,
    },
    /// A stage took longer than its timeout. A timeout at [`Stage::DataEnd`] leaves it unknown
    /// whether the server took the message (RFC 1047); it may arrive twice.
    #[error("{peer}: timed out after {after:?} {}", stage.waiting())]
    Timeout {
        /// The server.
        peer: Peer,
        /// Where.
        stage: Stage,
        /// The timeout that expired.
        after: Duration,
    },
    /// A read or write failed.
    #[error("{peer}: connection lost during {stage}: {source}")]
    Io {
        /// The server.
        peer: Peer,
        /// Where.
        stage: Stage,
        /// The socket error.
        source: io::Error,
    },
    /// The server closed the connection while a reply was expected.
    #[error("{peer}: connection closed by the server {}", stage.waiting())]
    Closed {
        /// The server.
        peer: Peer,
        /// Where.
        stage: Stage,
    },
    /// The server's replies break the protocol.
    #[error("{peer}: protocol error in the reply to {stage}: {error}")]
    Protocol {
        /// The server.
        peer: Peer,
        /// Where.
        stage: Stage,
        /// What.
        error: ProtocolError,
    },
    /// A reply other than the one needed to go on.
    #[error("{peer} said: {} (in reply to {stage})", one_line(reply))]
    UnexpectedReply {
        /// The server.
        peer: Peer,
        /// Where.
        stage: Stage,
        /// The reply.
        reply: Reply,
    },
    /// The message needs an extension the server lacks; nothing was sent.
    #[error("{peer}: {missing}")]
    Unsupported {
        /// The server.
        peer: Peer,
        /// The extension.
        missing: Missing,
    },
    /// The message is larger than the server's `SIZE` (RFC 1870 §6); nothing was sent.
    #[error("{peer}: message size {size} exceeds the server's limit of {limit} octets")]
    TooLarge {
        /// The server.
        peer: Peer,
        /// The message size as it would be sent.
        size: u64,
        /// The server's `SIZE`.
        limit: u64,
    },
    /// Credentials are configured but cannot be used; they were not sent.
    #[error("{peer}: cannot authenticate: {reason}")]
    AuthUnavailable {
        /// The server.
        peer: Peer,
        /// Why.
        reason: String,
    },
    /// The transaction's sender does not parse; nothing was sent.
    #[error("invalid sender address {address:?}: {error}")]
    InvalidSender {
        /// The sender as given.
        address: String,
        /// Why.
        error: AddressError,
    },
    /// The client configuration cannot be used (e.g. a HELO name with spaces).
    #[error("invalid SMTP client configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// An earlier error left the connection in an unknown state; open a new one.
    #[error("{peer}: connection unusable after an earlier error")]
    Unusable {
        /// The server.
        peer: Peer,
    },
}

/// A reply on one line for log messages: `550 5.7.1 first line second line`.
pub(crate) fn one_line(reply: &Reply) -> String {
    let mut out = format!("{:03}", reply.code.min(999));
    if let Some(e) = reply.enhanced {
        out.push(' ');
        out.push_str(&e.to_string());
    }
    for line in &reply.lines {
        let line = line.trim();
        if !line.is_empty() {
            out.push(' ');
            out.extend(line.chars().filter(|c| !c.is_control()));
        }
    }
    out
}

impl ClientError {
    /// True when the message cannot be delivered this way and should be bounced (see the
    /// module documentation); false means defer and retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::UnexpectedReply { stage, reply, .. } => {
                reply.is_permanent()
                    && matches!(
                        stage,
                        Stage::Mail | Stage::Data | Stage::DataEnd | Stage::Bdat
                    )
            }
            ClientError::Unsupported { .. }
            | ClientError::TooLarge { .. }
            | ClientError::InvalidSender { .. } => true,
            _ => false,
        }
    }

    /// True when another host for the same destination (the next MX) may do better: a
    /// transient failure before the mail transaction started.
    pub fn try_next_host(&self) -> bool {
        if self.is_permanent() {
            return false;
        }
        match self {
            ClientError::Connect { .. }
            | ClientError::Tls { .. }
            | ClientError::TlsNotOffered { .. }
            | ClientError::AuthUnavailable { .. } => true,
            other => other.stage().is_some_and(Stage::is_session_setup),
        }
    }

    /// The stage the error happened at, when it is about one.
    pub fn stage(&self) -> Option<Stage> {
        match self {
            ClientError::Connect { .. } => Some(Stage::Connect),
            ClientError::Tls { .. } => Some(Stage::TlsHandshake),
            ClientError::TlsNotOffered { .. } => Some(Stage::StartTls),
            ClientError::AuthUnavailable { .. } => Some(Stage::Auth),
            ClientError::Timeout { stage, .. }
            | ClientError::Io { stage, .. }
            | ClientError::Closed { stage, .. }
            | ClientError::Protocol { stage, .. }
            | ClientError::UnexpectedReply { stage, .. } => Some(*stage),
            ClientError::Unsupported { .. } | ClientError::TooLarge { .. } => Some(Stage::Mail),
            ClientError::InvalidSender { .. }
            | ClientError::InvalidConfig { .. }
            | ClientError::Unusable { .. } => None,
        }
    }

    /// The server's reply, for [`ClientError::UnexpectedReply`].
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            ClientError::UnexpectedReply { reply, .. } => Some(reply),
            _ => None,
        }
    }

    /// The peer, when the error is about one.
    pub fn peer(&self) -> Option<&Peer> {
        match self {
            ClientError::Connect { peer, .. }
            | ClientError::Tls { peer, .. }
            | ClientError::TlsNotOffered { peer }
            | ClientError::Timeout { peer, .. }
            | ClientError::Io { peer, .. }
            | ClientError::Closed { peer, .. }
            | ClientError::Protocol { peer, .. }
            | ClientError::UnexpectedReply { peer, .. }
            | ClientError::Unsupported { peer, .. }
            | ClientError::TooLarge { peer, .. }
            | ClientError::AuthUnavailable { peer, .. }
            | ClientError::Unusable { peer } => Some(peer),
            ClientError::InvalidSender { .. } | ClientError::InvalidConfig { .. } => None,
        }
    }

    /// The enhanced status code (RFC 3463) for a DSN or the delivery log: the server's own
    /// when it sent one, else one that matches the failure (4.4.1 no answer, 4.4.2 bad
    /// connection, 4.7.4/4.7.5 TLS, 5.3.4 too large, ...). Its class agrees with
    /// [`ClientError::is_permanent`].
    pub fn status(&self) -> EnhancedCode {
        let permanent = self.is_permanent();
        match self {
            ClientError::UnexpectedReply { reply, .. } => {
                let class = if permanent { 5 } else { 4 };
                match reply.enhanced {
                    Some(EnhancedCode(_, s, d)) => EnhancedCode(class, s, d),
                    None if (400..600).contains(&reply.code) => EnhancedCode(class, 0, 0),
                    None => EnhancedCode(class, 5, 0),
                }
            }
            ClientError::Connect { .. } => EnhancedCode(4, 4, 1),
            ClientError::Tls { .. } => EnhancedCode(4, 7, 5),
            ClientError::TlsNotOffered { .. } => EnhancedCode(4, 7, 4),
            ClientError::Timeout { .. }
            | ClientError::Io { .. }
            | ClientError::Closed { .. }
            | ClientError::Unusable { .. } => EnhancedCode(4, 4, 2),
            ClientError::Protocol { .. } => EnhancedCode(4, 5, 0),
            ClientError::Unsupported { missing, .. } => missing.status(),
            ClientError::TooLarge { .. } => EnhancedCode(5, 3, 4),
            ClientError::AuthUnavailable { .. } => EnhancedCode(4, 7, 0),
            ClientError::InvalidSender { .. } => EnhancedCode(5, 1, 7),
            ClientError::InvalidConfig { .. } => EnhancedCode(4, 3, 5),
        }
    }

    /// False when the connection can still carry another transaction after this error (the
    /// transaction was refused or never started); true when it must be dropped.
    pub(crate) fn breaks_connection(&self) -> bool {
        match self {
            ClientError::Unsupported { .. }
            | ClientError::TooLarge { .. }
            | ClientError::InvalidSender { .. }
            | ClientError::InvalidConfig { .. } => false,
            ClientError::UnexpectedReply {
                stage: Stage::Mail,
                reply,
                ..
            } => reply.code == 421,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> Peer {
        Peer::new(SocketAddr::from(([192, 0, 2, 1], 25)), "mx.example.com.")
    }

    #[test]
    fn display_reads_like_a_delivery_log() {
        let cases: Vec<(ClientError, &str)> = vec![
            (
                ClientError::Connect {
                    peer: peer(),
                    failure: ConnectFailure::Refused,
                },
                "connect to 192.0.2.1:25 (mx.example.com): connection refused",
            ),
            (
                ClientError::Connect {
                    peer: Peer::new(SocketAddr::from(([192, 0, 2, 1], 25)), "192.0.2.1"),
                    failure: ConnectFailure::TimedOut(Duration::from_secs(30)),
                },
                "connect to 192.0.2.1:25: timed out after 30s",
            ),
            (
                ClientError::UnexpectedReply {
                    peer: peer(),
                    stage: Stage::Mail,
                    reply: Reply::new(550, EnhancedCode(5, 7, 1), "Sender\nblocked"),
                },
                "192.0.2.1:25 (mx.example.com) said: 550 5.7.1 Sender blocked (in reply to MAIL FROM)",
            ),
            (
                ClientError::Timeout {
                    peer: peer(),
                    stage: Stage::DataEnd,
                    after: Duration::from_millis(300),
                },
                "192.0.2.1:25 (mx.example.com): timed out after 300ms waiting for the reply to end of DATA",
            ),
            (
                ClientError::Protocol {
                    peer: peer(),
                    stage: Stage::Ehlo,
                    error: ProtocolError::LineTooLong { max: 512 },
                },
                "192.0.2.1:25 (mx.example.com): protocol error in the reply to EHLO: reply line longer than 512 octets",
            ),
            (
                ClientError::Closed {
                    peer: peer(),
                    stage: Stage::Greeting,
                },
                "192.0.2.1:25 (mx.example.com): connection closed by the server waiting for the greeting",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
    }

    #[test]
    fn classification() {
        let reply = |stage, code: u16| ClientError::UnexpectedReply {
            peer: peer(),
            stage,
            reply: Reply::plain(code, "x"),
        };
        // (error, permanent, next host, breaks the connection)
        let cases = [
            (reply(Stage::Greeting, 554), false, true, true),
            (reply(Stage::Greeting, 421), false, true, true),
            (reply(Stage::Helo, 550), false, true, true),
            (reply(Stage::Auth, 535), false, true, true),
            (reply(Stage::Mail, 550), true, false, false),
            (reply(Stage::Mail, 451), false, false, false),
            (reply(Stage::Mail, 421), false, false, true),
            (reply(Stage::Data, 250), false, false, true),
            (
                ClientError::TooLarge {
                    peer: peer(),
                    size: 2,
                    limit: 1,
                },
                true,
                false,
                false,
            ),
            (
                ClientError::TlsNotOffered { peer: peer() },
                false,
                true,
                true,
            ),
            (
                ClientError::Timeout {
                    peer: peer(),
                    stage: Stage::DataEnd,
                    after: Duration::from_secs(1),
                },
                false,
                false,
                true,
            ),
        ];
        for (error, permanent, next, breaks) in cases {
            assert_eq!(error.is_permanent(), permanent, "{error}");
            assert_eq!(error.try_next_host(), next, "{error}");
            assert_eq!(error.breaks_connection(), breaks, "{error}");
            assert_eq!(error.status().0 == 5, permanent, "{error}");
        }
        assert_eq!(
            reply(Stage::Mail, 550).status(),
            EnhancedCode(5, 0, 0),
            "class from the reply code"
        );
    }
}
