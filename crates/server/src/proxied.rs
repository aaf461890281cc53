//! `/v2` requests for the repositories of proxy projects: manifests and blobs come from
//! the cache (filled from the upstream on a miss), listings and referrers from what is
//! cached, and every write is refused: a cache holds what its upstream holds.

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use berth_oci::RepoName;
use berth_proxy::{ProxyCache, ProxyError};

use crate::error::{Code, OciError};
use crate::route::V2Route;
use crate::v2::{self, DOCKER_CONTENT_DIGEST};
use crate::zero_copy::Peer;
use crate::App;

/// The path a request for a cache is really for: containerd's `?ns=<host>` (a mirror in
/// its `hosts.toml`) and docker's `registry-mirrors` send upstream names without the
/// proxy project, which is put in front here (with `library/` before a one-part name,
/// as Docker Hub names official images). An `ns` no cache answers to is refused.
pub(crate) async fn rewrite(app: &App, uri: &axum::http::Uri) -> Result<Option<String>, OciError> {
    let Some(proxy) = app.proxy.as_deref() else {
        return Ok(None);
    };
    let path = uri.path();
    let name = match V2Route::parse(path) {
        Some(
            V2Route::Manifest { name, .. }
            | V2Route::Blob { name, .. }
            | V2Route::Tags { name }
            | V2Route::Referrers { name, .. }
            | V2Route::UploadStart { name }
            | V2Route::Upload { name, .. },
        ) => name,
        _ => return Ok(None),
    };
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Ok(None);
    };
    let ns = uri.query().and_then(|q| {
        q.split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == "ns")
            .map(|(_, value)| value)
    });
    let project = match ns {
        Some(ns) => match proxy.project_for_ns(ns) {
            Some(project) => project,
            None => {
                let shown: String = ns.chars().take(100).collect();
                return Err(OciError::new(
                    StatusCode::NOT_FOUND,
                    Code::NameUnknown,
                    format!("no pull-through cache answers to ns {shown:?}"),
                ));
            }
        },
        None => {
            let Some(mirror) = proxy.docker_mirror_project() else {
                return Ok(None);
            };
            let first = name.split('/').next().unwrap_or_default();
            if proxy.is_proxy_project(first) || app.registry.project(first).await?.is_some() {
                return Ok(None);
            }
            mirror
        }
    };
    let library = if name.contains('/') { "" } else { "library/" };
    Ok(Some(format!("/v2/{project}/{library}{rest}")))
}

/// The repository a route names, if it is in a proxy project.
pub(crate) fn proxy_repository<'a>(
    app: &'a App,
    route: &V2Route<'_>,
) -> Option<(&'a ProxyCache, RepoName)> {
    let proxy = app.proxy.as_deref()?;
    let name = match route {
        V2Route::Manifest { name, .. }
        | V2Route::Blob { name, .. }
        | V2Route::Referrers { name, .. }
        | V2Route::UploadStart { name }
        | V2Route::Upload { name, .. } => name,
        _ => return None,
    };
    let repo = RepoName::parse(name).ok()?;
    proxy.serves(&repo).then_some((proxy, repo))
}

