//! Settings: built-in defaults, then a TOML file, then `BERTH_*` environment variables,
//! then command-line flags, each overriding the one before. No file is needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::Context;
use berth_auth::{AuthMode, AuthSettings};
use berth_outbound::OutboundPolicy;
use berth_registry::{GcOptions, Limits};
use berth_server::node::{BlobConfig, MetaConfig, NodeConfig};
use berth_server::tls::TlsFiles;
use berth_server::{ConnectionLimits, MetricsAccess};
use berth_telemetry::TracingSettings;
use berth_webhooks::WebhookSettings;
use serde::Deserialize;

/// The settings `berth serve` runs with.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) listen: SocketAddr,
    pub(crate) data_dir: PathBuf,
    pub(crate) log_level: String,
    pub(crate) max_manifest_bytes: usize,
    /// Upload sessions one caller may hold open on this node.
    pub(crate) max_open_uploads: usize,
    /// Blob downloads go out with `sendfile` (see `App::with_sendfile`).
    pub(crate) sendfile: bool,
    pub(crate) meta: MetaConfig,
    pub(crate) storage: BlobConfig,
    pub(crate) gc: GcSettings,
    pub(crate) auth: AuthConfig,
    /// HTTPS: the certificate files; plain HTTP without.
    pub(crate) tls: Option<TlsFiles>,
    /// Connection timeouts and cap; the cap derived from the descriptor limit unless set.
    pub(crate) connections: ConnectionSettings,
    /// `/metrics`: who may read it on the main listener, and a listener of its own.
    pub(crate) metrics_access: MetricsAccess,
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// `/metrics` also carries Docker Distribution's names.
    pub(crate) distribution_metrics: bool,
    /// Traces, when an OTLP endpoint is configured.
    pub(crate) tracing: Option<TracingSettings>,
    /// Webhook delivery, with the `[outbound]` guard its targets pass.
    pub(crate) webhooks: WebhookSettings,
    /// `[[proxy_cache]]`: projects that mirror upstream registries.
    pub(crate) proxy_caches: Vec<berth_proxy::ProxySettings>,
    /// `[replication] reconcile_secs`: how often event-triggered policies also run whole.
    pub(crate) replication_reconcile: Duration,
}

/// The `[limits]` connection settings, before the descriptor limit is known.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionSettings {
    pub(crate) header_timeout: Option<Duration>,
    pub(crate) body_stall_timeout: Option<Duration>,
    pub(crate) max_connections: Option<usize>,
}

impl ConnectionSettings {
    /// The limits for a process allowed `fd_limit` descriptors.
    pub(crate) fn limits(&self, fd_limit: u64) -> ConnectionLimits {
        let derived = ConnectionLimits::for_fd_limit(fd_limit);
        ConnectionLimits {
            header_timeout: self.header_timeout.unwrap_or(derived.header_timeout),
            body_stall_timeout: self
                .body_stall_timeout
                .unwrap_or(derived.body_stall_timeout),
            max_connections: self.max_connections.unwrap_or(derived.max_connections),
        }
    }
}

impl Settings {
    /// What a node is opened from (reading the external issuer's key, if one is named).
    pub(crate) fn node(&self) -> anyhow::Result<NodeConfig> {
        let issuer_key = match &self.auth.issuer_public_key {
            Some(path) if self.auth.settings.mode == AuthMode::ExternalToken => {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Some(berth_auth::verifying_key_from_pem(&pem)?)
            }
            _ => None,
        };
        Ok(NodeConfig {
            data_dir: self.data_dir.clone(),
            blobs: self.storage.clone(),
            meta: self.meta.clone(),
            limits: Limits {
                max_manifest_bytes: self.max_manifest_bytes,
                max_open_uploads: self.max_open_uploads,
            },
            auth: self.auth.settings.clone(),
            signing_key_file: self.auth.signing_key.clone(),
            issuer_key,
            gc: self.gc.options.clone(),
            sendfile: self.sendfile,
            metrics_access: self.metrics_access,
            webhooks: self.webhooks.clone(),
            distribution_metrics: self.distribution_metrics,
            tracing: self.tracing.clone(),
            proxy_caches: self.proxy_caches.clone(),
            replication_reconcile: self.replication_reconcile,
        })
    }
}

