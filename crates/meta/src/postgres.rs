//! The PostgreSQL backend, for several berth nodes sharing one metadata store. Same
//! tables and meaning as the SQLite backend; every write is one SERIALIZABLE transaction,
//! retried when PostgreSQL reports a serialization conflict, so the guarantees the
//! single SQLite writer gives by construction (garbage collection's mark against a
//! concurrent link, a manifest's edge check against a concurrent unlink) hold across
//! nodes. Text keys use the "C" collation: listings sort by bytes, as the spec's paging
//! expects and as SQLite does.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use berth_oci::{Digest, EdgeKind, Reference, RepoName, Tag};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls, Row};

use crate::{
    now, parse_digest, DanglingEdge, GcMarked, GcSelection, LinkedBlob, MetaError, MetaStore,
    NewManifest, Page, Referrer, StoredManifest,
};

mod accounts;

/// Connections per node.
const POOL_SIZE: usize = 16;
/// How long a request waits for a connection before answering that the store is down.
const OUTAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Attempts of a write that keeps meeting serialization conflicts.
const MAX_ATTEMPTS: usize = 20;

/// Schema migrations, applied in order under an advisory lock (nodes may start together).
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE repositories (
    name TEXT COLLATE "C" PRIMARY KEY,
    created_at BIGINT NOT NULL
);
CREATE TABLE blobs (
    digest TEXT COLLATE "C" PRIMARY KEY,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    state TEXT NOT NULL DEFAULT 'live'
);
CREATE TABLE repo_blobs (
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    linked_at BIGINT NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);
CREATE TABLE manifests (
    repo TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    media_type TEXT NOT NULL,
    artifact_type TEXT,
    subject TEXT COLLATE "C",
    annotations TEXT,
    size BIGINT NOT NULL,
    raw BYTEA NOT NULL,
    pushed_at BIGINT NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX manifests_by_subject ON manifests (repo, subject) WHERE subject IS NOT NULL;
CREATE TABLE manifest_edges (
    repo TEXT COLLATE "C" NOT NULL,
    manifest TEXT COLLATE "C" NOT NULL,
    target TEXT COLLATE "C" NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (repo, manifest, target, kind)
);
CREATE INDEX manifest_edges_by_target ON manifest_edges (target);
CREATE TABLE tags (
    repo TEXT COLLATE "C" NOT NULL,
    tag TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (repo, tag)
);
CREATE INDEX tags_by_digest ON tags (repo, digest);
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    repo TEXT COLLATE "C" NOT NULL,
    started_at BIGINT NOT NULL
);
CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    name TEXT COLLATE "C" NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    admin BOOLEAN NOT NULL DEFAULT FALSE,
    generation BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
CREATE TABLE projects (
    name TEXT COLLATE "C" PRIMARY KEY,
    public BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL
);
CREATE TABLE members (
    project TEXT COLLATE "C" NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
    user_id BIGINT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    PRIMARY KEY (project, user_id)
);
CREATE INDEX members_by_user ON members (user_id);
CREATE TABLE robots (
    id BIGSERIAL PRIMARY KEY,
    project TEXT COLLATE "C" NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
    name TEXT COLLATE "C" NOT NULL,
    secret_hash TEXT NOT NULL,
    permissions TEXT NOT NULL,
    expires_at BIGINT,
    created_at BIGINT NOT NULL,
    UNIQUE (project, name)
);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
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
    expires_at BIGINT NOT NULL
);
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
];

/// Why a write body stopped: a conflict to retry, or a real outcome.
pub(crate) enum Fail {
    /// PostgreSQL aborted the transaction to keep it serializable: run it again.
    Retry,
    /// Anything else.
    Meta(MetaError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(c)
                if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                Fail::Retry
            }
            _ => Fail::Meta(pg(e)),
        }
    }
}

impl From<MetaError> for Fail {
    fn from(e: MetaError) -> Self {
        Fail::Meta(e)
    }
}

