//! A registry on the other side of the network may answer anything: an endless manifest
//! (chunked, no length) is cut off at the client's bound instead of filling memory.

use std::io::{Read, Write};
use std::net::TcpListener;

use berth_client::{ClientError, RegistryClient};

/// A server that answers every request with an endless chunked body.
fn endless_registry() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut head = [0u8; 4096];
                let _ = stream.read(&mut head);
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ntransfer-encoding: chunked\r\n\r\n");
                let chunk = format!("10000\r\n{}\r\n", "a".repeat(0x10000));
                // Stops when the client hangs up, at most after 64 MiB.
                for _ in 0..1024 {
                    if stream.write_all(chunk.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_endless_manifest_is_cut_off_at_the_bound() {
    let addr = endless_registry();
    let client = RegistryClient::new(
        RegistryClient::default_http(false).unwrap(),
        &addr,
        true,
        None,
    );
    let err = client.manifest("team/app", "v1").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("larger than")),
        "{err}"
    );
}

/// A server that answers every request 404 with `body`.
fn answering(body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head);
            let _ = stream.write_all(
                format!(
                    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    addr
}

#[tokio::test]
async fn a_registrys_message_cannot_drive_the_terminal_or_flood_it() {
    let long = Box::leak(
        format!(
            r#"{{"errors":[{{"code":"MANIFEST_UNKNOWN","message":"\u001b]0;owned\u0007\u001b[2J{}"}}]}}"#,
            "x".repeat(10_000)
        )
        .into_boxed_str(),
    );
    let addr = answering(long);
    let client = RegistryClient::new(
        RegistryClient::default_http(false).unwrap(),
        &addr,
        true,
        None,
    );
    let err = client.manifest("team/app", "v1").await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ClientError::NotFound(_)), "{text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    assert!(text.contains("\\u{1b}]0;owned"), "shown, escaped: {text:?}");
    assert!(text.len() < 400, "bounded: {} characters", text.len());
}
