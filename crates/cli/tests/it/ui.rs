//! The web UI over HTTP: pages render what was pushed, escaped, under a strict
//! Content-Security-Policy; sign-in goes through the login checks and makes a session
//! that sign-out revokes; forms without the CSRF value are refused; callers see what
//! their role allows. (A real browser drives the same pages in `browser.rs`.)

use berth_auth::AuthSettings;
use reqwest::blocking::{Client, Response};
use reqwest::StatusCode;
use serde_json::json;

use crate::auth::{push_image_as, Who};
use crate::*;

/// A client that keeps the cookies it is given (as a browser does, for one site) and does
/// not follow redirects.
struct Browser {
    http: Client,
    cookies: std::cell::RefCell<std::collections::BTreeMap<String, String>>,
}

fn browser() -> Browser {
    Browser {
        http: http(),
        cookies: Default::default(),
    }
}

impl Browser {
    fn keep(&self, r: &Response) {
        for value in r.headers().get_all("set-cookie") {
            let pair = value.to_str().unwrap().split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            let mut cookies = self.cookies.borrow_mut();
            if value.is_empty() {
                cookies.remove(name);
            } else {
                cookies.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    fn cookie_header(&self) -> String {
        let cookies = self.cookies.borrow();
        cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn get(&self, url: String) -> Response {
        let r = self
            .http
            .get(url)
            .header("cookie", self.cookie_header())
            .send()
            .unwrap();
        self.keep(&r);
        r
    }

    fn post(&self, url: String, form: &[(&str, &str)]) -> Response {
        let r = self
            .http
            .post(url)
            .header("cookie", self.cookie_header())
            .form(form)
            .send()
            .unwrap();
        self.keep(&r);
        r
    }
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    page[at..].split('"').next().unwrap().to_owned()
}

fn assert_secure_headers(r: &Response) {
    let csp = header(r, "content-security-policy");
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    assert_eq!(header(r, "x-content-type-options"), "nosniff");
    assert_eq!(header(r, "x-frame-options"), "DENY");
}

#[test]
fn pages_show_pushed_content_escaped_under_a_strict_policy() {
    let reg = start();
    let base = reg.url();
    let (digest, _) = push_image(&base, "team/app", "v1", &[b"a layer"]);
    // A manifest whose annotation tries to inject markup.
    let config = push_blob(&base, "team/app", br#"{"architecture":"amd64","os":"linux","config":{"Env":["X=<img src=x onerror=alert(1)>"]}}"#);
    let hostile = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 83},
        "layers": [],
        "annotations": {"note": "<script>alert(1)</script>"},
    }))
    .unwrap();
    let r = put_manifest(
        &base,
        "team/app",
        "<x>",
        "application/vnd.oci.image.manifest.v1+json",
        &hostile,
    );
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "not a tag");
    let r = put_manifest(
        &base,
        "team/app",
        "evil",
        "application/vnd.oci.image.manifest.v1+json",
        &hostile,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let evil = sha256(&hostile);

    let web = browser();
    // Open registry: the dashboard at once.
    let r = web.get(format!("{base}/"));
    assert_eq!(r.status(), StatusCode::OK);
    assert_secure_headers(&r);
    let stylesheet = {
        let text = r.text().unwrap();
        assert!(text.contains("href=\"/ui/projects/team\""), "{text}");
        let at = text.find("/ui/assets/app.").unwrap();
        text[at..].split('"').next().unwrap().to_owned()
    };
    let r = web.get(format!("{base}{stylesheet}"));
    assert_eq!(r.status(), StatusCode::OK);
    assert!(header(&r, "cache-control").contains("immutable"));
    assert_eq!(
        web.get(format!("{base}/ui/assets/app.000000000000.css"))
            .status(),
        StatusCode::NOT_FOUND
    );

    let project = web.get(format!("{base}/ui/projects/team")).text().unwrap();
    assert!(
        project.contains("href=\"/ui/repositories/team/app\""),
        "{project}"
    );
    let repository = web
        .get(format!("{base}/ui/repositories/team/app"))
        .text()
        .unwrap();
    assert!(repository.contains(&digest[..19]), "{repository}");
    assert!(
        repository.contains("/team/app:"),
        "pull commands: {repository}"
    );
    let artifact = web
        .get(format!(
            "{base}/ui/artifact?repository=team%2Fapp&digest={evil}"
        ))
        .text()
        .unwrap();
    assert!(
        !artifact.contains("<script>") && !artifact.contains("<img src=x"),
        "{artifact}"
    );
    assert!(
        artifact.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{artifact}"
    );
    assert!(
        artifact.contains("X=&lt;img src=x onerror=alert(1)&gt;"),
        "{artifact}"
    );
    // The exact bytes, as pushed.
    let raw = web.get(format!(
        "{base}/ui/artifact/raw?repository=team%2Fapp&digest={evil}"
    ));
    assert_eq!(raw.bytes().unwrap().as_ref(), hostile.as_slice());
    // Path tricks and junk answer errors, as pages.
    for (path, status) in [
        (
            "/ui/repositories/team/..%2F..%2Fetc",
            StatusCode::BAD_REQUEST,
        ),
        ("/ui/repositories/team/../../etc", StatusCode::NOT_FOUND), // normalised by the client
        ("/ui/repositories/team/ghost", StatusCode::NOT_FOUND),
        (
            "/ui/artifact?repository=team%2Fapp&digest=sha256:nothex",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ui/artifact?repository=team%2Fapp",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let r = web.get(format!("{base}{path}"));
        assert_eq!(r.status(), status, "{path}");
        assert_secure_headers(&r);
    }
}

#[test]
fn sign_in_makes_a_session_that_sign_out_revokes_and_roles_limit_what_shows() {
    let reg = start_with_auth(AuthSettings::default());
    let base = reg.url();
    let admin = Who::admin();
    push_image_as(&reg, &admin, "secret/app", "v1", b"private layer");
    let web = browser();
    // Nothing public: the sign-in page.
    let r = web.get(format!("{base}/"));
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(header(&r, "location"), "/ui/sign-in");
    let r = web.get(format!("{base}/ui/projects/secret"));
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(!r.text().unwrap().contains("secret/app"));

    let form = web.get(format!("{base}/ui/sign-in")).text().unwrap();
    let csrf = csrf_of(&form);
    // A form without the CSRF value (another site posting) is refused.
    let r = web.post(
        format!("{base}/ui/sign-in"),
        &[
            ("user", "admin"),
            ("password", berth_testkit::ADMIN_PASSWORD),
        ],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = web.post(
        format!("{base}/ui/sign-in"),
        &[
            ("csrf", csrf.as_str()),
            ("user", "admin"),
            ("password", "wrong"),
        ],
    );
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().unwrap().contains("Wrong user or password"));
    let r = web.post(
        format!("{base}/ui/sign-in"),
        &[
            ("csrf", csrf.as_str()),
            ("user", "admin"),
            ("password", berth_testkit::ADMIN_PASSWORD),
        ],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let session = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("berth_session="))
        .expect("a session cookie");
    assert!(
        session.contains("HttpOnly") && session.contains("SameSite=Strict"),
        "{session}"
    );
    let home = web.get(format!("{base}/")).text().unwrap();
    assert!(
        home.contains("href=\"/ui/projects/secret\"") && home.contains("admin"),
        "{home}"
    );
    // The session is one of the user's logins, listed with the others.
    let tokens: serde_json::Value = admin
        .request(
            &http(),
            reqwest::Method::GET,
            &format!("{base}/api/v1/users/admin/tokens"),
        )
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(tokens.to_string().contains("berth-ui"), "{tokens}");

    // Signing out revokes it: the cookie copied before is worth nothing after.
    let stolen = session.split(';').next().unwrap().to_owned();
    let csrf = csrf_of(&home);
    let r = web.post(format!("{base}/ui/sign-out"), &[("csrf", csrf.as_str())]);
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = http()
        .get(format!("{base}/ui/projects/secret"))
        .header("cookie", stolen.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A change without a session is refused before its body is read.
    let r = http()
        .post(format!("{base}/ui/repositories/secret/app"))
        .header("cookie", stolen)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("action=delete-repository&csrf=x")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // A user who is no member of the project sees nothing of it.
    let r = admin
        .request(
            &http(),
            reqwest::Method::POST,
            &format!("{base}/api/v1/users"),
        )
        .json(&json!({"name": "carol", "password": "carol-password"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let carol = browser();
    let form = carol.get(format!("{base}/ui/sign-in")).text().unwrap();
    let csrf = csrf_of(&form);
    let r = carol.post(
        format!("{base}/ui/sign-in"),
        &[
            ("csrf", csrf.as_str()),
            ("user", "carol"),
            ("password", "carol-password"),
        ],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let home = carol.get(format!("{base}/")).text().unwrap();
    assert!(!home.contains("secret"), "{home}");
    let r = carol.get(format!("{base}/ui/repositories/secret/app"));
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

/// Signs `user` in on a fresh browser.
fn signed_in(base: &str, user: &str, password: &str) -> Browser {
    let web = browser();
    let form = web.get(format!("{base}/ui/sign-in")).text().unwrap();
    let csrf = csrf_of(&form);
    let r = web.post(
        format!("{base}/ui/sign-in"),
        &[
            ("csrf", csrf.as_str()),
            ("user", user),
            ("password", password),
        ],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "{user} signs in");
    web
}

#[test]
fn robots_tag_deletion_and_collection_follow_the_roles() {
    let reg = start_with_auth(AuthSettings::default());
    let base = reg.url();
    let admin = Who::admin();
    push_image_as(&reg, &admin, "team/app", "v1", b"one");
    push_image_as(&reg, &admin, "team/app", "v2", b"two");
    for (user, role) in [("mia", "maintainer"), ("gus", "guest")] {
        let r = admin
            .request(
                &http(),
                reqwest::Method::POST,
                &format!("{base}/api/v1/users"),
            )
            .json(&json!({"name": user, "password": format!("{user}-password")}))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = admin
            .request(
                &http(),
                reqwest::Method::POST,
                &format!("{base}/api/v1/projects/team/members"),
            )
            .json(&json!({"user": user, "role": role}))
            .send()
            .unwrap();
        assert!(r.status().is_success());
    }

    // A guest sees the tags but no delete buttons, and a forged deletion is refused.
    let gus = signed_in(&base, "gus", "gus-password");
    let page = gus
        .get(format!("{base}/ui/repositories/team/app"))
        .text()
        .unwrap();
    assert!(
        page.contains(">v1<") && !page.contains("Delete tag"),
        "{page}"
    );
    let csrf = csrf_of(&gus.get(format!("{base}/")).text().unwrap());
    let r = gus.post(
        format!("{base}/ui/repositories/team/app"),
        &[
            ("csrf", csrf.as_str()),
            ("action", "delete-tag"),
            ("tag", "v1"),
        ],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = gus.get(format!("{base}/ui/admin"));
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // A maintainer deletes a tag; without the CSRF value nothing happens.
    let mia = signed_in(&base, "mia", "mia-password");
    let page = mia
        .get(format!("{base}/ui/repositories/team/app"))
        .text()
        .unwrap();
    assert!(page.contains("Delete tag"), "{page}");
    let r = mia.post(
        format!("{base}/ui/repositories/team/app"),
        &[("action", "delete-tag"), ("tag", "v1")],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let csrf = csrf_of(&page);
    let r = mia.post(
        format!("{base}/ui/repositories/team/app"),
        &[
            ("csrf", csrf.as_str()),
            ("action", "delete-tag"),
            ("tag", "v1"),
        ],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let page = mia
        .get(format!("{base}/ui/repositories/team/app"))
        .text()
        .unwrap();
    assert!(!page.contains(">v1<") && page.contains(">v2<"), "{page}");
    // And a manifest by digest, from its page (a guest is offered no such form).
    let v2 = reg_digest(&base, &admin, "team/app", "v2");
    let artifact = format!("{base}/ui/artifact?repository=team%2Fapp&digest={v2}");
    assert!(!gus
        .get(artifact.clone())
        .text()
        .unwrap()
        .contains("Delete manifest"));
    let page = mia.get(artifact).text().unwrap();
    assert!(page.contains("Delete manifest"), "{page}");
    let r = mia.post(
        format!("{base}/ui/repositories/team/app"),
        &[
            ("csrf", csrf.as_str()),
            ("action", "delete-manifest"),
            ("digest", v2.as_str()),
        ],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let page = mia
        .get(format!("{base}/ui/repositories/team/app"))
        .text()
        .unwrap();
    assert!(!page.contains(">v2<"), "{page}");
    push_image_as(&reg, &admin, "team/app", "v2", b"two again");

    // The project's admin creates a robot: the secret shows once, and works.
    let web = signed_in(&base, "admin", berth_testkit::ADMIN_PASSWORD);
    let project = web.get(format!("{base}/ui/projects/team")).text().unwrap();
    assert!(
        project.contains("Create robot") && project.contains("mia"),
        "{project}"
    );
    let csrf = csrf_of(&project);
    let r = web.post(
        format!("{base}/ui/projects/team/robots"),
        &[
            ("csrf", csrf.as_str()),
            ("name", "ci"),
            ("permission", "pull"),
            ("permission", "push"),
            ("expires_in_days", "7"),
        ],
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let shown = r.text().unwrap();
    let at = shown.find("<pre class=\"secret\">").unwrap() + "<pre class=\"secret\">".len();
    let secret = shown[at..].split('<').next().unwrap().to_owned();
    let project = web.get(format!("{base}/ui/projects/team")).text().unwrap();
    assert!(
        project.contains("robot$team+ci") && !project.contains(&secret),
        "shown once"
    );
    let robot = Who::user("robot$team+ci", &secret);
    let r = robot
        .request(
            &http(),
            reqwest::Method::GET,
            &format!("{base}/v2/team/app/tags/list"),
        )
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the robot logs in with the secret shown"
    );
    // Its expiry changes from the page: 0 ends it at once, empty makes it last.
    let robot_status = || {
        robot
            .request(
                &http(),
                reqwest::Method::GET,
                &format!("{base}/v2/team/app/tags/list"),
            )
            .send()
            .unwrap()
            .status()
    };
    let expire = |days: &str| {
        web.post(
            format!("{base}/ui/projects/team/robots/ci/expiry"),
            &[("csrf", csrf.as_str()), ("expires_in_days", days)],
        )
        .status()
    };
    assert_eq!(expire("0"), StatusCode::SEE_OTHER);
    assert_eq!(robot_status(), StatusCode::UNAUTHORIZED, "expired at once");
    assert_eq!(expire(""), StatusCode::SEE_OTHER);
    assert_eq!(robot_status(), StatusCode::OK, "never expires now");
    assert!(web
        .get(format!("{base}/ui/projects/team"))
        .text()
        .unwrap()
        .contains("never"));
    assert_eq!(expire("99999"), StatusCode::BAD_REQUEST);
    assert_eq!(expire("-1"), StatusCode::BAD_REQUEST);
    // A maintainer may not manage robots: no form, and a forged post is refused.
    let page = mia.get(format!("{base}/ui/projects/team")).text().unwrap();
    assert!(!page.contains("Create robot"), "{page}");
    let csrf = csrf_of(&page);
    let r = mia.post(
        format!("{base}/ui/projects/team/robots"),
        &[
            ("csrf", csrf.as_str()),
            ("name", "sneaky"),
            ("permission", "pull"),
        ],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = mia.post(
        format!("{base}/ui/projects/team/robots/ci/expiry"),
        &[("csrf", csrf.as_str()), ("expires_in_days", "0")],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        robot_status(),
        StatusCode::OK,
        "a refused change changes nothing"
    );

    // Garbage collection: a dry run first, which removes nothing.
    let admin_page = web.get(format!("{base}/ui/admin")).text().unwrap();
    assert!(
        admin_page.contains("Dry run") && admin_page.contains("robot.create"),
        "{admin_page}"
    );
    let csrf = csrf_of(&admin_page);
    let r = web.post(
        format!("{base}/ui/admin/gc"),
        &[("csrf", csrf.as_str()), ("mode", "dry-run")],
    );
    assert_eq!(r.status(), StatusCode::OK);
    let report = r.text().unwrap();
    assert!(
        report.contains("what would go") && report.contains("Collect now"),
        "{report}"
    );
    let r = web.post(
        format!("{base}/ui/admin/gc"),
        &[("csrf", csrf.as_str()), ("mode", "run")],
    );
    assert!(r.text().unwrap().contains("Garbage collection done"));
    let home = web.get(format!("{base}/")).text().unwrap();
    assert!(home.contains("last garbage collection"), "{home}");
    let r = web.post(
        format!("{base}/ui/projects/team/robots/ci/delete"),
        &[("csrf", csrf.as_str())],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(!web
        .get(format!("{base}/ui/projects/team"))
        .text()
        .unwrap()
        .contains("robot$team+ci"));
}

#[test]
fn search_members_visibility_and_tag_filters_work_through_the_pages() {
    let reg = start_with_auth(AuthSettings::default());
    let base = reg.url();
    let admin = Who::admin();
    for tag in ["v1", "v2", "other"] {
        push_image_as(&reg, &admin, "secret/app", tag, tag.as_bytes());
    }
    let r = admin
        .request(
            &http(),
            reqwest::Method::POST,
            &format!("{base}/api/v1/users"),
        )
        .json(&json!({"name": "carol", "password": "carol-password"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let web = signed_in(&base, "admin", berth_testkit::ADMIN_PASSWORD);
    let carol = signed_in(&base, "carol", "carol-password");

    // The dashboard shows an administrator the recent pushes; a user's views of it are
    // not audited as refusals.
    let home = web.get(format!("{base}/")).text().unwrap();
    assert!(
        home.contains("Recent pushes") && home.contains("secret/app:v1"),
        "{home}"
    );
    let refusals = || {
        admin
            .request(
                &http(),
                reqwest::Method::GET,
                &format!("{base}/api/v1/audit?action=audit.list&limit=100"),
            )
            .send()
            .unwrap()
            .text()
            .unwrap()
            .matches("\"audit.list\"")
            .count()
    };
    let before = refusals();
    for _ in 0..3 {
        assert!(!carol
            .get(format!("{base}/"))
            .text()
            .unwrap()
            .contains("Recent pushes"));
    }
    assert_eq!(
        refusals(),
        before,
        "viewing the dashboard writes no audit events"
    );
    // Pushes to a public project are on carol's dashboard too, the private ones still not.
    push_image_as(&reg, &admin, "open/app", "o1", b"o1");
    let r = admin
        .request(
            &http(),
            reqwest::Method::PUT,
            &format!("{base}/api/v1/projects/open"),
        )
        .json(&json!({"public": true}))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let home = carol.get(format!("{base}/")).text().unwrap();
    assert!(
        home.contains("Recent pushes") && home.contains("open/app:o1"),
        "{home}"
    );
    assert!(!home.contains("secret/app"), "{home}");

    // Search: the administrator finds the private repository, carol does not.
    let found = web.get(format!("{base}/ui/search?q=app")).text().unwrap();
    assert!(
        found.contains("href=\"/ui/repositories/secret/app\""),
        "{found}"
    );
    let found = carol.get(format!("{base}/ui/search?q=app")).text().unwrap();
    assert!(!found.contains("secret/app"), "{found}");

    // The tag filter is a prefix over the tags' order.
    let filtered = web
        .get(format!("{base}/ui/repositories/secret/app?q=v"))
        .text()
        .unwrap();
    assert!(
        filtered.contains("<td>admin</td>"),
        "the pusher is shown: {filtered}"
    );
    assert!(
        filtered.contains(">v1<") && filtered.contains(">v2<") && !filtered.contains(">other<"),
        "{filtered}"
    );

    // Members: the project admin adds carol as a guest; she sees the project, then not.
    let project = web
        .get(format!("{base}/ui/projects/secret"))
        .text()
        .unwrap();
    let csrf = csrf_of(&project);
    let r = web.post(
        format!("{base}/ui/projects/secret/members"),
        &[
            ("csrf", csrf.as_str()),
            ("user", "carol"),
            ("role", "guest"),
        ],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        carol.get(format!("{base}/ui/projects/secret")).status(),
        StatusCode::OK
    );
    let r = web.post(
        format!("{base}/ui/projects/secret/members/carol/delete"),
        &[("csrf", csrf.as_str())],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        carol.get(format!("{base}/ui/projects/secret")).status(),
        StatusCode::FORBIDDEN
    );
    // An unknown role is refused, and carol may not make herself a member.
    let r = web.post(
        format!("{base}/ui/projects/secret/members"),
        &[
            ("csrf", csrf.as_str()),
            ("user", "carol"),
            ("role", "owner"),
        ],
    );
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let carol_csrf = csrf_of(&carol.get(format!("{base}/")).text().unwrap());
    let r = carol.post(
        format!("{base}/ui/projects/secret/members"),
        &[
            ("csrf", carol_csrf.as_str()),
            ("user", "carol"),
            ("role", "project_admin"),
        ],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Visibility: made public, anyone may browse it.
    let r = web.post(
        format!("{base}/ui/projects/secret/visibility"),
        &[("csrf", csrf.as_str()), ("public", "true")],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let anonymous = browser();
    let denials = || {
        admin
            .request(
                &http(),
                reqwest::Method::GET,
                &format!("{base}/api/v1/audit?limit=1000"),
            )
            .send()
            .unwrap()
            .text()
            .unwrap()
            .matches("\"denied\"")
            .count()
    };
    let before = denials();
    let r = anonymous.get(format!("{base}/ui/projects/secret"));
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().unwrap().contains("secret/app"));
    assert_eq!(denials(), before, "an anonymous view is no audited refusal");

    // The settings in effect, for administrators.
    let admin_page = web.get(format!("{base}/ui/admin")).text().unwrap();
    assert!(
        admin_page.contains("Settings in effect") && admin_page.contains("builtin"),
        "{admin_page}"
    );
}

/// The digest `reference` has in `repo`, asked as `who`.
fn reg_digest(base: &str, who: &Who, repo: &str, reference: &str) -> String {
    let r = who
        .request(
            &http(),
            reqwest::Method::HEAD,
            &format!("{base}/v2/{repo}/manifests/{reference}"),
        )
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap();
    header(&r, "docker-content-digest")
}

#[test]
fn administrators_create_and_delete_users_from_the_page() {
    let reg = start_with_auth(AuthSettings::default());
    let base = reg.url();
    let web = signed_in(&base, "admin", berth_testkit::ADMIN_PASSWORD);
    let admin_page = web.get(format!("{base}/ui/admin")).text().unwrap();
    let csrf = csrf_of(&admin_page);
    // A generated password, shown once; the new user signs in with it.
    let r = web.post(
        format!("{base}/ui/admin/users"),
        &[("csrf", csrf.as_str()), ("name", "dora")],
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let shown = r.text().unwrap();
    let at = shown.find("<pre class=\"secret\">").unwrap() + "<pre class=\"secret\">".len();
    let password = shown[at..].split('<').next().unwrap().to_owned();
    let dora = signed_in(&base, "dora", &password);
    assert!(
        !web.get(format!("{base}/ui/admin"))
            .text()
            .unwrap()
            .contains(&password),
        "shown once"
    );
    // A user who is no administrator may not create one.
    let dora_csrf = csrf_of(&dora.get(format!("{base}/")).text().unwrap());
    let r = dora.post(
        format!("{base}/ui/admin/users"),
        &[
            ("csrf", dora_csrf.as_str()),
            ("name", "mallory"),
            ("admin", "true"),
        ],
    );
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Deleted: her session stops working at once.
    let r = web.post(
        format!("{base}/ui/admin/users/dora/delete"),
        &[("csrf", csrf.as_str())],
    );
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let r = dora.get(format!("{base}/ui/search?q=x"));
    assert!(
        !r.text().unwrap().contains("dora"),
        "signed out with her account"
    );
    let r = web.post(
        format!("{base}/ui/admin/users"),
        &[("csrf", csrf.as_str()), ("name", "bad name!")],
    );
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn policies_show_to_their_managers_escaped() {
    let reg = start_with_auth(AuthSettings::default());
    let base = reg.url();
    let admin = Who::admin();
    push_image_as(&reg, &admin, "team/app", "v1", b"one");
    let call = |method: reqwest::Method, path: &str, body: serde_json::Value| {
        admin
            .request(&http(), method, &format!("{base}{path}"))
            .json(&body)
            .send()
            .unwrap()
            .status()
    };
    use reqwest::Method as M;
    let created = [
        call(
            M::POST,
            "/api/v1/users",
            json!({"name": "gus", "password": "gus-password"}),
        ),
        call(
            M::POST,
            "/api/v1/projects/team/members",
            json!({"user": "gus", "role": "maintainer"}),
        ),
        call(
            M::POST,
            "/api/v1/projects/team/webhooks",
            json!({"name": "ci", "url": "https://hooks.example.com/in?<b>x</b>", "events": ["push"], "secret": "s"}),
        ),
        call(
            M::POST,
            "/api/v1/webhooks",
            json!({"name": "all", "url": "https://audit.example.com/in", "events": ["delete"]}),
        ),
        call(
            M::POST,
            "/api/v1/registries",
            json!({"name": "far", "url": "https://registry.example", "username": "bot", "password": "pw"}),
        ),
        call(
            M::POST,
            "/api/v1/replication/policies",
            json!({"name": "out", "direction": "push", "registry": "far", "source": "team/**", "trigger": "cron:0 3 * * *"}),
        ),
    ];
    assert!(created.iter().all(|s| s.is_success()), "{created:?}");

    let web = signed_in(&base, "admin", berth_testkit::ADMIN_PASSWORD);
    let project = web.get(format!("{base}/ui/projects/team")).text().unwrap();
    assert!(
        project.contains("Webhooks") && project.contains(">ci<"),
        "{project}"
    );
    assert!(
        project.contains("hooks.example.com/in?") && !project.contains("<b>x"),
        "the target shows, and no markup from it: {project}"
    );
    assert!(project.contains("signed"), "{project}");
    let admin_page = web.get(format!("{base}/ui/admin")).text().unwrap();
    for shown in [
        "System webhooks",
        "audit.example.com",
        "Replication",
        ">far<",
        ">out<",
        "cron:0 3 * * *",
        "team/**",
    ] {
        assert!(admin_page.contains(shown), "{shown} in {admin_page}");
    }
    assert!(!admin_page.contains(">pw<"), "no password");
    // A maintainer does not manage the project: no policies on its page.
    let gus = signed_in(&base, "gus", "gus-password");
    let page = gus.get(format!("{base}/ui/projects/team")).text().unwrap();
    assert!(
        page.contains("team/app") && !page.contains("hooks.example.com"),
        "{page}"
    );
}