/// The `[storage]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStorage {
    backend: Option<String>,
    s3: Option<FileS3>,
}

/// The `[storage.s3]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileS3 {
    endpoint: Option<String>,
    region: Option<String>,
    bucket: Option<String>,
    prefix: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    path_style: Option<bool>,
    redirect: Option<bool>,
    redirect_ttl_secs: Option<u64>,
}

fn storage_config(file: &FileStorage) -> anyhow::Result<BlobConfig> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let backend = env("BERTH_STORAGE").or(file.backend.clone());
    match backend.as_deref().unwrap_or("filesystem") {
        "filesystem" => Ok(BlobConfig::Filesystem),
        "s3" => {
            let s3 = file.s3.as_ref();
            let get = |key: Option<&String>, var: &str| env(var).or(key.cloned());
            let bucket = get(s3.and_then(|s| s.bucket.as_ref()), "BERTH_S3_BUCKET")
                .context("storage s3: bucket (or BERTH_S3_BUCKET) is required")?;
            let endpoint = get(s3.and_then(|s| s.endpoint.as_ref()), "BERTH_S3_ENDPOINT");
            Ok(BlobConfig::S3(berth_storage::S3Config {
                path_style: s3.and_then(|s| s.path_style).unwrap_or(endpoint.is_some()),
                endpoint,
                region: get(s3.and_then(|s| s.region.as_ref()), "BERTH_S3_REGION")
                    .unwrap_or_else(|| "us-east-1".to_owned()),
                bucket,
                prefix: get(s3.and_then(|s| s.prefix.as_ref()), "BERTH_S3_PREFIX")
                    .unwrap_or_default(),
                access_key_id: get(
                    s3.and_then(|s| s.access_key_id.as_ref()),
                    "BERTH_S3_ACCESS_KEY_ID",
                )
                .context("storage s3: access_key_id (or BERTH_S3_ACCESS_KEY_ID) is required")?,
                secret_access_key: get(
                    s3.and_then(|s| s.secret_access_key.as_ref()),
                    "BERTH_S3_SECRET_ACCESS_KEY",
                )
                .context(
                    "storage s3: secret_access_key (or BERTH_S3_SECRET_ACCESS_KEY) is required",
                )?,
                redirect: s3.and_then(|s| s.redirect).unwrap_or(false).then(|| {
                    Duration::from_secs(s3.and_then(|s| s.redirect_ttl_secs).unwrap_or(900))
                }),
            }))
        }
        other => anyhow::bail!("storage backend {other:?}: expected filesystem or s3"),
    }
}

/// The `[meta]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMeta {
    postgres_url: Option<String>,
    postgres_schema: Option<String>,
}

/// Authentication settings plus where the keys are.
#[derive(Debug, Clone)]
pub(crate) struct AuthConfig {
    pub(crate) settings: AuthSettings,
    /// The token signing key (PKCS#8 PEM) as a file; `None` keeps it in the metadata
    /// store, created by the first node to start and shared by all.
    pub(crate) signing_key: Option<PathBuf>,
    /// The external issuer's public key (SPKI PEM), in `token` mode.
    pub(crate) issuer_public_key: Option<PathBuf>,
}

/// The `[auth]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    mode: Option<String>,
    service: Option<String>,
    issuer: Option<String>,
    realm: Option<String>,
    token_ttl_secs: Option<u64>,
    refresh_ttl_secs: Option<u64>,
    create_projects_on_push: Option<bool>,
    max_login_failures: Option<u32>,
    login_failure_window_secs: Option<u64>,
    audit_pulls: Option<bool>,
    signing_key: Option<PathBuf>,
    issuer_public_key: Option<PathBuf>,
}

