//! A loopback TCP proxy that breaks connections on purpose: to the gateway, to break one
//! client connection in a chosen way ([`Fault`]); to a service (the S3 server, RabbitMQ), to
//! take it down and bring it back ([`Proxy::set_up`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the proxy does to the one connection it breaks (every other connection passes).
#[derive(Clone)]
pub enum Fault {
    /// Nothing: every connection passes (until [`Proxy::set_up`] takes the proxy down).
    None,
    /// Forward this many request bytes of a connection, then close it both ways.
    CutRequest(u64),
    /// Forward the whole request of a connection that sent more than this many bytes, then
    /// close it instead of forwarding the response: the server did the work, the client
    /// never hears of it.
    DropResponse(u64),
    /// Cut whichever connection carries the request bytes of all connections together past
    /// the next multiple of `every`: a link that drops every so many bytes. `total` counts the
    /// bytes forwarded ([`Fault::cut_every`] starts it at 0).
    CutEvery { every: u64, total: Arc<AtomicU64> },
    /// Forward this many request bytes, tell `held`, and forward the rest after `release`.
    Hold {
        bytes: u64,
        held: Arc<Notify>,
        release: Arc<Notify>,
    },
}

impl Fault {
    pub fn cut_every(every: u64) -> Self {
        Fault::CutEvery {
            every,
            total: Arc::new(AtomicU64::new(0)),
        }
    }
}

pub struct Proxy {
    /// `http://127.0.0.1:PORT`: where to connect instead of the upstream.
    pub url: String,
    /// Set once the fault has been applied.
    pub tripped: Arc<AtomicBool>,
    up: Arc<AtomicBool>,
    /// Cancelled (and replaced) when the proxy goes down: every connection it holds drops.
    down: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Proxy {
    /// Proxies to `upstream` (`host:port`, an `http://` prefix allowed), applying `fault` to
    /// the first connection it fits.
    pub async fn start(upstream: &str, fault: Fault) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let proxy = Proxy {
            url,
            tripped: Arc::new(AtomicBool::new(false)),
            up: Arc::new(AtomicBool::new(true)),
            down: Arc::new(std::sync::Mutex::new(CancellationToken::new())),
            stop: CancellationToken::new(),
        };
        let (tripped, up, down, stop) = (
            proxy.tripped.clone(),
            proxy.up.clone(),
            proxy.down.clone(),
            proxy.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                };
                if !up.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed at once
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let cut = down.lock().expect("not poisoned").child_token();
                tokio::spawn(relay(client, server, fault.clone(), tripped.clone(), cut));
            }
        });
        proxy
    }

    /// Takes the proxy down (every connection it holds is dropped, new ones are closed at
    /// once, as a service in an outage would) or brings it back up.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            let mut down = self.down.lock().expect("not poisoned");
            down.cancel();
            *down = self.stop.child_token();
        }
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    fault: Fault,
    tripped: Arc<AtomicBool>,
    cut: CancellationToken,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let request_bytes = Arc::new(AtomicU64::new(0));
    // Claims the one fault; false when another connection already took it.
    let trip = {
        let tripped = tripped.clone();
        move || !tripped.swap(true, Ordering::SeqCst)
    };
    let upstream = {
        let (fault, trip, cut, request_bytes) = (
            fault.clone(),
            trip.clone(),
            cut.clone(),
            request_bytes.clone(),
        );
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    _ = cut.cancelled() => return,
                    n = from_client.read(&mut buf) => n.unwrap_or(0),
                };
                if n == 0 {
                    let _ = to_server.shutdown().await;
                    return;
                }
                let before = request_bytes.fetch_add(n as u64, Ordering::SeqCst);
                let after = before + n as u64;
                let split = |limit: u64| (limit.saturating_sub(before) as usize).min(n);
                match &fault {
                    Fault::CutRequest(limit) if after > *limit && trip() => {
                        let _ = to_server.write_all(&buf[..split(*limit)]).await;
                        cut.cancel();
                        return;
                    }
                    Fault::CutEvery { every, total } => {
                        let before = total.fetch_add(n as u64, Ordering::SeqCst);
                        let boundary = (before / every + 1) * every;
                        let k = match before + n as u64 >= boundary {
                            true => (boundary - before) as usize,
                            false => n,
                        };
                        if to_server.write_all(&buf[..k]).await.is_err() || k < n {
                            total.fetch_sub((n - k) as u64, Ordering::SeqCst);
                            tripped.store(true, Ordering::SeqCst);
                            cut.cancel();
                            return;
                        }
                        if before + n as u64 == boundary {
                            tripped.store(true, Ordering::SeqCst);
                            cut.cancel();
                            return;
                        }
                    }
                    Fault::Hold {
                        bytes,
                        held,
                        release,
                    } if after > *bytes && trip() => {
                        let k = split(*bytes);
                        if to_server.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                        held.notify_one();
                        release.notified().await;
                        if to_server.write_all(&buf[k..n]).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            cut.cancel();
                            return;
                        }
                    }
                }
            }
        }
    };
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                _ = cut.cancelled() => return,
                n = from_server.read(&mut buf) => n.unwrap_or(0),
            };
            if n == 0 {
                let _ = to_client.shutdown().await;
                return;
            }
            if let Fault::DropResponse(limit) = &fault {
                if request_bytes.load(Ordering::SeqCst) > *limit && trip() {
                    cut.cancel();
                    return;
                }
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                cut.cancel();
                return;
            }
        }
    };
    // Both directions end when the cut is made; dropping their halves closes both sockets.
    tokio::join!(upstream, downstream);
}
