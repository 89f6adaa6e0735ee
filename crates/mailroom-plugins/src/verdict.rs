//! What a plugin answers at a hook: continue, accept, or an SMTP refusal.

use mailroom_smtp::{EnhancedCode, Reply};

/// The hook points of an inbound session, in the order a session meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Client connected.
    Connect,
    /// EHLO / HELO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// End of DATA / last BDAT chunk.
    Data,
}

impl Hook {
    /// Lower-case name used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Helo => "helo",
            Hook::Mail => "mail",
            Hook::Rcpt => "rcpt",
            Hook::Data => "data",
        }
    }
}

/// Longest reply text a plugin sends (one reply line stays well under RFC 5321's 512 octets).
pub const MAX_REPLY_TEXT: usize = 200;

/// `text` from a peer, DNS or a service made fit for an SMTP reply line (ASCII, RFC 5321
/// §4.2): control characters become spaces, other non-ASCII characters `?`; at most `max`
/// characters, trimmed.
pub fn reply_text(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| match c {
            ' '..='~' => c,
            c if c.is_control() => ' ',
            _ => '?',
        })
        .take(max)
        .collect();
    clean.trim().to_owned()
}

/// A plugin's answer (Haraka: CONT, OK, DENY, DENYSOFT, DENYDISCONNECT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No opinion: the next plugin decides.
    Continue,
    /// Accept at this hook and skip the remaining plugins for it.
    Accept,
    /// Permanent refusal; the reply is 5xx.
    Reject(Reply),
    /// Temporary refusal; the reply is 4xx.
    TempFail(Reply),
    /// Refuse and close the connection after the reply.
    Disconnect(Reply),
}

impl Verdict {
    /// A permanent refusal. A code outside 500..=599 is replaced by 550; the text goes
    /// through [`reply_text`].
    pub fn reject(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Verdict {
        let code = if (500..600).contains(&code) {
            code
        } else {
            550
        };
        Verdict::Reject(Reply::new(
            code,
            EnhancedCode(5, enhanced.1, enhanced.2),
            reply_text(&text.into(), MAX_REPLY_TEXT),
        ))
    }

    /// A temporary refusal. A code outside 400..=499 is replaced by 451; the text goes
    /// through [`reply_text`].
    pub fn tempfail(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Verdict {
        let code = if (400..500).contains(&code) {
            code
        } else {
            451
        };
        Verdict::TempFail(Reply::new(
            code,
            EnhancedCode(4, enhanced.1, enhanced.2),
            reply_text(&text.into(), MAX_REPLY_TEXT),
        ))
    }

    /// Refuse with a reply and close the connection; the text goes through [`reply_text`].
    pub fn disconnect(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Verdict {
        Verdict::Disconnect(Reply::new(
            code,
            EnhancedCode(enhanced.0, enhanced.1, enhanced.2),
            reply_text(&text.into(), MAX_REPLY_TEXT),
        ))
    }

    /// True for `Continue` and `Accept`.
    pub fn is_pass(&self) -> bool {
        matches!(self, Verdict::Continue | Verdict::Accept)
    }

    /// Metric label of the verdict.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Continue => "continue",
            Verdict::Accept => "accept",
            Verdict::Reject(_) => "reject",
            Verdict::TempFail(_) => "tempfail",
            Verdict::Disconnect(_) => "disconnect",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_REPLY_TEXT, Verdict, reply_text};

    #[test]
    fn refusals_carry_only_ascii_reply_text_of_bounded_length() {
        assert_eq!(reply_text(" spam\r\nsource \u{7} ", 200), "spam  source");
        assert_eq!(reply_text("listé", 200), "list?");
        assert_eq!(reply_text(&"x".repeat(500), 200).len(), 200);
        let Verdict::Reject(reply) = Verdict::reject(550, (5, 7, 1), "naïve\r\n".repeat(100))
        else {
            panic!("a reject");
        };
        let text = &reply.lines[0];
        assert!(text.len() <= MAX_REPLY_TEXT && text.is_ascii(), "{text:?}");
        assert!(text.starts_with("na?ve"), "{text:?}");
    }
}
