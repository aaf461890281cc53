//! Deletion and garbage collection, through the API and the `berth gc` / `berth check`
//! commands.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_registry::{GcOptions, Limits};
use berth_testkit::{wait_until, BerthProcess, TestRegistry};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::{http, pull_problems, push_blob, push_image, put_manifest, run_gc, sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A registry whose collections spare nothing for age: every unreferenced blob goes.
pub(crate) fn eager_registry() -> TestRegistry {
    crate::start_with(
        Limits::default(),
        GcOptions {
            blob_grace: Duration::ZERO,
            untagged_min_age: Duration::ZERO,
            upload_max_age: Duration::from_secs(3600),
            ..GcOptions::default()
        },
    )
}

fn blob_status(base: &str, repo: &str, digest: &str) -> StatusCode {
    http()
        .head(format!("{base}/v2/{repo}/blobs/{digest}"))
        .send()
        .unwrap()
        .status()
}

fn manifest_status(base: &str, repo: &str, reference: &str) -> StatusCode {
    http()
        .head(format!("{base}/v2/{repo}/manifests/{reference}"))
        .send()
        .unwrap()
        .status()
}

fn removed(report: &Value) -> Vec<String> {
    report["blobs_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn shared_layers_survive_and_exclusive_ones_are_swept() {
    let reg = eager_registry();
    let base = reg.url();
    let (a, _) = push_image(
        &base,
        "team/app",
        "a",
        &[b"shared base layer", b"only in a"],
    );
    let (b, _) = push_image(
        &base,
        "team/app",
        "b",
        &[b"shared base layer", b"only in b"],
    );
    push_image(&base, "team/other", "c", &[b"shared base layer"]);

    let r = http()
        .delete(format!("{base}/v2/team/app/manifests/{a}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let report = run_gc(&base, "");
    let gone = removed(&report);
    assert!(gone.contains(&sha256(b"only in a")), "{report}");
    assert!(!gone.contains(&sha256(b"shared base layer")));
    assert!(!gone.contains(&sha256(b"only in b")));
    assert_eq!(
        report["bytes_freed"].as_u64().unwrap() as usize,
        b"only in a".len() + config_len("a")
    );
    assert_eq!(
        blob_status(&base, "team/app", &sha256(b"only in a")),
        StatusCode::NOT_FOUND
    );
    let hex = sha256(b"only in a")[7..].to_owned();
    assert!(
        !reg.data_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(&hex)
            .exists(),
        "bytes deleted"
    );
    assert!(pull_problems(&base, "team/app", "b").is_empty());
    assert!(pull_problems(&base, "team/other", "c").is_empty());
    assert_eq!(manifest_status(&base, "team/app", &b), StatusCode::OK);

    // The same content pushes again and pulls completely.
    let (again, _) = push_image(
        &base,
        "team/app",
        "a",
        &[b"shared base layer", b"only in a"],
    );
    assert_eq!(again, a);
    assert!(pull_problems(&base, "team/app", "a").is_empty());
    // A second collection finds nothing more.
    let report = run_gc(&base, "");
    assert_eq!(removed(&report), Vec::<String>::new());
}

/// Length of the config `push_image` writes for `tag`.
fn config_len(tag: &str) -> usize {
    format!(r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"tag":"{tag}"}}"#).len()
}

#[test]
fn untagged_manifests_go_only_when_asked_and_index_children_and_referrers_are_kept() {
    let reg = eager_registry();
    let base = reg.url();
    let (old, _) = push_image(&base, "team/app", "v1", &[b"old layer"]);
    let (new, new_bytes) = push_image(&base, "team/app", "v1", &[b"new layer"]); // v1 moves: old is untagged
                                                                                 // An index whose children are untagged.
    let (child1, c1) = push_image(&base, "team/app", "tmp1", &[b"child one"]);
    let (child2, c2) = push_image(&base, "team/app", "tmp2", &[b"child two"]);
    for tag in ["tmp1", "tmp2"] {
        http()
            .delete(format!("{base}/v2/team/app/manifests/{tag}"))
            .send()
            .unwrap();
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": child1, "size": c1.len()},
            {"mediaType": OCI_MANIFEST, "digest": child2, "size": c2.len()},
        ],
    }))
    .unwrap();
    assert_eq!(
        put_manifest(&base, "team/app", "multi", OCI_INDEX, &index).status(),
        StatusCode::CREATED
    );
    // A signature of the tagged image, itself untagged.
    let empty = push_blob(&base, "team/app", b"{}");
    let sig_blob = push_blob(&base, "team/app", b"signature");
    let signature = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sig",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sig_blob, "size": 9}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": new, "size": new_bytes.len()},
    }))
    .unwrap();
    let sig = sha256(&signature);
    assert_eq!(
        put_manifest(&base, "team/app", &sig, OCI_MANIFEST, &signature).status(),
        StatusCode::CREATED
    );

    // Default: untagged manifests are kept, so nothing they reference goes.
    let report = run_gc(&base, "");
    assert!(report["manifests_removed"].as_array().unwrap().is_empty());
    assert!(!removed(&report).contains(&sha256(b"old layer")));
    assert_eq!(manifest_status(&base, "team/app", &old), StatusCode::OK);

    // Dry run reports without changing.
    let report = run_gc(&base, "delete_untagged=true&dry_run=true");
    assert_eq!(
        report["manifests_removed"],
        json!([format!("team/app@{old}")])
    );
    assert!(removed(&report).contains(&sha256(b"old layer")));
    assert_eq!(manifest_status(&base, "team/app", &old), StatusCode::OK);
    assert_eq!(
        blob_status(&base, "team/app", &sha256(b"old layer")),
        StatusCode::OK
    );

    let report = run_gc(&base, "delete_untagged=true");
    assert_eq!(
        report["manifests_removed"],
        json!([format!("team/app@{old}")])
    );
    assert_eq!(report["manifests_removed_count"], 1);
    assert_eq!(
        report["blobs_removed_count"].as_u64(),
        Some(removed(&report).len() as u64)
    );
    assert!(removed(&report).contains(&sha256(b"old layer")));
    assert_eq!(
        manifest_status(&base, "team/app", &old),
        StatusCode::NOT_FOUND
    );
    assert!(pull_problems(&base, "team/app", "v1").is_empty());
    assert!(
        pull_problems(&base, "team/app", "multi").is_empty(),
        "index children survive"
    );
    assert_eq!(
        manifest_status(&base, "team/app", &sig),
        StatusCode::OK,
        "referrer of a tagged image survives"
    );

    // Deleting the image makes its untagged referrers garbage.
    http()
        .delete(format!("{base}/v2/team/app/manifests/{new}"))
        .send()
        .unwrap();
    let report = run_gc(&base, "delete_untagged=true");
    assert_eq!(
        report["manifests_removed"],
        json!([format!("team/app@{sig}")])
    );
    assert!(removed(&report).contains(&sig_blob));
    let listing: Value = http()
        .get(format!("{base}/v2/team/app/referrers/{new}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(listing["manifests"], json!([]));
}

#[test]
fn grace_period_protects_fresh_blobs_and_abandoned_uploads_are_purged() {
    let reg = crate::start_with(
        Limits::default(),
        GcOptions {
            upload_max_age: Duration::ZERO,
            ..GcOptions::default()
        },
    );
    let base = reg.url();
    let digest = push_blob(&base, "team/app", b"uploaded, manifest not pushed yet");
    let r = http()
        .post(format!("{base}/v2/team/app/blobs/uploads/"))
        .send()
        .unwrap();
    let location = format!("{base}{}", r.headers()["location"].to_str().unwrap());
    http()
        .patch(&location)
        .body(b"abandoned".to_vec())
        .send()
        .unwrap();
    // Opened and never sent a byte: nothing staged, only its record.
    let r = http()
        .post(format!("{base}/v2/team/app/blobs/uploads/"))
        .send()
        .unwrap();
    let empty = format!("{base}{}", r.headers()["location"].to_str().unwrap());
    assert_eq!(
        http().get(&empty).send().unwrap().status(),
        StatusCode::NO_CONTENT
    );

    let report = run_gc(&base, "");
    assert!(
        removed(&report).is_empty(),
        "inside the grace period: {report}"
    );
    assert_eq!(blob_status(&base, "team/app", &digest), StatusCode::OK);
    assert_eq!(report["uploads_purged"], 2);
    for session in [&location, &empty] {
        assert_eq!(
            http().get(session).send().unwrap().status(),
            StatusCode::NOT_FOUND
        );
    }
    if crate::BLOBS == berth_testkit::BlobBackend::Filesystem {
        assert_eq!(
            std::fs::read_dir(reg.data_dir().join("uploads"))
                .unwrap()
                .count(),
            0
        );
    }
}

#[test]
fn gc_and_check_commands_work_beside_a_running_registry() {
    if crate::BACKEND != berth_testkit::MetaBackend::Sqlite {
        return; // drives the binary on its embedded default; covered by `it`
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let data_dir = tempfile::tempdir().unwrap();
    let server = BerthProcess::spawn(binary, data_dir.path());
    let base = server.url();
    let (gone, _) = push_image(&base, "team/app", "gone", &[b"layer of gone"]);
    push_image(&base, "team/app", "kept", &[b"layer of kept"]);
    http()
        .delete(format!("{base}/v2/team/app/manifests/{gone}"))
        .send()
        .unwrap();

    let berth = |args: &[&str]| {
        let out = Command::new(binary)
            .args(args)
            .arg("--data-dir")
            .arg(data_dir.path())
            .env("BERTH_LOG_LEVEL", "warn")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // Right after the delete, with the default grace period: nothing freed, and the
    // command says why.
    let out = Command::new(binary)
        .args(["gc", "--data-dir"])
        .arg(data_dir.path())
        .env("BERTH_LOG_LEVEL", "warn")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("grace period (3600 s"), "{said}");
    assert!(
        said.contains(&data_dir.path().display().to_string()),
        "names its data directory: {said}"
    );

    let (code, out) = berth(&["gc", "--dry-run", "--blob-grace-secs", "0"]);
    assert_eq!(code, Some(0));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(removed(&report).contains(&sha256(b"layer of gone")));
    assert_eq!(
        blob_status(&base, "team/app", &sha256(b"layer of gone")),
        StatusCode::OK,
        "a dry run changes nothing"
    );

    let (code, out) = berth(&["gc", "--blob-grace-secs", "0"]);
    let collected = std::time::Instant::now();
    assert_eq!(code, Some(0));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(removed(&report).contains(&sha256(b"layer of gone")));
    // The server sees another process's change within its read cache's bound: what it
    // kept was read before the collection ended.
    std::thread::sleep(berth_registry::READ_CACHE_TTL.saturating_sub(collected.elapsed()));
    assert_eq!(
        blob_status(&base, "team/app", &sha256(b"layer of gone")),
        StatusCode::NOT_FOUND
    );
    assert!(pull_problems(&base, "team/app", "kept").is_empty());

    let (code, out) = berth(&["check"]);
    assert_eq!(code, Some(0), "{out}");
    // Corrupt a stored layer behind the registry's back.
    let kept = sha256(b"layer of kept");
    let path = data_dir
        .path()
        .join("blobs/sha256")
        .join(&kept[7..9])
        .join(&kept[7..]);
    std::fs::write(&path, b"bit rot").unwrap();
    let (code, out) = berth(&["check"]);
    assert_eq!(code, Some(1));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["blobs_corrupt"], json!([kept]));
    assert!(report["bytes_verified"].as_u64().unwrap() > 0, "{report}");
    assert!(report["seconds"].as_f64().is_some() && report["bytes_per_second"].as_u64().is_some());
    let (code, _) = berth(&["check", "--repair"]);
    assert_eq!(code, Some(1), "it reports what it repaired");
    assert_eq!(
        blob_status(&base, "team/app", &kept),
        StatusCode::NOT_FOUND,
        "no bad bytes are served"
    );
    let (code, out) = berth(&["check"]);
    assert_eq!(
        code,
        Some(1),
        "the manifest still references the lost layer: {out}"
    );
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["dangling_references"].as_array().unwrap().len(), 1);
    // Pushing the image again heals it.
    push_image(&base, "team/app", "kept", &[b"layer of kept"]);
    assert!(pull_problems(&base, "team/app", "kept").is_empty());
    let (code, out) = berth(&["check"]);
    assert_eq!(code, Some(0), "{out}");
    server.kill();
}

