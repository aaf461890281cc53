//! The HTTP edge of berth: the OCI distribution API under `/v2`, the token endpoint, the
//! admin API under `/api/v1`, `/healthz`, request logs. It parses requests, has every
//! request authenticated and authorized by [`AccessControl`] (in [`auth`]), calls the
//! [`Registry`] once per request and maps errors to OCI error JSON in one place
//! ([`error`]). It never touches SQL or files.

mod admin;
mod auth;
mod connections;
pub mod error;
pub mod node;
mod route;
pub mod tls;
mod token;
mod v2;
mod zero_copy;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post, put};
use axum::Router;
use berth_auth::AccessControl;
use berth_registry::{GcOptions, Registry};
use tokio::net::TcpListener;

pub use connections::{fd_limit, raise_fd_limit, ConnectionLimits};
use tls::Tls;

/// What every handler shares.
#[derive(Clone)]
pub struct App {
    registry: Registry,
    access: AccessControl,
    gc: GcOptions,
    sendfile: bool,
    /// Served over TLS: challenges point clients at an `https://` token realm.
    secure: bool,
}

impl App {
    /// Wraps the domain services for the handlers; `gc` holds the configured collection
    /// settings the admin endpoint starts from.
    pub fn new(registry: Registry, access: AccessControl, gc: GcOptions) -> Self {
        App {
            registry,
            access,
            gc,
            sendfile: false,
            secure: false,
        }
    }

    /// Sends blob files with `sendfile(2)` instead of copying them out through a read-ahead
    /// thread. It spares the server a copy per byte, which pays where clients are across a
    /// network card; on loopback and in virtual machines the copying path measured faster
    /// (the receiver then copies from buffers the sender just wrote rather than from
    /// page-cache pages: PERFORMANCE.md), so it is off by default.
    pub fn with_sendfile(mut self, on: bool) -> Self {
        self.sendfile = on;
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

/// The full HTTP surface of the registry.
pub fn router(app: App) -> Router {
    // `/v2` requests are admitted inside `v2::dispatch` (no middleware on the hot path);
    // admin requests pass `auth::api_guard`.
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
            delete(admin::delete_robot),
        )
        .route("/api/v1/audit", get(admin::audit))
        .route("/api/v1/search", get(admin::search))
        .layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth::api_guard));
    Router::new()
        .route("/v2", any(v2::dispatch))
        .route("/v2/", any(v2::dispatch))
        .route("/v2/{*path}", any(v2::dispatch))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/token", get(token::token).post(token::token))
        .route("/api/v1/openapi.json", get(admin::openapi))
        .merge(admin)
        .with_state(app)
        .layer(middleware::from_fn(access_log))
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
        app.sendfile = false;
        app.secure = true;
    }
    let http1_only = app.sendfile;
    let listening = connections::Listening {
        limits: options.limits,
        tls: options.tls,
        http1_only,
    };
    connections::accept_loop(listener, router(app), listening, shutdown).await
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
async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let bytes_in = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut response = next.run(request).await;
    let (name, value) = v2::API_VERSION;
    response.headers_mut().insert(name, value);
    let bytes_out = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    tracing::info!(
        target: "berth::access",
        %method,
        path,
        status = response.status().as_u16(),
        bytes_in,
        bytes_out,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}
