//! `earlyTalker`: holds the greeting back and refuses clients that talk before it (Haraka's
//! `early_talker`, Postfix's postscreen pregreet test). RFC 5321 §3.1 has the client wait for
//! the greeting; bulk spam software often sends at once. The plugin only names the delay: the
//! server waits, refuses a talker with `554 5.5.1` and counts it in
//! `mailroom_connections_total{result="early_talker"}`.

use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use mailroom_config::EarlyTalkerPluginSpec;

use crate::{Env, Plugin, PluginError, SessionInfo, Trusted};

/// The `earlyTalker` plugin, built from [`EarlyTalkerPluginSpec`].
#[derive(Debug)]
pub struct EarlyTalkerPlugin {
    delay: Duration,
    allow_clients: Vec<IpNet>,
}

impl EarlyTalkerPlugin {
    /// Builds the plugin from its (validated) spec.
    pub fn new(spec: &EarlyTalkerPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            delay: spec.delay.as_duration(),
            allow_clients: spec.allow_clients.clone(),
        })
    }
}

#[async_trait]
impl Plugin for EarlyTalkerPlugin {
    fn name(&self) -> &'static str {
        "earlyTalker"
    }

    fn greeting_delay(&self, s: &SessionInfo) -> Duration {
        let ip = s.client_ip();
        if s.notes.contains::<Trusted>() || self.allow_clients.iter().any(|n| n.contains(&ip)) {
            return Duration::ZERO;
        }
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use mailroom_config::{HumanDuration, PluginSpec};

    use super::*;
    use crate::{BuildContext, build_chain};

    fn session(ip: &str) -> SessionInfo {
        let client = format!("{ip}:40000").parse().expect("addr");
        SessionInfo::new(
            "smtp",
            "mx.test",
            client,
            "127.0.0.1:25".parse().expect("addr"),
        )
    }

    #[test]
    fn trusted_and_allowed_clients_are_greeted_at_once() {
        let spec = EarlyTalkerPluginSpec {
            delay: HumanDuration::from_millis(300),
            allow_clients: vec!["10.0.0.0/8".parse().expect("net")],
        };
        let specs = [PluginSpec {
            early_talker: Some(spec),
            ..Default::default()
        }];
        let chain = build_chain(&specs, "p", &BuildContext::new("smtp", "mx.test")).expect("chain");
        let stranger = session("192.0.2.1");
        assert_eq!(chain.greeting_delay(&stranger), Duration::from_millis(300));
        assert_eq!(chain.greeting_delay(&session("10.1.2.3")), Duration::ZERO);
        stranger.notes.insert(Trusted {
            by: "dnswl list.test".into(),
        });
        assert_eq!(chain.greeting_delay(&stranger), Duration::ZERO);
    }
}
