//! The web UI in a real browser: headless Chromium (Debian's `chromium`) driven by
//! `playwright-core` (installed by `.ci/install-test-clients` into
//! `target/browser-tests`), running `tests/browser/ui.mjs` against a registry with access
//! control and real pushed content: an image and a signature referring to it. Screenshots
//! go to `$BERTH_UI_SCREENSHOTS` when it is set (the README's come from there).

use std::path::{Path, PathBuf};
use std::process::Command;

use berth_auth::AuthSettings;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::auth::{push_image_as, Who};
use crate::*;

/// playwright-core's entry point, where `.ci/install-test-clients` puts it.
fn playwright_core() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let module = root.join("target/browser-tests/node_modules/playwright-core/index.mjs");
    if module.is_file() {
        return Some(module);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "playwright-core is missing: .ci/install-test-clients installs it"
    );
    eprintln!("skipped: playwright-core is not installed (.ci/install-test-clients)");
    None
}

#[test]
fn the_ui_works_in_a_real_browser() {
    let (Some(node), Some(chromium), Some(module)) = (
        berth_testkit::tool("node"),
        berth_testkit::tool("chromium"),
        playwright_core(),
    ) else {
        return;
    };
    let reg = start_with_auth(AuthSettings::default());
    let admin = Who::admin();
    let subject = push_image_as(&reg, &admin, "team/app", "v1", b"the app's layer");
    push_image_as(&reg, &admin, "team/app", "old", b"an old layer");
    for (user, role) in [("mia", "maintainer"), ("gus", "guest")] {
        let r = admin
            .request(
                &http(),
                Method::POST,
                &format!("{}/api/v1/users", reg.url()),
            )
            .json(&json!({"name": user, "password": format!("{user}-password")}))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = admin
            .request(
                &http(),
                Method::POST,
                &format!("{}/api/v1/projects/team/members", reg.url()),
            )
            .json(&json!({"user": user, "role": role}))
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }
    // A signature referring to it.
    let size = admin
        .request(
            &http(),
            Method::GET,
            &format!("{}/v2/team/app/manifests/v1", reg.url()),
        )
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .len();
    let payload = b"signature payload";
    for blob in [&b"{}"[..], &payload[..]] {
        let r = admin
            .request(
                &http(),
                Method::POST,
                &format!(
                    "{}/v2/team/app/blobs/uploads/?digest={}",
                    reg.url(),
                    sha256(blob)
                ),
            )
            .header("content-type", "application/octet-stream")
            .body(blob.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let signature = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha256(payload), "size": payload.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": size},
    }))
    .unwrap();
    let r = admin
        .request(
            &http(),
            Method::PUT,
            &format!("{}/v2/team/app/manifests/{}", reg.url(), sha256(&signature)),
        )
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(signature)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/ui.mjs");
    let mut command = Command::new(node);
    command
        .arg(script)
        .arg(reg.url())
        .arg(berth_testkit::ADMIN_PASSWORD)
        .env("PLAYWRIGHT_CORE", module)
        .env("CHROMIUM", chromium);
    if let Some(dir) = std::env::var_os("BERTH_UI_SCREENSHOTS") {
        command.env("SCREENSHOTS", dir);
    }
    let out = command.output().expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser suite failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("browser suite passed"), "{stdout}");
}
