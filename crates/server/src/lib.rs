//! The HTTP edge of berth: the OCI distribution API under `/v2`, the token endpoint, the
//! admin API under `/api/v1`, `/healthz`, request logs. It parses requests, has every
//! request authenticated and authorized by [`AccessControl`] (in [`auth`]), calls the
//! [`Registry`] once per request and maps errors to OCI error JSON in one place
//! ([`error`]). It never touches SQL or files.

mod admin;
mod auth;
mod connections;
pub mod error;
mod metrics;
pub mod node;
mod proxied;
mod proxy_api;
mod replication_api;
mod repositories_api;
mod route;
mod scrape;
mod timings;
pub mod tls;
mod token;
mod ui;
mod v2;
mod webhooks;
mod zero_copy;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use berth_auth::AccessControl;
use berth_registry::{GcOptions, Registry};
use berth_webhooks::Webhooks;
use tokio::net::TcpListener;

use berth_telemetry::Tracer;
pub use connections::{fd_limit, raise_fd_limit, ConnectionLimits};
pub use scrape::{metrics_router, serve_metrics};
pub use timings::BackendTimings;
use tls::Tls;

/// What every handler shares. Each request clones it (axum's state), so it is one shared
/// pointer: a profile of manifest GETs had 6 % of the server's time in cloning and
/// dropping the fifteen handles it held directly.
#[derive(Clone)]
pub struct App {
    state: Arc<AppState>,
}

impl std::ops::Deref for App {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.state
    }
}

/// The handles and settings behind an [`App`].
#[derive(Clone)]
pub struct AppState {
    registry: Registry,
    access: AccessControl,
    gc: GcOptions,
    sendfile: bool,
    /// Served over TLS: challenges point clients at an `https://` token realm.
    secure: bool,
    metrics: Arc<metrics::Metrics>,
    /// Who may read `/metrics` on the main listener.
    metrics_access: MetricsAccess,
    webhooks: Webhooks,
    /// How long the backends take, when the node measures them.
    timings: Option<Arc<BackendTimings>>,
    /// Also export Docker Distribution's metric names.
    distribution_metrics: bool,
    /// Records traces, when an OTLP endpoint is configured.
    tracer: Option<Tracer>,
    /// Pull-through caches, when projects mirror upstreams.
    proxy: Option<Arc<berth_proxy::ProxyCache>>,
    /// Replication to and from other registries.
    replication: Option<berth_replication::Replication>,
}

/// Who may read `GET /metrics` on the main listener (a separate metrics listener, when
/// configured, is always open: it is meant for a private address).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MetricsAccess {
    /// Anyone.
    Open,
    /// System administrators (always open with `--auth none`).
    #[default]
    Administrators,
}

impl App {
    /// Wraps the domain services for the handlers; `gc` holds the configured collection
    /// settings the admin endpoint starts from.
    pub fn new(
        registry: Registry,
        access: AccessControl,
        webhooks: Webhooks,
        gc: GcOptions,
    ) -> Self {
        App {
            state: Arc::new(AppState {
                registry,
                access,
                webhooks,
                gc,
                sendfile: false,
                secure: false,
                metrics: Arc::default(),
                metrics_access: MetricsAccess::default(),
                timings: None,
                distribution_metrics: false,
                tracer: None,
                proxy: None,
                replication: None,
            }),
        }
    }

    /// Serves the proxy projects of `proxy` through their upstreams.
    pub fn with_proxy_cache(mut self, proxy: Arc<berth_proxy::ProxyCache>) -> Self {
        Arc::make_mut(&mut self.state).proxy = Some(proxy);
        self
    }

    /// Serves the replication API and reports replication's metrics.
    pub fn with_replication(mut self, replication: berth_replication::Replication) -> Self {
        Arc::make_mut(&mut self.state).replication = Some(replication);
        self
    }

    /// Records a span per request (with the stores' operations as children) and exports
    /// them through `tracer`.
    pub fn with_tracer(mut self, tracer: Option<Tracer>) -> Self {
        Arc::make_mut(&mut self.state).tracer = tracer;
        self
    }

    /// Exports the backends' timings (what the node's stores report to).
    pub fn with_backend_timings(mut self, timings: Arc<BackendTimings>) -> Self {
        Arc::make_mut(&mut self.state).timings = Some(timings);
        self
    }

