//! The replication API, for system administrators: `/api/v1/registries` (endpoints of
//! other registries; passwords are never shown back) and `/api/v1/replication/policies`,
//! with `/{name}/executions` to start a run and to list runs with their tasks.
//! `berth_replication` checks what is asked for; this module only maps it to HTTP.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_auth::time::rfc3339;
use berth_auth::Need;
use berth_meta::{Actor, ExecutionRecord, TaskRecord};
use berth_replication::Replication;
use serde_json::{json, Value};

use crate::auth::caller_of;
use crate::error::{Code, OciError};
use crate::App;

/// Executions one listing shows at most.
const MAX_EXECUTIONS: usize = 100;
/// Tasks shown per execution at most (the counts cover them all).
const MAX_TASKS_SHOWN: usize = 1000;

fn reply(status: StatusCode, value: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn body(bytes: &Bytes) -> Result<Value, OciError> {
    serde_json::from_slice(bytes).map_err(|e| {
        OciError::new(
            StatusCode::BAD_REQUEST,
            Code::BadRequest,
            format!("request body: {e}"),
        )
    })
}

/// The service, once the caller is known to be a system administrator.
async fn admit<'a>(
    app: &'a App,
    extensions: &Extensions,
) -> Result<(&'a Replication, Actor), OciError> {
    let caller = caller_of(extensions);
    let _ = app.access.authorize(&caller, Need::System).await?;
    let replication = app.replication.as_ref().ok_or_else(|| {
        OciError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "replication is not available on this node",
        )
    })?;
    Ok((replication, caller.as_actor()))
}

/// `GET /api/v1/registries`.
pub(crate) async fn list_registries(
    State(app): State<App>,
    extensions: Extensions,
) -> Result<Response, OciError> {
    let (replication, _) = admit(&app, &extensions).await?;
    let shown: Vec<Value> = replication
        .registries()
        .await?
        .iter()
        .map(|r| r.shown())
        .collect();
    Ok(reply(StatusCode::OK, Value::Array(shown)))
}

/// `POST /api/v1/registries`: adds an endpoint (a name taken is 409).
pub(crate) async fn create_registry(
    State(app): State<App>,
    extensions: Extensions,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let (replication, by) = admit(&app, &extensions).await?;
    let value = body(&bytes)?;
    if let Some(name) = value["name"].as_str() {
        if replication.registry_endpoint(name).await.is_ok() {
            return Err(OciError::new(
                StatusCode::CONFLICT,
                Code::Conflict,
                format!("registry {name} exists; PUT /api/v1/registries/{name} changes it"),
            ));
        }
    }
    let endpoint = replication.set_registry(&value, &by).await?;
    Ok(reply(StatusCode::CREATED, endpoint.shown()))
}

/// `GET /api/v1/registries/{name}`.
pub(crate) async fn get_registry(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let (replication, _) = admit(&app, &extensions).await?;
    Ok(reply(
        StatusCode::OK,
        replication.registry_endpoint(&name).await?.shown(),
    ))
}

/// `PUT /api/v1/registries/{name}`: replaces an endpoint's settings; a password left out
/// keeps the one stored.
pub(crate) async fn put_registry(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let (replication, by) = admit(&app, &extensions).await?;
    let mut value = body(&bytes)?;
    let existing = replication.registry_endpoint(&name).await?;
    if let Some(fields) = value.as_object_mut() {
        fields.insert("name".to_owned(), name.clone().into());
        let same_user = fields
            .get("username")
            .is_none_or(|u| u.as_str() == existing.username.as_deref());
        if !fields.contains_key("password") && same_user {
            fields.insert("username".to_owned(), existing.username.clone().into());
            fields.insert("password".to_owned(), existing.password.clone().into());
        }
    }
    let endpoint = replication.set_registry(&value, &by).await?;
    Ok(reply(StatusCode::OK, endpoint.shown()))
}

/// `DELETE /api/v1/registries/{name}` (409 while a policy uses it).
pub(crate) async fn delete_registry(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let (replication, by) = admit(&app, &extensions).await?;
    if replication.remove_registry(&name, &by).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(OciError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!("no registry {name:?}"),
        ))
    }
}

/// `POST /api/v1/registries/{name}/ping`: whether it answers and takes the credentials.
pub(crate) async fn ping_registry(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let (replication, _) = admit(&app, &extensions).await?;
    replication.ping_registry(&name).await?;
    Ok(reply(StatusCode::OK, json!({"reachable": true})))
}

/// `GET /api/v1/replication/policies`.
pub(crate) async fn list_policies(
    State(app): State<App>,
    extensions: Extensions,
) -> Result<Response, OciError> {
    let (replication, _) = admit(&app, &extensions).await?;
    let shown: Vec<Value> = replication
        .policies()
        .await?
        .iter()
        .map(|(p, _)| p.to_json())
        .collect();
    Ok(reply(StatusCode::OK, Value::Array(shown)))
}

