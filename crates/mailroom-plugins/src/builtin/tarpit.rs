//! `tarpit`: slows down clients that look like spam software by holding back every reply
//! (Haraka's `tarpit`). Which clients: those in `clients`, and with `suspicious` those that
//! plugins in tagging mode noted as [`Suspicion`] (`dnsbl`, `iprev`, `helo`). A [`Trusted`]
//! client is never slowed down. The server asks [`Plugin::reply_delay`] before each flush of
//! replies, so a finding at one hook slows every reply after it.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use mailroom_config::TarpitPluginSpec;
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};

use crate::{Env, Plugin, PluginError, SessionInfo, Suspicion, Trusted};

/// Sessions slowed down, by why (`listed` in `clients`, `suspicious`).
static SESSIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_tarpit_sessions_total",
                "Sessions the tarpit plugin slowed down, by listener and reason (listed, \
                 suspicious).",
            ),
            &["listener", "reason"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Replies held back (one per flush: pipelined replies share one delay).
static DELAYS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_tarpit_delays_total",
                "Flushes of replies the tarpit plugin held back, by listener.",
            ),
            &["listener"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Connection note: this session is being slowed down (counted once in the sessions metric).
#[derive(Debug, Clone)]
struct Tarpitted;

/// The `tarpit` plugin, built from [`TarpitPluginSpec`].
#[derive(Debug)]
pub struct TarpitPlugin {
    delay: Duration,
    clients: Vec<IpNet>,
    suspicious: bool,
}

impl TarpitPlugin {
    /// Builds the plugin from its (validated) spec.
    pub fn new(spec: &TarpitPluginSpec, _path: &str, _env: &Env) -> Result<Self, PluginError> {
        Ok(Self {
            delay: spec.delay.as_duration(),
            clients: spec.clients.clone(),
            suspicious: spec.suspicious,
        })
    }

    /// Why the client is slowed down, if it is.
    fn reason(&self, s: &SessionInfo) -> Option<&'static str> {
        if s.notes.contains::<Trusted>() {
            return None;
        }
        let ip = s.client_ip();
        if self.clients.iter().any(|n| n.contains(&ip)) {
            Some("listed")
        } else if self.suspicious && s.notes.contains::<Suspicion>() {
            Some("suspicious")
        } else {
            None
        }
    }
}

#[async_trait]
impl Plugin for TarpitPlugin {
    fn name(&self) -> &'static str {
        "tarpit"
    }

    fn reply_delay(&self, s: &SessionInfo) -> Duration {
        let Some(reason) = self.reason(s) else {
            return Duration::ZERO;
        };
        if !s.notes.contains::<Tarpitted>() {
            s.notes.insert(Tarpitted);
            SESSIONS.with_label_values(&[&s.listener, reason]).inc();
            tracing::debug!(listener = %s.listener, client = %s.client_ip(), reason, "tarpit");
        }
        DELAYS.with_label_values(&[&s.listener]).inc();
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use mailroom_config::{HumanDuration, PluginSpec};

    use super::*;
    use crate::{BuildContext, PluginChain, build_chain};

    fn session(ip: &str) -> SessionInfo {
        let client = format!("{ip}:40000").parse().expect("addr");
        SessionInfo::new(
            "smtp",
            "mx.test",
            client,
            "127.0.0.1:25".parse().expect("addr"),
        )
    }

    fn chain(suspicious: bool) -> PluginChain {
        let specs = [PluginSpec {
            tarpit: Some(TarpitPluginSpec {
                delay: HumanDuration::from_millis(500),
                clients: vec!["192.0.2.0/24".parse().expect("net")],
                suspicious,
            }),
            ..Default::default()
        }];
        build_chain(&specs, "p", &BuildContext::new("smtp", "mx.test")).expect("chain")
    }

    #[test]
    fn listed_and_suspicious_clients_wait_trusted_ones_never() {
        let half = Duration::from_millis(500);
        let tarpit = chain(true);
        let listed = session("192.0.2.9");
        assert_eq!(tarpit.reply_delay(&listed), half);
        listed.notes.insert(Trusted { by: "test".into() });
        assert_eq!(tarpit.reply_delay(&listed), Duration::ZERO);

        let other = session("198.51.100.1");
        assert_eq!(tarpit.reply_delay(&other), Duration::ZERO);
        Suspicion::add(&other.notes, "dnsbl bl.test listed");
        assert_eq!(tarpit.reply_delay(&other), half);
        assert_eq!(chain(false).reply_delay(&other), Duration::ZERO);
    }
}
