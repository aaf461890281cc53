//! Garbage collection's mark and the scrub's query, for both engines.

use berth_oci::Digest;

use crate::engine::{args, Tx};
use crate::images::delete_manifest_rows;
use crate::{Actor, Change, DanglingEdge, GcMarked, GcSelection, MetaError};

/// The manifests no tag reaches: everything a tag reaches is live — tagged manifests, the
/// children of reached indexes, the referrers of reached manifests — and so is every
/// manifest pushed at or after `?1`. One recursive term (PostgreSQL allows no more), which
/// follows both kinds of step through one derived table.
const UNREACHED_MANIFESTS: &str = "
WITH RECURSIVE live (repo, digest) AS (
    SELECT repo, digest FROM tags
    UNION SELECT repo, digest FROM manifests WHERE pushed_at >= ?1
    UNION SELECT step.repo, step.digest FROM live l
          JOIN (SELECT repo, manifest AS parent, target AS digest FROM manifest_edges WHERE kind = 'child'
                UNION ALL
                SELECT repo, subject AS parent, digest FROM manifests WHERE subject IS NOT NULL) step
            ON step.repo = l.repo AND step.parent = l.digest
)
SELECT m.repo, m.digest FROM manifests m
WHERE NOT EXISTS (SELECT 1 FROM live l WHERE l.repo = m.repo AND l.digest = m.digest)
ORDER BY m.repo, m.digest";

/// One garbage-collection mark inside a write (see [`crate::MetaStore::mark_garbage`]).
/// The conditions are checked in the same transaction that marks, so a manifest
/// committed before it keeps its blobs and one committed after it finds them unlinked and
/// is refused.
pub(crate) fn mark(tx: &mut dyn Tx, selection: GcSelection) -> Result<GcMarked, MetaError> {
    // A long transaction over every blob would lose serialization conflicts to the pushes
    // running beside it again and again. Writers of `blobs` wait instead while it marks
    // (tens of milliseconds; readers do not wait); taken before the first query, so the
    // mark's snapshot follows every write that was in flight.
    if let Some(lock) = tx.dialect().lock_blobs_against_writers() {
        tx.execute(lock, &[])?;
    }
    // A dry run does the real work and undoes it, so that what it reports is exactly what
    // a real pass would do.
    if selection.dry_run {
        tx.execute("SAVEPOINT dry_run", &[])?;
    }
    let marked = mark_unless_dry(tx, selection);
    if selection.dry_run {
        tx.execute("ROLLBACK TO SAVEPOINT dry_run", &[])?;
        tx.execute("RELEASE SAVEPOINT dry_run", &[])?;
    }
    marked
}

fn mark_unless_dry(tx: &mut dyn Tx, selection: GcSelection) -> Result<GcMarked, MetaError> {
    let mut manifests = Vec::new();
    if let Some(cutoff) = selection.untagged_pushed_before_ms {
        let dead = tx.query_map(UNREACHED_MANIFESTS, args![cutoff], |mut r| {
            Ok((r.text(0)?, r.text(1)?))
        })?;
        for (repo, digest) in dead {
            delete_manifest_rows(tx, &repo, &digest)?;
            let digest = Digest::parse(&digest).map_err(|e| MetaError::Corrupt(e.to_string()))?;
            manifests.push((repo, digest));
        }
    }
    // Set-based: one statement marks, one unlinks, whatever the number of blobs.
    let mut blobs = tx.query_map(
        "UPDATE blobs SET state = 'deleting'
         WHERE state = 'live' AND last_used_at < ?1
           AND NOT EXISTS (SELECT 1 FROM manifest_edges e WHERE e.target = blobs.digest)
         RETURNING digest, size",
        args![selection.blobs_unused_before_ms],
        |mut r| Ok((r.digest(0)?, r.size(1)?)),
    )?;
    tx.execute(
        "DELETE FROM repo_blobs WHERE digest IN (SELECT digest FROM blobs WHERE state = 'deleting')",
        &[],
    )?;
    blobs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    // Recorded even when nothing went: that a collection ran is what people ask for.
    let change = Change::GarbageCollected {
        manifests: manifests.len() as u64,
        blobs: blobs.len() as u64,
        bytes: blobs.iter().map(|(_, size)| size).sum(),
    };
    crate::events::record(tx, &Actor::system("gc"), &[change])?;
    Ok(GcMarked { manifests, blobs })
}

