//! The policies that hang on a project or on the whole registry, as their managers see
//! them: webhooks, a pull-through cache's upstream, replication. Shown here and changed
//! through `/api/v1` (their forms would repeat the API's whole JSON settings); each card
//! names the operation that changes it.

use berth_meta::WebhookRecord;
use maud::{html, Markup};

use super::when;
use crate::App;

/// A project's webhooks and, for a pull-through cache, its upstream (for the project's
/// managers: the caller checked that).
pub(super) async fn project(app: &App, project: &str) -> Markup {
    let hooks = app.webhooks.list(Some(project)).await.unwrap_or_default();
    let cache = app
        .proxy
        .as_deref()
        .and_then(|proxy| proxy.settings_of(project));
    html! {
        div.card {
            h2 { "Webhooks" }
            (webhooks(&hooks))
            p.muted { "Changed with " code { "/api/v1/projects/" (project) "/webhooks" } "." }
        }
        @if let Some((settings, from_config)) = cache {
            div.card {
                h2 { "Pull-through cache" }
                table {
                    tbody {
                        tr { th { "Upstream" } td { @for url in &settings.urls { code { (url) } " " } } }
                        tr { th { "Tags checked again after" } td { (settings.tag_ttl.as_secs()) " s" } }
                        tr { th { "Signed in upstream" } td { @if settings.username.is_some() { "yes" } @else { "no" } } }
                    }
                }
                p.muted {
                    @if from_config { "Set in the configuration file." }
                    @else { "Changed with " code { "/api/v1/projects/" (project) "/proxy-cache" } "." }
                }
            }
        }
    }
}

/// The system-wide webhooks and the replication endpoints and policies (for system
/// administrators: the caller checked that).
pub(super) async fn system(app: &App) -> Markup {
    let hooks = app.webhooks.list(None).await.unwrap_or_default();
    let (registries, policies) = match &app.replication {
        Some(replication) => (
            replication.registries().await.unwrap_or_default(),
            replication.policies().await.unwrap_or_default(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    html! {
        div.card {
            h2 { "System webhooks" }
            (webhooks(&hooks))
            p.muted { "Changed with " code { "/api/v1/webhooks" } "." }
        }
        div.card {
            h2 { "Replication" }
            @if registries.is_empty() {
                p.muted { "No other registries." }
            } @else {
                table {
                    thead { tr { th { "Registry" } th { "URL" } th { "Signed in" } } }
                    tbody {
                        @for r in &registries {
                            tr {
                                td { (r.name) }
                                td { code { (r.url) } }
                                td { @if r.username.is_some() { "yes" } @else { "no" } }
                            }
                        }
                    }
                }
            }
            @if !policies.is_empty() {
                table {
                    thead { tr { th { "Policy" } th { "Direction" } th { "Registry" } th { "Repositories" } th { "Trigger" } th { "State" } } }
                    tbody {
                        @for (p, _) in &policies {
                            @let shown = p.to_json();
                            tr {
                                td { (p.name) }
                                td { (shown["direction"].as_str().unwrap_or_default()) }
                                td { (p.registry) }
                                td { code { (shown["source"].as_str().unwrap_or_default()) } }
                                td { (shown["trigger"].as_str().unwrap_or_default()) }
                                td { @if p.enabled { "enabled" } @else { "disabled" } }
                            }
                        }
                    }
                }
            }
            p.muted { "Changed with " code { "/api/v1/registries" } " and " code { "/api/v1/replication/policies" } ", or " code { "berth replication" } "." }
        }
    }
}

fn webhooks(hooks: &[WebhookRecord]) -> Markup {
    html! {
        @if hooks.is_empty() {
            p.muted { "None." }
        } @else {
            table {
                thead { tr { th { "Name" } th { "Target" } th { "Events" } th { "State" } th { "Created" } } }
                tbody {
                    @for h in hooks {
                        tr {
                            td { (h.name) }
                            td.digest { code { (h.url) } }
                            td { (h.events.join(", ")) }
                            td { @if h.enabled { "enabled" } @else { "disabled" } @if !h.secret.is_empty() { ", signed" } }
                            td { (when(h.created_ms)) }
                        }
                    }
                }
            }
        }
    }
}
