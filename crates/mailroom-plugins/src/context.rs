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
    /// Names of header fields to remove from the message (every occurrence, case-insensitive),
    /// before `add_headers` are prepended.
    pub remove_headers: Vec<String>,
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

    /// Requests that every `name:` field be removed from the message's header section.
    pub fn remove_header(&mut self, name: impl Into<String>) {
        self.remove_headers.push(name.into());
    }

    /// `message` without the header fields named in `remove_headers` (each with its
    /// continuation lines). Only the header section, up to the first empty line, is touched.
    pub fn strip_removed(&self, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(message.len());
        let mut rest = message;
        let mut dropping = false;
        while !rest.is_empty() {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            let (line, tail) = rest.split_at(end);
            let content = line.strip_suffix(b"\n").unwrap_or(line);
            let content = content.strip_suffix(b"\r").unwrap_or(content);
            if content.is_empty() {
                out.extend_from_slice(rest);
                return out;
            }
            if !matches!(content[0], b' ' | b'\t') {
                dropping = content
                    .iter()
                    .position(|&b| b == b':')
                    .is_some_and(|colon| {
                        let name = content[..colon].trim_ascii_end();
                        self.remove_headers
                            .iter()
                            .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
                    });
            }
            if !dropping {
                out.extend_from_slice(line);
            }
            rest = tail;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::MessageEdits;

    #[test]
    fn removal_drops_every_occurrence_with_its_folded_lines_and_never_touches_the_body() {
        let mut edits = MessageEdits::default();
        edits.remove_header("subject");
        edits.remove_header("X-Spam");
        let message = b"Subject: one\r\n  folded\r\nFrom: a@b\r\nX-Spam: old\r\nSUBJECT: two\r\n\r\nSubject: in the body\r\n";
        assert_eq!(
            edits.strip_removed(message),
            b"From: a@b\r\n\r\nSubject: in the body\r\n".to_vec()
        );
        // A message without a body separator is all header section.
        assert_eq!(
            edits.strip_removed(b"Subject: x\r\nA: b\r\n"),
            b"A: b\r\n".to_vec()
        );
        // Bare-LF input is handled the same way.
        assert_eq!(
            edits.strip_removed(b"Subject: x\nA: b\n\nbody\n"),
            b"A: b\n\nbody\n".to_vec()
        );
    }
}
