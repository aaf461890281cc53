//! Repositories as a whole through the admin API: a project's repositories with their
//! counts, page by page, and deleting one with everything in it (as the registry API
//! then shows, the event log records, and garbage collection completes).

use reqwest::StatusCode;
use serde_json::Value;

use crate::*;

fn page(base: &str, query: &str) -> Value {
    let r = http()
        .get(format!("{base}/api/v1/projects/team/repositories{query}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    r.json().unwrap()
}

#[test]
fn a_projects_repositories_are_listed_with_counts_and_one_is_deleted_whole() {
    // Blobs unused for no time at all are garbage: the collection at the end takes them.
    let reg = start_with(
        berth_registry::Limits::default(),
        berth_registry::GcOptions {
            blob_grace: std::time::Duration::ZERO,
            ..Default::default()
        },
    );
    let base = reg.url();
    let shared: Vec<u8> = vec![7; 4096];
    let (v1, _) = push_image(&base, "team/app", "v1", &[&shared, b"one"]);
    push_image(&base, "team/app", "v2", &[&shared, b"two"]);
    push_image(&base, "team/site/web", "latest", &[b"web"]);
    push_image(&base, "team", "root", &[b"the project's own repository"]);
    push_image(&base, "team-x/app", "v1", &[b"another project"]);
    // An untagged manifest too.
    let (untagged, manifest) = push_image(&base, "team/app", "tmp", &[b"untagged"]);
    let r = http()
        .delete(format!("{base}/v2/team/app/manifests/tmp"))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    let r = put_manifest(
        &base,
        "team/app",
        &untagged,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    assert_eq!(r.status(), StatusCode::CREATED);

    let all = page(&base, "");
    let names: Vec<&str> = all["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["team", "team/app", "team/site/web"], "{all}");
    assert_eq!(all["next"], Value::Null);
    let app = &all["repositories"][1];
    assert_eq!(app["tags"], 2, "{app}");
    assert_eq!(app["manifests"], 3, "{app}");
    assert!(app["bytes"].as_u64().unwrap() >= 4096 + 3, "{app}");
    assert!(app["last_push_at"].as_str().unwrap().ends_with('Z'));

    // Page by page.
    let first = page(&base, "?n=2");
    assert_eq!(first["repositories"].as_array().unwrap().len(), 2);
    assert_eq!(first["next"], "team/app");
    let second = page(&base, "?n=2&last=team%2Fapp");
    assert_eq!(second["repositories"][0]["name"], "team/site/web");
    assert_eq!(second["next"], Value::Null);
    for bad in ["?n=0", "?n=1001", "?n=x"] {
        let r = http()
            .get(format!("{base}/api/v1/projects/team/repositories{bad}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }

    // Deleting team/app: its manifests and tags go, the registry API says it is unknown
    // (also for a manifest just read by digest, which the node keeps for a moment).
    let r = http()
        .get(format!("{base}/v2/team/app/manifests/{v1}"))
        .header("accept", berth_client::MANIFEST_TYPES)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http()
        .delete(format!("{base}/api/v1/repositories/team/app"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().unwrap()["manifests_deleted"], 3);
    let r = http()
        .get(format!("{base}/v2/team/app/tags/list"))
        .send()
        .unwrap();
    assert_oci_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN");
    let r = http()
        .get(format!("{base}/v2/team/app/manifests/{v1}"))
        .header("accept", berth_client::MANIFEST_TYPES)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let catalog: Value = http()
        .get(format!("{base}/v2/_catalog"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        !catalog["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "team/app"),
        "{catalog}"
    );
    // The others are untouched, the shared layer too.
    assert!(pull_problems(&base, "team/site/web", "latest").is_empty());
    assert!(pull_problems(&base, "team-x/app", "v1").is_empty());
    let r = http()
        .delete(format!("{base}/api/v1/repositories/team/app"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = http()
        .delete(format!("{base}/api/v1/repositories/team/..%2F..%2Fetc"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // The event log has a deletion per manifest and one for the repository.
    let audit: Value = http()
        .get(format!("{base}/api/v1/audit?action=repository.delete"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(audit.to_string().contains("3 manifests"), "{audit}");
    // Its blobs are garbage now: a collection takes them.
    let gc = run_gc(&base, "");
    let removed = gc["blobs_removed"].to_string();
    assert!(
        removed.contains(&sha256(b"one")) && removed.contains(&sha256(b"untagged")),
        "{gc}"
    );
    assert!(!removed.contains(&sha256(b"web")), "{gc}");
    assert!(pull_problems(&base, "team/site/web", "latest").is_empty());

    // The repository can be pushed again from scratch.
    push_image(&base, "team/app", "v1", &[b"again"]);
    assert!(pull_problems(&base, "team/app", "v1").is_empty());
}
