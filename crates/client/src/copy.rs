//! Copying an image between registries: the manifest tree (an index's children first, so
//! the destination never holds a manifest whose children it lacks), each blob at most
//! once, skipped when the destination has it, mounted when both repositories are on one
//! registry, otherwise streamed from source to destination without touching the disk and
//! verified on the way.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use berth_oci::{Digest, EdgeKind, ParsedManifest};
use futures_util::{StreamExt, TryStreamExt};

use crate::endpoint::Endpoint;
use crate::pull::{choose_platform, Platform};
use crate::{ClientError, Manifest};

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

/// How a blob got to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobOutcome {
    /// The destination had it.
    Skipped,
    /// Linked from another repository of the same registry.
    Mounted,
    /// Its bytes were streamed across.
    Copied,
}

/// What a copy or pull reports while it works, for a progress display: the order of
/// events is the order things happen, and byte counts only grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A blob's bytes start to move (after the destination was found to lack it).
    BlobStarted {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
    },
    /// More of a blob has moved.
    BlobBytes {
        /// The blob.
        digest: Digest,
        /// Bytes moved so far.
        done: u64,
        /// Its size.
        size: u64,
    },
    /// A blob is at the destination.
    BlobDone {
        /// The blob.
        digest: Digest,
        /// Its size.
        size: u64,
        /// How it got there.
        outcome: BlobOutcome,
    },
    /// A manifest was stored at the destination.
    ManifestStored {
        /// The manifest.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
}

/// Where progress events go; called from the copying tasks, so it must be quick.
pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

/// What copies to one registry have put where, shared by copies that run side by side
/// (replication's tasks): a blob another copy is sending is waited for, then mounted from
/// the repository it went to instead of sent a second time.
#[derive(Default)]
pub struct SharedBlobs {
    /// Blob → a repository of the destination that holds it.
    placed: std::sync::Mutex<std::collections::HashMap<Digest, String>>,
    /// Blob → the turn of the copy sending it.
    sending: std::sync::Mutex<std::collections::HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
    /// (repository, blob) → the upload an interrupted copy left, to go on with.
    unfinished: std::sync::Mutex<std::collections::HashMap<(String, Digest), url::Url>>,
}

/// Blobs remembered at most; past it the memory starts again (a miss costs a HEAD).
const MAX_PLACED: usize = 100_000;

impl SharedBlobs {
    /// Waits until no other copy is sending `digest`; the turn lasts as long as the guard.
    async fn turn(&self, digest: &Digest) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .sending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(digest.clone())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Forgets the turn of `digest` when nobody else waits for it.
    fn done(&self, digest: &Digest) {
        let mut sending = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        if sending
            .get(digest)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            sending.remove(digest);
        }
    }

    fn placed_in(&self, digest: &Digest) -> Option<String> {
        let placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed.get(digest).cloned()
    }

    fn unfinished(&self, repository: &str, digest: &Digest) -> Option<url::Url> {
        let unfinished = self.unfinished.lock().unwrap_or_else(|e| e.into_inner());
        unfinished
            .get(&(repository.to_owned(), digest.clone()))
            .cloned()
    }

    fn keep_unfinished(&self, repository: &str, digest: &Digest, upload: Option<url::Url>) {
        let mut unfinished = self.unfinished.lock().unwrap_or_else(|e| e.into_inner());
        let key = (repository.to_owned(), digest.clone());
        match upload {
            Some(url) if unfinished.len() < MAX_PLACED => {
                unfinished.insert(key, url);
            }
            _ => {
                unfinished.remove(&key);
            }
        }
    }

    fn place(&self, digest: &Digest, repository: &str) {
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        if placed.len() >= MAX_PLACED {
            placed.clear();
        }
        placed.insert(digest.clone(), repository.to_owned());
    }
}

/// What to copy and who hears about it.
#[derive(Clone, Default)]
pub struct CopyOptions {
    /// For an index: copy only this platform's image (stored alone, without the index).
    /// `None` copies the index with every platform, digests unchanged.
    pub platform: Option<Platform>,
    /// Also copy the referrers (signatures, SBOMs…) of what is copied.
    pub referrers: bool,
    /// Progress events.
    pub progress: Option<ProgressSink>,
    /// Shared with other copies to the same registry, so that a blob goes there once.
    pub shared_blobs: Option<Arc<SharedBlobs>>,
}

impl std::fmt::Debug for CopyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOptions")
            .field("platform", &self.platform)
            .field("referrers", &self.referrers)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// Copies the image at `source` to `destination`, registries and layouts alike: the
