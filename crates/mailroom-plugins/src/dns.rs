//! The DNS resolver a listener's plugins share (`listeners[].dns`): one hickory resolver with
//! its cache, wrapped in `mail-auth`'s [`MessageAuthenticator`] for SPF, DKIM, DMARC and ARC;
//! plugins that need plain lookups (DNSBL, PTR) use [`Dns::resolver`].

use std::net::SocketAddr;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::MessageAuthenticator;
use mailroom_config::DnsSpec;

/// The plugins' resolver.
pub struct Dns {
    auth: MessageAuthenticator,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dns")
    }
}

impl Dns {
    /// A resolver for `spec` (the system's name servers when it lists none). The error says
    /// what is wrong, for the caller to put behind the field path.
    pub fn new(spec: &DnsSpec) -> Result<Self, String> {
        let config = if spec.nameservers.is_empty() {
            let (system, _) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?;
            ResolverConfig::from_name_servers(system.name_servers().to_vec())
        } else {
            let mut servers = Vec::new();
            for ns in &spec.nameservers {
                let addr: SocketAddr = ns
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid name server {ns:?}: expected ip:port"))?;
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                servers.push(NameServerConfig::new(addr.ip(), true, vec![udp, tcp]));
            }
            ResolverConfig::from_name_servers(servers)
        };
        let mut opts = ResolverOpts::default();
        opts.timeout = spec.timeout.as_duration();
        opts.attempts = 1;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.try_tcp_on_error = true;
        let auth = MessageAuthenticator::new(config, opts)
            .map_err(|e| format!("cannot build the resolver: {e}"))?;
        Ok(Dns { auth })
    }

    /// For SPF, DKIM, DMARC and ARC (`mail-auth`).
    pub fn authenticator(&self) -> &MessageAuthenticator {
        &self.auth
    }

    /// For plain lookups.
    pub fn resolver(&self) -> &TokioResolver {
        self.auth.resolver()
    }
}
