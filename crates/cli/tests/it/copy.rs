//! `berth copy` between two real registries: a multi-platform index keeps every digest,
//! the destination authenticates with the token flow, a second copy moves no blob, a copy
//! within one registry mounts, and failures say what went wrong.

use std::process::Command;

use berth_testkit::ADMIN_PASSWORD;
use reqwest::StatusCode;
use serde_json::json;

use crate::*;

fn berth(args: &[&str]) -> (bool, String) {
    berth_env(args, &[], None)
}

/// Pushes two single-platform images and an index over them; returns the index's digest
/// and the children's.
fn push_index(base: &str, repo: &str, tag: &str) -> (String, Vec<String>) {
    let mut children = Vec::new();
    let mut descriptors = Vec::new();
    for arch in ["amd64", "arm64"] {
        let (digest, bytes) = push_image(
            base,
            repo,
            &format!("{tag}-{arch}"),
            &[arch.as_bytes(), b"shared layer"],
        );
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": bytes.len(),
            "platform": {"os": "linux", "architecture": arch},
        }));
        children.push(digest);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descriptors,
    }))
    .unwrap();
    let r = put_manifest(
        base,
        repo,
        tag,
        "application/vnd.oci.image.index.v1+json",
        &index,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    (sha256(&index), children)
}

#[test]
fn an_index_is_copied_with_every_digest_to_a_registry_that_wants_tokens() {
    let source = start();
    let destination = start_with_auth(berth_auth::AuthSettings::default());
    let (index, children) = push_index(&source.url(), "team/app", "multi");
    let from = format!("{}/team/app:multi", source.host());
    let to = format!("{}/copied/app:multi", destination.host());
    let creds = format!("admin:{ADMIN_PASSWORD}");

    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &from,
        &to,
        "--dest-creds",
        &creds,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(&index), "{out}");
    assert!(out.contains("3 manifests, 5 blobs copied"), "{out}");

    let get = |reference: &str| {
        http()
            .get(format!(
                "{}/v2/copied/app/manifests/{reference}",
                destination.url()
            ))
            .basic_auth("admin", Some(ADMIN_PASSWORD))
            .header("accept", berth_client::MANIFEST_TYPES)
            .send()
            .unwrap()
    };
    let r = get("multi");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), index, "the same bytes");
    for child in &children {
        assert_eq!(get(child).status(), StatusCode::OK, "{child}");
    }

    // Again: everything is there already.
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &from,
        &to,
        "--dest-creds",
        &creds,
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("0 blobs copied") && out.contains("5 already there"),
        "{out}"
    );

    // Within one registry: mounted, not uploaded.
    let inside = format!("{}/other/app:multi", source.host());
    let (ok, out) = berth(&["copy", "--all-platforms", &from, &inside]);
    assert!(ok, "{out}");
    assert!(out.contains("5 mounted"), "{out}");
}

#[test]
fn failures_say_what_went_wrong() {
    let source = start();
    let destination = start_with_auth(berth_auth::AuthSettings::default());
    push_image(&source.url(), "team/app", "v1", &[b"layer"]);
    let from = format!("{}/team/app:v1", source.host());
    let to = format!("{}/copied/app:v1", destination.host());

    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &from,
        &to,
        "--dest-creds",
        "admin:wrong-password",
    ]);
    assert!(!ok);
    assert!(out.contains("unauthorized"), "{out}");
    let (ok, out) = berth(&["copy", "--all-platforms", &from, &to]);
    assert!(!ok);
    assert!(
        out.contains("unauthorized") || out.contains("denied"),
        "{out}"
    );
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &format!("{}/team/app:nope", source.host()),
        &to,
    ]);
    assert!(!ok);
    assert!(
        out.contains("not found") && out.contains("MANIFEST_UNKNOWN"),
        "{out}"
    );
    let (ok, out) = berth(&["copy", "127.0.0.1:1/team/app:v1", &to]);
    assert!(!ok);
    assert!(out.contains("unreachable"), "{out}");
    let (ok, out) = berth(&["copy", "../../etc/passwd", &to]);
    assert!(!ok);
    assert!(out.contains("bad image reference"), "{out}");
}

/// Docker Distribution (Debian's `docker-registry`) on a free loopback port, stopped on
/// drop.
pub(crate) struct Distribution {
    child: std::process::Child,
    pub(crate) addr: String,
    _dir: tempfile::TempDir,
}

