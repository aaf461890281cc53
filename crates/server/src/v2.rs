//! Handlers of the OCI distribution API. Each one extracts, makes one domain call and
//! responds; every fault becomes an [`OciError`] through `?`.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use berth_auth::Caller;
use berth_oci::{media_type, Digest, Reference, RepoName};
use berth_registry::Page;
use berth_registry::{BlobBytes, RangeRequest};
use futures_util::{StreamExt, TryStreamExt};

use crate::auth;
use crate::error::{Code, OciError};
use crate::route::V2Route;
use crate::zero_copy::Peer;
use crate::App;

pub(crate) const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
/// The same name, parsed once: inserting or looking up a header by `&str` validates
/// and hashes the text on every request.
const CONTENT_DIGEST: HeaderName = HeaderName::from_static(DOCKER_CONTENT_DIGEST);
const OCI_SUBJECT: &str = "oci-subject";
const OCI_FILTERS_APPLIED: &str = "oci-filters-applied";

pub(crate) type Params = HashMap<String, String>;

/// Whether `path` belongs to the registry API, which the connection serves itself
/// (`connections::serve_http`) rather than through the router.
pub(crate) fn is_v2_path(path: &str) -> bool {
    path == "/v2" || path.starts_with("/v2/")
}

/// Answers one `/v2` request: routes by [`V2Route`], then by method.
///
/// Takes the request whole: the `Uri` and `HeaderMap` extractors would copy them.
pub(crate) async fn serve(app: &App, peer: &Peer, request: Request) -> Response {
    let (
        Parts {
            method,
            uri,
            headers,
            ..
        },
        body,
    ) = request.into_parts();
    let rewritten = match crate::proxied::rewrite(app, &uri).await {
        Ok(rewritten) => rewritten,
        Err(refused) => return refused.into_response(),
    };
    let route = V2Route::parse(rewritten.as_deref().unwrap_or(uri.path()));
    let admitted = match auth::admit(app, route.as_ref(), &method, &headers, peer.addr).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    if let Some(project) = &admitted.project_to_create {
        let by = admitted.caller.as_actor();
        let created = Box::pin(app.registry.create_project_for_push(
            &project.name,
            project.owner,
            &by,
        ))
        .await;
        if let Err(e) = created {
            return OciError::from(e).into_response();
        }
    }
    let request = Incoming {
        peer,
        method,
        uri: &uri,
        headers: &headers,
        body,
    };
    let mut response = handle(app, &admitted.caller, route, request).await;
    reuse_header_map(&mut response, headers);
    if admitted.caller.principal != berth_auth::Principal::Anonymous && crate::Identity::wanted() {
        let who = admitted.caller.principal.actor().to_owned();
        response.extensions_mut().insert(crate::Identity(who));
    }
    let digest = response
        .headers()
        .get(CONTENT_DIGEST)
        .and_then(|v| v.to_str().ok());
    admitted
        .finish(&app.access, response.status(), digest)
        .await;
    response
}

/// The parts of a `/v2` request the handlers use.
struct Incoming<'a> {
    peer: &'a Peer,
    method: Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: Body,
}

/// Moves the answer's headers into the request's map, which the server's HTTP layer
/// then keeps for the next request on the connection: a connection's requests and
/// answers then cycle one map instead of allocating two per request. The answer's own
/// map was small and grew when the access log added its headers (a reallocation that
/// took an allocator arena lock, often the other worker's: PERFORMANCE.md).
fn reuse_header_map(response: &mut Response, mut map: HeaderMap) {
    map.clear();
    let answered = std::mem::replace(response.headers_mut(), map);
    response.headers_mut().extend(answered);
}

