//! Webhooks through the real API and a real receiver: policies and who may make them, the
//! three formats and their signature, retries with a stable id and kept order, the
//! outbound guard, and the durability run (10,000 pushes while the receiver flaps and
//! berth is killed three times), on SQLite and on PostgreSQL with two nodes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_testkit::{
    shared_cluster, unique_schema, wait_until, BerthProcess, Options, ReceivedRequest,
    ReceiverMode, TestRegistry, WebhookReceiver,
};
use berth_webhooks::WebhookSettings;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::auth::{add_project, add_user, api, api_at, expect_api, Who};
use crate::*;

/// Webhook settings for tests: loopback allowed, quick retries.
fn quick_settings(allow: &[&str]) -> WebhookSettings {
    WebhookSettings {
        retry_for: Duration::from_secs(600),
        max_backoff: Duration::from_millis(300),
        timeout: Duration::from_secs(2),
        outbound: berth_outbound::OutboundPolicy::allowing(allow).unwrap(),
        ..WebhookSettings::default()
    }
}

fn start_delivering(
    settings: WebhookSettings,
    auth: Option<berth_auth::AuthSettings>,
) -> TestRegistry {
    start_opts(Options {
        webhooks: Some(settings),
        auth: auth.unwrap_or(Options::default().auth),
        ..Options::default()
    })
}

fn hook(name: &str, url: &str, format: &str) -> Value {
    json!({"name": name, "url": url, "events": ["push", "delete"], "format": format})
}

/// The JSON bodies a receiver accepted on `path`, in arrival order.
fn accepted_bodies(receiver: &WebhookReceiver, path: &str) -> Vec<Value> {
    receiver
        .requests()
        .into_iter()
        .filter(|r| r.accepted && r.path == path)
        .map(|r| serde_json::from_slice(&r.body).expect("JSON body"))
        .collect()
}

