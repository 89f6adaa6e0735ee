//! The listener model: one SMTP endpoint (address, mode, accepted domains, TLS, AUTH, limits,
//! timeouts and its plugin chain). The inbound server runs one accept loop per [`ListenerSpec`];
//! the same struct is the spec of the `MailListener` CRD.

use std::net::{AddrParseError, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::human::HumanDuration;
use crate::limits::{Limits, Timeouts};
use crate::plugins::PluginSpec;
use crate::schema;

/// One SMTP listener: where it listens, whom it accepts mail for and how it protects itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerSpec {
    /// Name of the listener, used in logs and metrics: lowercase letters, digits and `-`,
    /// 1 to 63 characters, starting and ending with a letter or digit. Required in a config
    /// file; a `MailListener` takes it from its `metadata.name`.
    #[serde(default)]
    pub name: String,
    /// Socket address to listen on, an IP address and a port: `127.0.0.1:2525`, `0.0.0.0:25`,
    /// `[::]:25`.
    #[schemars(length(max = 64))]
    pub address: String,
    /// `mx` (default) receives mail for `acceptedDomains` from the internet; `submission`
    /// receives mail from authenticated users of this system and requires `tls` and `auth`.
    #[serde(default)]
    pub mode: ListenerMode,
    /// Name announced in the greeting banner, the EHLO reply and `Received:` headers. Overrides
    /// the top-level `hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Domains this listener accepts mail for (compared case-insensitively). `*.example.com`
    /// accepts every subdomain of `example.com` but not `example.com` itself. An `mx` listener
    /// needs at least one entry unless `relayNetworks` is set.
    #[serde(default)]
    pub accepted_domains: Vec<String>,
    /// Client networks (CIDR, e.g. `10.0.0.0/8`; a bare address means a single host) allowed
    /// to relay mail to any domain.
    #[serde(default, deserialize_with = "schema::deserialize_ip_nets")]
    #[schemars(with = "Vec<schema::IpNetString>")]
    pub relay_networks: Vec<IpNet>,
    /// TLS certificate and key. With `implicit: false` the listener offers STARTTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// SMTP AUTH. Only offered over TLS, so `tls` must be set too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// Expect a PROXY protocol v1 or v2 header before the SMTP dialogue, as sent by a load
    /// balancer that should not hide the client address. Only enable behind such a proxy.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Size and count limits of a session.
    #[serde(default)]
    pub limits: Limits,
    /// Timeouts of a session (RFC 5321 section 4.5.3.2).
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Plugin chain, run in order at each stage of a session.
    #[serde(default)]
    pub plugins: Vec<PluginSpec>,
    /// The DNS resolver of the listener's plugins (DNSBL, SPF, DKIM, DMARC, reverse DNS).
    #[serde(default, skip_serializing_if = "DnsSpec::is_default")]
    pub dns: DnsSpec,
    /// The delivery policy recorded with every message this listener accepts (its workers
    /// deliver it). Default `default`.
    #[serde(default = "default_policy_name")]
    pub delivery_policy: String,
}

fn default_policy_name() -> String {
    "default".to_owned()
}

impl ListenerSpec {
    /// A listener with every optional field at its default; handy in tests and examples.
    pub fn new(name: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            address: address.into(),
            mode: ListenerMode::default(),
            hostname: None,
            accepted_domains: Vec::new(),
            relay_networks: Vec::new(),
            tls: None,
            auth: None,
            proxy_protocol: false,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            plugins: Vec::new(),
            dns: DnsSpec::default(),
            delivery_policy: default_policy_name(),
        }
    }

    /// The parsed `address`, or the parse error.
    pub fn try_socket_addr(&self) -> Result<SocketAddr, AddrParseError> {
        self.address.trim().parse()
    }

    /// The parsed `address`. Meant for validated configurations ([`crate::Config::validate`]
    /// reports an unparsable address); should it not parse anyway, this returns
    /// `127.0.0.1:0`, a loopback ephemeral port that exposes nothing.
    pub fn socket_addr(&self) -> SocketAddr {
        self.try_socket_addr()
            .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    }

    /// True when `domain` is one of `acceptedDomains` (case-insensitive; `*.example.com`
    /// matches any subdomain of `example.com`). A trailing dot on `domain` is ignored.
    pub fn accepts_domain(&self, domain: &str) -> bool {
        let domain = domain
            .strip_suffix('.')
            .unwrap_or(domain)
            .to_ascii_lowercase();
        self.accepted_domains.iter().any(|accepted| {
            let accepted = accepted.to_ascii_lowercase();
            match accepted.strip_prefix("*.") {
                Some(parent) => domain
                    .strip_suffix(parent)
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => domain == accepted,
            }
        })
    }

    /// True when `ip` is inside one of `relayNetworks`.
    pub fn may_relay(&self, ip: std::net::IpAddr) -> bool {
        self.relay_networks.iter().any(|net| net.contains(&ip))
    }
}

/// What a listener is for: `mx` receives mail for local domains from other servers,
/// `submission` receives mail from authenticated users (RFC 6409).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = schema::plain_string_enum)]
pub enum ListenerMode {
    /// Receives mail for `acceptedDomains` (port 25 style).
    #[default]
    Mx,
    /// Receives mail from authenticated users for any destination (port 587/465 style).
    Submission,
}

