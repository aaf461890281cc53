//! The two ends of a copy: a repository of a registry, an OCI layout on disk, or a
//! repository of the registry's own store, each read and written through one interface.

use std::pin::Pin;

use berth_oci::Digest;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::{ClientError, ImageRef, Manifest, OciLayout, RegistryClient};

/// A repository a copy reaches neither over HTTP nor as a layout: the registry's own
/// store, when it replicates to or from another registry. The registry implements this
/// (this crate cannot depend on it), so replication streams between its storage and the
/// other registry without a loop through its own HTTP API.
#[async_trait::async_trait]
pub trait LocalRepository: Send + Sync {
    /// A manifest by tag or digest ([`ClientError::NotFound`] when absent).
    async fn manifest(&self, reference: &str) -> Result<Manifest, ClientError>;
    /// A blob's size, if this repository holds it.
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ClientError>;
    /// The referrers of `subject`, as descriptors.
    async fn referrers(&self, subject: &Digest) -> Result<Vec<serde_json::Value>, ClientError>;
    /// A blob's bytes.
    async fn blob(&self, digest: &Digest) -> Result<BlobStream, ClientError>;
    /// A blob's bytes from `offset` on (to go on with an interrupted upload).
    async fn blob_from(&self, digest: &Digest, offset: u64) -> Result<BlobStream, ClientError>;
    /// Links a blob the store holds for another repository into this one, without its
    /// bytes moving; `false` when the store does not hold it.
    async fn adopt_blob(&self, digest: &Digest) -> Result<bool, ClientError>;
    /// How many bytes of `digest` an upload an earlier, interrupted copy left holds.
    async fn held_upload(&self, _digest: &Digest) -> Result<u64, ClientError> {
        Ok(0)
    }
    /// Stores a blob from bytes that begin at `offset` (what an interrupted upload held
    /// before them), verified against `digest` once whole. An upload that fails midway
    /// is kept, for [`LocalRepository::held_upload`] to find.
    async fn put_blob_from(
        &self,
        digest: &Digest,
        size: u64,
        offset: u64,
        body: BlobStream,
    ) -> Result<(), ClientError> {
        if offset != 0 {
            return Err(ClientError::Protocol(format!(
                "no interrupted upload of {digest} to go on with"
            )));
        }
        self.put_blob(digest, size, body).await
    }
    /// Stores a blob, verified against `digest` and `size`.
    async fn put_blob(
        &self,
        digest: &Digest,
        size: u64,
        body: BlobStream,
    ) -> Result<(), ClientError>;
    /// Stores a manifest under `reference` (a tag or its digest), bytes unchanged.
    async fn put_manifest(&self, manifest: &Manifest, reference: &str) -> Result<(), ClientError>;
}

/// A blob's bytes as they arrive.
pub type BlobStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// One side of a copy: a repository of a registry, an OCI layout on disk, or a
/// repository of this registry's own store.
pub enum Endpoint<'a> {
    /// An image in a registry.
    Registry {
        /// The client for its registry.
        client: &'a RegistryClient,
        /// The image.
        image: &'a ImageRef,
    },
    /// An image in an OCI layout.
    Layout {
        /// The layout.
        layout: &'a OciLayout,
        /// Its tag in the layout's index (`None`: the only image, or untagged).
        tag: Option<String>,
    },
    /// An image in a repository of the registry's own store.
    Local {
        /// The repository.
        repository: &'a dyn LocalRepository,
        /// The image's tag or digest.
        reference: String,
    },
}

type ByteStream = BlobStream;

