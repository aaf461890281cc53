//! Online garbage collection: no read-only mode, pushes and pulls go on.
//!
//! 1. Mark, in bounded metadata transactions: optionally remove manifests no tag reaches
//!    (found in a snapshot, each checked again as it goes, 500 per transaction), then,
//!    1,000 blobs per transaction in digest order, mark every blob that no manifest
//!    references and that was not used within the grace period as being deleted,
//!    removing its repository links in the same transaction. A dry run reads what would
//!    go from one snapshot instead, and writes nothing.
//! 2. Sweep: delete the bytes of every blob marked so (this pass's and any interrupted
//!    pass's), then forget its record, 1,000 at a time.
//! 3. Purge upload sessions whose bytes have not changed for the configured age.
//!
//! The race with a concurrent push is closed in the metadata store: a push reserves the
//! digest before publishing bytes and links it after, both refused while the digest is
//! marked, and marking re-checks references and last use in the same transaction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use berth_meta::{GcSelection, LeaseState};
use berth_storage::UploadId;
use serde::Serialize;

use crate::{now_ms, Registry, RegistryError};

/// How a collection runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would go, change nothing.
    pub dry_run: bool,
    /// Also remove manifests no tag reaches (Distribution's `--delete-untagged`).
    pub delete_untagged: bool,
    /// Untagged manifests younger than this are kept: a client may be about to tag them.
    pub untagged_min_age: Duration,
    /// Unreferenced blobs used (uploaded, mounted, referenced, confirmed) more recently than
    /// this are kept: a client may be about to push the manifest that references them.
    pub blob_grace: Duration,
    /// Upload sessions whose bytes have not changed for this long are abandoned.
    pub upload_max_age: Duration,
    /// Events (the audit log) older than this are pruned, once every consumer has read
    /// them; `None` keeps them forever.
    pub event_retention: Option<Duration>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            delete_untagged: false,
            untagged_min_age: Duration::from_secs(24 * 3600),
            blob_grace: Duration::from_secs(3600),
            upload_max_age: Duration::from_secs(24 * 3600),
            event_retention: Some(DEFAULT_EVENT_RETENTION),
        }
    }
}

/// What collections on this node did since it started, for the metrics.
#[derive(Debug, Default)]
pub(crate) struct GcTotals {
    runs: AtomicU64,
    failures: AtomicU64,
    last_success_unix: AtomicU64,
    last_duration_ms: AtomicU64,
    bytes_freed: AtomicU64,
    blobs_removed: AtomicU64,
}

/// A copy of [`GcTotals`] to report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcCounters {
    /// Collections run (dry runs excluded).
    pub runs: u64,
    /// Of which failed.
    pub failures: u64,
    /// When the last one succeeded (Unix seconds; 0: never).
    pub last_success_unix: u64,
    /// How long the last one took, in milliseconds.
    pub last_duration_ms: u64,
    /// Bytes freed by all of them.
    pub bytes_freed: u64,
    /// Blobs removed by all of them.
    pub blobs_removed: u64,
}

