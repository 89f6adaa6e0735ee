//! `rateLimit`: counts connections, messages and recipients per client address, client network,
//! sender, sender domain or authenticated user, and refuses what goes past a limit. Counters
//! live in a [`SharedStore`]: JetStream KV for the whole cluster, or this process.
//!
//! Each limit counts in fixed windows of its rate's period, aligned on the Unix epoch: the key
//! `<listener>.<limit>.<value>.<window number>` holds the window's count, so a finished window's
//! counter is simply never read again and ages out of the bucket. With `window: sliding` the
//! previous window's count, weighted by the share of it the sliding period still covers, counts
//! too (the approximation of Cloudflare's and nginx's rate limiters). A count is taken only if
//! it stays within the limit (compare-and-swap), so refused attempts are not counted.
//!
//! | counted       | when            | past the limit                                          |
//! |---------------|-----------------|---------------------------------------------------------|
//! | `connections` | connect         | `421 4.7.0 <name>: rate limit exceeded, try again later`, closed |
//! | `messages`    | MAIL FROM       | `451 4.7.1 <name>: rate limit exceeded, try again later` |
//! | `recipients`  | each RCPT TO    | `451 4.7.1 <name>: rate limit exceeded, try again later` |

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use mailroom_config::{FailMode, RateLimitPluginSpec};
use mailroom_smtp::{ForwardPath, RcptParams, ReversePath};
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};

use crate::shared::{SharedError, SharedStore, client_network, key_token, now_ms, parse_count};
use crate::{Env, Plugin, PluginError, SessionInfo, Transaction, Trusted, Verdict};

/// Limit checks by outcome: `pass`, `exceeded`, `exempt` (allowed client, trusted) or `error`.
static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_rate_limit_total",
                "Rate limit checks, by listener, limit and outcome (pass, exceeded, exempt or \
                 error).",
            ),
            &["listener", "limit", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// Description of the KV bucket `<stream>_RATELIMIT`.
const BUCKET_DESCRIPTION: &str = "Mailroom inbound rate-limit counters (one key per window)";

/// What a limit is per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    ClientIp,
    ClientNetwork,
    Sender,
    SenderDomain,
    AuthUser,
}

/// What a limit counts (and so at which hook).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Count {
    Connections,
    Messages,
    Recipients,
}

/// One limit, ready to check.
#[derive(Debug)]
struct Limit {
    name: String,
    key: Key,
    count: Count,
    max: u64,
    period_ms: u64,
    sliding: bool,
}

impl Key {
    fn parse(name: &str) -> Option<Key> {
        Some(match name {
            "clientIp" => Key::ClientIp,
            "clientNetwork" => Key::ClientNetwork,
            "sender" => Key::Sender,
            "senderDomain" => Key::SenderDomain,
            "authUser" => Key::AuthUser,
            _ => return None,
        })
    }

    /// The value counted for a session (and its transaction at MAIL and RCPT); `None` when the
    /// session has none (no AUTH, the null sender).
    fn value(self, s: &SessionInfo, tx: Option<&Transaction>) -> Option<String> {
        let sender = || match tx.map(|tx| &tx.sender) {
            Some(ReversePath::Mailbox(m)) => Some(m),
            _ => None,
        };
        match self {
            Key::ClientIp => Some(s.client_ip().to_canonical().to_string()),
            Key::ClientNetwork => Some(client_network(s.client_ip()).to_string()),
            Key::Sender => sender().map(|m| format!("{}@{}", m.local, m.domain).to_lowercase()),
            Key::SenderDomain => sender().map(|m| m.domain_lowercase()),
            Key::AuthUser => s.auth_user.clone(),
        }
    }
}

impl Count {
    fn parse(name: &str) -> Option<Count> {
        Some(match name {
            "connections" => Count::Connections,
            "messages" => Count::Messages,
            "recipients" => Count::Recipients,
            _ => return None,
        })
    }

