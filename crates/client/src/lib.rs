//! One client for OCI Distribution registries. Everything berth says to another registry
//! goes through [`RegistryClient`]: the CLI's `copy`, `pull` and `push`, the pull-through cache, and
//! replication next. It authenticates as the registry's challenge asks (Basic, or the
//! Docker token flow with tokens cached per scope), streams blobs through without holding
//! them, verifies every digest and size it reads, and retries what is safe to retry.
//!
//! The HTTP client is the caller's: the CLI builds an ordinary one, while the registry's
//! own outbound jobs build theirs with `berth_outbound`'s guard.

mod auth;
mod chunked;
mod copy;
pub mod credentials;
mod endpoint;
mod layout;
mod listing;
mod pull;
mod reference;
mod referrers;
mod tls;
pub mod unpack;
mod upload;
mod verify;

use std::time::Duration;

use berth_oci::Digest;
use bytes::Bytes;
use futures_util::Stream;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RANGE, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode};

pub use auth::{Credentials, IDENTITY_TOKEN_USER};
pub use copy::{copy, BlobOutcome, CopyOptions, CopyReport, Progress, ProgressSink, SharedBlobs};
pub use endpoint::{BlobStream, Endpoint, LocalRepository};
pub use layout::OciLayout;
pub use listing::MAX_LISTED;
pub use pull::{inspect, pull, resolve, unpack, Platform, UnpackReport};
pub use reference::ImageRef;
pub use verify::VerifiedStream;

use auth::{Challenge, TokenCache};

/// Why a registry operation failed, in the words a person needs.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The reference cannot be parsed.
    #[error("bad image reference {0}")]
    BadReference(String),
    /// The registry could not be reached.
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    /// The registry wants credentials (none were given, or they were refused).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The credentials were accepted but do not allow this.
    #[error("denied: {0}")]
    Denied(String),
    /// The repository, manifest or blob does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The bytes read do not match their digest or size.
    #[error("{what}: expected {expected}, got {actual}")]
    Mismatch {
        /// What was read.
        what: String,
        /// What the reference promised.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// The registry answered something else.
    #[error("the registry answered {status}: {message}")]
    Registry {
        /// The HTTP status.
        status: u16,
        /// The registry's own message.
        message: String,
    },
    /// The registry broke the protocol (a missing header, an unreadable answer).
    #[error("protocol: {0}")]
    Protocol(String),
}

impl ClientError {
    pub(crate) fn unreachable(e: reqwest::Error) -> ClientError {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        ClientError::Unreachable(text)
    }

    /// The error for a non-success status, with the registry's own message (the first
    /// of an OCI error body, or the body's start).
    pub(crate) fn from_status(status: u16, body: &str, what: &str) -> ClientError {
        let oci: Option<String> = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                let e = &v["errors"][0];
                Some(format!(
                    "{} ({})",
                    printable(e["message"].as_str()?),
                    printable(e["code"].as_str().unwrap_or(""))
                ))
            });
        let message = oci.unwrap_or_else(|| {
            let text = printable(body.trim());
            if text.is_empty() {
                what.to_owned()
            } else {
                format!("{what}: {text}")
            }
        });
        match status {
            401 => ClientError::Unauthorized(message),
            403 => ClientError::Denied(message),
            404 => ClientError::NotFound(message),
            _ => ClientError::Registry { status, message },
        }
    }
}

/// A manifest as fetched: its exact bytes, media type and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The bytes, as the registry stores them.
    pub bytes: Bytes,
    /// Its media type (the `Content-Type` it was served with).
    pub media_type: String,
    /// The digest of its bytes.
    pub digest: Digest,
}

/// Every manifest media type a client accepts.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The most bytes of a manifest read: no registry serves bigger ones.
const MAX_MANIFEST: usize = 4 * 1024 * 1024;
/// The smallest push chunk taken; some registries refuse smaller chunks but the last.
const MIN_CHUNK_SIZE: u64 = 1024 * 1024;
/// How many times a request that failed in a way worth retrying is tried.
pub(crate) const ATTEMPTS: u32 = 3;

/// A client for one registry.
pub struct RegistryClient {
    http: reqwest::Client,
    base: String,
    credentials: Option<Credentials>,
    tokens: TokenCache,
    /// The registry asked for Basic: send it up front from then on.
    basic: std::sync::atomic::AtomicBool,
    /// Blobs larger than this are pushed in chunks of this size.
    chunk_size: u64,
    /// The last `RateLimit-Remaining` the registry sent (`u64::MAX`: none yet).
    rate_limit_remaining: std::sync::atomic::AtomicU64,
}