    /// Also exports Docker Distribution's metric names (`registry_http_*`,
    /// `registry_storage_action_seconds`), so dashboards made for it keep working.
    pub fn with_distribution_metrics(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.state).distribution_metrics = on;
        self
    }

    /// Who may read `/metrics` on the main listener.
    pub fn with_metrics_access(mut self, access: MetricsAccess) -> Self {
        Arc::make_mut(&mut self.state).metrics_access = access;
        self
    }

    /// Sends blob files with `sendfile(2)` instead of copying them out through a read-ahead
    /// thread. It spares the server a copy per byte, which pays where clients are across a
    /// network card; on loopback and in virtual machines the copying path measured faster
    /// (the receiver then copies from buffers the sender just wrote rather than from
    /// page-cache pages: PERFORMANCE.md), so it is off by default.
    pub fn with_sendfile(mut self, on: bool) -> Self {
        Arc::make_mut(&mut self.state).sendfile = on;
        self
    }
}

/// The largest admin request body: every admin operation takes a small JSON document.
const ADMIN_BODY_LIMIT: usize = 64 * 1024;
/// The largest user import: an htpasswd file of some ten thousand users.
const IMPORT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// The body limit of an admin operation, also checked against the declared length before
/// the handler runs.
pub(crate) fn admin_body_limit(path: &str) -> usize {
    if path == "/api/v1/users/import" {
        IMPORT_BODY_LIMIT
    } else {
        ADMIN_BODY_LIMIT
    }
}

/// The HTTP surface of the registry but `/v2`, which each connection hands to
/// `v2::serve` itself (`connections::serve_http`).
pub(crate) fn router(app: App) -> Router {
    // `/v2` requests are admitted inside `v2::serve`; admin requests pass
    // `auth::api_guard`.
    let admin = Router::new()
        .route("/api/v1/gc", post(admin::run_gc))
        .route(
            "/api/v1/users",
            get(admin::list_users).post(admin::create_user),
        )
        .route(
            "/api/v1/users/import",
            post(admin::import_users).layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT)),
        )
        .route(
            "/api/v1/users/{name}",
            get(admin::get_user)
                .put(admin::update_user)
                .delete(admin::delete_user),
        )
        .route("/api/v1/users/{name}/tokens", get(admin::list_tokens))
        .route(
            "/api/v1/users/{name}/tokens/{id}",
            delete(admin::revoke_token),
        )
        .route(
            "/api/v1/projects",
            get(admin::list_projects).post(admin::create_project),
        )
        .route(
            "/api/v1/projects/{name}",
            get(admin::get_project)
                .put(admin::update_project)
                .delete(admin::delete_project),
        )
        .route(
            "/api/v1/projects/{name}/proxy-cache",
            get(proxy_api::get_proxy_cache)
                .put(proxy_api::put_proxy_cache)
                .delete(proxy_api::delete_proxy_cache),
        )
        .route(
            "/api/v1/projects/{name}/repositories",
            get(repositories_api::list_repositories),
        )
        .route(
            "/api/v1/repositories/{*name}",
            delete(repositories_api::delete_repository),
        )
        .route(
            "/api/v1/projects/{name}/members",
            get(admin::list_members).post(admin::add_member),
        )
        .route(
            "/api/v1/projects/{name}/members/{user}",
            put(admin::set_member).delete(admin::remove_member),
        )
        .route(
            "/api/v1/projects/{name}/robots",
            get(admin::list_robots).post(admin::create_robot),
        )
        .route(
            "/api/v1/projects/{name}/robots/{robot}",
            delete(admin::delete_robot).patch(admin::update_robot),
        )
        .route(
            "/api/v1/webhooks",
            get(webhooks::list_system).post(webhooks::create_system),
        )
        .route(
            "/api/v1/webhooks/{hook}",
            get(webhooks::get_system)
                .put(webhooks::change_system)
                .delete(webhooks::delete_system),
        )
        .route(
            "/api/v1/webhooks/{hook}/deliveries",
            get(webhooks::deliveries_system),
        )
        .route(
            "/api/v1/webhooks/{hook}/deliveries/{event}/redeliver",
            post(webhooks::redeliver_system),
        )
        .route(
            "/api/v1/projects/{name}/webhooks",
            get(webhooks::list_project).post(webhooks::create_project),
        )
        .route(
            "/api/v1/projects/{name}/webhooks/{hook}",
            get(webhooks::get_project)
                .put(webhooks::change_project)
                .delete(webhooks::delete_project),
        )
        .route(
            "/api/v1/projects/{name}/webhooks/{hook}/deliveries",
            get(webhooks::deliveries_project),
        )
        .route(
            "/api/v1/projects/{name}/webhooks/{hook}/deliveries/{event}/redeliver",
            post(webhooks::redeliver_project),
        )
        .route(
            "/api/v1/registries",
            get(replication_api::list_registries).post(replication_api::create_registry),
        )
        .route(
            "/api/v1/registries/{name}",
            get(replication_api::get_registry)
                .put(replication_api::put_registry)
                .delete(replication_api::delete_registry),
        )
        .route(
            "/api/v1/registries/{name}/ping",
            post(replication_api::ping_registry),
        )
        .route(
            "/api/v1/replication/policies",
            get(replication_api::list_policies).post(replication_api::create_policy),
        )
        .route(
            "/api/v1/replication/policies/{name}",
            get(replication_api::get_policy)
                .put(replication_api::put_policy)
                .delete(replication_api::delete_policy),
        )
        .route(
            "/api/v1/replication/policies/{name}/executions",
            get(replication_api::list_executions).post(replication_api::start_execution),
        )
        .route("/api/v1/audit", get(admin::audit))
        .route("/api/v1/search", get(admin::search))
        .layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth::api_guard));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(scrape::metrics_endpoint))
        .route("/readyz", get(readyz))
        .route("/token", get(token::token).post(token::token))
        .route("/api/v1/openapi.json", get(admin::openapi))
        .merge(admin)
        .merge(ui::routes(app.clone()))
        .with_state(app.clone())
        .layer(middleware::from_fn_with_state(app, access_log))
}

