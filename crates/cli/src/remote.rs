//! The client commands: talking to registries rather than serving one, through
//! `berth_client`: `copy` and `push` between registries and OCI layouts, `pull` into the
//! local store, `unpack`, `inspect`, `login` and `logout`.

use anyhow::Context;
use berth_client::{Credentials, Endpoint, ImageRef, OciLayout, RegistryClient};
use clap::Args;

use crate::progress::{self, Display, Mode};

/// How to reach the registries of a command.
#[derive(Debug, Args)]
pub(crate) struct RemoteArgs {
    /// Credentials for the source registry, `USER:PASSWORD` (env BERTH_SRC_CREDS).
    #[arg(long, env = "BERTH_SRC_CREDS", hide_env_values = true)]
    src_creds: Option<String>,
    /// Credentials for the destination registry, `USER:PASSWORD` (env BERTH_DEST_CREDS).
    #[arg(long, env = "BERTH_DEST_CREDS", hide_env_values = true)]
    dest_creds: Option<String>,
    /// Speak plain HTTP to every registry (loopback and localhost use it by default,
    /// unless a CA is given with `--ca-file` or kept for them in `certs.d`).
    #[arg(long)]
    plain_http: bool,
    /// Accept any TLS certificate.
    #[arg(long)]
    insecure: bool,
    /// Trust the CA certificates in this PEM file too (besides the system's and those in
    /// docker's and podman's `certs.d/<registry>/`). May be given more than once.
    #[arg(long = "ca-file", value_name = "PEM")]
    ca_files: Vec<std::path::PathBuf>,
    /// Report progress as JSON lines on stdout (one object per event, then the result).
    #[arg(long)]
    json: bool,
    /// Push blobs larger than this many MiB in chunks of this size (for proxies that
    /// cap a request body; a failed chunk is sent again from where the registry stopped).
    #[arg(long, value_name = "MiB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    chunk_size: u64,
}

impl RemoteArgs {
    /// A client for `image`'s registry with `creds` (else the stored login).
    fn client(&self, image: &ImageRef, creds: Option<&str>) -> anyhow::Result<RegistryClient> {
        let http = RegistryClient::http_for(&image.registry, self.insecure, &self.ca_files)?;
        // A CA given or kept for the registry means it speaks TLS, even on loopback.
        let tls_configured =
            !self.ca_files.is_empty() || RegistryClient::has_ca_for(&image.registry);
        let plain = self.plain_http || (image.plain_http_by_default() && !tls_configured);
        Ok(RegistryClient::new(
            http,
            &image.registry,
            plain,
            credentials(creds, &image.registry)?,
        )
        .with_chunk_size(self.chunk_size * 1024 * 1024))
    }
}

/// Which manifests `copy` takes.
#[derive(Debug, Args)]
pub(crate) struct CopyArgs {
    /// Copy every platform of an index (the index itself, digests unchanged). Without it,
    /// only the image for `--platform` (or this machine's) is copied.
    #[arg(long, conflicts_with = "platform")]
    all_platforms: bool,
    /// The platform to take from an index, `os/arch[/variant]` [default: this machine's].
    #[arg(long)]
    platform: Option<String>,
    /// Also copy the image's referrers (signatures, SBOMs), through the referrers API
    /// or the `sha256-<hex>` tag of registries without it.
    #[arg(long)]
    referrers: bool,
}

impl CopyArgs {
    /// Every platform: what `push` of a local layout does.
    pub(crate) fn everything(referrers: bool) -> CopyArgs {
        CopyArgs {
            all_platforms: true,
            platform: None,
            referrers,
        }
    }
}

/// The credentials given on the command line, else those stored for `registry` (by
/// `docker login`, `podman login` or `berth login`).
fn credentials(given: Option<&str>, registry: &str) -> anyhow::Result<Option<Credentials>> {
    match given {
        Some(pair) => {
            let (username, password) = pair
                .split_once(':')
                .context("credentials must be USER:PASSWORD")?;
            Ok(Some(Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            }))
        }
        None => Ok(berth_client::credentials::lookup(registry)?),
    }
}

/// `berth login REGISTRY`: checks the credentials against the registry, then keeps them
/// in docker's `config.json`, where docker, podman and berth all find them.
pub(crate) fn login(
    registry: &str,
    username: &str,
    password: Option<String>,
    password_stdin: bool,
    plain_http: bool,
    insecure: bool,
) -> anyhow::Result<()> {
    let password = match (password, password_stdin) {
        (Some(p), false) => p,
        (None, true) => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
        _ => anyhow::bail!("give the password with --password-stdin (or --password)"),
    };
    let credentials = Credentials {
        username: username.to_owned(),
        password,
    };
    let image = ImageRef::parse(&format!("{registry}/probe"))?;
    let plain = plain_http || image.plain_http_by_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let http = RegistryClient::default_http(insecure)?;
        let client = RegistryClient::new(http, &image.registry, plain, Some(credentials.clone()));
        client
            .ping()
            .await
            .with_context(|| format!("logging in to {registry}"))
    })?;
    let path = berth_client::credentials::store(&image.registry, &credentials)?;
    println!("Login Succeeded (credentials kept in {})", path.display());
    Ok(())
}

