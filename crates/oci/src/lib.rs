//! The OCI model shared by every other crate: the grammars of the distribution spec
//! (digests, repository names, tags), the media types berth understands, and manifest
//! parsing that keeps the exact bytes. Pure: no I/O, no async, so it can be fuzzed and
//! table-tested in isolation.

mod digest;
mod manifest;
pub mod media_type;
mod name;
pub mod time;

pub use digest::{Algorithm, Digest, DigestHasher};
pub use manifest::{Descriptor, EdgeKind, ManifestEdge, ManifestKind, ParsedManifest};
pub use name::{Reference, RepoName, Tag, MAX_NAME_LEN};

/// Why a piece of client input does not follow the spec's grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The digest is malformed or uses an algorithm berth does not support.
    #[error("invalid digest {input:?}: {reason}")]
    Digest {
        /// What the client sent.
        input: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// The repository name breaks the spec's name grammar.
    #[error("invalid repository name {input:?}: {reason}")]
    Name {
        /// What the client sent.
        input: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// The tag breaks `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    #[error("invalid tag {input:?}")]
    Tag {
        /// What the client sent.
        input: String,
    },
    /// The manifest cannot be accepted as it is.
    #[error("invalid manifest: {reason}")]
    Manifest {
        /// Which rule it broke.
        reason: String,
    },
    /// A manifest of a kind berth refuses on purpose (Docker schema 1).
    #[error("unsupported manifest: {reason}")]
    UnsupportedManifest {
        /// What was refused and why.
        reason: String,
    },
}
