//! Leader election on a `coordination.k8s.io/v1` [`Lease`], so that two or more operator
//! replicas can run and only one of them reconciles. It sits in front of the controller: the
//! controller binary starts [`LeaderElection::run`] next to its reconcile loop and runs that loop
//! only while the `watch` channel it handed over says `true`.
//!
//! The protocol follows client-go's `tools/leaderelection` with a `Lease` lock:
//!
//! * a candidate creates the Lease when it is absent, or takes it over when it is free (no
//!   holder, e.g. after a release) or expired (`renewTime + leaseDurationSeconds < now`),
//!   incrementing `leaseTransitions` whenever the holder changes;
//! * the leader renews `renewTime` every `retry_period`; if no renewal succeeds for
//!   `renew_deadline` (shorter than `lease_duration`), it reports the loss *before* any standby
//!   may take the Lease over, and goes back to being a candidate;
//! * every write is a `replace` carrying the `resourceVersion` that was read (or a `create`), so
//!   of two candidates racing for the same Lease exactly one write succeeds (409 for the other);
//! * on stop, the leader first reports `false` and then releases the Lease (no holder,
//!   `leaseDurationSeconds: 1`), so a standby takes over on its next retry instead of waiting
//!   for the Lease to expire.
//!
//! The decisions (is the Lease free, ours, someone else's, expired; what the next `LeaseSpec`
//! is) are pure functions of the observed spec, our identity and the time ([`observe`],
//! [`acquire_spec`], [`renew_spec`], [`release_spec`]); the loop around them only does the API
//! calls, the timers and the logging. API errors are logged and retried, never returned.
//!
//! Expiry compares the holder's `renewTime` with this replica's wall clock, so the clocks of the
//! replicas must agree to well within `lease_duration - renew_deadline` (5 s by default), as
//! with any Lease-based election.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a Lease stays valid after its last renewal (client-go's default).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// How long the leader keeps trying to renew before it gives up leadership.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often candidates try to acquire and the leader renews.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// `leaseDurationSeconds` written on release, as client-go does: a standby that still sees the
/// old holder (a stale read) considers the Lease expired one second later.
const RELEASED_LEASE_DURATION_SECONDS: i32 = 1;

/// Errors of the leader election. Only [`LeaderElectionError::InvalidConfig`] leaves
/// [`LeaderElection::run`]; the others are logged and the API call retried.
#[derive(Debug, thiserror::Error)]
pub enum LeaderElectionError {
    /// The identities or timings cannot work (see [`LeaderElection::validate`]).
    #[error("invalid leader election config: {0}")]
    InvalidConfig(String),
    /// The Kubernetes API refused or failed a Lease call.
    #[error("lease {lease}: {verb} failed: {source}")]
    Api {
        /// The Lease's name.
        lease: String,
        /// `get`, `create` or `replace`.
        verb: &'static str,
        /// What kube reported.
        #[source]
        source: kube::Error,
    },
    /// A Lease call did not finish within its time budget.
    #[error("lease {lease}: API call timed out after {after:?}")]
    Timeout {
        /// The Lease's name.
        lease: String,
        /// The budget that ran out.
        after: Duration,
    },
}

impl LeaderElectionError {
    /// A short, fixed label for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidConfig(_) => "invalid_config",
            Self::Api { .. } => "api",
            Self::Timeout { .. } => "timeout",
        }
    }
}

/// One candidate in the election for the Lease `namespace/lease_name`.
///
/// ```no_run
/// # use mailroom_operator::leader::LeaderElectionError;
/// # async fn demo(client: kube::Client) -> Result<(), LeaderElectionError> {
/// use mailroom_operator::leader::LeaderElection;
/// let (tx, mut is_leader) = tokio::sync::watch::channel(false);
/// let stop = tokio_util::sync::CancellationToken::new();
/// let election = LeaderElection::new(client, "mailroom", "mailroom-operator", "pod-a");
/// let task = tokio::spawn(election.run(tx, stop.clone()));
/// is_leader.wait_for(|leading| *leading).await.ok(); // now reconcile until it turns false
/// stop.cancel(); // releases the Lease if held
/// # let _ = task.await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct LeaderElection {
    /// Client used for the Lease calls.
    pub client: Client,
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This candidate's `holderIdentity`, unique among the candidates (e.g. the pod name).
    pub identity: String,
    /// How long a standby waits after the last renewal before it takes the Lease over;
    /// written as whole seconds (rounded up) into `leaseDurationSeconds`.
    pub lease_duration: Duration,
    /// How long the leader retries a failing renewal before it reports the loss. Must be shorter
    /// than `lease_duration`.
    pub renew_deadline: Duration,
    /// Interval between acquire attempts and between renewals. Must be shorter than
    /// `renew_deadline`.
    pub retry_period: Duration,
}

