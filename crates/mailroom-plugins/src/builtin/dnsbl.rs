//! `dnsbl` and `dnswl`: DNS lists of client addresses (RFC 5782). At connect the client's
//! address, reversed (`7.2.0.192` for 192.0.2.7, 32 reversed nibbles for IPv6), is looked up
//! under every configured zone at once; a zone lists the client when it answers an A record
//! that counts (`returnCodes`, or by default any 127.0.0.0/8 answer but the 127.255.255.x error
//! codes). The weights of the listing zones add up to the client's score, compared with
//! `threshold`.
//!
//! - `dnsbl` (Haraka's `dnsbl`, Postfix postscreen's weighted lists): a listed client is
//!   refused at RCPT (550 5.7.1 with the zone's TXT reason) or at connect (554), or tagged:
//!   a [`Suspicion`] note and `X-Mailroom-DNSBL` on its messages.
//! - `dnswl` (Haraka's `dnswl`): a listed client gets the [`Trusted`] note, which the checks
//!   after it honour, and `X-Mailroom-DNSWL` on its messages.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{Name, RData};
use ipnet::IpNet;
use mailroom_config::{DnsZoneSpec, DnsblPluginSpec, DnswlPluginSpec, FailMode};
use mailroom_smtp::{ForwardPath, RcptParams};
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::{
    Env, MessageEdits, Plugin, PluginError, SessionInfo, Suspicion, Transaction, Trusted, Verdict,
    reply_text,
};

/// Connections the dnsbl plugin checked, by listener and outcome.
static DNSBL_CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_plugin_dnsbl_checks_total",
        "Clients the dnsbl plugin looked up, by listener and outcome (clean, listed: the score \
         reached the threshold, error: a lookup failed, skipped: trusted, allowed or private).",
    )
});

/// Commands the dnsbl plugin refused, by listener and outcome.
static DNSBL_REFUSALS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_plugin_dnsbl_refusals_total",
        "Connections and recipients the dnsbl plugin refused, by listener and outcome (reject: \
         listed, tempfail: a lookup failed with onError tempfail).",
    )
});

/// Connections the dnswl plugin checked, by listener and outcome.
static DNSWL_CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "mailroom_plugin_dnswl_checks_total",
        "Clients the dnswl plugin looked up, by listener and outcome (listed: trusted, clean, \
         error: a lookup failed, skipped: already trusted or private).",
    )
});

fn counter(name: &str, help: &str) -> IntCounterVec {
    register(
        IntCounterVec::new(Opts::new(name, help), &["listener", "outcome"])
            .unwrap_or_else(|e| panic!("metric: {e}")),
    )
}

/// The field `dnsbl` adds in tagging mode (and removes from incoming messages).
const DNSBL_HEADER: &str = "X-Mailroom-DNSBL";

/// The field `dnswl` adds for a listed client (and removes from incoming messages).
const DNSWL_HEADER: &str = "X-Mailroom-DNSWL";

/// Longest TXT reason quoted in a reply.
const MAX_REASON: usize = 200;

/// Longest list of zones and reasons in a reply.
const MAX_REPLY_LISTINGS: usize = 400;

/// The name to look up for `ip` under `suffix` (a zone, `in-addr.arpa` or `ip6.arpa`), absolute
/// (with the final dot, so no search domain is tried): `7.2.0.192.bl.example.` for 192.0.2.7.
/// An IPv4-mapped IPv6 address is looked up as the IPv4 address.
pub(crate) fn reverse_name(ip: IpAddr, suffix: &str) -> String {
    let suffix = suffix.trim_end_matches('.');
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{suffix}.")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + suffix.len() + 1);
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    name.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                    name.push('.');
                }
            }
            name.push_str(suffix);
            name.push('.');
            name
        }
    }
}

/// True for addresses no public DNS list knows: loopback, private (RFC 1918, RFC 4193),
/// shared (RFC 6598), link-local, unspecified. The documentation ranges count as public.
pub(crate) fn is_private(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// One zone of a list, ready to query.
#[derive(Debug, Clone)]
struct Zone {
    /// Lowercase, without the final dot.
    name: String,
    weight: u32,
    /// Empty: the default rule.
    codes: Vec<Ipv4Addr>,
}

/// What one zone said about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ZoneAnswer {
    /// Listed; the TXT reason when the zone published one.
    Listed(Option<String>),
    /// Not listed (NXDOMAIN, no A record, or only answers that do not count).
    NotListed,
    /// The lookup failed or the zone answered an error code.
    Failed(String),
}

