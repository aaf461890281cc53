//! A small registry that behaves like Docker Hub where a pull-through cache notices:
//! the token flow (a realm, a service, scopes; credentials checked at the token
//! endpoint only), `RateLimit-Limit`/`RateLimit-Remaining` on manifest answers and `429`
//! once the manifest GETs run out (HEADs are free, as on the Hub), and two faults to
//! switch on: blobs with one byte flipped, and blobs sent slowly. Every request is
//! recorded, so tests can say what reached the upstream.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_oci::Digest;

/// One request as the hub saw it.
#[derive(Debug, Clone)]
pub struct HubRequest {
    /// `GET`, `HEAD`…
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

#[derive(Default)]
struct HubState {
    blobs: HashMap<String, Vec<u8>>,
    /// (repository, reference) → (media type, bytes).
    manifests: HashMap<(String, String), (String, Vec<u8>)>,
    requests: Vec<HubRequest>,
    tokens: Vec<String>,
    manifest_gets: u64,
    flip_bytes: bool,
    bytes_per_second: Option<u64>,
    /// Blob bytes written to sockets, by digest.
    sent: HashMap<String, u64>,
}

/// The hub; it stops accepting when dropped.
pub struct HubServer {
    addr: SocketAddr,
    state: Arc<Mutex<HubState>>,
    stopped: Arc<AtomicBool>,
}

/// What the hub asks of its clients.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// `(user, password)` the token endpoint wants; anonymous tokens without.
    pub credentials: Option<(String, String)>,
    /// Manifest GETs allowed before `429`.
    pub rate_limit: Option<u64>,
}