impl fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderElection")
            .field("namespace", &self.namespace)
            .field("lease_name", &self.lease_name)
            .field("identity", &self.identity)
            .field("lease_duration", &self.lease_duration)
            .field("renew_deadline", &self.renew_deadline)
            .field("retry_period", &self.retry_period)
            .finish_non_exhaustive()
    }
}

/// How one attempt on the Lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Attempt {
    /// We wrote the Lease with us as holder: we lead until `renew_deadline` after the attempt
    /// started.
    Leading,
    /// Someone else holds the Lease.
    Standby { holder: String },
    /// Another writer changed the Lease between our read and our write (409).
    Conflict,
}

/// Why [`LeaderElection::lead`] returned.
enum LeadEnd {
    /// We are no longer leader.
    Lost,
    /// The stop token fired while we led.
    Stopped,
}

impl LeaderElection {
    /// A candidate with client-go's default timings (15 s / 10 s / 2 s).
    pub fn new(
        client: Client,
        namespace: impl Into<String>,
        lease_name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            lease_name: lease_name.into(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// Replaces the three timings.
    pub fn with_timings(
        mut self,
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Self {
        self.lease_duration = lease_duration;
        self.renew_deadline = renew_deadline;
        self.retry_period = retry_period;
        self
    }

    /// Checks names and timings: non-empty namespace, name and identity;
    /// `lease_duration > renew_deadline > retry_period > 0`; `lease_duration` of at least 1 s
    /// that fits `leaseDurationSeconds`.
    pub fn validate(&self) -> Result<(), LeaderElectionError> {
        if self.namespace.is_empty() || self.lease_name.is_empty() || self.identity.is_empty() {
            return Err(LeaderElectionError::InvalidConfig(
                "namespace, lease_name and identity must not be empty".into(),
            ));
        }
        validate_timings(self.lease_duration, self.renew_deadline, self.retry_period)
            .map_err(LeaderElectionError::InvalidConfig)
    }

    /// Runs the election until `stop` fires: sends `true` on `on_change` when this candidate
    /// becomes leader and `false` when it stops being leader (renewal failed for
    /// `renew_deadline`, or another holder is seen), then keeps competing. On stop while
    /// leading it sends `false` and then releases the Lease. Returns an error only for an
    /// invalid config; API errors are retried.
    pub async fn run(
        self,
        on_change: watch::Sender<bool>,
        stop: CancellationToken,
    ) -> Result<(), LeaderElectionError> {
        self.validate()?;
        let span = tracing::info_span!(
            "leader_election",
            namespace = %self.namespace,
            lease = %self.lease_name,
            identity = %self.identity,
        );
        self.elect(&on_change, &stop).instrument(span).await;
        Ok(())
    }

    /// The body of [`Self::run`]: candidate, leader, candidate again, ... until `stop`.
    async fn elect(&self, on_change: &watch::Sender<bool>, stop: &CancellationToken) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        tracing::info!("starting as candidate");
        while let Some(since) = self.follow(&api, stop).await {
            if stop.is_cancelled() {
                // Won the Lease just as we were told to stop: hand it back unannounced.
                self.release(&api).await;
                break;
            }
            tracing::info!("became leader");
            set_leading(on_change, true);
            let end = self.lead(&api, since, stop).await;
            // Report the loss before anything else, in particular before releasing: the
            // controller must stop before a standby can start.
            set_leading(on_change, false);
            match end {
                LeadEnd::Lost => tracing::warn!("lost leadership"),
                LeadEnd::Stopped => {
                    self.release(&api).await;
                    break;
                }
            }
        }
        tracing::info!("stopped");
    }

    /// Candidate loop: one attempt per `retry_period` until one wins (returns when that
    /// attempt started) or `stop` fires (returns `None`).
    async fn follow(&self, api: &Api<Lease>, stop: &CancellationToken) -> Option<Instant> {
        let mut last_holder: Option<String> = None;
        loop {
            if stop.is_cancelled() {
                return None;
            }
            let started = Instant::now();
            match self
                .bounded(self.renew_deadline, self.attempt(api, false))
                .await
            {
                Ok(Attempt::Leading) => return Some(started),
                Ok(Attempt::Standby { holder }) => {
                    if last_holder.as_deref() != Some(holder.as_str()) {
                        tracing::info!(leader = %holder, "observed leader");
                        last_holder = Some(holder);
                    }
                }
                Ok(Attempt::Conflict) => {
                    tracing::debug!("lost a race for the lease");
                }
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        category = err.category(),
                        "acquire attempt failed; retrying"
                    );
                }
            }
            tokio::select! {
                () = stop.cancelled() => return None,
                () = sleep(self.retry_period) => {}
            }
        }
    }

