//! The admin REST API under `/api/v1`: users, projects, members, robot accounts, the audit
//! log and garbage collection. Documented in `api/openapi.json` (served at
//! `/api/v1/openapi.json`). Each handler parses, makes one call to [`AccessControl`]
//! (which authorizes and audits) or the registry, and answers JSON.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_auth::time::rfc3339;
use berth_auth::{robot_login, ImportOutcome, Need, NewRobot, NewUser};
use berth_auth::{AuditFilter, AuditRecord, ProjectRecord, RobotRecord, UserRecord};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::caller_of;
use crate::error::{Code, OciError};
use crate::App;

/// The OpenAPI description of this API, served as is.
pub(crate) const OPENAPI: &str = include_str!("../api/openapi.json");

type Params = HashMap<String, String>;

fn bad_request(message: impl Into<String>) -> OciError {
    OciError::new(StatusCode::BAD_REQUEST, Code::BadRequest, message)
}

fn flag(params: &Params, name: &str) -> Result<Option<bool>, OciError> {
    match params.get(name).map(String::as_str) {
        None => Ok(None),
        Some("true" | "1" | "") => Ok(Some(true)),
        Some("false" | "0") => Ok(Some(false)),
        Some(other) => Err(bad_request(format!(
            "{name}={other}: expected true or false"
        ))),
    }
}

fn number(params: &Params, name: &str) -> Result<Option<i64>, OciError> {
    params
        .get(name)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| bad_request(format!("{name}={v}: expected an integer")))
        })
        .transpose()
}

fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("request body: {e}")))
}

fn reply(status: StatusCode, value: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn user_json(u: &UserRecord) -> Value {
    json!({ "name": u.name, "admin": u.admin, "created_at": rfc3339(u.created_ms) })
}

fn project_json(p: &ProjectRecord) -> Value {
    json!({ "name": p.name, "public": p.public, "created_at": rfc3339(p.created_ms) })
}

fn robot_json(r: &RobotRecord) -> Value {
    json!({
        "name": robot_login(r),
        "project": r.project,
        "permissions": r.permissions,
        "expires_at": r.expires_ms.map(rfc3339),
        "created_at": rfc3339(r.created_ms),
    })
}

fn audit_json(r: &AuditRecord) -> Value {
    let e = &r.event;
    json!({
        "id": r.id,
        "time": rfc3339(e.at_ms),
        "actor": e.actor,
        "actor_kind": e.actor_kind,
        "address": e.address,
        "action": e.action,
        "resource": e.resource,
        "result": e.result,
        "detail": e.detail,
        "count": e.repeats,
    })
}

/// `POST /api/v1/gc[?dry_run=true][&delete_untagged=true]`: one collection with the
/// configured settings (system administrators).
pub(crate) async fn run_gc(
    State(app): State<App>,
    extensions: Extensions,
    Query(params): Query<Params>,
) -> Result<Response, OciError> {
    let caller = caller_of(&extensions);
    // A system need grants nothing beyond itself.
    let _ = app.access.authorize(&caller, Need::System).await?;
    let mut options = app.gc.clone();
    if let Some(dry) = flag(&params, "dry_run")? {
        options.dry_run = dry;
    }
    if let Some(untagged) = flag(&params, "delete_untagged")? {
        options.delete_untagged = untagged;
    }
    let report = app.registry.collect_garbage(&options).await?;
    let body = serde_json::to_value(&report).map_err(|e| OciError::internal(&e))?;
    Ok(reply(StatusCode::OK, body))
}

/// `GET /api/v1/openapi.json`.
pub(crate) async fn openapi() -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        OPENAPI,
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    name: String,
    password: Option<String>,
    #[serde(default)]
    admin: bool,
}

/// `POST /api/v1/users`.
pub(crate) async fn create_user(
    State(app): State<App>,
    extensions: Extensions,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let req: CreateUser = body(&bytes)?;
    let new = NewUser {
        name: req.name,
        password: req.password,
        admin: req.admin,
    };
    let (user, generated) = app
        .access
        .accounts()
        .create_user(&caller_of(&extensions), new)
        .await?;
    let mut value = user_json(&user);
    if let Some(password) = generated {
        value["password"] = password.into();
    }
    Ok(reply(StatusCode::CREATED, value))
}

