//! Access control over real HTTP: the permission matrix (every role × every operation, on
//! a public and a private project), the token flow and its refusals, the audit trail and
//! the login rate limit.

use std::time::Duration;

use berth_auth::AuthSettings;
use berth_testkit::{wait_until, TestRegistry, ADMIN_PASSWORD};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{header, http, image_manifest, sha256};

/// Credentials of one caller; `None` is anonymous.
#[derive(Clone, Debug)]
pub(crate) struct Who(pub(crate) Option<(String, String)>);

impl Who {
    pub(crate) fn admin() -> Who {
        Who::user("admin", ADMIN_PASSWORD)
    }

    pub(crate) fn user(name: &str, password: &str) -> Who {
        Who(Some((name.to_owned(), password.to_owned())))
    }

    pub(crate) fn anonymous() -> Who {
        Who(None)
    }

    pub(crate) fn request(&self, client: &Client, method: Method, url: &str) -> RequestBuilder {
        let r = client.request(method, url);
        match &self.0 {
            Some((user, password)) => r.basic_auth(user, Some(password)),
            None => r,
        }
    }
}

/// `POST|PUT /api/v1/...` with a JSON body; returns status and body.
pub(crate) fn api(
    reg: &TestRegistry,
    who: &Who,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    api_at(&reg.url(), who, method, path, body)
}

/// `api` against any base URL (a `BerthProcess`).
pub(crate) fn api_at(
    base: &str,
    who: &Who,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut r = who.request(&http(), method, &format!("{base}/api/v1{path}"));
    if let Some(body) = body {
        r = r
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let r = r.send().unwrap();
    let status = r.status();
    let text = r.text().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Creates a user as the administrator.
pub(crate) fn add_user(reg: &TestRegistry, name: &str, password: &str) {
    let body = json!({"name": name, "password": password});
    expect_api(
        reg,
        &Who::admin(),
        Method::POST,
        "/users",
        Some(body),
        StatusCode::CREATED,
    );
}

/// Creates a project as the administrator.
pub(crate) fn add_project(reg: &TestRegistry, name: &str, public: bool) {
    let body = json!({"name": name, "public": public});
    expect_api(
        reg,
        &Who::admin(),
        Method::POST,
        "/projects",
        Some(body),
        StatusCode::CREATED,
    );
}

pub(crate) fn expect_api(
    reg: &TestRegistry,
    who: &Who,
    method: Method,
    path: &str,
    body: Option<Value>,
    want: StatusCode,
) -> Value {
    let (status, value) = api(reg, who, method.clone(), path, body);
    assert_eq!(status, want, "{method} {path}: {value}");
    value
}

fn settings() -> AuthSettings {
    AuthSettings {
        max_login_failures: 1000,
        ..AuthSettings::default()
    }
}

/// Pushes a blob as `who`; returns the response.
fn push_blob_as(reg: &TestRegistry, who: &Who, repo: &str, bytes: &[u8]) -> Response {
    who.request(
        &http(),
        Method::POST,
        &format!(
            "{}/v2/{repo}/blobs/uploads/?digest={}",
            reg.url(),
            sha256(bytes)
        ),
    )
    .header("content-type", "application/octet-stream")
    .body(bytes.to_vec())
    .send()
    .unwrap()
}

/// Pushes a one-layer image as `who` and tags it; returns the manifest digest.
pub(crate) fn push_image_as(
    reg: &TestRegistry,
    who: &Who,
    repo: &str,
    tag: &str,
    layer: &[u8],
) -> String {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","tag":"{tag}"}}"#);
    for blob in [config.as_bytes(), layer] {
        let r = push_blob_as(reg, who, repo, blob);
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "push blob to {repo}: {}",
            r.text().unwrap_or_default()
        );
    }
    let manifest = image_manifest(
        (&sha256(config.as_bytes()), config.len()),
        &[(&sha256(layer), layer.len())],
    );
    let r = who
        .request(
            &http(),
            Method::PUT,
            &format!("{}/v2/{repo}/manifests/{tag}", reg.url()),
        )
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest.clone())
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "push manifest to {repo}: {}",
        r.text().unwrap_or_default()
    );
    sha256(&manifest)
}

/// The operations of the matrix, by letter.
const OPERATIONS: &str = "PUDMTCA";

fn op_name(op: char) -> &'static str {
    match op {
        'P' => "pull",
        'U' => "push",
        'D' => "delete",
        'M' => "mount",
        'T' => "list tags",
        'C' => "catalog",
        'A' => "manage members",
        _ => unreachable!(),
    }
}

