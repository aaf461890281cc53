//! Sending blob files with `sendfile(2)`: the kernel moves the bytes from the page cache
//! to the socket without copying them through the process, as nginx does for static files.
//!
//! hyper owns each connection and writes every byte of a response; it knows nothing of
//! files. So every accepted socket is wrapped in a [`ZeroCopyStream`] that shares a little
//! state with the body of a blob response ([`FileBody`]):
//!
//! 1. The body, asked for its next bytes, posts a slice of the file and waits. hyper, with
//!    nothing to write, flushes what it has buffered (the response head first) and then
//!    calls the stream's `poll_flush`.
//! 2. `poll_flush` finds the posted slice and `sendfile`s it, waiting for the socket to
//!    accept more as often as needed, then wakes the body.
//! 3. The body yields as many placeholder bytes as were sent, so that hyper's framing
//!    (`Content-Length`) is satisfied, and the stream drops exactly that many bytes of
//!    hyper's writes instead of sending them.
//!
//! Before posting a slice the body checks that it is in the page cache and otherwise reads
//! it on the blocking pool first, so that a worker thread never waits for the disk inside
//! `sendfile`. A body dropped half-way poisons its connection: nothing more is sent on it.

use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Bytes posted at once: large enough that the hand-over costs nothing next to the copy,
/// small enough that a slice read from disk first stays a short blocking read.
const SLICE: u64 = 4 * 1024 * 1024;
/// The placeholder bytes hyper is given (never sent; a static costs no memory until read).
static PLACEHOLDER: [u8; SLICE as usize] = [0; SLICE as usize];

/// What handlers know of the connection: the client's address, and the way to send files
/// on it.
#[derive(Clone)]
pub(crate) struct Peer {
    /// The TCP peer.
    pub(crate) addr: SocketAddr,
    sender: Arc<Shared>,
}

impl Peer {
    /// The peer at `addr`, whose files go out on `stream`.
    pub(crate) fn new(addr: SocketAddr, stream: &ZeroCopyStream) -> Self {
        Peer {
            addr,
            sender: stream.shared.clone(),
        }
    }

    /// A response body sending `len` bytes of `file` from `start` on this connection.
    pub(crate) fn file_body(&self, file: File, start: u64, len: u64) -> FileBody {
        FileBody {
            shared: self.sender.clone(),
            file: Arc::new(file),
            next: start,
            left: len,
            phase: Phase::Next,
        }
    }
}

/// State shared by a connection's stream and the file body being sent on it.
#[derive(Default)]
struct Shared(Mutex<State>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Default)]
struct State {
    /// The slice posted by the body and not yet fully sent.
    job: Option<Job>,
    /// How the last posted slice ended: bytes sent, or why not.
    done: Option<io::Result<u64>>,
    /// The body waiting for its slice.
    waiter: Option<Waker>,
    /// Bytes sent by `sendfile` whose placeholders hyper has yet to write.
    to_drop: u64,
    /// A file body was abandoned half-way: the byte stream is no longer well framed.
    poisoned: bool,
}

struct Job {
    file: Arc<File>,
    offset: u64,
    left: u64,
    sent: u64,
    /// The body's last slice: the socket is uncorked once it is sent.
    last: bool,
}

/// A connection's socket, writing hyper's bytes except the placeholders of file bodies,
/// whose real bytes it sends with `sendfile`.
pub(crate) struct ZeroCopyStream {
    inner: TcpStream,
    shared: Arc<Shared>,
}

impl ZeroCopyStream {
    /// Wraps an accepted socket.
    pub(crate) fn new(inner: TcpStream) -> Self {
        ZeroCopyStream {
            inner,
            shared: Arc::default(),
        }
    }

    /// Sends the posted slice, if any. `Ready(Ok)` once nothing is left to send.
    fn send_posted(&self, state: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(job) = state.job.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            if job.left == 0 {
                if job.last {
                    // Pushes out the partial segment the cork held back.
                    let _ = rustix::net::sockopt::set_tcp_cork(&self.inner, false);
                }
                state.to_drop += job.sent;
                state.done = Some(Ok(job.sent));
                state.job = None;
                if let Some(body) = state.waiter.take() {
                    body.wake();
                }
                return Poll::Ready(Ok(()));
            }
            let sent = match self.inner.poll_write_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => Err(e),
                Poll::Ready(Ok(())) => self.inner.try_io(Interest::WRITABLE, || {
                    if job.sent == 0 {
                        // Full segments only while the file goes out (nginx's `tcp_nopush`):
                        // measured, sendfile without it ran at 0.75-0.9x nginx's speed.
                        let _ = rustix::net::sockopt::set_tcp_cork(&self.inner, true);
                    }
                    let count = usize::try_from(job.left).unwrap_or(usize::MAX);
                    rustix::fs::sendfile(&self.inner, &*job.file, Some(&mut job.offset), count)
                        .map_err(io::Error::from)
                }),
            };
            let failure = match sent {
                Ok(0) => io::Error::new(io::ErrorKind::UnexpectedEof, "blob file ended early"),
                Ok(n) => {
                    job.left -= n as u64;
                    job.sent += n as u64;
                    continue;
                }
                // Readiness was stale: `try_io` cleared it, so the next poll waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => e,
            };
            let reported = io::Error::new(failure.kind(), failure.to_string());
            state.job = None;
            state.done = Some(Err(failure));
            state.poisoned = true;
            if let Some(body) = state.waiter.take() {
                body.wake();
            }
            return Poll::Ready(Err(reported));
        }
    }

    /// How many of `offered` bytes of hyper's are placeholders to drop; `None`: pass them
    /// to the socket. A posted slice is not sent here but in `poll_flush`: hyper may still
    /// be writing what it buffered before the body posted it (the response head).
    fn placeholders(&self, offered: usize) -> io::Result<Option<usize>> {
        let mut state = self.shared.lock();
        if state.poisoned {
            return Err(poisoned());
        }
        if state.to_drop == 0 || offered == 0 {
            return Ok(None);
        }
        let n = usize::try_from(state.to_drop).map_or(offered, |d| d.min(offered));
        state.to_drop -= n as u64;
        Ok(Some(n))
    }
}