/// whole index, or one platform's image of it, with or without referrers, as `options`
/// say.
pub async fn copy(
    source: &Endpoint<'_>,
    destination: &Endpoint<'_>,
    options: &CopyOptions,
) -> Result<CopyReport, ClientError> {
    let mut top = source.top_manifest().await?;
    if let Some(platform) = &options.platform {
        top = choose_platform(source, top, platform).await?;
    }
    let transfer = Transfer {
        source,
        destination,
        progress: options.progress.clone(),
        shared: options.shared_blobs.clone(),
    };
    let mut report = transfer.copy_manifest(&top).await?;
    if options.referrers {
        transfer.copy_referrers(&top, &mut report).await?;
    }
    Ok(report)
}

/// How deep referrers of referrers are followed (a signature of an SBOM of an image).
const REFERRER_DEPTH: usize = 3;

/// One copy under way: its two ends and who hears of its progress.
pub(crate) struct Transfer<'s, 'a, 'b> {
    pub(crate) source: &'s Endpoint<'a>,
    pub(crate) destination: &'s Endpoint<'b>,
    pub(crate) progress: Option<ProgressSink>,
    pub(crate) shared: Option<Arc<SharedBlobs>>,
}

impl Transfer<'_, '_, '_> {
    fn tell(&self, event: Progress) {
        if let Some(progress) = &self.progress {
            progress(&event);
        }
    }

    /// Copies every referrer (signatures, SBOMs…) of `top` and of an index's children,
    /// with their own referrers, each by digest.
    async fn copy_referrers(
        &self,
        top: &Manifest,
        report: &mut CopyReport,
    ) -> Result<(), ClientError> {
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
            for descriptor in self.source.referrers(&subject).await? {
                let Some(digest) = descriptor["digest"]
                    .as_str()
                    .and_then(|d| Digest::parse(d).ok())
                else {
                    continue;
                };
                if !seen.insert(digest.clone()) {
                    continue;
                }
                let referrer = self.source.child_manifest(&digest).await?;
                let mut copied = HashSet::new();
                self.copy_tree(&referrer, &mut copied, report).await?;
                self.store_manifest(&referrer, false).await?;
                report.manifests += 1;
                report.referrers += 1;
                if depth + 1 < REFERRER_DEPTH {
                    subjects.push((digest, depth + 1));
                }
            }
        }
        Ok(())
    }

    /// Copies `top` (a manifest of the source) and everything it references, and stores
    /// it as the destination's tagged manifest.
    pub(crate) async fn copy_manifest(&self, top: &Manifest) -> Result<CopyReport, ClientError> {
        let mut report = CopyReport::default();
        let mut copied = HashSet::new();
        self.copy_tree(top, &mut copied, &mut report).await?;
        self.store_manifest(top, true).await?;
        report.manifests += 1;
        report.digest = Some(top.digest.clone());
        Ok(report)
    }

    async fn store_manifest(&self, manifest: &Manifest, top: bool) -> Result<(), ClientError> {
        self.destination.put_manifest(manifest, top).await?;
        self.tell(Progress::ManifestStored {
            digest: manifest.digest.clone(),
            media_type: manifest.media_type.clone(),
        });
        Ok(())
    }

    /// Copies what `manifest` references (not the manifest itself).
    async fn copy_tree(
        &self,
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
                    let child = self.source.child_manifest(&edge.digest).await?;
                    Box::pin(self.copy_tree(&child, copied, report)).await?;
                    self.store_manifest(&child, false).await?;
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
        let outcomes: Vec<(BlobOutcome, u64)> = futures_util::stream::iter(blobs)
            .map(|(digest, size)| self.copy_blob(digest, size))
            .buffer_unordered(PARALLEL_BLOBS)
            .try_collect()
            .await?;
        for (outcome, bytes) in outcomes {
            match outcome {
                BlobOutcome::Skipped => report.blobs_skipped += 1,
                BlobOutcome::Mounted => report.blobs_mounted += 1,
                BlobOutcome::Copied => {
                    report.blobs_copied += 1;
                    report.bytes += bytes;
                }
            }
        }
        Ok(())
    }

    /// Puts one blob at the destination; returns how, and the bytes moved. With shared
    /// blobs, one copy at a time handles a digest, and what it placed is remembered.
    async fn copy_blob(
        &self,
        digest: Digest,
        size: Option<u64>,
    ) -> Result<(BlobOutcome, u64), ClientError> {
        let Some(shared) = &self.shared else {
            return self.place_blob(&digest, size).await;
        };
        let turn = shared.turn(&digest).await;
        let placed = self.place_blob(&digest, size).await;
        if placed.is_ok() {
            if let Endpoint::Registry { image, .. } = self.destination {
                shared.place(&digest, image.repository.as_str());
            }
        }
        drop(turn);
        shared.done(&digest);
        placed
    }

    async fn place_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<(BlobOutcome, u64), ClientError> {
        let digest = digest.clone();
        let done = |outcome: BlobOutcome, size: u64| {
            self.tell(Progress::BlobDone {
                digest: digest.clone(),
                size,
                outcome,
            });
            Ok((outcome, size))
        };
        if let Some(there) = self.destination.blob_size(&digest).await? {
            return done(BlobOutcome::Skipped, size.unwrap_or(there));
        }
        if self.destination.mount_from(self.source, &digest).await? {
            return done(BlobOutcome::Mounted, size.unwrap_or(0));
        }
        // Another copy put it in another repository of the destination: mount it here.
        let elsewhere = self.shared.as_ref().and_then(|s| s.placed_in(&digest));
        if let (Some(from), Endpoint::Registry { client, image }) = (elsewhere, self.destination) {
            if from != image.repository.as_str()
                && client
                    .mount(image.repository.as_str(), &digest, &from)
                    .await?
            {
                return done(BlobOutcome::Mounted, size.unwrap_or(0));
            }
        }
        let size = match size {
            Some(size) => size,
            None => self
                .source
                .blob_size(&digest)
                .await?
                .ok_or_else(|| ClientError::NotFound(format!("blob {digest}")))?,
        };
        self.tell(Progress::BlobStarted {
            digest: digest.clone(),
            size,
        });
        let moved = match (self.source, self.destination) {
            // Into a layout from a registry: a download that survives being cut.
            (Endpoint::Registry { client, image }, Endpoint::Layout { layout, .. }) => {
                layout
                    .download(
                        client,
                        image.repository.as_str(),
                        &digest,
                        size,
                        &self.counter(&digest, size),
                    )
                    .await?
            }
            // Into this registry's store: an upload an interrupted attempt left goes on,
            // with the rest of the blob asked of the source by range.
            (_, Endpoint::Local { repository, .. }) => {
                let offset = repository.held_upload(&digest).await?.min(size);
                let counter = self.counter(&digest, size);
                let bytes = self
                    .source
                    .blob_from(&digest, size, offset)
                    .await?
                    .map(move |chunk| {
                        if let Ok(chunk) = &chunk {
                            counter(chunk.len() as u64);
                        }
                        chunk
                    });
                repository
                    .put_blob_from(&digest, size, offset, Box::pin(bytes))
                    .await?;
                size
            }
            // Into a registry, alongside other copies: an upload an interrupted attempt
            // left goes on from where it stopped.
            (_, Endpoint::Registry { client, image }) if self.shared.is_some() => {
                let shared = self.shared.as_ref().expect("checked");
                let repository = image.repository.as_str();
                let upload = std::sync::Mutex::new(shared.unfinished(repository, &digest));
                let counter = self.counter(&digest, size);
                let wanted = &digest;
                let pushed = client
                    .push_blob_resuming(repository, &digest, size, &upload, |offset| async move {
                        let bytes = self.source.blob_from(wanted, size, offset).await?;
                        Ok(bytes.map(move |chunk| {
                            if let Ok(chunk) = &chunk {
                                counter(chunk.len() as u64);
                            }
                            chunk
                        }))
                    })
                    .await;
                let left = upload.into_inner().unwrap_or_else(|e| e.into_inner());
                shared.keep_unfinished(repository, &digest, left);
                pushed?;
                size
            }
            _ => {
                let counter = self.counter(&digest, size);
                let bytes = self.source.blob(&digest, size).await?.map(move |chunk| {
                    if let Ok(chunk) = &chunk {
                        counter(chunk.len() as u64);
                    }
                    chunk
                });
                self.destination
                    .put_blob(&digest, size, Box::pin(bytes))
                    .await?;
                size
            }
        };
        done(BlobOutcome::Copied, moved)
    }

    /// A callback that adds bytes moved to a blob's count and reports the new total.
    fn counter(&self, digest: &Digest, size: u64) -> impl Fn(u64) + Send + Sync + 'static {
        let progress = self.progress.clone();
        let digest = digest.clone();
        let done = std::sync::atomic::AtomicU64::new(0);
        move |more: u64| {
            let total = done.fetch_add(more, std::sync::atomic::Ordering::Relaxed) + more;
            if let Some(progress) = &progress {
                progress(&Progress::BlobBytes {
                    digest: digest.clone(),
                    done: total,
                    size,
                });
            }
        }
    }
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
