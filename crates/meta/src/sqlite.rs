//! The embedded SQLite backend: one file in the data directory, WAL mode, one writer
//! connection and a few readers so that pulls never wait behind a push.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use berth_oci::{Digest, EdgeKind, Reference, RepoName, Tag};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::{
    now, parse_digest, DanglingEdge, GcMarked, GcSelection, LinkedBlob, MetaError, MetaStore,
    NewManifest, Page, Referrer, StoredManifest,
};

mod accounts;
mod gc;
mod group_commit;

/// `blobs.state` of a blob that may be served and linked.
const BLOB_LIVE: &str = "live";

const READERS: usize = 4;

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE repositories (
    name TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE blobs (
    digest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE repo_blobs (
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    linked_at INTEGER NOT NULL,
    PRIMARY KEY (repo, digest)
) WITHOUT ROWID;
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);
CREATE TABLE manifests (
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    artifact_type TEXT,
    subject TEXT,
    annotations TEXT,
    size INTEGER NOT NULL,
    raw BLOB NOT NULL,
    pushed_at INTEGER NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX manifests_by_subject ON manifests (repo, subject) WHERE subject IS NOT NULL;
CREATE TABLE manifest_edges (
    repo TEXT NOT NULL,
    manifest TEXT NOT NULL,
    target TEXT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (repo, manifest, target, kind)
) WITHOUT ROWID;
CREATE INDEX manifest_edges_by_target ON manifest_edges (target);
CREATE TABLE tags (
    repo TEXT NOT NULL,
    tag TEXT NOT NULL,
    digest TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (repo, tag)
) WITHOUT ROWID;
CREATE INDEX tags_by_digest ON tags (repo, digest);
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    started_at INTEGER NOT NULL
) WITHOUT ROWID;
"#,
    r#"
-- 'live' or 'deleting'. Deliberately not indexed: a collection scans blobs once, while
-- an index would be rewritten for every blob it marks (measured: 3x slower marking).
ALTER TABLE blobs ADD COLUMN state TEXT NOT NULL DEFAULT 'live';
"#,
    r#"
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
CREATE TABLE projects (
    name TEXT PRIMARY KEY,
    public INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE members (
    project TEXT NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    PRIMARY KEY (project, user_id)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members (user_id);
CREATE TABLE robots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    permissions TEXT NOT NULL,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    UNIQUE (project, name)
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    address TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    result TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_actor ON audit (actor, id);
CREATE INDEX audit_by_action ON audit (action, id);
"#,
    r#"
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"#,
];

/// Metadata in a SQLite file.
pub struct SqliteMeta {
    writer: group_commit::GroupCommitter,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: AtomicUsize,
    /// Upload sessions this process opened and has not seen end, with their repository.
    /// A POST answers without waiting for its record to commit, and the requests that
    /// follow find their session here without a read transaction. (Only this process
    /// serves the file; a session another process purged behind its back is caught by
    /// the blob store, which finds its bytes gone.)
    open_uploads: Mutex<HashMap<String, String>>,
}

fn backend(e: rusqlite::Error) -> MetaError {
    MetaError::Backend(e.to_string())
}

/// `Connection::execute` through the connection's statement cache: preparing a statement
/// cost more than running it for most writes here (a fifth of the metadata writer's time
/// in profiles of many small pushes).
fn exec<P: rusqlite::Params>(conn: &Connection, sql: &str, params: P) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// `Connection::query_row` through the statement cache, for the same reason as [`exec`].
fn query_one<T, P, F>(conn: &Connection, sql: &str, params: P, f: F) -> rusqlite::Result<T>
where
    P: rusqlite::Params,
    F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
{
    conn.prepare_cached(sql)?.query_row(params, f)
}

/// Statements kept prepared per connection: every statement of the push and pull paths,
/// with room to spare (rusqlite's default of 16 made them evict each other).
const STATEMENT_CACHE: usize = 128;

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    // WAL: readers never block the writer. synchronous=FULL: an acknowledged push survives
    // power loss, not only a process crash. (The writer connection switches to NORMAL and
    // flushes the log itself, off its own thread: see `group_commit`.)
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // No memory map: each connection's map counted the database again in the process's
    // RSS (five connections, five times its size), and under pushes every read after a
    // commit unmapped it, interrupting the other cores. The connections' own page caches
    // serve the hot pages as fast (PERFORMANCE.md).
    conn.pragma_update(None, "mmap_size", 0)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteMeta {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let mut writer = open_connection(path).map_err(backend)?;
        migrate(&mut writer).map_err(backend)?;
        let readers = (0..READERS)
            .map(|_| open_connection(path).map(Mutex::new))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(backend)?;
        Ok(SqliteMeta {
            writer: group_commit::GroupCommitter::start(writer, path).map_err(backend)?,
            readers: Arc::new(readers),
            next_reader: AtomicUsize::new(0),
            open_uploads: Mutex::default(),
        })
    }

    async fn read<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MetaError> + Send + 'static,
    {
        // Reads are indexed lookups on pages the connection has cached: a few microseconds,
        // cheaper to run right here than to hand to a blocking thread and back (measured:
        // the hand-off halved HEAD and manifest GET rates). Only when every reader is busy
        // does the read go to the blocking pool.
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        for i in 0..READERS {
            if let Ok(conn) = self.readers[(start + i) % READERS].try_lock() {
                return f(&conn);
            }
        }
        let readers = self.readers.clone();
        let index = start % READERS;
        tokio::task::spawn_blocking(move || {
            let conn = readers[index]
                .lock()
                .map_err(|_| MetaError::Backend("reader lock poisoned".into()))?;
            f(&conn)
        })
        .await
        .map_err(|e| MetaError::Backend(e.to_string()))?
    }

    fn open_uploads(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.open_uploads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` as one atomic write, committed (with others waiting at the same time)
    /// before this returns; if `f` fails, none of its changes are kept.
    async fn write<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MetaError> + Send + 'static,
    {
        self.writer.write(group_commit::Durability::Synced, f).await
    }

    /// Like [`Self::write`], for bookkeeping that must be visible at once but need not be
    /// on disk before the caller goes on (see [`group_commit::Durability::Visible`]).
    async fn write_visible<T, F>(&self, f: F) -> Result<T, MetaError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, MetaError> + Send + 'static,
    {
        self.writer
            .write(group_commit::Durability::Visible, f)
            .await
    }
}

fn page_query(
    conn: &Connection,
    sql: &str,
    key: &str,
    page: (Option<usize>, Option<String>),
) -> Result<Vec<String>, MetaError> {
    let limit = page.0.map(|n| n as i64).unwrap_or(-1);
    let after = page.1.unwrap_or_default();
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let rows = stmt
        .query_map(params![key, after, limit], |r| r.get::<_, String>(0))
        .map_err(backend)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(backend)?;
    Ok(rows)
}

/// Removes a manifest with its tags and edges; returns how many manifests were removed.
fn delete_manifest_rows(tx: &Connection, repo: &str, digest: &str) -> Result<usize, MetaError> {
    let n = tx
        .prepare_cached("DELETE FROM manifests WHERE repo = ?1 AND digest = ?2")
        .and_then(|mut s| s.execute(params![repo, digest]))
        .map_err(backend)?;
    for sql in [
        "DELETE FROM tags WHERE repo = ?1 AND digest = ?2",
        "DELETE FROM manifest_edges WHERE repo = ?1 AND manifest = ?2",
    ] {
        tx.prepare_cached(sql)
            .and_then(|mut s| s.execute(params![repo, digest]))
            .map_err(backend)?;
    }
    Ok(n)
}

#[async_trait]
impl MetaStore for SqliteMeta {
    async fn reserve_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        let digest = digest.as_str().to_owned();
        self.write_visible(move |tx| {
            let t = now();
            let state: Option<String> = query_one(tx, "SELECT state FROM blobs WHERE digest = ?1", params![digest], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            match state.as_deref() {
                Some(BLOB_LIVE) => {
                    exec(tx, "UPDATE blobs SET last_used_at = ?2 WHERE digest = ?1", params![digest, t])
                        .map_err(backend)?;
                }
                Some(_) => return Err(MetaError::BlobBeingDeleted),
                None => {
                    exec(tx,
                        "INSERT INTO blobs (digest, size, created_at, last_used_at, state) VALUES (?1, 0, ?2, ?2, 'live')",
                        params![digest, t],
                    )
                    .map_err(backend)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        finished_upload: Option<&str>,
    ) -> Result<(), MetaError> {
        let finished = finished_upload.map(str::to_owned);
        let finished_upload = finished.clone();
        let (repo, digest) = (repo.as_str().to_owned(), digest.as_str().to_owned());
        let linked = self.write(move |tx| {
            let t = now();
            let live = exec(tx,
                    "UPDATE blobs SET size = ?2, last_used_at = ?3 WHERE digest = ?1 AND state = 'live'",
                    params![digest, size as i64, t],
                )
                .map_err(backend)?;
            if live == 0 {
                return Err(MetaError::BlobBeingDeleted);
            }
            exec(tx,
                "INSERT INTO repo_blobs (repo, digest, linked_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (repo, digest) DO UPDATE SET linked_at = excluded.linked_at",
                params![repo, digest, t],
            )
            .map_err(backend)?;
            if let Some(id) = &finished_upload {
                exec(tx, "DELETE FROM uploads WHERE id = ?1", params![id]).map_err(backend)?;
            }
            Ok(())
        })
        .await;
        if let (Ok(()), Some(id)) = (&linked, finished) {
            self.open_uploads().remove(&id);
        }
        linked
    }

    async fn touch_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        let digest = digest.as_str().to_owned();
        self.write_visible(move |tx| {
            exec(
                tx,
                "UPDATE blobs SET last_used_at = ?2 WHERE digest = ?1 AND state = 'live'",
                params![digest, now()],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn linked_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<LinkedBlob>, MetaError> {
        let (repo, digest) = (repo.as_str().to_owned(), digest.as_str().to_owned());
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT b.size, b.last_used_at FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
                 WHERE l.repo = ?1 AND l.digest = ?2 AND b.state = 'live'",
            )
            .and_then(|mut s| {
                s.query_row(params![repo, digest], |r| {
                    Ok(LinkedBlob { size: r.get::<_, i64>(0)? as u64, last_used_ms: r.get(1)? })
                })
                .optional()
            })
            .map_err(backend)
        })
        .await
    }

    async fn any_linked_blob_size(&self, digest: &Digest) -> Result<Option<u64>, MetaError> {
        let digest = digest.as_str().to_owned();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT b.size FROM blobs b WHERE b.digest = ?1 AND b.state = 'live'
                 AND EXISTS (SELECT 1 FROM repo_blobs l WHERE l.digest = b.digest)",
            )
            .and_then(|mut s| {
                s.query_row(params![digest], |r| r.get::<_, i64>(0))
                    .optional()
            })
            .map(|s| s.map(|s| s as u64))
            .map_err(backend)
        })
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError> {
        let (repo, digest) = (repo.as_str().to_owned(), digest.as_str().to_owned());
        self.write(move |tx| {
            let n = exec(
                tx,
                "DELETE FROM repo_blobs WHERE repo = ?1 AND digest = ?2",
                params![repo, digest],
            )
            .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetaError> {
        let repo = repo.as_str().to_owned();
        let tag = tag.map(|t| t.as_str().to_owned());
        self.write(move |tx| {
            let mut missing = Vec::new();
            for edge in &manifest.edges {
                let sql = match edge.kind {
                    EdgeKind::Config | EdgeKind::Layer => "SELECT 1 FROM repo_blobs WHERE repo = ?1 AND digest = ?2",
                    EdgeKind::Child => "SELECT 1 FROM manifests WHERE repo = ?1 AND digest = ?2",
                };
                let present = tx
                    .prepare_cached(sql)
                    .and_then(|mut s| s.exists(params![repo, edge.digest.as_str()]))
                    .map_err(backend)?;
                if !present && !missing.contains(&edge.digest) {
                    missing.push(edge.digest.clone());
                }
            }
            if !missing.is_empty() {
                return Err(MetaError::MissingReferences { missing });
            }
            let t = now();
            let digest = manifest.digest.as_str();
            exec(tx, "INSERT OR IGNORE INTO repositories (name, created_at) VALUES (?1, ?2)", params![repo, t])
                .map_err(backend)?;
            exec(tx,
                "INSERT INTO manifests (repo, digest, media_type, artifact_type, subject, annotations, size, raw, pushed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (repo, digest) DO UPDATE SET pushed_at = excluded.pushed_at",
                params![
                    repo,
                    digest,
                    manifest.media_type,
                    manifest.artifact_type,
                    manifest.subject.as_ref().map(Digest::as_str),
                    manifest.annotations_json,
                    manifest.raw.len() as i64,
                    manifest.raw,
                    t
                ],
            )
            .map_err(backend)?;
            for edge in &manifest.edges {
                exec(tx,
                    "INSERT OR IGNORE INTO manifest_edges (repo, manifest, target, kind) VALUES (?1, ?2, ?3, ?4)",
                    params![repo, digest, edge.digest.as_str(), edge.kind.as_str()],
                )
                .map_err(backend)?;
                // A fresh reference restarts the blob's grace period.
                exec(tx, "UPDATE blobs SET last_used_at = ?2 WHERE digest = ?1", params![edge.digest.as_str(), t])
                    .map_err(backend)?;
            }
            if let Some(tag) = tag {
                exec(tx,
                    "INSERT INTO tags (repo, tag, digest, updated_at) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
                    params![repo, tag, digest, t],
                )
                .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, MetaError> {
        let repo = repo.as_str().to_owned();
        let reference = reference.clone();
        self.read(move |conn| {
            let row = match &reference {
                Reference::Digest(d) => conn
                    .prepare_cached("SELECT digest, media_type, raw FROM manifests WHERE repo = ?1 AND digest = ?2")
                    .and_then(|mut s| {
                        s.query_row(params![repo, d.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?))).optional()
                    }),
                Reference::Tag(t) => conn
                    .prepare_cached(
                        "SELECT m.digest, m.media_type, m.raw FROM tags t
                         JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest
                         WHERE t.repo = ?1 AND t.tag = ?2",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![repo, t.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?))).optional()
                    }),
            }
            .map_err(backend)?;
            row.map(|(digest, media_type, raw)| Ok(StoredManifest { digest: parse_digest(digest)?, media_type, raw }))
                .transpose()
        })
        .await
    }

    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError> {
        let (repo, digest) = (repo.as_str().to_owned(), digest.as_str().to_owned());
        self.write(move |tx| {
            let n = delete_manifest_rows(tx, &repo, &digest)?;
            Ok(n > 0)
        })
        .await
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, MetaError> {
        let (repo, tag) = (repo.as_str().to_owned(), tag.as_str().to_owned());
        self.write(move |tx| {
            let n = exec(
                tx,
                "DELETE FROM tags WHERE repo = ?1 AND tag = ?2",
                params![repo, tag],
            )
            .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn list_tags(
        &self,
        repo: &RepoName,
        page: Page<'_>,
    ) -> Result<Option<Vec<String>>, MetaError> {
        let repo = repo.as_str().to_owned();
        let page = (page.limit, page.after.map(str::to_owned));
        self.read(move |conn| {
            let known = conn
                .prepare_cached("SELECT 1 FROM repositories WHERE name = ?1")
                .and_then(|mut s| s.exists(params![repo]))
                .map_err(backend)?;
            if !known {
                return Ok(None);
            }
            page_query(
                conn,
                "SELECT tag FROM tags WHERE repo = ?1 AND tag > ?2 ORDER BY tag LIMIT ?3",
                &repo,
                page,
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
        let limit = page.limit.map(|n| n as i64).unwrap_or(-1);
        let after = page.after.unwrap_or_default().to_owned();
        let within = within.map(|projects| {
            let list: Vec<String> = projects.iter().map(|p| format!("\"{p}\"")).collect();
            format!("[{}]", list.join(","))
        });
        self.read(move |conn| {
            // The project is the first path segment; project names need no JSON escaping
            // (they are lowercase alphanumerics and separators).
            let mut stmt = conn
                .prepare_cached(
                    "SELECT name FROM repositories WHERE name > ?1
                     AND (?2 IS NULL OR (CASE WHEN instr(name, '/') > 0
                            THEN substr(name, 1, instr(name, '/') - 1) ELSE name END)
                          IN (SELECT value FROM json_each(?2)))
                     ORDER BY name LIMIT ?3",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![after, within, limit], |r| r.get::<_, String>(0))
                .map_err(backend)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(backend)?;
            Ok(rows)
        })
        .await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, MetaError> {
        let (repo, subject) = (repo.as_str().to_owned(), subject.as_str().to_owned());
        let artifact_type = artifact_type.map(str::to_owned);
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT digest, media_type, size, artifact_type, annotations FROM manifests
                     WHERE repo = ?1 AND subject = ?2 AND (?3 IS NULL OR artifact_type = ?3)
                     ORDER BY digest",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![repo, subject, artifact_type], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get(1)?,
                        r.get::<_, i64>(2)?,
                        r.get(3)?,
                        r.get(4)?,
                    ))
                })
                .map_err(backend)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(backend)?;
            rows.into_iter()
                .map(
                    |(digest, media_type, size, artifact_type, annotations_json)| {
                        Ok(Referrer {
                            digest: parse_digest(digest)?,
                            media_type,
                            size: size as u64,
                            artifact_type,
                            annotations_json,
                        })
                    },
                )
                .collect()
        })
        .await
    }

    async fn record_upload(&self, upload_id: &str, repo: &RepoName) -> Result<(), MetaError> {
        let (id, repo) = (upload_id.to_owned(), repo.as_str().to_owned());
        self.open_uploads().insert(id.clone(), repo.clone());
        // Not awaited: the session is known here at once, and its record, needed only by
        // a later process (after a restart, or `berth gc`), commits with the next batch.
        self.writer.submit(move |tx| {
            exec(
                tx,
                "INSERT INTO uploads (id, repo, started_at) VALUES (?1, ?2, ?3)",
                params![id, repo, now()],
            )
            .map_err(backend)?;
            Ok(())
        });
        Ok(())
    }

    async fn upload_repo(&self, upload_id: &str) -> Result<Option<String>, MetaError> {
        if let Some(repo) = self.open_uploads().get(upload_id) {
            return Ok(Some(repo.clone()));
        }
        let id = upload_id.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT repo FROM uploads WHERE id = ?1")
                .and_then(|mut s| s.query_row(params![id], |r| r.get(0)).optional())
                .map_err(backend)
        })
        .await
    }

    async fn forget_upload(&self, upload_id: &str) -> Result<(), MetaError> {
        self.open_uploads().remove(upload_id);
        let id = upload_id.to_owned();
        self.write(move |tx| {
            exec(tx, "DELETE FROM uploads WHERE id = ?1", params![id]).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn mark_garbage(&self, selection: GcSelection) -> Result<GcMarked, MetaError> {
        self.mark_garbage_sqlite(selection).await
    }

    async fn blobs_being_deleted(&self) -> Result<Vec<(Digest, u64)>, MetaError> {
        self.blobs_being_deleted_sqlite().await
    }

    async fn forget_deleted_blobs(&self, digests: &[Digest]) -> Result<(), MetaError> {
        self.forget_deleted_blobs_sqlite(digests).await
    }

    async fn uploads_started_before(&self, cutoff_ms: i64) -> Result<Vec<String>, MetaError> {
        self.uploads_started_before_sqlite(cutoff_ms).await
    }

    async fn live_blobs(&self) -> Result<Vec<(Digest, u64)>, MetaError> {
        self.live_blobs_sqlite().await
    }

    async fn dangling_edges(&self) -> Result<Vec<DanglingEdge>, MetaError> {
        self.dangling_edges_sqlite().await
    }

    async fn drop_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        self.drop_blob_sqlite(digest).await
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, MetaError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |tx| {
            let t = now();
            query_one(tx,
                "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE leases.holder = excluded.holder OR leases.expires_at < ?4
                 RETURNING holder",
                params![name, holder, t + ttl_ms, t],
                |_| Ok(()),
            )
            .optional()
            .map(|taken| taken.is_some())
            .map_err(backend)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetaError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.write(move |tx| {
            exec(
                tx,
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                params![name, holder],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn ping(&self) -> Result<(), MetaError> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(backend))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_oci::ManifestEdge;

    fn digest(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn manifest(d: char, edges: Vec<ManifestEdge>, subject: Option<Digest>) -> NewManifest {
        NewManifest {
            digest: digest(d),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            artifact_type: subject.as_ref().map(|_| "application/x.sig".to_owned()),
            subject,
            annotations_json: None,
            edges,
            raw: vec![b'{', b'}'],
        }
    }

    #[tokio::test]
    async fn manifests_require_linked_blobs_and_list_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        let repo = RepoName::parse("team/app").unwrap();
        let other = RepoName::parse("team/other").unwrap();
        let edges = vec![ManifestEdge {
            digest: digest('a'),
            kind: EdgeKind::Config,
        }];
        let tag = Tag::parse("v1").unwrap();
        let err = meta
            .put_manifest(&repo, manifest('d', edges.clone(), None), Some(&tag))
            .await
            .unwrap_err();
        assert!(
            matches!(err, MetaError::MissingReferences { ref missing } if missing == &[digest('a')])
        );
        meta.reserve_blob(&digest('a')).await.unwrap();
        meta.link_blob(&other, &digest('a'), 2, None).await.unwrap();
        assert!(meta
            .put_manifest(&repo, manifest('d', edges.clone(), None), Some(&tag))
            .await
            .is_err());
        meta.link_blob(&repo, &digest('a'), 2, None).await.unwrap();
        meta.put_manifest(&repo, manifest('d', edges, None), Some(&tag))
            .await
            .unwrap();
        let got = meta
            .get_manifest(&repo, &Reference::Tag(tag.clone()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.digest, digest('d'));
        assert_eq!(
            meta.list_tags(
                &repo,
                Page {
                    limit: None,
                    after: None
                }
            )
            .await
            .unwrap()
            .unwrap(),
            vec!["v1"]
        );
        assert!(meta
            .list_tags(
                &other,
                Page {
                    limit: None,
                    after: None
                }
            )
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            meta.catalog(
                Page {
                    limit: Some(10),
                    after: None
                },
                None
            )
            .await
            .unwrap(),
            vec!["team/app"]
        );

        meta.put_manifest(&repo, manifest('e', vec![], Some(digest('d'))), None)
            .await
            .unwrap();
        let refs = meta.referrers(&repo, &digest('d'), None).await.unwrap();
        assert_eq!(refs.len(), 1);
        assert!(meta
            .referrers(&repo, &digest('d'), Some("other"))
            .await
            .unwrap()
            .is_empty());

        assert!(meta.delete_manifest(&repo, &digest('d')).await.unwrap());
        assert!(meta
            .get_manifest(&repo, &Reference::Tag(tag))
            .await
            .unwrap()
            .is_none());
        assert!(!meta.delete_manifest(&repo, &digest('d')).await.unwrap());
    }

    #[tokio::test]
    async fn leases_are_exclusive_until_released_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("meta.db")).unwrap();
        assert!(meta.try_lease("gc", "a", 60_000).await.unwrap());
        assert!(meta.try_lease("gc", "a", 60_000).await.unwrap(), "renewal");
        assert!(!meta.try_lease("gc", "b", 60_000).await.unwrap());
        assert!(meta.try_lease("other", "b", 60_000).await.unwrap());
        meta.release_lease("gc", "b").await.unwrap();
        assert!(
            !meta.try_lease("gc", "b", 60_000).await.unwrap(),
            "only the holder releases"
        );
        meta.release_lease("gc", "a").await.unwrap();
        assert!(meta.try_lease("gc", "b", 1).await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert!(
            meta.try_lease("gc", "a", 60_000).await.unwrap(),
            "expired: taken over"
        );
    }

    #[tokio::test]
    async fn upload_sessions_are_known_at_once_and_recorded_for_later_processes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let meta = SqliteMeta::open(&path).unwrap();
        let repo = RepoName::parse("team/app").unwrap();
        meta.record_upload("s1", &repo).await.unwrap();
        meta.record_upload("s2", &repo).await.unwrap();
        // Known to this process before the record commits.
        assert_eq!(
            meta.upload_repo("s1").await.unwrap().as_deref(),
            Some("team/app")
        );
        // A durable write commits after the queued ones: another process sees them.
        meta.try_lease("barrier", "x", 60_000).await.unwrap();
        let other = SqliteMeta::open(&path).unwrap();
        assert_eq!(
            other.upload_repo("s2").await.unwrap().as_deref(),
            Some("team/app")
        );
        assert_eq!(
            other.uploads_started_before(i64::MAX).await.unwrap().len(),
            2
        );
        // Ended here, forgotten everywhere.
        meta.forget_upload("s1").await.unwrap();
        assert_eq!(meta.upload_repo("s1").await.unwrap(), None);
        assert_eq!(other.upload_repo("s1").await.unwrap(), None);
        // A session finished by a link is forgotten too.
        meta.reserve_blob(&digest('a')).await.unwrap();
        meta.link_blob(&repo, &digest('a'), 3, Some("s2"))
            .await
            .unwrap();
        assert_eq!(meta.upload_repo("s2").await.unwrap(), None);
        assert_eq!(other.upload_repo("s2").await.unwrap(), None);
    }
}
