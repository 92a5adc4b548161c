//! Start-up and wiring: opens the backends named in configuration, runs the in-process worker
//! when the queue is embedded (the reaper alone on a broker), and serves the router until
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::DefaultBodyLimit;
use axum::http::{Extensions, HeaderMap, StatusCode, Version};
use axum::middleware;
use axum::routing::{delete, get, head, post};
use axum::Router;
use orbit_adapters::backends::{Backends, MetricsPage};
use orbit_adapters::blob::BlobStore;
use orbit_adapters::liveness;
use orbit_adapters::queue::Queue;
use orbit_config::{DatabaseBackend, QueueBackend, Settings};
use orbit_core::model::{Directory, TokenRecord};
use orbit_store::Store;
use orbit_worker::Worker;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::compression::predicate::{DefaultPredicate, Predicate as _};
use tower_http::compression::{CompressionLayer, CompressionLevel};
use uuid::Uuid;

use crate::background::Background;
use crate::guard::{self, BodyPace};
use crate::observe::{observe, RequestIdLimit};
use crate::problem::ApiError;
use crate::recent::Recent;
use crate::routes;
use crate::server::{self, Limits, Shutdown};

/// After the grace period, how long cancelled requests get to clean up before connections drop.
const CANCEL_WAIT: Duration = Duration::from_secs(5);
/// How long clean-ups of dropped requests (objects, idempotency keys) may take at exit.
const CLEANUP_WAIT: Duration = Duration::from_secs(10);
/// How long start-up waits for the first sweep of abandoned partial objects.
const SWEEP_AT_START_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub queue: Arc<dyn Queue>,
    pub settings: Arc<Settings>,
    /// This process's name in the store's liveness table: it owns the idempotency claims of
    /// the requests it serves, which others take over as soon as it stops heartbeating.
    pub process: Arc<str>,
    /// One permit per upload streaming now (`http.max_uploads`).
    pub uploads: Arc<Semaphore>,
    /// Cancelled when the shutdown grace is over: long requests stop and clean up.
    pub cancel: CancellationToken,
    /// Clean-ups spawned for requests dropped mid-way; waited for at shutdown.
    pub cleanups: TaskTracker,
    /// `/metrics`, with the gauges mirroring the database and the broker cached.
    pub metrics: Arc<MetricsPage>,
    /// Token records by hash, kept for `http.lookup_ttl`.
    pub tokens: Arc<Recent<Vec<u8>, TokenRecord>>,
    /// Directories by (organization, id), kept for `http.lookup_ttl`.
    pub directories: Arc<Recent<(Uuid, Uuid), Directory>>,
}

/// The backends of `settings`, opened and checked.
pub async fn connect(settings: &Settings) -> anyhow::Result<AppState> {
    let Backends {
        store,
        blobs,
        queue,
    } = Backends::open(settings).await?;
    Ok(AppState {
        store,
        blobs,
        queue,
        settings: Arc::new(settings.clone()),
        process: liveness::process_name("gateway").into(),
        uploads: Arc::new(Semaphore::new(settings.http.max_uploads)),
        cancel: CancellationToken::new(),
        cleanups: TaskTracker::new(),
        metrics: Arc::new(MetricsPage::from_settings(settings)),
        tokens: Arc::new(Recent::new(settings.http.lookup_ttl)),
        directories: Arc::new(Recent::new(settings.http.lookup_ttl)),
    })
}