impl Distribution {
    pub(crate) fn start() -> Option<Distribution> {
        let binary = berth_testkit::tool("docker-registry")?;
        let dir = tempfile::tempdir().unwrap();
        // A port picked by binding 0 and releasing it: Distribution cannot take a socket.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let running = Distribution {
            child,
            addr,
            _dir: dir,
        };
        let url = format!("http://{}/v2/", running.addr);
        let up = berth_testkit::wait_until(std::time::Duration::from_secs(10), || {
            http()
                .get(&url)
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        assert!(up, "docker-registry did not start");
        Some(running)
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn berth_to_distribution_and_back_keeps_every_digest() {
    let Some(distribution) = Distribution::start() else {
        return;
    };
    let source = start();
    let back = start();
    let (index, children) = push_index(&source.url(), "team/app", "multi");
    let there = format!("{}/team/app:multi", distribution.addr);
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &format!("{}/team/app:multi", source.host()),
        &there,
    ]);
    assert!(ok, "{out}");
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &there,
        &format!("{}/again/app:multi", back.host()),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(&index), "{out}");
    let r = http()
        .get(format!("{}/v2/again/app/manifests/multi", back.url()))
        .header("accept", berth_client::MANIFEST_TYPES)
        .send()
        .unwrap();
    assert_eq!(header(&r, "docker-content-digest"), index);
    for child in children {
        let r = http()
            .head(format!("{}/v2/again/app/manifests/{child}", back.url()))
            .header("accept", berth_client::MANIFEST_TYPES)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{child}");
        // Every blob of the child is there and hashes to its digest.
        let problems = pull_problems(&back.url(), "again/app", &child);
        assert!(problems.is_empty(), "{child}: {problems:?}");
    }
}

/// Runs `berth` with extra environment and, if given, standard input.
fn berth_env(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    // Hermetic: no credentials of whoever runs the tests (docker or podman logins) are
    // found, only those a test puts there.
    let home = tempfile::tempdir().unwrap();
    let home_path = home.path().to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .env("HOME", home_path)
        .env("DOCKER_CONFIG", home.path().join(".docker"))
        .env("XDG_RUNTIME_DIR", home_path)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("BERTH_SRC_CREDS")
        .env_remove("BERTH_DEST_CREDS")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run berth");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn login_keeps_credentials_where_copy_and_docker_find_them() {
    use std::os::unix::fs::PermissionsExt;
    let source = start();
    let destination = start_with_auth(berth_auth::AuthSettings::default());
    push_image(&source.url(), "team/app", "v1", &[b"layer"]);
    let config_dir = tempfile::tempdir().unwrap();
    let env = [("DOCKER_CONFIG", config_dir.path().to_str().unwrap())];
    let host = destination.host();
    let from = format!("{}/team/app:v1", source.host());
    let to = format!("{host}/copied/app:v1");

    let (ok, out) = berth_env(
        &["login", &host, "-u", "admin", "--password-stdin"],
        &env,
        Some("wrong\n"),
    );
    assert!(!ok && out.contains("unauthorized"), "{out}");
    assert!(
        !config_dir.path().join("config.json").exists(),
        "nothing kept for a refused login"
    );

    let (ok, out) = berth_env(
        &["login", &host, "-u", "admin", "--password-stdin"],
        &env,
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    assert!(ok, "{out}");
    let file = config_dir.path().join("config.json");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    use base64::Engine as _;
    let expected =
        base64::engine::general_purpose::STANDARD.encode(format!("admin:{ADMIN_PASSWORD}"));
    assert_eq!(
        config["auths"][&host]["auth"],
        expected.as_str(),
        "docker's own format"
    );

    let (ok, out) = berth_env(&["copy", "--all-platforms", &from, &to], &env, None);
    assert!(ok, "{out}");

    let (ok, out) = berth_env(&["logout", &host], &env, None);
    assert!(ok && out.contains("Removed"), "{out}");
    let (ok, out) = berth_env(
        &[
            "copy",
            "--all-platforms",
            &from,
            &format!("{host}/copied/app:v2"),
        ],
        &env,
        None,
    );
    assert!(
        !ok && (out.contains("unauthorized") || out.contains("denied")),
        "{out}"
    );
}

#[test]
fn a_credential_helper_is_asked() {
    use std::os::unix::fs::PermissionsExt;
    let source = start();
    let destination = start_with_auth(berth_auth::AuthSettings::default());
    push_image(&source.url(), "team/app", "v1", &[b"layer"]);
    let dir = tempfile::tempdir().unwrap();
    let host = destination.host();
    // A helper that knows one registry, as docker-credential-pass or -secretservice would.
    let helper = dir.path().join("docker-credential-berthtest");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$server\" = \"{host}\" ] || {{ echo 'credentials not found' >&2; exit 1; }}\necho '{{\"ServerURL\":\"{host}\",\"Username\":\"admin\",\"Secret\":\"{ADMIN_PASSWORD}\"}}'\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::json!({"credHelpers": {host.clone(): "berthtest"}}).to_string(),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("DOCKER_CONFIG", dir.path().to_str().unwrap()),
        ("PATH", path.as_str()),
    ];
    let (ok, out) = berth_env(
        &[
            "copy",
            "--all-platforms",
            &format!("{}/team/app:v1", source.host()),
            &format!("{host}/helped/app:v1"),
        ],
        &env,
        None,
    );
    assert!(ok, "{out}");
}

