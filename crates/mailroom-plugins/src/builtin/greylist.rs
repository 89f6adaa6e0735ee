//! `greylist`: defers mail from unknown (client network, sender, recipient) triplets, as
//! Haraka's `greylist` and postgrey do. Real mail servers retry; much spamware does not.
//!
//! At RCPT TO, the triplet (the client's /24 or /64, the sender lowercased or `<>`, the
//! recipient lowercased) is looked up in a [`SharedStore`] (JetStream KV for the whole
//! cluster, or this process):
//!
//! | the triplet                                    | outcome  | reply                          |
//! |------------------------------------------------|----------|--------------------------------|
//! | unknown, or its retry window is over           | `new`    | `451 4.7.1 Greylisted, try again in <delay> seconds` |
//! | first seen less than `delay` ago               | `early`  | `451 4.7.1 Greylisted, try again in <rest> seconds`  |
//! | first seen `delay` to `retryWindow` ago        | `passed` | accepted; passes from now on   |
//! | passed, last used within `passedPeriod`        | `passed` | accepted (the use is recorded) |
//!
//! A client network with `autoAllowAfter` distinct triplets passed is not greylisted for
//! `passedPeriod` after its last pass (`allowed`), like postgrey's auto-whitelist. Every
//! change is a compare-and-swap, so across pods a triplet passes once and each network counts
//! each triplet once. Authenticated and trusted clients, `allowClients`, `<postmaster>` and
//! `allowRecipients` are never greylisted (`skipped`).

use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use mailroom_config::{FailMode, GreylistPluginSpec};
use mailroom_smtp::{ForwardPath, RcptParams, ReversePath};
use mailroom_telemetry::register;
use prometheus::{IntCounterVec, Opts};
use serde::{Deserialize, Serialize};

use crate::shared::{Change, SharedError, SharedStore, client_network, key_token, now_ms};
use crate::{
    AddressPattern, Env, MessageEdits, Plugin, PluginError, SessionInfo, Transaction, Trusted,
    Verdict,
};

/// Greylist decisions by outcome: `new`, `early`, `passed`, `allowed` (auto-allowed network),
/// `skipped` (authenticated, trusted, allowed client or recipient) or `error`.
static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "mailroom_plugin_greylist_total",
                "Recipients the greylist plugin judged, by listener and outcome (new, early, \
                 passed, allowed, skipped or error).",
            ),
            &["listener", "outcome"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}")),
    )
});

/// The header added to messages that were delayed.
const HEADER: &str = "X-Mailroom-Greylist";
/// Description of the KV bucket `<stream>_GREYLIST`.
const BUCKET_DESCRIPTION: &str = "Mailroom inbound greylist (triplets and client networks)";
/// A passed triplet's last use is written at most this often (and at most every quarter of
/// `passedPeriod`), so that busy triplets do not cost a write per recipient.
const REFRESH_AFTER: Duration = Duration::from_secs(3600);

/// Transaction note: the longest greylisting delay among the recipients that passed on this
/// retry, in seconds (for the `X-Mailroom-Greylist` header).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GreylistDelayed {
    /// Seconds between the triplet's first attempt and this one.
    pub secs: u64,
}

/// A triplet as stored (JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Triplet {
    /// First attempt, Unix ms.
    first: u64,
    /// Once passed: its last recorded use, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    passed: Option<u64>,
}

/// A client network's passes (JSON).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Network {
    /// Distinct triplets that passed.
    passed: u64,
    /// Last pass (or last use once allowed), Unix ms.
    last: u64,
}

/// The plugin's durations, in ms.
#[derive(Debug, Clone, Copy)]
struct Timing {
    delay: u64,
    retry_window: u64,
    passed_period: u64,
    refresh: u64,
}

/// What the lookup of a triplet found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Unknown (or stale): recorded now, deferred for the delay.
    New,
    /// Retried too soon: deferred for `wait` ms more.
    Early { wait: u64 },
    /// Passed now, `delayed` ms after its first attempt.
    Retried { delayed: u64 },
    /// Passed before and still valid.
    Known,
    /// The client network is auto-allowed (the triplet was not looked at).
    Allowed,
}

