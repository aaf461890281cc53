//! Upload sessions of the file-system store: the in-memory state of each open upload
//! (running hash, length), rebuilt from its staged file after a restart or when another
//! process appended to it, and the pipelined append of a request body.
//!
//! A large body is read by the request's task and handed to two blocking threads: one
//! writes it, one hashes it. The request is answered once the bytes are written; the hash
//! may still be catching up then, and the session's next request or its digest waits for
//! it. So a client sending chunks one after another keeps both cores busy instead of
//! waiting, at the end of every chunk, for the hash of its last bytes.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_oci::{Algorithm, Digest, DigestHasher};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{FsBlobStore, READ_CHUNK, STAGED_SUFFIX};
use crate::{ByteStream, StorageError, UploadId};

/// Bodies up to this size are written in one call instead of through the pipeline.
const SMALL_BODY: usize = 256 * 1024;
/// Blocks in flight between the task reading the request and the thread writing them.
/// Small: the request is answered when the writer is done, so what waits here is a delay.
const WRITE_DEPTH: usize = 4;
/// Blocks the hash may lag behind the reading, across requests: bounds memory per upload
/// (8 MiB of [`crate::blocks::BLOCK`]s).
const HASH_DEPTH: usize = 16;

/// What the server remembers of an open upload between requests. After a restart it is
/// rebuilt from the staged file (`hasher: None` means "rehash before use").
pub(super) struct Session {
    pub(super) hasher: Option<DigestHasher>,
    /// The hash of the bytes written so far, still being computed by the last large
    /// request's hashing thread: it replaces `hasher` once it arrives (`None`: unknown).
    pub(super) hashing: Option<tokio::sync::oneshot::Receiver<Option<DigestHasher>>>,
    pub(super) len: u64,
    /// Bytes appended since write-back was last started, across requests: a chunked
    /// upload of many small PATCHes gets its write-back started as a large one does.
    pub(super) unflushed: u64,
}

impl Session {
    /// A session with no bytes yet.
    pub(super) fn empty() -> Self {
        Session {
            hasher: Some(DigestHasher::new(Algorithm::Sha256)),
            hashing: None,
            len: 0,
            unflushed: 0,
        }
    }

    /// Waits until the hash of every byte written so far is in `hasher` (or known to be
    /// unknown, `None`).
    pub(super) async fn settle_hash(&mut self) {
        if let Some(hashing) = self.hashing.take() {
            self.hasher = hashing.await.ok().flatten();
        }
    }

    /// What was hashed no longer matches the staged bytes: rehash on next use.
    pub(super) fn forget_hash(&mut self) {
        self.hasher = None;
        self.hashing = None;
    }

    /// The hash of every byte written so far, rehashing the staged file at `path` if it is
    /// unknown (after a restart, or a failed write).
    async fn take_hasher(&mut self, path: &Path) -> Result<DigestHasher, StorageError> {
        self.settle_hash().await;
        if let Some(h) = self.hasher.take() {
            return Ok(h);
        }
        let p = path.to_owned();
        let (h, len) = tokio::task::spawn_blocking(move || hash_file(&p, Algorithm::Sha256))
            .await
            .map_err(io::Error::other)??;
        self.len = len;
        Ok(h)
    }
}

/// Where a large request's hashing thread starts from.
enum EarlierHash {
    /// The hash of every byte before the request.
    Ready(Box<DigestHasher>),
    /// The previous request's hashing thread, to be waited for.
    Behind(tokio::sync::oneshot::Receiver<Option<DigestHasher>>),
    /// Unknown: the first `len` bytes of the staged file are hashed first.
    Unhashed { path: PathBuf, len: u64 },
}

/// Starts the thread that hashes a large request's chunks, after whatever came before
/// them. Its answer is `None` if the earlier hash could not be had; it then stops taking
/// chunks, and the reader keeps writing without it.
fn spawn_hashing(
    earlier: EarlierHash,
    mut chunks: tokio::sync::mpsc::Receiver<Bytes>,
) -> tokio::sync::oneshot::Receiver<Option<DigestHasher>> {
    let (done, answer) = tokio::sync::oneshot::channel();
    drop(tokio::task::spawn_blocking(move || {
        let hasher = match earlier {
            EarlierHash::Ready(h) => Some(*h),
            EarlierHash::Behind(previous) => previous.blocking_recv().ok().flatten(),
            EarlierHash::Unhashed { path, len } => hash_file_prefix(&path, len).ok(),
        };
        let Some(mut hasher) = hasher else {
            let _ = done.send(None);
            return;
        };
        while let Some(chunk) = chunks.blocking_recv() {
            hasher.update(&chunk);
        }
        let _ = done.send(Some(hasher));
    }));
    answer
}

