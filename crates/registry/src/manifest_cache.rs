//! Manifests by digest, kept on the node for a short while: a manifest's bytes never
//! change under its digest, so the only thing a cached copy can get wrong is that the
//! manifest was deleted. Deletions through this node drop the copy at once; a deletion
//! elsewhere (another node on the same PostgreSQL, `berth gc` from another process) is
//! seen within [`MANIFEST_CACHE_TTL`], when the copy is read from the store again. Tags are
//! never cached: they move.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_meta::StoredManifest;
use berth_oci::Digest;

/// How long a manifest read from the store is served from the node without asking the
/// store again: the bound on serving a manifest another node deleted.
pub const MANIFEST_CACHE_TTL: Duration = Duration::from_secs(1);
/// Manifests kept at most (a few KiB each: a few MiB in all).
const CAPACITY: usize = 4096;
const SHARDS: usize = 16;
/// Manifests larger than this are not kept (an index of thousands of platforms).
pub(crate) const LARGEST: usize = 64 * 1024;

struct Cached {
    repo: String,
    manifest: StoredManifest,
    read_at: Instant,
}

/// The cache; shards keep 64 concurrent readers off one lock.
pub(crate) struct ManifestCache {
    /// By the hash of repository and digest (looked up without building a key), each
    /// entry naming both to be checked.
    shards: Vec<Mutex<HashMap<u64, Cached>>>,
    /// Deletions through this node so far: a read that a deletion overtook is not kept.
    deletions: AtomicU64,
}

impl Default for ManifestCache {
    fn default() -> Self {
        ManifestCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            deletions: AtomicU64::new(0),
        }
    }
}

/// Where a read from the store started: what [`ManifestCache::put`] checks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadStart {
    at: Instant,
    deletions: u64,
}

impl ManifestCache {
    fn slot(&self, repo: &str, digest: &Digest) -> (u64, &Mutex<HashMap<u64, Cached>>) {
        let mut hasher = DefaultHasher::new();
        repo.hash(&mut hasher);
        digest.as_str().hash(&mut hasher);
        let hash = hasher.finish();
        (hash, &self.shards[hash as usize % SHARDS])
    }

    /// The manifest, if it was read from the store within the TTL.
    pub(crate) fn get(&self, repo: &str, digest: &Digest) -> Option<StoredManifest> {
        let (hash, shard) = self.slot(repo, digest);
        let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        let cached = shard.get(&hash)?;
        (cached.repo == repo
            && cached.manifest.digest == *digest
            && cached.read_at.elapsed() < MANIFEST_CACHE_TTL)
            .then(|| cached.manifest.clone())
    }

    /// Taken before reading a manifest from the store.
    pub(crate) fn read_start(&self) -> ReadStart {
        ReadStart {
            at: Instant::now(),
            deletions: self.deletions.load(Ordering::Acquire),
        }
    }

    /// Keeps a manifest read from the store since `start`, unless a deletion through this
    /// node came in between (it may have been read just before that deletion committed).
    pub(crate) fn put(&self, repo: &str, manifest: &StoredManifest, start: ReadStart) {
        if manifest.raw.len() > LARGEST || self.deletions.load(Ordering::Acquire) != start.deletions
        {
            return;
        }
        let read_at = start.at;
        let (hash, shard) = self.slot(repo, &manifest.digest);
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        if shard.len() >= CAPACITY / SHARDS {
            shard.retain(|_, c| c.read_at.elapsed() < MANIFEST_CACHE_TTL);
            if shard.len() >= CAPACITY / SHARDS {
                shard.clear();
            }
        }
        shard.insert(
            hash,
            Cached {
                repo: repo.to_owned(),
                manifest: manifest.clone(),
                read_at,
            },
        );
    }

    /// Drops a manifest deleted through this node: called after the deletion committed.
    pub(crate) fn forget(&self, repo: &str, digest: &Digest) {
        self.deletions.fetch_add(1, Ordering::AcqRel);
        let (hash, shard) = self.slot(repo, digest);
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        if shard
            .get(&hash)
            .is_some_and(|c| c.repo == repo && c.manifest.digest == *digest)
        {
            shard.remove(&hash);
        }
    }

    /// Drops every manifest of a repository deleted through this node (after the
    /// deletion committed).
    pub(crate) fn forget_repository(&self, repo: &str) {
        self.deletions.fetch_add(1, Ordering::AcqRel);
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, c| c.repo != repo);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(c: char) -> StoredManifest {
        StoredManifest {
            digest: Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            raw: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_copy_lives_for_the_ttl_and_deletions_here_drop_it_at_once() {
        let cache = ManifestCache::default();
        let (a, b) = (manifest('a'), manifest('b'));
        cache.put("team/app", &a, cache.read_start());
        let mut old = cache.read_start();
        old.at -= MANIFEST_CACHE_TTL;
        cache.put("team/app", &b, old);
        assert_eq!(cache.get("team/app", &a.digest), Some(a.clone()));
        assert_eq!(cache.get("team/other", &a.digest), None, "per repository");
        assert_eq!(cache.get("team/app", &b.digest), None, "past its TTL");
        cache.forget("team/app", &a.digest);
        assert_eq!(cache.get("team/app", &a.digest), None);
        cache.put("team/app", &a, cache.read_start());
        cache.forget_repository("team/app");
        assert_eq!(cache.get("team/app", &a.digest), None);
        // A read a deletion overtook is not kept.
        let start = cache.read_start();
        cache.forget("team/app", &b.digest);
        cache.put("team/app", &a, start);
        assert_eq!(cache.get("team/app", &a.digest), None);
    }

    #[test]
    fn it_stays_bounded() {
        let cache = ManifestCache::default();
        for i in 0..(CAPACITY * 3) {
            let digest = Digest::parse(&format!("sha256:{i:064x}")).unwrap();
            let m = StoredManifest {
                digest,
                media_type: "x".into(),
                raw: vec![],
            };
            cache.put("r", &m, cache.read_start());
        }
        let held: usize = cache.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= CAPACITY, "{held}");
        let big = StoredManifest {
            raw: vec![0; LARGEST + 1],
            ..manifest('c')
        };
        cache.put("r", &big, cache.read_start());
        assert_eq!(cache.get("r", &big.digest), None, "large ones are not kept");
    }
}