async fn handle(
    app: &App,
    caller: &Caller,
    route: Option<V2Route<'_>>,
    request: Incoming<'_>,
) -> Response {
    let Incoming {
        peer,
        method,
        uri,
        headers,
        body,
    } = request;
    let params: Params = Query::try_from_uri(uri)
        .map(|Query(p)| p)
        .unwrap_or_default();
    let Some(route) = route else {
        return OciError::new(
            StatusCode::NOT_FOUND,
            Code::Unsupported,
            "no such API endpoint",
        )
        .into_response();
    };
    if let Some(target) = crate::proxied::proxy_repository(app, &route) {
        return Box::pin(crate::proxied::handle(
            app, target, route, &method, peer, headers, &params,
        ))
        .await
        .unwrap_or_else(IntoResponse::into_response);
    }
    // Reads by digest or tag are answered inline; every other arm is boxed. The request's
    // future lives in a slot each connection keeps (`connections::serve_http`): sized by
    // its largest state, which a push's handlers would make kilobytes larger.
    let result = match (route, method.clone()) {
        (V2Route::Base, Method::GET | Method::HEAD) => Ok(base()),
        (V2Route::Catalog, Method::GET) => Box::pin(catalog(app, caller, &params)).await,
        (V2Route::Tags { name }, Method::GET) => Box::pin(tags(app, name, &params)).await,
        (V2Route::Manifest { name, reference }, Method::GET | Method::HEAD) => {
            get_manifest(app, name, reference, method == Method::HEAD).await
        }
        (V2Route::Manifest { name, reference }, Method::PUT) => {
            Box::pin(put_manifest(app, caller, name, reference, headers, body)).await
        }
        (V2Route::Manifest { name, reference }, Method::DELETE) => {
            Box::pin(delete_manifest(app, caller, name, reference)).await
        }
        (V2Route::Blob { name, digest }, Method::GET | Method::HEAD) => {
            get_blob(app, peer, name, digest, headers, method == Method::HEAD).await
        }
        (V2Route::Blob { name, digest }, Method::DELETE) => {
            Box::pin(delete_blob(app, caller, name, digest)).await
        }
        (V2Route::UploadStart { name }, Method::POST) => {
            Box::pin(start_upload(app, caller, name, &params, body)).await
        }
        (V2Route::Upload { name, id }, Method::GET) => Box::pin(upload_status(app, name, id)).await,
        (V2Route::Upload { name, id }, Method::PATCH) => {
            Box::pin(patch_upload(app, name, id, headers, body)).await
        }
        (V2Route::Upload { name, id }, Method::PUT) => {
            Box::pin(finish_upload(app, caller, name, id, &params, headers, body)).await
        }
        (V2Route::Upload { name, id }, Method::DELETE) => {
            Box::pin(cancel_upload(app, name, id)).await
        }
        (V2Route::Referrers { name, digest }, Method::GET) => {
            Box::pin(referrers(app, name, digest, &params)).await
        }
        _ => Err(OciError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            format!("{method} is not supported here"),
        )),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn base() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
}

fn repo(name: &str) -> Result<RepoName, OciError> {
    Ok(RepoName::parse(name)?)
}

