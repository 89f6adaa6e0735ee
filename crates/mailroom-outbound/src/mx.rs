//! MX resolution: from a recipient domain to the ordered list of hosts and addresses that a
//! delivery attempt connects to, in the route stage of the outbound flow (after the queue lease,
//! before the SMTP client). Relay routes from the delivery policy skip this module.
//!
//! [`MxResolver::resolve`] returns a [`Route`] or an [`MxError`] that says whether the failure is
//! permanent (bounce) or transient (defer):
//!
//! - MX records are tried by preference; hosts of equal preference are shuffled (RFC 5321 §5.1).
//! - No MX records: the domain itself is the host, with preference 0, if it has A/AAAA records
//!   ("implicit MX", RFC 5321 §5.1); with neither, the domain accepts no mail (permanent).
//! - A single MX `.` is a null MX (RFC 7505): permanent.
//! - NXDOMAIN is permanent; SERVFAIL, REFUSED and timeouts are transient.
//! - An MX host that does not resolve is skipped; when none resolves, the failure is permanent if
//!   every host is NXDOMAIN or has no address records (as Postfix does), else transient.
//! - Loopback, private, link-local, CGNAT, documentation, multicast and other reserved addresses
//!   are dropped unless [`ResolverConfig::allow_private`] (see [`reserved_range`]); a route left
//!   without addresses is a permanent failure that says so.
//! - Domain literals `[192.0.2.1]` and `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3) route to that
//!   address without DNS, subject to the same filter.
//!
//! Lookups go to [`ResolverConfig::nameservers`] (or `/etc/resolv.conf`) through hickory-resolver,
//! which caches answers by TTL; negative answers are cached for at most
//! [`NEGATIVE_CACHE_MAX`].

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig as HickoryConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use rand::seq::SliceRandom;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, warn};

/// At most this many MX hosts (the most preferred) are resolved and returned.
pub const MAX_MX_HOSTS: usize = 16;
/// Upper bound on how long NXDOMAIN / no-data answers are cached, whatever the zone's SOA says.
pub const NEGATIVE_CACHE_MAX: Duration = Duration::from_secs(300);
/// Longest domain name in text form, without the trailing dot (RFC 1035 §2.3.4).
const MAX_DOMAIN_LEN: usize = 253;

/// Which address families to use, and in which order within one MX host (the policy's
/// `resolver.ipVersion`).
pub use mailroom_config::IpVersion;

/// The address families of `version`, in order.
fn families(version: IpVersion) -> &'static [Family] {
    match version {
        IpVersion::Ipv4ThenIpv6 => &[Family::V4, Family::V6],
        IpVersion::Ipv6ThenIpv4 => &[Family::V6, Family::V4],
        IpVersion::Ipv4Only => &[Family::V4],
        IpVersion::Ipv6Only => &[Family::V6],
    }
}

/// How MX resolution is done; the caller maps its own configuration to this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Nameservers to ask (UDP, and TCP for truncated answers); empty: those of
    /// `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
    /// Address families and their order.
    pub ip_version: IpVersion,
    /// Keep loopback, private and other reserved addresses (tests, private networks).
    pub allow_private: bool,
    /// How long to wait for one answer from a nameserver.
    pub timeout: Duration,
    /// How many times a query is sent before giving up (at least 1).
    pub attempts: usize,
    /// Upper bound for one whole [`MxResolver::resolve`] call (MX and all address lookups).
    pub deadline: Duration,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            ip_version: IpVersion::default(),
            allow_private: false,
            timeout: Duration::from_secs(5),
            attempts: 2,
            deadline: Duration::from_secs(30),
        }
    }
}

/// Where a route came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// The domain's MX records.
    Mx,
    /// No MX records: the domain itself (RFC 5321 §5.1).
    Implicit,
    /// A domain literal such as `[192.0.2.1]`.
    Literal,
}

/// One host to try, with its addresses in connection order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Host name in A-label form without the trailing dot (the name for TLS checks), or for a
    /// literal route the literal itself (`[192.0.2.1]`).
    pub name: String,
    /// MX preference (0 for implicit MX and literals).
    pub preference: u16,
    /// Usable addresses, never empty; ordered by [`IpVersion`], no address repeats within the
    /// route.
    pub addresses: Vec<IpAddr>,
}