pub fn router(state: AppState) -> Router {
    let org = "/v2/organizations/{org}";
    let mut router = Router::new();
    if state.settings.http.metrics_listen.is_empty() {
        router = router.route("/metrics", get(routes::system::metrics));
    }
    let router = router
        .route("/healthz", get(routes::system::healthz))
        .route("/readyz", get(routes::system::readyz))
        .route("/openapi.json", get(routes::system::openapi))
        .route(
            &format!("{org}/directories"),
            get(routes::directories::list).post(routes::directories::create),
        )
        .route(
            &format!("{org}/directories/{{dir}}/archive"),
            post(routes::directories::archive),
        )
        .route(
            &format!("{org}/directories/{{dir}}/sources/csv-upload"),
            // The upload enforces `ingest.max_upload_bytes` itself, with a problem+json 413.
            post(crate::upload::upload).layer(DefaultBodyLimit::disable()),
        )
        .route(
            &format!("{org}/directories/{{dir}}/uploads"),
            // Resumable uploads enforce their sizes themselves, with problem+json 413s.
            post(crate::upload::resumable::create)
                .options(crate::upload::resumable::options)
                .layer(DefaultBodyLimit::disable())
                .layer(middleware::map_response(
                    crate::upload::resumable::tus_resumable,
                )),
        )
        .route(
            &format!("{org}/directories/{{dir}}/uploads/{{upload}}"),
            head(crate::upload::resumable::head)
                .get(crate::upload::resumable::get)
                .patch(crate::upload::resumable::patch)
                .delete(crate::upload::resumable::delete)
                .layer(DefaultBodyLimit::disable())
                .layer(middleware::map_response(
                    crate::upload::resumable::tus_resumable,
                )),
        )
        .route(
            &format!("{org}/directories/{{dir}}/sources"),
            get(routes::sources::list),
        )
        .route(
            &format!("{org}/directories/{{dir}}/sources/{{source}}"),
            get(routes::sources::get),
        )
        .route(
            &format!("{org}/directories/{{dir}}/sources/{{source}}/retry"),
            post(routes::sources::retry),
        )
        .route(
            &format!("{org}/directories/{{dir}}/sources/{{source}}/cancel"),
            post(routes::sources::cancel),
        )
        .route(
            &format!("{org}/directories/{{dir}}/sources/{{source}}/errors"),
            get(routes::sources::errors),
        )
        .route(
            &format!("{org}/directories/{{dir}}/sources/{{source}}/failed-rows"),
            get(routes::sources::failed_rows),
        )
        .route(
            &format!("{org}/webhooks"),
            get(routes::webhooks::list).post(routes::webhooks::create),
        )
        .route(
            &format!("{org}/webhooks/{{webhook}}"),
            delete(routes::webhooks::delete),
        )
        .route(
            &format!("{org}/webhooks/{{webhook}}/enable"),
            post(routes::webhooks::enable),
        )
        .route(
            &format!("{org}/webhooks/{{webhook}}/deliveries"),
            get(routes::webhooks::deliveries),
        )
        .route(
            &format!("{org}/directories/{{dir}}/profiles"),
            get(routes::profiles::list),
        )
        .route(
            &format!("{org}/directories/{{dir}}/profiles/export"),
            // Compressed here only: gzip or zstd as `Accept-Encoding` prefers (zstd on a tie),
            // at the fastest level, since an export is CPU-bound on the gateway. Errors are
            // left plain: `guard` rewrites framework errors as problem+json from their text.
            get(routes::export::export).layer(
                CompressionLayer::new()
                    .quality(CompressionLevel::Fastest)
                    .gzip(true)
                    .zstd(true)
                    .compress_when(DefaultPredicate::new().and(
                        |status: StatusCode, _: Version, _: &HeaderMap, _: &Extensions| {
                            status.is_success()
                        },
                    )),
            ),
        )
        .route(
            &format!("{org}/directories/{{dir}}/profiles/{{profile}}"),
            get(routes::profiles::get),
        )
        .layer(DefaultBodyLimit::max(state.settings.http.max_body_bytes));
    finish(router, state)
}

/// The router of `http.metrics_listen`: `/metrics` alone.
pub fn metrics_router(state: AppState) -> Router {
    finish(
        Router::new().route("/metrics", get(routes::system::metrics)),
        state,
    )
}

/// Fallbacks and the outer layers every listener shares.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    let pace = BodyPace {
        window: state.settings.http.body_timeout,
        min_rate: state.settings.http.min_body_rate,
    };
    router
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method",
            )
        })
        .layer(middleware::from_fn_with_state(pace, guard::guard))
        .layer(middleware::from_fn_with_state(
            RequestIdLimit(state.settings.http.max_request_id_bytes),
            observe,
        ))
        .with_state(state)
}

/// A running gateway: its address, and the means to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when `http.metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub state: AppState,
    shutdown: Shutdown,
    server: tokio::task::JoinHandle<()>,
    /// Every other task of the gateway: the sweep, the webhook dispatcher, the in-process
    /// worker (the reaper alone on a broker) and the heartbeat.
    background: Background,
}

impl Running {
    /// Stops taking requests and lets those in flight finish for `http.shutdown_grace`; then
    /// cancels what is left (an upload removes its object and releases its key), drops the
    /// connections, and lets the background work (the in-process workers' chunks among it)
    /// finish.
    pub async fn shutdown(mut self) {
        self.shutdown.stop.cancel();
        let grace = self.state.settings.http.shutdown_grace;
        if tokio::time::timeout(grace, &mut self.server).await.is_err() {
            tracing::warn!(
                grace = %humantime::format_duration(grace),
                "requests still in flight after the shutdown grace; cancelling them"
            );
            self.state.cancel.cancel();
            if tokio::time::timeout(CANCEL_WAIT, &mut self.server)
                .await
                .is_err()
            {
                self.shutdown.kill.cancel();
                if tokio::time::timeout(CANCEL_WAIT, &mut self.server)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "the server did not stop after its connections were dropped; aborting it"
                    );
                    self.server.abort();
                    let _ = (&mut self.server).await;
                }
            }
        }
        self.state.cleanups.close();
        if tokio::time::timeout(CLEANUP_WAIT, self.state.cleanups.wait())
            .await
            .is_err()
        {
            tracing::warn!("clean-ups of cancelled requests did not finish in time");
        }
        self.background
            .shutdown(&*self.state.blobs, CLEANUP_WAIT)
            .await;
    }

    pub async fn stopped(&mut self) {
        let _ = (&mut self.server).await;
    }
}

