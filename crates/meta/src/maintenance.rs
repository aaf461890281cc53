//! [`MaintenanceStore`] for both engines: what the jobs beside the registry need from
//! the store. Garbage collection's bounded batches and its record, the scrub's pages,
//! and the leases that let nodes sharing a store run a job one at a time.

use async_trait::async_trait;
use berth_oci::Digest;

use crate::engine::{args, owned, Durability, Row, Tx};
use crate::{
    now, Actor, Change, DanglingEdge, Database, GcPreview, GcSelection, LeaseState, MarkedBatch,
    MetaError,
};

/// The store's side of garbage collection, the scrub and leases.
#[async_trait]
pub trait MaintenanceStore: Send + Sync {
    /// What a collection with `selection` would remove now: counts, bytes and the first
    /// `list_max` manifests and blobs, read from one snapshot. Changes nothing and holds
    /// no writer, however large the store (a dry run).
    async fn preview_garbage(
        &self,
        selection: GcSelection,
        list_max: usize,
    ) -> Result<GcPreview, MetaError>;
    /// The manifests no tag reaches that were pushed before `cutoff_ms`, read from a
    /// snapshot: a page (the first `limit` after `after`, in (repository, digest) order)
    /// of the candidates of a collection that removes untagged manifests. Each page walks
    /// every tag again; pages keep the candidates out of memory at once.
    async fn unreached_manifests(
        &self,
        cutoff_ms: i64,
        after: Option<(String, Digest)>,
        limit: usize,
    ) -> Result<Vec<(String, Digest)>, MetaError>;
    /// Removes those of `candidates` still unreached now, in one transaction (a batch of
    /// a collection); returns what went.
    async fn remove_unreached_manifests(
        &self,
        candidates: Vec<(String, Digest)>,
        cutoff_ms: i64,
    ) -> Result<Vec<(String, Digest)>, MetaError>;
    /// One bounded step of a collection's mark, in its own transaction: of the next
    /// `limit` blobs after `after` (digest order), marks those nothing references and
    /// nobody used since `unused_before_ms` as being deleted and removes their links.
    /// Returns them and where the next step starts (`None`: done).
    async fn mark_unused_blobs(
        &self,
        after: &str,
        limit: usize,
        unused_before_ms: i64,
    ) -> Result<MarkedBatch, MetaError>;
    /// Records that a collection ran and what it removed (the event the dashboard and the
    /// audit log show).
    async fn record_collection(
        &self,
        manifests: u64,
        blobs: u64,
        bytes: u64,
    ) -> Result<(), MetaError>;
    /// Blobs marked for deletion whose bytes may still exist (this pass's and any earlier,
    /// interrupted pass's), after `after` in digest order, at most `limit`.
    async fn blobs_being_deleted(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(Digest, u64)>, MetaError>;
    /// Drops the records of blobs whose bytes are gone (one transaction for the batch).
    async fn forget_deleted_blobs(&self, digests: &[Digest]) -> Result<(), MetaError>;
    /// Upload sessions started before the cutoff (ms since the epoch).
    async fn uploads_started_before(&self, cutoff_ms: i64) -> Result<Vec<String>, MetaError>;
    /// Live blobs with their recorded sizes after `after` in digest order, at most
    /// `limit`: a scrub's pages.
    async fn live_blobs(&self, after: &str, limit: usize) -> Result<Vec<(Digest, u64)>, MetaError>;
    /// References from manifests to blobs or children missing from their repository.
    async fn dangling_edges(&self) -> Result<Vec<DanglingEdge>, MetaError>;
    /// Forgets a blob whose bytes are missing or corrupt: its record and every link, so
    /// that clients see it as absent and upload it again.
    async fn drop_blob(&self, digest: &Digest) -> Result<(), MetaError>;
    /// Takes (or renews) the named lease for `holder` until `ttl_ms` from now, if nobody
    /// else holds it unexpired: how nodes sharing a store run a background job (garbage
    /// collection) one at a time. A holder that dies loses the lease when it expires.
    async fn try_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, MetaError>;
    /// Gives a lease back early (only if `holder` holds it).
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetaError>;
    /// Whether the named lease is free, held, or was left to expire by a holder that
    /// stopped (a crash, a kill, a failure it did not clean up after).
    async fn lease_state(&self, name: &str) -> Result<LeaseState, MetaError>;
}

/// Takes (or renews) a lease for `holder` if nobody else holds it unexpired.
pub(crate) fn take_lease(
    tx: &mut dyn Tx,
    name: &str,
    holder: &str,
    ttl_ms: i64,
) -> Result<bool, MetaError> {
    let t = now();
    tx.exists(
        "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
         WHERE leases.holder = excluded.holder OR leases.expires_at < ?4
         RETURNING holder",
        args![name, holder, t.saturating_add(ttl_ms), t],
    )
}

/// `LIMIT` of a page: all rows when the page has no limit.
fn digest_and_size(mut r: Row) -> Result<(Digest, u64), MetaError> {
    Ok((r.digest(0)?, r.size(1)?))
}

#[async_trait]
impl MaintenanceStore for Database {
    async fn preview_garbage(
        &self,
        selection: GcSelection,
        list_max: usize,
    ) -> Result<GcPreview, MetaError> {
        self.engine
            .read_snapshot(move |tx| crate::gc::preview(tx, selection, list_max))
            .await
    }