/// Whether an answer of the zone counts as a listing (`Some(true)`), does not count
/// (`Some(false)`), or is a list error code such as Spamhaus's 127.255.255.254 (`None`).
fn answer_counts(codes: &[Ipv4Addr], answer: Ipv4Addr) -> Option<bool> {
    let [a, b, c, _] = answer.octets();
    if codes.is_empty() {
        match (a, b, c) {
            (127, 255, 255) => None,
            (127, ..) => Some(true),
            _ => Some(false),
        }
    } else {
        Some(codes.contains(&answer))
    }
}

/// Reads the A answers of a zone (RFC 5782 §2.1).
fn judge(codes: &[Ipv4Addr], answers: &[Ipv4Addr]) -> ZoneAnswer {
    if answers
        .iter()
        .any(|&a| answer_counts(codes, a) == Some(true))
    {
        return ZoneAnswer::Listed(None);
    }
    match answers.iter().find(|&&a| answer_counts(codes, a).is_none()) {
        Some(code) => ZoneAnswer::Failed(format!("the list answered its error code {code}")),
        None => ZoneAnswer::NotListed,
    }
}

/// Asks one zone about the client before `deadline`; a listing fetches the TXT reason too
/// (without it when the TXT lookup fails or runs out of time).
async fn ask_zone(
    resolver: TokioResolver,
    zone: Zone,
    ip: IpAddr,
    deadline: Instant,
    want_reason: bool,
) -> ZoneAnswer {
    let Ok(name) = Name::from_ascii(reverse_name(ip, &zone.name)) else {
        return ZoneAnswer::Failed("the zone is not a valid DNS name".to_owned());
    };
    let lookup = match tokio::time::timeout_at(deadline, resolver.ipv4_lookup(name.clone())).await {
        Err(_) => return ZoneAnswer::Failed("no answer in time".to_owned()),
        Ok(Err(e)) if e.is_no_records_found() => return ZoneAnswer::NotListed,
        Ok(Err(e)) => return ZoneAnswer::Failed(e.to_string()),
        Ok(Ok(lookup)) => lookup,
    };
    let answers: Vec<Ipv4Addr> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    let answer = judge(&zone.codes, &answers);
    if answer != ZoneAnswer::Listed(None) || !want_reason {
        return answer;
    }
    let reason = match tokio::time::timeout_at(deadline, resolver.txt_lookup(name)).await {
        Ok(Ok(lookup)) => lookup.answers().iter().find_map(|r| match &r.data {
            RData::TXT(txt) => {
                let joined: Vec<u8> = txt
                    .txt_data
                    .iter()
                    .flat_map(|s| s.iter().copied())
                    .collect();
                let text = reply_text(&String::from_utf8_lossy(&joined), MAX_REASON);
                (!text.is_empty()).then_some(text)
            }
            _ => None,
        }),
        _ => None,
    };
    ZoneAnswer::Listed(reason)
}

/// The answers of every zone, in the order of the zones, all asked at once within `timeout`.
async fn ask_all(
    resolver: &TokioResolver,
    zones: &[Zone],
    ip: IpAddr,
    timeout: Duration,
    want_reason: bool,
) -> Vec<ZoneAnswer> {
    let deadline = Instant::now() + timeout;
    let mut tasks = JoinSet::new();
    for (i, zone) in zones.iter().enumerate() {
        let (resolver, zone) = (resolver.clone(), zone.clone());
        tasks.spawn(async move { (i, ask_zone(resolver, zone, ip, deadline, want_reason).await) });
    }
    let mut answers = vec![ZoneAnswer::Failed("no answer in time".to_owned()); zones.len()];
    while let Some(joined) = tasks.join_next().await {
        if let Ok((i, answer)) = joined
            && let Some(slot) = answers.get_mut(i)
        {
            *slot = answer;
        }
    }
    answers
}

/// A zone that listed the client.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listing {
    zone: String,
    weight: u32,
    reason: Option<String>,
}

/// What the zones said together.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The listings weigh at least the threshold.
    Listed(Vec<Listing>),
    /// Not enough listings, but a lookup failed: `zone: error`.
    Error(String),
    /// Not listed enough, every lookup answered.
    Clean,
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Listed(_) => "listed",
            Outcome::Error(_) => "error",
            Outcome::Clean => "clean",
        }
    }
}

