//! Pull-through caches. A project of kind proxy-cache mirrors a repository tree of an
//! upstream registry: `hub/library/alpine` is `library/alpine` upstream. What a client
//! pulls is fetched once, through `berth_client` over the outbound guard's HTTP client,
//! and kept in the project like pushed content (the same blob store, the same metadata,
//! the same roles and garbage collection).
//!
//! - A blob's first pull streams to the client while it is written to an anonymous spill
//!   file; every concurrent pull of that blob reads the same file as it grows (one
//!   upstream fetch for all of them), and the fetch goes on when clients leave. The last
//!   bytes are held back until the whole blob matched its digest, so a client never gets
//!   a complete-looking body with wrong bytes; only then is the blob stored.
//! - A tag is revalidated with one upstream `HEAD` at most once per `tag_ttl`; a pull by
//!   digest of cached content never goes upstream.
//! - When the upstream is unreachable or answers 5xx or 429, cached content is served
//!   stale.
//!
//! It never names HTTP: the server routes requests for proxy projects here.

mod fill;
mod settings;

pub use blobs::FETCH_QUEUE_WAIT;
pub use eviction::TOUCH_EVERY;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use berth_client::{ClientError, Credentials, RegistryClient};
use berth_meta::ProxyCacheStore;
use berth_oci::{Digest, RepoName};
use berth_outbound::OutboundPolicy;
use berth_registry::{Actor, GcOptions, Registry, RegistryError};

use fill::Fill;

/// One upstream, as configured (`[[proxy_cache]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// The project clients pull through: `<project>/<path upstream>`.
    pub project: String,
    /// Mirror base URLs, tried in order.
    pub urls: Vec<String>,
    /// Credentials for the upstream (never the client's).
    pub username: Option<String>,
    /// With `username`.
    pub password: Option<String>,
    /// How long a tag is served without asking the upstream again.
    pub tag_ttl: Duration,
    /// containerd's `?ns=` value that routes here.
    pub ns: Option<String>,
    /// Serve as docker's `registry-mirrors` endpoint.
    pub docker_mirror: bool,
    /// Upstream fetches at once; more wait their turn.
    pub max_concurrent_fetches: usize,
    /// When the upstream says this few requests remain in its rate-limit window (its
    /// `RateLimit-Remaining`), cached tags are served without asking it.
    pub rate_limit_reserve: u64,
    /// Evict the least recently pulled images while the project holds more than this.
    pub max_bytes: Option<u64>,
    /// Evict images not pulled for this long.
    pub idle: Option<Duration>,
}

impl ProxySettings {
    /// Settings for `project` mirroring `urls`, with the defaults for the rest.
    pub fn new(project: &str, urls: Vec<String>) -> Self {
        ProxySettings {
            project: project.to_owned(),
            urls,
            username: None,
            password: None,
            tag_ttl: DEFAULT_TAG_TTL,
            ns: None,
            docker_mirror: false,
            max_concurrent_fetches: 16,
            rate_limit_reserve: 0,
            max_bytes: None,
            idle: None,
        }
    }
}

/// Referrers of one subject a cache fetches at most (signatures and SBOMs number a few).
pub const MAX_REFERRERS: usize = 100;

/// Five minutes, as the issue of tags upstream is rarely faster than that.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(300);

/// Why a proxied pull failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The local side (storage, metadata, a not-found answer in domain words).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The upstream failed and nothing cached could stand in.
    #[error("upstream {project}: {message}")]
    Upstream {
        /// The proxy project.
        project: String,
        /// What went wrong, in the upstream's words (made printable by the client).
        message: String,
    },
    /// No such project.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The change clashes with what is set already.
    #[error("{0}")]
    Conflict(String),
    /// Settings given through the API that do not parse.
    #[error("{0}")]
    Invalid(String),
    /// A configuration the guard or the parser refused.
    #[error("proxy cache {project}: {message}")]
    Config {
        /// The proxy project.
        project: String,
        /// What is wrong.
        message: String,
    },
}

