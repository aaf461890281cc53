//! The authentication edge: every request passes [`guard`], which reads the credentials,
//! asks [`AccessControl`] who the caller is and, for `/v2`, whether it may do what the
//! route does. The caller travels to the handlers as a request extension. Pushes, pulls
//! and deletes are audited here, after the handler answered, with their outcome.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use berth_auth::{AccessControl, AuthError, Caller, Credentials, Need, Outcome, Permission, Scope};
use berth_oci::{Reference, RepoName};

use crate::error::OciError;
use crate::route::V2Route;
use crate::App;

/// Reads `Authorization: Basic …` or `Authorization: Bearer …`.
pub(crate) fn credentials(headers: &HeaderMap) -> Credentials {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Credentials::None;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        return Credentials::Bearer(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD
            .decode(rest.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok());
        if let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
            return Credentials::Password {
                user: user.to_owned(),
                password: password.to_owned(),
            };
        }
        // Unreadable Basic credentials are wrong credentials, not none.
        return Credentials::Password {
            user: String::new(),
            password: String::new(),
        };
    }
    Credentials::Bearer(String::new())
}

/// The client's address (the TCP peer).
pub(crate) fn client_address(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// What a `/v2` request needs, by route and method; `None` where the handler must answer
/// first (an unknown path, a malformed name: 404 and `NAME_INVALID` reveal nothing).
fn v2_need<'a>(
    route: &V2Route<'_>,
    method: &Method,
    name: Option<&'a RepoName>,
) -> Option<Need<'a>> {
    let permission = match *method {
        Method::GET | Method::HEAD => Permission::Read,
        Method::DELETE => Permission::Delete,
        _ => Permission::Write,
    };
    match route {
        V2Route::Base => Some(Need::Login),
        V2Route::Catalog => Some(Need::Catalog),
        // Upload sessions are part of a push, even their status query and cancellation.
        V2Route::UploadStart { .. } | V2Route::Upload { .. } => name.map(|name| Need::Repository {
            name,
            permission: Permission::Write,
        }),
        _ => name.map(|name| Need::Repository { name, permission }),
    }
}

fn route_name<'a>(route: &V2Route<'a>) -> Option<&'a str> {
    match route {
        V2Route::Base | V2Route::Catalog => None,
        V2Route::Tags { name }
        | V2Route::Manifest { name, .. }
        | V2Route::Blob { name, .. }
        | V2Route::UploadStart { name }
        | V2Route::Upload { name, .. }
        | V2Route::Referrers { name, .. } => Some(name),
    }
}

/// The `WWW-Authenticate` value for a refused `/v2` request.
fn challenge(
    access: &AccessControl,
    headers: &HeaderMap,
    scope: Option<&Scope>,
    error: Option<&str>,
) -> String {
    let settings = access.settings();
    let realm = settings.realm.clone().unwrap_or_else(|| {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        format!("http://{host}/token")
    });
    let mut value = format!("Bearer realm=\"{realm}\",service=\"{}\"", settings.service);
    if let Some(scope) = scope {
        value.push_str(&format!(",scope=\"{}\"", scope.to_challenge()));
    }
    if let Some(error) = error {
        value.push_str(&format!(",error=\"{error}\""));
    }
    value
}

fn scope_for(need: &Need<'_>) -> Option<Scope> {
    match need {
        Need::Repository { name, permission } => {
            let actions = match permission {
                Permission::Read => vec!["pull".to_owned()],
                Permission::Delete => vec!["delete".to_owned()],
                _ => vec!["pull".to_owned(), "push".to_owned()],
            };
            Some(Scope {
                kind: "repository".into(),
                name: name.to_string(),
                actions,
            })
        }
        Need::Catalog => Some(Scope {
            kind: "registry".into(),
            name: "catalog".into(),
            actions: vec!["*".into()],
        }),
        _ => None,
    }
}

