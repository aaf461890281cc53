//! Accepting connections from a network nobody trusts.
//!
//! A connection costs a file descriptor and some memory before it has sent a byte, so
//! every phase of one is bounded:
//!
//! - **Before and between requests**: a new connection has
//!   [`ConnectionLimits::header_timeout`] to complete its TLS handshake and first request
//!   head; after a response, hyper's header timeout gives a kept-alive HTTP/1.1
//!   connection the same time for its next head. So an idle keep-alive, a connection
//!   that never speaks and one that trickles a header all close.
//! - **While a body arrives**: a request body that goes [`ConnectionLimits::body_stall_timeout`]
//!   without a byte fails ([`RequestBody`]); a slow body that keeps moving is never cut.
//! - **How many**: at most [`ConnectionLimits::max_connections`] at once, derived from
//!   the descriptor limit. At the cap, the oldest connection that has not yet completed a
//!   request head is closed to make room (a flood of silent sockets therefore only ever
//!   displaces itself), and a full descriptor table makes the loop back off, not spin.
//!
//! A request whose body the handler did not read to the end (refused before reading, say)
//! is answered with `Connection: close`: the rest of the body is still on the wire, and
//! the client must not send its next request after it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue, Request, Response, Version};
use axum::Router;
use bytes::Bytes;
use futures_util::future::Either;
use futures_util::FutureExt;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tower_service::Service;

use crate::tls::Tls;
use crate::zero_copy::{Peer, ZeroCopyStream};
use crate::App;

/// How much of the server one connection, or a crowd of them, may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time a connection has to complete a request head (or a TLS handshake), counted
    /// from when it is ready for one: also the idle time allowed between requests.
    pub header_timeout: Duration,
    /// Time a request body may go without a single byte before the request fails.
    pub body_stall_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl ConnectionLimits {
    /// Limits for a process that may hold `fd_limit` descriptors: a quarter of them stays
    /// free for what requests open (blob and upload files, database connections), and no
    /// more than 16,384 connections are held whatever the limit (each costs memory).
    pub fn for_fd_limit(fd_limit: u64) -> Self {
        let max = (fd_limit / 4 * 3).clamp(16, 16_384);
        ConnectionLimits {
            header_timeout: Duration::from_secs(30),
            body_stall_timeout: Duration::from_secs(60),
            max_connections: usize::try_from(max).unwrap_or(16_384),
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::for_fd_limit(fd_limit())
    }
}

/// The descriptor limit this process runs under now (its soft limit).
pub fn fd_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20)
}

/// Raises the soft descriptor limit to the hard one, as far as the kernel allows, and
/// returns the limit in force: the soft limit is often 1,024, far below what a server
/// with thousands of clients needs, while the hard limit is there to be used.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // "Unlimited" is not a value Linux accepts for descriptors; 2^20 is its usual ceiling.
    let wanted = limit.maximum.unwrap_or(1 << 20);
    if limit.current.is_some_and(|current| current < wanted) {
        let raised = Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, wanted, "could not raise the descriptor limit");
        }
    }
    fd_limit()
}

/// What the accept loop needs besides the router.
pub(crate) struct Listening {
    pub(crate) limits: ConnectionLimits,
    pub(crate) tls: Option<Arc<Tls>>,
    /// Plain HTTP/1.1 only: `sendfile` writes file bytes beside hyper's framing, which
    /// only HTTP/1.1's length-delimited bodies allow.
    pub(crate) http1_only: bool,
}

