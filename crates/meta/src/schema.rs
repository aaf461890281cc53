//! The schema, defined once: one numbered list of migrations for both engines. Where the
//! engines spell a column type differently the migration says so with a placeholder,
//! expanded by [`expand`]:
//!
//! | placeholder | SQLite | PostgreSQL |
//! |---|---|---|
//! | `{key}` | `TEXT` | `TEXT COLLATE "C"` (listings page in byte order, as SQLite's) |
//! | `{int}` | `INTEGER` | `BIGINT` |
//! | `{bool}` | `INTEGER` | `BOOLEAN` |
//! | `{bytes}` | `BLOB` | `BYTEA` |
//! | `{serial}` | `INTEGER PRIMARY KEY AUTOINCREMENT` | `BIGSERIAL PRIMARY KEY` |
//! | `{compact}` | `WITHOUT ROWID` | (nothing) |
//! | `{config_media_type_of_raw}` | `json_extract` of `raw` | `->>` of `raw` as `jsonb` |
//!
//! A database records how many migrations it has applied (SQLite's `user_version`,
//! PostgreSQL's `berth_migrations`); opening applies the rest, in order, each in the
//! transaction that records it.

use crate::engine::Dialect;

/// Every migration, in order. Never edit one that has shipped: add another.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: images.
    r#"
CREATE TABLE repositories (
    name {key} PRIMARY KEY,
    created_at {int} NOT NULL
) {compact};
CREATE TABLE blobs (
    digest {key} PRIMARY KEY,
    size {int} NOT NULL,
    created_at {int} NOT NULL,
    last_used_at {int} NOT NULL
) {compact};
CREATE TABLE repo_blobs (
    repo {key} NOT NULL,
    digest {key} NOT NULL,
    linked_at {int} NOT NULL,
    PRIMARY KEY (repo, digest)
) {compact};
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);
CREATE TABLE manifests (
    repo {key} NOT NULL,
    digest {key} NOT NULL,
    media_type TEXT NOT NULL,
    artifact_type TEXT,
    subject {key},
    annotations TEXT,
    size {int} NOT NULL,
    raw {bytes} NOT NULL,
    pushed_at {int} NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX manifests_by_subject ON manifests (repo, subject) WHERE subject IS NOT NULL;
CREATE TABLE manifest_edges (
    repo {key} NOT NULL,
    manifest {key} NOT NULL,
    target {key} NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (repo, manifest, target, kind)
) {compact};
CREATE INDEX manifest_edges_by_target ON manifest_edges (target);
CREATE TABLE tags (
    repo {key} NOT NULL,
    tag {key} NOT NULL,
    digest {key} NOT NULL,
    updated_at {int} NOT NULL,
    PRIMARY KEY (repo, tag)
) {compact};
CREATE INDEX tags_by_digest ON tags (repo, digest);
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    repo {key} NOT NULL,
    started_at {int} NOT NULL
) {compact};
"#,
    // 2: a blob's state, 'live' or 'deleting'. Deliberately not indexed: a collection
    // scans blobs once, while an index would be rewritten for every blob it marks
    // (measured: 3x slower marking).
    r#"
ALTER TABLE blobs ADD COLUMN state TEXT NOT NULL DEFAULT 'live';
"#,
    // 3: accounts and the audit log.
    r#"
CREATE TABLE users (
    id {serial},
    name {key} NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    admin {bool} NOT NULL DEFAULT FALSE,
    generation {int} NOT NULL DEFAULT 0,
    created_at {int} NOT NULL
);
CREATE TABLE projects (
    name {key} PRIMARY KEY,
    public {bool} NOT NULL DEFAULT FALSE,
    created_at {int} NOT NULL
) {compact};
CREATE TABLE members (
    project {key} NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
    user_id {int} NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    PRIMARY KEY (project, user_id)
) {compact};
CREATE INDEX members_by_user ON members (user_id);
CREATE TABLE robots (
    id {serial},
    project {key} NOT NULL REFERENCES projects (name) ON DELETE CASCADE,
    name {key} NOT NULL,
    secret_hash TEXT NOT NULL,
    permissions TEXT NOT NULL,
    expires_at {int},
    created_at {int} NOT NULL,
    UNIQUE (project, name)
);
CREATE TABLE audit (
    id {serial},
    at {int} NOT NULL,
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
    // 4: leases for jobs that run on one node at a time, and registry-wide settings.
    r#"
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at {int} NOT NULL
) {compact};
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
) {compact};
"#,
    // 5: the event log (`events`), which the audit log becomes a view of; its sequence
    // counter; and how far each consumer got.
    r#"
