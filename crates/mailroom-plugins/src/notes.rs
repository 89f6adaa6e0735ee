//! Notes: what one plugin learned for later hooks and other plugins (Haraka's
//! `connection.notes` and `transaction.notes`), keyed by type. A [`SessionInfo`] carries the
//! connection's notes, a [`Transaction`] its own, which a new transaction starts empty.
//!
//! [`SessionInfo`]: crate::SessionInfo
//! [`Transaction`]: crate::Transaction

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A map from a type to one value of it, shared by clones (the session keeps one, every hook
/// sees it). Plugins define their own note types, so two plugins never collide.
#[derive(Clone, Default)]
pub struct Notes(Arc<Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>>);

impl std::fmt::Debug for Notes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Notes({} entries)", self.lock().len())
    }
}

impl Notes {
    fn lock(&self) -> MutexGuard<'_, HashMap<TypeId, Box<dyn Any + Send + Sync>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `value`, replacing any earlier note of its type.
    pub fn insert<T: Any + Send + Sync>(&self, value: T) {
        self.lock().insert(TypeId::of::<T>(), Box::new(value));
    }

    /// A copy of the note of type `T`, if one was stored.
    pub fn get<T: Any + Send + Sync + Clone>(&self) -> Option<T> {
        self.lock()
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
            .cloned()
    }

    /// Changes the note of type `T` in place (starting from its default) and returns what
    /// `f` returns.
    pub fn update<T: Any + Send + Sync + Default, R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut map = self.lock();
        let slot = map
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Box::new(T::default()));
        match slot.downcast_mut::<T>() {
            Some(value) => f(value),
            // Unreachable: the key is the value's own type id.
            None => f(&mut T::default()),
        }
    }

    /// Whether a note of type `T` was stored.
    pub fn contains<T: Any>(&self) -> bool {
        self.lock().contains_key(&TypeId::of::<T>())
    }
}

/// Connection note: a plugin vouches for the client (`dnswl` listing, an allow list). The
/// checks that judge clients (`dnsbl`, `iprev`, `helo`, `greylist`, `tarpit`, `earlyTalker`)
/// skip a trusted client; results are still recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trusted {
    /// Who vouched, e.g. `dnswl list.dnswl.test`.
    pub by: String,
}

/// Connection note: why plugins in tagging mode found the client suspicious (`dnsbl
/// bl.example listed`, `iprev fail`). `tarpit` slows suspicious clients down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Suspicion {
    /// One line per finding.
    pub reasons: Vec<String>,
}

impl Suspicion {
    /// Adds a finding to the connection's notes.
    pub fn add(notes: &Notes, reason: impl Into<String>) {
        notes.update(|s: &mut Suspicion| s.reasons.push(reason.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::Notes;

    #[derive(Clone, Debug, PartialEq, Default)]
    struct Score(i32);

    #[test]
    fn notes_are_typed_and_shared_by_clones() {
        let notes = Notes::default();
        assert_eq!(notes.get::<Score>(), None);
        let seen_by_a_hook = notes.clone();
        seen_by_a_hook.insert(Score(3));
        notes.update(|s: &mut Score| s.0 += 2);
        assert_eq!(notes.get::<Score>(), Some(Score(5)));
        assert!(notes.contains::<Score>());
        assert!(!notes.contains::<String>());
        notes.insert("text".to_owned());
        assert_eq!(seen_by_a_hook.get::<String>().as_deref(), Some("text"));
    }
}
