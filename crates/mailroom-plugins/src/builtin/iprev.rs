//! `iprev`: forward-confirmed reverse DNS of the client (RFC 8601 §3, Haraka's `fcrdns`). At
//! connect the client's address is looked up as PTR; each name found (at most
//! [`MAX_NAMES`]) is looked up as A (or AAAA for an IPv6 client), and the check passes when one
//! of them leads back to the address. The results (RFC 8601 §2.7.3):
//!
//! | result      | when                                                               |
//! |-------------|--------------------------------------------------------------------|
//! | `pass`      | a PTR name resolves back to the address                            |
//! | `fail`      | PTR names exist, but none resolves back (mismatch, NXDOMAIN, no A) |
//! | `permerror` | no PTR data for the address (NXDOMAIN or no PTR record)            |
//! | `temperror` | a lookup timed out or failed (SERVFAIL), and nothing passed        |
//!
//! The result is recorded in `Authentication-Results` at DATA and kept as an [`Iprev`] note
//! (the `helo` plugin compares the EHLO name with the verified name). `onFail` decides what a
//! `fail` or `permerror` does: nothing, a [`Suspicion`] note, or `554 5.7.25` (RFC 7372).

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{Name, RData};
use mailroom_config::{FailMode, IprevPluginSpec};
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};
use tokio::task::JoinSet;

use super::dnsbl::reverse_name;
use crate::{Env, MessageEdits, Plugin, PluginError, SessionInfo, Suspicion, Transaction, Verdict};

/// Clients the iprev plugin checked, by listener and result.
static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_iprev_checks_total",
                "Clients the iprev plugin checked, by listener and outcome (the RFC 8601 iprev \
                 result: pass, fail, permerror, temperror).",
            ),
            &["listener", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Most PTR names whose addresses are looked up.
pub const MAX_NAMES: usize = 10;

/// An RFC 8601 `iprev` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IprevResult {
    /// A PTR name resolves back to the client's address.
    Pass,
    /// PTR names exist but none resolves back to the address.
    Fail,
    /// A lookup failed in a way that may pass later.
    TempError,
    /// No PTR data is published for the address.
    PermError,
}

impl IprevResult {
    /// The result as written in `Authentication-Results` and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            IprevResult::Pass => "pass",
            IprevResult::Fail => "fail",
            IprevResult::TempError => "temperror",
            IprevResult::PermError => "permerror",
        }
    }
}

/// Connection note: the client's `iprev` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iprev {
    /// The result.
    pub result: IprevResult,
    /// The verified name (lowercase, without the final dot) when the result is `pass`.
    pub name: Option<String>,
}

impl Iprev {
    /// The `Authentication-Results` entry (RFC 8601 §2.7.3) for a client at `ip`: `iprev=pass
    /// policy.iprev=192.0.2.7 (host.example.test)`. An IPv6 address is a quoted string (`:` is
    /// not allowed in a token).
    pub fn auth_result(&self, ip: IpAddr) -> String {
        let ip = ip.to_canonical();
        let value = match ip {
            IpAddr::V4(_) => ip.to_string(),
            IpAddr::V6(_) => format!("\"{ip}\""),
        };
        let mut entry = format!("iprev={} policy.iprev={value}", self.result.as_str());
        if let Some(name) = self.name.as_deref().filter(|n| is_plain_hostname(n)) {
            entry.push_str(&format!(" ({name})"));
        }
        entry
    }
}

/// Whether `name` may go into a header comment as is (letters, digits, `-`, `_`, `.`).
fn is_plain_hostname(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A DNS name as text: lowercase, without the final dot.
pub(crate) fn name_text(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// What the PTR lookup of an address found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PtrAnswer {
    /// The names, in the order of the answer.
    Names(Vec<Name>),
    /// NXDOMAIN or no PTR record.
    Missing,
    /// The lookup failed.
    Failed(String),
}

/// The PTR names of `ip`.
pub(crate) async fn ptr_names(resolver: &TokioResolver, ip: IpAddr) -> PtrAnswer {
    let suffix = if ip.to_canonical().is_ipv4() {
        "in-addr.arpa"
    } else {
        "ip6.arpa"
    };
    let Ok(name) = Name::from_ascii(reverse_name(ip, suffix)) else {
        return PtrAnswer::Failed("cannot build the reverse name".to_owned());
    };
    match resolver.reverse_lookup(name).await {
        Ok(lookup) => {
            let names: Vec<Name> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::PTR(ptr) => Some(ptr.0.clone()),
                    _ => None,
                })
                .collect();
            if names.is_empty() {
                PtrAnswer::Missing
            } else {
                PtrAnswer::Names(names)
            }
        }
        Err(e) if e.is_no_records_found() => PtrAnswer::Missing,
        Err(e) => PtrAnswer::Failed(e.to_string()),
    }
}

/// What the forward lookup of one PTR name found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forward {
    Match,
    NoMatch,
    Failed,
}

/// Whether `name` has an address record (A for an IPv4 `ip`, AAAA for IPv6) equal to `ip`.
async fn forward(resolver: &TokioResolver, name: Name, ip: IpAddr) -> Forward {
    let found = match ip {
        IpAddr::V4(_) => resolver.ipv4_lookup(name).await,
        IpAddr::V6(_) => resolver.ipv6_lookup(name).await,
    };
    match found {
        Ok(lookup) => {
            let matches = lookup.answers().iter().any(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0) == ip,
                RData::AAAA(aaaa) => IpAddr::V6(aaaa.0) == ip,
                _ => false,
            });
            if matches {
                Forward::Match
            } else {
                Forward::NoMatch
            }
        }
        Err(e) if e.is_no_records_found() => Forward::NoMatch,
        Err(_) => Forward::Failed,
    }
}