fn outcome(zones: &[Zone], answers: Vec<ZoneAnswer>, threshold: u32) -> Outcome {
    let mut listings = Vec::new();
    let mut errors = Vec::new();
    for (zone, answer) in zones.iter().zip(answers) {
        match answer {
            ZoneAnswer::Listed(reason) => listings.push(Listing {
                zone: zone.name.clone(),
                weight: zone.weight,
                reason,
            }),
            ZoneAnswer::NotListed => {}
            ZoneAnswer::Failed(e) => errors.push(format!("{}: {e}", zone.name)),
        }
    }
    let score: u64 = listings.iter().map(|l| u64::from(l.weight)).sum();
    if score >= u64::from(threshold) && !listings.is_empty() {
        Outcome::Listed(listings)
    } else if !errors.is_empty() {
        Outcome::Error(errors.join("; "))
    } else {
        Outcome::Clean
    }
}

/// The zones of a spec, given as `(name, weight, returnCodes)`, checked (the config validation
/// already did; a spec built without it still gets a clear error).
fn zones(specs: &[DnsZoneSpec], at: &str) -> Result<Vec<Zone>, PluginError> {
    let zones = specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let (name, weight, codes) = (&spec.name, spec.weight, &spec.return_codes);
            let lower = name.trim_end_matches('.').to_ascii_lowercase();
            if lower.is_empty() || Name::from_ascii(format!("{lower}.")).is_err() {
                return Err(PluginError::Invalid {
                    path: format!("{at}.zones[{i}].name"),
                    reason: format!("{name:?} is not a DNS name"),
                });
            }
            Ok(Zone {
                name: lower,
                weight: weight.max(1),
                codes: codes.to_vec(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if zones.is_empty() {
        return Err(PluginError::Invalid {
            path: format!("{at}.zones"),
            reason: "give at least one zone".to_owned(),
        });
    }
    Ok(zones)
}

/// Connection note: what each `dnsbl` entry found at connect, by the entry's field path (two
/// entries of one chain keep their findings apart).
#[derive(Debug, Clone, Default)]
struct DnsblFindings(Vec<(String, Outcome)>);

/// The `dnsbl` plugin.
#[derive(Debug)]
pub struct DnsblPlugin {
    path: String,
    resolver: TokioResolver,
    zones: Vec<Zone>,
    threshold: u32,
    tag: bool,
    at_connect: bool,
    timeout: Duration,
    on_error: FailMode,
    allow: Vec<IpNet>,
    skip_private: bool,
}

impl DnsblPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &DnsblPluginSpec, path: &str, env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            path: path.to_owned(),
            resolver: env.dns()?.resolver().clone(),
            zones: zones(&spec.zones, path)?,
            threshold: spec.threshold.max(1),
            tag: spec.action.tags(),
            at_connect: spec.reject_at.at_connect(),
            timeout: spec.timeout.as_duration(),
            on_error: spec.on_error,
            allow: spec.allow_clients.clone(),
            skip_private: spec.skip_private,
        })
    }

    fn skips(&self, s: &SessionInfo) -> bool {
        let ip = s.client_ip().to_canonical();
        s.notes.contains::<Trusted>()
            || (self.skip_private && is_private(ip))
            || self.allow.iter().any(|net| net.contains(&ip))
    }

    fn finding(&self, s: &SessionInfo) -> Option<Outcome> {
        s.notes.get::<DnsblFindings>().and_then(|f| {
            f.0.into_iter()
                .find(|(path, _)| *path == self.path)
                .map(|(_, o)| o)
        })
    }

    /// The verdict for a client with `outcome` (rejecting mode): 554/550 when listed, a
    /// temporary refusal when a lookup failed and `onError` is `tempfail`.
    fn refusal(&self, s: &SessionInfo, outcome: &Outcome) -> Verdict {
        let ip = s.client_ip().to_canonical();
        let verdict = match outcome {
            Outcome::Listed(listings) => {
                // A reply line has at most 512 octets (RFC 5321 §4.5.3.1.5).
                let text = format!(
                    "Client {ip} listed by {}",
                    reply_text(&describe(listings), MAX_REPLY_LISTINGS)
                );
                let code = if self.at_connect { 554 } else { 550 };
                Verdict::reject(code, (5, 7, 1), text)
            }
            Outcome::Error(_) if self.on_error == FailMode::Tempfail => {
                let text = format!(
                    "Client {ip} could not be checked against DNS blocklists, try again later"
                );
                if self.at_connect {
                    Verdict::disconnect(421, (4, 7, 1), text)
                } else {
                    Verdict::tempfail(451, (4, 7, 1), text)
                }
            }
            Outcome::Error(_) | Outcome::Clean => return Verdict::Continue,
        };
        let label = if matches!(verdict, Verdict::Reject(_)) {
            "reject"
        } else {
            "tempfail"
        };
        DNSBL_REFUSALS
            .with_label_values(&[&s.listener, label])
            .inc();
        verdict
    }
}

