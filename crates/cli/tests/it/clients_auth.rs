//! Real clients against a registry with access control: `skopeo login` and `podman
//! login` as a user and as a robot account, pushes and pulls of a private project, and an
//! anonymous pull of a public one. (docker and ctr log in within `clients.rs`, where
//! their daemons run.)

use std::path::Path;
use std::process::{Command, Stdio};

use berth_auth::AuthSettings;
use berth_testkit::tool;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::auth::{expect_api, Who};
use crate::clients::{build_layout, layout_manifest_digest, run, run_with_stdin};

#[test]
fn skopeo_and_podman_log_in_as_users_and_robots() {
    let (Some(skopeo), Some(podman), Some(umoci)) = (tool("skopeo"), tool("podman"), tool("umoci"))
    else {
        return;
    };
    let reg = crate::start_with_auth(AuthSettings::default());
    let admin = Who::admin();
    let host = reg.host();
    expect_api(
        &reg,
        &admin,
        Method::POST,
        "/users",
        Some(json!({"name": "ci-user", "password": "ci-user-password"})),
        StatusCode::CREATED,
    );
    expect_api(
        &reg,
        &admin,
        Method::POST,
        "/projects",
        Some(json!({"name": "private"})),
        StatusCode::CREATED,
    );
    expect_api(
        &reg,
        &admin,
        Method::POST,
        "/projects",
        Some(json!({"name": "public", "public": true})),
        StatusCode::CREATED,
    );
    expect_api(
        &reg,
        &admin,
        Method::POST,
        "/projects/private/members",
        Some(json!({"user": "ci-user", "role": "developer"})),
        StatusCode::CREATED,
    );

    let dir = tempfile::tempdir().unwrap();
    build_layout(&umoci, dir.path());
    let src = format!("oci:{}:v1", dir.path().join("src").display());
    let original = layout_manifest_digest(&dir.path().join("src"));
    let user_auth = dir.path().join("user-auth.json");

    // skopeo login as a user, then push and read back a private image.
    run_with_stdin(
        Command::new(&skopeo)
            .args(["login", "--tls-verify=false", "--authfile"])
            .arg(&user_auth)
            .args(["-u", "ci-user", "--password-stdin", &host]),
        "ci-user-password",
    );
    let private = format!("docker://{host}/private/app:v1");
    run(Command::new(&skopeo)
        .args(["copy", "--dest-tls-verify=false", "--authfile"])
        .arg(&user_auth)
        .args([src.as_str(), private.as_str()]));
    let inspect = |authfile: Option<&Path>| {
        let mut c = Command::new(&skopeo);
        c.args(["inspect", "--raw", "--tls-verify=false"]);
        match authfile {
            Some(f) => c.arg("--authfile").arg(f),
            None => c.arg("--no-creds"),
        };
        c.arg(&private).stdin(Stdio::null()).output().unwrap()
    };
    assert!(inspect(Some(&user_auth)).status.success());
    let anonymous = inspect(None);
    assert!(
        !anonymous.status.success(),
        "a private image is not readable anonymously"
    );
    assert!(
        String::from_utf8_lossy(&anonymous.stderr).contains("denied")
            && String::from_utf8_lossy(&anonymous.stderr).contains("log in"),
        "{}",
        String::from_utf8_lossy(&anonymous.stderr)
    );

    // A robot account with pull and push logs in with podman and works on the project.
    let robot = expect_api(
        &reg,
        &admin,
        Method::POST,
        "/projects/private/robots",
        Some(json!({"name": "builder", "permissions": ["pull", "push"], "expires_in_days": 30})),
        StatusCode::CREATED,
    );
    let robot_auth = dir.path().join("robot-auth.json");
    let podman = |args: &[&str]| {
        let mut c = Command::new(&podman);
        c.arg("--root")
            .arg(dir.path().join("root"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    };
    run_with_stdin(
        &mut podman(&[
            "login",
            "--tls-verify=false",
            "--authfile",
            &robot_auth.to_string_lossy(),
            "-u",
            robot["name"].as_str().unwrap(),
            "--password-stdin",
            &host,
        ]),
        robot["secret"].as_str().unwrap(),
    );
    let remote = format!("{host}/private/app:v1");
    run(&mut podman(&[
        "pull",
        "--tls-verify=false",
        "--authfile",
        &robot_auth.to_string_lossy(),
        &remote,
    ]));
    let digest = run(&mut podman(&[
        "image",
        "inspect",
        "--format",
        "{{.Digest}}",
        &remote,
    ]));
    assert_eq!(digest.trim(), original);
    let copy = format!("{host}/private/app:robot");
    run(&mut podman(&["tag", &remote, &copy]));
    run(&mut podman(&[
        "push",
        "--tls-verify=false",
        "--authfile",
        &robot_auth.to_string_lossy(),
        &copy,
    ]));
    // The robot cannot push into another project.
    let elsewhere = format!("{host}/public/app:robot");
    run(&mut podman(&["tag", &remote, &elsewhere]));
    let out = podman(&[
        "push",
        "--tls-verify=false",
        "--authfile",
        &robot_auth.to_string_lossy(),
        &elsewhere,
    ])
    .stdin(Stdio::null())
    .output()
    .unwrap();
    assert!(
        !out.status.success(),
        "a robot of `private` may not push to `public`"
    );

    // The administrator publishes to the public project; anyone pulls it without logging in.
    let admin_auth = dir.path().join("admin-auth.json");
    run_with_stdin(
        Command::new(&skopeo)
            .args(["login", "--tls-verify=false", "--authfile"])
            .arg(&admin_auth)
            .args(["-u", "admin", "--password-stdin", &host]),
        berth_testkit::ADMIN_PASSWORD,
    );
    let public = format!("docker://{host}/public/app:v1");
    run(Command::new(&skopeo)
        .args(["copy", "--dest-tls-verify=false", "--authfile"])
        .arg(&admin_auth)
        .args([src.as_str(), public.as_str()]));
    let back = dir.path().join("anonymous-pull");
    run(Command::new(&skopeo)
        .args(["copy", "--src-tls-verify=false", "--src-no-creds", &public])
        .arg(format!("oci:{}:v1", back.display())));
    assert_eq!(layout_manifest_digest(&back), original);
    run(Command::new(&skopeo)
        .args(["logout", "--authfile"])
        .arg(&user_auth)
        .arg(&host));
}

#[test]
fn the_oras_sdk_with_its_default_token_backend_pushes_after_login() {
    let Some(python) = crate::clients::oras_python() else {
        return;
    };
    let reg = crate::start_with_auth(AuthSettings::default());
    crate::auth::add_user(&reg, "olive", "olive-password");
    crate::auth::add_project(&reg, "private", false);
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/oras_login.py");
    let out = run(Command::new(&python)
        .arg(script)
        .args([reg.host().as_str(), "olive", "olive-password"])
        .arg(dir.path()));
    assert!(out.contains("pushed and pulled after login"), "{out}");
    assert!(out.contains("refused where it may not push"), "{out}");
}
