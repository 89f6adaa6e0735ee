//! The message as it is queued: our `Received:` trace field (RFC 5321 §4.4, protocol names of
//! RFC 3848 and RFC 6531), the header fields plugins asked for, then the message as received.

use mailroom_plugins::{MessageEdits, SessionInfo, Transaction};
use mailroom_smtp::ForwardPath;

/// Keeps printable ASCII (no parentheses or brackets that would confuse the comment syntax),
/// at most 255 octets, for client-supplied words placed in a header.
fn clean(word: &str) -> String {
    word.chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | '[' | ']' | ';' | '\\'))
        .take(255)
        .collect()
}

/// The `with` protocol name: SMTP / ESMTP / UTF8SMTP plus S (TLS) and A (authenticated).
pub fn protocol(info: &SessionInfo, smtputf8: bool) -> String {
    let base = if smtputf8 {
        "UTF8SMTP"
    } else if info.esmtp {
        "ESMTP"
    } else {
        "SMTP"
    };
    let mut p = base.to_string();
    if info.tls && base != "SMTP" {
        p.push('S');
    }
    if info.auth_user.is_some() && base != "SMTP" {
        p.push('A');
    }
    p
}

/// Builds the queued message: Received, plugin headers, then `body`.
pub fn assemble(
    info: &SessionInfo,
    tx: &Transaction,
    queue_id: &str,
    edits: &MessageEdits,
    body: &[u8],
) -> Vec<u8> {
    let helo = info
        .helo
        .as_deref()
        .map(clean)
        .unwrap_or_else(|| "unknown".into());
    let mut head = format!(
        "Received: from {helo} ([{ip}])\r\n\tby {host} (Mailroom) with {proto} id {queue_id}",
        ip = info.client_ip(),
        host = info.hostname,
        proto = protocol(info, tx.mail_params.smtputf8),
    );
    if let [(ForwardPath::Mailbox(m), _)] = tx.recipients.as_slice() {
        // The parser admits no control characters in addresses, and UTF-8 only with SMTPUTF8,
        // where the header may carry it (RFC 6532). Display re-quotes the local part.
        let addr = m.to_string();
        if !addr.chars().any(char::is_control) {
            head.push_str(&format!("\r\n\tfor <{addr}>"));
        }
    }
    head.push_str(&format!(";\r\n\t{}\r\n", chrono::Utc::now().to_rfc2822()));
    for (name, value) in &edits.add_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    if !edits.removes_any() {
        out.extend_from_slice(body);
    } else {
        out.extend_from_slice(&edits.strip_removed(body));
    }
    out
}