/// `zone: reason; zone2` for a reply.
fn describe(listings: &[Listing]) -> String {
    listings
        .iter()
        .map(|l| match &l.reason {
            Some(reason) => format!("{}: {reason}", l.zone),
            None => l.zone.clone(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[async_trait]
impl Plugin for DnsblPlugin {
    fn name(&self) -> &'static str {
        "dnsbl"
    }

    async fn connect(&self, s: &SessionInfo) -> Verdict {
        if self.skips(s) {
            DNSBL_CHECKS
                .with_label_values(&[&s.listener, "skipped"])
                .inc();
            return Verdict::Continue;
        }
        let ip = s.client_ip().to_canonical();
        let answers = ask_all(&self.resolver, &self.zones, ip, self.timeout, !self.tag).await;
        let outcome = outcome(&self.zones, answers, self.threshold);
        DNSBL_CHECKS
            .with_label_values(&[&s.listener, outcome.label()])
            .inc();
        match &outcome {
            Outcome::Listed(listings) => {
                tracing::info!(listener = %s.listener, client = %ip, zones = %describe(listings), "dnsbl: client listed");
                if self.tag {
                    for l in listings {
                        Suspicion::add(&s.notes, format!("dnsbl {}", l.zone));
                    }
                }
            }
            Outcome::Error(e) => {
                tracing::warn!(listener = %s.listener, client = %ip, error = %e, on_error = ?self.on_error, "dnsbl: lookup failed");
            }
            Outcome::Clean => return Verdict::Continue,
        }
        s.notes
            .update(|f: &mut DnsblFindings| f.0.push((self.path.clone(), outcome.clone())));
        if self.at_connect && !self.tag {
            return self.refusal(s, &outcome);
        }
        Verdict::Continue
    }

    async fn rcpt(
        &self,
        s: &SessionInfo,
        _tx: &Transaction,
        to: &ForwardPath,
        _params: &RcptParams,
    ) -> Verdict {
        // RFC 5321 §4.5.1: mail to the bare `postmaster` is always taken, so a listed sender
        // can still reach us.
        if self.tag
            || self.at_connect
            || s.auth_user.is_some()
            || s.notes.contains::<Trusted>()
            || matches!(to, ForwardPath::Postmaster)
        {
            return Verdict::Continue;
        }
        match self.finding(s) {
            Some(outcome) => self.refusal(s, &outcome),
            None => Verdict::Continue,
        }
    }

    async fn data(
        &self,
        s: &SessionInfo,
        _tx: &Transaction,
        _body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        // Only our own field may be trusted downstream.
        edits.remove_header(DNSBL_HEADER);
        if !self.tag {
            return Verdict::Continue;
        }
        if let Some(Outcome::Listed(listings)) = self.finding(s) {
            let value = listings
                .iter()
                .map(|l| format!("{} (weight {})", l.zone, l.weight))
                .collect::<Vec<_>>()
                .join(", ");
            edits.add_header(DNSBL_HEADER, value);
        }
        Verdict::Continue
    }
}

/// Connection note: the allowlist zones that listed the client.
#[derive(Debug, Clone, Default)]
struct DnswlListed(Vec<String>);

/// The `dnswl` plugin.
#[derive(Debug)]
pub struct DnswlPlugin {
    resolver: TokioResolver,
    zones: Vec<Zone>,
    threshold: u32,
    timeout: Duration,
    skip_private: bool,
}

impl DnswlPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &DnswlPluginSpec, path: &str, env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            resolver: env.dns()?.resolver().clone(),
            zones: zones(&spec.zones, path)?,
            threshold: spec.threshold.max(1),
            timeout: spec.timeout.as_duration(),
            skip_private: spec.skip_private,
        })
    }
}

