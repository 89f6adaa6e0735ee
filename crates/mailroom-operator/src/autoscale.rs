//! How many delivery workers a policy gets, from its queue backlog. Pure: the reconciler reads
//! the backlog, calls [`recommend`], passes the result through the policy's [`Stabilizer`], and
//! applies the outcome to the worker Deployment.
//!
//! * **Demand:** the *ready* backlog (due now, not leased, not deferred) divided by
//!   `workers.targetBacklogPerWorker`, rounded up.
//! * **What shaping can use:** a delivery needs a connection slot of its destination. Summed
//!   over the destinations that have due mail, `min(due mail, maxConnections)` deliveries can
//!   run at once (a named destination's domains share its limit; every other domain has
//!   `defaultLimits`; no limit means as many as it has mail). Divided by the policy's
//!   `concurrency` (deliveries per worker), rounded up, that is the most workers that can be
//!   busy; more would only wait for slots.
//! * **Bounds:** within `minReplicas..maxReplicas`; at least one while entries are leased
//!   (a worker is delivering them), unless the bounds say zero; zero when nothing is due and
//!   `minReplicas` is 0.
//! * **Stabilisation:** scaling up happens at once; scaling down only to the highest
//!   recommendation of the last `scaleDownWindow`, so a short lull does not stop workers that
//!   the next batch needs.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use mailroom_queue::Backlog;

use crate::crd::DeliveryPolicyResourceSpec;

/// A recommended worker count and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recommendation {
    /// Workers.
    pub replicas: i32,
    /// One line for status and Events.
    pub reason: String,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