/// The hosts to try for one domain, most preferred first; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The domain as resolved: lowercase A-labels without the trailing dot, or the literal
    /// (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
    pub domain: String,
    /// MX, implicit MX or literal.
    pub kind: RouteKind,
    /// Hosts in the order to try them.
    pub hosts: Vec<MxHost>,
}

impl Route {
    /// Every (host, address) pair in the order to try them.
    pub fn addresses(&self) -> impl Iterator<Item = (&MxHost, IpAddr)> {
        self.hosts
            .iter()
            .flat_map(|host| host.addresses.iter().map(move |addr| (host, *addr)))
    }
}

/// Why a domain has no route. [`MxError::is_permanent`] decides bounce versus defer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MxError {
    /// Not a domain name or address literal.
    #[error("{domain:?}: not a valid mail domain: {reason}")]
    InvalidDomain {
        /// The input as given.
        domain: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The domain publishes a null MX.
    #[error("{domain}: null MX (RFC 7505): the domain accepts no mail")]
    NullMx {
        /// The domain.
        domain: String,
    },
    /// The domain does not exist.
    #[error("{domain}: no such domain (NXDOMAIN)")]
    NoSuchDomain {
        /// The domain.
        domain: String,
    },
    /// The domain exists but has neither MX nor A/AAAA records.
    #[error("{domain}: no MX and no address records (RFC 5321 §5.1): the domain accepts no mail")]
    NoMailHost {
        /// The domain.
        domain: String,
    },
    /// Every MX host is NXDOMAIN or has no address records (of the enabled IP versions).
    #[error("{domain}: no MX host resolves: {detail}")]
    NoMxHostResolves {
        /// The domain.
        domain: String,
        /// Each host and why it failed.
        detail: String,
    },
    /// Every address found is private or reserved and was dropped.
    #[error(
        "{domain}: every address is private or reserved and was dropped ({dropped}); \
         allow_private would keep them"
    )]
    AllAddressesDropped {
        /// The domain.
        domain: String,
        /// The dropped addresses and their ranges.
        dropped: String,
    },
    /// SERVFAIL, REFUSED, timeouts, unreachable nameservers: try again later.
    #[error("{domain}: temporary DNS failure: {detail}")]
    Temporary {
        /// The domain.
        domain: String,
        /// Which lookup failed and how.
        detail: String,
    },
}

impl MxError {
    /// Whether retrying cannot help (bounce) rather than a temporary failure (defer).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Temporary { .. })
    }

    /// The domain (or literal, or invalid input) the error is about.
    pub fn domain(&self) -> &str {
        match self {
            Self::InvalidDomain { domain, .. }
            | Self::NullMx { domain }
            | Self::NoSuchDomain { domain }
            | Self::NoMailHost { domain }
            | Self::NoMxHostResolves { domain, .. }
            | Self::AllAddressesDropped { domain, .. }
            | Self::Temporary { domain, .. } => domain,
        }
    }

    /// RFC 3463 enhanced status code for a DSN or delivery log: 5.1.10 for null MX (RFC 7505
    /// §4.2), 5.1.2 bad destination system, 5.4.4 unable to route, 4.4.3 directory server failure.
    pub fn enhanced_status(&self) -> &'static str {
        match self {
            Self::NullMx { .. } => "5.1.10",
            Self::InvalidDomain { .. } | Self::NoSuchDomain { .. } | Self::NoMailHost { .. } => {
                "5.1.2"
            }
            Self::NoMxHostResolves { .. } | Self::AllAddressesDropped { .. } => "5.4.4",
            Self::Temporary { .. } => "4.4.3",
        }
    }

    /// A fixed label for metrics (low cardinality, no domain in it).
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidDomain { .. } => "invalid_domain",
            Self::NullMx { .. } => "null_mx",
            Self::NoSuchDomain { .. } => "nxdomain",
            Self::NoMailHost { .. } => "no_mail_host",
            Self::NoMxHostResolves { .. } => "no_mx_host_resolves",
            Self::AllAddressesDropped { .. } => "private_addresses",
            Self::Temporary { .. } => "temporary",
        }
    }
}