#[test]
fn a_podman_login_is_enough() {
    let Some(podman) = berth_testkit::tool("podman") else {
        return;
    };
    let source = start();
    let destination = start_with_auth(berth_auth::AuthSettings::default());
    push_image(&source.url(), "team/app", "v1", &[b"layer"]);
    let dir = tempfile::tempdir().unwrap();
    let auth_file = dir.path().join("auth.json");
    let host = destination.host();
    use std::io::Write;
    let mut login = Command::new(podman)
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--runroot")
        .arg(dir.path().join("run"))
        .args([
            "--storage-driver",
            "vfs",
            "login",
            "--tls-verify=false",
            "--authfile",
        ])
        .arg(&auth_file)
        .args(["-u", "admin", "--password-stdin", &host])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    login
        .stdin
        .take()
        .unwrap()
        .write_all(ADMIN_PASSWORD.as_bytes())
        .unwrap();
    let out = login.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = [("REGISTRY_AUTH_FILE", auth_file.to_str().unwrap())];
    let (ok, out) = berth_env(
        &[
            "copy",
            "--all-platforms",
            &format!("{}/team/app:v1", source.host()),
            &format!("{host}/podman/app:v1"),
        ],
        &env,
        None,
    );
    assert!(ok, "{out}");
}

#[test]
fn oci_layouts_go_both_ways_and_real_tools_read_and_write_them() {
    let source = start();
    let back = start();
    let (index, children) = push_index(&source.url(), "team/app", "multi");
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let target = format!("oci:{}:v1", layout.display());
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &format!("{}/team/app:multi", source.host()),
        &target,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("5 blobs copied"), "{out}");
    for child in &children {
        let file = layout
            .join("blobs/sha256")
            .join(child.trim_start_matches("sha256:"));
        assert!(file.is_file(), "{child} in the layout");
    }
    // A real tool reads what berth wrote.
    if let Some(skopeo) = berth_testkit::tool("skopeo") {
        let out = Command::new(&skopeo)
            .args(["inspect", "--raw", &target])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sha256(&out.stdout), index, "skopeo reads the same index");
    }
    // And back into a registry: the same digests.
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &target,
        &format!("{}/from/layout:v1", back.host()),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(&index), "{out}");
    for child in &children {
        assert!(
            pull_problems(&back.url(), "from/layout", child).is_empty(),
            "{child}"
        );
    }
    // A layout written by skopeo is read by berth.
    if let Some(skopeo) = berth_testkit::tool("skopeo") {
        let made = format!("oci:{}:s1", dir.path().join("by-skopeo").display());
        let out = Command::new(&skopeo)
            .args([
                "copy",
                "--all",
                "--src-tls-verify=false",
                &format!("docker://{}/team/app:multi", source.host()),
                &made,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw = Command::new(&skopeo)
            .args(["inspect", "--raw", &made])
            .output()
            .unwrap();
        // skopeo may rewrite the index it stores; berth must copy whatever it holds as is.
        let held = sha256(&raw.stdout);
        let (ok, out) = berth(&[
            "copy",
            "--all-platforms",
            &made,
            &format!("{}/from/skopeo:v1", back.host()),
        ]);
        assert!(ok, "{out}");
        assert!(out.contains(&held), "the layout's own index: {out}");
        assert!(out.contains("3 manifests"), "{out}");
    }
    // Missing layouts and tags are named as such.
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &format!("oci:{}/nowhere:v1", dir.path().display()),
        &format!("{}/x/y:v1", back.host()),
    ]);
    assert!(!ok && out.contains("no OCI image layout"), "{out}");
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &format!("oci:{}:nope", layout.display()),
        &format!("{}/x/y:v1", back.host()),
    ]);
    assert!(!ok && out.contains("no image tagged nope"), "{out}");
}

