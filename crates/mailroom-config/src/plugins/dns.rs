//! DNS-based client checks: `dnsbl`, `dnswl`, `iprev` and `helo`. Each spec says which lookups
//! the plugin makes and what it does with the answers; `mailroom-plugins` does the lookups.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::FailMode;
use crate::HumanDuration;
use crate::schema;
use crate::syntax;
use crate::validate::Problems;

/// The default wait for the lookups of one check.
const DEFAULT_TIMEOUT: HumanDuration = HumanDuration::from_secs(5);

/// One DNS list (a DNSBL or DNSWL zone) and how much a listing in it counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsZoneSpec {
    /// The list's zone, e.g. `zen.spamhaus.org`. The client 192.0.2.7 is looked up as
    /// `7.2.0.192.<name>`; an IPv6 client by its 32 reversed nibbles.
    pub name: String,
    /// What a listing in this zone adds to the client's score (at least 1). Default 1.
    pub weight: u32,
    /// The answers that count as a listing, e.g. `[127.0.0.2, 127.0.0.3]`: addresses in
    /// 127.0.0.0/8. Default: any answer in 127.0.0.0/8 except 127.255.255.x, which lists use
    /// for errors (Spamhaus answers 127.255.255.254 to queries it refuses); an error answer
    /// counts as a failed lookup.
    pub return_codes: Vec<Ipv4Addr>,
}

impl Default for DnsZoneSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            weight: 1,
            return_codes: Vec::new(),
        }
    }
}

/// What `dnsbl` does with a client whose score reaches the threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum DnsblAction {
    /// Refuse the client's mail (see `rejectAt`).
    #[default]
    Reject,
    /// Accept, note the client as suspicious and add `X-Mailroom-DNSBL` to its messages.
    Tag,
}

impl DnsblAction {
    /// True for `tag`.
    pub fn tags(self) -> bool {
        self == Self::Tag
    }
}

/// When `dnsbl` refuses a listed client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum DnsblRejectAt {
    /// Refuse every RCPT TO with 550 5.7.1, so the log shows sender and recipients, and
    /// clients that authenticate later are not refused.
    #[default]
    Rcpt,
    /// Refuse the connection with a 554 greeting.
    Connect,
}

impl DnsblRejectAt {
    /// True for `connect`.
    pub fn at_connect(self) -> bool {
        self == Self::Connect
    }
}

/// Looks the client up in DNS blocklists (zones with weights) at connect, all zones at once; a
/// client whose listings weigh at least `threshold` is refused or tagged. Trusted clients (a
/// `dnswl` listing earlier in the chain) and authenticated sessions are never refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsblPluginSpec {
    /// The blocklists to ask (at least one), e.g. `[{name: zen.spamhaus.org, weight: 2}]`.
    pub zones: Vec<DnsZoneSpec>,
    /// The score (sum of the weights of the zones that list the client) at which the client
    /// counts as listed. Default 1: any listing.
    pub threshold: u32,
    /// `reject` (default) the listed client's mail, or `tag` it (header
    /// `X-Mailroom-DNSBL: <zone> (weight N)`, and a suspicion note for `tarpit`).
    pub action: DnsblAction,
    /// When to refuse: at `rcpt` (default; 550 5.7.1 to every RCPT TO) or at `connect` (554
    /// greeting).
    pub reject_at: DnsblRejectAt,
    /// Longest wait for all lookups together. Default 5s.
    pub timeout: HumanDuration,
    /// When a lookup fails (timeout, SERVFAIL, an error answer) and the other zones do not
    /// reach the threshold: `accept` (default, fail open) or `tempfail` (451 4.7.1 at RCPT,
    /// 421 4.7.1 at connect).
    pub on_error: FailMode,
    /// Client networks (CIDR; a bare address means one host) that are never looked up.
    #[serde(deserialize_with = "schema::deserialize_ip_nets")]
    #[schemars(with = "Vec<schema::IpNetString>")]
    pub allow_clients: Vec<IpNet>,
    /// Skip loopback, private (RFC 1918, RFC 4193), shared (100.64.0.0/10) and link-local
    /// clients, which no public list knows. Default true.
    pub skip_private: bool,
}

impl Default for DnsblPluginSpec {
    fn default() -> Self {
        Self {
            zones: Vec::new(),
            threshold: 1,
            action: DnsblAction::Reject,
            reject_at: DnsblRejectAt::Rcpt,
            timeout: DEFAULT_TIMEOUT,
            on_error: FailMode::Accept,
            allow_clients: Vec::new(),
            skip_private: true,
        }
    }
}

