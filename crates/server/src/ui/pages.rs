//! The read pages: the dashboard (projects the caller sees, what the registry holds), a
//! project (its repositories, members, robots), a repository (its tags, with pull
//! commands), and search (the artifact page is `artifact.rs`, a project's people and policies
//! `people.rs` and `policies.rs`, administration `admin.rs`). Each asks
//! access control first, as the API does: what a caller may not pull does not show.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use berth_auth::{Caller, Need, Permission, Principal};
use berth_oci::{RepoName, Tag};
use berth_registry::Page;
use maud::html;
use serde_json::Value;

use super::session::CsrfToken;
use super::{html_response, human_bytes, page, when};
use crate::App;

/// Rows per page of repositories and tags.
const PAGE_ROWS: usize = 100;
/// Projects listed at most for a registry without access control.
const MAX_DERIVED: usize = 10_000;
/// The registry's last tag updates the dashboard looks through for a caller's recent pushes.
const RECENT_SCANNED: usize = 500;
/// Recent pushes the dashboard shows.
const RECENT_SHOWN: usize = 8;

pub(super) fn problem(
    app: &App,
    caller: &Caller,
    csrf: &CsrfToken,
    status: StatusCode,
    message: &str,
) -> Response {
    let body =
        html! { h1 { (status.canonical_reason().unwrap_or("Error")) } p.error { (message) } };
    html_response(status, page(app, caller, "Error", Some(&csrf.0), body))
}

/// Refused or absent, in the words a page shows (an unknown project and one the caller may
/// not see look alike to anonymous callers, as in the API).
pub(super) async fn may_read(
    app: &App,
    caller: &Caller,
    csrf: &CsrfToken,
    project: &str,
) -> Result<(), Response> {
    // Whether the caller may pull from the project: what `/v2` asks, so anonymous
    // callers read public projects (the admin API's project needs want a login).
    let Ok(any_repository) = RepoName::parse(&format!("{project}/x")) else {
        return Err(problem(
            app,
            caller,
            csrf,
            StatusCode::NOT_FOUND,
            "No such project.",
        ));
    };
    let need = Need::Repository {
        name: &any_repository,
        permission: Permission::Read,
    };
    match app.access.authorize(caller, need).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let anonymous = caller.principal == Principal::Anonymous;
            let (status, message) = match e {
                berth_auth::AuthError::NotFound(_) => {
                    (StatusCode::NOT_FOUND, "No such project.".to_owned())
                }
                _ if anonymous => (
                    StatusCode::UNAUTHORIZED,
                    "Sign in to see this project.".to_owned(),
                ),
                _ => (
                    StatusCode::FORBIDDEN,
                    "You may not see this project.".to_owned(),
                ),
            };
            Err(problem(app, caller, csrf, status, &message))
        }
    }
}