fn pg(e: tokio_postgres::Error) -> MetaError {
    match e.as_db_error() {
        // The server shutting down or refusing connections is an outage, not a fault.
        Some(db) if db.code().code().starts_with("57P") || db.code().code().starts_with("08") => {
            MetaError::Unavailable(format!("postgres: {}", db.message()))
        }
        Some(db) => MetaError::Backend(format!("postgres: {}", db.message())),
        // No server answer at all: the connection broke or could not be made.
        None if e.is_closed() || e.code().is_none() => {
            MetaError::Unavailable(format!("postgres: {e}"))
        }
        None => MetaError::Backend(format!("postgres: {e}")),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> MetaError {
    MetaError::Unavailable(format!("postgres: {e}"))
}

/// Maps a uniqueness violation to [`MetaError::Conflict`].
pub(crate) fn unique(what: String) -> impl FnOnce(tokio_postgres::Error) -> Fail {
    move |e| match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => Fail::Meta(MetaError::Conflict(what)),
        _ => Fail::from(e),
    }
}

/// The pause before retrying a conflicting transaction: growing with the attempt, and
/// spread (by the clock's nanoseconds) so that conflicting nodes do not retry in step.
pub(crate) fn retry_pause(attempt: usize) -> std::time::Duration {
    let spread = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()) % 1000)
        .unwrap_or(0);
    std::time::Duration::from_micros(attempt as u64 * 1000 + spread)
}

/// Whether a write may return before its commit is flushed (see the SQLite backend's
/// `Durability`): bookkeeping whose loss costs a retry, never data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    Synced,
    Visible,
}

/// Runs `$body` (an expression using the transaction `$tx`, returning
/// `Result<T, Fail>`) in a SERIALIZABLE transaction, retrying on conflicts.
macro_rules! write_tx {
    ($self:expr, $durability:expr, |$tx:ident| $body:expr) => {{
        let mut client = $self
            .pool
            .get()
            .await
            .map_err(crate::postgres::pool_error)?;
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            let $tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::Serializable)
                .start()
                .await
                .map_err(crate::postgres::pg)?;
            if $durability == crate::postgres::Durability::Visible {
                $tx.batch_execute("SET LOCAL synchronous_commit = off")
                    .await
                    .map_err(crate::postgres::pg)?;
            }
            let outcome: Result<_, crate::postgres::Fail> = async { $body }.await;
            let retry = match outcome {
                Ok(value) => match $tx.commit().await {
                    Ok(()) => break Ok(value),
                    Err(e) => match crate::postgres::Fail::from(e) {
                        crate::postgres::Fail::Retry => true,
                        crate::postgres::Fail::Meta(e) => break Err(e),
                    },
                },
                Err(crate::postgres::Fail::Retry) => true,
                Err(crate::postgres::Fail::Meta(e)) => break Err(e),
            };
            if retry && attempt >= crate::postgres::MAX_ATTEMPTS {
                break Err(MetaError::Backend(
                    "postgres: too many serialization conflicts".into(),
                ));
            }
            // Let the transaction that won the conflict finish before trying again.
            tokio::time::sleep(crate::postgres::retry_pause(attempt)).await;
        }
    }};
}
pub(crate) use write_tx;

/// Metadata in PostgreSQL.
pub struct PostgresMeta {
    pub(crate) pool: Pool,
}

