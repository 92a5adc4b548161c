//! The HTTP server under the router: an accept loop over hyper's connection builder that keeps
//! hostile or broken clients from holding the gateway's resources.
//!
//! - A cap on open connections (a semaphore, kept well below the file-descriptor limit). At the
//!   cap, the oldest connections with no request in progress are closed to make room, so a flood
//!   of idle sockets cannot lock out a client that sends a request.
//! - Per connection, one deadline while no request is in progress: `header_timeout` from the
//!   accept or from the first byte of the next request, `idle_timeout` for a kept-alive
//!   connection that sends nothing. Both are tracked here rather than by hyper, so that they hold
//!   for HTTP/1 and HTTP/2 alike and a connection that never sends a byte is covered too.
//! - `GuardedIo` sees the raw bytes: it answers a request line or header block over its limits
//!   (and a request target hyper cannot parse) with a problem+json `414`/`431`/`400` before
//!   hyper would send its own empty one, and cuts a
//!   response the client has stopped reading.
//! - Shutdown in steps: stop accepting and let requests finish; after the grace period the
//!   application cancels its work (see `app::Running::shutdown`); at last connections are dropped.
//!
//! Request bodies are watched one level up, in [`crate::guard`], where the router can answer.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use orbit_config::HttpSettings;
use std::future::Future as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// hyper's own read-buffer limit; kept above the head limit so ours always answers first.
const HYPER_DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;
/// When closing, how long and how much more input is read and dropped so the client gets the
/// answer instead of a reset (a close with unread input sends RST).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
/// A connection idle for less than this is not evicted: its last response may still be in flight.
const EVICT_MIN_IDLE: Duration = Duration::from_secs(1);

/// The connection-level limits of `http.*`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// A response write that makes no progress for this long is cut.
    pub send_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
}

impl Limits {
    /// `max_connections` is the configured cap, lowered to `fd_limit / 2` when that is smaller.
    pub fn new(http: &HttpSettings, fd_limit: u64) -> Self {
        let ceiling = usize::try_from(fd_limit / 2).unwrap_or(usize::MAX).max(1);
        if http.max_connections > ceiling {
            tracing::warn!(
                configured = http.max_connections,
                used = ceiling,
                fd_limit,
                "http.max_connections is above half the file-descriptor limit; lowered"
            );
        }
        Limits {
            max_connections: http.max_connections.min(ceiling),
            header_timeout: http.header_timeout,
            idle_timeout: http.idle_timeout,
            send_timeout: http.body_timeout,
            max_header_bytes: http.max_header_bytes,
            max_headers: http.max_headers,
        }
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the file-descriptor limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// How a server run ends: `stop` stops accepting and drains, `kill` drops what is left.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub stop: CancellationToken,
    pub kill: CancellationToken,
}

/// Serves `router` on `listener` until `shutdown.stop`, then until every connection is closed.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: Shutdown) {
    let limits = Arc::new(limits);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Header deadlines are this module's; hyper's would only cover HTTP/1.
        .header_read_timeout(None)
        .max_headers(limits.max_headers)
        .max_buf_size(HYPER_DEFAULT_MAX_BUF.max(limits.max_header_bytes + 8192));
    builder
        .http2()
        .max_concurrent_streams(100)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let registry = Arc::new(Registry::default());
    let tasks = TaskTracker::new();
    let evict_batch = (limits.max_connections / 64).max(1);
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                registry.evict_idle(evict_batch);
                tokio::select! {
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = shutdown.stop.cancelled() => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Per-connection failures (reset before accept) are the client's; anything
                    // else (descriptors, memory) clears up by waiting a moment, not by spinning.
                    if !matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) {
                        tracing::error!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            () = shutdown.stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let (id, conn) = registry.insert();
        tasks.spawn(connection(
            builder.clone(),
            stream,
            router.clone(),
            limits.clone(),
            conn,
            shutdown.clone(),
            Guard {
                registry: registry.clone(),
                id,
                _permit: permit,
            },
        ));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// Frees a connection's slot when its task ends, however it ends.
struct Guard {
    registry: Arc<Registry>,
    id: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

async fn connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    router: Router,
    limits: Arc<Limits>,
    conn: Arc<Conn>,
    shutdown: Shutdown,
    _guard: Guard,
) {
    let io = TokioIo::new(GuardedIo::new(stream, conn.clone(), limits.clone()));
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let busy = conn.begin_request();
            let router = router.clone();
            async move {
                let response = match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|body| Body::new(Tracked { body, _busy: busy })))
            }
        })
    };
    let served = builder.serve_connection(io, service);
    tokio::pin!(served);
    let mut draining = false;
    loop {
        let deadline = conn.deadline(&limits);
        let expiry = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = expiry => {
                if conn.deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!("closing a connection that sent no request in time");
                    return;
                }
            }
            () = conn.wake.notified() => {}
            () = conn.evict.cancelled(), if !draining => {
                if conn.idle_for().is_some() {
                    return;
                }
                draining = true;
                served.as_mut().graceful_shutdown();
            }
            () = shutdown.stop.cancelled(), if !draining => {
                if conn.idle_for().is_some() {
                    return;
                }
                // hyper closes the connection once the response in progress is written.
                draining = true;
                served.as_mut().graceful_shutdown();
            }
            () = shutdown.kill.cancelled() => return,
        }
    }
}