    /// Leader loop: renew every `retry_period`; give up once no renewal has succeeded for
    /// `renew_deadline` since `since` (the start of the last successful write).
    async fn lead(&self, api: &Api<Lease>, since: Instant, stop: &CancellationToken) -> LeadEnd {
        let mut renewed = since;
        loop {
            let deadline = renewed + self.renew_deadline;
            let wake = (Instant::now() + self.retry_period).min(deadline);
            tokio::select! {
                () = stop.cancelled() => return LeadEnd::Stopped,
                () = sleep_until(wake) => {}
            }
            let started = Instant::now();
            if started >= deadline {
                tracing::warn!(
                    renew_deadline = ?self.renew_deadline,
                    "no successful renewal within the renew deadline"
                );
                return LeadEnd::Lost;
            }
            match self
                .bounded(deadline - started, self.attempt(api, true))
                .await
            {
                Ok(Attempt::Leading) => renewed = started,
                Ok(Attempt::Standby { holder }) => {
                    tracing::warn!(leader = %holder, "lease is held by another candidate");
                    return LeadEnd::Lost;
                }
                Ok(Attempt::Conflict) => {
                    tracing::warn!("renewal conflicted; retrying");
                }
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        category = err.category(),
                        "renewal failed; retrying"
                    );
                }
            }
        }
    }

    /// One read-decide-write round on the Lease. `leading` says whether we believe we lead:
    /// a leader that finds another holder, even an expired one, has lost and reports
    /// [`Attempt::Standby`] instead of taking the Lease back.
    async fn attempt(
        &self,
        api: &Api<Lease>,
        leading: bool,
    ) -> Result<Attempt, LeaderElectionError> {
        let now = wall_clock_now();
        let seconds = lease_seconds(self.lease_duration).unwrap_or(i32::MAX);
        let Some(mut lease) = api
            .get_opt(&self.lease_name)
            .await
            .map_err(|e| self.api_err("get", e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(acquire_spec(None, &self.identity, seconds, now)),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(err) if is_race(&err) => Ok(Attempt::Conflict),
                Err(err) => Err(self.api_err("create", err)),
            };
        };
        let spec = match observe(lease.spec.as_ref(), &self.identity, now) {
            LeaseView::HeldByUs => renew_spec(lease.spec.as_ref(), &self.identity, seconds, now),
            LeaseView::HeldByOther { holder, .. } => return Ok(Attempt::Standby { holder }),
            LeaseView::Expired { holder } if leading => return Ok(Attempt::Standby { holder }),
            LeaseView::Expired { .. } | LeaseView::Free => {
                acquire_spec(lease.spec.as_ref(), &self.identity, seconds, now)
            }
        };
        // `lease.metadata.resource_version` is the one we read: the replace fails with 409 if
        // anyone wrote in between.
        lease.spec = Some(spec);
        match api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(err) if is_race(&err) => Ok(Attempt::Conflict),
            Err(err) => Err(self.api_err("replace", err)),
        }
    }

    /// Gives the Lease up if we still hold it; best effort, one try within `renew_deadline`.
    async fn release(&self, api: &Api<Lease>) {
        let result = self
            .bounded(self.renew_deadline, async {
                let Some(mut lease) = api
                    .get_opt(&self.lease_name)
                    .await
                    .map_err(|e| self.api_err("get", e))?
                else {
                    return Ok(false);
                };
                if observe(lease.spec.as_ref(), &self.identity, wall_clock_now())
                    != LeaseView::HeldByUs
                {
                    return Ok(false);
                }
                lease.spec = Some(release_spec(lease.spec.as_ref(), wall_clock_now()));
                api.replace(&self.lease_name, &PostParams::default(), &lease)
                    .await
                    .map_err(|e| self.api_err("replace", e))?;
                Ok(true)
            })
            .await;
        match result {
            Ok(true) => {
                tracing::info!("released the lease")
            }
            Ok(false) => {
                tracing::info!("lease no longer ours; nothing to release")
            }
            Err(err) => {
                tracing::warn!(error = %err, "release failed; the lease expires on its own")
            }
        }
    }

    /// Runs `fut` with a time budget; running out is a [`LeaderElectionError::Timeout`].
    async fn bounded<T>(
        &self,
        budget: Duration,
        fut: impl Future<Output = Result<T, LeaderElectionError>>,
    ) -> Result<T, LeaderElectionError> {
        timeout(budget, fut).await.unwrap_or_else(|_| {
            Err(LeaderElectionError::Timeout {
                lease: self.lease_name.clone(),
                after: budget,
            })
        })
    }

    fn api_err(&self, verb: &'static str, source: kube::Error) -> LeaderElectionError {
        LeaderElectionError::Api {
            lease: self.lease_name.clone(),
            verb,
            source,
        }
    }
}

