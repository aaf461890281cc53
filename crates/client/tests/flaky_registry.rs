//! A registry whose connections break in the middle of a blob: a download goes on from
//! where it was cut (in the same pull, and in a later pull after the process died), and a
//! chunked push sends again only what the registry says it lacks. The registry here is
//! a small HTTP server that records what it was asked, so the test can see the ranges.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use berth_client::{ClientError, Endpoint, ImageRef, OciLayout, Platform, RegistryClient};
use berth_oci::Digest;
use bytes::Bytes;

/// What the server holds and how it misbehaves.
#[derive(Default)]
struct Behaviour {
    /// Blobs by digest.
    blobs: HashMap<String, Vec<u8>>,
    /// The image manifest served for every tag.
    manifest: Vec<u8>,
    /// Requests seen: method, path, and the `Range`/`Content-Range` header.
    seen: Vec<(String, String, Option<String>)>,
    /// Cut the next blob GETs after this many bytes (one entry per GET to cut).
    cut_gets_after: Vec<usize>,
    /// Answer ranged GETs with the whole blob (a registry without range support).
    ignore_ranges: bool,
    /// Cut the next PATCHes after reading this many bytes of their body.
    cut_patches_after: Vec<usize>,
    /// The upload in progress.
    upload: Vec<u8>,
    /// Body bytes served for blob GETs, in all.
    served: usize,
}

type Shared = Arc<Mutex<Behaviour>>;

fn start(behaviour: Shared) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let behaviour = behaviour.clone();
            std::thread::spawn(move || serve(stream, behaviour));
        }
    });
    addr
}

/// Answers one request per connection (`connection: close`).
fn serve(stream: TcpStream, behaviour: Shared) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let range = headers
        .get("range")
        .or_else(|| headers.get("content-range"))
        .cloned();
    let mut state = behaviour.lock().unwrap();
    state
        .seen
        .push((method.clone(), path.clone(), range.clone()));
    let respond =
        |stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]| {
            let mut head = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        };
    match (method.as_str(), path.as_str()) {
        ("GET", p) if p.contains("/manifests/") => {
            let body = state.manifest.clone();
            respond(
                &mut stream,
                "200 OK",
                &[(
                    "content-type",
                    "application/vnd.oci.image.manifest.v1+json".into(),
                )],
                &body,
            );
        }
        ("HEAD", p) if p.contains("/blobs/sha256:") => {
            respond(&mut stream, "404 Not Found", &[], b"");
        }
        ("GET", p) if p.contains("/blobs/sha256:") => {
            let digest = p.rsplit('/').next().unwrap_or_default();
            let Some(blob) = state.blobs.get(digest).cloned() else {
                respond(&mut stream, "404 Not Found", &[], b"");
                return;
            };
            let from = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|_| !state.ignore_ranges)
                .unwrap_or(0);
            let body = &blob[from..];
            let (status, mut extra) = if from > 0 {
                (
                    "206 Partial Content",
                    vec![(
                        "content-range",
                        format!("bytes {from}-{}/{}", blob.len() - 1, blob.len()),
                    )],
                )
            } else {
                ("200 OK", vec![])
            };
            extra.push(("content-type", "application/octet-stream".into()));
            let mut head = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
            for (name, value) in &extra {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
            let _ = stream.write_all(head.as_bytes());
            // Only layers are cut, not the small config fetched beside them.
            let send = if state.cut_gets_after.is_empty() || blob.len() < 4096 {
                body.len()
            } else {
                state.cut_gets_after.remove(0).min(body.len())
            };
            state.served += send;
            let _ = stream.write_all(&body[..send]);
            // Dropping the stream here, short of the length promised, is the cut.
        }
        ("POST", p) if p.ends_with("/blobs/uploads/") => {
            state.upload.clear();
            respond(
                &mut stream,
                "202 Accepted",
                &[("location", "/v2/upload/1".into())],
                b"",
            );
        }
        ("PATCH", "/v2/upload/1") => {
            let length: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let start: usize = range
                .as_deref()
                .and_then(|r| r.split('-').next()?.parse().ok())
                .unwrap_or(usize::MAX);
            if start != state.upload.len() {
                respond(&mut stream, "416 Range Not Satisfiable", &[], b"");
                return;
            }
            let keep = if state.cut_patches_after.is_empty() {
                length
            } else {
                state.cut_patches_after.remove(0).min(length)
            };
            let mut body = vec![0u8; keep];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            state.upload.extend_from_slice(&body);
            if keep < length {
                // Hang up with the rest of the chunk unread.
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return;
            }
            let end = state.upload.len().saturating_sub(1);
            respond(
                &mut stream,
                "202 Accepted",
                &[
                    ("location", "/v2/upload/1".into()),
                    ("range", format!("0-{end}")),
                ],
                b"",
            );
        }
        ("GET", "/v2/upload/1") => {
            let end = state.upload.len().saturating_sub(1);
            respond(
                &mut stream,
                "204 No Content",
                &[
                    ("location", "/v2/upload/1".into()),
                    ("range", format!("0-{end}")),
                ],
                b"",
            );
        }
        ("PUT", "/v2/upload/1") => {
            let asked = target
                .split("digest=")
                .nth(1)
                .unwrap_or_default()
                .replace("%3A", ":");
            let length: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            state.upload.extend_from_slice(&body);
            let actual = Digest::sha256_of(&state.upload).to_string();
            if asked == actual {
                let upload = std::mem::take(&mut state.upload);
                state.blobs.insert(actual, upload);
                respond(&mut stream, "201 Created", &[], b"");
            } else {
                respond(
                    &mut stream,
                    "400 Bad Request",
                    &[],
                    br#"{"errors":[{"code":"DIGEST_INVALID","message":"digest mismatch"}]}"#,
                );
            }
        }
        _ => respond(&mut stream, "404 Not Found", &[], b""),
    }
}