/// Milliseconds since the first call, plus one: `0` stands for "never".
fn now_ms() -> u64 {
    let base = *EPOCH.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

fn instant(ms: u64) -> Instant {
    *EPOCH.get_or_init(Instant::now) + Duration::from_millis(ms.saturating_sub(1))
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// What the accept loop and the connection's own task know of one connection.
struct Conn {
    in_flight: AtomicUsize,
    /// Requests begun and ended, so [`GuardedIo`] knows a new head is coming.
    started: AtomicU64,
    ended: AtomicU64,
    /// When the connection last had no request in progress (accept, or the end of a response).
    idle_since: AtomicU64,
    /// The first byte of the next request, if it has begun; `0` when not.
    head_started: AtomicU64,
    wake: Notify,
    evict: CancellationToken,
}

impl Conn {
    fn new() -> Self {
        Conn {
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            idle_since: AtomicU64::new(now_ms()),
            head_started: AtomicU64::new(0),
            wake: Notify::new(),
            evict: CancellationToken::new(),
        }
    }

    fn begin_request(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(0, Ordering::SeqCst);
        Busy(self.clone())
    }

    fn head_bytes_arrived(&self) {
        if self.in_flight.load(Ordering::SeqCst) == 0
            && self
                .head_started
                .compare_exchange(0, now_ms(), Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            // The deadline may now be sooner (header_timeout < idle_timeout).
            self.wake.notify_one();
        }
    }

    /// How long no request has been in progress, if none is.
    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight.load(Ordering::SeqCst) == 0)
            .then(|| instant(self.idle_since.load(Ordering::SeqCst)).elapsed())
    }

    /// When the connection is to be closed for want of a request; none while one is in progress.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let head = self.head_started.load(Ordering::SeqCst);
        if head != 0 {
            return Some(instant(head) + limits.header_timeout);
        }
        let idle = instant(self.idle_since.load(Ordering::SeqCst));
        Some(if self.started.load(Ordering::SeqCst) == 0 {
            idle + limits.header_timeout
        } else {
            idle + limits.idle_timeout
        })
    }
}

/// A request in progress, from its head until its response body is done or dropped.
struct Busy(Arc<Conn>);

impl Drop for Busy {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.idle_since.store(now_ms(), Ordering::SeqCst);
        conn.head_started.store(0, Ordering::SeqCst);
        conn.ended.fetch_add(1, Ordering::SeqCst);
        conn.in_flight.fetch_sub(1, Ordering::SeqCst);
        conn.wake.notify_one();
    }
}

