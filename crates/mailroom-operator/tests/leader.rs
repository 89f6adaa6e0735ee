//! Leader election (`mailroom_operator::leader`) against a real etcd + kube-apiserver started
//! by `mailroom_testkit::KubeControlPlane`: candidates are tasks in this process, each with its
//! own identity, all on one Lease in `default`. Short timings (3 s lease, 2 s renew deadline,
//! 0.5 s retry) keep each case within seconds.
//!
//! Cases: exactly one of two candidates leads and keeps leading; a stopped leader releases the
//! Lease and the standby takes over at its next retry; an aborted leader (no release) is
//! replaced only after the Lease expired; a leader whose Lease is overwritten steps down at once;
//! a leader whose renewals fail (an admission policy denies them) steps down after the renew
//! deadline.

use std::error::Error;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, NamedRuleWithOperations, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec,
    ValidatingAdmissionPolicySpec, Validation,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use mailroom_operator::leader::{LeaderElection, LeaderElectionError};
use mailroom_testkit::KubeControlPlane;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn Error>>;

const NAMESPACE: &str = "default";
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY_PERIOD: Duration = Duration::from_millis(500);
/// Sampling interval of the leadership checks.
const TICK: Duration = Duration::from_millis(20);

/// One candidate running [`LeaderElection::run`] in its own task.
struct Candidate {
    id: &'static str,
    leading: watch::Receiver<bool>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), LeaderElectionError>>,
}

impl Candidate {
    fn spawn(client: &Client, lease: &str, id: &'static str) -> Self {
        let (tx, leading) = watch::channel(false);
        let stop = CancellationToken::new();
        let election = LeaderElection::new(client.clone(), NAMESPACE, lease, id).with_timings(
            LEASE_DURATION,
            RENEW_DEADLINE,
            RETRY_PERIOD,
        );
        let task = tokio::spawn(election.run(tx, stop.clone()));
        Self {
            id,
            leading,
            stop,
            task,
        }
    }

    fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Cancels the stop token and waits for `run` to return (it releases the Lease if held).
    async fn stop(self) -> TestResult {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await???;
        Ok(())
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mailroom_operator=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

async fn control_plane() -> Result<(KubeControlPlane, Client), Box<dyn Error>> {
    init_tracing();
    let cp = KubeControlPlane::start()?;
    let client = cp.client().await?;
    Ok((cp, client))
}

/// The leaders among `candidates`; fails if there is more than one.
fn leaders<'a>(candidates: &[&'a Candidate]) -> Result<Option<&'a Candidate>, String> {
    let mut leading = candidates.iter().copied().filter(|c| c.is_leading());
    let first = leading.next();
    if let Some(second) = leading.next() {
        let first = first.map_or("?", |c| c.id);
        return Err(format!("two leaders at once: {first} and {}", second.id));
    }
    Ok(first)
}

/// Waits until exactly one of `candidates` leads; never more than one on the way.
async fn wait_for_leader<'a>(
    candidates: &[&'a Candidate],
    within: Duration,
) -> Result<&'a Candidate, Box<dyn Error>> {
    let until = Instant::now() + within;
    loop {
        if let Some(leader) = leaders(candidates)? {
            return Ok(leader);
        }
        if Instant::now() >= until {
            return Err(format!("no leader within {within:?}").into());
        }
        sleep(TICK).await;
    }
}

/// Checks for `period` that the leader stays `want` (`None`: nobody leads).
async fn assert_leader_stays(
    candidates: &[&Candidate],
    want: Option<&str>,
    period: Duration,
) -> TestResult {
    let until = Instant::now() + period;
    while Instant::now() < until {
        let got = leaders(candidates)?.map(|c| c.id);
        if got != want {
            return Err(format!("leader changed to {got:?}, expected {want:?} throughout").into());
        }
        sleep(TICK).await;
    }
    Ok(())
}

async fn lease_spec(client: &Client, name: &str) -> Result<LeaseSpec, Box<dyn Error>> {
    let lease = Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get(name)
        .await?;
    lease
        .spec
        .ok_or_else(|| format!("lease {name} has no spec").into())
}