    async fn unreached_manifests(
        &self,
        cutoff_ms: i64,
        after: Option<(String, Digest)>,
        limit: usize,
    ) -> Result<Vec<(String, Digest)>, MetaError> {
        // Off the async threads: the reachability query walks every tag.
        self.engine
            .read_snapshot(move |tx| crate::gc::unreached(tx, cutoff_ms, after.as_ref(), limit))
            .await
    }

    async fn remove_unreached_manifests(
        &self,
        candidates: Vec<(String, Digest)>,
        cutoff_ms: i64,
    ) -> Result<Vec<(String, Digest)>, MetaError> {
        self.engine
            .write(Durability::Synced, move |tx| {
                crate::gc::remove_if_unreached(tx, &candidates, cutoff_ms)
            })
            .await
    }

    async fn mark_unused_blobs(
        &self,
        after: &str,
        limit: usize,
        unused_before_ms: i64,
    ) -> Result<crate::MarkedBatch, MetaError> {
        let after = after.to_owned();
        self.engine
            .write(Durability::Synced, move |tx| {
                crate::gc::mark_blob_batch(tx, &after, limit, unused_before_ms)
            })
            .await
    }

    async fn record_collection(
        &self,
        manifests: u64,
        blobs: u64,
        bytes: u64,
    ) -> Result<(), MetaError> {
        let change = Change::GarbageCollected {
            manifests,
            blobs,
            bytes,
        };
        self.engine
            .write_recorded(move |tx| {
                crate::events::record(tx, &Actor::system("gc"), std::slice::from_ref(&change))
            })
            .await
    }

    async fn blobs_being_deleted(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(Digest, u64)>, MetaError> {
        let sql = "SELECT digest, size FROM blobs WHERE state = 'deleting' AND digest > ?1
                   ORDER BY digest LIMIT ?2";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_rows(sql, owned![after, limit], digest_and_size)
            .await
    }

    async fn forget_deleted_blobs(&self, digests: &[Digest]) -> Result<(), MetaError> {
        let digests: Vec<String> = digests.iter().map(|d| d.as_str().to_owned()).collect();
        self.engine
            .write(Durability::Synced, move |tx| {
                let sql = format!(
                    "DELETE FROM blobs WHERE state = 'deleting' AND digest {}",
                    tx.dialect().in_list(1)
                );
                tx.execute(&sql, args![digests.as_slice()]).map(drop)
            })
            .await
    }

    async fn uploads_started_before(&self, cutoff_ms: i64) -> Result<Vec<String>, MetaError> {
        let sql = "SELECT id FROM uploads WHERE started_at < ?1 ORDER BY id";
        self.read_rows(sql, owned![cutoff_ms], |mut r| r.text(0))
            .await
    }

    async fn live_blobs(&self, after: &str, limit: usize) -> Result<Vec<(Digest, u64)>, MetaError> {
        let sql = "SELECT digest, size FROM blobs WHERE state = 'live' AND digest > ?1
                   ORDER BY digest LIMIT ?2";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read_rows(sql, owned![after, limit], digest_and_size)
            .await
    }

    async fn dangling_edges(&self) -> Result<Vec<DanglingEdge>, MetaError> {
        self.engine.read(crate::gc::dangling_edges).await
    }

    async fn drop_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        let digest = digest.as_str().to_owned();
        self.engine
            .write(Durability::Synced, move |tx| {
                tx.execute("DELETE FROM repo_blobs WHERE digest = ?1", args![&digest])?;
                tx.execute("DELETE FROM blobs WHERE digest = ?1", args![&digest])?;
                Ok(())
            })
            .await
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, MetaError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.engine
            .write(Durability::Synced, move |tx| {
                take_lease(tx, &name, &holder, ttl_ms)
            })
            .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetaError> {
        let sql = "DELETE FROM leases WHERE name = ?1 AND holder = ?2";
        self.write_statement(Durability::Synced, sql, owned![name, holder])
            .await
            .map(drop)
    }

    async fn lease_state(&self, name: &str) -> Result<LeaseState, MetaError> {
        let sql = "SELECT expires_at FROM leases WHERE name = ?1";
        let expires = self.read_row(sql, owned![name], |mut r| r.int(0)).await?;
        Ok(match expires {
            None => LeaseState::Free,
            Some(at) if at < now() => LeaseState::Expired,
            Some(_) => LeaseState::Held,
        })
    }
}
