//! Manifest parsing. The registry stores the client's exact bytes (the digest is over
//! them); parsing only extracts what the registry must check and index: the media type,
//! the edges to blobs and child manifests, the subject and the artifact type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::media_type as mt;
use crate::{Digest, ParseError};

/// A content descriptor as the image spec defines it. Unknown fields are dropped: the
/// registry only reads descriptors, the stored bytes keep everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What the referenced content is.
    pub media_type: String,
    /// Its digest, kept as text until validated by [`ParsedManifest::parse`].
    pub digest: String,
    /// Its length in bytes.
    pub size: i64,
    /// Where non-distributable content lives; the registry does not hold it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    /// Free-form annotations, carried into referrers listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Artifact type, set on referrers listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Platform of an index entry; carried but not interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

/// Whether a manifest lists blobs or other manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// OCI image manifest or Docker schema 2: a config and layers.
    Image,
    /// OCI index or Docker manifest list: child manifests.
    Index,
}

/// What an edge from a manifest points at; decides what must exist before the manifest is
/// accepted and what GC marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EdgeKind {
    /// The config blob.
    Config,
    /// A layer blob (or an artifact's blob).
    Layer,
    /// A child manifest of an index.
    Child,
}

impl EdgeKind {
    /// Stable name for storage in the metadata store.
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::Config => "config",
            EdgeKind::Layer => "layer",
            EdgeKind::Child => "child",
        }
    }
}

/// One reference from a manifest to content the registry must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEdge {
    /// The referenced content.
    pub digest: Digest,
    /// How it is referenced.
    pub kind: EdgeKind,
}

/// The facts the registry needs from a manifest.
#[derive(Debug, Clone)]
pub struct ParsedManifest {
    /// The effective media type, served back as `Content-Type`.
    pub media_type: String,
    /// Image or index.
    pub kind: ManifestKind,
    /// Blobs and child manifests the registry must hold (non-distributable layers excluded).
    pub edges: Vec<ManifestEdge>,
    /// The manifest this one refers to (signatures, SBOMs): the referrers API's key.
    pub subject: Option<Digest>,
    /// `artifactType`, or for image manifests the config media type (whatever it is, as the
    /// spec says): what the referrers API reports and filters on.
    pub artifact_type: Option<String>,
    /// Annotations, reported by the referrers API.
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
    // Schema 1 only.
    fs_layers: Option<serde_json::Value>,
}

impl ParsedManifest {
    /// Parses and validates `raw`, sent with `content_type` (the request's `Content-Type`,
    /// if any). The `mediaType` field wins when present; the header must then agree.
    pub fn parse(raw: &[u8], content_type: Option<&str>) -> Result<Self, ParseError> {
        let invalid = |reason: String| ParseError::Manifest { reason };
        let content_type = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim())
            .filter(|c| !c.is_empty());
        if let Some(ct) = content_type {
            if mt::is_schema1(ct) {
                return Err(schema1());
            }
        }
        let wire: Wire = serde_json::from_slice(raw)
            .map_err(|e| invalid(format!("not a JSON manifest: {e}")))?;
        if wire.fs_layers.is_some()
            || wire.schema_version.as_ref().and_then(|v| v.as_i64()) == Some(1)
        {
            return Err(schema1());
        }
        match &wire.schema_version {
            Some(v) if v.as_i64() == Some(2) => {}
            Some(v) => return Err(invalid(format!("schemaVersion must be 2, found {v}"))),
            None => return Err(invalid("schemaVersion is missing".into())),
        }

        let media_type = match (&wire.media_type, content_type) {
            (Some(body), _) if mt::is_schema1(body) => return Err(schema1()),
            (Some(body), _) if !mt::is_manifest(body) => {
                return Err(invalid(format!("unknown manifest media type {body:?}")))
            }
            (Some(body), Some(ct)) if mt::is_manifest(ct) && ct != body => {
                return Err(invalid(format!(
                    "Content-Type {ct:?} does not match the manifest's mediaType {body:?}"
                )))
            }
            (Some(body), _) => body.clone(),
            (None, Some(ct)) if mt::is_manifest(ct) => ct.to_owned(),
            (None, Some(ct)) if ct != "application/json" && ct != "application/octet-stream" => {
                return Err(invalid(format!("unknown manifest media type {ct:?}")))
            }
            // OCI allows omitting mediaType; the structure tells what it is.
            (None, _) if wire.manifests.is_some() => mt::OCI_INDEX.to_owned(),
            (None, _) if wire.config.is_some() => mt::OCI_MANIFEST.to_owned(),
            (None, _) => return Err(invalid("cannot tell the manifest's media type".into())),
        };

