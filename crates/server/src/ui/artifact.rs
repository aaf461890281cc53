//! The artifact page: a manifest with its layers, an index's platforms, the image
//! config (entrypoint, command, environment, history) and its referrers, and the
//! manifest's exact bytes as a download.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use berth_auth::{Caller, Need, Permission};
use berth_oci::{Digest, Reference, RepoName};
use berth_registry::BlobBytes;
use maud::{html, Markup};
use serde_json::Value;

use super::pages::{may_read, problem, urlencode};
use super::session::CsrfToken;
use super::{html_response, human_bytes, page};
use crate::App;

/// The largest config blob shown.
const MAX_CONFIG: u64 = 1024 * 1024;

/// The repository and digest an artifact page is about, checked.
async fn artifact_target(
    app: &App,
    caller: &Caller,
    csrf: &CsrfToken,
    query: &HashMap<String, String>,
) -> Result<(RepoName, berth_registry::StoredManifest), Response> {
    let repo = query
        .get("repository")
        .and_then(|r| RepoName::parse(r).ok());
    let digest = query.get("digest").and_then(|d| Digest::parse(d).ok());
    let (Some(repo), Some(digest)) = (repo, digest) else {
        return Err(problem(
            app,
            caller,
            csrf,
            StatusCode::BAD_REQUEST,
            "Give a repository and a digest.",
        ));
    };
    may_read(app, caller, csrf, repo.project()).await?;
    match app
        .registry
        .get_manifest(&repo, &Reference::Digest(digest))
        .await
    {
        Ok(stored) => Ok((repo, stored)),
        Err(_) => Err(problem(
            app,
            caller,
            csrf,
            StatusCode::NOT_FOUND,
            "No such manifest.",
        )),
    }
}

