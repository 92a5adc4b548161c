//! What the server knows of each open connection, and when it closes one.
//!
//! - A registry of open connections, so the accept loop can close the oldest idle ones when
//!   the cap is reached: a flood of idle sockets must not lock out a client with a request.
//! - Per connection, one deadline while no request is in progress: `header_timeout` from the
//!   accept or from the first byte of the next request, `idle_timeout` for a kept-alive
//!   connection that sends nothing. Both are tracked here rather than by hyper, so that they
//!   hold for HTTP/1 and HTTP/2 alike and a connection that never sends a byte is covered too.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::wire::GuardedIo;
use super::{Limits, Shutdown};

/// A connection idle for less than this is not evicted: its last response may still be in flight.
const EVICT_MIN_IDLE: Duration = Duration::from_secs(1);

/// Frees a connection's slot when its task ends, however it ends.
pub(super) struct Guard {
    pub(super) registry: Arc<Registry>,
    pub(super) id: u64,
    pub(super) _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

pub(super) async fn connection(
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
pub(super) struct Conn {
    pub(super) in_flight: AtomicUsize,
    /// Requests begun and ended, so [`GuardedIo`] knows a new head is coming.
    started: AtomicU64,
    pub(super) ended: AtomicU64,
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

    pub(super) fn head_bytes_arrived(&self) {
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
pub(super) struct Registry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

impl Registry {
    pub(super) fn insert(&self) -> (u64, Arc<Conn>) {
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
    pub(super) fn evict_idle(&self, n: usize) {
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
