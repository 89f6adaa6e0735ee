//! The delivery side of the local spool in memory: every message's domain entries with their
//! pending recipients and delivery state, the due order per policy, and the leases held.
//!
//! What must survive a restart (pending recipients and [`DeliveryState`] per domain) is also
//! written to `queue/<id>.state` ([`StateFile`]); leases are memory only, so a restart hands
//! every held entry out again (at-least-once).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Backlogs, DeliveryState, EntryKey, EntryStatus, Envelope, QueueId, Recipient};

/// The format version of `<id>.state`.
const STATE_FORMAT: u32 = 1;

/// The persisted delivery state of a message: one record per domain not yet finished.
/// A message without a state file has every domain pending with a fresh state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub(crate) struct StateFile {
    format: u32,
    domains: BTreeMap<String, DomainFile>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct DomainFile {
    /// Indices of the pending recipients in the envelope.
    pending: Vec<usize>,
    state: DeliveryState,
}

/// A held lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    generation: u64,
    deadline: Instant,
}

/// One domain entry in memory.
#[derive(Clone, Debug)]
struct Domain {
    pending: Vec<usize>,
    state: DeliveryState,
    held: Option<Held>,
    deliveries: u64,
}

/// One message in memory.
#[derive(Clone, Debug)]
struct Message {
    policy: String,
    received_at_ms: u64,
    recipients: Vec<Recipient>,
    domains: BTreeMap<String, Domain>,
}

/// The lease token of the local backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token {
    pub generation: u64,
}

/// An entry handed out by [`Sched::take`].
#[derive(Clone, Debug)]
pub(crate) struct Taken {
    pub key: EntryKey,
    pub pending: Vec<usize>,
    pub state: DeliveryState,
    pub deliveries: u64,
    pub received_at_ms: u64,
    pub token: Token,
}

/// What a change of a message's state needs on disk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Persist {
    /// Write this state file.
    State(StateFile),
    /// The message has no entries left: delete it.
    Delete,
}

/// Why a lease operation was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LeaseError {
    /// Not held under this token any more.
    Lost,
    /// A retry recipient is not one of the leased entry's recipients.
    UnknownRecipient(String),
}

/// The in-memory delivery state of the spool.
#[derive(Default)]
pub(crate) struct Sched {
    messages: HashMap<QueueId, Message>,
    /// Per policy: entries not held, by due time.
    due: BTreeMap<String, BTreeSet<(u64, QueueId, String)>>,
    /// Held entries by lease deadline.
    held: BTreeSet<(Instant, QueueId, String)>,
    next_generation: u64,
}

impl Sched {
    /// Adds a message; `state` is its state file, if it has one.
    pub(crate) fn insert(&mut self, envelope: &Envelope, state: Option<StateFile>) {
        self.remove(envelope.id);
        let mut domains: BTreeMap<String, Domain> = BTreeMap::new();
        match state {
            Some(file) => {
                for (name, d) in file.domains {
                    let pending: Vec<usize> = d
                        .pending
                        .into_iter()
                        .filter(|&i| i < envelope.recipients.len())
                        .collect();
                    domains.insert(
                        name,
                        Domain {
                            pending,
                            state: d.state,
                            held: None,
                            deliveries: 0,
                        },
                    );
                }
            }
            None => {
                for (i, r) in envelope.recipients.iter().enumerate() {
                    domains
                        .entry(r.domain.clone())
                        .or_insert_with(|| Domain {
                            pending: Vec::new(),
                            state: DeliveryState::default(),
                            held: None,
                            deliveries: 0,
                        })
                        .pending
                        .push(i);
                }
            }
        }
        let due = self.due.entry(envelope.policy.clone()).or_default();
        for (name, d) in &domains {
            due.insert((d.state.next_attempt_ms, envelope.id, name.clone()));
        }
        self.messages.insert(
            envelope.id,
            Message {
                policy: envelope.policy.clone(),
                received_at_ms: envelope.received_at_ms,
                recipients: envelope.recipients.clone(),
                domains,
            },
        );
    }

    /// Forgets a message (deleted); its leases become lost.
    pub(crate) fn remove(&mut self, id: QueueId) {
        let Some(message) = self.messages.remove(&id) else {
            return;
        };
        for (name, d) in message.domains {
            self.unindex(&message.policy, id, &name, &d);
        }
    }

