//! The filesystem backend. A blob is one file, `blobs/<algorithm>/<first two hex>/<hex>`;
//! uploads are staged in `uploads/<id>.part` on the same file system, so publishing is one
//! `rename`. Both are flat on purpose: a directory per blob (Distribution's
//! `<hex>/data`) or per session costs an inode allocation, a `mkdir` and a directory
//! `fsync` on every push; dropping them cut the server's CPU time for 200 small images by
//! about a tenth. Blobs in Distribution's layout (earlier versions of this store, or an
//! adopted Distribution directory) are still read, deduplicated against and deleted in
//! place: where `<hex>` is a directory, its `data` file is the blob. Sessions staged the
//! older way, `uploads/<id>/data`, are moved on first use. A blob that arrives whole in
//! the session's last request is never staged under a name: see [`publish_anonymous`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use berth_oci::{Algorithm, Digest};
use bytes::Bytes;

use crate::{BlobStore, ByteRange, ByteStream, LocalBlob, Sealed, StorageError, UploadId};

pub(super) const READ_CHUNK: usize = 256 * 1024;
/// The file name suffix of a staged upload in `uploads/`.
pub(super) const STAGED_SUFFIX: &str = ".part";
/// Threads removing files at once in a garbage-collection sweep.
const DELETE_THREADS: usize = 32;

mod session;
#[cfg(test)]
mod tests;

use session::Session;

/// Blob storage in a local directory.
pub struct FsBlobStore {
    root: PathBuf,
    sessions: Mutex<HashMap<UploadId, Arc<tokio::sync::Mutex<Session>>>>,
}

impl FsBlobStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("blobs"))?;
        std::fs::create_dir_all(root.join("uploads"))?;
        Ok(FsBlobStore {
            root,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// Where a blob published by this version lives; public so that tools and tests agree.
    /// (A blob in Distribution's layout is a directory here, with its bytes in `data`.)
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }
}

/// The size of the blob published at `path` (from [`FsBlobStore::blob_path`]), whose
/// bytes are `path` itself or `path/data` in Distribution's layout. `None` if there is
/// none, which includes an empty directory left by an interrupted publish or delete of
/// that layout.
fn published_len(path: &Path) -> io::Result<Option<u64>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return Ok(Some(meta.len()));
    }
    match std::fs::metadata(path.join("data")) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens the blob published at `path`, in either layout. One `open` for a flat blob: a