impl PostgresMeta {
    /// Connects to `url` (`postgres://user:password@host:port/db` or a key=value string),
    /// using `schema` if given (created if missing), and applies migrations.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self, MetaError> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| MetaError::Backend(format!("postgres url: {e}")))?;
        config.connect_timeout(OUTAGE_TIMEOUT);
        if let Some(schema) = schema {
            if !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(MetaError::Backend(format!(
                    "schema name {schema:?}: letters, digits and _ only"
                )));
            }
        }
        // No JIT: on small tables the planner's guesses for the collection's recursive
        // query pass the JIT threshold, and compiling it took 200-400 ms of a 2 ms query
        // on every pass. Nothing here runs long enough to repay a compilation. Options
        // given in the URL are kept.
        let mut options = config.get_options().unwrap_or_default().to_owned();
        options.push_str(" -c jit=off");
        if let Some(schema) = schema {
            options.push_str(&format!(" -c search_path={schema}"));
        }
        config.options(options.trim_start());
        if let Some(schema) = schema {
            let (client, connection) = config.connect(NoTls).await.map_err(pg)?;
            let task = tokio::spawn(connection);
            client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await
                .map_err(pg)?;
            drop(client);
            let _ = task.await;
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Bounded waits: during an outage requests fail fast with 503 instead of piling up.
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OUTAGE_TIMEOUT))
            .create_timeout(Some(OUTAGE_TIMEOUT))
            .recycle_timeout(Some(OUTAGE_TIMEOUT))
            .build()
            .map_err(|e| MetaError::Backend(format!("postgres pool: {e}")))?;
        let meta = PostgresMeta { pool };
        meta.migrate().await?;
        Ok(meta)
    }

    async fn migrate(&self) -> Result<(), MetaError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(pg)?;
        // One node migrates; the others wait here and then find nothing to do.
        tx.batch_execute(
            "SELECT pg_advisory_xact_lock(7392019);
             CREATE TABLE IF NOT EXISTS berth_schema (version INTEGER NOT NULL)",
        )
        .await
        .map_err(pg)?;
        let version: i32 = match tx
            .query_opt("SELECT version FROM berth_schema", &[])
            .await
            .map_err(pg)?
        {
            Some(row) => row.get(0),
            None => {
                tx.execute("INSERT INTO berth_schema (version) VALUES (0)", &[])
                    .await
                    .map_err(pg)?;
                0
            }
        };
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql).await.map_err(pg)?;
            tx.execute("UPDATE berth_schema SET version = $1", &[&(i as i32 + 1)])
                .await
                .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)
    }

    /// Runs one read query and maps its rows.
    pub(crate) async fn rows<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        map: impl Fn(&Row) -> Result<T, MetaError>,
    ) -> Result<Vec<T>, MetaError> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let stmt = client.prepare_cached(sql).await.map_err(pg)?;
        let rows = client.query(&stmt, params).await.map_err(pg)?;
        rows.iter().map(map).collect()
    }

    /// Runs one read query expected to return at most one row.
    pub(crate) async fn row<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        map: impl Fn(&Row) -> Result<T, MetaError>,
    ) -> Result<Option<T>, MetaError> {
        Ok(self.rows(sql, params, map).await?.into_iter().next())
    }
}

fn delete_manifest_rows_sql() -> [&'static str; 3] {
    [
        "DELETE FROM manifests WHERE repo = $1 AND digest = $2",
        "DELETE FROM tags WHERE repo = $1 AND digest = $2",
        "DELETE FROM manifest_edges WHERE repo = $1 AND manifest = $2",
    ]
}

/// Everything a tag reaches (see the SQLite backend's `MARK_LIVE_MANIFESTS`). PostgreSQL
/// allows one recursive reference, so index children and referrers of a reached manifest
/// are found in one lateral step.
const LIVE_MANIFESTS: &str = "
WITH RECURSIVE live (repo, digest) AS (
    SELECT repo, digest FROM tags
    UNION SELECT repo, digest FROM manifests WHERE pushed_at >= $1
    UNION SELECT next.repo, next.digest FROM live l
          CROSS JOIN LATERAL (
              SELECT e.repo, e.target AS digest FROM manifest_edges e
              WHERE e.repo = l.repo AND e.manifest = l.digest AND e.kind = 'child'
              UNION ALL
              SELECT m.repo, m.digest FROM manifests m
              WHERE m.repo = l.repo AND m.subject = l.digest
          ) next
)
SELECT m.repo, m.digest FROM manifests m
WHERE NOT EXISTS (SELECT 1 FROM live l WHERE l.repo = m.repo AND l.digest = m.digest)
ORDER BY m.repo, m.digest";