/// Marks blobs as a collection killed mid-sweep leaves them; `lease_expired`: whether its
/// lease row was left behind (expired) or is gone.
fn leave_half_swept(data: &std::path::Path, digests: &[&str], lease_expired: bool) {
    let db = rusqlite::Connection::open(data.join("meta.db")).unwrap();
    for digest in digests {
        let changed = db
            .execute(
                "UPDATE blobs SET state = 'deleting' WHERE digest = ?1",
                [digest],
            )
            .unwrap();
        assert_eq!(changed, 1, "{digest}");
    }
    db.execute("DELETE FROM leases WHERE name = 'gc'", [])
        .unwrap();
    if lease_expired {
        db.execute(
            "INSERT INTO leases (name, holder, expires_at) VALUES ('gc', 'killed-collector', 1)",
            [],
        )
        .unwrap();
    }
}

#[test]
fn a_sweep_killed_half_way_is_finished_by_serve_and_never_blocks_pushes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_berth"));
    let (one, two) = (b"layer one".to_vec(), b"layer two".to_vec());
    let server = BerthProcess::spawn(binary, &data);
    let d1 = crate::push_blob(&server.url(), "team/app", &one);
    let d2 = crate::push_blob(&server.url(), "team/app", &two);
    server.kill();

    // The killed collection's lease expired: serve takes the sweep over at start.
    leave_half_swept(&data, &[&d1, &d2], true);
    let server = BerthProcess::spawn(binary, &data);
    assert!(
        wait_until(Duration::from_secs(10), || server
            .log()
            .iter()
            .any(|l| l.contains("finished the sweep") && l.contains("swept=2"))),
        "{:?}",
        server.log()
    );
    assert_eq!(
        blob_status(&server.url(), "team/app", &d1),
        StatusCode::NOT_FOUND
    );
    let started = std::time::Instant::now();
    crate::push_blob(&server.url(), "team/app", &one);
    assert!(started.elapsed() < Duration::from_secs(2));
    server.kill();

    // No lease left at all (a collection that failed and gave it back, or an older
    // version): the push finishes that digest's deletion itself, without waiting.
    leave_half_swept(&data, &[&d1], false);
    let server = BerthProcess::spawn(binary, &data);
    let started = std::time::Instant::now();
    crate::push_blob(&server.url(), "team/app", &one);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(blob_status(&server.url(), "team/app", &d1), StatusCode::OK);
}
