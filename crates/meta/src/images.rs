//! [`MetaStore`] for both engines: blobs and their links, manifests with their edges,
//! tags, referrers, upload sessions and projects. Collections, the scrub and leases are
//! in `maintenance.rs`.

use async_trait::async_trait;
use berth_oci::{Digest, Reference, RepoName, Tag};

use crate::accounts::{clash, project_row};
use crate::changes::Change;
use crate::engine::{args, owned, Durability, Row, Tx};
use crate::events::{self, record, Actor};
use crate::manifests::delete_manifest_rows;
use crate::{
    now, BlobArrival, CachedManifest, Database, LinkedBlob, MetaError, MetaStore, NewManifest,
    Page, ProjectOrigin, ProjectRecord, Referrer, StoreCounts, StoredManifest,
};

fn limit(page: &Page<'_>) -> i64 {
    page.limit
        .map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX))
}

fn stored_manifest(mut r: Row) -> Result<StoredManifest, MetaError> {
    Ok(StoredManifest {
        digest: r.digest(0)?,
        media_type: r.text(1)?,
        raw: r.bytes(2)?,
    })
}

impl Database {
    fn open_uploads(
        &self,
    ) -> Option<std::sync::MutexGuard<'_, std::collections::HashMap<String, String>>> {
        self.open_uploads
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

#[async_trait]
impl MetaStore for Database {
    fn changes(&self) -> u64 {
        self.engine.changes()
    }

    fn access_changes(&self) -> u64 {
        self.engine.access_changes()
    }

    fn node_local(&self) -> bool {
        self.engine.node_local()
    }

