//! Status conditions, computed purely from what the reconciler observed. Each resource has
//! `Ready`, `Progressing` and `Degraded`, with stable reasons (`kubectl wait
//! --for=condition=Ready` and alerts can rely on them); a condition's `lastTransitionTime`
//! changes only when its status does.

use std::collections::BTreeMap;

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

/// Most destinations listed in a policy's status (besides those a rule holds back).
pub const TOP_DESTINATIONS: usize = 10;

fn time_of(unix_ms: u64) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::from_millisecond(i64::try_from(unix_ms).unwrap_or(i64::MAX))
            .unwrap_or(k8s_openapi::jiff::Timestamp::MAX),
    )
}

/// One destination's queued entries, grouped the way traffic shaping groups them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationGroup {
    /// The shaping key: `dest:<name>` for a `destinations` entry, else `domain:<domain>`.
    pub key: String,
    /// Entries due now.
    pub due: u64,
    /// Entries waiting for a retry.
    pub deferred: u64,
    /// The recipient domains with queued entries.
    pub domains: Vec<String>,
}

fn group(groups: &mut BTreeMap<String, DestinationGroup>, key: String) -> &mut DestinationGroup {
    groups
        .entry(key.clone())
        .or_insert_with(|| DestinationGroup {
            key,
            due: 0,
            deferred: 0,
            domains: Vec::new(),
        })
}

/// Where a policy's mail waits: queued entries grouped by destination the way traffic shaping
/// groups them (a `destinations` entry's domains together, other domains each on their own),
/// the [`TOP_DESTINATIONS`] largest first, plus every destination a rule holds back.
pub fn destination_groups(
    spec: &crate::crd::DeliveryPolicyResourceSpec,
    backlog: &mailroom_queue::Backlog,
    rules: &[mailroom_outbound::shaping::Override],
) -> Vec<DestinationGroup> {
    let key = |domain: &str| match spec
        .policy
        .destinations
        .iter()
        .find(|d| d.matches_domain(domain))
    {
        Some(dest) => format!("dest:{}", dest.name),
        None => format!("domain:{domain}"),
    };
    let mut groups: BTreeMap<String, DestinationGroup> = BTreeMap::new();
    for (by_domain, deferred) in [
        (&backlog.due_by_domain, false),
        (&backlog.deferred_by_domain, true),
    ] {
        for (domain, n) in by_domain {
            let g = group(&mut groups, key(domain));
            *if deferred {
                &mut g.deferred
            } else {
                &mut g.due
            } += n;
            if !g.domains.contains(domain) {
                g.domains.push(domain.clone());
            }
        }
    }
    for rule in rules {
        group(&mut groups, rule.dest.clone());
    }
    let mut list: Vec<DestinationGroup> = groups.into_values().collect();
    list.sort_by(|a, b| {
        (b.due + b.deferred)
            .cmp(&(a.due + a.deferred))
            .then(a.key.cmp(&b.key))
    });
    list.into_iter()
        .enumerate()
        .filter(|(i, g)| *i < TOP_DESTINATIONS || rules.iter().any(|r| r.dest == g.key))
        .map(|(_, g)| g)
        .collect()
}

/// The status of each of `groups`: its counts, the rule in force, the last temporary failure,
/// and its oldest entry from `oldest` (acceptance time in Unix ms by domain) as of `now_ms`.
pub fn destinations(
    groups: &[DestinationGroup],
    rules: &[mailroom_outbound::shaping::Override],
    errors: &[mailroom_outbound::shaping::LastError],
    oldest: &BTreeMap<String, u64>,
    now_ms: u64,
) -> Vec<crate::crd::DestinationStatus> {
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    groups
        .iter()
        .map(|g| {
            let rule = rules
                .iter()
                .find(|r| r.dest == g.key)
                .map(|r| crate::crd::RuleInForce {
                    name: r.rule.clone(),
                    action: if r.rate.is_some() {
                        "throttle"
                    } else {
                        "suspend"
                    }
                    .to_owned(),
                    rate: r.rate.clone(),
                    until: time_of(r.until_ms),
                    response: r.response.chars().take(200).collect(),
                });
            let error = errors.iter().find(|e| e.dest == g.key);
            let first = g
                .domains
                .iter()
                .filter_map(|d| oldest.get(d))
                .min()
                .copied();
            crate::crd::DestinationStatus {
                name: g
                    .key
                    .split_once(':')
                    .map_or(g.key.as_str(), |(_, name)| name)
                    .to_owned(),
                due: count(g.due),
                deferred: count(g.deferred),
                oldest: first.map(time_of),
                oldest_age: first.map(|at| age(now_ms.saturating_sub(at) / 1000)),
                rule,
                last_error: error.map(|e| e.response.chars().take(200).collect()),
                last_error_time: error.map(|e| time_of(e.at_ms)),
            }
        })
        .collect()
}

