//! Answers read from the store, kept on a node whose metadata store serves it alone
//! (SQLite in the data directory): what a tag names, which blobs a repository links, who
//! a token's account is and what a project lets them do. A pull asks the same few
//! questions tens of thousands of times a second, and each answer read from SQLite costs
//! a read transaction (file locks and a mutex shared by the readers).
//!
//! A copy is served only while no durable write went through this process since the read
//! it came from began ([`crate::MetaStore::changes`]), so every push, tag, deletion,
//! collection or account change through the node is seen by the next request, exactly as
//! without the cache. Another process writing to the same file (`berth gc`, account
//! commands run beside the server) is seen within [`READ_CACHE_TTL`]. With PostgreSQL
//! other nodes write too: callers keep nothing ([`crate::MetaStore::node_local`]).

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a copy is served at most: the bound on missing a change that another process
/// made to the same metadata file.
pub const READ_CACHE_TTL: Duration = Duration::from_secs(1);
/// Entries kept at most per cache.
const CAPACITY: usize = 4096;
const SHARDS: usize = 16;

struct Cached<V> {
    scope: String,
    name: String,
    value: V,
    read_at: Instant,
    changes: u64,
}

/// Where a read from the store began: the store's change count and the time.
#[derive(Debug, Clone, Copy)]
pub struct ReadBegan {
    at: Instant,
    changes: u64,
}

impl ReadBegan {
    /// Taken before the read.
    pub fn now(changes: u64) -> Self {
        ReadBegan {
            at: Instant::now(),
            changes,
        }
    }
}

/// One cache of answers about a name (a tag, a digest, a user) within a scope (a
/// repository, a project); shards keep concurrent readers off one lock. Entries go by the
/// hash of both (looked up without building a key) and name both, to be checked.
pub struct ReadCache<V> {
    shards: Vec<Mutex<HashMap<u64, Cached<V>>>>,
}

impl<V: Clone> Default for ReadCache<V> {
    fn default() -> Self {
        ReadCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl<V: Clone> ReadCache<V> {
    fn slot(&self, scope: &str, name: &str) -> (u64, &Mutex<HashMap<u64, Cached<V>>>) {
        let mut hasher = DefaultHasher::new();
        scope.hash(&mut hasher);
        name.hash(&mut hasher);
        let hash = hasher.finish();
        (hash, &self.shards[hash as usize % SHARDS])
    }

    /// The answer about `name` within `scope`, if it was read within the TTL and no write
    /// went through this process since that read began (`changes` is the store's count
    /// now).
    pub fn get(&self, scope: &str, name: &str, changes: u64) -> Option<V> {
        let (hash, shard) = self.slot(scope, name);
        let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let cached = shard.get(&hash)?;
        (cached.changes == changes
            && cached.read_at.elapsed() < READ_CACHE_TTL
            && cached.scope == scope
            && cached.name == name)
            .then(|| cached.value.clone())
    }

    /// Keeps what a read that began at `began` answered about `name` within `scope`;
    /// `changes` is the store's count now. A read that a write overtook is not kept.
    pub fn put(&self, scope: &str, name: &str, value: V, began: ReadBegan, changes: u64) {
        if changes != began.changes {
            return;
        }
        let (hash, shard) = self.slot(scope, name);
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        if shard.len() >= CAPACITY / SHARDS {
            shard.retain(|_, c| c.changes == changes && c.read_at.elapsed() < READ_CACHE_TTL);
            if shard.len() >= CAPACITY / SHARDS {
                shard.clear();
            }
        }
        shard.insert(
            hash,
            Cached {
                scope: scope.to_owned(),
                name: name.to_owned(),
                value,
                read_at: began.at,
                changes,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_since_the_read_began_keeps_the_answer_out() {
        let cache: ReadCache<u32> = ReadCache::default();
        // Read, nothing written meanwhile: kept, and served while nothing is written.
        cache.put("team/app", "v1", 1, ReadBegan::now(5), 5);
        assert_eq!(cache.get("team/app", "v1", 5), Some(1));
        assert_eq!(cache.get("team/app", "v2", 5), None);
        assert_eq!(cache.get("team/ap", "pv1", 5), None);
        // A write since: not served.
        assert_eq!(cache.get("team/app", "v1", 6), None);
        // A read that a write overtook is not kept.
        cache.put("team/app", "v1", 2, ReadBegan::now(6), 7);
        assert_eq!(cache.get("team/app", "v1", 7), None);
        // Nor is one older than the TTL served.
        let old = ReadBegan {
            at: Instant::now() - READ_CACHE_TTL,
            changes: 7,
        };
        cache.put("team/app", "v1", 3, old, 7);
        assert_eq!(cache.get("team/app", "v1", 7), None);
    }

    #[test]
    fn a_full_shard_makes_room() {
        let cache: ReadCache<usize> = ReadCache::default();
        for i in 0..CAPACITY * 2 {
            cache.put("r", &i.to_string(), i, ReadBegan::now(0), 0);
        }
        let kept: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(kept <= CAPACITY, "{kept}");
        let last = CAPACITY * 2 - 1;
        assert_eq!(cache.get("r", &last.to_string(), 0), Some(last));
    }
}
