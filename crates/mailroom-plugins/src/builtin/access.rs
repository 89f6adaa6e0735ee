//! `access`: allow or deny by client network, HELO name, sender and recipient patterns
//! (Haraka's `access` plugin). An allowed client skips this plugin's deny lists.

use async_trait::async_trait;
use ipnet::IpNet;
use mailroom_config::AccessPluginSpec;
use mailroom_smtp::{ForwardPath, RcptParams, ReversePath};

use crate::{AddressPattern, Plugin, PluginError, SessionInfo, Transaction, Verdict};

/// The `access` plugin, built from [`AccessPluginSpec`].
#[derive(Debug)]
pub struct AccessPlugin {
    allow_clients: Vec<IpNet>,
    deny_clients: Vec<IpNet>,
    deny_helo: Vec<AddressPattern>,
    deny_senders: Vec<AddressPattern>,
    allow_senders: Vec<AddressPattern>,
    deny_recipients: Vec<AddressPattern>,
}

fn patterns(list: &[String], path: &str) -> Result<Vec<AddressPattern>, PluginError> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            AddressPattern::parse(p).map_err(|source| PluginError::Pattern {
                path: format!("{path}[{i}]"),
                source,
            })
        })
        .collect()
}

impl AccessPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &AccessPluginSpec, path: &str) -> Result<Self, PluginError> {
        Ok(AccessPlugin {
            allow_clients: spec.allow_clients.clone(),
            deny_clients: spec.deny_clients.clone(),
            deny_helo: patterns(&spec.deny_helo, &format!("{path}.denyHelo"))?,
            deny_senders: patterns(&spec.deny_senders, &format!("{path}.denySenders"))?,
            allow_senders: patterns(&spec.allow_senders, &format!("{path}.allowSenders"))?,
            deny_recipients: patterns(&spec.deny_recipients, &format!("{path}.denyRecipients"))?,
        })
    }

    fn client_allowed(&self, s: &SessionInfo) -> bool {
        let ip = s.client_ip();
        self.allow_clients.iter().any(|n| n.contains(&ip))
    }
}

#[async_trait]
impl Plugin for AccessPlugin {
    fn name(&self) -> &'static str {
        "access"
    }

    async fn connect(&self, s: &SessionInfo) -> Verdict {
        let ip = s.client_ip();
        if !self.client_allowed(s) && self.deny_clients.iter().any(|n| n.contains(&ip)) {
            return Verdict::reject(554, (5, 7, 1), format!("Access denied for client {ip}"));
        }
        Verdict::Continue
    }

    async fn helo(&self, s: &SessionInfo, name: &str) -> Verdict {
        if !self.client_allowed(s) && self.deny_helo.iter().any(|p| p.matches(name)) {
            return Verdict::reject(550, (5, 7, 1), format!("HELO name {name} is not allowed"));
        }
        Verdict::Continue
    }

    async fn mail(&self, s: &SessionInfo, tx: &Transaction) -> Verdict {
        let ReversePath::Mailbox(m) = &tx.sender else {
            return Verdict::Continue;
        };
        let addr = format!("{}@{}", m.local, m.domain);
        if self.client_allowed(s) || self.allow_senders.iter().any(|p| p.matches(&addr)) {
            return Verdict::Continue;
        }
        if self.deny_senders.iter().any(|p| p.matches(&addr)) {
            return Verdict::reject(550, (5, 7, 1), format!("Sender <{addr}> is not allowed"));
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
        let ForwardPath::Mailbox(m) = to else {
            return Verdict::Continue;
        };
        let addr = format!("{}@{}", m.local, m.domain);
        if !self.client_allowed(s) && self.deny_recipients.iter().any(|p| p.matches(&addr)) {
            return Verdict::reject(550, (5, 7, 1), format!("Recipient <{addr}> is not allowed"));
        }
        Verdict::Continue
    }
}
