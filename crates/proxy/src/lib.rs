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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_client::{ClientError, Credentials, RegistryClient};
use berth_oci::{Digest, Reference, RepoName};
use berth_outbound::OutboundPolicy;
use berth_registry::{Actor, GcOptions, Registry, RegistryError, StoredManifest};
use berth_storage::ByteStream;

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

/// How often a cached manifest's pull is written down, at most.
pub const TOUCH_EVERY: Duration = Duration::from_secs(600);

/// The longest a blob fetch waits for a turn under `max_concurrent_fetches`.
pub const FETCH_QUEUE_WAIT: Duration = Duration::from_secs(60);

/// How many manifests one eviction pass looks at per project.
const EVICTION_BATCH: usize = 1000;

/// Applies `settings`' eviction policy to its project once; returns manifests deleted.
async fn evict_project(registry: &Registry, settings: &ProxySettings) -> Result<usize, ProxyError> {
    if settings.max_bytes.is_none() && settings.idle.is_none() {
        return Ok(0);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let idle_before = settings.idle.map(|idle| now_ms - idle.as_millis() as i64);
    let mut bytes = registry.project_bytes(&settings.project).await?;
    let by = Actor::system("proxy-cache-eviction");
    let mut deleted = 0;
    for candidate in registry
        .least_recently_pulled(&settings.project, EVICTION_BATCH)
        .await?
    {
        let idle = idle_before.is_some_and(|before| candidate.last_pulled_ms < before);
        let over = settings.max_bytes.is_some_and(|max| bytes > max);
        if !idle && !over {
            // Oldest first: nothing after this one is idle, and the size is within bounds.
            break;
        }
        let Ok(repo) = RepoName::parse(&candidate.repo) else {
            continue;
        };
        let reference = Reference::Digest(candidate.digest.clone());
        match registry.delete_manifest(&repo, &reference, &by).await {
            Ok(()) | Err(RegistryError::ManifestUnknown { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        bytes = bytes.saturating_sub(candidate.bytes);
        deleted += 1;
        tracing::info!(repository = %repo, digest = %candidate.digest, idle, over, "evicted from the cache");
    }
    Ok(deleted)
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

    /// Collects evicted images' blobs with `options` (the node's `[gc]` settings).
    pub fn with_collection(mut self, options: GcOptions) -> Self {
        self.collection = GcOptions {
            dry_run: false,
            ..options
        };
        self
    }

    /// Records a pull of a cached manifest, at most every [`TOUCH_EVERY`] per manifest.
    async fn note_pull(&self, repo: &RepoName, digest: &Digest) {
        let key = (repo.as_str().to_owned(), digest.clone());
        {
            let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
            if touched
                .get(&key)
                .is_some_and(|at| at.elapsed() < TOUCH_EVERY)
            {
                return;
            }
            if touched.len() > 100_000 {
                touched.clear();
            }
            touched.insert(key, Instant::now());
        }
        if let Err(e) = self.registry.touch_manifest(repo, digest).await {
            tracing::warn!(repository = %repo, %digest, error = %e, "could not record a pull");
        }
    }

    /// Whether any proxy project has an eviction policy (then `run_eviction` has work).
    pub fn evicts(&self) -> bool {
        self.upstreams
            .values()
            .any(|u| u.settings.max_bytes.is_some() || u.settings.idle.is_some())
    }

    /// Evicts, every `every`, what each project's policy says; runs until the process ends.
    pub async fn run_eviction(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = self.evict().await {
                tracing::warn!(error = %e, "proxy cache eviction failed");
            }
        }
    }

    /// One eviction pass over every proxy project with a policy: deletes the images not
    /// pulled for `idle`, then, while the project holds more than `max_bytes`, the least
    /// recently pulled; then a collection removes their blobs (a blob another image
    /// references stays). Returns how many manifests were deleted.
    pub async fn evict(&self) -> Result<usize, ProxyError> {
        let mut deleted = 0;
        for upstream in self.upstreams.values() {
            deleted += evict_project(&self.registry, &upstream.settings).await?;
        }
        if deleted > 0 {
            self.collect().await;
        }
        Ok(deleted)
    }

    async fn collect(&self) {
        match self.registry.collect_garbage(&self.collection).await {
            Ok(report) => tracing::info!(
                blobs = report.blobs_removed.len(),
                bytes = report.bytes_freed,
                "evicted images collected"
            ),
            Err(RegistryError::JobRunning { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "collecting evicted images failed"),
        }
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

    /// A manifest of a proxy repository: cached, revalidated, or fetched and cached; the
    /// pull is recorded for eviction.
    pub async fn manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest, ProxyError> {
        let manifest = self.find_manifest(repo, reference).await?;
        self.note_pull(repo, &manifest.digest).await;
        Ok(manifest)
    }

    async fn find_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest, ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            return Ok(self.registry.get_manifest(repo, reference).await?);
        };
        let stats = &upstream.stats;
        let key = format!("{repo}:{reference}");
        let cached = || async { self.registry.get_manifest(repo, reference).await.ok() };
        let tag = match reference {
            Reference::Digest(_) => None,
            Reference::Tag(tag) => Some(tag),
        };
        if let Some(local) = cached().await {
            if tag.is_none() || self.fresh(&key, upstream.settings.tag_ttl) {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(local);
            }
        }
        let lock = self.lock_for(&key);
        let _turn = lock.lock().await;
        let local = cached().await;
        if let Some(local) = &local {
            if tag.is_none() || self.fresh(&key, upstream.settings.tag_ttl) {
                stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(local.clone());
            }
        }
        if let Some(local) = &local {
            if upstream.saving_rate_limit() {
                stats.stale_serves.fetch_add(1, Ordering::Relaxed);
                return Ok(local.clone());
            }
        }
        let by = Actor::system("proxy-cache");
        let fetch = async {
            let digest = match reference {
                Reference::Digest(d) => d.clone(),
                Reference::Tag(t) => {
                    match ask!(upstream, c => c.manifest_digest(&path, t.as_str())) {
                        Ok(Some((digest, _, _))) => digest,
                        Ok(None) => return Ok(None),
                        // A HEAD without a digest: ask with a GET.
                        Err(ClientError::Protocol(_)) => {
                            let fetched = ask!(upstream, c => c.manifest(&path, t.as_str()))?;
                            fetched.digest
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if let Some(local) = &local {
                if local.digest == digest {
                    return Ok(Some((local.clone(), false)));
                }
            }
            // By digest: the client checks the bytes against it.
            let fetched = ask!(upstream, c => c.manifest(&path, digest.as_str()))?;
            Ok(Some((
                StoredManifest {
                    digest: fetched.digest,
                    media_type: fetched.media_type,
                    raw: fetched.bytes.to_vec(),
                },
                true,
            )))
        };
        match fetch.await {
            Ok(Some((manifest, fetched))) => {
                if fetched {
                    stats.misses.fetch_add(1, Ordering::Relaxed);
                    stats
                        .bytes_fetched
                        .fetch_add(manifest.raw.len() as u64, Ordering::Relaxed);
                    self.registry
                        .cache_manifest(
                            repo,
                            tag,
                            Some(&manifest.media_type),
                            manifest.raw.clone(),
                            &by,
                        )
                        .await?;
                } else {
                    stats.hits.fetch_add(1, Ordering::Relaxed);
                }
                if tag.is_some() {
                    self.confirm(key);
                }
                Ok(manifest)
            }
            Ok(None) => Err(RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            }
            .into()),
            Err(e) if upstream_down(&e) => match local {
                Some(local) => {
                    tracing::warn!(repository = %repo, reference = %reference, error = %e, "upstream down: serving the cached manifest");
                    stats.stale_serves.fetch_add(1, Ordering::Relaxed);
                    Ok(local)
                }
                None => Err(Self::upstream_error(upstream, e)),
            },
            Err(ClientError::NotFound(_)) => Err(RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            }
            .into()),
            Err(e) => Err(Self::upstream_error(upstream, e)),
        }
    }

    /// What a manifest `HEAD` answers: digest, media type and size. Cached content as
    /// [`ProxyCache::manifest`] serves it; otherwise the upstream's own `HEAD`, so a
    /// client's `HEAD` never becomes a `GET` upstream (registries that ration pulls count
    /// GETs).
    pub async fn manifest_head(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(Digest, String, u64), ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            let m = self.registry.get_manifest(repo, reference).await?;
            return Ok((m.digest, m.media_type, m.raw.len() as u64));
        };
        let key = format!("{repo}:{reference}");
        let local = self.registry.get_manifest(repo, reference).await.ok();
        let of = |m: &StoredManifest| (m.digest.clone(), m.media_type.clone(), m.raw.len() as u64);
        if let Some(local) = &local {
            let fresh = matches!(reference, Reference::Digest(_))
                || self.fresh(&key, upstream.settings.tag_ttl)
                || upstream.saving_rate_limit();
            if fresh {
                upstream.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(of(local));
            }
        }
        let asked = reference.to_string();
        match ask!(upstream, c => c.manifest_digest(&path, &asked)) {
            Ok(Some((digest, media_type, size))) => {
                if let Some(local) = local.filter(|l| l.digest == digest) {
                    if matches!(reference, Reference::Tag(_)) {
                        self.confirm(key);
                    }
                    upstream.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(of(&local));
                }
                match size {
                    Some(size) => Ok((digest, media_type, size)),
                    // No length said: fetch (and cache) it to know.
                    None => self.manifest(repo, reference).await.map(|m| of(&m)),
                }
            }
            Ok(None) | Err(ClientError::NotFound(_)) => Err(RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            }
            .into()),
            Err(e) if upstream_down(&e) => match local {
                Some(local) => {
                    upstream.stats.stale_serves.fetch_add(1, Ordering::Relaxed);
                    Ok(of(&local))
                }
                None => Err(Self::upstream_error(upstream, e)),
            },
            Err(e) => Err(Self::upstream_error(upstream, e)),
        }
    }

    /// Brings the cache's referrers of `subject` up to date with the upstream's (at most
    /// once per tag TTL per subject, and the first [`MAX_REFERRERS`] of them): each
    /// referrer manifest not cached yet is fetched by digest and cached, so the listing
    /// the registry answers from includes it. An upstream that fails leaves the cached
    /// listing as it is.
    pub async fn sync_referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
    ) -> Result<(), ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            return Ok(());
        };
        let key = format!("referrers {repo}@{subject}");
        if self.fresh(&key, upstream.settings.tag_ttl) || upstream.saving_rate_limit() {
            return Ok(());
        }
        let lock = self.lock_for(&key);
        let _turn = lock.lock().await;
        if self.fresh(&key, upstream.settings.tag_ttl) {
            return Ok(());
        }
        let listed = match ask!(upstream, c => c.referrers(&path, subject)) {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(repository = %repo, %subject, error = %e, "upstream referrers unavailable: answering from the cache");
                return Ok(());
            }
        };
        let by = Actor::system("proxy-cache");
        for descriptor in listed.iter().take(MAX_REFERRERS) {
            let Some(digest) = descriptor["digest"]
                .as_str()
                .and_then(|d| Digest::parse(d).ok())
            else {
                continue;
            };
            let reference = Reference::Digest(digest.clone());
            if self.registry.get_manifest(repo, &reference).await.is_ok() {
                continue;
            }
            let fetched = ask!(upstream, c => c.manifest(&path, digest.as_str()));
            match fetched {
                Ok(m) => {
                    upstream.stats.misses.fetch_add(1, Ordering::Relaxed);
                    self.registry
                        .cache_manifest(repo, None, Some(&m.media_type), m.bytes.to_vec(), &by)
                        .await?;
                }
                Err(e) => {
                    tracing::warn!(repository = %repo, %digest, error = %e, "a referrer could not be fetched");
                }
            }
        }
        self.confirm(key);
        Ok(())
    }

    /// The size of a blob the cache does not hold, from an upstream `HEAD` (never a GET).
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64, ProxyError> {
        let unknown = || {
            ProxyError::Registry(RegistryError::BlobUnknown {
                digest: digest.clone(),
            })
        };
        let Some((upstream, path)) = self.route(repo) else {
            return Err(unknown());
        };
        match ask!(upstream, c => c.blob_size(&path, digest)) {
            Ok(Some(size)) => Ok(size),
            Ok(None) | Err(ClientError::NotFound(_)) => Err(unknown()),
            Err(e) => Err(Self::upstream_error(upstream, e)),
        }
    }

    /// A range of a blob the cache does not hold, asked of the upstream as the client
    /// asked it (`bytes=…`): its `Content-Range`, length and bytes, or `None` when the
    /// blob is being filled or the upstream answers ranges with the whole blob (then the
    /// whole blob is served, through a fill).
    pub async fn blob_range(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: &str,
    ) -> Result<Option<(String, u64, ByteStream)>, ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            return Ok(None);
        };
        let filling = self
            .fills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(upstream.settings.project.clone(), digest.clone()));
        if filling {
            return Ok(None);
        }
        match ask!(upstream, c => c.blob_range(&path, digest, range)) {
            Ok(Some((content_range, length, stream))) => {
                upstream.stats.misses.fetch_add(1, Ordering::Relaxed);
                let counted = upstream.clone();
                let stream = futures_util::StreamExt::map(stream, move |chunk| {
                    let chunk = chunk.map_err(std::io::Error::other)?;
                    counted
                        .stats
                        .bytes_fetched
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    Ok(chunk)
                });
                Ok(Some((content_range, length, Box::pin(stream))))
            }
            Ok(None) => Ok(None),
            Err(ClientError::NotFound(_)) => Err(RegistryError::BlobUnknown {
                digest: digest.clone(),
            }
            .into()),
            Err(e) => Err(Self::upstream_error(upstream, e)),
        }
    }

    /// A blob the cache does not hold yet: its size and its bytes as they arrive from the
    /// one fill of it under way (started here if there is none).
    pub async fn blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(u64, ByteStream), ProxyError> {
        let Some((upstream, path)) = self.route(repo) else {
            return Err(RegistryError::BlobUnknown {
                digest: digest.clone(),
            }
            .into());
        };
        let key = (upstream.settings.project.clone(), digest.clone());
        let fill = {
            let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
            match fills.get(&key) {
                Some(fill) => fill.clone(),
                None => {
                    let file = tempfile::tempfile_in(&self.spill_dir).map_err(|e| {
                        ProxyError::Registry(berth_storage::StorageError::Io(e).into())
                    })?;
                    let fill = Arc::new(Fill::new(file));
                    fills.insert(key.clone(), fill.clone());
                    upstream.stats.misses.fetch_add(1, Ordering::Relaxed);
                    self.start_fill(upstream.clone(), path, repo.clone(), key, fill.clone());
                    fill
                }
            }
        };
        let size = fill.size().await.map_err(|e| match e {
            ClientError::NotFound(_) => ProxyError::Registry(RegistryError::BlobUnknown {
                digest: digest.clone(),
            }),
            e => Self::upstream_error(upstream, e),
        })?;
        let stats = upstream.clone();
        let counted = fill.reader(move |n| {
            stats.stats.bytes_served.fetch_add(n, Ordering::Relaxed);
        });
        Ok((size, counted))
    }

    /// Fetches `key`'s blob into `fill` on a task of its own (it outlives the request
    /// that started it), then stores it in `repo` and forgets the fill.
    fn start_fill(
        &self,
        upstream: Arc<Upstream>,
        path: String,
        repo: RepoName,
        key: FillKey,
        fill: Arc<Fill>,
    ) {
        let registry = self.registry.clone();
        let fills = self.fills.clone();
        let collection = self.collection.clone();
        tokio::spawn(async move {
            let stats = &upstream.stats;
            stats.fills_in_flight.fetch_add(1, Ordering::Relaxed);
            let digest = key.1.clone();
            let fetched = async {
                // Waiting for a turn is bounded: past it the pull fails rather than
                // queueing without end behind a slow upstream.
                let turn = tokio::time::timeout(FETCH_QUEUE_WAIT, upstream.fetches.acquire()).await;
                let _turn = match turn {
                    Ok(permit) => permit.ok(),
                    Err(_) => {
                        let e = ClientError::Unreachable(format!(
                            "{} fetches from this upstream are under way; waited {} s for a turn",
                            upstream.settings.max_concurrent_fetches,
                            FETCH_QUEUE_WAIT.as_secs()
                        ));
                        fill.fail(&e);
                        return Err(e);
                    }
                };
                let (size, stream) = match ask!(upstream, c => c.fetch_blob(&path, &digest)) {
                    Ok(answer) => answer,
                    Err(e) => {
                        fill.fail(&e);
                        return Err(e);
                    }
                };
                fill.run(size, stream, |n| {
                    stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
                })
                .await
            }
            .await;
            match fetched {
                Ok(size) => {
                    let by = Actor::system("proxy-cache");
                    let stored = match fill.contents(size) {
                        Ok(body) => registry
                            .push_blob(&repo, &digest, body, &by)
                            .await
                            .map(|_| ()),
                        Err(e) => Err(berth_storage::StorageError::Io(e).into()),
                    };
                    if let Err(e) = stored {
                        tracing::warn!(repository = %repo, %digest, error = %e, "a fetched blob could not be cached");
                    }
                    if let Some(max) = upstream.settings.max_bytes {
                        let over = registry
                            .project_bytes(&upstream.settings.project)
                            .await
                            .is_ok_and(|bytes| bytes > max);
                        if over {
                            match evict_project(&registry, &upstream.settings).await {
                                Ok(0) => {}
                                Ok(_) => {
                                    if let Err(e) = registry.collect_garbage(&collection).await {
                                        tracing::warn!(error = %e, "collecting evicted images failed");
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "proxy cache eviction failed"),
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(repository = %repo, %digest, error = %e, "fetching a blob from upstream failed");
                }
            }
            fills.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            stats.fills_in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
