//! A blob store that reports how long each backend action took, for the metrics: wraps
//! any [`BlobStore`], so both backends are measured at the same cut (Distribution measures
//! its storage drivers the same way).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use berth_oci::Digest;

use crate::{BlobStore, ByteRange, ByteStream, LocalBlob, Sealed, StorageError, UploadId};

/// Told of every action: its name (one of [`ACTIONS`]), how long it took, and whether the
/// backend failed it (a digest mismatch or an unknown session is an answer, not a
/// failure). For a read, the time to open the blob, not to stream it.
pub type Observer = Arc<dyn Fn(&'static str, Duration, bool) + Send + Sync>;

/// Every action name an observer may be told.
pub const ACTIONS: [&str; 14] = [
    "stat",
    "read",
    "start_upload",
    "upload_len",
    "append",
    "commit",
    "seal",
    "abort",
    "list_uploads",
    "delete",
    "delete_many",
    "direct_url",
    "open_local",
    "ready",
];

/// `inner`, measured.
pub struct TimedBlobStore {
    inner: Arc<dyn BlobStore>,
    observer: Observer,
}

impl TimedBlobStore {
    /// Measures `inner`'s actions for `observer`.
    pub fn new(inner: Arc<dyn BlobStore>, observer: Observer) -> Self {
        TimedBlobStore { inner, observer }
    }

    async fn timed<T>(
        &self,
        action: &'static str,
        work: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        let started = Instant::now();
        let result = work.await;
        let failed = matches!(
            result,
            Err(StorageError::Io(_) | StorageError::Unavailable(_) | StorageError::Full(_))
        );
        (self.observer)(action, started.elapsed(), !failed);
        result
    }
}

#[async_trait]
impl BlobStore for TimedBlobStore {
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        self.timed("stat", self.inner.stat(digest)).await
    }
    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, StorageError> {
        self.timed("read", self.inner.read(digest, range)).await
    }
    async fn start_upload(&self, id: &UploadId) -> Result<(), StorageError> {
        self.timed("start_upload", self.inner.start_upload(id))
            .await
    }
    async fn upload_len(&self, id: &UploadId) -> Result<u64, StorageError> {
        self.timed("upload_len", self.inner.upload_len(id)).await
    }
    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        body: ByteStream,
    ) -> Result<u64, StorageError> {
        self.timed("append", self.inner.append(id, offset, body))
            .await
    }
    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64, StorageError> {
        self.timed("commit", self.inner.commit(id, expected)).await
    }
    async fn seal<'a>(
        &'a self,
        id: &UploadId,
        final_chunk: Option<(Option<u64>, ByteStream)>,
        expected: &Digest,
    ) -> Result<Sealed<'a>, StorageError> {
        self.timed("seal", self.inner.seal(id, final_chunk, expected))
            .await
    }
    async fn seal_verified_file<'a>(
        &'a self,
        id: &UploadId,
        file: &std::fs::File,
        size: u64,
        expected: &Digest,
    ) -> Result<Option<Sealed<'a>>, StorageError> {
        let sealing = self.inner.seal_verified_file(id, file, size, expected);
        self.timed("seal", sealing).await
    }
    async fn abort(&self, id: &UploadId) -> Result<(), StorageError> {
        self.timed("abort", self.inner.abort(id)).await
    }
    async fn list_uploads(&self) -> Result<Vec<(UploadId, std::time::SystemTime)>, StorageError> {
        self.timed("list_uploads", self.inner.list_uploads()).await
    }
    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        self.timed("delete", self.inner.delete(digest)).await
    }
    async fn direct_url(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        self.timed("direct_url", self.inner.direct_url(digest))
            .await
    }
    async fn open_local(&self, digest: &Digest) -> Result<Option<LocalBlob>, StorageError> {
        self.timed("open_local", self.inner.open_local(digest))
            .await
    }
    async fn ready(&self) -> Result<(), StorageError> {
        self.timed("ready", self.inner.ready()).await
    }
    async fn delete_many(&self, digests: &[Digest]) -> Result<(), StorageError> {
        self.timed("delete_many", self.inner.delete_many(digests))
            .await
    }
}