    fn unindex(&mut self, policy: &str, id: QueueId, name: &str, d: &Domain) {
        match d.held {
            Some(h) => {
                self.held.remove(&(h.deadline, id, name.to_string()));
            }
            None => {
                if let Some(due) = self.due.get_mut(policy) {
                    due.remove(&(d.state.next_attempt_ms, id, name.to_string()));
                }
            }
        }
    }

    /// Makes leases whose deadline has passed due again.
    pub(crate) fn reclaim(&mut self, now: Instant) {
        while let Some((deadline, id, name)) = self.held.first().cloned() {
            if deadline > now {
                break;
            }
            self.held.pop_first();
            if let Some(message) = self.messages.get_mut(&id)
                && let Some(d) = message.domains.get_mut(&name)
            {
                d.held = None;
                self.due.entry(message.policy.clone()).or_default().insert((
                    d.state.next_attempt_ms,
                    id,
                    name,
                ));
            }
        }
    }

    /// Hands out up to `max` entries of `policy` due at `now_ms`, leased until `now + lease`.
    pub(crate) fn take(
        &mut self,
        policy: &str,
        max: usize,
        now: Instant,
        now_ms: u64,
        lease: Duration,
    ) -> Vec<Taken> {
        self.reclaim(now);
        let mut taken = Vec::new();
        let Some(due) = self.due.get_mut(policy) else {
            return taken;
        };
        while taken.len() < max {
            let Some(first) = due.first() else { break };
            if first.0 > now_ms {
                break;
            }
            let Some((_, id, name)) = due.pop_first() else {
                break;
            };
            let Some(message) = self.messages.get_mut(&id) else {
                continue;
            };
            let Some(d) = message.domains.get_mut(&name) else {
                continue;
            };
            self.next_generation += 1;
            let held = Held {
                generation: self.next_generation,
                deadline: now + lease,
            };
            d.held = Some(held);
            d.deliveries += 1;
            self.held.insert((held.deadline, id, name.clone()));
            taken.push(Taken {
                key: EntryKey { id, domain: name },
                pending: d.pending.clone(),
                state: d.state.clone(),
                deliveries: d.deliveries,
                received_at_ms: message.received_at_ms,
                token: Token {
                    generation: held.generation,
                },
            });
        }
        taken
    }

    /// When `lease`/`take` could next find something for `policy`: the earliest due time (Unix
    /// ms) and the earliest lease deadline.
    pub(crate) fn next_change(&self, policy: &str) -> (Option<u64>, Option<Instant>) {
        let due = self
            .due
            .get(policy)
            .and_then(|d| d.first())
            .map(|(at, _, _)| *at);
        (due, self.held.first().map(|(at, _, _)| *at))
    }

    fn held_domain(&mut self, key: &EntryKey, token: Token) -> Result<&mut Domain, LeaseError> {
        self.messages
            .get_mut(&key.id)
            .and_then(|m| m.domains.get_mut(&key.domain))
            .filter(|d| d.held.is_some_and(|h| h.generation == token.generation))
            .ok_or(LeaseError::Lost)
    }

    /// Restarts a held lease's time.
    pub(crate) fn extend(
        &mut self,
        key: &EntryKey,
        token: Token,
        now: Instant,
        lease: Duration,
    ) -> Result<(), LeaseError> {
        let d = self.held_domain(key, token)?;
        let old = d.held.ok_or(LeaseError::Lost)?;
        let new = Held {
            generation: old.generation,
            deadline: now + lease,
        };
        d.held = Some(new);
        self.held
            .remove(&(old.deadline, key.id, key.domain.clone()));
        self.held.insert((new.deadline, key.id, key.domain.clone()));
        Ok(())
    }

    /// Ends a lease with a final outcome.
    pub(crate) fn ack(&mut self, key: &EntryKey, token: Token) -> Result<Persist, LeaseError> {
        let d = self.held_domain(key, token)?;
        let old = d.held.ok_or(LeaseError::Lost)?;
        self.held
            .remove(&(old.deadline, key.id, key.domain.clone()));
        let Some(message) = self.messages.get_mut(&key.id) else {
            return Err(LeaseError::Lost);
        };
        message.domains.remove(&key.domain);
        if message.domains.is_empty() {
            self.messages.remove(&key.id);
            return Ok(Persist::Delete);
        }
        Ok(Persist::State(self.state_file(key.id)))
    }