/// The default push chunk: big enough that the requests cost little next to the bytes,
/// small enough to sit in memory for a retry and to pass proxies that cap a request body.
pub const DEFAULT_CHUNK_SIZE: u64 = 32 * 1024 * 1024;

impl RegistryClient {
    /// A client for `registry` (`host[:port]`) over `http`, plain HTTP if `plain_http`.
    pub fn new(
        http: reqwest::Client,
        registry: &str,
        plain_http: bool,
        credentials: Option<Credentials>,
    ) -> RegistryClient {
        let scheme = if plain_http { "http" } else { "https" };
        RegistryClient {
            http,
            base: format!("{scheme}://{registry}"),
            credentials,
            tokens: TokenCache::default(),
            basic: std::sync::atomic::AtomicBool::new(false),
            chunk_size: DEFAULT_CHUNK_SIZE,
            rate_limit_remaining: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// How many requests the registry last said remain in its rate-limit window
    /// (`RateLimit-Remaining: 42;w=21600`, as Docker Hub sends), if it said.
    pub fn rate_limit_remaining(&self) -> Option<u64> {
        match self
            .rate_limit_remaining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            u64::MAX => None,
            n => Some(n),
        }
    }

    /// The size above which, and in which, blobs are pushed in chunks.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Pushes blobs larger than `bytes` in chunks of `bytes` (at least 1 MiB), for
    /// registries behind proxies that cap a request body.
    pub fn with_chunk_size(mut self, bytes: u64) -> RegistryClient {
        self.chunk_size = bytes.max(MIN_CHUNK_SIZE);
        self
    }

    /// `scheme://host[:port]`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request built by `build`, authenticating as the registry asks for `scope`
    /// and retrying connection errors, 5xx and 429 when `retry` (the request can be sent
    /// again: no streamed body).
    pub(crate) async fn send(
        &self,
        scope: &str,
        retry: bool,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, ClientError> {
        let mut attempt = 0;
        let mut authenticated_once = false;
        loop {
            attempt += 1;
            let mut request = build(&self.http);
            if let Some(token) = self.tokens.get(scope) {
                request = request.header(AUTHORIZATION, format!("Bearer {token}"));
            } else if self.basic.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(c) = &self.credentials {
                    request = request.header(AUTHORIZATION, c.basic());
                }
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) if retry && attempt < ATTEMPTS && (e.is_connect() || e.is_timeout()) => {
                    tokio::time::sleep(backoff(attempt, None)).await;
                    continue;
                }
                Err(e) => return Err(ClientError::unreachable(e)),
            };
            if let Some(remaining) = header(response.headers(), "ratelimit-remaining")
                .and_then(|v| v.split(';').next()?.trim().parse::<u64>().ok())
            {
                self.rate_limit_remaining.store(
                    remaining.min(u64::MAX - 1),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !authenticated_once {
                authenticated_once = true;
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                match challenge {
                    Some(Challenge::Basic) if self.credentials.is_some() => {
                        self.basic.store(true, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope: asked,
                    }) => {
                        // Our scope, which may be wider than the one challenged (a push
                        // also pulls what it mounts).
                        let wanted = if scope.is_empty() {
                            asked.unwrap_or_default()
                        } else {
                            scope.to_owned()
                        };
                        let token = self
                            .tokens
                            .fetch(
                                &self.http,
                                &realm,
                                service.as_deref(),
                                &wanted,
                                self.credentials.as_ref(),
                            )
                            .await?;
                        if wanted != scope {
                            // Only a request without a scope of its own gets here: send
                            // it with the token the challenge asked for.
                            let mut request = build(&self.http);
                            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
                            return request.send().await.map_err(ClientError::unreachable);
                        }
                        continue;
                    }
                    _ => {}
                }
            }
            let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
            if retry && retryable && attempt < ATTEMPTS {
                let after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                tokio::time::sleep(backoff(attempt, after)).await;
                continue;
            }
            return Ok(response);
        }
    }

    /// Reads a failed answer into the error it stands for.
    pub(crate) async fn failure(response: Response, what: &str) -> ClientError {
        let status = response.status().as_u16();
        let body = read_bounded(response, MAX_ERROR_BODY, what)
            .await
            .unwrap_or_default();
        ClientError::from_status(status, &String::from_utf8_lossy(&body), what)
    }

    /// Checks that the registry speaks the API and accepts the credentials (`GET /v2/`).
    pub async fn ping(&self) -> Result<(), ClientError> {
        let url = format!("{}/v2/", self.base);
        let response = self.send("", true, |http| http.get(&url)).await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(Self::failure(response, &format!("{}/v2/", self.base)).await)
        }
    }

    /// Fetches a manifest by tag or digest; verifies its digest when asked by digest.
    pub async fn manifest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Manifest, ClientError> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base);
        let scope = format!("repository:{repository}:pull");
        let response = self
            .send(&scope, true, |http| {
                http.get(&url).header(ACCEPT, MANIFEST_TYPES)
            })
            .await?;
        if !response.status().is_success() {
            return Err(
                Self::failure(response, &format!("manifest {repository}:{reference}")).await,
            );
        }
        let media_type = media_type_of(response.headers());
        let what = format!("manifest {repository}:{reference}");
        let bytes = read_bounded(response, MAX_MANIFEST, &what).await?;
        let digest = Digest::sha256_of(&bytes);
        if let Ok(asked) = Digest::parse(reference) {
            if !asked.matches(&bytes) {
                return Err(ClientError::Mismatch {
                    what: format!("manifest {repository}@{reference}"),
                    expected: asked.to_string(),
                    actual: digest.to_string(),
                });
            }
            return Ok(Manifest {
                bytes,
                media_type,
                digest: asked,
            });
        }
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// The digest (media type and size) a tag or digest names now, from a `HEAD`: how a cache
    /// revalidates a tag without a `GET` (registries that ration pulls count only GETs).
    /// `None` if the registry has no such manifest.
    pub async fn manifest_digest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<(Digest, String, Option<u64>)>, ClientError> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base);
        let scope = format!("repository:{repository}:pull");
        let response = self
            .send(&scope, true, |http| {
                http.head(&url).header(ACCEPT, MANIFEST_TYPES)
            })
            .await?;
        match response.status() {
            s if s.is_success() => {
                let digest = header(response.headers(), "docker-content-digest")
                    .and_then(|d| Digest::parse(&d).ok())
                    .ok_or_else(|| {
                        ClientError::Protocol(format!(
                            "manifest {repository}:{reference}: no Docker-Content-Digest"
                        ))
                    })?;
                let media_type = media_type_of(response.headers());
                let size =
                    header(response.headers(), "content-length").and_then(|v| v.parse().ok());
                Ok(Some((digest, media_type, size)))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(Self::failure(response, &format!("manifest {repository}:{reference}")).await),
        }
    }

    /// A range of the blob (`range` as a `Range` header says it, `bytes=0-99`), if the
    /// registry answers it with a 206: the `Content-Range` it sent (checked to be one
    /// well-formed range), the length and the bytes, not verified (a part cannot be).
    /// `None` when the registry answered with the whole blob instead.
    pub async fn blob_range(
        &self,
        repository: &str,
        digest: &Digest,
        range: &str,
    ) -> Result<
        Option<(
            String,
            u64,
            impl Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin + use<>,
        )>,
        ClientError,
    > {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let scope = format!("repository:{repository}:pull");
        let response = self
            .send(&scope, true, |http| http.get(&url).header(RANGE, range))
            .await?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let content_range = header(response.headers(), "content-range")
                    .filter(|r| well_formed_content_range(r))
                    .ok_or_else(|| {
                        ClientError::Protocol(format!(
                            "blob {digest}: a 206 without one well-formed Content-Range"
                        ))
                    })?;
                let length = response.content_length().ok_or_else(|| {
                    ClientError::Protocol(format!("blob {digest}: a 206 without a length"))
                })?;
                Ok(Some((
                    content_range,
                    length,
                    Box::pin(response.bytes_stream()),
                )))
            }
            s if s.is_success() => Ok(None),
            _ => Err(Self::failure(response, &format!("blob {repository}@{digest}")).await),
        }
    }

    /// The blob's bytes with their length, not verified: for a caller that hashes them
    /// itself, off the receiving path (the pull-through cache's fill does). Errors are
    /// `std::io::Error`s, so the stream can feed a writer directly.
    pub async fn fetch_blob_unverified(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<
        (
            u64,
            impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + use<>,
        ),
        ClientError,
    > {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let scope = format!("repository:{repository}:pull");
        let response = self.send(&scope, true, |http| http.get(&url)).await?;
        if !response.status().is_success() {
            return Err(Self::failure(response, &format!("blob {repository}@{digest}")).await);
        }
        let size = match response.content_length() {
            Some(size) => size,
            None => self
                .blob_size(repository, digest)
                .await?
                .ok_or_else(|| ClientError::NotFound(format!("blob {repository}@{digest}")))?,
        };
        use futures_util::TryStreamExt;
        Ok((
            size,
            Box::pin(response.bytes_stream().map_err(std::io::Error::other)),
        ))
    }

    /// The blob's size if the repository holds it.
    pub async fn blob_size(
        &self,
        repository: &str,
        digest: &Digest,
    ) -> Result<Option<u64>, ClientError> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let scope = format!("repository:{repository}:pull");
        let response = self.send(&scope, true, |http| http.head(&url)).await?;
        match response.status() {
            s if s.is_success() => Ok(Some(
                header(response.headers(), "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(Self::failure(response, &format!("blob {repository}@{digest}")).await),
        }
    }

    /// The blob's bytes as a stream that fails unless they hash to `digest` and number
    /// `size` (when known).
    pub async fn blob(
        &self,
        repository: &str,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<VerifiedStream, ClientError> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let scope = format!("repository:{repository}:pull");
        let response = self.send(&scope, true, |http| http.get(&url)).await?;
        if !response.status().is_success() {
            return Err(Self::failure(response, &format!("blob {repository}@{digest}")).await);
        }
        Ok(VerifiedStream::new(
            Box::pin(response.bytes_stream()),
            digest.clone(),
            size,
        ))
    }

    /// The blob's bytes from `offset` on, not verified (the caller hashes the whole blob),
    /// and whether the registry honoured the range: false means it sent the whole blob.
    pub(crate) async fn blob_from(
        &self,
        repository: &str,
        digest: &Digest,
        offset: u64,
    ) -> Result<
        (
            impl Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin,
            bool,
        ),
        ClientError,
    > {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let scope = format!("repository:{repository}:pull");
        let response = self
            .send(&scope, true, |http| {
                let request = http.get(&url);
                if offset > 0 {
                    request.header(RANGE, format!("bytes={offset}-"))
                } else {
                    request
                }
            })
            .await?;
        let ranged = match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let starts_at_offset =
                    header(response.headers(), "content-range").and_then(|range| {
                        let from = range.strip_prefix("bytes ")?.split('-').next()?;
                        from.parse::<u64>().ok()
                    }) == Some(offset);
                if !starts_at_offset {
                    return Err(ClientError::Protocol(format!(
                        "blob {digest}: the registry answered a range request from {offset} with another range"
                    )));
                }
                true
            }
            s if s.is_success() => false,
            _ => return Err(Self::failure(response, &format!("blob {repository}@{digest}")).await),
        };
        Ok((Box::pin(response.bytes_stream()), ranged))
    }
}

