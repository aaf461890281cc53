//! Writing an upload's bytes to its staging file, fast and ready to be made durable.
//!
//! Chunks arrive from the request in pieces of a few KiB to a few hundred KiB. They are
//! gathered and written with one vectored `write` per mebibyte (no copy into a buffer),
//! and while the upload runs a second thread asks the kernel to write back what has been
//! written so far (`fdatasync` on a clone of the handle), so that the `fsync` before the
//! blob is published has only the tail left to flush instead of the whole blob.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::path::Path;
use std::sync::mpsc;

use bytes::Bytes;

/// Bytes gathered before one vectored write.
const BATCH_BYTES: usize = 1024 * 1024;
/// Bytes written between two background write-back requests.
pub(crate) const WRITEBACK_EVERY: u64 = 64 * 1024 * 1024;

/// Appends every chunk received on `chunks` to the file at `path`, until the sender is
/// dropped. Returns how many bytes reached the file and whether all did.
pub(crate) fn append_chunks(
    path: &Path,
    chunks: &mut tokio::sync::mpsc::Receiver<Bytes>,
) -> (u64, io::Result<()>) {
    let mut written = 0u64;
    let result = (|| {
        let mut file = OpenOptions::new().append(true).open(path)?;
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
        .open(path)
        .and_then(|mut f| write_batch(&mut f, chunks));
    match result {
        Ok(()) => (chunks.iter().map(|c| c.len() as u64).sum(), Ok(())),
        Err(e) => (0, Err(e)),
    }
}

fn write_batch(file: &mut File, batch: &[Bytes]) -> io::Result<()> {
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