fn poisoned() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "a file body was abandoned; the connection cannot continue",
    )
}

impl AsyncRead for ZeroCopyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ZeroCopyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.placeholders(buf.len()) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(Some(dropped)) => Poll::Ready(Ok(dropped)),
            Ok(None) => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let offered = bufs.iter().map(|b| b.len()).sum();
        match self.placeholders(offered) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(Some(dropped)) => Poll::Ready(Ok(dropped)),
            Ok(None) => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        {
            let mut state = self.shared.lock();
            if state.poisoned {
                return Poll::Ready(Err(poisoned()));
            }
            match self.send_posted(&mut state, cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The body of a blob response sent from a file (see the module documentation).
pub(crate) struct FileBody {
    shared: Arc<Shared>,
    file: Arc<File>,
    next: u64,
    left: u64,
    phase: Phase,
}

enum Phase {
    /// Ready to post the next slice.
    Next,
    /// Reading the next slice on the blocking pool, so that it is in the page cache.
    Warming(tokio::task::JoinHandle<io::Result<()>>),
    /// The slice is warm: post it without checking again.
    Warm,
    /// Waiting for the stream to send the posted slice.
    Sending,
    /// This many placeholder bytes are still to be yielded.
    Placeholders(u64),
    /// Finished or failed.
    Ended,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            match &mut this.phase {
                Phase::Ended => return Poll::Ready(None),
                Phase::Placeholders(0) => this.phase = Phase::Next,
                Phase::Placeholders(n) => {
                    let take = (*n).min(SLICE);
                    *n -= take;
                    let bytes = Bytes::from_static(&PLACEHOLDER[..take as usize]);
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Phase::Next | Phase::Warm => {
                    if this.left == 0 {
                        this.phase = Phase::Ended;
                        return Poll::Ready(None);
                    }
                    let len = this.left.min(SLICE);
                    if matches!(this.phase, Phase::Next)
                        && !in_page_cache(&this.file, this.next, len)
                    {
                        let (file, at) = (this.file.clone(), this.next);
                        this.phase = Phase::Warming(tokio::task::spawn_blocking(move || {
                            read_into_cache(&file, at, len)
                        }));
                        continue;
                    }
                    let mut state = this.shared.lock();
                    state.job = Some(Job {
                        file: this.file.clone(),
                        offset: this.next,
                        left: len,
                        sent: 0,
                        last: len == this.left,
                    });
                    state.done = None;
                    state.waiter = Some(cx.waker().clone());
                    this.phase = Phase::Sending;
                    // hyper now flushes, and the stream's `poll_flush` sends the slice.
                    return Poll::Pending;
                }
                Phase::Warming(reading) => match Pin::new(reading).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(Ok(()))) => this.phase = Phase::Warm,
                    Poll::Ready(Ok(Err(e))) => {
                        this.phase = Phase::Ended;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Ready(Err(e)) => {
                        this.phase = Phase::Ended;
                        return Poll::Ready(Some(Err(io::Error::other(e))));
                    }
                },
                Phase::Sending => {
                    let mut state = this.shared.lock();
                    match state.done.take() {
                        None => {
                            state.waiter = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                        Some(Ok(sent)) => {
                            this.next += sent;
                            this.left -= sent;
                            this.phase = Phase::Placeholders(sent);
                        }
                        Some(Err(e)) => {
                            this.phase = Phase::Ended;
                            return Poll::Ready(Some(Err(e)));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.phase, Phase::Ended) || (self.left == 0 && matches!(self.phase, Phase::Next))
    }

    fn size_hint(&self) -> SizeHint {
        let pending = match self.phase {
            Phase::Placeholders(n) => n,
            _ => 0,
        };
        SizeHint::with_exact(self.left + pending)
    }
}

impl Drop for FileBody {
    fn drop(&mut self) {
        // hyper may drop the body as soon as it has the announced length, before asking
        // for the end of the stream.
        let unfinished = match self.phase {
            Phase::Ended => false,
            Phase::Next | Phase::Warm | Phase::Placeholders(0) => self.left > 0,
            Phase::Warming(_) | Phase::Sending | Phase::Placeholders(_) => true,
        };
        if unfinished {
            let mut state = self.shared.lock();
            state.job = None;
            state.waiter = None;
            state.poisoned = true;
        }
    }
}

/// Whether the first and last pages of a range are in the page cache (a read that
/// refuses to wait for the disk succeeds on both).
fn in_page_cache(file: &File, start: u64, len: u64) -> bool {
    let mut byte = [0u8; 1];
    [start, start + len - 1].into_iter().all(|at| {
        rustix::io::preadv2(
            file,
            &mut [IoSliceMut::new(&mut byte)],
            at,
            rustix::io::ReadWriteFlags::NOWAIT,
        )
        .is_ok()
    })
}

/// Reads a range once so that the kernel caches it.
fn read_into_cache(file: &File, start: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let end = start + len;
    let mut at = start;
    while at < end {
        let want = usize::try_from(end - at).map_or(buf.len(), |w| w.min(buf.len()));
        match file.read_at(&mut buf[..want], at)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file ended early",
                ))
            }
            n => at += n as u64,
        }
    }
    Ok(())
}