    /// The refusal of a client past a limit (or, with `onError: tempfail`, of one whose
    /// limit could not be checked).
    fn refusal(self, text: String) -> Verdict {
        match self {
            // RFC 5321 §3.1: a server that will not serve the client may greet with 421
            // and close.
            Count::Connections => Verdict::disconnect(421, (4, 7, 0), text),
            Count::Messages | Count::Recipients => Verdict::tempfail(451, (4, 7, 1), text),
        }
    }
}

/// The `rateLimit` plugin, built from [`RateLimitPluginSpec`].
#[derive(Debug)]
pub struct RateLimitPlugin {
    /// Key prefix: the listener's name, so each listener counts for itself.
    prefix: String,
    limits: Vec<Limit>,
    allow_clients: Vec<IpNet>,
    on_error: FailMode,
    store: SharedStore,
}

impl RateLimitPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &RateLimitPluginSpec, path: &str, env: &Env) -> Result<Self, PluginError> {
        let invalid = |field: String, reason: String| PluginError::Invalid {
            path: format!("{path}.{field}"),
            reason,
        };
        let mut limits = Vec::with_capacity(spec.limits.len());
        for (i, l) in spec.limits.iter().enumerate() {
            let key = Key::parse(l.key.as_str())
                .ok_or_else(|| invalid(format!("limits[{i}].key"), "unknown key".to_owned()))?;
            let count = Count::parse(l.count.as_str())
                .ok_or_else(|| invalid(format!("limits[{i}].count"), "unknown count".to_owned()))?;
            let period_ms = u64::try_from(l.rate.per().as_millis()).unwrap_or(u64::MAX);
            if l.rate.count() == 0 || period_ms == 0 {
                return Err(invalid(
                    format!("limits[{i}].rate"),
                    "count and period must be more than 0".to_owned(),
                ));
            }
            limits.push(Limit {
                name: l.name.clone(),
                key,
                count,
                max: l.rate.count(),
                period_ms,
                sliding: l.window.as_str() == "sliding",
            });
        }
        // A sliding window reads the previous window's counter: keep two periods.
        let longest = limits.iter().map(|l| l.period_ms).max().unwrap_or(0);
        let max_age = Duration::from_millis(longest.saturating_mul(2)).max(Duration::from_secs(60));
        Ok(RateLimitPlugin {
            prefix: key_token(&env.ctx.listener),
            limits,
            allow_clients: spec.allow_clients.clone(),
            on_error: spec.on_error,
            store: SharedStore::new(
                env.ctx.shared.as_ref(),
                "RATELIMIT",
                BUCKET_DESCRIPTION,
                max_age,
                spec.timeout.as_duration(),
            ),
        })
    }

    fn exempt(&self, s: &SessionInfo) -> bool {
        let ip: IpAddr = s.client_ip().to_canonical();
        s.notes.contains::<Trusted>() || self.allow_clients.iter().any(|n| n.contains(&ip))
    }

    /// Checks (and counts) every limit on `count` for the session; the first one exceeded
    /// refuses.
    async fn check(&self, s: &SessionInfo, tx: Option<&Transaction>, count: Count) -> Verdict {
        let mut exempt = None;
        for limit in &self.limits {
            if limit.count != count {
                continue;
            }
            let exempt = *exempt.get_or_insert_with(|| self.exempt(s));
            let outcome = |o: &str| CHECKS.with_label_values(&[&s.listener, &limit.name, o]);
            if exempt {
                outcome("exempt").inc();
                continue;
            }
            let Some(value) = limit.key.value(s, tx) else {
                continue;
            };
            match self.take(limit, &value).await {
                Ok(true) => outcome("pass").inc(),
                Ok(false) => {
                    outcome("exceeded").inc();
                    tracing::info!(listener = %s.listener, limit = %limit.name, key = %value,
                        client = %s.client_ip(), "rate limit exceeded");
                    return count.refusal(format!(
                        "{}: rate limit exceeded, try again later",
                        limit.name
                    ));
                }
                Err(e) => {
                    outcome("error").inc();
                    tracing::warn!(listener = %s.listener, limit = %limit.name, error = %e,
                        on_error = ?self.on_error, "rate limit could not be checked");
                    if self.on_error == FailMode::Tempfail {
                        return count.refusal(format!(
                            "{}: rate limit could not be checked, try again later",
                            limit.name
                        ));
                    }
                }
            }
        }
        Verdict::Continue
    }

    /// Counts one for `value` under `limit` now, unless that would pass the limit.
    async fn take(&self, limit: &Limit, value: &str) -> Result<bool, SharedError> {
        let now = now_ms();
        let window = now / limit.period_ms;
        let base = format!("{}.{}.{}", self.prefix, limit.name, key_token(value));
        let extra = if limit.sliding {
            let previous = self
                .store
                .get(&format!("{base}.{}", window.saturating_sub(1)))
                .await?
                .map_or(0, |v| parse_count(&v));
            sliding_share(previous, now, limit.period_ms)
        } else {
            0
        };
        self.store
            .increment_below(&format!("{base}.{window}"), limit.max, extra)
            .await
    }
}

