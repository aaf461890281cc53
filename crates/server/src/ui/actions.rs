//! What the UI changes: robot accounts (created with the secret shown once, deleted),
//! tags and repositories (deleted), and garbage collection (a dry run, then a run). Every
//! form carries the browser's CSRF value; every change goes through the same service call
//! and access check as its `/api/v1` operation, so a role that may not do it through the
//! API may not do it here.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Form};
use berth_auth::{AuthError, Caller, Need, NewRobot, NewUser, Permission};
use berth_oci::{Reference, RepoName, Tag};
use maud::html;

use super::pages::urlencode;
use super::session::{csrf_matches, refused_form, CsrfToken};
use super::{html_response, human_bytes, page};
use crate::App;

fn back(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

/// A refusal or failure as a page.
fn failed(app: &App, caller: &Caller, csrf: &CsrfToken, e: &AuthError) -> Response {
    let status = match e {
        AuthError::Unauthenticated | AuthError::BadCredentials => StatusCode::UNAUTHORIZED,
        AuthError::Denied(_) | AuthError::InsufficientScope(_) => StatusCode::FORBIDDEN,
        AuthError::NotFound(_) => StatusCode::NOT_FOUND,
        AuthError::Invalid(_) => StatusCode::BAD_REQUEST,
        AuthError::Conflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = html! { h1 { "Not done" } p.error { (e.to_string()) } p { a href="/" { "Back to the projects" } } };
    html_response(status, page(app, caller, "Not done", Some(&csrf.0), body))
}

/// `POST /ui/projects/{name}/robots`: a robot with the checked permissions; its secret
/// is shown on the answer and never again.
pub(super) async fn create_robot(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path(project): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let fields: HashMap<&str, &str> = form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if !csrf_matches(fields.get("csrf").copied(), &csrf) {
        return refused_form();
    }
    let permissions: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "permission")
        .map(|(_, v)| v.clone())
        .collect();
    let expires_in = match expiry(fields.get("expires_in_days").copied(), 1) {
        Ok(expires_in) => expires_in,
        Err(e) => return failed(&app, &caller, &csrf, &e),
    };
    let new = NewRobot {
        name: fields.get("name").copied().unwrap_or_default().to_owned(),
        permissions,
        expires_in,
    };
    match app
        .access
        .accounts()
        .create_robot(&caller, &project, new)
        .await
    {
        Ok((robot, secret)) => {
            let login = berth_auth::robot_login(&robot);
            let body = html! {
                h1 { "Robot " (login) }
                div.card {
                    p { "Its secret, shown this once: copy it now." }
                    pre.secret { (secret) }
                    p.muted { "Log in with: " code { "docker login -u '" (login) "'" } }
                    p { a href={ "/ui/projects/" (project) } { "Back to " (project) } }
                }
            };
            html_response(
                StatusCode::CREATED,
                page(&app, &caller, &login, Some(&csrf.0), body),
            )
        }
        Err(e) => failed(&app, &caller, &csrf, &e),
    }
}

/// A robot expiry field: days from now, at least `least` and at most ten years; empty
/// for never.
fn expiry(field: Option<&str>, least: u64) -> Result<Option<Duration>, AuthError> {
    match field.unwrap_or("").trim() {
        "" => Ok(None),
        days => match days.parse::<u64>() {
            Ok(d) if (least..=3650).contains(&d) => Ok(Some(Duration::from_secs(d * 86_400))),
            _ => Err(AuthError::Invalid(format!(
                "expiry: {least} to 3650 days, or empty for never"
            ))),
        },
    }
}

/// `POST /ui/projects/{name}/robots/{robot}/expiry`: `expires_in_days` from now (0: at
/// once, and its tokens with it), empty for never.
pub(super) async fn set_robot_expiry(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path((project, robot)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    let expires_in = match expiry(form.get("expires_in_days").map(String::as_str), 0) {
        Ok(expires_in) => expires_in,
        Err(e) => return failed(&app, &caller, &csrf, &e),
    };
    match app
        .access
        .accounts()
        .set_robot_expiry(&caller, &project, &robot, expires_in)
        .await
    {
        Ok(_) => back(&format!("/ui/projects/{project}")),
        Err(e) => failed(&app, &caller, &csrf, &e),
    }
}

/// `POST /ui/projects/{name}/robots/{robot}/delete`.
pub(super) async fn delete_robot(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path((project, robot)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    match app
        .access
        .accounts()
        .delete_robot(&caller, &project, &robot)
        .await
    {
        Ok(()) => back(&format!("/ui/projects/{project}")),
        Err(e) => failed(&app, &caller, &csrf, &e),
    }
}

/// `POST /ui/repositories/{name}`: `action=delete-tag` (with `tag`),
/// `action=delete-manifest` (with `digest`: the manifest and every tag on it) or
/// `action=delete-repository`, for whoever may delete in the project.
pub(super) async fn change_repository(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    let Ok(repo) = RepoName::parse(&name) else {
        return failed(
            &app,
            &caller,
            &csrf,
            &AuthError::Invalid("not a repository name".into()),
        );
    };
    let need = Need::Project {
        name: repo.project(),
        permission: Permission::Delete,
    };
    if let Err(e) = app.access.authorize(&caller, need).await {
        return failed(&app, &caller, &csrf, &e);
    }
    let by = caller.as_actor();
    let done = match form.get("action").map(String::as_str) {
        Some("delete-tag") => {
            let Some(tag) = form.get("tag").and_then(|t| Tag::parse(t).ok()) else {
                return failed(
                    &app,
                    &caller,
                    &csrf,
                    &AuthError::Invalid("not a tag".into()),
                );
            };
            app.registry
                .delete_manifest(&repo, &Reference::Tag(tag), &by)
                .await
                .map(|()| format!("/ui/repositories/{}", repo.as_str()))
        }
        Some("delete-manifest") => {
            let Some(digest) = form
                .get("digest")
                .and_then(|d| berth_oci::Digest::parse(d).ok())
            else {
                return failed(
                    &app,
                    &caller,
                    &csrf,
                    &AuthError::Invalid("not a digest".into()),
                );
            };
            app.registry
                .delete_manifest(&repo, &Reference::Digest(digest), &by)
                .await
                .map(|()| format!("/ui/repositories/{}", repo.as_str()))
        }
        Some("delete-repository") => app
            .registry
            .delete_repository(&repo, &by)
            .await
            .map(|_| format!("/ui/projects/{}", urlencode(repo.project()))),
        _ => {
            return failed(
                &app,
                &caller,
                &csrf,
                &AuthError::Invalid("unknown action".into()),
            )
        }
    };
    match done {
        Ok(to) => back(&to),
        Err(e) => failed(&app, &caller, &csrf, &AuthError::NotFound(e.to_string())),
    }
}

/// `POST /ui/admin/gc`: a collection with the configured settings, as a dry run (what
/// would go) unless `run` is asked for (system administrators).
pub(super) async fn collect_garbage(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    if let Err(e) = app.access.authorize(&caller, Need::System).await {
        return failed(&app, &caller, &csrf, &e);
    }
    let mut options = app.gc.clone();
    options.dry_run = form.get("mode").map(String::as_str) != Some("run");
    let report = match app.registry.collect_garbage(&options).await {
        Ok(report) => report,
        Err(e) => return failed(&app, &caller, &csrf, &AuthError::Invalid(e.to_string())),
    };
    let body = html! {
        h1 { @if report.dry_run { "Garbage collection: what would go" } @else { "Garbage collection done" } }
        div.card.stats {
            div.stat { b { (report.blobs_removed_count) } span { "blobs" } }
            div.stat { b { (report.manifests_removed_count) } span { "manifests" } }
            div.stat { b { (human_bytes(report.bytes_freed)) } span { "freed" } }
            div.stat { b { (report.duration_ms) " ms" } span { "taken" } }
        }
        @if !report.blobs_removed.is_empty() {
            div.card {
                h2 { "Blobs" }
                @for blob in &report.blobs_removed { code.digest { (blob) } br; }
                @if report.blobs_removed_count > report.blobs_removed.len() as u64 {
                    p.muted { "and " (report.blobs_removed_count - report.blobs_removed.len() as u64) " more" }
                }
            }
        }
        @if report.dry_run {
            form method="post" action="/ui/admin/gc" {
                input type="hidden" name="csrf" value=(csrf.0);
                input type="hidden" name="mode" value="run";
                button type="submit" { "Collect now" }
            }
        }
        p { a href="/ui/admin" { "Back to administration" } }
    };
    html_response(
        StatusCode::OK,
        page(&app, &caller, "Garbage collection", Some(&csrf.0), body),
    )
}

/// `POST /ui/projects/{name}/members`: adds a member or changes a member's role (project
/// admins).
pub(super) async fn set_member(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path(project): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    let user = form.get("user").map(String::as_str).unwrap_or_default();
    let role = form.get("role").map(String::as_str).unwrap_or_default();
    match app
        .access
        .accounts()
        .set_member(&caller, &project, user, role)
        .await
    {
        Ok(_) => back(&format!("/ui/projects/{project}")),
        Err(e) => failed(&app, &caller, &csrf, &e),
    }
}

/// `POST /ui/projects/{name}/members/{user}/delete`.
pub(super) async fn remove_member(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path((project, user)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    match app
        .access
        .accounts()
        .remove_member(&caller, &project, &user)
        .await
    {
        Ok(()) => back(&format!("/ui/projects/{project}")),
        Err(e) => failed(&app, &caller, &csrf, &e),
    }
}

/// `POST /ui/projects/{name}/visibility`: `public=true` or `false` (project admins).
pub(super) async fn set_visibility(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path(project): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    let public = form.get("public").map(String::as_str) == Some("true");
    match app
        .access
        .accounts()
        .set_project_public(&caller, &project, public)
        .await
    {
        Ok(_) => back(&format!("/ui/projects/{project}")),
        Err(e) => failed(&app, &caller, &csrf, &e),
    }
}

/// `POST /ui/admin/users`: a user, with the password given or a generated one shown once
/// (system administrators).
pub(super) async fn create_user(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    let new = NewUser {
        name: form.get("name").cloned().unwrap_or_default(),
        password: form.get("password").filter(|p| !p.is_empty()).cloned(),
        admin: form.get("admin").map(String::as_str) == Some("true"),
    };
    match app.access.accounts().create_user(&caller, new).await {
        Ok((user, generated)) => {
            let body = html! {
                h1 { "User " (user.name) }
                div.card {
                    @if let Some(password) = &generated {
                        p { "Its password, shown this once: copy it now." }
                        pre.secret { (password) }
                    } @else {
                        p { "Created with the password given." }
                    }
                    p { a href="/ui/admin" { "Back to administration" } }
                }
            };
            html_response(
                StatusCode::CREATED,
                page(&app, &caller, &user.name, Some(&csrf.0), body),
            )
        }
        Err(e) => failed(&app, &caller, &csrf, &e),
    }
}

/// `POST /ui/admin/users/{name}/delete`: the user goes; its sessions and tokens stop
/// working at once (system administrators).
pub(super) async fn delete_user(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Path(name): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !csrf_matches(form.get("csrf").map(String::as_str), &csrf) {
        return refused_form();
    }
    match app.access.accounts().delete_user(&caller, &name).await {
        Ok(()) => back("/ui/admin"),
        Err(e) => failed(&app, &caller, &csrf, &e),
    }
}