#[test]
fn inspect_shows_platforms_layers_and_config() {
    let reg = start();
    let (index, children) = push_index(&reg.url(), "team/app", "multi");
    let (ok, out) = berth(&["inspect", &format!("{}/team/app:multi", reg.host())]);
    assert!(ok, "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["digest"], index.as_str());
    assert_eq!(shown["manifests"][1]["platform"]["architecture"], "arm64");
    let (ok, out) = berth(&[
        "inspect",
        &format!("{}/team/app@{}", reg.host(), children[0]),
    ]);
    assert!(ok, "{out}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["layers"].as_array().unwrap().len(), 2);
    assert_eq!(shown["config"]["architecture"], "amd64");
    assert_eq!(shown["config"]["os"], "linux");
}

/// Pushes an SBOM-like artifact whose subject is `subject`; returns its digest.
pub(crate) fn push_referrer(base: &str, repo: &str, subject: &str, subject_size: usize) -> String {
    let empty = push_blob(base, repo, b"{}");
    let layer = push_blob(base, repo, b"an SBOM");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "text/plain", "digest": layer, "size": 7}],
        "subject": {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": subject, "size": subject_size},
    }))
    .unwrap();
    let digest = sha256(&manifest);
    let r = put_manifest(
        base,
        repo,
        &digest,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    digest
}