    /// Ends a lease with a transient failure: `recipients` (addresses) stay pending, due at
    /// `at_ms`.
    pub(crate) fn defer(
        &mut self,
        key: &EntryKey,
        token: Token,
        recipients: &[Recipient],
        at_ms: u64,
        now_ms: u64,
        response: &str,
    ) -> Result<Persist, LeaseError> {
        let all = self
            .messages
            .get(&key.id)
            .map(|m| m.recipients.clone())
            .ok_or(LeaseError::Lost)?;
        let d = self.held_domain(key, token)?;
        let mut pending = Vec::with_capacity(recipients.len());
        for r in recipients {
            let index = d
                .pending
                .iter()
                .copied()
                .find(|&i| all.get(i).is_some_and(|a| a.address == r.address))
                .ok_or_else(|| LeaseError::UnknownRecipient(r.address.clone()))?;
            if !pending.contains(&index) {
                pending.push(index);
            }
        }
        let old = d.held.take().ok_or(LeaseError::Lost)?;
        d.pending = pending;
        d.state.attempts = d.state.attempts.saturating_add(1);
        d.state.last_attempt_ms = Some(now_ms);
        d.state.last_response = Some(response.to_string());
        d.state.next_attempt_ms = if d.state.bounce_requested.is_some() {
            now_ms
        } else {
            at_ms
        };
        let due_at = d.state.next_attempt_ms;
        self.refile(key, old, due_at);
        Ok(Persist::State(self.state_file(key.id)))
    }

    /// Moves an entry whose lease `old` ended from the held set to its policy's due set.
    fn refile(&mut self, key: &EntryKey, old: Held, due_at: u64) {
        self.held
            .remove(&(old.deadline, key.id, key.domain.clone()));
        let policy = self
            .messages
            .get(&key.id)
            .map(|m| m.policy.clone())
            .unwrap_or_default();
        self.due
            .entry(policy)
            .or_default()
            .insert((due_at, key.id, key.domain.clone()));
    }

    /// Ends a lease without an attempt: the entry is due again at `at_ms`, its state unchanged
    /// (in memory only: after a restart it is due at its previous time).
    pub(crate) fn postpone(
        &mut self,
        key: &EntryKey,
        token: Token,
        at_ms: u64,
    ) -> Result<(), LeaseError> {
        let d = self.held_domain(key, token)?;
        let old = d.held.take().ok_or(LeaseError::Lost)?;
        let before = d.state.next_attempt_ms;
        d.state.next_attempt_ms = at_ms.max(before);
        let due_at = d.state.next_attempt_ms;
        self.refile(key, old, due_at);
        Ok(())
    }

    /// Changes every entry of `id` that `select` picks with `change` (entries not held are
    /// re-filed under their new due time). Returns the number changed and the new state file.
    fn change_all(
        &mut self,
        id: QueueId,
        select: impl Fn(&Domain) -> bool,
        change: impl Fn(&mut Domain),
    ) -> (usize, Option<StateFile>) {
        let Some(message) = self.messages.get_mut(&id) else {
            return (0, None);
        };
        let policy = message.policy.clone();
        let mut changed = 0;
        for (name, d) in message.domains.iter_mut() {
            if !select(d) {
                continue;
            }
            let before = d.state.next_attempt_ms;
            change(d);
            changed += 1;
            if d.held.is_none() {
                let due = self.due.entry(policy.clone()).or_default();
                due.remove(&(before, id, name.clone()));
                due.insert((d.state.next_attempt_ms, id, name.clone()));
            }
        }
        if changed == 0 {
            return (0, None);
        }
        (changed, Some(self.state_file(id)))
    }

    /// Makes the deferred entries of `id` due at `now_ms`.
    pub(crate) fn retry_now(&mut self, id: QueueId, now_ms: u64) -> (usize, Option<StateFile>) {
        self.change_all(
            id,
            |d| d.held.is_none() && d.state.next_attempt_ms > now_ms,
            |d| d.state.next_attempt_ms = now_ms,
        )
    }