/// What one upstream did, as `/metrics` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamCounts {
    /// Pulls answered from the cache.
    pub hits: u64,
    /// Pulls that went to the upstream.
    pub misses: u64,
    /// Bytes fetched from the upstream.
    pub bytes_fetched: u64,
    /// Bytes of fills sent to clients.
    pub bytes_served: u64,
    /// Blob fills under way.
    pub fills_in_flight: u64,
    /// Pulls answered with cached content because the upstream failed.
    pub stale_serves: u64,
    /// What the upstream last said remains of its rate limit.
    pub rate_limit_remaining: Option<u64>,
}

/// How often stored settings are read again (how other nodes learn of API changes).
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// What one upstream did, for `/metrics`.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Pulls answered from the cache.
    pub hits: AtomicU64,
    /// Pulls that went upstream.
    pub misses: AtomicU64,
    /// Bytes fetched from the upstream.
    pub bytes_fetched: AtomicU64,
    /// Bytes of fills sent to clients.
    pub bytes_served: AtomicU64,
    /// Blob fills under way.
    pub fills_in_flight: AtomicU64,
    /// Pulls answered with cached content because the upstream failed.
    pub stale_serves: AtomicU64,
}

/// The upstreams `settings` describe, checked together (URLs through `outbound`, one
/// docker mirror at most, no `ns` twice). One in `current` with the same settings is
/// kept as it is, with its counters.
fn build_upstreams(
    settings: &[ProxySettings],
    current: &BTreeMap<String, Arc<Upstream>>,
    outbound: &OutboundPolicy,
    http: &reqwest::Client,
) -> Result<BTreeMap<String, Arc<Upstream>>, ProxyError> {
    let mut upstreams = BTreeMap::new();
    if settings.iter().filter(|s| s.docker_mirror).count() > 1 {
        return Err(ProxyError::Conflict(
            "only one proxy cache can be docker's registry mirror".to_owned(),
        ));
    }
    for settings in settings {
        let config = |message: String| ProxyError::Config {
            project: settings.project.clone(),
            message,
        };
        if let Some(ns) = &settings.ns {
            let taken = upstreams
                .values()
                .any(|u: &Arc<Upstream>| u.settings.ns.as_deref() == Some(ns.as_str()));
            if taken {
                return Err(ProxyError::Conflict(format!(
                    "{}: ns {ns:?} already routes to another project",
                    settings.project
                )));
            }
        }
        if let Some(existing) = current.get(&settings.project) {
            if existing.settings == *settings {
                upstreams.insert(settings.project.clone(), existing.clone());
                continue;
            }
        }
        if settings.urls.is_empty() {
            return Err(config("no upstream URL".to_owned()));
        }
        let credentials = match (&settings.username, &settings.password) {
            (Some(username), Some(password)) => Some(Credentials {
                username: username.clone(),
                password: password.clone(),
            }),
            (None, None) => None,
            _ => return Err(config("username and password go together".to_owned())),
        };
        let mut mirrors = Vec::new();
        for url in &settings.urls {
            let parsed = outbound
                .check_url(url)
                .map_err(|e| config(format!("{url}: {e}")))?;
            if parsed.path() != "/" || parsed.query().is_some() {
                return Err(config(format!("{url}: give the registry's base URL only")));
            }
            let host = match (parsed.host_str(), parsed.port()) {
                (Some(host), Some(port)) => format!("{host}:{port}"),
                (Some(host), None) => host.to_owned(),
                _ => return Err(config(format!("{url}: no host"))),
            };
            mirrors.push(RegistryClient::new(
                http.clone(),
                &host,
                parsed.scheme() == "http",
                credentials.clone(),
            ));
        }
        let fetches = tokio::sync::Semaphore::new(settings.max_concurrent_fetches.max(1));
        upstreams.insert(
            settings.project.clone(),
            Arc::new(Upstream {
                settings: settings.clone(),
                mirrors,
                stats: UpstreamStats::default(),
                fetches,
            }),
        );
    }
    Ok(upstreams)
}

/// One upstream and its mirrors' clients.
struct Upstream {
    settings: ProxySettings,
    mirrors: Vec<RegistryClient>,
    stats: UpstreamStats,
    fetches: tokio::sync::Semaphore,
}