/// directory opens too (read-only) and is recognised by its metadata.
fn open_published(path: &Path) -> io::Result<Option<(File, u64)>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_dir() {
        return Ok(Some((file, meta.len())));
    }
    match File::open(path.join("data")) {
        Ok(data) => {
            let len = data.metadata()?.len();
            Ok(Some((data, len)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the blob published at `path`, in either layout; an absent blob is already
/// removed.
fn remove_blob_file(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // Distribution's layout: the file inside, then the directory.
        Err(e) if e.kind() == io::ErrorKind::IsADirectory || path.is_dir() => {
            match std::fs::remove_file(path.join("data")) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match std::fs::remove_dir(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// `create_dir_all` that reports which directories it created, deepest last.
fn create_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(d) = cursor {
        if d.is_dir() {
            break;
        }
        missing.push(d.to_path_buf());
        cursor = d.parent();
    }
    missing.reverse();
    for d in &missing {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            // Another upload of the same prefix created it first.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(missing)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// The blocking half of a publication: writes the `pending` tail of the session, makes
/// the staged bytes durable, waits for the go-ahead through `gate` (the metadata store's
/// reservation, made meanwhile) and renames them into place. Returns how many pending
/// bytes reached the file, and the outcome. With `unstaged` (the session has no bytes on
/// disk, so `pending` is all of the blob: the monolithic push of most configs and
/// layers) the bytes go to an anonymous file instead, see [`publish_anonymous`].
fn publish_staged(
    staged: &Path,
    target: &Path,
    pending: &[Bytes],
    unstaged: bool,
    gate: tokio::sync::oneshot::Receiver<()>,
) -> (u64, io::Result<()>) {
    if unstaged && !pending.is_empty() {
        let uploads = staged.parent().expect("staged path has a parent");
        // Where the kernel or its file system has no anonymous files, the named path.
        if let Ok(file) = open_anonymous(uploads) {
            return publish_anonymous(file, staged, target, pending, gate);
        }
    }
    let mut written = 0;
    let result = (|| {
        // Created here if the session got no bytes before its last request.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(staged)?;
        if !pending.is_empty() {
            crate::staging::write_batch(&mut file, pending)?;
            written = pending.iter().map(|c| c.len() as u64).sum();
        }
        // Same content already published: nothing to flush, the first copy is kept.
        let already = published_len(target)?.is_some();
        if !already {
            file.sync_data()?;
        }
        drop(file);
        gate.blocking_recv()
            .map_err(|_| io::Error::new(io::ErrorKind::Interrupted, "publication abandoned"))?;
        if published_len(target)?.is_some() {
            return std::fs::remove_file(staged);
        }
        if already {
            // It went away meanwhile (collected): this copy is published after all.
            File::open(staged)?.sync_data()?;
        }
        let dir = target.parent().expect("blob path has a parent");
        // Directories created here must reach the disk too, each through its parent;
        // directories that already existed are durable already.
        let created = create_dirs(dir)?;
        match std::fs::rename(staged, target) {
            // An empty directory of Distribution's layout, left by an interrupted publish
            // or delete, refuses the rename; checked only then, off the common path.
            Err(e) if e.kind() == io::ErrorKind::IsADirectory || target.is_dir() => {
                std::fs::remove_dir(target)?;
                std::fs::rename(staged, target)?;
            }
            other => other?,
        }
        sync_target_dirs(dir, &created)
    })();
    (written, result)
}

/// [`publish_staged`] for a blob that arrived whole: the bytes are written to an
/// anonymous file (`O_TMPFILE`), flushed, and linked into place. The uploads directory
/// never gets an entry, so no rename leaves it, and the flush does not write it: on ext4
/// without a journal a new file's first `fsync` also writes its directory, which measured
/// 0.45 against 0.41 ms per 64 KiB blob. Should the publication be abandoned, the
/// bytes go to the session's staged file as on the named path, so the session keeps them.
fn publish_anonymous(
    mut file: File,
    staged: &Path,
    target: &Path,
    pending: &[Bytes],
    gate: tokio::sync::oneshot::Receiver<()>,
) -> (u64, io::Result<()>) {
    let len = pending.iter().map(|c| c.len() as u64).sum();
    let result = (|| {
        crate::staging::write_batch(&mut file, pending)?;
        // Same content already published: nothing to flush, the first copy is kept.
        let already = published_len(target)?.is_some();
        if !already {
            file.sync_data()?;
        }
        if gate.blocking_recv().is_err() {
            return Ok(false);
        }
        if published_len(target)?.is_some() {
            return Ok(true);
        }
        if already {
            // It went away meanwhile (collected): this copy is published after all.
            file.sync_data()?;
        }
        let dir = target.parent().expect("blob path has a parent");
        let created = create_dirs(dir)?;
        match link_anonymous(&file, target) {
            Ok(()) => {}
            // Published by another upload of the same bytes since the check above.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && !target.is_dir() => {
                return Ok(true)
            }
            // An empty directory of Distribution's layout, as on the named path.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                std::fs::remove_dir(target)?;
                link_anonymous(&file, target)?;
            }
            Err(e) => return Err(e),
        }
        sync_target_dirs(dir, &created)?;
        Ok(true)
    })();
    match result {
        Ok(true) => {
            // A session that got an empty chunk before has an empty staged file.
            match std::fs::remove_file(staged) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => (len, Err(e)),
                _ => (len, Ok(())),
            }
        }
        Ok(false) => {
            let (written, kept) = crate::staging::append_batch(staged, pending);
            let abandoned = io::Error::new(io::ErrorKind::Interrupted, "publication abandoned");
            (written, kept.and(Err(abandoned)))
        }
        Err(e) => (0, Err(e)),
    }
}

/// An unnamed file in `dir`, writable, readable by the registry alone.
fn open_anonymous(dir: &Path) -> io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        dir,
        OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

/// Gives an anonymous file the name `target`, through its link in `/proc` (linking it
/// by descriptor alone takes a privilege the registry should not need).
fn link_anonymous(file: &File, target: &Path) -> io::Result<()> {
    let fd = rustix::fd::AsRawFd::as_raw_fd(file);
    rustix::fs::linkat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{fd}"),
        rustix::fs::CWD,
        target,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )?;
    Ok(())
}

/// Makes a new entry in `dir` durable, and the directories `created` for it, each
/// through its parent; directories that already existed are durable already.
fn sync_target_dirs(dir: &Path, created: &[PathBuf]) -> io::Result<()> {
    sync_dir(dir)?;
    for parent in created.iter().filter_map(|d| d.parent()) {
        if parent != dir {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Free space below which the store reports itself not ready: a push needs room for its
/// layers, and the metadata database beside them for its journal.
const MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;

/// Bytes an unprivileged process may still write on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(dir)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn ready(&self) -> Result<(), StorageError> {
        // Both trees must be there and be directories (an unmounted volume fails here).
        for dir in ["blobs", "uploads"] {
            let meta = tokio::fs::metadata(self.root.join(dir)).await?;
            if !meta.is_dir() {
                return Err(StorageError::Io(std::io::Error::other(format!(
                    "{dir} is not a directory"
                ))));
            }
        }
        let root = self.root.clone();
        let free = tokio::task::spawn_blocking(move || free_bytes(&root))
            .await
            .map_err(|e| StorageError::Io(std::io::Error::other(e)))??;
        if free < MIN_FREE_BYTES {
            return Err(StorageError::Full(format!(
                "{free} bytes free under {}: pushes fail until space is freed",
                self.root.display()
            )));
        }
        Ok(())
    }

    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        let path = self.blob_path(digest);
        let len = tokio::task::spawn_blocking(move || published_len(&path))
            .await
            .map_err(io::Error::other)??;
        Ok(len)
    }

    async fn read(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<ByteStream>, StorageError> {
        let path = self.blob_path(digest);
        let opened = tokio::task::spawn_blocking(move || -> io::Result<Option<File>> {
            let Some((mut file, _)) = open_published(&path)? else {
                return Ok(None);
            };
            if let Some(r) = range {
                file.seek(SeekFrom::Start(r.start))?;
            }
            Ok(Some(file))
        })
        .await
        .map_err(io::Error::other)??;
        let Some(file) = opened else { return Ok(None) };
        let len = range.map(|r| r.len());
        let stream = crate::reading::stream_file(file, len);
        Ok(Some(stream))
    }

    async fn open_local(&self, digest: &Digest) -> Result<Option<LocalBlob>, StorageError> {
        let path = self.blob_path(digest);
        let opened = tokio::task::spawn_blocking(move || -> io::Result<Option<LocalBlob>> {
            Ok(open_published(&path)?.map(|(file, size)| LocalBlob { file, size }))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(opened)
    }

    async fn start_upload(&self, id: &UploadId) -> Result<(), StorageError> {
        // Nothing on disk yet: the staged file is created with the first bytes, by the
        // thread that writes them (for most pushes, the one that then publishes them).
        let session = Session::empty();
        self.sessions
            .lock()
            .expect("sessions lock")
            .insert(id.clone(), Arc::new(tokio::sync::Mutex::new(session)));
        Ok(())
    }

    async fn upload_len(&self, id: &UploadId) -> Result<u64, StorageError> {
        let session = self.session(id).await?;
        let mut state = session.lock().await;
        self.resync(id, &mut state)?;
        Ok(state.len)
    }

    async fn append(
        &self,
        id: &UploadId,
        offset: u64,
        body: ByteStream,
    ) -> Result<u64, StorageError> {
        let session = self.session(id).await?;
        let mut state = session.lock().await;
        self.resync(id, &mut state)?;
        self.write_body(id, &mut state, offset, body, false).await?;
        Ok(state.len)
    }

    async fn commit(&self, id: &UploadId, expected: &Digest) -> Result<u64, StorageError> {
        self.seal(id, None, expected).await?.publish().await
    }

    async fn seal<'a>(
        &'a self,
        id: &UploadId,
        final_chunk: Option<(Option<u64>, ByteStream)>,
        expected: &Digest,
    ) -> Result<Sealed<'a>, StorageError> {
        let session = self.session(id).await?;
        let mut state = session.lock_owned().await;
        self.resync(id, &mut state)?;
        // A small final chunk is written by the thread that then flushes and publishes
        // it: one hand-off to the blocking pool for the whole request instead of two.
        let mut pending = Vec::new();
        if let Some((start, body)) = final_chunk {
            // Without a client offset the chunk goes at the end, which the lock holds still.
            let offset = start.unwrap_or(state.len);
            let defer = expected.algorithm() == Algorithm::Sha256;
            pending = self.write_body(id, &mut state, offset, body, defer).await?;
        }
        let pending_len: u64 = pending.iter().map(|c| c.len() as u64).sum();
        let actual = self
            .session_digest(id, &mut state, expected.algorithm())
            .await?;
        if actual != *expected {
            if !pending.is_empty() {
                // The chunk is kept, as any appended chunk is.
                let staged = self.staged_path(id);
                let (written, result) = tokio::task::spawn_blocking(move || {
                    crate::staging::append_batch(&staged, &pending)
                })
                .await
                .map_err(io::Error::other)?;
                state.len += written;
                if written != pending_len {
                    state.forget_hash();
                }
                result?;
            }
            return Err(StorageError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let base = state.len;
        let (go, gate) = tokio::sync::oneshot::channel();
        let staged = self.staged_path(id);
        let target = self.blob_path(expected);
        let unstaged = base == 0;
        let task = tokio::task::spawn_blocking(move || {
            publish_staged(&staged, &target, &pending, unstaged, gate)
        });
        let id = id.clone();
        Ok(Sealed::gated(go, async move {
            let (written, outcome) = task.await.map_err(io::Error::other)?;
            state.len = base + written;
            if written != pending_len {
                state.forget_hash();
            }
            outcome?;
            drop(state);
            self.forget(&id);
            Ok(base + written)
        }))
    }

    async fn seal_verified_file<'a>(
        &'a self,
        id: &UploadId,
        file: &std::fs::File,
        size: u64,
        expected: &Digest,
    ) -> Result<Option<Sealed<'a>>, StorageError> {
        if file.metadata()?.len() != size {
            return Ok(None);
        }
        // An anonymous file is its owner's only (0600), as everything the registry
        // writes is: it keeps that mode under its new name.
        let staged = self.staged_path(id);
        let linking = staged.clone();
        // Linking fails for a file on another file system or one that had a name and
        // lost it. The blocking thread links its own handle: were this future dropped
        // meanwhile, a bare descriptor number could name another file by then.
        let file = file.try_clone()?;
        let linked = tokio::task::spawn_blocking(move || link_anonymous(&file, &linking))
            .await
            .map_err(io::Error::other)?;
        if let Err(e) = linked {
            tracing::debug!(error = %e, "a verified file could not be linked into the store; copying it");
            return Ok(None);
        }
        let (go, gate) = tokio::sync::oneshot::channel();
        let target = self.blob_path(expected);
        let task =
            tokio::task::spawn_blocking(move || publish_staged(&staged, &target, &[], false, gate));
        Ok(Some(Sealed::gated(go, async move {
            task.await.map_err(io::Error::other)?.1?;
            Ok(size)
        })))
    }

    async fn abort(&self, id: &UploadId) -> Result<(), StorageError> {
        // Removes whatever is on disk, even a session this process cannot load (an
        // interrupted start leaves a legacy directory without its data file).
        let session = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(id)
            .cloned();
        let _state = match &session {
            Some(s) => Some(s.lock().await),
            None => None,
        };
        let staged = tokio::fs::remove_file(self.staged_path(id)).await;
        let legacy = tokio::fs::remove_dir_all(self.legacy_session_dir(id)).await;
        for result in [staged, legacy] {
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.forget(id);
        Ok(())
    }

    async fn list_uploads(&self) -> Result<Vec<(UploadId, std::time::SystemTime)>, StorageError> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(self.root.join("uploads")).await?;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let (id, legacy) = match name.strip_suffix(STAGED_SUFFIX) {
                Some(stem) => (UploadId::parse(stem), false),
                None => (UploadId::parse(name), true),
            };
            let Some(id) = id else { continue };
            // Sessions finish and vanish while this runs: a missing entry is simply skipped.
            let data = if legacy {
                entry.path().join("data")
            } else {
                entry.path()
            };
            let changed = match tokio::fs::metadata(data).await {
                Ok(m) => m.modified()?,
                // A legacy directory without its data file: an interrupted start or abort.
                Err(e) if e.kind() == io::ErrorKind::NotFound && legacy => {
                    match entry.metadata().await {
                        Ok(m) => m.modified()?,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            out.push((id, changed));
        }
        Ok(out)
    }

    async fn delete_many(&self, digests: &[Digest]) -> Result<(), StorageError> {
        let paths: Vec<PathBuf> = digests.iter().map(|d| self.blob_path(d)).collect();
        // Unlinking is latency-bound (journal, discard): measured on ext4 with `discard`,
        // 3,000 files take 0.29 s one at a time and 0.09 s sixteen at a time.
        tokio::task::spawn_blocking(move || {
            let per_thread = paths.len().div_ceil(DELETE_THREADS).max(1);
            std::thread::scope(|scope| {
                let workers: Vec<_> = paths
                    .chunks(per_thread)
                    .map(|chunk| {
                        scope.spawn(move || chunk.iter().try_for_each(|p| remove_blob_file(p)))
                    })
                    .collect();
                workers.into_iter().try_for_each(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(io::Error::other("delete thread panicked")))
                })
            })
        })
        .await
        .map_err(io::Error::other)??;
        Ok(())
    }

    async fn delete(&self, digest: &Digest) -> Result<(), StorageError> {
        let path = self.blob_path(digest);
        tokio::task::spawn_blocking(move || remove_blob_file(&path))
            .await
            .map_err(io::Error::other)??;
        Ok(())
    }
}