    /// Marks every entry of `id` for bounce; those not held become due at `now_ms`.
    pub(crate) fn request_bounce(
        &mut self,
        id: QueueId,
        reason: &str,
        now_ms: u64,
    ) -> (usize, Option<StateFile>) {
        self.change_all(
            id,
            |_| true,
            |d| {
                d.state.bounce_requested = Some(reason.to_string());
                if d.held.is_none() {
                    d.state.next_attempt_ms = d.state.next_attempt_ms.min(now_ms);
                }
            },
        )
    }

    /// The state file of a message as it is now.
    fn state_file(&self, id: QueueId) -> StateFile {
        let domains = self
            .messages
            .get(&id)
            .map(|m| {
                m.domains
                    .iter()
                    .map(|(name, d)| {
                        (
                            name.clone(),
                            DomainFile {
                                pending: d.pending.clone(),
                                state: d.state.clone(),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        StateFile {
            format: STATE_FORMAT,
            domains,
        }
    }

    /// The pending recipients of a message, in envelope order (`None`: not queued).
    pub(crate) fn pending(&self, id: QueueId) -> Option<Vec<Recipient>> {
        let message = self.messages.get(&id)?;
        let mut indices: Vec<usize> = message
            .domains
            .values()
            .flat_map(|d| d.pending.iter().copied())
            .collect();
        indices.sort_unstable();
        indices.dedup();
        Some(
            indices
                .into_iter()
                .filter_map(|i| message.recipients.get(i).cloned())
                .collect(),
        )
    }

    /// The status of every entry of a message.
    pub(crate) fn entries(&self, id: QueueId) -> Vec<EntryStatus> {
        let Some(message) = self.messages.get(&id) else {
            return Vec::new();
        };
        message
            .domains
            .iter()
            .map(|(name, d)| EntryStatus {
                key: EntryKey {
                    id,
                    domain: name.clone(),
                },
                recipients: d
                    .pending
                    .iter()
                    .filter_map(|&i| message.recipients.get(i).map(|r| r.address.clone()))
                    .collect(),
                state: d.state.clone(),
            })
            .collect()
    }

    /// Backlogs per policy at `now_ms`.
    pub(crate) fn backlogs(&self, now_ms: u64) -> Backlogs {
        let mut out = Backlogs::new();
        for (policy, due) in &self.due {
            if due.is_empty() {
                continue;
            }
            let b = out.entry(policy.clone()).or_default();
            for (at, _, domain) in due {
                let (count, by_domain) = if *at <= now_ms {
                    (&mut b.ready, &mut b.due_by_domain)
                } else {
                    (&mut b.deferred, &mut b.deferred_by_domain)
                };
                *count += 1;
                *by_domain.entry(domain.clone()).or_default() += 1;
            }
        }
        for (_, id, domain) in &self.held {
            if let Some(m) = self.messages.get(id) {
                let b = out.entry(m.policy.clone()).or_default();
                b.leased += 1;
                *b.due_by_domain.entry(domain.clone()).or_default() += 1;
            }
        }
        out
    }

    /// The acceptance time of the oldest due, deferred or leased entry per domain of `domains`
    /// (the queue id's timestamp).
    pub(crate) fn oldest_queued(&self, policy: &str, domains: &[String]) -> BTreeMap<String, u64> {
        let wanted: BTreeSet<&str> = domains.iter().map(String::as_str).collect();
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        let due = self
            .due
            .get(policy)
            .into_iter()
            .flatten()
            .map(|(_, id, d)| (id, d));
        let held = self
            .held
            .iter()
            .filter(|(_, id, _)| self.messages.get(id).is_some_and(|m| m.policy == policy))
            .map(|(_, id, d)| (id, d));
        for (id, domain) in due.chain(held) {
            if wanted.contains(domain.as_str()) {
                let at = out.entry(domain.clone()).or_insert(u64::MAX);
                *at = (*at).min(id.timestamp_ms());
            }
        }
        out
    }
}

impl StateFile {
    /// Parses a state file.
    pub(crate) fn parse(data: &[u8]) -> Result<StateFile, String> {
        let file: StateFile = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if file.format != STATE_FORMAT {
            return Err(format!("unknown state format {}", file.format));
        }
        Ok(file)
    }

    /// Encodes a state file.
    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Backlog;
    use crate::contract::envelope;

    const LEASE: Duration = Duration::from_secs(10);

    #[test]
    fn take_hands_out_due_entries_once() {
        let mut s = Sched::default();
        let e = envelope("a@x", &["1@a.example", "2@b.example", "3@a.example"]);
        s.insert(&e, None);
        let now = Instant::now();
        let taken = s.take("default", 10, now, 1, LEASE);
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[0].key.domain, "a.example");
        assert_eq!(taken[0].pending, vec![0, 2]);
        assert!(s.take("default", 10, now, 1, LEASE).is_empty());
        // After the deadline both come back with deliveries 2.
        let again = s.take("default", 10, now + LEASE, 1, LEASE);
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|t| t.deliveries == 2));
        // The first tokens are stale now.
        assert_eq!(s.ack(&taken[0].key, taken[0].token), Err(LeaseError::Lost));
        assert!(matches!(
            s.ack(&again[0].key, again[0].token),
            Ok(Persist::State(_))
        ));
        assert_eq!(s.ack(&again[1].key, again[1].token), Ok(Persist::Delete));
        assert_eq!(s.pending(e.id), None);
    }

    #[test]
    fn defer_keeps_pending_and_state_file_round_trips() {
        let mut s = Sched::default();
        let e = envelope("a@x", &["1@a.example", "2@a.example"]);
        s.insert(&e, None);
        let now = Instant::now();
        let t = s.take("default", 1, now, 100, LEASE).pop().unwrap();
        let keep = vec![e.recipients[1].clone()];
        let Ok(Persist::State(file)) = s.defer(&t.key, t.token, &keep, 5000, 100, "451 later")
        else {
            panic!("defer")
        };
        assert_eq!(
            s.backlogs(100)["default"],
            Backlog {
                ready: 0,
                deferred: 1,
                leased: 0,
                due_by_domain: Default::default(),
                deferred_by_domain: [("a.example".to_owned(), 1)].into(),
            }
        );
        assert_eq!(s.backlogs(5000)["default"].ready, 1);
        assert_eq!(
            s.backlogs(5000)["default"].due_by_domain,
            [("a.example".to_owned(), 1)].into()
        );
        let parsed = StateFile::parse(&file.encode()).unwrap();
        let mut restored = Sched::default();
        restored.insert(&e, Some(parsed));
        assert_eq!(restored.entries(e.id), s.entries(e.id));
        assert_eq!(restored.pending(e.id), Some(vec![e.recipients[1].clone()]));
        assert!(restored.take("default", 1, now, 4999, LEASE).is_empty());
        let back = restored.take("default", 1, now, 5000, LEASE).pop().unwrap();
        assert_eq!(back.state.attempts, 1);
        assert_eq!(back.state.last_response.as_deref(), Some("451 later"));
        let stranger = Recipient {
            address: "x@a.example".into(),
            domain: "a.example".into(),
            notify: None,
            orcpt: None,
        };
        assert_eq!(
            restored.defer(&back.key, back.token, &[stranger], 0, 0, ""),
            Err(LeaseError::UnknownRecipient("x@a.example".into()))
        );
    }

    #[test]
    fn bounce_marks_held_entries_without_refiling_them() {
        let mut s = Sched::default();
        let e = envelope("a@x", &["1@a.example", "2@b.example"]);
        s.insert(&e, None);
        let now = Instant::now();
        let t = s.take("default", 1, now, 0, LEASE).pop().unwrap();
        let (n, file) = s.request_bounce(e.id, "operator", 0);
        assert_eq!(n, 2);
        assert!(file.is_some());
        // The other entry is due; the held one is still held.
        let other = s.take("default", 10, now, 0, LEASE);
        assert_eq!(other.len(), 1);
        assert_ne!(other[0].key, t.key);
        assert_eq!(other[0].state.bounce_requested.as_deref(), Some("operator"));
        // A held entry deferred after the bounce request is due at once.
        let rcpt = vec![e.recipients[0].clone()];
        s.defer(&t.key, t.token, &rcpt, 1_000_000, 10, "451")
            .unwrap();
        assert_eq!(s.take("default", 10, now, 10, LEASE).len(), 1);
    }
}
