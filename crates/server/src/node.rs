//! Opening a node: settings → stores → services → the router's state. `berth serve`, the
//! maintenance commands and the test kit all open nodes here, so the tests run the wiring
//! users run (the token signing key included).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_auth::{AccessControl, AuthError, AuthMode, AuthSettings, IssuerKey, TokenSigner};
use berth_meta::{Database, MetaError};
use berth_registry::{GcOptions, Limits, Registry};
use berth_storage::{BlobStore, FsBlobStore, S3BlobStore, S3Config, StorageError, TimedBlobStore};
use berth_webhooks::{WebhookSettings, Webhooks};

use crate::{App, BackendTimings};

/// Where blob bytes live.
#[derive(Debug, Clone)]
pub enum BlobConfig {
    /// `blobs/` and `uploads/` in the data directory.
    Filesystem,
    /// An S3-compatible bucket, shared by every node.
    S3(S3Config),
}

/// Where metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaConfig {
    /// `meta.db` in the data directory.
    Sqlite,
    /// A PostgreSQL database shared by every node.
    Postgres {
        /// Connection URL or key=value string.
        url: String,
        /// A schema of its own (created if missing).
        schema: Option<String>,
    },
}

/// Everything a node is opened from.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Blobs (with the file system backend) and `meta.db` (with SQLite) live here.
    pub data_dir: PathBuf,
    /// The blob store.
    pub blobs: BlobConfig,
    /// The metadata store.
    pub meta: MetaConfig,
    /// Input limits.
    pub limits: Limits,
    /// Access control.
    pub auth: AuthSettings,
    /// Builtin mode's token signing key as a file (created on first start); `None` keeps
    /// it in the metadata store, created by the first node and shared by all.
    pub signing_key_file: Option<PathBuf>,
    /// Token mode's issuer key.
    pub issuer_key: Option<IssuerKey>,
    /// What collections keep (and how long events are kept).
    pub gc: GcOptions,
    /// Blob downloads go out with `sendfile` (see [`App::with_sendfile`]).
    pub sendfile: bool,
    /// Who may read `/metrics` on the main listener.
    pub metrics_access: crate::MetricsAccess,
    /// How webhooks are delivered (and which ranges their targets may be in).
    pub webhooks: WebhookSettings,
    /// `/metrics` also carries Docker Distribution's names.
    pub distribution_metrics: bool,
    /// Traces, when an OTLP endpoint is configured.
    pub tracing: Option<berth_telemetry::TracingSettings>,
    /// Pull-through caches: each a project mirroring an upstream registry.
    pub proxy_caches: Vec<berth_proxy::ProxySettings>,
    /// How often replication policies with the event trigger also run whole.
    pub replication_reconcile: std::time::Duration,
}

