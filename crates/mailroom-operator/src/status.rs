//! Status conditions, computed purely from what the reconciler observed. Each resource has
//! `Ready`, `Progressing` and `Degraded`, with stable reasons (`kubectl wait
//! --for=condition=Ready` and alerts can rely on them); a condition's `lastTransitionTime`
//! changes only when its status does.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types.
pub const READY: &str = "Ready";
/// The Deployment is rolling out a new config or scaling.
pub const PROGRESSING: &str = "Progressing";
/// The spec cannot be applied (invalid, missing Secret) or the API refused it.
pub const DEGRADED: &str = "Degraded";

/// Reasons, one per outcome.
pub mod reason {
    /// Every desired pod is ready and runs the current config.
    pub const ALL_READY: &str = "AllReplicasReady";
    /// Some pods are not ready yet.
    pub const NOT_READY: &str = "ReplicasNotReady";
    /// Zero replicas are wanted (a policy scaled to zero).
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    /// The Deployment is moving pods to a new config or count.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// The Deployment runs the current config everywhere.
    pub const ROLLED_OUT: &str = "RolledOut";
    /// Nothing is wrong.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// The spec does not make a valid config.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A referenced Secret does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// A referenced Secret lacks a key the spec names.
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    /// The API server refused an object or could not be reached.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// A deleted policy still has queued mail; the finalizer holds it.
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
}

/// What the reconciler saw of the Deployment it applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollout {
    /// Pods wanted.
    pub desired: i32,
    /// Pods that exist.
    pub replicas: i32,
    /// Pods that are ready.
    pub ready: i32,
    /// Pods on the current template.
    pub updated: i32,
    /// The Deployment controller has seen the current template.
    pub observed: bool,
}

impl Rollout {
    /// Reads a Deployment as returned by the API server.
    pub fn of(deployment: &Deployment) -> Self {
        let desired = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let status = deployment.status.clone().unwrap_or_default();
        Self {
            desired,
            replicas: status.replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            observed: status.observed_generation.is_some()
                && status.observed_generation == deployment.metadata.generation,
        }
    }

    fn rolled_out(&self) -> bool {
        self.observed && self.updated >= self.desired && self.replicas <= self.desired
    }
}

/// The outcome of one reconcile, as the conditions should tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was applied; the Deployment is as observed.
    Applied(Rollout),
    /// The spec could not be applied; `reason` is one of [`reason`].
    Failed {
        /// Stable reason.
        reason: &'static str,
        /// What to fix, naming the field.
        message: String,
    },
    /// The resource is being deleted but its queue still holds mail.
    DeletionBlocked {
        /// Why, and how to force it.
        message: String,
    },
}

fn condition(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        observed_generation: None,
    }
}

/// The three conditions for `outcome`, what = "inbound pods" or "workers". Keeps the
/// `lastTransitionTime` of a condition from `previous` whose status did not change.
pub fn conditions(
    previous: &[Condition],
    generation: Option<i64>,
    what: &str,
    outcome: &Outcome,
    now: Time,
) -> Vec<Condition> {
    let mut list = match outcome {
        Outcome::Applied(r) => {
            let (ready, ready_reason) = if r.desired == 0 {
                (true, reason::SCALED_TO_ZERO)
            } else if r.ready >= r.desired && r.rolled_out() {
                (true, reason::ALL_READY)
            } else {
                (false, reason::NOT_READY)
            };
            let counts = format!("{} of {} {what} ready", r.ready.min(r.desired), r.desired);
            let progressing = !r.rolled_out();
            vec![
                condition(READY, ready, ready_reason, counts.clone()),
                condition(
                    PROGRESSING,
                    progressing,
                    if progressing {
                        reason::ROLLING_OUT
                    } else {
                        reason::ROLLED_OUT
                    },
                    format!(
                        "{} of {} {what} on the current config",
                        r.updated, r.desired
                    ),
                ),
                condition(DEGRADED, false, reason::AS_EXPECTED, String::new()),
            ]
        }
        Outcome::Failed { reason, message } => vec![
            condition(READY, false, reason, message.clone()),
            condition(PROGRESSING, false, reason, String::new()),
            condition(DEGRADED, true, reason, message.clone()),
        ],
        Outcome::DeletionBlocked { message } => vec![
            condition(READY, false, reason::DELETION_BLOCKED, message.clone()),
            condition(PROGRESSING, true, reason::DELETION_BLOCKED, message.clone()),
            condition(DEGRADED, false, reason::AS_EXPECTED, String::new()),
        ],
    };
    for c in &mut list {
        c.observed_generation = generation;
        c.last_transition_time = previous
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
            .map_or_else(|| now.clone(), |p| p.last_transition_time.clone());
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    fn get<'a>(list: &'a [Condition], type_: &str) -> &'a Condition {
        list.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn ready_needs_every_pod_ready_on_the_current_config() {
        let rolling = Rollout {
            desired: 3,
            replicas: 4,
            ready: 3,
            updated: 1,
            observed: true,
        };
        let list = conditions(
            &[],
            Some(2),
            "inbound pods",
            &Outcome::Applied(rolling),
            at(10),
        );
        assert_eq!(get(&list, READY).status, "False");
        assert_eq!(get(&list, READY).message, "3 of 3 inbound pods ready");
        assert_eq!(get(&list, PROGRESSING).status, "True");
        assert_eq!(get(&list, PROGRESSING).reason, reason::ROLLING_OUT);
        assert_eq!(get(&list, DEGRADED).status, "False");
        assert!(list.iter().all(|c| c.observed_generation == Some(2)));

        let done = Rollout {
            replicas: 3,
            updated: 3,
            ..rolling
        };
        let next = conditions(
            &list,
            Some(2),
            "inbound pods",
            &Outcome::Applied(done),
            at(20),
        );
        assert_eq!(get(&next, READY).status, "True");
        assert_eq!(get(&next, READY).reason, reason::ALL_READY);
        assert_eq!(get(&next, READY).last_transition_time, at(20));
        // Degraded stayed False: its transition time is kept.
        assert_eq!(get(&next, DEGRADED).last_transition_time, at(10));
    }

    #[test]
    fn an_unobserved_template_is_not_ready() {
        let stale = Rollout {
            desired: 1,
            replicas: 1,
            ready: 1,
            updated: 1,
            observed: false,
        };
        let list = conditions(&[], None, "workers", &Outcome::Applied(stale), at(1));
        assert_eq!(get(&list, READY).status, "False");
    }

    #[test]
    fn a_failure_is_degraded_with_its_reason() {
        let failed = Outcome::Failed {
            reason: reason::SECRET_NOT_FOUND,
            message: "spec.tlsSecretRef: Secret \"t\" not found".to_owned(),
        };
        let list = conditions(&[], Some(1), "inbound pods", &failed, at(5));
        assert_eq!(get(&list, DEGRADED).status, "True");
        assert_eq!(get(&list, DEGRADED).reason, reason::SECRET_NOT_FOUND);
        assert_eq!(get(&list, READY).status, "False");
        assert!(get(&list, READY).message.contains("tlsSecretRef"));
    }
}
