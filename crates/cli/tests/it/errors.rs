//! Bad input: each answered with the spec's error code and status, nothing stored.

use berth_registry::Limits;
use reqwest::StatusCode;
use serde_json::json;

use crate::{assert_oci_error, http, push_blob, put_manifest, sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[test]
fn invalid_names_tags_and_digests() {
    let reg = crate::start();
    let base = reg.url();
    let digest = sha256(b"x");
    // Sent raw: an HTTP library would normalise `..` away before the server saw it.
    for name in [
        "../x",
        "x/..",
        "x/../y",
        "Upper/case",
        "a//b",
        "a/",
        "-a",
        "a__-b",
        "%2e%2e/x",
        "a%2fb",
    ] {
        for (method, path) in [
            ("GET", format!("/v2/{name}/tags/list")),
            ("GET", format!("/v2/{name}/manifests/latest")),
            ("GET", format!("/v2/{name}/blobs/{digest}")),
            ("POST", format!("/v2/{name}/blobs/uploads/")),
        ] {
            let (status, body) = raw_request(&reg.host(), method, &path);
            assert_eq!(status, 400, "{method} {path}: {body}");
            assert!(body.contains("\"NAME_INVALID\""), "{method} {path}: {body}");
        }
    }
    let long = "a".repeat(256);
    let r = http()
        .get(format!("{base}/v2/{long}/tags/list"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "NAME_INVALID");

    for bad in [
        "sha256:abc",
        "sha256:ZZZ",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256",
    ] {
        let r = http()
            .get(format!("{base}/v2/team/app/blobs/{bad}"))
            .send()
            .unwrap();
        assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    }
    // A reference that is neither a tag nor a digest names no manifest: 404, as the
    // spec has it, for reads and deletes alike.
    for reference in ["sha256:abc", ".bad-tag", "a%20b"] {
        for method in [
            reqwest::Method::GET,
            reqwest::Method::HEAD,
            reqwest::Method::DELETE,
        ] {
            let r = http()
                .request(
                    method.clone(),
                    format!("{base}/v2/team/app/manifests/{reference}"),
                )
                .send()
                .unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{method} {reference}");
            if method != reqwest::Method::HEAD {
                assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
            }
        }
    }
    let r = http()
        .put(format!("{base}/v2/team/app/manifests/.bad-tag"))
        .body("{}")
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "MANIFEST_INVALID");
    let r = http()
        .get(format!("{base}/v2/team/app/blobs/{digest}"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
    let r = http()
        .get(format!("{base}/v2/team/app/manifests/latest"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    let r = http()
        .post(format!("{base}/v2/team/app/manifests/latest"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED");
    let r = http()
        .get(format!("{base}/v2/team/app/nothing/here"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[test]
fn malformed_unknown_and_schema1_manifests() {
    let reg = crate::start();
    let base = reg.url();
    let config = push_blob(&base, "team/app", b"{}");
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        (OCI_MANIFEST, b"not json at all".to_vec(), StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        (OCI_MANIFEST, b"{\"schemaVersion\":2}".to_vec(), StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        (OCI_MANIFEST, b"[1,2,3]".to_vec(), StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        (
            "application/vnd.example.unknown+json",
            serde_json::to_vec(&json!({"schemaVersion": 2, "config": {"mediaType": "a/b", "digest": config, "size": 2}, "layers": []})).unwrap(),
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
        ),
        (
            OCI_MANIFEST,
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": "a/b", "digest": "sha256:xyz", "size": 2}, "layers": []})).unwrap(),
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
        ),
        (
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            serde_json::to_vec(&json!({"schemaVersion": 1, "name": "team/app", "tag": "v1", "fsLayers": [], "history": []})).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED",
        ),
        (
            "application/json",
            serde_json::to_vec(&json!({"schemaVersion": 1, "name": "team/app", "tag": "v1", "fsLayers": []})).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED",
        ),
    ];
    for (media_type, body, status, code) in cases {
        let r = put_manifest(&base, "team/app", "v1", media_type, &body);
        assert_oci_error(r, status, code);
    }
    // Missing blobs: the manifest names a layer this repository does not hold.
    let missing = sha256(b"missing layer");
    let body = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": missing, "size": 13}],
    }))
    .unwrap();
    let r = put_manifest(&base, "team/app", "v1", OCI_MANIFEST, &body);
    assert_oci_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN");
    // Pushed by a digest that is not the body's.
    let r = put_manifest(&base, "team/app", &sha256(b"other"), OCI_MANIFEST, &body);
    assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
    // Nothing was stored.
    let r = http()
        .get(format!("{base}/v2/team/app/tags/list"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN");
}

#[test]
fn oversized_manifest_is_refused_with_413() {
    let reg = crate::start_with(
        Limits {
            max_manifest_bytes: 1024,
            ..Limits::default()
        },
        Default::default(),
    );
    let base = reg.url();
    let big =
        serde_json::to_vec(&json!({"schemaVersion": 2, "annotations": {"pad": "x".repeat(2000)}}))
            .unwrap();
    let r = put_manifest(&base, "team/app", "big", OCI_MANIFEST, &big);
    assert_oci_error(r, StatusCode::PAYLOAD_TOO_LARGE, "MANIFEST_INVALID");
    // Without Content-Length (chunked transfer) the limit holds while reading. Sent raw:
    // the server may answer before the body ends, which an HTTP library reports as an error.
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(reg.host()).unwrap();
    let mut request = format!(
        "PUT /v2/team/app/manifests/big HTTP/1.1\r\nHost: {}\r\nContent-Type: {OCI_MANIFEST}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        reg.host()
    )
    .into_bytes();
    for _ in 0..8 {
        request.extend_from_slice(b"200\r\n");
        request.extend_from_slice(&[b' '; 512]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let _ = conn.write_all(&request);
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("MANIFEST_INVALID"), "{answer}");
}

/// One HTTP/1.1 request written byte for byte; returns the status and body text.
fn raw_request(host: &str, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(host).unwrap();
    write!(conn, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[test]
fn only_non_distributable_layers_may_point_elsewhere_and_only_to_the_web() {
    let reg = crate::start();
    let base = reg.url();
    let config = push_blob(&base, "team/app", b"{}");
    let absent = sha256(b"bytes that live elsewhere");
    let manifest = |layer_type: &str, urls: serde_json::Value| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": layer_type, "digest": absent, "size": 25, "urls": urls}],
        }))
        .unwrap()
    };
    let put = |body: Vec<u8>| {
        put_manifest(
            &base,
            "team/app",
            "v1",
            "application/vnd.oci.image.manifest.v1+json",
            &body,
        )
    };
    let foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
    // A `file:` URL, or a plain layer type, no longer skips the presence check.
    assert_oci_error(
        put(manifest(foreign, json!(["file:///etc/shadow"]))),
        StatusCode::BAD_REQUEST,
        "MANIFEST_INVALID",
    );
    assert_oci_error(
        put(manifest(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            json!(["https://mirror.example/l"]),
        )),
        StatusCode::BAD_REQUEST,
        "MANIFEST_BLOB_UNKNOWN",
    );
    // A foreign layer on the web is what `urls` is for.
    let r = put(manifest(foreign, json!(["https://mirror.example/l"])));
    assert_eq!(r.status(), StatusCode::CREATED);
}
