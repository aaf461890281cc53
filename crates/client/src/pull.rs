//! Pulling one platform of an image into a local store (an OCI layout, so a layer shared
//! by several images is stored once and a second pull downloads only what is missing),
//! and unpacking it from there into a root filesystem.

use std::path::Path;

use serde_json::Value;

use crate::copy::{ProgressSink, Transfer};
use crate::endpoint::Endpoint;
use crate::unpack::{apply_layer, UnpackError, UnpackOptions};
use crate::{ClientError, CopyReport, Manifest, OciLayout};

/// An OS and architecture (and variant), as image indexes name platforms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`, `windows`…
    pub os: String,
    /// `amd64`, `arm64`…
    pub architecture: String,
    /// `v7`, `v8`… if it matters.
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(text: &str) -> Result<Platform, ClientError> {
        let mut parts = text.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform {
                    os: os.to_owned(),
                    architecture: arch.to_owned(),
                    variant: variant.map(str::to_owned),
                })
            }
            _ => Err(ClientError::BadReference(format!(
                "platform {text:?}: expected os/arch[/variant]"
            ))),
        }
    }

    /// The machine this runs on, in the words image indexes use.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    fn matches(&self, platform: &Value) -> bool {
        platform["os"].as_str() == Some(self.os.as_str())
            && platform["architecture"].as_str() == Some(self.architecture.as_str())
            && self
                .variant
                .as_deref()
                .is_none_or(|v| platform["variant"].as_str() == Some(v))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

fn is_index(manifest: &Manifest) -> bool {
    manifest.media_type.contains("index") || manifest.media_type.contains("manifest.list")
}

/// Pulls the image at `source` — the manifest for `platform` when it is an index — into
/// `store`, tagged `tag`; blobs the store holds are not downloaded again.
pub async fn pull(
    source: &Endpoint<'_>,
    store: &OciLayout,
    tag: &str,
    platform: &Platform,
    progress: Option<ProgressSink>,
) -> Result<(Manifest, CopyReport), ClientError> {
    let image = resolve(source, platform).await?;
    let destination = Endpoint::Layout {
        layout: store,
        tag: Some(tag.to_owned()),
    };
    let transfer = Transfer {
        source,
        destination: &destination,
        progress,
        shared: None,
    };
    let report = transfer.copy_manifest(&image).await?;
    Ok((image, report))
}

/// The image manifest `source` names for `platform`: itself, or its index's entry.
pub async fn resolve(source: &Endpoint<'_>, platform: &Platform) -> Result<Manifest, ClientError> {
    let top = source.top_manifest().await?;
    choose_platform(source, top, platform).await
}

/// `top` itself if it is an image, else the image its index names for `platform`.
pub(crate) async fn choose_platform(
    source: &Endpoint<'_>,
    top: Manifest,
    platform: &Platform,
) -> Result<Manifest, ClientError> {
    if is_index(&top) {
        let index: Value = serde_json::from_slice(&top.bytes)
            .map_err(|e| ClientError::Protocol(format!("index {}: {e}", top.digest)))?;
        let chosen = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| platform.matches(&m["platform"]))
            .and_then(|m| m["digest"].as_str())
            .and_then(|d| berth_oci::Digest::parse(d).ok())
            .ok_or_else(|| {
                ClientError::NotFound(format!("no {platform} image in index {}", top.digest))
            })?;
        source.child_manifest(&chosen).await
    } else {
        Ok(top)
    }
}

/// What unpacking did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnpackReport {
    /// Layers applied.
    pub layers: usize,
    /// Entries applied over all layers.
    pub entries: u64,
    /// Whiteouts applied.
    pub whiteouts: u64,
    /// Device nodes skipped (rootless).
    pub skipped_devices: u64,
}

