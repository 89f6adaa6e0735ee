//! `helo`: checks the EHLO/HELO name (Haraka's `helo.checks`, Postfix's
//! `reject_non_fqdn_helo_hostname`). Each check is off, tags or rejects:
//!
//! | check                  | fails when                                                      |
//! |------------------------|-----------------------------------------------------------------|
//! | `fqdn`                 | the name is neither a domain with a dot nor an address literal  |
//! | `ourName`              | the name is our host name or a literal of our address            |
//! | `literalMatchesClient` | an address literal is not the client's address                  |
//! | `matchesRdns`          | the name and the client's reverse DNS name are unrelated        |
//! | `resolves`             | the name has no A or AAAA record                                |
//!
//! A rejecting check refuses the command with `550 5.7.1` naming the check (RFC 5321 §4.1.4
//! lets a server refuse EHLO/HELO); a tagging check adds a [`Suspicion`] note and
//! `X-Mailroom-HELO: failed <checks>` to the session's messages. The lookups of `matchesRdns`
//! and `resolves` pass when they fail or time out: a DNS problem is not the client's fault.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::TokioResolver;
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::Name;
use mailroom_config::HeloPluginSpec;
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};

use super::iprev::{Iprev, IprevResult, MAX_NAMES, PtrAnswer, name_text, ptr_names};
use crate::{
    Env, MessageEdits, Plugin, PluginError, SessionInfo, Suspicion, Transaction, Trusted, Verdict,
};

/// EHLO/HELO commands the helo plugin judged, by listener and outcome.
static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_helo_checks_total",
                "EHLO/HELO names the helo plugin judged, by listener and outcome (pass, tag, \
                 reject, skipped: trusted or authenticated).",
            ),
            &["listener", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Failed checks, by listener and check.
static FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_helo_failures_total",
                "Checks of the helo plugin that EHLO/HELO names failed, by listener and check \
                 (fqdn, ourName, literalMatchesClient, matchesRdns, resolves).",
            ),
            &["listener", "check"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// The field added in tagging mode (and removed from incoming messages).
const HEADER: &str = "X-Mailroom-HELO";

/// What a check does with a failing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Tag,
    Reject,
}

/// The checks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Fqdn,
    OurName,
    LiteralMatchesClient,
    MatchesRdns,
    Resolves,
}

impl Check {
    /// The check's name in the config, replies and headers.
    fn as_str(self) -> &'static str {
        match self {
            Check::Fqdn => "fqdn",
            Check::OurName => "ourName",
            Check::LiteralMatchesClient => "literalMatchesClient",
            Check::MatchesRdns => "matchesRdns",
            Check::Resolves => "resolves",
        }
    }

    /// Why a name fails the check, for the reply.
    fn why(self) -> &'static str {
        match self {
            Check::Fqdn => "not a fully qualified domain name or address literal",
            Check::OurName => "that name is ours, not yours",
            Check::LiteralMatchesClient => "the address literal is not your address",
            Check::MatchesRdns => "the name does not match your reverse DNS",
            Check::Resolves => "the name does not resolve",
        }
    }
}

/// An EHLO/HELO argument, read.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HeloName {
    /// A fully qualified domain: lowercase, without a final dot.
    Domain(String),
    /// An address literal (RFC 5321 §4.1.3).
    Literal(IpAddr),
    /// Anything else (a bare word, a bad literal, a dotted quad without brackets).
    Other,
}

impl HeloName {
    fn parse(name: &str) -> HeloName {
        if let Some(inner) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            let ip = match inner.get(..5) {
                Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..]
                    .parse::<Ipv6Addr>()
                    .ok()
                    .map(|ip| IpAddr::V6(ip).to_canonical()),
                _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            };
            return ip.map_or(HeloName::Other, HeloName::Literal);
        }
        let domain = name.strip_suffix('.').unwrap_or(name).to_lowercase();
        if is_fqdn(&domain) {
            HeloName::Domain(domain)
        } else {
            HeloName::Other
        }
    }
}

