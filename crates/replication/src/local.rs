//! This registry's repositories as one end of a copy: bytes stream between its storage
//! and the other registry, and what it stores goes through the same checks as a push.

use berth_client::{BlobStream, ClientError, LocalRepository, Manifest};
use berth_oci::{Digest, Reference, RepoName};
use berth_registry::{Actor, BlobBytes, MountOutcome, Registry, RegistryError};
use bytes::Bytes;

/// One repository of the registry, acting as `by`.
pub(crate) struct LocalRepo {
    /// The registry.
    pub(crate) registry: Registry,
    /// The repository.
    pub(crate) repo: RepoName,
    /// Who the changes are recorded as (the policy).
    pub(crate) by: Actor,
    /// The policy's bandwidth limit, applied to the bytes this side reads or writes.
    pub(crate) throttle: Option<std::sync::Arc<crate::worker::Throttle>>,
    /// Uploads interrupted attempts left, by repository and blob, to go on with.
    pub(crate) unfinished: UnfinishedUploads,
}

/// Upload sessions of this registry that interrupted pulls left: (repository, blob) →
/// session id.
pub(crate) type UnfinishedUploads =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(String, Digest), String>>>;

impl LocalRepo {
    fn limited(&self, stream: BlobStream) -> BlobStream {
        match &self.throttle {
            Some(throttle) => throttle.clone().limit(stream),
            None => stream,
        }
    }
}

/// Domain errors in the words a copy understands: what is absent is `NotFound`.
fn client_error(e: RegistryError) -> ClientError {
    match e {
        RegistryError::ManifestUnknown { .. }
        | RegistryError::BlobUnknown { .. }
        | RegistryError::NameUnknown { .. } => ClientError::NotFound(e.to_string()),
        e => ClientError::Protocol(format!("this registry: {e}")),
    }
}

fn reference(text: &str) -> Result<Reference, ClientError> {
    Reference::parse(text).map_err(|e| ClientError::Protocol(format!("reference {text:?}: {e}")))
}

#[async_trait::async_trait]
impl LocalRepository for LocalRepo {
    async fn manifest(&self, reference_text: &str) -> Result<Manifest, ClientError> {
        let stored = self
            .registry
            .get_manifest(&self.repo, &reference(reference_text)?)
            .await
            .map_err(client_error)?;
        Ok(Manifest {
            digest: stored.digest,
            media_type: stored.media_type,
            bytes: Bytes::from(stored.raw),
        })
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ClientError> {
        match self.registry.stat_blob(&self.repo, digest).await {
            Ok(size) => Ok(Some(size)),
            Err(RegistryError::BlobUnknown { .. } | RegistryError::NameUnknown { .. }) => Ok(None),
            Err(e) => Err(client_error(e)),
        }
    }

    async fn referrers(&self, subject: &Digest) -> Result<Vec<serde_json::Value>, ClientError> {
        let index = self
            .registry
            .referrers(&self.repo, subject, None)
            .await
            .map_err(client_error)?;
        let value: serde_json::Value = serde_json::from_slice(&index.to_json())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(value["manifests"].as_array().cloned().unwrap_or_default())
    }

    async fn blob(&self, digest: &Digest) -> Result<BlobStream, ClientError> {
        let read = self
            .registry
            .read_blob(&self.repo, digest, None)
            .await
            .map_err(client_error)?;
        let stream = match read.body {
            BlobBytes::Stream(stream) => stream,
            BlobBytes::File { file, start, len } => {
                berth_storage::stream_file_range(file, start, len)
                    .map_err(|e| ClientError::Protocol(format!("reading {digest}: {e}")))?
            }
        };
        Ok(self.limited(stream))
    }

    async fn blob_from(&self, digest: &Digest, offset: u64) -> Result<BlobStream, ClientError> {
        let range = berth_registry::RangeRequest::From {
            start: offset,
            end: None,
        };
        let read = self
            .registry
            .read_blob(&self.repo, digest, Some(range))
            .await
            .map_err(client_error)?;
        let stream = match read.body {
            BlobBytes::Stream(stream) => stream,
            BlobBytes::File { file, start, len } => {
                berth_storage::stream_file_range(file, start, len)
                    .map_err(|e| ClientError::Protocol(format!("reading {digest}: {e}")))?
            }
        };
        Ok(self.limited(stream))
    }

    async fn adopt_blob(&self, digest: &Digest) -> Result<bool, ClientError> {
        match self
            .registry
            .mount_blob(&self.repo, digest, None, &self.by)
            .await
        {
            Ok(MountOutcome::Mounted) => Ok(true),
            Ok(MountOutcome::NotMountable) => Ok(false),
            Err(e) => Err(client_error(e)),
        }
    }

    async fn held_upload(&self, digest: &Digest) -> Result<u64, ClientError> {
        let key = (self.repo.to_string(), digest.clone());
        let id = self
            .unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let Some(id) = id else { return Ok(0) };
        match self.registry.upload_status(&self.repo, &id).await {
            Ok((_, held)) => {
                tracing::info!(repository = %self.repo, %digest, held, "replication: going on with an interrupted upload");
                Ok(held)
            }
            // Purged meanwhile: start afresh.
            Err(_) => {
                self.unfinished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
                Ok(0)
            }
        }
    }

    async fn put_blob_from(
        &self,
        digest: &Digest,
        _size: u64,
        offset: u64,
        body: BlobStream,
    ) -> Result<(), ClientError> {
        let key = (self.repo.to_string(), digest.clone());
        let known = self
            .unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let id = match known {
            Some(id) => id,
            None if offset == 0 => {
                let id = self
                    .registry
                    .start_upload(&self.repo, &self.by)
                    .await
                    .map_err(client_error)?;
                let id = id.as_str().to_owned();
                self.unfinished
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key.clone(), id.clone());
                id
            }
            None => {
                return Err(ClientError::Protocol(format!(
                    "no interrupted upload of {digest} to go on with"
                )))
            }
        };
        // What arrives before a failure stays in the session for the next attempt.
        self.registry
            .append_upload(&self.repo, &id, Some(offset), self.limited(body))
            .await
            .map_err(client_error)?;
        let finished = self
            .registry
            .finish_upload(&self.repo, &id, digest, None, &self.by)
            .await;
        self.unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if finished.is_err() {
            // Wrong bytes: the session is dropped, the next attempt starts afresh.
            let _ = self.registry.cancel_upload(&self.repo, &id).await;
        }
        finished.map(drop).map_err(client_error)
    }

    async fn put_blob(
        &self,
        digest: &Digest,
        _size: u64,
        body: BlobStream,
    ) -> Result<(), ClientError> {
        self.registry
            .push_blob(&self.repo, digest, self.limited(body), &self.by)
            .await
            .map(drop)
            .map_err(client_error)
    }

    async fn put_manifest(
        &self,
        manifest: &Manifest,
        reference_text: &str,
    ) -> Result<(), ClientError> {
        self.registry
            .put_manifest(
                &self.repo,
                &reference(reference_text)?,
                Some(&manifest.media_type),
                manifest.bytes.to_vec(),
                &self.by,
            )
            .await
            .map(drop)
            .map_err(client_error)
    }
}
