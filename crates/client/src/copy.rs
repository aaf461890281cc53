//! Copying an image between registries: the manifest tree (an index's children first, so
//! the destination never holds a manifest whose children it lacks), each blob at most
//! once, skipped when the destination has it, mounted when both repositories are on one
//! registry, otherwise streamed from source to destination without touching the disk and
//! verified on the way.

use std::collections::{BTreeMap, HashSet};

use berth_oci::{Digest, EdgeKind, ParsedManifest};
use futures_util::{StreamExt, TryStreamExt};

use crate::{ClientError, ImageRef, Manifest, RegistryClient};

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
}

/// Copies `source` (read through `from`) to `destination` (written through `to`): every
/// platform of an index, with each digest unchanged.
pub async fn copy_image(
    from: &RegistryClient,
    source: &ImageRef,
    to: &RegistryClient,
    destination: &ImageRef,
) -> Result<CopyReport, ClientError> {
    let mut report = CopyReport::default();
    let top = from
        .manifest(source.repository.as_str(), &source.reference())
        .await?;
    let same_registry = from.base() == to.base();
    let mut copied = HashSet::new();
    copy_tree(
        from,
        source,
        to,
        destination,
        &top,
        same_registry,
        &mut copied,
        &mut report,
    )
    .await?;
    let reference = match (&destination.tag, &destination.digest) {
        (Some(tag), _) => tag.clone(),
        (None, _) => top.digest.to_string(),
    };
    to.put_manifest(destination.repository.as_str(), &reference, &top)
        .await?;
    report.manifests += 1;
    report.digest = Some(top.digest);
    Ok(report)
}

/// Copies what `manifest` references (not the manifest itself).
#[allow(clippy::too_many_arguments)]
async fn copy_tree(
    from: &RegistryClient,
    source: &ImageRef,
    to: &RegistryClient,
    destination: &ImageRef,
    manifest: &Manifest,
    same_registry: bool,
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
                let child = from
                    .manifest(source.repository.as_str(), edge.digest.as_str())
                    .await?;
                Box::pin(copy_tree(
                    from,
                    source,
                    to,
                    destination,
                    &child,
                    same_registry,
                    copied,
                    report,
                ))
                .await?;
                to.put_manifest(
                    destination.repository.as_str(),
                    edge.digest.as_str(),
                    &child,
                )
                .await?;
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
        .map(|(digest, size)| copy_blob(from, source, to, destination, digest, size, same_registry))
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
    from: &RegistryClient,
    source: &ImageRef,
    to: &RegistryClient,
    destination: &ImageRef,
    digest: Digest,
    size: Option<u64>,
    same_registry: bool,
) -> Result<BlobOutcome, ClientError> {
    let repository = destination.repository.as_str();
    if to.blob_size(repository, &digest).await?.is_some() {
        return Ok(BlobOutcome::Skipped);
    }
    if same_registry
        && source.repository != destination.repository
        && to
            .mount(repository, &digest, source.repository.as_str())
            .await?
    {
        return Ok(BlobOutcome::Mounted);
    }
    let size = match size {
        Some(size) => size,
        None => from
            .blob_size(source.repository.as_str(), &digest)
            .await?
            .ok_or_else(|| ClientError::NotFound(format!("blob {digest}")))?,
    };
    let bytes = from
        .blob(source.repository.as_str(), &digest, Some(size))
        .await?;
    to.push_blob(repository, &digest, size, bytes).await?;
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