/// How the server meets the network: connection limits, and TLS if it terminates it.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Timeouts and the connection cap.
    pub limits: ConnectionLimits,
    /// The certificate to serve HTTPS with; plain HTTP without.
    pub tls: Option<Arc<Tls>>,
}

/// Serves on an already bound listener until `shutdown` resolves, then lets in-flight
/// requests (uploads included) finish. Taking a listener lets tests bind port 0 first.
pub async fn serve(
    listener: TcpListener,
    mut app: App,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if options.tls.is_some() {
        // The bytes must pass through rustls to be encrypted: no zero-copy path exists.
        Arc::make_mut(&mut app.state).sendfile = false;
        Arc::make_mut(&mut app.state).secure = true;
    }
    let http1_only = app.sendfile;
    let listening = connections::Listening {
        limits: options.limits,
        tls: options.tls,
        http1_only,
    };
    let registry_api = Some(app.clone());
    connections::accept_loop(listener, router(app), registry_api, listening, shutdown).await
}

/// Liveness: the process serves requests. Deliberately independent of the backends (see
/// `/readyz`): a database outage must not get every node restarted.
async fn healthz() -> Response {
    (StatusCode::OK, "ok\n").into_response()
}

/// Readiness: whether each backend answers now. `200` when both do; `503` with a retry
/// hint and which one failed otherwise, so load balancers take the node out while a store
/// is down and put it back when it returns.
async fn readyz(State(app): State<App>) -> Response {
    let (blobs, meta) = app.registry.readiness().await;
    let state = |r: &Result<(), berth_registry::RegistryError>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("unavailable: {e}"),
    };
    let body = serde_json::json!({ "blobs": state(&blobs), "metadata": state(&meta) }).to_string();
    if blobs.is_ok() && meta.is_ok() {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
    }
    tracing::warn!(%body, "not ready");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::RETRY_AFTER, error::RETRY_AFTER_SECS.to_string()),
        ],
        body,
    )
        .into_response()
}

/// One structured log line per request, and the API version header on every response.
async fn access_log(State(app): State<App>, request: Request, next: Next) -> Response {
    logged(&app, request, |request| next.run(request)).await
}

/// Answers `request` with `serve`, then logs it, counts it in the metrics, ends its span
/// and adds the API version and request id headers: what every answer gets, whether the
/// router serves it ([`access_log`]) or the connection hands it to the `/v2` API directly.
pub(crate) async fn logged<F, Fut>(app: &App, request: Request, serve: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let bytes_in = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let request_id = request_id(request.headers());
    let route = metrics::Route::of(&path);
    let span = app.tracer.as_ref().and_then(|tracer| {
        let parent = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok());
        tracer.start(parent, &format!("{method} {}", route.template()))
    });
    // A traced request's future is boxed: inline, it would double the size of every
    // request's future, traced or not.
    let mut response = match (&app.tracer, &span) {
        (Some(tracer), Some(span)) => Box::pin(tracer.in_span(span, serve(request))).await,
        _ => serve(request).await,
    };
    let (name, value) = v2::API_VERSION;
    response.headers_mut().insert(name, value);
    response
        .headers_mut()
        .insert(REQUEST_ID, request_id.clone());
    let request_id = request_id.to_str().unwrap_or("");
    let bytes_out = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let took = started.elapsed();
    let status = response.status().as_u16();
    if let (Some(tracer), Some(mut span)) = (&app.tracer, span) {
        describe_span(&mut span, &method, route, &path, &response, request_id);
        tracer.finish(span);
    }
    app.metrics.observe(
        route,
        &method,
        status,
        took,
        bytes_in.unwrap_or(0),
        bytes_out.unwrap_or(0),
    );
    let identity = response
        .extensions()
        .get::<Identity>()
        .map(|Identity(who)| who.as_str());
    tracing::info!(
        target: "berth::access",
        %method,
        path,
        status,
        bytes_in,
        bytes_out,
        duration_ms = took.as_secs_f64() * 1000.0,
        request_id,
        identity,
        "request"
    );
    response
}

