//! OCI image layouts on disk (`oci:PATH[:TAG]`, as skopeo names them): `oci-layout`,
//! `index.json` naming tagged manifests by `org.opencontainers.image.ref.name`, and
//! `blobs/<alg>/<hex>`. Blobs are written to a temporary file while they are hashed and
//! renamed into place only when they match, so a layout never holds a wrong blob; the
//! index is replaced whole.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use berth_oci::{Digest, DigestHasher};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::{ClientError, Manifest};

/// Numbers this process's blob writers apart.
static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Attempts at a download before giving up (the partial file stays for the next pull).
const DOWNLOAD_ATTEMPTS: u32 = 5;

/// The annotation an index entry's tag lives in.
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> ClientError + '_ {
    move |e| ClientError::Protocol(format!("{}: {e}", path.display()))
}

impl OciLayout {
    /// Opens the layout at `root`, which must exist (a source).
    pub async fn open_existing(root: &Path) -> Result<OciLayout, ClientError> {
        if tokio::fs::metadata(root.join("oci-layout")).await.is_err() {
            return Err(ClientError::NotFound(format!(
                "no OCI image layout at {}",
                root.display()
            )));
        }
        Ok(OciLayout {
            root: root.to_owned(),
        })
    }

    /// Opens the layout at `root`, creating an empty one if the directory has none.
    pub async fn open(root: &Path) -> Result<OciLayout, ClientError> {
        let layout = OciLayout {
            root: root.to_owned(),
        };
        let marker = root.join("oci-layout");
        if tokio::fs::metadata(&marker).await.is_err() {
            tokio::fs::create_dir_all(root.join("blobs/sha256"))
                .await
                .map_err(io_error(root))?;
            tokio::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .await
                .map_err(io_error(&marker))?;
            layout
                .write_index(&json!({"schemaVersion": 2, "manifests": []}))
                .await?;
        }
        Ok(layout)
    }

