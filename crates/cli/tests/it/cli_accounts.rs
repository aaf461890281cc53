//! The real binary with access control on: the first administrator on first start,
//! `berth user …` and `berth audit` beside a running server, and keys and users that
//! survive a restart.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_testkit::{wait_until, BerthProcess};
use reqwest::StatusCode;
use serde_json::Value;

use crate::auth::Who;
use crate::clients::{run, run_with_stdin};
use crate::http;

fn berth(data_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_berth"));
    c.args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("BERTH_LOG_LEVEL", "warn")
        .stdin(Stdio::null());
    c
}

fn status_as(server: &BerthProcess, who: &Who) -> StatusCode {
    who.request(
        &http(),
        reqwest::Method::GET,
        &format!("{}/v2/", server.url()),
    )
    .send()
    .unwrap()
    .status()
}

#[test]
fn first_start_creates_an_admin_and_user_commands_work_beside_the_server() {
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let data = tempfile::tempdir().unwrap();
    let server = BerthProcess::spawn_with(binary, data.path(), &[], &[]);
    // The generated password is printed once.
    let log = server.log();
    let line = log
        .iter()
        .find(|l| l.contains("created user \"admin\" with password"))
        .unwrap_or_else(|| panic!("no admin password in the log: {log:#?}"));
    let password = line.rsplit(' ').next().unwrap().to_owned();
    let admin = Who::user("admin", &password);
    assert_eq!(status_as(&server, &admin), StatusCode::OK);
    assert_eq!(
        status_as(&server, &Who::anonymous()),
        StatusCode::UNAUTHORIZED
    );

    let d = data.path();
    // Pointed at a directory that does not exist (run from elsewhere), a user command
    // refuses, naming it, instead of making an empty one the server never sees.
    let elsewhere = d.join("not-here");
    let out = berth(&elsewhere, &["user", "add", "lost"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("does not exist") && said.contains("not-here"),
        "{said}"
    );
    assert!(!elsewhere.exists());
    run_with_stdin(
        &mut berth(d, &["user", "add", "ops", "--password-stdin"]),
        "ops-password\n",
    );
    assert_eq!(
        status_as(&server, &Who::user("ops", "ops-password")),
        StatusCode::OK
    );
    let out = run(&mut berth(d, &["user", "add", "auditor", "--admin"]));
    let generated = out.rsplit(' ').next().unwrap().trim().to_owned();
    assert_eq!(
        status_as(&server, &Who::user("auditor", &generated)),
        StatusCode::OK
    );

    // A Distribution htpasswd file moves over with its passwords.
    let htpasswd = d.join("htpasswd");
    std::fs::write(
        &htpasswd,
        "alice:$2y$05$XkuvP9aMYIv.Qf1R4lQUcuEQ1ZzqiqIWupx5hcf6jeuoLQWIsHU/q\n",
    )
    .unwrap();
    let out = run(Command::new(binary)
        .args(["user", "import-htpasswd"])
        .arg(&htpasswd)
        .arg("--data-dir")
        .arg(d));
    assert!(out.contains("alice\timported"), "{out}");
    assert_eq!(
        status_as(&server, &Who::user("alice", "wonderland")),
        StatusCode::OK
    );

    run_with_stdin(
        &mut berth(d, &["user", "passwd", "ops", "--password-stdin"]),
        "ops-password-2\n",
    );
    assert_eq!(
        status_as(&server, &Who::user("ops", "ops-password")),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status_as(&server, &Who::user("ops", "ops-password-2")),
        StatusCode::OK
    );
    let list = run(&mut berth(d, &["user", "list"]));
    for name in ["admin\tadmin", "alice\tuser", "auditor\tadmin", "ops\tuser"] {
        assert!(list.contains(name), "{list}");
    }
    run(&mut berth(d, &["user", "delete", "ops"]));
    assert_eq!(
        status_as(&server, &Who::user("ops", "ops-password-2")),
        StatusCode::UNAUTHORIZED
    );
    let out = berth(d, &["user", "delete", "ops"]).output().unwrap();
    assert!(!out.status.success(), "deleting a missing user fails");

    // Tokens survive a restart (the signing key is kept), the admin is not recreated.
    let token: Value = admin
        .request(
            &http(),
            reqwest::Method::GET,
            &format!(
                "{}/token?service=berth&scope=registry:catalog:*",
                server.url()
            ),
        )
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = token["token"].as_str().unwrap().to_owned();
    server.kill();
    let server = BerthProcess::spawn_with(binary, data.path(), &[], &[]);
    assert!(!server.log().iter().any(|l| l.contains("created user")));
    let r = http()
        .get(format!("{}/v2/_catalog", server.url()))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        status_as(&server, &Who::user("alice", "wonderland")),
        StatusCode::OK,
        "rehashed password still works"
    );

    // `berth audit` shows what happened, the CLI's own changes included.
    let mut lines = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        let out = run(&mut berth(d, &["audit", "--json", "--limit", "1000"]));
        lines = out
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        lines
            .iter()
            .any(|e| e["action"] == "login" && e["actor"] == "alice")
    }));
    let has = |actor: &str, action: &str, resource: &str, result: &str| {
        lines.iter().any(|e| {
            e["actor"] == actor
                && e["action"] == action
                && e["resource"] == resource
                && e["result"] == result
        })
    };
    assert!(has("berth-cli", "user.create", "admin", "success"));
    assert!(has("berth-cli", "user.create", "ops", "success"));
    assert!(has("berth-cli", "user.update", "ops", "success"));
    assert!(has("berth-cli", "user.delete", "ops", "success"));
    assert!(has("ops", "login", "ops", "failed"));
    let filtered = run(&mut berth(
        d,
        &["audit", "--actor", "berth-cli", "--action", "user.delete"],
    ));
    assert_eq!(filtered.lines().count(), 1, "{filtered}");
}