/// A response body read whole, but never more than `limit` bytes: a registry (or token
/// endpoint) on the other side of the network must not be able to fill memory.
pub(crate) async fn read_bounded(
    mut response: Response,
    limit: usize,
    what: &str,
) -> Result<Bytes, ClientError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ClientError::Protocol(format!(
            "{what} is larger than {limit} bytes"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ClientError::unreachable)? {
        if body.len() + chunk.len() > limit {
            return Err(ClientError::Protocol(format!(
                "{what} is larger than {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// `bytes <first>-<last>/<total>` with digits only (what may be passed on as a header).
fn well_formed_content_range(value: &str) -> bool {
    let Some(rest) = value.strip_prefix("bytes ") else {
        return false;
    };
    let Some((span, total)) = rest.split_once('/') else {
        return false;
    };
    let Some((first, last)) = span.split_once('-') else {
        return false;
    };
    let number = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    number(first) && number(last) && number(total)
}

/// A registry's words made safe for a terminal: at most 200 characters, control
/// characters (escape sequences among them) shown escaped rather than obeyed.
fn printable(text: &str) -> String {
    let mut shown = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == 200 {
            shown.push('…');
            break;
        }
        if c.is_control() {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

/// The most of an error answer read, for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The media type of an answer, without parameters.
fn media_type_of(headers: &HeaderMap) -> String {
    header(headers, CONTENT_TYPE.as_str())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

pub(crate) fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

/// The pause before attempt `attempt + 1`: what `Retry-After` asks (at most 30 s), else
/// doubling from half a second.
pub(crate) fn backoff(attempt: u32, retry_after_secs: Option<u64>) -> Duration {
    match retry_after_secs {
        Some(secs) => Duration::from_secs(secs.min(30)),
        None => Duration::from_millis(500 << attempt.min(6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_plain_content_range_is_passed_on() {
        assert!(well_formed_content_range("bytes 0-99/1000"));
        for bad in [
            "bytes 0-99/*",
            "bytes 0-99/1000, 200-299/1000",
            "bytes 0-99/1000\r\nx-injected: 1",
            "items 0-99/1000",
            "bytes -99/1000",
            "bytes 0-99",
            "bytes 0-99/100000000000000000000000",
        ] {
            assert!(!well_formed_content_range(bad), "{bad:?}");
        }
    }

    #[test]
    fn registry_words_are_bounded_and_escaped() {
        let shown = printable(&format!("\u{1b}[2J{}", "x".repeat(500)));
        assert!(shown.starts_with("\\u{1b}[2J"));
        assert!(shown.chars().count() <= 210);
    }
}
