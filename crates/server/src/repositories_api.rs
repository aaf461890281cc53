//! Repositories through the admin API: a project's repositories with what each holds
//! (`GET /api/v1/projects/{name}/repositories`, for whoever may pull from the project),
//! and deleting one whole (`DELETE /api/v1/repositories/{repository}`, for whoever may
//! delete in its project).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_auth::time::rfc3339;
use berth_auth::{Need, Permission};
use berth_oci::RepoName;
use serde_json::{json, Value};

use crate::auth::caller_of;
use crate::error::{Code, OciError};
use crate::App;

/// Repositories per page at most (and by default).
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

fn bad_request(message: impl Into<String>) -> OciError {
    OciError::new(StatusCode::BAD_REQUEST, Code::BadRequest, message)
}

/// `GET /api/v1/projects/{name}/repositories?n=&last=`.
pub(crate) async fn list_repositories(
    State(app): State<App>,
    extensions: Extensions,
    Path(project): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, OciError> {
    let caller = caller_of(&extensions);
    let need = Need::Project {
        name: &project,
        permission: Permission::Read,
    };
    let _ = app.access.authorize(&caller, need).await?;
    let limit = match query.get("n") {
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| bad_request(format!("n is 1 to {MAX_PAGE}")))?,
        None => DEFAULT_PAGE,
    };
    let last = query.get("last").map(String::as_str);
    if last.is_some_and(|l| l.len() > 255) {
        return Err(bad_request("last is a repository name"));
    }
    let page = app.registry.repositories(&project, last, limit).await?;
    let next = (page.len() == limit).then(|| page.last().map(|r| r.name.clone()));
    let repositories: Vec<Value> = page
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "tags": r.tags,
                "manifests": r.manifests,
                "bytes": r.bytes,
                "last_push_at": r.last_push_ms.map(rfc3339),
            })
        })
        .collect();
    let body = json!({"repositories": repositories, "next": next.flatten()});
    Ok((
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response())
}

/// `DELETE /api/v1/repositories/{repository}`: the repository with everything in it.
pub(crate) async fn delete_repository(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let repo = RepoName::parse(&name)?;
    let caller = caller_of(&extensions);
    let need = Need::Project {
        name: repo.project(),
        permission: Permission::Delete,
    };
    let _ = app.access.authorize(&caller, need).await?;
    let manifests = app
        .registry
        .delete_repository(&repo, &caller.as_actor())
        .await?;
    Ok((
        StatusCode::OK,
        [("content-type", "application/json")],
        json!({"repository": repo.as_str(), "manifests_deleted": manifests}).to_string(),
    )
        .into_response())
}
