//! Everything about images except their bytes, in transactions: which repository may see
//! which blob, manifests with their edges to blobs and child manifests, tags and
//! referrers. Listing tags, the catalog and referrers are index queries here, never
//! directory walks, which is what makes them fast.
//!
//! Only this crate writes SQL. [`Database`] implements [`MetaStore`] and [`AccountStore`]
//! once, over either engine: SQLite embedded in the data directory (the default), or
//! PostgreSQL shared by several nodes. `engine` is the cut between the two.

mod accounts;
mod audit;
mod changes;
mod credentials;
mod engine;
mod events;
mod gc;
mod images;
mod maintenance;
mod manifests;
mod postgres;
mod proxy_caches;
pub mod read_cache;
mod replication;
mod replication_config;
mod repositories;
mod schema;
mod sqlite;
mod webhooks;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;
use berth_oci::{Digest, ManifestEdge, Reference, RepoName, Tag};

pub use accounts::{
    AccountStore, MemberRecord, ProjectAccess, ProjectOrigin, ProjectRecord, UserRecord,
};
pub use audit::{AuditFilter, AuditRecord, NewAuditEvent};
pub use changes::{Change, TagChange};
pub use credentials::{CredentialStore, RefreshTokenRecord, RobotRecord};
pub use events::{Actor, Event, EventLog};
pub use maintenance::MaintenanceStore;
pub use proxy_caches::ProxyCacheStore;
pub use replication::{
    ExecutionRecord, NewTask, ReplicationStore, TaskOutcome, TaskRecord, TaskStatus,
};
pub use replication_config::ReplicationConfigStore;
pub use repositories::{RecentTag, RepositorySummary, TagDetail, COUNT_CAP};
pub use webhooks::{
    DeliveryBacklog, DeliveryOutcome, DeliveryRecord, DeliveryState, NewWebhook, WebhookPatch,
    WebhookRecord, WebhookStore, MAX_WEBHOOKS_PER_SCOPE,
};

pub use engine::Observer;
use engine::{Durability, Engine, Kind, Row, Value};

/// The metadata store: every query and rule of [`MetaStore`] and [`AccountStore`], over
/// the engine it was opened on.
pub struct Database {
    engine: Engine,
    /// Upload sessions this node opened and has not seen end, with their repository, when
    /// the store is this node's alone (SQLite): a POST answers without waiting for its
    /// record to commit, and the requests that follow find their session here without a
    /// read. (Only this node serves the session's file; a session another process purged
    /// behind its back is caught by the blob store, which finds its bytes gone.)
    open_uploads: Option<Mutex<HashMap<String, String>>>,
}

impl Database {
    /// Opens (creating and migrating if needed) the SQLite database at `path`.
    pub fn open_sqlite(path: &Path) -> Result<Self, MetaError> {
        let engine = Engine::new(Kind::Sqlite(sqlite::SqliteEngine::open(path)?));
        Ok(Self::over(engine))
    }

    /// Connects to PostgreSQL at `url` (`postgres://user:password@host:port/db` or a
    /// key=value string), using `schema` if given (created if missing), and applies
    /// migrations.
    pub async fn connect_postgres(url: &str, schema: Option<&str>) -> Result<Self, MetaError> {
        let engine = Engine::new(Kind::Postgres(
            postgres::PostgresEngine::connect(url, schema).await?,
        ));
        Ok(Self::over(engine))
    }

    /// One statement as a write of its own; the number of rows it changed.
    async fn write_statement(
        &self,
        durability: Durability,
        sql: &'static str,
        args: Vec<Value<'static>>,
    ) -> Result<u64, MetaError> {
        self.engine
            .write(durability, move |tx| tx.execute(sql, &args))
            .await
    }

    /// Every row of one read statement, mapped.
    async fn read_rows<T, F>(
        &self,
        sql: &'static str,
        args: Vec<Value<'static>>,
        map: F,
    ) -> Result<Vec<T>, MetaError>
    where
        T: Send + 'static,
        F: FnMut(Row) -> Result<T, MetaError> + Send + 'static,
    {
        self.engine
            .read(move |tx| tx.query_map(sql, &args, map))
            .await
    }

    /// The first row of one read statement (which returns at most one), mapped.
    async fn read_row<T, F>(
        &self,
        sql: &'static str,
        args: Vec<Value<'static>>,
        map: F,
    ) -> Result<Option<T>, MetaError>
    where
        T: Send + 'static,
        F: FnMut(Row) -> Result<T, MetaError> + Send + 'static,
    {
        Ok(self.read_rows(sql, args, map).await?.into_iter().next())
    }

