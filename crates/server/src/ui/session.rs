//! Signing in and out of the UI. A session is a refresh token of the user (the same kind
//! `docker login` keeps): issued after the password passed the login checks (lockout
//! included), kept in an HttpOnly, SameSite=Strict cookie (Secure under TLS), listed and
//! revoked with the user's other tokens, and revoked at sign-out. Forms are protected
//! by a random CSRF value kept in a cookie of its own and repeated in the form.

use std::collections::HashMap;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Form};
use berth_auth::{AuthError, Caller, Credentials, Principal};
use maud::html;

use super::{html_response, page};
use crate::App;

/// The session cookie.
const SESSION: &str = "berth_session";
/// The CSRF cookie.
const CSRF: &str = "berth_csrf";
/// The client name sessions are recorded under (in the user's token list).
const CLIENT: &str = "berth-ui";
/// The most a UI form may weigh.
pub(super) const FORM_LIMIT: usize = 8 * 1024;

/// The CSRF value of this browser (from its cookie, or a new one set with this answer).
#[derive(Clone)]
pub(super) struct CsrfToken(pub(super) String);

/// A cookie's value from the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty() && v.len() <= 4096)
}

/// Who the session cookie names; anonymous without one (or with one that no longer
/// holds: expired, revoked, the password changed).
pub(super) async fn caller(app: &App, headers: &HeaderMap, address: &str) -> Caller {
    let Some(token) = cookie(headers, SESSION) else {
        return Caller::anonymous(address);
    };
    app.access
        .logins()
        .authenticate(Credentials::Refresh(token.into()), address)
        .await
        .unwrap_or_else(|_| Caller::anonymous(address))
}

/// Puts this browser's CSRF value in the request (making one if it has none) and sets
/// the cookie on the answer when it was made here.
pub(super) async fn with_csrf(
    app: &App,
    mut request: Request,
    next: axum::middleware::Next,
) -> Response {
    let existing = cookie(request.headers(), CSRF).map(str::to_owned);
    let (token, fresh) = match existing {
        Some(token) => (token, false),
        None => match berth_auth::password::random_secret() {
            Ok(token) => (token, true),
            Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        },
    };
    request.extensions_mut().insert(CsrfToken(token.clone()));
    let mut response = next.run(request).await;
    if fresh {
        let cookie = format!(
            "{CSRF}={token}; Path=/; HttpOnly; SameSite=Strict{}",
            secure(app)
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().append(header::SET_COOKIE, value);
        }
    }
    response
}

fn secure(app: &App) -> &'static str {
    if app.secure {
        "; Secure"
    } else {
        ""
    }
}

/// Whether a posted form carries this browser's CSRF value (compared in constant time).
pub(super) fn csrf_matches(given: Option<&str>, token: &CsrfToken) -> bool {
    let Some(given) = given else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.0.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn refused_form() -> Response {
    html_response(
        StatusCode::FORBIDDEN,
        html! { p.error { "This form has expired or did not come from this site. Go back, reload the page and try again." } },
    )
}

fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

/// `GET /ui/sign-in`.
pub(super) async fn sign_in_page(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
) -> Response {
    if !app.access.enabled() || caller.principal != Principal::Anonymous {
        return redirect("/");
    }
    sign_in_form(&app, &caller, &csrf, StatusCode::OK, None)
}

fn sign_in_form(
    app: &App,
    caller: &Caller,
    csrf: &CsrfToken,
    status: StatusCode,
    problem: Option<&str>,
) -> Response {
    let body = html! {
        h1 { "Sign in" }
        div.card {
            @if let Some(problem) = problem {
                p.error role="alert" { (problem) }
            }
            form.stack method="post" action="/ui/sign-in" {
                input type="hidden" name="csrf" value=(csrf.0);
                label { "User" br; input name="user" autocomplete="username" required maxlength="255"; }
                label { "Password" br; input name="password" type="password" autocomplete="current-password" required maxlength="1024"; }
                button type="submit" { "Sign in" }
            }
        }
        p.muted { "Public projects can be browsed without signing in." }
    };
    html_response(status, page(app, caller, "Sign in", None, body))
}

/// `POST /ui/sign-in`: the password through the same checks as any login; a session on
/// success.
pub(super) async fn sign_in(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    if !app.access.enabled() {
        return redirect("/");
    }
    let user = form.get("user").cloned().unwrap_or_default();
    let password = form.get("password").cloned().unwrap_or_default();
    let credentials = Credentials::Password {
        user: user.into(),
        password: password.into(),
    };
    let signed_in = app
        .access
        .logins()
        .authenticate(credentials, &caller.address)
        .await;
    let user = match signed_in {
        Ok(user) if user.principal != Principal::Anonymous => user,
        Err(AuthError::RateLimited { .. }) => {
            let message = "Too many failed sign-ins from here: wait a while and try again.";
            return sign_in_form(
                &app,
                &caller,
                &csrf,
                StatusCode::TOO_MANY_REQUESTS,
                Some(message),
            );
        }
        _ => {
            let message = "Wrong user or password.";
            return sign_in_form(
                &app,
                &caller,
                &csrf,
                StatusCode::UNAUTHORIZED,
                Some(message),
            );
        }
    };
    let issued = match app.access.tokens().issue(&user, &[], Some(CLIENT)).await {
        Ok(issued) => issued,
        Err(e) => {
            let message = format!("Signing in is not available here: {e}");
            return sign_in_form(
                &app,
                &caller,
                &csrf,
                StatusCode::SERVICE_UNAVAILABLE,
                Some(&message),
            );
        }
    };
    let Some(refresh) = issued.refresh_token else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let max_age = app.access.settings().refresh_ttl.as_secs();
    let cookie = format!(
        "{SESSION}={refresh}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        secure(&app)
    );
    let mut response = redirect("/");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// `POST /ui/sign-out`: the session's token is revoked, the cookie cleared.
pub(super) async fn sign_out(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    if let (Some(token), Principal::User { name, .. }) =
        (cookie(&headers, SESSION), &caller.principal)
    {
        if let Some(id) = token_id(token) {
            if let Err(e) = app
                .access
                .accounts()
                .revoke_refresh_token(&caller, name, &id)
                .await
            {
                tracing::warn!(error = %e, "revoking a UI session");
            }
        }
    }
    let mut response = redirect("/ui/sign-in");
    let cleared = format!(
        "{SESSION}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        secure(&app)
    );
    if let Ok(value) = HeaderValue::from_str(&cleared) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
    response
}

/// The id (`jti`) of a refresh token that was just verified.
fn token_id(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["jti"].as_str().map(str::to_owned)
}
