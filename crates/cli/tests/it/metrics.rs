//! `GET /metrics` over real HTTP: the families an operator needs, labels that never carry
//! a name or a path, access for administrators (or anyone, or a listener of its own), and
//! the shipped Grafana dashboard and alert rules naming only metrics berth exports.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use berth_auth::AuthSettings;
use berth_testkit::{wait_until, BerthProcess};
use reqwest::{Method, StatusCode};

use crate::auth::Who;
use crate::{http, push_image};

fn scrape(url: &str, who: &Who) -> (StatusCode, String) {
    let r = who
        .request(&http(), Method::GET, &format!("{url}/metrics"))
        .send()
        .unwrap();
    (r.status(), r.text().unwrap())
}

/// The value of an unlabelled sample.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// The families a scrape declares (`# TYPE` lines).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_open_registry_counts_requests_by_template_and_what_it_stores() {
    let reg = crate::start();
    let url = reg.url();
    push_image(
        &url,
        "secret-team/secret-app",
        "v1",
        &[b"layer one", b"layer two"],
    );
    for _ in 0..3 {
        let r = http()
            .get(format!("{url}/v2/secret-team/secret-app/manifests/v1"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = http()
        .get(format!("{url}/v2/secret-team/secret-app/manifests/nope"))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (status, text) = scrape(&url, &Who::anonymous());
    assert_eq!(status, StatusCode::OK, "open with --auth none");
    assert!(
        text.contains("berth_http_requests_total{route=\"/v2/{name}/manifests/{reference}\",method=\"GET\",code=\"2xx\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("route=\"/v2/{name}/manifests/{reference}\",method=\"GET\",code=\"4xx\"} 1")
    );
    assert!(text.contains("berth_http_request_duration_seconds_bucket{route=\"/v2/{name}/manifests/{reference}\",le=\"+Inf\"} 5"), "three pulls, a miss and the push");
    assert!(
        !text.contains("secret-team") && !text.contains("secret-app"),
        "no names in labels"
    );
    assert_eq!(value(&text, "berth_repositories"), Some(1.0));
    assert_eq!(value(&text, "berth_manifests"), Some(1.0));
    assert_eq!(
        value(&text, "berth_blobs"),
        Some(3.0),
        "config and two layers"
    );
    assert!(value(&text, "berth_blob_bytes").unwrap() > 0.0);
    assert_eq!(value(&text, "berth_uploads_in_progress"), Some(0.0));
    // The backends' timings: every pull read the metadata store, the push wrote it and
    // the blob store.
    assert!(
        text.contains(
            "berth_metadata_operation_duration_seconds_count{backend=\"sqlite\",op=\"read\"}"
        ),
        "{text}"
    );
    assert!(text.contains("berth_metadata_errors_total{backend=\"sqlite\",op=\"write\"} 0"));
    assert!(text.contains(
        "berth_storage_action_duration_seconds_count{driver=\"filesystem\",action=\"seal\"}"
    ));
    // Docker Distribution's names (the test kit turns them on).
    assert!(
        text.contains(
            "registry_http_requests_total{handler=\"manifest\",code=\"2xx\",method=\"get\"} 3"
        ),
        "{text}"
    );
    assert!(text.contains("registry_http_request_duration_seconds_count{handler=\"manifest\"} 5"));
    assert!(text.contains(
        "registry_storage_action_seconds_bucket{driver=\"filesystem\",action=\"seal\",le=\"+Inf\"}"
    ));
    assert!(value(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(value(&text, "process_open_fds").unwrap() > 0.0);
    // A collection shows up.
    crate::run_gc(&url, "");
    let (_, text) = scrape(&url, &Who::anonymous());
    assert_eq!(value(&text, "berth_gc_runs_total"), Some(1.0));
    assert!(value(&text, "berth_gc_last_success_timestamp_seconds").unwrap() > 1.7e9);
}

#[test]
fn with_access_control_only_administrators_read_the_metrics() {
    let reg = crate::start_with_auth(AuthSettings::default());
    crate::auth::add_user(&reg, "ursula", "ursula-password");
    let (status, _) = scrape(&reg.url(), &Who::anonymous());
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = scrape(&reg.url(), &Who::user("ursula", "ursula-password"));
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, text) = scrape(&reg.url(), &Who::admin());
    assert_eq!(status, StatusCode::OK);
    // The logins just made are counted.
    assert!(
        text.contains("berth_logins_total{result=\"success\"}"),
        "{text}"
    );
    assert!(!text.contains("berth_logins_total{result=\"success\"} 0"));
}

#[test]
fn a_metrics_listener_of_its_own_is_open_and_serves_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let berth = BerthProcess::spawn_with(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
        &[("BERTH_ADMIN_PASSWORD", "admin-password")],
    );
    let mut metrics_url = String::new();
    assert!(wait_until(Duration::from_secs(10), || {
        metrics_url = berth
            .log()
            .iter()
            .find_map(|l| {
                l.split("metrics on ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        !metrics_url.is_empty()
    }));
    let r = http().get(&metrics_url).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK, "open on its own listener");
    assert!(r
        .text()
        .unwrap()
        .contains("# TYPE berth_http_requests_total counter"));
    let base = metrics_url.trim_end_matches("/metrics");
    assert_eq!(
        http().get(format!("{base}/v2/")).send().unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // The main listener still asks for an administrator.
    assert_eq!(
        http()
            .get(format!("{}/metrics", berth.url()))
            .send()
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
}

/// Metric names an expression uses: `berth_…` and `process_…`, histogram suffixes dropped.
fn names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts = (rest.starts_with("berth_") || rest.starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let len = rest
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            let name = &rest[..len];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.push(name.to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn the_shipped_dashboard_and_alerts_name_only_exported_metrics() {
    let reg = crate::start();
    let (_, text) = scrape(&reg.url(), &Who::anonymous());
    let exported = families(&text);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/berth-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            used.extend(names_in(target["expr"].as_str().unwrap()));
        }
    }
    let alerts = std::fs::read_to_string(root.join("prometheus/berth-alerts.yml")).unwrap();
    let mut alert_count = 0;
    for line in alerts.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            alert_count += 1;
            used.extend(names_in(expr));
        }
    }
    assert!(alert_count >= 5 && used.len() >= 10, "{used:?}");
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "named but not exported: {unknown:?}");
}

#[test]
fn json_access_logs_carry_the_request_id_and_who_asked() {
    let dir = tempfile::tempdir().unwrap();
    let berth = BerthProcess::spawn_with(
        Path::new(env!("CARGO_BIN_EXE_berth")),
        &dir.path().join("data"),
        &["--log-format", "json"],
        &[("BERTH_ADMIN_PASSWORD", "admin-password")],
    );
    let admin = Who::user("admin", "admin-password");
    let r = admin
        .request(&http(), Method::GET, &format!("{}/v2/", berth.url()))
        .header("x-request-id", "build-42.step_7")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["x-request-id"],
        "build-42.step_7",
        "a sane id is kept"
    );
    // An id that could forge a log line is replaced by one of the server's.
    let r = http()
        .get(format!("{}/healthz", berth.url()))
        .header("x-request-id", "x\",\"identity\":\"admin")
        .send()
        .unwrap();
    let given = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(!given.is_empty() && !given.contains('"'), "{given}");
    let mut line = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(5), || {
            line = berth
                .log()
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["request_id"] == "build-42.step_7")
                .unwrap_or_default();
            !line.is_null()
        }),
        "{:?}",
        berth.log()
    );
    assert_eq!(line["identity"], "admin");
    assert_eq!(line["path"], "/v2/");
    assert_eq!(line["status"], 200);
    assert!(
        berth
            .log()
            .iter()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every line is JSON"
    );
}