impl Endpoint<'_> {
    /// The image's manifest (by the endpoint's tag or digest).
    pub async fn top_manifest(&self) -> Result<Manifest, ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                client
                    .manifest(image.repository.as_str(), &image.reference())
                    .await
            }
            Endpoint::Layout { layout, tag } => layout.manifest(tag.as_deref()).await,
            Endpoint::Local {
                repository,
                reference,
            } => repository.manifest(reference).await,
        }
    }

    pub(crate) async fn child_manifest(&self, digest: &Digest) -> Result<Manifest, ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                client
                    .manifest(image.repository.as_str(), digest.as_str())
                    .await
            }
            Endpoint::Layout { layout, .. } => layout.manifest_by_digest(digest, "").await,
            Endpoint::Local { repository, .. } => repository.manifest(digest.as_str()).await,
        }
    }

    pub(crate) async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                client.blob_size(image.repository.as_str(), digest).await
            }
            Endpoint::Layout { layout, .. } => Ok(layout.blob_size(digest).await),
            Endpoint::Local { repository, .. } => repository.blob_size(digest).await,
        }
    }

    /// The referrers of `subject` (a registry's; a layout keeps none apart).
    pub(crate) async fn referrers(
        &self,
        subject: &Digest,
    ) -> Result<Vec<serde_json::Value>, ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                client.referrers(image.repository.as_str(), subject).await
            }
            Endpoint::Layout { .. } => Ok(Vec::new()),
            Endpoint::Local { repository, .. } => repository.referrers(subject).await,
        }
    }

    /// A blob's bytes from `offset` on, unverified (the receiving registry checks the
    /// whole blob's digest when the upload closes).
    pub(crate) async fn blob_from(
        &self,
        digest: &Digest,
        size: u64,
        offset: u64,
    ) -> Result<ByteStream, ClientError> {
        if offset == 0 {
            return self.blob(digest, size).await;
        }
        match self {
            Endpoint::Registry { client, image } => {
                let range = format!("bytes={offset}-");
                let ranged = client
                    .blob_range(image.repository.as_str(), digest, &range)
                    .await?;
                match ranged {
                    Some((_, _, stream)) => {
                        Ok(Box::pin(stream.map(|c| c.map_err(std::io::Error::other))))
                    }
                    None => Ok(skip(self.blob(digest, size).await?, offset)),
                }
            }
            Endpoint::Layout { layout, .. } => Ok(skip(layout.blob(digest).await?, offset)),
            Endpoint::Local { repository, .. } => repository.blob_from(digest, offset).await,
        }
    }

    /// A blob's bytes (verified when they come from a registry; a layout's are
    /// verified by whoever stores them).
    pub(crate) async fn blob(&self, digest: &Digest, size: u64) -> Result<ByteStream, ClientError> {
        match self {
            Endpoint::Registry { client, image } => Ok(Box::pin(
                client
                    .blob(image.repository.as_str(), digest, Some(size))
                    .await?,
            )),
            // The receiving side verifies what it stores.
            Endpoint::Layout { layout, .. } => layout.blob(digest).await,
            Endpoint::Local { repository, .. } => repository.blob(digest).await,
        }
    }

    pub(crate) async fn put_blob(
        &self,
        digest: &Digest,
        size: u64,
        body: ByteStream,
    ) -> Result<(), ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                client
                    .push_blob(image.repository.as_str(), digest, size, body)
                    .await
            }
            Endpoint::Layout { layout, .. } => layout.put_blob(digest, body).await.map(|_| ()),
            Endpoint::Local { repository, .. } => repository.put_blob(digest, size, body).await,
        }
    }

    /// Mounts from `source` when both are repositories of one registry.
    pub(crate) async fn mount_from(
        &self,
        source: &Endpoint<'_>,
        digest: &Digest,
    ) -> Result<bool, ClientError> {
        match (self, source) {
            (
                Endpoint::Registry { client, image },
                Endpoint::Registry {
                    client: from,
                    image: from_image,
                },
            ) if client.base() == from.base() && image.repository != from_image.repository => {
                client
                    .mount(
                        image.repository.as_str(),
                        digest,
                        from_image.repository.as_str(),
                    )
                    .await
            }
            (Endpoint::Local { repository, .. }, _) => repository.adopt_blob(digest).await,
            _ => Ok(false),
        }
    }

    /// Stores a child manifest (by digest) or the top one (`top`: by the endpoint's tag).
    pub(crate) async fn put_manifest(
        &self,
        manifest: &Manifest,
        top: bool,
    ) -> Result<(), ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                let reference = match (&image.tag, top) {
                    (Some(tag), true) => tag.clone(),
                    _ => manifest.digest.to_string(),
                };
                client
                    .put_manifest(image.repository.as_str(), &reference, manifest)
                    .await
                    .map(|_| ())
            }
            Endpoint::Layout { layout, tag } => {
                layout
                    .put_manifest(manifest, if top { tag.as_deref() } else { None })
                    .await
            }
            Endpoint::Local {
                repository,
                reference,
            } => {
                let by_tag = top && Digest::parse(reference).is_err();
                let reference = if by_tag {
                    reference.clone()
                } else {
                    manifest.digest.to_string()
                };
                repository.put_manifest(manifest, &reference).await
            }
        }
    }
}

/// `stream` without its first `offset` bytes, for sources that cannot start elsewhere.
fn skip(stream: ByteStream, offset: u64) -> ByteStream {
    let mut left = offset;
    Box::pin(stream.filter_map(move |chunk| {
        let piece = match chunk {
            Ok(mut bytes) if left > 0 => {
                let dropped = left.min(bytes.len() as u64);
                left -= dropped;
                let rest = bytes.split_off(dropped as usize);
                (!rest.is_empty()).then_some(Ok(rest))
            }
            other => Some(other),
        };
        std::future::ready(piece)
    }))
}
