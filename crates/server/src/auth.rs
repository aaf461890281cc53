//! The authentication edge. Every `/v2` request is [`admit`]ted before its handler runs:
//! the credentials are read, [`AccessControl`] says who the caller is and whether it may
//! do what the route does; pushes, pulls and deletes are audited once answered. Every
//! `/api/v1` request passes [`api_guard`], which authenticates and hands the caller to
//! the admin handlers as a request extension.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use berth_auth::{
    AccessControl, AuthError, Caller, Credentials, Need, Outcome, Permission, ProjectToCreate,
    Proof, Scope,
};
use berth_oci::{RepoName, Tag};

use crate::error::OciError;
use crate::route::V2Route;
use std::borrow::Cow;

use crate::App;

/// Reads `Authorization: Basic …` or `Authorization: Bearer …`.
pub(crate) fn credentials(headers: &HeaderMap) -> Credentials<'_> {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Credentials::None;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        return Credentials::Bearer(Cow::Borrowed(rest.trim()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD
            .decode(rest.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok());
        if let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
            return Credentials::Password {
                user: Cow::Owned(user.to_owned()),
                password: Cow::Owned(password.to_owned()),
            };
        }
        // Unreadable Basic credentials are wrong credentials, not none.
        return Credentials::Password {
            user: Cow::Borrowed(""),
            password: Cow::Borrowed(""),
        };
    }
    Credentials::Bearer(Cow::Borrowed(""))
}

