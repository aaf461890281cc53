//! Copying an image between registries: the manifest tree (an index's children first, so
//! the destination never holds a manifest whose children it lacks), each blob at most
//! once, skipped when the destination has it, mounted when both repositories are on one
//! registry, otherwise streamed from source to destination without touching the disk and
//! verified on the way.

use std::collections::{BTreeMap, HashSet};

use berth_oci::{Digest, EdgeKind, ParsedManifest};
use futures_util::{StreamExt, TryStreamExt};

use std::pin::Pin;

use bytes::Bytes;

use crate::{ClientError, ImageRef, Manifest, OciLayout, RegistryClient};

/// Blobs copied at the same time.
const PARALLEL_BLOBS: usize = 4;

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// The digest of the top manifest.
    pub digest: Option<Digest>,
    /// Manifests written.
    pub manifests: usize,
    /// Blobs streamed across.
    pub blobs_copied: usize,
    /// Blobs the destination had already.
    pub blobs_skipped: usize,
    /// Blobs mounted from the source repository.
    pub blobs_mounted: usize,
    /// Bytes streamed across.
    pub bytes: u64,
    /// Referrers copied (with `copy_with_referrers`).
    pub referrers: usize,
}

/// One side of a copy: a repository of a registry, or an OCI layout on disk.
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
}

type ByteStream = Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

impl Endpoint<'_> {
    pub(crate) async fn top_manifest(&self) -> Result<Manifest, ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                client
                    .manifest(image.repository.as_str(), &image.reference())
                    .await
            }
            Endpoint::Layout { layout, tag } => layout.manifest(tag.as_deref()).await,
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
        }
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                client.blob_size(image.repository.as_str(), digest).await
            }
            Endpoint::Layout { layout, .. } => Ok(layout.blob_size(digest).await),
        }
    }

    /// The referrers of `subject` (a registry's; a layout keeps none apart).
    async fn referrers(&self, subject: &Digest) -> Result<Vec<serde_json::Value>, ClientError> {
        match self {
            Endpoint::Registry { client, image } => {
                client.referrers(image.repository.as_str(), subject).await
            }
            Endpoint::Layout { .. } => Ok(Vec::new()),
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
        }
    }

    async fn put_blob(
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
        }
    }

    /// Mounts from `source` when both are repositories of one registry.
    async fn mount_from(
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
            _ => Ok(false),
        }
    }

    /// Stores a child manifest (by digest) or the top one (`top`: by the endpoint's tag).
    async fn put_manifest(&self, manifest: &Manifest, top: bool) -> Result<(), ClientError> {
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
        }
    }
}

/// Copies the image at `source` to `destination`, registries and layouts alike.
pub async fn copy(
    source: &Endpoint<'_>,
    destination: &Endpoint<'_>,
) -> Result<CopyReport, ClientError> {
    let top = source.top_manifest().await?;
    copy_manifest(source, destination, &top).await
}

/// How deep referrers of referrers are followed (a signature of an SBOM of an image).
const REFERRER_DEPTH: usize = 3;

/// [`copy`], and then every referrer (signatures, SBOMs…) of the image and of an index's
/// children, with their own referrers, each by digest.
pub async fn copy_with_referrers(
    source: &Endpoint<'_>,
    destination: &Endpoint<'_>,
) -> Result<CopyReport, ClientError> {
    let top = source.top_manifest().await?;
    let mut report = copy_manifest(source, destination, &top).await?;
    let parsed = ParsedManifest::parse(&top.bytes, Some(&top.media_type))
        .map_err(|e| ClientError::Protocol(format!("manifest {}: {e}", top.digest)))?;
    let mut subjects: Vec<(Digest, usize)> = vec![(top.digest.clone(), 0)];
    subjects.extend(
        parsed
            .edges
            .iter()
            .filter(|e| e.kind == EdgeKind::Child)
            .map(|e| (e.digest.clone(), 0)),
    );
    let mut seen = HashSet::new();
    while let Some((subject, depth)) = subjects.pop() {
        for descriptor in source.referrers(&subject).await? {
            let Some(digest) = descriptor["digest"]
                .as_str()
                .and_then(|d| Digest::parse(d).ok())
            else {
                continue;
            };
            if !seen.insert(digest.clone()) {
                continue;
            }
            let referrer = source.child_manifest(&digest).await?;
            let mut copied = HashSet::new();
            copy_tree(source, destination, &referrer, &mut copied, &mut report).await?;
            destination.put_manifest(&referrer, false).await?;
            report.manifests += 1;
            report.referrers += 1;
            if depth + 1 < REFERRER_DEPTH {
                subjects.push((digest, depth + 1));
            }
        }
    }
    Ok(report)
}

