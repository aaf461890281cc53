//! Stores made by the versions before the schema was shared (each engine with its own
//! migration list, audit records in `audit`) open, migrate and keep what they held.

use berth_meta::{AccountStore, Actor, AuditFilter, Database, EventLog, MetaStore};
use berth_oci::{Digest, RepoName};

/// The SQLite schema as those versions made it (`PRAGMA user_version` 4).
const SQLITE_BEFORE: &[&str] = &[
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

/// The PostgreSQL schema as those versions made it (`berth_schema.version` 2).
const POSTGRES_BEFORE: &[&str] = &[
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

async fn check_carried_over(db: &Database) {
    let audit = db
        .audit(AuditFilter {
            limit: 10,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!((audit[0].id, audit[0].event.action.as_str()), (7, "login"));
    assert_eq!(db.user("old").await.unwrap().unwrap().generation, 3);
    // New rows continue the old numbering.
    let by = Actor::system("test");
    let new = db.create_user("new", "h", false, "", &by).await.unwrap();
    assert!(new.id > 1);
    assert_eq!(db.last_event().await.unwrap(), 8);
    let audit = db
        .audit(AuditFilter {
            limit: 10,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(audit[0].event.action, "user.create");
    // A referrer without artifactType is now found under its image config's type.
    let repo = RepoName::parse("p/app").unwrap();
    let subject = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
    let found = db
        .referrers(
            &repo,
            &subject,
            Some("application/vnd.oci.image.config.v1+json"),
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].digest.as_str(),
        format!("sha256:{}", "b".repeat(64))
    );
}

/// A referrer pushed before: an image config, no artifactType, so none stored. `bytes`
/// turns a string literal into the engine's byte type.
fn old_referrer(bytes: impl Fn(&str) -> String) -> String {
    let raw = format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{c}","size":2}},"layers":[],"subject":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{a}","size":2}}}}"#,
        c = "c".repeat(64),
        a = "a".repeat(64)
    );
    format!(
        "INSERT INTO repositories (name, created_at) VALUES ('p/app', 1);
         INSERT INTO manifests (repo, digest, media_type, artifact_type, subject, annotations, size, raw, pushed_at)
         VALUES ('p/app', 'sha256:{b}', 'application/vnd.oci.image.manifest.v1+json', NULL, 'sha256:{a}', NULL, {len}, {raw}, 1);",
        b = "b".repeat(64),
        a = "a".repeat(64),
        len = raw.len(),
        raw = bytes(&raw),
    )
}

const OLD_ROWS: &str = "
INSERT INTO users (name, password_hash, admin, generation, created_at) VALUES ('old', 'h', FALSE, 3, 1);
INSERT INTO audit (id, at, actor, actor_kind, address, action, resource, result, detail)
    VALUES (7, 1, 'old', 'user', '127.0.0.1', 'login', 'old', 'success', '');";

#[test]
fn a_sqlite_store_of_the_earlier_layout_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        for sql in SQLITE_BEFORE {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", SQLITE_BEFORE.len())
            .unwrap();
        conn.execute_batch(OLD_ROWS).unwrap();
        conn.execute_batch(&old_referrer(|s| format!("CAST('{s}' AS BLOB)")))
            .unwrap();
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let db = Database::open_sqlite(&path).unwrap();
        check_carried_over(&db).await;
    });
}

#[test]
fn a_postgres_store_of_the_earlier_layout_is_migrated() {
    let Some(cluster) = berth_testkit::shared_cluster() else {
        return;
    };
    let schema = berth_testkit::unique_schema();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (client, connection) = loop {
            match tokio_postgres::connect(cluster.url(), tokio_postgres::NoTls).await {
                Ok(pair) => break pair,
                // The shared cluster may still be starting.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        };
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {schema}; SET search_path = {schema}"
            ))
            .await
            .unwrap();
        for sql in POSTGRES_BEFORE {
            client.batch_execute(sql).await.unwrap();
        }
        client
            .batch_execute(
                "CREATE TABLE berth_schema (version INTEGER NOT NULL);
                 INSERT INTO berth_schema (version) VALUES (2);",
            )
            .await
            .unwrap();
        client.batch_execute(OLD_ROWS).await.unwrap();
        client
            .batch_execute(&old_referrer(|s| format!("convert_to('{s}', 'UTF8')")))
            .await
            .unwrap();
        client
            .batch_execute("SELECT setval('audit_id_seq', 7)")
            .await
            .unwrap();
        let db = Database::connect_postgres(cluster.url(), Some(&schema))
            .await
            .unwrap();
        check_carried_over(&db).await;
    });
}
