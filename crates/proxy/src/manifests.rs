//! Manifests and referrers of proxy repositories: cached, revalidated by `HEAD` once per
//! tag TTL, fetched by digest, served stale when the upstream fails.

use std::sync::atomic::Ordering;

use berth_client::ClientError;
use berth_oci::{Digest, Reference, RepoName};
use berth_registry::{Actor, RegistryError, StoredManifest};

use crate::{upstream_down, ProxyCache, ProxyError, MAX_REFERRERS};

impl ProxyCache {
    /// A manifest of a proxy repository: cached, revalidated, or fetched and cached; the
    /// pull is recorded for eviction.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest, ProxyError> {
        let manifest = self.find_manifest(repo, reference).await?;
        self.note_pull(repo, &manifest.digest).await;
        Ok(manifest)
    }

    async fn find_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest, ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            return Ok(self.registry.get_manifest(repo, reference).await?);
        };
        let stats = &upstream.stats;
        let key = format!("{repo}:{reference}");
        let cached = || async { self.registry.get_manifest(repo, reference).await.ok() };
        let tag = match reference {
            Reference::Digest(_) => None,
            Reference::Tag(tag) => Some(tag),
        };
        if let Some(local) = cached().await {
            if tag.is_none() || self.fresh(&key, upstream.settings.tag_ttl) {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(local);
            }
        }
        let lock = self.lock_for(&key);
        let _turn = lock.lock().await;
        let local = cached().await;
        if let Some(local) = &local {
            if tag.is_none() || self.fresh(&key, upstream.settings.tag_ttl) {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(local.clone());
            }
        }
        if let Some(local) = &local {
            if upstream.saving_rate_limit() {
                stats.stale_serves.fetch_add(1, Ordering::Relaxed);
                return Ok(local.clone());
            }
        }
        let by = Actor::system("proxy-cache");
        let fetch = async {
            let digest = match reference {
                Reference::Digest(d) => d.clone(),
                Reference::Tag(t) => {
                    match ask!(upstream, c => c.manifest_digest(&path, t.as_str())) {
                        Ok(Some((digest, _, _))) => digest,
                        Ok(None) => return Ok(None),
                        // A HEAD without a digest: ask with a GET.
                        Err(ClientError::Protocol(_)) => {
                            let fetched = ask!(upstream, c => c.manifest(&path, t.as_str()))?;
                            fetched.digest
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if let Some(local) = &local {
                if local.digest == digest {
                    return Ok(Some((local.clone(), false)));
                }
            }
            // By digest: the client checks the bytes against it.
            let fetched = ask!(upstream, c => c.manifest(&path, digest.as_str()))?;
            Ok(Some((
                StoredManifest {
                    digest: fetched.digest,
                    media_type: fetched.media_type,
                    raw: fetched.bytes.to_vec(),
                },
                true,
            )))
        };
        match fetch.await {
            Ok(Some((manifest, fetched))) => {
                if fetched {
                    stats.misses.fetch_add(1, Ordering::Relaxed);
                    stats
                        .bytes_fetched
                        .fetch_add(manifest.raw.len() as u64, Ordering::Relaxed);
                    self.registry
                        .cache_manifest(
                            repo,
                            tag,
                            Some(&manifest.media_type),
                            manifest.raw.clone(),
                            &by,
                        )
                        .await?;
                } else {
                    stats.hits.fetch_add(1, Ordering::Relaxed);
                }
                if tag.is_some() {
                    self.confirm(key);
                }
                Ok(manifest)
            }
            Ok(None) => Err(RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            }
            .into()),
            Err(e) if upstream_down(&e) => match local {
                Some(local) => {
                    tracing::warn!(repository = %repo, reference = %reference, error = %e, "upstream down: serving the cached manifest");
                    stats.stale_serves.fetch_add(1, Ordering::Relaxed);
                    Ok(local)
                }
                None => Err(Self::upstream_error(&upstream, e)),
            },
            Err(ClientError::NotFound(_)) => Err(RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            }
            .into()),
            Err(e) => Err(Self::upstream_error(&upstream, e)),
        }
    }

    /// What a manifest `HEAD` answers: digest, media type and size. Cached content as
    /// [`ProxyCache::manifest`] serves it; otherwise the upstream's own `HEAD`, so a
    /// client's `HEAD` never becomes a `GET` upstream (registries that ration pulls count
    /// GETs).
    pub async fn manifest_head(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, String, u64), ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            let m = self.registry.get_manifest(repo, reference).await?;
            return Ok((m.digest, m.media_type, m.raw.len() as u64));
        };
        let key = format!("{repo}:{reference}");
        let local = self.registry.get_manifest(repo, reference).await.ok();
        let of = |m: &StoredManifest| (m.digest.clone(), m.media_type.clone(), m.raw.len() as u64);
        if let Some(local) = &local {
            let fresh = matches!(reference, Reference::Digest(_))
                || self.fresh(&key, upstream.settings.tag_ttl)
                || upstream.saving_rate_limit();
            if fresh {
                upstream.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(of(local));
            }
        }
        let asked = reference.to_string();
        match ask!(upstream, c => c.manifest_digest(&path, &asked)) {
            Ok(Some((digest, media_type, size))) => {
                if let Some(local) = local.filter(|l| l.digest == digest) {
                    if matches!(reference, Reference::Tag(_)) {
                        self.confirm(key);
                    }
                    upstream.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(of(&local));
                }
                match size {
                    Some(size) => Ok((digest, media_type, size)),
                    // No length said: fetch (and cache) it to know.
                    None => self.manifest(repo, reference).await.map(|m| of(&m)),
                }
            }
            Ok(None) | Err(ClientError::NotFound(_)) => Err(RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            }
            .into()),
            Err(e) if upstream_down(&e) => match local {
                Some(local) => {
                    upstream.stats.stale_serves.fetch_add(1, Ordering::Relaxed);
                    Ok(of(&local))
                }
                None => Err(Self::upstream_error(&upstream, e)),
            },
            Err(e) => Err(Self::upstream_error(&upstream, e)),
        }
    }

    /// Brings the cache's referrers of `subject` up to date with the upstream's (at most
    /// once per tag TTL per subject, and the first [`MAX_REFERRERS`] of them): each
    /// referrer manifest not cached yet is fetched by digest and cached, so the listing
    /// the registry answers from includes it. An upstream that fails leaves the cached
    /// listing as it is.
    pub async fn sync_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<(), ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            return Ok(());
        };
        let key = format!("referrers {repo}@{subject}");
        if self.fresh(&key, upstream.settings.tag_ttl) || upstream.saving_rate_limit() {
            return Ok(());
        }
        let lock = self.lock_for(&key);
        let _turn = lock.lock().await;
        if self.fresh(&key, upstream.settings.tag_ttl) {
            return Ok(());
        }
        let listed = match ask!(upstream, c => c.referrers(&path, subject)) {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(repository = %repo, %subject, error = %e, "upstream referrers unavailable: answering from the cache");
                return Ok(());
            }
        };
        let by = Actor::system("proxy-cache");
        for descriptor in listed.iter().take(MAX_REFERRERS) {
            let Some(digest) = descriptor["digest"]
                .as_str()
                .and_then(|d| Digest::parse(d).ok())
            else {
                continue;
            };
            let reference = Reference::Digest(digest.clone());
            if self.registry.get_manifest(repo, &reference).await.is_ok() {
                continue;
            }
            let fetched = ask!(upstream, c => c.manifest(&path, digest.as_str()));
            match fetched {
                Ok(m) => {
                    upstream.stats.misses.fetch_add(1, Ordering::Relaxed);
                    self.registry
                        .cache_manifest(repo, None, Some(&m.media_type), m.bytes.to_vec(), &by)
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(repository = %repo, %digest, error = %e, "a referrer could not be fetched");
                }
            }
        }
        self.confirm(key);
        Ok(())
    }
}
