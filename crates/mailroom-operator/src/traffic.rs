//! A listener's recent traffic from the totals its pods report (`mailroom_inbound::report`):
//! the growth of each pod's totals between two readings, summed over a sliding window.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use mailroom_inbound::report::ListenerCounts;

use crate::crd::ListenerTraffic;

/// How far back the counts in status go.
pub const WINDOW: Duration = Duration::from_secs(300);

/// The readings of one listener.
#[derive(Debug, Default)]
pub struct Tracker {
    started: Option<Instant>,
    last: HashMap<String, ListenerCounts>,
    growth: VecDeque<(Instant, u64, u64)>,
}

impl Tracker {
    /// Takes a reading (each pod's totals) at `now` and returns the counts of the window.
    ///
    /// A pod's total that went down belongs to a restarted process: all of it is new. A pod
    /// seen for the first time counts fully too, except in the very first reading, whose
    /// totals may be hours old (they only set the baseline).
    pub fn observe(
        &mut self,
        now: Instant,
        readings: &[(String, ListenerCounts)],
    ) -> ListenerTraffic {
        let first = self.started.is_none();
        let started = *self.started.get_or_insert(now);
        let (mut accepted, mut rejected) = (0u64, 0u64);
        for (process, counts) in readings {
            let before = match self.last.get(process) {
                Some(before) => *before,
                None if first => *counts,
                None => ListenerCounts::default(),
            };
            let grew = |now: u64, then: u64| if now >= then { now - then } else { now };
            accepted += grew(counts.accepted, before.accepted);
            rejected += grew(counts.rejected, before.rejected);
            self.last.insert(process.clone(), *counts);
        }
        self.growth.push_back((now, accepted, rejected));
        while self
            .growth
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > WINDOW)
        {
            self.growth.pop_front();
        }
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        ListenerTraffic {
            window_seconds: count(now.duration_since(started).min(WINDOW).as_secs()),
            accepted: count(self.growth.iter().map(|g| g.1).sum()),
            rejected: count(self.growth.iter().map(|g| g.2).sum()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(accepted: u64, rejected: u64) -> ListenerCounts {
        ListenerCounts { accepted, rejected }
    }

    #[test]
    fn growth_over_the_window_across_pods_and_restarts() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let seen = t.observe(t0, &[("a".into(), c(1000, 50))]);
        assert_eq!(
            (seen.accepted, seen.rejected),
            (0, 0),
            "old totals are a baseline"
        );
        let s = Duration::from_secs;
        let seen = t.observe(
            t0 + s(30),
            &[("a".into(), c(1010, 52)), ("b".into(), c(5, 0))],
        );
        assert_eq!(
            (seen.accepted, seen.rejected),
            (15, 2),
            "a grew 10, the new pod b has 5"
        );
        // a restarted (its total went down): its 3 are new.
        let seen = t.observe(t0 + s(60), &[("a".into(), c(3, 0)), ("b".into(), c(5, 1))]);
        assert_eq!((seen.accepted, seen.rejected), (18, 3));
        assert_eq!(seen.window_seconds, 60);
        // Five minutes later the early growth has left the window.
        let seen = t.observe(t0 + s(400), &[("a".into(), c(4, 0)), ("b".into(), c(5, 1))]);
        assert_eq!((seen.accepted, seen.rejected), (1, 0));
        assert_eq!(seen.window_seconds, 300);
    }
}