/// [`MxResolver::new`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolverSetupError {
    /// A configuration value that cannot work.
    #[error("invalid DNS resolver configuration: {0}")]
    Invalid(String),
    /// `/etc/resolv.conf` could not be read or parsed.
    #[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}")]
    SystemConfig(String),
    /// hickory-resolver refused the configuration.
    #[error("cannot build the DNS resolver: {0}")]
    Build(#[source] NetError),
}

/// Resolves recipient domains to delivery routes. Cheap to clone (shares the resolver and its
/// cache); use it from one tokio runtime, where hickory keeps its connections.
#[derive(Debug, Clone)]
pub struct MxResolver {
    resolver: TokioResolver,
    ip_version: IpVersion,
    allow_private: bool,
    deadline: Duration,
}

impl MxResolver {
    /// A resolver with its own cache. Needs no runtime to build; lookups need tokio.
    ///
    /// # Errors
    /// A zero timeout, attempts or deadline, or an unreadable `/etc/resolv.conf` when
    /// `nameservers` is empty.
    pub fn new(config: ResolverConfig) -> Result<Self, ResolverSetupError> {
        if config.timeout.is_zero() || config.deadline.is_zero() || config.attempts == 0 {
            return Err(ResolverSetupError::Invalid(format!(
                "timeout ({:?}), deadline ({:?}) and attempts ({}) must be above zero",
                config.timeout, config.deadline, config.attempts
            )));
        }
        let hickory_config = if config.nameservers.is_empty() {
            let (system, _) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| ResolverSetupError::SystemConfig(e.to_string()))?;
            // Only the nameservers: every query is for an absolute name, so search and ndots do
            // not apply, and our own options replace the system's.
            HickoryConfig::from_name_servers(system.name_servers().to_vec())
        } else {
            HickoryConfig::from_name_servers(
                config.nameservers.iter().map(|a| nameserver(*a)).collect(),
            )
        };
        let mut builder =
            TokioResolver::builder_with_config(hickory_config, TokioRuntimeProvider::default());
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = config.timeout;
        // hickory counts retries after the first try.
        opts.attempts = config.attempts - 1;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.try_tcp_on_error = true;
        opts.negative_max_ttl = Some(NEGATIVE_CACHE_MAX);
        let resolver = builder.build().map_err(ResolverSetupError::Build)?;
        Ok(Self {
            resolver,
            ip_version: config.ip_version,
            allow_private: config.allow_private,
            deadline: config.deadline,
        })
    }

    /// The route for `domain` (a domain in U- or A-labels, any case, optional trailing dot; or a
    /// domain literal). See the module docs for what is permanent and what is transient.
    ///
    /// # Errors
    /// [`MxError`]; [`MxError::is_permanent`] tells bounce from defer.
    pub async fn resolve(&self, domain: &str) -> Result<Route, MxError> {
        match parse_destination(domain)? {
            Destination::Literal { text, ip } => self.literal_route(text, ip),
            Destination::Domain(domain) => {
                match tokio::time::timeout(self.deadline, self.resolve_domain(&domain)).await {
                    Ok(result) => result,
                    Err(_) => Err(MxError::Temporary {
                        detail: format!("no complete answer within {:?}", self.deadline),
                        domain,
                    }),
                }
            }
        }
    }

    fn literal_route(&self, text: String, ip: IpAddr) -> Result<Route, MxError> {
        // ip_version does not apply: the sender named this very address.
        if let Some(range) = self.dropped_range(ip) {
            return Err(MxError::AllAddressesDropped {
                dropped: format!("{ip} ({range})"),
                domain: text,
            });
        }
        Ok(Route {
            hosts: vec![MxHost {
                name: text.clone(),
                preference: 0,
                addresses: vec![ip],
            }],
            domain: text,
            kind: RouteKind::Literal,
        })
    }

    async fn resolve_domain(&self, domain: &str) -> Result<Route, MxError> {
        let exchanges = match self.resolver.mx_lookup(absolute(domain)).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            Err(e) if e.is_nx_domain() => {
                return Err(MxError::NoSuchDomain {
                    domain: domain.to_owned(),
                });
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => {
                return Err(MxError::Temporary {
                    domain: domain.to_owned(),
                    detail: format!("MX lookup: {}", describe(&e)),
                });
            }
        };
        if exchanges.is_empty() {
            return self.implicit_route(domain).await;
        }
        let exchanges = mx_hosts(domain, exchanges)?;
        let ordered = order_by_preference(exchanges, &mut rand::rng());
        self.mx_route(domain, ordered).await
    }

    /// RFC 5321 §5.1: without MX records the domain itself is the mail host.
    async fn implicit_route(&self, domain: &str) -> Result<Route, MxError> {
        debug!(domain, "no MX records, trying the domain's own addresses");
        match self.host_addresses(domain).await {
            Ok(addresses) => Ok(Route {
                domain: domain.to_owned(),
                kind: RouteKind::Implicit,
                hosts: vec![MxHost {
                    name: domain.to_owned(),
                    preference: 0,
                    addresses,
                }],
            }),
            Err(HostFailure::NxDomain | HostFailure::NoAddresses) => Err(MxError::NoMailHost {
                domain: domain.to_owned(),
            }),
            Err(HostFailure::Dropped(dropped)) => Err(MxError::AllAddressesDropped {
                domain: domain.to_owned(),
                dropped,
            }),
            Err(HostFailure::Temporary(detail)) => Err(MxError::Temporary {
                domain: domain.to_owned(),
                detail,
            }),
        }
    }

    async fn mx_route(
        &self,
        domain: &str,
        exchanges: Vec<(u16, String)>,
    ) -> Result<Route, MxError> {
        // Resolve all hosts at once, so that a slow one does not delay the others.
        let mut lookups = JoinSet::new();
        for (index, (_, host)) in exchanges.iter().enumerate() {
            let this = self.clone();
            let host = host.clone();
            lookups
                .spawn(async move { (index, this.host_addresses(&host).await) }.in_current_span());
        }
        let mut results: Vec<Option<Result<Vec<IpAddr>, HostFailure>>> =
            exchanges.iter().map(|_| None).collect();
        while let Some(joined) = lookups.join_next().await {
            match joined {
                Ok((index, result)) => {
                    if let Some(slot) = results.get_mut(index) {
                        *slot = Some(result);
                    }
                }
                Err(e) => warn!(domain, error = %e, "MX host lookup task failed"),
            }
        }

        let mut seen = HashSet::new();
        let mut hosts = Vec::new();
        let mut failures = Vec::new();
        for ((preference, name), result) in exchanges.into_iter().zip(results) {
            let result = result
                .unwrap_or_else(|| Err(HostFailure::Temporary("lookup task failed".to_owned())));
            match result {
                Ok(addresses) => {
                    let addresses: Vec<IpAddr> =
                        addresses.into_iter().filter(|a| seen.insert(*a)).collect();
                    if addresses.is_empty() {
                        debug!(domain, host = %name, "MX host only repeats addresses of a more preferred host");
                        continue;
                    }
                    hosts.push(MxHost {
                        name,
                        preference,
                        addresses,
                    });
                }
                Err(failure) => {
                    warn!(domain, host = %name, preference, reason = %failure, "skipping MX host");
                    failures.push((name, failure));
                }
            }
        }
        if !hosts.is_empty() {
            return Ok(Route {
                domain: domain.to_owned(),
                kind: RouteKind::Mx,
                hosts,
            });
        }
        Err(no_usable_host(domain, &failures))
    }

    /// The usable addresses of one host, in [`IpVersion`] order, without repeats.
    async fn host_addresses(&self, host: &str) -> Result<Vec<IpAddr>, HostFailure> {
        let name = absolute(host);
        let outcomes = match families(self.ip_version) {
            [first, second] => {
                let (a, b) = tokio::join!(
                    lookup_family(&self.resolver, &name, *first),
                    lookup_family(&self.resolver, &name, *second)
                );
                vec![a, b]
            }
            families => {
                let mut outcomes = Vec::with_capacity(families.len());
                for family in families {
                    outcomes.push(lookup_family(&self.resolver, &name, *family).await);
                }
                outcomes
            }
        };

        let mut found = Vec::new();
        let mut nxdomain = false;
        let mut temporary = Vec::new();
        for outcome in outcomes {
            match outcome {
                FamilyOutcome::Addresses(addresses) => {
                    for addr in addresses {
                        if !found.contains(&addr) {
                            found.push(addr);
                        }
                    }
                }
                FamilyOutcome::NxDomain => nxdomain = true,
                FamilyOutcome::NoData => {}
                FamilyOutcome::Temporary(detail) => temporary.push(detail),
            }
        }
        if found.is_empty() {
            return Err(if nxdomain {
                HostFailure::NxDomain
            } else if !temporary.is_empty() {
                HostFailure::Temporary(temporary.join(", "))
            } else {
                HostFailure::NoAddresses
            });
        }
        if !temporary.is_empty() {
            debug!(host, failures = %temporary.join(", "), "using the addresses of one family only");
        }
        self.filter_addresses(host, found)
    }

    fn filter_addresses(&self, host: &str, found: Vec<IpAddr>) -> Result<Vec<IpAddr>, HostFailure> {
        let mut kept = Vec::with_capacity(found.len());
        let mut dropped = Vec::new();
        for addr in found {
            match self.dropped_range(addr) {
                Some(range) => dropped.push(format!("{addr} ({range})")),
                None => kept.push(addr),
            }
        }
        if !dropped.is_empty() {
            info!(host, dropped = %dropped.join(", "), "dropped private or reserved addresses");
        }
        if kept.is_empty() {
            return Err(HostFailure::Dropped(dropped.join(", ")));
        }
        Ok(kept)
    }

    fn dropped_range(&self, addr: IpAddr) -> Option<&'static str> {
        if self.allow_private {
            None
        } else {
            reserved_range(addr)
        }
    }
}

