//! Manifest pushes and pulls, tags, the catalog and referrers.

use berth_meta::{Actor, NewManifest, Page, Referrer, StoredManifest};
use berth_oci::{media_type, Digest, ParsedManifest, Reference, RepoName};
use serde_json::{json, Value};

use berth_meta::read_cache;

use crate::{manifest_cache, Registry, RegistryError};

/// What a manifest push produced, for the response headers.
#[derive(Debug, Clone)]
pub struct ManifestPushed {
    /// The manifest's digest (of the exact bytes).
    pub digest: Digest,
    /// Its subject, echoed as `OCI-Subject` so clients know referrers are supported.
    pub subject: Option<Digest>,
}

/// A referrers listing.
#[derive(Debug, Clone)]
pub struct ReferrersIndex {
    /// The referring manifests.
    pub manifests: Vec<Referrer>,
    /// Whether an `artifactType` filter was applied (reported in `OCI-Filters-Applied`).
    pub filtered: bool,
}

impl ReferrersIndex {
    /// The listing as the OCI image index the spec requires.
    pub fn to_json(&self) -> Vec<u8> {
        let manifests: Vec<Value> = self
            .manifests
            .iter()
            .map(|r| {
                let mut d = json!({ "mediaType": r.media_type, "digest": r.digest.as_str(), "size": r.size });
                if let Some(t) = &r.artifact_type {
                    d["artifactType"] = json!(t);
                }
                if let Some(a) = r.annotations_json.as_deref().and_then(|a| serde_json::from_str::<Value>(a).ok()) {
                    d["annotations"] = a;
                }
                d
            })
            .collect();
        let index = json!({ "schemaVersion": 2, "mediaType": media_type::OCI_INDEX, "manifests": manifests });
        serde_json::to_vec(&index).expect("a JSON value serialises")
    }
}

