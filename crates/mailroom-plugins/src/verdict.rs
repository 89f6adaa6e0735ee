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
    /// A permanent refusal. A code outside 500..=599 is replaced by 550.
    pub fn reject(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Verdict {
        let code = if (500..600).contains(&code) {
            code
        } else {
            550
        };
        Verdict::Reject(Reply::new(
            code,
            EnhancedCode(5, enhanced.1, enhanced.2),
            text,
        ))
    }

    /// A temporary refusal. A code outside 400..=499 is replaced by 451.
    pub fn tempfail(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Verdict {
        let code = if (400..500).contains(&code) {
            code
        } else {
            451
        };
        Verdict::TempFail(Reply::new(
            code,
            EnhancedCode(4, enhanced.1, enhanced.2),
            text,
        ))
    }

    /// Refuse with a reply and close the connection.
    pub fn disconnect(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Verdict {
        Verdict::Disconnect(Reply::new(
            code,
            EnhancedCode(enhanced.0, enhanced.1, enhanced.2),
            text,
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
