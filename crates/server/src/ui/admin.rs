//! The administration page: users, garbage collection and the audit log, for system
//! administrators only.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use berth_auth::{Caller, Need, Principal};
use maud::html;

use super::pages::problem;
use super::session::CsrfToken;
use super::{html_response, page};
use crate::App;

/// `GET /ui/admin?actor=&action=`: users, garbage collection and the audit log (system
/// administrators).
pub(super) async fn admin(
    State(app): State<App>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<CsrfToken>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Err(e) = app.access.authorize(&caller, Need::System).await {
        let status = if caller.principal == Principal::Anonymous {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::FORBIDDEN
        };
        return problem(
            &app,
            &caller,
            &csrf,
            status,
            &format!("Administrators only: {e}"),
        );
    }
    let accounts = app.access.accounts();
    let users = accounts.users(&caller).await.unwrap_or_default();
    let filter = |key: &str| {
        query
            .get(key)
            .filter(|v| !v.is_empty() && v.len() <= 255)
            .cloned()
    };
    let audit = accounts
        .audit_log(
            &caller,
            berth_auth::AuditFilter {
                actor: filter("actor"),
                action: filter("action"),
                limit: 50,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_default();
    let body = html! {
        h1 { "Administration" }
        div.card {
            h2 { "Garbage collection" }
            p.muted { "A dry run lists what a collection would remove; nothing is removed until you confirm." }
            form method="post" action="/ui/admin/gc" {
                input type="hidden" name="csrf" value=(csrf.0);
                input type="hidden" name="mode" value="dry-run";
                button type="submit" { "Dry run" }
            }
        }
        div.card {
            h2 { "Settings in effect" }
            @let auth = app.access.settings();
            @let gc = &app.gc;
            table {
                tbody {
                    tr { th { "Access control" } td { (format!("{:?}", auth.mode).to_lowercase()) } }
                    tr { th { "Token lifetime" } td { (auth.token_ttl.as_secs()) " s" } }
                    tr { th { "Refresh token (session) lifetime" } td { (auth.refresh_ttl.as_secs() / 86_400) " days" } }
                    tr { th { "Login failures before a lockout" } td { (auth.max_login_failures) } }
                    tr { th { "Garbage collection: blob grace" } td { (gc.blob_grace.as_secs()) " s" } }
                    tr { th { "Garbage collection: untagged manifests" } td { @if gc.delete_untagged { "deleted after " (gc.untagged_min_age.as_secs()) " s" } @else { "kept" } } }
                    tr { th { "Abandoned uploads purged after" } td { (gc.upload_max_age.as_secs()) " s" } }
                    tr { th { "Transport" } td { @if app.secure { "HTTPS" } @else { "plain HTTP" } } }
                }
            }
        }
        (super::policies::system(&app).await)
        @if !users.is_empty() {
            div.card {
                h2 { "Users" }
                table {
                    thead { tr { th { "User" } th { "Administrator" } th {} } }
                    tbody {
                        @for u in &users {
                            tr {
                                td { (u.name) }
                                td { @if u.admin { "yes" } }
                                td {
                                    form method="post" action={ "/ui/admin/users/" (u.name) "/delete" } {
                                        input type="hidden" name="csrf" value=(csrf.0);
                                        button.link type="submit" aria-label={ "Delete user " (u.name) } { "Delete" }
                                    }
                                }
                            }
                        }
                    }
                }
                form.stack method="post" action="/ui/admin/users" {
                    input type="hidden" name="csrf" value=(csrf.0);
                    label { "Name" br; input name="name" required maxlength="255"; }
                    label { "Password (empty: one is generated and shown once)" br; input name="password" type="password" autocomplete="new-password" maxlength="1024"; }
                    label { input type="checkbox" name="admin" value="true"; " system administrator" }
                    button type="submit" { "Create user" }
                }
            }
        }
        div.card {
            h2 { "Audit log" }
            form method="get" action="/ui/admin" {
                input name="actor" placeholder="actor" value=(filter("actor").unwrap_or_default());
                " "
                input name="action" placeholder="action (push, delete, login…)" value=(filter("action").unwrap_or_default());
                " "
                button type="submit" { "Filter" }
            }
            table {
                thead { tr { th { "When" } th { "Actor" } th { "Action" } th { "Resource" } th { "Result" } } }
                tbody {
                    @for r in &audit {
                        tr {
                            td { (super::when(r.event.at_ms)) }
                            td { (r.event.actor) }
                            td {
                                (r.event.action)
                                @if r.event.repeats > 1 { " ×" (r.event.repeats) }
                            }
                            td.digest { (r.event.resource) }
                            td { (r.event.result) }
                        }
                    }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        page(&app, &caller, "Administration", Some(&csrf.0), body),
    )
}