/// Copies `top` (a manifest of `source`) and everything it references, and stores it as
/// the destination's tagged manifest.
pub(crate) async fn copy_manifest(
    source: &Endpoint<'_>,
    destination: &Endpoint<'_>,
    top: &Manifest,
) -> Result<CopyReport, ClientError> {
    let mut report = CopyReport::default();
    let mut copied = HashSet::new();
    copy_tree(source, destination, top, &mut copied, &mut report).await?;
    destination.put_manifest(top, true).await?;
    report.manifests += 1;
    report.digest = Some(top.digest.clone());
    Ok(report)
}

/// Copies what `manifest` references (not the manifest itself).
async fn copy_tree(
    source: &Endpoint<'_>,
    destination: &Endpoint<'_>,
    manifest: &Manifest,
    copied: &mut HashSet<Digest>,
    report: &mut CopyReport,
) -> Result<(), ClientError> {
    let parsed = ParsedManifest::parse(&manifest.bytes, Some(&manifest.media_type))
        .map_err(|e| ClientError::Protocol(format!("manifest {}: {e}", manifest.digest)))?;
    let sizes = descriptor_sizes(&manifest.bytes);
    let mut blobs = Vec::new();
    for edge in &parsed.edges {
        match edge.kind {
            EdgeKind::Child => {
                let child = source.child_manifest(&edge.digest).await?;
                Box::pin(copy_tree(source, destination, &child, copied, report)).await?;
                destination.put_manifest(&child, false).await?;
                report.manifests += 1;
            }
            EdgeKind::Config | EdgeKind::Layer => {
                if copied.insert(edge.digest.clone()) {
                    blobs.push((
                        edge.digest.clone(),
                        sizes.get(edge.digest.as_str()).copied(),
                    ));
                }
            }
        }
    }
    let outcomes: Vec<BlobOutcome> = futures_util::stream::iter(blobs)
        .map(|(digest, size)| copy_blob(source, destination, digest, size))
        .buffer_unordered(PARALLEL_BLOBS)
        .try_collect()
        .await?;
    for outcome in outcomes {
        match outcome {
            BlobOutcome::Skipped => report.blobs_skipped += 1,
            BlobOutcome::Mounted => report.blobs_mounted += 1,
            BlobOutcome::Copied(bytes) => {
                report.blobs_copied += 1;
                report.bytes += bytes;
            }
        }
    }
    Ok(())
}

enum BlobOutcome {
    Skipped,
    Mounted,
    Copied(u64),
}

async fn copy_blob(
    source: &Endpoint<'_>,
    destination: &Endpoint<'_>,
    digest: Digest,
    size: Option<u64>,
) -> Result<BlobOutcome, ClientError> {
    if destination.blob_size(&digest).await?.is_some() {
        return Ok(BlobOutcome::Skipped);
    }
    if destination.mount_from(source, &digest).await? {
        return Ok(BlobOutcome::Mounted);
    }
    let size = match size {
        Some(size) => size,
        None => source
            .blob_size(&digest)
            .await?
            .ok_or_else(|| ClientError::NotFound(format!("blob {digest}")))?,
    };
    let bytes = source.blob(&digest, size).await?;
    destination.put_blob(&digest, size, bytes).await?;
    Ok(BlobOutcome::Copied(size))
}

/// The size each descriptor of a manifest gives its digest (config, layers, children,
/// blobs).
fn descriptor_sizes(raw: &[u8]) -> BTreeMap<String, u64> {
    let mut sizes = BTreeMap::new();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(raw) else {
        return sizes;
    };
    let mut add = |d: &serde_json::Value| {
        if let (Some(digest), Some(size)) = (d["digest"].as_str(), d["size"].as_u64()) {
            sizes.insert(digest.to_owned(), size);
        }
    };
    add(&value["config"]);
    for list in ["layers", "manifests", "blobs"] {
        if let Some(items) = value[list].as_array() {
            items.iter().for_each(&mut add);
        }
    }
    sizes
}
