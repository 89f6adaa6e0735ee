//! Delivery policies: how queued mail leaves. The same type is the `spec` of the
//! `DeliveryPolicy` CRD, the `policies` of `mailroom serve`, and the file of
//! `mailroom outbound --config F`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{HumanDuration, Rate};

/// One delivery policy. Messages name their policy when they are queued (the listener's
/// `deliveryPolicy`, default `default`); the workers of a policy deliver only its messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DeliveryPolicySpec {
    /// Unique name; letters, digits and `-`. Default `default`.
    pub name: String,
    /// Where mail goes: MX delivery (default) or a relay (smart host).
    pub routing: RoutingSpec,
    /// The DNS resolver used for MX and address lookups.
    pub resolver: ResolverSpec,
    /// TCP port of MX hosts. Default 25; other values are for tests and closed networks.
    pub mx_port: u16,
    /// STARTTLS towards the receiving servers (MX delivery; a relay has its own `tls`).
    pub tls: OutboundTlsMode,
    /// Name sent in EHLO/HELO. Default: the configuration's `hostname`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helo_name: Option<String>,
    /// Deliveries one worker runs at once. Default 32.
    pub concurrency: u32,
    /// Messages sent over one connection before it is closed (connection reuse). Default 100.
    pub max_messages_per_connection: u32,
    /// Retries of transient failures and the maximum queue lifetime.
    pub retry: RetrySpec,
    /// SMTP client timeouts (RFC 5321 §4.5.3.2 gives the defaults).
    pub timeouts: ClientTimeouts,
    /// Deliver to loopback, private, link-local and other non-public addresses. Off by default
    /// (a DNS record pointing inside the network must not turn the MTA into a proxy); tests
    /// and internal relays turn it on.
    pub allow_private_destinations: bool,
    /// Bounces (delivery status notifications).
    pub bounces: BounceSpec,
    /// Traffic shaping per destination: limits that hold across all workers of the policy,
    /// however many run. The first entry that matches a recipient domain (or one of its MX
    /// hosts) applies; domains no entry matches get `defaultLimits`, each domain on its own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<DestinationSpec>,
    /// Limits of each destination domain that no `destinations` entry matches.
    pub default_limits: ShapingLimits,
    /// Response-driven rules: when a receiving server's reply matches `pattern`, the
    /// destination it came from is suspended or throttled for a while (across all workers).
    /// The first matching rule applies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// DKIM signing keys (RFC 6376). A message is signed by the entry whose `domain` is the
    /// domain of its `From:` address or a parent of it (the most specific wins).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimSpec>,
    /// Keep this policy's mail queued without delivering it (maintenance, or a setup that
    /// only receives). No worker runs for it; `mailroom queue` still shows and changes it.
    pub hold: bool,
}

impl Default for DeliveryPolicySpec {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            routing: RoutingSpec::default(),
            resolver: ResolverSpec::default(),
            mx_port: 25,
            tls: OutboundTlsMode::default(),
            helo_name: None,
            concurrency: 32,
            max_messages_per_connection: 100,
            retry: RetrySpec::default(),
            timeouts: ClientTimeouts::default(),
            allow_private_destinations: false,
            bounces: BounceSpec::default(),
            destinations: Vec::new(),
            default_limits: ShapingLimits {
                max_connections: Some(20),
                ..ShapingLimits::default()
            },
            rules: Vec::new(),
            dkim: Vec::new(),
            hold: false,
        }
    }
}

/// Where mail goes. Set at most one field; none means MX delivery.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingSpec {
    /// Every message to one relay (smart host) instead of the recipient domains' MX hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelaySpec>,
}

