//! Replication: a berth process (the source, or the destination of a pull policy) with
//! registry endpoints and policies made through the API, replicating to and from a
//! second berth and Docker Distribution. Runs copy exactly the tags the filters take,
//! with their digests and referrers; a second run sends nothing; the event trigger gets
//! every push across a target outage and a SIGKILL of the replicating node.

use std::path::Path;
use std::time::Duration;

use berth_testkit::{wait_until, BerthProcess, CuttableProxy};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::*;

/// A berth that may dial loopback registries, replicating event-triggered policies in
/// full every `reconcile_secs`.
fn replicator(data_dir: &Path, reconcile_secs: u64) -> BerthProcess {
    let config = data_dir.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "[outbound]\nallow_cidrs = [\"127.0.0.0/8\"]\n\n[replication]\nreconcile_secs = {reconcile_secs}\n"
        ),
    )
    .unwrap();
    BerthProcess::spawn_with(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        data_dir,
        &["--auth", "none", "--config", config.to_str().unwrap()],
        &[],
    )
}

fn post(url: &str, body: Value) -> reqwest::blocking::Response {
    http().post(url).json(&body).send().unwrap()
}

fn add_registry(base: &str, name: &str, url: &str) {
    let r = post(
        &format!("{base}/api/v1/registries"),
        json!({"name": name, "url": url}),
    );
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
}

fn add_policy(base: &str, policy: Value) {
    let r = post(&format!("{base}/api/v1/replication/policies"), policy);
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
}

/// Starts a run of `policy` and waits for it to end; returns the execution.
fn run(base: &str, policy: &str) -> Value {
    let url = format!("{base}/api/v1/replication/policies/{policy}/executions");
    let r = http().post(&url).send().unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
    let id = r.json::<Value>().unwrap()["id"].as_i64().unwrap();
    let mut last = Value::Null;
    let ended = wait_until(Duration::from_secs(60), || {
        let runs: Value = http().get(&url).send().unwrap().json().unwrap();
        last = runs
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .cloned()
            .unwrap_or_default();
        last["status"] != "running"
    });
    assert!(ended, "the run did not end: {last}");
    last
}