/// Decides on a triplet `found` at `now`: the outcome, and the record to store, if it changes.
fn decide(found: Option<Triplet>, now: u64, t: Timing) -> (Outcome, Option<Triplet>) {
    let new = (
        Outcome::New,
        Some(Triplet {
            first: now,
            passed: None,
        }),
    );
    let Some(found) = found else {
        return new;
    };
    match found.passed {
        Some(last) if now.saturating_sub(last) <= t.passed_period => {
            let refresh = now.saturating_sub(last) > t.refresh;
            let write = refresh.then_some(Triplet {
                passed: Some(now),
                ..found
            });
            (Outcome::Known, write)
        }
        Some(_) => new,
        None => {
            let age = now.saturating_sub(found.first);
            if age < t.delay {
                (
                    Outcome::Early {
                        wait: t.delay - age,
                    },
                    None,
                )
            } else if age <= t.retry_window {
                let passed = Triplet {
                    passed: Some(now),
                    ..found
                };
                (Outcome::Retried { delayed: age }, Some(passed))
            } else {
                new
            }
        }
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn parse<'a, T: Deserialize<'a>>(value: Option<&'a [u8]>) -> Option<T> {
    value.and_then(|v| serde_json::from_slice(v).ok())
}

/// Whole seconds, rounded up, at least 1 (for "try again in N seconds").
fn seconds_up(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

/// The `greylist` plugin, built from [`GreylistPluginSpec`].
#[derive(Debug)]
pub struct GreylistPlugin {
    /// Key prefix: the listener's name.
    prefix: String,
    timing: Timing,
    auto_allow_after: u64,
    allow_clients: Vec<IpNet>,
    allow_recipients: Vec<AddressPattern>,
    add_header: bool,
    on_error: FailMode,
    store: SharedStore,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl GreylistPlugin {
    /// Builds the plugin; `path` is the field path of its spec, used in errors.
    pub fn new(spec: &GreylistPluginSpec, path: &str, env: &Env) -> Result<Self, PluginError> {
        let allow_recipients = spec
            .allow_recipients
            .iter()
            .enumerate()
            .map(|(i, p)| {
                AddressPattern::parse(p).map_err(|source| PluginError::Pattern {
                    path: format!("{path}.allowRecipients[{i}]"),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let passed_period = spec.passed_period.as_duration();
        let timing = Timing {
            delay: millis(spec.delay.as_duration()),
            retry_window: millis(spec.retry_window.as_duration()),
            passed_period: millis(passed_period),
            refresh: millis(REFRESH_AFTER.min(passed_period / 4)),
        };
        // Every record is written again at least every `passedPeriod` while it matters.
        let max_age = passed_period
            .max(spec.retry_window.as_duration())
            .saturating_add(Duration::from_secs(60));
        Ok(GreylistPlugin {
            prefix: key_token(&env.ctx.listener),
            timing,
            auto_allow_after: u64::from(spec.auto_allow_after),
            allow_clients: spec.allow_clients.clone(),
            allow_recipients,
            add_header: spec.add_header,
            on_error: spec.on_error,
            store: SharedStore::new(
                env.ctx.shared.as_ref(),
                "GREYLIST",
                BUCKET_DESCRIPTION,
                max_age,
                spec.timeout.as_duration(),
            ),
        })
    }

    /// Why this recipient is not greylisted at all, if it is not.
    fn skip(&self, s: &SessionInfo, to: &ForwardPath) -> Option<&'static str> {
        let ip: IpAddr = s.client_ip().to_canonical();
        if s.auth_user.is_some() {
            Some("authenticated")
        } else if s.notes.contains::<Trusted>() {
            Some("trusted")
        } else if self.allow_clients.iter().any(|n| n.contains(&ip)) {
            Some("allowClients")
        } else {
            match to {
                ForwardPath::Postmaster => Some("postmaster"),
                ForwardPath::Mailbox(m) => {
                    let address = format!("{}@{}", m.local, m.domain);
                    self.allow_recipients
                        .iter()
                        .any(|p| p.matches(&address))
                        .then_some("allowRecipients")
                }
            }
        }
    }

    fn network_key(&self, net: &str) -> String {
        format!("{}.n.{}", self.prefix, key_token(net))
    }

    /// Whether the client network is auto-allowed now (refreshing its last use now and then).
    async fn network_allowed(&self, net: &str, now: u64) -> Result<bool, SharedError> {
        if self.auto_allow_after == 0 {
            return Ok(false);
        }
        let t = self.timing;
        let needed = self.auto_allow_after;
        self.store
            .update(&self.network_key(net), |value| {
                match parse::<Network>(value) {
                    Some(n)
                        if n.passed >= needed && now.saturating_sub(n.last) <= t.passed_period =>
                    {
                        if now.saturating_sub(n.last) > t.refresh {
                            Change::Put(json(&Network { last: now, ..n }), true)
                        } else {
                            Change::Keep(true)
                        }
                    }
                    _ => Change::Keep(false),
                }
            })
            .await
    }

    /// Counts one more distinct triplet passed for the client network.
    async fn network_passed(&self, net: &str, now: u64) -> Result<(), SharedError> {
        let t = self.timing;
        self.store
            .update(&self.network_key(net), |value| {
                let mut n = parse::<Network>(value)
                    .filter(|n| now.saturating_sub(n.last) <= t.passed_period)
                    .unwrap_or_default();
                n.passed += 1;
                n.last = now;
                Change::Put(json(&n), ())
            })
            .await
    }

    /// Looks the triplet up, records what changes, and says what was found.
    async fn judge(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        to: &ForwardPath,
    ) -> Result<Outcome, SharedError> {
        let now = now_ms();
        let net = client_network(s.client_ip()).to_string();
        if self.network_allowed(&net, now).await? {
            return Ok(Outcome::Allowed);
        }
        let sender = match &tx.sender {
            ReversePath::Null => "<>".to_owned(),
            ReversePath::Mailbox(m) => format!("{}@{}", m.local, m.domain).to_lowercase(),
        };
        let rcpt = match to {
            ForwardPath::Postmaster => "postmaster".to_owned(),
            ForwardPath::Mailbox(m) => format!("{}@{}", m.local, m.domain).to_lowercase(),
        };
        let key = format!(
            "{}.t.{}.{}.{}",
            self.prefix,
            key_token(&net),
            key_token(&sender),
            key_token(&rcpt)
        );
        let t = self.timing;
        let outcome = self
            .store
            .update(&key, |value| match decide(parse(value), now, t) {
                (outcome, Some(write)) => Change::Put(json(&write), outcome),
                (outcome, None) => Change::Keep(outcome),
            })
            .await?;
        if matches!(outcome, Outcome::Retried { .. })
            && self.auto_allow_after > 0
            && let Err(e) = self.network_passed(&net, now).await
        {
            tracing::debug!(listener = %s.listener, error = %e, "greylist: network pass not counted");
        }
        Ok(outcome)
    }
}

#[async_trait]
impl Plugin for GreylistPlugin {
    fn name(&self) -> &'static str {
        "greylist"
    }

    async fn rcpt(
        &self,
        s: &SessionInfo,
        tx: &Transaction,
        to: &ForwardPath,
        _params: &RcptParams,
    ) -> Verdict {
        let outcome = |o: &str| CHECKS.with_label_values(&[&s.listener, o]).inc();
        if let Some(why) = self.skip(s, to) {
            tracing::trace!(listener = %s.listener, why, "greylist skipped");
            outcome("skipped");
            return Verdict::Continue;
        }
        let greylisted = |wait_ms: u64| {
            Verdict::tempfail(
                451,
                (4, 7, 1),
                format!("Greylisted, try again in {} seconds", seconds_up(wait_ms)),
            )
        };
        match self.judge(s, tx, to).await {
            Ok(Outcome::Allowed) => {
                outcome("allowed");
                Verdict::Continue
            }
            Ok(Outcome::New) => {
                outcome("new");
                tracing::debug!(listener = %s.listener, client = %s.client_ip(), sender = %tx.sender, rcpt = %to, "greylisted");
                greylisted(self.timing.delay)
            }
            Ok(Outcome::Early { wait }) => {
                outcome("early");
                greylisted(wait)
            }
            Ok(Outcome::Retried { delayed }) => {
                outcome("passed");
                let secs = delayed / 1000;
                tx.notes
                    .update(|d: &mut GreylistDelayed| d.secs = d.secs.max(secs));
                Verdict::Continue
            }
            Ok(Outcome::Known) => {
                outcome("passed");
                Verdict::Continue
            }
            Err(e) => {
                outcome("error");
                tracing::warn!(listener = %s.listener, error = %e, on_error = ?self.on_error,
                    "greylist could not be checked");
                match self.on_error {
                    FailMode::Accept => Verdict::Continue,
                    FailMode::Tempfail => Verdict::tempfail(
                        451,
                        (4, 7, 1),
                        "Greylisting is unavailable, try again later",
                    ),
                }
            }
        }
    }

    async fn data(
        &self,
        _s: &SessionInfo,
        tx: &Transaction,
        _body: &[u8],
        edits: &mut MessageEdits,
    ) -> Verdict {
        if self.add_header {
            // Only we may say a message was greylisted here.
            edits.remove_header(HEADER);
            if let Some(d) = tx.notes.get::<GreylistDelayed>() {
                edits.add_header(HEADER, format!("delayed {}s", d.secs));
            }
        }
        Verdict::Continue
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

    #[tokio::test]
    async fn authenticated_and_trusted_clients_are_never_greylisted() {
        let config = mailroom_config::load_str(
            "listeners:\n  - name: mx\n    address: 127.0.0.1:2525\n    acceptedDomains: [example.test]\n    plugins:\n      - greylist:\n",
            "t",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let chain = build_chain(
            &config.listeners[0].plugins,
            "listeners[0].plugins",
            &BuildContext::new("mx", "mx.test"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let sender = Mailbox::parse("a@client.test").unwrap_or_else(|e| panic!("{e}"));
        let tx = Transaction::new(ReversePath::Mailbox(sender), MailParams::default());
        let to = ForwardPath::Mailbox(
            Mailbox::parse("bob@example.test").unwrap_or_else(|e| panic!("{e}")),
        );
        let params = RcptParams::default();
        let mut authenticated = session("192.0.2.1");
        authenticated.auth_user = Some("alice".into());
        let trusted = session("192.0.2.2");
        trusted.notes.insert(Trusted { by: "dnswl".into() });
        for s in [&authenticated, &trusted] {
            assert_eq!(chain.rcpt(s, &tx, &to, &params).await, Verdict::Continue);
        }
        match chain.rcpt(&session("192.0.2.3"), &tx, &to, &params).await {
            Verdict::TempFail(r) => assert_eq!(
                r.to_string(),
                "451 4.7.1 Greylisted, try again in 300 seconds\r\n"
            ),
            other => panic!("{other:?}"),
        }
        // The data hook drops a forged header and adds ours only after a delay.
        let mut edits = MessageEdits::default();
        chain.data(&trusted, &tx, b"", &mut edits).await;
        assert_eq!(edits.remove_headers, [HEADER]);
        assert!(edits.add_headers.is_empty());
        tx.notes.insert(GreylistDelayed { secs: 301 });
        let mut edits = MessageEdits::default();
        chain.data(&trusted, &tx, b"", &mut edits).await;
        assert_eq!(
            edits.add_headers,
            [(HEADER.to_owned(), "delayed 301s".to_owned())]
        );
    }

    const T: Timing = Timing {
        delay: 300_000,
        retry_window: 4 * 3_600_000,
        passed_period: 36 * 86_400_000,
        refresh: 3_600_000,
    };

    #[test]
    fn a_triplet_is_new_then_early_then_passes_within_the_retry_window() {
        let start = 1_000_000_000;
        let (o, w) = decide(None, start, T);
        assert_eq!(o, Outcome::New);
        let rec = w.unwrap_or_else(|| panic!("recorded"));
        assert_eq!(
            rec,
            Triplet {
                first: start,
                passed: None
            }
        );
        assert_eq!(
            decide(Some(rec), start + 60_000, T),
            (Outcome::Early { wait: 240_000 }, None)
        );
        let (o, w) = decide(Some(rec), start + 300_000, T);
        assert_eq!(o, Outcome::Retried { delayed: 300_000 });
        let passed = w.unwrap_or_else(|| panic!("recorded"));
        assert_eq!(passed.passed, Some(start + 300_000));
        // Known from now on; the last use is written at most once an hour.
        assert_eq!(
            decide(Some(passed), start + 400_000, T),
            (Outcome::Known, None)
        );
        let later = start + 300_000 + 2 * 3_600_000;
        assert_eq!(
            decide(Some(passed), later, T),
            (
                Outcome::Known,
                Some(Triplet {
                    first: start,
                    passed: Some(later)
                })
            )
        );
        // Too late a retry, or a pass not used for the passed period: new again.
        let (o, w) = decide(Some(rec), start + T.retry_window + 1, T);
        assert_eq!(o, Outcome::New);
        assert_eq!(w.map(|t| t.first), Some(start + T.retry_window + 1));
        let stale = start + 300_000 + T.passed_period + 1;
        assert_eq!(decide(Some(passed), stale, T).0, Outcome::New);
        // A clock behind the first attempt (another pod's) is early, not an overflow.
        assert_eq!(
            decide(Some(rec), start - 5_000, T).0,
            Outcome::Early { wait: 300_000 }
        );
    }

    #[test]
    fn waits_are_whole_seconds_rounded_up() {
        assert_eq!(seconds_up(300_000), 300);
        assert_eq!(seconds_up(1_001), 2);
        assert_eq!(seconds_up(0), 1);
    }
}
