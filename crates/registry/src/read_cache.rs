//! What a tag names and which blobs a repository links, kept on a node whose metadata
//! store serves it alone (SQLite in the data directory): a pull asks the same few
//! questions tens of thousands of times a second, and each answer read from SQLite costs
//! a read transaction (file locks and a mutex shared by the readers).
//!
//! A copy is served only while no durable write went through this process since the read
//! it came from began ([`berth_meta::MetaStore::changes`]), so every push, tag, deletion
//! or collection through the node is seen by the next request, exactly as without the
//! cache. Another process writing to the same file (`berth gc`, account commands run
//! beside the server) is seen within [`READ_CACHE_TTL`]. With PostgreSQL other nodes write
//! too: nothing is kept, tags and links are read from the store every time.

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
    value: V,
    read_at: Instant,
    changes: u64,
}

/// Where a read from the store began: the store's change count and the time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadBegan {
    at: Instant,
    changes: u64,
}

impl ReadBegan {
    /// Taken before the read.
    pub(crate) fn now(changes: u64) -> Self {
        ReadBegan {
            at: Instant::now(),
            changes,
        }
    }
}

/// One cache of answers by key; shards keep concurrent readers off one lock.
pub(crate) struct ReadCache<V> {
    shards: Vec<Mutex<HashMap<String, Cached<V>>>>,
}

impl<V: Clone> Default for ReadCache<V> {
    fn default() -> Self {
        ReadCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl<V: Clone> ReadCache<V> {
    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<String, Cached<V>>> {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        self.shards[hasher.finish() as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The answer for `key`, if it was read within the TTL and no write went through
    /// this process since that read began (`changes` is the store's count now).
    pub(crate) fn get(&self, key: &str, changes: u64) -> Option<V> {
        let shard = self.shard(key);
        let cached = shard.get(key)?;
        (cached.changes == changes && cached.read_at.elapsed() < READ_CACHE_TTL)
            .then(|| cached.value.clone())
    }

    /// Keeps what a read that began at `began` answered for `key`; `changes` is the
    /// store's count now. A read that a write overtook is not kept.
    pub(crate) fn put(&self, key: String, value: V, began: ReadBegan, changes: u64) {
        if changes != began.changes {
            return;
        }
        let mut shard = self.shard(&key);
        if shard.len() >= CAPACITY / SHARDS {
            shard.retain(|_, c| c.changes == changes && c.read_at.elapsed() < READ_CACHE_TTL);
            if shard.len() >= CAPACITY / SHARDS {
                shard.clear();
            }
        }
        shard.insert(
            key,
            Cached {
                value,
                read_at: began.at,
                changes,
            },
        );
    }
}

/// The key of an answer about `name` in `repo` (a tag, a digest): neither a repository
/// name nor a tag or digest holds a newline.
pub(crate) fn key(repo: &str, name: &str) -> String {
    let mut key = String::with_capacity(repo.len() + 1 + name.len());
    key.push_str(repo);
    key.push('\n');
    key.push_str(name);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_since_the_read_began_keeps_the_answer_out() {
        let cache: ReadCache<u32> = ReadCache::default();
        let k = key("team/app", "v1");
        // Read, nothing written meanwhile: kept, and served while nothing is written.
        cache.put(k.clone(), 1, ReadBegan::now(5), 5);
        assert_eq!(cache.get(&k, 5), Some(1));
        // A write since: not served.
        assert_eq!(cache.get(&k, 6), None);
        // A read that a write overtook is not kept.
        cache.put(k.clone(), 2, ReadBegan::now(6), 7);
        assert_eq!(cache.get(&k, 7), None);
        // Nor is one older than the TTL served.
        let old = ReadBegan {
            at: Instant::now() - READ_CACHE_TTL,
            changes: 7,
        };
        cache.put(k.clone(), 3, old, 7);
        assert_eq!(cache.get(&k, 7), None);
    }

    #[test]
    fn a_full_shard_makes_room() {
        let cache: ReadCache<usize> = ReadCache::default();
        for i in 0..CAPACITY * 2 {
            cache.put(key("r", &i.to_string()), i, ReadBegan::now(0), 0);
        }
        let kept: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(kept <= CAPACITY, "{kept}");
        let last = CAPACITY * 2 - 1;
        assert_eq!(cache.get(&key("r", &last.to_string()), 0), Some(last));
    }
}