/// Garbage-collection settings: what a collection keeps, and how often `serve` runs one.
#[derive(Debug, Clone)]
pub(crate) struct GcSettings {
    /// Seconds between scheduled collections in `serve`; `None` for none.
    pub(crate) interval: Option<Duration>,
    pub(crate) options: GcOptions,
}

/// The `[gc]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGc {
    interval_secs: Option<u64>,
    blob_grace_secs: Option<u64>,
    upload_max_age_secs: Option<u64>,
    delete_untagged: Option<bool>,
    untagged_min_age_secs: Option<u64>,
}

/// The config file's shape; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
    sendfile: Option<bool>,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    gc: FileGc,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    meta: FileMeta,
    #[serde(default)]
    storage: FileStorage,
    #[serde(default)]
    audit: FileAudit,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    outbound: FileOutbound,
    #[serde(default)]
    tracing: FileTracing,
    #[serde(default)]
    webhooks: FileWebhooks,
    #[serde(default)]
    proxy_cache: Vec<FileProxyCache>,
    #[serde(default)]
    replication: FileReplication,
}

/// The `[replication]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileReplication {
    /// How often a policy with the event trigger is also run whole, so that what the
    /// target lost on its own comes back (default an hour).
    reconcile_secs: Option<u64>,
}

/// One `[[proxy_cache]]` table: a project mirroring an upstream registry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileProxyCache {
    /// Clients pull `<project>/<path upstream>`.
    project: String,
    /// The upstream's base URLs, tried in order.
    urls: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    /// How long a tag is served before one `HEAD` upstream revalidates it.
    tag_ttl_secs: Option<u64>,
    /// containerd's `?ns=` value that routes here.
    ns: Option<String>,
    /// Serve as docker's `registry-mirrors` endpoint.
    docker_mirror: Option<bool>,
    /// Upstream fetches at once (16).
    max_concurrent_fetches: Option<usize>,
    /// Serve cached tags without asking when the upstream's `RateLimit-Remaining` is this low.
    rate_limit_reserve: Option<u64>,
    /// Evict the least recently pulled images while the project holds more bytes.
    max_bytes: Option<u64>,
    /// Evict images not pulled for this many seconds.
    idle_secs: Option<u64>,
}

/// The `[[proxy_cache]]` tables, checked: project names as projects are named, no project
/// twice.
fn proxy_settings(files: &[FileProxyCache]) -> anyhow::Result<Vec<berth_proxy::ProxySettings>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut all = Vec::new();
    for file in files {
        let name = berth_oci::RepoName::parse(&file.project)
            .ok()
            .filter(|n| {
                !n.as_str().contains('/') && n.as_str().len() <= berth_registry::MAX_PROJECT_NAME
            })
            .with_context(|| {
                format!("proxy_cache.project {:?}: not a project name", file.project)
            })?;
        anyhow::ensure!(
            seen.insert(name.as_str().to_owned()),
            "proxy_cache.project {:?} is configured twice",
            file.project
        );
        anyhow::ensure!(
            !file.urls.is_empty(),
            "proxy_cache {:?}: no urls",
            file.project
        );
        let mut settings = berth_proxy::ProxySettings::new(name.as_str(), file.urls.clone());
        settings.username = file.username.clone();
        settings.password = file.password.clone();
        if let Some(secs) = file.tag_ttl_secs {
            settings.tag_ttl = Duration::from_secs(secs);
        }
        settings.ns = file.ns.clone();
        settings.docker_mirror = file.docker_mirror.unwrap_or(false);
        if let Some(n) = file.max_concurrent_fetches {
            anyhow::ensure!(
                n > 0,
                "proxy_cache {:?}: max_concurrent_fetches must be above 0",
                file.project
            );
            settings.max_concurrent_fetches = n;
        }
        settings.rate_limit_reserve = file.rate_limit_reserve.unwrap_or(0);
        settings.max_bytes = file.max_bytes;
        settings.idle = file.idle_secs.map(Duration::from_secs);
        anyhow::ensure!(
            settings.idle.is_none_or(|idle| !idle.is_zero()),
            "proxy_cache {:?}: idle_secs must be above 0",
            file.project
        );
        all.push(settings);
    }
    Ok(all)
}

