//! Blob pulls, uploads, mounts and unlinks.

use std::time::Duration;

use berth_meta::{Actor, BlobArrival, MetaError, StoredManifest};
use berth_oci::{Digest, Reference, RepoName};
use berth_storage::{ByteRange, ByteStream, UploadId};
use bytes::Bytes;

use berth_meta::read_cache;

use crate::{now_ms, Registry, RegistryError};

/// A blob confirmed by HEAD is touched at most this often (ms), to keep HEAD a read.
const TOUCH_AFTER_MS: i64 = 60_000;
/// How long a push waits for a live collection to finish deleting the same digest.
const RESERVE_PATIENCE: Duration = Duration::from_secs(5);

/// A `Range` request in the forms the edge parsed (`bytes=a-b`, `bytes=a-`, `bytes=-n`),
/// resolved against the blob's size here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// From `start` to `end` (inclusive) or to the end of the blob.
    From {
        /// First byte.
        start: u64,
        /// Last byte, inclusive, if given.
        end: Option<u64>,
    },
    /// The last `len` bytes.
    Suffix {
        /// How many.
        len: u64,
    },
}

impl RangeRequest {
    /// The bytes this request covers in a blob of `size` bytes (RFC 9110 §14.1.2).
    pub fn resolve(self, size: u64) -> Result<ByteRange, RegistryError> {
        let unsatisfiable = RegistryError::RangeNotSatisfiable { size };
        match self {
            RangeRequest::From { start, end } => {
                if start >= size || end.is_some_and(|e| e < start) {
                    return Err(unsatisfiable);
                }
                let end = end.map_or(size - 1, |e| e.min(size - 1));
                Ok(ByteRange { start, end })
            }
            RangeRequest::Suffix { len } => {
                if len == 0 || size == 0 {
                    return Err(unsatisfiable);
                }
                Ok(ByteRange {
                    start: size.saturating_sub(len),
                    end: size - 1,
                })
            }
        }
    }
}

/// A blob ready to be sent.
pub struct BlobRead {
    /// The whole blob's size.
    pub size: u64,
    /// The part being sent, if a range was asked for.
    pub range: Option<ByteRange>,
    /// The bytes.
    pub body: BlobBytes,
}

/// Where a blob's bytes come from.
pub enum BlobBytes {
    /// A stream (object storage, manifests read as blobs).
    Stream(ByteStream),
    /// `len` bytes of a local file from `start`, which the HTTP edge hands to the kernel.
    File {
        /// The blob's file.
        file: std::fs::File,
        /// First byte to send.
        start: u64,
        /// Bytes to send.
        len: u64,
    },
}

/// What a cross-repository mount did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    /// The blob is now visible in the target repository.
    Mounted,
    /// The blob could not be mounted; the client must upload it.
    NotMountable,
}

impl Registry {
    /// The size of a blob visible in `repo`. Manifests are readable as blobs too, as in
    /// Distribution.
    pub async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64, RegistryError> {
        // A live link implies published bytes: bytes are renamed into place before the
        // link commits and deleted only after garbage collection removed the link. So no
        // second look at storage here (`berth check` finds bytes lost behind our back).
        // On a node that alone writes its metadata, an answer no write has overtaken
        // (`read_cache`), while it needs no touch.
        let cached = self.meta.node_local();
        if cached {
            if let Some(linked) =
                self.links
                    .get(repo.as_str(), digest.as_str(), self.meta.changes())
            {
                if now_ms() - linked.last_used_ms <= TOUCH_AFTER_MS {
                    return Ok(linked.size);
                }
            }
        }
        let began = read_cache::ReadBegan::now(self.meta.changes());
        if let Some(mut linked) = self.meta.linked_blob(repo, digest).await? {
            // A client checking for a blob usually references it next: keep it out of
            // garbage collection's reach for another grace period.
            if now_ms() - linked.last_used_ms > TOUCH_AFTER_MS {
                self.meta.touch_blob(digest).await?;
                linked.last_used_ms = now_ms();
            }
            if cached {
                self.links.put(
                    repo.as_str(),
                    digest.as_str(),
                    linked,
                    began,
                    self.meta.changes(),
                );
            }
            return Ok(linked.size);
        } else if let Some(m) = self.manifest_as_blob(repo, digest).await? {
            return Ok(m.raw.len() as u64);
        }
        Err(RegistryError::BlobUnknown {
            digest: digest.clone(),
        })
    }