/// Applies the layers of `image` (an image manifest whose blobs `store` holds) over
/// `root`, creating it if needed.
pub async fn unpack(
    store: &OciLayout,
    image: &Manifest,
    root: &Path,
    options: UnpackOptions,
) -> Result<UnpackReport, ClientError> {
    let parsed: Value = serde_json::from_slice(&image.bytes)
        .map_err(|e| ClientError::Protocol(format!("manifest {}: {e}", image.digest)))?;
    let layers: Vec<berth_oci::Digest> = parsed["layers"]
        .as_array()
        .ok_or_else(|| ClientError::Protocol(format!("manifest {} lists no layers", image.digest)))?
        .iter()
        .map(|l| {
            l["digest"]
                .as_str()
                .and_then(|d| berth_oci::Digest::parse(d).ok())
                .ok_or_else(|| ClientError::Protocol("a layer without a digest".to_owned()))
        })
        .collect::<Result<_, _>>()?;
    std::fs::create_dir_all(root)
        .map_err(|e| ClientError::Protocol(format!("{}: {e}", root.display())))?;
    let mut report = UnpackReport::default();
    for digest in layers {
        let path = store.blob_file(&digest);
        let root = root.to_owned();
        let applied = tokio::task::spawn_blocking(move || -> Result<_, UnpackError> {
            let file = std::fs::File::open(&path).map_err(|source| UnpackError::Io {
                path: path.display().to_string(),
                source,
            })?;
            apply_layer(&root, file, options)
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("unpacking: {e}")))?
        .map_err(|e| ClientError::Protocol(format!("layer {digest}: {e}")))?;
        report.layers += 1;
        report.entries += applied.entries;
        report.whiteouts += applied.whiteouts;
        report.skipped_devices += applied.skipped_devices;
    }
    Ok(report)
}

/// What `berth inspect` shows of an image: the manifest's digest, media type and size;
/// for an index its platforms, for an image its layers and the config's platform and
/// creation time.
pub async fn inspect(source: &Endpoint<'_>) -> Result<Value, ClientError> {
    let top = source.top_manifest().await?;
    let parsed: Value = serde_json::from_slice(&top.bytes)
        .map_err(|e| ClientError::Protocol(format!("manifest {}: {e}", top.digest)))?;
    let mut report = serde_json::json!({
        "digest": top.digest.to_string(),
        "mediaType": top.media_type,
        "size": top.bytes.len(),
    });
    if is_index(&top) {
        report["manifests"] = parsed["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                serde_json::json!({
                    "digest": m["digest"],
                    "size": m["size"],
                    "platform": m["platform"],
                })
            })
            .collect();
        return Ok(report);
    }
    let layers: Vec<Value> = parsed["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| serde_json::json!({"digest": l["digest"], "size": l["size"], "mediaType": l["mediaType"]}))
        .collect();
    let total: u64 = layers.iter().filter_map(|l| l["size"].as_u64()).sum();
    report["layers"] = Value::Array(layers);
    report["layersSize"] = total.into();
    if let Some(config) = parsed["config"]["digest"]
        .as_str()
        .and_then(|d| berth_oci::Digest::parse(d).ok())
    {
        report["config"] = serde_json::json!({ "digest": config.to_string() });
        let size = parsed["config"]["size"].as_u64();
        // The config is small; read it whole (bounded) for the platform and dates.
        if size.is_some_and(|s| s <= 1024 * 1024) {
            if let Ok(stream) = source.blob(&config, size.unwrap_or(0)).await {
                let bytes = collect(stream).await?;
                if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
                    for key in ["os", "architecture", "variant", "created", "author"] {
                        if !value[key].is_null() {
                            report["config"][key] = value[key].clone();
                        }
                    }
                }
            }
        }
    }
    Ok(report)
}

async fn collect(
    mut stream: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send>,
    >,
) -> Result<Vec<u8>, ClientError> {
    use futures_util::StreamExt;
    let mut all = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ClientError::Protocol(format!("config: {e}")))?;
        all.extend_from_slice(&chunk);
    }
    Ok(all)
}