#[derive(Default)]
struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn insert(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new());
        self.open
            .lock()
            .expect("registry lock")
            .insert(id, conn.clone());
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("registry lock").remove(&id);
    }

    /// Asks up to `n` of the oldest connections with no request in progress to close.
    fn evict_idle(&self, n: usize) {
        let open = self.open.lock().expect("registry lock");
        let mut evicted = 0;
        for conn in open.values() {
            if evicted == n {
                break;
            }
            let idle = conn
                .idle_for()
                .is_some_and(|d| d >= EVICT_MIN_IDLE || conn.started.load(Ordering::SeqCst) == 0);
            if idle && !conn.evict.is_cancelled() {
                conn.evict.cancel();
                evicted += 1;
            }
        }
        if evicted > 0 {
            tracing::debug!(evicted, "connection cap reached: closed idle connections");
        }
    }
}

/// A response body that marks its request finished when it is done or dropped.
struct Tracked {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Where the request head being read stands, byte by byte.
#[derive(Default)]
struct HeadScan {
    /// Off while a request is in progress (its body is not a head) and for HTTP/2.
    off: bool,
    http2: bool,
    bytes: usize,
    lines: usize,
    started: bool,
    at_line_start: bool,
    ended_seen: u64,
    /// The request line so far, to check its target once it ends.
    request_line: Vec<u8>,
}

enum HeadProblem {
    /// A target hyper would refuse with an empty `400` (an unencoded `<`, `>`, space or
    /// backquote, such as a README placeholder pasted as is).
    InvalidTarget,
    UriTooLong,
    HeadersTooLarge,
    TooManyHeaders,
}

impl HeadScan {
    /// Looks at freshly read bytes; `Some` when the head in progress is over a limit.
    fn scan(&mut self, bytes: &[u8], limits: &Limits) -> Option<HeadProblem> {
        if self.http2 {
            return None;
        }
        if !self.started && self.bytes == 0 && bytes.starts_with(b"PRI ") {
            self.http2 = true;
            return None;
        }
        for &b in bytes {
            if self.off {
                return None;
            }
            self.bytes += 1;
            if self.lines == 0 && b != b'\n' && b != b'\r' && (self.started || b != b' ') {
                self.request_line.push(b);
                // A space ends a token: hyper may judge the line from here on, before its end.
                if b == b' ' && !request_line_ok(&self.request_line, false) {
                    return Some(HeadProblem::InvalidTarget);
                }
            }
            if b == b'\n' {
                if self.started && self.lines == 0 && !request_line_ok(&self.request_line, true) {
                    return Some(HeadProblem::InvalidTarget);
                }
                if self.started {
                    if self.at_line_start {
                        self.off = true;
                    } else {
                        self.lines += 1;
                        self.at_line_start = true;
                    }
                }
            } else if b != b'\r' {
                self.started = true;
                self.at_line_start = false;
            }
            if self.bytes > limits.max_header_bytes {
                return Some(if self.lines == 0 {
                    HeadProblem::UriTooLong
                } else {
                    HeadProblem::HeadersTooLarge
                });
            }
            // `lines` counts the request line too.
            if self.lines > limits.max_headers + 1 {
                return Some(HeadProblem::TooManyHeaders);
            }
        }
        // hyper parses what it has so far, so the line is judged at each read's end too.
        if self.lines == 0 && !self.off && !request_line_ok(&self.request_line, false) {
            return Some(HeadProblem::InvalidTarget);
        }
        None
    }

    fn restart(&mut self, ended: u64) {
        *self = HeadScan {
            http2: self.http2,
            ended_seen: ended,
            ..HeadScan::default()
        };
    }
}

/// Whether the request line so far (`METHOD TARGET VERSION`, `ended` once its line break came)
/// can still be one hyper accepts, judged as hyper does: the target by the same parser
/// (`http::Uri`), and a third token that must be the version. What hyper would refuse with an
/// empty `400` is answered here with a problem+json one instead; anything else wrong with the
/// line (say, a method with odd bytes) is left to hyper.
fn request_line_ok(line: &[u8], ended: bool) -> bool {
    let tokens: Vec<&[u8]> = line
        .split(|&b| b == b' ')
        .filter(|t| !t.is_empty())
        .collect();
    let token_ended = ended || line.last() == Some(&b' ');
    match tokens[..] {
        // A fourth token: a space inside the target (`/sources/<source id>/errors`).
        [_, _, _, _, ..] => false,
        [_, _, _] if token_ended && line.last() == Some(&b' ') => false,
        [_, target, version] => {
            axum::http::Uri::try_from(target).is_ok()
                && (version.starts_with(b"HTTP/") || b"HTTP/".starts_with(version))
        }
        [_, target] if token_ended => axum::http::Uri::try_from(target).is_ok(),
        _ => true,
    }
}

struct Refusal {
    response: Vec<u8>,
    sent: usize,
}

/// Closing our side, then reading and dropping what the client still sends for a while: a
/// socket closed with unread input sends a reset, which can destroy the response before the
/// client reads it (say, a `413` while the client is still sending the body).
struct Linger {
    shut: bool,
    drained: usize,
    timer: Pin<Box<Sleep>>,
}

impl Linger {
    fn new() -> Self {
        Linger {
            shut: false,
            drained: 0,
            timer: Box::pin(tokio::time::sleep(LINGER)),
        }
    }