/// Writes `holder` into the Lease `name`, retrying when a candidate's write gets in between.
async fn set_holder(client: &Client, name: &str, holder: Option<&str>, seconds: i32) -> TestResult {
    let leases = Api::<Lease>::namespaced(client.clone(), NAMESPACE);
    for _ in 0..20 {
        let mut lease = leases.get(name).await?;
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = holder.map(str::to_owned);
        spec.lease_duration_seconds = Some(seconds);
        match leases.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.is_conflict() => continue,
            Err(err) => return Err(err.into()),
        }
    }
    Err(format!("lease {name}: conflicts on every try").into())
}

/// Splits `[a, b]` into (leader, standby).
fn split(a: Candidate, b: Candidate, leader: &str) -> (Candidate, Candidate) {
    if a.id == leader { (a, b) } else { (b, a) }
}

#[tokio::test]
async fn exactly_one_of_two_leads() -> TestResult {
    let (_cp, client) = control_plane().await?;
    let a = Candidate::spawn(&client, "one", "a");
    let b = Candidate::spawn(&client, "one", "b");
    let leader = wait_for_leader(&[&a, &b], Duration::from_secs(10))
        .await?
        .id;
    // Several renewals later: still the same single leader, and the Lease says so.
    assert_leader_stays(&[&a, &b], Some(leader), 3 * LEASE_DURATION).await?;
    let spec = lease_spec(&client, "one").await?;
    assert_eq!(spec.holder_identity.as_deref(), Some(leader));
    assert_eq!(spec.lease_duration_seconds, Some(3));
    assert_eq!(spec.lease_transitions, Some(0));
    assert!(spec.acquire_time.is_some() && spec.renew_time > spec.acquire_time);
    a.stop().await?;
    b.stop().await
}

#[tokio::test]
async fn stopped_leader_releases_to_standby() -> TestResult {
    let (_cp, client) = control_plane().await?;
    let a = Candidate::spawn(&client, "two", "a");
    let b = Candidate::spawn(&client, "two", "b");
    let id = wait_for_leader(&[&a, &b], Duration::from_secs(10))
        .await?
        .id;
    let (leader, standby) = split(a, b, id);
    let mut was_leading = leader.leading.clone();
    let stopped = Instant::now();
    leader.stop().await?;
    assert!(
        !*was_leading.borrow_and_update(),
        "a stopped leader reports false"
    );
    wait_for_leader(&[&standby], LEASE_DURATION * 3).await?;
    let took = stopped.elapsed();
    // Well before the Lease could have expired: the release, not expiry, handed it over.
    assert!(
        took < LEASE_DURATION,
        "takeover after release took {took:?}"
    );
    let spec = lease_spec(&client, "two").await?;
    assert_eq!(spec.holder_identity.as_deref(), Some(standby.id));
    assert_eq!(spec.lease_transitions, Some(1));
    standby.stop().await
}

#[tokio::test]
async fn aborted_leader_is_replaced_after_expiry() -> TestResult {
    let (_cp, client) = control_plane().await?;
    let a = Candidate::spawn(&client, "three", "a");
    let b = Candidate::spawn(&client, "three", "b");
    let id = wait_for_leader(&[&a, &b], Duration::from_secs(10))
        .await?
        .id;
    let (leader, standby) = split(a, b, id);
    // A crash: no release, and the dead task's channel keeps its last value.
    leader.task.abort();
    let aborted = Instant::now();
    wait_for_leader(&[&standby], LEASE_DURATION * 4).await?;
    let took = aborted.elapsed();
    // The last renewal started about one retry period (plus request latency) before the
    // abort; the standby waits for renewTime + leaseDuration, then polls every retry period.
    // A release would have handed over within one retry period.
    assert!(
        took >= LEASE_DURATION - 2 * RETRY_PERIOD,
        "took over after {took:?}, before the lease expired"
    );
    assert!(
        took <= LEASE_DURATION + 4 * RETRY_PERIOD,
        "takeover took {took:?}"
    );
    let spec = lease_spec(&client, "three").await?;
    assert_eq!(spec.holder_identity.as_deref(), Some(standby.id));
    assert_eq!(spec.lease_transitions, Some(1));
    standby.stop().await
}