impl Registry {
    /// Accepts a manifest: size limit, parse and validate, digest check when pushed by
    /// digest, then one metadata transaction that checks every referenced blob and child.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        raw: Vec<u8>,
        by: &Actor,
    ) -> Result<ManifestPushed, RegistryError> {
        let mut record = self.new_manifest(content_type, raw)?;
        let tag = match reference {
            Reference::Digest(d) if !d.matches(&record.raw) => {
                return Err(RegistryError::DigestMismatch {
                    expected: d.clone(),
                    actual: record.digest,
                });
            }
            // Kept under the digest it was pushed by (its algorithm may not be SHA-256).
            Reference::Digest(d) => {
                record.digest = d.clone();
                None
            }
            Reference::Tag(t) => Some(t),
        };
        let pushed = ManifestPushed {
            digest: record.digest.clone(),
            subject: record.subject.clone(),
        };
        self.meta.put_manifest(repo, record, tag, by).await?;
        Ok(pushed)
    }

    /// Stores a manifest a pull-through cache fetched from its upstream (its bytes
    /// already checked against the digest asked for): limited and parsed as a push is,
    /// but its blobs may arrive later, when clients ask for them. Returns its digest.
    pub async fn cache_manifest(
        &self,
        repo: &RepoName,
        tag: Option<&berth_oci::Tag>,
        content_type: Option<&str>,
        raw: Vec<u8>,
        by: &Actor,
    ) -> Result<Digest, RegistryError> {
        let record = self.new_manifest(content_type, raw)?;
        let digest = record.digest.clone();
        self.meta.put_cached_manifest(repo, record, tag, by).await?;
        Ok(digest)
    }

    /// A manifest as the metadata store takes it: within the size limit, parsed and
    /// validated, digested (SHA-256 of the exact bytes).
    fn new_manifest(
        &self,
        content_type: Option<&str>,
        raw: Vec<u8>,
    ) -> Result<NewManifest, RegistryError> {
        let limit = self.limits.max_manifest_bytes;
        if raw.len() > limit {
            return Err(RegistryError::ManifestTooLarge {
                size: raw.len(),
                limit,
            });
        }
        let parsed = ParsedManifest::parse(&raw, content_type)?;
        let annotations_json = parsed
            .annotations
            .as_ref()
            .map(|a| serde_json::to_string(a).expect("annotations serialise"));
        Ok(NewManifest {
            digest: Digest::sha256_of(&raw),
            media_type: parsed.media_type,
            artifact_type: parsed.artifact_type,
            subject: parsed.subject,
            annotations_json,
            edges: parsed.edges,
            raw,
        })
    }

    /// Records that a manifest was pulled (pull-through caches evict the least recently
    /// pulled first).
    pub async fn touch_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), RegistryError> {
        Ok(self.meta.touch_manifest(repo, digest).await?)
    }

    /// `project`'s manifests, least recently pulled first (at most `limit`).
    pub async fn least_recently_pulled(
        &self,
        project: &str,
        limit: usize,
    ) -> Result<Vec<berth_meta::CachedManifest>, RegistryError> {
        Ok(self.meta.least_recently_pulled(project, limit).await?)
    }

    /// The bytes of the distinct blobs `project`'s repositories hold.
    pub async fn project_bytes(&self, project: &str) -> Result<u64, RegistryError> {
        Ok(self.meta.project_bytes(project).await?)
    }

    /// A manifest by tag or digest, with its stored bytes.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest, RegistryError> {
        // By digest, a copy read within the cache's TTL (see `manifest_cache`); by tag,
        // on a node that alone writes its metadata, one no write has overtaken since
        // (see `read_cache`).
        let cached_tag = match reference {
            Reference::Digest(digest) => {
                if let Some(cached) = self.manifests.get(repo.as_str(), digest) {
                    return Ok(cached);
                }
                None
            }
            Reference::Tag(tag) if self.meta.node_local() => {
                if let Some(cached) =
                    self.tags
                        .get(repo.as_str(), tag.as_str(), self.meta.changes())
                {
                    return Ok(cached);
                }
                Some(tag)
            }
            Reference::Tag(_) => None,
        };
        let start = self.manifests.read_start();
        let began = read_cache::ReadBegan::now(self.meta.changes());
        let manifest = self
            .meta
            .get_manifest(repo, reference)
            .await?
            .ok_or_else(|| RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            })?;
        match cached_tag {
            None if matches!(reference, Reference::Digest(_)) => {
                self.manifests.put(repo.as_str(), &manifest, start);
            }
            Some(tag) if manifest.raw.len() <= manifest_cache::LARGEST => {
                self.tags.put(
                    repo.as_str(),
                    tag.as_str(),
                    manifest.clone(),
                    began,
                    self.meta.changes(),
                );
            }
            _ => {}
        }
        Ok(manifest)
    }

    /// Deletes by digest (the manifest and all its tags) or by tag (only that tag).
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        by: &Actor,
    ) -> Result<(), RegistryError> {
        let existed = match reference {
            Reference::Digest(d) => {
                let existed = self.meta.delete_manifest(repo, d, by).await;
                self.manifests.forget(repo.as_str(), d);
                existed?
            }
            Reference::Tag(t) => self.meta.delete_tag(repo, t, by).await?,
        };
        if existed {
            Ok(())
        } else {
            Err(RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            })
        }
    }

    /// Tags of `repo` in lexical order, one page.
    pub async fn list_tags(
        &self,
        repo: &RepoName,
        page: Page<'_>,
    ) -> Result<Vec<String>, RegistryError> {
        self.meta
            .list_tags(repo, page)
            .await?
            .ok_or_else(|| RegistryError::NameUnknown {
                name: repo.to_string(),
            })
    }

    /// Repository names in lexical order, one page; only those in the `within` projects
    /// when given (what the caller may see).
    pub async fn catalog(
        &self,
        page: Page<'_>,
        within: Option<&[String]>,
    ) -> Result<Vec<String>, RegistryError> {
        Ok(self.meta.catalog(page, within).await?)
    }

    /// `project`'s repositories after `after` in name order, at most `limit`, with their
    /// tag and manifest counts, bytes and last push.
    pub async fn repositories(
        &self,
        project: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<berth_meta::RepositorySummary>, RegistryError> {
        Ok(self.meta.repositories(project, after, limit).await?)
    }

    /// The tags pointed last, newest first, at most `limit`, in every repository: the
    /// caller filters them by what its reader may see.
    pub async fn recent_tags(
        &self,
        limit: usize,
    ) -> Result<Vec<berth_meta::RecentTag>, RegistryError> {
        Ok(self.meta.recent_tags(limit).await?)
    }

    /// The projects (first path segments) repositories exist in, at most `limit`, in
    /// order: what a registry without access control lists as its projects.
    pub async fn repository_projects(&self, limit: usize) -> Result<Vec<String>, RegistryError> {
        Ok(self.meta.repository_projects(limit).await?)
    }

    /// When the last garbage collection ran, and what it removed.
    pub async fn last_collection(&self) -> Result<Option<(i64, String)>, RegistryError> {
        Ok(self.meta.last_collection().await?)
    }

    /// A page of `repo`'s tags (after `after`, starting with `prefix`) with their
    /// manifests, for listings.
    pub async fn tag_details(
        &self,
        repo: &RepoName,
        after: Option<&str>,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<berth_meta::TagDetail>, RegistryError> {
        Ok(self.meta.tag_details(repo, after, prefix, limit).await?)
    }

    /// Deletes a repository: its manifests and tags (each deletion recorded, so webhooks
    /// and replication follow) and its blob links; the bytes go with the next garbage
    /// collection. Returns how many manifests went.
    pub async fn delete_repository(
        &self,
        repo: &RepoName,
        by: &Actor,
    ) -> Result<u64, RegistryError> {
        let deleted = self.meta.delete_repository(repo, by).await;
        self.manifests.forget_repository(repo.as_str());
        deleted?.ok_or_else(|| RegistryError::NameUnknown {
            name: repo.to_string(),
        })
    }

    /// Manifests in `repo` that refer to `subject`. Never "unknown": a subject without
    /// referrers (or not pushed yet) has an empty list, as the spec requires.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<ReferrersIndex, RegistryError> {
        let manifests = self.meta.referrers(repo, subject, artifact_type).await?;
        Ok(ReferrersIndex {
            manifests,
            filtered: artifact_type.is_some(),
        })
    }
}