/// A domain with at least two labels of letters, digits and `-` (not at either end; U-labels
/// allowed), 63 bytes each, 253 in all, whose last label is not all digits.
fn is_fqdn(name: &str) -> bool {
    let labels: Vec<&str> = name.split('.').collect();
    name.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether two names are the same or one is under the other (`mail.example.com` and
/// `example.com`).
fn related(helo: &str, rdns: &str) -> bool {
    let under = |a: &str, b: &str| a.strip_suffix(b).is_some_and(|rest| rest.ends_with('.'));
    helo == rdns || under(helo, rdns) || under(rdns, helo)
}

/// True when a lookup answered that there is no address record.
fn no_address(found: &Result<Lookup, NetError>) -> bool {
    match found {
        Ok(lookup) => lookup.answers().is_empty(),
        Err(e) => e.is_no_records_found(),
    }
}

/// Connection note: the checks the last EHLO/HELO failed in tagging mode.
#[derive(Debug, Clone, Default)]
struct HeloFindings(Vec<&'static str>);

/// The `helo` plugin.
#[derive(Debug)]
pub struct HeloPlugin {
    resolver: TokioResolver,
    fqdn: Mode,
    our_name: Mode,
    literal_matches_client: Mode,
    matches_rdns: Mode,
    resolves: Mode,
    timeout: Duration,
}

impl HeloPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &HeloPluginSpec, _path: &str, env: &Env) -> Result<Self, PluginError> {
        let mode = |off: bool, rejects: bool| match (off, rejects) {
            (true, _) => Mode::Off,
            (false, true) => Mode::Reject,
            (false, false) => Mode::Tag,
        };
        Ok(Self {
            resolver: env.dns()?.resolver().clone(),
            fqdn: mode(spec.fqdn.is_off(), spec.fqdn.rejects()),
            our_name: mode(spec.our_name.is_off(), spec.our_name.rejects()),
            literal_matches_client: mode(
                spec.literal_matches_client.is_off(),
                spec.literal_matches_client.rejects(),
            ),
            matches_rdns: mode(spec.matches_rdns.is_off(), spec.matches_rdns.rejects()),
            resolves: mode(spec.resolves.is_off(), spec.resolves.rejects()),
            timeout: spec.timeout.as_duration(),
        })
    }

    fn mode(&self, check: Check) -> Mode {
        match check {
            Check::Fqdn => self.fqdn,
            Check::OurName => self.our_name,
            Check::LiteralMatchesClient => self.literal_matches_client,
            Check::MatchesRdns => self.matches_rdns,
            Check::Resolves => self.resolves,
        }
    }

    /// The checks without lookups that `name` fails.
    fn local_failures(&self, s: &SessionInfo, name: &HeloName) -> Vec<Check> {
        let client = s.client_ip().to_canonical();
        let ours = s.local.ip().to_canonical();
        let mut failed = Vec::new();
        if *name == HeloName::Other {
            failed.push(Check::Fqdn);
        }
        let claims_us = match name {
            HeloName::Domain(d) => d.eq_ignore_ascii_case(s.hostname.trim_end_matches('.')),
            HeloName::Literal(ip) => *ip == ours && *ip != client,
            HeloName::Other => false,
        };
        if claims_us {
            failed.push(Check::OurName);
        }
        if matches!(name, HeloName::Literal(ip) if *ip != client) {
            failed.push(Check::LiteralMatchesClient);
        }
        failed
    }

    /// The checks with lookups that `domain` fails (each passes when its lookup fails).
    async fn dns_failures(&self, s: &SessionInfo, domain: &str) -> Vec<Check> {
        let rdns = async {
            if self.matches_rdns == Mode::Off {
                return false;
            }
            match self.rdns_names(s).await {
                Some(names) => !names.iter().any(|n| related(domain, n)),
                None => false,
            }
        };
        let resolves = async {
            if self.resolves == Mode::Off {
                return false;
            }
            self.has_no_address(domain).await
        };
        let (rdns_failed, unresolved) =
            tokio::time::timeout(self.timeout, async { tokio::join!(rdns, resolves) })
                .await
                .unwrap_or((false, false));
        let mut failed = Vec::new();
        if rdns_failed {
            failed.push(Check::MatchesRdns);
        }
        if unresolved {
            failed.push(Check::Resolves);
        }
        failed
    }

    /// The client's reverse DNS names to compare with: the verified name from `iprev`, else
    /// the PTR names. `None` when unknown (a lookup failed): the check passes.
    async fn rdns_names(&self, s: &SessionInfo) -> Option<Vec<String>> {
        if let Some(found) = s.notes.get::<Iprev>() {
            return match found.result {
                IprevResult::Pass => Some(found.name.into_iter().collect()),
                IprevResult::TempError => None,
                IprevResult::Fail | IprevResult::PermError => Some(Vec::new()),
            };
        }
        match ptr_names(&self.resolver, s.client_ip()).await {
            PtrAnswer::Names(names) => Some(names.iter().take(MAX_NAMES).map(name_text).collect()),
            PtrAnswer::Missing => Some(Vec::new()),
            PtrAnswer::Failed(_) => None,
        }
    }

    /// True when `domain` has neither an A nor an AAAA record (both lookups answered).
    async fn has_no_address(&self, domain: &str) -> bool {
        let Ok(name) = Name::from_utf8(format!("{domain}.")) else {
            return false;
        };
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name.clone()),
            self.resolver.ipv6_lookup(name)
        );
        no_address(&v4) && no_address(&v6)
    }

    fn refuse(&self, s: &SessionInfo, failed: &[Check]) -> Option<Verdict> {
        let rejecting: Vec<Check> = failed
            .iter()
            .copied()
            .filter(|c| self.mode(*c) == Mode::Reject)
            .collect();
        let first = rejecting.first()?;
        let names: Vec<&str> = rejecting.iter().map(|c| c.as_str()).collect();
        self.count(s, "reject", failed);
        Some(Verdict::reject(
            550,
            (5, 7, 1),
            format!(
                "HELO/EHLO name rejected ({}): {}",
                names.join(", "),
                first.why()
            ),
        ))
    }

    fn count(&self, s: &SessionInfo, outcome: &str, failed: &[Check]) {
        CHECKS.with_label_values(&[&s.listener, outcome]).inc();
        for check in failed {
            FAILURES
                .with_label_values(&[&s.listener, check.as_str()])
                .inc();
        }
    }
}

