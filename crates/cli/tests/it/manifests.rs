//! Manifest push, pull and delete for every supported kind.

use reqwest::StatusCode;
use serde_json::json;

use crate::{assert_oci_error, header, http, push_blob, push_image, put_manifest, sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[test]
fn oci_manifest_by_tag_and_digest_byte_for_byte() {
    let reg = crate::start();
    let base = reg.url();
    let config = push_blob(&base, "team/app", b"{\"os\":\"linux\"}");
    let layer = push_blob(&base, "team/app", b"layer");
    // Odd whitespace and key order: the registry must keep the bytes exactly.
    let raw = format!(
        "{{\n  \"layers\": [{{\"size\": 5, \"digest\": \"{layer}\", \"mediaType\": \"application/vnd.oci.image.layer.v1.tar\"}}],\n  \"schemaVersion\": 2,\n  \"mediaType\": \"{OCI_MANIFEST}\",\n  \"config\": {{\"mediaType\": \"application/vnd.oci.image.config.v1+json\", \"digest\": \"{config}\", \"size\": 15}}\n}}\n"
    );
    let digest = sha256(raw.as_bytes());
    let r = put_manifest(&base, "team/app", "v1", OCI_MANIFEST, raw.as_bytes());
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/team/app/manifests/{digest}")
    );

    for reference in ["v1", digest.as_str()] {
        let r = http()
            .get(format!("{base}/v2/team/app/manifests/{reference}"))
            .header("accept", OCI_MANIFEST)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, "docker-content-digest"), digest);
        assert_eq!(header(&r, "content-length"), raw.len().to_string());
        assert_eq!(header(&r, "etag"), format!("\"{digest}\""));
        assert_eq!(r.bytes().unwrap().as_ref(), raw.as_bytes());
        let r = http()
            .head(format!("{base}/v2/team/app/manifests/{reference}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-length"), raw.len().to_string());
        assert_eq!(header(&r, "docker-content-digest"), digest);
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert!(r.bytes().unwrap().is_empty());
    }
    // By digest, without a tag.
    let r = put_manifest(&base, "team/app", &digest, OCI_MANIFEST, raw.as_bytes());
    assert_eq!(r.status(), StatusCode::CREATED);
    // A manifest is also readable through the blob endpoint, as in Distribution.
    let r = http()
        .get(format!("{base}/v2/team/app/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), raw.as_bytes());

    // Retagging moves the tag.
    let (other, _) = push_image(&base, "team/app", "v1", &[b"another layer"]);
    let r = http()
        .head(format!("{base}/v2/team/app/manifests/v1"))
        .send()
        .unwrap();
    assert_eq!(header(&r, "docker-content-digest"), other);
    let r = http()
        .head(format!("{base}/v2/team/app/manifests/{digest}"))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the untagged manifest stays by digest"
    );
}

#[test]
fn docker_schema2_manifest_list_and_oci_index() {
    let reg = crate::start();
    let base = reg.url();
    let config = push_blob(&base, "team/multi", b"{\"architecture\":\"arm64\"}");
    let layer = push_blob(&base, "team/multi", b"docker layer");
    let docker = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config, "size": 24},
        "layers": [
            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": layer, "size": 12},
            {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": sha256(b"foreign"), "size": 7, "urls": ["https://example.invalid/layer"]},
        ],
    }))
    .unwrap();
    let docker_digest = sha256(&docker);
    let r = put_manifest(
        &base,
        "team/multi",
        &docker_digest,
        DOCKER_MANIFEST,
        &docker,
    );
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "foreign layers are not required"
    );
    let (oci_digest, oci) = push_image(&base, "team/multi", "amd64", &[b"oci layer"]);

    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": docker_digest, "size": docker.len(), "platform": {"architecture": "arm64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": oci_digest, "size": oci.len(), "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let r = put_manifest(&base, "team/multi", "list", DOCKER_LIST, &list);
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http()
        .get(format!("{base}/v2/team/multi/manifests/list"))
        .send()
        .unwrap();
    assert_eq!(header(&r, "content-type"), DOCKER_LIST);
    assert_eq!(r.bytes().unwrap().as_ref(), &list[..]);

    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": oci_digest, "size": oci.len()}],
    }))
    .unwrap();
    let r = put_manifest(&base, "team/multi", "index", OCI_INDEX, &index);
    assert_eq!(r.status(), StatusCode::CREATED);

    // An index whose child is not in this repository.
    let missing = sha256(b"missing child");
    let bad = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": missing, "size": 10}],
    }))
    .unwrap();
    let r = put_manifest(&base, "team/multi", "bad", OCI_INDEX, &bad);
    assert_oci_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN");
    let r = put_manifest(&base, "team/elsewhere", "bad", OCI_INDEX, &index);
    assert_oci_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN");
}