/// Asks each mirror of an upstream in turn (`ask!(upstream, mirror => call)`) until one
/// answers something other than unreachable, 5xx or 429. A macro, not a method taking
/// a closure: the futures of async closures are not known to be `Send`, and handlers'
/// futures must be.
macro_rules! ask {
    ($upstream:expr, $mirror:ident => $call:expr) => {{
        let mut answer = Err(ClientError::Unreachable("no mirror configured".to_owned()));
        for $mirror in &$upstream.mirrors {
            answer = $call.await;
            if !matches!(&answer, Err(e) if upstream_down(e)) {
                break;
            }
        }
        answer
    }};
}

// After `ask!`, which they use.
mod blobs;
mod eviction;
mod manifests;

impl Upstream {
    /// The fewest requests any mirror last said remain in its rate-limit window.
    fn rate_limit_remaining(&self) -> Option<u64> {
        self.mirrors
            .iter()
            .filter_map(RegistryClient::rate_limit_remaining)
            .min()
    }

    /// Whether asking the upstream now would eat into the reserve kept for pulls of
    /// what is not cached.
    fn saving_rate_limit(&self) -> bool {
        self.rate_limit_remaining()
            .is_some_and(|left| left <= self.settings.rate_limit_reserve)
    }
}

/// The failures cached content may stand in for.
fn upstream_down(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable(_) => true,
        ClientError::Registry { status, .. } => *status >= 500 || *status == 429,
        _ => false,
    }
}

/// A fill's key: the proxy project and the blob's digest.
type FillKey = (String, Digest);

/// The pull-through caches of one node.
pub struct ProxyCache {
    registry: Registry,
    /// The collection eviction runs, so evicted images' blobs go (safely: a blob any
    /// remaining manifest references stays).
    collection: GcOptions,
    /// When each cached manifest's pull was last recorded (pulls are recorded at most
    /// every [`TOUCH_EVERY`]).
    touched: Mutex<HashMap<(String, Digest), Instant>>,
    /// The upstreams by project: the config file's, then those stored through the API.
    upstreams: RwLock<BTreeMap<String, Arc<Upstream>>>,
    /// The projects the config file names (the API cannot change them).
    configured: Vec<ProxySettings>,
    /// Where settings made through the API are kept.
    store: Option<Arc<dyn ProxyCacheStore>>,
    /// The guard upstream URLs pass, and the one HTTP client built on it.
    outbound: OutboundPolicy,
    http: reqwest::Client,
    /// Fills under way.
    fills: Arc<Mutex<HashMap<FillKey, Arc<Fill>>>>,
    /// One manifest fetch at a time per repository and reference.
    manifest_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When each cached tag was last confirmed upstream.
    validated: Mutex<HashMap<String, Instant>>,
    /// Where fills keep their bytes (anonymous files, gone when the last reader is).
    spill_dir: std::path::PathBuf,
}

impl ProxyCache {
    /// The caches `settings` (the config file's) describe; every URL must pass
    /// `outbound`, and fills spill into `spill_dir`.
    pub fn new(
        registry: Registry,
        settings: Vec<ProxySettings>,
        outbound: &OutboundPolicy,
        spill_dir: std::path::PathBuf,
    ) -> Result<ProxyCache, ProxyError> {
        let http = outbound
            .http_client(Duration::from_secs(3600), 5)
            .map_err(|e| ProxyError::Config {
                project: String::new(),
                message: e.to_string(),
            })?;
        let upstreams = build_upstreams(&settings, &BTreeMap::new(), outbound, &http)?;
        std::fs::create_dir_all(&spill_dir).map_err(|e| ProxyError::Config {
            project: String::new(),
            message: format!("{}: {e}", spill_dir.display()),
        })?;
        Ok(ProxyCache {
            registry,
            collection: GcOptions::default(),
            touched: Mutex::default(),
            upstreams: RwLock::new(upstreams),
            configured: settings,
            store: None,
            outbound: outbound.clone(),
            http,
            fills: Arc::default(),
            manifest_locks: Mutex::default(),
            validated: Mutex::default(),
            spill_dir,
        })
    }

