//! A metadata outage: PostgreSQL stops (as a crash would) while clients push and pull.
//! The registry must answer clean 503s with a retry hint, report itself not ready, come
//! back by itself when the database does, and lose nothing it acknowledged.

use std::time::Duration;

use berth_testkit::{wait_until, MetaBackend, Options, PostgresCluster, TestRegistry};
use reqwest::StatusCode;
use serde_json::Value;

use crate::pusher::BackgroundPusher;
use crate::{header, http, image_manifest, pull_problems, push_image, sha256};

/// Pushes a one-layer image; true only if every step was acknowledged.
fn try_push(base: &str, repo: &str, tag: &str) -> bool {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","tag":"{tag}"}}"#);
    let layer = format!("layer of {tag}");
    for blob in [config.as_bytes(), layer.as_bytes()] {
        let r = http()
            .post(format!(
                "{base}/v2/{repo}/blobs/uploads/?digest={}",
                sha256(blob)
            ))
            .body(blob.to_vec())
            .send();
        if !r.is_ok_and(|r| r.status() == StatusCode::CREATED) {
            return false;
        }
    }
    let manifest = image_manifest(
        (&sha256(config.as_bytes()), config.len()),
        &[(&sha256(layer.as_bytes()), layer.len())],
    );
    http()
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .is_ok_and(|r| r.status() == StatusCode::CREATED)
}

#[test]
fn a_metadata_outage_answers_503_and_recovers_without_losing_anything() {
    let Some(cluster) = PostgresCluster::start_private() else {
        return;
    };
    let reg = TestRegistry::start_opts(Options {
        meta: MetaBackend::Postgres,
        postgres_url: Some(cluster.url().to_owned()),
        blobs: crate::BLOBS,
        ..Options::default()
    });
    let base = reg.url();
    push_image(
        &base,
        "outage/app",
        "before",
        &[b"pushed before the outage"],
    );
    assert_eq!(
        http()
            .get(format!("{base}/readyz"))
            .send()
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // A writer keeps pushing through the outage and notes what was acknowledged.
    let writer = {
        let base = base.clone();
        BackgroundPusher::start(move |n| {
            let tag = format!("w{n}");
            try_push(&base, "outage/writer", &tag).then_some(tag)
        })
    };
    assert!(writer.wait_acknowledged(3));

    cluster.stop();
    let manifest = format!("{base}/v2/outage/app/manifests/before");
    let r = http().get(&manifest).send().unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&r, "retry-after"), "5");
    let body: Value = r.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "UNKNOWN");
    let r = http().get(format!("{base}/readyz")).send().unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().unwrap();
    assert_eq!(body["blobs"], "ok");
    assert!(
        body["metadata"]
            .as_str()
            .unwrap()
            .starts_with("unavailable"),
        "{body}"
    );
    assert_eq!(
        http()
            .get(format!("{base}/healthz"))
            .send()
            .unwrap()
            .status(),
        StatusCode::OK,
        "still alive"
    );
    let blob = b"pushed during the outage";
    let r = http()
        .post(format!(
            "{base}/v2/outage/app/blobs/uploads/?digest={}",
            sha256(blob)
        ))
        .body(blob.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(writer.wait_refused());

    cluster.resume();
    assert!(
        wait_until(Duration::from_secs(30), || http()
            .get(&manifest)
            .send()
            .unwrap()
            .status()
            == StatusCode::OK),
        "the registry recovers by itself"
    );
    assert!(writer.wait_acknowledged(3));
    let (acknowledged, refused) = writer.finish();
    assert_eq!(
        http()
            .get(format!("{base}/readyz"))
            .send()
            .unwrap()
            .status(),
        StatusCode::OK
    );

    let mut problems = pull_problems(&base, "outage/app", "before");
    for tag in &acknowledged {
        problems.extend(pull_problems(&base, "outage/writer", tag));
    }
    assert!(
        problems.is_empty(),
        "acknowledged pushes lost: {problems:#?}"
    );
    assert!(refused > 0, "the outage was seen by the writer");
    eprintln!(
        "outage: {} pushes acknowledged and intact, {} refused during the outage",
        acknowledged.len(),
        refused
    );
}