impl FsBlobStore {
    /// Where a session's bytes are staged.
    pub(super) fn staged_path(&self, id: &UploadId) -> PathBuf {
        self.root
            .join("uploads")
            .join(format!("{}{STAGED_SUFFIX}", id.as_str()))
    }

    /// Where earlier versions staged a session: a directory per session.
    pub(super) fn legacy_session_dir(&self, id: &UploadId) -> PathBuf {
        self.root.join("uploads").join(id.as_str())
    }

    /// Moves a session staged the older way to the current layout. `false` if there is none.
    pub(super) async fn adopt_legacy_session(&self, id: &UploadId) -> io::Result<bool> {
        let dir = self.legacy_session_dir(id);
        match tokio::fs::rename(dir.join("data"), self.staged_path(id)).await {
            Ok(()) => {
                let _ = tokio::fs::remove_dir(&dir).await;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The session's in-memory state, loading it from disk if the server restarted since
    /// the session was opened.
    pub(super) async fn session(
        &self,
        id: &UploadId,
    ) -> Result<Arc<tokio::sync::Mutex<Session>>, StorageError> {
        if let Some(s) = self.sessions.lock().expect("sessions lock").get(id) {
            return Ok(s.clone());
        }
        let staged = self.staged_path(id);
        let (len, hasher) = match tokio::fs::metadata(&staged).await {
            Ok(m) => (m.len(), None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if self.adopt_legacy_session(id).await? {
                    (tokio::fs::metadata(&staged).await?.len(), None)
                } else {
                    // No bytes yet (the file comes with the first ones), or no session at
                    // all: which, the metadata store knows, and the registry asked it first.
                    (0, Some(DigestHasher::new(Algorithm::Sha256)))
                }
            }
            Err(e) => return Err(e.into()),
        };
        let fresh = Arc::new(tokio::sync::Mutex::new(Session {
            hasher,
            hashing: None,
            len,
            unflushed: 0,
        }));
        let mut map = self.sessions.lock().expect("sessions lock");
        Ok(map.entry(id.clone()).or_insert(fresh).clone())
    }

    /// Another process sharing this directory (a second node on a shared volume) may have
    /// appended to the session since this one last did: if the staged file's length is not
    /// what the in-memory state says, drop the state, so it is rebuilt from the file.
    ///
    /// The `stat` runs right here rather than on the blocking pool: it reads an inode the
    /// kernel holds in memory (the session's own file, touched moments ago), which costs a
    /// few microseconds, while a hand-off to a blocking thread and back costs two context
    /// switches. Every upload request does this up to three times.
    pub(super) fn resync(&self, id: &UploadId, state: &mut Session) -> Result<(), StorageError> {
        let len = match std::fs::metadata(self.staged_path(id)) {
            Ok(m) => m.len(),
            // Nothing written yet.
            Err(e) if e.kind() == io::ErrorKind::NotFound && state.len == 0 => return Ok(()),
            // Purged behind our back (`berth gc` in another process).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(id);
                return Err(StorageError::UploadUnknown(id.clone()));
            }
            Err(e) => return Err(e.into()),
        };
        if len != state.len {
            state.forget_hash();
            state.len = len;
        }
        Ok(())
    }

    /// Appends `body` at `offset` to a locked session and hashes it (a large body's hash
    /// may still be running on return: [`Session::settle_hash`] waits for it). With
    /// `defer_small`, a body that ends within [`SMALL_BODY`] is hashed but not written:
    /// it is returned for the caller to write (the session's hash covers it, its length
    /// does not yet).
    pub(super) async fn write_body(
        &self,
        id: &UploadId,
        state: &mut Session,
        offset: u64,
        mut body: ByteStream,
        defer_small: bool,
    ) -> Result<Vec<Bytes>, StorageError> {
        if offset != state.len {
            return Err(StorageError::OutOfOrder {
                expected: state.len,
                got: offset,
            });
        }
        let path = self.staged_path(id);

        // Small bodies (most config and layer blobs of real images) are gathered, hashed
        // here and written in one blocking call. Larger ones go through the pipeline of
        // the module's comment.
        let crate::body_head::BodyHead {
            chunks: head,
            ended,
            error: mut body_error,
            ..
        } = crate::body_head::gather(&mut body, SMALL_BODY, |_| {}).await;
        let start_len = state.len;
        let (written, result) = if ended {
            let mut hasher = state.take_hasher(&path).await?;
            if state.len != offset {
                return Err(StorageError::OutOfOrder {
                    expected: state.len,
                    got: offset,
                });
            }
            for chunk in &head {
                hasher.update(chunk);
            }
            state.hasher = Some(hasher);
            if body_error.is_none() && defer_small {
                return Ok(head);
            }
            let p = path.clone();
            tokio::task::spawn_blocking(move || crate::staging::append_batch(&p, &head))
                .await
                .map_err(io::Error::other)?
        } else {
            let earlier = match (state.hashing.take(), state.hasher.take()) {
                (Some(previous), _) => EarlierHash::Behind(previous),
                (None, Some(hasher)) => EarlierHash::Ready(Box::new(hasher)),
                (None, None) => EarlierHash::Unhashed {
                    path: path.clone(),
                    len: start_len,
                },
            };
            let (hash_tx, hash_rx) = tokio::sync::mpsc::channel::<Bytes>(HASH_DEPTH);
            state.hashing = Some(spawn_hashing(earlier, hash_rx));
            let mut hash_tx = Some(hash_tx);
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_DEPTH);
            let writer = tokio::task::spawn_blocking(move || {
                crate::staging::append_chunks(&path, start_len, &mut rx)
            });
            let mut pending = head.into_iter();
            let mut blocks = Some(crate::blocks::Blocks::new());
            let mut ready = Vec::new();
            'body: while let Some(filling) = blocks.as_mut() {
                match pending.next() {
                    Some(chunk) => ready = filling.push(&chunk),
                    None => match body.next().await {
                        None => ready.extend(blocks.take().and_then(|b| b.finish())),
                        Some(Ok(chunk)) => ready = filling.push(&chunk),
                        Some(Err(e)) => {
                            body_error = Some(e);
                            ready.extend(blocks.take().and_then(|b| b.finish()));
                        }
                    },
                }
                for block in ready.drain(..) {
                    if let Some(hashing) = &hash_tx {
                        if hashing.send(block.clone()).await.is_err() {
                            // The hash is unknown (see `spawn_hashing`): rehashed on next use.
                            hash_tx = None;
                        }
                    }
                    if tx.send(block).await.is_err() {
                        break 'body; // the writer failed; its error is reported below
                    }
                }
            }
            drop(hash_tx);
            drop(tx);
            writer.await.map_err(io::Error::other)?
        };
        match result {
            Ok(()) => {
                state.len = start_len + written;
                state.unflushed += written;
                if state.unflushed >= crate::staging::WRITEBACK_EVERY {
                    state.unflushed = 0;
                    let staged = self.staged_path(id);
                    // Not awaited: the client need not wait for the disk yet.
                    drop(tokio::task::spawn_blocking(move || {
                        if let Ok(file) = File::open(&staged) {
                            let _ = file.sync_data();
                        }
                    }));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Purged behind our back (`berth gc` in another process).
                self.forget(id);
                return Err(StorageError::UploadUnknown(id.clone()));
            }
            Err(e) => {
                // What reached the file is unknown: rehash it on next use.
                state.forget_hash();
                state.len = tokio::fs::metadata(self.staged_path(id))
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                return Err(e.into());
            }
        }
        if let Some(source) = body_error {
            return Err(StorageError::BodyInterrupted {
                kept: state.len,
                source,
            });
        }
        Ok(Vec::new())
    }

    /// The digest of a locked session's bytes: from the running hash, or by reading the
    /// staged file (after a restart, or for another algorithm).
    pub(super) async fn session_digest(
        &self,
        id: &UploadId,
        state: &mut Session,
        algorithm: Algorithm,
    ) -> Result<Digest, StorageError> {
        state.settle_hash().await;
        if let (Some(h), Algorithm::Sha256) = (&state.hasher, algorithm) {
            return Ok(h.clone().finish());
        }
        let staged = self.staged_path(id);
        let (h, len) = tokio::task::spawn_blocking(move || hash_file(&staged, algorithm))
            .await
            .map_err(io::Error::other)??;
        state.len = len;
        Ok(h.finish())
    }

    pub(super) fn forget(&self, id: &UploadId) {
        self.sessions.lock().expect("sessions lock").remove(id);
    }
}

/// Hashes the first `len` bytes of a file: what a request found staged when the hash of
/// them was unknown, while it appends more.
fn hash_file_prefix(path: &Path, len: u64) -> io::Result<DigestHasher> {
    let mut hasher = DigestHasher::new(Algorithm::Sha256);
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound && len == 0 => return Ok(hasher),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; READ_CHUNK];
    let mut reader = file.take(len);
    let mut read = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    if read != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the staged file is shorter than the session",
        ));
    }
    Ok(hasher)
}

/// Hashes a whole file from the start; used after a restart or for non-default algorithms.
pub(super) fn hash_file(path: &Path, algorithm: Algorithm) -> io::Result<(DigestHasher, u64)> {
    let mut hasher = DigestHasher::new(algorithm);
    let mut file = match File::open(path) {
        Ok(f) => f,
        // A session whose first bytes have yet to come.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(e),
    };
    let mut buf = vec![0u8; READ_CHUNK];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher, len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}
