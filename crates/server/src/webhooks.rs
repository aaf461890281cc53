//! The webhook policy API: `/api/v1/webhooks` (system-wide, system administrators) and
//! `/api/v1/projects/{name}/webhooks` (the project's managers), each with `/{hook}`,
//! `/{hook}/deliveries` (the delivery log) and `/{hook}/deliveries/{seq}/redeliver`.
//! Access control decides who may; `berth_webhooks` checks what is asked for.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_auth::time::rfc3339;
use berth_auth::{Need, Permission};
use berth_meta::{Actor, DeliveryRecord, WebhookPatch, WebhookRecord};
use berth_webhooks::WebhookRequest;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::caller_of;
use crate::error::{Code, OciError};
use crate::App;

/// The most deliveries one page of the log lists.
const MAX_PAGE: usize = 1000;

fn bad_request(message: impl Into<String>) -> OciError {
    OciError::new(StatusCode::BAD_REQUEST, Code::BadRequest, message)
}

fn not_found(project: Option<&str>, name: &str) -> OciError {
    let scope = project.map_or("system-wide".to_owned(), |p| format!("in project {p}"));
    OciError::new(
        StatusCode::NOT_FOUND,
        Code::NotFound,
        format!("no webhook {name:?} {scope}"),
    )
}

fn reply(status: StatusCode, value: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// A policy as the API shows it: never its secret, only whether requests are signed.
fn webhook_json(w: &WebhookRecord) -> Value {
    json!({
        "name": w.name,
        "project": w.project,
        "url": w.url,
        "events": w.events,
        "format": w.format,
        "enabled": w.enabled,
        "signed": !w.secret.is_empty(),
        "created_at": rfc3339(w.created_ms),
    })
}

fn delivery_json(d: &DeliveryRecord) -> Value {
    json!({
        "event": d.seq,
        "state": d.state.as_str(),
        "attempts": d.attempts,
        "enqueued_at": rfc3339(d.created_ms),
        "next_attempt_at": (d.state == berth_meta::DeliveryState::Pending).then(|| rfc3339(d.next_attempt_ms)),
        "last_attempt_at": d.last_attempt_ms.map(rfc3339),
        "last_status": d.last_status,
        "last_error": d.last_error,
        "latency_ms": d.latency_ms,
    })
}

/// Authorizes the caller for the scope and names them for the event log.
async fn admit(
    app: &App,
    extensions: &Extensions,
    project: Option<&str>,
) -> Result<Actor, OciError> {
    let caller = caller_of(extensions);
    let need = match project {
        None => Need::System,
        Some(name) => Need::Project {
            name,
            permission: Permission::Manage,
        },
    };
    // A project need grants nothing to create: the project must exist.
    let _ = app.access.authorize(&caller, need).await?;
    Ok(caller.as_actor())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWebhook {
    name: String,
    url: String,
    events: Vec<String>,
    format: Option<String>,
    secret: Option<String>,
    enabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeWebhook {
    url: Option<String>,
    events: Option<Vec<String>>,
    format: Option<String>,
    secret: Option<String>,
    enabled: Option<bool>,
}

fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("request body: {e}")))
}

async fn create(
    app: &App,
    extensions: &Extensions,
    project: Option<&str>,
    bytes: &Bytes,
) -> Result<Response, OciError> {
    let by = admit(app, extensions, project).await?;
    let req: CreateWebhook = body(bytes)?;
    let request = WebhookRequest {
        name: req.name,
        url: req.url,
        events: req.events,
        format: req.format,
        secret: req.secret,
        enabled: req.enabled,
    };
    let created = app.webhooks.create(project, request, &by).await?;
    Ok(reply(StatusCode::CREATED, webhook_json(&created)))
}

async fn list(
    app: &App,
    extensions: &Extensions,
    project: Option<&str>,
) -> Result<Response, OciError> {
    admit(app, extensions, project).await?;
    let hooks = app.webhooks.list(project).await?;
    Ok(reply(
        StatusCode::OK,
        json!({ "webhooks": hooks.iter().map(webhook_json).collect::<Vec<_>>() }),
    ))
}

async fn get_one(
    app: &App,
    extensions: &Extensions,
    project: Option<&str>,
    name: &str,
) -> Result<Response, OciError> {
    admit(app, extensions, project).await?;
    match app.webhooks.get(project, name).await? {
        Some(hook) => Ok(reply(StatusCode::OK, webhook_json(&hook))),
        None => Err(not_found(project, name)),
    }
}

async fn change(
    app: &App,
    extensions: &Extensions,
    project: Option<&str>,
    name: &str,
    bytes: &Bytes,
) -> Result<Response, OciError> {
    let by = admit(app, extensions, project).await?;
    let req: ChangeWebhook = body(bytes)?;
    let patch = WebhookPatch {
        url: req.url,
        events: req.events,
        format: req.format,
        secret: req.secret,
        enabled: req.enabled,
    };
    match app.webhooks.update(project, name, patch, &by).await? {
        Some(hook) => Ok(reply(StatusCode::OK, webhook_json(&hook))),
        None => Err(not_found(project, name)),
    }
}

async fn remove(
    app: &App,
    extensions: &Extensions,
    project: Option<&str>,
    name: &str,
) -> Result<Response, OciError> {
    let by = admit(app, extensions, project).await?;
    if app.webhooks.delete(project, name, &by).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found(project, name))
    }
}