/// Runs one operation as `who` on project `project`; true if it was allowed. Refusals
/// must be 401 for anonymous callers and 403 for authenticated ones, with an OCI error body.
fn attempt(reg: &TestRegistry, who: &Who, project: &str, op: char, round: usize) -> bool {
    let client = http();
    let repo = format!("{project}/app");
    let base = reg.url();
    let unique = format!("{project}-{op}-{round}-{who:?}").into_bytes();
    let response = match op {
        'P' => who
            .request(
                &client,
                Method::GET,
                &format!("{base}/v2/{repo}/manifests/v1"),
            )
            .send()
            .unwrap(),
        'U' => push_blob_as(reg, who, &repo, &unique),
        'D' => {
            // A blob the administrator put there, deleted for real.
            assert_eq!(
                push_blob_as(reg, &Who::admin(), &repo, &unique).status(),
                StatusCode::CREATED
            );
            who.request(
                &client,
                Method::DELETE,
                &format!("{base}/v2/{repo}/blobs/{}", sha256(&unique)),
            )
            .send()
            .unwrap()
        }
        'M' => {
            let shared = format!("{project}-mount-source").into_bytes();
            let r = who
                .request(
                    &client,
                    Method::POST,
                    &format!(
                        "{base}/v2/{repo}/blobs/uploads/?mount={}&from={project}/src",
                        sha256(&shared)
                    ),
                )
                .send()
                .unwrap();
            if r.status() == StatusCode::ACCEPTED {
                // Allowed to push but not to read the source: an upload instead of a mount.
                return false;
            }
            r
        }
        'T' => who
            .request(&client, Method::GET, &format!("{base}/v2/{repo}/tags/list"))
            .send()
            .unwrap(),
        'C' => {
            let r = who
                .request(&client, Method::GET, &format!("{base}/v2/_catalog"))
                .send()
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "the catalog answers everyone");
            let body: Value = r.json().unwrap();
            let in_catalog = body["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == &json!(repo));
            // Search shows exactly what the catalog shows.
            let r = who
                .request(&client, Method::GET, &format!("{base}/api/v1/search?q=app"))
                .send()
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "search answers everyone");
            let body: Value = r.json().unwrap();
            let in_search = body["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == json!(repo));
            assert_eq!(
                in_catalog, in_search,
                "{who:?} on {project}: catalog and search disagree"
            );
            return in_catalog;
        }
        'A' => who
            .request(
                &client,
                Method::POST,
                &format!("{base}/api/v1/projects/{project}/members"),
            )
            .header("content-type", "application/json")
            .body(json!({"user": "bystander", "role": "guest"}).to_string())
            .send()
            .unwrap(),
        _ => unreachable!(),
    };
    let status = response.status();
    if status.is_success() {
        return true;
    }
    let want = if who.0.is_none() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    assert_eq!(
        status,
        want,
        "{who:?} {} on {project}: unexpected refusal",
        op_name(op)
    );
    if status == StatusCode::UNAUTHORIZED {
        assert!(
            response.headers().contains_key("www-authenticate"),
            "401 carries a challenge"
        );
    }
    let body: Value = response.json().unwrap();
    let code = body["errors"][0]["code"].as_str().unwrap_or("").to_owned();
    assert_eq!(
        code,
        if who.0.is_none() {
            "UNAUTHORIZED"
        } else {
            "DENIED"
        }
    );
    false
}