/// A coarse age: `45s`, `12m`, `3h12m`, `2d4h`. Coarser as it grows, so a stuck message
/// changes the status once a minute at most, and once an hour after a day.
pub fn age(seconds: u64) -> String {
    let (m, h, d) = (seconds / 60, seconds / 3600, seconds / 86_400);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{m}m"),
        3600..86_400 => format!("{h}h{}m", m % 60),
        _ => format!("{d}d{}h", h % 24),
    }
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

#[cfg(test)]
mod destination_tests {
    use super::*;

    #[test]
    fn destinations_group_like_shaping_and_show_rules() {
        let spec: crate::crd::DeliveryPolicyResourceSpec = serde_saphyr::from_str(
            "destinations: [{ name: google, domains: [gmail.com, googlemail.com] }]\n",
        )
        .unwrap();
        let backlog = mailroom_queue::Backlog {
            due_by_domain: [
                ("gmail.com".into(), 3),
                ("googlemail.com".into(), 2),
                ("a.test".into(), 1),
            ]
            .into(),
            deferred_by_domain: [("b.test".into(), 7)].into(),
            ..Default::default()
        };
        let mut many = backlog.clone();
        for i in 0..20 {
            many.due_by_domain.insert(format!("x{i}.test"), 1);
        }
        let rules = vec![mailroom_outbound::shaping::Override {
            dest: "domain:quiet.test".into(),
            rule: "slow-down".into(),
            rate: Some("10/m".into()),
            until_ms: 1_900_000_000_000,
            response: "421 4.7.0 too fast".into(),
        }];
        let errors = vec![mailroom_outbound::shaping::LastError {
            dest: "domain:b.test".into(),
            response: "451 4.3.0 mailbox busy".into(),
            at_ms: 1_800_000_000_000,
        }];
        let oldest = [
            ("gmail.com".to_owned(), 5_000),
            ("googlemail.com".to_owned(), 2_000),
            ("b.test".to_owned(), 9_000),
        ]
        .into();
        let groups = destination_groups(&spec, &backlog, &rules);
        let list = destinations(&groups, &rules, &errors, &oldest, 3_725_000);
        let names: Vec<&str> = list.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["b.test", "google", "a.test", "quiet.test"]);
        assert_eq!((list[1].due, list[1].deferred), (5, 0));
        assert_eq!(
            list[0].last_error.as_deref(),
            Some("451 4.3.0 mailbox busy")
        );
        assert!(list[1].last_error.is_none());
        // A group's oldest entry is the oldest of its domains'; none known, none shown.
        assert_eq!(list[1].oldest, Some(time_of(2_000)));
        assert_eq!(list[1].oldest_age.as_deref(), Some("1h2m"));
        assert_eq!(list[0].oldest_age.as_deref(), Some("1h1m"));
        assert!(list[2].oldest.is_none() && list[2].oldest_age.is_none());
        assert_eq!(groups[1].domains, ["gmail.com", "googlemail.com"]);
        let rule = list[3].rule.as_ref().unwrap();
        assert_eq!(
            (rule.action.as_str(), rule.rate.as_deref()),
            ("throttle", Some("10/m"))
        );
        // Only the largest ten, but a destination held back by a rule always shows.
        let list = destination_groups(&spec, &many, &rules);
        assert_eq!(list.len(), TOP_DESTINATIONS + 1);
        assert_eq!(list.last().unwrap().key, "domain:quiet.test");
        assert!(list.last().unwrap().domains.is_empty());
    }

    #[test]
    fn ages_coarsen_as_they_grow() {
        let cases = [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (3599, "59m"),
            (3600, "1h0m"),
            (86_399, "23h59m"),
            (86_400, "1d0h"),
            (200_000, "2d7h"),
        ];
        for (seconds, text) in cases {
            assert_eq!(age(seconds), text, "{seconds}");
        }
    }
}