impl DnsblPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_zones(&self.zones, self.threshold, at, p);
        check_timeout(&self.timeout, &format!("{at}.timeout"), p);
    }
}

/// Looks the client up in DNS allowlists at connect; a client whose listings weigh at least
/// `threshold` is trusted: the checks after this entry that judge clients (`dnsbl`, `iprev`,
/// `helo`, `greylist`, `tarpit`, `earlyTalker`) let it through, so put `dnswl` first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnswlPluginSpec {
    /// The allowlists to ask (at least one), e.g. `[{name: list.dnswl.org, returnCodes:
    /// [127.0.15.2, 127.0.15.3]}]`.
    pub zones: Vec<DnsZoneSpec>,
    /// The score (sum of the weights of the zones that list the client) at which the client is
    /// trusted. Default 1: any listing.
    pub threshold: u32,
    /// Longest wait for all lookups together; a client not confirmed in time is not trusted.
    /// Default 5s.
    pub timeout: HumanDuration,
    /// Skip loopback, private, shared and link-local clients. Default true.
    pub skip_private: bool,
}

impl Default for DnswlPluginSpec {
    fn default() -> Self {
        Self {
            zones: Vec::new(),
            threshold: 1,
            timeout: DEFAULT_TIMEOUT,
            skip_private: true,
        }
    }
}

impl DnswlPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_zones(&self.zones, self.threshold, at, p);
        check_timeout(&self.timeout, &format!("{at}.timeout"), p);
    }
}

/// What `iprev` does when the client's reverse DNS does not verify (`fail` or `permerror`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum IprevOnFail {
    /// Only record the result (`Authentication-Results`).
    Accept,
    /// Record the result and note the client as suspicious (for `tarpit`).
    #[default]
    Tag,
    /// Refuse the connection with `554 5.7.25` (RFC 7372: reverse DNS validation failed).
    Reject,
}

impl IprevOnFail {
    /// True for `tag`.
    pub fn tags(self) -> bool {
        self == Self::Tag
    }

    /// True for `reject`.
    pub fn rejects(self) -> bool {
        self == Self::Reject
    }
}

/// Checks the client's forward-confirmed reverse DNS at connect (RFC 8601 `iprev`): a PTR name
/// of its address (at most 10 are tried) must resolve back to the address. The result goes
/// into `Authentication-Results` (`iprev=pass policy.iprev=192.0.2.7`) and is noted for `helo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IprevPluginSpec {
    /// When no PTR name verifies (`fail`: the names do not resolve back to the address;
    /// `permerror`: no PTR record): `accept`, `tag` (default) or `reject` (554 5.7.25).
    pub on_fail: IprevOnFail,
    /// When the lookups fail (timeout, SERVFAIL): `accept` (default) or `tempfail` (421 4.7.25
    /// and close).
    pub on_temp_error: FailMode,
    /// Longest wait for all lookups together. Default 5s.
    pub timeout: HumanDuration,
}

impl Default for IprevPluginSpec {
    fn default() -> Self {
        Self {
            on_fail: IprevOnFail::Tag,
            on_temp_error: FailMode::Accept,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl IprevPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_timeout(&self.timeout, &format!("{at}.timeout"), p);
    }
}

/// What one `helo` check does with a name that fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum HeloCheckMode {
    /// The check is not made.
    Off,
    /// Accept, note the client as suspicious and add `X-Mailroom-HELO: failed <checks>`.
    Tag,
    /// Refuse the EHLO/HELO with 550 5.7.1 naming the check.
    Reject,
}

impl HeloCheckMode {
    /// True for `off`.
    pub fn is_off(self) -> bool {
        self == Self::Off
    }

    /// True for `reject`.
    pub fn rejects(self) -> bool {
        self == Self::Reject
    }
}