impl GcTotals {
    fn record(&self, result: &Result<GcReport, RegistryError>, took: Duration) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.last_duration_ms
            .store(took.as_millis() as u64, Ordering::Relaxed);
        match result {
            Ok(report) => {
                let now = SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.last_success_unix.store(now, Ordering::Relaxed);
                self.bytes_freed
                    .fetch_add(report.bytes_freed, Ordering::Relaxed);
                self.blobs_removed
                    .fetch_add(report.blobs_removed_count, Ordering::Relaxed);
            }
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> GcCounters {
        GcCounters {
            runs: self.runs.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_success_unix: self.last_success_unix.load(Ordering::Relaxed),
            last_duration_ms: self.last_duration_ms.load(Ordering::Relaxed),
            bytes_freed: self.bytes_freed.load(Ordering::Relaxed),
            blobs_removed: self.blobs_removed.load(Ordering::Relaxed),
        }
    }
}

/// Removed manifests and blobs a report lists by name; past it, only their counts (a
/// collection at size removes hundreds of thousands).
pub const REPORT_LIST_MAX: usize = 1000;
/// Blobs a collection looks at per metadata transaction while marking: writers wait for
/// one batch (milliseconds), never for the whole store.
const MARK_BATCH: usize = 1000;
/// Untagged manifests removed per metadata transaction.
const MANIFEST_BATCH: usize = 500;
/// Candidate manifests read at a time: each page walks every tag again (about half a
/// second at 100,000 tags), and a page is held in memory while its batches go.
const CANDIDATE_PAGE: usize = 10_000;
/// Blobs swept (bytes deleted, then records forgotten) per step.
const SWEEP_BATCH: usize = 1000;

/// How long events (the audit log) are kept by default: 90 days.
const DEFAULT_EVENT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

/// What a collection did (or, dry, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Whether anything was changed.
    pub dry_run: bool,
    /// Manifests removed, as `repo@digest`: the first [`REPORT_LIST_MAX`].
    pub manifests_removed: Vec<String>,
    /// How many manifests were removed.
    pub manifests_removed_count: u64,
    /// Blobs removed (their bytes deleted): the first [`REPORT_LIST_MAX`].
    pub blobs_removed: Vec<String>,
    /// How many blobs were removed.
    pub blobs_removed_count: u64,
    /// Bytes of blob storage freed.
    pub bytes_freed: u64,
    /// Upload sessions purged.
    pub uploads_purged: u64,
    /// Events pruned for their age (the audit log's retention).
    pub events_pruned: u64,
    /// Wall time of the collection, in milliseconds.
    pub duration_ms: u64,
    /// Of which marking (the metadata transaction), in milliseconds.
    pub mark_ms: u64,
    /// Of which deleting bytes and forgetting their records, in milliseconds.
    pub sweep_ms: u64,
}