/// References from manifests to blobs or children missing from their repository.
pub(crate) fn dangling_edges(tx: &mut dyn Tx) -> Result<Vec<DanglingEdge>, MetaError> {
    tx.query_map(
        "SELECT e.repo, e.manifest, e.target, e.kind FROM manifest_edges e
         WHERE (e.kind = 'child' AND NOT EXISTS
                  (SELECT 1 FROM manifests m WHERE m.repo = e.repo AND m.digest = e.target))
            OR (e.kind <> 'child' AND NOT EXISTS
                  (SELECT 1 FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
                   WHERE l.repo = e.repo AND l.digest = e.target AND b.state = 'live'))
         ORDER BY e.repo, e.manifest, e.target",
        &[],
        |mut r| {
            Ok(DanglingEdge {
                repo: r.text(0)?,
                manifest: r.text(1)?,
                target: r.text(2)?,
                kind: r.text(3)?,
            })
        },
    )
}

/// The manifests no tag reaches, pushed before `cutoff`: a collection's candidates, read
/// from a snapshot (writers go on); [`remove_if_unreached`] checks each again as it
/// removes it.
pub(crate) fn unreached(tx: &mut dyn Tx, cutoff: i64) -> Result<Vec<(String, Digest)>, MetaError> {
    tx.query_map(UNREACHED_MANIFESTS, args![cutoff], |mut r| {
        Ok((r.text(0)?, r.digest(1)?))
    })
}

/// Whether a manifest is still removable now: pushed before the cutoff, no tag on it, no
/// index listing it, and (for a referrer) its subject gone. Stricter than the snapshot's
/// reachability — a candidate whose index or subject is still there stays — so that
/// whatever a push did since the snapshot (a tag, a new index) keeps what it reaches;
/// what stays for that reason goes with the next collection.
const STILL_UNREACHED: &str = "
SELECT 1 FROM manifests m
WHERE m.repo = ?1 AND m.digest = ?2 AND m.pushed_at < ?3
  AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = m.repo AND t.digest = m.digest)
  AND NOT EXISTS (SELECT 1 FROM manifest_edges e
                  WHERE e.target = m.digest AND e.repo = m.repo AND e.kind = 'child')
  AND (m.subject IS NULL OR NOT EXISTS
        (SELECT 1 FROM manifests s WHERE s.repo = m.repo AND s.digest = m.subject))";

/// Removes those of `candidates` that are still unreached (see [`STILL_UNREACHED`]), in
/// passes so that an index goes before its children and a subject before its referrers
/// within the batch. Returns what went.
pub(crate) fn remove_if_unreached(
    tx: &mut dyn Tx,
    candidates: &[(String, Digest)],
    cutoff: i64,
) -> Result<Vec<(String, Digest)>, MetaError> {
    let mut left: Vec<&(String, Digest)> = candidates.iter().collect();
    let mut removed = Vec::new();
    loop {
        let mut kept = Vec::with_capacity(left.len());
        for candidate in left.iter().copied() {
            let (repo, digest) = candidate;
            if tx.exists(STILL_UNREACHED, args![repo, digest.as_str(), cutoff])? {
                delete_manifest_rows(tx, repo, digest.as_str())?;
                removed.push(candidate.clone());
            } else {
                kept.push(candidate);
            }
        }
        if kept.len() == left.len() {
            return Ok(removed);
        }
        left = kept;
    }
}

/// Marks as being deleted the live blobs among the next `limit` after `after` (in digest
/// order) that no manifest references and that were not used since `unused_before`, and
/// removes their repository links: one bounded step of a collection's mark, so that
/// writers wait for a batch, never for the whole store.
pub(crate) fn mark_blob_batch(
    tx: &mut dyn Tx,
    after: &str,
    limit: usize,
    unused_before: i64,
) -> Result<crate::MarkedBatch, MetaError> {
    if let Some(lock) = tx.dialect().lock_blobs_against_writers() {
        tx.execute(lock, &[])?;
    }
    let offset = i64::try_from(limit.max(1) - 1).unwrap_or(0);
    let last = tx
        .query_map(
            "SELECT digest FROM blobs WHERE digest > ?1 ORDER BY digest LIMIT 1 OFFSET ?2",
            args![after, offset],
            |mut r| r.text(0),
        )?
        .pop();
    // Past the last full batch the range is open-ended: "~" sorts after every digest.
    let until = last.clone().unwrap_or_else(|| "~".to_owned());
    let marked = tx.query_map(
        "UPDATE blobs SET state = 'deleting'
         WHERE digest > ?1 AND digest <= ?2 AND state = 'live' AND last_used_at < ?3
           AND NOT EXISTS (SELECT 1 FROM manifest_edges e WHERE e.target = blobs.digest)
         RETURNING digest, size",
        args![after, &until, unused_before],
        |mut r| Ok((r.digest(0)?, r.size(1)?)),
    )?;
    // Links of this batch's marked blobs, and of any an interrupted pass marked here.
    tx.execute(
        "DELETE FROM repo_blobs WHERE digest IN
           (SELECT digest FROM blobs WHERE state = 'deleting' AND digest > ?1 AND digest <= ?2)",
        args![after, &until],
    )?;
    Ok(crate::MarkedBatch { marked, next: last })
}