/// Bytes that differ everywhere, so a misplaced range shows in the digest.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

const CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;

/// A server holding an image whose one layer is `layer`.
fn image_server(layer: &[u8]) -> (Shared, String, Digest) {
    let config = CONFIG;
    let config_digest = Digest::sha256_of(config);
    let layer_digest = Digest::sha256_of(layer);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest.to_string(), "size": layer.len()}],
    }))
    .unwrap();
    let behaviour = Shared::default();
    {
        let mut state = behaviour.lock().unwrap();
        state.manifest = manifest;
        state
            .blobs
            .insert(config_digest.to_string(), config.to_vec());
        state.blobs.insert(layer_digest.to_string(), layer.to_vec());
    }
    let addr = start(behaviour.clone());
    (behaviour, addr, layer_digest)
}

async fn pull_into(addr: &str, store: &OciLayout) -> Result<(), ClientError> {
    let client = RegistryClient::new(RegistryClient::default_http(false)?, addr, true, None);
    let image = ImageRef::parse(&format!("{addr}/team/app:v1"))?;
    let source = Endpoint::Registry {
        client: &client,
        image: &image,
    };
    berth_client::pull(&source, store, "v1", &Platform::host(), None)
        .await
        .map(|_| ())
}

fn layer_gets(behaviour: &Shared, layer: &Digest) -> Vec<Option<String>> {
    behaviour
        .lock()
        .unwrap()
        .seen
        .iter()
        .filter(|(m, p, _)| m == "GET" && p.ends_with(layer.as_str()))
        .map(|(_, _, range)| range.clone())
        .collect()
}

/// A client of the test registry at `addr` that pushes in 1 MiB chunks.
fn chunking_client(addr: &str) -> RegistryClient {
    RegistryClient::new(
        RegistryClient::default_http(false).unwrap(),
        addr,
        true,
        None,
    )
    .with_chunk_size(1024 * 1024)
}

#[tokio::test]
async fn a_cut_download_goes_on_from_where_it_stopped() {
    let layer = pattern(3 * 1024 * 1024 + 17);
    let (behaviour, addr, digest) = image_server(&layer);
    behaviour.lock().unwrap().cut_gets_after = vec![1_000_000, 0, 700_000];
    let dir = tempfile::tempdir().unwrap();
    let store = OciLayout::open(dir.path()).await.unwrap();

    pull_into(&addr, &store).await.unwrap();

    assert_eq!(std::fs::read(store.blob_file(&digest)).unwrap(), layer);
    assert_eq!(
        layer_gets(&behaviour, &digest),
        vec![
            None,
            Some("bytes=1000000-".to_owned()),
            Some("bytes=1000000-".to_owned()),
            Some("bytes=1700000-".to_owned()),
        ],
        "each attempt asks only for what is missing"
    );
    assert_eq!(
        behaviour.lock().unwrap().served,
        layer.len() + CONFIG.len(),
        "no byte of the layer is fetched twice"
    );
}