#[test]
fn repositories_pushed_without_access_control_belong_to_administrators_until_adopted() {
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let data = tempfile::tempdir().unwrap();
    let open = BerthProcess::spawn(binary, data.path());
    let legacy = crate::push_blob(&open.url(), "legacy/app", b"pushed before auth");
    open.kill();

    let env = [("BERTH_ADMIN_PASSWORD", "first-admin-password")];
    let server = BerthProcess::spawn_with(binary, data.path(), &[], &env);
    let admin = Who::user("admin", "first-admin-password");
    let (status, _) = crate::auth::api_at(
        &server.url(),
        &admin,
        reqwest::Method::POST,
        "/users",
        Some(serde_json::json!({"name": "eve", "password": "eve-password"})),
    );
    assert_eq!(status, StatusCode::CREATED);
    let eve = Who::user("eve", "eve-password");
    let blob = format!("{}/v2/legacy/app/blobs/{legacy}", server.url());
    let push = format!("{}/v2/legacy/app/blobs/uploads/", server.url());
    let get = |who: &Who| {
        who.request(&http(), reqwest::Method::GET, &blob)
            .send()
            .unwrap()
            .status()
    };
    let start_push = |who: &Who| {
        who.request(&http(), reqwest::Method::POST, &push)
            .send()
            .unwrap()
            .status()
    };
    // Eve may create projects by pushing, but not take over one that holds repositories.
    assert_eq!(get(&eve), StatusCode::FORBIDDEN);
    assert_eq!(start_push(&eve), StatusCode::FORBIDDEN);
    assert_eq!(get(&admin), StatusCode::OK);
    // Once an administrator adopts it, membership works as usual.
    for (path, body) in [
        ("/projects", serde_json::json!({"name": "legacy"})),
        (
            "/projects/legacy/members",
            serde_json::json!({"user": "eve", "role": "guest"}),
        ),
    ] {
        let (status, value) = crate::auth::api_at(
            &server.url(),
            &admin,
            reqwest::Method::POST,
            path,
            Some(body),
        );
        assert_eq!(status, StatusCode::CREATED, "{path}: {value}");
    }
    assert_eq!(get(&eve), StatusCode::OK);
    assert_eq!(start_push(&eve), StatusCode::FORBIDDEN);
}

#[test]
fn token_mode_trusts_an_external_rs256_issuer_configured_by_file() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    use rsa::signature::{SignatureEncoding, Signer};

    let private =
        rsa::RsaPrivateKey::from_pkcs8_pem(include_str!("../../../auth/testdata/test-rsa-key.pem"))
            .unwrap();
    let data = tempfile::tempdir().unwrap();
    let public = data.path().join("issuer.pem");
    std::fs::write(
        &public,
        private
            .to_public_key()
            .to_public_key_pem(Default::default())
            .unwrap(),
    )
    .unwrap();
    let config = data.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nmode = \"token\"\nissuer = \"corp-auth\"\nservice = \"berth\"\n\
             realm = \"https://auth.example.test/token\"\nissuer_public_key = \"{}\"\n",
            public.display()
        ),
    )
    .unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let server = BerthProcess::spawn_with(
        binary,
        &data.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |actions: &str| {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = format!(
            r#"{{"iss":"corp-auth","sub":"ci","aud":"berth","exp":{},"nbf":{},"iat":{},"jti":"1",
                "access":[{{"type":"repository","name":"team/app","actions":[{actions}]}}]}}"#,
            now + 300,
            now - 5,
            now - 5
        );
        let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims));
        let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(private.clone());
        let signature = signer.sign(input.as_bytes()).to_bytes();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    };
    let push = token(r#""pull","push""#);
    let layer = b"pushed with an external token".to_vec();
    let digest = crate::sha256(&layer);
    let r = http()
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?digest={digest}",
            server.url()
        ))
        .bearer_auth(&push)
        .body(layer.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let blob = format!("{}/v2/team/app/blobs/{digest}", server.url());
    let r = http()
        .get(&blob)
        .bearer_auth(token(r#""pull""#))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http().get(&blob).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.starts_with("Bearer realm=\"https://auth.example.test/token\",service=\"berth\""),
        "{challenge}"
    );
    let r = http()
        .delete(&blob)
        .bearer_auth(token(r#""pull""#))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "no delete in the token: 403 with a challenge to fetch one that has it"
    );
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("error=\"insufficient_scope\""));
    // No token endpoint of its own, and no passwords.
    let r = http()
        .get(format!("{}/token?service=berth", server.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}
