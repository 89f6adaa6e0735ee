//! What a plugin may look at (the session and the transaction so far) and what it may change
//! (typed message edits).

use std::net::{IpAddr, SocketAddr};

use mailroom_smtp::{ForwardPath, MailParams, RcptParams, ReversePath};

/// Facts about the connection, kept by the server and shown to every hook.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Name of the listener (`listeners[].name`).
    pub listener: String,
    /// Our host name (banner, Received).
    pub hostname: String,
    /// The client's address (from the PROXY header when the listener uses it).
    pub client: SocketAddr,
    /// Our local address.
    pub local: SocketAddr,
    /// The EHLO/HELO name, once given.
    pub helo: Option<String>,
    /// Whether EHLO (not HELO) was used.
    pub esmtp: bool,
    /// Whether the connection is TLS (STARTTLS or implicit).
    pub tls: bool,
    /// The authenticated user, once AUTH succeeded.
    pub auth_user: Option<String>,
    /// Whether the listener is a submission listener.
    pub submission: bool,
}

impl SessionInfo {
    /// The client's IP address.
    pub fn client_ip(&self) -> IpAddr {
        self.client.ip()
    }
}

/// The mail transaction being built.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// The reverse-path of MAIL FROM.
    pub sender: ReversePath,
    /// Parameters of MAIL FROM.
    pub mail_params: MailParams,
    /// Accepted recipients so far.
    pub recipients: Vec<(ForwardPath, RcptParams)>,
}

impl Transaction {
    /// A new transaction after `MAIL FROM`.
    pub fn new(sender: ReversePath, mail_params: MailParams) -> Self {
        Transaction {
            sender,
            mail_params,
            recipients: Vec::new(),
        }
    }
}

/// Changes to the message requested by plugins at the data hook, applied by the server before
/// the message is queued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageEdits {
    /// Header fields to prepend, as `(name, value)`; the value must not contain bare CR or LF.
    pub add_headers: Vec<(String, String)>,
}

impl MessageEdits {
    /// Requests a header field `name: value` (CR and LF in the value are replaced by spaces).
    pub fn add_header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let value: String = value
            .into()
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        self.add_headers.push((name.into(), value));
    }
}