#[tokio::test]
async fn a_later_pull_finishes_what_a_dead_one_left() {
    let layer = pattern(2 * 1024 * 1024);
    let (behaviour, addr, digest) = image_server(&layer);
    let dir = tempfile::tempdir().unwrap();
    let store = OciLayout::open(dir.path()).await.unwrap();
    // What a pull killed half-way leaves behind.
    let partial = store
        .blob_file(&digest)
        .with_file_name(format!(".{}.partial", digest.hex()));
    std::fs::write(&partial, &layer[..1_234_567]).unwrap();

    pull_into(&addr, &store).await.unwrap();
    assert_eq!(std::fs::read(store.blob_file(&digest)).unwrap(), layer);
    assert!(!partial.exists());
    assert_eq!(
        layer_gets(&behaviour, &digest),
        vec![Some("bytes=1234567-".to_owned())]
    );
}

#[tokio::test]
async fn a_partial_file_that_does_not_match_is_thrown_away_never_kept() {
    let layer = pattern(1024 * 1024);
    let (behaviour, addr, digest) = image_server(&layer);
    let dir = tempfile::tempdir().unwrap();
    let store = OciLayout::open(dir.path()).await.unwrap();
    let partial = store
        .blob_file(&digest)
        .with_file_name(format!(".{}.partial", digest.hex()));
    std::fs::write(&partial, vec![0xAAu8; 4096]).unwrap();

    let err = pull_into(&addr, &store).await.unwrap_err();
    assert!(matches!(err, ClientError::Mismatch { .. }), "{err}");
    assert!(
        !store.blob_file(&digest).exists(),
        "a wrong blob is never stored"
    );
    assert!(!partial.exists(), "and its bytes are not kept for a resume");

    // The next pull starts afresh and succeeds.
    pull_into(&addr, &store).await.unwrap();
    assert_eq!(std::fs::read(store.blob_file(&digest)).unwrap(), layer);
    assert_eq!(layer_gets(&behaviour, &digest).last(), Some(&None));
}

#[tokio::test]
async fn a_registry_without_ranges_sends_the_blob_again_from_the_start() {
    let layer = pattern(1024 * 1024 + 3);
    let (behaviour, addr, digest) = image_server(&layer);
    {
        let mut state = behaviour.lock().unwrap();
        state.ignore_ranges = true;
        state.cut_gets_after = vec![500_000];
    }
    let dir = tempfile::tempdir().unwrap();
    let store = OciLayout::open(dir.path()).await.unwrap();
    pull_into(&addr, &store).await.unwrap();
    assert_eq!(std::fs::read(store.blob_file(&digest)).unwrap(), layer);
}