/// The Lease as one candidate sees it at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseView {
    /// No holder (never held, or released): anyone may take it.
    Free,
    /// The candidate asking holds it (expired or not: only it writes a renewal).
    HeldByUs,
    /// Another candidate holds it until `expires`.
    HeldByOther {
        /// Its `holderIdentity`.
        holder: String,
        /// `renewTime + leaseDurationSeconds`.
        expires: Timestamp,
    },
    /// Another candidate held it, but `renewTime + leaseDurationSeconds` is in the past (or
    /// either field is missing): it may be taken over.
    Expired {
        /// The former `holderIdentity`.
        holder: String,
    },
}

impl LeaseView {
    /// Whether a candidate seeing this may write itself in as holder.
    pub fn may_acquire(&self) -> bool {
        !matches!(self, Self::HeldByOther { .. })
    }
}

/// Classifies `spec` for the candidate `identity` at wall-clock time `now`.
pub fn observe(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> LeaseView {
    let holder = spec
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty());
    let Some(holder) = holder else {
        return LeaseView::Free;
    };
    if holder == identity {
        return LeaseView::HeldByUs;
    }
    match spec.and_then(expiry) {
        Some(expires) if expires >= now => LeaseView::HeldByOther {
            holder: holder.to_owned(),
            expires,
        },
        _ => LeaseView::Expired {
            holder: holder.to_owned(),
        },
    }
}

/// `renewTime + leaseDurationSeconds`, if both are set and the duration is positive.
pub fn expiry(spec: &LeaseSpec) -> Option<Timestamp> {
    let renewed = spec.renew_time.as_ref()?.0;
    let seconds = spec.lease_duration_seconds.filter(|s| *s > 0)?;
    renewed
        .checked_add(SignedDuration::from_secs(i64::from(seconds)))
        .ok()
}

/// The spec that makes `identity` the new holder of a Lease whose current spec is `old`:
/// `acquireTime` and `renewTime` are `now`, `leaseTransitions` counts one more change of holder
/// (0 for a new Lease; unchanged if `identity` already held it).
pub fn acquire_spec(
    old: Option<&LeaseSpec>,
    identity: &str,
    lease_seconds: i32,
    now: Timestamp,
) -> LeaseSpec {
    let old_transitions = old.and_then(|s| s.lease_transitions);
    let same_holder = old.and_then(|s| s.holder_identity.as_deref()) == Some(identity);
    let transitions = match old_transitions {
        None if old.is_none() || same_holder => 0,
        None => 1,
        Some(n) if same_holder => n,
        Some(n) => n.saturating_add(1),
    };
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(lease_seconds),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..old.cloned().unwrap_or_default()
    }
}

/// The spec of a renewal by the current holder `identity`: `renewTime` is `now`, the rest kept.
pub fn renew_spec(
    old: Option<&LeaseSpec>,
    identity: &str,
    lease_seconds: i32,
    now: Timestamp,
) -> LeaseSpec {
    let old = old.cloned().unwrap_or_default();
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(lease_seconds),
        acquire_time: old.acquire_time.clone().or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(old.lease_transitions.unwrap_or(0)),
        ..old
    }
}

/// The spec written on release: no holder and `leaseDurationSeconds: 1`, so the next
/// candidate takes over at once; `leaseTransitions` is kept (the next holder increments it).
pub fn release_spec(old: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let old = old.cloned().unwrap_or_default();
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(RELEASED_LEASE_DURATION_SECONDS),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        ..old
    }
}

