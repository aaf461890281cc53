//! Blob bytes by digest, and the upload sessions that produce them.
//!
//! This crate knows nothing of repositories, tags or HTTP: which repository may see a blob
//! is the metadata store's call. Its one promise is crash safety: a blob is either absent
//! or whole and verified against its digest, never partial.

mod blocks;
mod body_head;
mod fs;
mod pool;
mod reading;
mod resumable;
mod s3;
mod staging;
pub mod timed;

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;

use async_trait::async_trait;
use berth_oci::Digest;
use bytes::Bytes;
use futures_util::Stream;

pub use fs::FsBlobStore;
pub use reading::stream_file_range;

/// A blob's file, opened: blob files never change once published (content addressed,
/// only ever unlinked), so the handle reads the same bytes for as long as it is held.
#[derive(Debug)]
pub struct LocalBlob {
    /// The open file.
    pub file: std::fs::File,
    /// Its length in bytes.
    pub size: u64,
}
pub use resumable::ResumableSha256;
pub use s3::{S3BlobStore, S3Config};
pub use timed::TimedBlobStore;

/// A stream of body bytes, in or out. Blobs are never held whole in memory.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

/// An inclusive byte range of a blob, already checked against its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive (as in HTTP `Content-Range`).
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes covered.
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    /// Never true: a range covers at least one byte. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Identifies an upload session. Always a UUID, so it is safe as a path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UploadId(String);

impl UploadId {
    /// Accepts only the canonical hyphenated UUID form berth hands out.
    pub fn parse(input: &str) -> Option<Self> {
        uuid::Uuid::try_parse(input)
            .ok()
            .filter(|u| u.hyphenated().to_string() == input)
            .map(|_| UploadId(input.to_owned()))
    }

    /// A fresh random id.
    pub fn new_random() -> Self {
        UploadId(uuid::Uuid::new_v4().hyphenated().to_string())
    }

    /// The id as text, for URLs and keys.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UploadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UploadId({})", self.0)
    }
}

/// Faults of blob storage.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No such upload session (never started, finished, cancelled or purged).
    #[error("upload {0} is unknown")]
    UploadUnknown(UploadId),
    /// A chunk did not start where the session ends.
    #[error("chunk starts at {got} but the upload holds {expected} bytes")]
    OutOfOrder {
        /// The session's current length: where the next chunk must start.
        expected: u64,
        /// Where the client said the chunk starts.
        got: u64,
    },
    /// The bytes do not hash to the digest the client claimed.
    #[error("content hashes to {actual}, not {expected}")]
    DigestMismatch {
        /// What the client claimed.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// The client's body ended with an error; the bytes before it are kept.
    #[error("request body interrupted after {kept} bytes: {source}")]
    BodyInterrupted {
        /// Session length after what was kept.
        kept: u64,
        /// What the body stream reported.
        source: io::Error,
    },
    /// The backend itself failed.
    #[error("storage I/O: {0}")]
    Io(#[from] io::Error),
    /// The backend cannot be reached (an object store that is down): nothing happened,
    /// and the operation may be retried later.
    #[error("blob storage unavailable: {0}")]
    Unavailable(String),
    /// The file system is (nearly) full: what was being written was not kept.
    #[error("blob storage is full: {0}")]
    Full(String),
}

impl StorageError {
    /// Whether the failure is a full disk (or an exhausted quota): the client can do
    /// nothing but retry later, and the operator must free space.
    pub fn is_full(&self) -> bool {
        match self {
            StorageError::Full(_) => true,
            StorageError::Io(e) => is_full(e),
            _ => false,
        }
    }
}

/// Whether an I/O error says the disk is full or the quota spent.
pub fn is_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// An upload whose bytes matched their digest and are on their way to disk, not yet
/// published. Publishing a blob is announced to the metadata store before the bytes
/// become visible (ARCHITECTURE.md, "A push publishes a blob"); the seal lets that announcement
/// and the disk flush run at the same time instead of one after the other.
#[must_use = "a seal must be published or abandoned"]
pub struct Sealed<'a> {
    go: Option<tokio::sync::oneshot::Sender<()>>,
    finish: Pin<Box<dyn Future<Output = Result<u64, StorageError>> + Send + 'a>>,
}

impl<'a> Sealed<'a> {
    /// A seal whose whole publication happens in `finish`, for backends with nothing
    /// to overlap.
    pub fn deferred(finish: impl Future<Output = Result<u64, StorageError>> + Send + 'a) -> Self {
        Sealed {
            go: None,
            finish: Box::pin(finish),
        }
    }

    /// A seal whose backend waits for `go` before it makes the bytes visible, and reports
    /// through `finish`; a dropped `go` means "do not publish".
    pub fn gated(
        go: tokio::sync::oneshot::Sender<()>,
        finish: impl Future<Output = Result<u64, StorageError>> + Send + 'a,
    ) -> Self {
        Sealed {
            go: Some(go),
            finish: Box::pin(finish),
        }
    }

