//! A project's people and settings on its page: members with their roles, robot
//! accounts, visibility and the policies on it, each shown only to those who may see it
//! and changed only by those who manage the project.

use berth_auth::{Caller, Need, Permission};
use maud::{html, Markup};

use super::session::CsrfToken;
use crate::App;

/// A project's members and robots, and for its managers the robot form.
pub(super) async fn people(app: &App, caller: &Caller, csrf: &CsrfToken, project: &str) -> Markup {
    let accounts = app.access.accounts();
    // Checked first without the audit (a refused call would be audited, on every view).
    let read = Need::Project {
        name: project,
        permission: Permission::Read,
    };
    let sees_members = app.access.enabled() && app.access.authorize(caller, read).await.is_ok();
    let members = if sees_members {
        accounts.members(caller, project).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    let manage = Need::Project {
        name: project,
        permission: Permission::Manage,
    };
    let manages = app.access.enabled() && app.access.authorize(caller, manage).await.is_ok();
    let robots = if manages {
        accounts.robots(caller, project).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    html! {
        @if !members.is_empty() || manages {
            div.card {
                h2 { "Members" }
                table {
                    thead { tr { th { "User" } th { "Role" } @if manages { th {} } } }
                    tbody {
                        @for m in &members {
                            tr {
                                td { (m.user) }
                                td { span.badge { (m.role) } }
                                @if manages {
                                    td {
                                        form method="post" action={ "/ui/projects/" (project) "/members/" (m.user) "/delete" } {
                                            input type="hidden" name="csrf" value=(csrf.0);
                                            button.link type="submit" aria-label={ "Remove " (m.user) } { "Remove" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                @if manages {
                    form.stack method="post" action={ "/ui/projects/" (project) "/members" } {
                        input type="hidden" name="csrf" value=(csrf.0);
                        label { "User" br; input name="user" required maxlength="255"; }
                        label { "Role" br;
                            select name="role" {
                                @for role in ["guest", "developer", "maintainer", "project_admin"] {
                                    option value=(role) { (role) }
                                }
                            }
                        }
                        button type="submit" { "Add or change member" }
                    }
                }
            }
        }
        @if manages {
            div.card {
                h2 { "Settings" }
                @let public = app.access.accounts().project(caller, project).await.map(|p| p.public).unwrap_or(false);
                p { "This project is " b { @if public { "public: anyone may pull from it" } @else { "private: only its members see it" } } "." }
                form method="post" action={ "/ui/projects/" (project) "/visibility" } {
                    input type="hidden" name="csrf" value=(csrf.0);
                    input type="hidden" name="public" value=(if public { "false" } else { "true" });
                    button type="submit" { @if public { "Make it private" } @else { "Make it public" } }
                }
            }
            (super::policies::project(app, project).await)
        }
        @if manages {
            div.card {
                h2 { "Robot accounts" }
                @if !robots.is_empty() {
                    table {
                        thead { tr { th { "Login" } th { "Permissions" } th { "Expires" } th {} } }
                        tbody {
                            @for r in &robots {
                                tr {
                                    td { code { (berth_auth::robot_login(r)) } }
                                    td { (r.permissions.join(", ")) }
                                    td {
                                        @if let Some(at) = r.expires_ms { (super::when(at)) } @else { "never" }
                                        form.inline method="post" action={ "/ui/projects/" (project) "/robots/" (r.name) "/expiry" } {
                                            input type="hidden" name="csrf" value=(csrf.0);
                                            input name="expires_in_days" inputmode="numeric" maxlength="4" size="4" placeholder="days" aria-label={ "Days until " (r.name) " expires: 0 now, empty never" };
                                            button.link type="submit" { "Set expiry" }
                                        }
                                    }
                                    td {
                                        form method="post" action={ "/ui/projects/" (project) "/robots/" (r.name) "/delete" } {
                                            input type="hidden" name="csrf" value=(csrf.0);
                                            button.link type="submit" { "Delete" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                form.stack method="post" action={ "/ui/projects/" (project) "/robots" } {
                    input type="hidden" name="csrf" value=(csrf.0);
                    label { "Name" br; input name="name" required maxlength="64" pattern="[a-z0-9][a-z0-9._\\-]*"; }
                    div {
                        label { input type="checkbox" name="permission" value="pull" checked; " pull" } " "
                        label { input type="checkbox" name="permission" value="push"; " push" } " "
                        label { input type="checkbox" name="permission" value="delete"; " delete" }
                    }
                    label { "Expires after (days, empty: never)" br; input name="expires_in_days" inputmode="numeric" maxlength="4"; }
                    button type="submit" { "Create robot" }
                }
            }
        }
    }
}