/// Checks `lease_duration > renew_deadline > retry_period > 0` and that `lease_duration` is at
/// least 1 s and fits `leaseDurationSeconds`; the error says which rule failed.
pub fn validate_timings(
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
) -> Result<(), String> {
    if retry_period.is_zero() {
        return Err("retry_period must be positive".into());
    }
    if renew_deadline <= retry_period {
        return Err(format!(
            "renew_deadline ({renew_deadline:?}) must be longer than retry_period ({retry_period:?})"
        ));
    }
    if lease_duration <= renew_deadline {
        return Err(format!(
            "lease_duration ({lease_duration:?}) must be longer than renew_deadline ({renew_deadline:?})"
        ));
    }
    if lease_duration < Duration::from_secs(1) || lease_seconds(lease_duration).is_none() {
        return Err(format!(
            "lease_duration ({lease_duration:?}) must be between 1 s and i32::MAX s"
        ));
    }
    Ok(())
}

/// `duration` as whole seconds, rounded up, if it fits `leaseDurationSeconds`.
fn lease_seconds(duration: Duration) -> Option<i32> {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    i32::try_from(secs).ok()
}

/// Wall-clock now as a `jiff` timestamp (k8s-openapi builds jiff without `std`, so no
/// `Timestamp::now`).
fn wall_clock_now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A 409: `AlreadyExists` on create or `Conflict` on replace, i.e. another writer won.
fn is_race(err: &kube::Error) -> bool {
    match err {
        kube::Error::Api(status) => {
            status.is_conflict() || status.is_already_exists() || status.code == 409
        }
        _ => false,
    }
}