#[tokio::test]
async fn a_chunked_push_sends_again_only_what_the_registry_lacks() {
    let behaviour = Shared::default();
    // The second chunk is cut after 300,000 of its bytes.
    behaviour.lock().unwrap().cut_patches_after = vec![usize::MAX, 300_000];
    let addr = start(behaviour.clone());
    let client = chunking_client(&addr);
    let blob = pattern(3 * 1024 * 1024 + 5);
    let digest = Digest::sha256_of(&blob);
    let chunks: Vec<Result<Bytes, std::io::Error>> = blob
        .chunks(100_000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    client
        .push_blob(
            "team/app",
            &digest,
            blob.len() as u64,
            futures_util::stream::iter(chunks),
        )
        .await
        .unwrap();

    let state = behaviour.lock().unwrap();
    assert_eq!(state.blobs.get(digest.as_str()), Some(&blob));
    let patches: Vec<String> = state
        .seen
        .iter()
        .filter(|(m, ..)| m == "PATCH")
        .map(|(_, _, r)| r.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        patches,
        vec![
            "0-1048575",
            "1048576-2097151",
            "1348576-2097151",
            "2097152-3145727",
            "3145728-3145732",
        ],
        "the cut chunk is resumed at the registry's offset"
    );
    assert!(state
        .seen
        .iter()
        .any(|(m, p, _)| m == "GET" && p == "/v2/upload/1"));
}

#[tokio::test]
async fn a_small_blob_goes_in_one_request() {
    let behaviour = Shared::default();
    let addr = start(behaviour.clone());
    let client = chunking_client(&addr);
    let blob = pattern(1024 * 1024);
    let digest = Digest::sha256_of(&blob);
    let body = Bytes::from(blob.clone());
    client
        .push_blob(
            "team/app",
            &digest,
            blob.len() as u64,
            futures_util::stream::once(async move { Ok(body) }),
        )
        .await
        .unwrap();
    let state = behaviour.lock().unwrap();
    assert!(state.seen.iter().all(|(m, ..)| m != "PATCH"));
    assert_eq!(state.blobs.get(digest.as_str()), Some(&blob));
}

#[tokio::test]
async fn a_source_that_fails_mid_chunk_fails_the_push_and_nothing_is_resent() {
    let behaviour = Shared::default();
    let addr = start(behaviour.clone());
    let client = chunking_client(&addr);
    let digest = Digest::sha256_of(b"whatever");
    let body = futures_util::stream::iter(vec![
        Ok(Bytes::from(vec![1u8; 600_000])),
        Err(std::io::Error::other("the source registry hung up")),
    ]);
    let err = client
        .push_blob("team/app", &digest, 3 * 1024 * 1024, body)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("the source registry hung up")),
        "{err}"
    );
    // The chunk's request may or may not have reached the registry before the body
    // failed; it is never sent again, and nothing is stored.
    let state = behaviour.lock().unwrap();
    assert!(state.seen.iter().filter(|(m, ..)| m == "PATCH").count() <= 1);
    assert!(state.seen.iter().all(|(m, ..)| m != "PUT"));
    assert!(state.blobs.is_empty());
}

/// A resumed push whose earlier upload cannot be reached (the link is still down) fails
/// the attempt and keeps the upload for the next one, instead of sending the whole blob
/// again under a new session; an upload the registry answers for goes on.
#[tokio::test]
async fn a_resumed_push_whose_upload_cannot_be_reached_keeps_it_for_the_next_attempt() {
    let behaviour = Shared::default();
    let addr = start(behaviour.clone());
    let client = chunking_client(&addr);
    let blob = pattern(2 * 1024 * 1024 + 7);
    let digest = Digest::sha256_of(&blob);
    let open = |offset: u64| {
        let rest = Bytes::copy_from_slice(&blob[offset as usize..]);
        async move {
            Ok::<_, ClientError>(futures_util::stream::iter(vec![Ok::<_, std::io::Error>(
                rest,
            )]))
        }
    };
    // Nothing listens on port 1 of the loopback address.
    let unreachable = url::Url::parse("http://127.0.0.1:1/v2/upload/1").unwrap();
    let upload = Mutex::new(Some(unreachable.clone()));
    let result = client
        .push_blob_resuming("team/app", &digest, blob.len() as u64, &upload, open)
        .await;
    assert!(
        matches!(result, Err(ClientError::Unreachable(_))),
        "{result:?}"
    );
    assert_eq!(upload.lock().unwrap().as_ref(), Some(&unreachable));
    assert!(
        behaviour.lock().unwrap().seen.is_empty(),
        "no new session was opened"
    );

    // The next attempt finds nothing held there either way: here the registry is
    // reachable and holds no session yet, so the blob goes up from the start.
    let upload = Mutex::new(None);
    let sent = client
        .push_blob_resuming("team/app", &digest, blob.len() as u64, &upload, open)
        .await
        .unwrap();
    assert_eq!(sent, blob.len() as u64);
    assert_eq!(upload.lock().unwrap().as_ref(), None);
    assert_eq!(
        behaviour.lock().unwrap().blobs.get(digest.as_str()),
        Some(&blob)
    );
}