    /// Makes the bytes visible under their digest, atomically, once they are durable.
    /// Returns the blob's size.
    pub async fn publish(mut self) -> Result<u64, StorageError> {
        if let Some(go) = self.go.take() {
            // A backend that already gave up reports why through `finish`.
            let _ = go.send(());
        }
        self.finish.await
    }

    /// Leaves the bytes unpublished and the session open (the announcement was refused),
    /// returning once the backend is done with the session.
    pub async fn abandon(mut self) {
        // A deferred seal's `finish` is the whole publication: it must not run at all.
        let Some(go) = self.go.take() else { return };
        drop(go);
        if let Err(e) = self.finish.await {
            tracing::debug!(error = %e, "abandoned publication ended");
        }
    }
}

/// Content-addressed blob storage. Implementations must make `commit` atomic: after a
/// crash at any point the blob is absent or whole.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The blob's size, if its bytes are stored.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError>;
    /// The blob's bytes, or a range of them; `None` if absent.
    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, StorageError>;
    /// Opens an empty upload session under `id` (a fresh [`UploadId::new_random`]). The
    /// caller picks the id so that it can record the session elsewhere at the same time.
    /// A backend may store nothing until the first bytes arrive (the file system's does
    /// not create the staged file before), so to it an id without bytes is an empty
    /// session: whether an id names a session at all is for that record to say.
    async fn start_upload(&self, id: &UploadId) -> Result<(), StorageError>;
    /// How many bytes the session holds: where the next chunk must start.
    async fn upload_len(&self, id: &UploadId) -> Result<u64, StorageError>;
    /// Appends `body` at `offset`, which must equal the current length; hashes as it
    /// writes. Returns the new length.
    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        body: ByteStream,
    ) -> Result<u64, StorageError>;
    /// Verifies the session's bytes against `expected`, makes them durable and publishes
    /// them atomically under that digest. Returns the size. On a mismatch the session
    /// stays open.
    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64, StorageError>;
    /// Appends `final_chunk` if there is one (at its offset, or at the session's end when
    /// the client gave none), verifies the session's bytes against `expected` and starts
    /// making them durable; [`Sealed::publish`] then does what `commit` does. On a
    /// mismatch the session stays open, the chunk appended.
    async fn seal<'a>(
        &'a self,
        id: &UploadId,
        final_chunk: Option<(Option<u64>, ByteStream)>,
        expected: &Digest,
    ) -> Result<Sealed<'a>, StorageError> {
        if let Some((start, body)) = final_chunk {
            let offset = match start {
                Some(offset) => offset,
                None => self.upload_len(id).await?,
            };
            self.append(id, offset, body).await?;
        }
        let (id, expected) = (id.clone(), expected.clone());
        Ok(Sealed::deferred(async move {
            self.commit(&id, &expected).await
        }))
    }
    /// Starts publishing `file`, whose first `size` bytes the caller already hashed to
    /// `expected`, by linking it into the store instead of copying and hashing it again
    /// (a pull-through fill spills into an anonymous file and verifies as it writes).
    /// `None` when this backend cannot link it (object storage, another file system, a
    /// file that is not anonymous): the caller streams the bytes through [`Self::seal`].
    async fn seal_verified_file<'a>(
        &'a self,
        _id: &UploadId,
        _file: &std::fs::File,
        _size: u64,
        _expected: &Digest,
    ) -> Result<Option<Sealed<'a>>, StorageError> {
        Ok(None)
    }
    /// Drops a session and its bytes.
    async fn abort(&self, id: &UploadId) -> Result<(), StorageError>;
    /// Every upload session with the time its bytes last changed, so garbage collection can
    /// purge abandoned ones (including those of a crashed monolithic push, which no
    /// metadata knows about).
    async fn list_uploads(&self) -> Result<Vec<(UploadId, std::time::SystemTime)>, StorageError>;
    /// Removes a blob's bytes. Only garbage collection calls this, after the metadata
    /// store agreed nothing references the blob.
    async fn delete(&self, digest: &Digest) -> Result<(), StorageError>;
    /// A URL the client may fetch the blob from directly (a pre-signed object store URL),
    /// when the backend is configured to redirect downloads; `None` to stream through.
    async fn direct_url(&self, _digest: &Digest) -> Result<Option<String>, StorageError> {
        Ok(None)
    }
    /// The blob as an open local file, so that the HTTP edge can have the kernel send it
    /// (`sendfile`) instead of copying it through the process. `None` where blobs are not
    /// local files (object storage; such blobs are sent from [`Self::read`]) or the blob
    /// is absent.
    async fn open_local(&self, _digest: &Digest) -> Result<Option<LocalBlob>, StorageError> {
        Ok(None)
    }
    /// Whether the store can serve and accept bytes right now (readiness probes).
    async fn ready(&self) -> Result<(), StorageError>;
    /// Removes many blobs' bytes; a sweep calls this once per collection so a backend can
    /// batch (one thread for the file system, multi-object deletes for S3).
    async fn delete_many(&self, digests: &[Digest]) -> Result<(), StorageError> {
        for digest in digests {
            self.delete(digest).await?;
        }
        Ok(())
    }
}
