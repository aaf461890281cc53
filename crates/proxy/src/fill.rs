//! One blob being fetched from upstream, shared by every client that asks for it
//! meanwhile: the bytes go to an anonymous file, and each reader follows the file as it
//! grows. Readers get the last bytes only once the whole blob matched its digest, so a
//! corrupted upstream byte ends every reader's body early (an error, never a complete
//! answer with wrong bytes).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use berth_client::ClientError;
use berth_oci::{Digest, DigestHasher};
use berth_storage::ByteStream;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::watch;

/// How far a fill got.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// The blob's size, once the upstream answered.
    size: Option<u64>,
    /// Bytes received (in memory or in the file), whose order readers may follow.
    received: u64,
    /// Bytes in the file.
    written: u64,
    /// `Some(Ok)`: all bytes in and verified; `Some(Err)`: the fill failed.
    outcome: Option<Result<(), String>>,
    /// The upstream's refusal, when it refused before any byte (for the error's kind).
    not_found: bool,
    /// The last chunks received, by offset: readers keeping pace take them from here
    /// instead of reading the file back.
    recent: std::collections::VecDeque<(u64, Bytes)>,
    /// The bytes in `recent`.
    recent_bytes: usize,
}

/// What a reader at one offset needs of the progress, taken without copying the rest.
struct Seen {
    size: Option<u64>,
    received: u64,
    written: u64,
    outcome: Option<Result<(), String>>,
    /// The chunk kept in memory that holds the reader's offset, if any.
    held: Option<(u64, Bytes)>,
}

impl Seen {
    fn at(progress: &Progress, offset: u64) -> Seen {
        Seen {
            size: progress.size,
            received: progress.received,
            written: progress.written,
            outcome: progress.outcome.clone(),
            held: progress
                .recent
                .iter()
                .find(|(at, bytes)| *at <= offset && offset < at + bytes.len() as u64)
                .cloned(),
        }
    }
}

/// One fill.
pub(crate) struct Fill {
    file: Arc<File>,
    /// Shared with the writer thread, which reports what reached the file.
    progress: Arc<watch::Sender<Progress>>,
}

/// The most one read of the file takes, so a reader holds at most this much.
const READ_CHUNK: u64 = 1024 * 1024;

/// The bytes gathered before one hand-off to the file's writer (and one wake-up of the
/// readers). The chunks are handed over as they came, never copied into one buffer.
const WRITE_BATCH: usize = 256 * 1024;

/// Batches waiting for the writer thread, at most.
const WRITE_QUEUE: usize = 2;

/// The received bytes kept in memory for readers keeping pace; they include those
/// waiting to be written, so at most this much (plus one chunk) of a blob in flight is
/// held.
const RECENT_BYTES: usize = 4 * WRITE_BATCH;

impl Fill {
    pub(crate) fn new(file: File) -> Fill {
        Fill {
            file: Arc::new(file),
            progress: Arc::new(watch::Sender::new(Progress::default())),
        }
    }

    /// Whether the fill failed (its readers got an error; nobody should join it).
    pub(crate) fn failed(&self) -> bool {
        matches!(self.progress.borrow().outcome, Some(Err(_)))
    }

    /// The blob's size, once the upstream said it (or why it could not).
    pub(crate) async fn size(&self) -> Result<u64, ClientError> {
        let mut watching = self.progress.subscribe();
        let seen = watching
            .wait_for(|p| p.size.is_some() || p.outcome.is_some())
            .await
            .map_err(|_| ClientError::Unreachable("the fill stopped".to_owned()))?
            .clone();
        match (seen.size, seen.outcome) {
            (Some(size), _) => Ok(size),
            (None, Some(Err(message))) if seen.not_found => Err(ClientError::NotFound(message)),
            (None, Some(Err(message))) => Err(ClientError::Unreachable(message)),
            _ => Err(ClientError::Unreachable("the fill stopped".to_owned())),
        }
    }