/// The `[outbound]` table: connections to addresses users supply (webhook targets).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOutbound {
    /// Loopback, link-local or private ranges outbound connections may reach.
    allow_cidrs: Option<Vec<String>>,
}

/// The `[tracing]` table: OpenTelemetry traces over OTLP/HTTP, off without an endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTracing {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`).
    otlp_endpoint: Option<String>,
    /// The share of new traces recorded, 0.0 to 1.0 (default 1.0).
    sample_ratio: Option<f64>,
    /// `service.name` (default `berth`).
    service_name: Option<String>,
    /// This node's name in spans (default: the host name).
    node: Option<String>,
}

/// The tracing settings, with `BERTH_OTLP_ENDPOINT` over the file's endpoint.
fn tracing_settings(file: &FileTracing) -> anyhow::Result<Option<TracingSettings>> {
    let endpoint = std::env::var("BERTH_OTLP_ENDPOINT")
        .ok()
        .filter(|v| !v.is_empty())
        .or(file.otlp_endpoint.clone());
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        anyhow::bail!("tracing.otlp_endpoint {endpoint:?}: expected an http:// or https:// URL");
    }
    let sample_ratio = file.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        anyhow::bail!("tracing.sample_ratio {sample_ratio}: expected 0.0 to 1.0");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    Ok(Some(TracingSettings {
        otlp_endpoint: endpoint,
        sample_ratio,
        service_name: file
            .service_name
            .clone()
            .unwrap_or_else(|| "berth".to_owned()),
        node: file.node.clone().unwrap_or(host),
    }))
}

/// The `[webhooks]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWebhooks {
    retry_for_secs: Option<u64>,
    max_backoff_secs: Option<u64>,
    timeout_secs: Option<u64>,
    delivery_log_days: Option<u64>,
    /// The registry's address as clients use it, for URLs in payloads.
    public_host: Option<String>,
}

/// The webhook settings from the file, with `BERTH_OUTBOUND_ALLOW_CIDRS` (comma-separated)
/// over `[outbound] allow_cidrs`.
fn webhook_settings(
    file: &FileWebhooks,
    outbound: &FileOutbound,
) -> anyhow::Result<WebhookSettings> {
    let defaults = WebhookSettings::default();
    let allow: Vec<String> = match std::env::var("BERTH_OUTBOUND_ALLOW_CIDRS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => outbound.allow_cidrs.clone().unwrap_or_default(),
    };
    let outbound = OutboundPolicy::allowing(&allow).context("outbound")?;
    let secs = |v: Option<u64>, d: Duration| v.map(Duration::from_secs).unwrap_or(d);
    let settings = WebhookSettings {
        retry_for: secs(file.retry_for_secs, defaults.retry_for),
        max_backoff: secs(file.max_backoff_secs, defaults.max_backoff),
        timeout: secs(file.timeout_secs, defaults.timeout),
        log_retention: file
            .delivery_log_days
            .map(|d| Duration::from_secs(d * 86_400))
            .unwrap_or(defaults.log_retention),
        outbound,
        public_host: file.public_host.clone().unwrap_or_default(),
    };
    if settings.timeout.is_zero() {
        anyhow::bail!("webhooks.timeout_secs must be above 0");
    }
    Ok(settings)
}

/// The `[metrics]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    /// A listener serving only `/metrics`, open (meant for a private address).
    listen: Option<String>,
    /// `admin` (default) or `open`: who may read `/metrics` on the main listener.
    access: Option<String>,
    /// Also export Docker Distribution's metric names.
    distribution_compatible: Option<bool>,
}

