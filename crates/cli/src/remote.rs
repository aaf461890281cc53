//! The client commands: talking to registries rather than serving one. `berth copy`
//! copies an image (every platform of an index, digests unchanged) between registries
//! through `berth_client`.

use anyhow::Context;
use berth_client::{copy_image, Credentials, ImageRef, RegistryClient};
use clap::Args;

/// How to reach the registries of a command.
#[derive(Debug, Args)]
pub(crate) struct RemoteArgs {
    /// Credentials for the source registry, `USER:PASSWORD` (env BERTH_SRC_CREDS).
    #[arg(long, env = "BERTH_SRC_CREDS", hide_env_values = true)]
    src_creds: Option<String>,
    /// Credentials for the destination registry, `USER:PASSWORD` (env BERTH_DEST_CREDS).
    #[arg(long, env = "BERTH_DEST_CREDS", hide_env_values = true)]
    dest_creds: Option<String>,
    /// Speak plain HTTP to every registry (loopback and localhost use it by default).
    #[arg(long)]
    plain_http: bool,
    /// Accept any TLS certificate.
    #[arg(long)]
    insecure: bool,
}

fn credentials(given: Option<&str>) -> anyhow::Result<Option<Credentials>> {
    given
        .map(|pair| {
            let (username, password) = pair
                .split_once(':')
                .context("credentials must be USER:PASSWORD")?;
            Ok(Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            })
        })
        .transpose()
}

/// `berth copy SRC DST`.
pub(crate) fn copy(source: &str, destination: &str, args: RemoteArgs) -> anyhow::Result<()> {
    let source = ImageRef::parse(source)?;
    let destination = ImageRef::parse(destination)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let http = RegistryClient::default_http(args.insecure)?;
        let client = |image: &ImageRef, creds: Option<&str>| -> anyhow::Result<RegistryClient> {
            let plain = args.plain_http || image.plain_http_by_default();
            Ok(RegistryClient::new(
                http.clone(),
                &image.registry,
                plain,
                credentials(creds)?,
            ))
        };
        let from = client(&source, args.src_creds.as_deref())?;
        let to = client(&destination, args.dest_creds.as_deref())?;
        let report = copy_image(&from, &source, &to, &destination)
            .await
            .with_context(|| format!("copying {source} to {destination}"))?;
        println!(
            "{destination}: {} ({} manifests, {} blobs copied ({} bytes), {} already there, {} mounted)",
            report
                .digest
                .as_ref()
                .map(|d| d.to_string())
                .unwrap_or_default(),
            report.manifests,
            report.blobs_copied,
            report.bytes,
            report.blobs_skipped,
            report.blobs_mounted,
        );
        Ok(())
    })
}
