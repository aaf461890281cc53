//! `berth replication …`: the replication API's registry endpoints, policies and runs,
//! on the data directory as the system administrator `berth-cli` (works beside a running
//! registry, whose worker runs what is started here). Output is the API's JSON.

use std::io::Read;

use anyhow::Context;
use berth_auth::AccessControl;
use berth_replication::Replication;
use clap::Subcommand;
use serde_json::{json, Value};

/// The replication subcommands.
#[derive(Subcommand)]
pub(crate) enum ReplicationCommand {
    /// Add or change a registry endpoint.
    AddRegistry {
        /// Its name.
        name: String,
        /// Its base URL (`https://host[:port]`).
        url: String,
        /// The user to log in as.
        #[arg(long)]
        username: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Accept a certificate that does not verify.
        #[arg(long)]
        insecure: bool,
    },
    /// List registry endpoints (without passwords).
    Registries,
    /// Remove a registry endpoint no policy uses.
    RemoveRegistry {
        /// Its name.
        name: String,
    },
    /// Add or change a policy, from its JSON (as the API takes it) on standard input.
    SetPolicy,
    /// List policies.
    Policies,
    /// Remove a policy with its runs.
    RemovePolicy {
        /// Its name.
        name: String,
    },
    /// Start a run of a policy now; the registry's worker carries it out.
    Run {
        /// The policy.
        name: String,
    },
    /// A policy's newest runs with their tasks.
    Executions {
        /// The policy.
        name: String,
        /// How many runs.
        #[arg(short = 'n', long, default_value_t = 5)]
        limit: usize,
    },
}

fn print(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn first_line_of_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

pub(crate) async fn replication_command(
    replication: Replication,
    command: ReplicationCommand,
) -> anyhow::Result<()> {
    let me = AccessControl::local_admin().as_actor();
    match command {
        ReplicationCommand::AddRegistry {
            name,
            url,
            username,
            password_stdin,
            insecure,
        } => {
            let password = if password_stdin {
                Some(first_line_of_stdin()?)
            } else {
                None
            };
            let value = json!({"name": name, "url": url, "username": username,
                               "password": password, "insecure": insecure});
            print(&replication.set_registry(&value, &me).await?.shown())
        }
        ReplicationCommand::Registries => {
            let shown: Vec<Value> = replication
                .registries()
                .await?
                .iter()
                .map(|r| r.shown())
                .collect();
            print(&Value::Array(shown))
        }
        ReplicationCommand::RemoveRegistry { name } => {
            if !replication.remove_registry(&name, &me).await? {
                anyhow::bail!("no registry endpoint {name:?}");
            }
            Ok(())
        }
        ReplicationCommand::SetPolicy => {
            let mut text = String::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_string(&mut text)
                .context("reading the policy from standard input")?;
            let value: Value = serde_json::from_str(&text).context("the policy is not JSON")?;
            print(&replication.set_policy(&value, &me).await?.to_json())
        }
        ReplicationCommand::Policies => {
            let shown: Vec<Value> = replication
                .policies()
                .await?
                .iter()
                .map(|(p, _)| p.to_json())
                .collect();
            print(&Value::Array(shown))
        }
        ReplicationCommand::RemovePolicy { name } => {
            if !replication.remove_policy(&name, &me).await? {
                anyhow::bail!("no replication policy {name:?}");
            }
            Ok(())
        }
        ReplicationCommand::Run { name } => {
            let id = replication.start(&name, "manual", &me).await?;
            print(&json!({"policy": name, "execution": id}))
        }
        ReplicationCommand::Executions { name, limit } => {
            let runs = replication.executions(&name, limit.clamp(1, 100)).await?;
            let shown: Vec<Value> = runs
                .iter()
                .map(|(e, tasks)| {
                    json!({
                        "id": e.id, "trigger": e.triggered_by, "status": e.status,
                        "total": e.tasks, "succeeded": e.succeeded, "failed": e.failed,
                        "skipped": e.skipped, "bytes": e.bytes,
                        "tasks": tasks.iter().take(100).map(|t| json!({
                            "source": t.source, "destination": t.destination,
                            "status": t.status.as_str(), "attempts": t.attempts,
                            "bytes": t.bytes, "error": t.error,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            print(&Value::Array(shown))
        }
    }
}
