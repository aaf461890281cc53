//! A load generator for `bench/regbench.py push-image-many --pusher`: pushes many small
//! images from several clients at once, as docker does (HEAD each blob, POST and a
//! monolithic PUT for the missing ones, then the manifest by tag), then pulls every one
//! back and checks its bytes. Compiled, so that the load generator takes little of the
//! benchmark machine's CPU: the Python client took about a third of it during berth's
//! runs, as `wrk` and `ab` are used for the reads for the same reason.
//!
//! Usage: `pushgen push|verify URL REPO IMAGES LAYERS SHARED_LAYERS LAYER_SIZE CLIENTS SEED`.
//! The images follow from the arguments alone, so `verify` with the same ones checks
//! what `push` stored, outside the timed run. Prints one JSON object: the wall time of
//! the pushes or checks, per-image latencies, request and upload counts, and the first
//! failures.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use sha2::{Digest as _, Sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn digest_of(bytes: &[u8]) -> String {
    let sum = Sha256::digest(bytes);
    let hex: String = sum.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Bytes no other image shares: xorshift from a seed (layers are opaque to a registry).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One image: its blobs (layers, then the config) and its manifest.
struct Image {
    tag: String,
    blobs: Vec<(String, Vec<u8>)>,
    manifest: Vec<u8>,
    manifest_digest: String,
}

/// The images to push: `shared` layers common to all, the rest and the config their own.
fn build_images(count: usize, layers: usize, shared: usize, size: usize, seed: u64) -> Vec<Image> {
    let base: Vec<Vec<u8>> = (0..shared)
        .map(|i| noise(seed ^ (i as u64 + 1), size))
        .collect();
    (0..count)
        .map(|i| {
            let mut layer_bytes = base.clone();
            for l in shared..layers {
                let own = seed ^ ((i as u64 + 1) << 20) ^ (l as u64 + 1);
                layer_bytes.push(noise(own, size));
            }
            let layer_digests: Vec<String> = layer_bytes.iter().map(|b| digest_of(b)).collect();
            let config = serde_json::json!({
                "architecture": "amd64", "os": "linux",
                "config": {"Labels": {"pushgen.nonce": format!("{seed}-{i}")}},
                "rootfs": {"type": "layers", "diff_ids": layer_digests},
            })
            .to_string()
            .into_bytes();
            let manifest = serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": digest_of(&config), "size": config.len()},
                "layers": layer_digests.iter().zip(&layer_bytes)
                    .map(|(d, b)| serde_json::json!({"mediaType": OCI_LAYER, "digest": d, "size": b.len()}))
                    .collect::<Vec<_>>(),
            })
            .to_string()
            .into_bytes();
            let mut blobs: Vec<(String, Vec<u8>)> =
                layer_digests.into_iter().zip(layer_bytes).collect();
            blobs.push((digest_of(&config), config));
            Image {
                tag: format!("img{i}"),
                manifest_digest: digest_of(&manifest),
                blobs,
                manifest,
            }
        })
        .collect()
}

/// An answer: status, the headers asked for, and the body.
struct Answer {
    status: u16,
    location: Option<String>,
    body: Vec<u8>,
}

/// One kept-alive HTTP/1.1 connection.
struct Connection {
    host: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    requests: usize,
}

impl Connection {
    fn open(host: &str) -> std::io::Result<Self> {
        let stream = TcpStream::connect(host)?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            host: host.to_owned(),
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            requests: 0,
        })
    }

    fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if method != "GET" && method != "HEAD" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.writer.write_all(&out)?;
        self.requests += 1;
        self.read_answer(method == "HEAD")
    }

    fn read_answer(&mut self, head_only: bool) -> std::io::Result<Answer> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let (mut length, mut chunked, mut location) = (0usize, false, None);
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "location" => location = Some(value.to_owned()),
                _ => {}
            }
        }
        let mut body = Vec::new();
        if head_only {
            // A HEAD answer names a length but carries no body.
        } else if chunked {
            self.read_chunks(&mut body)?;
        } else {
            body.resize(length, 0);
            self.reader.read_exact(&mut body)?;
        }
        Ok(Answer {
            status,
            location,
            body,
        })
    }

    /// A chunked body, whose chunks each state their length.
    fn read_chunks(&mut self, body: &mut Vec<u8>) -> std::io::Result<()> {
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(std::io::Error::other)?;
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk)?;
            if size == 0 {
                return Ok(());
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
}

/// The path of a `Location` that may be an absolute URL.
fn path_of(location: &str) -> &str {
    match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => location,
    }
}