#[test]
fn permission_matrix_over_public_and_private_projects() {
    let reg = crate::start_with_auth(settings());
    let admin = Who::admin();
    use Method as M;
    use StatusCode as S;
    for (name, role) in [
        ("guest1", Some("guest")),
        ("dev1", Some("developer")),
        ("maint1", Some("maintainer")),
        ("padmin1", Some("project_admin")),
        ("outsider", None),
        ("bystander", None),
    ] {
        expect_api(
            &reg,
            &admin,
            M::POST,
            "/users",
            Some(json!({"name": name, "password": format!("{name}-password")})),
            S::CREATED,
        );
        for project in ["pub", "priv"] {
            if name == "guest1" {
                let public = project == "pub";
                expect_api(
                    &reg,
                    &admin,
                    M::POST,
                    "/projects",
                    Some(json!({"name": project, "public": public})),
                    S::CREATED,
                );
            }
            if let Some(role) = role {
                expect_api(
                    &reg,
                    &admin,
                    M::POST,
                    &format!("/projects/{project}/members"),
                    Some(json!({"user": name, "role": role})),
                    S::CREATED,
                );
            }
        }
    }
    expect_api(
        &reg,
        &admin,
        M::POST,
        "/users",
        Some(json!({"name": "root2", "password": "root2-password", "admin": true})),
        S::CREATED,
    );
    let mut robots = Vec::new();
    for project in ["pub", "priv"] {
        push_image_as(
            &reg,
            &admin,
            &format!("{project}/app"),
            "v1",
            format!("{project} layer").as_bytes(),
        );
        let shared = format!("{project}-mount-source").into_bytes();
        assert_eq!(
            push_blob_as(&reg, &admin, &format!("{project}/src"), &shared).status(),
            S::CREATED
        );
        for perms in [
            vec!["pull"],
            vec!["push"],
            vec!["delete"],
            vec!["pull", "push", "delete"],
        ] {
            let name = perms.join("-");
            let robot = expect_api(
                &reg,
                &admin,
                M::POST,
                &format!("/projects/{project}/robots"),
                Some(json!({"name": name, "permissions": perms})),
                S::CREATED,
            );
            let login = robot["name"].as_str().unwrap().to_owned();
            assert_eq!(login, format!("robot${project}+{name}"));
            robots.push((
                project,
                name,
                Who::user(&login, robot["secret"].as_str().unwrap()),
            ));
        }
    }
    let robot = |project: &str, name: &str| {
        robots
            .iter()
            .find(|(p, n, _)| *p == project && n == name)
            .unwrap()
            .2
            .clone()
    };
    let user = |name: &str| Who::user(name, &format!("{name}-password"));

    // (caller, allowed on the public project, allowed on the private project); `None`
    // where the row does not apply (a robot is checked in its own project).
    let mut rows: Vec<(&str, Who, Option<&str>, Option<&str>)> = vec![
        ("anonymous", Who::anonymous(), Some("PTC"), Some("")),
        (
            "authenticated non-member",
            user("outsider"),
            Some("PTC"),
            Some(""),
        ),
        ("guest", user("guest1"), Some("PTC"), Some("PTC")),
        ("developer", user("dev1"), Some("PUMTC"), Some("PUMTC")),
        ("maintainer", user("maint1"), Some("PUDMTC"), Some("PUDMTC")),
        (
            "project admin",
            user("padmin1"),
            Some("PUDMTCA"),
            Some("PUDMTCA"),
        ),
        (
            "system admin",
            user("root2"),
            Some("PUDMTCA"),
            Some("PUDMTCA"),
        ),
    ];
    for (label, name, public, private) in [
        ("robot pull", "pull", "PTC", "PTC"),
        // Pushes, but may not read the private source: mount falls back to an upload.
        ("robot push", "push", "PUMTC", "U"),
        ("robot delete", "delete", "PDTC", "D"),
        (
            "robot pull+push+delete",
            "pull-push-delete",
            "PUDMTC",
            "PUDMTC",
        ),
    ] {
        rows.push((label, robot("pub", name), Some(public), None));
        rows.push((label, robot("priv", name), None, Some(private)));
    }
    // A robot of one project has no rights in another, beyond what is public.
    rows.push((
        "robot of the other project",
        robot("priv", "pull-push-delete"),
        Some("PTC"),
        None,
    ));
    rows.push((
        "robot of the other project",
        robot("pub", "pull-push-delete"),
        None,
        Some(""),
    ));

    let mut failures = Vec::new();
    for (round, (label, who, public, private)) in rows.iter().enumerate() {
        for (project, allowed) in [("pub", public), ("priv", private)] {
            let Some(allowed) = allowed else {
                continue;
            };
            for op in OPERATIONS.chars() {
                let got = attempt(&reg, who, project, op, round);
                let want = allowed.contains(op);
                if got != want {
                    failures.push(format!(
                        "{label} {} on {project}: expected {}, got {}",
                        op_name(op),
                        allow(want),
                        allow(got)
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "permission matrix mismatches:\n{}",
        failures.join("\n")
    );
}

fn allow(b: bool) -> &'static str {
    if b {
        "allow"
    } else {
        "deny"
    }
}

#[test]
fn cross_project_mount_needs_pull_on_the_source() {
    let reg = crate::start_with_auth(settings());
    let admin = Who::admin();
    use Method as M;
    use StatusCode as S;
    add_user(&reg, "mallory", "mallory-password");
    let mallory = Who::user("mallory", "mallory-password");
    let secret = b"a private layer".to_vec();
    assert_eq!(
        push_blob_as(&reg, &admin, "secret/app", &secret).status(),
        S::CREATED
    );
    // Mallory owns her own project (created by pushing to it) but may not read `secret`.
    push_image_as(&reg, &mallory, "mallory/app", "v1", b"mallory's layer");
    for from in ["&from=secret/app", ""] {
        let r = mallory
            .request(
                &http(),
                M::POST,
                &format!(
                    "{}/v2/mallory/app/blobs/uploads/?mount={}{from}",
                    reg.url(),
                    sha256(&secret)
                ),
            )
            .send()
            .unwrap();
        assert_eq!(
            r.status(),
            S::ACCEPTED,
            "no mount {from:?}: an upload session instead"
        );
    }
    let r = mallory
        .request(
            &http(),
            M::GET,
            &format!("{}/v2/mallory/app/blobs/{}", reg.url(), sha256(&secret)),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), S::NOT_FOUND, "the private blob did not leak");
    // With pull on the source, the same mount works.
    expect_api(
        &reg,
        &admin,
        M::POST,
        "/projects/secret/members",
        Some(json!({"user": "mallory", "role": "guest"})),
        S::CREATED,
    );
    let r = mallory
        .request(
            &http(),
            M::POST,
            &format!(
                "{}/v2/mallory/app/blobs/uploads/?mount={}&from=secret/app",
                reg.url(),
                sha256(&secret)
            ),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), S::CREATED);
}

/// Fetches a token from the registry's token endpoint.
pub(crate) fn fetch_token(reg: &TestRegistry, who: &Who, scopes: &[&str], offline: bool) -> Value {
    let mut url = format!("{}/token?service=berth", reg.url());
    for s in scopes {
        url.push_str(&format!("&scope={s}"));
    }
    if offline {
        url.push_str("&offline_token=true&client_id=tests");
    }
    let r = who.request(&http(), Method::GET, &url).send().unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "token: {}",
        r.text().unwrap_or_default()
    );
    r.json().unwrap()
}

/// Pushes are not access changes (the node keeps its access decisions while clients push),
/// but a membership change during a stream of pushes still ends them on the next request.
#[test]
fn a_member_pushing_is_stopped_at_once_by_leaving_the_project() {
    let reg = crate::start_with_auth(settings());
    let admin = Who::admin();
    use Method as M;
    use StatusCode as S;
    add_user(&reg, "carol", "carol-password");
    add_project(&reg, "team", false);
    let membership = json!({"user": "carol", "role": "developer"});
    let add = Some(membership);
    expect_api(
        &reg,
        &admin,
        M::POST,
        "/projects/team/members",
        add,
        S::CREATED,
    );
    let carol = Who::user("carol", "carol-password");
    let token = fetch_token(&reg, &carol, &["repository:team/app:pull,push"], false)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let push = |n: usize| {
        let layer = format!("layer {n}");
        http()
            .post(format!(
                "{}/v2/team/app/blobs/uploads/?digest={}",
                reg.url(),
                sha256(layer.as_bytes())
            ))
            .bearer_auth(&token)
            .header("content-type", "application/octet-stream")
            .body(layer)
            .send()
            .unwrap()
            .status()
    };
    // Every push is a change to the store, none to what carol may do.
    for n in 0..20 {
        assert_eq!(push(n), S::CREATED, "push {n}");
    }
    expect_api(
        &reg,
        &admin,
        M::DELETE,
        "/projects/team/members/carol",
        None,
        S::NO_CONTENT,
    );
    for n in 20..40 {
        assert_eq!(push(n), S::FORBIDDEN, "push {n} after leaving the project");
    }
}

fn with_token(method: Method, url: &str, token: &str) -> Response {
    http()
        .request(method, url)
        .bearer_auth(token)
        .send()
        .unwrap()
}

/// A refused request: 401 with a Bearer challenge and the spec's error body.
fn assert_unauthorized(r: Response, why: &str) {
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{why}");
    let challenge = header(&r, "www-authenticate");
    assert!(
        challenge.starts_with("Bearer realm=\"http"),
        "{why}: {challenge}"
    );
    assert!(
        challenge.contains("service=\"berth\""),
        "{why}: {challenge}"
    );
    let body: Value = r.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED", "{why}");
}

/// A valid token without the scope: 403 (RFC 6750 §3.1) with a challenge naming the scope
/// to ask for, so that clients fetch a new token.
fn assert_insufficient_scope(r: Response, why: &str) {
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "{why}");
    let challenge = header(&r, "www-authenticate");
    assert!(
        challenge.starts_with("Bearer realm=\"http"),
        "{why}: {challenge}"
    );
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{why}: {challenge}"
    );
    assert!(
        challenge.contains("scope=\"repository:"),
        "{why}: {challenge}"
    );
    let body: Value = r.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED", "{why}");
}