#[tokio::test]
async fn overwritten_lease_demotes_leader_at_once() -> TestResult {
    let (_cp, client) = control_plane().await?;
    let a = Candidate::spawn(&client, "four", "a");
    let b = Candidate::spawn(&client, "four", "b");
    let id = wait_for_leader(&[&a, &b], Duration::from_secs(10))
        .await?
        .id;
    // Someone else (a third replica with other timings, or an admin) writes itself in.
    set_holder(&client, "four", Some("intruder"), 3600).await?;
    let (leader, standby) = split(a, b, id);
    let mut leading = leader.leading.clone();
    // At the next renewal, not after the renew deadline: the holder check, not a failure.
    tokio::time::timeout(RETRY_PERIOD * 3, leading.wait_for(|l| !*l)).await??;
    // Nobody takes a Lease that is held and not expired.
    assert_leader_stays(&[&leader, &standby], None, LEASE_DURATION).await?;
    // The intruder releases it: one of the two leads again.
    set_holder(&client, "four", None, 1).await?;
    wait_for_leader(&[&leader, &standby], LEASE_DURATION).await?;
    leader.stop().await?;
    standby.stop().await
}

#[tokio::test]
async fn failing_renewals_step_down_after_renew_deadline() -> TestResult {
    let (_cp, client) = control_plane().await?;
    let a = Candidate::spawn(&client, "five", "a");
    let b = Candidate::spawn(&client, "five", "b");
    let id = wait_for_leader(&[&a, &b], Duration::from_secs(10))
        .await?
        .id;
    let (leader, standby) = split(a, b, id);

    // Every update of Lease "five" is now denied (for everyone, system:masters included:
    // admission is not authorization), so the leader's renewals fail.
    let policies = Api::<ValidatingAdmissionPolicy>::all(client.clone());
    let bindings = Api::<ValidatingAdmissionPolicyBinding>::all(client.clone());
    policies
        .create(&PostParams::default(), &deny_lease_updates("five"))
        .await?;
    bindings
        .create(&PostParams::default(), &bind("deny-five"))
        .await?;
    let denied = Instant::now();

    let mut leading = leader.leading.clone();
    // The policy takes effect once the apiserver's policy informer has it (here at once);
    // the leader gives up RENEW_DEADLINE after its last successful renewal, which started
    // at most about one retry period before the policy was created.
    tokio::time::timeout(Duration::from_secs(20), leading.wait_for(|l| !*l)).await??;
    let took = denied.elapsed();
    assert!(
        took >= RENEW_DEADLINE - 2 * RETRY_PERIOD,
        "stepped down after {took:?}, before the deadline"
    );
    // The standby cannot take the Lease either: that is an update too.
    assert_leader_stays(&[&leader, &standby], None, LEASE_DURATION).await?;

    bindings
        .delete("deny-five", &DeleteParams::default())
        .await?;
    policies
        .delete("deny-five", &DeleteParams::default())
        .await?;
    wait_for_leader(&[&leader, &standby], Duration::from_secs(20)).await?;
    leader.stop().await?;
    standby.stop().await
}

/// A policy that denies `UPDATE` of the Lease `lease`.
fn deny_lease_updates(lease: &str) -> ValidatingAdmissionPolicy {
    ValidatingAdmissionPolicy {
        metadata: ObjectMeta {
            name: Some(format!("deny-{lease}")),
            ..ObjectMeta::default()
        },
        spec: Some(ValidatingAdmissionPolicySpec {
            failure_policy: Some("Fail".into()),
            match_constraints: Some(MatchResources {
                resource_rules: Some(vec![NamedRuleWithOperations {
                    api_groups: Some(vec!["coordination.k8s.io".into()]),
                    api_versions: Some(vec!["v1".into()]),
                    operations: Some(vec!["UPDATE".into()]),
                    resources: Some(vec!["leases".into()]),
                    resource_names: Some(vec![lease.into()]),
                    ..NamedRuleWithOperations::default()
                }]),
                ..MatchResources::default()
            }),
            validations: Some(vec![Validation {
                expression: "false".into(),
                message: Some("lease updates are denied by the test".into()),
                ..Validation::default()
            }]),
            ..ValidatingAdmissionPolicySpec::default()
        }),
        status: None,
    }
}

/// Binds the policy `policy` (same name) cluster-wide with `Deny`.
fn bind(policy: &str) -> ValidatingAdmissionPolicyBinding {
    ValidatingAdmissionPolicyBinding {
        metadata: ObjectMeta {
            name: Some(policy.into()),
            ..ObjectMeta::default()
        },
        spec: ValidatingAdmissionPolicyBindingSpec {
            policy_name: policy.into(),
            validation_actions: vec!["Deny".into()],
            ..ValidatingAdmissionPolicyBindingSpec::default()
        },
    }
}
