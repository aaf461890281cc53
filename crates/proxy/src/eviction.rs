//! Eviction from pull-through caches: pulls are written down (at most every
//! [`TOUCH_EVERY`] per manifest), and a pass deletes what a project's policy says (idle
//! images, then the least recently pulled while the project is over its size), after
//! which the ordinary collection removes their blobs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_oci::{Digest, Reference, RepoName};
use berth_registry::{Actor, GcOptions, Registry, RegistryError};

use crate::{ProxyCache, ProxyError, ProxySettings};

/// How often a cached manifest's pull is written down, at most.
pub const TOUCH_EVERY: Duration = Duration::from_secs(600);

/// How many manifests one eviction pass looks at per project.
const EVICTION_BATCH: usize = 1000;

/// Applies `settings`' eviction policy to its project once; returns manifests deleted.
pub(crate) async fn evict_project(
    registry: &Registry,
    settings: &ProxySettings,
) -> Result<usize, ProxyError> {
    if settings.max_bytes.is_none() && settings.idle.is_none() {
        return Ok(0);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let idle_before = settings.idle.map(|idle| now_ms - idle.as_millis() as i64);
    let mut bytes = registry.project_bytes(&settings.project).await?;
    let by = Actor::system("proxy-cache-eviction");
    let mut deleted = 0;
    for candidate in registry
        .least_recently_pulled(&settings.project, EVICTION_BATCH)
        .await?
    {
        let idle = idle_before.is_some_and(|before| candidate.last_pulled_ms < before);
        let over = settings.max_bytes.is_some_and(|max| bytes > max);
        if !idle && !over {
            // Oldest first: nothing after this one is idle, and the size is within bounds.
            break;
        }
        let Ok(repo) = RepoName::parse(&candidate.repo) else {
            continue;
        };
        let reference = Reference::Digest(candidate.digest.clone());
        match registry.delete_manifest(&repo, &reference, &by).await {
            Ok(()) | Err(RegistryError::ManifestUnknown { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        bytes = bytes.saturating_sub(candidate.bytes);
        deleted += 1;
        tracing::info!(repository = %repo, digest = %candidate.digest, idle, over, "evicted from the cache");
    }
    Ok(deleted)
}

impl ProxyCache {
    /// Collects evicted images' blobs with `options` (the node's `[gc]` settings).
    pub fn with_collection(mut self, options: GcOptions) -> Self {
        self.collection = GcOptions {
            dry_run: false,
            ..options
        };
        self
    }

    /// Records a pull of a cached manifest, at most every [`TOUCH_EVERY`] per manifest.
    pub(crate) async fn note_pull(&self, repo: &RepoName, digest: &Digest) {
        let key = (repo.as_str().to_owned(), digest.clone());
        {
            let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            if touched
                .get(&key)
                .is_some_and(|at| at.elapsed() < TOUCH_EVERY)
            {
                return;
            }
            if touched.len() > 100_000 {
                touched.clear();
            }
            touched.insert(key, Instant::now());
        }
        if let Err(e) = self.registry.touch_manifest(repo, digest).await {
            tracing::warn!(repository = %repo, %digest, error = %e, "could not record a pull");
        }
    }

    /// Whether any proxy project has an eviction policy (then `run_eviction` has work).
    pub fn evicts(&self) -> bool {
        self.all()
            .iter()
            .any(|u| u.settings.max_bytes.is_some() || u.settings.idle.is_some())
    }

    /// Evicts, every `every`, what each project's policy says; runs until the process ends.
    pub async fn run_eviction(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.evict().await {
                tracing::warn!(error = %e, "proxy cache eviction failed");
            }
        }
    }

    /// One eviction pass over every proxy project with a policy: deletes the images not
    /// pulled for `idle`, then, while the project holds more than `max_bytes`, the least
    /// recently pulled; then a collection removes their blobs (a blob another image
    /// references stays). Returns how many manifests were deleted.
    pub async fn evict(&self) -> Result<usize, ProxyError> {
        let mut deleted = 0;
        for upstream in self.all() {
            deleted += evict_project(&self.registry, &upstream.settings).await?;
        }
        if deleted > 0 {
            self.collect().await;
        }
        Ok(deleted)
    }

    async fn collect(&self) {
        match self.registry.collect_garbage(&self.collection).await {
            Ok(report) => tracing::info!(
                blobs = report.blobs_removed.len(),
                bytes = report.bytes_freed,
                "evicted images collected"
            ),
            Err(RegistryError::JobRunning { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "collecting evicted images failed"),
        }
    }
}