#[test]
fn builtin_tokens_grant_what_was_asked_and_allowed_and_die_with_their_user() {
    let reg = crate::start_with_auth(settings());
    let admin = Who::admin();
    use Method as M;
    use StatusCode as S;
    add_user(&reg, "bob", "bob-password");
    add_project(&reg, "team", false);
    add_project(&reg, "closed", false);
    expect_api(
        &reg,
        &admin,
        M::POST,
        "/projects/team/members",
        Some(json!({"user": "bob", "role": "developer"})),
        S::CREATED,
    );
    push_image_as(&reg, &admin, "team/app", "v1", b"layer");
    let bob = Who::user("bob", "bob-password");
    let manifest_url = format!("{}/v2/team/app/manifests/v1", reg.url());

    // The challenge names the realm, service and scope a client must ask for.
    let r = http().get(&manifest_url).send().unwrap();
    let challenge = header(&r, "www-authenticate");
    assert!(
        challenge.contains("scope=\"repository:team/app:pull\""),
        "{challenge}"
    );
    assert_unauthorized(r, "anonymous on a private project");

    // Bob asks for pull, push and delete: a developer gets pull and push only.
    let t = fetch_token(
        &reg,
        &bob,
        &[
            "repository:team/app:pull,push,delete",
            "repository:closed/x:pull",
        ],
        true,
    );
    let token = t["token"].as_str().unwrap().to_owned();
    assert_eq!(t["access_token"], t["token"]);
    assert_eq!(t["expires_in"], 300);
    assert!(t["issued_at"].as_str().unwrap().ends_with('Z'));
    let claims = jwt_claims(&token);
    assert_eq!(
        claims["access"],
        json!([{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}])
    );
    assert_eq!(claims["aud"], "berth");
    assert_eq!(claims["sub"], "bob");
    assert_eq!(with_token(M::GET, &manifest_url, &token).status(), S::OK);
    assert_eq!(
        with_token(M::GET, &format!("{}/v2/", reg.url()), &token).status(),
        S::OK
    );

    // Wrong scope: the token is for team/app, not team/other (bob could get one: 403
    // with insufficient_scope so the client asks again) ...
    let r = with_token(
        M::GET,
        &format!("{}/v2/team/other/tags/list", reg.url()),
        &token,
    );
    assert_insufficient_scope(r, "token for another repository");
    // ... and a token without push cannot push even though bob may.
    let pull_only = fetch_token(&reg, &bob, &["repository:team/app:pull"], false)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = with_token(
        M::POST,
        &format!("{}/v2/team/app/blobs/uploads/", reg.url()),
        &pull_only,
    );
    assert_insufficient_scope(r, "pull token used to push");
    // What bob may never do is 403, whatever token he holds.
    let r = with_token(
        M::DELETE,
        &format!("{}/v2/team/app/manifests/v1", reg.url()),
        &token,
    );
    assert_eq!(r.status(), S::FORBIDDEN);
    assert_eq!(r.json::<Value>().unwrap()["errors"][0]["code"], "DENIED");

    // The refresh token (docker's identity token) yields new access tokens by POST.
    let refresh = t["refresh_token"].as_str().unwrap().to_owned();
    let form = format!("grant_type=refresh_token&service=berth&client_id=tests&scope=repository%3Ateam%2Fapp%3Apull&refresh_token={refresh}");
    let r = http()
        .post(format!("{}/token", reg.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), S::OK);
    let refreshed: Value = r.json().unwrap();
    assert_eq!(refreshed["scope"], "repository:team/app:pull");
    assert_eq!(
        with_token(
            M::GET,
            &manifest_url,
            refreshed["access_token"].as_str().unwrap()
        )
        .status(),
        S::OK
    );
    // A refresh token is not an access token, nor the reverse.
    assert_unauthorized(
        with_token(M::GET, &manifest_url, &refresh),
        "refresh token used as access token",
    );
    let r = http()
        .post(format!("{}/token", reg.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=refresh_token&service=berth&refresh_token={token}"
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), S::UNAUTHORIZED);
    // The OAuth2 password grant.
    let r = http()
        .post(format!("{}/token", reg.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=password&service=berth&client_id=tests&username=bob&password=bob-password&scope=repository:team/app:pull")
        .send()
        .unwrap();
    assert_eq!(r.status(), S::OK);
    // Another service's name is refused outright.
    let r = bob
        .request(
            &http(),
            M::GET,
            &format!("{}/token?service=other", reg.url()),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), S::BAD_REQUEST);

    // A password change revokes every token of the user at once.
    expect_api(
        &reg,
        &admin,
        M::PUT,
        "/users/bob",
        Some(json!({"password": "bob-password-2"})),
        S::OK,
    );
    assert_unauthorized(
        with_token(M::GET, &manifest_url, &token),
        "token after a password change",
    );
    let bob = Who::user("bob", "bob-password-2");
    let token = fetch_token(&reg, &bob, &["repository:team/app:pull"], false)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(with_token(M::GET, &manifest_url, &token).status(), S::OK);
    // Leaving the project takes effect on the very next request, on every connection,
    // however often the token was just used (each server thread keeps what it decided).
    for _ in 0..20 {
        assert_eq!(with_token(M::GET, &manifest_url, &token).status(), S::OK);
    }
    expect_api(
        &reg,
        &admin,
        M::DELETE,
        "/projects/team/members/bob",
        None,
        S::NO_CONTENT,
    );
    for _ in 0..20 {
        assert_eq!(
            with_token(M::GET, &manifest_url, &token).status(),
            S::FORBIDDEN,
            "token of a user who left the project"
        );
    }
    expect_api(
        &reg,
        &admin,
        M::POST,
        "/projects/team/members",
        Some(json!({"user": "bob", "role": "developer"})),
        S::CREATED,
    );
    assert_eq!(with_token(M::GET, &manifest_url, &token).status(), S::OK);
    // Replay after the user is removed: refused, and so is the refresh token.
    expect_api(&reg, &admin, M::DELETE, "/users/bob", None, S::NO_CONTENT);
    assert_unauthorized(
        with_token(M::GET, &manifest_url, &token),
        "token of a removed user",
    );
    let r = http()
        .post(format!("{}/token", reg.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), S::UNAUTHORIZED);
    let r = bob
        .request(
            &http(),
            M::GET,
            &format!("{}/token?service=berth", reg.url()),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), S::UNAUTHORIZED);
    let body: Value = r.json().unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAUTHORIZED");

    // Anonymous tokens grant public pulls only.
    expect_api(
        &reg,
        &admin,
        M::PUT,
        "/projects/team",
        Some(json!({"public": true})),
        S::OK,
    );
    let t = fetch_token(
        &reg,
        &Who::anonymous(),
        &["repository:team/app:pull,push"],
        true,
    );
    assert!(
        t.get("refresh_token").is_none(),
        "no refresh token for anonymous"
    );
    assert_eq!(
        jwt_claims(t["token"].as_str().unwrap())["access"][0]["actions"],
        json!(["pull"])
    );
    assert_eq!(
        with_token(M::GET, &manifest_url, t["token"].as_str().unwrap()).status(),
        S::OK
    );
}

