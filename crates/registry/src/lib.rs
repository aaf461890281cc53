//! The registry domain every front end calls: the OCI distribution semantics of pushing,
//! pulling, mounting, deleting and listing, on top of a [`BlobStore`] and a [`MetaStore`].
//! It never names HTTP: the server crate turns requests into these calls and
//! [`RegistryError`]s into OCI error bodies.

mod blobs;
mod check;
mod error;
mod gc;
mod manifest_cache;
mod manifests;
mod quota;

use std::sync::Arc;

use berth_meta::{MetaError, MetaStore, ProjectOrigin};
use berth_storage::BlobStore;

pub use berth_meta::read_cache::READ_CACHE_TTL;
/// Who made a change, a page of a listing, a project: domain words the store shares.
pub use berth_meta::{Actor, Page, ProjectRecord as Project, StoreCounts, StoredManifest};
pub use blobs::{BlobBytes, BlobRead, MountOutcome, RangeRequest};
pub use check::{CheckOptions, CheckReport};
pub use error::RegistryError;
pub use gc::{GcCounters, GcOptions, GcReport, REPORT_LIST_MAX};
pub use manifest_cache::MANIFEST_CACHE_TTL;
pub use manifests::{ManifestPushed, ReferrersIndex};

/// Milliseconds since the Unix epoch: the clock of the metadata store's timestamps.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn new_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "node".to_owned());
    static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{host}/{}/{}/{n}", std::process::id(), now_ms())
}

/// Limits that protect the server from oversized input.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest manifest accepted, in bytes; manifests are held in memory to be parsed.
    pub max_manifest_bytes: usize,
    /// Upload sessions one caller may hold open at once on this node: enough for many
    /// parallel pushes (a client opens a few per image), far from what fills a disk.
    pub max_open_uploads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 4 * 1024 * 1024,
            max_open_uploads: 1000,
        }
    }
}

/// The registry service. Cheap to clone: it holds shared handles only.
#[derive(Clone)]
pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    limits: Limits,
    node_id: Arc<str>,
    uploads: Arc<quota::UploadQuota>,
    gc_totals: Arc<gc::GcTotals>,
    manifests: Arc<manifest_cache::ManifestCache>,
    /// Manifests by tag, on a node that alone writes its metadata (`read_cache`).
    tags: Arc<berth_meta::read_cache::ReadCache<berth_meta::StoredManifest>>,
    /// Blobs linked into repositories, likewise.
    links: Arc<berth_meta::read_cache::ReadCache<berth_meta::LinkedBlob>>,
}

/// The longest project name, however the project is made.
pub const MAX_PROJECT_NAME: usize = 64;

impl Registry {
    /// Wires the service to its stores.
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, limits: Limits) -> Self {
        Registry {
            blobs,
            meta,
            limits,
            node_id: new_node_id().into(),
            uploads: Arc::default(),
            gc_totals: Arc::default(),
            manifests: Arc::default(),
            tags: Arc::default(),
            links: Arc::default(),
        }
    }

    /// This process's name in leases: unique per start, readable in the database.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The limits in force, for the edge to enforce them before buffering.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Creates the project a push goes into, as access control granted it (with the
    /// pusher as its first member, in the given role). A project created meanwhile by a
    /// concurrent push is fine.
    pub async fn create_project_for_push(
        &self,
        name: &str,
        owner: Option<(i64, &str)>,
        by: &Actor,
    ) -> Result<(), RegistryError> {
        if name.len() > MAX_PROJECT_NAME {
            // The rule projects made through the API follow, for projects made by a push.
            return Err(RegistryError::Invalid(berth_oci::ParseError::Name {
                input: name.chars().take(MAX_PROJECT_NAME).collect::<String>() + "…",
                reason: "a project name (the first path component) has at most 64 characters",
            }));
        }
        let created = self
            .meta
            .create_project(name, false, owner, ProjectOrigin::FirstPush, by)
            .await;
        match created {
            Ok(_) | Err(MetaError::Conflict(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// How much is stored (a count per table: callers cache it).
    pub async fn store_counts(&self) -> Result<StoreCounts, RegistryError> {
        Ok(self.meta.statistics().await?)
    }

    /// Upload sessions open on this node.
    pub fn open_upload_sessions(&self) -> usize {
        self.uploads.open()
    }

    /// What this node's collections did since it started.
    pub fn gc_counters(&self) -> GcCounters {
        self.gc_totals.snapshot()
    }

    /// Takes (or renews) the named lease for this node for `ttl`; false while another
    /// node holds it. How nodes sharing a store agree that one of them does a job.
    pub async fn try_lease(
        &self,
        name: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, RegistryError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        Ok(self.meta.try_lease(name, &self.node_id, ttl_ms).await?)
    }

    /// Gives the named lease back, if this node holds it.
    pub async fn release_lease(&self, name: &str) -> Result<(), RegistryError> {
        Ok(self.meta.release_lease(name, &self.node_id).await?)
    }

    /// A project by name: what policies hang on.
    pub async fn project(&self, name: &str) -> Result<Option<Project>, RegistryError> {
        Ok(self.meta.project(name).await?)
    }

    /// Each store's readiness, checked independently: `(blobs, metadata)`.
    pub async fn readiness(&self) -> (Result<(), RegistryError>, Result<(), RegistryError>) {
        let (blobs, meta) = tokio::join!(self.blobs.ready(), self.meta.ping());
        (
            blobs.map_err(RegistryError::from),
            meta.map_err(RegistryError::from),
        )
    }
}