#[test]
fn policies_are_checked_scoped_and_never_show_their_secret() {
    let reg = start_opts(Options {
        auth: berth_auth::AuthSettings::default(),
        ..Options::default()
    });
    let admin = Who::admin();
    // Default settings: loopback, private and link-local targets are refused, clearly.
    for (url, words) in [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.1.2.3/", "private"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("file:///etc/passwd", "http and https"),
        ("https://user:pw@hooks.example.com/", "user name"),
    ] {
        let (status, body) = api(
            &reg,
            &admin,
            Method::POST,
            "/webhooks",
            Some(hook("h", url, "cloudevents")),
        );
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(words), "{url}: {message}");
    }
    let long_url = format!("https://hooks.example.com/{}", "a".repeat(3000));
    for bad in [
        json!({"name": "h", "url": long_url, "events": ["push"]}),
        json!({"name": "h", "url": "https://hooks.example.com/", "events": ["pull\u{1b}[2J"]}),
        json!({"name": "h", "url": "https://hooks.example.com/", "events": []}),
        json!({"name": "h", "url": "https://hooks.example.com/", "events": ["push"], "format": "slack"}),
        json!({"name": "../etc", "url": "https://hooks.example.com/", "events": ["push"]}),
        json!({"name": "h", "url": "https://hooks.example.com/", "events": ["push"], "secret": "x".repeat(300)}),
        json!({"name": "h", "url": "https://hooks.example.com/", "events": ["push"], "admin": true}),
    ] {
        let (status, body) = api(&reg, &admin, Method::POST, "/webhooks", Some(bad.clone()));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }

    let created = expect_api(
        &reg,
        &admin,
        Method::POST,
        "/webhooks",
        Some(
            json!({"name": "all", "url": "https://hooks.example.com/in", "events": ["push"], "secret": "s3cret"}),
        ),
        StatusCode::CREATED,
    );
    assert_eq!(created["signed"], true);
    assert_eq!(created["format"], "cloudevents");
    assert!(created.get("secret").is_none(), "{created}");
    expect_api(
        &reg,
        &admin,
        Method::POST,
        "/webhooks",
        Some(json!({"name": "all", "url": "https://hooks.example.com/x", "events": ["push"]})),
        StatusCode::CONFLICT,
    );

    // A project's managers manage its policies, and only its.
    add_project(&reg, "team", false);
    add_user(&reg, "owner", "owner-password-1");
    add_user(&reg, "stranger", "stranger-password-1");
    expect_api(
        &reg,
        &admin,
        Method::POST,
        "/projects/team/members",
        Some(json!({"user": "owner", "role": "project_admin"})),
        StatusCode::CREATED,
    );
    let owner = Who::user("owner", "owner-password-1");
    let stranger = Who::user("stranger", "stranger-password-1");
    expect_api(
        &reg,
        &owner,
        Method::POST,
        "/projects/team/webhooks",
        Some(hook("ci", "https://hooks.example.com/team", "harbor")),
        StatusCode::CREATED,
    );
    expect_api(
        &reg,
        &owner,
        Method::POST,
        "/webhooks",
        Some(hook("mine", "https://hooks.example.com/", "harbor")),
        StatusCode::FORBIDDEN,
    );
    expect_api(
        &reg,
        &owner,
        Method::GET,
        "/webhooks",
        None,
        StatusCode::FORBIDDEN,
    );
    expect_api(
        &reg,
        &stranger,
        Method::GET,
        "/projects/team/webhooks",
        None,
        StatusCode::FORBIDDEN,
    );
    expect_api(
        &reg,
        &stranger,
        Method::POST,
        "/projects/team/webhooks",
        Some(hook("x", "https://hooks.example.com/", "harbor")),
        StatusCode::FORBIDDEN,
    );
    let (status, _) = api(
        &reg,
        &Who::anonymous(),
        Method::GET,
        "/projects/team/webhooks",
        None,
    );
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    expect_api(
        &reg,
        &admin,
        Method::POST,
        "/projects/nowhere/webhooks",
        Some(hook("x", "https://hooks.example.com/", "harbor")),
        StatusCode::NOT_FOUND,
    );

    let listed = expect_api(
        &reg,
        &owner,
        Method::GET,
        "/projects/team/webhooks",
        None,
        StatusCode::OK,
    );
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 1);
    assert_eq!(listed["webhooks"][0]["project"], "team");
    let changed = expect_api(
        &reg,
        &owner,
        Method::PUT,
        "/projects/team/webhooks/ci",
        Some(json!({"enabled": false, "events": ["delete"]})),
        StatusCode::OK,
    );
    assert_eq!(changed["enabled"], false);
    assert_eq!(changed["events"], json!(["delete"]));
    expect_api(
        &reg,
        &owner,
        Method::PUT,
        "/projects/team/webhooks/ci",
        Some(json!({"url": "http://192.168.0.1/"})),
        StatusCode::BAD_REQUEST,
    );
    let log = expect_api(
        &reg,
        &owner,
        Method::GET,
        "/projects/team/webhooks/ci/deliveries",
        None,
        StatusCode::OK,
    );
    assert_eq!(log["deliveries"], json!([]));
    expect_api(
        &reg,
        &owner,
        Method::GET,
        "/projects/team/webhooks/nope/deliveries",
        None,
        StatusCode::NOT_FOUND,
    );
    expect_api(
        &reg,
        &owner,
        Method::GET,
        "/projects/team/webhooks/ci/deliveries?n=-1",
        None,
        StatusCode::BAD_REQUEST,
    );
    expect_api(
        &reg,
        &owner,
        Method::DELETE,
        "/projects/team/webhooks/ci",
        None,
        StatusCode::NO_CONTENT,
    );
    expect_api(
        &reg,
        &owner,
        Method::GET,
        "/projects/team/webhooks/ci",
        None,
        StatusCode::NOT_FOUND,
    );

    let audit = expect_api(
        &reg,
        &admin,
        Method::GET,
        "/audit?action=webhook.create",
        None,
        StatusCode::OK,
    );
    let resources: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].as_str().unwrap())
        .collect();
    assert!(
        resources.contains(&"system/all") && resources.contains(&"team/ci"),
        "{audit}"
    );
}