/// The part of the previous window's count that a period ending `now` still covers.
fn sliding_share(previous: u64, now: u64, period_ms: u64) -> u64 {
    let remaining = period_ms - now % period_ms;
    let share = u128::from(previous) * u128::from(remaining) / u128::from(period_ms);
    u64::try_from(share).unwrap_or(u64::MAX)
}

#[async_trait]
impl Plugin for RateLimitPlugin {
    fn name(&self) -> &'static str {
        "rateLimit"
    }

    async fn connect(&self, s: &SessionInfo) -> Verdict {
        self.check(s, None, Count::Connections).await
    }

    async fn mail(&self, s: &SessionInfo, tx: &Transaction) -> Verdict {
        self.check(s, Some(tx), Count::Messages).await
    }

    async fn rcpt(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        _to: &ForwardPath,
        _params: &RcptParams,
    ) -> Verdict {
        self.check(s, Some(tx), Count::Recipients).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BuildContext, build_chain};
    use mailroom_smtp::{MailParams, Mailbox};

    fn session(ip: &str) -> SessionInfo {
        let ip = ip.parse().unwrap_or_else(|e| panic!("{e}"));
        let local = "127.0.0.1:25".parse().unwrap_or_else(|e| panic!("{e}"));
        SessionInfo {
            helo: Some("client.test".into()),
            esmtp: true,
            ..SessionInfo::new("mx", "mx.test", std::net::SocketAddr::new(ip, 4000), local)
        }
    }

    fn tx(sender: &str) -> Transaction {
        let sender = if sender.is_empty() {
            ReversePath::Null
        } else {
            ReversePath::Mailbox(Mailbox::parse(sender).unwrap_or_else(|e| panic!("{e}")))
        };
        Transaction::new(sender, MailParams::default())
    }

    fn chain(yaml: &str) -> crate::PluginChain {
        let yaml = format!(
            "listeners:\n  - name: mx\n    address: 127.0.0.1:2525\n    acceptedDomains: [example.test]\n    plugins:\n      - rateLimit: {yaml}\n"
        );
        let config = mailroom_config::load_str(&yaml, "t").unwrap_or_else(|e| panic!("{e}"));
        build_chain(
            &config.listeners[0].plugins,
            "listeners[0].plugins",
            &BuildContext::new("mx", "mx.test"),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn keys_are_taken_from_the_session() {
        let mut s = session("2001:db8:1:2::77");
        let t = tx("Alice@Example.TEST");
        assert_eq!(
            Key::ClientIp.value(&s, None).as_deref(),
            Some("2001:db8:1:2::77")
        );
        assert_eq!(
            Key::ClientNetwork.value(&s, None).as_deref(),
            Some("2001:db8:1:2::/64")
        );
        assert_eq!(
            Key::Sender.value(&s, Some(&t)).as_deref(),
            Some("alice@example.test")
        );
        assert_eq!(
            Key::SenderDomain.value(&s, Some(&t)).as_deref(),
            Some("example.test")
        );
        assert_eq!(Key::AuthUser.value(&s, Some(&t)), None);
        s.auth_user = Some("bob".into());
        assert_eq!(Key::AuthUser.value(&s, Some(&t)).as_deref(), Some("bob"));
        let bounce = tx("");
        assert_eq!(Key::Sender.value(&s, Some(&bounce)), None);
        assert_eq!(Key::SenderDomain.value(&s, Some(&bounce)), None);
    }

    #[test]
    fn the_sliding_share_shrinks_as_the_window_advances() {
        // Window of 1000 ms: at its start all of the previous count, half way half, at the end
        // almost nothing.
        assert_eq!(sliding_share(10, 5_000, 1_000), 10);
        assert_eq!(sliding_share(10, 5_500, 1_000), 5);
        assert_eq!(sliding_share(10, 5_999, 1_000), 0);
        assert_eq!(sliding_share(u64::MAX, 0, 1), u64::MAX);
    }

    #[tokio::test]
    async fn limits_refuse_at_their_hooks_and_exempt_allowed_and_trusted_clients() {
        let chain = chain(
            "{ allowClients: [198.51.100.0/24], limits: [\
             { name: conn, key: clientNetwork, count: connections, rate: 2/1d }, \
             { name: msgs, key: sender, count: messages, rate: 1/1d }, \
             { name: rcpts, key: clientIp, count: recipients, rate: 2/1d }] }",
        );
        let to = ForwardPath::Postmaster;
        let params = RcptParams::default();
        // Two connections from one /24, then 421 and close for a third from another address.
        assert_eq!(
            chain.connect(&session("192.0.2.1")).await,
            Verdict::Continue
        );
        assert_eq!(
            chain.connect(&session("192.0.2.2")).await,
            Verdict::Continue
        );
        match chain.connect(&session("192.0.2.3")).await {
            Verdict::Disconnect(r) => {
                assert_eq!(r.code, 421);
                assert_eq!(
                    r.to_string().trim_end(),
                    "421 4.7.0 conn: rate limit exceeded, try again later"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            chain.connect(&session("192.0.3.1")).await,
            Verdict::Continue
        );
        // One message per sender; the null sender is not limited by sender.
        let s = session("192.0.3.1");
        assert_eq!(chain.mail(&s, &tx("a@b.test")).await, Verdict::Continue);
        assert!(
            matches!(chain.mail(&s, &tx("A@B.test")).await, Verdict::TempFail(r) if r.code == 451)
        );
        assert_eq!(chain.mail(&s, &tx("")).await, Verdict::Continue);
        assert_eq!(chain.mail(&s, &tx("")).await, Verdict::Continue);
        // Two recipients per client address.
        let t = tx("");
        assert_eq!(chain.rcpt(&s, &t, &to, &params).await, Verdict::Continue);
        assert_eq!(chain.rcpt(&s, &t, &to, &params).await, Verdict::Continue);
        match chain.rcpt(&s, &t, &to, &params).await {
            Verdict::TempFail(r) => assert_eq!(
                r.to_string().trim_end(),
                "451 4.7.1 rcpts: rate limit exceeded, try again later"
            ),
            other => panic!("{other:?}"),
        }
        // Allowed clients and trusted ones are never limited.
        let allowed = session("198.51.100.9");
        let trusted = session("203.0.113.9");
        trusted.notes.insert(Trusted { by: "test".into() });
        for s in [&allowed, &trusted] {
            for _ in 0..5 {
                assert_eq!(chain.connect(s).await, Verdict::Continue);
                assert_eq!(chain.mail(s, &tx("a@b.test")).await, Verdict::Continue);
                assert_eq!(chain.rcpt(s, &t, &to, &params).await, Verdict::Continue);
            }
        }
    }
}