/// The claims of a JWT, without checking it.
pub(crate) fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn external_issuer_tokens_are_checked_strictly() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use berth_auth::token::{Claims, ResourceAccess};
    use berth_auth::TokenSigner;

    let issuer = TokenSigner::generate().unwrap();
    let auth = AuthSettings {
        issuer: "corp-auth".into(),
        service: "berth".into(),
        realm: Some("https://auth.example.test/token".into()),
        ..settings()
    };
    let reg = crate::start_trusting(auth, issuer.verifying_key().into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = |actions: &[&str]| Claims {
        iss: "corp-auth".into(),
        sub: "ci".into(),
        aud: vec!["berth".into()],
        exp: now + 300,
        nbf: now - 5,
        iat: now - 5,
        jti: "t1".into(),
        access: vec![ResourceAccess {
            kind: "repository".into(),
            name: "corp/app".into(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }],
        berth: None,
        typ: None,
    };
    let good = issuer.sign(&claims(&["pull", "push"])).unwrap();
    // The token is all the access there is: push and pull with it.
    let layer = b"external layer".to_vec();
    let r = http()
        .post(format!(
            "{}/v2/corp/app/blobs/uploads/?digest={}",
            reg.url(),
            sha256(&layer)
        ))
        .bearer_auth(&good)
        .body(layer.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let blob_url = format!("{}/v2/corp/app/blobs/{}", reg.url(), sha256(&layer));
    assert_eq!(
        with_token(Method::GET, &blob_url, &good).status(),
        StatusCode::OK
    );
    let r = http().get(&blob_url).send().unwrap();
    assert!(header(&r, "www-authenticate")
        .starts_with("Bearer realm=\"https://auth.example.test/token\""));
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let mut expired = claims(&["pull"]);
    expired.exp = now - 60;
    let mut wrong_audience = claims(&["pull"]);
    wrong_audience.aud = vec!["another-registry".into()];
    let mut wrong_issuer = claims(&["pull"]);
    wrong_issuer.iss = "someone-else".into();
    let mut not_yet = claims(&["pull"]);
    not_yet.nbf = now + 3600;
    let forger = TokenSigner::generate().unwrap();
    let parts: Vec<&str> = good.split('.').collect();
    let mut escalated = claims(&["pull", "push", "delete"]);
    escalated.access[0].name = "corp/app".into();
    let escalated_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&escalated).unwrap());
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let hs_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let cases: Vec<(&str, String)> = vec![
        ("expired", issuer.sign(&expired).unwrap()),
        ("wrong audience", issuer.sign(&wrong_audience).unwrap()),
        ("wrong issuer", issuer.sign(&wrong_issuer).unwrap()),
        ("not yet valid", issuer.sign(&not_yet).unwrap()),
        (
            "forged signature",
            forger.sign(&claims(&["pull", "push", "delete"])).unwrap(),
        ),
        (
            "tampered claims",
            format!("{}.{}.{}", parts[0], escalated_payload, parts[2]),
        ),
        ("alg none", format!("{none_header}.{escalated_payload}.")),
        (
            "alg HS256",
            format!("{hs_header}.{escalated_payload}.{}", parts[2]),
        ),
        ("garbage", "not-a-token".into()),
    ];
    for (why, token) in cases {
        assert_unauthorized(with_token(Method::GET, &blob_url, &token), why);
        assert_unauthorized(with_token(Method::DELETE, &blob_url, &token), why);
    }
    // Wrong scope: a valid token without delete cannot delete, nor reach another repository.
    assert_insufficient_scope(
        with_token(Method::DELETE, &blob_url, &good),
        "token without delete",
    );
    assert_insufficient_scope(
        with_token(
            Method::GET,
            &format!("{}/v2/corp/other/tags/list", reg.url()),
            &good,
        ),
        "token for another repository",
    );
    // Basic credentials mean nothing to a resource server.
    let r = Who::admin()
        .request(&http(), Method::GET, &blob_url)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        with_token(Method::GET, &blob_url, &good).status(),
        StatusCode::OK,
        "still fine"
    );
}