/// What a sweep deleted.
#[derive(Debug, Default)]
struct Swept {
    count: u64,
    bytes: u64,
    /// The first [`REPORT_LIST_MAX`] digests.
    listed: Vec<String>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The lease a collection holds, so that nodes sharing a store take turns.
const GC_LEASE: &str = "gc";
/// How long a collection's lease lasts unless renewed. The lease saves work rather than
/// guarding safety: two collections at once are still correct (marking is transactional,
/// deleting twice is harmless). It is short and renewed while the collection runs, so
/// that a collector that dies (killed, out of memory, a lost node) is noticed within
/// minutes and its sweep finished by a serving node ([`Registry::finish_abandoned_sweep`]).
const GC_LEASE_MS: i64 = 2 * 60 * 1000;
/// How often a running collection renews its lease.
const GC_LEASE_RENEWAL: Duration = Duration::from_secs(30);

impl Registry {
    /// Runs one garbage collection, unless another node (or `berth gc`) is running one:
    /// then [`RegistryError::JobRunning`]. Safe while the registry serves, and from another
    /// process on the same data. Dry runs change nothing and take no lease.
    pub async fn collect_garbage(&self, options: &GcOptions) -> Result<GcReport, RegistryError> {
        if options.dry_run {
            return self.collect_garbage_now(options).await;
        }
        let holder = self.node_id();
        if !self.meta.try_lease(GC_LEASE, holder, GC_LEASE_MS).await? {
            return Err(RegistryError::JobRunning {
                job: "garbage collection".into(),
            });
        }
        let renewing = {
            let (meta, holder) = (self.meta.clone(), holder.to_owned());
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(GC_LEASE_RENEWAL);
                ticker.tick().await;
                loop {
                    ticker.tick().await;
                    if let Err(e) = meta.try_lease(GC_LEASE, &holder, GC_LEASE_MS).await {
                        tracing::warn!(error = %e, "renewing the collection lease");
                    }
                }
            })
        };
        let started = Instant::now();
        let result = self.collect_garbage_now(options).await;
        renewing.abort();
        self.gc_totals.record(&result, started.elapsed());
        match &result {
            Ok(_) => {
                if let Err(e) = self.meta.release_lease(GC_LEASE, holder).await {
                    tracing::warn!(error = %e, "releasing the collection lease; it expires by itself");
                }
            }
            // Left to expire: blobs may be marked and not yet swept, and an expired lease
            // is how a serving node learns that a sweep needs finishing.
            Err(e) => {
                tracing::warn!(error = %e, "collection failed; its sweep is finished once its lease expires")
            }
        }
        result
    }

    /// Finishes the sweep of a collection that stopped half-way: if the collection lease
    /// expired without being given back, takes it, deletes the bytes of every blob still
    /// marked as being deleted and forgets them. `serve` calls it every minute, so blobs
    /// never stay blocked waiting for a collection nobody scheduled. Returns how many were
    /// swept, `None` if nothing was abandoned.
    pub async fn finish_abandoned_sweep(&self) -> Result<Option<usize>, RegistryError> {
        if self.meta.lease_state(GC_LEASE).await? != LeaseState::Expired {
            return Ok(None);
        }
        let holder = self.node_id();
        if !self.meta.try_lease(GC_LEASE, holder, GC_LEASE_MS).await? {
            return Ok(None);
        }
        let swept = self.sweep_marked().await;
        if swept.is_ok() {
            if let Err(e) = self.meta.release_lease(GC_LEASE, holder).await {
                tracing::warn!(error = %e, "releasing the collection lease; it expires by itself");
            }
        }
        swept.map(|swept| Some(swept.count as usize))
    }

    /// Deletes the bytes of every blob marked as being deleted, then forgets them, a batch
    /// at a time.
    async fn sweep_marked(&self) -> Result<Swept, RegistryError> {
        let mut swept = Swept::default();
        let mut after = String::new();
        loop {
            let doomed = self.meta.blobs_being_deleted(&after, SWEEP_BATCH).await?;
            let Some((last, _)) = doomed.last() else {
                return Ok(swept);
            };
            after = last.as_str().to_owned();
            // Bytes first, records after: a crash in between leaves records still marked,
            // which the next pass finishes.
            let digests: Vec<_> = doomed.iter().map(|(d, _)| d.clone()).collect();
            self.blobs.delete_many(&digests).await?;
            self.meta.forget_deleted_blobs(&digests).await?;
            swept.count += digests.len() as u64;
            swept.bytes += doomed.iter().map(|(_, size)| size).sum::<u64>();
            let room = REPORT_LIST_MAX.saturating_sub(swept.listed.len());
            swept
                .listed
                .extend(digests.iter().take(room).map(|d| d.to_string()));
        }
    }

    /// Marks, in batches, what a real collection removes: untagged manifests (when
    /// selected), then unused blobs. Returns the manifests removed (the first
    /// [`REPORT_LIST_MAX`] by name) and their count.
    async fn mark_in_batches(
        &self,
        selection: &GcSelection,
    ) -> Result<(Vec<String>, u64), RegistryError> {
        let (mut listed, mut count) = (Vec::new(), 0u64);
        if let Some(cutoff) = selection.untagged_pushed_before_ms {
            let mut after = None;
            loop {
                let candidates = self
                    .meta
                    .unreached_manifests(cutoff, after, CANDIDATE_PAGE)
                    .await?;
                let Some(last) = candidates.last() else {
                    break;
                };
                after = Some(last.clone());
                self.remove_unreached(&candidates, cutoff, &mut listed, &mut count)
                    .await?;
            }
        }
        let mut after = String::new();
        loop {
            let step = self
                .meta
                .mark_unused_blobs(&after, MARK_BATCH, selection.blobs_unused_before_ms)
                .await?;
            match step.next {
                Some(next) => after = next,
                None => return Ok((listed, count)),
            }
        }
    }

    /// Removes those of one page of candidates still unreached, a batch per transaction;
    /// adds them to the report's list and count.
    async fn remove_unreached(
        &self,
        candidates: &[(String, berth_oci::Digest)],
        cutoff: i64,
        listed: &mut Vec<String>,
        count: &mut u64,
    ) -> Result<(), RegistryError> {
        for batch in candidates.chunks(MANIFEST_BATCH) {
            let removed = self
                .meta
                .remove_unreached_manifests(batch.to_vec(), cutoff)
                .await?;
            for (repo, digest) in &removed {
                self.manifests.forget(repo, digest);
            }
            *count += removed.len() as u64;
            let room = REPORT_LIST_MAX.saturating_sub(listed.len());
            listed.extend(removed.iter().take(room).map(|(r, d)| format!("{r}@{d}")));
        }
        Ok(())
    }

    /// Whether a collection is alive now (its lease held and not expired).
    pub(crate) async fn collection_running(&self) -> Result<bool, RegistryError> {
        Ok(self.meta.lease_state(GC_LEASE).await? == LeaseState::Held)
    }

    async fn collect_garbage_now(&self, options: &GcOptions) -> Result<GcReport, RegistryError> {
        let started = Instant::now();
        let now = now_ms();
        let selection = GcSelection {
            untagged_pushed_before_ms: options
                .delete_untagged
                .then(|| now - millis(options.untagged_min_age)),
            blobs_unused_before_ms: now - millis(options.blob_grace),
        };
        let mut report = GcReport {
            dry_run: options.dry_run,
            ..GcReport::default()
        };
        if options.dry_run {
            // Read from one snapshot: no writer waits for it, however large the store.
            let preview = self
                .meta
                .preview_garbage(selection, REPORT_LIST_MAX)
                .await?;
            report.mark_ms = started.elapsed().as_millis() as u64;
            report.manifests_removed_count = preview.manifest_count;
            report.manifests_removed = preview
                .manifests
                .iter()
                .map(|(repo, d)| format!("{repo}@{d}"))
                .collect();
            report.blobs_removed_count = preview.blob_count;
            report.blobs_removed = preview.blobs.iter().map(|(d, _)| d.to_string()).collect();
            report.bytes_freed = preview.bytes;
        } else {
            let (manifests, count) = self.mark_in_batches(&selection).await?;
            report.mark_ms = started.elapsed().as_millis() as u64;
            report.manifests_removed = manifests;
            report.manifests_removed_count = count;
            let swept = self.sweep_marked().await?;
            report.bytes_freed = swept.bytes;
            report.blobs_removed = swept.listed;
            report.blobs_removed_count = swept.count;
            self.meta
                .record_collection(count, swept.count, swept.bytes)
                .await?;
        }
        report.sweep_ms = started.elapsed().as_millis() as u64 - report.mark_ms;
        report.uploads_purged = self.purge_uploads(options).await?;
        if !options.dry_run {
            report.events_pruned = self.prune_events(options.event_retention).await?;
        }
        report.duration_ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            dry_run = report.dry_run,
            manifests = report.manifests_removed_count,
            blobs = report.blobs_removed_count,
            bytes = report.bytes_freed,
            uploads = report.uploads_purged,
            duration_ms = report.duration_ms,
            "garbage collection finished"
        );
        Ok(report)
    }

    /// Deletes the events older than `retention` that every consumer has read: the
    /// audit log's retention, run with every collection and by `serve`'s maintenance.
    pub async fn prune_events(&self, retention: Option<Duration>) -> Result<u64, RegistryError> {
        let Some(retention) = retention else {
            return Ok(0);
        };
        Ok(self.meta.prune_events(now_ms() - millis(retention)).await?)
    }

    /// Drops upload sessions whose bytes have not changed for `upload_max_age`, and those
    /// opened that long ago with no bytes at all (nothing staged, only their record). Part
    /// of every collection, and run on its own by `serve`'s maintenance, so that
    /// abandoned sessions go even where no collection is scheduled.
    pub async fn purge_uploads(&self, options: &GcOptions) -> Result<u64, RegistryError> {
        let cutoff = SystemTime::now() - options.upload_max_age;
        let sessions = self.blobs.list_uploads().await?;
        let mut stale: Vec<UploadId> = sessions
            .iter()
            .filter(|(_, changed)| *changed < cutoff)
            .map(|(id, _)| id.clone())
            .collect();
        let recorded = self
            .meta
            .uploads_started_before(now_ms() - millis(options.upload_max_age))
            .await?;
        for id in recorded {
            if !sessions.iter().any(|(s, _)| s.as_str() == id) {
                match UploadId::parse(&id) {
                    Some(upload) => stale.push(upload),
                    // Not an id this version hands out: only its record is left to drop.
                    None if !options.dry_run => self.meta.forget_upload(&id).await?,
                    None => {}
                }
            }
        }
        if !options.dry_run {
            for id in &stale {
                match self.blobs.abort(id).await {
                    Ok(()) | Err(berth_storage::StorageError::UploadUnknown(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                self.meta.forget_upload(id.as_str()).await?;
                self.uploads.release(id.as_str());
            }
        }
        Ok(stale.len() as u64)
    }
}
