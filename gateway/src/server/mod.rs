//! The HTTP server under the router: an accept loop over hyper's connection builder that keeps
//! hostile or broken clients from holding the gateway's resources.
//!
//! - This file: the accept loop, with a cap on open connections (a semaphore, kept well below
//!   the file-descriptor limit), and shutdown in steps: stop accepting and let requests finish;
//!   after the grace period the application cancels its work (see `app::Running::shutdown`); at
//!   last connections are dropped.
//! - `connections.rs`: the registry that closes the oldest idle connections at the cap, and the
//!   header and idle deadlines of each connection.
//! - `wire.rs`: `GuardedIo`, which sees the raw bytes: request heads over the limits, responses
//!   the client stopped reading.
//!
//! Request bodies are watched one level up, in [`crate::guard`], where the router can answer.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use orbit_config::HttpSettings;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use connections::{connection, Guard, Registry};

mod connections;
mod wire;

/// hyper's own read-buffer limit; kept above the head limit so ours always answers first.
const HYPER_DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;

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