/// Checks the EHLO/HELO name. Each check is `off`, `tag` or `reject` (550 5.7.1 at EHLO/HELO,
/// which RFC 5321 allows). Trusted clients and authenticated sessions are not checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HeloPluginSpec {
    /// The name must be a fully qualified domain (letters, digits and `-`, with a dot, not all
    /// digits) or an address literal such as `[192.0.2.1]`. Default `reject`.
    pub fqdn: HeloCheckMode,
    /// The client must not claim to be us: our host name, or a literal of the address it
    /// connected to. Default `reject`.
    pub our_name: HeloCheckMode,
    /// An address literal must be the client's own address. Default `reject`.
    pub literal_matches_client: HeloCheckMode,
    /// The name must equal the client's verified reverse DNS name (from an `iprev` entry
    /// earlier in the chain; else a PTR lookup), or one must be under the other
    /// (`mail.example.com` and `example.com`). Default `tag`.
    pub matches_rdns: HeloCheckMode,
    /// The name must have an A or AAAA record. Default `off`.
    pub resolves: HeloCheckMode,
    /// Longest wait for the lookups of `matchesRdns` and `resolves`; a check whose lookup
    /// fails or times out is passed. Default 5s.
    pub timeout: HumanDuration,
}

impl Default for HeloPluginSpec {
    fn default() -> Self {
        Self {
            fqdn: HeloCheckMode::Reject,
            our_name: HeloCheckMode::Reject,
            literal_matches_client: HeloCheckMode::Reject,
            matches_rdns: HeloCheckMode::Tag,
            resolves: HeloCheckMode::Off,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl HeloPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        check_timeout(&self.timeout, &format!("{at}.timeout"), p);
    }
}

fn check_timeout(timeout: &HumanDuration, at: &str, p: &mut Problems) {
    if timeout.is_zero() {
        p.push(at, "must be longer than 0s");
    }
}

/// The zone list and threshold shared by `dnsbl` and `dnswl`.
fn check_zones(zones: &[DnsZoneSpec], threshold: u32, at: &str, p: &mut Problems) {
    if zones.is_empty() {
        p.push(
            format!("{at}.zones"),
            "give at least one zone, e.g. [{name: zen.spamhaus.org}]",
        );
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, zone) in zones.iter().enumerate() {
        let at_z = format!("{at}.zones[{i}]");
        p.check(
            format!("{at_z}.name"),
            syntax::check_domain(&zone.name, false),
        );
        if let Some(first) = seen.insert(zone.name.to_ascii_lowercase(), i) {
            p.push(
                format!("{at_z}.name"),
                format!("duplicate zone {:?}: already zones[{first}]", zone.name),
            );
        }
        if zone.weight == 0 {
            p.push(format!("{at_z}.weight"), "must be at least 1");
        }
        for (j, code) in zone.return_codes.iter().enumerate() {
            if code.octets()[0] != 127 {
                p.push(
                    format!("{at_z}.returnCodes[{j}]"),
                    format!("{code} is not a list answer: expected an address in 127.0.0.0/8"),
                );
            }
        }
    }
    if threshold == 0 {
        p.push(format!("{at}.threshold"), "must be at least 1");
    }
    let total: u64 = zones.iter().map(|z| u64::from(z.weight)).sum();
    if !zones.is_empty() && u64::from(threshold) > total {
        p.push(
            format!("{at}.threshold"),
            format!("{threshold} can never be reached: the zones weigh {total} together"),
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::{PluginSpec, load_str};

    fn config(plugins: &str) -> String {
        format!(
            "listeners:\n  - name: smtp\n    address: 127.0.0.1:2525\n    \
             acceptedDomains: [example.test]\n    plugins:\n{plugins}"
        )
    }

    fn plugins(plugins: &str) -> Vec<PluginSpec> {
        let config = load_str(&config(plugins), "t.yaml").unwrap();
        config.listeners[0].plugins.clone()
    }

    fn problems(plugins: &str) -> Vec<(String, String)> {
        match load_str(&config(plugins), "t.yaml") {
            Ok(c) => panic!("unexpectedly valid: {:#?}", c.listeners[0].plugins),
            Err(e) => e
                .problems
                .into_iter()
                .map(|p| (p.path, p.message))
                .collect(),
        }
    }

    fn has(found: &[(String, String)], path: &str, needle: &str) -> bool {
        found.iter().any(|(p, m)| p == path && m.contains(needle))
    }

    #[test]
    fn specs_parse_with_defaults_and_settings() {
        let specs = plugins(
            "      - dnswl:\n          zones: [{name: wl.test}]\n\
             \x20     - dnsbl:\n          zones:\n            - name: bl.test\n              \
             weight: 2\n              returnCodes: [127.0.0.2]\n            - name: bl2.test\n\
             \x20         threshold: 2\n          action: tag\n          rejectAt: connect\n          \
             timeout: 2s\n          onError: tempfail\n          allowClients: [192.0.2.1, 10.0.0.0/8]\n\
             \x20         skipPrivate: false\n\
             \x20     - iprev:\n\
             \x20     - helo:\n          resolves: tag\n          fqdn: off\n",
        );
        let wl = specs[0].dnswl.as_ref().unwrap();
        assert_eq!((wl.threshold, wl.zones[0].weight), (1, 1));
        assert!(wl.skip_private);
        let bl = specs[1].dnsbl.as_ref().unwrap();
        assert_eq!(bl.zones.len(), 2);
        assert_eq!(bl.zones[0].weight, 2);
        assert_eq!(
            bl.zones[0].return_codes,
            ["127.0.0.2".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(bl.zones[1].weight, 1);
        assert!(bl.action.tags() && bl.reject_at.at_connect() && !bl.skip_private);
        assert_eq!(bl.on_error, crate::FailMode::Tempfail);
        assert_eq!(bl.allow_clients.len(), 2);
        assert_eq!(bl.timeout, crate::HumanDuration::from_secs(2));
        let iprev = specs[2].iprev.as_ref().unwrap();
        assert_eq!(iprev, &super::IprevPluginSpec::default());
        assert!(iprev.on_fail.tags() && !iprev.on_fail.rejects());
        let helo = specs[3].helo.as_ref().unwrap();
        assert!(helo.fqdn.is_off() && helo.our_name.rejects());
        assert_eq!(helo.resolves, super::HeloCheckMode::Tag);
        assert_eq!(helo.matches_rdns, super::HeloCheckMode::Tag);
        // The defaults a bare entry gets.
        let bl = super::DnsblPluginSpec::default();
        assert!(!bl.action.tags() && !bl.reject_at.at_connect() && bl.skip_private);
        assert_eq!(
            (bl.threshold, bl.timeout),
            (1, crate::HumanDuration::from_secs(5))
        );
    }

    #[test]
    fn problems_name_their_fields() {
        let found = problems(
            "      - dnsbl:\n          zones:\n            - name: bl..test\n              \
             weight: 0\n              returnCodes: [192.0.2.1]\n            - name: BL..test\n\
             \x20         threshold: 0\n          timeout: 0s\n\
             \x20     - dnswl:\n\
             \x20     - dnswl:\n          zones: [{name: wl.test}, {name: wl2.test, weight: 2}]\n          threshold: 4\n\
             \x20     - iprev:\n          timeout: 0s\n\
             \x20     - helo:\n          timeout: 0s\n",
        );
        let bl = "listeners[0].plugins[0].dnsbl";
        assert!(
            has(&found, &format!("{bl}.zones[0].name"), "empty label"),
            "{found:#?}"
        );
        assert!(
            has(&found, &format!("{bl}.zones[1].name"), "duplicate zone"),
            "{found:#?}"
        );
        assert!(
            has(&found, &format!("{bl}.zones[0].weight"), "at least 1"),
            "{found:#?}"
        );
        assert!(
            has(
                &found,
                &format!("{bl}.zones[0].returnCodes[0]"),
                "127.0.0.0/8"
            ),
            "{found:#?}"
        );
        assert!(
            has(&found, &format!("{bl}.threshold"), "at least 1"),
            "{found:#?}"
        );
        assert!(
            has(&found, &format!("{bl}.timeout"), "longer than 0s"),
            "{found:#?}"
        );
        assert!(
            has(
                &found,
                "listeners[0].plugins[1].dnswl.zones",
                "at least one zone"
            ),
            "{found:#?}"
        );
        assert!(
            has(
                &found,
                "listeners[0].plugins[2].dnswl.threshold",
                "never be reached"
            ),
            "{found:#?}"
        );
        assert!(
            has(
                &found,
                "listeners[0].plugins[3].iprev.timeout",
                "longer than 0s"
            ),
            "{found:#?}"
        );
        assert!(
            has(
                &found,
                "listeners[0].plugins[4].helo.timeout",
                "longer than 0s"
            ),
            "{found:#?}"
        );

        let found = problems(
            "      - dnsbl:\n          zones: [{name: bl.test, returnCodes: [not-an-ip]}]\n",
        );
        assert!(
            found
                .iter()
                .any(|(p, _)| p.starts_with("listeners[0].plugins[0].dnsbl.zones[0].returnCodes")),
            "{found:#?}"
        );
        let found = problems("      - helo:\n          fqdn: sometimes\n");
        assert!(
            found
                .iter()
                .any(|(p, _)| p == "listeners[0].plugins[0].helo.fqdn"),
            "{found:#?}"
        );
    }
}
