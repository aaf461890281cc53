//! Blobs of proxy repositories the cache does not hold yet: a `HEAD` or a range asked of
//! the upstream, or the one fill every client reads.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_client::ClientError;
use berth_oci::{Digest, RepoName};
use berth_registry::{Actor, BlobBytes, BlobRead, Registry, RegistryError};

use berth_storage::ByteStream;

use crate::eviction::evict_project;
use crate::fill::Fill;
use crate::{upstream_down, FillKey, ProxyCache, ProxyError, Upstream};

/// The longest a blob fetch waits for a turn under `max_concurrent_fetches`.
pub const FETCH_QUEUE_WAIT: Duration = Duration::from_secs(60);

impl ProxyCache {
    /// The size of a blob the cache does not hold, from an upstream `HEAD` (never a GET).
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, ProxyError> {
        let unknown = || {
            ProxyError::Registry(RegistryError::BlobUnknown {
                digest: digest.clone(),
            })
        };
        let Some((upstream, path)) = self.route(repo) else {
            return Err(unknown());
        };
        match ask!(upstream, c => c.blob_size(&path, digest)) {
            Ok(Some(size)) => Ok(size),
            Ok(None) | Err(ClientError::NotFound(_)) => Err(unknown()),
            Err(e) => Err(Self::upstream_error(&upstream, e)),
        }
    }