/// What a request's span carries besides its name: the method, route, status, and for
/// the registry API the repository and the digest concerned.
fn describe_span(
    span: &mut berth_telemetry::Span,
    method: &axum::http::Method,
    route: metrics::Route,
    path: &str,
    response: &Response,
    request_id: &str,
) {
    use berth_telemetry::Value;
    let status = response.status().as_u16();
    span.set("http.request.method", Value::Text(method.to_string()));
    span.set("http.route", Value::Text(route.template().to_owned()));
    span.set("http.response.status_code", Value::Int(i64::from(status)));
    span.set("berth.request_id", Value::Text(request_id.to_owned()));
    if let Some(parsed) = route::V2Route::parse(path) {
        let (name, digest) = match parsed {
            route::V2Route::Tags { name }
            | route::V2Route::UploadStart { name }
            | route::V2Route::Upload { name, .. } => (Some(name), None),
            route::V2Route::Manifest { name, reference } => {
                (Some(name), reference.contains(':').then_some(reference))
            }
            route::V2Route::Blob { name, digest } | route::V2Route::Referrers { name, digest } => {
                (Some(name), Some(digest))
            }
            route::V2Route::Base | route::V2Route::Catalog => (None, None),
        };
        // Bounded: a path is a client's string.
        let bound = |text: &str| text.chars().take(256).collect::<String>();
        if let Some(name) = name {
            span.set("berth.repository", Value::Text(bound(name)));
        }
        let answered = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok());
        if let Some(digest) = answered.or(digest) {
            span.set("berth.digest", Value::Text(bound(digest)));
        }
    }
    if status >= 500 {
        span.set_error();
    }
}

/// The header a request id travels in, both ways.
const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// The id under which a request is logged: the client's `X-Request-Id` if it is a sane
/// one (at most 64 letters, digits, `.`, `_` or `-`, so that it is safe in a log line),
/// otherwise one made here (one allocation: it is made for every request). Returned in the
/// response either way.
fn request_id(headers: &header::HeaderMap) -> header::HeaderValue {
    if let Some(given) = headers.get(REQUEST_ID) {
        let bytes = given.as_bytes();
        if !bytes.is_empty()
            && bytes.len() <= 64
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return given.clone();
        }
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!(
            "{:x}",
            (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
        )
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut id = bytes::BytesMut::with_capacity(prefix.len() + 17);
    id.extend_from_slice(prefix.as_bytes());
    id.extend_from_slice(b"-");
    let _ = std::fmt::Write::write_fmt(&mut id, format_args!("{n:x}"));
    header::HeaderValue::from_maybe_shared(id.freeze())
        .unwrap_or_else(|_| header::HeaderValue::from_static("-"))
}

/// Who made the request, once authenticated: set on the response by the handlers that
/// know, read by the access log.
#[derive(Clone)]
pub(crate) struct Identity(pub(crate) String);

impl Identity {
    /// Whether the access log writes identities at all: at its default `warn` level it
    /// does not, and a `/v2` response then skips the name's copy and the extension map.
    pub(crate) fn wanted() -> bool {
        tracing::enabled!(target: "berth::access", tracing::Level::INFO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_made_here_are_unique_across_threads_and_safe_in_a_log() {
        let none = header::HeaderMap::new();
        let made: Vec<String> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..500)
                            .map(|_| request_id(&none).to_str().unwrap().to_owned())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<&String> = made.iter().collect();
        assert_eq!(distinct.len(), made.len());
        assert!(made
            .iter()
            .all(|id| id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')));
        let mut given = header::HeaderMap::new();
        given.insert(
            REQUEST_ID,
            header::HeaderValue::from_static("build-42.step_7"),
        );
        assert_eq!(request_id(&given), "build-42.step_7");
    }
}
