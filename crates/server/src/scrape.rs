//! What a scrape of `/metrics` renders: the endpoint (open, or for administrators), its
//! own listener, and the families read at scrape time (HTTP, process, what is stored,
//! uploads, collections, logins, each pull-through cache, replication). The counters
//! themselves are `metrics.rs`.

use std::future::Future;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::{auth, connections, metrics, App, ConnectionLimits, MetricsAccess};

/// `GET /metrics`: Prometheus text format. Open, or for administrators (HTTP Basic),
/// as configured; always open without access control.
pub(crate) async fn metrics_endpoint(State(app): State<App>, request: Request) -> Response {
    if app.metrics_access == MetricsAccess::Administrators && app.access.enabled() {
        let address = auth::client_address(&request);
        let caller = app
            .access
            .logins()
            .authenticate(auth::credentials(request.headers()), &address)
            .await;
        let allowed = match caller {
            Ok(caller) => {
                app.access
                    .authorize(&caller, berth_auth::Need::System)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = allowed {
            return auth::refusal(&app.access, request.headers(), e, auth::Login::Basic);
        }
    }
    render_metrics(&app).await
}

/// Every metric family: HTTP, process, what is stored, uploads, collections, logins.
/// Each pull-through cache's counters, labelled by its project (a configured name, so
/// the label set is bounded).
fn render_proxy_metrics(out: &mut String, proxy: &berth_proxy::ProxyCache) {
    use std::fmt::Write;
    type Counter = fn(&berth_proxy::UpstreamCounts) -> u64;
    let families: [(&str, &str, &str, Counter); 6] = [
        (
            "berth_proxy_hits_total",
            "counter",
            "Pulls a pull-through cache answered from what it holds.",
            |s| s.hits,
        ),
        (
            "berth_proxy_misses_total",
            "counter",
            "Pulls that went to the upstream.",
            |s| s.misses,
        ),
        (
            "berth_proxy_upstream_bytes_total",
            "counter",
            "Bytes fetched from the upstream.",
            |s| s.bytes_fetched,
        ),
        (
            "berth_proxy_fill_bytes_served_total",
            "counter",
            "Bytes of fills sent to clients while they were fetched.",
            |s| s.bytes_served,
        ),
        (
            "berth_proxy_fills_in_flight",
            "gauge",
            "Blob fills from the upstream under way.",
            |s| s.fills_in_flight,
        ),
        (
            "berth_proxy_stale_serves_total",
            "counter",
            "Pulls answered with cached content because the upstream failed.",
            |s| s.stale_serves,
        ),
    ];
    let _ = writeln!(
        out,
        "# HELP berth_proxy_upstream_rate_limit_remaining Requests the upstream last said remain in its rate-limit window.\n# TYPE berth_proxy_upstream_rate_limit_remaining gauge"
    );
    let counts = proxy.counts();
    for (project, c) in &counts {
        if let Some(remaining) = c.rate_limit_remaining {
            let _ = writeln!(
                out,
                "berth_proxy_upstream_rate_limit_remaining{{project=\"{project}\"}} {remaining}"
            );
        }
    }
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (project, c) in &counts {
            let _ = writeln!(out, "{name}{{project=\"{project}\"}} {}", value(c));
        }
    }
}

/// Replication's task outcomes and bytes on this node, and the tasks still open per
/// policy (policy names are administrators' and bounded in form).
async fn render_replication_metrics(
    out: &mut String,
    replication: &berth_replication::Replication,
) {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let c = &replication.counters;
    let _ = writeln!(
        out,
        "# HELP berth_replication_tasks_total Replication task attempts on this node, by outcome.\n# TYPE berth_replication_tasks_total counter"
    );
    for (outcome, n) in [
        ("succeeded", c.succeeded.load(Relaxed)),
        ("skipped", c.skipped.load(Relaxed)),
        ("retried", c.retried.load(Relaxed)),
        ("failed", c.failed.load(Relaxed)),
    ] {
        let _ = writeln!(
            out,
            "berth_replication_tasks_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    metrics::sample(
        out,
        "berth_replication_bytes_total",
        "counter",
        "Blob bytes replication sent from this node.",
        c.bytes.load(Relaxed),
    );
    if let Ok(backlog) = replication.backlog().await {
        let _ = writeln!(
            out,
            "# HELP berth_replication_pending_tasks Replication tasks not finished yet, by policy.\n# TYPE berth_replication_pending_tasks gauge"
        );
        for (policy, n) in backlog {
            let _ = writeln!(
                out,
                "berth_replication_pending_tasks{{policy=\"{policy}\"}} {n}"
            );
        }
    }
}

async fn render_metrics(app: &App) -> Response {
    use metrics::sample;
    let mut out = String::with_capacity(16 * 1024);
    app.metrics.render_http(&mut out);
    let registry = app.registry.clone();
    let stored = app
        .metrics
        .store_statistics(|| async move { registry.store_counts().await.ok() })
        .await;
    if let Some(s) = stored {
        sample(
            &mut out,
            "berth_repositories",
            "gauge",
            "Repositories holding a blob or a manifest.",
            s.repositories,
        );
        sample(
            &mut out,
            "berth_manifests",
            "gauge",
            "Manifests over every repository.",
            s.manifests,
        );
        sample(
            &mut out,
            "berth_blobs",
            "gauge",
            "Distinct blobs stored (each once).",
            s.blobs,
        );
        sample(
            &mut out,
            "berth_blob_bytes",
            "gauge",
            "Bytes of the distinct blobs stored.",
            s.blob_bytes,
        );
    }
    if let Some(proxy) = &app.proxy {
        render_proxy_metrics(&mut out, proxy);
    }
    if let Some(replication) = &app.replication {
        render_replication_metrics(&mut out, replication).await;
    }
    sample(
        &mut out,
        "berth_uploads_in_progress",
        "gauge",
        "Upload sessions open on this node.",
        app.registry.open_upload_sessions(),
    );
    let gc = app.registry.gc_counters();
    sample(
        &mut out,
        "berth_gc_runs_total",
        "counter",
        "Garbage collections run by this node.",
        gc.runs,
    );
    sample(
        &mut out,
        "berth_gc_failures_total",
        "counter",
        "Of which failed.",
        gc.failures,
    );
    sample(
        &mut out,
        "berth_gc_last_success_timestamp_seconds",
        "gauge",
        "When this node's last collection succeeded (0: never).",
        gc.last_success_unix,
    );
    sample(
        &mut out,
        "berth_gc_last_duration_seconds",
        "gauge",
        "How long this node's last collection took.",
        gc.last_duration_ms as f64 / 1000.0,
    );
    sample(
        &mut out,
        "berth_gc_freed_bytes_total",
        "counter",
        "Bytes freed by this node's collections.",
        gc.bytes_freed,
    );
    sample(
        &mut out,
        "berth_gc_removed_blobs_total",
        "counter",
        "Blobs removed by this node's collections.",
        gc.blobs_removed,
    );
    metrics::render_webhooks(&mut out, &app.webhooks).await;
    if let Some(timings) = &app.timings {
        timings.render(&mut out, app.distribution_metrics);
    }
    if app.distribution_metrics {
        app.metrics.render_distribution(&mut out);
    }
    if let Some(tracer) = &app.tracer {
        let exported = tracer.counters();
        sample(
            &mut out,
            "berth_trace_spans_exported_total",
            "counter",
            "Spans the OTLP collector accepted.",
            exported.exported(),
        );
        sample(
            &mut out,
            "berth_trace_spans_dropped_total",
            "counter",
            "Spans dropped: the export queue was full or the collector refused them.",
            exported.dropped(),
        );
    }
    let auth = app.access.counters();
    let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    metrics::family(
        &mut out,
        "berth_logins_total",
        "counter",
        "Password and secret logins, by result.",
    );
    for (result, n) in [
        ("success", load(&auth.logins_succeeded)),
        ("failure", load(&auth.logins_failed)),
        ("locked_out", load(&auth.logins_locked_out)),
    ] {
        out.push_str(&format!("berth_logins_total{{result=\"{result}\"}} {n}\n"));
    }
    sample(
        &mut out,
        "berth_tokens_issued_total",
        "counter",
        "Tokens issued by the token endpoint.",
        load(&auth.tokens_issued),
    );
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// The metrics alone, open, for a listener of their own (`[metrics] listen`).
pub fn metrics_router(app: App) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(app): State<App>| async move { render_metrics(&app).await }),
        )
        .with_state(app)
}

/// Serves [`metrics_router`] on its own listener, with the same connection limits.
pub async fn serve_metrics(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listening = connections::Listening {
        limits: ConnectionLimits::default(),
        tls: None,
        http1_only: true,
    };
    connections::accept_loop(listener, metrics_router(app), None, listening, shutdown).await
}