    /// Tells `observer` how long each read and write took and whether the store failed
    /// it, from now on (set once; metrics aggregate it).
    pub fn observe(&self, observer: Observer) {
        self.engine.observe(observer);
    }

    /// `sqlite` or `postgres`, as metrics label the backend.
    pub fn backend(&self) -> &'static str {
        self.engine.backend()
    }

    fn over(engine: Engine) -> Self {
        let open_uploads = engine.node_local().then(Mutex::default);
        Database {
            engine,
            open_uploads,
        }
    }
}

/// A manifest as the registry accepted it: the exact bytes plus the facts parsed out of them.
#[derive(Debug, Clone)]
pub struct NewManifest {
    /// Digest of `raw`.
    pub digest: Digest,
    /// Served back as `Content-Type`.
    pub media_type: String,
    /// Reported and filtered on by the referrers API.
    pub artifact_type: Option<String>,
    /// The manifest this one refers to, if any.
    pub subject: Option<Digest>,
    /// Annotations as JSON text, reported by the referrers API.
    pub annotations_json: Option<String>,
    /// Blobs and child manifests that must be present in the repository.
    pub edges: Vec<ManifestEdge>,
    /// The client's bytes, byte for byte.
    pub raw: Vec<u8>,
}

/// A stored manifest as served to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredManifest {
    /// Its digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub raw: Vec<u8>,
}

/// A manifest of a project as a pull-through cache's eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedManifest {
    /// Its repository.
    pub repo: String,
    /// Its digest.
    pub digest: Digest,
    /// When it was last pulled (else stored), in milliseconds since the epoch.
    pub last_pulled_ms: i64,
    /// Its own bytes and those of the blobs it references (shared ones counted fully).
    pub bytes: u64,
}

/// One entry of a referrers listing.
#[derive(Debug, Clone)]
pub struct Referrer {
    /// The referring manifest's digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its artifact type, if any.
    pub artifact_type: Option<String>,
    /// Its annotations as JSON text, if any.
    pub annotations_json: Option<String>,
}

/// A blob as a repository sees it.
#[derive(Debug, Clone, Copy)]
pub struct LinkedBlob {
    /// Its size in bytes.
    pub size: u64,
    /// When it was last uploaded, mounted, referenced or confirmed (ms since the epoch);
    /// garbage collection spares blobs used within its grace period.
    pub last_used_ms: i64,
}

/// How much the store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Repositories with at least a blob or a manifest.
    pub repositories: u64,
    /// Manifests, over every repository.
    pub manifests: u64,
    /// Distinct live blobs (each stored once, however many repositories link it).
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
}

/// What a lease's row says now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Nobody holds it.
    Free,
    /// A holder holds it, until it expires.
    Held,
    /// Its holder let it expire without giving it back: its work was left unfinished.
    Expired,
}

/// What garbage collection should select in one pass.
#[derive(Debug, Clone, Copy)]
pub struct GcSelection {
    /// Remove manifests that no tag reaches (directly, as an index child or as a referrer
    /// of a reached manifest) and that were pushed before this time (ms since the epoch).
    /// `None` keeps every manifest.
    pub untagged_pushed_before_ms: Option<i64>,
    /// Only blobs last used before this time (ms since the epoch) may be swept.
    pub blobs_unused_before_ms: i64,
}

/// What a collection would remove now ([`MetaStore::preview_garbage`]): a dry run's
/// answer, bounded however much would go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcPreview {
    /// How many manifests would be removed.
    pub manifest_count: u64,
    /// The first of them, as (repository, digest), in that order.
    pub manifests: Vec<(String, Digest)>,
    /// How many blobs would be deleted.
    pub blob_count: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The first of them, with their sizes, in digest order.
    pub blobs: Vec<(Digest, u64)>,
}

/// One step of a collection's mark ([`MetaStore::mark_unused_blobs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MarkedBatch {
    /// Blobs marked for deletion in this step, with their sizes.
    pub marked: Vec<(Digest, u64)>,
    /// Where the next step starts (the last digest this one looked at); `None`: done.
    pub next: Option<String>,
}

/// A reference from a manifest to content that is not there: what `berth check` reports.
#[derive(Debug, Clone)]
pub struct DanglingEdge {
    /// The repository of the manifest.
    pub repo: String,
    /// The manifest holding the reference.
    pub manifest: String,
    /// What it references.
    pub target: String,
    /// `config`, `layer` or `child`.
    pub kind: String,
}