/// Removes partial objects and multipart uploads of dead uploads (see
/// `BlobStore::sweep_abandoned`), and expires and removes resumable uploads
/// (`resumable::sweep`).
async fn sweep(store: &dyn Store, blobs: &dyn BlobStore, settings: &Settings) {
    if let Err(e) =
        crate::upload::resumable::sweep(store, blobs, settings.ingest.resumable_ttl).await
    {
        tracing::warn!(error = %e, "sweeping resumable uploads failed");
    }
    match blobs
        .sweep_abandoned(settings.ingest.max_upload_duration)
        .await
    {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "removed partial objects of abandoned uploads"),
        Err(e) => tracing::warn!(error = %e, "sweeping abandoned partial objects failed"),
    }
}

/// Opens the backends, migrates an embedded database, starts the in-process worker when the
/// queue is embedded (else the reaper alone), and serves HTTP on `http.listen`. Every task it
/// starts is [`Background`]'s: a start that fails part-way stops what it had started.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    orbit_adapters::metrics::set_build_info(env!("CARGO_PKG_VERSION"), env!("ORBIT_COMMIT"));
    crate::metrics::register();
    let state = connect(&settings).await?;
    let shutdown = Shutdown::default();
    let mut background = Background::new(shutdown.stop.clone());
    match wire(&settings, &state, &shutdown, &mut background).await {
        Ok((addr, metrics_addr, server)) => Ok(Running {
            addr,
            metrics_addr,
            state,
            shutdown,
            server,
            background,
        }),
        Err(e) => {
            background.shutdown(&*state.blobs, CLEANUP_WAIT).await;
            Err(e)
        }
    }
}

/// The body of [`start`], every task spawned on `background`.
async fn wire(
    settings: &Settings,
    state: &AppState,
    shutdown: &Shutdown,
    background: &mut Background,
) -> anyhow::Result<(SocketAddr, Option<SocketAddr>, tokio::task::JoinHandle<()>)> {
    let embedded_queue = settings.queue.url.backend() == QueueBackend::Embedded;
    if settings.database.url.backend() == DatabaseBackend::Sqlite {
        state
            .store
            .migrate()
            .await
            .context("migrating the database")?;
    }
    let worker = Worker::new(
        state.store.clone(),
        state.store.clone(),
        state.blobs.clone(),
        state.queue.clone(),
        state.settings.clone(),
    );
    if embedded_queue {
        // The in-process queue died with the last process: every unfinished chunk needs a new message.
        let requeued = state.store.forget_queued().await?;
        if requeued > 0 {
            tracing::info!(
                chunks = requeued,
                "re-queueing chunks left unfinished by the last run"
            );
        }
        background.set_worker(worker.start());
    } else {
        // Workers may all be gone (scaled to zero): a chunk whose publish failed must still be
        // published again, and with no worker only the gateway is left to do it.
        background.set_worker(worker.start_reaper());
    }
    // Before taking uploads: whatever a killed predecessor left half-written goes first.
    match tokio::time::timeout(SWEEP_AT_START_WAIT, sweep(&*state.store, &*state.blobs, settings)).await {
        Ok(()) => {}
        Err(_) => tracing::warn!("the start-up sweep of abandoned partial objects timed out; the periodic sweep tries again"),
    }
    background.spawn_heartbeat(state.store.clone(), &state.process, settings);
    let listener = TcpListener::bind(&settings.http.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.http.listen))?;
    let addr = listener.local_addr()?;
    let metrics_listener = match settings.http.metrics_listen.as_str() {
        "" => None,
        at => Some(
            TcpListener::bind(at)
                .await
                .with_context(|| format!("cannot listen on {at} (http.metrics_listen)"))?,
        ),
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    // Checked before anything is served, so a bad webhook setting fails the start cleanly.
    // Every gateway sends webhooks, embedded or not: the outbox is in the database.
    let dispatcher = crate::webhooks::dispatcher(
        state.store.clone(),
        state.settings.webhooks.clone(),
        background.stop(),
    )
    .context("starting the webhook dispatcher")?;
    let limits = Limits::new(&settings.http, server::raise_fd_limit());
    let server = {
        let app = router(state.clone());
        let metrics = metrics_router(state.clone());
        let shutdown = shutdown.clone();
        background.spawn_server(async move {
            let main = server::serve(listener, app, limits.clone(), shutdown.clone());
            match metrics_listener {
                Some(listener) => {
                    tokio::join!(main, server::serve(listener, metrics, limits, shutdown));
                }
                None => main.await,
            }
        })
    };
    {
        let (store, blobs) = (state.store.clone(), state.blobs.clone());
        let settings = state.settings.clone();
        let stop = background.stop();
        background.spawn_job("sweep", async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(settings.ingest.sweep_interval) => {}
                    () = stop.cancelled() => return,
                }
                // A sweep cut short is finished by the next process's start-up sweep.
                tokio::select! {
                    () = sweep(&*store, &*blobs, &settings) => {}
                    () = stop.cancelled() => return,
                }
            }
        });
    }
    background.spawn_job("webhooks", dispatcher);
    tracing::info!(%addr, database = state.store.backend(), object_store = state.blobs.backend(), queue = state.queue.backend(), "orbit-gateway listening");
    Ok((addr, metrics_addr, server))
}
