//! Pulls, listings, mounts and referrers over real HTTP.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{assert_oci_error, header, http, push_blob, push_image, put_manifest, sha256};

#[test]
fn base_endpoint_and_health() {
    let reg = crate::start();
    let r = http().get(format!("{}/v2/", reg.url())).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "docker-distribution-api-version"),
        "registry/2.0"
    );
    let r = http().head(format!("{}/v2/", reg.url())).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().unwrap().is_empty());
    let r = http().get(format!("{}/healthz", reg.url())).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn blob_get_head_and_ranges() {
    let reg = crate::start();
    let base = reg.url();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let digest = push_blob(&base, "team/app", &data);
    let url = format!("{base}/v2/team/app/blobs/{digest}");

    let r = http().head(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), "100000");
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(header(&r, "content-type"), "application/octet-stream");
    assert_eq!(header(&r, "accept-ranges"), "bytes");
    assert_eq!(header(&r, "etag"), format!("\"{digest}\""));
    assert!(r.bytes().unwrap().is_empty(), "HEAD has no body");

    let r = http().get(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), "application/octet-stream");
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);

    let r = http()
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(header(&r, "content-range"), "bytes 10-19/100000");
    assert_eq!(header(&r, "content-length"), "10");
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[10..20]);

    let r = http()
        .get(&url)
        .header("range", "bytes=99990-")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[99_990..]);

    let r = http().get(&url).header("range", "bytes=-5").send().unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[99_995..]);

    let r = http()
        .get(&url)
        .header("range", "bytes=100000-100010")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "content-range"), "bytes */100000");

    // A blob pushed elsewhere is not visible here, though its bytes are shared.
    let r = http()
        .head(format!("{base}/v2/team/other/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = http()
        .get(format!("{base}/v2/team/other/blobs/{digest}"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

/// Blobs that earlier versions stored in Distribution's layout (`<hex>/data`) keep being
/// served whole, by range and by HEAD; pushing the same bytes again (to another repository
/// too) keeps that copy instead of writing a second one; a bad range is still refused.
#[test]
fn blobs_stored_in_distribution_layout_are_still_served() {
    if crate::BLOBS != berth_testkit::BlobBackend::Filesystem {
        return;
    }
    let reg = crate::start();
    let base = reg.url();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let digest = push_blob(&base, "team/old", &data);
    let hex = digest.trim_start_matches("sha256:");
    let flat = reg
        .data_dir()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    // Rewrite the store as an earlier version left it.
    let moved = flat.with_extension("moving");
    std::fs::rename(&flat, &moved).unwrap();
    std::fs::create_dir(&flat).unwrap();
    std::fs::rename(&moved, flat.join("data")).unwrap();

    let url = format!("{base}/v2/team/old/blobs/{digest}");
    let r = http().head(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), "300000");
    let r = http().get(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);
    let r = http()
        .get(&url)
        .header("range", "bytes=250000-250099")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().unwrap().as_ref(), &data[250_000..250_100]);
    let r = http()
        .get(&url)
        .header("range", "bytes=300000-")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    assert_eq!(push_blob(&base, "team/again", &data), digest);
    let r = http()
        .get(format!("{base}/v2/team/again/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);
    assert!(flat.join("data").is_file(), "the existing copy is kept");
    assert_eq!(walk_files(&reg.data_dir().join("blobs")).len(), 1);
}

#[test]
fn layers_are_stored_once_but_visible_only_where_pushed_or_mounted() {
    let reg = crate::start();
    let base = reg.url();
    let layer = b"shared layer bytes".repeat(1000);
    for repo in ["a/one", "a/two", "b/three"] {
        push_blob(&base, repo, &layer);
    }
    let digest = sha256(&layer);
    let hex = digest.trim_start_matches("sha256:");
    if crate::BLOBS == berth_testkit::BlobBackend::Filesystem {
        let path = reg
            .data_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            layer,
            "one file per blob, named by its digest"
        );
        let copies = walk_files(&reg.data_dir().join("blobs")).len();
        assert_eq!(copies, 1, "one copy on disk");
    }

    // Mount from a repository holding it: 201 and visible in the target.
    let r = http()
        .post(format!(
            "{base}/v2/c/four/blobs/uploads/?mount={digest}&from=a/one"
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "location"), format!("/v2/c/four/blobs/{digest}"));
    assert_eq!(header(&r, "docker-content-digest"), digest);
    assert_eq!(
        http()
            .head(format!("{base}/v2/c/four/blobs/{digest}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // Mount from a repository that lacks it: falls back to an upload session (202).
    let r = http()
        .post(format!(
            "{base}/v2/c/five/blobs/uploads/?mount={digest}&from=c/nothing"
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(header(&r, "location").starts_with("/v2/c/five/blobs/uploads/"));
    assert_eq!(
        http()
            .head(format!("{base}/v2/c/five/blobs/{digest}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    // Mount without `from`: the blob is present somewhere, so it is linked.
    let r = http()
        .post(format!("{base}/v2/c/six/blobs/uploads/?mount={digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Mount of an unknown blob: upload session.
    let unknown = sha256(b"never pushed");
    let r = http()
        .post(format!(
            "{base}/v2/c/six/blobs/uploads/?mount={unknown}&from=a/one"
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // Unlinking from one repository leaves the others intact.
    let r = http()
        .delete(format!("{base}/v2/a/two/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        http()
            .head(format!("{base}/v2/a/two/blobs/{digest}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        http()
            .head(format!("{base}/v2/a/one/blobs/{digest}"))
            .send()
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let r = http()
        .delete(format!("{base}/v2/a/two/blobs/{digest}"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UNKNOWN");
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn tag_listing_paginates_with_link_headers() {
    let reg = crate::start();
    let base = reg.url();
    let (_, manifest) = push_image(&base, "team/app", "t00", &[b"layer"]);
    for i in 1..25 {
        let r = put_manifest(
            &base,
            "team/app",
            &format!("t{i:02}"),
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        );
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = http()
        .get(format!("{base}/v2/team/app/tags/list"))
        .send()
        .unwrap();
    let all: Value = r.json().unwrap();
    assert_eq!(all["name"], "team/app");
    assert_eq!(all["tags"].as_array().unwrap().len(), 25);

    let mut seen = Vec::new();
    let mut next = Some("/v2/team/app/tags/list?n=10".to_owned());
    while let Some(path) = next.take() {
        let r = http().get(format!("{base}{path}")).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let link = header(&r, "link");
        let page: Value = r.json().unwrap();
        let tags = page["tags"].as_array().unwrap();
        assert!(tags.len() <= 10);
        seen.extend(tags.iter().map(|t| t.as_str().unwrap().to_owned()));
        if !link.is_empty() {
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            next = Some(
                link.trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("t{i:02}")).collect();
    assert_eq!(seen, expected);

    let r = http()
        .get(format!("{base}/v2/team/app/tags/list?n=5&last=t20"))
        .send()
        .unwrap();
    let page: Value = r.json().unwrap();
    assert_eq!(page["tags"], json!(["t21", "t22", "t23", "t24"]));
    let r = http()
        .get(format!("{base}/v2/team/app/tags/list?n=0"))
        .send()
        .unwrap();
    let page: Value = r.json().unwrap();
    assert_eq!(page["tags"], json!([]));
    // A huge n (once wrapped to an empty page) is clamped: every tag, in one page.
    for huge in ["18446744073709551615", "99999999999999999999999999"] {
        let r = http()
            .get(format!("{base}/v2/team/app/tags/list?n={huge}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let page: Value = r.json().unwrap();
        assert_eq!(page["tags"].as_array().unwrap().len(), 25, "n={huge}");
    }
    let r = http()
        .get(format!("{base}/v2/team/app/tags/list?n=x"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let r = http()
        .get(format!("{base}/v2/team/unknown/tags/list"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN");
}

#[test]
fn catalog_paginates() {
    let reg = crate::start();
    let base = reg.url();
    let names: Vec<String> = (0..7).map(|i| format!("proj/repo{i}")).collect();
    for name in &names {
        push_image(&base, name, "v1", &[name.as_bytes()]);
    }
    let r = http()
        .get(format!("{base}/v2/_catalog?n=3"))
        .send()
        .unwrap();
    assert_eq!(
        header(&r, "link"),
        "</v2/_catalog?n=3&last=proj/repo2>; rel=\"next\""
    );
    let page: Value = r.json().unwrap();
    assert_eq!(
        page["repositories"],
        json!(["proj/repo0", "proj/repo1", "proj/repo2"])
    );
    let r = http()
        .get(format!("{base}/v2/_catalog?n=3&last=proj/repo5"))
        .send()
        .unwrap();
    assert!(header(&r, "link").is_empty());
    let page: Value = r.json().unwrap();
    assert_eq!(page["repositories"], json!(["proj/repo6"]));
    let r = http().get(format!("{base}/v2/_catalog")).send().unwrap();
    let page: Value = r.json().unwrap();
    assert_eq!(page["repositories"].as_array().unwrap().len(), 7);
}

#[test]
fn referrers_list_artifacts_attached_through_subject() {
    let reg = crate::start();
    let base = reg.url();
    let (subject, subject_bytes) = push_image(&base, "team/app", "v1", &[b"app layer"]);
    let empty = push_blob(&base, "team/app", b"{}");
    let signature = push_blob(&base, "team/app", b"signature bytes");
    let sbom = push_blob(&base, "team/app", b"sbom bytes");
    let artifact = |artifact_type: &str, blob: &str, size: usize| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": blob, "size": size}],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": subject_bytes.len()},
            "annotations": {"org.example.kind": artifact_type},
        }))
        .unwrap()
    };
    let sig = artifact("application/vnd.example.signature", &signature, 15);
    let r = put_manifest(
        &base,
        "team/app",
        &sha256(&sig),
        "application/vnd.oci.image.manifest.v1+json",
        &sig,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "oci-subject"), subject);
    let bom = artifact("application/vnd.example.sbom", &sbom, 10);
    let r = put_manifest(
        &base,
        "team/app",
        &sha256(&bom),
        "application/vnd.oci.image.manifest.v1+json",
        &bom,
    );
    assert_eq!(r.status(), StatusCode::CREATED);

    let r = http()
        .get(format!("{base}/v2/team/app/referrers/{subject}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "content-type"),
        "application/vnd.oci.image.index.v1+json"
    );
    assert!(header(&r, "oci-filters-applied").is_empty());
    let index: Value = r.json().unwrap();
    assert_eq!(index["schemaVersion"], 2);
    let listed = index["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let sig_entry = listed
        .iter()
        .find(|m| m["digest"] == sha256(&sig))
        .expect("signature listed");
    assert_eq!(
        sig_entry["artifactType"],
        "application/vnd.example.signature"
    );
    assert_eq!(sig_entry["size"], sig.len());
    assert_eq!(
        sig_entry["annotations"]["org.example.kind"],
        "application/vnd.example.signature"
    );

    let r = http()
        .get(format!(
            "{base}/v2/team/app/referrers/{subject}?artifactType=application/vnd.example.sbom"
        ))
        .send()
        .unwrap();
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    let index: Value = r.json().unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(index["manifests"][0]["digest"], sha256(&bom));

    // No artifactType, an image config: listed and found under the config's media type.
    let config = push_blob(
        &base,
        "team/app",
        b"{\"architecture\":\"amd64\",\"os\":\"linux\"}",
    );
    let plain = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 37},
        "layers": [],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": subject_bytes.len()},
    }))
    .unwrap();
    let r = put_manifest(
        &base,
        "team/app",
        &sha256(&plain),
        "application/vnd.oci.image.manifest.v1+json",
        &plain,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = http()
        .get(format!(
            "{base}/v2/team/app/referrers/{subject}?artifactType=application/vnd.oci.image.config.v1%2Bjson"
        ))
        .send()
        .unwrap();
    let index: Value = r.json().unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1, "{index}");
    assert_eq!(index["manifests"][0]["digest"], sha256(&plain));
    assert_eq!(
        index["manifests"][0]["artifactType"],
        "application/vnd.oci.image.config.v1+json"
    );

    let unknown = sha256(b"no such subject");
    let r = http()
        .get(format!("{base}/v2/team/app/referrers/{unknown}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let index: Value = r.json().unwrap();
    assert_eq!(index["manifests"], json!([]));

    let r = http()
        .get(format!("{base}/v2/team/app/referrers/sha256:nothex"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
}