/// A relay (smart host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RelaySpec {
    /// Host name or IP address.
    pub host: String,
    /// Port. Default 587.
    pub port: u16,
    /// `starttls` (default; required: no plaintext fallback), `implicit` (TLS from the first
    /// byte, port 465 style) or `none` (plaintext; only for a relay on a trusted network).
    pub tls: RelayTls,
    /// Verify the relay's certificate against the system roots (or `caFile`). Default true.
    pub verify_certificate: bool,
    /// PEM file of a private CA that signed the relay's certificate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// AUTH user name (PLAIN or LOGIN, whichever the relay offers); needs `passwordFile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// File holding the AUTH password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
}

impl Default for RelaySpec {
    fn default() -> Self {
        Self {
            host: String::new(),
            port: 587,
            tls: RelayTls::default(),
            verify_certificate: true,
            ca_file: None,
            user: None,
            password_file: None,
        }
    }
}

/// TLS towards a relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum RelayTls {
    /// STARTTLS, required.
    #[default]
    Starttls,
    /// TLS from the first byte.
    Implicit,
    /// No TLS.
    None,
}

/// STARTTLS towards MX hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum OutboundTlsMode {
    /// Use STARTTLS when offered, without certificate verification (RFC 7435); fall back to
    /// plaintext when it is not offered.
    #[default]
    Opportunistic,
    /// STARTTLS must be offered and the certificate must verify for the MX host name;
    /// otherwise the delivery is deferred.
    Required,
    /// Never STARTTLS.
    Disabled,
}

/// The DNS resolver.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ResolverSpec {
    /// Name servers as `ip:port` (UDP and TCP). Default: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<String>,
    /// Address families to connect over, in order of preference.
    pub ip_version: IpVersion,
}

/// Address families for outbound connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum IpVersion {
    /// IPv4 addresses first, then IPv6.
    #[default]
    Ipv4ThenIpv6,
    /// IPv6 first, then IPv4.
    Ipv6ThenIpv4,
    /// IPv4 only.
    Ipv4Only,
    /// IPv6 only.
    Ipv6Only,
}

/// Retries and the queue lifetime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RetrySpec {
    /// Waits after the 1st, 2nd, ... transient failure; the last repeats. Default 5m, 10m,
    /// 20m, 40m, 1h20m, 2h40m, 4h (growing like Postfix's and KumoMTA's backoff, capped).
    pub schedule: Vec<HumanDuration>,
    /// A message still undelivered this long after reception is returned to its sender
    /// (expired). Default 5d.
    pub max_age: HumanDuration,
}

impl Default for RetrySpec {
    fn default() -> Self {
        let m = |minutes: u64| HumanDuration::from_secs(minutes * 60);
        Self {
            schedule: vec![m(5), m(10), m(20), m(40), m(80), m(160), m(240)],
            max_age: HumanDuration::from_secs(5 * 24 * 3600),
        }
    }
}

impl RetrySpec {
    /// The wait after the `attempts`-th transient failure (1-based).
    pub fn delay_after(&self, attempts: u32) -> std::time::Duration {
        let i = (attempts.max(1) - 1) as usize;
        self.schedule.get(i).or(self.schedule.last()).map_or(
            std::time::Duration::from_secs(300),
            HumanDuration::as_duration,
        )
    }
}

/// SMTP client timeouts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClientTimeouts {
    /// TCP connect (and TLS handshake). Default 30s.
    pub connect: HumanDuration,
    /// The greeting. Default 5m.
    pub greeting: HumanDuration,
    /// Each command's reply (EHLO, MAIL, RCPT, RSET, QUIT). Default 5m.
    pub command: HumanDuration,
    /// The 354 after DATA. Default 2m.
    pub data_start: HumanDuration,
    /// Each write of the message body. Default 3m.
    pub data_block: HumanDuration,
    /// The reply after the final dot. Default 10m.
    pub data_end: HumanDuration,
    /// An unused open connection is closed after this. Default 5s (an idle connection holds
    /// one of its destination's `maxConnections` slots; Postfix keeps them 2s).
    pub idle: HumanDuration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        let s = HumanDuration::from_secs;
        Self {
            connect: s(30),
            greeting: s(300),
            command: s(300),
            data_start: s(120),
            data_block: s(180),
            data_end: s(600),
            idle: s(5),
        }
    }
}

