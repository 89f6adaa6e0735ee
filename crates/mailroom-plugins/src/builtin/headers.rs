//! `headers`: adds a missing `Message-ID` and `Date` to messages from submission clients
//! (RFC 6409 §8.2 and §8.3). Relayed mail is left alone, as RFC 5321 §6.4 asks of relays.

use async_trait::async_trait;
use mailroom_config::HeadersPluginSpec;

use crate::{MessageEdits, Plugin, SessionInfo, Transaction, Verdict};

/// The `headers` plugin.
#[derive(Debug)]
pub struct HeadersPlugin {
    add_message_id: bool,
    add_date: bool,
    hostname: String,
}

impl HeadersPlugin {
    /// Builds the plugin; `hostname` is the right-hand side of generated Message-IDs.
    pub fn new(spec: &HeadersPluginSpec, hostname: &str) -> Self {
        HeadersPlugin {
            add_message_id: spec.add_message_id,
            add_date: spec.add_date,
            hostname: hostname.to_string(),
        }
    }
}

/// The value of the first header field called `name` (case-insensitive) in the header section
/// of `message`, unfolded and trimmed. Only the header section (up to the first empty line) is
/// searched.
pub fn header_value(message: &[u8], name: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let continuation = line[0] == b' ' || line[0] == b'\t';
        match (&mut found, continuation) {
            (Some(v), true) => {
                v.push(' ');
                v.push_str(String::from_utf8_lossy(line).trim());
                continue;
            }
            (Some(_), false) => break,
            (None, true) => continue,
            (None, false) => {}
        }
        if let Some(colon) = line.iter().position(|&b| b == b':')
            && line[..colon]
                .trim_ascii_end()
                .eq_ignore_ascii_case(name.as_bytes())
        {
            found = Some(
                String::from_utf8_lossy(&line[colon + 1..])
                    .trim()
                    .to_string(),
            );
        }
    }
    found.map(|v| v.trim().to_string())
}

/// True when the header section of `message` has a field called `name` (case-insensitive).
pub fn has_header(message: &[u8], name: &str) -> bool {
    header_value(message, name).is_some()
}

#[async_trait]
impl Plugin for HeadersPlugin {
    fn name(&self) -> &'static str {
        "headers"
    }

    async fn data(
        &self,
        s: &SessionInfo,
        _tx: &Transaction,
        body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        if !(s.submission || s.auth_user.is_some()) {
            return Verdict::Continue;
        }
        if self.add_date && !has_header(body, "Date") {
            edits.add_header("Date", chrono::Utc::now().to_rfc2822());
        }
        if self.add_message_id && !has_header(body, "Message-ID") {
            edits.add_header(
                "Message-ID",
                format!("<{}@{}>", ulid::Ulid::new(), self.hostname),
            );
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_headers_only_in_the_header_section() {
        let m = b"Subject: hi\r\nmessage-id: <a@b>\r\n\r\nDate: not a header\r\n";
        assert!(has_header(m, "Message-ID"));
        assert!(!has_header(m, "Date"));
        assert!(has_header(b"Date : x\r\n\r\n", "date"));
        assert!(!has_header(b"X-Date: x\r\n\r\n", "date"));
        let folded = b"Message-ID:\r\n <a@b>\r\nSubject: s\r\n\r\n";
        assert_eq!(header_value(folded, "message-id").as_deref(), Some("<a@b>"));
    }
}
