//! Mailbox addresses of the envelope (RFC 5321 §4.1.2, SMTPUTF8 RFC 6531 §3.3).

use serde::{Deserialize, Serialize};

/// `local-part@domain` as received. The local part is kept unquoted (the quoting is re-applied by
/// `Display` when needed); the domain is kept as sent (an A-label, U-label or address literal).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mailbox {
    /// Local part, with quoted-string quoting removed.
    pub local: String,
    /// Domain or address literal (`[192.0.2.1]`) as sent.
    pub domain: String,
}

/// The reverse-path of `MAIL FROM`: a mailbox or the null path `<>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReversePath {
    /// `<>`: the null sender (bounces, RFC 5321 §4.5.5).
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox),
}

/// The forward-path of `RCPT TO`: a mailbox or the bare `<Postmaster>` (RFC 5321 §4.5.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ForwardPath {
    /// `<Postmaster>` without a domain (any case).
    Postmaster,
    /// A recipient mailbox.
    Mailbox(Mailbox),
}