/// One garbage-collection mark inside `tx` (see [`MetaStore::mark_garbage`]).
async fn mark(
    tx: &deadpool_postgres::Transaction<'_>,
    selection: GcSelection,
) -> Result<GcMarked, Fail> {
    // A long transaction over every blob would lose serialization conflicts to the pushes
    // running beside it again and again. Writers of `blobs` wait instead while it marks
    // (tens of milliseconds; readers do not wait); taken before the first query, so the
    // mark's snapshot follows every write that was in flight. A push that had already read
    // its links still meets the mark as a conflict and is retried.
    tx.batch_execute("LOCK TABLE blobs IN SHARE ROW EXCLUSIVE MODE")
        .await?;
    let mut manifests = Vec::new();
    if let Some(cutoff) = selection.untagged_pushed_before_ms {
        for row in tx.query(LIVE_MANIFESTS, &[&cutoff]).await? {
            let (repo, digest): (String, String) = (row.get(0), row.get(1));
            for sql in delete_manifest_rows_sql() {
                tx.execute(sql, &[&repo, &digest]).await?;
            }
            manifests.push((repo, parse_digest(digest)?));
        }
    }
    let marked = tx
        .query(
            "UPDATE blobs SET state = 'deleting'
             WHERE state = 'live' AND last_used_at < $1
               AND NOT EXISTS (SELECT 1 FROM manifest_edges e WHERE e.target = blobs.digest)
             RETURNING digest, size",
            &[&selection.blobs_unused_before_ms],
        )
        .await?;
    tx.execute(
        "DELETE FROM repo_blobs WHERE digest IN (SELECT digest FROM blobs WHERE state = 'deleting')",
        &[],
    )
    .await?;
    let mut blobs = marked
        .iter()
        .map(|r| Ok((parse_digest(r.get(0))?, r.get::<_, i64>(1) as u64)))
        .collect::<Result<Vec<_>, MetaError>>()?;
    blobs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    Ok(GcMarked { manifests, blobs })
}