/// `GET /`: the dashboard, or the sign-in page for an anonymous caller where sign-in
/// exists and nothing is public.
pub(super) async fn home(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
) -> Response {
    let mut projects = match app.access.accounts().projects(&caller).await {
        Ok(projects) => projects,
        Err(e) => {
            return problem(
                &app,
                &caller,
                &csrf,
                StatusCode::SERVICE_UNAVAILABLE,
                &e.to_string(),
            )
        }
    };
    if !app.access.enabled() {
        // Without access control pushes make no project records: the repositories'
        // first path segments are the projects.
        let names = app
            .registry
            .repository_projects(MAX_DERIVED)
            .await
            .unwrap_or_default();
        let recorded: std::collections::HashSet<String> =
            projects.iter().map(|p| p.name.clone()).collect();
        for project in names {
            if !recorded.contains(&project) {
                projects.push(berth_meta::ProjectRecord {
                    name: project,
                    public: true,
                    created_ms: 0,
                });
            }
        }
        projects.sort_by(|a, b| a.name.cmp(&b.name));
    }
    if projects.is_empty() && caller.principal == Principal::Anonymous && app.access.enabled() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/ui/sign-in")]).into_response();
    }
    let counts = app.registry.store_counts().await.ok();
    // Recent pushes: the registry's last tag updates, of those the projects the caller
    // sees. A caller who sees little of a busy registry may find none of its own among
    // them; each project page shows its repositories' last pushes.
    let visible: std::collections::HashSet<&str> =
        projects.iter().map(|p| p.name.as_str()).collect();
    let pushes: Vec<berth_meta::RecentTag> = app
        .registry
        .recent_tags(RECENT_SCANNED)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|t| visible.contains(t.repo.split('/').next().unwrap_or_default()))
        .take(RECENT_SHOWN)
        .collect();
    let last_gc = app.registry.last_collection().await.ok().flatten();
    let (metadata, storage) = app.registry.readiness().await;
    let healthy = metadata.is_ok() && storage.is_ok();
    let body = html! {
        h1 { "Projects" }
        div.card.stats {
            div.stat { b { (projects.len()) } span { "projects you see" } }
            @if let Some(c) = counts {
                div.stat { b { (c.repositories) } span { "repositories" } }
                div.stat { b { (c.manifests) } span { "manifests" } }
                div.stat { b { (human_bytes(c.blob_bytes)) } span { "stored (" (c.blobs) " blobs)" } }
            }
            div.stat {
                b { @if healthy { "ready" } @else { span.error { "not ready" } } }
                span { "registry health" }
            }
            @if let Some((at, removed)) = &last_gc {
                div.stat title=(removed) { b { (super::when(*at)) } span { "last garbage collection" } }
            }
        }
        @if !pushes.is_empty() {
            div.card {
                h2 { "Recent pushes" }
                table {
                    thead { tr { th { "Tag" } th { "Digest" } th { "By" } th { "When" } } }
                    tbody {
                        @for p in &pushes {
                            tr {
                                td { a href={ "/ui/repositories/" (p.repo) } { (p.repo) ":" (p.tag) } }
                                td.digest { a href={ "/ui/artifact?repository=" (urlencode(&p.repo)) "&digest=" (urlencode(&p.digest)) } { code { (p.digest.get(..19).unwrap_or(&p.digest)) "…" } } }
                                td { (p.pushed_by) }
                                td { (super::when(p.updated_ms)) }
                            }
                        }
                    }
                }
            }
        }
        div.card {
            @if projects.is_empty() {
                p.muted { "No projects yet: push an image and its project is made." }
            } @else {
                table {
                    thead { tr { th { "Project" } th { "Access" } th { "Created" } } }
                    tbody {
                        @for p in &projects {
                            tr {
                                td { a href={ "/ui/projects/" (p.name) } { (p.name) } }
                                td { span.badge { @if p.public { "public" } @else { "private" } } }
                                td { @if p.created_ms > 0 { (when(p.created_ms)) } }
                            }
                        }
                    }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        page(&app, &caller, "Projects", Some(&csrf.0), body),
    )
}

/// `GET /ui/projects/{name}?last=`: the project's repositories, a page at a time.
pub(super) async fn project(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = may_read(&app, &caller, &csrf, &name).await {
        return refused;
    }
    let last = query
        .get("last")
        .filter(|l| l.len() <= 255)
        .map(String::as_str);
    let repositories = match app.registry.repositories(&name, last, PAGE_ROWS).await {
        Ok(r) => r,
        Err(e) => {
            return problem(
                &app,
                &caller,
                &csrf,
                StatusCode::SERVICE_UNAVAILABLE,
                &e.to_string(),
            )
        }
    };
    let next = (repositories.len() == PAGE_ROWS)
        .then(|| repositories.last().map(|r| r.name.clone()))
        .flatten();
    let body = html! {
        h1 { "Project " (name) }
        div.card {
            @if repositories.is_empty() {
                p.muted { "No repositories here." }
            } @else {
                table {
                    thead { tr { th { "Repository" } th { "Tags" } th { "Size" } th { "Manifests" } th { "Last push" } } }
                    tbody {
                        @for r in &repositories {
                            tr {
                                td { a href={ "/ui/repositories/" (r.name) } { (r.name) } }
                                td { (count(r.tags)) }
                                td { (human_bytes(r.bytes)) @if r.manifests > berth_meta::COUNT_CAP { "+" } }
                                td { (count(r.manifests)) }
                                td { @if let Some(at) = r.last_push_ms { (when(at)) } }
                            }
                        }
                    }
                }
                @if let Some(next) = &next {
                    div.pager { a href={ "/ui/projects/" (name) "?last=" (urlencode(next)) } { "Next page" } }
                }
            }
        }
        (super::people::people(&app, &caller, &csrf, &name).await)
    };
    html_response(
        StatusCode::OK,
        page(&app, &caller, &name, Some(&csrf.0), body),
    )
}

/// A count that may have stopped at the cap: "10000+" then.
fn count(n: u64) -> String {
    if n > berth_meta::COUNT_CAP {
        format!("{}+", berth_meta::COUNT_CAP)
    } else {
        n.to_string()
    }
}

/// Percent-encodes a query value.
pub(super) fn urlencode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a manifest's descriptors add up to: its layers' sizes (or, for an index, its
/// children's platforms).
fn image_size(manifest: &Value) -> u64 {
    let layers: u64 = manifest["layers"]
        .as_array()
        .map(|l| l.iter().filter_map(|d| d["size"].as_u64()).sum())
        .unwrap_or(0);
    layers + manifest["config"]["size"].as_u64().unwrap_or(0)
}

fn platforms(manifest: &Value) -> Vec<String> {
    manifest["manifests"]
        .as_array()
        .map(|children| {
            children
                .iter()
                .filter_map(|c| {
                    let p = &c["platform"];
                    let os = p["os"].as_str()?;
                    let arch = p["architecture"].as_str()?;
                    Some(match p["variant"].as_str() {
                        Some(v) => format!("{os}/{arch}/{v}"),
                        None => format!("{os}/{arch}"),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `GET /ui/repositories/{name}?last=`: the tags, a page at a time, with their digests,
/// sizes and platforms, and the commands that pull them.
pub(super) async fn repository(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Ok(repo) = RepoName::parse(&name) else {
        return problem(
            &app,
            &caller,
            &csrf,
            StatusCode::BAD_REQUEST,
            "Not a repository name.",
        );
    };
    if let Err(refused) = may_read(&app, &caller, &csrf, repo.project()).await {
        return refused;
    }
    let last = query
        .get("last")
        .filter(|l| l.len() <= 128)
        .map(String::as_str);
    // Whether the repository exists at all (a cheap look), then one page of its tags with
    // their manifests, in one statement.
    let exists = app
        .registry
        .list_tags(
            &repo,
            Page {
                limit: Some(1),
                after: None,
            },
        )
        .await;
    match exists {
        Ok(_) => {}
        Err(berth_registry::RegistryError::NameUnknown { .. }) => {
            return problem(
                &app,
                &caller,
                &csrf,
                StatusCode::NOT_FOUND,
                "No such repository.",
            );
        }
        Err(e) => {
            return problem(
                &app,
                &caller,
                &csrf,
                StatusCode::SERVICE_UNAVAILABLE,
                &e.to_string(),
            )
        }
    }
    // A prefix filter over the tags' order: as fast at 100,000 tags as at 100.
    let prefix = query
        .get("q")
        .map(|q| q.trim())
        .filter(|q| q.len() <= 128 && Tag::parse(q).is_ok())
        .unwrap_or_default()
        .to_owned();
    let details = match app
        .registry
        .tag_details(&repo, last, &prefix, PAGE_ROWS)
        .await
    {
        Ok(details) => details,
        Err(e) => {
            return problem(
                &app,
                &caller,
                &csrf,
                StatusCode::SERVICE_UNAVAILABLE,
                &e.to_string(),
            )
        }
    };
    let tags: Vec<String> = details.iter().map(|d| d.tag.clone()).collect();
    let rows: Vec<_> = details
        .into_iter()
        .map(|d| {
            let manifest: Value = serde_json::from_slice(&d.raw).unwrap_or_default();
            let size = image_size(&manifest);
            (
                d.tag,
                d.digest,
                d.media_type,
                size,
                platforms(&manifest),
                d.updated_ms,
                d.pushed_by,
            )
        })
        .collect();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| h.len() <= 255)
        .unwrap_or("registry.example");
    let next = (tags.len() == PAGE_ROWS)
        .then(|| tags.last().cloned())
        .flatten();
    let example = rows.first().map_or("latest".to_owned(), |r| r.0.clone());
    let delete = Need::Project {
        name: repo.project(),
        permission: Permission::Delete,
    };
    let deletes = app.access.authorize(&caller, delete).await.is_ok();
    let action = format!("/ui/repositories/{}", repo.as_str());
    let body = html! {
        h1 { (repo.as_str()) }
        div.card {
            h2 { "Pull" }
            pre { "docker pull " (host) "/" (repo.as_str()) ":" (example) "\n"
                  "podman pull " (host) "/" (repo.as_str()) ":" (example) "\n"
                  "berth pull " (host) "/" (repo.as_str()) ":" (example) }
        }
        div.card {
            h2 { "Tags" }
            form method="get" action=(action) {
                input name="q" placeholder="tags starting with…" maxlength="128" value=(prefix);
                " "
                button type="submit" { "Filter" }
            }
            @if rows.is_empty() {
                p.muted { "No tags." }
            } @else {
                table {
                    thead { tr { th { "Tag" } th { "Digest" } th { "Size" } th { "Platforms" } th { "Pushed" } th { "By" } th { "Type" } @if deletes { th {} } } }
                    tbody {
                        @for (tag, digest, media_type, size, platforms, pushed, pusher) in &rows {
                            tr {
                                td { (tag) }
                                td.digest { a href={ "/ui/artifact?repository=" (urlencode(repo.as_str())) "&digest=" (urlencode(digest.as_str())) } { code { (&digest.as_str()[..19]) "…" } } }
                                td { (human_bytes(*size)) }
                                td { (platforms.join(", ")) }
                                td { (super::when(*pushed)) }
                                td { (pusher) }
                                td.muted { (media_type) }
                                @if deletes {
                                    td {
                                        form method="post" action=(action) {
                                            input type="hidden" name="csrf" value=(csrf.0);
                                            input type="hidden" name="action" value="delete-tag";
                                            input type="hidden" name="tag" value=(tag);
                                            button.link type="submit" aria-label={ "Delete tag " (tag) } { "Delete tag" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                @if let Some(next) = &next {
                    div.pager { a href={ "/ui/repositories/" (repo.as_str()) "?q=" (urlencode(&prefix)) "&last=" (urlencode(next)) } { "Next page" } }
                }
            }
        }
        @if deletes {
            div.card {
                h2 { "Delete the repository" }
                p.muted { "Every tag and manifest in it goes; its blobs go with the next garbage collection." }
                form method="post" action=(action) {
                    input type="hidden" name="csrf" value=(csrf.0);
                    input type="hidden" name="action" value="delete-repository";
                    button type="submit" { "Delete " (repo.as_str()) }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        page(&app, &caller, repo.as_str(), Some(&csrf.0), body),
    )
}

/// Search hits shown at most, per kind.
const MAX_HITS: usize = 50;

/// `GET /ui/search?q=`: projects and repositories the caller may see whose names hold
/// the text.
pub(super) async fn search(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let q = query
        .get("q")
        .map(|q| q.trim().to_lowercase())
        .filter(|q| !q.is_empty() && q.len() <= 255)
        .unwrap_or_default();
    let (mut projects, mut repositories) = (Vec::new(), Vec::new());
    if !q.is_empty() {
        if let Ok(all) = app.access.accounts().projects(&caller).await {
            projects = all
                .into_iter()
                .filter(|p| p.name.contains(&q))
                .take(MAX_HITS)
                .collect();
        }
        if let Ok(visible) = app.access.visible_projects(&caller).await {
            let all = Page {
                limit: None,
                after: None,
            };
            repositories = app
                .registry
                .catalog(all, visible.as_deref())
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|name| name.contains(&q))
                .take(MAX_HITS)
                .collect();
        }
    }
    let body = html! {
        h1 { "Search" }
        div.card {
            form method="get" action="/ui/search" {
                input name="q" value=(q) maxlength="255" placeholder="a project or repository name";
                " "
                button type="submit" { "Search" }
            }
        }
        @if !q.is_empty() {
            div.card {
                h2 { "Projects" }
                @if projects.is_empty() { p.muted { "None." } }
                @for p in &projects { p { a href={ "/ui/projects/" (p.name) } { (p.name) } } }
                h2 { "Repositories" }
                @if repositories.is_empty() { p.muted { "None." } }
                @for r in &repositories { p { a href={ "/ui/repositories/" (r) } { (r) } } }
            }
        }
    };
    html_response(
        StatusCode::OK,
        page(&app, &caller, "Search", Some(&csrf.0), body),
    )
}
