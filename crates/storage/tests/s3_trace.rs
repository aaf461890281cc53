//! The S3 backend carries the W3C `traceparent` of the request being served, so an object
//! store that traces joins berth's trace. A stand-in S3 endpoint on loopback records what
//! it is sent and answers 404.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use berth_oci::Digest;
use berth_storage::{BlobStore, S3BlobStore, S3Config};
use berth_telemetry::{Tracer, TracingSettings};

/// A stand-in endpoint: every request head it receives, lower-cased.
fn endpoint() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).to_ascii_lowercase());
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    (url, heads)
}

#[tokio::test]
async fn object_store_requests_carry_the_callers_trace() {
    let (url, heads) = endpoint();
    let store = S3BlobStore::new(S3Config {
        endpoint: Some(url),
        region: "garage".to_owned(),
        bucket: "blobs".to_owned(),
        prefix: String::new(),
        access_key_id: "key".to_owned(),
        secret_access_key: "secret".to_owned(),
        path_style: true,
        redirect: None,
    })
    .unwrap();
    let digest = Digest::sha256_of(b"absent");

    assert_eq!(store.stat(&digest).await.unwrap(), None);
    assert!(
        heads
            .lock()
            .unwrap()
            .iter()
            .all(|h| !h.contains("traceparent")),
        "no trace, no header"
    );

    let tracer = Tracer::start_exporting(TracingSettings {
        otlp_endpoint: "http://127.0.0.1:9".to_owned(),
        sample_ratio: 1.0,
        service_name: "berth".to_owned(),
        node: "test".to_owned(),
    });
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let span = tracer
        .start(
            Some(&format!("00-{trace}-00f067aa0ba902b7-01")),
            "HEAD /v2/{name}/blobs/{digest}",
        )
        .unwrap();
    let span_id = span.context().header()[36..52].to_owned();
    let found = tracer.in_span(&span, store.stat(&digest)).await.unwrap();
    assert_eq!(found, None);
    let heads = heads.lock().unwrap();
    let traced = heads.last().unwrap();
    assert!(
        traced.contains(&format!("traceparent: 00-{trace}-{span_id}-01")),
        "the request carries the serving span as parent: {traced}"
    );
}
