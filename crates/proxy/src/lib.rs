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

pub use blobs::FETCH_QUEUE_WAIT;
pub use eviction::TOUCH_EVERY;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_client::{ClientError, Credentials, RegistryClient};
use berth_oci::{Digest, RepoName};
use berth_outbound::OutboundPolicy;
use berth_registry::{GcOptions, Registry, RegistryError};

use fill::Fill;

/// One upstream, as configured (`[[proxy_cache]]`).
#[derive(Debug, Clone)]
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
    /// A configuration the guard or the parser refused.
    #[error("proxy cache {project}: {message}")]
    Config {
        /// The proxy project.
        project: String,
        /// What is wrong.
        message: String,
    },
}

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
    upstreams: BTreeMap<String, Arc<Upstream>>,
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
    /// The caches `settings` describe; every URL must pass `outbound`, and fills spill
    /// into `spill_dir`.
    pub fn new(
        registry: Registry,
        settings: Vec<ProxySettings>,
        outbound: &OutboundPolicy,
        spill_dir: std::path::PathBuf,
    ) -> Result<ProxyCache, ProxyError> {
        let mut upstreams = BTreeMap::new();
        if settings.iter().filter(|s| s.docker_mirror).count() > 1 {
            return Err(ProxyError::Config {
                project: String::new(),
                message: "only one proxy cache can be docker's registry mirror".to_owned(),
            });
        }
        for settings in settings {
            if let Some(ns) = &settings.ns {
                let taken = upstreams
                    .values()
                    .any(|u: &Arc<Upstream>| u.settings.ns.as_deref() == Some(ns.as_str()));
                if taken {
                    return Err(ProxyError::Config {
                        project: settings.project.clone(),
                        message: format!("ns {ns:?} routes to two projects"),
                    });
                }
            }
            let config = |message: String| ProxyError::Config {
                project: settings.project.clone(),
                message,
            };
            if settings.urls.is_empty() {
                return Err(config("no upstream URL".to_owned()));
            }
            let http = outbound
                .http_client(Duration::from_secs(3600), 5)
                .map_err(|e| config(e.to_string()))?;
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
                    settings,
                    mirrors,
                    stats: UpstreamStats::default(),
                    fetches,
                }),
            );
        }
        std::fs::create_dir_all(&spill_dir).map_err(|e| ProxyError::Config {
            project: String::new(),
            message: format!("{}: {e}", spill_dir.display()),
        })?;
        Ok(ProxyCache {
            registry,
            collection: GcOptions::default(),
            touched: Mutex::default(),
            upstreams,
            fills: Arc::default(),
            manifest_locks: Mutex::default(),
            validated: Mutex::default(),
            spill_dir,
        })
    }

    /// The proxy projects' names.
    pub fn projects(&self) -> impl Iterator<Item = &str> {
        self.upstreams.keys().map(String::as_str)
    }

    /// The proxy project containerd's `?ns=<host>` names (a key into the configuration,
    /// never a host to dial).
    pub fn project_for_ns(&self, ns: &str) -> Option<&str> {
        self.upstreams
            .values()
            .find(|u| u.settings.ns.as_deref() == Some(ns))
            .map(|u| u.settings.project.as_str())
    }

    /// The proxy project serving as docker's `registry-mirrors` endpoint, if one does.
    pub fn docker_mirror_project(&self) -> Option<&str> {
        self.upstreams
            .values()
            .find(|u| u.settings.docker_mirror)
            .map(|u| u.settings.project.as_str())
    }

    /// Whether `project` is a proxy project.
    pub fn is_proxy_project(&self, project: &str) -> bool {
        self.upstreams.contains_key(project)
    }

    /// Whether `repo` lives in a proxy project (where pushes are refused).
    pub fn serves(&self, repo: &RepoName) -> bool {
        self.upstreams.contains_key(repo.project())
    }

    /// Each upstream's counters, by project.
    pub fn stats(&self) -> impl Iterator<Item = (&str, &UpstreamStats)> {
        self.upstreams
            .iter()
            .map(|(project, upstream)| (project.as_str(), &upstream.stats))
    }

    /// What each upstream last said remains of its rate limit, by project.
    pub fn rate_limits(&self) -> impl Iterator<Item = (&str, Option<u64>)> {
        self.upstreams
            .iter()
            .map(|(project, upstream)| (project.as_str(), upstream.rate_limit_remaining()))
    }

    /// Counts a pull the cache answered from what it holds.
    pub fn note_hit(&self, repo: &RepoName) {
        if let Some(upstream) = self.upstreams.get(repo.project()) {
            upstream.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The upstream of `repo` and the repository's path there.
    fn route(&self, repo: &RepoName) -> Option<(&Arc<Upstream>, String)> {
        let upstream = self.upstreams.get(repo.project())?;
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