/// `POST /api/v1/replication/policies` (a name taken is 409; its registry must exist).
pub(crate) async fn create_policy(
    State(app): State<App>,
    extensions: Extensions,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let (replication, by) = admit(&app, &extensions).await?;
    let value = body(&bytes)?;
    if let Some(name) = value["name"].as_str() {
        if replication.policy(name).await.is_ok() {
            return Err(OciError::new(
                StatusCode::CONFLICT,
                Code::Conflict,
                format!("replication policy {name} exists; PUT changes it"),
            ));
        }
    }
    let policy = replication.set_policy(&value, &by).await?;
    Ok(reply(StatusCode::CREATED, policy.to_json()))
}

/// `GET /api/v1/replication/policies/{name}`.
pub(crate) async fn get_policy(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let (replication, _) = admit(&app, &extensions).await?;
    Ok(reply(
        StatusCode::OK,
        replication.policy(&name).await?.to_json(),
    ))
}

/// `PUT /api/v1/replication/policies/{name}`: replaces a policy's settings.
pub(crate) async fn put_policy(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let (replication, by) = admit(&app, &extensions).await?;
    let mut value = body(&bytes)?;
    replication.policy(&name).await?;
    if let Some(fields) = value.as_object_mut() {
        fields.insert("name".to_owned(), name.into());
    }
    let policy = replication.set_policy(&value, &by).await?;
    Ok(reply(StatusCode::OK, policy.to_json()))
}

/// `DELETE /api/v1/replication/policies/{name}`, with its executions.
pub(crate) async fn delete_policy(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let (replication, by) = admit(&app, &extensions).await?;
    if replication.remove_policy(&name, &by).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(OciError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!("no replication policy {name:?}"),
        ))
    }
}

/// `POST /api/v1/replication/policies/{name}/executions`: starts a run now.
pub(crate) async fn start_execution(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let (replication, by) = admit(&app, &extensions).await?;
    let id = replication.start(&name, "manual", &by).await?;
    let runs = replication.executions(&name, MAX_EXECUTIONS).await?;
    let shown = runs
        .iter()
        .find(|(e, _)| e.id == id)
        .map_or_else(|| json!({"id": id}), |(e, t)| execution_json(e, t));
    Ok(reply(StatusCode::CREATED, shown))
}

/// `GET /api/v1/replication/policies/{name}/executions?n=`: the newest runs with their
/// tasks.
pub(crate) async fn list_executions(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, OciError> {
    let (replication, _) = admit(&app, &extensions).await?;
    let limit = match query.get("n") {
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_EXECUTIONS).contains(n))
            .ok_or_else(|| {
                OciError::new(
                    StatusCode::BAD_REQUEST,
                    Code::BadRequest,
                    format!("n is 1 to {MAX_EXECUTIONS}"),
                )
            })?,
        None => 20,
    };
    let runs = replication.executions(&name, limit).await?;
    let shown: Vec<Value> = runs.iter().map(|(e, t)| execution_json(e, t)).collect();
    Ok(reply(StatusCode::OK, Value::Array(shown)))
}

fn execution_json(execution: &ExecutionRecord, tasks: &[TaskRecord]) -> Value {
    let duration_ms = execution.ended_ms.map(|end| end - execution.created_ms);
    json!({
        "id": execution.id,
        "policy": execution.policy,
        "trigger": execution.triggered_by,
        "status": execution.status,
        "started_at": rfc3339(execution.created_ms),
        "ended_at": execution.ended_ms.map(rfc3339),
        "duration_ms": duration_ms,
        "total": execution.tasks,
        "succeeded": execution.succeeded,
        "failed": execution.failed,
        "skipped": execution.skipped,
        "in_progress": execution.tasks - execution.succeeded - execution.failed - execution.skipped,
        "bytes": execution.bytes,
        "tasks": tasks.iter().take(MAX_TASKS_SHOWN).map(task_json).collect::<Vec<_>>(),
    })
}

fn task_json(task: &TaskRecord) -> Value {
    json!({
        "id": task.id,
        "operation": task.operation,
        "source": task.source,
        "destination": task.destination,
        "status": task.status.as_str(),
        "attempts": task.attempts,
        "bytes": task.bytes,
        "error": task.error,
        "log": task.log,
        "started_at": task.started_ms.map(rfc3339),
        "ended_at": task.ended_ms.map(rfc3339),
        "duration_ms": task.started_ms.zip(task.ended_ms).map(|(s, e)| e - s),
        "next_attempt_at": (task.status == berth_meta::TaskStatus::Pending && task.attempts > 0)
            .then(|| rfc3339(task.next_attempt_ms)),
    })
}