/// The `[tls]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
}

/// The `[audit]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    /// Days events are kept; 0 keeps them forever.
    retention_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_manifest_bytes: Option<usize>,
    max_open_uploads: Option<usize>,
    header_timeout_secs: Option<u64>,
    body_stall_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
}

/// Values given on the command line or in the environment (clap reads both).
#[derive(Debug, Default, Clone)]
pub(crate) struct Overrides {
    pub(crate) listen: Option<String>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) log_level: Option<String>,
    pub(crate) max_manifest_bytes: Option<usize>,
    pub(crate) auth_mode: Option<String>,
    pub(crate) postgres_url: Option<String>,
    pub(crate) tls_cert_file: Option<PathBuf>,
    pub(crate) tls_key_file: Option<PathBuf>,
    pub(crate) tls_client_ca_file: Option<PathBuf>,
}

impl Settings {
    /// Resolves the settings from an optional file and the overrides.
    pub(crate) fn load(file: Option<&Path>, overrides: Overrides) -> anyhow::Result<Self> {
        let file_config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let listen = overrides
            .listen
            .or(file_config.listen)
            .unwrap_or_else(|| "127.0.0.1:5000".to_owned());
        let listen = listen
            .parse()
            .with_context(|| format!("listen address {listen:?} is not HOST:PORT"))?;
        let data_dir = overrides
            .data_dir
            .or(file_config.data_dir)
            .unwrap_or_else(|| PathBuf::from("./berth-data"));
        let auth = auth_config(&file_config.auth, overrides.auth_mode.as_deref())?;
        let storage = storage_config(&file_config.storage)?;
        let tls = tls_files(
            overrides.tls_cert_file.or(file_config.tls.cert_file),
            overrides.tls_key_file.or(file_config.tls.key_file),
            overrides
                .tls_client_ca_file
                .or(file_config.tls.client_ca_file),
        )?;
        let limits = &file_config.limits;
        let connections = ConnectionSettings {
            header_timeout: limits.header_timeout_secs.map(Duration::from_secs),
            body_stall_timeout: limits.body_stall_timeout_secs.map(Duration::from_secs),
            max_connections: limits.max_connections,
        };
        if connections.header_timeout == Some(Duration::ZERO)
            || connections.body_stall_timeout == Some(Duration::ZERO)
            || connections.max_connections == Some(0)
        {
            anyhow::bail!("limits: timeouts and max_connections must be above 0");
        }
        let metrics_access = match file_config.metrics.access.as_deref() {
            None | Some("admin") => MetricsAccess::Administrators,
            Some("open") => MetricsAccess::Open,
            Some(other) => anyhow::bail!("metrics.access {other:?}: expected admin or open"),
        };
        let metrics_listen = match &file_config.metrics.listen {
            Some(addr) => Some(
                addr.parse()
                    .with_context(|| format!("metrics.listen {addr:?} is not HOST:PORT"))?,
            ),
            None => None,
        };
        let webhooks = webhook_settings(&file_config.webhooks, &file_config.outbound)?;
        let proxy_caches = proxy_settings(&file_config.proxy_cache)?;
        Ok(Settings {
            proxy_caches,
            replication_reconcile: Duration::from_secs(
                file_config
                    .replication
                    .reconcile_secs
                    .unwrap_or(3600)
                    .max(10),
            ),
            tracing: tracing_settings(&file_config.tracing)?,
            distribution_metrics: file_config.metrics.distribution_compatible.unwrap_or(false),
            webhooks,
            tls,
            connections,
            metrics_access,
            metrics_listen,
            listen,
            data_dir,
            log_level: overrides
                .log_level
                .or(file_config.log_level)
                .unwrap_or_else(|| "info".to_owned()),
            max_manifest_bytes: overrides
                .max_manifest_bytes
                .or(file_config.limits.max_manifest_bytes)
                .unwrap_or(berth_registry::Limits::default().max_manifest_bytes),
            max_open_uploads: file_config
                .limits
                .max_open_uploads
                .filter(|n| *n > 0)
                .unwrap_or(berth_registry::Limits::default().max_open_uploads),
            sendfile: file_config.sendfile.unwrap_or(false),
            gc: gc_settings(&file_config.gc, &file_config.audit),
            auth,
            storage,
            meta: match overrides.postgres_url.or(file_config.meta.postgres_url) {
                Some(url) => MetaConfig::Postgres {
                    url,
                    schema: file_config.meta.postgres_schema,
                },
                None => MetaConfig::Sqlite,
            },
        })
    }
}