/// Audit events as (actor, action, resource, result), oldest first.
fn audit_trail(reg: &TestRegistry) -> Vec<(String, String, String, String)> {
    let body = expect_api(
        reg,
        &Who::admin(),
        Method::GET,
        "/audit?limit=1000",
        None,
        StatusCode::OK,
    );
    let mut events: Vec<(String, String, String, String)> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_owned();
            (s("actor"), s("action"), s("resource"), s("result"))
        })
        .collect();
    events.reverse();
    events
}

#[test]
fn audit_log_records_a_scripted_sequence_in_order() {
    let reg = crate::start_with_auth(settings());
    let admin = Who::admin();
    use Method as M;
    use StatusCode as S;
    add_user(&reg, "carol", "carol-password");
    add_project(&reg, "audited", false);
    expect_api(
        &reg,
        &admin,
        M::POST,
        "/projects/audited/members",
        Some(json!({"user": "carol", "role": "developer"})),
        S::CREATED,
    );
    let carol = Who::user("carol", "carol-password");
    let digest = push_image_as(&reg, &carol, "audited/app", "v1", b"audited layer");
    let r = carol
        .request(
            &http(),
            M::GET,
            &format!("{}/v2/audited/app/manifests/v1", reg.url()),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), S::OK);
    let r = carol
        .request(
            &http(),
            M::DELETE,
            &format!("{}/v2/audited/app/manifests/{digest}", reg.url()),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), S::FORBIDDEN);
    let r = Who::user("carol", "wrong-password")
        .request(&http(), M::GET, &format!("{}/v2/", reg.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), S::UNAUTHORIZED);
    let robot = expect_api(
        &reg,
        &admin,
        M::POST,
        "/projects/audited/robots",
        Some(json!({"name": "ci", "permissions": ["pull"]})),
        S::CREATED,
    );
    let r = admin
        .request(
            &http(),
            M::DELETE,
            &format!("{}/v2/audited/app/manifests/v1", reg.url()),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), S::ACCEPTED);
    expect_api(
        &reg,
        &admin,
        M::DELETE,
        "/projects/audited/members/carol",
        None,
        S::NO_CONTENT,
    );
    expect_api(
        &reg,
        &admin,
        M::DELETE,
        "/projects/audited/robots/ci",
        None,
        S::NO_CONTENT,
    );
    assert!(robot["secret"].as_str().unwrap().len() >= 32);

    let denied_delete = format!("audited/app@{digest}");
    let expected: Vec<(&str, &str, &str, &str)> = vec![
        ("admin", "user.create", "carol", "success"),
        ("admin", "project.create", "audited", "success"),
        ("admin", "member.add", "audited", "success"),
        ("carol", "login", "carol", "success"),
        ("carol", "push", "audited/app:v1", "success"),
        ("carol", "pull", "audited/app:v1", "success"),
        ("carol", "delete", &denied_delete, "denied"),
        ("carol", "login", "carol", "failed"),
        ("admin", "robot.create", "audited", "success"),
        ("admin", "delete", "audited/app:v1", "success"),
        ("admin", "member.remove", "audited", "success"),
        ("admin", "robot.delete", "audited", "success"),
    ];
    let mut trail = Vec::new();
    let complete = wait_until(Duration::from_secs(10), || {
        trail = audit_trail(&reg);
        trail.iter().any(|e| e.1 == "robot.delete")
    });
    assert!(complete, "the audit log caught up: {trail:?}");
    // The expected events appear in this order (other events, such as the admin's own
    // login, may come between them).
    let mut at = 0;
    for want in &expected {
        let found = trail[at..]
            .iter()
            .position(|e| (e.0.as_str(), e.1.as_str(), e.2.as_str(), e.3.as_str()) == *want);
        match found {
            Some(i) => at += i + 1,
            None => panic!("{want:?} missing (or out of order) in the audit log:\n{trail:#?}"),
        }
    }
    // Filters and paging.
    let body = expect_api(
        &reg,
        &admin,
        M::GET,
        "/audit?actor=carol&result=denied",
        None,
        S::OK,
    );
    assert_eq!(body["events"].as_array().unwrap().len(), 1);
    assert_eq!(body["events"][0]["address"], "127.0.0.1");
    let page = expect_api(&reg, &admin, M::GET, "/audit?limit=2", None, S::OK);
    let next = page["next_before"].as_i64().unwrap();
    let rest = expect_api(
        &reg,
        &admin,
        M::GET,
        &format!("/audit?limit=1000&before={next}"),
        None,
        S::OK,
    );
    assert_eq!(rest["events"].as_array().unwrap().len() + 2, trail.len());
    // Only system administrators read it.
    let r = api(
        &reg,
        &Who::user("carol", "carol-password"),
        M::GET,
        "/audit",
        None,
    );
    assert_eq!(r.0, S::FORBIDDEN);
}

