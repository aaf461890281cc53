//! Replication between registries. Registry endpoints and policies are stored in the
//! metadata store; a run (an execution) is planned into tasks, one per tag to copy or
//! delete, which every node's worker claims and retries until they succeed or give up.
//! Push policies with the event trigger follow the event log through a cursor of their
//! own: each change becomes a task in the transaction that advances the cursor, so a
//! change is neither missed nor queued twice when the target is down or a node dies.
//! Images move through `berth_client::copy` (manifest bytes and digests unchanged,
//! indexes with their children, blobs skipped where the target has them, referrers with
//! their subjects); this registry's side is read and written through the domain service.

mod filter;
mod local;
mod plan;
mod schedule;
mod settings;
mod worker;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use berth_client::{ClientError, Credentials, RegistryClient};
use berth_meta::{
    Actor, Database, ExecutionRecord, MetaError, ReplicationConfigStore, ReplicationStore,
    TaskRecord,
};
use berth_outbound::OutboundPolicy;
use berth_registry::{Registry, RegistryError};

pub use filter::Glob;
pub use schedule::Schedule;
pub use settings::{Direction, Filters, Policy, RegistryEndpoint, Trigger};
pub use worker::run;

/// What went wrong, in words the HTTP edge maps once.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// Settings that do not parse or are out of bounds.
    #[error("{0}")]
    Invalid(String),
    /// No such endpoint, policy or execution.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The change clashes with what is there (an endpoint a policy uses).
    #[error("{0}")]
    Conflict(String),
    /// The outbound guard refused the address.
    #[error("{0}")]
    Refused(String),
    /// The other registry failed.
    #[error("{0}")]
    Remote(#[from] ClientError),
    /// This registry's side failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The metadata store failed.
    #[error(transparent)]
    Meta(MetaError),
}

impl From<MetaError> for ReplicationError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::NotFound(what) => ReplicationError::NotFound(what),
            MetaError::Conflict(what) => ReplicationError::Conflict(what),
            e => ReplicationError::Meta(e),
        }
    }
}

/// Counters the metrics endpoint reports.
#[derive(Debug, Default)]
pub struct ReplicationCounters {
    /// Task attempts that succeeded.
    pub succeeded: AtomicU64,
    /// Tasks that found nothing to do.
    pub skipped: AtomicU64,
    /// Task attempts that failed and will be retried.
    pub retried: AtomicU64,
    /// Tasks given up on.
    pub failed: AtomicU64,
    /// Blob bytes sent.
    pub bytes: AtomicU64,
}

/// Replication administration and the state its worker shares.
#[derive(Clone)]
pub struct Replication {
    pub(crate) registry: Registry,
    pub(crate) db: Arc<Database>,
    outbound: OutboundPolicy,
    http: reqwest::Client,
    http_any_certificate: reqwest::Client,
    /// Rung when new tasks are queued, so the worker looks at once.
    pub(crate) wake: Arc<tokio::sync::Notify>,
    /// How often event-triggered policies are also run whole (what the target lost on
    /// its own comes back).
    pub(crate) reconcile_every: Duration,
    /// For the metrics.
    pub counters: Arc<ReplicationCounters>,
    /// Per registry endpoint (and one for this registry, as `""`): the blobs this node's
    /// tasks placed there, so tasks running side by side send a shared layer once.
    shared_blobs:
        Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<berth_client::SharedBlobs>>>>,
    /// Uploads into this registry that interrupted pulls left.
    pub(crate) unfinished: local::UnfinishedUploads,
}

/// The chunk replication pushes blobs in.
const REPLICATION_CHUNK: u64 = 8 * 1024 * 1024;

/// The longest one request to another registry may take: a blob of many GiB over a slow
/// link (pushes go in chunks, each far shorter).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

impl Replication {
    /// Replication over `registry` and `db`, dialling other registries only where
    /// `outbound` allows.
    pub fn new(
        registry: Registry,
        db: Arc<Database>,
        outbound: &OutboundPolicy,
        reconcile_every: Duration,
    ) -> Result<Replication, ReplicationError> {
        let client = |verify| {
            outbound
                .http_client_verifying(REQUEST_TIMEOUT, 5, verify)
                .map_err(|e| ReplicationError::Refused(e.to_string()))
        };
        Ok(Replication {
            registry,
            db,
            outbound: outbound.clone(),
            http: client(true)?,
            http_any_certificate: client(false)?,
            wake: Arc::new(tokio::sync::Notify::new()),
            reconcile_every,
            counters: Arc::default(),
            shared_blobs: Arc::default(),
            unfinished: Arc::default(),
        })
    }