/// `berth logout REGISTRY`.
pub(crate) fn logout(registry: &str) -> anyhow::Result<()> {
    if berth_client::credentials::remove(registry)? {
        println!("Removed login credentials for {registry}");
    } else {
        println!("Not logged in to {registry}");
    }
    Ok(())
}

/// Where `berth copy` reads or writes: a registry reference, or `oci:PATH[:TAG]`.
enum Place {
    Registry(ImageRef),
    Layout {
        path: std::path::PathBuf,
        tag: Option<String>,
    },
}

impl Place {
    fn parse(text: &str) -> anyhow::Result<Place> {
        let Some(rest) = text.strip_prefix("oci:") else {
            return Ok(Place::Registry(ImageRef::parse(text)?));
        };
        // The tag follows the last ':' unless that ':' is part of the path.
        let (path, tag) = match rest.rsplit_once(':') {
            Some((path, tag)) if !tag.contains('/') && !tag.is_empty() => {
                berth_oci::Tag::parse(tag).with_context(|| format!("{text}: bad tag"))?;
                (path, Some(tag.to_owned()))
            }
            _ => (rest, None),
        };
        anyhow::ensure!(!path.is_empty(), "{text}: no layout path");
        Ok(Place::Layout {
            path: path.into(),
            tag,
        })
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Registry(image) => write!(f, "{image}"),
            Place::Layout {
                path,
                tag: Some(tag),
            } => write!(f, "oci:{}:{tag}", path.display()),
            Place::Layout { path, tag: None } => write!(f, "oci:{}", path.display()),
        }
    }
}

/// `berth copy SRC DST` (and `berth push`).
pub(crate) fn copy(
    source: &str,
    destination: &str,
    what: CopyArgs,
    args: RemoteArgs,
) -> anyhow::Result<()> {
    let source = Place::parse(source)?;
    let destination = Place::parse(destination)?;
    let platform = match (&what.platform, what.all_platforms) {
        (_, true) => None,
        (Some(p), false) => Some(berth_client::Platform::parse(p)?),
        (None, false) => Some(berth_client::Platform::host()),
    };
    let display = Display::new(Mode::choose(args.json), "copying");
    let options = berth_client::CopyOptions {
        platform,
        referrers: what.referrers,
        progress: Some(display.sink()),
        shared_blobs: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (from_client, from_layout) = match &source {
            Place::Registry(image) => (Some(args.client(image, args.src_creds.as_deref())?), None),
            Place::Layout { path, .. } => (None, Some(OciLayout::open_existing(path).await?)),
        };
        let (to_client, to_layout) = match &destination {
            Place::Registry(image) => (Some(args.client(image, args.dest_creds.as_deref())?), None),
            Place::Layout { path, .. } => (None, Some(OciLayout::open(path).await?)),
        };
        let from = endpoint(&source, from_client.as_ref(), from_layout.as_ref());
        let to = endpoint(&destination, to_client.as_ref(), to_layout.as_ref());
        let copied = berth_client::copy(&from, &to, &options).await;
        display.finish();
        let report = copied.with_context(|| format!("copying {source} to {destination}"))?;
        let digest = report
            .digest
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default();
        if display.mode() == Mode::Json {
            progress::emit_json(&serde_json::json!({
                "event": "copied", "destination": destination.to_string(), "digest": digest,
                "manifests": report.manifests, "blobsCopied": report.blobs_copied,
                "bytes": report.bytes, "blobsSkipped": report.blobs_skipped,
                "blobsMounted": report.blobs_mounted, "referrers": report.referrers,
            }));
            return Ok(());
        }
        println!(
            "{destination}: {digest} ({} manifests, {} blobs copied ({}), {} already there, {} mounted, {} referrers)",
            report.manifests,
            report.blobs_copied,
            progress::bytes(report.bytes),
            report.blobs_skipped,
            report.blobs_mounted,
            report.referrers,
        );
        Ok(())
    })
}

fn endpoint<'a>(
    place: &'a Place,
    client: Option<&'a RegistryClient>,
    layout: Option<&'a OciLayout>,
) -> Endpoint<'a> {
    match (place, client, layout) {
        (Place::Registry(image), Some(client), _) => Endpoint::Registry { client, image },
        (Place::Layout { tag, .. }, _, Some(layout)) => Endpoint::Layout {
            layout,
            tag: tag.clone(),
        },
        _ => unreachable!("each place is opened as its kind"),
    }
}

