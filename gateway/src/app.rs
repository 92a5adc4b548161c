//! Start-up and wiring: opens the backends named in configuration, runs the in-process worker
//! when the queue is embedded, and serves the router until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use orbit_shared::backends::Backends;
use orbit_shared::blob::BlobStore;
use orbit_shared::config::Settings;
use orbit_shared::queue::Queue;
use orbit_shared::store::Store;
use orbit_worker::{Worker, WorkerHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::observe::{observe, RequestIdLimit};
use crate::problem::ApiError;
use crate::routes;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub queue: Arc<dyn Queue>,
    pub settings: Arc<Settings>,
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
    })
}

pub fn router(state: AppState) -> Router {
    let org = "/v2/organizations/{org}";
    Router::new()
        .route("/healthz", get(routes::system::healthz))
        .route("/readyz", get(routes::system::readyz))
        .route("/metrics", get(routes::system::metrics))
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
            &format!("{org}/directories/{{dir}}/sources"),
            get(routes::sources::list),
        )
        .route(
            &format!("{org}/directories/{{dir}}/sources/{{source}}"),
            get(routes::sources::get),
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
            &format!("{org}/directories/{{dir}}/profiles"),
            get(routes::profiles::list),
        )
        .route(
            &format!("{org}/directories/{{dir}}/profiles/{{profile}}"),
            get(routes::profiles::get),
        )
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not accept that method",
            )
        })
        .layer(middleware::from_fn_with_state(
            RequestIdLimit(state.settings.http.max_request_id_bytes),
            observe,
        ))
        .with_state(state)
}

/// A running gateway: its address, and the means to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    worker: Option<WorkerHandle>,
}

impl Running {
    /// Stops taking requests, lets in-flight requests and chunks finish, then returns.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.server.await;
        if let Some(worker) = self.worker {
            worker.shutdown().await;
        }
    }

    pub async fn stopped(&mut self) {
        let _ = (&mut self.server).await;
    }
}

/// Opens the backends, migrates an embedded database, starts the in-process worker when the
/// queue is embedded, and serves HTTP on `http.listen`.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let state = connect(&settings).await?;
    let embedded_queue = state.queue.backend() == "embedded";
    if state.store.backend() == "sqlite" {
        state
            .store
            .migrate()
            .await
            .context("migrating the database")?;
    }
    let worker = if embedded_queue {
        // The in-process queue died with the last process: every unfinished chunk needs a new message.
        let requeued = state.store.forget_queued().await?;
        if requeued > 0 {
            tracing::info!(
                chunks = requeued,
                "re-queueing chunks left unfinished by the last run"
            );
        }
        let worker = Worker::new(
            state.store.clone(),
            state.blobs.clone(),
            state.queue.clone(),
            state.settings.clone(),
        );
        Some(worker.start())
    } else {
        None
    };
    let listener = TcpListener::bind(&settings.http.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.http.listen))?;
    let addr = listener.local_addr()?;
    let cancel = CancellationToken::new();
    let app = router(state.clone());
    let server = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { cancel.cancelled().await })
                .await
        })
    };
    tracing::info!(%addr, database = state.store.backend(), object_store = state.blobs.backend(), queue = state.queue.backend(), "orbit-gateway listening");
    Ok(Running {
        addr,
        state,
        cancel,
        server,
        worker,
    })
}
