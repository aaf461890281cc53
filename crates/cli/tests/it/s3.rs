//! What only the S3 backend does: redirecting downloads to pre-signed URLs (Range
//! included), and living through S3 outages — a cut network link, then the server killed
//! and restarted — with clean 503s, a readiness report, recovery, and nothing
//! acknowledged lost.

use std::time::Duration;

use berth_testkit::{
    shared_garage, wait_until, BlobBackend, CuttableProxy, GarageServer, Options, TestRegistry,
};
use reqwest::StatusCode;
use serde_json::Value;

use crate::pusher::BackgroundPusher;
use crate::{header, http, pull_problems, push_blob, push_image, sha256};

fn s3_registry(options: Options) -> Option<TestRegistry> {
    shared_garage()?;
    Some(TestRegistry::start_opts(Options {
        meta: crate::BACKEND,
        blobs: BlobBackend::S3,
        ..options
    }))
}

#[test]
fn downloads_can_be_redirected_to_presigned_urls_with_ranges() {
    let Some(reg) = s3_registry(Options {
        s3_redirect: Some(Duration::from_secs(300)),
        ..Options::default()
    }) else {
        return;
    };
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let digest = push_blob(&reg.url(), "team/app", &blob);
    let url = format!("{}/v2/team/app/blobs/{digest}", reg.url());
    let r = http().get(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(header(&r, "docker-content-digest"), digest);
    let location = header(&r, "location");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    // The object store serves the bytes itself, checking the signature.
    let whole = http().get(&location).send().unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(sha256(&whole.bytes().unwrap()), digest);
    let part = http()
        .get(&location)
        .header("range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.bytes().unwrap().as_ref(), &blob[10..20]);
    let tampered = location.replace("X-Amz-Signature=", "X-Amz-Signature=0");
    assert_eq!(
        http().get(&tampered).send().unwrap().status(),
        StatusCode::FORBIDDEN
    );
    // HEAD is answered by the registry; an unknown blob is still a 404, not a redirect.
    assert_eq!(http().head(&url).send().unwrap().status(), StatusCode::OK);
    let other = format!(
        "{}/v2/team/app/blobs/{}",
        reg.url(),
        sha256(b"never pushed")
    );
    assert_eq!(
        http().get(&other).send().unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

#[test]
fn an_s3_outage_answers_503_and_recovers_without_losing_anything() {
    // First the link to the server is cut (a network outage), then the server itself is
    // killed and started again (a crash); each time the registry answers 503, reports
    // itself not ready, and recovers by itself.
    let Some(garage) = GarageServer::start_private() else {
        return;
    };
    let target = garage
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let proxy = CuttableProxy::start(target);
    let reg = TestRegistry::start_opts(Options {
        meta: crate::BACKEND,
        blobs: BlobBackend::S3,
        s3_config: Some(berth_storage::S3Config {
            endpoint: Some(format!("http://{}", proxy.addr())),
            ..garage.s3_config("registry")
        }),
        ..Options::default()
    });
    let base = reg.url();
    push_image(
        &base,
        "outage/app",
        "before",
        &[b"stored before the outage"],
    );

    let writer = {
        let base = base.clone();
        BackgroundPusher::start(move |n| {
            let layer = format!("layer {n}");
            let digest = sha256(layer.as_bytes());
            http()
                .post(format!(
                    "{base}/v2/outage/writer/blobs/uploads/?digest={digest}"
                ))
                .body(layer)
                .send()
                .is_ok_and(|r| r.status() == StatusCode::CREATED)
                .then_some(digest)
        })
    };
    assert!(writer.wait_acknowledged(3));

    proxy.cut();
    let manifest: Value = http()
        .get(format!("{base}/v2/outage/app/manifests/before"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap()
        .json()
        .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let r = http()
        .get(format!("{base}/v2/outage/app/blobs/{layer}"))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "blob bytes are out of reach"
    );
    assert_eq!(header(&r, "retry-after"), "5");
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
    let r = http().get(format!("{base}/readyz")).send().unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().unwrap();
    assert!(
        body["blobs"].as_str().unwrap().starts_with("unavailable"),
        "{body}"
    );
    assert_eq!(body["metadata"], "ok");

    proxy.restore();
    assert!(
        wait_until(Duration::from_secs(30), || {
            http()
                .get(format!("{base}/readyz"))
                .send()
                .unwrap()
                .status()
                == StatusCode::OK
        }),
        "ready again once S3 is back"
    );
    assert!(
        writer.wait_acknowledged(3),
        "pushes succeed again after the link is back"
    );

    // The server crashes and comes back on the same data.
    garage.stop();
    let r = http()
        .get(format!("{base}/v2/outage/app/blobs/{layer}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = http().get(format!("{base}/readyz")).send().unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    garage.resume();
    assert!(
        wait_until(Duration::from_secs(30), || {
            http()
                .get(format!("{base}/readyz"))
                .send()
                .unwrap()
                .status()
                == StatusCode::OK
        }),
        "ready again once the server is back"
    );
    assert!(
        writer.wait_acknowledged(3),
        "pushes succeed again after the restart"
    );
    let (acknowledged, refused) = writer.finish();
    assert!(refused > 0, "the outages were seen by the writer");

    let mut problems = pull_problems(&base, "outage/app", "before");
    for digest in &acknowledged {
        let r = http()
            .get(format!("{base}/v2/outage/writer/blobs/{digest}"))
            .send()
            .unwrap();
        if r.status() != StatusCode::OK || sha256(&r.bytes().unwrap()) != *digest {
            problems.push(format!("acknowledged blob {digest} lost"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
