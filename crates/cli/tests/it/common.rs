//! Helpers shared by the integration suites: starting registries on the suite's metadata
//! backend, pushing blobs and images, and reading answers.

use berth_auth::AuthSettings;
use berth_oci::Digest;
use berth_registry::{GcOptions, Limits};
use berth_testkit::{Options, TestRegistry};
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// An open registry on this suite's metadata backend.
pub(crate) fn start() -> TestRegistry {
    start_opts(Options::default())
}

/// An open registry with the given limits and collection settings.
pub(crate) fn start_with(limits: Limits, gc: GcOptions) -> TestRegistry {
    start_opts(Options {
        limits,
        gc,
        ..Options::default()
    })
}

/// A registry with access control (see `TestRegistry::start_with_auth`).
pub(crate) fn start_with_auth(auth: AuthSettings) -> TestRegistry {
    start_opts(Options {
        auth,
        ..Options::default()
    })
}

/// A registry trusting tokens signed by `issuer_key` (see `TestRegistry::start_trusting`).
pub(crate) fn start_trusting(
    auth: AuthSettings,
    issuer_key: berth_auth::IssuerKey,
) -> TestRegistry {
    start_opts(Options {
        auth: AuthSettings {
            mode: berth_auth::AuthMode::ExternalToken,
            ..auth
        },
        issuer_key: Some(issuer_key),
        ..Options::default()
    })
}

/// A registry on this suite's backends, with `options` otherwise.
pub(crate) fn start_opts(options: Options) -> TestRegistry {
    TestRegistry::start_opts(Options {
        meta: crate::BACKEND,
        blobs: crate::BLOBS,
        ..options
    })
}

/// A plain HTTP client that never follows redirects, so tests see what the server said.
pub(crate) fn http() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    Digest::sha256_of(bytes).to_string()
}

/// Pushes `bytes` as a blob of `repo` in one request and returns its digest.
pub(crate) fn push_blob(base: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let r = http()
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .unwrap();
    // A registry without single-request uploads (Docker Distribution) opens a session
    // instead: the bytes go in its closing PUT.
    let r = if r.status() == StatusCode::ACCEPTED {
        let location = header(&r, "location");
        let url = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        http()
            .put(format!("{url}{separator}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .unwrap()
    } else {
        r
    };
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "push blob: {}",
        r.text().unwrap_or_default()
    );
    digest
}

/// An OCI image manifest over the given config and layers (digest, size).
pub(crate) fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(d, s)| json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}))
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers,
    }))
    .unwrap()
}

/// Pushes a small image (config + layers with the given contents) and tags it.
pub(crate) fn push_image(base: &str, repo: &str, tag: &str, layers: &[&[u8]]) -> (String, Vec<u8>) {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"tag":"{tag}"}}"#
    );
    let config_digest = push_blob(base, repo, config.as_bytes());
    let layer_refs: Vec<(String, usize)> = layers
        .iter()
        .map(|l| (push_blob(base, repo, l), l.len()))
        .collect();
    let refs: Vec<(&str, usize)> = layer_refs.iter().map(|(d, s)| (d.as_str(), *s)).collect();
    let manifest = image_manifest((&config_digest, config.len()), &refs);
    let r = put_manifest(
        base,
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    (sha256(&manifest), manifest)
}

pub(crate) fn put_manifest(
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> Response {
    http()
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .unwrap()
}

/// Asserts an OCI error response: status and the first error's code.
pub(crate) fn assert_oci_error(r: Response, status: StatusCode, code: &str) {
    assert_eq!(r.status(), status, "unexpected status");
    let body: Value = r.json().expect("error body is JSON");
    assert_eq!(body["errors"][0]["code"], code, "body: {body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "message missing: {body}"
    );
}

pub(crate) fn header(r: &Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Pulls `repo:reference` completely: the manifest, then every blob it references (and for
/// an index, every child), checking each against its digest. Returns the problems found.
pub(crate) fn pull_problems(base: &str, repo: &str, reference: &str) -> Vec<String> {
    let r = http()
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(
            "accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .unwrap();
    if r.status() != StatusCode::OK {
        return vec![format!(
            "{repo}:{reference}: manifest answered {}",
            r.status()
        )];
    }
    let manifest: Value = r.json().unwrap();
    let mut problems = Vec::new();
    if let Some(children) = manifest["manifests"].as_array() {
        for child in children {
            problems.extend(pull_problems(base, repo, child["digest"].as_str().unwrap()));
        }
        return problems;
    }
    let mut blobs = vec![manifest["config"].clone()];
    blobs.extend(manifest["layers"].as_array().cloned().unwrap_or_default());
    for blob in blobs {
        let digest = blob["digest"].as_str().unwrap();
        let r = http()
            .get(format!("{base}/v2/{repo}/blobs/{digest}"))
            .send()
            .unwrap();
        if r.status() != StatusCode::OK {
            problems.push(format!(
                "{repo}:{reference}: blob {digest} answered {}",
                r.status()
            ));
            continue;
        }
        let bytes = r.bytes().unwrap();
        if sha256(&bytes) != digest {
            problems.push(format!(
                "{repo}:{reference}: blob {digest} has other content"
            ));
        }
    }
    problems
}

/// Runs `POST /api/v1/gc` with the given query and returns the report.
pub(crate) fn run_gc(base: &str, query: &str) -> Value {
    let r = http()
        .post(format!("{base}/api/v1/gc?{query}"))
        .send()
        .unwrap();
    let status = r.status();
    let body: Value = r.json().unwrap_or(Value::Null);
    assert_eq!(status, StatusCode::OK, "gc: {body}");
    body
}
