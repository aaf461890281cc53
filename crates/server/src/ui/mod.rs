//! The web UI: server-rendered HTML (`maud`, which escapes everything interpolated), no
//! script at all, one stylesheet embedded in the binary under a content-hashed name.
//! Every page resolves its caller from the session cookie (a refresh token of the signed-in
//! user, so sessions are listed and revoked with the user's other logins) and shows what
//! access control lets that caller see, as the API does. Every answer carries a strict
//! Content-Security-Policy; forms carry a CSRF token matched against a cookie.

mod actions;
mod admin;
mod artifact;
mod pages;
mod people;
mod policies;
mod session;

use std::sync::OnceLock;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use berth_auth::Caller;
use maud::{html, Markup, DOCTYPE};

use crate::App;

/// The stylesheet, served under a name that changes with its content.
const STYLESHEET: &str = include_str!("app.css");

/// The policy every UI answer carries: nothing but this origin's stylesheet, no script,
/// no frames, forms only to this origin.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'self'; img-src 'self' data:; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// `/ui/assets/app.<first 12 hex of its SHA-256>.css`.
fn stylesheet_path() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let digest = berth_oci::Digest::sha256_of(STYLESHEET.as_bytes());
        format!("/ui/assets/app.{}.css", &digest.hex()[..12])
    })
}

/// The UI's routes, on the main router's state.
pub(crate) fn routes(app: App) -> Router<App> {
    Router::new()
        .route("/", get(pages::home))
        .route("/ui", get(pages::home))
        .route(
            "/ui/sign-in",
            get(session::sign_in_page).post(session::sign_in),
        )
        .route("/ui/sign-out", post(session::sign_out))
        .route("/ui/projects/{name}", get(pages::project))
        .route("/ui/projects/{name}/robots", post(actions::create_robot))
        .route(
            "/ui/projects/{name}/robots/{robot}/delete",
            post(actions::delete_robot),
        )
        .route(
            "/ui/projects/{name}/robots/{robot}/expiry",
            post(actions::set_robot_expiry),
        )
        .route(
            "/ui/repositories/{*name}",
            get(pages::repository).post(actions::change_repository),
        )
        .route("/ui/projects/{name}/members", post(actions::set_member))
        .route(
            "/ui/projects/{name}/members/{user}/delete",
            post(actions::remove_member),
        )
        .route(
            "/ui/projects/{name}/visibility",
            post(actions::set_visibility),
        )
        .route("/ui/search", get(pages::search))
        .route("/ui/admin", get(admin::admin))
        .route("/ui/admin/gc", post(actions::collect_garbage))
        .route("/ui/admin/users", post(actions::create_user))
        .route("/ui/admin/users/{name}/delete", post(actions::delete_user))
        .route("/ui/artifact", get(artifact::artifact))
        .route("/ui/artifact/raw", get(artifact::artifact_raw))
        .route("/ui/assets/{file}", get(stylesheet))
        .layer(axum::extract::DefaultBodyLimit::max(session::FORM_LIMIT))
        .layer(middleware::from_fn_with_state(app.clone(), csrf))
        .layer(middleware::from_fn_with_state(app, guard))
}

async fn csrf(State(app): State<App>, request: Request, next: Next) -> Response {
    session::with_csrf(&app, request, next).await
}

/// Resolves the caller from the session cookie (anonymous without one, or with one that
/// no longer holds), and sets the security headers on every answer.
async fn guard(State(app): State<App>, mut request: Request, next: Next) -> Response {
    let address = crate::auth::client_address(&request);
    let caller = session::caller(&app, request.headers(), &address).await;
    // Every change but signing in needs a session: refused before its body is read.
    let anonymous_change = request.method() == axum::http::Method::POST
        && request.uri().path() != "/ui/sign-in"
        && app.access.enabled()
        && caller.principal == berth_auth::Principal::Anonymous;
    request.extensions_mut().insert(caller);
    let mut response = if anonymous_change {
        (
            StatusCode::UNAUTHORIZED,
            [(header::LOCATION, "/ui/sign-in")],
            "sign in first",
        )
            .into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn stylesheet(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    if format!("/ui/assets/{file}") != stylesheet_path() {
        return StatusCode::NOT_FOUND.into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// A whole page: the header (with who is signed in, and sign-out), then `body`.
fn page(app: &App, caller: &Caller, title: &str, csrf: Option<&str>, body: Markup) -> Markup {
    let signed_in = caller.principal != berth_auth::Principal::Anonymous;
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · berth" }
                link rel="stylesheet" href=(stylesheet_path());
            }
            body {
                header {
                    a.brand href="/" { "berth" }
                    nav {
                        a href="/" { "Projects" }
                        a href="/ui/search" { "Search" }
                        @if caller.principal.is_admin() || !app.access.enabled() {
                            a href="/ui/admin" { "Administration" }
                        }
                    }
                    @if signed_in {
                        span.muted { (caller.principal.actor()) }
                        @if let Some(token) = csrf {
                            form method="post" action="/ui/sign-out" {
                                input type="hidden" name="csrf" value=(token);
                                button.link type="submit" { "Sign out" }
                            }
                        }
                    } @else if app.access.enabled() {
                        a href="/ui/sign-in" { "Sign in" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// An HTML answer.
fn html_response(status: StatusCode, markup: Markup) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

/// `1.5 MB`: sizes as people read them (powers of 1000, as registries' UIs show them).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `3 hours ago` for a time in ms since the epoch, against `now_ms`.
fn relative_time(at_ms: i64, now_ms: i64) -> String {
    let seconds = (now_ms - at_ms).max(0) / 1000;
    let (n, unit) = match seconds {
        s if s < 60 => return "just now".to_owned(),
        s if s < 3600 => (s / 60, "minute"),
        s if s < 86_400 => (s / 3600, "hour"),
        s if s < 86_400 * 30 => (s / 86_400, "day"),
        s if s < 86_400 * 365 => (s / (86_400 * 30), "month"),
        s => (s / (86_400 * 365), "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A time shown relative, with the exact time on hover.
fn when(at_ms: i64) -> Markup {
    let exact = berth_auth::time::rfc3339(at_ms);
    html! { time datetime=(exact) title=(exact) { (relative_time(at_ms, now_ms())) } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_read_as_people_say_them() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(3_200_000_000), "3.2 GB");
        assert_eq!(relative_time(0, 30_000), "just now");
        assert_eq!(relative_time(0, 3_600_000), "1 hour ago");
        assert_eq!(relative_time(0, 3 * 86_400_000), "3 days ago");
    }

    #[test]
    fn the_stylesheet_name_carries_its_hash() {
        let path = stylesheet_path();
        assert!(path.starts_with("/ui/assets/app.") && path.ends_with(".css"));
        assert_eq!(path.len(), "/ui/assets/app.".len() + 12 + ".css".len());
    }
}
