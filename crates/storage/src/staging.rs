//! Writing an upload's bytes to its staging file, fast and ready to be made durable.
//!
//! Large bodies are written with `O_DIRECT` where the file system allows it: the bytes go
//! from one reused, aligned buffer straight to the device, so the kernel neither copies
//! them into the page cache (the largest cost of a push in profiles, and one that varies
//! with the host's memory state) nor has them left to flush at commit. Where direct I/O is
//! refused (older tmpfs, some network file systems) the buffered path is used: chunks are
//! gathered and written with one vectored `write` per mebibyte, and a second thread starts
//! write-back as the upload runs, so that the `fsync` before the blob is published has only
//! the tail left to flush.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;

use bytes::Bytes;

use crate::pool::BufferPool;

/// Bytes gathered before one vectored write.
const BATCH_BYTES: usize = 1024 * 1024;
/// Bytes written between two background write-back requests.
pub(crate) const WRITEBACK_EVERY: u64 = 64 * 1024 * 1024;
/// Alignment direct I/O needs for buffer addresses, lengths and file offsets: 4 KiB
/// covers devices with 512-byte and with 4 KiB sectors.
const DIRECT_ALIGN: usize = 4096;
/// Bytes per direct write: large enough for the device to stream, small enough to bound
/// an upload's memory.
const DIRECT_BATCH: usize = 2 * 1024 * 1024;

/// Appends every chunk received on `chunks` to the file at `path`, whose length is
/// `start`, until the sender is dropped. Returns how many bytes reached the file and
/// whether all did.
pub(crate) fn append_chunks(
    path: &Path,
    start: u64,
    chunks: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> (u64, io::Result<()>) {
    match OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(direct) => append_direct(path, direct, start, chunks),
        Err(_) => append_buffered(path, chunks),
    }
}

/// The direct-I/O path of [`append_chunks`]. The staging file may end mid-block (a
/// previous chunk of the upload, or a buffered tail): that block is read back into the
/// buffer's head and rewritten whole, so every direct write starts on a boundary.
fn append_direct(
    path: &Path,
    direct: File,
    start: u64,
    chunks: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> (u64, io::Result<()>) {
    let mut end = start;
    let result = (|| {
        let buffered = OpenOptions::new().read(true).write(true).open(path)?;
        let mut out = DirectOut {
            direct: Some(direct),
            buffered,
        };
        let mut buf = AlignedBuf::new(DIRECT_BATCH);
        let head = (start % DIRECT_ALIGN as u64) as usize;
        let mut pos = start - head as u64;
        if head > 0 {
            out.buffered
                .read_exact_at(buf.spare(head), pos)
                .map_err(|e| io::Error::new(e.kind(), format!("re-reading the last block: {e}")))?;
            buf.filled_up_to(head);
        }
        while let Some(chunk) = chunks.blocking_recv() {
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                rest = &rest[buf.push(rest)..];
                if buf.is_full() {
                    out.write_at(buf.filled(), pos, true)?;
                    pos += buf.filled().len() as u64;
                    end = end.max(pos);
                    buf.clear();
                }
            }
        }
        // Whole blocks go direct, the partial last one through the page cache.
        let filled = buf.filled();
        let whole = filled.len() - filled.len() % DIRECT_ALIGN;
        out.write_at(&filled[..whole], pos, true)?;
        out.write_at(&filled[whole..], pos + whole as u64, false)?;
        end = end.max(pos + filled.len() as u64);
        Ok(())
    })();
    (end - start, result)
}

/// The two handles of a direct upload: direct for whole blocks, buffered for a tail (and
/// for everything, should the first direct write be refused after all).
struct DirectOut {
    direct: Option<File>,
    buffered: File,
}

impl DirectOut {
    fn write_at(&mut self, bytes: &[u8], pos: u64, whole_blocks: bool) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if whole_blocks {
            if let Some(direct) = &self.direct {
                match direct.write_all_at(bytes, pos) {
                    Ok(()) => return Ok(()),
                    // The file system opened the file but wants another alignment.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                    Err(e) => return Err(e),
                }
            }
        }
        self.buffered.write_all_at(bytes, pos)
    }
}

/// A buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary, found inside an
/// over-allocated `Vec`.
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    capacity: usize,
    len: usize,
}

