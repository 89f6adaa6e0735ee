//! Limits shared by every inbound pod through JetStream KV: `rateLimit` and `greylist`.

use std::collections::HashSet;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::plugins::FailMode;
use crate::validate::Problems;
use crate::{HumanDuration, Rate, schema, syntax};

/// Limits connections, messages and recipients per client, sender and user per window, across
/// pods. Each limit counts in fixed windows of its rate's period (`100/1h`: from one full hour
/// to the next, UTC), or with `window: sliding` estimates a window that slides with the clock.
/// Past a limit: connections get `421 4.7.0 <name>: rate limit exceeded, try again later` and
/// are closed; messages (at MAIL FROM) and recipients (at RCPT TO) get `451 4.7.1` with the same
/// text. With the JetStream queue the counters live in the KV bucket `<stream>_RATELIMIT` and
/// hold for the whole cluster; with the local queue, in the process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RateLimitPluginSpec {
    /// The limits, checked in order at their hook; at least one. An attempt refused by one
    /// limit still counts against the limits checked before it at that hook.
    pub limits: Vec<RateLimitSpec>,
    /// Client networks (CIDR; a bare address means one host) that no limit applies to. Clients
    /// an earlier plugin trusts (a `dnswl` listing) are exempt too.
    #[serde(deserialize_with = "schema::deserialize_ip_nets")]
    #[schemars(with = "Vec<schema::IpNetString>")]
    pub allow_clients: Vec<IpNet>,
    /// What to do when the counters cannot be read or written in time (JetStream unreachable):
    /// `accept` (the default: count nothing, let the client through) or `tempfail` (`451 4.7.1`,
    /// or `421 4.7.0` and close for a connection).
    pub on_error: FailMode,
    /// Longest wait for the counter store on each check. Default 2s.
    pub timeout: HumanDuration,
}

impl Default for RateLimitPluginSpec {
    fn default() -> Self {
        Self {
            limits: Vec::new(),
            allow_clients: Vec::new(),
            on_error: FailMode::Accept,
            timeout: HumanDuration::from_secs(2),
        }
    }
}

/// One limit: what is counted, per what, at which rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Name of the limit: shown in the refusal (`<name>: rate limit exceeded`), in the metric's
    /// `limit` label and in the counters' keys. Letters, digits, `-` and `_`; unique in the
    /// plugin.
    pub name: String,
    /// What the limit is per: `clientIp`, `clientNetwork` (the client's /24 for IPv4, /64 for
    /// IPv6), `sender` (the MAIL FROM address, lowercased), `senderDomain` or `authUser` (the
    /// authenticated user). A limit whose key a session does not have (no AUTH for `authUser`,
    /// the null sender `<>` for `sender` and `senderDomain`) does not apply to it.
    pub key: RateLimitKey,
    /// What is counted: `connections` (at connect; only with `clientIp` or `clientNetwork`),
    /// `messages` (each MAIL FROM that reaches the plugin) or `recipients` (each RCPT TO).
    pub count: RateLimitCount,
    /// How many per period, e.g. `100/1h`, `10/m`, `5000/d`.
    pub rate: Rate,
    /// How the period is measured: `fixed` (the default) or `sliding`.
    #[serde(default)]
    pub window: RateWindow,
}

/// What a rate limit is per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum RateLimitKey {
    /// The client's IP address.
    ClientIp,
    /// The client's network: its /24 (IPv4) or /64 (IPv6).
    ClientNetwork,
    /// The sender address (MAIL FROM), lowercased.
    Sender,
    /// The domain of the sender address, lowercased.
    SenderDomain,
    /// The authenticated user (AUTH).
    AuthUser,
}

impl RateLimitKey {
    /// The spelling in the configuration (`clientIp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientIp => "clientIp",
            Self::ClientNetwork => "clientNetwork",
            Self::Sender => "sender",
            Self::SenderDomain => "senderDomain",
            Self::AuthUser => "authUser",
        }
    }
}

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum RateLimitCount {
    /// Connections, counted at connect.
    Connections,
    /// Messages, counted at MAIL FROM.
    Messages,
    /// Recipients, counted at each RCPT TO.
    Recipients,
}

impl RateLimitCount {
    /// The spelling in the configuration (`messages`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::Messages => "messages",
            Self::Recipients => "recipients",
        }
    }
}

/// How a rate limit measures its period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum RateWindow {
    /// Fixed windows of the period, aligned on the Unix epoch (`1h`: each full hour, UTC); the
    /// count starts again at zero in each window, so up to twice the count can pass around a
    /// window's end.
    #[default]
    Fixed,
    /// The previous window's count, weighted by how much of it the sliding period still
    /// covers, plus the current window's: a smooth estimate of the last full period.
    Sliding,
}

impl RateWindow {
    /// The spelling in the configuration (`fixed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Sliding => "sliding",
        }
    }
}

/// Whether `name` may name a limit: 1 to 63 letters, digits, `-` and `_`.
fn check_limit_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "invalid limit name {name:?}: use 1 to 63 letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

