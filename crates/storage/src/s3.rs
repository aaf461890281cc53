//! Blobs in an S3-compatible object store (AWS S3, MinIO, Garage, Ceph RGW), through the
//! `object_store` crate (which signs requests). Nothing lives on the node, so the next chunk
//! of an upload may reach any node. An upload session is objects under `uploads/<id>/`: a
//! multipart upload to `uploads/<id>/data` that receives every whole part as soon as it is
//! complete, the part tags of each chunk (`parts/<first part>`), the bytes after the last
//! whole part (`tail/<session length>`, under one part, sent on with the next chunk), and a
//! small `state` object with the SHA-256 state, the part count and the multipart upload's
//! id. Committing sends the tail as the last part, completes the multipart upload and
//! publishes it with a server-side copy: no byte is read back or sent twice, whatever the
//! chunk sizes. Published blobs use Distribution's layout under the prefix
//! (`blobs/sha256/<xx>/<hex>/data`). Memory stays bounded: bodies stream through in parts
//! of 8 MiB, a few in flight.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use berth_oci::Digest;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, PutPayload, RetryConfig,
    WriteMultipart,
};

use crate::{BlobStore, ByteRange, ByteStream, StorageError, UploadId};

mod session;

/// Part size of multipart uploads (S3's minimum is 5 MiB). Every part of an upload
/// session but the last has exactly this size, as some stores (R2) require.
const PART: usize = 8 * 1024 * 1024;
/// Parts in flight per upload: with [`PART`], at most 24 MiB buffered per upload (the
/// parts being sent and the one filling).
const PARTS_IN_FLIGHT: usize = 2;
/// Where and how to reach the bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// `http(s)://host:port` of an S3-compatible server; `None` for AWS.
    pub endpoint: Option<String>,
    /// The region (Garage: its `s3_region`).
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// A key prefix, so several registries (or tests) can share a bucket.
    pub prefix: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`.
    pub path_style: bool,
    /// Answer blob GETs with a redirect to a pre-signed URL valid this long, instead of
    /// streaming through the node.
    pub redirect: Option<Duration>,
}

/// Blob bytes in an S3 bucket.
pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    prefix: String,
    redirect: Option<Duration>,
}

fn unavailable(e: object_store::Error) -> StorageError {
    match e {
        // Wrong credentials or rights are configuration faults, not outages.
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            StorageError::Io(std::io::Error::other(e.to_string()))
        }
        other => StorageError::Unavailable(other.to_string()),
    }
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

/// object_store's HTTP client, with the W3C `traceparent` of the request being served
/// added to every call, so an S3 server that traces joins berth's trace.
#[derive(Debug)]
struct TracingConnector;

impl object_store::client::HttpConnector for TracingConnector {
    fn connect(
        &self,
        options: &ClientOptions,
    ) -> object_store::Result<object_store::client::HttpClient> {
        let inner = object_store::client::ReqwestConnector::default().connect(options)?;
        Ok(object_store::client::HttpClient::new(TracingService(inner)))
    }
}

#[derive(Debug)]
struct TracingService(object_store::client::HttpClient);

#[async_trait::async_trait]
impl object_store::client::HttpService for TracingService {
    async fn call(
        &self,
        mut request: object_store::client::HttpRequest,
    ) -> Result<object_store::client::HttpResponse, object_store::client::HttpError> {
        if let Some(traceparent) = berth_telemetry::current_traceparent() {
            if let Ok(value) = http::HeaderValue::from_str(&traceparent) {
                request.headers_mut().insert("traceparent", value);
            }
        }
        self.0.execute(request).await
    }
}

impl S3BlobStore {
    /// Connects lazily (the first request reaches the server).
    pub fn new(config: S3Config) -> Result<Self, StorageError> {
        let mut builder = AmazonS3Builder::new()
            .with_region(&config.region)
            .with_bucket_name(&config.bucket)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_virtual_hosted_style_request(!config.path_style)
            // Fail fast during an outage (the registry answers 503 and clients retry),
            // but never cut a long transfer short.
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_timeout_disabled()
                    .with_connect_timeout(Duration::from_secs(5)),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        builder = builder.with_http_connector(TracingConnector);
        let store = builder.build().map_err(|e| {
            StorageError::Io(std::io::Error::other(format!("S3 configuration: {e}")))
        })?;
        Ok(S3BlobStore {
            store: Arc::new(store),
            prefix: config.prefix.trim_matches('/').to_owned(),
            redirect: config.redirect,
        })
    }

    fn key(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    fn blob_key(&self, digest: &Digest) -> Path {
        let hex = digest.hex();
        self.key(&format!(
            "blobs/{}/{}/{hex}/data",
            digest.algorithm().as_str(),
            &hex[..2]
        ))
    }

    fn upload_key(&self, id: &UploadId, rest: &str) -> Path {
        self.key(&format!("uploads/{id}/{rest}"))
    }

    fn stream_of(&self, path: Path) -> ByteStream {
        let store = self.store.clone();
        Box::pin(
            futures_util::stream::once(async move { store.get(&path).await })
                .map_ok(|result| result.into_stream())
                .try_flatten()
                .map_err(|e| std::io::Error::other(e.to_string())),
        )
    }

    /// Writes a stream to `path`: one PUT if it fits a part, multipart otherwise. Returns
    /// the bytes written and how the stream ended (an error after some bytes keeps them).
    async fn write_stream(
        &self,
        path: &Path,
        mut body: ByteStream,
        mut on_chunk: impl FnMut(&[u8]) + Send,
    ) -> Result<(u64, Option<std::io::Error>), StorageError> {
        let crate::body_head::BodyHead {
            chunks: head,
            len: head_len,
            ended,
            error: mut ended_with,
        } = crate::body_head::gather(&mut body, PART, &mut on_chunk).await;
        if ended {
            if head_len > 0 || ended_with.is_none() {
                self.store
                    .put(path, PutPayload::from_iter(head))
                    .await
                    .map_err(unavailable)?;
            }
            return Ok((head_len as u64, ended_with));
        }
        let upload = self.store.put_multipart(path).await.map_err(unavailable)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut written = head_len as u64;
        for chunk in head {
            writer.write(&chunk);
        }
        loop {
            if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
                return Err(unavailable(e));
            }
            match body.next().await {
                None => break,
                Some(Ok(chunk)) => {
                    on_chunk(&chunk);
                    written += chunk.len() as u64;
                    writer.write(&chunk);
                }
                Some(Err(e)) => {
                    ended_with = Some(e);
                    break;
                }
            }
        }
        writer.finish().await.map_err(unavailable)?;
        Ok((written, ended_with))
    }

    async fn delete_prefix(&self, prefix: Path) -> Result<(), StorageError> {
        let paths = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .boxed();
        self.delete_paths(paths).await
    }

    /// Deletes every object `paths` names (batched by the store); an object already gone
    /// counts as deleted.
    async fn delete_paths(
        &self,
        paths: futures_util::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> Result<(), StorageError> {
        self.store
            .delete_stream(paths)
            .try_for_each(|_| async { Ok(()) })
            .await
            .or_else(|e| {
                if is_not_found(&e) {
                    Ok(())
                } else {
                    Err(unavailable(e))
                }
            })
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        match self.store.head(&self.blob_key(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, StorageError> {
        let options = GetOptions {
            range: range.map(|r| GetRange::Bounded(r.start..r.end + 1)),
            ..GetOptions::default()
        };
        match self.store.get_opts(&self.blob_key(digest), options).await {
            Ok(result) => Ok(Some(Box::pin(
                result
                    .into_stream()
                    .map_err(|e| std::io::Error::other(e.to_string())),
            ))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn direct_url(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        let Some(ttl) = self.redirect else {
            return Ok(None);
        };
        let url = self
            .store
            .signed_url(http::Method::GET, &self.blob_key(digest), ttl)
            .await
            .map_err(unavailable)?;
        Ok(Some(url.to_string()))
    }

    async fn start_upload(&self, id: &UploadId) -> Result<(), StorageError> {
        self.store
            .put(&self.upload_key(id, "started"), PutPayload::default())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn upload_len(&self, id: &UploadId) -> Result<u64, StorageError> {
        self.session_len(id).await
    }

    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        body: ByteStream,
    ) -> Result<u64, StorageError> {
        self.append_chunk(id, offset, body).await
    }

    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64, StorageError> {
        self.commit_session(id, expected).await
    }

    async fn abort(&self, id: &UploadId) -> Result<(), StorageError> {
        self.abort_session(id).await
    }

    async fn list_uploads(&self) -> Result<Vec<(UploadId, SystemTime)>, StorageError> {
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&self.key("uploads")))
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut latest: std::collections::BTreeMap<UploadId, SystemTime> = Default::default();
        for meta in objects {
            let parts: Vec<_> = meta.location.parts().collect();
            let Some(position) = parts.iter().position(|p| p.as_ref() == "uploads") else {
                continue;
            };
            let Some(id) = parts
                .get(position + 1)
                .and_then(|p| UploadId::parse(p.as_ref()))
            else {
                continue;
            };
            let at: SystemTime = meta.last_modified.into();
            let entry = latest.entry(id).or_insert(at);
            if at > *entry {
                *entry = at;
            }
        }
        Ok(latest.into_iter().collect())
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        match self.store.delete(&self.blob_key(digest)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete_many(&self, digests: &[Digest]) -> Result<(), StorageError> {
        let paths: Vec<object_store::Result<Path>> =
            digests.iter().map(|d| Ok(self.blob_key(d))).collect();
        self.delete_paths(futures_util::stream::iter(paths).boxed())
            .await
    }

    async fn ready(&self) -> Result<(), StorageError> {
        self.store
            .list_with_delimiter(Some(&self.key("blobs")))
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}
