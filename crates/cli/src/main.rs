//! `berth`: a container image registry in one binary.

mod accounts;
mod config;
mod progress;
mod remote;
mod replication;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_auth::AuthMode;
use berth_registry::{CheckOptions, Registry, RegistryError};
use berth_server::node::Node;
use berth_server::tls::Tls;
use berth_server::ServeOptions;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{Overrides, Settings};

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A container image registry in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the data is: shared by every subcommand that opens it.
#[derive(Args)]
struct DataArgs {
    /// TOML config file; settings in it are overridden by environment and flags.
    #[arg(long, env = "BERTH_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Directory for blobs and metadata [default: ./berth-data].
    #[arg(long, env = "BERTH_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Log filter, e.g. `info` or `warn,berth::access=info` [default: info].
    #[arg(long, env = "BERTH_LOG_LEVEL", global = true)]
    log_level: Option<String>,
    /// `text` (default) or `json`: one JSON object per line, for log shippers.
    #[arg(long, env = "BERTH_LOG_FORMAT", global = true)]
    log_format: Option<String>,
    /// Keep metadata in this PostgreSQL database (shared by every node) instead of
    /// `meta.db` in the data directory.
    #[arg(long, env = "BERTH_POSTGRES_URL", global = true)]
    postgres_url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry.
    Serve {
        #[command(flatten)]
        data: DataArgs,
        /// Address to listen on [default: 127.0.0.1:5000].
        #[arg(long, env = "BERTH_LISTEN")]
        listen: Option<String>,
        /// Largest manifest accepted, in bytes [default: 4194304].
        #[arg(long, env = "BERTH_MAX_MANIFEST_BYTES")]
        max_manifest_bytes: Option<usize>,
        /// Authentication: `builtin` (users, projects, tokens), `none` (anyone may do
        /// anything; trusted networks only) or `token` (trust an external token issuer)
        /// [default: builtin].
        #[arg(long, env = "BERTH_AUTH_MODE")]
        auth: Option<String>,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key-file). Reloaded on
        /// SIGHUP and when the file changes.
        #[arg(long, env = "BERTH_TLS_CERT_FILE")]
        tls_cert_file: Option<PathBuf>,
        /// The PEM private key of the certificate (PKCS#8, RSA or ECDSA).
        #[arg(long, env = "BERTH_TLS_KEY_FILE")]
        tls_key_file: Option<PathBuf>,
        /// Require client certificates issued by these PEM authorities (mutual TLS).
        #[arg(long, env = "BERTH_TLS_CLIENT_CA_FILE")]
        tls_client_ca_file: Option<PathBuf>,
    },
    /// Copy an image between registries and OCI layouts: one platform of an index, or
    /// with `--all-platforms` the whole index, digests unchanged; blobs streamed through
    /// (skipped when already there, mounted within one registry).
    Copy {
        /// The source: `host[:port]/repo[:tag|@digest]`, or an OCI layout `oci:PATH[:TAG]`.
        source: String,
        /// The destination: `host[:port]/repo[:tag]`, or `oci:PATH[:TAG]` (created if missing).
        destination: String,
        #[command(flatten)]
        what: remote::CopyArgs,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Pull one platform of an image into the local store (only what it lacks), and
    /// optionally unpack it into a root filesystem.
    Pull {
        /// `host[:port]/repo[:tag|@digest]`.
        image: String,
        /// Unpack it into this directory.
        #[arg(long, visible_alias = "output")]
        unpack: Option<PathBuf>,
        #[command(flatten)]
        args: remote::PullArgs,
    },
    /// Unpack an image (a registry reference, pulled through the store, or an OCI layout
    /// `oci:PATH[:TAG]`) into a root filesystem, applying whiteouts; nothing is written
    /// outside it.
    Unpack {
        /// The image.
        source: String,
        /// The root filesystem to make (or add to).
        root: PathBuf,
        #[command(flatten)]
        args: remote::PullArgs,
    },
    /// Push an image from an OCI layout (`oci:PATH[:TAG]`) to a registry: `copy` with a
    /// local source, every platform of an index.
    Push {
        /// The layout, `oci:PATH[:TAG]`.
        source: String,
        /// The destination, `host[:port]/repo[:tag]`.
        image: String,
        /// Also push the referrers stored with it.
        #[arg(long)]
        referrers: bool,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Show what a reference names, as JSON: digest, media type, platforms or layers.
    Inspect {
        /// `host[:port]/repo[:tag|@digest]` or `oci:PATH[:TAG]`.
        image: String,
        #[command(flatten)]
        remote: remote::RemoteArgs,
    },
    /// Log in to a registry: check the credentials, then keep them in docker's
    /// config.json (where docker and podman find them too).
    Login {
        /// `host[:port]`.
        registry: String,
        /// The user name.
        #[arg(long, short)]
        username: String,
        /// The password (prefer --password-stdin: a command line is visible to others).
        #[arg(long, short)]
        password: Option<String>,
        /// Read the password from standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Speak plain HTTP (loopback and localhost use it by default).
        #[arg(long)]
        plain_http: bool,
        /// Accept any TLS certificate.
        #[arg(long)]
        insecure: bool,
    },
    /// Forget the credentials kept for a registry.
    Logout {
        /// `host[:port]`.
        registry: String,
    },
    /// Manage users (works beside a running registry).
    User {
        #[command(flatten)]
        data: DataArgs,
        #[command(subcommand)]
        command: accounts::UserCommand,
    },
    /// Replicate to and from other registries: endpoints, policies and runs (as the
    /// API's `/api/v1/registries` and `/api/v1/replication`; works beside a running
    /// registry).
    Replication {
        #[command(flatten)]
        data: DataArgs,
        #[command(subcommand)]
        command: replication::ReplicationCommand,
    },
    /// Show the audit log, newest first.
    Audit {
        #[command(flatten)]
        data: DataArgs,
        #[command(flatten)]
        filter: accounts::AuditArgs,
    },
    /// Collect garbage: unreferenced blobs, abandoned uploads and, if asked, untagged
    /// manifests. Safe while a registry is serving the same data directory.
    Gc {
        #[command(flatten)]
        data: DataArgs,
        /// Report what would be removed without removing anything.
        #[arg(long)]
        dry_run: bool,
        /// Also remove manifests that no tag reaches.
        #[arg(long)]
        delete_untagged: bool,
        /// Keep unreferenced blobs used within this many seconds [config: gc.blob_grace_secs; default 3600].
        #[arg(long)]
        blob_grace_secs: Option<u64>,
        /// Keep untagged manifests younger than this many seconds [default 86400].
        #[arg(long)]
        untagged_min_age_secs: Option<u64>,
        /// Purge uploads idle for this many seconds [default 86400].
        #[arg(long)]
        upload_max_age_secs: Option<u64>,
    },
    /// Verify every stored blob against its digest and every manifest reference.
    /// Exits with status 1 if anything is missing or corrupt.
    Check {
        #[command(flatten)]
        data: DataArgs,
        /// Forget missing and corrupt blobs (deleting corrupt bytes) so clients push them again.
        #[arg(long)]
        repair: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            data,
            listen,
            max_manifest_bytes,
            auth,
            tls_cert_file,
            tls_key_file,
            tls_client_ca_file,
        } => {
            let settings = load(
                data,
                Overrides {
                    listen,
                    max_manifest_bytes,
                    auth_mode: auth,
                    tls_cert_file,
                    tls_key_file,
                    tls_client_ca_file,
                    ..Overrides::default()
                },
            )?;
            serve(settings)
        }
        Command::Copy {
            source,
            destination,
            what,
            remote: args,
        } => remote::copy(&source, &destination, what, args),
        Command::Pull {
            image,
            unpack,
            args,
        } => remote::pull(&image, unpack.as_deref(), args),
        Command::Unpack { source, root, args } => remote::pull(&source, Some(&root), args),
        Command::Inspect { image, remote } => remote::inspect(&image, remote),
        Command::Push {
            source,
            image,
            referrers,
            remote: args,
        } => {
            anyhow::ensure!(
                source.starts_with("oci:"),
                "push takes an OCI layout, oci:PATH[:TAG] (between registries, use copy)"
            );
            remote::copy(
                &source,
                &image,
                remote::CopyArgs::everything(referrers),
                args,
            )
        }
        Command::Login {
            registry,
            username,
            password,
            password_stdin,
            plain_http,
            insecure,
        } => remote::login(
            &registry,
            &username,
            password,
            password_stdin,
            plain_http,
            insecure,
        ),
        Command::Logout { registry } => remote::logout(&registry),
        Command::User { data, command } => {
            let settings = load(data, Overrides::default())?;
            run_offline(&settings, |node| {
                accounts::user_command(node.access, command)
            })
        }
        Command::Replication { data, command } => {
            let settings = load(data, Overrides::default())?;
            run_offline(&settings, |node| {
                replication::replication_command(node.replication, command)
            })
        }
        Command::Audit { data, filter } => {
            let settings = load(data, Overrides::default())?;
            run_offline(&settings, |node| {
                accounts::audit_command(node.access, filter)
            })
        }
        Command::Gc {
            data,
            dry_run,
            delete_untagged,
            blob_grace_secs,
            untagged_min_age_secs,
            upload_max_age_secs,
        } => {
            let settings = load(data, Overrides::default())?;
            let mut options = settings.gc.options.clone();
            options.dry_run = dry_run;
            options.delete_untagged |= delete_untagged;
            if let Some(s) = blob_grace_secs {
                options.blob_grace = Duration::from_secs(s);
            }
            if let Some(s) = untagged_min_age_secs {
                options.untagged_min_age = Duration::from_secs(s);
            }
            if let Some(s) = upload_max_age_secs {
                options.upload_max_age = Duration::from_secs(s);
            }
            run_offline(&settings, |node| async move {
                let report = node.registry.collect_garbage(&options).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                if report.blobs_removed_count == 0 && !options.blob_grace.is_zero() {
                    // The usual surprise: a delete, a collection at once, nothing freed.
                    eprintln!(
                        "berth: no blob removed. Unreferenced blobs used within the grace period ({} s, gc.blob_grace_secs or --blob-grace-secs) are kept, so a collection right after a delete frees their space only once it has passed.",
                        options.blob_grace.as_secs()
                    );
                }
                Ok(())
            })
        }
        Command::Check { data, repair } => {
            let settings = load(data, Overrides::default())?;
            let clean = run_offline(&settings, |node| async move {
                let report = node.registry.check(CheckOptions { repair }).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                Ok(report.is_clean())
            })?;
            if !clean {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn load(data: DataArgs, overrides: Overrides) -> anyhow::Result<Settings> {
    let settings = Settings::load(
        data.config.as_deref(),
        Overrides {
            data_dir: data.data_dir,
            log_level: data.log_level,
            postgres_url: data.postgres_url,
            ..overrides
        },
    )?;
    let filter = EnvFilter::try_new(&settings.log_level).context("invalid log level")?;
    match data.log_format.as_deref() {
        None | Some("text") => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        Some("json") => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
        Some(other) => anyhow::bail!("log format {other:?}: expected text or json"),
    }
    Ok(settings)
}

/// Runs a maintenance task on the data directory without serving it. The directory must
/// exist: a command run from the wrong place would otherwise make a new, empty one the
/// running server never sees. Which directory is used is said on stderr.
fn run_offline<T, F, Fut>(settings: &Settings, task: F) -> anyhow::Result<T>
where
    F: FnOnce(Node) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let shown =
        std::path::absolute(&settings.data_dir).unwrap_or_else(|_| settings.data_dir.clone());
    if !settings.data_dir.is_dir() {
        anyhow::bail!(
            "data directory {} does not exist: point --data-dir (or BERTH_DATA_DIR, or data_dir in the config file) at the one `berth serve` uses",
            shown.display()
        );
    }
    eprintln!("berth: data directory {}", shown.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let config = settings.node()?;
    let node = runtime.block_on(Node::open(&config))?;
    runtime.block_on(task(node))
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let Node {
            registry,
            access,
            webhooks,
            replication,
            app,
        } = Node::open(&settings.node()?).await?;
        if access.settings().mode == AuthMode::Builtin {
            let password = std::env::var("BERTH_ADMIN_PASSWORD").ok().filter(|p| !p.is_empty());
            if let Some(generated) = access.accounts().bootstrap_admin(password).await? {
                // Shown once, on the terminal of whoever started the first run.
                eprintln!("\nberth: created user \"admin\" with password {generated}\n       (change it with `berth user passwd admin`)\n");
            }
        }
        if let Some(interval) = settings.gc.interval {
            tokio::spawn(scheduled_gc(registry.clone(), settings.gc.options.clone(), interval));
        }
        tokio::spawn(maintenance(registry.clone(), settings.gc.options.clone()));
        tokio::spawn(abandoned_sweeps(registry.clone()));
        tokio::spawn(berth_webhooks::run_sender(webhooks));
        tokio::spawn(berth_replication::run(replication));
        let tls = match &settings.tls {
            Some(files) => {
                let tls = Tls::load(files.clone())
                    .with_context(|| format!("loading the TLS certificate {}", files.cert_file.display()))?;
                tokio::spawn(tls.clone().watch_files(TLS_POLL_INTERVAL));
                tokio::spawn(reload_on_hangup(tls.clone()));
                Some(tls)
            }
            None => None,
        };
        let fd_limit = berth_server::raise_fd_limit();
        let limits = settings.connections.limits(fd_limit);
        let listener = bind(settings.listen).with_context(|| format!("binding {}", settings.listen))?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, data_dir = %settings.data_dir.display(), "berth listening on {scheme}://{addr}");
        tracing::info!(auth = ?access.settings().mode, "access control");
        tracing::info!(
            fd_limit,
            max_connections = limits.max_connections,
            header_timeout_secs = limits.header_timeout.as_secs(),
            body_stall_timeout_secs = limits.body_stall_timeout.as_secs(),
            "connection limits"
        );
        if let Some(metrics_addr) = settings.metrics_listen {
            let metrics_listener = bind(metrics_addr)
                .with_context(|| format!("binding the metrics listener {metrics_addr}"))?;
            tracing::info!(addr = %metrics_listener.local_addr()?, "metrics on http://{}/metrics", metrics_listener.local_addr()?);
            let metrics_app = app.clone();
            tokio::spawn(async move {
                if let Err(e) = berth_server::serve_metrics(metrics_listener, metrics_app, std::future::pending()).await {
                    tracing::error!(error = %e, "the metrics listener stopped");
                }
            });
        }
        let options = ServeOptions { limits, tls };
        berth_server::serve(listener, app, options, shutdown_signal()).await?;
        access.flush_audit().await;
        tracing::info!("berth stopped");
        Ok(())
    })
}

/// How often `serve` purges abandoned uploads and prunes old events, collections or not.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(3600);

/// Every hour, for as long as the server runs: purges upload sessions abandoned for
/// longer than `gc.upload_max_age` and prunes events past their retention. A collection
/// does both too, but collections need not be scheduled, and abandoned sessions must not
/// pile up meanwhile. Both are idempotent, so nodes sharing a store need no lease.
async fn maintenance(registry: Registry, options: berth_registry::GcOptions) {
    let mut ticker = tokio::time::interval(MAINTENANCE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match registry.purge_uploads(&options).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "abandoned upload sessions purged"),
            Err(e) => tracing::warn!(error = %e, "purging abandoned uploads failed"),
        }
        match registry.prune_events(options.event_retention).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "events past their retention pruned"),
            Err(e) => tracing::warn!(error = %e, "pruning events failed"),
        }
    }
}