/// How a blob came to a repository: what its event reports.
#[derive(Debug, Clone, Copy)]
pub enum BlobArrival<'a> {
    /// Uploaded; the upload session, if it had one, is finished.
    Uploaded {
        /// The session to forget.
        session: Option<&'a str>,
    },
    /// Mounted from a repository that holds it.
    Mounted,
}

/// One page of a sorted listing (tags, catalog).
#[derive(Debug, Clone, Copy)]
pub struct Page<'a> {
    /// At most this many entries; `None` for all.
    pub limit: Option<usize>,
    /// Only entries sorting after this one.
    pub after: Option<&'a str>,
}

/// Faults of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// A manifest references content the repository does not hold.
    #[error("manifest references content missing from the repository: {}", list(.missing))]
    MissingReferences {
        /// What is missing.
        missing: Vec<Digest>,
    },
    /// Garbage collection is deleting this blob's bytes; the caller must wait and upload
    /// it again rather than trust bytes that are about to disappear.
    #[error("the blob is being deleted by garbage collection")]
    BlobBeingDeleted,
    /// A record with that name exists already.
    #[error("{0}")]
    Conflict(String),
    /// A record the operation needs does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The record still holds content and cannot be removed.
    #[error("{0}")]
    NotEmpty(String),
    /// The backend cannot be reached (connection refused or lost, pool exhausted): the
    /// operation did not happen and may be retried later.
    #[error("metadata backend unavailable: {0}")]
    Unavailable(String),
    /// The backend's disk is full: nothing was written.
    #[error("metadata storage is full: {0}")]
    Full(String),
    /// The backend failed.
    #[error("metadata backend: {0}")]
    Backend(String),
    /// Stored data could not be read back as written (a bug or tampering).
    #[error("metadata is corrupt: {0}")]
    Corrupt(String),
}

