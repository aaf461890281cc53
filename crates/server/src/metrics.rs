//! Prometheus metrics, in the text exposition format, written by hand (no client library:
//! a few fixed families of atomics need none).
//!
//! Labels are bounded by construction: a route is one of [`Route`]'s templates, never a
//! path or a repository name; a method one of seven words; a status its class. Counting a
//! request is a handful of relaxed atomic increments in the access-log middleware.
//! Gauges that cost a query (what is stored) are read at scrape time and cached for
//! [`STORE_STATS_TTL`], so a scraper polling every few seconds costs the database one
//! count a minute.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::Method;
use berth_registry::StoreCounts as StoreStatistics;

use crate::route::V2Route;

/// How long the counts of what is stored are reused between scrapes.
const STORE_STATS_TTL: Duration = Duration::from_secs(60);

/// Request duration histogram bounds, in seconds.
pub(crate) const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// What a request addressed: the label set of every HTTP metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Base,
    Catalog,
    Tags,
    Manifest,
    Blob,
    UploadStart,
    Upload,
    Referrers,
    Token,
    Api,
    Health,
    Metrics,
    Other,
}

const ROUTES: [(Route, &str); 13] = [
    (Route::Base, "/v2/"),
    (Route::Catalog, "/v2/_catalog"),
    (Route::Tags, "/v2/{name}/tags/list"),
    (Route::Manifest, "/v2/{name}/manifests/{reference}"),
    (Route::Blob, "/v2/{name}/blobs/{digest}"),
    (Route::UploadStart, "/v2/{name}/blobs/uploads/"),
    (Route::Upload, "/v2/{name}/blobs/uploads/{id}"),
    (Route::Referrers, "/v2/{name}/referrers/{digest}"),
    (Route::Token, "/token"),
    (Route::Api, "/api/v1"),
    (Route::Health, "/healthz,/readyz"),
    (Route::Metrics, "/metrics"),
    (Route::Other, "other"),
];

const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "other"];

impl Route {
    /// The template a path falls under.
    pub(crate) fn of(path: &str) -> Route {
        if let Some(route) = V2Route::parse(path) {
            return match route {
                V2Route::Base => Route::Base,
                V2Route::Catalog => Route::Catalog,
                V2Route::Tags { .. } => Route::Tags,
                V2Route::Manifest { .. } => Route::Manifest,
                V2Route::Blob { .. } => Route::Blob,
                V2Route::UploadStart { .. } => Route::UploadStart,
                V2Route::Upload { .. } => Route::Upload,
                V2Route::Referrers { .. } => Route::Referrers,
            };
        }
        match path {
            "/token" => Route::Token,
            "/healthz" | "/readyz" => Route::Health,
            "/metrics" => Route::Metrics,
            p if p.starts_with("/api/v1/") => Route::Api,
            _ => Route::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The route's template, as labels and span names show it.
    pub(crate) fn template(self) -> &'static str {
        ROUTES[self.index()].1
    }

    /// Docker Distribution's name for the route, for its metric names.
    fn distribution_handler(self) -> Option<&'static str> {
        match self {
            Route::Base => Some("base"),
            Route::Catalog => Some("catalog"),
            Route::Tags => Some("tags"),
            Route::Manifest => Some("manifest"),
            Route::Blob => Some("blob"),
            Route::UploadStart => Some("blob-upload"),
            Route::Upload => Some("blob-upload-chunk"),
            Route::Referrers => Some("referrers"),
            Route::Token | Route::Api | Route::Health | Route::Metrics | Route::Other => None,
        }
    }
}

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::PUT => 2,
        Method::POST => 3,
        Method::PATCH => 4,
        Method::DELETE => 5,
        _ => 6,
    }
}

