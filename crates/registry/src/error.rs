//! The domain's faults, in domain words. The HTTP edge maps each to a status and an OCI
//! error code exactly once.

use berth_meta::MetaError;
use berth_oci::{Digest, ParseError};
use berth_storage::StorageError;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The blob is not visible in this repository (or its bytes are gone).
    #[error("blob {digest} is unknown to this repository")]
    BlobUnknown {
        /// The blob asked for.
        digest: Digest,
    },
    /// The upload session does not exist in this repository.
    #[error("upload {id} is unknown")]
    UploadUnknown {
        /// The session id from the URL.
        id: String,
    },
    /// A chunk did not start where the upload ends.
    #[error("chunk starts at {got} but the upload holds {expected} bytes")]
    UploadOutOfOrder {
        /// Where the next chunk must start.
        expected: u64,
        /// Where this one claimed to start.
        got: u64,
    },
    /// The content does not hash to the digest given.
    #[error("content hashes to {actual}, not {expected}")]
    DigestMismatch {
        /// The digest the client gave.
        expected: Digest,
        /// What the content hashes to.
        actual: Digest,
    },
    /// Input broke a grammar (name, tag, digest) or the manifest is malformed.
    #[error(transparent)]
    Invalid(#[from] ParseError),
    /// No manifest under that tag or digest.
    #[error("manifest {reference} is unknown")]
    ManifestUnknown {
        /// The tag or digest asked for.
        reference: String,
    },
    /// The manifest references blobs or manifests this repository does not hold.
    #[error("manifest references content missing from the repository: {}", .missing.join(", "))]
    ManifestBlobUnknown {
        /// What is missing.
        missing: Vec<String>,
    },
    /// The manifest is larger than the configured limit.
    #[error("manifest of {size} bytes exceeds the limit of {limit} bytes")]
    ManifestTooLarge {
        /// Bytes received (at least).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The repository has no manifests or tags.
    #[error("repository {name} is unknown")]
    NameUnknown {
        /// The repository asked for.
        name: String,
    },
    /// The requested byte range lies outside the blob.
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable {
        /// The blob's size, for `Content-Range: bytes */size`.
        size: u64,
    },
    /// The caller already holds as many open upload sessions as it may: finish or cancel
    /// some (abandoned ones are purged after a day).
    #[error("too many open upload sessions (at most {max}): finish or cancel some first")]
    TooManyUploads {
        /// The cap.
        max: usize,
    },
    /// Garbage collection is deleting this digest's bytes right now; retry shortly.
    #[error("blob {digest} is being garbage-collected; retry the upload")]
    BlobBusy {
        /// The blob concerned.
        digest: Digest,
    },
    /// A background job that runs on one node at a time is running elsewhere.
    #[error("{job} is already running on another node")]
    JobRunning {
        /// Which job.
        job: String,
    },
    /// The client's body broke off; what arrived before is kept in the session.
    #[error("request body interrupted: {0}")]
    BodyInterrupted(String),
    /// Blob storage failed.
    #[error(transparent)]
    Storage(StorageError),
    /// The metadata store failed.
    #[error(transparent)]
    Meta(MetaError),
}

impl From<StorageError> for RegistryError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::UploadUnknown(id) => RegistryError::UploadUnknown { id: id.to_string() },
            StorageError::OutOfOrder { expected, got } => {
                RegistryError::UploadOutOfOrder { expected, got }
            }
            StorageError::DigestMismatch { expected, actual } => {
                RegistryError::DigestMismatch { expected, actual }
            }
            StorageError::BodyInterrupted { source, .. } => {
                RegistryError::BodyInterrupted(source.to_string())
            }
            other => RegistryError::Storage(other),
        }
    }
}

impl From<MetaError> for RegistryError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::MissingReferences { missing } => RegistryError::ManifestBlobUnknown {
                missing: missing.iter().map(|d| d.to_string()).collect(),
            },
            other => RegistryError::Meta(other),
        }
    }
}