/// Milliseconds since the Unix epoch: the clock of every stored timestamp.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn list(digests: &[Digest]) -> String {
    digests
        .iter()
        .map(Digest::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The metadata operations the registry needs. Every method is one transaction; every
/// change records its events (the [`EventLog`]) in the same transaction.
#[async_trait]
pub trait MetaStore: EventLog + MaintenanceStore + Send + Sync + 'static {
    /// Durable writes through this store (this process) so far, counted when each ends,
    /// committed or not, before its caller is answered. A read that saw the same count
    /// before and after was overtaken by no write of this process; a copy of what it read
    /// is current while the count stays the same, as far as this process can tell.
    fn changes(&self) -> u64;
    /// Those of [`Self::changes`] that may change who may do what: every durable write
    /// but the pushes of image content (blob links, manifests, tags) that create no
    /// repository. The node's access decisions follow this count, so that they stay
    /// cached while clients push.
    fn access_changes(&self) -> u64;
    /// Whether the store serves this node alone (SQLite in the data directory): every
    /// write that clients make then goes through this process and [`Self::changes`]
    /// sees it. Other processes on the same file (`berth gc`, account commands) are not
    /// counted. With PostgreSQL, other nodes write too.
    fn node_local(&self) -> bool;
    /// Announces that bytes for `digest` are about to be published: creates or refreshes the
    /// blob's record so garbage collection spares it. Fails with
    /// [`MetaError::BlobBeingDeleted`] while a collection is deleting the same digest.
    async fn reserve_blob(&self, digest: &Digest) -> Result<(), MetaError>;
    /// Records that `repo` may see blob `digest` (after an upload or mount), forgets the
    /// upload session that produced it and records the event, in one transaction. Fails
    /// with [`MetaError::BlobBeingDeleted`] unless the blob's record is live.
    async fn link_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        arrival: BlobArrival<'_>,
        by: &Actor,
    ) -> Result<(), MetaError>;
    /// Restarts a blob's grace period (a client just confirmed it exists).
    async fn touch_blob(&self, digest: &Digest) -> Result<(), MetaError>;
    /// The blob if `repo` may see it and it is live.
    async fn linked_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Option<LinkedBlob>, MetaError>;
    /// The blob's size if any repository may see it (mount without `from`).
    async fn any_linked_blob_size(&self, digest: &Digest) -> Result<Option<u64>, MetaError>;
    /// Removes `repo`'s link to a blob; true if there was one.
    async fn unlink_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        by: &Actor,
    ) -> Result<bool, MetaError>;
    /// Records that a manifest was pulled now: pull-through caches evict the least
    /// recently pulled first. Not synced (a lost touch only makes eviction earlier).
    async fn touch_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<(), MetaError>;
    /// The manifests of `project`'s repositories, least recently pulled first (a
    /// manifest never pulled counts from when it was stored), at most `limit`.
    async fn least_recently_pulled(
        &self,
        project: &str,
        limit: usize,
    ) -> Result<Vec<CachedManifest>, MetaError>;
    /// The bytes of the distinct blobs linked in `project`'s repositories.
    async fn project_bytes(&self, project: &str) -> Result<u64, MetaError>;
    /// Stores a manifest fetched by a pull-through cache (and points `tag` at it) without
    /// requiring its blobs: a cache holds a manifest before the layers a client has yet
    /// to ask for. Everything else is as [`MetaStore::put_manifest`].
    async fn put_cached_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        tag: Option<&Tag>,
        by: &Actor,
    ) -> Result<(), MetaError>;
    /// Stores a manifest (and points `tag` at it) after checking, in the same transaction,
    /// that every edge's target is present in `repo`.
    async fn put_manifest(
        &self,
        repo: &RepoName,
        manifest: NewManifest,
        tag: Option<&Tag>,
        by: &Actor,
    ) -> Result<(), MetaError>;
    /// A manifest by tag or digest.
    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>, MetaError>;
    /// Deletes a manifest and every tag pointing at it; true if it existed.
    async fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        by: &Actor,
    ) -> Result<bool, MetaError>;
    /// Deletes one tag, leaving the manifest; true if it existed.
    async fn delete_tag(&self, repo: &RepoName, tag: &Tag, by: &Actor) -> Result<bool, MetaError>;
    /// Tags in lexical order, or `None` if the repository is unknown.
    async fn list_tags(
        &self,
        repo: &RepoName,
        page: Page<'_>,
    ) -> Result<Option<Vec<String>>, MetaError>;
    /// Repository names in lexical order; only those in the listed projects (first path
    /// segments) when `within` is given.
    async fn catalog(
        &self,
        page: Page<'_>,
        within: Option<&[String]>,
    ) -> Result<Vec<String>, MetaError>;
    /// `project`'s repositories in name order after `after`, at most `limit`, with what
    /// each holds.
    async fn repositories(
        &self,
        project: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RepositorySummary>, MetaError>;
    /// The tags pointed last, newest first, at most `limit`: what was pushed lately,
    /// from the tags' time index, whatever the registry holds.
    async fn recent_tags(&self, limit: usize) -> Result<Vec<RecentTag>, MetaError>;
    /// The projects (first path segments) repositories exist in, in order, at most
    /// `limit`: a registry without project records has these.
    async fn repository_projects(&self, limit: usize) -> Result<Vec<String>, MetaError>;
    /// The last garbage collection: when, and what it removed.
    async fn last_collection(&self) -> Result<Option<(i64, String)>, MetaError>;
    /// Tags of `repo` after `after` starting with `prefix`, at most `limit`, each with its
    /// manifest.
    async fn tag_details(
        &self,
        repo: &RepoName,
        after: Option<&str>,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<TagDetail>, MetaError>;
    /// Deletes a repository with its manifests, tags and blob links; how many manifests
    /// went, or `None` if there is no such repository.
    async fn delete_repository(
        &self,
        repo: &RepoName,
        by: &Actor,
    ) -> Result<Option<u64>, MetaError>;
    /// Manifests in `repo` whose subject is `subject`, optionally of one artifact type.
    async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Referrer>, MetaError>;
    /// Remembers which repository an upload session belongs to.
    async fn record_upload(&self, upload_id: &str, repo: &RepoName) -> Result<(), MetaError>;
    /// The repository an upload session belongs to, if it is known.
    async fn upload_repo(&self, upload_id: &str) -> Result<Option<String>, MetaError>;
    /// Forgets a finished or cancelled upload session.
    async fn forget_upload(&self, upload_id: &str) -> Result<(), MetaError>;
    /// How much is stored: repositories, manifests, live blobs and their bytes (for the
    /// metrics; each a count over a table, so callers cache it).
    async fn statistics(&self) -> Result<StoreCounts, MetaError>;
    /// Creates a project (the first path segment of repository names, the unit of
    /// permissions and, next, of policies), with `owner` (a user id) as its first project admin;
    /// [`MetaError::Conflict`] if it exists.
    async fn create_project(
        &self,
        name: &str,
        public: bool,
        owner: Option<(i64, &str)>,
        origin: ProjectOrigin,
        by: &Actor,
    ) -> Result<ProjectRecord, MetaError>;
    /// A project by name.
    async fn project(&self, name: &str) -> Result<Option<ProjectRecord>, MetaError>;
    /// Every project, by name.
    async fn projects(&self) -> Result<Vec<ProjectRecord>, MetaError>;
    /// A cheap round trip, for health checks.
    async fn ping(&self) -> Result<(), MetaError>;
}