/// A client whose connections come from `address` (any of 127.0.0.0/8).
fn client_from(address: &str) -> Client {
    Client::builder()
        .local_address(address.parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
}

#[test]
fn repeated_failed_logins_lock_the_guessing_address_never_the_user() {
    let reg = crate::start_with_auth(AuthSettings {
        max_login_failures: 3,
        login_failure_window: Duration::from_secs(300),
        ..AuthSettings::default()
    });
    use Method as M;
    use StatusCode as S;
    for name in ["dave", "erin"] {
        expect_api(
            &reg,
            &Who::admin(),
            M::POST,
            "/users",
            Some(json!({"name": name, "password": format!("{name}-password")})),
            S::CREATED,
        );
    }
    let base = format!("{}/v2/", reg.url());
    let login = |from: &str, name: &str, password: &str| {
        Who::user(name, password)
            .request(&client_from(from), M::GET, &base)
            .send()
            .unwrap()
    };
    for _ in 0..3 {
        assert_eq!(
            login("127.0.0.2", "dave", "guess").status(),
            S::UNAUTHORIZED
        );
    }
    // The guessing address may not try Dave again, even with his password ...
    let r = login("127.0.0.2", "dave", "dave-password");
    assert_eq!(r.status(), S::TOO_MANY_REQUESTS);
    assert!(header(&r, "retry-after").parse::<u64>().unwrap() > 0);
    assert_eq!(
        r.json::<Value>().unwrap()["errors"][0]["code"],
        "TOOMANYREQUESTS"
    );
    // ... nor through the token endpoint ...
    let r = Who::user("dave", "dave-password")
        .request(
            &client_from("127.0.0.2"),
            M::GET,
            &format!("{}/token?service=berth", reg.url()),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), S::TOO_MANY_REQUESTS);
    // ... but Dave, from his own machine, gets in: nobody can lock a user out.
    assert_eq!(login("127.0.0.3", "dave", "dave-password").status(), S::OK);
    // And the guesser may still log in as someone else, until it sprays names.
    assert_eq!(login("127.0.0.2", "erin", "erin-password").status(), S::OK);
    for i in 0..15 {
        login("127.0.0.5", &format!("nobody{i}"), "guess");
    }
    assert_eq!(
        login("127.0.0.5", "erin", "erin-password").status(),
        S::TOO_MANY_REQUESTS,
        "an address spraying names is locked for all of them"
    );
    // Twenty more refusals from the guesser: recorded as one count, not twenty rows.
    for _ in 0..20 {
        assert_eq!(
            login("127.0.0.2", "dave", "guess").status(),
            S::TOO_MANY_REQUESTS
        );
    }

    let mut trail = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        trail = audit_trail(&reg);
        trail
            .iter()
            .any(|e| e.0 == "erin" && e.1 == "login" && e.3 == "denied")
    }));
    let failed = trail
        .iter()
        .filter(|e| e.0 == "dave" && e.1 == "login" && e.3 == "failed")
        .count();
    assert_eq!(failed, 3, "{trail:#?}");
    let refused_dave = trail
        .iter()
        .filter(|e| e.0 == "dave" && e.1 == "login" && e.3 == "denied")
        .count();
    assert_eq!(
        refused_dave, 1,
        "refusals from one address are counted, not each recorded: {trail:#?}"
    );
}

#[test]
fn pull_auditing_can_be_switched_off_but_refusals_are_always_recorded() {
    let reg = crate::start_with_auth(AuthSettings {
        audit_pulls: false,
        ..settings()
    });
    let admin = Who::admin();
    use Method as M;
    use StatusCode as S;
    add_user(&reg, "fay", "fay-password");
    push_image_as(&reg, &admin, "quiet/app", "v1", b"quiet layer");
    let url = format!("{}/v2/quiet/app/manifests/v1", reg.url());
    assert_eq!(
        admin
            .request(&http(), M::GET, &url)
            .send()
            .unwrap()
            .status(),
        S::OK
    );
    let fay = Who::user("fay", "fay-password");
    assert_eq!(
        fay.request(&http(), M::GET, &url).send().unwrap().status(),
        S::FORBIDDEN
    );
    let mut trail = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        trail = audit_trail(&reg);
        trail.iter().any(|e| e.1 == "pull")
    }));
    let pulls: Vec<_> = trail.iter().filter(|e| e.1 == "pull").collect();
    assert_eq!(pulls.len(), 1, "only the refused pull: {trail:#?}");
    assert_eq!(pulls[0].0, "fay");
    assert_eq!(pulls[0].3, "denied");
    assert!(
        trail.iter().any(|e| e.1 == "push" && e.3 == "success"),
        "pushes are always audited"
    );
}