/// Accepts and serves connections until `shutdown` resolves, then lets every request in
/// flight finish.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    router: Router,
    registry_api: Option<App>,
    listening: Listening,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let admission = Arc::new(Admission::new(listening.limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listening.limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    if listening.http1_only {
        builder = builder.http1_only();
    }
    let shared = Arc::new(Shared {
        builder,
        router,
        registry_api,
        limits: listening.limits,
        tls: listening.tls,
    });
    let mut shutdown = pin!(shutdown);
    let mut warned = Warned::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, addr) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if descriptors_exhausted(&e) => {
                // Waiting lets finishing requests give descriptors back; making room
                // among silent connections gives one back now.
                admission.evict_oldest_unproven();
                warned.once_in_a_while(|| {
                    tracing::warn!(error = %e, "out of file descriptors: accepting paused briefly");
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                continue;
            }
        };
        // Answers go out as the header and then the body, in separate writes: with
        // Nagle's algorithm the body of a small answer (a config blob) waited for the
        // client's delayed ACK, about 40 ms, on every request of a kept-alive connection.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let Some((ticket, evicted)) = admission.admit() else {
            warned.once_in_a_while(|| {
                tracing::warn!(
                    max = admission.max,
                    "connection limit reached with every connection busy: refusing new ones"
                );
            });
            continue;
        };
        let watcher = graceful.watcher();
        tokio::spawn(connection(
            shared.clone(),
            stream,
            addr,
            ticket,
            evicted,
            watcher,
        ));
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What every connection task shares.
struct Shared {
    builder: auto::Builder<TokioExecutor>,
    router: Router,
    /// The registry, whose `/v2` requests skip the router when set (see `serve_http`).
    registry_api: Option<App>,
    limits: ConnectionLimits,
    tls: Option<Arc<Tls>>,
}

fn descriptors_exhausted(e: &io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(rustix::io::Errno::MFILE.raw_os_error())
        || code == Some(rustix::io::Errno::NFILE.raw_os_error())
}

/// Serves one connection: the TLS handshake if any, then HTTP until the peer leaves, a
/// limit closes it, it is evicted to make room, or the server shuts down.
async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    addr: SocketAddr,
    ticket: Ticket,
    evicted: oneshot::Receiver<()>,
    watcher: Watcher,
) {
    let ticket = Arc::new(ticket);
    // Resolves when the connection must close before the peer is done: it was chosen to
    // make room, or its first request head is late. (A proven connection's eviction
    // sender is dropped, which must not close it; hyper bounds every later head.)
    let closing = {
        let ticket = ticket.clone();
        let deadline = shared.limits.header_timeout;
        async move {
            let evicted = async move {
                if evicted.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let late = async move {
                tokio::time::sleep(deadline).await;
                if ticket.is_proven() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                () = evicted => {}
                () = late => {}
            }
        }
    };
    let mut closing = pin!(closing);
    let io = ZeroCopyStream::new(stream);
    let peer = Peer::new(addr, &io);
    match &shared.tls {
        None => {
            let served = serve_http(&shared, io, peer, ticket, watcher);
            tokio::select! {
                () = served => {}
                () = &mut closing => {}
            }
        }
        Some(tls) => {
            let io = tokio::select! {
                done = tls.acceptor().accept(io) => match done {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::debug!(client = %addr, error = %e, "TLS handshake failed");
                        return;
                    }
                },
                () = &mut closing => return,
            };
            let served = serve_http(&shared, io, peer, ticket, watcher);
            tokio::select! {
                () = served => {}
                () = &mut closing => {}
            }
        }
    }
}

async fn serve_http<I>(shared: &Shared, io: I, peer: Peer, ticket: Arc<Ticket>, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = shared.router.clone();
    let registry_api = shared.registry_api.clone();
    let stall = shared.limits.body_stall_timeout;
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        ticket.prove();
        let (request, finished) = RequestBody::wrap(request, stall);
        let mut request = request;
        let http1 = request.version() < Version::HTTP_2;
        if !http1 && !request.headers().contains_key(header::HOST) {
            // HTTP/2 names the host in `:authority`; handlers read `Host` either way.
            let authority = request.uri().authority().map(|a| a.as_str().to_owned());
            if let Some(value) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                request.headers_mut().insert(header::HOST, value);
            }
        }
        // `/v2` requests, most of what a registry answers, go to the API directly: the
        // router would match the path, copy it into parameters nobody reads, and box the
        // request's future and its middleware's on every request (PERFORMANCE.md). Here
        // the request's future lives in the connection's own slot, which hyper reuses.
        let answer = match registry_api.as_ref() {
            Some(app) if crate::v2::is_v2_path(request.uri().path()) => {
                let app = app.clone();
                let peer = peer.clone();
                Either::Left(async move {
                    crate::logged(&app, request, |request| {
                        crate::v2::serve(&app, &peer, request)
                    })
                    .await
                })
            }
            _ => {
                request.extensions_mut().insert(ConnectInfo(peer.clone()));
                let mut router = router.clone();
                Either::Right(router.call(request).map(|answered| {
                    let Ok(response): Result<Response<Body>, Infallible> = answered;
                    response
                }))
            }
        };
        answer.map(move |mut response| {
            if http1 && finished.is_some_and(|f| !f.load(Ordering::Acquire)) {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        })
    });
    let connection = shared.builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Counts connections and knows which may give way.
struct Admission {
    max: usize,
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Connections that have not yet completed a request head, oldest first, each with the
    /// means to close it.
    unproven: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
}

impl Admission {
    fn new(max: usize) -> Self {
        Admission {
            max,
            open: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            unproven: Mutex::new(BTreeMap::new()),
        }
    }