    /// Keeps settings made through the API in `store` (and serves those already there,
    /// after [`ProxyCache::reload`]).
    pub fn with_store(mut self, store: Arc<dyn ProxyCacheStore>) -> Self {
        self.store = Some(store);
        self
    }

    fn upstream(&self, project: &str) -> Option<Arc<Upstream>> {
        self.upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(project)
            .cloned()
    }

    fn all(&self) -> Vec<Arc<Upstream>> {
        self.upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The proxy projects' names.
    pub fn projects(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|u| u.settings.project.clone())
            .collect()
    }

    /// The proxy project containerd's `?ns=<host>` names (a key into the configuration,
    /// never a host to dial).
    pub fn project_for_ns(&self, ns: &str) -> Option<String> {
        self.all()
            .into_iter()
            .find(|u| u.settings.ns.as_deref() == Some(ns))
            .map(|u| u.settings.project.clone())
    }

    /// The proxy project serving as docker's `registry-mirrors` endpoint, if one does.
    pub fn docker_mirror_project(&self) -> Option<String> {
        self.all()
            .into_iter()
            .find(|u| u.settings.docker_mirror)
            .map(|u| u.settings.project.clone())
    }

    /// Whether `project` is a proxy project.
    pub fn is_proxy_project(&self, project: &str) -> bool {
        self.upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(project)
    }

    /// Whether `repo` lives in a proxy project (where pushes are refused).
    pub fn serves(&self, repo: &RepoName) -> bool {
        self.is_proxy_project(repo.project())
    }

    /// Each upstream's counters, by project.
    pub fn counts(&self) -> Vec<(String, UpstreamCounts)> {
        self.all()
            .iter()
            .map(|u| {
                let s = &u.stats;
                (
                    u.settings.project.clone(),
                    UpstreamCounts {
                        hits: s.hits.load(Ordering::Relaxed),
                        misses: s.misses.load(Ordering::Relaxed),
                        bytes_fetched: s.bytes_fetched.load(Ordering::Relaxed),
                        bytes_served: s.bytes_served.load(Ordering::Relaxed),
                        fills_in_flight: s.fills_in_flight.load(Ordering::Relaxed),
                        stale_serves: s.stale_serves.load(Ordering::Relaxed),
                        rate_limit_remaining: u.rate_limit_remaining(),
                    },
                )
            })
            .collect()
    }