impl HubServer {
    /// Starts the hub on `127.0.0.1:<free port>`.
    pub fn start(options: HubOptions) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hub");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("hub address");
        let state: Arc<Mutex<HubState>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let (s, stop) = (state.clone(), stopped.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let state = s.clone();
                        let options = options.clone();
                        std::thread::spawn(move || serve(stream, addr, &state, &options));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HubServer {
            addr,
            state,
            stopped,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores an OCI image of `layers` under `repo:tag`; returns the manifest's digest,
    /// its bytes and the layers' digests.
    pub fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[&[u8]],
    ) -> (String, Vec<u8>, Vec<String>) {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"tag":"{tag}"}}"#
        );
        let mut state = self.state();
        let config_digest = Digest::sha256_of(config.as_bytes()).to_string();
        state
            .blobs
            .insert(config_digest.clone(), config.clone().into_bytes());
        let mut descriptors = Vec::new();
        let mut digests = Vec::new();
        for layer in layers {
            let digest = Digest::sha256_of(layer).to_string();
            state.blobs.insert(digest.clone(), layer.to_vec());
            descriptors.push(format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{digest}","size":{}}}"#,
                layer.len()
            ));
            digests.push(digest);
        }
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            descriptors.join(",")
        )
        .into_bytes();
        let digest = Digest::sha256_of(&manifest).to_string();
        let media_type = "application/vnd.oci.image.manifest.v1+json".to_owned();
        for reference in [tag.to_owned(), digest.clone()] {
            state.manifests.insert(
                (repo.to_owned(), reference),
                (media_type.clone(), manifest.clone()),
            );
        }
        (digest, manifest, digests)
    }

    /// Sends blobs with one byte flipped (from now on).
    pub fn flip_bytes(&self, on: bool) {
        self.state().flip_bytes = on;
    }

    /// Sends blobs at about this many bytes a second (`None`: as fast as it can).
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        self.state().bytes_per_second = bytes_per_second;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<HubRequest> {
        self.state().requests.clone()
    }

    /// Requests with `method` whose path contains `part`.
    pub fn count(&self, method: &str, part: &str) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.method == method && r.path.contains(part))
            .count()
    }

    /// Authorized `GET`s whose path contains `part`: fetches, not the 401s before them.
    pub fn fetches(&self, part: &str) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains(part))
            .filter(|r| {
                r.authorization
                    .as_deref()
                    .is_some_and(|a| a.starts_with("Bearer "))
            })
            .count()
    }

    /// Bytes of blob `digest` written to sockets so far.
    pub fn sent(&self, digest: &str) -> u64 {
        self.state().sent.get(digest).copied().unwrap_or(0)
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn error(stream: &mut TcpStream, status: &str, code: &str, extra: &[(&str, String)]) {
    let body = format!(r#"{{"errors":[{{"code":"{code}","message":"{code}"}}]}}"#);
    let mut headers = vec![("content-type", "application/json".to_owned())];
    headers.extend(extra.iter().cloned());
    respond(stream, status, &headers, body.as_bytes());
}

fn serve(stream: TcpStream, addr: SocketAddr, state: &Mutex<HubState>, options: &HubOptions) {
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
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
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length.min(1 << 20)];
    let _ = reader.read_exact(&mut body);
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let authorization = headers.get("authorization").cloned();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    lock().requests.push(HubRequest {
        method: method.clone(),
        path: path.clone(),
        authorization: authorization.clone(),
    });

    if path == "/token" {
        if let Some((user, password)) = &options.credentials {
            let expected = format!(
                "Basic {}",
                base64_encode(format!("{user}:{password}").as_bytes())
            );
            if authorization.as_deref() != Some(expected.as_str()) {
                return error(&mut stream, "401 Unauthorized", "UNAUTHORIZED", &[]);
            }
        }
        let token = {
            let mut s = lock();
            let token = format!("hub-token-{}", s.tokens.len());
            s.tokens.push(token.clone());
            token
        };
        let body = format!(r#"{{"token":"{token}","access_token":"{token}","expires_in":300}}"#);
        return respond(
            &mut stream,
            "200 OK",
            &[("content-type", "application/json".to_owned())],
            body.as_bytes(),
        );
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return error(&mut stream, "404 Not Found", "NOT_FOUND", &[]);
    };
    let bearer_ok = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| lock().tokens.iter().any(|known| known == t));
    if !bearer_ok {
        let repo = rest
            .rsplit_once("/manifests/")
            .or_else(|| rest.rsplit_once("/blobs/"))
            .map(|(r, _)| r.to_owned())
            .unwrap_or_default();
        let challenge = format!(
            r#"Bearer realm="http://{addr}/token",service="hub.test",scope="repository:{repo}:pull""#
        );
        return error(
            &mut stream,
            "401 Unauthorized",
            "UNAUTHORIZED",
            &[("www-authenticate", challenge)],
        );
    }
    if rest.is_empty() {
        return respond(&mut stream, "200 OK", &[], b"{}");
    }
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        let found = lock()
            .manifests
            .get(&(repo.to_owned(), reference.to_owned()))
            .cloned();
        let mut limit_headers = Vec::new();
        if let Some(limit) = options.rate_limit {
            let used = {
                let mut s = lock();
                if method == "GET" {
                    s.manifest_gets += 1;
                }
                s.manifest_gets
            };
            limit_headers.push(("ratelimit-limit", format!("{limit};w=21600")));
            limit_headers.push((
                "ratelimit-remaining",
                format!("{};w=21600", limit.saturating_sub(used)),
            ));
            if used > limit && method == "GET" {
                return error(
                    &mut stream,
                    "429 Too Many Requests",
                    "TOOMANYREQUESTS",
                    &limit_headers,
                );
            }
        }
        let Some((media_type, bytes)) = found else {
            return error(
                &mut stream,
                "404 Not Found",
                "MANIFEST_UNKNOWN",
                &limit_headers,
            );
        };
        let mut headers = vec![
            ("content-type", media_type),
            (
                "docker-content-digest",
                Digest::sha256_of(&bytes).to_string(),
            ),
        ];
        headers.extend(limit_headers);
        if method == "HEAD" {
            let mut head = "HTTP/1.1 200 OK\r\nconnection: close\r\n".to_owned();
            for (name, value) in &headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str(&format!("content-length: {}\r\n\r\n", bytes.len()));
            let _ = stream.write_all(head.as_bytes());
            return;
        }
        return respond(&mut stream, "200 OK", &headers, &bytes);
    }
    if let Some((_, digest)) = rest.rsplit_once("/blobs/") {
        let (found, flip, rate) = {
            let s = lock();
            (
                s.blobs.get(digest).cloned(),
                s.flip_bytes,
                s.bytes_per_second,
            )
        };
        let Some(mut bytes) = found else {
            return error(&mut stream, "404 Not Found", "BLOB_UNKNOWN", &[]);
        };
        let mut head = format!(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            bytes.len()
        );
        if method == "HEAD" {
            let _ = stream.write_all(head.as_bytes());
            return;
        }
        if flip && !bytes.is_empty() {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0xff;
        }
        head.shrink_to_fit();
        if stream.write_all(head.as_bytes()).is_err() {
            return;
        }
        for piece in bytes.chunks(64 * 1024) {
            if stream.write_all(piece).is_err() {
                return;
            }
            *lock().sent.entry(digest.to_owned()).or_default() += piece.len() as u64;
            if let Some(rate) = rate {
                std::thread::sleep(Duration::from_secs_f64(piece.len() as f64 / rate as f64));
            }
        }
        return;
    }
    error(&mut stream, "404 Not Found", "NOT_FOUND", &[])
}

/// Standard base64, for the Basic credentials the token endpoint expects.
fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
