//! `berth`: a container image registry in one binary.

mod config;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use berth_meta::SqliteMeta;
use berth_registry::{Limits, Registry};
use berth_server::App;
use berth_storage::FsBlobStore;
use clap::{Parser, Subcommand};
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

#[derive(Subcommand)]
enum Command {
    /// Run the registry.
    Serve {
        /// TOML config file; settings in it are overridden by environment and flags.
        #[arg(long, env = "BERTH_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:5000].
        #[arg(long, env = "BERTH_LISTEN")]
        listen: Option<String>,
        /// Directory for blobs and metadata [default: ./berth-data].
        #[arg(long, env = "BERTH_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Log filter, e.g. `info` or `warn,berth::access=info` [default: info].
        #[arg(long, env = "BERTH_LOG_LEVEL")]
        log_level: Option<String>,
        /// Largest manifest accepted, in bytes [default: 4194304].
        #[arg(long, env = "BERTH_MAX_MANIFEST_BYTES")]
        max_manifest_bytes: Option<usize>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
            log_level,
            max_manifest_bytes,
        } => {
            let settings = Settings::load(
                config.as_deref(),
                Overrides {
                    listen,
                    data_dir,
                    log_level,
                    max_manifest_bytes,
                },
            )?;
            serve(settings)
        }
    }
}

fn serve(settings: Settings) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&settings.log_level).context("invalid log level")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        std::fs::create_dir_all(&settings.data_dir)
            .with_context(|| format!("creating data directory {}", settings.data_dir.display()))?;
        let blobs = FsBlobStore::open(&settings.data_dir).context("opening blob storage")?;
        let meta = SqliteMeta::open(&settings.data_dir.join("meta.db")).context("opening metadata")?;
        let registry = Registry::new(
            Arc::new(blobs),
            Arc::new(meta),
            Limits { max_manifest_bytes: settings.max_manifest_bytes },
        );
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding {}", settings.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, data_dir = %settings.data_dir.display(), "berth listening on http://{addr}");
        berth_server::serve(listener, App::new(registry), shutdown_signal()).await?;
        tracing::info!("berth stopped");
        Ok(())
    })
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
