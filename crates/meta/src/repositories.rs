//! Repositories as a whole: a project's repositories with what each holds (for the admin
//! API and the web UI), and deleting one with everything in it.

use crate::engine::{args, Tx};
use crate::events::record;
use crate::manifests::delete_manifest_rows;
use crate::{Actor, Change, Database, MetaError};

/// Counts in a [`RepositorySummary`] stop past this: a count of `COUNT_CAP + 1` means
/// "more than `COUNT_CAP`" (and the bytes then cover that many blobs).
pub const COUNT_CAP: u64 = 10_000;

/// A repository and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositorySummary {
    /// Its name.
    pub name: String,
    /// Tags in it, up to [`COUNT_CAP`] + 1.
    pub tags: u64,
    /// Manifests in it (tagged or not, referrers included), up to [`COUNT_CAP`] + 1.
    pub manifests: u64,
    /// Bytes of the distinct blobs it links (of at most [`COUNT_CAP`] + 1 of them).
    pub bytes: u64,
    /// When a manifest was last pushed into it, ms since the epoch.
    pub last_push_ms: Option<i64>,
}

/// A tag with what it points at, for listings that show more than names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagDetail {
    /// The tag.
    pub tag: String,
    /// The manifest's digest.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its bytes (small: a manifest), to read sizes and platforms from.
    pub raw: Vec<u8>,
    /// When the tag was last pointed, ms since the epoch.
    pub updated_ms: i64,
    /// Who pointed it (empty for tags older than that record).
    pub pushed_by: String,
}

/// A tag as the dashboard lists what was pushed lately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentTag {
    /// The repository.
    pub repo: String,
    /// The tag.
    pub tag: String,
    /// The manifest it points at.
    pub digest: String,
    /// When it was pointed there, ms since the epoch.
    pub updated_ms: i64,
    /// Who pointed it (empty for tags older than that record).
    pub pushed_by: String,
}

impl Database {
    /// Tags of `repo` after `after` that start with `prefix`, in order, at most `limit`,
    /// each with its manifest: one statement over the tags' primary key, so a page costs
    /// the same at 100,000 tags as at 100.
    pub(crate) async fn tag_page(
        &self,
        repo: &str,
        after: &str,
        prefix: &str,
        limit: i64,
    ) -> Result<Vec<TagDetail>, MetaError> {
        // Tag characters are [A-Za-z0-9_.-], all below '~': "<prefix>~" bounds the range.
        let (repo, after, from, to) = (
            repo.to_owned(),
            after.to_owned(),
            prefix.to_owned(),
            format!("{prefix}~"),
        );
        let sql = "SELECT t.tag, t.digest, m.media_type, m.raw, t.updated_at, t.pushed_by
                   FROM tags t JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest
                   WHERE t.repo = ?1 AND t.tag > ?2 AND t.tag >= ?3 AND t.tag < ?4
                   ORDER BY t.tag LIMIT ?5";
        self.engine
            .read(move |tx| {
                tx.query_map(sql, args![&repo, &after, &from, &to, limit], |mut r| {
                    Ok(TagDetail {
                        tag: r.text(0)?,
                        digest: r.text(1)?,
                        media_type: r.text(2)?,
                        raw: r.bytes(3)?,
                        updated_ms: r.int(4)?,
                        pushed_by: r.text(5)?,
                    })
                })
            })
            .await
    }

    /// The tags pointed last, newest first, at most `limit` (the `tags_by_update`
    /// index: the cost is `limit` rows, not the registry's size).
    pub(crate) async fn recent_tag_rows(&self, limit: i64) -> Result<Vec<RecentTag>, MetaError> {
        let sql = "SELECT repo, tag, digest, updated_at, pushed_by FROM tags
                   ORDER BY updated_at DESC LIMIT ?1";
        self.engine
            .read(move |tx| {
                tx.query_map(sql, args![limit], |mut r| {
                    Ok(RecentTag {
                        repo: r.text(0)?,
                        tag: r.text(1)?,
                        digest: r.text(2)?,
                        updated_ms: r.int(3)?,
                        pushed_by: r.text(4)?,
                    })
                })
            })
            .await
    }

    /// The distinct first path segments of the repositories, in order: one index seek
    /// per project (a skip scan), however many repositories each holds. At most `limit`:
    /// past it, the first `limit` met in name order.
    pub(crate) async fn project_names_of_repositories(
        &self,
        limit: usize,
    ) -> Result<Vec<String>, MetaError> {
        // A project's repositories are not one range of names: "team" < "team-b/y" <
        // "team/app". From "P/…" the next other project's name is at "P0" or later ('0'
        // follows '/'); from a one-segment name "P", it is the next name.
        let next_sql = "SELECT MIN(name) FROM repositories WHERE name >= ?1";
        let after_sql = "SELECT MIN(name) FROM repositories WHERE name > ?1";
        self.engine
            .read(move |tx| {
                let mut projects = std::collections::BTreeSet::new();
                let mut next = tx
                    .query_map("SELECT MIN(name) FROM repositories", args![], |mut r| {
                        r.opt_text(0)
                    })?
                    .pop()
                    .flatten();
                while let Some(name) = next.take() {
                    if projects.len() >= limit {
                        break;
                    }
                    let found = match name.split_once('/') {
                        Some((project, _)) => {
                            let past = format!("{project}0");
                            projects.insert(project.to_owned());
                            tx.query_map(next_sql, args![&past], |mut r| r.opt_text(0))?
                        }
                        None => {
                            let found =
                                tx.query_map(after_sql, args![&name], |mut r| r.opt_text(0))?;
                            projects.insert(name);
                            found
                        }
                    };
                    next = found.into_iter().next().flatten();
                }
                Ok(projects.into_iter().collect())
            })
            .await
    }