#[test]
fn pushes_and_deletes_reach_each_policy_in_order_and_signed() {
    let receiver = WebhookReceiver::start();
    let reg = start_delivering(quick_settings(&["127.0.0.0/8"]), None);
    let base = reg.url();
    let admin = Who::anonymous();
    for (name, format) in [
        ("ce", "cloudevents"),
        ("dist", "distribution"),
        ("harbor", "harbor"),
    ] {
        let mut body = hook(name, &receiver.url(&format!("/{name}")), format);
        if name == "ce" {
            body["secret"] = "shared-secret".into();
        }
        let (status, value) = api_at(&base, &admin, Method::POST, "/webhooks", Some(body));
        assert_eq!(status, StatusCode::CREATED, "{value}");
    }
    let (status, _) = api_at(
        &base,
        &admin,
        Method::POST,
        "/projects",
        Some(json!({"name": "other", "public": false})),
    );
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = api_at(
        &base,
        &admin,
        Method::POST,
        "/projects/other/webhooks",
        Some(hook("o", &receiver.url("/other"), "cloudevents")),
    );
    assert_eq!(status, StatusCode::CREATED);

    let (first, _) = push_image(&base, "team/app", "v1", &[b"layer one"]);
    let (second, _) = push_image(&base, "team/app", "v2", &[b"layer two"]);
    // Refused: a manifest naming a blob the repository does not hold.
    let missing = image_manifest((&sha256(b"no config"), 9), &[]);
    let r = put_manifest(
        &base,
        "team/app",
        "v3",
        "application/vnd.oci.image.manifest.v1+json",
        &missing,
    );
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = http()
        .delete(format!("{base}/v2/team/app/manifests/v1"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    assert!(
        wait_until(Duration::from_secs(20), || receiver.accepted() >= 9),
        "got {} of 9 deliveries: {:?}; log {}",
        receiver.accepted(),
        receiver
            .requests()
            .iter()
            .map(|r| (
                r.path.clone(),
                String::from_utf8_lossy(&r.body).into_owned()
            ))
            .collect::<Vec<_>>(),
        api_at(&base, &admin, Method::GET, "/webhooks/ce/deliveries", None).1
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        receiver.accepted(),
        9,
        "nothing more (no refused push, no other project)"
    );
    assert!(accepted_bodies(&receiver, "/other").is_empty());

    let ce = accepted_bodies(&receiver, "/ce");
    let kinds: Vec<(&str, &str)> = ce
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["subject"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("io.berth.artifact.pushed", "team/app:v1"),
            ("io.berth.artifact.pushed", "team/app:v2"),
            ("io.berth.tag.deleted", "team/app:v1"),
        ],
        "in commit order"
    );
    assert_eq!(ce[0]["data"]["digest"], first.as_str());
    assert_eq!(ce[1]["data"]["digest"], second.as_str());
    assert_eq!(ce[0]["data"]["repository"], "team/app");

    let dist = accepted_bodies(&receiver, "/dist");
    let actions: Vec<&str> = dist
        .iter()
        .map(|e| e["events"][0]["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["push", "push", "delete"]);
    assert_eq!(dist[0]["events"][0]["target"]["digest"], first.as_str());
    assert_eq!(dist[0]["events"][0]["target"]["repository"], "team/app");
    assert_eq!(dist[0]["events"][0]["target"]["tag"], "v1");
    assert_eq!(
        dist[0]["events"][0]["id"], ce[0]["id"],
        "one id per event, whatever the format"
    );

    let harbor = accepted_bodies(&receiver, "/harbor");
    let types: Vec<&str> = harbor.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        vec!["PUSH_ARTIFACT", "PUSH_ARTIFACT", "DELETE_ARTIFACT"]
    );
    assert_eq!(
        harbor[1]["event_data"]["resources"][0]["digest"],
        second.as_str()
    );
    assert_eq!(
        harbor[1]["event_data"]["repository"]["repo_full_name"],
        "team/app"
    );

    // The signature, checked with openssl rather than with berth's own code.
    let requests: Vec<ReceivedRequest> = receiver
        .requests()
        .into_iter()
        .filter(|r| r.path == "/ce")
        .collect();
    let request = &requests[0];
    assert_eq!(
        request.headers["content-type"],
        "application/cloudevents+json"
    );
    let id = &request.headers["webhook-id"];
    let timestamp = &request.headers["webhook-timestamp"];
    assert_eq!(id.as_str(), ce[0]["id"].as_str().unwrap());
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(&request.body);
    let expected = openssl_hmac_base64("shared-secret", &signed);
    assert_eq!(
        request.headers["webhook-signature"],
        format!("v1,{expected}")
    );
    let unsigned = receiver
        .requests()
        .into_iter()
        .find(|r| r.path == "/dist")
        .unwrap();
    assert!(!unsigned.headers.contains_key("webhook-signature"));
    assert_eq!(
        unsigned.headers["content-type"],
        berth_webhooks::DISTRIBUTION_MEDIA_TYPE
    );

    let (status, log) = api_at(&base, &admin, Method::GET, "/webhooks/ce/deliveries", None);
    assert_eq!(status, StatusCode::OK);
    let log = log["deliveries"].as_array().unwrap().clone();
    assert_eq!(log.len(), 3);
    assert!(
        log.iter()
            .all(|d| d["state"] == "delivered" && d["attempts"] == 1 && d["last_status"] == 204),
        "{log:?}"
    );
}

/// `printf <data> | openssl dgst -sha256 -hmac <key> -binary | base64`.
fn openssl_hmac_base64(key: &str, data: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl dgst -sha256 -hmac '{key}' -binary | base64"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn a_failing_receiver_is_retried_with_the_same_id_and_in_order() {
    let receiver = WebhookReceiver::start();
    receiver.set_mode(ReceiverMode::Failing);
    let reg = start_delivering(quick_settings(&["127.0.0.1/32"]), None);
    let base = reg.url();
    let anyone = Who::anonymous();
    let (status, _) = api_at(
        &base,
        &anyone,
        Method::POST,
        "/webhooks",
        Some(hook("h", &receiver.url("/h"), "cloudevents")),
    );
    assert_eq!(status, StatusCode::CREATED);
    push_image(&base, "team/app", "v1", &[b"one"]);
    push_image(&base, "team/app", "v2", &[b"two"]);
    assert!(wait_until(Duration::from_secs(20), || receiver
        .requests()
        .len()
        >= 3));
    let (_, log) = api_at(&base, &anyone, Method::GET, "/webhooks/h/deliveries", None);
    let oldest = log["deliveries"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(oldest["state"], "pending", "{log}");
    assert_eq!(oldest["last_status"], 500);
    assert!(
        oldest["last_error"].as_str().unwrap().contains("500"),
        "{oldest}"
    );
    assert!(
        receiver
            .requests()
            .iter()
            .all(|r| r.headers["webhook-id"] == receiver.requests()[0].headers["webhook-id"]),
        "the later event waits behind the failing one"
    );

    receiver.set_mode(ReceiverMode::Healthy);
    assert!(wait_until(Duration::from_secs(20), || receiver.accepted() >= 2));
    let requests = receiver.requests();
    let first_id = &requests[0].headers["webhook-id"];
    let accepted: Vec<&ReceivedRequest> = requests.iter().filter(|r| r.accepted).collect();
    assert_eq!(
        &accepted[0].headers["webhook-id"], first_id,
        "retries carry the id; order kept"
    );
    assert_ne!(&accepted[1].headers["webhook-id"], first_id);
    let metrics = http()
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("berth_webhook_deliveries_total{outcome=\"delivered\"} 2"),
        "{metrics}"
    );
    let failures: u64 = metric_value(&metrics, "berth_webhook_attempt_failures_total");
    assert!(failures >= 2, "{failures}");
    assert!(metrics.contains("berth_event_consumer_lag_events{consumer=\"webhooks\"}"));
}

fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics"))
}

#[test]
fn a_delivery_past_the_horizon_fails_and_can_be_sent_again() {
    let receiver = WebhookReceiver::start();
    receiver.set_mode(ReceiverMode::Failing);
    let settings = WebhookSettings {
        retry_for: Duration::ZERO,
        ..quick_settings(&["127.0.0.1/32"])
    };
    let reg = start_delivering(settings, None);
    let base = reg.url();
    let anyone = Who::anonymous();
    api_at(
        &base,
        &anyone,
        Method::POST,
        "/webhooks",
        Some(hook("h", &receiver.url("/h"), "harbor")),
    );
    push_image(&base, "team/app", "v1", &[b"one"]);
    let failed = || {
        let (_, log) = api_at(&base, &anyone, Method::GET, "/webhooks/h/deliveries", None);
        log["deliveries"][0].clone()
    };
    assert!(
        wait_until(Duration::from_secs(20), || failed()["state"] == "failed"),
        "{}",
        failed()
    );
    let event = failed()["event"].as_i64().unwrap();
    receiver.set_mode(ReceiverMode::Healthy);
    let (status, _) = api_at(
        &base,
        &anyone,
        Method::POST,
        &format!("/webhooks/h/deliveries/{event}/redeliver"),
        None,
    );
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(wait_until(Duration::from_secs(20), || receiver.accepted() == 1));
    assert!(wait_until(Duration::from_secs(5), || failed()["state"] == "delivered"));
    let (status, _) = api_at(
        &base,
        &anyone,
        Method::POST,
        "/webhooks/h/deliveries/999999/redeliver",
        None,
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[test]
fn targets_cannot_reach_refused_ranges_through_names_or_redirects() {
    // A target that redirects to another loopback address, one the policy does not allow.
    let redirector = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = redirector.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in redirector.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 65536];
            let _ = stream.read(&mut buf);
            let answer = format!("HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.2:{port}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    let receiver = WebhookReceiver::start();
    let reg = start_delivering(quick_settings(&["127.0.0.1/32"]), None);
    let base = reg.url();
    let anyone = Who::anonymous();
    api_at(
        &base,
        &anyone,
        Method::POST,
        "/webhooks",
        Some(hook(
            "redirect",
            &format!("http://127.0.0.1:{port}/"),
            "cloudevents",
        )),
    );
    // A name that resolves only to addresses outside the allowed range (::1 and 127.0.0.1
    // are loopback; only 127.0.0.1 is allowed, so `localhost` passes on its IPv4 address).
    let receiver_port = receiver.url("").rsplit(':').next().unwrap().to_owned();
    let (status, body) = api_at(
        &base,
        &anyone,
        Method::POST,
        "/webhooks",
        Some(hook(
            "name",
            &format!("http://ip6-localhost:{receiver_port}/"),
            "cloudevents",
        )),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    push_image(&base, "team/app", "v1", &[b"one"]);
    let last_error = |name: &str| {
        let (_, log) = api_at(
            &base,
            &anyone,
            Method::GET,
            &format!("/webhooks/{name}/deliveries"),
            None,
        );
        log["deliveries"][0]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        wait_until(Duration::from_secs(20), || last_error("redirect")
            .contains("127.0.0.2")),
        "{}",
        last_error("redirect")
    );
    assert!(
        last_error("redirect").contains("refused"),
        "{}",
        last_error("redirect")
    );
    assert!(
        wait_until(Duration::from_secs(20), || !last_error("name").is_empty()),
        "{}",
        api_at(
            &base,
            &anyone,
            Method::GET,
            "/webhooks/name/deliveries",
            None
        )
        .1
    );
    let error = last_error("name");
    assert!(
        error.contains("loopback") || error.contains("resolve") || error.contains("ip6-localhost"),
        "{error}"
    );
    assert_eq!(
        receiver.requests().len(),
        0,
        "nothing reached the receiver through a refused address"
    );
}

/// What a durability run saw.
struct RunFigures {
    acknowledged: usize,
    refused: usize,
    unknown: usize,
    push_secs: f64,
}

/// Writers pushing small images (one shared config and layer, a unique manifest each) to
/// whichever node `urls` names, until `target` are acknowledged; a push every
/// `refuse_every` names a missing blob and must be refused. Acknowledged and refused
/// manifest digests are collected.
struct Writers {
    acknowledged: Arc<Mutex<Vec<(String, Instant)>>>,
    refused: Arc<Mutex<Vec<String>>>,
    unknown: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(
        urls: Arc<Mutex<Vec<String>>>,
        writers: usize,
        target: usize,
        config: (String, usize),
        layer: (String, usize),
    ) -> Self {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(Vec::new()));
        let unknown = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counter = Arc::new(AtomicUsize::new(0));
        // Each run's manifests differ from every other run's, so their digests do too.
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, Ordering::Relaxed);
        let threads = (0..writers)
            .map(|w| {
                let (urls, acknowledged, refused, unknown, stop, counter) = (
                    urls.clone(),
                    acknowledged.clone(),
                    refused.clone(),
                    unknown.clone(),
                    stop.clone(),
                    counter.clone(),
                );
                let (config, layer) = (config.clone(), layer.clone());
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                        .unwrap();
                    // Bounded: a run that cannot push fails the test instead of hanging it.
                    let deadline = Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::Relaxed)
                        && acknowledged.lock().unwrap().len() < target
                        && Instant::now() < deadline
                    {
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let bad = n % 97 == 96;
                        let config_ref = if bad {
                            (sha256(format!("missing {n}").as_bytes()), 7)
                        } else {
                            config.clone()
                        };
                        let mut manifest: Value = serde_json::from_slice(&image_manifest(
                            (&config_ref.0, config_ref.1),
                            &[(&layer.0, layer.1)],
                        ))
                        .unwrap();
                        manifest["annotations"] =
                            json!({"n": n.to_string(), "run": run.to_string()});
                        let body = serde_json::to_vec(&manifest).unwrap();
                        let digest = sha256(&body);
                        let urls_now = urls.lock().unwrap().clone();
                        let base = &urls_now[(n + w) % urls_now.len()];
                        let answer = client
                            .put(format!("{base}/v2/load/app/manifests/t{n}"))
                            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                            .body(body)
                            .send();
                        match answer.map(|r| r.status()) {
                            Ok(StatusCode::CREATED) => {
                                assert!(!bad, "a push naming a missing blob was accepted");
                                acknowledged.lock().unwrap().push((digest, Instant::now()));
                            }
                            Ok(StatusCode::BAD_REQUEST) if bad => {
                                refused.lock().unwrap().push(digest)
                            }
                            _ => {
                                unknown.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                })
            })
            .collect();
        Writers {
            acknowledged,
            refused,
            unknown,
            stop,
            threads,
        }
    }

    fn acknowledged(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    fn finish(mut self) -> (Vec<(String, Instant)>, Vec<String>, usize) {
        for thread in self.threads.drain(..) {
            thread.join().unwrap();
        }
        self.stop.store(true, Ordering::Relaxed);
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        let refused = self.refused.lock().unwrap().clone();
        (acknowledged, refused, self.unknown.load(Ordering::Relaxed))
    }
}

/// Per policy path: manifest digest → the event ids it arrived under (accepted requests).
fn arrivals(receiver: &WebhookReceiver, path: &str) -> HashMap<String, Vec<String>> {
    // Called in polling loops over tens of thousands of requests: not too often.
    std::thread::sleep(Duration::from_millis(200));
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for r in receiver
        .requests()
        .into_iter()
        .filter(|r| r.accepted && r.path == path)
    {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let digest = body["data"]["digest"]
            .as_str()
            .or(body["events"][0]["target"]["digest"].as_str())
            .unwrap_or_default()
            .to_owned();
        seen.entry(digest)
            .or_default()
            .push(r.headers["webhook-id"].clone());
    }
    seen
}

/// Checks that every acknowledged push arrived on `path` under one id (any number of
/// times), no refused one did; returns (distinct events, duplicate deliveries).
fn check_exactly_once(
    receiver: &WebhookReceiver,
    path: &str,
    acknowledged: &[(String, Instant)],
    refused: &[String],
) -> (usize, usize) {
    let seen = arrivals(receiver, path);
    for (digest, _) in acknowledged {
        let ids = seen
            .get(digest)
            .unwrap_or_else(|| panic!("{path}: acknowledged push {digest} never arrived"));
        let distinct: HashSet<&String> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "{path}: {digest} arrived under several ids: {ids:?}"
        );
    }
    for digest in refused {
        assert!(
            !seen.contains_key(digest),
            "{path}: refused push {digest} was announced"
        );
    }
    let duplicates = seen.values().map(|ids| ids.len() - 1).sum();
    (seen.len(), duplicates)
}

fn config_file(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("berth.toml");
    std::fs::write(
        &path,
        format!("[webhooks]\ntimeout_secs = 1\nmax_backoff_secs = 1\n{extra}"),
    )
    .unwrap();
    path
}

/// How many pushes the durability run makes (the benchmark may ask for more or fewer).
fn pushes() -> usize {
    std::env::var("BERTH_WEBHOOK_PUSHES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

#[test]
fn every_acknowledged_push_arrives_once_per_policy_through_flapping_and_kills() {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_berth"));
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), "");
    let args = ["--auth", "none", "--config", config.to_str().unwrap()];
    let env = [("BERTH_OUTBOUND_ALLOW_CIDRS", "127.0.0.0/8")];
    let data = dir.path().join("data");
    let mut node = BerthProcess::spawn_with(binary, &data, &args, &env);
    let receiver = Arc::new(WebhookReceiver::start());
    for (name, format) in [("a", "cloudevents"), ("b", "distribution")] {
        let (status, body) = api_at(
            &node.url(),
            &Who::anonymous(),
            Method::POST,
            "/webhooks",
            Some(hook(name, &receiver.url(&format!("/{name}")), format)),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let config_blob =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(&node.url(), "load/app", config_blob);
    let layer_digest = push_blob(&node.url(), "load/app", b"the one layer");
    let urls = Arc::new(Mutex::new(vec![node.url()]));
    let target = pushes();
    let started = Instant::now();
    let writers = Writers::start(
        urls.clone(),
        4,
        target,
        (config_digest, config_blob.len()),
        (layer_digest, 13),
    );

    // The receiver flaps: down, failing, slow (past the sender's 1 s timeout), healthy.
    let flapping = Arc::new(AtomicBool::new(true));
    let flapper = {
        let (flapping, receiver) = (flapping.clone(), receiver.clone());
        std::thread::spawn(move || {
            let modes = [
                ReceiverMode::Down,
                ReceiverMode::Failing,
                ReceiverMode::Slow(Duration::from_millis(1500)),
                ReceiverMode::Healthy,
            ];
            let mut i = 0;
            while flapping.load(Ordering::Relaxed) {
                receiver.set_mode(modes[i % modes.len()]);
                i += 1;
                std::thread::sleep(Duration::from_millis(700));
            }
            receiver.set_mode(ReceiverMode::Healthy);
        })
    };
    // Three kills, spread over the run, each followed by a restart on the same data.
    for k in 1..=3 {
        assert!(
            wait_until(Duration::from_secs(600), || writers.acknowledged()
                >= target * k / 4),
            "pushes stalled at {}",
            writers.acknowledged()
        );
        node.kill();
        node = BerthProcess::spawn_with(binary, &data, &args, &env);
        *urls.lock().unwrap() = vec![node.url()];
    }
    let (acknowledged, refused, unknown) = writers.finish();
    let push_secs = started.elapsed().as_secs_f64();
    // Deliveries go on behind the pushes: the receiver keeps flapping a while longer.
    std::thread::sleep(Duration::from_secs(5));
    flapping.store(false, Ordering::Relaxed);
    flapper.join().unwrap();
    let drained = Instant::now();
    assert!(
        wait_until(Duration::from_secs(600), || {
            let a = arrivals(&receiver, "/a");
            let b = arrivals(&receiver, "/b");
            acknowledged
                .iter()
                .all(|(d, _)| a.contains_key(d) && b.contains_key(d))
        }),
        "not every acknowledged push arrived"
    );
    let drain_secs = drained.elapsed().as_secs_f64();
    let figures = RunFigures {
        acknowledged: acknowledged.len(),
        refused: refused.len(),
        unknown,
        push_secs,
    };
    let mut report = format!(
        "webhooks durability (SQLite, 1 node, 3 SIGKILLs, receiver flapping every 0.7 s until 5 s after the last push): {} pushes acknowledged in {:.1} s ({:.0}/s), {} refused, {} unanswered by a killed node; all delivered {:.1} s after the flapping stopped",
        figures.acknowledged, figures.push_secs, figures.acknowledged as f64 / figures.push_secs, figures.refused, figures.unknown, drain_secs
    );
    for path in ["/a", "/b"] {
        let (events, duplicates) = check_exactly_once(&receiver, path, &acknowledged, &refused);
        report.push_str(&format!("\n  policy {path}: {events} distinct events, {duplicates} duplicate deliveries (same id)"));
    }

    // Healthy receiver: latency from a push's acknowledgement to its arrival.
    let before = receiver.requests().len();
    let latency_pushes = 1_000.min(target);
    let writers = Writers::start(
        urls.clone(),
        2,
        latency_pushes,
        (sha256(config_blob), config_blob.len()),
        (sha256(b"the one layer"), 13),
    );
    let (healthy, _, _) = writers.finish();
    assert!(wait_until(Duration::from_secs(120), || {
        let a = arrivals(&receiver, "/a");
        healthy.iter().all(|(d, _)| a.contains_key(d))
    }));
    let arrived: HashMap<String, Instant> = receiver.requests()[before..]
        .iter()
        .filter(|r| r.accepted && r.path == "/a")
        .map(|r| {
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            (body["data"]["digest"].as_str().unwrap().to_owned(), r.at)
        })
        .collect();
    let mut latencies: Vec<Duration> = healthy
        .iter()
        .map(|(d, acked)| arrived[d].saturating_duration_since(*acked))
        .collect();
    latencies.sort();
    let percentile =
        |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    report.push_str(&format!(
        "\n  healthy receiver, {} pushes: delivery latency after the push's 201: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(), percentile(0.5).as_secs_f64() * 1e3, percentile(0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    ));
    println!("{report}");
}

#[test]
fn two_postgres_nodes_deliver_each_event_once_and_take_over_from_each_other() {
    let Some(cluster) = shared_cluster() else {
        eprintln!("skipped: no PostgreSQL server binaries");
        return;
    };
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_berth"));
    let dir = tempfile::tempdir().unwrap();
    let schema = unique_schema();
    let config = config_file(
        dir.path(),
        &format!(
            "[meta]\npostgres_url = \"{}\"\npostgres_schema = \"{schema}\"\n",
            cluster.url()
        ),
    );
    let args = ["--auth", "none", "--config", config.to_str().unwrap()];
    let env = [("BERTH_OUTBOUND_ALLOW_CIDRS", "127.0.0.0/8")];
    let a = BerthProcess::spawn_with(binary, &dir.path().join("a"), &args, &env);
    let b = BerthProcess::spawn_with(binary, &dir.path().join("b"), &args, &env);
    let receiver = WebhookReceiver::start();
    let (status, body) = api_at(
        &a.url(),
        &Who::anonymous(),
        Method::POST,
        "/webhooks",
        Some(hook("a", &receiver.url("/a"), "cloudevents")),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // The blobs are linked in the shared metadata, so manifests can be pushed to either
    // node (their bytes live on node a only; nothing here pulls them).
    let config_blob =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = push_blob(&a.url(), "load/app", config_blob);
    let layer_digest = push_blob(&a.url(), "load/app", b"the one layer");
    let urls = Arc::new(Mutex::new(vec![a.url(), b.url()]));
    let count = (pushes() / 5).max(100);
    let writers = Writers::start(
        urls.clone(),
        4,
        count,
        (config_digest.clone(), config_blob.len()),
        (layer_digest.clone(), 13),
    );
    let (acknowledged, refused, _) = writers.finish();
    assert!(
        wait_until(Duration::from_secs(300), || {
            let seen = arrivals(&receiver, "/a");
            acknowledged.iter().all(|(d, _)| seen.contains_key(d))
        }),
        "not every push arrived"
    );
    let (events, duplicates) = check_exactly_once(&receiver, "/a", &acknowledged, &refused);
    assert_eq!(
        duplicates, 0,
        "two nodes, no kill: one delivery per event, not one per node"
    );
    println!("webhooks on PostgreSQL, two nodes: {} pushes to both, {events} events delivered, {duplicates} duplicates", acknowledged.len());

    // Whichever node delivers is killed; the other takes over within the lease.
    let leads = |node: &BerthProcess| node.log().iter().any(|l| l.contains("this node delivers"));
    assert!(leads(&a) != leads(&b), "exactly one node delivers");
    let (survivor, killed) = if leads(&a) { (b, a) } else { (a, b) };
    let takeover = Instant::now();
    killed.kill();
    *urls.lock().unwrap() = vec![survivor.url()];
    let writers = Writers::start(
        urls.clone(),
        2,
        50,
        (config_digest, config_blob.len()),
        (layer_digest, 13),
    );
    let (after, refused, _) = writers.finish();
    assert!(
        wait_until(Duration::from_secs(120), || {
            let seen = arrivals(&receiver, "/a");
            after.iter().all(|(d, _)| seen.contains_key(d))
        }),
        "the surviving node did not take over"
    );
    assert!(leads(&survivor));
    check_exactly_once(&receiver, "/a", &after, &refused);
    println!(
        "  the delivering node was killed; the other delivered again after {:.1} s",
        takeover.elapsed().as_secs_f64()
    );
    drop(survivor);
}
