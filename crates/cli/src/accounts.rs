//! `berth user …` and `berth audit`: local administration on the data directory, as the
//! system administrator `berth-cli` (audited under that name).

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use berth_auth::time::rfc3339;
use berth_auth::AuditFilter;
use berth_auth::{AccessControl, ImportOutcome, NewUser};
use clap::{Args, Subcommand};

/// The user subcommands.
#[derive(Subcommand)]
pub(crate) enum UserCommand {
    /// Create a user; prints a generated password unless one is read from stdin.
    Add {
        /// Login name.
        name: String,
        /// Make the user a system administrator.
        #[arg(long)]
        admin: bool,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a user's password (generated and printed unless read from stdin). Revokes the
    /// user's tokens.
    Passwd {
        /// Login name.
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List,
    /// Remove a user; its tokens stop working at once.
    Delete {
        /// Login name.
        name: String,
    },
    /// Import the users of a Distribution htpasswd file (bcrypt), keeping their passwords.
    ImportHtpasswd {
        /// The htpasswd file.
        file: PathBuf,
    },
}

/// Filters of `berth audit`.
#[derive(Args)]
pub(crate) struct AuditArgs {
    /// Only this actor.
    #[arg(long)]
    actor: Option<String>,
    /// Only this action (push, pull, delete, login, member.add, …).
    #[arg(long)]
    action: Option<String>,
    /// Only resources starting with this (a repository, a project).
    #[arg(long)]
    resource: Option<String>,
    /// Only this result (success, denied, failed).
    #[arg(long)]
    result: Option<String>,
    /// At most this many events.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

fn read_password() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the password from stdin")?;
    let line = text.lines().next().unwrap_or("").to_owned();
    anyhow::ensure!(!line.is_empty(), "no password on stdin");
    Ok(line)
}

/// Runs a user subcommand.
pub(crate) async fn user_command(
    access: AccessControl,
    command: UserCommand,
) -> anyhow::Result<()> {
    let me = AccessControl::local_admin();
    match command {
        UserCommand::Add {
            name,
            admin,
            password_stdin,
        } => {
            let password = if password_stdin {
                Some(read_password()?)
            } else {
                None
            };
            let (user, generated) = access
                .accounts()
                .create_user(
                    &me,
                    NewUser {
                        name,
                        password,
                        admin,
                    },
                )
                .await?;
            match generated {
                Some(p) => println!("created user {} with password {p}", user.name),
                None => println!("created user {}", user.name),
            }
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let (password, show) = if password_stdin {
                (read_password()?, false)
            } else {
                (berth_auth::password::random_secret()?, true)
            };
            access
                .accounts()
                .update_user(&me, &name, Some(password.clone()), None)
                .await?;
            if show {
                println!("new password for {name}: {password}");
            } else {
                println!("password of {name} changed");
            }
        }
        UserCommand::List => {
            for user in access.accounts().users(&me).await? {
                let role = if user.admin { "admin" } else { "user" };
                println!("{}\t{role}\t{}", user.name, rfc3339(user.created_ms));
            }
        }
        UserCommand::Delete { name } => {
            access.accounts().delete_user(&me, &name).await?;
            println!("deleted user {name}");
        }
        UserCommand::ImportHtpasswd { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            for (name, outcome) in access.accounts().import_htpasswd(&me, &text).await? {
                match outcome {
                    ImportOutcome::Created => println!("{name}\timported"),
                    ImportOutcome::Exists => println!("{name}\tskipped: exists"),
                    ImportOutcome::Invalid(why) => println!("{name}\tskipped: {why}"),
                }
            }
        }
    }
    Ok(())
}

/// `text` safe for a terminal: control characters (escape sequences, tabs, newlines, C1
/// controls) are shown as `\u{…}` escapes, since names and details come from clients.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Prints the audit log.
pub(crate) async fn audit_command(access: AccessControl, args: AuditArgs) -> anyhow::Result<()> {
    let filter = AuditFilter {
        actor: args.actor,
        action: args.action,
        resource_prefix: args.resource,
        result: args.result,
        limit: args.limit,
        ..AuditFilter::default()
    };
    for record in access
        .accounts()
        .audit_log(&AccessControl::local_admin(), filter)
        .await?
    {
        let e = &record.event;
        if args.json {
            let line = serde_json::json!({
                "id": record.id, "time": rfc3339(e.at_ms), "actor": e.actor, "actor_kind": e.actor_kind,
                "address": e.address, "action": e.action, "resource": e.resource,
                "result": e.result, "detail": e.detail, "count": e.repeats,
            });
            println!("{line}");
        } else {
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                rfc3339(e.at_ms),
                printable(&e.actor),
                printable(&e.address),
                printable(&e.action),
                printable(&e.resource),
                printable(&e.result),
                printable(&e.detail),
                e.repeats
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn audit_fields_cannot_drive_the_terminal() {
        assert_eq!(printable("team/app:v1"), "team/app:v1");
        assert_eq!(printable("\u{1b}]0;owned\u{7}"), "\\u{1b}]0;owned\\u{7}");
        assert_eq!(printable("a\tb\nc\u{9b}"), "a\\u{9}b\\u{a}c\\u{9b}");
        assert_eq!(printable("résumé"), "résumé");
    }
}