    fn poll(&mut self, inner: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            ready!(Pin::new(&mut *inner).poll_shutdown(cx))?;
            self.shut = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            if self.drained > LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => self.drained += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    ready!(self.timer.as_mut().poll(cx));
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// The client's socket as hyper sees it: reads are watched for request heads over the limits,
/// writes for a client that stopped reading.
struct GuardedIo {
    inner: TcpStream,
    conn: Arc<Conn>,
    limits: Arc<Limits>,
    head: HeadScan,
    refusal: Option<Refusal>,
    linger: Option<Linger>,
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl GuardedIo {
    fn new(inner: TcpStream, conn: Arc<Conn>, limits: Arc<Limits>) -> Self {
        GuardedIo {
            inner,
            conn,
            limits,
            head: HeadScan::default(),
            refusal: None,
            linger: None,
            write_stall: None,
        }
    }

    /// Writes the refusal and lingers, then reports end of input so hyper drops the connection
    /// without an answer of its own.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let refusal = self.refusal.as_mut().expect("a refusal in progress");
        while refusal.sent < refusal.response.len() {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &refusal.response[refusal.sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            refusal.sent += n;
        }
        self.linger
            .get_or_insert_with(Linger::new)
            .poll(&mut self.inner, cx)
    }

    fn refuse(&mut self, problem: HeadProblem) {
        let limits = &self.limits;
        let (status, code, detail) = match problem {
            HeadProblem::InvalidTarget => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request target is not a valid URI: characters such as <, >, spaces \
                 and backquotes must be percent-encoded (is a placeholder such \
                 as <source_id> still in the URL?)"
                    .to_owned(),
            ),
            HeadProblem::UriTooLong => (
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!(
                    "the request line is longer than the {} bytes allowed",
                    limits.max_header_bytes
                ),
            ),
            HeadProblem::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!(
                    "the request headers are larger than the {} bytes allowed",
                    limits.max_header_bytes
                ),
            ),
            HeadProblem::TooManyHeaders => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!(
                    "the request has more than the {} header lines allowed",
                    limits.max_headers
                ),
            ),
        };
        let body = crate::problem::body(status, code, &detail);
        let mut response = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(&body);
        self.refusal = Some(Refusal { response, sent: 0 });
    }

    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.limits.send_timeout;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(stall.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading the response",
        ))
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refusal.is_some() {
            return this.poll_refusal(cx);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() == before {
            return Poll::Ready(Ok(()));
        }
        this.conn.head_bytes_arrived();
        let ended = this.conn.ended.load(Ordering::SeqCst);
        if this.head.off
            && ended != this.head.ended_seen
            && this.conn.in_flight.load(Ordering::SeqCst) == 0
        {
            this.head.restart(ended);
        }
        if let Some(problem) = this.head.scan(&buf.filled()[before..], &this.limits) {
            // hyper never sees these bytes: it would answer with an empty error of its own.
            buf.set_filled(before);
            this.refuse(problem);
            return this.poll_refusal(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(result) => {
                this.write_stall = None;
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_stall(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                this.write_stall = None;
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_stall(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.linger
            .get_or_insert_with(Linger::new)
            .poll(&mut this.inner, cx)
    }
}