/// The local store: an OCI layout under the user's data directory unless given.
fn store_dir(given: Option<std::path::PathBuf>) -> anyhow::Result<std::path::PathBuf> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(|h| std::path::PathBuf::from(h).join(".local/share"))
        })
        .context("no HOME or XDG_DATA_HOME for the store: give --store")?;
    Ok(data.join("berth/store"))
}

/// What `pull` and `unpack` share.
#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// The platform of an index to take, `os/arch[/variant]` [default: this machine's].
    #[arg(long)]
    platform: Option<String>,
    /// The local store (an OCI layout) [default: ~/.local/share/berth/store].
    #[arg(long)]
    store: Option<std::path::PathBuf>,
    /// Keep the layers' file owners (needs root); otherwise everything is the caller's
    /// and device nodes are skipped.
    #[arg(long)]
    keep_owners: bool,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// `berth pull IMAGE [--unpack DIR]` and `berth unpack SRC DIR`: one platform of the image
/// into the store (only missing blobs are fetched), then optionally into a root
/// filesystem. An `oci:` source is unpacked straight from its layout.
pub(crate) fn pull(
    source: &str,
    unpack_into: Option<&std::path::Path>,
    args: PullArgs,
) -> anyhow::Result<()> {
    let place = Place::parse(source)?;
    let platform = match &args.platform {
        Some(p) => berth_client::Platform::parse(p)?,
        None => berth_client::Platform::host(),
    };
    let options = berth_client::unpack::UnpackOptions {
        keep_owners: args.keep_owners,
    };
    let display = Display::new(Mode::choose(args.remote.json), "downloading");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (layout, image) = match &place {
            Place::Registry(reference) => {
                let store = OciLayout::open(&store_dir(args.store.clone())?).await?;
                let client = args
                    .remote
                    .client(reference, args.remote.src_creds.as_deref())?;
                let source = Endpoint::Registry {
                    client: &client,
                    image: reference,
                };
                let pulled = berth_client::pull(
                    &source,
                    &store,
                    &reference.to_string(),
                    &platform,
                    Some(display.sink()),
                )
                .await;
                display.finish();
                let (image, report) = pulled.with_context(|| format!("pulling {reference}"))?;
                if display.mode() == Mode::Json {
                    progress::emit_json(&serde_json::json!({
                        "event": "pulled", "image": reference.to_string(),
                        "platform": platform.to_string(), "digest": image.digest.to_string(),
                        "blobsDownloaded": report.blobs_copied, "bytes": report.bytes,
                        "blobsInStore": report.blobs_skipped,
                    }));
                } else {
                    println!(
                        "{reference} ({platform}): {} ({} blobs downloaded ({}), {} already in the store)",
                        image.digest,
                        report.blobs_copied,
                        progress::bytes(report.bytes),
                        report.blobs_skipped
                    );
                }
                (store, image)
            }
            Place::Layout { path, tag } => {
                let layout = OciLayout::open_existing(path).await?;
                let source = Endpoint::Layout {
                    layout: &layout,
                    tag: tag.clone(),
                };
                let image = berth_client::resolve(&source, &platform).await?;
                (layout, image)
            }
        };
        if let Some(root) = unpack_into {
            let report = berth_client::unpack(&layout, &image, root, options)
                .await
                .with_context(|| format!("unpacking into {}", root.display()))?;
            if display.mode() == Mode::Json {
                progress::emit_json(&serde_json::json!({
                    "event": "unpacked", "root": root.display().to_string(),
                    "layers": report.layers, "entries": report.entries,
                    "whiteouts": report.whiteouts, "skippedDevices": report.skipped_devices,
                }));
                return Ok(());
            }
            println!(
                "unpacked {} layers into {} ({} entries, {} whiteouts{})",
                report.layers,
                root.display(),
                report.entries,
                report.whiteouts,
                if report.skipped_devices > 0 {
                    format!(", {} device nodes skipped: not root", report.skipped_devices)
                } else {
                    String::new()
                }
            );
        }
        Ok(())
    })
}

/// `berth inspect IMAGE`: what a registry (or layout) holds under a reference, as JSON:
/// the manifest's digest and media type, an index's platforms, an image's layers and
/// config summary.
pub(crate) fn inspect(source: &str, args: RemoteArgs) -> anyhow::Result<()> {
    let place = Place::parse(source)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (client, layout) = match &place {
            Place::Registry(image) => (Some(args.client(image, args.src_creds.as_deref())?), None),
            Place::Layout { path, .. } => (None, Some(OciLayout::open_existing(path).await?)),
        };
        let endpoint = endpoint(&place, client.as_ref(), layout.as_ref());
        let report = berth_client::inspect(&endpoint)
            .await
            .with_context(|| format!("inspecting {place}"))?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(())
    })
}