/// A hickory nameserver entry for `addr`: UDP, and TCP on the same port.
fn nameserver(addr: SocketAddr) -> NameServerConfig {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
}

/// A lookup failure in the words of a DNS operator (`SERVFAIL`, `timed out`).
fn describe(error: &NetError) -> String {
    match error {
        NetError::Dns(DnsError::ResponseCode(code)) => match code {
            ResponseCode::ServFail => "SERVFAIL".to_owned(),
            ResponseCode::Refused => "REFUSED".to_owned(),
            ResponseCode::FormErr => "FORMERR".to_owned(),
            ResponseCode::NotImp => "NOTIMP".to_owned(),
            other => format!("{} (rcode {})", other.to_str(), u16::from(*other)),
        },
        NetError::Timeout => "timed out".to_owned(),
        other => other.to_string(),
    }
}

/// `name.`: absolute, so that no search domain is ever appended.
fn absolute(name: &str) -> String {
    format!("{name}.")
}

/// The error for an MX list where no host gave a usable address.
fn no_usable_host(domain: &str, failures: &[(String, HostFailure)]) -> MxError {
    let detail = failures
        .iter()
        .map(|(host, failure)| format!("{host}: {failure}"))
        .collect::<Vec<_>>()
        .join("; ");
    if failures
        .iter()
        .any(|(_, f)| matches!(f, HostFailure::Temporary(_)))
    {
        return MxError::Temporary {
            domain: domain.to_owned(),
            detail: format!("no MX host resolves yet: {detail}"),
        };
    }
    let dropped: Vec<&str> = failures
        .iter()
        .filter_map(|(_, f)| match f {
            HostFailure::Dropped(d) => Some(d.as_str()),
            _ => None,
        })
        .collect();
    if !dropped.is_empty() {
        return MxError::AllAddressesDropped {
            domain: domain.to_owned(),
            dropped: dropped.join(", "),
        };
    }
    MxError::NoMxHostResolves {
        domain: domain.to_owned(),
        detail,
    }
}