impl RateLimitPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        if self.limits.is_empty() {
            p.push(
                format!("{at}.limits"),
                "set at least one limit, e.g. `{ name: per-ip, key: clientIp, count: messages, \
                 rate: 100/1h }`",
            );
        }
        let mut names = HashSet::new();
        for (i, limit) in self.limits.iter().enumerate() {
            let at = format!("{at}.limits[{i}]");
            p.check(format!("{at}.name"), check_limit_name(&limit.name));
            if !limit.name.is_empty() && !names.insert(limit.name.as_str()) {
                p.push(
                    format!("{at}.name"),
                    format!("duplicate limit name {:?}", limit.name),
                );
            }
            if limit.rate.count() == 0 {
                p.push(format!("{at}.rate"), "the count must be at least 1");
            }
            if limit.rate.per().is_zero() {
                p.push(format!("{at}.rate"), "the period must be longer than 0s");
            }
            if limit.count == RateLimitCount::Connections
                && !matches!(
                    limit.key,
                    RateLimitKey::ClientIp | RateLimitKey::ClientNetwork
                )
            {
                p.push(
                    format!("{at}.key"),
                    format!(
                        "connections are counted at connect, before any {} is known: use \
                         clientIp or clientNetwork",
                        limit.key.as_str()
                    ),
                );
            }
        }
        if self.timeout.is_zero() {
            p.push(format!("{at}.timeout"), "must be longer than 0s");
        }
    }
}

/// Greylists unknown (client, sender, recipient) triplets, across pods. A triplet (the client's
/// /24 or /64 network, the sender address lowercased or `<>`, the recipient) seen for the first
/// time, or again before `delay`, gets `451 4.7.1 Greylisted, try again in N seconds` at RCPT
/// TO; a retry after `delay` and within `retryWindow` passes, and the triplet then passes for
/// `passedPeriod` after its last use. With the JetStream queue the triplets live in the KV
/// bucket `<stream>_GREYLIST` and hold for the whole cluster; with the local queue, in the
/// process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct GreylistPluginSpec {
    /// How long a new triplet is deferred. Default 5m.
    pub delay: HumanDuration,
    /// How long after a triplet was first seen a retry still passes; later, it starts over as
    /// new. Longer than `delay`. Default 4h.
    pub retry_window: HumanDuration,
    /// How long a triplet that passed keeps passing without delay, counted from its last use.
    /// Default 36d.
    pub passed_period: HumanDuration,
    /// A client network with this many distinct triplets passed is let through without
    /// greylisting for `passedPeriod` (postgrey's auto-whitelist); 0 turns this off. Default 5.
    pub auto_allow_after: u32,
    /// Client networks (CIDR; a bare address means one host) never greylisted. Authenticated
    /// clients and clients an earlier plugin trusts (a `dnswl` listing) are never greylisted
    /// either.
    #[serde(deserialize_with = "schema::deserialize_ip_nets")]
    #[schemars(with = "Vec<schema::IpNetString>")]
    pub allow_clients: Vec<IpNet>,
    /// Recipient address patterns never greylisted (globs with `*`, compared
    /// case-insensitively; `@example.com` means anyone there). Default `postmaster@*` and
    /// `abuse@*`; `RCPT TO:<postmaster>` is never greylisted.
    pub allow_recipients: Vec<String>,
    /// Add `X-Mailroom-Greylist: delayed <seconds>s` to a message whose triplet passed on this
    /// retry. Default true.
    pub add_header: bool,
    /// What to do when the triplets cannot be read or written in time (JetStream
    /// unreachable): `accept` (the default: no greylisting) or `tempfail` (`451 4.7.1`).
    pub on_error: FailMode,
    /// Longest wait for the triplet store on each check. Default 2s.
    pub timeout: HumanDuration,
}

impl Default for GreylistPluginSpec {
    fn default() -> Self {
        Self {
            delay: HumanDuration::from_mins(5),
            retry_window: HumanDuration::from_secs(4 * 3600),
            passed_period: HumanDuration::from_secs(36 * 86_400),
            auto_allow_after: 5,
            allow_clients: Vec::new(),
            allow_recipients: vec!["postmaster@*".to_owned(), "abuse@*".to_owned()],
            add_header: true,
            on_error: FailMode::Accept,
            timeout: HumanDuration::from_secs(2),
        }
    }
}

