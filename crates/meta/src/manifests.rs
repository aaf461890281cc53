//! How a manifest is written and removed, for both engines: with its edges, its tag and
//! its event in one transaction, after checking that its references are present.

use berth_oci::{Digest, EdgeKind, RepoName, Tag};

use crate::changes::{Change, TagChange};
use crate::engine::{args, Tx};
use crate::events::{self, Actor};
use crate::{now, Database, MetaError, NewManifest};

/// Removes a manifest with its tags and edges; returns whether it existed.
pub(crate) fn delete_manifest_rows(
    tx: &mut dyn Tx,
    repo: &str,
    digest: &str,
) -> Result<bool, MetaError> {
    let n = tx.execute(
        "DELETE FROM manifests WHERE repo = ?1 AND digest = ?2",
        args![repo, digest],
    )?;
    tx.execute(
        "DELETE FROM tags WHERE repo = ?1 AND digest = ?2",
        args![repo, digest],
    )?;
    tx.execute(
        "DELETE FROM manifest_edges WHERE repo = ?1 AND manifest = ?2",
        args![repo, digest],
    )?;
    Ok(n > 0)
}

/// The edges of `manifest` whose targets `repo` does not hold.
fn missing_references(
    tx: &mut dyn Tx,
    repo: &str,
    manifest: &NewManifest,
) -> Result<Vec<Digest>, MetaError> {
    let mut missing = Vec::new();
    for edge in &manifest.edges {
        let sql = match edge.kind {
            EdgeKind::Config | EdgeKind::Layer => {
                "SELECT 1 FROM repo_blobs WHERE repo = ?1 AND digest = ?2"
            }
            EdgeKind::Child => "SELECT 1 FROM manifests WHERE repo = ?1 AND digest = ?2",
        };
        if !tx.exists(sql, args![repo, edge.digest.as_str()])? && !missing.contains(&edge.digest) {
            missing.push(edge.digest.clone());
        }
    }
    Ok(missing)
}

/// Points `tag` at `digest`, recording who did; says what it pointed at before.
fn point_tag(
    tx: &mut dyn Tx,
    repo: &str,
    tag: &str,
    digest: &str,
    at: i64,
    by: &str,
) -> Result<TagChange, MetaError> {
    let before = tx.query_opt(
        "SELECT digest FROM tags WHERE repo = ?1 AND tag = ?2",
        args![repo, tag],
    )?;
    let before = before.map(|mut r| r.text(0)).transpose()?;
    tx.execute(
        "INSERT INTO tags (repo, tag, digest, updated_at, pushed_by) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest,
           updated_at = excluded.updated_at, pushed_by = excluded.pushed_by",
        args![repo, tag, digest, at, by],
    )?;
    Ok(match before {
        None => TagChange::Created,
        Some(from) if from == digest => TagChange::Unchanged,
        Some(from) => TagChange::Moved { from },
    })
}

impl Database {
    /// Writes a manifest, its edges, its tag and its event in one transaction; with
    /// `check_references`, only if every edge's target is present in `repo`.
    pub(crate) async fn store_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        tag: Option<&Tag>,
        by: &Actor,
        check_references: bool,
    ) -> Result<(), MetaError> {
        let repo = repo.as_str().to_owned();
        let tag = tag.map(|t| t.as_str().to_owned());
        let by = by.clone();
        let created_repository = self
            .engine
            .write_recorded_content(move |tx| {
                if check_references {
                    let missing = missing_references(tx, &repo, &manifest)?;
                    if !missing.is_empty() {
                        return Err(MetaError::MissingReferences { missing });
                    }
                }
                let t = now();
                let digest = manifest.digest.as_str();
                // A new repository can make a project without a record exist (see the
                // access policy), so its creation counts as an access change.
                let created_repository = tx.execute(
                    "INSERT INTO repositories (name, created_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                    args![&repo, t],
                )? > 0;
                tx.execute(
                    "INSERT INTO manifests (repo, digest, media_type, artifact_type, subject, annotations, size, raw, pushed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (repo, digest) DO UPDATE SET pushed_at = excluded.pushed_at",
                    args![
                        &repo,
                        digest,
                        &manifest.media_type,
                        manifest.artifact_type.as_deref(),
                        manifest.subject.as_ref().map(Digest::as_str),
                        manifest.annotations_json.as_deref(),
                        manifest.raw.len() as i64,
                        manifest.raw.as_slice(),
                        t
                    ],
                )?;
                for edge in &manifest.edges {
                    tx.execute(
                        "INSERT INTO manifest_edges (repo, manifest, target, kind) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT DO NOTHING",
                        args![&repo, digest, edge.digest.as_str(), edge.kind.as_str()],
                    )?;
                    // A fresh reference restarts the blob's grace period.
                    tx.execute(
                        "UPDATE blobs SET last_used_at = ?2 WHERE digest = ?1",
                        args![edge.digest.as_str(), t],
                    )?;
                }
                let tag_change = match &tag {
                    Some(tag) => Some((
                        tag.clone(),
                        point_tag(tx, &repo, tag, digest, t, &by.name)?,
                    )),
                    None => None,
                };
                let change = Change::ManifestPushed {
                    repository: repo.clone(),
                    digest: digest.to_owned(),
                    media_type: manifest.media_type.clone(),
                    size: manifest.raw.len() as u64,
                    subject: manifest.subject.as_ref().map(Digest::to_string),
                    tag: tag_change,
                };
                events::record(tx, &by, &[change])?;
                Ok(created_repository)
            })
            .await?;
        if created_repository {
            self.engine.access_changed();
        }
        Ok(())
    }
}
