//! Everything a listener's sessions share, resolved once from its `ListenerSpec`: the
//! effective limits and timeouts, the accepted domains, the TLS acceptor, the users, the plugin
//! chain, the queue and the delivery log.

use std::sync::Arc;
use std::time::Duration;

use mailroom_config::{AuthMechanism, ListenerMode, ListenerSpec};
use mailroom_plugins::{BuildContext, PluginChain, SharedBackend, build_chain};
use mailroom_queue::Queue;
use mailroom_telemetry::DeliveryLog;
use tokio_rustls::TlsAcceptor;

use crate::InboundError;
use crate::auth::UserDb;
use crate::limits::ConnectionLimits;
use crate::tls::{ReloadingCert, acceptor};

/// What every listener needs from the process that runs it.
#[derive(Clone)]
pub struct InboundDeps {
    /// Where accepted messages go.
    pub queue: Arc<dyn Queue>,
    /// The JSON delivery log.
    pub delivery_log: DeliveryLog,
    /// Host name used when the listener sets none.
    pub hostname: String,
    /// Where plugins keep state shared across inbound processes (the cluster queue's
    /// JetStream); `None` keeps it in this process.
    pub shared: Option<SharedBackend>,
}

/// Effective limits of a listener.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_line_length: usize,
    pub max_command_length: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: u32,
    pub max_errors: u32,
    pub max_messages_per_connection: u32,
}

/// Effective timeouts of a listener (RFC 5321 §4.5.3.2).
#[derive(Debug, Clone)]
pub struct SessionTimeouts {
    pub command: Duration,
    pub data_block: Duration,
    pub data_termination: Duration,
    pub tls_handshake: Duration,
    pub session: Duration,
}

/// A listener's shared state.
pub struct ListenerContext {
    pub name: String,
    pub hostname: String,
    pub submission: bool,
    /// The listener's spec as configured (domain and relay rules live on it).
    pub spec: ListenerSpec,
    pub proxy_protocol: bool,
    pub tls: Option<TlsAcceptor>,
    pub implicit_tls: bool,
    pub users: Option<Arc<UserDb>>,
    pub auth_mechanisms: Vec<&'static str>,
    pub limits: SessionLimits,
    pub timeouts: SessionTimeouts,
    pub plugins: PluginChain,
    pub queue: Arc<dyn Queue>,
    pub delivery_log: DeliveryLog,
    pub policy: String,
    pub connections: Arc<ConnectionLimits>,
    pub(crate) cert: Option<Arc<ReloadingCert>>,
}

impl ListenerContext {
    /// Resolves a listener spec; `path` is its field path (`listeners[0]`) for error messages.
    pub fn build(
        spec: &ListenerSpec,
        path: &str,
        deps: &InboundDeps,
    ) -> Result<Self, InboundError> {
        let hostname = spec
            .hostname
            .clone()
            .unwrap_or_else(|| deps.hostname.clone());
        let plugins = build_chain(
            &spec.plugins,
            &format!("{path}.plugins"),
            &BuildContext {
                dns: spec.dns.clone(),
                shared: deps.shared.clone(),
                ..BuildContext::new(&spec.name, &hostname)
            },
        )?;
        let (tls, cert) = match &spec.tls {
            Some(t) => {
                let cert = ReloadingCert::load(t.cert_file.as_ref(), t.key_file.as_ref()).map_err(
                    |reason| InboundError::Tls {
                        listener: spec.name.clone(),
                        reason: format!("{path}.tls: {reason}"),
                    },
                )?;
                (Some(acceptor(&spec.name, Arc::clone(&cert))?), Some(cert))
            }
            None => (None, None),
        };
        let users = match &spec.auth {
            Some(a) => Some(Arc::new(UserDb::load(
                a.users_file.as_ref(),
                &spec.name,
                &format!("{path}.auth.usersFile"),
            )?)),
            None => None,
        };
        let auth_mechanisms = spec
            .auth
            .as_ref()
            .map(|a| {
                a.mechanisms
                    .iter()
                    .map(|m| match m {
                        AuthMechanism::Plain => "PLAIN",
                        AuthMechanism::Login => "LOGIN",
                    })
                    .collect()
            })
            .unwrap_or_default();
        let l = &spec.limits;
        let t = &spec.timeouts;
        Ok(ListenerContext {
            name: spec.name.clone(),
            hostname,
            submission: spec.mode == ListenerMode::Submission,
            spec: spec.clone(),
            proxy_protocol: spec.proxy_protocol,
            implicit_tls: spec.tls.as_ref().is_some_and(|t| t.implicit),
            tls,
            users,
            auth_mechanisms,
            limits: SessionLimits {
                max_message_size: l.max_message_size.bytes(),
                max_recipients: l.max_recipients as usize,
                max_line_length: l.max_line_length as usize,
                max_command_length: l.max_command_length as usize,
                max_connections: l.max_connections as usize,
                max_connections_per_ip: l.max_connections_per_ip,
                max_errors: l.max_errors,
                max_messages_per_connection: l.max_messages_per_connection,
            },
            timeouts: SessionTimeouts {
                command: t.command.as_duration(),
                data_block: t.data_block.as_duration(),
                data_termination: t.data_termination.as_duration(),
                tls_handshake: t.tls_handshake.as_duration(),
                session: t.session.as_duration(),
            },
            plugins,
            queue: Arc::clone(&deps.queue),
            delivery_log: deps.delivery_log.clone(),
            policy: spec.delivery_policy.clone(),
            connections: Arc::new(ConnectionLimits::default()),
            cert,
        })
    }

    /// Checks what `build` would load (plugins, TLS files, users file) without a queue: for
    /// `mailroom check`.
    pub fn check(spec: &ListenerSpec, path: &str, hostname: &str) -> Result<(), InboundError> {
        build_chain(
            &spec.plugins,
            &format!("{path}.plugins"),
            &BuildContext {
                dns: spec.dns.clone(),
                ..BuildContext::new(&spec.name, hostname)
            },
        )?;
        if let Some(t) = &spec.tls {
            ReloadingCert::load(t.cert_file.as_ref(), t.key_file.as_ref()).map_err(|reason| {
                InboundError::Tls {
                    listener: spec.name.clone(),
                    reason: format!("{path}.tls: {reason}"),
                }
            })?;
        }
        if let Some(a) = &spec.auth {
            UserDb::load(
                a.users_file.as_ref(),
                &spec.name,
                &format!("{path}.auth.usersFile"),
            )?;
        }
        Ok(())
    }

    /// True when mail for `domain` is accepted here (`acceptedDomains`, `*.suffix` for subdomains).
    pub fn accepts_domain(&self, domain: &str) -> bool {
        self.spec.accepts_domain(domain)
    }

    /// True when the client may relay to any domain: authenticated, or inside `relayNetworks`.
    pub fn may_relay(&self, ip: std::net::IpAddr, authenticated: bool) -> bool {
        authenticated || self.spec.may_relay(ip)
    }
}