/// A TLS certificate and key, both PEM files, re-read when they change (for example when
/// cert-manager renews a mounted Secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    /// Path of the PEM certificate chain, leaf first.
    pub cert_file: String,
    /// Path of the PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// TLS from the first byte (port 465 style, RFC 8314). When false (default) the listener
    /// offers STARTTLS.
    #[serde(default)]
    pub implicit: bool,
    /// How often to check the certificate and key files for changes.
    #[serde(default = "TlsSpec::default_reload_interval")]
    pub reload_interval: HumanDuration,
}

impl TlsSpec {
    /// STARTTLS with the given PEM files and the default reload interval.
    pub fn new(cert_file: impl Into<String>, key_file: impl Into<String>) -> Self {
        Self {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            implicit: false,
            reload_interval: Self::default_reload_interval(),
        }
    }

    fn default_reload_interval() -> HumanDuration {
        HumanDuration::from_secs(10)
    }

    /// Checks that the certificate and key files exist and are readable regular files; used by
    /// `mailroom check`. Parsing does not look at the filesystem, so a configuration can be
    /// validated on a machine that lacks the files.
    pub fn check_files(&self) -> Result<(), Vec<crate::Problem>> {
        let problems: Vec<_> = [("certFile", &self.cert_file), ("keyFile", &self.key_file)]
            .into_iter()
            .filter_map(|(field, path)| {
                check_readable_file(path)
                    .err()
                    .map(|message| crate::Problem {
                        path: field.to_owned(),
                        message,
                    })
            })
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Checks that `path` names a readable regular file.
pub(crate) fn check_readable_file(path: &str) -> Result<(), String> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(format!("{path:?} is not a regular file")),
        Err(e) => Err(format!("cannot open {path:?}: {e}")),
    }
}

/// SMTP AUTH (RFC 4954) against a file of users and password hashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthSpec {
    /// Path of the users file: one `name:hash` per line, with an argon2 (`$argon2id$...`) or
    /// bcrypt (`$2b$...`) hash. Lines starting with `#` are comments.
    pub users_file: String,
    /// SASL mechanisms offered, in order. Default `[PLAIN, LOGIN]`.
    #[serde(default = "AuthSpec::default_mechanisms")]
    pub mechanisms: Vec<AuthMechanism>,
}

impl AuthSpec {
    fn default_mechanisms() -> Vec<AuthMechanism> {
        vec![AuthMechanism::Plain, AuthMechanism::Login]
    }

    /// An AUTH section reading `users_file` with the default mechanisms.
    pub fn new(users_file: impl Into<String>) -> Self {
        Self {
            users_file: users_file.into(),
            mechanisms: Self::default_mechanisms(),
        }
    }
}

/// A SASL mechanism: `PLAIN` (RFC 4616) or `LOGIN` (widely used, not standardised).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
#[schemars(transform = schema::plain_string_enum)]
pub enum AuthMechanism {
    /// `AUTH PLAIN`: user and password in one base64 string.
    Plain,
    /// `AUTH LOGIN`: user and password in two base64 prompts.
    Login,
}

impl AuthMechanism {
    /// The mechanism's name as sent in the EHLO `AUTH` line.
    pub const fn as_str(&self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::Login => "LOGIN",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_domain_handles_case_and_wildcards() {
        let mut l = ListenerSpec::new("smtp", "127.0.0.1:2525");
        l.accepted_domains = vec!["Example.test".into(), "*.corp.test".into()];
        let cases = [
            ("example.test", true),
            ("EXAMPLE.TEST", true),
            ("example.test.", true),
            ("sub.example.test", false),
            ("corp.test", false),
            ("a.corp.test", true),
            ("a.b.corp.test", true),
            ("xcorp.test", false),
            (".corp.test", false),
        ];
        for (domain, expected) in cases {
            assert_eq!(l.accepts_domain(domain), expected, "{domain}");
        }
    }

    #[test]
    fn socket_addr_falls_back_to_loopback_ephemeral() {
        let l = ListenerSpec::new("smtp", "[::]:25");
        assert_eq!(l.socket_addr().port(), 25);
        let bad = ListenerSpec::new("smtp", "localhost:25");
        assert!(bad.try_socket_addr().is_err());
        assert_eq!(
            bad.socket_addr(),
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
        );
    }

    #[test]
    fn relay_networks_contain_addresses() {
        let mut l = ListenerSpec::new("smtp", "127.0.0.1:2525");
        l.relay_networks = vec!["10.0.0.0/8".parse().unwrap_or_else(|e| panic!("{e}"))];
        assert!(l.may_relay("10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}"))));
        assert!(!l.may_relay("11.1.2.3".parse().unwrap_or_else(|e| panic!("{e}"))));
    }
}

/// The DNS resolver plugins use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DnsSpec {
    /// Name servers as `ip:port` (UDP and TCP). Default: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<String>,
    /// Longest wait for one answer. Default 5s.
    pub timeout: HumanDuration,
}

impl Default for DnsSpec {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: HumanDuration::from_secs(5),
        }
    }
}

impl DnsSpec {
    /// Whether this is the default (left out when written).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}