/// MX exchanges as host names: null MX detected, `.` entries among others dropped, names
/// lowercased without the trailing dot, repeated names kept once (at their best preference).
fn mx_hosts(domain: &str, exchanges: Vec<(u16, Name)>) -> Result<Vec<(u16, String)>, MxError> {
    // RFC 7505 §3: a null MX is the only MX record of its domain. A `.` among other MX records
    // is a misconfiguration; the other hosts are still used.
    if let [(_, exchange)] = exchanges.as_slice()
        && exchange.is_root()
    {
        return Err(MxError::NullMx {
            domain: domain.to_owned(),
        });
    }
    let mut hosts: Vec<(u16, String)> = Vec::with_capacity(exchanges.len());
    for (preference, exchange) in exchanges {
        if exchange.is_root() {
            warn!(
                domain,
                "ignoring a null MX published next to other MX records (RFC 7505 §3)"
            );
            continue;
        }
        let name = exchange.to_lowercase().to_ascii();
        let name = name.strip_suffix('.').unwrap_or(&name).to_owned();
        match hosts.iter_mut().find(|(_, h)| *h == name) {
            Some(existing) => existing.0 = existing.0.min(preference),
            None => hosts.push((preference, name)),
        }
    }
    Ok(hosts)
}

/// Sorted by preference, equal preferences shuffled (RFC 5321 §5.1), at most [`MAX_MX_HOSTS`].
pub(crate) fn order_by_preference<R: Rng + ?Sized>(
    mut hosts: Vec<(u16, String)>,
    rng: &mut R,
) -> Vec<(u16, String)> {
    hosts.sort_by_key(|(preference, _)| *preference);
    for group in hosts.chunk_by_mut(|a, b| a.0 == b.0) {
        group.shuffle(rng);
    }
    hosts.truncate(MAX_MX_HOSTS);
    hosts
}