/// `GET /ui/artifact?repository=&digest=`: a manifest and what it refers to.
pub(super) async fn artifact(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (repo, stored) = match artifact_target(&app, &caller, &csrf, &query).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let manifest: Value = serde_json::from_slice(&stored.raw).unwrap_or_default();
    let pretty = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    let delete = Need::Repository {
        name: &repo,
        permission: Permission::Delete,
    };
    let deletes = app.access.authorize(&caller, delete).await.is_ok();
    let config = config_of(&app, &repo, &manifest).await;
    let referrers = app
        .registry
        .referrers(&repo, &stored.digest, None)
        .await
        .map(|index| index.manifests)
        .unwrap_or_default();
    let link = |digest: &str| {
        format!(
            "/ui/artifact?repository={}&digest={}",
            urlencode(repo.as_str()),
            urlencode(digest)
        )
    };
    let raw_link = format!(
        "/ui/artifact/raw?repository={}&digest={}",
        urlencode(repo.as_str()),
        urlencode(stored.digest.as_str())
    );
    let body = html! {
        h1 { (repo.as_str()) }
        div.card {
            p { code.digest { (stored.digest.as_str()) } }
            p.muted { (stored.media_type) " · " (human_bytes(stored.raw.len() as u64)) " · "
                      a href=(raw_link) { "the exact bytes" } }
        }
        @if let Some(children) = manifest["manifests"].as_array() {
            div.card {
                h2 { "Platforms" }
                table {
                    thead { tr { th { "Platform" } th { "Digest" } th { "Size" } } }
                    tbody {
                        @for child in children {
                            @let digest = child["digest"].as_str().unwrap_or_default();
                            tr {
                                td { (child["platform"]["os"].as_str().unwrap_or("?")) "/" (child["platform"]["architecture"].as_str().unwrap_or("?")) }
                                td.digest { a href=(link(digest)) { code { (digest) } } }
                                td { (human_bytes(child["size"].as_u64().unwrap_or(0))) }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(layers) = manifest["layers"].as_array() {
            div.card {
                h2 { "Layers" }
                table {
                    thead { tr { th { "#" } th { "Digest" } th { "Size" } th { "Type" } } }
                    tbody {
                        @for (i, layer) in layers.iter().enumerate() {
                            tr {
                                td { (i + 1) }
                                td.digest { code { (layer["digest"].as_str().unwrap_or_default()) } }
                                td { (human_bytes(layer["size"].as_u64().unwrap_or(0))) }
                                td.muted { (layer["mediaType"].as_str().unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(config) = &config {
            div.card {
                h2 { "Config" }
                (config_markup(config))
            }
        }
        div.card {
            h2 { "Referrers" }
            @if referrers.is_empty() {
                p.muted { "No signatures, SBOMs or other artifacts refer to this one." }
            } @else {
                table {
                    thead { tr { th { "Artifact type" } th { "Digest" } th { "Size" } } }
                    tbody {
                        @for r in &referrers {
                            tr {
                                td { (r.artifact_type.as_deref().unwrap_or(&r.media_type)) }
                                td.digest { a href=(link(r.digest.as_str())) { code { (r.digest.as_str()) } } }
                                td { (human_bytes(r.size)) }
                            }
                        }
                    }
                }
            }
        }
        div.card {
            h2 { "Manifest" }
            pre { (pretty) }
        }
        @if deletes {
            div.card {
                h2 { "Delete this manifest" }
                p.muted { "The manifest and every tag pointing at it go; its blobs go with the next garbage collection." }
                form method="post" action={ "/ui/repositories/" (repo.as_str()) } {
                    input type="hidden" name="csrf" value=(csrf.0);
                    input type="hidden" name="action" value="delete-manifest";
                    input type="hidden" name="digest" value=(stored.digest.as_str());
                    button type="submit" { "Delete manifest" }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        page(&app, &caller, repo.as_str(), Some(&csrf.0), body),
    )
}

/// An image's config (when the manifest has one, it is JSON and not too large).
async fn config_of(app: &App, repo: &RepoName, manifest: &Value) -> Option<Value> {
    let digest = Digest::parse(manifest["config"]["digest"].as_str()?).ok()?;
    if manifest["config"]["size"].as_u64()? > MAX_CONFIG {
        return None;
    }
    let read = app.registry.read_blob(repo, &digest, None).await.ok()?;
    let bytes = match read.body {
        BlobBytes::File { file, start, len } if len <= MAX_CONFIG => {
            tokio::task::spawn_blocking(move || {
                let mut buffer = vec![0u8; len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut buffer, start)
                    .map(|()| buffer)
            })
            .await
            .ok()?
            .ok()?
        }
        BlobBytes::Stream(mut stream) => {
            use futures_util::StreamExt;
            let mut buffer = Vec::new();
            while let Some(chunk) = stream.next().await {
                buffer.extend_from_slice(&chunk.ok()?);
                if buffer.len() as u64 > MAX_CONFIG {
                    return None;
                }
            }
            buffer
        }
        BlobBytes::File { .. } => return None,
    };
    serde_json::from_slice(&bytes).ok()
}

fn config_markup(config: &Value) -> Markup {
    let inner = &config["config"];
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    html! {
        table {
            tbody {
                tr { th { "Platform" } td { (config["os"].as_str().unwrap_or("?")) "/" (config["architecture"].as_str().unwrap_or("?")) } }
                @if let Some(created) = config["created"].as_str() { tr { th { "Created" } td { (created) } } }
                @let entrypoint = list(&inner["Entrypoint"]);
                @if !entrypoint.is_empty() { tr { th { "Entrypoint" } td { code { (entrypoint.join(" ")) } } } }
                @let command = list(&inner["Cmd"]);
                @if !command.is_empty() { tr { th { "Command" } td { code { (command.join(" ")) } } } }
                @let environment = list(&inner["Env"]);
                @if !environment.is_empty() { tr { th { "Environment" } td { @for e in &environment { code { (e) } br; } } } }
            }
        }
        @if let Some(history) = config["history"].as_array() {
            h2 { "History" }
            table {
                tbody {
                    @for step in history {
                        tr {
                            td.muted { (step["created"].as_str().unwrap_or_default()) }
                            td { code { (step["created_by"].as_str().unwrap_or_default()) } }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /ui/artifact/raw?repository=&digest=`: the manifest's exact bytes, as a download.
pub(super) async fn artifact_raw(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (_, stored) = match artifact_target(&app, &caller, &csrf, &query).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let file = format!("attachment; filename=\"{}.json\"", stored.digest.hex());
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, stored.media_type.clone()),
            (header::CONTENT_DISPOSITION, file),
        ],
        stored.raw,
    )
        .into_response()
}
