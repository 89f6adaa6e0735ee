//! Response-driven rules: a receiving server's reply that matches a rule's pattern suspends or
//! throttles its destination for the rule's duration, across all workers (the action is kept
//! in the [`ShapingStore`], like the other limits).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mailroom_config::{Rate, RuleAction, RuleSpec};
use regex::Regex;

use crate::shaping::{Override, ShapingStore};

/// How long a worker trusts what it last read about a destination's rule action.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// A policy's rules, compiled.
pub(crate) struct Rules {
    rules: Vec<(RuleSpec, Regex)>,
    cache: Mutex<HashMap<String, (Option<Override>, Instant)>>,
}

impl Rules {
    /// Compiles the rules; errors name the rule.
    pub fn new(specs: &[RuleSpec]) -> Result<Rules, String> {
        let mut rules = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let re = Regex::new(&spec.pattern)
                .map_err(|e| format!("rules[{i}] ({}): pattern: {e}", spec.name))?;
            rules.push((spec.clone(), re));
        }
        Ok(Rules {
            rules,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// What a rule imposes on `dest` now: `None` to go on, `Some(at)` to wait until `at`
    /// (Unix ms). A throttle takes one unit of its rate.
    pub async fn gate(&self, store: &dyn ShapingStore, dest: &str) -> Option<u64> {
        if self.rules.is_empty() {
            return None;
        }
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(dest)
            .filter(|(_, at)| at.elapsed() < CACHE_FOR)
            .map(|(o, _)| o.clone());
        let active = match cached {
            Some(o) => o,
            None => {
                let o = store.override_for(dest).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read the rules' state; assuming none");
                    None
                });
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(dest.to_string(), (o.clone(), Instant::now()));
                o
            }
        };
        let active = active.filter(|o| o.until_ms > mailroom_queue::now_ms())?;
        let Some(rate) = active.rate.as_deref().and_then(|r| r.parse::<Rate>().ok()) else {
            return Some(active.until_ms);
        };
        match store.take(&format!("rule:{dest}"), &rate).await {
            Ok(Ok(())) => None,
            Ok(Err(wait)) => Some(crate::worker::later(wait)),
            Err(_) => Some(crate::worker::later(Duration::from_secs(1))),
        }
    }

    /// The first rule whose pattern matches one of `responses` puts its action in force on
    /// `dest`; returns it.
    pub async fn observe<'a>(
        &self,
        store: &dyn ShapingStore,
        dest: &str,
        responses: impl IntoIterator<Item = &'a str>,
    ) -> Option<Override> {
        let responses: Vec<&str> = responses.into_iter().collect();
        let (spec, response) = self.rules.iter().find_map(|(spec, re)| {
            responses
                .iter()
                .find(|r| re.is_match(r))
                .map(|r| (spec, *r))
        })?;
        let over = Override {
            dest: dest.to_string(),
            rule: spec.name.clone(),
            rate: match spec.action {
                RuleAction::Suspend => None,
                RuleAction::Throttle => spec.rate.map(|r| r.to_string()),
            },
            until_ms: crate::worker::later(spec.duration.as_duration()),
            response: response.chars().take(500).collect(),
        };
        if let Err(e) = store.set_override(&over).await {
            tracing::warn!(error = %e, rule = %spec.name, "could not record a rule's action");
            return None;
        }
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dest.to_string(), (Some(over.clone()), Instant::now()));
        Some(over)
    }
}