/// `GET /api/v1/users`.
pub(crate) async fn list_users(
    State(app): State<App>,
    extensions: Extensions,
) -> Result<Response, OciError> {
    let users = app.access.accounts().users(&caller_of(&extensions)).await?;
    Ok(reply(
        StatusCode::OK,
        json!({ "users": users.iter().map(user_json).collect::<Vec<_>>() }),
    ))
}

/// `GET /api/v1/users/{name}`.
pub(crate) async fn get_user(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let user = app
        .access
        .accounts()
        .user(&caller_of(&extensions), &name)
        .await?;
    Ok(reply(StatusCode::OK, user_json(&user)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateUser {
    password: Option<String>,
    admin: Option<bool>,
}

/// `PUT /api/v1/users/{name}`.
pub(crate) async fn update_user(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let req: UpdateUser = body(&bytes)?;
    let user = app
        .access
        .accounts()
        .update_user(&caller_of(&extensions), &name, req.password, req.admin)
        .await?;
    Ok(reply(StatusCode::OK, user_json(&user)))
}

/// `DELETE /api/v1/users/{name}`.
pub(crate) async fn delete_user(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    app.access
        .accounts()
        .delete_user(&caller_of(&extensions), &name)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /api/v1/users/import`: an htpasswd file as the body.
pub(crate) async fn import_users(
    State(app): State<App>,
    extensions: Extensions,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let text = std::str::from_utf8(&bytes).map_err(|_| bad_request("htpasswd files are text"))?;
    let outcomes = app
        .access
        .accounts()
        .import_htpasswd(&caller_of(&extensions), text)
        .await?;
    let results: Vec<Value> = outcomes
        .iter()
        .map(|(name, outcome)| match outcome {
            ImportOutcome::Created => json!({ "name": name, "outcome": "created" }),
            ImportOutcome::Exists => json!({ "name": name, "outcome": "exists" }),
            ImportOutcome::Invalid(why) => {
                json!({ "name": name, "outcome": "invalid", "detail": why })
            }
        })
        .collect();
    Ok(reply(StatusCode::OK, json!({ "results": results })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProject {
    name: String,
    #[serde(default)]
    public: bool,
    /// Makes it a pull-through cache at once (system administrators).
    #[serde(default)]
    proxy_cache: Option<Value>,
}

/// `POST /api/v1/projects`.
pub(crate) async fn create_project(
    State(app): State<App>,
    extensions: Extensions,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let req: CreateProject = body(&bytes)?;
    // A cache's settings are checked before the project exists, so a refusal makes nothing.
    let proxy = match &req.proxy_cache {
        Some(value) => {
            Some(crate::proxy_api::check_new(&app, &extensions, &req.name, value).await?)
        }
        None => None,
    };
    let project = app
        .access
        .accounts()
        .create_project(&caller_of(&extensions), &req.name, req.public)
        .await?;
    let mut shown = project_json(&project);
    if let Some(settings) = proxy {
        crate::proxy_api::apply_new(&app, &extensions, settings).await?;
        shown["kind"] = "proxy-cache".into();
    }
    Ok(reply(StatusCode::CREATED, shown))
}

/// `GET /api/v1/projects`: the projects the caller can see.
pub(crate) async fn list_projects(
    State(app): State<App>,
    extensions: Extensions,
) -> Result<Response, OciError> {
    let projects = app
        .access
        .accounts()
        .projects(&caller_of(&extensions))
        .await?;
    Ok(reply(
        StatusCode::OK,
        json!({ "projects": projects.iter().map(project_json).collect::<Vec<_>>() }),
    ))
}

/// `GET /api/v1/projects/{name}`.
pub(crate) async fn get_project(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let project = app
        .access
        .accounts()
        .project(&caller_of(&extensions), &name)
        .await?;
    Ok(reply(StatusCode::OK, project_json(&project)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProject {
    public: bool,
}

/// `PUT /api/v1/projects/{name}`.
pub(crate) async fn update_project(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let req: UpdateProject = body(&bytes)?;
    let project = app
        .access
        .accounts()
        .set_project_public(&caller_of(&extensions), &name, req.public)
        .await?;
    Ok(reply(StatusCode::OK, project_json(&project)))
}

/// `DELETE /api/v1/projects/{name}`: only an empty project.
pub(crate) async fn delete_project(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    app.access
        .accounts()
        .delete_project(&caller_of(&extensions), &name)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/projects/{name}/members`.
pub(crate) async fn list_members(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let members = app
        .access
        .accounts()
        .members(&caller_of(&extensions), &name)
        .await?;
    let members: Vec<Value> = members
        .iter()
        .map(|m| json!({ "user": m.user, "role": m.role }))
        .collect();
    Ok(reply(StatusCode::OK, json!({ "members": members })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    user: String,
    role: String,
}

/// `POST /api/v1/projects/{name}/members`: adds a member (201) or changes its role (200).
pub(crate) async fn add_member(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let req: AddMember = body(&bytes)?;
    let added = app
        .access
        .accounts()
        .set_member(&caller_of(&extensions), &name, &req.user, &req.role)
        .await?;
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(reply(status, json!({ "user": req.user, "role": req.role })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRole {
    role: String,
}

/// `PUT /api/v1/projects/{name}/members/{user}`.
pub(crate) async fn set_member(
    State(app): State<App>,
    extensions: Extensions,
    Path((name, user)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let req: SetRole = body(&bytes)?;
    app.access
        .accounts()
        .set_member(&caller_of(&extensions), &name, &user, &req.role)
        .await?;
    Ok(reply(
        StatusCode::OK,
        json!({ "user": user, "role": req.role }),
    ))
}

/// `DELETE /api/v1/projects/{name}/members/{user}`.
pub(crate) async fn remove_member(
    State(app): State<App>,
    extensions: Extensions,
    Path((name, user)): Path<(String, String)>,
) -> Result<Response, OciError> {
    app.access
        .accounts()
        .remove_member(&caller_of(&extensions), &name, &user)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The longest robot expiry the API takes, in days (ten years).
const MAX_ROBOT_DAYS: u64 = 3650;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRobot {
    name: String,
    permissions: Vec<String>,
    expires_in_days: Option<u64>,
}

/// `POST /api/v1/projects/{name}/robots`: the answer carries the secret, once.
pub(crate) async fn create_robot(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let req: CreateRobot = body(&bytes)?;
    if req
        .expires_in_days
        .is_some_and(|d| d == 0 || d > MAX_ROBOT_DAYS)
    {
        return Err(bad_request(format!(
            "expires_in_days: 1 to {MAX_ROBOT_DAYS} (omit it for no expiry)"
        )));
    }
    let new = NewRobot {
        name: req.name,
        permissions: req.permissions,
        expires_in: req.expires_in_days.map(|d| Duration::from_secs(d * 86_400)),
    };
    let (robot, secret) = app
        .access
        .accounts()
        .create_robot(&caller_of(&extensions), &name, new)
        .await?;
    let mut value = robot_json(&robot);
    value["secret"] = secret.into();
    Ok(reply(StatusCode::CREATED, value))
}

/// `GET /api/v1/projects/{name}/robots`.
pub(crate) async fn list_robots(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let robots = app
        .access
        .accounts()
        .robots(&caller_of(&extensions), &name)
        .await?;
    Ok(reply(
        StatusCode::OK,
        json!({ "robots": robots.iter().map(robot_json).collect::<Vec<_>>() }),
    ))
}

/// `PATCH /api/v1/projects/{name}/robots/{robot}`: `{"expires_in_days": N}` sets the
/// expiry N days from now (0: at once), `{"expires_in_days": null}` makes it never expire.
pub(crate) async fn update_robot(
    State(app): State<App>,
    extensions: Extensions,
    Path((name, robot)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let req: serde_json::Map<String, Value> = body(&bytes)?;
    let days = match (req.len(), req.get("expires_in_days")) {
        (1, Some(Value::Null)) => None,
        (1, Some(Value::Number(n))) => match n.as_u64() {
            Some(d) if d <= MAX_ROBOT_DAYS => Some(d),
            _ => {
                return Err(bad_request(format!(
                    "expires_in_days: 0 to {MAX_ROBOT_DAYS}, or null"
                )))
            }
        },
        _ => return Err(bad_request(
            "request body: {\"expires_in_days\": days from now (0: at once), or null for never}",
        )),
    };
    let updated = app
        .access
        .accounts()
        .set_robot_expiry(
            &caller_of(&extensions),
            &name,
            &robot,
            days.map(|d| Duration::from_secs(d * 86_400)),
        )
        .await?;
    Ok(reply(StatusCode::OK, robot_json(&updated)))
}

/// `DELETE /api/v1/projects/{name}/robots/{robot}`.
pub(crate) async fn delete_robot(
    State(app): State<App>,
    extensions: Extensions,
    Path((name, robot)): Path<(String, String)>,
) -> Result<Response, OciError> {
    app.access
        .accounts()
        .delete_robot(&caller_of(&extensions), &name, &robot)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /api/v1/users/{name}/tokens`: the user's (or robot's) live refresh tokens.
pub(crate) async fn list_tokens(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let tokens = app
        .access
        .accounts()
        .refresh_tokens(&caller_of(&extensions), &name)
        .await?;
    let tokens: Vec<Value> = tokens
        .iter()
        .map(|t| {
            json!({
                "id": t.id,
                "client": t.client,
                "address": t.address,
                "created_at": rfc3339(t.created_ms),
                "expires_at": rfc3339(t.expires_ms),
                "last_used_at": rfc3339(t.last_used_ms),
            })
        })
        .collect();
    Ok(reply(StatusCode::OK, json!({ "tokens": tokens })))
}

/// `DELETE /api/v1/users/{name}/tokens/{id}`: revokes one refresh token.
pub(crate) async fn revoke_token(
    State(app): State<App>,
    extensions: Extensions,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, OciError> {
    app.access
        .accounts()
        .revoke_refresh_token(&caller_of(&extensions), &name, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Search hits per kind at most.
const MAX_SEARCH_HITS: usize = 100;

/// `GET /api/v1/search?q=…`: projects and repositories whose name contains `q`, among
/// those the caller may see (the same visibility as the catalog).
pub(crate) async fn search(
    State(app): State<App>,
    extensions: Extensions,
    Query(params): Query<Params>,
) -> Result<Response, OciError> {
    let caller = caller_of(&extensions);
    let q = params
        .get("q")
        .map(|q| q.trim().to_lowercase())
        .filter(|q| !q.is_empty())
        .ok_or_else(|| bad_request("q: the text to search for is required"))?;
    let projects: Vec<Value> = app
        .access
        .accounts()
        .projects(&caller)
        .await?
        .iter()
        .filter(|p| p.name.contains(&q))
        .take(MAX_SEARCH_HITS)
        .map(project_json)
        .collect();
    let visible = app.access.visible_projects(&caller).await?;
    let all = berth_registry::Page {
        limit: None,
        after: None,
    };
    let repositories: Vec<Value> = app
        .registry
        .catalog(all, visible.as_deref())
        .await?
        .into_iter()
        .filter(|name| name.contains(&q))
        .take(MAX_SEARCH_HITS)
        .map(|name| json!({ "name": name, "project": berth_auth::policy::project_of(&name) }))
        .collect();
    Ok(reply(
        StatusCode::OK,
        json!({ "projects": projects, "repositories": repositories }),
    ))
}

/// Events per page at most.
const MAX_AUDIT_PAGE: usize = 1000;

/// `GET /api/v1/audit`: newest first, filtered; `next_before` pages on.
pub(crate) async fn audit(
    State(app): State<App>,
    extensions: Extensions,
    Query(params): Query<Params>,
) -> Result<Response, OciError> {
    let limit = number(&params, "limit")?
        .unwrap_or(100)
        .clamp(1, MAX_AUDIT_PAGE as i64) as usize;
    let filter = AuditFilter {
        actor: params.get("actor").cloned(),
        action: params.get("action").cloned(),
        resource_prefix: params.get("resource").cloned(),
        result: params.get("result").cloned(),
        since_ms: number(&params, "since")?,
        until_ms: number(&params, "until")?,
        before_id: number(&params, "before")?,
        limit,
    };
    let events = app
        .access
        .accounts()
        .audit_log(&caller_of(&extensions), filter)
        .await?;
    let next = (events.len() == limit)
        .then(|| events.last().map(|e| e.id))
        .flatten();
    Ok(reply(
        StatusCode::OK,
        json!({ "events": events.iter().map(audit_json).collect::<Vec<_>>(), "next_before": next }),
    ))
}
