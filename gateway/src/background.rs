//! The gateway's composition root for work that runs beside the requests: the HTTP server
//! task, the blob sweep, the webhook dispatcher, the in-process worker (or the reaper) and the
//! liveness heartbeat are all spawned here, and [`Background::shutdown`] waits for each of
//! them, so no task of the gateway outlives `app::Running::shutdown` unobserved.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use orbit_adapters::blob::BlobStore;
use orbit_adapters::liveness;
use orbit_config::Settings;
use orbit_store::Liveness;
use orbit_worker::WorkerHandle;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the sweep and the webhook dispatcher get to notice `stop` before they are aborted.
const JOBS_WAIT: Duration = Duration::from_secs(10);

/// Every background task of one gateway, and the order they stop in.
pub struct Background {
    tracker: TaskTracker,
    /// The server's `stop`: the sweep and the dispatcher take no new work once requests don't.
    stop: CancellationToken,
    jobs: Vec<(&'static str, JoinHandle<()>)>,
    worker: Option<WorkerHandle>,
    heartbeat: Option<(CancellationToken, JoinHandle<()>)>,
}

impl Background {
    pub fn new(stop: CancellationToken) -> Self {
        Background {
            tracker: TaskTracker::new(),
            stop,
            jobs: Vec::new(),
            worker: None,
            heartbeat: None,
        }
    }

    /// The HTTP server; its handle stays the caller's, who drains it in steps before
    /// [`Background::shutdown`].
    pub fn spawn_server(
        &self,
        server: impl Future<Output = ()> + Send + 'static,
    ) -> JoinHandle<()> {
        self.tracker.spawn(server)
    }

    /// A job that ends by itself once `stop` is cancelled (see [`Background::stop`]).
    pub fn spawn_job(
        &mut self,
        name: &'static str,
        job: impl Future<Output = ()> + Send + 'static,
    ) {
        self.jobs.push((name, self.tracker.spawn(job)));
    }

    pub fn stop(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The in-process worker or the reaper, drained after the requests and the jobs.
    pub fn set_worker(&mut self, worker: WorkerHandle) {
        self.worker = Some(worker);
    }

    /// Keeps this process alive in the store's liveness table until the very end: its
    /// idempotency claims stay its own while any request or chunk of it may still finish.
    pub fn spawn_heartbeat(
        &mut self,
        store: Arc<dyn Liveness>,
        process: &str,
        settings: &Settings,
    ) {
        let stop = CancellationToken::new();
        let task = self.tracker.spawn(liveness::keep_alive(
            store,
            process.to_owned(),
            settings.worker.heartbeat_interval,
            settings.worker.liveness_timeout,
            stop.clone(),
        ));
        self.heartbeat = Some((stop, task));
    }

    /// After the server has drained: stops and awaits the jobs, waits for the object store's
    /// own clean-ups, drains the worker, and stops the heartbeat last.
    pub async fn shutdown(mut self, blobs: &dyn BlobStore, cleanup_wait: Duration) {
        self.stop.cancel();
        for (name, mut job) in std::mem::take(&mut self.jobs) {
            if tokio::time::timeout(JOBS_WAIT, &mut job).await.is_err() {
                tracing::warn!(
                    job = name,
                    "a background job did not stop in time; aborting it"
                );
                job.abort();
                let _ = job.await;
            }
        }
        // Writers dropped with their requests abort their uploads on tasks of the store's.
        if !blobs.close(cleanup_wait).await {
            tracing::warn!("object store clean-ups did not finish in time");
        }
        if let Some(worker) = self.worker.take() {
            worker.shutdown().await;
        }
        // Requests are done: nothing of this process's is in flight any more.
        if let Some((stop, task)) = self.heartbeat.take() {
            stop.cancel();
            let _ = task.await;
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}