/// Delivery status notifications.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BounceSpec {
    /// `From:` of the notifications. Default `MAILER-DAEMON@<hostname>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Send one "delayed" notification (RFC 3464 `Action: delayed`) when a message is still
    /// undelivered this long after reception, to senders who did not refuse them with
    /// `NOTIFY`. Default: none (like Postfix's `delay_warning_time = 0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay_warning_after: Option<HumanDuration>,
}

/// One DKIM signing key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DkimSpec {
    /// The signing domain (`d=`).
    pub domain: String,
    /// The selector (`s=`): the public key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM file of the private key (unencrypted): RSA of 2048 to 4096 bits (PKCS#1 or PKCS#8)
    /// or Ed25519 (PKCS#8).
    pub key_file: String,
    /// `rsa-sha256` or `ed25519-sha256`. Default: from the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<DkimAlgorithm>,
    /// Header fields to sign. Default: From, To, Cc, Subject, Date, Message-ID, Reply-To,
    /// In-Reply-To, References, MIME-Version, Content-Type, Content-Transfer-Encoding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// DKIM signature algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum DkimAlgorithm {
    /// RSA with SHA-256 (RFC 6376).
    RsaSha256,
    /// Ed25519 with SHA-256 (RFC 8463).
    Ed25519Sha256,
}

/// A destination: the receiving systems that one set of limits applies to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationSpec {
    /// Name in logs, metrics and status (letters, digits, `-`).
    pub name: String,
    /// Recipient domains (and their subdomains with a leading `*.`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// MX host name suffixes (`google.com` matches `aspmx.l.google.com`): domains hosted by
    /// the same provider share its limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mx_suffixes: Vec<String>,
    /// STARTTLS towards this destination's MX hosts, overriding the policy's `tls` (e.g.
    /// `required` for a partner that must get encrypted mail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<OutboundTlsMode>,
    /// The limits.
    #[serde(flatten)]
    pub limits: ShapingLimits,
}

impl DestinationSpec {
    /// Whether `domain` (lowercase) is one of `domains`, or a subdomain of a `*.` entry.
    pub fn matches_domain(&self, domain: &str) -> bool {
        self.domains
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => domain
                    .strip_suffix(parent)
                    .is_some_and(|rest| rest.ends_with('.')),
                None => pattern == domain,
            })
    }
}

/// Limits of one destination, across all workers of the policy. Absent: unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ShapingLimits {
    /// Open connections at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Messages over one connection (overrides the policy's `maxMessagesPerConnection`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages_per_connection: Option<u32>,
    /// Messages per time, e.g. `600/min`, `10000/h`, `200000/day`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// New connections per time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_rate: Option<Rate>,
}

/// A response-driven rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.action != 'throttle' || has(self.rate)",
     "message": "a throttle rule needs a rate", "fieldPath": ".rate"},
    {"rule": "self.action == 'throttle' || !has(self.rate)",
     "message": "a suspend rule stops delivery; remove rate or use action: throttle",
     "fieldPath": ".rate"},
]))]
pub struct RuleSpec {
    /// Name in logs and `mailroom queue stats`.
    pub name: String,
    /// A regular expression (Rust `regex` syntax) matched against the whole reply or error
    /// text, e.g. `^421 .*(try again later|too many connections)`.
    pub pattern: String,
    /// `suspend`: no delivery to the destination until the time is up; `throttle`: at most
    /// `rate` meanwhile.
    pub action: RuleAction,
    /// How long the action lasts after the last matching reply.
    pub duration: HumanDuration,
    /// The rate while throttled (`throttle` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
}

/// What a rule does to its destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::schema::plain_string_enum)]
pub enum RuleAction {
    /// Stop delivering to the destination.
    Suspend,
    /// Deliver at most the rule's rate.
    Throttle,
}
