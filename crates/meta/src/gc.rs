//! Garbage collection's mark, its preview and the scrub's query, for both engines.

use berth_oci::Digest;

use crate::engine::{args, Tx};
use crate::manifests::delete_manifest_rows;
use crate::{DanglingEdge, GcPreview, GcSelection, MetaError};

/// What a tag reaches: tagged manifests, the children of reached indexes, the referrers
/// of reached manifests — and every manifest pushed at or after `?1`, which is young
/// enough to be tagged yet. One recursive term (PostgreSQL allows no more), which follows
/// both kinds of step through one derived table.
macro_rules! live_manifests {
    () => {
        "WITH RECURSIVE live (repo, digest) AS (
    SELECT repo, digest FROM tags
    UNION SELECT repo, digest FROM manifests WHERE pushed_at >= ?1
    UNION SELECT step.repo, step.digest FROM live l
          JOIN (SELECT repo, manifest AS parent, target AS digest FROM manifest_edges WHERE kind = 'child'
                UNION ALL
                SELECT repo, subject AS parent, digest FROM manifests WHERE subject IS NOT NULL) step
            ON step.repo = l.repo AND step.parent = l.digest
)
"
    };
}

/// The manifests no tag reaches (see [`live_manifests`]), counted.
const UNREACHED_MANIFESTS_COUNT: &str = concat!(
    live_manifests!(),
    "SELECT count(*) FROM manifests m
WHERE NOT EXISTS (SELECT 1 FROM live l WHERE l.repo = m.repo AND l.digest = m.digest)"
);

/// A page of them: the first `?4` after (`?2`, `?3`) in (repository, digest) order.
const UNREACHED_MANIFESTS_PAGE: &str = concat!(
    live_manifests!(),
    "SELECT m.repo, m.digest FROM manifests m
WHERE (m.repo > ?2 OR (m.repo = ?2 AND m.digest > ?3))
  AND NOT EXISTS (SELECT 1 FROM live l WHERE l.repo = m.repo AND l.digest = m.digest)
ORDER BY m.repo, m.digest LIMIT ?4"
);

/// The live blobs unused since `?1` that no manifest references: what a collection that
/// keeps every manifest marks. `{select}` and `{tail}` make it a count or a listing (of
/// the first `?2`).
const UNUSED_BLOBS: &str = "SELECT {select} FROM blobs b
WHERE b.state = 'live' AND b.last_used_at < ?1
  AND NOT EXISTS (SELECT 1 FROM manifest_edges e WHERE e.target = b.digest) {tail}";

/// The same once the manifests unreached with cutoff `?1` are gone, unused since `?2`
/// (listing the first `?3`): only edges of live manifests keep a blob.
const UNUSED_BLOBS_UNREACHED: &str = concat!(
    live_manifests!(),
    "SELECT {select} FROM blobs b
WHERE b.state = 'live' AND b.last_used_at < ?2
  AND NOT EXISTS (SELECT 1 FROM manifest_edges e
                  WHERE e.target = b.digest
                    AND EXISTS (SELECT 1 FROM live l WHERE l.repo = e.repo AND l.digest = e.manifest)) {tail}"
);

/// What a collection with `selection` would remove now, read in one snapshot and changing
/// nothing (a dry run): counts, bytes and the first `list_max` of each. No writer waits
/// for it, however large the store.
pub(crate) fn preview(
    tx: &mut dyn Tx,
    selection: GcSelection,
    list_max: usize,
) -> Result<GcPreview, MetaError> {
    let limit = i64::try_from(list_max).unwrap_or(i64::MAX);
    let unused_before = selection.blobs_unused_before_ms;
    let mut preview = GcPreview::default();
    let sql = |shape: &str, select: &str, tail: &str| {
        shape.replace("{select}", select).replace("{tail}", tail)
    };
    let totals = "count(*), CAST(COALESCE(sum(b.size), 0) AS BIGINT)";
    let (mut total, listed) = match selection.untagged_pushed_before_ms {
        Some(cutoff) => {
            preview.manifest_count = tx
                .query_one(UNREACHED_MANIFESTS_COUNT, args![cutoff])?
                .size(0)?;
            preview.manifests = unreached(tx, cutoff, None, list_max)?;
            let shape = UNUSED_BLOBS_UNREACHED;
            (
                tx.query_one(&sql(shape, totals, ""), args![cutoff, unused_before])?,
                tx.query(
                    &sql(shape, "b.digest, b.size", "ORDER BY b.digest LIMIT ?3"),
                    args![cutoff, unused_before, limit],
                )?,
            )
        }
        None => (
            tx.query_one(&sql(UNUSED_BLOBS, totals, ""), args![unused_before])?,
            tx.query(
                &sql(
                    UNUSED_BLOBS,
                    "b.digest, b.size",
                    "ORDER BY b.digest LIMIT ?2",
                ),
                args![unused_before, limit],
            )?,
        ),
    };
    (preview.blob_count, preview.bytes) = (total.size(0)?, total.size(1)?);
    preview.blobs = listed
        .into_iter()
        .map(|mut r| Ok((r.digest(0)?, r.size(1)?)))
        .collect::<Result<_, MetaError>>()?;
    Ok(preview)
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

/// The manifests no tag reaches, pushed before `cutoff`: a page of a collection's
/// candidates (the first `limit` after `after`), read from a snapshot (writers go on);
/// [`remove_if_unreached`] checks each again as it removes it.
pub(crate) fn unreached(
    tx: &mut dyn Tx,
    cutoff: i64,
    after: Option<&(String, Digest)>,
    limit: usize,
) -> Result<Vec<(String, Digest)>, MetaError> {
    let (repo, digest) = after.map_or(("", ""), |(r, d)| (r.as_str(), d.as_str()));
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    tx.query_map(
        UNREACHED_MANIFESTS_PAGE,
        args![cutoff, repo, digest, limit],
        |mut r| Ok((r.text(0)?, r.digest(1)?)),
    )
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