fn to_i32(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// How many deliveries the destinations with due mail can take at once.
pub fn usable_slots(spec: &DeliveryPolicyResourceSpec, backlog: &Backlog) -> u64 {
    let policy = &spec.policy;
    let mut named: BTreeMap<&str, (u64, Option<u32>)> = BTreeMap::new();
    let mut slots = 0u64;
    for (domain, due) in &backlog.due_by_domain {
        match policy
            .destinations
            .iter()
            .find(|d| d.matches_domain(domain))
        {
            Some(dest) => {
                let entry = named
                    .entry(dest.name.as_str())
                    .or_insert((0, dest.limits.max_connections));
                entry.0 += due;
            }
            None => {
                let limit = policy.default_limits.max_connections;
                slots += limit.map_or(*due, |l| (*due).min(u64::from(l)));
            }
        }
    }
    for (due, limit) in named.values() {
        slots += limit.map_or(*due, |l| (*due).min(u64::from(l)));
    }
    slots
}

/// The worker count the backlog asks for, within the policy's bounds.
pub fn recommend(spec: &DeliveryPolicyResourceSpec, backlog: &Backlog) -> Recommendation {
    let w = &spec.workers;
    let (min, max) = (w.min_replicas.min(w.max_replicas), w.max_replicas);
    let target = u64::try_from(w.target_backlog_per_worker.max(1)).unwrap_or(1);
    let demand = ceil_div(backlog.ready, target);
    let concurrency = u64::from(spec.policy.concurrency.max(1));
    let slots = usable_slots(spec, backlog);
    let useful = ceil_div(slots, concurrency);
    let mut wanted = demand.min(useful);
    let mut why = format!(
        "{} ready / {target} per worker = {demand}; destinations can take {slots} deliveries at \
         once = {useful} workers at concurrency {concurrency}",
        backlog.ready
    );
    if backlog.leased > 0 && wanted == 0 {
        wanted = 1;
        why.push_str(&format!("; {} in delivery", backlog.leased));
    }
    let replicas = to_i32(wanted).clamp(min, max);
    if replicas != to_i32(wanted) {
        why.push_str(&format!("; bounds {min}..{max}"));
    }
    Recommendation {
        replicas,
        reason: format!("{why} -> {replicas}"),
    }
}

/// The recent recommendations of one policy, for scale-down stabilisation.
#[derive(Debug, Default, Clone)]
pub struct Stabilizer {
    history: VecDeque<(Instant, i32)>,
}

impl Stabilizer {
    /// Records `recommended` at `now` and returns the worker count to apply given `current`:
    /// up at once, down only to the highest recommendation within `window`.
    pub fn apply(&mut self, now: Instant, window: Duration, current: i32, recommended: i32) -> i32 {
        self.history.push_back((now, recommended));
        while let Some((at, _)) = self.history.front() {
            if now.duration_since(*at) > window {
                self.history.pop_front();
            } else {
                break;
            }
        }
        if recommended >= current {
            return recommended;
        }
        let highest = self
            .history
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommended);
        highest.min(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> DeliveryPolicyResourceSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn backlog(ready: u64, leased: u64, due: &[(&str, u64)]) -> Backlog {
        Backlog {
            ready,
            deferred: 0,
            leased,
            due_by_domain: due.iter().map(|(d, n)| ((*d).to_owned(), *n)).collect(),
            deferred_by_domain: BTreeMap::new(),
        }
    }

    #[test]
    fn demand_is_capped_by_what_the_destinations_can_take() {
        let s = spec(
            "concurrency: 10\nworkers: { minReplicas: 1, maxReplicas: 20, targetBacklogPerWorker: 100 }\n\
             defaultLimits: { maxConnections: 5 }\n\
             destinations: [{ name: big, domains: [gmail.com, googlemail.com], maxConnections: 30 }]\n",
        );
        // 2000 ready want 20 workers, but gmail.com + googlemail.com share 30 connections and
        // the two other domains 5 each: 40 deliveries at once = 4 workers of 10.
        let b = backlog(
            2000,
            0,
            &[
                ("gmail.com", 1500),
                ("googlemail.com", 300),
                ("a.test", 100),
                ("b.test", 100),
            ],
        );
        assert_eq!(usable_slots(&s, &b), 40);
        let r = recommend(&s, &b);
        assert_eq!(r.replicas, 4, "{}", r.reason);
        // Few messages: demand decides.
        let r = recommend(&s, &backlog(150, 0, &[("a.test", 150)]));
        assert_eq!(r.replicas, 1, "{}", r.reason);
        // No limit anywhere: demand alone.
        let free = spec(
            "concurrency: 2\nworkers: { minReplicas: 0, maxReplicas: 8, targetBacklogPerWorker: 10 }\ndefaultLimits: {}\n",
        );
        assert_eq!(
            recommend(&free, &backlog(55, 0, &[("x.test", 55)])).replicas,
            6
        );
    }

    #[test]
    fn bounds_zero_and_mail_in_delivery() {
        let s = spec("workers: { minReplicas: 0, maxReplicas: 3, targetBacklogPerWorker: 10 }\n");
        assert_eq!(
            recommend(&s, &backlog(0, 0, &[])).replicas,
            0,
            "scale to zero"
        );
        let r = recommend(&s, &backlog(0, 2, &[("a.test", 2)]));
        assert_eq!(r.replicas, 1, "a worker is delivering: {}", r.reason);
        let s = spec(
            "workers: { minReplicas: 2, maxReplicas: 3, targetBacklogPerWorker: 1 }\nconcurrency: 1\n",
        );
        let r = recommend(&s, &backlog(0, 0, &[]));
        assert_eq!(r.replicas, 2);
        assert!(r.reason.contains("bounds 2..3"), "{}", r.reason);
        let r = recommend(&s, &backlog(50, 0, &[("a.test", 50)]));
        assert_eq!(r.replicas, 3);
    }

    #[test]
    fn scale_up_is_immediate_and_scale_down_waits_for_the_window() {
        let mut st = Stabilizer::default();
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        assert_eq!(st.apply(t0, w, 1, 4), 4);
        assert_eq!(
            st.apply(t0 + Duration::from_secs(10), w, 4, 1),
            4,
            "within the window"
        );
        assert_eq!(st.apply(t0 + Duration::from_secs(30), w, 4, 2), 4);
        assert_eq!(
            st.apply(t0 + Duration::from_secs(65), w, 4, 1),
            2,
            "the 4 left the window"
        );
        assert_eq!(st.apply(t0 + Duration::from_secs(100), w, 2, 1), 1);
        assert_eq!(st.apply(t0 + Duration::from_secs(101), w, 1, 3), 3);
    }
}