#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
}

enum FamilyOutcome {
    Addresses(Vec<IpAddr>),
    NxDomain,
    NoData,
    Temporary(String),
}

/// Why one host has no usable address.
#[derive(Debug)]
enum HostFailure {
    NxDomain,
    NoAddresses,
    Dropped(String),
    Temporary(String),
}

impl fmt::Display for HostFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NxDomain => f.write_str("NXDOMAIN"),
            Self::NoAddresses => f.write_str("no address records"),
            Self::Dropped(dropped) => write!(f, "only private or reserved addresses: {dropped}"),
            Self::Temporary(detail) => f.write_str(detail),
        }
    }
}

async fn lookup_family(resolver: &TokioResolver, name: &str, family: Family) -> FamilyOutcome {
    let (result, kind) = match family {
        Family::V4 => (resolver.ipv4_lookup(name).await, "A"),
        Family::V6 => (resolver.ipv6_lookup(name).await, "AAAA"),
    };
    match result {
        Ok(lookup) => {
            // Answers may start with the CNAME chain: keep only the addresses.
            let addresses: Vec<IpAddr> = lookup
                .answers()
                .iter()
                .filter_map(|record| match (&record.data, family) {
                    (RData::A(a), Family::V4) => Some(IpAddr::V4(a.0)),
                    (RData::AAAA(aaaa), Family::V6) => Some(IpAddr::V6(aaaa.0)),
                    _ => None,
                })
                .collect();
            if addresses.is_empty() {
                FamilyOutcome::NoData
            } else {
                FamilyOutcome::Addresses(addresses)
            }
        }
        Err(e) if e.is_nx_domain() => FamilyOutcome::NxDomain,
        Err(e) if e.is_no_records_found() => FamilyOutcome::NoData,
        Err(e) => FamilyOutcome::Temporary(format!("{kind} lookup: {}", describe(&e))),
    }
}

/// What a recipient domain names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    /// Lowercase A-labels, no trailing dot.
    Domain(String),
    /// A domain literal, normalized (`[192.0.2.1]`, `[IPv6:2001:db8::1]`).
    Literal { text: String, ip: IpAddr },
}