    /// Counts a pull the cache answered from what it holds.
    pub fn note_hit(&self, repo: &RepoName) {
        if let Some(upstream) = self.upstream(repo.project()) {
            upstream.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A project's settings (the password among them: callers showing them hide it) and
    /// whether the config file set them.
    pub fn settings_of(&self, project: &str) -> Option<(ProxySettings, bool)> {
        let upstream = self.upstream(project)?;
        let configured = self.configured.iter().any(|c| c.project == project);
        Some((upstream.settings.clone(), configured))
    }

    /// Whether `settings` would apply beside everything in force (URLs through the
    /// outbound guard, `ns` and docker-mirror clashes), without applying them.
    pub fn check(&self, settings: &ProxySettings) -> Result<(), ProxyError> {
        if self
            .configured
            .iter()
            .any(|c| c.project == settings.project)
        {
            return Err(ProxyError::Conflict(format!(
                "{} is a pull-through cache set in the config file",
                settings.project
            )));
        }
        let mut all: Vec<ProxySettings> = self.all().iter().map(|u| u.settings.clone()).collect();
        all.retain(|s| s.project != settings.project);
        all.push(settings.clone());
        build_upstreams(&all, &BTreeMap::new(), &self.outbound, &self.http).map(drop)
    }

    /// Makes a project a proxy cache (or changes its settings) through the API: checked
    /// as the config file's are, stored, and applied here at once (other nodes within
    /// [`RELOAD_EVERY`]). A project the config file names cannot be changed this way.
    pub async fn set(&self, settings: ProxySettings, by: &Actor) -> Result<(), ProxyError> {
        let project = settings.project.clone();
        self.check(&settings)?;
        let Some(store) = &self.store else {
            return Err(ProxyError::Config {
                project,
                message: "no store for settings made through the API".to_owned(),
            });
        };
        store
            .set_proxy_cache(&project, &settings.to_json().to_string(), by)
            .await
            .map_err(|e| match e {
                berth_meta::MetaError::NotFound(what) => ProxyError::NotFound(what),
                e => ProxyError::Registry(e.into()),
            })?;
        self.reload().await
    }

    /// Makes a project set through the API an ordinary project again (what it cached
    /// stays, and pushes are taken again); false if it was not one.
    pub async fn remove(&self, project: &str, by: &Actor) -> Result<bool, ProxyError> {
        if self.configured.iter().any(|c| c.project == project) {
            return Err(ProxyError::Conflict(format!(
                "{project} is a pull-through cache set in the config file"
            )));
        }
        let Some(store) = &self.store else {
            return Ok(false);
        };
        let removed = store
            .remove_proxy_cache(project, by)
            .await
            .map_err(|e| ProxyError::Registry(e.into()))?;
        self.reload().await?;
        Ok(removed)
    }

    /// Serves what the config file and the store say now. An upstream whose settings did
    /// not change keeps its clients and counters; a stored setting that no longer passes
    /// (the outbound guard changed) is skipped with a warning.
    pub async fn reload(&self) -> Result<(), ProxyError> {
        let mut wanted = self.configured.clone();
        if let Some(store) = &self.store {
            let stored = store
                .proxy_caches()
                .await
                .map_err(|e| ProxyError::Registry(e.into()))?;
            for (project, json) in stored {
                if wanted.iter().any(|w| w.project == project) {
                    continue;
                }
                match ProxySettings::from_json(&project, json.as_bytes()) {
                    Ok(settings) => wanted.push(settings),
                    Err(e) => {
                        tracing::warn!(%project, error = %e, "stored proxy cache settings skipped")
                    }
                }
            }
        }
        let current = self
            .upstreams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let next = match build_upstreams(&wanted, &current, &self.outbound, &self.http) {
            Ok(next) => next,
            Err(e) => {
                // One bad stored entry must not take the others down: keep the config
                // file's and each stored one that builds on its own.
                tracing::warn!(error = %e, "proxy cache settings did not all apply");
                let mut kept =
                    build_upstreams(&self.configured, &current, &self.outbound, &self.http)?;
                for settings in wanted.iter().skip(self.configured.len()) {
                    let mut with = self.configured.clone();
                    with.extend(
                        kept.values()
                            .map(|u| u.settings.clone())
                            .filter(|s| !self.configured.iter().any(|c| c.project == s.project)),
                    );
                    with.push(settings.clone());
                    if let Ok(built) = build_upstreams(&with, &current, &self.outbound, &self.http)
                    {
                        kept = built;
                    }
                }
                kept
            }
        };
        *self.upstreams.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(())
    }

    /// Reloads the stored settings every `every` (how other nodes learn of API changes).
    pub async fn run_reload(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.reload().await {
                tracing::warn!(error = %e, "reloading proxy cache settings failed");
            }
        }
    }

    /// The upstream of `repo` and the repository's path there.
    fn route(&self, repo: &RepoName) -> Option<(Arc<Upstream>, String)> {
        let upstream = self.upstream(repo.project())?;
        let path = repo.as_str().split_once('/')?.1.to_owned();
        Some((upstream, path))
    }

    fn upstream_error(upstream: &Upstream, e: ClientError) -> ProxyError {
        ProxyError::Upstream {
            project: upstream.settings.project.clone(),
            message: e.to_string(),
        }
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .manifest_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if locks.len() > 10_000 {
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        }
        locks.entry(key.to_owned()).or_default().clone()
    }

    fn fresh(&self, key: &str, ttl: Duration) -> bool {
        self.validated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .is_some_and(|at| at.elapsed() < ttl)
    }

    fn confirm(&self, key: String) {
        let mut validated = self.validated.lock().unwrap_or_else(|e| e.into_inner());
        if validated.len() > 100_000 {
            validated.clear();
        }
        validated.insert(key, Instant::now());
    }
}