/// The digest `reference` has in `repo` at `base`, if any.
fn digest_at(base: &str, repo: &str, reference: &str) -> Option<String> {
    let r = http()
        .head(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("accept", berth_client::MANIFEST_TYPES)
        .send()
        .unwrap();
    (r.status() == StatusCode::OK).then(|| header(&r, "docker-content-digest"))
}

/// Pushes a signature-like referrer of `subject` (by digest) into `repo`.
fn push_referrer(base: &str, repo: &str, subject: &str, subject_size: usize) -> String {
    let config_digest = push_blob(base, repo, b"{}");
    let payload = push_blob(base, repo, format!("signed {subject}").as_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config_digest, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": payload,
                    "size": format!("signed {subject}").len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": subject_size},
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = sha256(&bytes);
    let r = put_manifest(
        base,
        repo,
        &digest,
        "application/vnd.oci.image.manifest.v1+json",
        &bytes,
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    digest
}

fn referrers(base: &str, repo: &str, subject: &str) -> Vec<String> {
    let index: Value = http()
        .get(format!("{base}/v2/{repo}/referrers/{subject}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_push_policy_copies_what_its_filters_take_with_referrers_and_a_second_run_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let source = replicator(&dir.path().join("source"), 3600);
    let target = start();
    let (src, dst) = (source.url(), target.url());
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (app_v1, app_v1_bytes) = push_image(&src, "team/app", "v1", &[&big, b"one"]);
    let (app_v2, _) = push_image(&src, "team/app", "v2", &[&big, b"two"]);
    push_image(&src, "team/app", "v3-rc1", &[b"candidate"]);
    let (web_v1, _) = push_image(&src, "team/site/web", "v1", &[&big]);
    push_image(&src, "team/secret", "v1", &[b"secret"]);
    push_image(&src, "other/app", "v1", &[b"other"]);
    let signature = push_referrer(&src, "team/app", &app_v1, app_v1_bytes.len());

    add_registry(&src, "second", &dst);
    add_policy(
        &src,
        json!({
            "name": "to-second", "direction": "push", "registry": "second",
            "source": "team/**", "destination_namespace": "mirror", "flatten": 1,
            "trigger": "manual",
            "filters": {"tags": ["v*"], "exclude_tags": ["*-rc*"], "exclude_repositories": ["team/secret"]},
        }),
    );
    let first = run(&src, "to-second");
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(first["total"], 3, "{first}");
    assert_eq!(first["succeeded"], 3, "{first}");
    assert!(
        first["bytes"].as_u64().unwrap() >= big.len() as u64,
        "{first}"
    );
    // Shared layers travel once: the big layer is in all three images.
    assert!(
        first["bytes"].as_u64().unwrap() < 2 * big.len() as u64,
        "{first}"
    );

    assert_eq!(
        digest_at(&dst, "mirror/app", "v1").as_deref(),
        Some(app_v1.as_str())
    );
    assert_eq!(
        digest_at(&dst, "mirror/app", "v2").as_deref(),
        Some(app_v2.as_str())
    );
    assert_eq!(
        digest_at(&dst, "mirror/site/web", "v1").as_deref(),
        Some(web_v1.as_str())
    );
    assert_eq!(
        digest_at(&dst, "mirror/app", "v3-rc1"),
        None,
        "excluded by tag"
    );
    assert_eq!(
        digest_at(&dst, "mirror/secret", "v1"),
        None,
        "excluded repository"
    );
    assert_eq!(
        digest_at(&dst, "mirror/app", "v1").and(digest_at(&dst, "other/app", "v1")),
        None
    );
    assert_eq!(
        referrers(&dst, "mirror/app", &app_v1),
        vec![signature.clone()]
    );
    assert!(pull_problems(&dst, "mirror/app", "v1").is_empty());
    // The execution lists its tasks.
    let tasks = first["tasks"].as_array().unwrap();
    assert!(
        tasks
            .iter()
            .all(|t| t["status"] == "succeeded" && t["attempts"] == 1),
        "{first} {:?}",
        source
            .log()
            .iter()
            .filter(|l| l.contains("replication"))
            .collect::<Vec<_>>()
    );
    assert!(tasks
        .iter()
        .any(|t| t["source"] == "team/app:v1" && t["destination"] == "mirror/app:v1"));

    // Again: everything is there, so nothing moves.
    let second = run(&src, "to-second");
    assert_eq!(second["status"], "succeeded");
    assert_eq!(second["bytes"], 0, "{second}");
    assert_eq!(second["skipped"], 3, "{second}");

    // A tag moved at the destination is left alone unless the policy overwrites.
    let (elsewhere, _) = push_image(&dst, "mirror/app", "v2", &[b"changed at the destination"]);
    let r = http()
        .put(format!("{src}/api/v1/replication/policies/to-second"))
        .json(
            &json!({"direction": "push", "registry": "second", "source": "team/app",
                      "destination_namespace": "mirror", "flatten": 1, "override": false,
                      "filters": {"tags": ["v2"]}}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().unwrap());
    let kept = run(&src, "to-second");
    assert_eq!(kept["skipped"], 1, "{kept}");
    assert_eq!(
        digest_at(&dst, "mirror/app", "v2").as_deref(),
        Some(elsewhere.as_str())
    );
    let r = http()
        .put(format!("{src}/api/v1/replication/policies/to-second"))
        .json(
            &json!({"direction": "push", "registry": "second", "source": "team/app",
                      "destination_namespace": "mirror", "flatten": 1, "override": true,
                      "filters": {"tags": ["v2"]}}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let replaced = run(&src, "to-second");
    assert_eq!(replaced["succeeded"], 1, "{replaced}");
    assert_eq!(
        digest_at(&dst, "mirror/app", "v2").as_deref(),
        Some(app_v2.as_str())
    );

    // The metrics count the work.
    let metrics = http()
        .get(format!("{src}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("berth_replication_tasks_total{outcome=\"succeeded\"} 4"),
        "{metrics}"
    );
}

#[test]
fn event_replication_gets_every_push_across_a_target_outage_and_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("source");
    let source = replicator(&data, 3600);
    let target = start();
    let relay = CuttableProxy::start(target.host().parse().unwrap());
    let src = source.url();
    let dst = target.url();
    add_registry(&src, "second", &format!("http://{}", relay.addr()));
    add_policy(
        &src,
        json!({"name": "follow", "direction": "push", "registry": "second", "source": "app/**",
               "trigger": "event", "replicate_deletions": true}),
    );
    let (first, _) = push_image(&src, "app/web", "t0", &[b"zero"]);
    assert!(
        wait_until(Duration::from_secs(30), || digest_at(&dst, "app/web", "t0")
            .as_deref()
            == Some(first.as_str())),
        "a push reaches the target within seconds"
    );

    // The target goes away; pushes go on; the replicating node is killed meanwhile.
    relay.cut();
    let mut pushed = Vec::new();
    for i in 1..=5 {
        let layer = format!("layer {i}");
        let (digest, _) = push_image(&src, "app/web", &format!("t{i}"), &[layer.as_bytes()]);
        pushed.push((format!("t{i}"), digest));
    }
    let r = http()
        .delete(format!("{src}/v2/app/web/manifests/t0"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    std::thread::sleep(Duration::from_secs(2)); // attempts fail against the cut relay
    source.kill();
    let source = replicator(&data, 3600);
    let src = source.url();
    relay.restore();
    let all_there = wait_until(Duration::from_secs(90), || {
        pushed.iter().all(|(tag, digest)| {
            digest_at(&dst, "app/web", tag).as_deref() == Some(digest.as_str())
        }) && digest_at(&dst, "app/web", "t0").is_none()
    });
    let runs: Value = http()
        .get(format!(
            "{src}/api/v1/replication/policies/follow/executions?n=100"
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(all_there, "every change reaches the target: {runs}");
    // Some attempts failed while the target was away, and were retried.
    let retried = runs
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["tasks"].as_array().unwrap().iter())
        .any(|t| {
            // Its log has a line per attempt: the failed ones say why.
            let log = t["log"].as_str().unwrap();
            t["attempts"].as_u64().unwrap() > 1
                && log.contains("attempt 1: pending: ")
                && log.lines().last().unwrap().contains(": succeeded")
        });
    assert!(retried, "{runs}");
    for (tag, _) in &pushed {
        assert!(pull_problems(&dst, "app/web", tag).is_empty());
    }
}

#[test]
fn pull_and_push_policies_work_with_docker_distribution() {
    let Some(distribution) = crate::copy::Distribution::start() else {
        eprintln!("skipped: docker-registry is not installed");
        return;
    };
    let remote = format!("http://{}", distribution.addr);
    let (lib_v1, _) = push_image(&remote, "library/alpine", "3.20", &[b"alpine layer"]);
    let (lib_v2, _) = push_image(&remote, "library/busybox", "1.36", &[b"busybox layer"]);
    push_image(&remote, "vendor/tool", "1.0", &[b"not wanted"]);
    let dir = tempfile::tempdir().unwrap();
    let berth = replicator(&dir.path().join("local"), 3600);
    let local = berth.url();
    add_registry(&local, "dist", &remote);

    // Pull: Distribution's catalog and tags lists are followed, digests kept.
    add_policy(
        &local,
        json!({"name": "from-dist", "direction": "pull", "registry": "dist",
               "source": "library/*", "destination_namespace": "cache"}),
    );
    let pulled = run(&local, "from-dist");
    assert_eq!(pulled["status"], "succeeded", "{pulled}");
    assert_eq!(pulled["succeeded"], 2, "{pulled}");
    assert_eq!(
        digest_at(&local, "cache/library/alpine", "3.20").as_deref(),
        Some(lib_v1.as_str())
    );
    assert_eq!(
        digest_at(&local, "cache/library/busybox", "1.36").as_deref(),
        Some(lib_v2.as_str())
    );
    assert_eq!(digest_at(&local, "cache/vendor/tool", "1.0"), None);

    // Push, with deletions: Distribution deletes manifests, not tags, so the tag's
    // manifest goes there.
    let (mine, mine_bytes) = push_image(&local, "team/app", "v1", &[b"mine"]);
    let signature = push_referrer(&local, "team/app", &mine, mine_bytes.len());
    add_policy(
        &local,
        json!({"name": "to-dist", "direction": "push", "registry": "dist", "source": "team/**",
               "trigger": "event", "replicate_deletions": true}),
    );
    let pushed = run(&local, "to-dist");
    assert_eq!(pushed["succeeded"], 1, "{pushed}");
    assert_eq!(
        digest_at(&remote, "team/app", "v1").as_deref(),
        Some(mine.as_str())
    );
    // Distribution has no referrers API: the signature goes with the tag schema's index.
    let fallback = format!("sha256-{}", mine.trim_start_matches("sha256:"));
    let index: Value = http()
        .get(format!("{remote}/v2/team/app/manifests/{fallback}"))
        .header("accept", "application/vnd.oci.image.index.v1+json")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        index["manifests"][0]["digest"],
        signature.as_str(),
        "{index}"
    );
    let (later, _) = push_image(&local, "team/app", "v2", &[b"later"]);
    assert!(wait_until(Duration::from_secs(30), || digest_at(
        &remote, "team/app", "v2"
    )
    .as_deref()
        == Some(later.as_str())));
    let r = http()
        .delete(format!("{local}/v2/team/app/manifests/v2"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        wait_until(Duration::from_secs(30), || digest_at(
            &remote, "team/app", "v2"
        )
        .is_none()),
        "the deletion reaches Distribution"
    );
    assert_eq!(
        digest_at(&remote, "team/app", "v1").as_deref(),
        Some(mine.as_str())
    );
}

#[test]
fn the_api_refuses_what_it_must_and_never_shows_a_password() {
    let target = start();
    let dir = tempfile::tempdir().unwrap();
    // No loopback allowed here: the guard applies to registry endpoints.
    let berth = BerthProcess::spawn_with(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        &dir.path().join("data"),
        &["--auth", "none"],
        &[],
    );
    let base = berth.url();
    let registries = format!("{base}/api/v1/registries");
    for (body, why) in [
        (
            json!({"name": "a", "url": target.url()}),
            "loopback without allow_cidrs",
        ),
        (
            json!({"name": "a", "url": "http://169.254.169.254"}),
            "link-local",
        ),
        (
            json!({"name": "a", "url": "http://10.0.0.1:5000"}),
            "private",
        ),
        (
            json!({"name": "a", "url": "file:///etc/passwd"}),
            "not http",
        ),
        (
            json!({"name": "a", "url": "http://user:pw@example.invalid"}),
            "credentials in the URL",
        ),
        (
            json!({"name": "../a", "url": "https://example.invalid"}),
            "a path trick in the name",
        ),
        (
            json!({"name": "a\nb", "url": "https://example.invalid"}),
            "a control character",
        ),
        (
            json!({"name": "a", "url": "https://example.invalid", "extra": 1}),
            "an unknown field",
        ),
        (
            json!({"name": "a", "url": "https://example.invalid", "username": "u"}),
            "a user without a password",
        ),
        (
            json!({"name": "a", "url": format!("https://example.invalid/{}", "x".repeat(3000))}),
            "a huge URL",
        ),
        (
            json!({"name": "a", "url": "https://example.invalid/v2/"}),
            "not a base URL",
        ),
    ] {
        let r = post(&registries, body);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{why}");
    }
    let r = http()
        .post(&registries)
        .header("content-type", "application/json")
        .body(vec![b' '; 100 * 1024]) // over the API's 64 KiB
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let r = post(
        &registries,
        json!({"name": "remote", "url": "https://registry.example.invalid", "username": "bot", "password": "s3cret"}),
    );
    assert_eq!(r.status(), StatusCode::CREATED);
    let shown = http().get(&registries).send().unwrap().text().unwrap();
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("\"password_set\":true"), "{shown}");
    assert_eq!(
        post(
            &registries,
            json!({"name": "remote", "url": "https://x.invalid"})
        )
        .status(),
        StatusCode::CONFLICT
    );

    let policies = format!("{base}/api/v1/replication/policies");
    let good = json!({"name": "p", "direction": "push", "registry": "remote", "source": "team/**"});
    let mut bad_cases = Vec::new();
    for (field, value, status) in [
        ("registry", json!("nowhere"), StatusCode::NOT_FOUND),
        ("direction", json!("sideways"), StatusCode::BAD_REQUEST),
        ("trigger", json!("cron:61 * * * *"), StatusCode::BAD_REQUEST),
        ("trigger", json!("sometimes"), StatusCode::BAD_REQUEST),
        ("source", json!(""), StatusCode::BAD_REQUEST),
        (
            "destination_namespace",
            json!("Bad Namespace"),
            StatusCode::BAD_REQUEST,
        ),
        ("concurrency", json!(1000), StatusCode::BAD_REQUEST),
        (
            "bandwidth_bytes_per_sec",
            json!(10),
            StatusCode::BAD_REQUEST,
        ),
        (
            "filters",
            json!({"tags": ["*a".repeat(200)]}),
            StatusCode::BAD_REQUEST,
        ),
        ("filters", json!({"regex": "x"}), StatusCode::BAD_REQUEST),
        ("name", json!("Has Spaces"), StatusCode::BAD_REQUEST),
    ] {
        let mut body = good.clone();
        body[field] = value;
        bad_cases.push((body, status));
    }
    let mut pull_event = good.clone();
    pull_event["direction"] = json!("pull");
    pull_event["trigger"] = json!("event");
    bad_cases.push((pull_event, StatusCode::BAD_REQUEST));
    for (body, status) in bad_cases {
        let r = post(&policies, body.clone());
        assert_eq!(r.status(), status, "{body}");
    }
    let mut scheduled = good.clone();
    scheduled["trigger"] = json!("cron:*/5 * * * 1-5");
    assert_eq!(post(&policies, scheduled).status(), StatusCode::CREATED);
    let shown: Value = http()
        .get(format!("{policies}/p"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(shown["trigger"], "cron:*/5 * * * 1-5");
    // An endpoint a policy uses stays.
    let r = http()
        .delete(format!("{registries}/remote"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        http()
            .delete(format!("{policies}/p"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        http()
            .delete(format!("{registries}/remote"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        http()
            .get(format!("{policies}/p/executions"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    // The audit log says who changed what.
    let audit = http()
        .get(format!("{base}/api/v1/audit"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for action in [
        "replication.registry.set",
        "replication.policy.set",
        "replication.policy.remove",
        "replication.registry.remove",
    ] {
        assert!(audit.contains(action), "{action}: {audit}");
    }
}

/// Bytes the registry at `base` received in upload requests.
fn upload_bytes_received(base: &str) -> u64 {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("berth_http_request_bytes_total") && l.contains("/blobs/uploads"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn an_interrupted_blob_goes_on_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let source = replicator(&dir.path().join("source"), 3600);
    let target = start();
    let relay = CuttableProxy::start(target.host().parse().unwrap());
    let src = source.url();
    let layer: Vec<u8> = (0..48 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (digest, _) = push_image(&src, "big/app", "v1", &[&layer]);
    add_registry(&src, "far", &format!("http://{}", relay.addr()));
    // 16 MiB/s: three seconds for the layer, time to cut it in the middle.
    add_policy(
        &src,
        json!({"name": "slow", "direction": "push", "registry": "far", "source": "big/**",
               "bandwidth_bytes_per_sec": 16 * 1024 * 1024}),
    );
    let before = upload_bytes_received(&target.url());
    let url = format!("{src}/api/v1/replication/policies/slow/executions");
    assert_eq!(
        http().post(&url).send().unwrap().status(),
        StatusCode::CREATED
    );
    std::thread::sleep(Duration::from_millis(1500));
    relay.cut();
    std::thread::sleep(Duration::from_secs(2));
    relay.restore();
    let done = wait_until(Duration::from_secs(60), || {
        digest_at(&target.url(), "big/app", "v1").as_deref() == Some(digest.as_str())
    });
    let runs: Value = http().get(&url).send().unwrap().json().unwrap();
    assert!(done, "{runs}");
    let task = &runs[0]["tasks"][0];
    assert!(
        task["attempts"].as_u64().unwrap() >= 2,
        "the cut interrupted it: {runs}"
    );
    let received = upload_bytes_received(&target.url()) - before;
    let ratio = received as f64 / layer.len() as f64;
    eprintln!(
        "resumed: {received} bytes received for a {} byte layer ({ratio:.3}x), attempts {}",
        layer.len(),
        task["attempts"]
    );
    assert!(
        ratio <= 1.1,
        "{received} bytes received for a {} byte layer ({ratio:.2}x)",
        layer.len()
    );
    assert!(pull_problems(&target.url(), "big/app", "v1").is_empty());
}

/// Blob bytes the registry at `base` sent.
fn blob_bytes_sent(base: &str) -> u64 {
    let text = http()
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("berth_http_response_bytes_total")
                && l.contains("route=\"/v2/{name}/blobs/{digest}\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn an_interrupted_pull_goes_on_by_range() {
    let remote = start();
    let relay = CuttableProxy::start(remote.host().parse().unwrap());
    let layer: Vec<u8> = (0..48 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect();
    let (digest, _) = push_image(&remote.url(), "vendor/big", "v1", &[&layer]);
    let dir = tempfile::tempdir().unwrap();
    let local = replicator(&dir.path().join("local"), 3600);
    let base = local.url();
    add_registry(&base, "vendor", &format!("http://{}", relay.addr()));
    add_policy(
        &base,
        json!({"name": "in", "direction": "pull", "registry": "vendor", "source": "vendor/**",
               "bandwidth_bytes_per_sec": 16 * 1024 * 1024}),
    );
    let before = blob_bytes_sent(&remote.url());
    let url = format!("{base}/api/v1/replication/policies/in/executions");
    assert_eq!(
        http().post(&url).send().unwrap().status(),
        StatusCode::CREATED
    );
    std::thread::sleep(Duration::from_millis(1500));
    relay.cut();
    std::thread::sleep(Duration::from_secs(2));
    relay.restore();
    let done = wait_until(Duration::from_secs(60), || {
        digest_at(&base, "vendor/big", "v1").as_deref() == Some(digest.as_str())
    });
    let runs: Value = http().get(&url).send().unwrap().json().unwrap();
    assert!(done, "{runs}");
    let task = &runs[0]["tasks"][0];
    assert!(
        task["attempts"].as_u64().unwrap() >= 2,
        "the cut interrupted it: {runs}"
    );
    // What reached this node, over every attempt: the rest of the blob was asked for by
    // range, so little more than the blob.
    let received = task["bytes"].as_u64().unwrap();
    let ratio = received as f64 / layer.len() as f64;
    // The source also counts what was in socket buffers when the link was cut (several
    // MiB on loopback), which no receiver could keep.
    let sent = blob_bytes_sent(&remote.url()) - before;
    eprintln!(
        "resumed pull: {received} bytes received, {sent} sent, for a {} byte layer ({ratio:.3}x received)",
        layer.len()
    );
    assert!(ratio <= 1.1, "{ratio:.2}x");
    assert!(
        sent < 2 * layer.len() as u64,
        "{sent} bytes sent: the pull started over"
    );
    assert!(pull_problems(&base, "vendor/big", "v1").is_empty());
}

#[test]
fn the_command_line_manages_replication_beside_a_running_registry() {
    use crate::clients::{run as run_command, run_with_stdin};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("source");
    let source = replicator(&data, 3600);
    let target = start();
    let (digest, _) = push_image(&source.url(), "team/app", "v1", &[b"from the command line"]);
    let config = data.with_extension("toml");
    let berth = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_berth"));
        c.arg("replication")
            .arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(&config)
            .env("BERTH_LOG_LEVEL", "warn");
        c
    };
    let added = run_with_stdin(
        berth().args([
            "add-registry",
            "second",
            &target.url(),
            "--username",
            "bot",
            "--password-stdin",
        ]),
        "a password\n",
    );
    assert!(
        added.contains("\"password_set\": true") && !added.contains("a password"),
        "{added}"
    );
    let policy =
        json!({"name": "cli", "direction": "push", "registry": "second", "source": "team/**"});
    run_with_stdin(berth().arg("set-policy"), &policy.to_string());
    let listed = run_command(berth().arg("policies"));
    assert!(listed.contains("\"name\": \"cli\""), "{listed}");
    run_command(berth().args(["run", "cli"]));
    // The running registry's worker carries the run out.
    assert!(wait_until(Duration::from_secs(30), || {
        digest_at(&target.url(), "team/app", "v1").as_deref() == Some(digest.as_str())
    }));
    let runs: Value =
        serde_json::from_str(&run_command(berth().args(["executions", "cli"]))).unwrap();
    assert_eq!(runs[0]["status"], "succeeded", "{runs}");
    let refused = berth()
        .args(["remove-registry", "second"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a registry a policy uses stays");
    run_command(berth().args(["remove-policy", "cli"]));
    run_command(berth().args(["remove-registry", "second"]));
    assert_eq!(run_command(berth().arg("registries")).trim(), "[]");
    drop(source);
}

#[test]
fn a_reconcile_brings_back_what_the_target_lost_and_filters_hold() {
    let dir = tempfile::tempdir().unwrap();
    let source = replicator(&dir.path().join("source"), 10);
    let target = start();
    let (src, dst) = (source.url(), target.url());
    add_registry(&src, "second", &dst);
    add_policy(
        &src,
        json!({"name": "follow", "direction": "push", "registry": "second", "source": "app/**",
               "trigger": "event", "filters": {"tag_regex": "v[0-9]+"}}),
    );
    let (v1, _) = push_image(&src, "app/web", "v1", &[b"one"]);
    push_image(&src, "app/web", "latest", &[b"not by the regex"]);
    assert!(wait_until(Duration::from_secs(30), || {
        digest_at(&dst, "app/web", "v1").as_deref() == Some(v1.as_str())
    }));
    // The target loses it on its own: the next whole run puts it back.
    let r = http()
        .delete(format!("{dst}/v2/app/web/manifests/{v1}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let back = wait_until(Duration::from_secs(40), || {
        digest_at(&dst, "app/web", "v1").as_deref() == Some(v1.as_str())
    });
    let runs: Value = http()
        .get(format!(
            "{src}/api/v1/replication/policies/follow/executions?n=50"
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(back, "{runs}");
    assert!(
        runs.as_array()
            .unwrap()
            .iter()
            .any(|e| e["trigger"] == "reconcile"),
        "{runs}"
    );
    assert_eq!(
        digest_at(&dst, "app/web", "latest"),
        None,
        "the regex keeps latest out"
    );

    // An artifact-type filter: images are not the SBOMs it asks for.
    let r = http()
        .put(format!("{src}/api/v1/replication/policies/follow"))
        .json(
            &json!({"direction": "push", "registry": "second", "source": "app/**",
                      "filters": {"artifact_types": ["application/vnd.example.sbom"]}}),
        )
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    push_image(&src, "app/web", "v2", &[b"two"]);
    let filtered = run(&src, "follow");
    assert_eq!(filtered["succeeded"], 0, "{filtered}");
    assert!(filtered["tasks"].as_array().unwrap().iter().any(
        |t| t["status"] == "skipped" && t["error"].as_str().unwrap().contains("artifact type")
    ));
    assert_eq!(digest_at(&dst, "app/web", "v2"), None);
}