    /// A range of a blob the cache does not hold, asked of the upstream as the client
    /// asked it (`bytes=…`): its `Content-Range`, length and bytes, or `None` when the
    /// blob is being filled or the upstream answers ranges with the whole blob (then the
    /// whole blob is served, through a fill).
    pub async fn blob_range(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: &str,
    ) -> Result<Option<(String, u64, ByteStream)>, ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            return Ok(None);
        };
        let filling = self
            .fills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(upstream.settings.project.clone(), digest.clone()));
        if filling {
            return Ok(None);
        }
        match ask!(upstream, c => c.blob_range(&path, digest, range)) {
            Ok(Some((content_range, length, stream))) => {
                upstream.stats.misses.fetch_add(1, Ordering::Relaxed);
                let counted = upstream.clone();
                let stream = futures_util::StreamExt::map(stream, move |chunk| {
                    let chunk = chunk.map_err(std::io::Error::other)?;
                    counted
                        .stats
                        .bytes_fetched
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    Ok(chunk)
                });
                Ok(Some((content_range, length, Box::pin(stream))))
            }
            Ok(None) => Ok(None),
            Err(ClientError::NotFound(_)) => Err(RegistryError::BlobUnknown {
                digest: digest.clone(),
            }
            .into()),
            Err(e) => Err(Self::upstream_error(&upstream, e)),
        }
    }

    /// A blob the cache does not hold yet: its size and its bytes as they arrive from the
    /// one fill of it under way (started here if there is none).
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(u64, ByteStream), ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            return Err(RegistryError::BlobUnknown {
                digest: digest.clone(),
            }
            .into());
        };
        let key = (upstream.settings.project.clone(), digest.clone());
        let fill = {
            let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
            match fills.get(&key) {
                // A fill that failed is being taken down: a new request starts afresh.
                Some(fill) if !fill.failed() => fill.clone(),
                _ => {
                    let file = tempfile::tempfile_in(&self.spill_dir).map_err(|e| {
                        ProxyError::Registry(berth_storage::StorageError::Io(e).into())
                    })?;
                    let fill = Arc::new(Fill::new(file));
                    fills.insert(key.clone(), fill.clone());
                    upstream.stats.misses.fetch_add(1, Ordering::Relaxed);
                    self.start_fill(upstream.clone(), path, repo.clone(), key, fill.clone());
                    fill
                }
            }
        };
        let size = fill.size().await.map_err(|e| match e {
            ClientError::NotFound(_) => ProxyError::Registry(RegistryError::BlobUnknown {
                digest: digest.clone(),
            }),
            e => Self::upstream_error(&upstream, e),
        })?;
        let stats = upstream.clone();
        let counted = fill.reader(move |n| {
            stats.stats.bytes_served.fetch_add(n, Ordering::Relaxed);
        });
        Ok((size, counted))
    }

    /// Fetches `key`'s blob into `fill` on a task of its own (it outlives the request
    /// that started it), then stores it in `repo` and forgets the fill.
    fn start_fill(
        &self,
        upstream: Arc<Upstream>,
        path: String,
        repo: RepoName,
        key: FillKey,
        fill: Arc<Fill>,
    ) {
        let registry = self.registry.clone();
        let fills = self.fills.clone();
        let collection = self.collection.clone();
        tokio::spawn(async move {
            let stats = &upstream.stats;
            stats.fills_in_flight.fetch_add(1, Ordering::Relaxed);
            let digest = key.1.clone();
            // Nodes sharing a store fetch a blob once: the one holding this lease does;
            // another waits for the blob to appear in the shared store and serves its
            // clients from there.
            let lease = format!("proxy-fill {} {digest}", key.0);
            match from_peer(&registry, &lease, &repo, &digest).await {
                Ok(Some(read)) => {
                    let copied = copy_into(&fill, read, &digest).await;
                    if let Err(e) = copied {
                        tracing::warn!(repository = %repo, %digest, error = %e, "serving a blob another node fetched failed");
                    }
                    forget(&fills, &key, &fill);
                    stats.fills_in_flight.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(repository = %repo, %digest, error = %e, "no fill lease: fetching anyway");
                }
            }
            let renewing = {
                let (registry, lease) = (registry.clone(), lease.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(FILL_LEASE / 3).await;
                        let _ = registry.try_lease(&lease, FILL_LEASE).await;
                    }
                })
            };
            let fetched = async {
                // Waiting for a turn is bounded: past it the pull fails rather than
                // queueing without end behind a slow upstream.
                let turn = tokio::time::timeout(FETCH_QUEUE_WAIT, upstream.fetches.acquire()).await;
                let _turn = match turn {
                    Ok(permit) => permit.ok(),
                    Err(_) => {
                        let e = ClientError::Unreachable(format!(
                            "{} fetches from this upstream are under way; waited {} s for a turn",
                            upstream.settings.max_concurrent_fetches,
                            FETCH_QUEUE_WAIT.as_secs()
                        ));
                        fill.fail(&e);
                        return Err(e);
                    }
                };
                let fetched = ask!(upstream, c => c.fetch_blob_unverified(&path, &digest));
                let (size, stream) = match fetched {
                    Ok(answer) => answer,
                    Err(e) => {
                        fill.fail(&e);
                        return Err(e);
                    }
                };
                fill.run(size, stream, Some(&digest), |n| {
                    stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
                })
                .await
            }
            .await;
            match fetched {
                Ok(size) => {
                    let by = Actor::system("proxy-cache");
                    let stored = registry
                        .push_verified_file(&repo, &digest, fill.file(), size, &by)
                        .await;
                    if let Err(e) = stored {
                        tracing::warn!(repository = %repo, %digest, error = %e, "a fetched blob could not be cached");
                    }
                    if let Some(max) = upstream.settings.max_bytes {
                        let over = registry
                            .project_bytes(&upstream.settings.project)
                            .await
                            .is_ok_and(|bytes| bytes > max);
                        if over {
                            match evict_project(&registry, &upstream.settings).await {
                                Ok(0) => {}
                                Ok(_) => {
                                    if let Err(e) = registry.collect_garbage(&collection).await {
                                        tracing::warn!(error = %e, "collecting evicted images failed");
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "proxy cache eviction failed"),
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(repository = %repo, %digest, error = %e, "fetching a blob from upstream failed");
                }
            }
            renewing.abort();
            let _ = registry.release_lease(&lease).await;
            forget(&fills, &key, &fill);
            stats.fills_in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Removes `fill` from the fills under way, unless a newer fill of the same blob took
/// its place there.
fn forget(fills: &Mutex<HashMap<FillKey, Arc<Fill>>>, key: &FillKey, fill: &Arc<Fill>) {
    let mut fills = fills.lock().unwrap_or_else(|e| e.into_inner());
    if fills
        .get(key)
        .is_some_and(|current| Arc::ptr_eq(current, fill))
    {
        fills.remove(key);
    }
}

/// How long a node's claim to fetch a blob lasts unless renewed (it is renewed every
/// third of that while the fetch runs).
const FILL_LEASE: Duration = Duration::from_secs(30);

/// The longest a node waits for another node's fetch of a blob.
const PEER_WAIT: Duration = Duration::from_secs(600);

/// `None` when this node should fetch the blob (it holds the lease now); the blob as
/// the shared store holds it when another node fetched it meanwhile.
async fn from_peer(
    registry: &Registry,
    lease: &str,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Option<BlobRead>, RegistryError> {
    let started = Instant::now();
    loop {
        if registry.try_lease(lease, FILL_LEASE).await? {
            // Between our miss and the lease another node may have finished.
            return match registry.read_blob(repo, digest, None).await {
                Ok(read) => {
                    let _ = registry.release_lease(lease).await;
                    Ok(Some(read))
                }
                Err(_) => Ok(None),
            };
        }
        if let Ok(read) = registry.read_blob(repo, digest, None).await {
            return Ok(Some(read));
        }
        if started.elapsed() > PEER_WAIT {
            return Err(RegistryError::BlobBusy {
                digest: digest.clone(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serves a blob the store holds through `fill`, checked against its digest again.
async fn copy_into(fill: &Fill, read: BlobRead, digest: &Digest) -> Result<u64, ClientError> {
    let stream = match read.body {
        BlobBytes::Stream(stream) => stream,
        BlobBytes::File { file, start, len } => berth_storage::stream_file_range(file, start, len)
            .map_err(|e| ClientError::Protocol(e.to_string()))?,
    };
    fill.run(read.size, stream, Some(digest), |_| {}).await
}