CREATE TABLE events (
    seq {int} PRIMARY KEY,
    at {int} NOT NULL,
    actor TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    address TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    result TEXT NOT NULL,
    detail TEXT NOT NULL,
    change TEXT
);
INSERT INTO events (seq, at, actor, actor_kind, address, action, resource, result, detail)
    SELECT id, at, actor, actor_kind, address, action, resource, result, detail FROM audit;
DROP TABLE audit;
CREATE INDEX events_by_actor ON events (actor, seq);
CREATE INDEX events_by_action ON events (action, seq);
CREATE INDEX events_by_time ON events (at);
CREATE TABLE event_counter (
    id {int} PRIMARY KEY,
    last_seq {int} NOT NULL
);
INSERT INTO event_counter (id, last_seq) SELECT 1, COALESCE(MAX(seq), 0) FROM events;
CREATE TABLE event_cursors (
    name TEXT PRIMARY KEY,
    position {int} NOT NULL
) {compact};
"#,
    // 6: a referrer without `artifactType` is listed under its config's media type in
    // every case (image configs and the empty config were left out before).
    r#"
UPDATE manifests SET artifact_type = {config_media_type_of_raw}
    WHERE artifact_type IS NULL AND subject IS NOT NULL;
"#,
    // 7: refresh tokens (docker's identity tokens), one per login, listable and revocable.
    r#"
CREATE TABLE refresh_tokens (
    id {key} PRIMARY KEY,
    subject {key} NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_id {int} NOT NULL,
    client TEXT NOT NULL,
    address TEXT NOT NULL,
    created_at {int} NOT NULL,
    expires_at {int} NOT NULL,
    last_used_at {int} NOT NULL
) {compact};
CREATE INDEX refresh_tokens_by_subject ON refresh_tokens (subject, created_at);
"#,
    // 8: webhook policies (system-wide when `project` is NULL) and their deliveries: one
    // row per (policy, event), so enqueuing twice is harmless and the log is per policy.
    r#"
CREATE TABLE webhooks (
    id {serial},
    project {key} REFERENCES projects (name) ON DELETE CASCADE,
    name {key} NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    format TEXT NOT NULL,
    secret TEXT NOT NULL,
    enabled {bool} NOT NULL,
    created_at {int} NOT NULL,
    created_seq {int} NOT NULL
);
CREATE UNIQUE INDEX webhooks_by_name ON webhooks (COALESCE(project, ''), name);
CREATE TABLE webhook_deliveries (
    policy_id {int} NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    seq {int} NOT NULL,
    state TEXT NOT NULL,
    attempts {int} NOT NULL,
    created_at {int} NOT NULL,
    next_attempt_at {int} NOT NULL,
    last_attempt_at {int},
    last_status {int},
    last_error TEXT NOT NULL,
    latency_ms {int},
    PRIMARY KEY (policy_id, seq)
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (policy_id, seq) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_time ON webhook_deliveries (created_at);
"#,
    // 9: when a manifest was last pulled, for pull-through caches' eviction.
    r#"
ALTER TABLE manifests ADD COLUMN pulled_at {int};
"#,
    // 10: pull-through cache settings made through the API.
    r#"
CREATE TABLE proxy_caches (
    project {key} PRIMARY KEY REFERENCES projects (name) ON DELETE CASCADE,
    settings TEXT NOT NULL,
    updated_at {int} NOT NULL
);
"#,
    // 11: replication: registry endpoints, policies, and their executions and tasks.
    r#"
CREATE TABLE replication_registries (
    name {key} PRIMARY KEY,
    settings TEXT NOT NULL,
    updated_at {int} NOT NULL
);
CREATE TABLE replication_policies (
    name {key} PRIMARY KEY,
    registry {key} NOT NULL REFERENCES replication_registries (name),
    settings TEXT NOT NULL,
    created_seq {int} NOT NULL,
    updated_at {int} NOT NULL
);
CREATE TABLE replication_executions (
    id {serial},
    policy {key} NOT NULL REFERENCES replication_policies (name) ON DELETE CASCADE,
    triggered_by TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at {int} NOT NULL,
    ended_at {int}
);
CREATE INDEX replication_executions_by_policy ON replication_executions (policy, id);
CREATE TABLE replication_tasks (
    id {serial},
    execution_id {int} NOT NULL REFERENCES replication_executions (id) ON DELETE CASCADE,
    policy {key} NOT NULL,
    operation TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts {int} NOT NULL,
    next_attempt_at {int} NOT NULL,
    claimed_until {int},
    bytes {int} NOT NULL,
    error TEXT NOT NULL,
    log TEXT NOT NULL,
    started_at {int},
    ended_at {int}
);
CREATE INDEX replication_executions_ended ON replication_executions (ended_at);
CREATE INDEX replication_tasks_by_execution ON replication_tasks (execution_id, id);
CREATE INDEX replication_tasks_open ON replication_tasks (policy, destination, id) WHERE status IN ('pending', 'running');
"#,
    // 12: a repository's last push without reading all its manifests (repository
    // listings), and referrers in digest order from the index (the one before made the
    // planner walk every manifest of the repository for the ORDER BY).
    r#"
CREATE INDEX manifests_by_push ON manifests (repo, pushed_at);
DROP INDEX manifests_by_subject;
CREATE INDEX manifests_by_subject ON manifests (repo, subject, digest) WHERE subject IS NOT NULL;
"#,
    // 13: who last pointed each tag (listings show the pusher).
    r#"
ALTER TABLE tags ADD COLUMN pushed_by TEXT NOT NULL DEFAULT '';
"#,
    // 14: the tags pointed last (the dashboard's recent pushes) without reading them all.
    r#"
CREATE INDEX tags_by_update ON tags (updated_at);
"#,
    // 15: the changes among the events, for the consumers (webhooks, replication) that
    // read only those: audited pulls add millions of rows without one, and every poll
    // stepped over all of them.
    r#"
CREATE INDEX events_with_change ON events (seq) WHERE change IS NOT NULL;
"#,
    // 16: how many times an audit record happened: identical records that arrive together
    // under load (a client pulling the same manifest in a loop) are written once, counted.
    r#"
ALTER TABLE events ADD COLUMN repeats {int} NOT NULL DEFAULT 1;
"#,
];

