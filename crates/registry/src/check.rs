//! `berth check`: a scrub of everything stored. Every live blob's bytes are re-hashed
//! against its digest and every manifest reference is looked up; with `repair`, blobs whose
//! bytes are missing or corrupt are forgotten (and corrupt bytes deleted) so that clients
//! see them as absent and push them again, instead of pulling bad data.

use berth_oci::{Digest, DigestHasher};
use futures_util::StreamExt;
use serde::Serialize;

use crate::{Registry, RegistryError};

/// Live blobs read from the metadata per page of a scrub.
const CHECK_PAGE: usize = 1000;
/// Bytes read per call while hashing a local blob.
const HASH_BUFFER: usize = 1 << 20;

/// Blobs hashed at once: one per core.
fn check_parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// How a scrub runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Forget missing and corrupt blobs (and delete corrupt bytes).
    pub repair: bool,
}

/// What a scrub found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Blobs whose bytes were read and verified.
    pub blobs_verified: u64,
    /// Bytes read.
    pub bytes_verified: u64,
    /// Blobs recorded in metadata but absent from storage.
    pub blobs_missing: Vec<String>,
    /// Blobs whose bytes do not hash to their digest.
    pub blobs_corrupt: Vec<String>,
    /// Manifest references to content missing from their repository, as
    /// `repo@manifest -> kind target`.
    pub dangling_references: Vec<String>,
    /// Whether missing and corrupt blobs were forgotten.
    pub repaired: bool,
    /// Wall time of the scrub, in seconds.
    pub seconds: f64,
    /// Bytes re-hashed per second of it: what to compare with `sha256sum`'s rate.
    pub bytes_per_second: u64,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.blobs_missing.is_empty()
            && self.blobs_corrupt.is_empty()
            && self.dangling_references.is_empty()
    }
}

impl Registry {
    /// Verifies every stored blob and manifest reference.
    pub async fn check(&self, options: CheckOptions) -> Result<CheckReport, RegistryError> {
        let started = std::time::Instant::now();
        let mut report = CheckReport {
            repaired: options.repair,
            ..CheckReport::default()
        };
        let mut after = String::new();
        loop {
            let page = self.meta.live_blobs(&after, CHECK_PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = last.as_str().to_owned();
            // A blob per core at a time: hashing is the cost, and each runs on its own
            // blocking thread.
            let mut hashed =
                futures_util::stream::iter(page.into_iter().map(|(digest, _)| async move {
                    let result = self.hash_stored(&digest).await;
                    (digest, result)
                }))
                .buffered(check_parallelism());
            while let Some((digest, result)) = hashed.next().await {
                match result? {
                    None => report.blobs_missing.push(digest.to_string()),
                    Some((actual, len)) if actual != digest => {
                        report.bytes_verified += len;
                        report.blobs_corrupt.push(digest.to_string());
                        if options.repair {
                            self.blobs.delete(&digest).await?;
                        }
                    }
                    Some((_, len)) => {
                        report.blobs_verified += 1;
                        report.bytes_verified += len;
                        continue;
                    }
                }
                if options.repair {
                    self.meta.drop_blob(&digest).await?;
                }
            }
        }
        for edge in self.meta.dangling_edges().await? {
            report.dangling_references.push(format!(
                "{}@{} -> {} {}",
                edge.repo, edge.manifest, edge.kind, edge.target
            ));
        }
        report.seconds = started.elapsed().as_millis() as f64 / 1000.0;
        report.bytes_per_second = (report.bytes_verified as f64 / report.seconds.max(1e-9)) as u64;
        Ok(report)
    }

    /// Reads a stored blob through the hash of its digest's algorithm: a local file on a
    /// blocking thread in large reads, anything else as its stream.
    async fn hash_stored(&self, digest: &Digest) -> Result<Option<(Digest, u64)>, RegistryError> {
        if let Some(local) = self.blobs.open_local(digest).await? {
            let algorithm = digest.algorithm();
            let hashed = tokio::task::spawn_blocking(move || -> std::io::Result<(Digest, u64)> {
                use std::io::Read;
                let mut file = local.file;
                let mut hasher = DigestHasher::new(algorithm);
                // Sized to the blob (plus one byte to see its end): most blobs are small,
                // and a fresh 1 MiB buffer per blob cost more than hashing them.
                let size = usize::try_from(local.size).unwrap_or(HASH_BUFFER);
                let mut buf = vec![0u8; size.saturating_add(1).min(HASH_BUFFER)];
                let mut len = 0u64;
                loop {
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        return Ok((hasher.finish(), len));
                    }
                    hasher.update(&buf[..n]);
                    len += n as u64;
                }
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|e| RegistryError::Storage(e.into()))?;
            return Ok(Some(hashed));
        }
        let Some(mut stream) = self.blobs.read(digest, None).await? else {
            return Ok(None);
        };
        let mut hasher = DigestHasher::new(digest.algorithm());
        let mut len = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| RegistryError::Storage(e.into()))?;
            len += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok(Some((hasher.finish(), len)))
    }
}