fn parse_destination(input: &str) -> Result<Destination, MxError> {
    let invalid = |reason: &str| MxError::InvalidDomain {
        domain: input.to_owned(),
        reason: reason.to_owned(),
    };
    let text = input.trim();
    if let Some(inner) = text.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| invalid("an address literal ends with ']'"))?;
        return parse_literal(inner).ok_or_else(|| {
            invalid("not an address literal: expected [192.0.2.1] or [IPv6:2001:db8::1]")
        });
    }
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() {
        return Err(invalid("empty domain"));
    }
    // U-labels become A-labels (UTS #46, done by hickory); plain ASCII that UTS #46 rejects
    // (underscores) is taken as is.
    let mut name = Name::from_str_relaxed(text)
        .map_err(|e| invalid(&format!("not a domain name: {e}")))?
        .to_lowercase();
    name.set_fqdn(true);
    let ascii = name.to_ascii();
    let ascii = ascii.strip_suffix('.').unwrap_or(&ascii);
    if ascii.is_empty() || ascii.len() > MAX_DOMAIN_LEN {
        return Err(invalid("a domain name has 1 to 253 characters"));
    }
    let labels_ok = ascii.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !labels_ok {
        return Err(invalid(
            "labels are letters, digits, '-' and '_', separated by single dots",
        ));
    }
    if ascii
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid(
            "an address must be written as a literal: [192.0.2.1]",
        ));
    }
    Ok(Destination::Domain(ascii.to_owned()))
}

/// The inside of `[...]`: a dotted quad, or `IPv6:` (any case) and an IPv6 address.
fn parse_literal(inner: &str) -> Option<Destination> {
    let tag = inner.get(..5);
    if tag.is_some_and(|t| t.eq_ignore_ascii_case("IPv6:")) {
        let ip: Ipv6Addr = inner.get(5..)?.parse().ok()?;
        return Some(Destination::Literal {
            text: format!("[IPv6:{ip}]"),
            ip: IpAddr::V6(ip),
        });
    }
    let ip: Ipv4Addr = inner.parse().ok()?;
    Some(Destination::Literal {
        text: format!("[{ip}]"),
        ip: IpAddr::V4(ip),
    })
}

const V4_RESERVED: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 8), "\"this network\", RFC 791"),
    (v4(10, 0, 0, 0, 8), "private, RFC 1918"),
    (
        v4(100, 64, 0, 0, 10),
        "shared address space (CGNAT), RFC 6598",
    ),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local"),
    (v4(172, 16, 0, 0, 12), "private, RFC 1918"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments, RFC 6890"),
    (v4(192, 0, 2, 0, 24), "documentation, RFC 5737"),
    (v4(192, 168, 0, 0, 16), "private, RFC 1918"),
    (v4(198, 18, 0, 0, 15), "benchmarking, RFC 2544"),
    (v4(198, 51, 100, 0, 24), "documentation, RFC 5737"),
    (v4(203, 0, 113, 0, 24), "documentation, RFC 5737"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved, RFC 1112"),
];

const V6_RESERVED: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        "IPv4-compatible, deprecated (RFC 4291)",
    ),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        "local-use NAT64, RFC 8215",
    ),
    (
        v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
        "discard-only, RFC 6666",
    ),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        "documentation, RFC 3849",
    ),
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),
        "documentation, RFC 9637",
    ),
    (
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        "unique local, RFC 4193",
    ),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        "site-local, deprecated (RFC 3879)",
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6(s: [u16; 8], prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(
        Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]),
        prefix,
    )
}