    /// Where the layout keeps a blob (whether or not it holds it).
    pub fn blob_file(&self, digest: &Digest) -> PathBuf {
        self.blob_path(digest)
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    async fn index(&self) -> Result<Value, ClientError> {
        let path = self.root.join("index.json");
        let text = tokio::fs::read(&path).await.map_err(io_error(&path))?;
        serde_json::from_slice(&text)
            .map_err(|e| ClientError::Protocol(format!("{}: {e}", path.display())))
    }

    async fn write_index(&self, index: &Value) -> Result<(), ClientError> {
        let path = self.root.join("index.json");
        let temporary = self.root.join("index.json.tmp");
        tokio::fs::write(&temporary, index.to_string())
            .await
            .map_err(io_error(&temporary))?;
        tokio::fs::rename(&temporary, &path)
            .await
            .map_err(io_error(&path))
    }

    /// The manifest tagged `tag` (or, without a tag, the layout's only one).
    pub async fn manifest(&self, tag: Option<&str>) -> Result<Manifest, ClientError> {
        let index = self.index().await?;
        let entries = index["manifests"].as_array().cloned().unwrap_or_default();
        let entry = match tag {
            Some(tag) => entries
                .iter()
                .find(|m| m["annotations"][REF_NAME].as_str() == Some(tag)),
            None if entries.len() == 1 => entries.first(),
            None => None,
        }
        .ok_or_else(|| {
            ClientError::NotFound(format!(
                "{}: no image tagged {}",
                self.root.display(),
                tag.unwrap_or("(none: name one, the layout holds several)")
            ))
        })?;
        let digest = entry["digest"]
            .as_str()
            .and_then(|d| Digest::parse(d).ok())
            .ok_or_else(|| {
                ClientError::Protocol("index.json: an entry without a digest".to_owned())
            })?;
        let media_type = entry["mediaType"].as_str().unwrap_or_default().to_owned();
        self.manifest_by_digest(&digest, &media_type).await
    }

    /// A manifest by digest, verified; its media type from the manifest itself when the
    /// caller does not know it.
    pub async fn manifest_by_digest(
        &self,
        digest: &Digest,
        media_type: &str,
    ) -> Result<Manifest, ClientError> {
        let path = self.blob_path(digest);
        let bytes = tokio::fs::read(&path).await.map_err(|_| {
            ClientError::NotFound(format!("{}: no manifest {digest}", self.root.display()))
        })?;
        if !digest.matches(&bytes) {
            return Err(ClientError::Mismatch {
                what: path.display().to_string(),
                expected: digest.to_string(),
                actual: Digest::sha256_of(&bytes).to_string(),
            });
        }
        let media_type = if media_type.is_empty() {
            serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
                .unwrap_or_default()
        } else {
            media_type.to_owned()
        };
        Ok(Manifest {
            bytes: Bytes::from(bytes),
            media_type,
            digest: digest.clone(),
        })
    }

    /// The blob's size, if the layout holds it.
    pub async fn blob_size(&self, digest: &Digest) -> Option<u64> {
        tokio::fs::metadata(self.blob_path(digest))
            .await
            .ok()
            .map(|m| m.len())
    }

    /// The blob's bytes, streamed from its file.
    pub async fn blob(
        &self,
        digest: &Digest,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>, ClientError>
    {
        let path = self.blob_path(digest);
        let file = tokio::fs::File::open(&path).await.map_err(|_| {
            ClientError::NotFound(format!("{}: no blob {digest}", self.root.display()))
        })?;
        Ok(Box::pin(tokio_util::io::ReaderStream::with_capacity(
            file,
            256 * 1024,
        )))
    }

    /// Writes a blob from `body`, keeping it only if it hashes to `digest`.
    pub async fn put_blob<S>(&self, digest: &Digest, body: S) -> Result<u64, ClientError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send,
    {
        let path = self.blob_path(digest);
        if let Some(size) = self.blob_size(digest).await {
            return Ok(size);
        }
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_error(&dir))?;
        // A name of its own: a resumable download keeps `.<hex>.partial`.
        let temporary = dir.join(format!(
            ".{}.{}-{}.writing",
            digest.hex(),
            std::process::id(),
            WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut file = tokio::fs::File::create(&temporary)
            .await
            .map_err(io_error(&temporary))?;
        let mut hasher = DigestHasher::new(digest.algorithm());
        let mut size = 0u64;
        let mut body = std::pin::pin!(body);
        let written: Result<(), ClientError> = async {
            while let Some(chunk) = body.next().await {
                let chunk =
                    chunk.map_err(|e| ClientError::Protocol(format!("blob {digest}: {e}")))?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk).await.map_err(io_error(&temporary))?;
            }
            file.sync_all().await.map_err(io_error(&temporary))
        }
        .await;
        let actual = hasher.finish();
        if let Err(e) = written {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(e);
        }
        if actual != *digest {
            let _ = tokio::fs::remove_file(&temporary).await;
            return Err(ClientError::Mismatch {
                what: format!("blob {digest}"),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        tokio::fs::rename(&temporary, &path)
            .await
            .map_err(io_error(&path))?;
        Ok(size)
    }

    /// Downloads a blob from a registry into the layout so that an interruption loses
    /// nothing already written: the bytes go to `.<hex>.partial`, which stays when the
    /// download fails or the process dies, and the next attempt (in this call, or a later
    /// pull) asks the registry only for the rest with a `Range` request. The whole is
    /// hashed (what was there first, then what arrives) and renamed into place only when
    /// it matches. A lock on the partial file keeps two pulls of the same blob apart.
    /// `moved` hears the bytes as they are written.
    pub(crate) async fn download(
        &self,
        client: &crate::RegistryClient,
        repository: &str,
        digest: &Digest,
        size: u64,
        moved: &(impl Fn(u64) + Send + Sync),
    ) -> Result<u64, ClientError> {
        let path = self.blob_path(digest);
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_error(&dir))?;
        let partial = dir.join(format!(".{}.partial", digest.hex()));
        let opened = partial.clone();
        let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&opened)?;
            file.lock()?;
            Ok(file)
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("locking {}: {e}", partial.display())))?
        .map_err(io_error(&partial))?;
        // Another pull may have finished it while this one waited for the lock.
        if let Some(there) = self.blob_size(digest).await {
            let _ = tokio::fs::remove_file(&partial).await;
            return Ok(there);
        }
        let mut file = tokio::fs::File::from_std(file);
        let mut hasher = DigestHasher::new(digest.algorithm());
        let mut have = hash_prefix(&mut file, &mut hasher, size)
            .await
            .map_err(io_error(&partial))?;
        moved(have);
        let mut attempt = 0;
        while have < size {
            attempt += 1;
            let cut = match client.blob_from(repository, digest, have).await {
                Ok((mut body, ranged)) => {
                    if !ranged && have > 0 {
                        // The registry sent everything again: start over.
                        file.set_len(0).await.map_err(io_error(&partial))?;
                        file.seek(std::io::SeekFrom::Start(0))
                            .await
                            .map_err(io_error(&partial))?;
                        hasher = DigestHasher::new(digest.algorithm());
                        have = 0;
                    }
                    let mut cut = None;
                    while let Some(chunk) = body.next().await {
                        let chunk = match chunk {
                            Ok(chunk) => chunk,
                            Err(e) => {
                                cut = Some(ClientError::unreachable(e));
                                break;
                            }
                        };
                        if have + chunk.len() as u64 > size {
                            drop(file);
                            let _ = tokio::fs::remove_file(&partial).await;
                            return Err(ClientError::Mismatch {
                                what: format!("blob {digest}"),
                                expected: format!("{size} bytes"),
                                actual: "more".to_owned(),
                            });
                        }
                        file.write_all(&chunk).await.map_err(io_error(&partial))?;
                        hasher.update(&chunk);
                        have += chunk.len() as u64;
                        moved(chunk.len() as u64);
                    }
                    match cut {
                        Some(e) => Some(e),
                        None if have < size => Some(ClientError::Unreachable(format!(
                            "blob {digest}: the registry stopped after {have} of {size} bytes"
                        ))),
                        None => None,
                    }
                }
                Err(e @ ClientError::Unreachable(_)) => Some(e),
                Err(e) => return Err(e),
            };
            if let Some(e) = cut {
                file.flush().await.map_err(io_error(&partial))?;
                if attempt >= DOWNLOAD_ATTEMPTS {
                    return Err(e);
                }
                tokio::time::sleep(crate::backoff(attempt, None)).await;
            }
        }
        file.sync_all().await.map_err(io_error(&partial))?;
        drop(file);
        let actual = hasher.finish();
        if actual != *digest {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ClientError::Mismatch {
                what: format!("blob {digest}"),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(io_error(&path))?;
        Ok(size)
    }

    /// Stores a manifest, and tags it in `index.json` if `tag` is given (replacing the
    /// entry that had that tag).
    pub async fn put_manifest(
        &self,
        manifest: &Manifest,
        tag: Option<&str>,
    ) -> Result<(), ClientError> {
        let bytes = manifest.bytes.clone();
        self.put_blob(
            &manifest.digest,
            futures_util::stream::once(async move { Ok(bytes) }),
        )
        .await?;
        let Some(tag) = tag else { return Ok(()) };
        let mut index = self.index().await?;
        let mut entries: Vec<Value> = index["manifests"].as_array().cloned().unwrap_or_default();
        entries.retain(|m| m["annotations"][REF_NAME].as_str() != Some(tag));
        entries.push(json!({
            "mediaType": manifest.media_type,
            "digest": manifest.digest.to_string(),
            "size": manifest.bytes.len(),
            "annotations": { REF_NAME: tag },
        }));
        index["manifests"] = Value::Array(entries);
        if index["schemaVersion"].is_null() {
            index["schemaVersion"] = json!(2);
        }
        self.write_index(&index).await
    }
}

/// Hashes what a partial download already holds (at most `size` bytes; anything longer
/// is cut off) and leaves the file positioned after it; returns its length.
async fn hash_prefix(
    file: &mut tokio::fs::File,
    hasher: &mut DigestHasher,
    size: u64,
) -> std::io::Result<u64> {
    let length = file.metadata().await?.len();
    if length > size {
        file.set_len(0).await?;
        return Ok(0);
    }
    let mut buffer = vec![0u8; 256 * 1024];
    let mut have = 0;
    while have < length {
        let n = file.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        have += n as u64;
    }
    file.seek(std::io::SeekFrom::Start(have)).await?;
    Ok(have)
}