#[test]
fn artifact_with_empty_config() {
    let reg = crate::start();
    let base = reg.url();
    let empty = push_blob(&base, "team/art", b"{}");
    let file = push_blob(&base, "team/art", b"chart bytes");
    let artifact = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.chart",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2, "data": "e30="},
        "layers": [{"mediaType": "application/vnd.example.chart.layer", "digest": file, "size": 11}],
    }))
    .unwrap();
    let r = put_manifest(&base, "team/art", "1.0.0", OCI_MANIFEST, &artifact);
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http()
        .get(format!("{base}/v2/team/art/manifests/1.0.0"))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), &artifact[..]);
}

#[test]
fn delete_by_digest_removes_tags_and_delete_by_tag_keeps_the_manifest() {
    let reg = crate::start();
    let base = reg.url();
    let (digest, manifest) = push_image(&base, "team/app", "v1", &[b"layer"]);
    put_manifest(&base, "team/app", "v2", OCI_MANIFEST, &manifest);
    put_manifest(&base, "team/app", "v3", OCI_MANIFEST, &manifest);

    let r = http()
        .delete(format!("{base}/v2/team/app/manifests/v3"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = http()
        .get(format!("{base}/v2/team/app/manifests/v3"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    assert_eq!(
        http()
            .head(format!("{base}/v2/team/app/manifests/{digest}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::OK
    );

    let r = http()
        .delete(format!("{base}/v2/team/app/manifests/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    for reference in ["v1", "v2", digest.as_str()] {
        let r = http()
            .get(format!("{base}/v2/team/app/manifests/{reference}"))
            .send()
            .unwrap();
        assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    }
    let tags: serde_json::Value = http()
        .get(format!("{base}/v2/team/app/tags/list"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(tags["tags"], json!([]));
    let r = http()
        .delete(format!("{base}/v2/team/app/manifests/{digest}"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
    let r = http()
        .delete(format!("{base}/v2/team/app/manifests/nope"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");

    // The same content can be pushed again after a delete.
    let (again, _) = push_image(&base, "team/app", "v1", &[b"layer"]);
    assert_eq!(again, digest);
}

/// Reads of a tag and of a blob's presence are served from the node's cache between
/// writes: every write through the node is seen by the very next request.
#[test]
fn a_tag_moved_or_deleted_and_a_blob_deleted_are_seen_at_once() {
    let reg = crate::start();
    let base = reg.url();
    let tag_url = format!("{base}/v2/team/app/manifests/moving");
    let get_tag = || {
        http()
            .get(&tag_url)
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .unwrap()
    };
    for round in 0..10u8 {
        let layer = format!("layer of round {round}");
        let (digest, _) = push_image(&base, "team/app", "moving", &[layer.as_bytes()]);
        for _ in 0..3 {
            let r = get_tag();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(header(&r, "docker-content-digest"), digest, "round {round}");
        }
        let blob = format!("{base}/v2/team/app/blobs/{}", sha256(layer.as_bytes()));
        assert_eq!(http().head(&blob).send().unwrap().status(), StatusCode::OK);
        assert_eq!(
            http().delete(&blob).send().unwrap().status(),
            StatusCode::ACCEPTED
        );
        assert_eq!(
            http().head(&blob).send().unwrap().status(),
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(
        http().delete(&tag_url).send().unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(get_tag().status(), StatusCode::NOT_FOUND);
}
