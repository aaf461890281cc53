//! `/api/v1/projects/{name}/proxy-cache`: making a project a pull-through cache through
//! the API (system administrators), seeing its settings (project admins; never the
//! upstream password), and making it an ordinary project again. Also used by
//! `POST /api/v1/projects` with a `proxy_cache` member.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Extensions, StatusCode};
use axum::response::{IntoResponse, Response};
use berth_auth::{Need, Permission};
use berth_proxy::{ProxyCache, ProxySettings};
use serde_json::Value;

use crate::auth::caller_of;
use crate::error::{Code, OciError};
use crate::proxied::oci;
use crate::App;

fn proxy(app: &App) -> Result<&ProxyCache, OciError> {
    app.proxy.as_deref().ok_or_else(|| {
        OciError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "pull-through caches are not available on this node",
        )
    })
}

fn shown(settings: &ProxySettings, from_config: bool) -> Response {
    let mut value = settings.shown();
    value["from_config"] = from_config.into();
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// `GET /api/v1/projects/{name}/proxy-cache`.
pub(crate) async fn get_proxy_cache(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let caller = caller_of(&extensions);
    let need = Need::Project {
        name: &name,
        permission: Permission::Manage,
    };
    let _ = app.access.authorize(&caller, need).await?;
    match proxy(&app)?.settings_of(&name) {
        Some((settings, from_config)) => Ok(shown(&settings, from_config)),
        None => Err(OciError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!("{name} is not a pull-through cache"),
        )),
    }
}

/// `PUT /api/v1/projects/{name}/proxy-cache`: the project (which must exist) becomes a
/// pull-through cache with these settings, or its settings change.
pub(crate) async fn put_proxy_cache(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<Response, OciError> {
    let caller = caller_of(&extensions);
    let _ = app.access.authorize(&caller, Need::System).await?;
    let settings = ProxySettings::from_json(&name, &bytes).map_err(oci)?;
    let proxy = proxy(&app)?;
    proxy.set(settings, &caller.as_actor()).await.map_err(oci)?;
    let (settings, from_config) = proxy.settings_of(&name).ok_or_else(|| {
        OciError::new(
            StatusCode::CONFLICT,
            Code::Conflict,
            format!("{name}: the settings were stored but did not apply"),
        )
    })?;
    Ok(shown(&settings, from_config))
}

/// `DELETE /api/v1/projects/{name}/proxy-cache`: an ordinary project again (what it
/// cached stays).
pub(crate) async fn delete_proxy_cache(
    State(app): State<App>,
    extensions: Extensions,
    Path(name): Path<String>,
) -> Result<Response, OciError> {
    let caller = caller_of(&extensions);
    let _ = app.access.authorize(&caller, Need::System).await?;
    if proxy(&app)?
        .remove(&name, &caller.as_actor())
        .await
        .map_err(oci)?
    {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(OciError::new(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!("{name} is not a pull-through cache set through the API"),
        ))
    }
}

/// For `POST /api/v1/projects` with `proxy_cache`: checks, before the project is made,
/// that the caller is a system administrator and the settings would apply.
pub(crate) async fn check_new(
    app: &App,
    extensions: &Extensions,
    name: &str,
    value: &Value,
) -> Result<ProxySettings, OciError> {
    let caller = caller_of(extensions);
    let _ = app.access.authorize(&caller, Need::System).await?;
    let settings = ProxySettings::from_value(name, value).map_err(oci)?;
    proxy(app)?.check(&settings).map_err(oci)?;
    Ok(settings)
}

/// For `POST /api/v1/projects` with `proxy_cache`: applies the checked settings.
pub(crate) async fn apply_new(
    app: &App,
    extensions: &Extensions,
    settings: ProxySettings,
) -> Result<(), OciError> {
    let caller = caller_of(extensions);
    proxy(app)?
        .set(settings, &caller.as_actor())
        .await
        .map_err(oci)
}