#[async_trait]
impl Plugin for HeloPlugin {
    fn name(&self) -> &'static str {
        "helo"
    }

    async fn helo(&self, s: &SessionInfo, name: &str) -> Verdict {
        // An accepted EHLO replaces the findings of the one before; a refused one leaves the
        // session (and its findings) as they were.
        if s.notes.contains::<Trusted>() || s.auth_user.is_some() {
            CHECKS.with_label_values(&[&s.listener, "skipped"]).inc();
            s.notes.insert(HeloFindings::default());
            return Verdict::Continue;
        }
        let parsed = HeloName::parse(name);
        let mut failed: Vec<Check> = self
            .local_failures(s, &parsed)
            .into_iter()
            .filter(|c| self.mode(*c) != Mode::Off)
            .collect();
        if let Some(verdict) = self.refuse(s, &failed) {
            return verdict;
        }
        if let HeloName::Domain(domain) = &parsed {
            failed.extend(self.dns_failures(s, domain).await);
            if let Some(verdict) = self.refuse(s, &failed) {
                return verdict;
            }
        }
        if failed.is_empty() {
            self.count(s, "pass", &failed);
            s.notes.insert(HeloFindings::default());
            return Verdict::Continue;
        }
        self.count(s, "tag", &failed);
        let names: Vec<&'static str> = failed.iter().map(|c| c.as_str()).collect();
        tracing::debug!(listener = %s.listener, client = %s.client_ip(), failed = ?names, "helo: tagged");
        Suspicion::add(&s.notes, format!("helo {}", names.join(", ")));
        s.notes.insert(HeloFindings(names));
        Verdict::Continue
    }

    async fn data(
        &self,
        s: &SessionInfo,
        _tx: &Transaction,
        _body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        // Only our own field may be trusted downstream.
        edits.remove_header(HEADER);
        if let Some(found) = s.notes.get::<HeloFindings>()
            && !found.0.is_empty()
            && s.auth_user.is_none()
        {
            edits.add_header(HEADER, format!("failed {}", found.0.join(", ")));
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helo_names_are_read() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("valid test input");
        for (input, expected) in [
            (
                "mail.example.org",
                HeloName::Domain("mail.example.org".into()),
            ),
            (
                "Mail.Example.ORG.",
                HeloName::Domain("mail.example.org".into()),
            ),
            ("bücher.example", HeloName::Domain("bücher.example".into())),
            ("[192.0.2.1]", HeloName::Literal(ip("192.0.2.1"))),
            ("[IPv6:2001:db8::1]", HeloName::Literal(ip("2001:db8::1"))),
            (
                "[ipv6:::ffff:192.0.2.1]",
                HeloName::Literal(ip("192.0.2.1")),
            ),
            ("localhost", HeloName::Other),
            ("192.0.2.1", HeloName::Other),
            ("[192.0.2.300]", HeloName::Other),
            ("[2001:db8::1]", HeloName::Other),
            ("-bad.example", HeloName::Other),
            ("a..example", HeloName::Other),
            ("under_score.example", HeloName::Other),
            ("[]", HeloName::Other),
            ("[", HeloName::Other),
        ] {
            assert_eq!(HeloName::parse(input), expected, "{input}");
        }
    }

    #[test]
    fn names_relate_when_equal_or_one_is_under_the_other() {
        assert!(related("mail.example.org", "mail.example.org"));
        assert!(related("a.mail.example.org", "mail.example.org"));
        assert!(related("example.org", "mail.example.org"));
        assert!(!related("xexample.org", "example.org"));
        assert!(!related("other.example", "mail.example.org"));
    }
}