        let mut edges = Vec::new();
        let kind = if mt::is_index(&media_type) {
            if wire.config.is_some() || wire.layers.is_some() {
                return Err(invalid("an index has no config or layers".into()));
            }
            let children = wire
                .manifests
                .as_ref()
                .ok_or_else(|| invalid("index without manifests".into()))?;
            for child in children {
                edges.push(ManifestEdge {
                    digest: descriptor_digest(child)?,
                    kind: EdgeKind::Child,
                });
            }
            ManifestKind::Index
        } else {
            if wire.manifests.is_some() {
                return Err(invalid("an image manifest has no manifests list".into()));
            }
            let config = wire
                .config
                .as_ref()
                .ok_or_else(|| invalid("config is missing".into()))?;
            edges.push(ManifestEdge {
                digest: descriptor_digest(config)?,
                kind: EdgeKind::Config,
            });
            let layers = wire
                .layers
                .as_ref()
                .ok_or_else(|| invalid("layers are missing".into()))?;
            for layer in layers {
                let digest = descriptor_digest(layer)?;
                // Only a non-distributable layer may live elsewhere, and only on the web:
                // any other layer must be in the registry, `urls` or not.
                let foreign = mt::is_non_distributable(&layer.media_type);
                if foreign {
                    let urls = layer.urls.as_deref().unwrap_or_default();
                    if urls.is_empty() {
                        return Err(invalid(format!(
                            "non-distributable layer {digest} has no urls"
                        )));
                    }
                    if let Some(bad) = urls.iter().find(|u| !is_web_url(u)) {
                        return Err(invalid(format!(
                            "layer {digest}: url {:?} is not http(s)",
                            bad.chars().take(100).collect::<String>()
                        )));
                    }
                } else {
                    edges.push(ManifestEdge {
                        digest,
                        kind: EdgeKind::Layer,
                    });
                }
            }
            ManifestKind::Image
        };

        let subject = wire.subject.as_ref().map(descriptor_digest).transpose()?;
        let artifact_type = wire
            .artifact_type
            .clone()
            .or_else(|| match (&kind, &wire.config) {
                (ManifestKind::Image, Some(c)) => Some(c.media_type.clone()),
                _ => None,
            });
        Ok(ParsedManifest {
            media_type,
            kind,
            edges,
            subject,
            artifact_type,
            annotations: wire.annotations,
        })
    }
}

fn descriptor_digest(d: &Descriptor) -> Result<Digest, ParseError> {
    if d.media_type.is_empty() {
        return Err(ParseError::Manifest {
            reason: format!("descriptor {} has no mediaType", d.digest),
        });
    }
    if d.size < 0 {
        return Err(ParseError::Manifest {
            reason: format!("descriptor {} has a negative size", d.digest),
        });
    }
    Digest::parse(&d.digest).map_err(|e| ParseError::Manifest {
        reason: format!("descriptor: {e}"),
    })
}

/// An absolute `http://` or `https://` URL with a host and no fragment, as Distribution
/// accepts for foreign layers (`file:`, `ftp:` and the like would point clients anywhere).
fn is_web_url(url: &str) -> bool {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &url[8..]
    } else if lower.starts_with("http://") {
        &url[7..]
    } else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    !host.is_empty()
        && !url.contains('#')
        && url.len() <= 2048
        && url.bytes().all(|b| b.is_ascii_graphic())
}