/// Pulls hammered by one client are written a few to a row under load, and each is
/// counted: the sum of the pull records' counts is the number of pulls.
#[test]
fn a_flood_of_identical_pulls_is_counted_pull_for_pull() {
    let reg = crate::start_with_auth(settings());
    let admin = Who::admin();
    push_image_as(&reg, &admin, "flood/app", "v1", b"flood layer");
    let url = format!("{}/v2/flood/app/manifests/v1", reg.url());
    let (threads, each) = (8, 100);
    flood(threads, each, |client| {
        let r = admin.request(client, Method::GET, &url).send().unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    });
    let (pulls, counted) = counted_in_audit(&reg, "pull");
    assert_eq!(counted, threads * each, "{pulls:#?}");
    assert!(pulls.iter().all(|e| e["resource"] == "flood/app:v1"));
}

/// A client hammering the registry with a forged bearer token is refused every time,
/// and every refusal is in the audit log, counted into a few rows.
#[test]
fn a_flood_of_forged_tokens_is_refused_and_counted() {
    let reg = crate::start_with_auth(settings());
    let url = format!("{}/v2/", reg.url());
    let (threads, each) = (4, 50);
    flood(threads, each, |client| {
        let r = client
            .get(&url)
            .header("authorization", "Bearer forged.token.here")
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    });
    let (refusals, counted) = counted_in_audit(&reg, "token");
    assert_eq!(counted, threads * each, "{refusals:#?}");
    assert!(refusals
        .iter()
        .all(|e| e["result"] == "failed" && e["actor"] == "anonymous"));
}

/// Runs `request` `each` times on each of `threads` threads at once, a client each.
fn flood(threads: u64, each: u64, request: impl Fn(&Client) + Sync) {
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let client = http();
                for _ in 0..each {
                    request(&client);
                }
            });
        }
    });
}

/// The audit log's records of `action` (the listing waits for what was queued before
/// it), and how many operations they count together.
fn counted_in_audit(reg: &TestRegistry, action: &str) -> (Vec<Value>, u64) {
    let body = expect_api(
        reg,
        &Who::admin(),
        Method::GET,
        &format!("/audit?action={action}&limit=1000"),
        None,
        StatusCode::OK,
    );
    let records = body["events"].as_array().unwrap().clone();
    let counted = records.iter().map(|e| e["count"].as_u64().unwrap()).sum();
    (records, counted)
}

#[test]
fn the_token_endpoint_refuses_malformed_requests() {
    let reg = crate::start_with_auth(settings());
    let token_url = format!("{}/token", reg.url());
    let form = |body: String| {
        http()
            .post(&token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .unwrap()
    };
    let r = form("grant_type=client_credentials&service=berth".into());
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().unwrap()["errors"][0]["code"],
        "BAD_REQUEST"
    );
    assert_eq!(
        form("service=berth".into()).status(),
        StatusCode::BAD_REQUEST,
        "no grant_type"
    );
    let huge = format!(
        "grant_type=password&username=admin&password={}",
        "x".repeat(100_000)
    );
    assert_eq!(
        form(huge).status(),
        StatusCode::BAD_REQUEST,
        "forms are capped"
    );
    let r = form("grant_type=password&service=berth&username=admin&password=wrong".into());
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http().put(&token_url).send().unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    // Malformed Basic credentials are wrong credentials, not anonymous ones.
    let r = http()
        .get(format!("{token_url}?service=berth"))
        .header("authorization", "Basic !!!not-base64")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Scopes the caller may not have are left out of the token, not refused.
    let t = fetch_token(
        &reg,
        &Who::anonymous(),
        &["repository:nope/x:push", "nonsense"],
        false,
    );
    assert_eq!(
        jwt_claims(t["token"].as_str().unwrap())["access"],
        json!([])
    );
}

/// A failed login records the name it claimed, which is whatever the client sent: the
/// audit log keeps a bounded part of it, and serves it escaped, never as raw control
/// characters.
#[test]
fn a_hostile_login_name_is_kept_bounded_and_served_escaped() {
    let reg = crate::start_with_auth(settings());
    let name = format!("\u{1b}]0;owned\u{7}{}", "a".repeat(20_000));
    let r = http()
        .get(format!("{}/v2/", reg.url()))
        .basic_auth(&name, Some("wrong"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let mut raw = String::new();
    let recorded = wait_until(Duration::from_secs(10), || {
        let r = Who::admin()
            .request(
                &http(),
                Method::GET,
                &format!("{}/api/v1/audit?action=login&result=failed", reg.url()),
            )
            .send()
            .unwrap();
        raw = r.text().unwrap();
        raw.contains("owned")
    });
    assert!(recorded, "the failed login is in the audit log: {raw}");
    assert!(
        !raw.contains('\u{1b}') && !raw.contains('\u{7}'),
        "no raw control characters"
    );
    let body: Value = serde_json::from_str(&raw).unwrap();
    let actor = body["events"][0]["actor"].as_str().unwrap();
    assert!(actor.starts_with("\u{1b}]0;owned\u{7}aaa"), "{actor:?}");
    assert!(actor.len() <= 256, "{}", actor.len());
}