async fn deliveries(
    app: &App,
    extensions: &Extensions,
    project: Option<&str>,
    name: &str,
    params: &HashMap<String, String>,
) -> Result<Response, OciError> {
    admit(app, extensions, project).await?;
    let number = |key: &str| -> Result<Option<i64>, OciError> {
        params
            .get(key)
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| bad_request(format!("{key}={v}: expected a whole number")))
            })
            .transpose()
    };
    let limit = number("n")?.map_or(100, |n| (n as usize).clamp(1, MAX_PAGE));
    let before = number("before")?;
    match app
        .webhooks
        .deliveries(project, name, before, limit)
        .await?
    {
        Some(log) => Ok(reply(
            StatusCode::OK,
            json!({ "deliveries": log.iter().map(delivery_json).collect::<Vec<_>>() }),
        )),
        None => Err(not_found(project, name)),
    }
}

async fn redeliver(
    app: &App,
    extensions: &Extensions,
    project: Option<&str>,
    name: &str,
    seq: &str,
) -> Result<Response, OciError> {
    admit(app, extensions, project).await?;
    let seq: i64 = seq
        .parse()
        .map_err(|_| bad_request("the event must be a whole number"))?;
    if app.webhooks.redeliver(project, name, seq).await? {
        Ok(StatusCode::ACCEPTED.into_response())
    } else {
        Err(OciError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!("no delivery of event {seq} by webhook {name:?}"),
        ))
    }
}

/// `POST /api/v1/webhooks`.
pub(crate) async fn create_system(
    State(app): State<App>,
    extensions: Extensions,
    bytes: Bytes,
) -> Result<Response, OciError> {
    create(&app, &extensions, None, &bytes).await
}

/// `GET /api/v1/webhooks`.
pub(crate) async fn list_system(
    State(app): State<App>,
    extensions: Extensions,
) -> Result<Response, OciError> {
    list(&app, &extensions, None).await
}

/// `GET /api/v1/webhooks/{hook}`.
pub(crate) async fn get_system(
    State(app): State<App>,
    extensions: Extensions,
    Path(hook): Path<String>,
) -> Result<Response, OciError> {
    get_one(&app, &extensions, None, &hook).await
}

/// `PUT /api/v1/webhooks/{hook}`.
pub(crate) async fn change_system(
    State(app): State<App>,
    extensions: Extensions,
    Path(hook): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    change(&app, &extensions, None, &hook, &bytes).await
}

/// `DELETE /api/v1/webhooks/{hook}`.
pub(crate) async fn delete_system(
    State(app): State<App>,
    extensions: Extensions,
    Path(hook): Path<String>,
) -> Result<Response, OciError> {
    remove(&app, &extensions, None, &hook).await
}

/// `GET /api/v1/webhooks/{hook}/deliveries`.
pub(crate) async fn deliveries_system(
    State(app): State<App>,
    extensions: Extensions,
    Path(hook): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, OciError> {
    deliveries(&app, &extensions, None, &hook, &params).await
}

/// `POST /api/v1/webhooks/{hook}/deliveries/{event}/redeliver`.
pub(crate) async fn redeliver_system(
    State(app): State<App>,
    extensions: Extensions,
    Path((hook, event)): Path<(String, String)>,
) -> Result<Response, OciError> {
    redeliver(&app, &extensions, None, &hook, &event).await
}

/// `POST /api/v1/projects/{name}/webhooks`.
pub(crate) async fn create_project(
    State(app): State<App>,
    extensions: Extensions,
    Path(project): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    create(&app, &extensions, Some(&project), &bytes).await
}

/// `GET /api/v1/projects/{name}/webhooks`.
pub(crate) async fn list_project(
    State(app): State<App>,
    extensions: Extensions,
    Path(project): Path<String>,
) -> Result<Response, OciError> {
    list(&app, &extensions, Some(&project)).await
}

/// `GET /api/v1/projects/{name}/webhooks/{hook}`.
pub(crate) async fn get_project(
    State(app): State<App>,
    extensions: Extensions,
    Path((project, hook)): Path<(String, String)>,
) -> Result<Response, OciError> {
    get_one(&app, &extensions, Some(&project), &hook).await
}

/// `PUT /api/v1/projects/{name}/webhooks/{hook}`.
pub(crate) async fn change_project(
    State(app): State<App>,
    extensions: Extensions,
    Path((project, hook)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    change(&app, &extensions, Some(&project), &hook, &bytes).await
}

/// `DELETE /api/v1/projects/{name}/webhooks/{hook}`.
pub(crate) async fn delete_project(
    State(app): State<App>,
    extensions: Extensions,
    Path((project, hook)): Path<(String, String)>,
) -> Result<Response, OciError> {
    remove(&app, &extensions, Some(&project), &hook).await
}

/// `GET /api/v1/projects/{name}/webhooks/{hook}/deliveries`.
pub(crate) async fn deliveries_project(
    State(app): State<App>,
    extensions: Extensions,
    Path((project, hook)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, OciError> {
    deliveries(&app, &extensions, Some(&project), &hook, &params).await
}

/// `POST /api/v1/projects/{name}/webhooks/{hook}/deliveries/{event}/redeliver`.
pub(crate) async fn redeliver_project(
    State(app): State<App>,
    extensions: Extensions,
    Path((project, hook, event)): Path<(String, String, String)>,
) -> Result<Response, OciError> {
    redeliver(&app, &extensions, Some(&project), &hook, &event).await
}