/// The reserved range `addr` is in (loopback, RFC 1918 private, link-local, CGNAT, documentation,
/// multicast, IPv6 ULA, ...), described for a log line; `None` for a globally routable address.
/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is judged by its IPv4 address.
pub fn reserved_range(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(v4) => V4_RESERVED
            .iter()
            .find(|(net, _)| net.contains(&v4))
            .map(|(_, what)| *what),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(mapped) => reserved_range(IpAddr::V4(mapped)),
            None => V6_RESERVED
                .iter()
                .find(|(net, _)| net.contains(&v6))
                .map(|(_, what)| *what),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn domain(s: &str) -> Destination {
        Destination::Domain(s.to_owned())
    }

    #[test]
    fn destinations_are_normalized() {
        let cases: &[(&str, Destination)] = &[
            ("Example.TEST.", domain("example.test")),
            ("  example.test ", domain("example.test")),
            ("Bücher.example", domain("xn--bcher-kva.example")),
            ("xn--bcher-kva.example", domain("xn--bcher-kva.example")),
            ("under_score.example", domain("under_score.example")),
            (
                "[192.0.2.1]",
                Destination::Literal {
                    text: "[192.0.2.1]".to_owned(),
                    ip: IpAddr::from([192, 0, 2, 1]),
                },
            ),
            (
                "[ipv6:2001:DB8:0::1]",
                Destination::Literal {
                    text: "[IPv6:2001:db8::1]".to_owned(),
                    ip: "2001:db8::1".parse().expect("ip"),
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_destination(input).as_ref(), Ok(expected), "{input:?}");
        }
    }

    #[test]
    fn bad_destinations_are_permanent_errors() {
        for input in [
            "",
            ".",
            "a..b",
            "exa mple.test",
            "user@example.test",
            "192.0.2.1",
            "[192.0.2.1",
            "[300.0.0.1]",
            "[2001:db8::1]",
            "[IPv6:192.0.2.1]",
            "[tag:whatever]",
            &format!("{}.test", "a".repeat(64)),
            &format!("{}test", "abcdefgh.".repeat(29)),
        ] {
            let err = parse_destination(input).expect_err(input);
            assert!(
                matches!(err, MxError::InvalidDomain { .. }) && err.is_permanent(),
                "{input:?}: {err}"
            );
        }
    }

    #[test]
    fn preference_order_shuffles_only_within_a_preference() {
        let hosts: Vec<(u16, String)> = [(20, "c"), (10, "a"), (10, "b"), (30, "d"), (20, "e")]
            .iter()
            .map(|(p, h)| (*p, (*h).to_owned()))
            .collect();
        let mut seen = HashSet::new();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..64 {
            let ordered = order_by_preference(hosts.clone(), &mut rng);
            let prefs: Vec<u16> = ordered.iter().map(|(p, _)| *p).collect();
            assert_eq!(prefs, [10, 10, 20, 20, 30]);
            assert_eq!(ordered[4].1, "d");
            seen.insert(ordered.iter().map(|(_, h)| h.as_str()).collect::<String>());
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
    }

    #[test]
    fn at_most_max_mx_hosts() {
        let hosts = (0..40).map(|i| (i, format!("mx{i}"))).collect();
        let ordered = order_by_preference(hosts, &mut StdRng::seed_from_u64(1));
        assert_eq!(ordered.len(), MAX_MX_HOSTS);
        assert_eq!(ordered[0].1, "mx0");
    }

    #[test]
    fn reserved_ranges() {
        let reserved = [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.2",
            "169.254.1.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:192.168.0.1",
            "64:ff9b:1::1",
            "100::1",
            "2001:db8::25",
            "3fff::1",
            "fd00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ];
        for addr in reserved {
            let ip: IpAddr = addr.parse().expect(addr);
            assert!(reserved_range(ip).is_some(), "{addr} should be reserved");
        }
        let public = [
            "1.2.3.4",
            "100.63.255.255",
            "100.128.0.0",
            "172.32.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "2a00:1450:4001::1",
            "64:ff9b::8.8.8.8",
            "::ffff:8.8.8.8",
        ];
        for addr in public {
            let ip: IpAddr = addr.parse().expect(addr);
            assert_eq!(reserved_range(ip), None, "{addr} should be public");
        }
        assert_eq!(
            reserved_range(IpAddr::from([10, 0, 0, 1])),
            Some("private, RFC 1918")
        );
    }

    #[test]
    fn null_mx_only_when_alone() {
        let root = (0, Name::root());
        let err = mx_hosts("n.test", vec![root.clone()]).expect_err("null mx");
        assert_eq!(
            err.to_string(),
            "n.test: null MX (RFC 7505): the domain accepts no mail"
        );
        assert_eq!(err.enhanced_status(), "5.1.10");
        let mx = Name::from_ascii("MX.n.test.").expect("name");
        let hosts = mx_hosts("n.test", vec![root, (10, mx.clone()), (5, mx)]).expect("hosts");
        assert_eq!(hosts, [(5, "mx.n.test".to_owned())]);
    }

    #[test]
    fn resolver_config_is_validated() {
        let err = MxResolver::new(ResolverConfig {
            attempts: 0,
            nameservers: vec![SocketAddr::from(([127, 0, 0, 1], 53))],
            ..ResolverConfig::default()
        })
        .expect_err("zero attempts");
        assert!(err.to_string().contains("attempts (0)"), "{err}");
    }
}