    /// Writes `stream` into the file, telling readers as it goes; `fetched` hears each
    /// chunk's length. The bytes must number `size` and hash to `verify` (hashed on the
    /// writer thread, beside the receiving). Returns the size once every byte matched.
    pub(crate) async fn run<S>(
        &self,
        size: u64,
        mut stream: S,
        verify: Option<&Digest>,
        fetched: impl Fn(u64),
    ) -> Result<u64, ClientError>
    where
        S: futures_util::Stream<Item = Result<Bytes, io::Error>> + Unpin,
    {
        self.progress.send_modify(|p| p.size = Some(size));
        // The file is written on a thread of its own, so receiving (and hashing) the next
        // bytes overlaps writing the last ones; readers take what is not written yet from
        // the batches kept in memory.
        let (queue, mut pending) = tokio::sync::mpsc::channel::<(u64, Vec<Bytes>)>(WRITE_QUEUE);
        let (file, progress) = (self.file.clone(), self.progress.clone());
        // It hashes what it writes too, off the receiving path.
        let mut hasher = verify.map(|d| DigestHasher::new(d.algorithm()));
        let writer = tokio::task::spawn_blocking(move || -> Result<Option<Digest>, String> {
            while let Some((mut at, chunks)) = pending.blocking_recv() {
                for bytes in chunks {
                    if let Some(hasher) = hasher.as_mut() {
                        hasher.update(&bytes);
                    }
                    file.write_all_at(&bytes, at).map_err(|e| e.to_string())?;
                    at += bytes.len() as u64;
                }
                progress.send_modify(|p| p.written = at);
            }
            Ok(hasher.map(DigestHasher::finish))
        });
        let mut received = 0u64;
        // Chunks arrive at network sizes (16 to 64 KiB): gather them into one hand-off (and
        // one wake-up of the readers) per WRITE_BATCH.
        let mut batch: Vec<Bytes> = Vec::new();
        let mut batch_len = 0usize;
        let outcome: Result<(), String> = async {
            loop {
                let next = stream.next().await;
                let ended = match next {
                    Some(chunk) => {
                        let chunk = chunk.map_err(|e| e.to_string())?;
                        fetched(chunk.len() as u64);
                        batch_len += chunk.len();
                        if !chunk.is_empty() {
                            batch.push(chunk);
                        }
                        if received + batch_len as u64 > size {
                            return Err(format!("more than the {size} bytes promised"));
                        }
                        false
                    }
                    None => true,
                };
                if batch_len >= WRITE_BATCH || (ended && !batch.is_empty()) {
                    let chunks = std::mem::take(&mut batch);
                    let at = received;
                    received += batch_len as u64;
                    batch_len = 0;
                    self.progress.send_modify(|p| {
                        p.received = received;
                        let mut offset = at;
                        for chunk in &chunks {
                            p.recent.push_back((offset, chunk.clone()));
                            p.recent_bytes += chunk.len();
                            offset += chunk.len() as u64;
                        }
                        while p.recent_bytes > RECENT_BYTES {
                            let Some((_, dropped)) = p.recent.pop_front() else {
                                break;
                            };
                            p.recent_bytes -= dropped.len();
                        }
                    });
                    if queue.send((at, chunks)).await.is_err() {
                        // The writer stopped: its error says why.
                        break;
                    }
                }
                if ended {
                    break;
                }
            }
            drop(queue);
            let actual = writer
                .await
                .map_err(|e| e.to_string())
                .and_then(|written| written)?;
            if received != size {
                return Err(format!("{received} bytes where {size} were promised"));
            }
            if let (Some(actual), Some(expected)) = (actual, verify) {
                if actual != *expected {
                    return Err(format!("the bytes hash to {actual}, not {expected}"));
                }
            }
            Ok(())
        }
        .await;
        self.progress
            .send_modify(|p| p.outcome = Some(outcome.clone()));
        outcome.map(|()| size).map_err(ClientError::Unreachable)
    }

    /// Marks the fill failed before it began (the upstream refused or was unreachable).
    pub(crate) fn fail(&self, e: &ClientError) {
        let not_found = matches!(e, ClientError::NotFound(_));
        self.progress.send_modify(|p| {
            p.not_found = not_found;
            p.outcome = Some(Err(e.to_string()));
        });
    }

    /// The file the bytes went to, to store once they are verified.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The blob's bytes as they arrive; `served` hears each chunk's length.
    pub(crate) fn reader(&self, served: impl Fn(u64) + Send + Sync + 'static) -> ByteStream {
        let file = self.file.clone();
        let watching = self.progress.subscribe();
        let served = Arc::new(served);
        Box::pin(futures_util::stream::unfold(
            (file, watching, 0u64, served),
            |(file, mut watching, offset, served)| async move {
                loop {
                    let seen = Seen::at(&watching.borrow_and_update(), offset);
                    let Some(size) = seen.size else {
                        if let Some(Err(message)) = seen.outcome {
                            return Some((
                                Err(io::Error::other(message)),
                                (file, watching, u64::MAX, served),
                            ));
                        }
                        if watching.changed().await.is_err() {
                            return None;
                        }
                        continue;
                    };
                    if offset >= size {
                        return None;
                    }
                    let verified = matches!(seen.outcome, Some(Ok(())));
                    // The last byte waits for the digest.
                    let ready = if verified {
                        size
                    } else {
                        seen.received.min(size.saturating_sub(1))
                    };
                    if offset < ready {
                        if let Some((at, bytes)) = seen.held {
                            let from = (offset - at) as usize;
                            let to = (ready - at).min(bytes.len() as u64) as usize;
                            let piece = bytes.slice(from..to);
                            served(piece.len() as u64);
                            let next = offset + piece.len() as u64;
                            return Some((Ok(piece), (file, watching, next, served)));
                        }
                        if offset >= seen.written {
                            // Received but neither kept in memory nor written yet: wait.
                            if watching.changed().await.is_err() {
                                return Some((
                                    Err(io::Error::other("the upstream fetch stopped")),
                                    (file, watching, u64::MAX, served),
                                ));
                            }
                            continue;
                        }
                        let len = (ready.min(seen.written) - offset).min(READ_CHUNK) as usize;
                        let reading = file.clone();
                        let read = tokio::task::spawn_blocking(move || {
                            let mut buffer = vec![0u8; len];
                            reading.read_exact_at(&mut buffer, offset).map(|()| buffer)
                        })
                        .await
                        .map_err(io::Error::other)
                        .and_then(|r| r);
                        return match read {
                            Ok(buffer) => {
                                served(len as u64);
                                Some((
                                    Ok(Bytes::from(buffer)),
                                    (file, watching, offset + len as u64, served),
                                ))
                            }
                            Err(e) => Some((Err(e), (file, watching, u64::MAX, served))),
                        };
                    }
                    if let Some(Err(message)) = seen.outcome {
                        return Some((
                            Err(io::Error::other(format!(
                                "the upstream fetch failed: {message}"
                            ))),
                            (file, watching, u64::MAX, served),
                        ));
                    }
                    if watching.changed().await.is_err() {
                        return Some((
                            Err(io::Error::other("the upstream fetch stopped")),
                            (file, watching, u64::MAX, served),
                        ));
                    }
                }
            },
        ))
    }
}