/// Why a node could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory or a key file could not be created or read.
    #[error("{path}: {source}")]
    File {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The blob store could not be opened.
    #[error("blob storage: {0}")]
    Storage(#[from] StorageError),
    /// The metadata store could not be opened (or migrated).
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    /// Access control could not be set up (a bad key, a bad mode).
    #[error("access control: {0}")]
    Auth(#[from] AuthError),
    /// A pull-through cache is misconfigured (a URL the outbound guard refuses…).
    #[error("{0}")]
    Proxy(#[from] berth_proxy::ProxyError),
    /// Replication could not be set up (the outbound guard refused its HTTP client).
    #[error(transparent)]
    Replication(#[from] berth_replication::ReplicationError),
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::File {
        path: path.to_owned(),
        source,
    }
}

/// A node's services, wired to its stores.
pub struct Node {
    /// The registry's domain service.
    pub registry: Registry,
    /// Who may do what.
    pub access: AccessControl,
    /// Webhook administration; `berth_webhooks::run_sender` delivers.
    pub webhooks: Webhooks,
    /// Replication administration; `berth_replication::run` does the work (a serving
    /// node runs it; a command-line process that only administers does not).
    pub replication: berth_replication::Replication,
    /// The router's state.
    pub app: App,
}

impl Node {
    /// Opens the stores `config` names and wires the services. Must run inside the
    /// runtime (access control starts its audit writer).
    pub async fn open(config: &NodeConfig) -> Result<Node, NodeError> {
        // The data holds the token signing key and password hashes (in `meta.db`) and the
        // blobs of private projects: everything this process creates is its owner's only.
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        std::fs::create_dir_all(&config.data_dir).map_err(file_error(&config.data_dir))?;
        warn_if_readable_by_others(&config.data_dir);
        warn_if_readable_by_others(&config.data_dir.join("meta.db"));
        let blobs: Arc<dyn BlobStore> = match &config.blobs {
            BlobConfig::Filesystem => {
                Arc::new(FsBlobStore::open(&config.data_dir).map_err(file_error(&config.data_dir))?)
            }
            BlobConfig::S3(s3) => Arc::new(S3BlobStore::new(s3.clone())?),
        };
        let driver = match &config.blobs {
            BlobConfig::Filesystem => "filesystem",
            BlobConfig::S3(_) => "s3",
        };
        let meta = Arc::new(match &config.meta {
            MetaConfig::Sqlite => Database::open_sqlite(&config.data_dir.join("meta.db"))?,
            MetaConfig::Postgres { url, schema } => {
                Database::connect_postgres(url, schema.as_deref()).await?
            }
        });
        let timings = BackendTimings::new(meta.backend(), driver);
        meta.observe(timings.meta_observer());
        let blobs: Arc<dyn BlobStore> =
            Arc::new(TimedBlobStore::new(blobs, timings.storage_observer()));
        let registry = Registry::new(blobs, meta.clone(), config.limits.clone());
        let signer = match config.auth.mode {
            AuthMode::Builtin => Some(match &config.signing_key_file {
                Some(path) => signing_key_file(path)?,
                None => {
                    // Kept in the metadata store: every node signs and checks with one key.
                    let candidate = TokenSigner::generate()?.to_pem()?;
                    let pem = berth_meta::AccountStore::setting_or_insert(
                        meta.as_ref(),
                        "token_signing_key",
                        &candidate,
                    )
                    .await?;
                    TokenSigner::from_pem(&pem)?
                }
            }),
            AuthMode::Disabled | AuthMode::ExternalToken => None,
        };
        let issuer_key = match config.auth.mode {
            AuthMode::ExternalToken => config.issuer_key.clone(),
            AuthMode::Builtin | AuthMode::Disabled => None,
        };
        let webhooks = Webhooks::new(meta.clone(), config.webhooks.clone());
        let projects = meta.clone();
        let replication = berth_replication::Replication::new(
            registry.clone(),
            meta.clone(),
            &config.webhooks.outbound,
            config.replication_reconcile,
        )?;
        let access = AccessControl::for_mode(config.auth.clone(), meta, signer, issuer_key)?;
        let app = App::new(
            registry.clone(),
            access.clone(),
            webhooks.clone(),
            config.gc.clone(),
        )
        .with_sendfile(config.sendfile)
        .with_metrics_access(config.metrics_access)
        .with_backend_timings(timings)
        .with_distribution_metrics(config.distribution_metrics)
        .with_tracer(
            config
                .tracing
                .clone()
                .map(berth_telemetry::Tracer::start_exporting),
        );
        for settings in &config.proxy_caches {
            // The project holds the cached content and carries its permissions.
            let by = berth_meta::Actor::system("proxy-cache");
            let created = berth_meta::MetaStore::create_project(
                projects.as_ref(),
                &settings.project,
                false,
                None,
                berth_meta::ProjectOrigin::Requested,
                &by,
            )
            .await;
            match created {
                Ok(_) | Err(MetaError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Always there: projects can be made caches through the API too.
        let proxy = Arc::new(
            berth_proxy::ProxyCache::new(
                registry.clone(),
                config.proxy_caches.clone(),
                &config.webhooks.outbound,
                config.data_dir.join("proxy-fills"),
            )?
            .with_store(projects.clone())
            .with_collection(config.gc.clone()),
        );
        proxy.reload().await?;
        tokio::spawn(proxy.clone().run_reload(berth_proxy::RELOAD_EVERY));
        // Idle images are looked for a few times per idle period (at least every second,
        // at most every ten minutes); size caps are also checked after every fill.
        let every = config
            .proxy_caches
            .iter()
            .filter_map(|p| p.idle)
            .min()
            .map_or(std::time::Duration::from_secs(600), |idle| idle / 4)
            .clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(600),
            );
        tokio::spawn(proxy.clone().run_eviction(every));
        let app = app.with_proxy_cache(proxy);
        let app = app.with_replication(replication.clone());
        Ok(Node {
            registry,
            access,
            webhooks,
            replication,
            app,
        })
    }
}

/// Says so when a data directory or database made before (or by hand) lets other local
/// users in: any of them could read the signing key and forge an administrator's token.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        let wanted = if meta.is_dir() { "700" } else { "600" };
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "readable by other local users, who could read the token signing key: chmod {wanted} it"
        );
    }
}

/// Loads the token signing key, creating it (readable by the owner only) on first start.
fn signing_key_file(path: &Path) -> Result<TokenSigner, NodeError> {
    match std::fs::read_to_string(path) {
        Ok(pem) => Ok(TokenSigner::from_pem(&pem)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let signer = TokenSigner::generate()?;
            let pem = signer.to_pem()?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let written = options.open(path).and_then(|mut file| {
                std::io::Write::write_all(&mut file, pem.as_bytes())?;
                file.sync_all()
            });
            written.map_err(file_error(path))?;
            tracing::info!(path = %path.display(), "created the token signing key");
            Ok(signer)
        }
        Err(e) => Err(file_error(path)(e)),
    }
}