/// TLS needs both a certificate and its key; a client CA alone means nothing.
fn tls_files(
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
) -> anyhow::Result<Option<TlsFiles>> {
    match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => Ok(Some(TlsFiles {
            cert_file,
            key_file,
            client_ca_file,
        })),
        (None, None) if client_ca_file.is_none() => Ok(None),
        _ => anyhow::bail!(
            "TLS needs both tls.cert_file and tls.key_file (a client CA needs both too)"
        ),
    }
}

fn auth_config(file: &FileAuth, mode: Option<&str>) -> anyhow::Result<AuthConfig> {
    let defaults = AuthSettings::default();
    let mode = match mode.or(file.mode.as_deref()).unwrap_or("builtin") {
        "builtin" => AuthMode::Builtin,
        "none" => AuthMode::Disabled,
        "token" => AuthMode::ExternalToken,
        other => anyhow::bail!("auth mode {other:?}: expected builtin, none or token"),
    };
    if mode == AuthMode::ExternalToken && (file.realm.is_none() || file.issuer_public_key.is_none())
    {
        anyhow::bail!("auth mode token needs auth.realm (the issuer's token endpoint) and auth.issuer_public_key");
    }
    let secs = |v: Option<u64>, d: Duration| v.map(Duration::from_secs).unwrap_or(d);
    Ok(AuthConfig {
        settings: AuthSettings {
            mode,
            service: file.service.clone().unwrap_or(defaults.service),
            issuer: file.issuer.clone().unwrap_or(defaults.issuer),
            realm: file.realm.clone(),
            token_ttl: secs(file.token_ttl_secs, defaults.token_ttl),
            refresh_ttl: secs(file.refresh_ttl_secs, defaults.refresh_ttl),
            create_projects_on_push: file
                .create_projects_on_push
                .unwrap_or(defaults.create_projects_on_push),
            max_login_failures: file
                .max_login_failures
                .unwrap_or(defaults.max_login_failures),
            login_failure_window: secs(
                file.login_failure_window_secs,
                defaults.login_failure_window,
            ),
            audit_pulls: file.audit_pulls.unwrap_or(defaults.audit_pulls),
        },
        signing_key: file.signing_key.clone(),
        issuer_public_key: file.issuer_public_key.clone(),
    })
}

fn gc_settings(file: &FileGc, audit: &FileAudit) -> GcSettings {
    let defaults = GcOptions::default();
    let secs = |v: Option<u64>, d: Duration| v.map(Duration::from_secs).unwrap_or(d);
    GcSettings {
        interval: file
            .interval_secs
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        options: GcOptions {
            dry_run: false,
            delete_untagged: file.delete_untagged.unwrap_or(defaults.delete_untagged),
            untagged_min_age: secs(file.untagged_min_age_secs, defaults.untagged_min_age),
            blob_grace: secs(file.blob_grace_secs, defaults.blob_grace),
            upload_max_age: secs(file.upload_max_age_secs, defaults.upload_max_age),
            event_retention: match audit.retention_days {
                Some(0) => None,
                Some(days) => Some(Duration::from_secs(days.saturating_mul(24 * 3600))),
                None => defaults.event_retention,
            },
        },
    }
}

#[cfg(test)]
mod tests;