/// Answers a request for a proxy repository.
pub(crate) async fn handle(
    app: &App,
    (proxy, repo): (&ProxyCache, RepoName),
    route: V2Route<'_>,
    method: &Method,
    peer: &Peer,
    headers: &HeaderMap,
    params: &v2::Params,
) -> Result<Response, OciError> {
    let head = method == Method::HEAD;
    match (route, method.clone()) {
        (V2Route::Manifest { reference, .. }, Method::HEAD) => {
            let reference = v2::existing_reference(reference)?;
            let (digest, media_type, size) =
                proxy.manifest_head(&repo, &reference).await.map_err(oci)?;
            let headers = vec![
                ("content-type", media_type),
                ("content-length", size.to_string()),
                (DOCKER_CONTENT_DIGEST, digest.to_string()),
                ("etag", format!("\"{digest}\"")),
            ];
            Ok(v2::response(StatusCode::OK, headers, Body::empty()))
        }
        (V2Route::Manifest { reference, .. }, Method::GET) => {
            let reference = v2::existing_reference(reference)?;
            let m = proxy.manifest(&repo, &reference).await.map_err(oci)?;
            Ok(v2::manifest_response(m, head))
        }
        (V2Route::Blob { name, digest }, Method::GET | Method::HEAD) => {
            let digest = v2::digest(digest)?;
            match v2::get_blob(app, peer, name, digest.as_str(), headers, head).await {
                Ok(response) => {
                    proxy.note_hit(&repo);
                    return Ok(response);
                }
                Err(e) if e.status() != StatusCode::NOT_FOUND => return Err(e),
                Err(_) => {}
            }
            let mut out = vec![
                ("content-type", "application/octet-stream".to_owned()),
                (DOCKER_CONTENT_DIGEST, digest.to_string()),
                ("etag", format!("\"{digest}\"")),
            ];
            if head {
                let size = proxy.blob_size(&repo, &digest).await.map_err(oci)?;
                out.push(("content-length", size.to_string()));
                return Ok(v2::response(StatusCode::OK, out, Body::empty()));
            }
            // One range of a blob not cached: asked of the upstream as is, answered 206.
            let range = headers
                .get(axum::http::header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(v2::parse_range);
            if let Some(range) = range {
                let asked = match range {
                    berth_registry::RangeRequest::From { start, end } => {
                        format!("bytes={start}-{}", end.map(|e| e.to_string()).unwrap_or_default())
                    }
                    berth_registry::RangeRequest::Suffix { len } => format!("bytes=-{len}"),
                };
                let part = proxy
                    .blob_range(&repo, &digest, &asked)
                    .await
                    .map_err(oci)?;
                if let Some((content_range, length, stream)) = part {
                    out.push(("content-range", content_range));
                    out.push(("content-length", length.to_string()));
                    return Ok(v2::response(
                        StatusCode::PARTIAL_CONTENT,
                        out,
                        Body::from_stream(stream),
                    ));
                }
            }
            // Otherwise the whole blob, through the one fill that serves everyone.
            let (size, stream) = proxy.blob(&repo, &digest).await.map_err(oci)?;
            out.push(("content-length", size.to_string()));
            Ok(v2::response(StatusCode::OK, out, Body::from_stream(stream)))
        }
        (V2Route::Referrers { name, digest }, Method::GET) => {
            let subject = v2::digest(digest)?;
            proxy.sync_referrers(&repo, &subject).await.map_err(oci)?;
            v2::referrers(app, name, digest, params).await
        }
        (_, Method::PUT | Method::POST | Method::PATCH | Method::DELETE) => Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            format!("{} is a pull-through cache: it holds what its upstream holds, and takes no pushes or deletes", repo.project()),
        )),
        _ => Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            format!("{method} is not supported here"),
        )),
    }
}

/// A proxy failure as the client sees it: the registry's own errors as always; an
/// upstream that failed (with nothing cached to stand in) as 502 with its words.
pub(crate) fn oci(e: ProxyError) -> OciError {
    match e {
        ProxyError::Registry(e) => OciError::from(e),
        ProxyError::Upstream { project, message } => OciError::new(
            StatusCode::BAD_GATEWAY,
            Code::Unknown,
            format!("the upstream of {project} failed: {message}"),
        ),
        ProxyError::NotFound(what) => OciError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!("{what} does not exist"),
        ),
        ProxyError::Conflict(message) => {
            OciError::new(StatusCode::CONFLICT, Code::Conflict, message)
        }
        ProxyError::Invalid(message) => {
            OciError::new(StatusCode::BAD_REQUEST, Code::BadRequest, message)
        }
        // Settings given through the API that the guard refuses are the caller's to fix.
        ProxyError::Config { project, message } => OciError::new(
            StatusCode::BAD_REQUEST,
            Code::BadRequest,
            format!("proxy cache {project}: {message}"),
        ),
    }
}