    async fn reserve_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        // A new record, or a live one refreshed; a record being deleted is left alone and
        // returns no row.
        let sql = "INSERT INTO blobs (digest, size, created_at, last_used_at, state) VALUES (?1, 0, ?2, ?2, 'live')
                   ON CONFLICT (digest) DO UPDATE SET last_used_at = excluded.last_used_at
                   WHERE blobs.state = 'live'
                   RETURNING state";
        let args = owned![digest.as_str(), now()];
        let reserved = self
            .engine
            .write(Durability::Visible, move |tx| tx.exists(sql, &args))
            .await?;
        reserved.then_some(()).ok_or(MetaError::BlobBeingDeleted)
    }

    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        arrival: BlobArrival<'_>,
        by: &Actor,
    ) -> Result<(), MetaError> {
        let (repository, digest_text) = (repo.to_string(), digest.to_string());
        let (session, change) = match arrival {
            BlobArrival::Uploaded { session } => (
                session.map(str::to_owned),
                Change::BlobUploaded {
                    repository,
                    digest: digest_text,
                    size,
                },
            ),
            BlobArrival::Mounted => (
                None,
                Change::BlobMounted {
                    repository,
                    digest: digest_text,
                    size,
                },
            ),
        };
        let finished = session.clone();
        let (repo, digest, by) = (repo.to_string(), digest.to_string(), by.clone());
        let size = i64::try_from(size).map_err(|_| MetaError::Backend("blob too large".into()))?;
        let linked = self
            .engine
            .write_recorded_content(move |tx| {
                let t = now();
                let live = tx.execute(
                    "UPDATE blobs SET size = ?2, last_used_at = ?3 WHERE digest = ?1 AND state = 'live'",
                    args![&digest, size, t],
                )?;
                if live == 0 {
                    return Err(MetaError::BlobBeingDeleted);
                }
                tx.execute(
                    "INSERT INTO repo_blobs (repo, digest, linked_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (repo, digest) DO UPDATE SET linked_at = excluded.linked_at",
                    args![&repo, &digest, t],
                )?;
                if let Some(id) = &session {
                    tx.execute("DELETE FROM uploads WHERE id = ?1", args![id])?;
                }
                events::record(tx, &by, std::slice::from_ref(&change))
            })
            .await;
        if let (Ok(()), Some(id), Some(mut open)) = (&linked, finished, self.open_uploads()) {
            open.remove(&id);
        }
        linked
    }

    async fn touch_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        let sql = "UPDATE blobs SET last_used_at = ?2 WHERE digest = ?1 AND state = 'live'";
        self.write_statement(Durability::Visible, sql, owned![digest.as_str(), now()])
            .await
            .map(drop)
    }

    async fn linked_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<LinkedBlob>, MetaError> {
        let sql =
            "SELECT b.size, b.last_used_at FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
                   WHERE l.repo = ?1 AND l.digest = ?2 AND b.state = 'live'";
        self.read_row(sql, owned![repo.as_str(), digest.as_str()], |mut r| {
            Ok(LinkedBlob {
                size: r.size(0)?,
                last_used_ms: r.int(1)?,
            })
        })
        .await
    }

    async fn any_linked_blob_size(&self, digest: &Digest) -> Result<Option<u64>, MetaError> {
        let sql = "SELECT b.size FROM blobs b WHERE b.digest = ?1 AND b.state = 'live'
                   AND EXISTS (SELECT 1 FROM repo_blobs l WHERE l.digest = b.digest)";
        self.read_row(sql, owned![digest.as_str()], |mut r| r.size(0))
            .await
    }

    async fn unlink_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let change = Change::BlobDeleted {
            repository: repo.to_string(),
            digest: digest.to_string(),
        };
        let (repo, digest, by) = (repo.to_string(), digest.to_string(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                let sql = "DELETE FROM repo_blobs WHERE repo = ?1 AND digest = ?2";
                let unlinked = tx.execute(sql, args![&repo, &digest])? > 0;
                if unlinked {
                    events::record(tx, &by, std::slice::from_ref(&change))?;
                }
                Ok(unlinked)
            })
            .await
    }

    async fn touch_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<(), MetaError> {
        let sql = "UPDATE manifests SET pulled_at = ?3 WHERE repo = ?1 AND digest = ?2";
        self.write_statement(
            Durability::Visible,
            sql,
            owned![repo.as_str(), digest.as_str(), now()],
        )
        .await
        .map(drop)
    }

    async fn least_recently_pulled(
        &self,
        project: &str,
        limit: usize,
    ) -> Result<Vec<CachedManifest>, MetaError> {
        let sql = "SELECT m.repo, m.digest, COALESCE(m.pulled_at, m.pushed_at) AS seen,
                          CAST(m.size + COALESCE((SELECT SUM(b.size) FROM manifest_edges e
                                                  JOIN blobs b ON b.digest = e.target
                                                  WHERE e.repo = m.repo AND e.manifest = m.digest), 0)
                               AS BIGINT)
                   FROM manifests m
                   WHERE substr(m.repo, 1, length(?1) + 1) = ?1 || '/'
                   ORDER BY seen, m.repo, m.digest
                   LIMIT ?2";
        self.read_rows(sql, owned![project, limit as i64], |mut r| {
            Ok(CachedManifest {
                repo: r.text(0)?,
                digest: Digest::parse(&r.text(1)?)
                    .map_err(|e| MetaError::Corrupt(e.to_string()))?,
                last_pulled_ms: r.int(2)?,
                bytes: r.size(3)?,
            })
        })
        .await
    }

    async fn project_bytes(&self, project: &str) -> Result<u64, MetaError> {
        let sql = "SELECT CAST(COALESCE(SUM(b.size), 0) AS BIGINT) FROM blobs b
                   WHERE b.state = 'live' AND b.digest IN (SELECT l.digest FROM repo_blobs l
                                      WHERE substr(l.repo, 1, length(?1) + 1) = ?1 || '/')";
        Ok(self
            .read_row(sql, owned![project], |mut r| r.size(0))
            .await?
            .unwrap_or(0))
    }

    async fn repositories(
        &self,
        project: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::RepositorySummary>, MetaError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.summaries(project, after.unwrap_or_default(), limit)
            .await
    }

    async fn recent_tags(&self, limit: usize) -> Result<Vec<crate::RecentTag>, MetaError> {
        self.recent_tag_rows(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
    }

    async fn repository_projects(&self, limit: usize) -> Result<Vec<String>, MetaError> {
        self.project_names_of_repositories(limit).await
    }

    async fn last_collection(&self) -> Result<Option<(i64, String)>, MetaError> {
        self.last_collection_row().await
    }

    async fn tag_details(
        &self,
        repo: &RepoName,
        after: Option<&str>,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<crate::TagDetail>, MetaError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.tag_page(repo.as_str(), after.unwrap_or_default(), prefix, limit)
            .await
    }

    async fn delete_repository(
        &self,
        repo: &RepoName,
        by: &Actor,
    ) -> Result<Option<u64>, MetaError> {
        self.remove_repository(repo.as_str(), by).await
    }

    async fn put_cached_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        tag: Option<&Tag>,
        by: &Actor,
    ) -> Result<(), MetaError> {
        self.store_manifest(repo, manifest, tag, by, false).await
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        tag: Option<&Tag>,
        by: &Actor,
    ) -> Result<(), MetaError> {
        self.store_manifest(repo, manifest, tag, by, true).await
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, MetaError> {
        let (sql, args) = match reference {
            Reference::Digest(d) => (
                "SELECT digest, media_type, raw FROM manifests WHERE repo = ?1 AND digest = ?2",
                owned![repo.as_str(), d.as_str()],
            ),
            Reference::Tag(t) => (
                "SELECT m.digest, m.media_type, m.raw FROM tags t
                 JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest
                 WHERE t.repo = ?1 AND t.tag = ?2",
                owned![repo.as_str(), t.as_str()],
            ),
        };
        self.read_row(sql, args, stored_manifest).await
    }

    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        by: &Actor,
    ) -> Result<bool, MetaError> {
        let (repo, digest, by) = (repo.to_string(), digest.to_string(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                let tags = tx.query_map(
                    "SELECT tag FROM tags WHERE repo = ?1 AND digest = ?2 ORDER BY tag",
                    args![&repo, &digest],
                    |mut r| r.text(0),
                )?;
                if !delete_manifest_rows(tx, &repo, &digest)? {
                    return Ok(false);
                }
                let change = Change::ManifestDeleted {
                    repository: repo.clone(),
                    digest: digest.clone(),
                    tags,
                };
                events::record(tx, &by, &[change])?;
                Ok(true)
            })
            .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag, by: &Actor) -> Result<bool, MetaError> {
        let (repo, tag, by) = (repo.to_string(), tag.to_string(), by.clone());
        self.engine
            .write_recorded(move |tx| {
                let deleted = tx.query_opt(
                    "DELETE FROM tags WHERE repo = ?1 AND tag = ?2 RETURNING digest",
                    args![&repo, &tag],
                )?;
                let Some(mut deleted) = deleted else {
                    return Ok(false);
                };
                let change = Change::TagDeleted {
                    repository: repo.clone(),
                    tag: tag.clone(),
                    digest: deleted.text(0)?,
                };
                events::record(tx, &by, &[change])?;
                Ok(true)
            })
            .await
    }

    async fn list_tags(
        &self,
        repo: &RepoName,
        page: Page<'_>,
    ) -> Result<Option<Vec<String>>, MetaError> {
        let repo = repo.as_str().to_owned();
        let (limit, after) = (limit(&page), page.after.unwrap_or_default().to_owned());
        self.engine
            .read(move |tx| {
                if !tx.exists("SELECT 1 FROM repositories WHERE name = ?1", args![&repo])? {
                    return Ok(None);
                }
                tx.query_map(
                    "SELECT tag FROM tags WHERE repo = ?1 AND tag > ?2 ORDER BY tag LIMIT ?3",
                    args![&repo, &after, limit],
                    |mut r| r.text(0),
                )
                .map(Some)
            })
            .await
    }

    async fn catalog(
        &self,
        page: Page<'_>,
        within: Option<&[String]>,
    ) -> Result<Vec<String>, MetaError> {
        let (limit, after) = (limit(&page), page.after.unwrap_or_default().to_owned());
        let within: Option<Vec<String>> = within.map(<[String]>::to_vec);
        self.engine
            .read(move |tx| {
                let Some(projects) = &within else {
                    return tx.query_map(
                        "SELECT name FROM repositories WHERE name > ?1 ORDER BY name LIMIT ?2",
                        args![&after, limit],
                        |mut r| r.text(0),
                    );
                };
                let dialect = tx.dialect();
                let sql = format!(
                    "SELECT name FROM repositories WHERE name > ?1 AND {} {}
                     ORDER BY name LIMIT ?2",
                    dialect.first_segment("name"),
                    dialect.in_list(3)
                );
                tx.query_map(&sql, args![&after, limit, projects.as_slice()], |mut r| {
                    r.text(0)
                })
            })
            .await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, MetaError> {
        let sql = "SELECT digest, media_type, size, artifact_type, annotations FROM manifests
                   WHERE repo = ?1 AND subject = ?2 AND (CAST(?3 AS TEXT) IS NULL OR artifact_type = ?3)
                   ORDER BY digest";
        let args = owned![repo.as_str(), subject.as_str(), artifact_type];
        self.read_rows(sql, args, |mut r| {
            Ok(Referrer {
                digest: r.digest(0)?,
                media_type: r.text(1)?,
                size: r.size(2)?,
                artifact_type: r.opt_text(3)?,
                annotations_json: r.opt_text(4)?,
            })
        })
        .await
    }

    async fn record_upload(&self, upload_id: &str, repo: &RepoName) -> Result<(), MetaError> {
        let (id, owner) = (upload_id.to_owned(), repo.as_str().to_owned());
        let insert = move |tx: &mut dyn Tx| {
            tx.execute(
                "INSERT INTO uploads (id, repo, started_at) VALUES (?1, ?2, ?3)",
                args![&id, &owner, now()],
            )?;
            Ok(())
        };
        let known_here = match self.open_uploads() {
            Some(mut open) => {
                open.insert(upload_id.to_owned(), repo.as_str().to_owned());
                true
            }
            None => false,
        };
        if known_here {
            // Not awaited: the session is known here at once, and its record, needed only
            // by a later process (after a restart, or `berth gc`), commits with the next
            // batch.
            self.engine.write_unawaited(insert);
            return Ok(());
        }
        self.engine.write(Durability::Visible, insert).await
    }

    async fn upload_repo(&self, upload_id: &str) -> Result<Option<String>, MetaError> {
        if let Some(repo) = self
            .open_uploads()
            .and_then(|open| open.get(upload_id).cloned())
        {
            return Ok(Some(repo));
        }
        let sql = "SELECT repo FROM uploads WHERE id = ?1";
        self.read_row(sql, owned![upload_id], |mut r| r.text(0))
            .await
    }

    async fn forget_upload(&self, upload_id: &str) -> Result<(), MetaError> {
        if let Some(mut open) = self.open_uploads() {
            open.remove(upload_id);
        }
        let sql = "DELETE FROM uploads WHERE id = ?1";
        self.write_statement(Durability::Synced, sql, owned![upload_id])
            .await
            .map(drop)
    }

    async fn statistics(&self) -> Result<StoreCounts, MetaError> {
        let sql = "SELECT (SELECT count(*) FROM repositories), (SELECT count(*) FROM manifests),
                          (SELECT count(*) FROM blobs WHERE state = 'live'),
                          (SELECT CAST(COALESCE(sum(size), 0) AS BIGINT) FROM blobs WHERE state = 'live')";
        let counts = self
            .read_row(sql, vec![], |mut r| {
                Ok(StoreCounts {
                    repositories: r.size(0)?,
                    manifests: r.size(1)?,
                    blobs: r.size(2)?,
                    blob_bytes: r.size(3)?,
                })
            })
            .await?;
        Ok(counts.unwrap_or_default())
    }

    async fn create_project(
        &self,
        name: &str,
        public: bool,
        owner: Option<(i64, &str)>,
        origin: ProjectOrigin,
        by: &Actor,
    ) -> Result<ProjectRecord, MetaError> {
        let change = Change::ProjectCreated {
            name: name.to_owned(),
            public,
            by_push: origin == ProjectOrigin::FirstPush,
        };
        let (name, by) = (name.to_owned(), by.clone());
        let owner = owner.map(|(id, role)| (id, role.to_owned()));
        self.engine
            .write_recorded(move |tx| {
                let t = now();
                tx.execute(
                    "INSERT INTO projects (name, public, created_at) VALUES (?1, ?2, ?3)",
                    args![&name, public, t],
                )
                .map_err(clash(format!("project {name} exists")))?;
                if let Some((user_id, role)) = &owner {
                    tx.execute(
                        "INSERT INTO members (project, user_id, role) VALUES (?1, ?2, ?3)",
                        args![&name, *user_id, role],
                    )?;
                }
                record(tx, &by, std::slice::from_ref(&change))?;
                Ok(ProjectRecord {
                    name: name.clone(),
                    public,
                    created_ms: t,
                })
            })
            .await
    }

    async fn project(&self, name: &str) -> Result<Option<ProjectRecord>, MetaError> {
        let sql = "SELECT name, public, created_at FROM projects WHERE name = ?1";
        self.read_row(sql, owned![name], project_row).await
    }

    async fn projects(&self) -> Result<Vec<ProjectRecord>, MetaError> {
        let sql = "SELECT name, public, created_at FROM projects ORDER BY name";
        self.read_rows(sql, vec![], project_row).await
    }

    async fn ping(&self) -> Result<(), MetaError> {
        self.read_row("SELECT 1", vec![], |_| Ok(()))
            .await
            .map(drop)
    }
}