/// Pushes one image as docker does; how many of its blobs were uploaded.
fn push_image(c: &mut Connection, repo: &str, image: &Image) -> Result<usize, String> {
    let mut uploaded = 0;
    for (digest, bytes) in &image.blobs {
        let head = c
            .send("HEAD", &format!("/v2/{repo}/blobs/{digest}"), &[], &[])
            .map_err(|e| e.to_string())?;
        match head.status {
            200 => continue,
            404 => {}
            other => return Err(format!("HEAD {digest}: {other}")),
        }
        let started = c
            .send("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[])
            .map_err(|e| e.to_string())?;
        let location = match (started.status, started.location) {
            (202, Some(l)) => l,
            (status, _) => return Err(format!("POST upload: {status}")),
        };
        let path = path_of(&location);
        let join = if path.contains('?') { '&' } else { '?' };
        let put = c
            .send(
                "PUT",
                &format!("{path}{join}digest={digest}"),
                &[("Content-Type", "application/octet-stream")],
                bytes,
            )
            .map_err(|e| e.to_string())?;
        if put.status != 201 {
            return Err(format!("PUT {digest}: {}", put.status));
        }
        uploaded += 1;
    }
    let put = c
        .send(
            "PUT",
            &format!("/v2/{repo}/manifests/{}", image.tag),
            &[("Content-Type", OCI_MANIFEST)],
            &image.manifest,
        )
        .map_err(|e| e.to_string())?;
    if put.status != 201 {
        return Err(format!(
            "PUT manifest {}: {} {}",
            image.tag,
            put.status,
            String::from_utf8_lossy(&put.body)
        ));
    }
    Ok(uploaded)
}

/// Pulls one image back: its manifest by tag and every blob, each checked by digest.
fn verify_image(c: &mut Connection, repo: &str, image: &Image) -> Result<(), String> {
    let got = c
        .send(
            "GET",
            &format!("/v2/{repo}/manifests/{}", image.tag),
            &[("Accept", OCI_MANIFEST)],
            &[],
        )
        .map_err(|e| e.to_string())?;
    if got.status != 200 || digest_of(&got.body) != image.manifest_digest {
        return Err(format!("GET manifest {}: {}", image.tag, got.status));
    }
    for (digest, bytes) in &image.blobs {
        let got = c
            .send("GET", &format!("/v2/{repo}/blobs/{digest}"), &[], &[])
            .map_err(|e| e.to_string())?;
        if got.status != 200 || got.body.len() != bytes.len() || digest_of(&got.body) != *digest {
            return Err(format!("GET blob {digest}: {}", got.status));
        }
    }
    Ok(())
}

/// Runs `work` on every image from `clients` threads, each with its own connection, and
/// collects the latency of each success and the first failures.
fn run_all<T: Send>(
    host: &str,
    images: &[Image],
    clients: usize,
    work: impl Fn(&mut Connection, &Image) -> Result<T, String> + Sync,
) -> (Vec<(f64, T)>, Vec<String>, usize) {
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::new());
    let failed = Mutex::new(Vec::new());
    let requests = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| {
                let mut connection = match Connection::open(host) {
                    Ok(c) => c,
                    Err(e) => return failed.lock().unwrap().push(format!("connect: {e}")),
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(image) = images.get(i) else { break };
                    let began = Instant::now();
                    match work(&mut connection, image) {
                        Ok(value) => done
                            .lock()
                            .unwrap()
                            .push((began.elapsed().as_secs_f64(), value)),
                        Err(e) => {
                            failed.lock().unwrap().push(format!("{}: {e}", image.tag));
                            match Connection::open(host) {
                                Ok(c) => connection = c,
                                Err(_) => break,
                            }
                        }
                    }
                }
                requests.fetch_add(connection.requests, Ordering::Relaxed);
            });
        }
    });
    (
        done.into_inner().unwrap(),
        failed.into_inner().unwrap(),
        requests.into_inner(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 9 || !matches!(args[0].as_str(), "push" | "verify") {
        eprintln!(
            "usage: pushgen push|verify URL REPO IMAGES LAYERS SHARED_LAYERS LAYER_SIZE CLIENTS SEED"
        );
        std::process::exit(2);
    }
    let host = args[1]
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let repo = &args[2];
    let number = |i: usize| -> usize {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("pushgen: argument {} is not a number: {:?}", i + 1, args[i]);
            std::process::exit(2)
        })
    };
    let (count, layers, shared, size, clients) =
        (number(3), number(4), number(5), number(6), number(7));
    let seed = number(8) as u64;
    let images = build_images(count, layers, shared.min(layers), size, seed);

    let began = Instant::now();
    let (done, errors, requests) = if args[0] == "push" {
        run_all(&host, &images, clients, |c, image| {
            push_image(c, repo, image)
        })
    } else {
        run_all(&host, &images, clients, |c, image| {
            verify_image(c, repo, image).map(|()| 0)
        })
    };
    let wall = began.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "wall_s": wall,
        "latencies_s": done.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        "uploaded": done.iter().map(|(_, n)| *n).sum::<usize>(),
        "requests": requests,
        "errors": errors.len(),
        "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
    });
    println!("{report}");
}