#[async_trait]
impl Plugin for DnswlPlugin {
    fn name(&self) -> &'static str {
        "dnswl"
    }

    async fn connect(&self, s: &SessionInfo) -> Verdict {
        let ip = s.client_ip().to_canonical();
        if s.notes.contains::<Trusted>() || (self.skip_private && is_private(ip)) {
            DNSWL_CHECKS
                .with_label_values(&[&s.listener, "skipped"])
                .inc();
            return Verdict::Continue;
        }
        let answers = ask_all(&self.resolver, &self.zones, ip, self.timeout, false).await;
        let outcome = outcome(&self.zones, answers, self.threshold);
        DNSWL_CHECKS
            .with_label_values(&[&s.listener, outcome.label()])
            .inc();
        match outcome {
            Outcome::Listed(listings) => {
                let zones: Vec<String> = listings.into_iter().map(|l| l.zone).collect();
                tracing::info!(listener = %s.listener, client = %ip, zones = %zones.join(", "), "dnswl: client trusted");
                s.notes.insert(Trusted {
                    by: format!("dnswl {}", zones.join(", ")),
                });
                s.notes.update(|l: &mut DnswlListed| l.0.extend(zones));
            }
            Outcome::Error(e) => {
                tracing::debug!(listener = %s.listener, client = %ip, error = %e, "dnswl: lookup failed");
            }
            Outcome::Clean => {}
        }
        Verdict::Continue
    }

    async fn data(
        &self,
        s: &SessionInfo,
        _tx: &Transaction,
        _body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        edits.remove_header(DNSWL_HEADER);
        if let Some(listed) = s.notes.get::<DnswlListed>() {
            edits.add_header(DNSWL_HEADER, listed.0.join(", "));
        }
        Verdict::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names_for_ipv4_ipv6_and_mapped_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("valid test input");
        assert_eq!(
            reverse_name(ip("192.0.2.7"), "bl.test"),
            "7.2.0.192.bl.test."
        );
        assert_eq!(
            reverse_name(ip("192.0.2.7"), "bl.test."),
            "7.2.0.192.bl.test."
        );
        assert_eq!(
            reverse_name(ip("::ffff:192.0.2.7"), "in-addr.arpa"),
            "7.2.0.192.in-addr.arpa."
        );
        // RFC 5782 §2.4's example.
        assert_eq!(
            reverse_name(ip("2001:db8:1:2:3:4:567:89ab"), "ugly.example.com"),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com."
        );
        assert!(Name::from_ascii(reverse_name(ip("2001:db8::1"), "ip6.arpa")).is_ok());
    }

    #[test]
    fn answers_count_by_return_codes_and_error_codes_fail() {
        let a = |s: &str| s.parse::<Ipv4Addr>().expect("valid test input");
        assert_eq!(judge(&[], &[a("127.0.0.2")]), ZoneAnswer::Listed(None));
        assert_eq!(judge(&[], &[a("192.0.2.1")]), ZoneAnswer::NotListed);
        assert_eq!(judge(&[], &[]), ZoneAnswer::NotListed);
        assert!(matches!(
            judge(&[], &[a("127.255.255.254")]),
            ZoneAnswer::Failed(e) if e.contains("127.255.255.254")
        ));
        let codes = [a("127.0.0.3")];
        assert_eq!(judge(&codes, &[a("127.0.0.2")]), ZoneAnswer::NotListed);
        assert_eq!(
            judge(&codes, &[a("127.0.0.2"), a("127.0.0.3")]),
            ZoneAnswer::Listed(None)
        );
    }

    #[test]
    fn weights_add_up_to_the_threshold_and_errors_count_only_below_it() {
        let zone = |name: &str, weight| Zone {
            name: name.into(),
            weight,
            codes: vec![],
        };
        let zones = [zone("a.test", 1), zone("b.test", 1), zone("c.test", 3)];
        let listed = || ZoneAnswer::Listed(Some("why".into()));
        let failed = || ZoneAnswer::Failed("SERVFAIL".into());
        let no = || ZoneAnswer::NotListed;
        assert_eq!(
            outcome(&zones, vec![listed(), no(), no()], 2),
            Outcome::Clean
        );
        assert!(matches!(
            outcome(&zones, vec![listed(), listed(), no()], 2),
            Outcome::Listed(l) if l.len() == 2
        ));
        assert!(matches!(
            outcome(&zones, vec![no(), no(), listed()], 2),
            Outcome::Listed(_)
        ));
        assert_eq!(
            outcome(&zones, vec![listed(), failed(), no()], 2),
            Outcome::Error("b.test: SERVFAIL".into())
        );
        assert!(matches!(
            outcome(&zones, vec![listed(), failed(), listed()], 2),
            Outcome::Listed(_)
        ));
    }

    #[test]
    fn private_ranges_are_skipped_and_documentation_ranges_are_not() {
        for private in [
            "10.1.2.3",
            "127.0.0.1",
            "100.64.0.1",
            "169.254.1.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:192.168.1.1",
        ] {
            assert!(
                is_private(private.parse().expect("valid test input")),
                "{private}"
            );
        }
        for public in [
            "192.0.2.7",
            "198.51.100.1",
            "203.0.113.9",
            "2001:db8::1",
            "8.8.8.8",
        ] {
            assert!(
                !is_private(public.parse().expect("valid test input")),
                "{public}"
            );
        }
    }
}
