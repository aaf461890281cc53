//! The admin API. For now: triggering garbage collection. It is unauthenticated until
//! users and roles exist; bind the registry to a trusted address meanwhile.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::{Code, OciError};
use crate::App;

fn flag(params: &HashMap<String, String>, name: &str) -> Result<Option<bool>, OciError> {
    match params.get(name).map(String::as_str) {
        None => Ok(None),
        Some("true" | "1" | "") => Ok(Some(true)),
        Some("false" | "0") => Ok(Some(false)),
        Some(other) => Err(OciError::new(
            StatusCode::BAD_REQUEST,
            Code::Unsupported,
            format!("{name}={other}: expected true or false"),
        )),
    }
}

/// `POST /api/v1/gc[?dry_run=true][&delete_untagged=true]`: one collection with the
/// configured settings, answered with its report as JSON.
pub(crate) async fn run_gc(
    State(app): State<App>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, OciError> {
    let mut options = app.gc.clone();
    if let Some(dry) = flag(&params, "dry_run")? {
        options.dry_run = dry;
    }
    if let Some(untagged) = flag(&params, "delete_untagged")? {
        options.delete_untagged = untagged;
    }
    let report = app.registry.collect_garbage(&options).await?;
    let body = serde_json::to_string(&report).map_err(|e| OciError::internal(&e))?;
    Ok((StatusCode::OK, [("content-type", "application/json")], body).into_response())
}