/// Durations of one route's requests (or one backend action's).
#[derive(Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Counts one duration.
    pub(crate) fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Some(b) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Adds `other`'s counts to this one's.
    pub(crate) fn add(&self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter().zip(&other.buckets) {
            mine.fetch_add(theirs.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.count
            .fetch_add(other.count.load(Ordering::Relaxed), Ordering::Relaxed);
        self.sum_micros
            .fetch_add(other.sum_micros.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Writes the histogram's samples as `name` with `labels` (`a="b",c="d"`); nothing if
    /// it counted nothing.
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let count = self.count.load(Ordering::Relaxed);
        if count == 0 {
            return;
        }
        let mut cumulative = 0;
        for (b, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[b].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Per-route request counts, durations and bytes, in one shard per worker thread (up to
/// [`SHARDS`]): the hot path increments its own thread's counters, so two cores serving
/// the same route never bounce a cache line between them; a scrape sums the shards.
pub(crate) struct Metrics {
    shards: Vec<Shard>,
    store: Mutex<Option<(Instant, StoreStatistics)>>,
    started: SystemTime,
}

/// Shards of counters: more than the worker threads of any machine berth runs on well.
pub(crate) const SHARDS: usize = 16;

/// One thread's counters, aligned so that neighbours do not share a cache line.
#[repr(align(128))]
struct Shard {
    /// `[route][method][status class 1..=5]`.
    requests: Vec<AtomicU64>,
    durations: Vec<Histogram>,
    bytes_in: Vec<AtomicU64>,
    bytes_out: Vec<AtomicU64>,
}

impl Default for Shard {
    fn default() -> Self {
        let routes = ROUTES.len();
        Shard {
            requests: (0..routes * METHODS.len() * 5)
                .map(|_| AtomicU64::new(0))
                .collect(),
            durations: (0..routes).map(|_| Histogram::default()).collect(),
            bytes_in: (0..routes).map(|_| AtomicU64::new(0)).collect(),
            bytes_out: (0..routes).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            store: Mutex::new(None),
            started: SystemTime::now(),
        }
    }
}

/// This thread's shard number, handed out in turn on first use.
pub(crate) fn shard_index() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static INDEX: usize = (NEXT.fetch_add(1, Ordering::Relaxed) as usize) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// The sum of one counter over every shard.
fn total(shards: &[Shard], pick: impl Fn(&Shard) -> &AtomicU64) -> u64 {
    shards.iter().map(|s| pick(s).load(Ordering::Relaxed)).sum()
}

impl Metrics {
    /// Counts one answered request.
    pub(crate) fn observe(
        &self,
        route: Route,
        method: &Method,
        status: u16,
        took: Duration,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let shard = &self.shards[shard_index()];
        let r = route.index();
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        let slot = (r * METHODS.len() + method_index(method)) * 5 + class;
        shard.requests[slot].fetch_add(1, Ordering::Relaxed);
        let h = &shard.durations[r];
        let seconds = took.as_secs_f64();
        if let Some(b) = BUCKETS.iter().position(|bound| seconds <= *bound) {
            h.buckets[b].fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if bytes_in > 0 {
            shard.bytes_in[r].fetch_add(bytes_in, Ordering::Relaxed);
        }
        if bytes_out > 0 {
            shard.bytes_out[r].fetch_add(bytes_out, Ordering::Relaxed);
        }
    }

    /// The counts of what is stored, from the cache or (when stale) from `fetch`.
    pub(crate) async fn store_statistics<F, Fut>(&self, fetch: F) -> Option<StoreStatistics>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Option<StoreStatistics>>,
    {
        if let Some((at, stats)) = self.store.lock().ok().and_then(|s| *s) {
            if at.elapsed() < STORE_STATS_TTL {
                return Some(stats);
            }
        }
        let fresh = fetch().await?;
        if let Ok(mut cache) = self.store.lock() {
            *cache = Some((Instant::now(), fresh));
        }
        Some(fresh)
    }

    /// Every non-zero request count: route, method, status class (1–5), count.
    fn request_counts(&self) -> Vec<(Route, &'static str, usize, u64)> {
        let mut counts = Vec::new();
        for (route, _) in ROUTES {
            for (m, method) in METHODS.iter().enumerate() {
                for class in 0..5 {
                    let slot = (route.index() * METHODS.len() + m) * 5 + class;
                    let n = total(&self.shards, |s| &s.requests[slot]);
                    if n > 0 {
                        counts.push((route, *method, class + 1, n));
                    }
                }
            }
        }
        counts
    }

    /// One route's durations, summed over the shards.
    fn durations(&self, route: Route) -> Histogram {
        let merged = Histogram::default();
        for shard in &self.shards {
            merged.add(&shard.durations[route.index()]);
        }
        merged
    }

    /// The HTTP families and the process's own, in the text format.
    pub(crate) fn render_http(&self, out: &mut String) {
        family(
            out,
            "berth_http_requests_total",
            "counter",
            "HTTP requests answered, by route template, method and status class.",
        );
        for (route, method, class, n) in self.request_counts() {
            let template = route.template();
            let _ = writeln!(
                out,
                "berth_http_requests_total{{route=\"{template}\",method=\"{method}\",code=\"{class}xx\"}} {n}"
            );
        }
        family(
            out,
            "berth_http_request_duration_seconds",
            "histogram",
            "Time from the request head to the response head, by route template.",
        );
        for (route, template) in ROUTES {
            self.durations(route).render(
                out,
                "berth_http_request_duration_seconds",
                &format!("route=\"{template}\""),
            );
        }
        for (name, help, inbound) in [
            (
                "berth_http_request_bytes_total",
                "Request body bytes declared by Content-Length, by route template.",
                true,
            ),
            (
                "berth_http_response_bytes_total",
                "Response body bytes declared by Content-Length, by route template.",
                false,
            ),
        ] {
            family(out, name, "counter", help);
            for (route, template) in ROUTES {
                let r = route.index();
                let n = total(&self.shards, |s| {
                    if inbound {
                        &s.bytes_in[r]
                    } else {
                        &s.bytes_out[r]
                    }
                });
                if n > 0 {
                    let _ = writeln!(out, "{name}{{route=\"{template}\"}} {n}");
                }
            }
        }
        render_process(out, self.started);
    }
}

impl Metrics {
    /// The HTTP families under Docker Distribution's names, so its dashboards keep
    /// working: `handler` is Distribution's route name, `code` the status class (`2xx`,
    /// which `code=~"5.."` still matches), and the duration histogram is per handler only.
    pub(crate) fn render_distribution(&self, out: &mut String) {
        family(
            out,
            "registry_http_requests_total",
            "counter",
            "HTTP requests, under Docker Distribution's name.",
        );
        for (route, method, class, n) in self.request_counts() {
            let Some(handler) = route.distribution_handler() else {
                continue;
            };
            let method = method.to_ascii_lowercase();
            let _ = writeln!(
                out,
                "registry_http_requests_total{{handler=\"{handler}\",code=\"{class}xx\",method=\"{method}\"}} {n}"
            );
        }
        family(
            out,
            "registry_http_request_duration_seconds",
            "histogram",
            "HTTP request durations, under Docker Distribution's name.",
        );
        for (route, _) in ROUTES {
            let Some(handler) = route.distribution_handler() else {
                continue;
            };
            self.durations(route).render(
                out,
                "registry_http_request_duration_seconds",
                &format!("handler=\"{handler}\""),
            );
        }
    }
}

/// Writes a family's `HELP` and `TYPE` lines.
pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes one unlabelled sample, with its family lines.
pub(crate) fn sample(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// Resident memory, descriptors and CPU time, from `/proc/self` (Linux; absent elsewhere).
fn render_process(out: &mut String, started: SystemTime) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(rss) = kib("VmRSS:") {
        sample(
            out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory.",
            rss * 1024,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        sample(
            out,
            "process_open_fds",
            "gauge",
            "Open file descriptors.",
            fds.count(),
        );
    }
    sample(
        out,
        "process_max_fds",
        "gauge",
        "The descriptor limit.",
        crate::connections::fd_limit(),
    );
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th, stime the 15th.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    if let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) {
        if let (Ok(u), Ok(s)) = (u.parse::<u64>(), s.parse::<u64>()) {
            // Linux reports in clock ticks of 1/100 s on every architecture berth runs on.
            sample(
                out,
                "process_cpu_seconds_total",
                "counter",
                "CPU time, user and system.",
                (u + s) as f64 / 100.0,
            );
        }
    }
    let start = started
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    sample(
        out,
        "process_start_time_seconds",
        "gauge",
        "When the process started (Unix time).",
        start,
    );
}

/// Webhook delivery and how far each event-log consumer lags: the senders' counters are
/// this node's; the backlog is counted by whichever node delivers (0 elsewhere).
pub(crate) async fn render_webhooks(out: &mut String, webhooks: &berth_webhooks::Webhooks) {
    let c = webhooks.counters();
    family(
        out,
        "berth_webhook_deliveries_total",
        "counter",
        "Webhook deliveries finished by this node, by outcome (failed: given up after the retry horizon).",
    );
    let _ = writeln!(
        out,
        "berth_webhook_deliveries_total{{outcome=\"delivered\"}} {}",
        c.delivered()
    );
    let _ = writeln!(
        out,
        "berth_webhook_deliveries_total{{outcome=\"failed\"}} {}",
        c.failed()
    );
    sample(
        out,
        "berth_webhook_attempt_failures_total",
        "counter",
        "Delivery attempts that got no 2xx (every retry counts).",
        c.attempt_failures(),
    );
    sample(
        out,
        "berth_webhook_pending",
        "gauge",
        "Deliveries waiting to be sent (counted by the node that delivers).",
        c.pending(),
    );
    let oldest = c.oldest_pending_ms();
    let age = if oldest > 0 {
        (berth_auth::time::now_ms() - oldest).max(0) as f64 / 1000.0
    } else {
        0.0
    };
    sample(
        out,
        "berth_webhook_oldest_pending_age_seconds",
        "gauge",
        "How long the oldest waiting delivery has waited.",
        age,
    );
    sample(
        out,
        "berth_webhook_sender_leading",
        "gauge",
        "1 if this node runs the webhook deliveries.",
        u8::from(c.leading()),
    );
    family(
        out,
        "berth_webhook_delivery_latency_seconds",
        "histogram",
        "From the change's commit to the receiver's 2xx.",
    );
    let (buckets, sum_ms) = c.latency();
    let mut cumulative = 0;
    for (bound, n) in berth_webhooks::LATENCY_BUCKETS_MS.iter().zip(buckets) {
        cumulative += n;
        let _ = writeln!(
            out,
            "berth_webhook_delivery_latency_seconds_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1000.0
        );
    }
    let _ = writeln!(
        out,
        "berth_webhook_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
    );
    let _ = writeln!(
        out,
        "berth_webhook_delivery_latency_seconds_sum {}",
        sum_ms as f64 / 1000.0
    );
    let _ = writeln!(
        out,
        "berth_webhook_delivery_latency_seconds_count {cumulative}"
    );
    if let Ok(lags) = webhooks.consumer_lag().await {
        family(
            out,
            "berth_event_consumer_lag_events",
            "gauge",
            "Events recorded that a consumer of the event log has not read yet.",
        );
        for (consumer, lag) in lags {
            // Consumer names are the registry's own (webhooks, replication), never a client's.
            let _ = writeln!(
                out,
                "berth_event_consumer_lag_events{{consumer=\"{consumer}\"}} {lag}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_templates_never_names() {
        assert_eq!(Route::of("/v2/"), Route::Base);
        assert_eq!(Route::of("/v2/a/b/manifests/latest"), Route::Manifest);
        assert_eq!(Route::of("/v2/a/blobs/uploads/"), Route::UploadStart);
        assert_eq!(Route::of("/v2/a/blobs/uploads/xyz"), Route::Upload);
        assert_eq!(Route::of("/api/v1/users/alice"), Route::Api);
        assert_eq!(Route::of("/etc/passwd"), Route::Other);
        let m = Metrics::default();
        m.observe(
            Route::Manifest,
            &Method::GET,
            200,
            Duration::from_millis(2),
            0,
            500,
        );
        m.observe(
            Route::Manifest,
            &Method::GET,
            404,
            Duration::from_millis(40),
            0,
            0,
        );
        m.observe(
            Route::Other,
            &Method::from_bytes(b"BREW").unwrap(),
            405,
            Duration::ZERO,
            0,
            0,
        );
        let mut out = String::new();
        m.render_http(&mut out);
        assert!(out.contains("berth_http_requests_total{route=\"/v2/{name}/manifests/{reference}\",method=\"GET\",code=\"2xx\"} 1"), "{out}");
        assert!(out.contains("code=\"4xx\"} 1"));
        assert!(out.contains("route=\"other\",method=\"other\",code=\"4xx\""));
        assert!(out.contains("berth_http_request_duration_seconds_bucket{route=\"/v2/{name}/manifests/{reference}\",le=\"0.0025\"} 1"));
        assert!(out.contains("berth_http_request_duration_seconds_count{route=\"/v2/{name}/manifests/{reference}\"} 2"));
        assert!(out.contains(
            "berth_http_response_bytes_total{route=\"/v2/{name}/manifests/{reference}\"} 500"
        ));
    }
}