/// The client's address (the TCP peer).
pub(crate) fn client_address(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<crate::zero_copy::Peer>>()
        .map(|ConnectInfo(peer)| address_text(peer.addr.ip()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// How an address is written in the audit log: as `Display` writes it, without going
/// through the formatting machinery for the common IPv4 case (it is done per request).
fn address_text(ip: std::net::IpAddr) -> String {
    let std::net::IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
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

/// The `WWW-Authenticate` value for a refused `/v2` request. Without a configured realm
/// the token endpoint is this server's, named by the `Host` the client used, which is
/// checked first: it is copied into a header the client will follow.
fn challenge(
    access: &AccessControl,
    headers: &HeaderMap,
    secure: bool,
    scope: Option<&Scope>,
    error: Option<&str>,
) -> String {
    let settings = access.settings();
    let realm = settings.realm.clone().unwrap_or_else(|| {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| is_host(h))
            .unwrap_or("localhost");
        let scheme = if secure { "https" } else { "http" };
        format!("{scheme}://{host}/token")
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

/// Whether a `Host` header value is a host name or IP literal with an optional port, and
/// nothing that could end a quoted string or smuggle a path.
fn is_host(value: &str) -> bool {
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => (host, Some(port)),
        _ => (value, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = if let Some(literal) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        literal.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
    };
    port_ok && host_ok
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

/// How a refused caller is told to log in.
#[derive(Clone, Copy)]
pub(crate) enum Login<'a> {
    /// Docker's token flow (`/v2`): a Bearer challenge naming the scope needed, if known,
    /// pointing at an `https://` realm when the server is `secure`.
    Token {
        /// What the request needed, for the challenge's scope.
        need: Option<&'a Need<'a>>,
        /// Served over TLS.
        secure: bool,
    },
    /// HTTP Basic (the admin API, the token endpoint).
    Basic,
}

fn basic_challenge(access: &AccessControl) -> String {
    format!("Basic realm=\"{}\"", access.settings().service)
}

/// Answers a refused request: 401 with a challenge the client can follow; 403 with a
/// challenge naming the scope when a valid token lacks it (RFC 6750 §3.1: clients that
/// keep their token on a 401, such as the ORAS SDK, fetch a new one on a 403); 403
/// `DENIED` when the caller may not (with the challenge too on `/v2`, so that such a
/// client, having tried a fresh token, gives up at once instead of retrying); 429.
pub(crate) fn refusal(
    access: &AccessControl,
    headers: &HeaderMap,
    e: AuthError,
    login: Login<'_>,
) -> Response {
    let insufficient = matches!(e, AuthError::InsufficientScope(_));
    let denied = matches!(e, AuthError::Denied(_));
    let error = OciError::from(e);
    let challenged = match login {
        Login::Basic => error.status() == StatusCode::UNAUTHORIZED,
        Login::Token { .. } => error.status() == StatusCode::UNAUTHORIZED || insufficient || denied,
    };
    if !challenged {
        return error.into_response();
    }
    let value = match login {
        Login::Basic => basic_challenge(access),
        Login::Token { need, secure } => {
            let scope = need.and_then(scope_for);
            challenge(
                access,
                headers,
                secure,
                scope.as_ref(),
                insufficient.then_some("insufficient_scope"),
            )
        }
    };
    error
        .with_header(header::WWW_AUTHENTICATE, value)
        .into_response()
}

/// A `/v2` request let through: who is calling, and what to audit once it is answered.
pub(crate) struct Admitted {
    /// The caller, for handlers that look further (catalog, mount).
    pub(crate) caller: Caller,
    audit: Option<(&'static str, String)>,
    /// The project this push goes into does not exist yet and the caller may create it:
    /// the dispatcher has the registry create it before the handler runs.
    pub(crate) project_to_create: Option<ProjectToCreate>,
}

/// Authenticates and authorizes one `/v2` request, before its handler runs. The route
/// and method name the need (pull, push, delete); refusals are answered here.
pub(crate) async fn admit(
    app: &App,
    route: Option<&V2Route<'_>>,
    method: &Method,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Admitted, Response> {
    if !app.access.enabled() {
        return Ok(admit_open(route, method, peer));
    }
    // Boxed: its future is kilobytes, and the request's own must stay small (v2::handle).
    Box::pin(admit_checked(app, route, method, headers, peer)).await
}

/// An open registry checks nothing: reads are not audited without identities (nor is
/// their address worth formatting).
fn admit_open(route: Option<&V2Route<'_>>, method: &Method, peer: SocketAddr) -> Admitted {
    let (audit, address) = match *method {
        Method::GET | Method::HEAD => (None, String::new()),
        _ => (
            route.and_then(|r| audited(r, method, parse_name(r).as_ref(), false)),
            address_text(peer.ip()),
        ),
    };
    Admitted {
        caller: Caller::anonymous(address),
        audit,
        project_to_create: None,
    }
}

async fn admit_checked(
    app: &App,
    route: Option<&V2Route<'_>>,
    method: &Method,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Admitted, Response> {
    let access = &app.access;
    let secure = app.secure;
    let caller = access
        .logins()
        .authenticate(credentials(headers), address_text(peer.ip()))
        .await
        .map_err(|e| refusal(access, headers, e, Login::Token { need: None, secure }))?;
    let name = route.and_then(parse_name);
    let pulls = access.settings().audit_pulls;
    let audit = route.and_then(|r| audited(r, method, name.as_ref(), pulls));
    let need = route.and_then(|r| v2_need(r, method, name.as_ref()));
    let mut project_to_create = None;
    if let Some(need) = &need {
        match access.authorize(&caller, *need).await {
            Ok(grant) => project_to_create = grant.project_to_create,
            Err(e) => {
                // Refusals are always recorded, pulls included.
                let refused = route.and_then(|r| audited(r, method, name.as_ref(), true));
                if let (Some((action, resource)), AuthError::Denied(why)) = (&refused, &e) {
                    access
                        .record(&caller, action, resource, Outcome::Denied, why)
                        .await;
                }
                return Err(refusal(
                    access,
                    headers,
                    e,
                    Login::Token {
                        need: Some(need),
                        secure,
                    },
                ));
            }
        }
    }
    Ok(Admitted {
        caller,
        audit,
        project_to_create,
    })
}

impl Admitted {
    /// Records an audited operation that changed nothing: a failed one (with the
    /// answer's status), or a pull (with the digest it named). A successful push or
    /// delete is in the log already: the domain recorded its event in the transaction
    /// that made the change.
    pub(crate) async fn finish(
        &self,
        access: &AccessControl,
        status: StatusCode,
        digest: Option<&str>,
    ) {
        let Some((action, resource)) = &self.audit else {
            return;
        };
        let (outcome, detail) = match (status.is_success(), *action) {
            (true, "pull") => (Outcome::Success, Cow::Borrowed(digest.unwrap_or_default())),
            (true, _) => return,
            (false, _) => (Outcome::Failed, Cow::Owned(status.as_u16().to_string())),
        };
        access
            .record(&self.caller, action, resource, outcome, &detail)
            .await;
    }
}

fn parse_name(route: &V2Route<'_>) -> Option<RepoName> {
    route_name(route).and_then(|n| RepoName::parse(n).ok())
}

/// Authenticates every `/api/v1` request; each admin operation then authorizes itself
/// through [`AccessControl`]. Adds the Basic challenge to refusals of anonymous callers.
pub(crate) async fn api_guard(
    State(app): State<App>,
    mut request: Request,
    next: Next,
) -> Response {
    let address = client_address(&request);
    let caller = match app
        .access
        .logins()
        .authenticate(credentials(request.headers()), &address)
        .await
    {
        Ok(caller) => caller,
        Err(e) => return refusal(&app.access, request.headers(), e, Login::Basic),
    };
    if app.access.enabled() && caller.proof == Proof::None && has_body(request.headers()) {
        // Every admin operation that takes a body needs a login: refuse before reading
        // a byte of it (the connection layer closes the connection, the body unread).
        return refusal(
            &app.access,
            request.headers(),
            AuthError::Unauthenticated,
            Login::Basic,
        );
    }
    let limit = crate::admin_body_limit(request.uri().path());
    if declared_length(request.headers()).is_some_and(|length| length > limit as u64) {
        return OciError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            crate::error::Code::BadRequest,
            format!("this operation takes at most {limit} bytes"),
        )
        .into_response();
    }
    let identity = (caller.principal != berth_auth::Principal::Anonymous
        && crate::Identity::wanted())
    .then(|| crate::Identity(caller.principal.actor().to_owned()));
    request.extensions_mut().insert(caller);
    let mut response = next.run(request).await;
    if let Some(identity) = identity {
        response.extensions_mut().insert(identity);
    }
    if response.status() == StatusCode::UNAUTHORIZED {
        // Admin operations refuse anonymous callers through `?`: tell them how to log in.
        if let Ok(value) = axum::http::HeaderValue::from_str(&basic_challenge(&app.access)) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}

/// The body length a request declares, if it does.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Whether a request announces a body (a length above zero, or chunks).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// The audit action and resource of a `/v2` request, for the operations the audit log
/// keeps: manifest pulls (if `pulls`), pushes and deletes, blob deletes.
fn audited(
    route: &V2Route<'_>,
    method: &Method,
    name: Option<&RepoName>,
    pulls: bool,
) -> Option<(&'static str, String)> {
    if !pulls && method == Method::GET {
        return None;
    }
    let name = name?.as_str();
    // Built by hand: `format!` here was a tenth of what access control costs a pull.
    let joined = |separator: char, r: &str| {
        let mut resource = String::with_capacity(name.len() + 1 + r.len());
        resource.push_str(name);
        resource.push(separator);
        resource.push_str(r);
        resource
    };
    // A tag is joined with ':', anything else (a digest, or what failed to parse as
    // either) with '@'.
    let reference = |r: &str| joined(if Tag::is_valid(r) { ':' } else { '@' }, r);
    match (route, method) {
        (V2Route::Manifest { reference: r, .. }, &Method::GET) => Some(("pull", reference(r))),
        (V2Route::Manifest { reference: r, .. }, &Method::PUT) => Some(("push", reference(r))),
        (V2Route::Manifest { reference: r, .. }, &Method::DELETE) => Some(("delete", reference(r))),
        (V2Route::Blob { digest, .. }, &Method::DELETE) => Some(("delete", joined('@', digest))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audited_resources_name_tags_with_a_colon_and_anything_else_with_an_at() {
        let name = RepoName::parse("team/app").unwrap();
        let digest = format!("sha256:{}", "a".repeat(64));
        let resource = |reference: &str, method: Method| {
            let route = V2Route::Manifest {
                name: "team/app",
                reference,
            };
            audited(&route, &method, Some(&name), true)
        };
        assert_eq!(
            resource("v1.0", Method::GET),
            Some(("pull", "team/app:v1.0".to_owned()))
        );
        assert_eq!(
            resource(&digest, Method::PUT),
            Some(("push", format!("team/app@{digest}")))
        );
        // Neither a tag nor a digest: still named, and never as a tag.
        assert_eq!(
            resource("bad!ref", Method::DELETE),
            Some(("delete", "team/app@bad!ref".to_owned()))
        );
        let route = V2Route::Manifest {
            name: "team/app",
            reference: "v1",
        };
        assert_eq!(
            audited(&route, &Method::GET, Some(&name), false),
            None,
            "pulls not audited"
        );
        assert_eq!(audited(&route, &Method::HEAD, Some(&name), true), None);
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.99.100",
            "255.255.255.255",
            "192.168.1.20",
            "::1",
            "fe80::1:2",
            "::ffff:10.0.0.1",
        ] {
            let ip: std::net::IpAddr = text.parse().unwrap();
            assert_eq!(address_text(ip), ip.to_string());
            assert_eq!(address_text(ip), text);
        }
    }
}