/// Publishes a leadership change; a no-op if the value is unchanged, harmless if nobody listens.
fn set_leading(tx: &watch::Sender<bool>, leading: bool) {
    tx.send_if_modified(|current| std::mem::replace(current, leading) != leading);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    fn held(holder: &str, renewed_at: i64, seconds: i32, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(ts(0))),
            renew_time: Some(MicroTime(ts(renewed_at))),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn observe_table() {
        let other = held("b", 100, 15, 3);
        let cases: Vec<(&str, Option<LeaseSpec>, i64, LeaseView)> = vec![
            ("no spec", None, 0, LeaseView::Free),
            (
                "default spec",
                Some(LeaseSpec::default()),
                0,
                LeaseView::Free,
            ),
            (
                "empty holder",
                Some(LeaseSpec {
                    holder_identity: Some(String::new()),
                    ..other.clone()
                }),
                101,
                LeaseView::Free,
            ),
            (
                "ours, fresh",
                Some(held("a", 100, 15, 0)),
                101,
                LeaseView::HeldByUs,
            ),
            (
                "ours, expired",
                Some(held("a", 100, 15, 0)),
                999,
                LeaseView::HeldByUs,
            ),
            (
                "other, fresh",
                Some(other.clone()),
                101,
                LeaseView::HeldByOther {
                    holder: "b".into(),
                    expires: ts(115),
                },
            ),
            (
                "other, exactly at expiry",
                Some(other.clone()),
                115,
                LeaseView::HeldByOther {
                    holder: "b".into(),
                    expires: ts(115),
                },
            ),
            (
                "other, expired",
                Some(other.clone()),
                116,
                LeaseView::Expired { holder: "b".into() },
            ),
            (
                "other, no renewTime",
                Some(LeaseSpec {
                    renew_time: None,
                    ..other.clone()
                }),
                101,
                LeaseView::Expired { holder: "b".into() },
            ),
            (
                "other, no duration",
                Some(LeaseSpec {
                    lease_duration_seconds: None,
                    ..other.clone()
                }),
                101,
                LeaseView::Expired { holder: "b".into() },
            ),
            (
                "other, renewTime in our future (skew)",
                Some(other.clone()),
                50,
                LeaseView::HeldByOther {
                    holder: "b".into(),
                    expires: ts(115),
                },
            ),
        ];
        for (name, spec, now, want) in cases {
            let got = observe(spec.as_ref(), "a", ts(now));
            assert_eq!(got, want, "{name}");
            assert_eq!(
                got.may_acquire(),
                !matches!(want, LeaseView::HeldByOther { .. }),
                "{name}"
            );
        }
    }

    #[test]
    fn released_lease_is_free_for_everyone() {
        let released = release_spec(Some(&held("a", 100, 15, 4)), ts(101));
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_duration_seconds, Some(1));
        assert_eq!(released.lease_transitions, Some(4));
        assert_eq!(observe(Some(&released), "b", ts(101)), LeaseView::Free);
        assert_eq!(observe(Some(&released), "a", ts(101)), LeaseView::Free);
    }

    #[test]
    fn acquire_counts_transitions() {
        // A new Lease starts at 0.
        let new = acquire_spec(None, "a", 15, ts(0));
        assert_eq!(new.holder_identity.as_deref(), Some("a"));
        assert_eq!(new.lease_transitions, Some(0));
        assert_eq!(new.lease_duration_seconds, Some(15));
        assert_eq!(new.acquire_time, Some(MicroTime(ts(0))));
        assert_eq!(new.renew_time, Some(MicroTime(ts(0))));
        // Taking over from another holder counts one.
        let taken = acquire_spec(Some(&held("b", 0, 15, 3)), "a", 15, ts(20));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(ts(20))));
        // After a release (no holder) the next holder counts one too.
        let released = release_spec(Some(&held("b", 0, 15, 3)), ts(5));
        assert_eq!(
            acquire_spec(Some(&released), "a", 15, ts(6)).lease_transitions,
            Some(4)
        );
        // Re-acquiring our own expired Lease is no transition.
        let again = acquire_spec(Some(&held("a", 0, 15, 3)), "a", 15, ts(20));
        assert_eq!(again.lease_transitions, Some(3));
        // An existing Lease without the field (made by someone else) counts from 0.
        let bare = LeaseSpec {
            lease_transitions: None,
            ..held("b", 0, 15, 0)
        };
        assert_eq!(
            acquire_spec(Some(&bare), "a", 15, ts(20)).lease_transitions,
            Some(1)
        );
        // Other fields survive.
        let with_strategy = LeaseSpec {
            strategy: Some("OldestEmulationVersion".into()),
            ..held("b", 0, 15, 0)
        };
        assert_eq!(
            acquire_spec(Some(&with_strategy), "a", 15, ts(20)).strategy,
            with_strategy.strategy
        );
    }

    #[test]
    fn renew_keeps_acquire_time_and_transitions() {
        let renewed = renew_spec(Some(&held("a", 10, 15, 2)), "a", 15, ts(12));
        assert_eq!(renewed.acquire_time, Some(MicroTime(ts(0))));
        assert_eq!(renewed.renew_time, Some(MicroTime(ts(12))));
        assert_eq!(renewed.lease_transitions, Some(2));
        assert_eq!(
            observe(Some(&renewed), "b", ts(27)),
            LeaseView::HeldByOther {
                holder: "a".into(),
                expires: ts(27)
            }
        );
        assert_eq!(
            observe(Some(&renewed), "b", ts(28)),
            LeaseView::Expired { holder: "a".into() }
        );
    }

    #[test]
    fn timings() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert!(
            validate_timings(
                DEFAULT_LEASE_DURATION,
                DEFAULT_RENEW_DEADLINE,
                DEFAULT_RETRY_PERIOD
            )
            .is_ok()
        );
        assert!(validate_timings(s(3), s(2), ms(500)).is_ok());
        assert!(
            validate_timings(s(3), s(3), ms(500)).is_err(),
            "deadline must be below duration"
        );
        assert!(
            validate_timings(s(3), s(2), s(2)).is_err(),
            "retry must be below deadline"
        );
        assert!(validate_timings(s(3), s(2), Duration::ZERO).is_err());
        assert!(
            validate_timings(ms(900), ms(500), ms(100)).is_err(),
            "under a second"
        );
        assert!(validate_timings(s(u64::from(u32::MAX)), s(10), s(2)).is_err());
    }

    #[test]
    fn lease_seconds_round_up() {
        assert_eq!(lease_seconds(Duration::from_secs(15)), Some(15));
        assert_eq!(lease_seconds(Duration::from_millis(2500)), Some(3));
        assert_eq!(
            lease_seconds(Duration::from_secs(u64::from(u32::MAX))),
            None
        );
    }

    #[test]
    fn wall_clock_is_recent() {
        assert!(wall_clock_now() > ts(0));
    }

    #[test]
    fn set_leading_notifies_only_on_change() {
        let (tx, mut rx) = watch::channel(false);
        set_leading(&tx, false);
        assert!(!rx.has_changed().unwrap());
        set_leading(&tx, true);
        assert!(rx.has_changed().unwrap());
        assert!(*rx.borrow_and_update());
        set_leading(&tx, true);
        assert!(!rx.has_changed().unwrap());
    }
}
