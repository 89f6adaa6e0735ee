//! Sender authentication with `mail-auth` over the chain's shared resolver
//! ([`Dns`](crate::dns::Dns)): `spf` (RFC 7208) at MAIL FROM, `dkimVerify` (RFC 6376), `dmarc`
//! (RFC 7489) and `arcVerify` (RFC 8617) after DATA.
//!
//! Each plugin records its result with [`MessageEdits::add_auth_result`] (the chain writes the
//! one `Authentication-Results:` field and drops forged ones that claim our host name) and then
//! acts as its settings say: record only, tag (an `X-Mailroom-<check>:` header plus a
//! [`Suspicion`] note for `tarpit`), or refuse. What a check learned is kept in the
//! transaction's notes ([`SpfNote`], [`DkimNote`]), so `dmarc` reuses the results of `spf` and
//! `dkimVerify`, and computes them itself when they are not in the chain. Clients vouched for
//! by a [`Trusted`] note are checked but never refused; authenticated clients
//! are not checked unless `checkAuthenticated` says so.
//!
//! `mail-auth` parses what peers and DNS send; its results are matched, never unwrapped, and
//! every DNS-bound step runs under the plugin's `timeout` (a timeout is a `temperror`).

mod arc;
mod dkim;
mod dmarc;
mod spf;

pub use arc::ArcVerifyPlugin;
pub use dkim::DkimVerifyPlugin;
pub use dkim::{DkimNote, DkimSignatureResult};
pub use dmarc::DmarcPlugin;
pub use spf::SpfPlugin;
pub use spf::{SpfIdentity, SpfNote};

use mail_auth::{DnsError, Error};
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};

use crate::{MessageEdits, SessionInfo, Suspicion, Trusted};

/// The counter `mailroom_plugin_<kind>_results_total{listener, result}`.
fn results_counter(kind: &str, help: &str) -> IntCounterVec {
    register(
        IntCounterVec::new(
            Opts::new(format!("mailroom_plugin_{kind}_results_total"), help),
            &["listener", "result"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
}

/// Whether the check is left out for this session (an authenticated client, unless the spec
/// asks to check those too).
fn skips(s: &SessionInfo, check_authenticated: bool) -> bool {
    s.auth_user.is_some() && !check_authenticated
}

/// Whether a plugin vouched for the client: it is checked but never refused.
fn trusted(s: &SessionInfo) -> bool {
    s.notes.contains::<Trusted>()
}

/// Tags the message with `header: value` and notes the client as suspicious.
fn tag(s: &SessionInfo, edits: &mut MessageEdits, header: &str, value: &str) {
    edits.add_header(header, value);
    Suspicion::add(&s.notes, format!("{header} {value}"));
}

/// The error recorded when a check ran out of time.
fn timed_out() -> Error {
    Error::Dns(DnsError::Resolver("timeout".to_owned()))
}

/// `value` as an RFC 8601 `pvalue` token: the characters a token may not hold (controls,
/// space, `( ) ; = " \`) are dropped and the length is bounded. Domains and selectors come
/// from the peer.
fn pvalue(value: &str) -> String {
    value
        .chars()
        .filter(|&c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | ';' | '=' | '"' | '\\'))
        .take(255)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::pvalue;

    #[test]
    fn peer_text_is_made_safe() {
        assert_eq!(pvalue("ex(am);ple.org \"x\"=\r\n"), "example.orgx");
        assert_eq!(pvalue(&"a".repeat(300)).len(), 255);
    }
}
