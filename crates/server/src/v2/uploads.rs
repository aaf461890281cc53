//! Blob uploads: starting (or mounting, or pushing in one request), chunks, the final
//! `PUT`, status and cancellation.

use berth_auth::{Caller, Need, Permission};
use berth_registry::MountOutcome;
use berth_storage::{ByteStream, UploadId};

use super::*;

const DOCKER_UPLOAD_UUID: &str = "docker-upload-uuid";

fn body_stream(body: Body) -> ByteStream {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

/// The `Range` header of an upload: inclusive end of what the session holds.
fn upload_range(len: u64) -> String {
    if len == 0 {
        "0-0".to_owned()
    } else {
        format!("0-{}", len - 1)
    }
}

fn upload_accepted(status: StatusCode, name: &RepoName, id: &UploadId, len: u64) -> Response {
    let location = format!("/v2/{name}/blobs/uploads/{id}");
    let headers = vec![
        ("location", location),
        ("range", upload_range(len)),
        (DOCKER_UPLOAD_UUID, id.to_string()),
        ("content-length", "0".to_owned()),
    ];
    response(status, headers, Body::empty())
}

fn blob_created(name: &RepoName, digest: &Digest) -> Response {
    let headers = vec![
        ("location", format!("/v2/{name}/blobs/{digest}")),
        (DOCKER_CONTENT_DIGEST, digest.to_string()),
        ("content-length", "0".to_owned()),
    ];
    response(StatusCode::CREATED, headers, Body::empty())
}

pub(super) async fn start_upload(
    app: &App,
    caller: &Caller,
    name: &str,
    params: &Params,
    body: Body,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    if let Some(mount) = params.get("mount") {
        let mount = digest(mount)?;
        // A malformed `from`, or one the caller may not pull from, cannot lend the blob:
        // fall back to an upload, as the spec allows, without saying why.
        let from = params.get("from").map(|f| RepoName::parse(f).ok());
        let outcome = match from {
            Some(None) => MountOutcome::NotMountable,
            Some(Some(source)) => {
                let need = Need::Repository {
                    name: &source,
                    permission: Permission::Read,
                };
                if app.access.authorize(caller, need).await.is_ok() {
                    app.registry
                        .mount_blob(&name, &mount, Some(&source), &caller.as_actor())
                        .await?
                } else {
                    MountOutcome::NotMountable
                }
            }
            // Without `from` any repository could lend the blob: only when nobody's
            // access is checked, or for administrators, who may read everything.
            None if !app.access.enabled() || caller.principal.is_admin() => {
                app.registry
                    .mount_blob(&name, &mount, None, &caller.as_actor())
                    .await?
            }
            None => MountOutcome::NotMountable,
        };
        if outcome == MountOutcome::Mounted {
            return Ok(blob_created(&name, &mount));
        }
    } else if let Some(d) = params.get("digest") {
        let d = digest(d)?;
        app.registry
            .push_blob(&name, &d, body_stream(body), &caller.as_actor())
            .await?;
        return Ok(blob_created(&name, &d));
    }
    let id = app.registry.start_upload(&name, &caller.as_actor()).await?;
    Ok(upload_accepted(StatusCode::ACCEPTED, &name, &id, 0))
}

pub(super) async fn upload_status(app: &App, name: &str, id: &str) -> Result<Response, OciError> {
    let name = repo(name)?;
    let (id, len) = app.registry.upload_status(&name, id).await?;
    Ok(upload_accepted(StatusCode::NO_CONTENT, &name, &id, len))
}

/// Reads `Content-Range: <start>-<end>` (also tolerating a `bytes ` prefix and a
/// `/<total>` suffix). Returns the start; checks the length against `Content-Length`.
pub(super) fn content_range(headers: &HeaderMap) -> Result<Option<u64>, OciError> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        OciError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            Code::BlobUploadInvalid,
            "malformed Content-Range: expected <start>-<end>",
        )
    };
    let text = value.to_str().map_err(|_| bad())?.trim();
    let text = text.strip_prefix("bytes ").unwrap_or(text);
    let text = text.split('/').next().unwrap_or(text);
    let (start, end) = text.split_once('-').ok_or_else(bad)?;
    let start: u64 = start.trim().parse().map_err(|_| bad())?;
    let end: u64 = end.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    if let Some(len) =
        header_str(headers, header::CONTENT_LENGTH).and_then(|l| l.parse::<u64>().ok())
    {
        if len != end - start + 1 {
            return Err(OciError::new(
                StatusCode::BAD_REQUEST,
                Code::SizeInvalid,
                format!(
                    "Content-Range covers {} bytes but Content-Length is {len}",
                    end - start + 1
                ),
            ));
        }
    }
    Ok(Some(start))
}

pub(super) async fn patch_upload(
    app: &App,
    name: &str,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    let start = content_range(headers)?;
    let (id, len) = app
        .registry
        .append_upload(&name, id, start, body_stream(body))
        .await?;
    Ok(upload_accepted(StatusCode::ACCEPTED, &name, &id, len))
}

pub(super) async fn finish_upload(
    app: &App,
    caller: &Caller,
    name: &str,
    id: &str,
    params: &Params,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, OciError> {
    let name = repo(name)?;
    let Some(d) = params.get("digest") else {
        return Err(OciError::new(
            StatusCode::BAD_REQUEST,
            Code::DigestInvalid,
            "the digest query parameter is required",
        ));
    };
    let d = digest(d)?;
    let declared_len =
        header_str(headers, header::CONTENT_LENGTH).and_then(|l| l.parse::<u64>().ok());
    let final_chunk = if declared_len == Some(0) {
        None
    } else {
        Some((content_range(headers)?, body_stream(body)))
    };
    app.registry
        .finish_upload(&name, id, &d, final_chunk, &caller.as_actor())
        .await?;
    Ok(blob_created(&name, &d))
}

pub(super) async fn cancel_upload(app: &App, name: &str, id: &str) -> Result<Response, OciError> {
    let name = repo(name)?;
    app.registry.cancel_upload(&name, id).await?;
    Ok(response(StatusCode::NO_CONTENT, vec![], Body::empty()))
}
