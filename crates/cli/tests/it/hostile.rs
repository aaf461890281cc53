//! What an attacker on the network tries against the default settings (builtin auth),
//! and what the server must do instead of what it once did.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use berth_auth::AuthSettings;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::auth::{api, Who};

/// Sends a request head announcing `length` body bytes and no body; returns what the
/// server answers within five seconds.
fn head_only(addr: &str, request_line: &str, auth: Option<&str>, length: usize) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{request_line} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).to_lowercase()
}

#[test]
fn the_admin_api_refuses_strangers_before_reading_their_bodies() {
    let reg = crate::start_with_auth(AuthSettings::default());
    let addr = reg.host();
    // 300 anonymous requests declaring 2 MB each, bodies never sent: each is refused at
    // once (it once waited for, and buffered, the whole body first).
    let answers: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..30)
            .map(|_| {
                let addr = addr.clone();
                s.spawn(move || {
                    (0..10)
                        .map(|_| head_only(&addr, "POST /api/v1/users", None, 2_000_000))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(answers.len(), 300);
    for answer in &answers {
        assert!(answer.starts_with("http/1.1 401"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("www-authenticate: basic"), "{answer}");
    }
    // Wrong credentials are refused the same way.
    let wrong = format!("Basic {}", base64_of("admin:wrong"));
    let answer = head_only(&addr, "PUT /api/v1/users/admin", Some(&wrong), 2_000_000);
    assert!(answer.starts_with("http/1.1 401"), "{answer}");

    // A signed-in user's body is bounded by what the endpoint takes.
    crate::auth::add_user(&reg, "mallory", "mallory-password");
    let mallory = format!("Basic {}", base64_of("mallory:mallory-password"));
    let answer = head_only(&addr, "POST /api/v1/projects", Some(&mallory), 1_000_000);
    assert!(answer.starts_with("http/1.1 413"), "{answer}");
    let (s, _) = api(
        &reg,
        &Who::user("mallory", "mallory-password"),
        Method::POST,
        "/projects",
        Some(json!({"name": "fine", "description": "x".repeat(1000)})),
    );
    assert_ne!(s, StatusCode::PAYLOAD_TOO_LARGE);
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn the_data_is_its_owners_only_and_a_wider_directory_is_reported() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_berth"));
    let berth = berth_testkit::BerthProcess::spawn(binary, &data);
    crate::push_image(&berth.url(), "private/app", "v1", &[b"secret layer"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("meta.db")), 0o600);
    let mut stack = vec![data.join("blobs")];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        assert_eq!(mode(&d) & 0o077, 0, "{}", d.display());
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files += 1;
                assert_eq!(mode(&path) & 0o077, 0, "{}", path.display());
            }
        }
    }
    assert!(files >= 2, "blobs were written");
    drop(berth);

    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let berth = berth_testkit::BerthProcess::spawn(binary, &data);
    assert!(
        berth_testkit::wait_until(Duration::from_secs(5), || berth
            .log()
            .iter()
            .any(|l| l.contains("readable by other local users") && l.contains("chmod 700"))),
        "{:?}",
        berth.log()
    );
}

#[test]
fn names_that_differ_only_in_case_cannot_coexist_and_pushed_projects_keep_the_length_rule() {
    let reg = crate::start_with_auth(AuthSettings::default());
    let admin = Who::admin();
    let create = |name: &str| {
        api(
            &reg,
            &admin,
            Method::POST,
            "/users",
            Some(json!({"name": name, "password": "a-long-password"})),
        )
        .0
    };
    assert_eq!(create("alice"), StatusCode::CREATED);
    assert_eq!(create("Alice"), StatusCode::CONFLICT);
    assert_eq!(create("ALICE"), StatusCode::CONFLICT);

    // A push may create its project, but not one with a name the API would refuse.
    let long = "p".repeat(65);
    let r = admin
        .request(
            &crate::http(),
            Method::POST,
            &format!("{}/v2/{long}/app/blobs/uploads/", reg.url()),
        )
        .send()
        .unwrap();
    crate::assert_oci_error(r, StatusCode::BAD_REQUEST, "NAME_INVALID");
    let fine = "p".repeat(64);
    let r = admin
        .request(
            &crate::http(),
            Method::POST,
            &format!("{}/v2/{fine}/app/blobs/uploads/", reg.url()),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
}

#[test]
fn open_upload_sessions_are_capped_per_caller() {
    let reg = crate::start_opts(berth_testkit::Options {
        auth: AuthSettings::default(),
        limits: berth_registry::Limits {
            max_open_uploads: 5,
            ..berth_registry::Limits::default()
        },
        ..berth_testkit::Options::default()
    });
    let admin = Who::admin();
    for name in ["mallory", "alice"] {
        let (s, _) = api(
            &reg,
            &admin,
            Method::POST,
            "/users",
            Some(json!({"name": name, "password": format!("{name}-password")})),
        );
        assert_eq!(s, StatusCode::CREATED);
    }
    let open = |who: &Who, project: &str| {
        who.request(
            &crate::http(),
            Method::POST,
            &format!("{}/v2/{project}/app/blobs/uploads/", reg.url()),
        )
        .send()
        .unwrap()
    };
    let mallory = Who::user("mallory", "mallory-password");
    let mut locations = Vec::new();
    for _ in 0..5 {
        let r = open(&mallory, "mallory");
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        locations.push(crate::header(&r, "location"));
    }
    crate::assert_oci_error(
        open(&mallory, "mallory"),
        StatusCode::TOO_MANY_REQUESTS,
        "TOOMANYREQUESTS",
    );
    // Others are not affected, and a cancelled session gives its place back.
    let alice = Who::user("alice", "alice-password");
    assert_eq!(open(&alice, "alice").status(), StatusCode::ACCEPTED);
    let r = mallory
        .request(
            &crate::http(),
            Method::DELETE,
            &format!("{}{}", reg.url(), locations[0]),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(open(&mallory, "mallory").status(), StatusCode::ACCEPTED);
}

#[test]
fn serve_purges_abandoned_upload_sessions_without_a_collection_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, "[gc]\nupload_max_age_secs = 1\n").unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_berth"));
    let args = ["--auth", "none", "--config", config.to_str().unwrap()];
    let berth = berth_testkit::BerthProcess::spawn_with(binary, &data, &args, &[]);
    let r = crate::http()
        .post(format!("{}/v2/abandoned/app/blobs/uploads/", berth.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = crate::header(&r, "location");
    let r = crate::http()
        .patch(format!("{}{location}", berth.url()))
        .header("content-type", "application/octet-stream")
        .body(vec![1u8; 1000])
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    berth.kill();
    std::thread::sleep(Duration::from_secs(2));
    // No [gc] interval: the maintenance that runs at start (and hourly) purges it.
    let berth = berth_testkit::BerthProcess::spawn_with(binary, &data, &args, &[]);
    assert!(berth_testkit::wait_until(Duration::from_secs(10), || berth
        .log()
        .iter()
        .any(|l| l.contains("abandoned upload sessions purged"))));
    let r = crate::http()
        .get(format!("{}{location}", berth.url()))
        .send()
        .unwrap();
    crate::assert_oci_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
}

#[test]
fn a_login_keeps_one_refresh_token_that_its_owner_or_an_admin_can_list_and_revoke() {
    let reg = crate::start_with_auth(AuthSettings::default());
    let admin = Who::admin();
    crate::auth::add_user(&reg, "rita", "rita-password");
    let rita = Who::user("rita", "rita-password");
    let login = |who: &Who| -> serde_json::Value {
        who.request(
            &crate::http(),
            Method::GET,
            &format!(
                "{}/token?service=berth&offline_token=true&client_id=docker",
                reg.url()
            ),
        )
        .send()
        .unwrap()
        .json()
        .unwrap()
    };
    let first = login(&rita)["refresh_token"].as_str().unwrap().to_owned();
    let second = login(&rita)["refresh_token"].as_str().unwrap().to_owned();
    let refresh = |token: &str| {
        crate::http()
            .post(format!("{}/token", reg.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type=refresh_token&service=berth&client_id=docker&access_type=offline&refresh_token={token}"
            ))
            .send()
            .unwrap()
    };
    // Refreshing gives access tokens, never another long-lived refresh token.
    for _ in 0..3 {
        let r = refresh(&first);
        assert_eq!(r.status(), StatusCode::OK);
        let body: serde_json::Value = r.json().unwrap();
        assert!(body["access_token"].is_string());
        assert!(body.get("refresh_token").is_none(), "{body}");
    }
    let (s, listed) = api(&reg, &rita, Method::GET, "/users/rita/tokens", None);
    assert_eq!(s, StatusCode::OK);
    let tokens = listed["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "one per login: {listed}");
    assert!(tokens.iter().all(|t| t["client"] == "docker"));
    // Rita revokes her first login's token: it stops working at once, the other does not.
    let claims = crate::auth::jwt_claims;
    let first_id = claims(&first)["jti"].as_str().unwrap().to_owned();
    let (s, _) = api(
        &reg,
        &rita,
        Method::DELETE,
        &format!("/users/rita/tokens/{first_id}"),
        None,
    );
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(refresh(&first).status(), StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&second).status(), StatusCode::OK);
    // An administrator revokes the other; the revocation is audited.
    let second_id = claims(&second)["jti"].as_str().unwrap().to_owned();
    let (s, _) = api(
        &reg,
        &admin,
        Method::DELETE,
        &format!("/users/rita/tokens/{second_id}"),
        None,
    );
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(refresh(&second).status(), StatusCode::UNAUTHORIZED);
    let (_, audit) = api(
        &reg,
        &admin,
        Method::GET,
        "/audit?action=token.revoke",
        None,
    );
    assert_eq!(audit["events"].as_array().unwrap().len(), 2, "{audit}");
    // Nobody else may list or revoke them.
    crate::auth::add_user(&reg, "mallory", "mallory-password");
    let (s, _) = api(
        &reg,
        &Who::user("mallory", "mallory-password"),
        Method::GET,
        "/users/rita/tokens",
        None,
    );
    assert_eq!(s, StatusCode::FORBIDDEN);
}

/// A small tmpfs mounted for one test, unmounted when it ends, however.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` where this process may not mount (not root, no tmpfs): the test skips.
    fn mount(at: &std::path::Path, mib: u64) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("skipping: cannot mount a tmpfs here");
            return None;
        }
        Some(SmallDisk(at.to_owned()))
    }

    fn free(&self) -> u64 {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_is_said_plainly_reported_by_readyz_and_loses_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("small"), 96) else {
        return;
    };
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_berth"));
    let berth = berth_testkit::BerthProcess::spawn(binary, &disk.0.join("data"));
    let url = berth.url();
    let (_, manifest) = crate::push_image(&url, "team/app", "v1", &[b"a small layer"]);
    let ready = crate::http().get(format!("{url}/readyz")).send().unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    // Fill the disk but for half a mebibyte.
    let filler = disk.0.join("filler");
    let leave = 512 * 1024;
    let fill = disk.free().saturating_sub(leave);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    let ready = crate::http().get(format!("{url}/readyz")).send().unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let said = ready.text().unwrap();
    assert!(said.contains("full"), "{said}");

    // A push that does not fit: a clear answer, not `500 UNKNOWN`.
    let big = vec![3u8; 4 * 1024 * 1024];
    let digest = crate::sha256(&big);
    let r = crate::http()
        .post(format!("{url}/v2/team/app/blobs/uploads/?digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(big.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::INSUFFICIENT_STORAGE);
    let said = r.text().unwrap();
    assert!(said.contains("storage is full"), "{said}");
    // Tag deletes while full (the metadata store too may be out of room): whatever they
    // answer, their events are not lost.
    for i in 0..5 {
        let tag = format!("t{i}");
        let r = crate::put_manifest(
            &url,
            "team/app",
            &tag,
            "application/vnd.oci.image.manifest.v1+json",
            &manifest,
        );
        assert!(
            r.status() == StatusCode::CREATED || r.status() == StatusCode::INSUFFICIENT_STORAGE,
            "{}: {:?}",
            r.status(),
            berth
                .log()
                .iter()
                .filter(|l| l.contains("error"))
                .collect::<Vec<_>>()
        );
    }
    let filler2 = disk.0.join("filler2");
    let _ = std::fs::write(&filler2, vec![0u8; disk.free() as usize]);
    let mut answered = Vec::new();
    for i in 0..5 {
        let r = crate::http()
            .delete(format!("{url}/v2/team/app/manifests/t{i}"))
            .send()
            .unwrap();
        answered.push(r.status());
    }
    // Space comes back: the events recorded meanwhile are written, none dropped.
    std::fs::remove_file(&filler).unwrap();
    let _ = std::fs::remove_file(&filler2);
    assert!(
        answered
            .iter()
            .all(|s| s.is_success() || *s == StatusCode::INSUFFICIENT_STORAGE),
        "{answered:?}"
    );
    assert!(
        berth_testkit::wait_until(Duration::from_secs(20), || {
            let audit: serde_json::Value = crate::http()
                .get(format!("{url}/api/v1/audit?limit=100"))
                .send()
                .unwrap()
                .json()
                .unwrap();
            let events = audit["events"].as_array().cloned().unwrap_or_default();
            // Every delete is there: a success (its change) or a failure (its refusal).
            let deletes = events
                .iter()
                .filter(|e| e["action"].as_str().is_some_and(|a| a.contains("delete")))
                .count();
            deletes >= answered.len()
        }),
        "every delete is in the audit log: {answered:?} {:#?}",
        berth
            .log()
            .iter()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect::<Vec<_>>()
    );
    let ready = crate::http().get(format!("{url}/readyz")).send().unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    // And the push now goes through.
    let r = crate::http()
        .post(format!("{url}/v2/team/app/blobs/uploads/?digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(big)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    drop(berth);
}

#[test]
fn a_forged_host_header_never_reaches_the_challenge() {
    let reg = crate::start_with_auth(AuthSettings::default());
    let addr = reg.host();
    let challenge_for = |host: &str| {
        let mut stream = TcpStream::connect(&addr).unwrap();
        write!(
            stream,
            "GET /v2/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("www-authenticate:"))
            .unwrap_or("")
            .to_owned()
    };
    let honest = challenge_for("registry.example.test:5000");
    assert!(
        honest.contains("realm=\"http://registry.example.test:5000/token\""),
        "{honest}"
    );
    for forged in [
        "evil.test/x\",error=\"x",
        "a b",
        "evil.test/phish?",
        "[::1",
        "host:99999999",
    ] {
        let challenge = challenge_for(forged);
        assert!(
            challenge.contains("realm=\"http://localhost/token\""),
            "{forged:?} gave {challenge}"
        );
    }
}

#[test]
fn the_high_s_twin_of_a_valid_token_is_refused() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let reg = crate::start_with_auth(AuthSettings::default());
    let issued: serde_json::Value = Who::admin()
        .request(
            &crate::http(),
            Method::GET,
            &format!("{}/token?service=berth", reg.url()),
        )
        .send()
        .unwrap()
        .json()
        .unwrap();
    let token = issued["token"].as_str().unwrap();
    let (input, signature) = token.rsplit_once('.').unwrap();
    let signature = b64.decode(signature).unwrap();
    // s' = n - s, with n the order of P-256: the same signature, spelled differently.
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let s = &signature[32..];
    let mut twin_s = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        twin_s[i] = d as u8;
    }
    let twin = [&signature[..32], &twin_s[..]].concat();
    let forged = format!("{input}.{}", b64.encode(twin));
    let with = |t: &str| {
        crate::http()
            .get(format!("{}/v2/", reg.url()))
            .bearer_auth(t)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(with(token), StatusCode::OK);
    assert_eq!(with(&forged), StatusCode::UNAUTHORIZED);
}