    fn unproven(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<()>>> {
        self.unproven.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in a new connection, making room if the cap is reached; `None` when no
    /// connection can give way.
    fn admit(self: &Arc<Self>) -> Option<(Ticket, oneshot::Receiver<()>)> {
        if self.open.load(Ordering::Relaxed) >= self.max && !self.evict_oldest_unproven() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, evicted) = oneshot::channel();
        self.unproven().insert(id, close);
        self.open.fetch_add(1, Ordering::Relaxed);
        let ticket = Ticket {
            id,
            admission: self.clone(),
            proven: AtomicBool::new(false),
        };
        Some((ticket, evicted))
    }

    /// Closes the connection that has waited longest without completing a request head.
    fn evict_oldest_unproven(&self) -> bool {
        let oldest = self.unproven().pop_first();
        match oldest {
            Some((_, close)) => {
                let _ = close.send(());
                true
            }
            None => false,
        }
    }
}

/// One admitted connection's place; given back on drop.
struct Ticket {
    id: u64,
    admission: Arc<Admission>,
    proven: AtomicBool,
}

impl Ticket {
    fn is_proven(&self) -> bool {
        self.proven.load(Ordering::Relaxed)
    }

    /// The connection completed a request head: it is a client, not a squatter, and no
    /// longer gives way to newcomers.
    fn prove(&self) {
        if !self.proven.load(Ordering::Relaxed) && !self.proven.swap(true, Ordering::Relaxed) {
            self.admission.unproven().remove(&self.id);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.proven.load(Ordering::Relaxed) {
            self.admission.unproven().remove(&self.id);
        }
        self.admission.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Rate-limits a warning that a flood would otherwise repeat thousands of times a second.
#[derive(Default)]
struct Warned(Option<Instant>);

impl Warned {
    fn once_in_a_while(&mut self, warn: impl FnOnce()) {
        if self
            .0
            .is_none_or(|last| last.elapsed() >= Duration::from_secs(10))
        {
            self.0 = Some(Instant::now());
            warn();
        }
    }
}

/// A request body that fails once the client has sent nothing for the stall limit, and
/// says whether it was read to its end.
pub(crate) struct RequestBody {
    inner: Incoming,
    limit: Duration,
    /// Armed while the body waits for bytes; reset by each frame.
    stall: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    finished: Arc<AtomicBool>,
}

/// Why a request body ended early: the client stopped sending.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no body bytes for {} s", .0.as_secs())]
pub(crate) struct BodyStalled(Duration);

impl RequestBody {
    /// Guards the body of `request` if it has one; the flag tells whether it was read to
    /// the end. Requests without a body pass untouched (no allocation on the pull path).
    fn wrap(
        request: Request<Incoming>,
        limit: Duration,
    ) -> (Request<Body>, Option<Arc<AtomicBool>>) {
        use http_body::Body as _;
        if request.body().is_end_stream() {
            return (request.map(Body::new), None);
        }
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let request = request.map(|inner| {
            Body::new(RequestBody {
                inner,
                limit,
                stall: None,
                waiting: false,
                finished,
            })
        });
        (request, Some(flag))
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.finished.store(true, Ordering::Release);
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                this.waiting = false;
                if http_body::Body::is_end_stream(&this.inner) {
                    this.finished.store(true, Ordering::Release);
                }
                Poll::Ready(Some(frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.limit;
                let stall = match &mut this.stall {
                    Some(stall) => {
                        if !this.waiting {
                            stall.as_mut().reset(deadline);
                        }
                        stall
                    }
                    None => this
                        .stall
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.waiting = true;
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyStalled(this.limit).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_leave_room_for_files_and_stay_bounded() {
        assert_eq!(ConnectionLimits::for_fd_limit(1024).max_connections, 768);
        assert_eq!(
            ConnectionLimits::for_fd_limit(20_000).max_connections,
            15_000
        );
        assert_eq!(
            ConnectionLimits::for_fd_limit(1 << 20).max_connections,
            16_384
        );
        assert_eq!(ConnectionLimits::for_fd_limit(4).max_connections, 16);
    }

    #[test]
    fn at_the_cap_the_oldest_silent_connection_gives_way_and_proven_ones_never_do() {
        let admission = Arc::new(Admission::new(2));
        let (first, mut first_evicted) = admission.admit().unwrap();
        let (second, mut second_evicted) = admission.admit().unwrap();
        second.prove();
        let (_third, _) = admission.admit().expect("the silent one makes room");
        assert!(
            first_evicted.try_recv().is_ok(),
            "the oldest unproven is closed"
        );
        assert!(second_evicted.try_recv().is_err(), "a proven one is not");
        drop(first);
        // Now two open: the proven second and the unproven third.
        let (fourth, _) = admission.admit().expect("the third makes room");
        fourth.prove();
        drop(second);
        assert_eq!(admission.open.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_full_house_of_clients_refuses_newcomers() {
        let admission = Arc::new(Admission::new(1));
        let (only, _) = admission.admit().unwrap();
        only.prove();
        assert!(admission.admit().is_none());
        drop(only);
        assert!(admission.admit().is_some());
    }
}