    /// A blob's bytes, whole or a range.
    pub async fn read_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<RangeRequest>,
    ) -> Result<BlobRead, RegistryError> {
        if self.meta.linked_blob(repo, digest).await?.is_some() {
            if let Some(local) = self.blobs.open_local(digest).await? {
                let size = local.size;
                let range = range.map(|r| r.resolve(size)).transpose()?;
                let (start, len) = range.map_or((0, size), |r| (r.start, r.len()));
                let body = BlobBytes::File {
                    file: local.file,
                    start,
                    len,
                };
                return Ok(BlobRead { size, range, body });
            }
            if let Some(size) = self.blobs.stat(digest).await? {
                let range = range.map(|r| r.resolve(size)).transpose()?;
                if let Some(stream) = self.blobs.read(digest, range).await? {
                    let body = BlobBytes::Stream(stream);
                    return Ok(BlobRead { size, range, body });
                }
            }
        } else if let Some(m) = self.manifest_as_blob(repo, digest).await? {
            let size = m.raw.len() as u64;
            let range = range.map(|r| r.resolve(size)).transpose()?;
            let bytes = match range {
                Some(r) => Bytes::from(m.raw).slice(r.start as usize..=r.end as usize),
                None => Bytes::from(m.raw),
            };
            let body = BlobBytes::Stream(Box::pin(futures_util::stream::once(
                async move { Ok(bytes) },
            )));
            return Ok(BlobRead { size, range, body });
        }
        Err(RegistryError::BlobUnknown {
            digest: digest.clone(),
        })
    }

    /// Where the client may download the blob directly (a pre-signed object store URL),
    /// if the blob store redirects downloads and `repo` may see the blob.
    pub async fn blob_redirect(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<String>, RegistryError> {
        if self.meta.linked_blob(repo, digest).await?.is_none() {
            return Ok(None);
        }
        Ok(self.blobs.direct_url(digest).await?)
    }

    async fn manifest_as_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<StoredManifest>, RegistryError> {
        Ok(self
            .meta
            .get_manifest(repo, &Reference::Digest(digest.clone()))
            .await?)
    }

    /// Opens an upload session in `repo` for `by`, within its cap of open sessions. The
    /// staging area and the session record are created at once; if one fails, the other
    /// is left to the upload purge.
    pub async fn start_upload(
        &self,
        repo: &RepoName,
        by: &Actor,
    ) -> Result<UploadId, RegistryError> {
        let id = UploadId::new_random();
        let max = self.limits.max_open_uploads;
        if !self.uploads.take(by, id.as_str(), max) {
            return Err(RegistryError::TooManyUploads { max });
        }
        let (staged, recorded) = tokio::join!(
            self.blobs.start_upload(&id),
            self.meta.record_upload(id.as_str(), repo)
        );
        staged?;
        recorded?;
        Ok(id)
    }

    /// Checks that `id` names an open session of `repo`: a session id from another
    /// repository must not let a client write there.
    async fn own_upload(&self, repo: &RepoName, id: &str) -> Result<UploadId, RegistryError> {
        let unknown = || RegistryError::UploadUnknown {
            id: id.chars().take(100).collect(),
        };
        let id = UploadId::parse(id).ok_or_else(unknown)?;
        match self.meta.upload_repo(id.as_str()).await? {
            Some(owner) if owner == repo.as_str() => Ok(id),
            _ => Err(unknown()),
        }
    }

    /// How many bytes the session holds.
    pub async fn upload_status(
        &self,
        repo: &RepoName,
        id: &str,
    ) -> Result<(UploadId, u64), RegistryError> {
        let id = self.own_upload(repo, id).await?;
        let len = self.blobs.upload_len(&id).await?;
        Ok((id, len))
    }

    /// Appends a chunk. `start` is where the client says it begins (`Content-Range`); a
    /// chunk without one is appended at the end (streamed upload).
    pub async fn append_upload(
        &self,
        repo: &RepoName,
        id: &str,
        start: Option<u64>,
        body: ByteStream,
    ) -> Result<(UploadId, u64), RegistryError> {
        let id = self.own_upload(repo, id).await?;
        let offset = match start {
            Some(s) => s,
            None => self.blobs.upload_len(&id).await?,
        };
        let len = self.blobs.append(&id, offset, body).await?;
        Ok((id, len))
    }

    /// Completes a session: appends the final chunk if any, verifies the digest, publishes
    /// the blob and links it into `repo`.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        final_chunk: Option<(Option<u64>, ByteStream)>,
        by: &Actor,
    ) -> Result<u64, RegistryError> {
        let id = self.own_upload(repo, id).await?;
        let size = self.publish_upload(&id, final_chunk, digest).await?;
        self.uploads.release(id.as_str());
        self.link_published_blob(repo, digest, size, Some(&id), by)
            .await?;
        Ok(size)
    }

    /// Verifies and publishes a session's bytes under `digest`, announcing the publication
    /// to the metadata store first (ARCHITECTURE.md, "A push publishes a blob"). The
    /// announcement runs while the bytes are flushed to disk. It is made only once the
    /// digest matched, and as late as possible: the window in which a collection could
    /// take it for garbage (with a grace period shorter than an upload) stays as short as
    /// a commit.
    async fn publish_upload(
        &self,
        id: &UploadId,
        final_chunk: Option<(Option<u64>, ByteStream)>,
        digest: &Digest,
    ) -> Result<u64, RegistryError> {
        let sealed = self.blobs.seal(id, final_chunk, digest).await?;
        if let Err(e) = self.reserve_blob(digest).await {
            sealed.abandon().await;
            return Err(e);
        }
        Ok(sealed.publish().await?)
    }

    /// Cancels a session and drops its bytes.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<(), RegistryError> {
        let id = self.own_upload(repo, id).await?;
        match self.blobs.abort(&id).await {
            Ok(()) | Err(berth_storage::StorageError::UploadUnknown(_)) => {}
            Err(e) => return Err(e.into()),
        }
        self.meta.forget_upload(id.as_str()).await?;
        self.uploads.release(id.as_str());
        Ok(())
    }

    /// A single-request upload (`POST ?digest=` with the body).
    pub async fn push_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: ByteStream,
        by: &Actor,
    ) -> Result<u64, RegistryError> {
        let id = UploadId::new_random();
        self.blobs.start_upload(&id).await?;
        let result = self
            .publish_upload(&id, Some((Some(0), body)), digest)
            .await;
        match result {
            Ok(size) => {
                self.link_published_blob(repo, digest, size, None, by)
                    .await?;
                Ok(size)
            }
            Err(e) => {
                if let Err(abort) = self.blobs.abort(&id).await {
                    tracing::warn!(upload = %id, error = %abort, "could not drop a failed monolithic upload");
                }
                Err(e)
            }
        }
    }

    /// Stores a blob whose bytes the caller already verified against `digest`, held in
    /// `file` (a pull-through fill's spill file): linked into the store where the backend
    /// can, so a fetched blob is neither copied nor hashed a second time; streamed and
    /// verified as any push elsewhere.
    pub async fn push_verified_file(
        &self,
        repo: &RepoName,
        digest: &Digest,
        file: &std::fs::File,
        size: u64,
        by: &Actor,
    ) -> Result<u64, RegistryError> {
        let id = UploadId::new_random();
        let Some(sealed) = self
            .blobs
            .seal_verified_file(&id, file, size, digest)
            .await?
        else {
            let body = file
                .try_clone()
                .and_then(|file| berth_storage::stream_file_range(file, 0, size))
                .map_err(berth_storage::StorageError::Io)?;
            return self.push_blob(repo, digest, body, by).await;
        };
        let published = match self.reserve_blob(digest).await {
            Ok(()) => sealed.publish().await.map_err(RegistryError::from),
            Err(e) => {
                sealed.abandon().await;
                Err(e)
            }
        };
        match published {
            Ok(size) => {
                self.link_published_blob(repo, digest, size, None, by)
                    .await?;
                Ok(size)
            }
            Err(e) => {
                if let Err(abort) = self.blobs.abort(&id).await {
                    tracing::warn!(upload = %id, error = %abort, "could not drop a fetched blob that failed to publish");
                }
                Err(e)
            }
        }
    }

    /// Announces the publication of `digest` to the metadata store before the bytes are
    /// renamed into place (the first step of the protocol in ARCHITECTURE.md). While a
    /// live collection is deleting the same digest, waits (a bounded time) for it to
    /// finish; if the collection that marked it is gone, finishes that digest's deletion
    /// itself, at once.
    async fn reserve_blob(&self, digest: &Digest) -> Result<(), RegistryError> {
        let deadline = std::time::Instant::now() + RESERVE_PATIENCE;
        let mut checked_collector = false;
        loop {
            match self.meta.reserve_blob(digest).await {
                Ok(()) => return Ok(()),
                Err(MetaError::BlobBeingDeleted) if !checked_collector => {
                    checked_collector = true;
                    if !self.collection_running().await? {
                        let one = std::slice::from_ref(digest);
                        self.blobs.delete_many(one).await?;
                        self.meta.forget_deleted_blobs(one).await?;
                    }
                }
                Err(MetaError::BlobBeingDeleted) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(MetaError::BlobBeingDeleted) => {
                    return Err(RegistryError::BlobBusy {
                        digest: digest.clone(),
                    })
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Links freshly published bytes into `repo`. If a collection marked the digest in
    /// between (possible only with a grace period shorter than a commit), the client is told
    /// to retry rather than given a link to bytes about to disappear.
    async fn link_published_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        upload: Option<&UploadId>,
        by: &Actor,
    ) -> Result<(), RegistryError> {
        let arrival = BlobArrival::Uploaded {
            session: upload.map(UploadId::as_str),
        };
        match self.meta.link_blob(repo, digest, size, arrival, by).await {
            Ok(()) => Ok(()),
            Err(MetaError::BlobBeingDeleted) => Err(RegistryError::BlobBusy {
                digest: digest.clone(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Cross-repository mount. With `from`, the blob must be visible there; without, any
    /// repository holding it will do (spec 1.1). The bytes must exist either way.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
        by: &Actor,
    ) -> Result<MountOutcome, RegistryError> {
        let visible = match from {
            Some(source) => self.meta.linked_blob(source, digest).await?.map(|b| b.size),
            None => self.meta.any_linked_blob_size(digest).await?,
        };
        if visible.is_none() {
            return Ok(MountOutcome::NotMountable);
        }
        let Some(size) = self.blobs.stat(digest).await? else {
            return Ok(MountOutcome::NotMountable);
        };
        match self
            .meta
            .link_blob(repo, digest, size, BlobArrival::Mounted, by)
            .await
        {
            Ok(()) => Ok(MountOutcome::Mounted),
            // Being collected: the client uploads it instead.
            Err(MetaError::BlobBeingDeleted) => Ok(MountOutcome::NotMountable),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the blob from `repo`'s view. The bytes stay until garbage collection finds
    /// them unreferenced everywhere.
    pub async fn delete_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        by: &Actor,
    ) -> Result<(), RegistryError> {
        if self.meta.unlink_blob(repo, digest, by).await? {
            Ok(())
        } else {
            Err(RegistryError::BlobUnknown {
                digest: digest.clone(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_per_rfc() {
        let r = |start, end| RangeRequest::From { start, end };
        assert_eq!(
            r(0, Some(9)).resolve(100).unwrap(),
            ByteRange { start: 0, end: 9 }
        );
        assert_eq!(
            r(90, Some(500)).resolve(100).unwrap(),
            ByteRange { start: 90, end: 99 }
        );
        assert_eq!(
            r(10, None).resolve(100).unwrap(),
            ByteRange { start: 10, end: 99 }
        );
        assert_eq!(
            RangeRequest::Suffix { len: 10 }.resolve(100).unwrap(),
            ByteRange { start: 90, end: 99 }
        );
        assert_eq!(
            RangeRequest::Suffix { len: 500 }.resolve(100).unwrap(),
            ByteRange { start: 0, end: 99 }
        );
        assert!(r(100, None).resolve(100).is_err());
        assert!(r(5, Some(4)).resolve(100).is_err());
        assert!(RangeRequest::Suffix { len: 0 }.resolve(100).is_err());
        assert!(r(0, None).resolve(0).is_err());
    }
}
