//! Garbage-collection and scrub queries of the SQLite backend.

use berth_oci::Digest;
use rusqlite::{params, Connection};

use super::{backend, delete_manifest_rows, SqliteMeta};
use crate::parse_digest;
use crate::{DanglingEdge, GcMarked, GcSelection, MetaError};

/// Everything a tag reaches: tagged manifests, the children of reached indexes, and the
/// referrers of reached manifests; plus manifests too young to collect. Filled per pass.
const MARK_LIVE_MANIFESTS: &str = "
INSERT INTO gc_live (repo, digest)
WITH RECURSIVE live (repo, digest) AS (
    SELECT repo, digest FROM tags
    UNION SELECT repo, digest FROM manifests WHERE pushed_at >= ?1
    UNION SELECT e.repo, e.target FROM manifest_edges e
          JOIN live l ON e.repo = l.repo AND e.manifest = l.digest WHERE e.kind = 'child'
    UNION SELECT m.repo, m.digest FROM manifests m
          JOIN live l ON m.repo = l.repo AND m.subject = l.digest
)
SELECT repo, digest FROM live";

fn remove_unreached_manifests(
    tx: &Connection,
    pushed_before_ms: i64,
) -> Result<Vec<(String, Digest)>, MetaError> {
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS gc_live (repo TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY (repo, digest));
         DELETE FROM gc_live;",
    )
    .map_err(backend)?;
    tx.execute(MARK_LIVE_MANIFESTS, params![pushed_before_ms])
        .map_err(backend)?;
    let dead = tx
        .prepare(
            "SELECT repo, digest FROM manifests m
             WHERE NOT EXISTS (SELECT 1 FROM gc_live l WHERE l.repo = m.repo AND l.digest = m.digest)
             ORDER BY repo, digest",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?.collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(backend)?;
    let mut removed = Vec::with_capacity(dead.len());
    for (repo, digest) in dead {
        delete_manifest_rows(tx, &repo, &digest)?;
        removed.push((repo, parse_digest(digest)?));
    }
    tx.execute("DELETE FROM gc_live", []).map_err(backend)?;
    Ok(removed)
}

/// Marks unreferenced, unused blobs as being deleted. The conditions are checked in the
/// same transaction that marks, so a manifest committed before it keeps its blobs and one
/// committed after it finds them unlinked and is refused.
fn mark_unreferenced_blobs(
    tx: &Connection,
    unused_before_ms: i64,
) -> Result<Vec<(Digest, u64)>, MetaError> {
    // Set-based: one statement marks, one unlinks, whatever the number of blobs.
    let mut garbage = tx
        .prepare(
            "UPDATE blobs SET state = 'deleting'
             WHERE state = 'live' AND last_used_at < ?1
               AND NOT EXISTS (SELECT 1 FROM manifest_edges e WHERE e.target = blobs.digest)
             RETURNING digest, size",
        )
        .and_then(|mut s| {
            s.query_map(params![unused_before_ms], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(backend)?;
    tx.execute(
        "DELETE FROM repo_blobs WHERE digest IN (SELECT digest FROM blobs WHERE state = 'deleting')",
        [],
    )
    .map_err(backend)?;
    garbage.sort();
    garbage
        .into_iter()
        .map(|(digest, size)| Ok((parse_digest(digest)?, size as u64)))
        .collect()
}

impl SqliteMeta {
    pub(super) async fn mark_garbage_sqlite(
        &self,
        selection: GcSelection,
    ) -> Result<GcMarked, MetaError> {
        self.write(move |conn| {
            // A dry run does the real work inside a savepoint and then undoes it, so that
            // what it reports is exactly what a real pass would do.
            if selection.dry_run {
                conn.execute_batch("SAVEPOINT dry_run").map_err(backend)?;
            }
            let result = (|| {
                let manifests = match selection.untagged_pushed_before_ms {
                    Some(cutoff) => remove_unreached_manifests(conn, cutoff)?,
                    None => Vec::new(),
                };
                let blobs = mark_unreferenced_blobs(conn, selection.blobs_unused_before_ms)?;
                Ok(GcMarked { manifests, blobs })
            })();
            if selection.dry_run {
                conn.execute_batch("ROLLBACK TO dry_run; RELEASE dry_run")
                    .map_err(backend)?;
            }
            result
        })
        .await
    }

    pub(super) async fn blobs_being_deleted_sqlite(&self) -> Result<Vec<(Digest, u64)>, MetaError> {
        self.read(|conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT digest, size FROM blobs WHERE state = 'deleting' ORDER BY digest",
                )
                .and_then(|mut s| {
                    s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(backend)?;
            rows.into_iter()
                .map(|(d, size)| Ok((parse_digest(d)?, size as u64)))
                .collect()
        })
        .await
    }

    pub(super) async fn forget_deleted_blobs_sqlite(
        &self,
        digests: &[Digest],
    ) -> Result<(), MetaError> {
        let digests: Vec<String> = digests.iter().map(|d| d.as_str().to_owned()).collect();
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached("DELETE FROM blobs WHERE digest = ?1 AND state = 'deleting'")
                .map_err(backend)?;
            for digest in &digests {
                stmt.execute(params![digest]).map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn uploads_started_before_sqlite(
        &self,
        cutoff_ms: i64,
    ) -> Result<Vec<String>, MetaError> {
        self.read(move |conn| {
            conn.prepare_cached("SELECT id FROM uploads WHERE started_at < ?1 ORDER BY id")
                .and_then(|mut s| {
                    s.query_map(params![cutoff_ms], |r| r.get(0))?
                        .collect::<rusqlite::Result<Vec<String>>>()
                })
                .map_err(backend)
        })
        .await
    }

    pub(super) async fn live_blobs_sqlite(&self) -> Result<Vec<(Digest, u64)>, MetaError> {
        self.read(|conn| {
            let rows = conn
                .prepare_cached(
                    "SELECT digest, size FROM blobs WHERE state = 'live' ORDER BY digest",
                )
                .and_then(|mut s| {
                    s.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(backend)?;
            rows.into_iter()
                .map(|(d, s)| Ok((parse_digest(d)?, s as u64)))
                .collect()
        })
        .await
    }

    pub(super) async fn dangling_edges_sqlite(&self) -> Result<Vec<DanglingEdge>, MetaError> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT e.repo, e.manifest, e.target, e.kind FROM manifest_edges e
                 WHERE (e.kind = 'child' AND NOT EXISTS
                          (SELECT 1 FROM manifests m WHERE m.repo = e.repo AND m.digest = e.target))
                    OR (e.kind <> 'child' AND NOT EXISTS
                          (SELECT 1 FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
                           WHERE l.repo = e.repo AND l.digest = e.target AND b.state = 'live'))
                 ORDER BY e.repo, e.manifest, e.target",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(DanglingEdge {
                        repo: r.get(0)?,
                        manifest: r.get(1)?,
                        target: r.get(2)?,
                        kind: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(backend)
        })
        .await
    }

    pub(super) async fn drop_blob_sqlite(&self, digest: &Digest) -> Result<(), MetaError> {
        let digest = digest.as_str().to_owned();
        self.write(move |tx| {
            tx.execute("DELETE FROM repo_blobs WHERE digest = ?1", params![digest])
                .map_err(backend)?;
            tx.execute("DELETE FROM blobs WHERE digest = ?1", params![digest])
                .map_err(backend)?;
            Ok(())
        })
        .await
    }
}
