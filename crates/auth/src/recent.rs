//! What a thread decided lately about a bearer token and a project, kept by that thread.
//!
//! Every bearer request asks the same questions: which account does this token prove, and
//! what may it do in this project. The shared caches answer them, but each answer took a
//! lock and reference counts that both cores touch on every request; with two cores
//! serving the same client, those cache lines moved between them all the time. A thread's
//! own copy is read without any of that. It obeys the shared caches' rule
//! (`berth_meta::read_cache`): a copy is served only while the store has made no change
//! that may bear on access since it was taken (`MetaStore::access_changes`: pushes of
//! image content do not count; on SQLite, the only store whose changes all pass through
//! this node) and for at most [`READ_CACHE_TTL`].

use std::time::Instant;

use berth_meta::read_cache::READ_CACHE_TTL;

/// Entries per thread and kind; the oldest is replaced.
const ENTRIES: usize = 16;

/// One thread's recent answers of one kind. `owner` tells apart the access services of one
/// process (each test starts its own), `key` the questions.
pub(crate) struct Recent<K, V> {
    entries: Vec<Entry<K, V>>,
    next: usize,
}

struct Entry<K, V> {
    owner: usize,
    key: K,
    value: V,
    changes: u64,
    at: Instant,
}

impl<K, V> Recent<K, V> {
    pub(crate) const fn new() -> Self {
        Recent {
            entries: Vec::new(),
            next: 0,
        }
    }

    /// The answer kept for the question `is` recognizes, if it is still good.
    pub(crate) fn get(&self, owner: usize, changes: u64, is: impl Fn(&K) -> bool) -> Option<&V> {
        self.entries
            .iter()
            .find(|e| e.owner == owner && is(&e.key))
            .filter(|e| e.changes == changes && e.at.elapsed() < READ_CACHE_TTL)
            .map(|e| &e.value)
    }

    /// Keeps `value`, an answer read when the store's change count was `changes` and
    /// still is: the caller reads the count before it reads the store.
    pub(crate) fn put(
        &mut self,
        owner: usize,
        key: K,
        value: V,
        changes: u64,
        at: Instant,
        is: impl Fn(&K) -> bool,
    ) {
        let entry = Entry {
            owner,
            key,
            value,
            changes,
            at,
        };
        if let Some(same) = self
            .entries
            .iter_mut()
            .find(|e| e.owner == owner && is(&e.key))
        {
            *same = entry;
        } else if self.entries.len() < ENTRIES {
            self.entries.push(entry);
        } else {
            self.entries[self.next] = entry;
            self.next = (self.next + 1) % ENTRIES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_answer_is_served_only_to_its_owner_while_nothing_changed() {
        let mut recent: Recent<String, u32> = Recent::new();
        let now = Instant::now();
        recent.put(1, "a".into(), 10, 5, now, |k| k == "a");
        assert_eq!(recent.get(1, 5, |k| k == "a"), Some(&10));
        assert_eq!(recent.get(2, 5, |k| k == "a"), None, "another service");
        assert_eq!(recent.get(1, 6, |k| k == "a"), None, "a change since");
        assert_eq!(recent.get(1, 5, |k| k == "b"), None);
        let old = now - READ_CACHE_TTL - Duration::from_millis(1);
        recent.put(1, "a".into(), 11, 5, old, |k| k == "a");
        assert_eq!(recent.get(1, 5, |k| k == "a"), None, "too old");
    }

    #[test]
    fn a_full_thread_replaces_its_oldest_answer() {
        let mut recent: Recent<usize, usize> = Recent::new();
        let now = Instant::now();
        for i in 0..ENTRIES + 3 {
            recent.put(1, i, i, 0, now, |k| *k == i);
        }
        assert_eq!(recent.entries.len(), ENTRIES);
        for i in 0..3 {
            assert_eq!(recent.get(1, 0, |k| *k == i), None);
        }
        for i in 3..ENTRIES + 3 {
            assert_eq!(recent.get(1, 0, |k| *k == i), Some(&i));
        }
    }
}