/// The `iprev` result for `ip` (no time limit: the caller sets one).
pub(crate) async fn verify(resolver: &TokioResolver, ip: IpAddr) -> Iprev {
    let ip = ip.to_canonical();
    let names = match ptr_names(resolver, ip).await {
        PtrAnswer::Names(names) => names,
        PtrAnswer::Missing => return iprev(IprevResult::PermError, None),
        PtrAnswer::Failed(_) => return iprev(IprevResult::TempError, None),
    };
    let names: Vec<Name> = names.into_iter().take(MAX_NAMES).collect();
    let mut tasks = JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let (resolver, name) = (resolver.clone(), name.clone());
        tasks.spawn(async move { (i, forward(&resolver, name, ip).await) });
    }
    let mut results = vec![Forward::Failed; names.len()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, found)) = joined
            && let Some(slot) = results.get_mut(i)
        {
            *slot = found;
        }
    }
    decide(&names, &results)
}

/// The result from the forward lookups of the PTR names: the first name that matches passes.
fn decide(names: &[Name], results: &[Forward]) -> Iprev {
    if let Some(i) = results.iter().position(|f| *f == Forward::Match) {
        return iprev(IprevResult::Pass, names.get(i).map(name_text));
    }
    if results.contains(&Forward::Failed) {
        iprev(IprevResult::TempError, None)
    } else {
        iprev(IprevResult::Fail, None)
    }
}

fn iprev(result: IprevResult, name: Option<String>) -> Iprev {
    Iprev { result, name }
}

/// The `iprev` plugin.
#[derive(Debug)]
pub struct IprevPlugin {
    resolver: TokioResolver,
    tag: bool,
    reject: bool,
    on_temp_error: FailMode,
    timeout: Duration,
}

impl IprevPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &IprevPluginSpec, _path: &str, env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            resolver: env.dns()?.resolver().clone(),
            tag: spec.on_fail.tags(),
            reject: spec.on_fail.rejects(),
            on_temp_error: spec.on_temp_error,
            timeout: spec.timeout.as_duration(),
        })
    }
}

#[async_trait]
impl Plugin for IprevPlugin {
    fn name(&self) -> &'static str {
        "iprev"
    }

    async fn connect(&self, s: &SessionInfo) -> Verdict {
        let ip = s.client_ip().to_canonical();
        let found = tokio::time::timeout(self.timeout, verify(&self.resolver, ip))
            .await
            .unwrap_or(iprev(IprevResult::TempError, None));
        let result = found.result;
        CHECKS
            .with_label_values(&[&s.listener, result.as_str()])
            .inc();
        tracing::debug!(listener = %s.listener, client = %ip, result = result.as_str(), name = ?found.name, "iprev");
        s.notes.insert(found);
        if s.notes.contains::<crate::Trusted>() {
            return Verdict::Continue;
        }
        match result {
            IprevResult::Pass => Verdict::Continue,
            IprevResult::Fail | IprevResult::PermError => {
                if self.reject {
                    Verdict::reject(
                        554,
                        (5, 7, 25),
                        format!("Reverse DNS validation failed for {ip}"),
                    )
                } else {
                    if self.tag {
                        Suspicion::add(&s.notes, format!("iprev {}", result.as_str()));
                    }
                    Verdict::Continue
                }
            }
            IprevResult::TempError => match self.on_temp_error {
                FailMode::Accept => Verdict::Continue,
                // RFC 5321 §3.8: 421 and close is the temporary refusal of a connection.
                FailMode::Tempfail => Verdict::disconnect(
                    421,
                    (4, 7, 25),
                    format!("Reverse DNS of {ip} could not be checked, try again later"),
                ),
            },
        }
    }

    async fn data(
        &self,
        s: &SessionInfo,
        _tx: &Transaction,
        _body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        if let Some(found) = s.notes.get::<Iprev>() {
            edits.add_auth_result(found.auth_result(s.client_ip()));
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_matching_name_passes_and_failures_are_told_apart() {
        let names: Vec<Name> = ["a.example.test.", "B.Example.Test."]
            .iter()
            .map(|n| Name::from_ascii(n).expect("valid test input"))
            .collect();
        use Forward::*;
        assert_eq!(
            decide(&names, &[NoMatch, Match]),
            iprev(IprevResult::Pass, Some("b.example.test".into()))
        );
        assert_eq!(decide(&names, &[Failed, Match]).result, IprevResult::Pass);
        assert_eq!(
            decide(&names, &[NoMatch, Failed]).result,
            IprevResult::TempError
        );
        assert_eq!(
            decide(&names, &[NoMatch, NoMatch]).result,
            IprevResult::Fail
        );
    }

    #[test]
    fn authentication_results_entries() {
        let v4: IpAddr = "192.0.2.7".parse().expect("valid test input");
        let pass = iprev(IprevResult::Pass, Some("host.example.test".into()));
        assert_eq!(
            pass.auth_result(v4),
            "iprev=pass policy.iprev=192.0.2.7 (host.example.test)"
        );
        assert_eq!(
            iprev(IprevResult::PermError, None)
                .auth_result("::ffff:192.0.2.8".parse().expect("valid test input")),
            "iprev=permerror policy.iprev=192.0.2.8"
        );
        assert_eq!(
            iprev(IprevResult::Fail, None)
                .auth_result("2001:db8::1".parse().expect("valid test input")),
            "iprev=fail policy.iprev=\"2001:db8::1\""
        );
        // A name that would break out of the comment is left out.
        let odd = iprev(IprevResult::Pass, Some("a(b);c.test".into()));
        assert_eq!(odd.auth_result(v4), "iprev=pass policy.iprev=192.0.2.7");
    }
}
