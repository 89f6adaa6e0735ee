//! The in-memory index of the local spool: summaries by id, an age order, and running totals,
//! so `list` and `stats` never touch the disk.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::{EntrySummary, QueueId, QueueStats};

/// Summaries of all committed entries.
#[derive(Default)]
pub(crate) struct Index {
    entries: HashMap<QueueId, EntrySummary>,
    by_age: BTreeSet<(u64, QueueId)>,
    bytes: u64,
    by_domain: BTreeMap<String, u64>,
}

impl Index {
    /// Adds (or replaces) an entry.
    pub(crate) fn insert(&mut self, summary: EntrySummary) {
        self.remove(summary.id);
        self.by_age.insert((summary.received_at_ms, summary.id));
        self.bytes += summary.size;
        for domain in &summary.domains {
            *self.by_domain.entry(domain.clone()).or_default() += 1;
        }
        self.entries.insert(summary.id, summary);
    }

    /// Re-summarizes an entry after some of its recipients are done (`pending` are the ones
    /// left); sender, size and reception time stay.
    pub(crate) fn set_recipients(&mut self, id: QueueId, pending: &[crate::Recipient]) {
        let Some(mut summary) = self.entries.get(&id).cloned() else {
            return;
        };
        let mut domains: Vec<String> = pending.iter().map(|r| r.domain.clone()).collect();
        domains.sort();
        domains.dedup();
        summary.recipients = pending.len();
        summary.domains = domains;
        self.insert(summary);
    }

    /// Removes an entry; returns whether it was there.
    pub(crate) fn remove(&mut self, id: QueueId) -> bool {
        let Some(old) = self.entries.remove(&id) else {
            return false;
        };
        self.by_age.remove(&(old.received_at_ms, id));
        self.bytes = self.bytes.saturating_sub(old.size);
        for domain in &old.domains {
            if let Some(count) = self.by_domain.get_mut(domain) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.by_domain.remove(domain);
                }
            }
        }
        true
    }

    /// Whether the entry is indexed.
    pub(crate) fn contains(&self, id: QueueId) -> bool {
        self.entries.contains_key(&id)
    }

    /// Up to `limit` summaries, oldest first.
    pub(crate) fn list(&self, limit: usize) -> Vec<EntrySummary> {
        self.by_age
            .iter()
            .take(limit)
            .filter_map(|(_, id)| self.entries.get(id).cloned())
            .collect()
    }

    /// The totals.
    pub(crate) fn stats(&self) -> QueueStats {
        QueueStats {
            messages: self.entries.len() as u64,
            bytes: self.bytes,
            oldest_received_at_ms: self.by_age.first().map(|(at, _)| *at),
            by_domain: self.by_domain.clone(),
        }
    }
}