/// Where PostgreSQL databases made before the schema was shared stand in [`MIGRATIONS`]:
/// they counted their own list (in `berth_schema`), whose first entry made what 1–3 make
/// here and whose second made 4.
pub(crate) fn postgres_legacy_version(old: i64) -> usize {
    match old {
        0 => 0,
        1 => 3,
        _ => 4,
    }
}

/// A migration in `dialect`'s SQL.
pub(crate) fn expand(migration: &str, dialect: Dialect) -> String {
    let words: &[(&str, &str)] = match dialect {
        Dialect::Sqlite => &[
            ("{key}", "TEXT"),
            ("{int}", "INTEGER"),
            ("{bool}", "INTEGER"),
            ("{bytes}", "BLOB"),
            ("{serial}", "INTEGER PRIMARY KEY AUTOINCREMENT"),
            ("{compact}", "WITHOUT ROWID"),
            (
                "{config_media_type_of_raw}",
                "json_extract(CAST(raw AS TEXT), '$.config.mediaType')",
            ),
        ],
        Dialect::Postgres => &[
            ("{key}", "TEXT COLLATE \"C\""),
            ("{int}", "BIGINT"),
            ("{bool}", "BOOLEAN"),
            ("{bytes}", "BYTEA"),
            ("{serial}", "BIGSERIAL PRIMARY KEY"),
            ("{compact}", ""),
            (
                "{config_media_type_of_raw}",
                "(convert_from(raw, 'UTF8')::jsonb -> 'config' ->> 'mediaType')",
            ),
        ],
    };
    words
        .iter()
        .fold(migration.to_owned(), |sql, (word, spelled)| {
            sql.replace(word, spelled)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_expanded_in_both_dialects() {
        for dialect in [Dialect::Sqlite, Dialect::Postgres] {
            for migration in MIGRATIONS {
                let sql = expand(migration, dialect);
                assert!(!sql.contains('{'), "{dialect:?}: {sql}");
            }
        }
    }

    #[test]
    fn event_consumers_read_changes_by_index_not_past_every_audit_record() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for migration in MIGRATIONS {
            conn.execute_batch(&expand(migration, Dialect::Sqlite))
                .unwrap();
        }
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN {}",
                crate::events::EVENTS_AFTER
            ))
            .unwrap()
            .query_map(rusqlite::params![0, 100], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter().any(|step| step.contains("events_with_change")),
            "{plan:?}"
        );
    }

    #[test]
    fn sqlite_applies_every_migration() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for migration in MIGRATIONS {
            conn.execute_batch(&expand(migration, Dialect::Sqlite))
                .unwrap();
        }
    }
}