/// Answers a refused request: 401 with a challenge the client can follow, 403, or 429.
pub(crate) fn refusal(
    access: &AccessControl,
    headers: &HeaderMap,
    need: Option<&Need<'_>>,
    e: AuthError,
    api: bool,
) -> Response {
    let insufficient = matches!(e, AuthError::InsufficientScope(_));
    let error = OciError::from(e);
    if error.status() != StatusCode::UNAUTHORIZED {
        return error.into_response();
    }
    let value = if api {
        format!("Basic realm=\"{}\"", access.settings().service)
    } else {
        let scope = need.and_then(scope_for);
        challenge(
            access,
            headers,
            scope.as_ref(),
            insufficient.then_some("insufficient_scope"),
        )
    };
    error
        .with_header(header::WWW_AUTHENTICATE, value)
        .into_response()
}

/// Authenticates every request (except the token endpoint and health checks, which
/// handle credentials themselves) and authorizes every `/v2` request.
pub(crate) async fn guard(State(app): State<App>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if path == "/token" || path == "/healthz" {
        return next.run(request).await;
    }
    let access = app.access.clone();
    let address = client_address(&request);
    let api = path.starts_with("/api/");
    let caller = match access
        .authenticate(credentials(request.headers()), &address)
        .await
    {
        Ok(caller) => caller,
        Err(e) => return refusal(&access, request.headers(), None, e, api),
    };
    let route = V2Route::parse(&path);
    let name = route
        .as_ref()
        .and_then(route_name)
        .and_then(|n| RepoName::parse(n).ok());
    let method = request.method().clone();
    let need = route
        .as_ref()
        .and_then(|r| v2_need(r, &method, name.as_ref()));
    if let Some(need) = &need {
        if let Err(e) = access.authorize(&caller, *need).await {
            if let (Some(route), AuthError::Denied(why)) = (&route, &e) {
                if let Some((action, resource)) = audited(route, &method, name.as_ref()) {
                    access
                        .record(&caller, action, &resource, Outcome::Denied, why)
                        .await;
                }
            }
            return refusal(&access, request.headers(), Some(need), e, false);
        }
    }
    request.extensions_mut().insert(caller.clone());
    let mut response = next.run(request).await;
    if api && response.status() == StatusCode::UNAUTHORIZED {
        // Admin handlers refuse anonymous callers through `?`: tell them how to log in.
        let value = format!("Basic realm=\"{}\"", access.settings().service);
        if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
    if let Some((action, resource)) = route
        .as_ref()
        .and_then(|r| audited(r, &method, name.as_ref()))
    {
        // Pulls are only worth recording when callers have identities.
        if action != "pull" || access.enabled() {
            let outcome = if response.status().is_success() {
                Outcome::Success
            } else {
                Outcome::Failed
            };
            let detail = match outcome {
                Outcome::Success => response
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
                _ => response.status().as_u16().to_string(),
            };
            access
                .record(&caller, action, &resource, outcome, &detail)
                .await;
        }
    }
    response
}

/// The audit action and resource of a `/v2` request, for the operations the audit log
/// keeps: manifest pulls, pushes and deletes, blob deletes.
fn audited(
    route: &V2Route<'_>,
    method: &Method,
    name: Option<&RepoName>,
) -> Option<(&'static str, String)> {
    let name = name?;
    let reference = |r: &str| match Reference::parse(r) {
        Ok(Reference::Tag(t)) => format!("{name}:{t}"),
        _ => format!("{name}@{r}"),
    };
    match (route, method) {
        (V2Route::Manifest { reference: r, .. }, &Method::GET) => Some(("pull", reference(r))),
        (V2Route::Manifest { reference: r, .. }, &Method::PUT) => Some(("push", reference(r))),
        (V2Route::Manifest { reference: r, .. }, &Method::DELETE) => Some(("delete", reference(r))),
        (V2Route::Blob { digest, .. }, &Method::DELETE) => {
            Some(("delete", format!("{name}@{digest}")))
        }
        _ => None,
    }
}

/// The caller the guard attached (anonymous if a route was reached without it).
pub(crate) fn caller_of(extensions: &axum::http::Extensions) -> Caller {
    extensions
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| Caller::anonymous("unknown"))
}