#[test]
fn referrers_travel_through_a_registry_without_the_referrers_api() {
    let Some(distribution) = Distribution::start() else {
        return;
    };
    let source = start();
    let back = start();
    let (index, _) = push_index(&source.url(), "team/app", "multi");
    let index_size = http()
        .get(format!("{}/v2/team/app/manifests/multi", source.url()))
        .header("accept", berth_client::MANIFEST_TYPES)
        .send()
        .unwrap()
        .bytes()
        .unwrap()
        .len();
    let sbom = push_referrer(&source.url(), "team/app", &index, index_size);
    let there = format!("{}/team/app:multi", distribution.addr);
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        "--referrers",
        &format!("{}/team/app:multi", source.host()),
        &there,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("1 referrers"), "{out}");
    // Distribution 2.8 has no referrers API: the tag schema's index names the SBOM.
    let fallback = http()
        .get(format!(
            "http://{}/v2/team/app/manifests/sha256-{}",
            distribution.addr,
            index.trim_start_matches("sha256:")
        ))
        .header("accept", "application/vnd.oci.image.index.v1+json")
        .send()
        .unwrap();
    assert_eq!(fallback.status(), StatusCode::OK);
    assert!(fallback.text().unwrap().contains(&sbom));

    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        "--referrers",
        &there,
        &format!("{}/again/app:multi", back.host()),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(&index) && out.contains("1 referrers"), "{out}");
    let listed: serde_json::Value = http()
        .get(format!("{}/v2/again/app/referrers/{index}", back.url()))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        listed["manifests"][0]["digest"],
        sbom.as_str(),
        "the same referrer, found by the API"
    );
    assert_eq!(
        listed["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
}

#[test]
fn an_identity_token_from_a_docker_login_is_exchanged_not_sent() {
    let source = start();
    let destination = start_with_auth(berth_auth::AuthSettings::default());
    push_image(&source.url(), "team/app", "v1", &[b"layer"]);
    // What `docker login` keeps for a registry whose token endpoint gives refresh tokens.
    let token = crate::auth::fetch_token(&destination, &crate::auth::Who::admin(), &[], true);
    let refresh = token["refresh_token"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = destination.host();
    std::fs::write(
        dir.path().join("config.json"),
        json!({"auths": {host.clone(): {"auth": "", "identitytoken": refresh}}}).to_string(),
    )
    .unwrap();
    let env = [("DOCKER_CONFIG", dir.path().to_str().unwrap())];
    let (ok, out) = berth_env(
        &[
            "copy",
            "--all-platforms",
            &format!("{}/team/app:v1", source.host()),
            &format!("{host}/refreshed/app:v1"),
        ],
        &env,
        None,
    );
    assert!(ok, "{out}");
    // A revoked one is refused, as unauthorized.
    std::fs::write(
        dir.path().join("config.json"),
        json!({"auths": {host.clone(): {"identitytoken": "not-a-token"}}}).to_string(),
    )
    .unwrap();
    let (ok, out) = berth_env(
        &[
            "copy",
            "--all-platforms",
            &format!("{}/team/app:v1", source.host()),
            &format!("{host}/refreshed/app:v2"),
        ],
        &env,
        None,
    );
    assert!(
        !ok && (out.contains("unauthorized") || out.contains("denied")),
        "{out}"
    );
}

#[test]
fn push_sends_a_layout_to_a_registry() {
    let source = start();
    let destination = start();
    let (index, _) = push_index(&source.url(), "team/app", "multi");
    let dir = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:v1", dir.path().join("layout").display());
    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        &format!("{}/team/app:multi", source.host()),
        &layout,
    ]);
    assert!(ok, "{out}");
    let (ok, out) = berth(&[
        "push",
        &layout,
        &format!("{}/pushed/app:v1", destination.host()),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(&index), "{out}");
    let (ok, out) = berth(&[
        "push",
        &format!("{}/team/app:multi", source.host()),
        &format!("{}/x/y:v1", destination.host()),
    ]);
    assert!(!ok && out.contains("use copy"), "{out}");
}

#[test]
fn one_platform_is_copied_unless_all_are_asked_for_and_progress_is_reported() {
    let source = start();
    let destination = start();
    let (index, children) = push_index(&source.url(), "team/app", "multi");
    let from = format!("{}/team/app:multi", source.host());
    let manifest_digest = |repo: &str, reference: &str| {
        let r = http()
            .get(format!(
                "{}/v2/{repo}/manifests/{reference}",
                destination.url()
            ))
            .header("accept", berth_client::MANIFEST_TYPES)
            .send()
            .unwrap();
        (r.status(), header(&r, "docker-content-digest"))
    };

    // One platform, chosen: the arm64 image alone, with JSON events for each step.
    let to = format!("{}/one/app:v1", destination.host());
    let (ok, out) = berth(&["copy", "--platform", "linux/arm64", "--json", &from, &to]);
    assert!(ok, "{out}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |kind: &str| events.iter().filter(|e| e["event"] == kind).count();
    assert_eq!(of("blob_started"), 3, "config and two layers: {out}");
    assert_eq!(of("blob_done"), 3, "{out}");
    assert_eq!(of("manifest_stored"), 1, "no index: {out}");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "copied");
    assert_eq!(last["digest"], children[1].as_str(), "{out}");
    assert_eq!(manifest_digest("one/app", "v1").1, children[1]);
    assert_eq!(
        manifest_digest("one/app", &index).0,
        StatusCode::NOT_FOUND,
        "the index stays behind"
    );

    // The same again, not on a terminal: a line per change of state; all there already.
    let (ok, out) = berth(&["copy", "--platform", "linux/arm64", &from, &to]);
    assert!(ok, "{out}");
    assert_eq!(out.matches(": already there").count(), 3, "{out}");

    // Every platform: the index with its digest, and the lines say what moved.
    let to = format!("{}/all/app:v1", destination.host());
    let (ok, out) = berth(&["copy", "--all-platforms", &from, &to]);
    assert!(ok, "{out}");
    assert_eq!(manifest_digest("all/app", "v1").1, index);
    assert!(
        out.contains(": copying ") && out.contains(": done, "),
        "{out}"
    );
    assert_eq!(out.matches("manifest sha256:").count(), 3, "{out}");

    let (ok, out) = berth(&[
        "copy",
        "--all-platforms",
        "--platform",
        "linux/arm64",
        &from,
        &to,
    ]);
    assert!(!ok && out.contains("cannot be used with"), "{out}");
    let (ok, out) = berth(&["copy", "--platform", "linux/s390x", &from, &to]);
    assert!(!ok && out.contains("no linux/s390x image"), "{out}");
}

#[test]
fn large_blobs_go_in_chunks_that_real_registries_accept() {
    let Some(distribution) = Distribution::start() else {
        eprintln!("skipped: docker-registry is not installed");
        return;
    };
    let source = start();
    let back = start();
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 11).map(|i| (i % 251) as u8).collect();
    let (digest, _) = push_image(&source.url(), "team/big", "v1", &[&big, b"small"]);
    let there = format!("{}/team/big:v1", distribution.addr);
    let (ok, out) = berth(&[
        "copy",
        "--chunk-size",
        "1",
        &format!("{}/team/big:v1", source.host()),
        &there,
    ]);
    assert!(ok, "{out}");
    let (ok, out) = berth(&[
        "copy",
        "--chunk-size",
        "1",
        &there,
        &format!("{}/again/big:v1", back.host()),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(&digest), "{out}");
    let metrics = http()
        .get(format!("{}/metrics", back.url()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let patches: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("berth_http_requests_total") && l.contains("method=\"PATCH\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(patches, 4, "3 MiB and a bit in 1 MiB chunks:\n{metrics}");
    let (ok, out) = berth(&["copy", "--chunk-size", "0", &there, &there]);
    assert!(!ok && out.contains("--chunk-size"), "{out}");
}
