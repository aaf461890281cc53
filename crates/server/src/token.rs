//! `/token`: the Docker token endpoint. `GET` with optional Basic credentials (how docker,
//! podman, skopeo and containerd ask), and `POST` with a form (`grant_type=password` or
//! `refresh_token`, the OAuth2 flow docker uses once it holds a refresh token).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_auth::time::rfc3339;
use berth_auth::{AuthError, Credentials, Scope};
use futures_util::StreamExt;
use serde_json::json;

use crate::auth::{client_address, credentials, refusal, Login};
use crate::error::{Code, OciError};
use crate::App;

/// Largest form accepted by `POST /token`.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Decodes `application/x-www-form-urlencoded` text (also a query string) into pairs,
/// keeping repeated keys (`scope` may be given several times).
pub(crate) fn form_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn bad_request(message: impl Into<String>) -> OciError {
    OciError::new(StatusCode::BAD_REQUEST, Code::BadRequest, message)
}

/// `GET|POST /token`.
pub(crate) async fn token(State(app): State<App>, request: Request) -> Response {
    match issue(&app, request).await {
        Ok(response) => response,
        Err(response) => response,
    }
}

async fn issue(app: &App, request: Request) -> Result<Response, Response> {
    let access = &app.access;
    let address = client_address(&request);
    let headers = request.headers().clone();
    let (pairs, credentials, post) = if request.method() == Method::POST {
        let mut body = request.into_body().into_data_stream();
        let mut raw = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk =
                chunk.map_err(|e| bad_request(format!("reading the form: {e}")).into_response())?;
            if raw.len() + chunk.len() > MAX_FORM_BYTES {
                return Err(bad_request("form too large").into_response());
            }
            raw.extend_from_slice(&chunk);
        }
        let pairs = form_pairs(&String::from_utf8_lossy(&raw));
        let credentials = match get(&pairs, "grant_type") {
            Some("password") => Credentials::Password {
                user: get(&pairs, "username").unwrap_or("").to_owned().into(),
                password: get(&pairs, "password").unwrap_or("").to_owned().into(),
            },
            Some("refresh_token") => {
                Credentials::Refresh(get(&pairs, "refresh_token").unwrap_or("").to_owned().into())
            }
            other => {
                return Err(
                    bad_request(format!("unsupported grant_type {other:?}")).into_response()
                );
            }
        };
        (pairs, credentials, true)
    } else if request.method() == Method::GET {
        let pairs = form_pairs(request.uri().query().unwrap_or(""));
        (pairs, credentials(&headers), false)
    } else {
        return Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            "use GET or POST",
        )
        .into_response());
    };
    if let Some(service) = get(&pairs, "service") {
        if service != access.settings().service {
            return Err(bad_request(format!("unknown service {service:?}")).into_response());
        }
    }
    let refresh_grant = matches!(credentials, Credentials::Refresh(_));
    let caller = access
        .logins()
        .authenticate(credentials, &address)
        .await
        .map_err(|e| refusal(access, &headers, e, Login::Basic))?;
    let scopes: Vec<Scope> = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| Scope::parse_list(v))
        .collect();
    let offline = get(&pairs, "offline_token") == Some("true")
        || get(&pairs, "access_type") == Some("offline");
    // A login that asks keeps one refresh token; refreshing with it never makes another.
    let client = get(&pairs, "client_id").unwrap_or("");
    let offline_for = (offline && !refresh_grant).then_some(client);
    let issued = access
        .tokens()
        .issue(&caller, &scopes, offline_for)
        .await
        .map_err(|e: AuthError| OciError::from(e).into_response())?;
    let mut body = json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
        "issued_at": rfc3339(issued.issued_at_ms),
    });
    if let Some(refresh) = issued.refresh_token {
        body["refresh_token"] = refresh.into();
    }
    if post {
        let granted: Vec<String> = issued
            .granted
            .iter()
            .map(|g| format!("{}:{}:{}", g.kind, g.name, g.actions.join(",")))
            .collect();
        body["scope"] = granted.join(" ").into();
    }
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from(body.to_string()),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_forms_with_repeated_keys() {
        let pairs = form_pairs(
            "scope=repository%3Aa%2Fb%3Apull&scope=repository:c:push&x=a+b&bad=%zz&end=%4",
        );
        assert_eq!(get(&pairs, "scope"), Some("repository:a/b:pull"));
        assert_eq!(pairs.iter().filter(|(k, _)| k == "scope").count(), 2);
        assert_eq!(get(&pairs, "x"), Some("a b"));
        assert_eq!(get(&pairs, "bad"), Some("%zz"));
        assert_eq!(get(&pairs, "end"), Some("%4"));
    }
}