#[async_trait]
impl MetaStore for PostgresMeta {
    async fn reserve_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        let digest = digest.as_str();
        write_tx!(self, Durability::Visible, |tx| {
            let t = now();
            let state = tx
                .query_opt("SELECT state FROM blobs WHERE digest = $1", &[&digest])
                .await?
                .map(|r| r.get::<_, String>(0));
            match state.as_deref() {
                Some("live") => {
                    tx.execute(
                        "UPDATE blobs SET last_used_at = $2 WHERE digest = $1",
                        &[&digest, &t],
                    )
                    .await?;
                }
                Some(_) => return Err(Fail::Meta(MetaError::BlobBeingDeleted)),
                None => {
                    tx.execute(
                        "INSERT INTO blobs (digest, size, created_at, last_used_at, state) VALUES ($1, 0, $2, $2, 'live')",
                        &[&digest, &t],
                    )
                    .await?;
                }
            }
            Ok(())
        })
    }

    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        finished_upload: Option<&str>,
    ) -> Result<(), MetaError> {
        let (repo, digest, size) = (repo.as_str(), digest.as_str(), size as i64);
        write_tx!(self, Durability::Synced, |tx| {
            let t = now();
            let live = tx
                .execute(
                    "UPDATE blobs SET size = $2, last_used_at = $3 WHERE digest = $1 AND state = 'live'",
                    &[&digest, &size, &t],
                )
                .await?;
            if live == 0 {
                return Err(Fail::Meta(MetaError::BlobBeingDeleted));
            }
            tx.execute(
                "INSERT INTO repo_blobs (repo, digest, linked_at) VALUES ($1, $2, $3)
                 ON CONFLICT (repo, digest) DO UPDATE SET linked_at = excluded.linked_at",
                &[&repo, &digest, &t],
            )
            .await?;
            if let Some(id) = finished_upload {
                tx.execute("DELETE FROM uploads WHERE id = $1", &[&id])
                    .await?;
            }
            Ok(())
        })
    }

    async fn touch_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        let digest = digest.as_str();
        write_tx!(self, Durability::Visible, |tx| {
            tx.execute(
                "UPDATE blobs SET last_used_at = $2 WHERE digest = $1 AND state = 'live'",
                &[&digest, &now()],
            )
            .await?;
            Ok(())
        })
    }

    async fn linked_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<LinkedBlob>, MetaError> {
        self.row(
            "SELECT b.size, b.last_used_at FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
             WHERE l.repo = $1 AND l.digest = $2 AND b.state = 'live'",
            &[&repo.as_str(), &digest.as_str()],
            |r| {
                Ok(LinkedBlob {
                    size: r.get::<_, i64>(0) as u64,
                    last_used_ms: r.get(1),
                })
            },
        )
        .await
    }

    async fn any_linked_blob_size(&self, digest: &Digest) -> Result<Option<u64>, MetaError> {
        self.row(
            "SELECT b.size FROM blobs b WHERE b.digest = $1 AND b.state = 'live'
             AND EXISTS (SELECT 1 FROM repo_blobs l WHERE l.digest = b.digest)",
            &[&digest.as_str()],
            |r| Ok(r.get::<_, i64>(0) as u64),
        )
        .await
    }

    async fn unlink_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError> {
        let (repo, digest) = (repo.as_str(), digest.as_str());
        write_tx!(self, Durability::Synced, |tx| {
            let n = tx
                .execute(
                    "DELETE FROM repo_blobs WHERE repo = $1 AND digest = $2",
                    &[&repo, &digest],
                )
                .await?;
            Ok(n > 0)
        })
    }

    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        tag: Option<&Tag>,
    ) -> Result<(), MetaError> {
        let repo = repo.as_str();
        let tag = tag.map(Tag::as_str);
        write_tx!(self, Durability::Synced, |tx| {
            let mut missing = Vec::new();
            for edge in &manifest.edges {
                let sql = match edge.kind {
                    EdgeKind::Config | EdgeKind::Layer => {
                        "SELECT 1 FROM repo_blobs WHERE repo = $1 AND digest = $2"
                    }
                    EdgeKind::Child => "SELECT 1 FROM manifests WHERE repo = $1 AND digest = $2",
                };
                let present = tx
                    .query_opt(sql, &[&repo, &edge.digest.as_str()])
                    .await?
                    .is_some();
                if !present && !missing.contains(&edge.digest) {
                    missing.push(edge.digest.clone());
                }
            }
            if !missing.is_empty() {
                return Err(Fail::Meta(MetaError::MissingReferences { missing }));
            }
            let t = now();
            let digest = manifest.digest.as_str();
            tx.execute(
                "INSERT INTO repositories (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&repo, &t],
            )
            .await?;
            tx.execute(
                "INSERT INTO manifests (repo, digest, media_type, artifact_type, subject, annotations, size, raw, pushed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (repo, digest) DO UPDATE SET pushed_at = excluded.pushed_at",
                &[
                    &repo,
                    &digest,
                    &manifest.media_type,
                    &manifest.artifact_type,
                    &manifest.subject.as_ref().map(Digest::as_str),
                    &manifest.annotations_json,
                    &(manifest.raw.len() as i64),
                    &manifest.raw,
                    &t,
                ],
            )
            .await?;
            for edge in &manifest.edges {
                tx.execute(
                    "INSERT INTO manifest_edges (repo, manifest, target, kind) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[&repo, &digest, &edge.digest.as_str(), &edge.kind.as_str()],
                )
                .await?;
                tx.execute(
                    "UPDATE blobs SET last_used_at = $2 WHERE digest = $1",
                    &[&edge.digest.as_str(), &t],
                )
                .await?;
            }
            if let Some(tag) = tag {
                tx.execute(
                    "INSERT INTO tags (repo, tag, digest, updated_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at",
                    &[&repo, &tag, &digest, &t],
                )
                .await?;
            }
            Ok(())
        })
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, MetaError> {
        let map = |r: &Row| {
            Ok(StoredManifest {
                digest: parse_digest(r.get(0))?,
                media_type: r.get(1),
                raw: r.get(2),
            })
        };
        match reference {
            Reference::Digest(d) => {
                self.row(
                    "SELECT digest, media_type, raw FROM manifests WHERE repo = $1 AND digest = $2",
                    &[&repo.as_str(), &d.as_str()],
                    map,
                )
                .await
            }
            Reference::Tag(t) => {
                self.row(
                    "SELECT m.digest, m.media_type, m.raw FROM tags t
                     JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest
                     WHERE t.repo = $1 AND t.tag = $2",
                    &[&repo.as_str(), &t.as_str()],
                    map,
                )
                .await
            }
        }
    }

    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool, MetaError> {
        let (repo, digest) = (repo.as_str(), digest.as_str());
        write_tx!(self, Durability::Synced, |tx| {
            let [manifests, tags, edges] = delete_manifest_rows_sql();
            let n = tx.execute(manifests, &[&repo, &digest]).await?;
            tx.execute(tags, &[&repo, &digest]).await?;
            tx.execute(edges, &[&repo, &digest]).await?;
            Ok(n > 0)
        })
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool, MetaError> {
        let (repo, tag) = (repo.as_str(), tag.as_str());
        write_tx!(self, Durability::Synced, |tx| {
            let n = tx
                .execute(
                    "DELETE FROM tags WHERE repo = $1 AND tag = $2",
                    &[&repo, &tag],
                )
                .await?;
            Ok(n > 0)
        })
    }

    async fn list_tags(
        &self,
        repo: &RepoName,
        page: Page<'_>,
    ) -> Result<Option<Vec<String>>, MetaError> {
        let known = self
            .row(
                "SELECT 1 FROM repositories WHERE name = $1",
                &[&repo.as_str()],
                |_| Ok(()),
            )
            .await?
            .is_some();
        if !known {
            return Ok(None);
        }
        let limit = page.limit.map(|n| n as i64);
        let after = page.after.unwrap_or("");
        self.rows(
            "SELECT tag FROM tags WHERE repo = $1 AND tag > $2 ORDER BY tag LIMIT $3",
            &[&repo.as_str(), &after, &limit],
            |r| Ok(r.get(0)),
        )
        .await
        .map(Some)
    }

    async fn catalog(
        &self,
        page: Page<'_>,
        within: Option<&[String]>,
    ) -> Result<Vec<String>, MetaError> {
        let limit = page.limit.map(|n| n as i64);
        let after = page.after.unwrap_or("");
        let within: Option<Vec<String>> = within.map(<[String]>::to_vec);
        self.rows(
            "SELECT name FROM repositories WHERE name > $1
             AND ($2::text[] IS NULL OR split_part(name, '/', 1) = ANY($2))
             ORDER BY name LIMIT $3",
            &[&after, &within, &limit],
            |r| Ok(r.get(0)),
        )
        .await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, MetaError> {
        self.rows(
            "SELECT digest, media_type, size, artifact_type, annotations FROM manifests
             WHERE repo = $1 AND subject = $2 AND ($3::text IS NULL OR artifact_type = $3)
             ORDER BY digest",
            &[&repo.as_str(), &subject.as_str(), &artifact_type],
            |r| {
                Ok(Referrer {
                    digest: parse_digest(r.get(0))?,
                    media_type: r.get(1),
                    size: r.get::<_, i64>(2) as u64,
                    artifact_type: r.get(3),
                    annotations_json: r.get(4),
                })
            },
        )
        .await
    }

    async fn record_upload(&self, upload_id: &str, repo: &RepoName) -> Result<(), MetaError> {
        let repo = repo.as_str();
        write_tx!(self, Durability::Visible, |tx| {
            tx.execute(
                "INSERT INTO uploads (id, repo, started_at) VALUES ($1, $2, $3)",
                &[&upload_id, &repo, &now()],
            )
            .await?;
            Ok(())
        })
    }

    async fn upload_repo(&self, upload_id: &str) -> Result<Option<String>, MetaError> {
        self.row(
            "SELECT repo FROM uploads WHERE id = $1",
            &[&upload_id],
            |r| Ok(r.get(0)),
        )
        .await
    }

    async fn forget_upload(&self, upload_id: &str) -> Result<(), MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            tx.execute("DELETE FROM uploads WHERE id = $1", &[&upload_id])
                .await?;
            Ok(())
        })
    }

    async fn mark_garbage(&self, selection: GcSelection) -> Result<GcMarked, MetaError> {
        let mut client = self.pool.get().await.map_err(pool_error)?;
        for attempt in 1..=MAX_ATTEMPTS {
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::Serializable)
                .start()
                .await
                .map_err(pg)?;
            let outcome = mark(&tx, selection).await;
            // A dry run does the real work and rolls it back, so that what it reports is
            // exactly what a real pass would do.
            let end = match outcome {
                Ok(marked) if selection.dry_run => tx.rollback().await.map(|()| marked),
                Ok(marked) => tx.commit().await.map(|()| marked),
                Err(Fail::Retry) => {
                    tokio::time::sleep(retry_pause(attempt)).await;
                    continue;
                }
                Err(Fail::Meta(e)) => return Err(e),
            };
            match end.map_err(Fail::from) {
                Ok(marked) => return Ok(marked),
                Err(Fail::Retry) => tokio::time::sleep(retry_pause(attempt)).await,
                Err(Fail::Meta(e)) => return Err(e),
            }
        }
        Err(MetaError::Backend(
            "postgres: too many serialization conflicts".into(),
        ))
    }

    async fn blobs_being_deleted(&self) -> Result<Vec<(Digest, u64)>, MetaError> {
        self.rows(
            "SELECT digest, size FROM blobs WHERE state = 'deleting' ORDER BY digest",
            &[],
            |r| Ok((parse_digest(r.get(0))?, r.get::<_, i64>(1) as u64)),
        )
        .await
    }

    async fn forget_deleted_blobs(&self, digests: &[Digest]) -> Result<(), MetaError> {
        let digests: Vec<&str> = digests.iter().map(Digest::as_str).collect();
        write_tx!(self, Durability::Synced, |tx| {
            tx.execute(
                "DELETE FROM blobs WHERE digest = ANY($1) AND state = 'deleting'",
                &[&digests],
            )
            .await?;
            Ok(())
        })
    }

    async fn uploads_started_before(&self, cutoff_ms: i64) -> Result<Vec<String>, MetaError> {
        self.rows(
            "SELECT id FROM uploads WHERE started_at < $1 ORDER BY id",
            &[&cutoff_ms],
            |r| Ok(r.get(0)),
        )
        .await
    }

    async fn live_blobs(&self) -> Result<Vec<(Digest, u64)>, MetaError> {
        self.rows(
            "SELECT digest, size FROM blobs WHERE state = 'live' ORDER BY digest",
            &[],
            |r| Ok((parse_digest(r.get(0))?, r.get::<_, i64>(1) as u64)),
        )
        .await
    }

    async fn dangling_edges(&self) -> Result<Vec<DanglingEdge>, MetaError> {
        self.rows(
            "SELECT e.repo, e.manifest, e.target, e.kind FROM manifest_edges e
             WHERE (e.kind = 'child' AND NOT EXISTS
                      (SELECT 1 FROM manifests m WHERE m.repo = e.repo AND m.digest = e.target))
                OR (e.kind <> 'child' AND NOT EXISTS
                      (SELECT 1 FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
                       WHERE l.repo = e.repo AND l.digest = e.target AND b.state = 'live'))
             ORDER BY e.repo, e.manifest, e.target",
            &[],
            |r| {
                Ok(DanglingEdge {
                    repo: r.get(0),
                    manifest: r.get(1),
                    target: r.get(2),
                    kind: r.get(3),
                })
            },
        )
        .await
    }

    async fn drop_blob(&self, digest: &Digest) -> Result<(), MetaError> {
        let digest = digest.as_str();
        write_tx!(self, Durability::Synced, |tx| {
            tx.execute("DELETE FROM repo_blobs WHERE digest = $1", &[&digest])
                .await?;
            tx.execute("DELETE FROM blobs WHERE digest = $1", &[&digest])
                .await?;
            Ok(())
        })
    }

    async fn try_lease(&self, name: &str, holder: &str, ttl_ms: i64) -> Result<bool, MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            let t = now();
            let taken = tx
                .query_opt(
                    "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE leases.holder = excluded.holder OR leases.expires_at < $4
                 RETURNING holder",
                    &[&name, &holder, &(t + ttl_ms), &t],
                )
                .await?;
            Ok(taken.is_some())
        })
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), MetaError> {
        write_tx!(self, Durability::Synced, |tx| {
            tx.execute(
                "DELETE FROM leases WHERE name = $1 AND holder = $2",
                &[&name, &holder],
            )
            .await?;
            Ok(())
        })
    }

    async fn ping(&self) -> Result<(), MetaError> {
        self.row("SELECT 1", &[], |_| Ok(())).await.map(|_| ())
    }
}