pub(crate) fn digest(text: &str) -> Result<Digest, OciError> {
    Ok(Digest::parse(text)?)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn response(
    status: StatusCode,
    headers: Vec<(&'static str, String)>,
    body: Body,
) -> Response {
    let mut builder = Response::builder().status(status);
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder.body(body).expect("handler headers are valid")
}

/// The largest page served, whatever `n` asks for: a page is built in memory.
const MAX_PAGE: usize = 10_000;

/// Parses `n` and `last`. `n` above [`MAX_PAGE`] (up to any number of digits) is clamped
/// to it, and the `Link` header leads on to the rest.
fn page_params(params: &Params) -> Result<(Option<usize>, Option<&str>), OciError> {
    let n = match params.get("n") {
        None => None,
        Some(n) if !n.is_empty() && n.len() <= 1000 && n.bytes().all(|b| b.is_ascii_digit()) => {
            Some(n.parse::<usize>().unwrap_or(MAX_PAGE).min(MAX_PAGE))
        }
        Some(_) => {
            return Err(OciError::new(
                StatusCode::BAD_REQUEST,
                Code::Unsupported,
                "n must be a non-negative integer",
            ))
        }
    };
    Ok((n, params.get("last").map(String::as_str)))
}

fn paged_listing(
    path: &str,
    key: &str,
    name: Option<&str>,
    mut items: Vec<String>,
    n: Option<usize>,
) -> Response {
    let mut headers = vec![("content-type", "application/json".to_owned())];
    if let Some(n) = n {
        if items.len() > n {
            items.truncate(n);
            if let Some(last) = items.last() {
                headers.push(("link", format!("<{path}?n={n}&last={last}>; rel=\"next\"")));
            }
        }
    }
    let mut body = serde_json::Map::new();
    if let Some(name) = name {
        body.insert("name".into(), name.into());
    }
    body.insert(key.into(), items.into());
    response(
        StatusCode::OK,
        headers,
        Body::from(serde_json::Value::Object(body).to_string()),
    )
}

async fn catalog(app: &App, caller: &Caller, params: &Params) -> Result<Response, OciError> {
    let (n, last) = page_params(params)?;
    let visible = app.access.visible_projects(caller).await?;
    let items = app
        .registry
        .catalog(
            Page {
                limit: n.map(|n| n + 1),
                after: last,
            },
            visible.as_deref(),
        )
        .await?;
    Ok(paged_listing(
        "/v2/_catalog",
        "repositories",
        None,
        items,
        n,
    ))
}

async fn tags(app: &App, name: &str, params: &Params) -> Result<Response, OciError> {
    let name = repo(name)?;
    let (n, last) = page_params(params)?;
    let items = app
        .registry
        .list_tags(
            &name,
            Page {
                limit: n.map(|n| n + 1),
                after: last,
            },
        )
        .await?;
    Ok(paged_listing(
        &format!("/v2/{name}/tags/list"),
        "tags",
        Some(name.as_str()),
        items,
        n,
    ))
}

/// A reference to look up: one that is neither a tag nor a digest names no manifest, and
/// the spec's answer to that is `404 MANIFEST_UNKNOWN`, not a parse error.
pub(crate) fn existing_reference(reference: &str) -> Result<Reference, OciError> {
    Reference::parse(reference).map_err(|_| {
        OciError::new(
            StatusCode::NOT_FOUND,
            Code::ManifestUnknown,
            "manifest unknown: the reference is neither a tag nor a digest",
        )
    })
}

async fn get_manifest(
    app: &App,
    name: &str,
    reference: &str,
    head: bool,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    let reference = existing_reference(reference)?;
    let m = app.registry.get_manifest(&name, &reference).await?;
    Ok(manifest_response(m, head))
}

/// A stored manifest as a `GET` (or `HEAD`) answer.
///
/// Built header by header rather than through [`response`]: this answers most pulls, and
/// the general path formatted and re-validated every value.
pub(crate) fn manifest_response(m: berth_registry::StoredManifest, head: bool) -> Response {
    let length = HeaderValue::from(m.raw.len());
    // The digest is over the stored bytes: serve them, never re-serialise.
    let body = if head {
        Body::empty()
    } else {
        Body::from(m.raw)
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    // A push may only name known manifest media types (`media_type::is_manifest`).
    let content_type = HeaderValue::try_from(m.media_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CONTENT_LENGTH, length);
    insert_digest(headers, &m.digest);
    response
}

/// `Docker-Content-Digest` and the `ETag` made of it, for content served by digest.
fn insert_digest(headers: &mut HeaderMap, digest: &Digest) {
    let digest = digest.as_str();
    let mut etag = String::with_capacity(digest.len() + 2);
    etag.push('"');
    etag.push_str(digest);
    etag.push('"');
    if let (Ok(digest), Ok(etag)) = (HeaderValue::from_str(digest), HeaderValue::try_from(etag)) {
        headers.insert(CONTENT_DIGEST, digest);
        headers.insert(header::ETAG, etag);
    }
}

async fn put_manifest(
    app: &App,
    caller: &Caller,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    let reference = Reference::parse(reference)?;
    let limit = app.registry.limits().max_manifest_bytes;
    let raw = read_capped(body, headers, limit).await?;
    let content_type = header_str(headers, header::CONTENT_TYPE);
    let pushed = app
        .registry
        .put_manifest(&name, &reference, content_type, raw, &caller.as_actor())
        .await?;
    let mut out = vec![
        (
            "location",
            format!("/v2/{name}/manifests/{}", pushed.digest),
        ),
        (DOCKER_CONTENT_DIGEST, pushed.digest.to_string()),
        ("content-length", "0".to_owned()),
    ];
    if let Some(subject) = pushed.subject {
        out.push((OCI_SUBJECT, subject.to_string()));
    }
    Ok(response(StatusCode::CREATED, out, Body::empty()))
}

/// Reads a manifest body, refusing it as soon as it passes `limit` (by `Content-Length`
/// before reading, or by counting while reading).
async fn read_capped(body: Body, headers: &HeaderMap, limit: usize) -> Result<Vec<u8>, OciError> {
    let too_large = |size: usize| {
        OciError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::ManifestInvalid,
            format!("manifest of {size} bytes exceeds the limit of {limit} bytes"),
        )
    };
    let declared =
        header_str(headers, header::CONTENT_LENGTH).and_then(|l| l.parse::<usize>().ok());
    let mut stream = body.into_data_stream();
    if let Some(len) = declared.filter(|len| *len > limit) {
        if len <= DRAIN_LIMIT {
            discard(&mut stream).await;
        }
        return Err(too_large(len));
    }
    let mut raw = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            OciError::new(
                StatusCode::BAD_REQUEST,
                Code::ManifestInvalid,
                format!("reading the body: {e}"),
            )
        })?;
        if raw.len() + chunk.len() > limit {
            let seen = raw.len() + chunk.len();
            drop(raw);
            discard(&mut stream).await;
            return Err(too_large(seen));
        }
        raw.extend_from_slice(&chunk);
    }
    Ok(raw)
}

/// Bodies refused for size are still read (and dropped) up to this many bytes, so the
/// client gets the 413 instead of a connection reset while it is still sending.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

