//! What a plugin may look at (the session and the transaction so far) and what it may change
//! (typed message edits).

use std::net::{IpAddr, SocketAddr};

use mailroom_smtp::{ForwardPath, MailParams, RcptParams, ReversePath};

use crate::Notes;

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
    /// What plugins noted about this connection (kept across STARTTLS and transactions).
    pub notes: Notes,
}

impl SessionInfo {
    /// A new connection of `client` to `local` on `listener` (named `hostname`): no HELO, no
    /// TLS, no AUTH, not submission, no notes yet.
    pub fn new(
        listener: impl Into<String>,
        hostname: impl Into<String>,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Self {
        SessionInfo {
            listener: listener.into(),
            hostname: hostname.into(),
            client,
            local,
            helo: None,
            esmtp: false,
            tls: false,
            auth_user: None,
            submission: false,
            notes: Notes::default(),
        }
    }

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
    /// What plugins noted about this transaction.
    pub notes: Notes,
}

impl Transaction {
    /// A new transaction after `MAIL FROM`.
    pub fn new(sender: ReversePath, mail_params: MailParams) -> Self {
        Transaction {
            sender,
            mail_params,
            recipients: Vec::new(),
            notes: Notes::default(),
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
    /// Authentication results (RFC 8601 `resinfo`, such as `spf=pass smtp.mailfrom=a.example`)
    /// that the chain writes as one `Authentication-Results:` field when the data hook ends.
    pub auth_results: Vec<String>,
    /// Envelope recipients to replace, as `(address as received, new addresses)`: aliases.
    /// The server queues the new addresses instead (each once), with the original's DSN
    /// parameters.
    pub recipient_rewrites: Vec<(String, Vec<String>)>,
    /// When set, `Authentication-Results:` fields already in the message that claim this
    /// authserv-id (ours) are removed: only we may speak for our host name (RFC 8601 §5).
    pub strip_auth_results_of: Option<String>,
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

    /// Replaces the envelope recipient `address` (as received) by `targets` (an alias).
    pub fn rewrite_recipient(&mut self, address: impl Into<String>, targets: Vec<String>) {
        self.recipient_rewrites.push((address.into(), targets));
    }

    /// Records one authentication result (`method=result property=value ...`) for the
    /// `Authentication-Results:` field. CR and LF are replaced by spaces.
    pub fn add_auth_result(&mut self, resinfo: impl Into<String>) {
        let resinfo: String = resinfo
            .into()
            .chars()
            .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
            .collect();
        self.auth_results.push(resinfo);
    }

    /// Turns the recorded results into one `Authentication-Results: <authserv_id>; ...` field
    /// (folded, a result per line) and removes forged fields that claim `authserv_id`. Does
    /// nothing when no plugin recorded a result.
    pub fn finish_auth_results(&mut self, authserv_id: &str) {
        if self.auth_results.is_empty() {
            return;
        }
        let value = std::iter::once(authserv_id.to_owned())
            .chain(self.auth_results.drain(..))
            .collect::<Vec<_>>()
            .join(";\r\n\t");
        self.add_headers
            .push(("Authentication-Results".to_owned(), value));
        self.strip_auth_results_of = Some(authserv_id.to_owned());
    }

    /// Requests that every `name:` field be removed from the message's header section.
    pub fn remove_header(&mut self, name: impl Into<String>) {
        self.remove_headers.push(name.into());
    }

    /// Whether a field is an `Authentication-Results:` whose authserv-id (the first word of
    /// its value, up to `;`) is ours.
    fn forged_auth_results(&self, name: &[u8], value: &[u8]) -> bool {
        let Some(ours) = &self.strip_auth_results_of else {
            return false;
        };
        if !name.eq_ignore_ascii_case(b"Authentication-Results") {
            return false;
        }
        let id_end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
        value[..id_end]
            .split(|b| b.is_ascii_whitespace())
            .find(|w| !w.is_empty())
            .is_some_and(|id| id.eq_ignore_ascii_case(ours.as_bytes()))
    }

    /// Whether applying the edits changes the existing header section (removals).
    pub fn removes_any(&self) -> bool {
        !self.remove_headers.is_empty() || self.strip_auth_results_of.is_some()
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
                            || self.forged_auth_results(name, &content[colon + 1..])
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
    fn one_folded_authentication_results_field_and_forged_ones_removed() {
        let mut edits = MessageEdits::default();
        edits.finish_auth_results("mx.test");
        assert!(
            edits.add_headers.is_empty() && !edits.removes_any(),
            "nothing recorded"
        );
        edits.add_auth_result("spf=pass smtp.mailfrom=a.example");
        edits.add_auth_result("dkim=fail\r\n header.d=a.example");
        edits.finish_auth_results("mx.test");
        assert_eq!(
            edits.add_headers,
            [(
                "Authentication-Results".to_owned(),
                "mx.test;\r\n\tspf=pass smtp.mailfrom=a.example;\r\n\tdkim=fail   header.d=a.example"
                    .to_owned()
            )]
        );
        let message = b"Authentication-Results: MX.test; spf=pass\r\n  smtp.mailfrom=forged\r\nAuthentication-Results: other.example; dkim=pass\r\nSubject: s\r\n\r\nbody\r\n";
        assert_eq!(
            edits.strip_removed(message),
            b"Authentication-Results: other.example; dkim=pass\r\nSubject: s\r\n\r\nbody\r\n"
                .to_vec()
        );
    }

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