impl GreylistPluginSpec {
    /// Adds the problems of this spec, at field path `at`.
    pub(crate) fn check(&self, at: &str, p: &mut Problems) {
        let positive = [
            ("delay", &self.delay),
            ("retryWindow", &self.retry_window),
            ("passedPeriod", &self.passed_period),
            ("timeout", &self.timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                p.push(format!("{at}.{field}"), "must be longer than 0s");
            }
        }
        if !self.delay.is_zero() && self.retry_window <= self.delay {
            p.push(
                format!("{at}.retryWindow"),
                format!(
                    "must be longer than delay ({}), or no retry could ever pass",
                    self.delay
                ),
            );
        }
        for (j, pattern) in self.allow_recipients.iter().enumerate() {
            p.check(
                format!("{at}.allowRecipients[{j}]"),
                syntax::check_address_pattern(pattern),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{PluginSpec, load_str};

    fn config(plugin: &str) -> String {
        format!(
            "listeners:\n  - name: smtp\n    address: 127.0.0.1:2525\n    acceptedDomains: \
             [example.test]\n    plugins:\n      - {plugin}\n"
        )
    }

    fn problems(plugin: &str) -> Vec<(String, String)> {
        match load_str(&config(plugin), "t.yaml") {
            Ok(c) => panic!("unexpectedly valid: {:#?}", c.listeners[0].plugins),
            Err(e) => e
                .problems
                .into_iter()
                .map(|p| (p.path, p.message))
                .collect(),
        }
    }

    fn plugin(yaml: &str) -> PluginSpec {
        match load_str(&config(yaml), "t.yaml") {
            Ok(c) => c.listeners[0].plugins[0].clone(),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn rate_limits_load_with_their_defaults() {
        let spec = plugin(
            "rateLimit: { limits: [{ name: per-ip, key: clientIp, count: messages, rate: 100/1h }, \
             { name: net, key: clientNetwork, count: connections, rate: 20/m, window: sliding }], \
             allowClients: [10.0.0.0/8, 192.0.2.1] }",
        );
        let Some(spec) = spec.rate_limit else {
            panic!("no rateLimit");
        };
        assert_eq!(spec.limits.len(), 2);
        assert_eq!(spec.limits[0].rate.count(), 100);
        assert_eq!(spec.limits[0].rate.per().as_secs(), 3600);
        assert_eq!(spec.limits[0].window, super::RateWindow::Fixed);
        assert_eq!(spec.limits[1].window, super::RateWindow::Sliding);
        assert_eq!(spec.allow_clients.len(), 2);
        assert_eq!(spec.timeout.as_duration().as_secs(), 2);
        assert_eq!(spec.on_error, crate::FailMode::Accept);
    }

    #[test]
    fn rate_limit_problems_name_their_fields() {
        let found = problems(
            "rateLimit: { timeout: 0s, limits: [{ name: a, key: clientIp, count: messages, rate: 0/1h }, \
             { name: a, key: sender, count: connections, rate: 5/0s }, \
             { name: 'bad name', key: authUser, count: recipients, rate: 1/s }] }",
        );
        let expect = [
            ("rateLimit.limits[0].rate", "count must be at least 1"),
            ("rateLimit.limits[1].name", "duplicate limit name"),
            ("rateLimit.limits[1].rate", "longer than 0s"),
            ("rateLimit.limits[1].key", "use clientIp or clientNetwork"),
            ("rateLimit.limits[2].name", "invalid limit name"),
            ("rateLimit.timeout", "longer than 0s"),
        ];
        for (path, needle) in expect {
            let path = format!("listeners[0].plugins[0].{path}");
            assert!(
                found.iter().any(|(p, m)| *p == path && m.contains(needle)),
                "no {path:?} with {needle:?} in {found:#?}"
            );
        }
        assert_eq!(found.len(), expect.len(), "{found:#?}");
        let found = problems("rateLimit:");
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].0, "listeners[0].plugins[0].rateLimit.limits");
        // Unknown fields and key kinds are refused when parsing.
        assert!(
            load_str(
                &config(
                    "rateLimit: { limits: [{ name: a, key: helo, count: messages, rate: 1/s }] }"
                ),
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn a_bare_greylist_uses_postgrey_defaults() {
        let Some(spec) = plugin("greylist:").greylist else {
            panic!("no greylist");
        };
        assert_eq!(spec, super::GreylistPluginSpec::default());
        assert_eq!(spec.delay.as_duration().as_secs(), 300);
        assert_eq!(spec.retry_window.as_duration().as_secs(), 4 * 3600);
        assert_eq!(spec.passed_period.as_duration().as_secs(), 36 * 86_400);
        assert_eq!(spec.auto_allow_after, 5);
        assert_eq!(spec.allow_recipients, ["postmaster@*", "abuse@*"]);
        let short = plugin("greylist: { delay: 2s, retryWindow: 1m }");
        assert!(short.greylist.is_some());
    }

    #[test]
    fn greylist_problems_name_their_fields() {
        let found = problems(
            "greylist: { delay: 0s, passedPeriod: 0s, timeout: 0s, allowRecipients: ['a b'] }",
        );
        for path in ["delay", "passedPeriod", "timeout", "allowRecipients[0]"] {
            let path = format!("listeners[0].plugins[0].greylist.{path}");
            assert!(
                found.iter().any(|(p, _)| *p == path),
                "{path} in {found:#?}"
            );
        }
        let found = problems("greylist: { delay: 1h, retryWindow: 30m }");
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].0, "listeners[0].plugins[0].greylist.retryWindow");
        assert!(found[0].1.contains("longer than delay"), "{found:#?}");
    }
}