fn schema1() -> ParseError {
    ParseError::UnsupportedManifest {
        reason: "Docker schema 1 manifests are not accepted; push schema 2 or OCI".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn parses_oci_image_with_subject() {
        let raw = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"application/x.sig",
            "config":{{"mediaType":"{}","digest":"{}","size":2}},
            "layers":[{{"mediaType":"application/x.layer","digest":"{}","size":5}}],
            "subject":{{"mediaType":"{}","digest":"{}","size":9}}}}"#,
            mt::OCI_MANIFEST,
            mt::OCI_EMPTY,
            d('a'),
            d('b'),
            mt::OCI_MANIFEST,
            d('c')
        );
        let m = ParsedManifest::parse(raw.as_bytes(), Some(mt::OCI_MANIFEST)).unwrap();
        assert_eq!(m.kind, ManifestKind::Image);
        assert_eq!(m.edges.len(), 2);
        assert_eq!(m.edges[0].kind, EdgeKind::Config);
        assert_eq!(m.subject.unwrap().as_str(), d('c'));
        assert_eq!(m.artifact_type.as_deref(), Some("application/x.sig"));
    }

    #[test]
    fn infers_media_type_and_skips_foreign_layers() {
        let raw = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{}","digest":"{}","size":2}},
            "layers":[{{"mediaType":"{}","digest":"{}","size":5,"urls":["https://x"]}}]}}"#,
            mt::OCI_CONFIG,
            d('a'),
            mt::DOCKER_FOREIGN_LAYER,
            d('b')
        );
        let m = ParsedManifest::parse(raw.as_bytes(), None).unwrap();
        assert_eq!(m.media_type, mt::OCI_MANIFEST);
        assert_eq!(m.edges.len(), 1);
        assert_eq!(
            m.artifact_type.as_deref(),
            Some(mt::OCI_CONFIG),
            "the config's type in every case"
        );
    }

    #[test]
    fn only_non_distributable_layers_may_live_elsewhere_and_only_on_the_web() {
        let manifest = |layer_type: &str, urls: &str| {
            format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"{}","digest":"{}","size":2}},
                "layers":[{{"mediaType":"{layer_type}","digest":"{}","size":5{urls}}}]}}"#,
                mt::OCI_CONFIG,
                d('a'),
                d('b')
            )
        };
        let parse = |raw: String| ParsedManifest::parse(raw.as_bytes(), None);
        // A plain layer with urls must still be in the registry.
        let m = parse(manifest(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            r#","urls":["https://x/y"]"#,
        ))
        .unwrap();
        assert_eq!(m.edges.len(), 2);
        let nondist = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
        assert_eq!(
            parse(manifest(nondist, r#","urls":["http://mirror.example/l"]"#))
                .unwrap()
                .edges
                .len(),
            1
        );
        for bad in [
            r#","urls":["file:///etc/shadow"]"#,
            r#","urls":["ftp://x/y"]"#,
            r#","urls":["https://"]"#,
            r#","urls":["https://x/y#frag"]"#,
            r#","urls":[]"#,
            "",
        ] {
            assert!(parse(manifest(nondist, bad)).is_err(), "{bad}");
            assert!(
                parse(manifest(mt::DOCKER_FOREIGN_LAYER, bad)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_index() {
        let raw = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":7}}]}}"#,
            mt::DOCKER_MANIFEST_LIST,
            mt::DOCKER_MANIFEST,
            d('e')
        );
        let m = ParsedManifest::parse(raw.as_bytes(), Some(mt::DOCKER_MANIFEST_LIST)).unwrap();
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.edges[0].kind, EdgeKind::Child);
    }

    #[test]
    fn refuses_schema1_and_garbage() {
        let s1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#;
        assert!(matches!(
            ParsedManifest::parse(s1, None),
            Err(ParseError::UnsupportedManifest { .. })
        ));
        assert!(matches!(
            ParsedManifest::parse(b"{}", Some(mt::DOCKER_SCHEMA1_SIGNED)),
            Err(ParseError::UnsupportedManifest { .. })
        ));
        for bad in [
            &b"not json"[..],
            b"{}",
            br#"{"schemaVersion":3,"config":{}}"#,
            br#"{"schemaVersion":2,"mediaType":"application/x.unknown","config":{"mediaType":"a","digest":"sha256:00","size":1},"layers":[]}"#,
            br#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:00","size":1},"layers":[]}"#,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#,
        ] {
            assert!(matches!(ParsedManifest::parse(bad, None), Err(ParseError::Manifest { .. })), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_type_must_agree_with_media_type() {
        let raw = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{}","size":2}},"layers":[]}}"#,
            mt::OCI_MANIFEST,
            mt::OCI_CONFIG,
            d('a')
        );
        assert!(ParsedManifest::parse(raw.as_bytes(), Some(mt::DOCKER_MANIFEST)).is_err());
        assert!(ParsedManifest::parse(
            raw.as_bytes(),
            Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8")
        )
        .is_ok());
    }
}