/// How often `serve` looks for a collection that died half-way through its sweep.
const ABANDONED_SWEEP_CHECK: Duration = Duration::from_secs(60);

/// Finishes the sweep of any collection that stopped without finishing (its lease
/// expired): its blobs would otherwise stay blocked until a next collection, which with no
/// schedule never comes. One small read a minute when there is nothing to do.
async fn abandoned_sweeps(registry: Registry) {
    let mut ticker = tokio::time::interval(ABANDONED_SWEEP_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match registry.finish_abandoned_sweep().await {
            Ok(None) => {}
            Ok(Some(swept)) => {
                tracing::info!(
                    swept,
                    "finished the sweep of a collection that stopped half-way"
                )
            }
            Err(e) => tracing::warn!(error = %e, "finishing an abandoned sweep failed"),
        }
    }
}

/// Collects garbage every `interval`, online, for as long as the server runs.
async fn scheduled_gc(registry: Registry, options: berth_registry::GcOptions, interval: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match registry.collect_garbage(&options).await {
            Ok(report) => tracing::info!(
                blobs = report.blobs_removed_count,
                manifests = report.manifests_removed_count,
                bytes = report.bytes_freed,
                "scheduled garbage collection done"
            ),
            Err(RegistryError::JobRunning { .. }) => {
                tracing::info!("scheduled garbage collection skipped: another node is collecting");
            }
            Err(e) => tracing::error!(error = %e, "scheduled garbage collection failed"),
        }
    }
}

/// Connections the kernel completes and queues before they are accepted. A burst of new
/// connections larger than the queue has its handshakes dropped and retried a second
/// later, so it is as long as the kernel allows (`net.core.somaxconn` caps it).
const LISTEN_BACKLOG: u32 = 8192;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How often the TLS files are checked for a renewal.
const TLS_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Reloads the TLS certificate on every SIGHUP, the signal renewal hooks send.
async fn reload_on_hangup(tls: Arc<Tls>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    while hangups.recv().await.is_some() {
        let tls = tls.clone();
        match tokio::task::spawn_blocking(move || tls.reload()).await {
            Ok(Ok(())) => tracing::info!("TLS certificate reloaded (SIGHUP)"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "TLS reload on SIGHUP failed; keeping the certificate in use")
            }
            Err(e) => tracing::error!(error = %e, "TLS reload task failed"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM; the server then stops accepting and drains.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