    /// The newest `gc` event: when, and its detail (what was removed).
    pub(crate) async fn last_collection_row(&self) -> Result<Option<(i64, String)>, MetaError> {
        let sql = "SELECT at, detail FROM events WHERE action = 'gc' ORDER BY seq DESC LIMIT 1";
        self.engine
            .read(move |tx| {
                Ok(tx
                    .query_map(sql, args![], |mut r| Ok((r.int(0)?, r.text(1)?)))?
                    .pop())
            })
            .await
    }

    /// `project`'s repositories after `after` in name order, at most `limit`, each with
    /// its counts (one statement; each count reads only that repository's rows).
    pub(crate) async fn summaries(
        &self,
        project: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<RepositorySummary>, MetaError> {
        // The project's repositories are `<project>` itself and `<project>/…`: names
        // from "<project>" up to "<project>0" ('0' follows '/'), so the primary key's
        // order finds them; the others in that range ("<project>-x") are left out.
        let (project, after, to) = (project.to_owned(), after.to_owned(), format!("{project}0"));
        // Counts stop at COUNT_CAP + 1 rows, so a page costs the same whatever a
        // repository holds; the last push comes from the (repo, pushed_at) index.
        let sql = "SELECT r.name,
                     (SELECT COUNT(*) FROM (SELECT 1 FROM tags t WHERE t.repo = r.name LIMIT 10001) x),
                     (SELECT COUNT(*) FROM (SELECT 1 FROM manifests m WHERE m.repo = r.name LIMIT 10001) x),
                     (SELECT CAST(COALESCE(SUM(s.size), 0) AS BIGINT) FROM
                        (SELECT b.size FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
                         WHERE l.repo = r.name LIMIT 10001) s),
                     (SELECT MAX(m.pushed_at) FROM manifests m WHERE m.repo = r.name)
                   FROM repositories r
                   WHERE r.name > ?1 AND r.name >= ?4 AND r.name < ?2
                     AND (r.name = ?4 OR substr(r.name, 1, length(?4) + 1) = ?4 || '/')
                   ORDER BY r.name LIMIT ?3";
        self.engine
            .read(move |tx| {
                tx.query_map(sql, args![&after, &to, limit, &project], |mut r| {
                    Ok(RepositorySummary {
                        name: r.text(0)?,
                        tags: r.size(1)?,
                        manifests: r.size(2)?,
                        bytes: r.size(3)?,
                        last_push_ms: r.opt_int(4)?,
                    })
                })
            })
            .await
    }

    /// Deletes `repo`'s manifests (each recorded as deleted, with its tags, so webhooks
    /// and replication hear of it), its blob links and the repository itself, in one
    /// transaction; the blobs' bytes go with the next garbage collection. How many
    /// manifests went, or `None` when there is no such repository.
    pub(crate) async fn remove_repository(
        &self,
        repo: &str,
        by: &Actor,
    ) -> Result<Option<u64>, MetaError> {
        let (repo, by) = (repo.to_owned(), by.clone());
        self.engine
            .write_recorded(move |tx| delete_in(tx, &repo, &by))
            .await
    }
}

fn delete_in(tx: &mut dyn Tx, repo: &str, by: &Actor) -> Result<Option<u64>, MetaError> {
    let known = tx.exists("SELECT 1 FROM repositories WHERE name = ?1", args![repo])?
        || tx.exists("SELECT 1 FROM repo_blobs WHERE repo = ?1", args![repo])?;
    if !known {
        return Ok(None);
    }
    let manifests = tx.query_map(
        "SELECT digest FROM manifests WHERE repo = ?1 ORDER BY digest",
        args![repo],
        |mut r| r.text(0),
    )?;
    let mut changes = Vec::with_capacity(manifests.len() + 1);
    for digest in &manifests {
        let tags = tx.query_map(
            "SELECT tag FROM tags WHERE repo = ?1 AND digest = ?2 ORDER BY tag",
            args![repo, digest],
            |mut r| r.text(0),
        )?;
        delete_manifest_rows(tx, repo, digest)?;
        changes.push(Change::ManifestDeleted {
            repository: repo.to_owned(),
            digest: digest.clone(),
            tags,
        });
    }
    let blobs = tx.execute("DELETE FROM repo_blobs WHERE repo = ?1", args![repo])?;
    tx.execute("DELETE FROM repositories WHERE name = ?1", args![repo])?;
    changes.push(Change::RepositoryDeleted {
        repository: repo.to_owned(),
        manifests: manifests.len() as u64,
        blobs,
    });
    record(tx, by, &changes)?;
    Ok(Some(manifests.len() as u64))
}