async fn discard(stream: &mut axum::body::BodyDataStream) {
    let mut drained = 0usize;
    while let Some(Ok(chunk)) = stream.next().await {
        drained += chunk.len();
        if drained > DRAIN_LIMIT {
            return;
        }
    }
}

async fn delete_manifest(
    app: &App,
    caller: &Caller,
    name: &str,
    reference: &str,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    let reference = existing_reference(reference)?;
    app.registry
        .delete_manifest(&name, &reference, &caller.as_actor())
        .await?;
    Ok(response(
        StatusCode::ACCEPTED,
        vec![("content-length", "0".to_owned())],
        Body::empty(),
    ))
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n`. Anything else (several ranges, other
/// units) is ignored, as RFC 9110 allows, and the whole blob is sent.
pub(crate) fn parse_range(value: &str) -> Option<RangeRequest> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.trim().split_once('-')?;
    if start.is_empty() {
        return end.parse().ok().map(|len| RangeRequest::Suffix { len });
    }
    let start = start.parse().ok()?;
    let end = if end.is_empty() {
        None
    } else {
        Some(end.parse().ok()?)
    };
    Some(RangeRequest::From { start, end })
}

pub(crate) async fn get_blob(
    app: &App,
    peer: &Peer,
    name: &str,
    digest_text: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    let digest = digest(digest_text)?;
    // Built header by header, as a manifest's answer is: a `HEAD` is most of what a
    // client asks of a blob it may already have.
    let answer = |status: StatusCode, length: u64, body: Body| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        let out = response.headers_mut();
        out.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        out.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        out.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        insert_digest(out, &digest);
        response
    };
    if head {
        let size = app.registry.stat_blob(&name, &digest).await?;
        return Ok(answer(StatusCode::OK, size, Body::empty()));
    }
    if let Some(url) = app.registry.blob_redirect(&name, &digest).await? {
        // The object store serves the bytes (and the client's Range) itself.
        let headers = vec![
            ("location", url),
            (DOCKER_CONTENT_DIGEST, digest.to_string()),
            ("content-length", "0".to_owned()),
        ];
        return Ok(response(
            StatusCode::TEMPORARY_REDIRECT,
            headers,
            Body::empty(),
        ));
    }
    let range = header_str(headers, header::RANGE).and_then(parse_range);
    let blob = app.registry.read_blob(&name, &digest, range).await?;
    let body = match blob.body {
        BlobBytes::Stream(stream) => Body::from_stream(stream),
        BlobBytes::File { file, start, len } if app.sendfile => {
            Body::new(peer.file_body(file, start, len))
        }
        BlobBytes::File { file, start, len } => Body::from_stream(
            berth_storage::stream_file_range(file, start, len)
                .map_err(|e| OciError::internal(&e))?,
        ),
    };
    Ok(match blob.range {
        Some(r) => {
            let mut partial = answer(StatusCode::PARTIAL_CONTENT, r.len(), body);
            let content_range = format!("bytes {}-{}/{}", r.start, r.end, blob.size);
            if let Ok(value) = HeaderValue::try_from(content_range) {
                partial.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            partial
        }
        None => answer(StatusCode::OK, blob.size, body),
    })
}

async fn delete_blob(
    app: &App,
    caller: &Caller,
    name: &str,
    digest_text: &str,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    let digest = digest(digest_text)?;
    app.registry
        .delete_blob(&name, &digest, &caller.as_actor())
        .await?;
    Ok(response(
        StatusCode::ACCEPTED,
        vec![("content-length", "0".to_owned())],
        Body::empty(),
    ))
}

pub(crate) async fn referrers(
    app: &App,
    name: &str,
    digest_text: &str,
    params: &Params,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    let subject = digest(digest_text)?;
    let artifact_type = params
        .get("artifactType")
        .map(String::as_str)
        .filter(|t| !t.is_empty());
    let index = app
        .registry
        .referrers(&name, &subject, artifact_type)
        .await?;
    let mut out = vec![("content-type", media_type::OCI_INDEX.to_owned())];
    if index.filtered {
        out.push((OCI_FILTERS_APPLIED, "artifactType".to_owned()));
    }
    Ok(response(StatusCode::OK, out, Body::from(index.to_json())))
}

/// Header every response carries, so Docker clients recognise a v2 registry.
pub(crate) const API_VERSION: (HeaderName, HeaderValue) = (
    HeaderName::from_static("docker-distribution-api-version"),
    HeaderValue::from_static("registry/2.0"),
);

mod uploads;
use uploads::{cancel_upload, finish_upload, patch_upload, start_upload, upload_status};

#[cfg(test)]
mod tests;