    /// A client for `endpoint`, its URL checked by the outbound guard.
    pub(crate) fn client_for(
        &self,
        endpoint: &RegistryEndpoint,
    ) -> Result<RegistryClient, ReplicationError> {
        let url = self
            .outbound
            .check_url(&endpoint.url)
            .map_err(|e| ReplicationError::Refused(format!("{}: {e}", endpoint.url)))?;
        if url.path() != "/" || url.query().is_some() {
            return Err(ReplicationError::Invalid(format!(
                "{}: give the registry's base URL only",
                endpoint.url
            )));
        }
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            _ => {
                return Err(ReplicationError::Invalid(format!(
                    "{}: no host",
                    endpoint.url
                )))
            }
        };
        let credentials = match (&endpoint.username, &endpoint.password) {
            (Some(username), Some(password)) => Some(Credentials {
                username: username.clone(),
                password: password.clone(),
            }),
            _ => None,
        };
        let http = if endpoint.insecure {
            self.http_any_certificate.clone()
        } else {
            self.http.clone()
        };
        // Blobs go in chunks, so an interrupted one goes on where it stopped; each chunk
        // in flight is held in memory for a resend, hence chunks smaller than a CLI push's.
        Ok(
            RegistryClient::new(http, &host, url.scheme() == "http", credentials)
                .with_chunk_size(REPLICATION_CHUNK),
        )
    }

    /// What this node's tasks placed at `registry` (`""`: this registry).
    pub(crate) fn shared_blobs(&self, registry: &str) -> Arc<berth_client::SharedBlobs> {
        let mut shared = self.shared_blobs.lock().unwrap_or_else(|e| e.into_inner());
        shared.entry(registry.to_owned()).or_default().clone()
    }

    /// Adds or replaces a registry endpoint (its URL must pass the outbound guard).
    pub async fn set_registry(
        &self,
        value: &serde_json::Value,
        by: &Actor,
    ) -> Result<RegistryEndpoint, ReplicationError> {
        let endpoint = RegistryEndpoint::from_value(value)?;
        self.client_for(&endpoint)?;
        let stored = endpoint.to_json().to_string();
        self.db
            .set_replication_registry(&endpoint.name, &stored, by)
            .await?;
        Ok(endpoint)
    }

    /// Every registry endpoint.
    pub async fn registries(&self) -> Result<Vec<RegistryEndpoint>, ReplicationError> {
        let mut endpoints = Vec::new();
        for (name, settings) in self.db.replication_registries().await? {
            match parse_stored(&settings).and_then(|v| RegistryEndpoint::from_value(&v)) {
                Ok(endpoint) => endpoints.push(endpoint),
                Err(e) => {
                    tracing::warn!(registry = %name, error = %e, "a stored registry endpoint does not parse")
                }
            }
        }
        Ok(endpoints)
    }

    /// One registry endpoint.
    pub async fn registry_endpoint(
        &self,
        name: &str,
    ) -> Result<RegistryEndpoint, ReplicationError> {
        self.registries()
            .await?
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| ReplicationError::NotFound(format!("registry {name}")))
    }

    /// Removes a registry endpoint no policy uses.
    pub async fn remove_registry(&self, name: &str, by: &Actor) -> Result<bool, ReplicationError> {
        Ok(self.db.remove_replication_registry(name, by).await?)
    }

    /// Checks that `name`'s registry answers and takes its credentials.
    pub async fn ping_registry(&self, name: &str) -> Result<(), ReplicationError> {
        let endpoint = self.registry_endpoint(name).await?;
        Ok(self.client_for(&endpoint)?.ping().await?)
    }

    /// Adds or replaces a policy.
    pub async fn set_policy(
        &self,
        value: &serde_json::Value,
        by: &Actor,
    ) -> Result<Policy, ReplicationError> {
        let policy = Policy::from_value(value)?;
        let stored = policy.to_json().to_string();
        self.db
            .set_replication_policy(&policy.name, &policy.registry, &stored, by)
            .await?;
        self.wake.notify_one();
        Ok(policy)
    }

    /// Every policy, with the event that created it.
    pub async fn policies(&self) -> Result<Vec<(Policy, i64)>, ReplicationError> {
        let mut policies = Vec::new();
        for (name, _, settings, created_seq) in self.db.replication_policies().await? {
            match parse_stored(&settings).and_then(|v| Policy::from_value(&v)) {
                Ok(policy) => policies.push((policy, created_seq)),
                Err(e) => {
                    tracing::warn!(policy = %name, error = %e, "a stored replication policy does not parse")
                }
            }
        }
        Ok(policies)
    }

    /// One policy.
    pub async fn policy(&self, name: &str) -> Result<Policy, ReplicationError> {
        self.policies()
            .await?
            .into_iter()
            .map(|(p, _)| p)
            .find(|p| p.name == name)
            .ok_or_else(|| ReplicationError::NotFound(format!("replication policy {name}")))
    }

    /// Removes a policy with its executions.
    pub async fn remove_policy(&self, name: &str, by: &Actor) -> Result<bool, ReplicationError> {
        Ok(self.db.remove_replication_policy(name, by).await?)
    }

    /// Starts a run of `name`: lists what its source holds, queues a task per tag, and
    /// returns the execution's id. The tasks run in the background.
    pub async fn start(
        &self,
        name: &str,
        trigger: &str,
        by: &Actor,
    ) -> Result<i64, ReplicationError> {
        let policy = self.policy(name).await?;
        let tasks = self.plan(&policy).await?;
        let id = self
            .db
            .start_replication(&policy.name, trigger, tasks, by)
            .await?;
        self.wake.notify_one();
        Ok(id)
    }

    /// A policy's executions, newest first, each with its tasks.
    pub async fn executions(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<Vec<(ExecutionRecord, Vec<TaskRecord>)>, ReplicationError> {
        self.policy(name).await?;
        let mut runs = Vec::new();
        for execution in self.db.replication_executions(name, limit).await? {
            let tasks = self.db.replication_tasks(execution.id).await?;
            runs.push((execution, tasks));
        }
        Ok(runs)
    }

    /// Open tasks per policy, for the metrics.
    pub async fn backlog(&self) -> Result<Vec<(String, u64)>, ReplicationError> {
        Ok(self.db.replication_backlog().await?)
    }
}

fn parse_stored(text: &str) -> Result<serde_json::Value, ReplicationError> {
    serde_json::from_str(text).map_err(|e| ReplicationError::Invalid(e.to_string()))
}