/// Direct-write buffers kept for the next large request: allocating and zeroing 2 MiB
/// per `PATCH` was about 1 % of a chunked push (page faults and `memset`). 8 MiB idle at
/// most.
static SPARE: BufferPool = BufferPool::new(4);

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        SPARE.give(std::mem::take(&mut self.storage));
    }
}

impl AlignedBuf {
    /// A buffer for `capacity` bytes, reused if one of that size is spare. Its bytes are
    /// whatever an earlier upload left there: only what is pushed or read into it since
    /// is ever written out.
    fn new(capacity: usize) -> Self {
        let size = capacity + DIRECT_ALIGN;
        let storage = SPARE
            .take(|b| b.len() == size)
            .unwrap_or_else(|| vec![0u8; size]);
        let misalignment = storage.as_ptr() as usize % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - misalignment) % DIRECT_ALIGN;
        AlignedBuf {
            storage,
            start,
            capacity,
            len: 0,
        }
    }

    /// Copies as much of `bytes` as fits; returns how much that was.
    fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.capacity - self.len);
        let at = self.start + self.len;
        self.storage[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    /// The next `n` unfilled bytes, to be filled by a read and then [`Self::filled_up_to`].
    fn spare(&mut self, n: usize) -> &mut [u8] {
        let at = self.start + self.len;
        &mut self.storage[at..at + n]
    }

    fn filled_up_to(&mut self, len: usize) {
        self.len = len;
    }

    fn filled(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn is_full(&self) -> bool {
        self.len == self.capacity
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

/// The buffered path of [`append_chunks`].
fn append_buffered(
    path: &Path,
    chunks: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> (u64, io::Result<()>) {
    let mut written = 0u64;
    let result = (|| {
        let mut file = OpenOptions::new().append(true).create(true).open(path)?;
        let mut writeback = Writeback::new(&file)?;
        let mut batch: Vec<Bytes> = Vec::with_capacity(64);
        let mut batch_len = 0usize;
        while let Some(chunk) = chunks.blocking_recv() {
            batch_len += chunk.len();
            batch.push(chunk);
            if batch_len >= BATCH_BYTES {
                write_batch(&mut file, &batch)?;
                written += batch_len as u64;
                writeback.wrote(batch_len as u64);
                batch.clear();
                batch_len = 0;
            }
        }
        write_batch(&mut file, &batch)?;
        written += batch_len as u64;
        writeback.finish();
        Ok(())
    })();
    (written, result)
}

/// Appends a few chunks at once: the path for small bodies.
pub(crate) fn append_batch(path: &Path, chunks: &[Bytes]) -> (u64, io::Result<()>) {
    let result = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| write_batch(&mut f, chunks));
    match result {
        Ok(()) => (chunks.iter().map(|c| c.len() as u64).sum(), Ok(())),
        Err(e) => (0, Err(e)),
    }
}

/// Writes `batch` at the file's position with as few vectored writes as it takes.
pub(crate) fn write_batch(file: &mut File, batch: &[Bytes]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batch.iter().map(|b| IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = file.write_vectored(rest)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "staging file accepted no bytes",
            ));
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Starts write-back of the staging file every [`WRITEBACK_EVERY`] bytes on a helper
/// thread, created only once an upload gets that large.
struct Writeback {
    file: File,
    since_last: u64,
    helper: Option<mpsc::Sender<()>>,
}

impl Writeback {
    fn new(file: &File) -> io::Result<Self> {
        Ok(Writeback {
            file: file.try_clone()?,
            since_last: 0,
            helper: None,
        })
    }

    fn wrote(&mut self, n: u64) {
        self.since_last += n;
        if self.since_last < WRITEBACK_EVERY {
            return;
        }
        self.since_last = 0;
        if self.helper.is_none() {
            if let Ok(file) = self.file.try_clone() {
                let (tx, rx) = mpsc::channel::<()>();
                std::thread::spawn(move || {
                    while rx.recv().is_ok() {
                        while rx.try_recv().is_ok() {} // coalesce requests that piled up
                                                       // Best effort: durability is enforced by the fsync at commit.
                        let _ = file.sync_data();
                    }
                });
                self.helper = Some(tx);
            }
        }
        if let Some(tx) = &self.helper {
            let _ = tx.send(());
        }
    }

    /// Lets the helper finish its current flush and exit, without waiting for it: the
    /// request is answered now, the commit's own fsync waits for the disk later.
    fn finish(self) {
        drop(self.helper);
    }
}
