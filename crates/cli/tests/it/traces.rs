//! OpenTelemetry traces over OTLP/HTTP, decoded by a collector stub the test runs: a
//! request carrying a sampled `traceparent` is recorded as a span of that trace (named by
//! its route template, carrying repository, digest and node) with the metadata and blob
//! store operations it made as children; an unsampled one is not, nor are requests
//! without a parent at a sampling ratio of 0.

use std::time::Duration;

use berth_testkit::{wait_until, BerthProcess, WebhookReceiver};
use reqwest::StatusCode;
use serde_json::Value;

use crate::*;

/// Every span the collector received, flattened, each with its resource attributes.
fn spans(collector: &WebhookReceiver) -> Vec<(Value, Value)> {
    let mut all = Vec::new();
    for request in collector.requests() {
        assert_eq!(request.path, "/v1/traces");
        assert_eq!(request.headers["content-type"], "application/json");
        let body: Value = serde_json::from_slice(&request.body).expect("OTLP JSON");
        for resource_spans in body["resourceSpans"].as_array().unwrap() {
            for scope in resource_spans["scopeSpans"].as_array().unwrap() {
                for span in scope["spans"].as_array().unwrap() {
                    all.push((resource_spans["resource"].clone(), span.clone()));
                }
            }
        }
    }
    all
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[test]
fn sampled_requests_become_spans_with_store_children_and_the_callers_trace() {
    let collector = WebhookReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(
        &config,
        format!(
            "[tracing]\notlp_endpoint = \"{}\"\nsample_ratio = 0.0\nnode = \"node-a\"\n",
            collector.url("")
        ),
    )
    .unwrap();
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_berth"));
    let berth = BerthProcess::spawn_with(
        binary,
        &dir.path().join("data"),
        &["--auth", "none", "--config", config.to_str().unwrap()],
        &[],
    );
    let base = berth.url();
    let (digest, _) = push_image(&base, "team/app", "v1", &[b"traced layer"]);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let pull = |traceparent: &str| {
        let r = http()
            .get(format!("{base}/v2/team/app/manifests/v1"))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .header("traceparent", traceparent)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    };
    pull(&format!("00-{trace}-{parent}-01"));
    pull("00-11111111111111111111111111111111-2222222222222222-00");
    pull("not a trace context");

    assert!(
        wait_until(Duration::from_secs(20), || !spans(&collector).is_empty()),
        "nothing reached the collector"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let all = spans(&collector);
    assert!(
        all.iter().all(|(_, s)| s["traceId"] == trace),
        "only the sampled trace is recorded: {all:?}"
    );
    let (resource, server) = all
        .iter()
        .find(|(_, s)| s["kind"] == 2)
        .expect("a server span");
    assert_eq!(server["name"], "GET /v2/{name}/manifests/{reference}");
    assert_eq!(
        server["parentSpanId"], parent,
        "a child of the caller's span"
    );
    assert_eq!(
        attribute(server, "berth.repository").unwrap()["stringValue"],
        "team/app"
    );
    assert_eq!(
        attribute(server, "berth.digest").unwrap()["stringValue"],
        digest.as_str()
    );
    assert_eq!(
        attribute(server, "berth.node").unwrap()["stringValue"],
        "node-a"
    );
    assert_eq!(
        attribute(server, "http.response.status_code").unwrap()["intValue"],
        "200"
    );
    let service = resource["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["key"] == "service.name")
        .unwrap();
    assert_eq!(service["value"]["stringValue"], "berth");
    let start: u128 = server["startTimeUnixNano"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let end: u128 = server["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(end >= start);

    let children: Vec<&Value> = all
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s["parentSpanId"] == server["spanId"])
        .collect();
    assert!(
        children.iter().any(|c| c["name"] == "metadata read"
            && attribute(c, "berth.backend").unwrap()["stringValue"] == "sqlite"),
        "the manifest lookup is a child span: {children:?}"
    );
    let metrics = http()
        .get(format!("{base}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("berth_trace_spans_dropped_total 0"),
        "{metrics}"
    );
}
