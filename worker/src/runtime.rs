//! The consumer loop and the reaper.
//!
//! Each delivery is a turn (`schedule`): the chunk it takes is handled inside a `chunk` span
//! (kind consumer) whose parent is the trace context the message carries, or, for another
//! chunk chosen by fair shares, the one stored with that chunk, so it joins its upload's trace;
//! its children are `chunk.claim`, `chunk.read`, `chunk.validate` and `chunk.commit`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orbit_adapters::blob::BlobStore;
use orbit_adapters::liveness;
use orbit_adapters::metrics::{Publisher, METRICS as QUEUE_METRICS};
use orbit_adapters::queue::{self, Delivery, Queue};
use orbit_adapters::telemetry;
use orbit_config::Settings;
use orbit_core::model::{ChunkRef, ChunkWork, Claim, Committed, Lease, SliceEnd, SourceError};
use orbit_store::{Chunks, Liveness};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::Instrument as _;

use crate::metrics::METRICS;
use crate::process::{ChunkReader, ProcessError};
use crate::schedule::{Choice, CHOICES};

/// What became of a chunk a worker chose.
enum Taken {
    /// Claimed and processed (or its attempt ended in an error, released).
    Ran,
    /// Out of attempts: its source failed.
    Ended,
    /// Done, or held by another live worker: someone else took it.
    Lost,
}

/// The roles of the store a worker uses: it takes, commits and releases chunks, and heartbeats.
pub struct Worker {
    pub chunks: Arc<dyn Chunks>,
    pub liveness: Arc<dyn Liveness>,
    pub blobs: Arc<dyn BlobStore>,
    pub queue: Arc<dyn Queue>,
    pub settings: Arc<Settings>,
    /// Written into every lease this process takes, for operators reading the chunks table.
    pub owner: String,
}

/// Renews a chunk's lease every third of `worker.lease` for as long as it lives. Dropping it,
/// however the attempt ends (including through a `?` on a failed store call), stops the
/// renewal: a lease renewed for a chunk nobody works on would keep it from every other worker
/// until this process exits.
struct LeaseRenewal {
    task: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
}

impl LeaseRenewal {
    fn start(store: Arc<dyn Chunks>, lease: Lease, lease_for: Duration) -> Self {
        let period = lease_for / 3;
        let lost = Arc::new(AtomicBool::new(false));
        let noticed = lost.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match store.renew_lease(&lease, lease_for).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(chunk = %lease.chunk_id, "lease lost; results will be discarded");
                        count_lost(&noticed);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(chunk = %lease.chunk_id, error = %e, "lease renewal failed")
                    }
                }
            }
        });
        LeaseRenewal { task, lost }
    }

    /// The attempt found its lease gone: a commit was refused for it, or a failed attempt
    /// found nothing of its own to release.
    fn lost(&self) {
        count_lost(&self.lost);
    }
}

/// Counts an attempt's lost lease once, whichever finds it first: the renewal, a refused
/// commit, or the release after a failed one. A frozen worker's renewal may find it before
/// its commit can, and a freeze that also cost the commit its database session ends the
/// attempt in an error, whose release finds the lease gone.
fn count_lost(lost: &AtomicBool) {
    if !lost.swap(true, Ordering::Relaxed) {
        METRICS.leases_lost.inc();
    }
}

impl Drop for LeaseRenewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Running consumer and reaper tasks; `shutdown` lets in-flight chunks finish.
pub struct WorkerHandle {
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

impl WorkerHandle {
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Worker {
    pub fn new(
        chunks: Arc<dyn Chunks>,
        liveness: Arc<dyn Liveness>,
        blobs: Arc<dyn BlobStore>,
        queue: Arc<dyn Queue>,
        settings: Arc<Settings>,
    ) -> Arc<Self> {
        crate::metrics::register();
        Arc::new(Worker {
            chunks,
            liveness,
            blobs,
            queue,
            settings,
            owner: liveness::process_name("worker"),
        })
    }

    /// Starts the consumer (with `worker.concurrency` chunks at once) and the reaper.
    pub fn start(self: &Arc<Self>) -> WorkerHandle {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let consuming = CancellationToken::new();
        tasks.spawn(self.clone().consume(cancel.clone(), consuming.clone()));
        tasks.spawn(self.clone().reap(cancel.clone()));
        tasks.spawn(self.clone().heartbeat(consuming));
        WorkerHandle { cancel, tasks }
    }

    /// Starts the reaper alone, for a process that runs no consumer: a gateway beside remote
    /// workers, so that chunks whose publish failed are published again even while no worker
    /// runs (workers scaled to zero). Reapers in several processes share the work safely: each
    /// pass takes its chunks in the store with `SKIP LOCKED`, and a duplicate message is
    /// harmless, since the database decides who processes a chunk.
    pub fn start_reaper(self: &Arc<Self>) -> WorkerHandle {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().reap(cancel.clone()));
        WorkerHandle { cancel, tasks }
    }

    /// Tells the store this process is alive, so that the leases it takes stand, until the
    /// consumer has drained; then retires the process. A process that dies stops
    /// heartbeating, and its chunks are taken over once `worker.liveness_timeout` passes.
    async fn heartbeat(self: Arc<Self>, drained: CancellationToken) {
        let w = &self.settings.worker;
        liveness::keep_alive(
            self.liveness.clone(),
            self.owner.clone(),
            w.heartbeat_interval,
            w.liveness_timeout,
            drained,
        )
        .await
    }

    async fn consume(self: Arc<Self>, cancel: CancellationToken, drained: CancellationToken) {
        let _drained = drained.drop_guard();
        // A lease taken before this process's first heartbeat would look like a dead owner's.
        while let Err(e) = self
            .liveness
            .heartbeat(&self.owner, self.settings.worker.liveness_timeout)
            .await
        {
            tracing::warn!(error = %e, "cannot record this process as alive; retrying");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        let concurrency = self.settings.worker_concurrency();
        let permits = Arc::new(Semaphore::new(concurrency));
        let mut running = JoinSet::new();
        'connect: while !cancel.is_cancelled() {
            let prefetch = u16::try_from(concurrency).unwrap_or(u16::MAX);
            let mut consumer = match self.queue.consume(prefetch).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume from the queue; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                // Take a message only when a slot is free, so prefetch never outruns capacity.
                let permit = tokio::select! {
                    _ = cancel.cancelled() => break 'connect,
                    p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                };
                let delivery = tokio::select! {
                    _ = cancel.cancelled() => break 'connect,
                    d = consumer.next() => d,
                };
                match delivery {
                    Some(Ok(delivery)) => {
                        let worker = self.clone();
                        running.spawn(async move {
                            worker.handle(delivery).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "queue consumer failed; reconnecting");
                        continue 'connect;
                    }
                    None => {
                        tracing::info!("queue closed");
                        break 'connect;
                    }
                }
                while running.try_join_next().is_some() {}
            }
        }
        // Drain: every chunk already taken is finished (or loses its lease) before we return.
        while running.join_next().await.is_some() {}
    }

    async fn handle(&self, delivery: Delivery) {
        let message = delivery.message;
        for again in 0..=CHOICES {
            let choice = match again {
                CHOICES => Choice::named(&message),
                _ => self.choose(&message, again > 0).await,
            };
            // The span continues the trace of the chunk taken: the message's (through its
            // publish) when it is the message's chunk, else the upload's that queued it.
            let chunk = &choice.chunk;
            let span = tracing::info_span!(
                "chunk",
                otel.kind = "consumer",
                messaging.system = self.queue.backend(),
                messaging.operation.type = "process",
                orbit.source_id = %chunk.source_id,
                orbit.chunk_id = %chunk.chunk_id,
                orbit.attempt = chunk.attempt,
            );
            telemetry::set_parent(
                &span,
                chunk.traceparent.as_deref(),
                chunk.tracestate.as_deref(),
            );
            match self.run_choice(&choice).instrument(span.clone()).await {
                // Another worker took the chunk chosen: choose again, this turn is still ours.
                Ok(Taken::Lost) if chunk.chunk_id != message.chunk_id => continue,
                Ok(_) => {}
                Err(e) => {
                    span.in_scope(|| {
                        tracing::error!(chunk = %chunk.chunk_id, source = %chunk.source_id, error = %e, "chunk failed")
                    });
                    telemetry::record_error(&span, &format!("{e:#}"));
                }
            }
            break;
        }
        // The database holds the chunk's fate now; the message has done its job either way.
        if let Err(e) = delivery.acker.ack().await {
            tracing::warn!(error = %e, "ack failed; the message will be redelivered and ignored");
        }
    }

    /// Claims, processes and commits the chunk `message` names. Errors are the store's own.
    pub async fn run_chunk(&self, message: &ChunkRef) -> anyhow::Result<()> {
        self.run_choice(&Choice::named(message)).await.map(drop)
    }

    /// Claims, processes and commits the chunk chosen, settling the turn once it is claimed
    /// (`Worker::settle`).
    async fn run_choice(&self, choice: &Choice) -> anyhow::Result<Taken> {
        let message = &choice.chunk;
        let w = &self.settings.worker;
        let claim_span = tracing::info_span!("chunk.claim", orbit.claim = Empty);
        let claim = match self
            .chunks
            .claim_chunk(message, &self.owner, w.lease, w.max_attempts)
            .instrument(claim_span.clone())
            .await
        {
            Ok(claim) => claim,
            Err(e) => {
                if e.is_transient() {
                    self.give_back(message.clone());
                }
                return Err(e.into());
            }
        };
        claim_span.record(
            "orbit.claim",
            match &claim {
                Claim::Claimed(_) => "claimed",
                Claim::Poisoned => "poisoned",
                Claim::Busy => "busy",
                Claim::Nothing => "nothing",
            },
        );
        drop(claim_span);
        let work = match claim {
            Claim::Claimed(work) => work,
            Claim::Poisoned => {
                METRICS.chunks_poisoned.inc();
                tracing::warn!(chunk = %message.chunk_id, source = %message.source_id, "chunk out of attempts; source failed");
                return Ok(Taken::Ended);
            }
            Claim::Busy | Claim::Nothing => return Ok(Taken::Lost),
        };
        self.settle(choice, work.chunk.row_count).await;
        METRICS.chunks_in_flight.inc();
        let started = Instant::now();
        let outcome = self.process_under_lease(&work).await;
        METRICS.chunks_in_flight.dec();
        METRICS
            .chunk_duration
            .with_label_values(&[if outcome.is_ok() { "ok" } else { "error" }])
            .observe(started.elapsed().as_secs_f64());
        outcome.map(|()| Taken::Ran)
    }

    async fn process_under_lease(&self, work: &ChunkWork) -> anyhow::Result<()> {
        let lease = &work.lease;
        // Held until this function returns, whichever way it does.
        let renewal = LeaseRenewal::start(
            self.chunks.clone(),
            lease.clone(),
            self.settings.worker.lease,
        );
        let slice_rows = self.settings.worker.slice_rows;
        let mut reader =
            match ChunkReader::open(&*self.blobs, &work.source, &work.chunk, slice_rows).await {
                Ok(reader) => reader,
                Err(e) => return self.failed(lease, &renewal, e).await,
            };
        let (mut accepted, mut failed) = (0u64, 0u64);
        loop {
            let (results, end) = match reader.next_slice().await {
                Ok(slice) => slice,
                Err(e) => return self.failed(lease, &renewal, e).await,
            };
            let rows = (results.accepted.len() as u64, results.failed.len() as u64);
            let commit_span = tracing::info_span!(
                "chunk.commit",
                orbit.rows.accepted = rows.0,
                orbit.rows.failed = rows.1,
                orbit.last_slice = end == SliceEnd::Chunk,
                orbit.commit = Empty,
            );
            let committed = self
                .chunks
                .commit_slice(lease, results, end)
                .instrument(commit_span.clone())
                .await;
            commit_span.record(
                "orbit.commit",
                match &committed {
                    Ok(Committed::Done { .. }) => "done",
                    Ok(Committed::LeaseLost) => "lease_lost",
                    Err(_) => "error",
                },
            );
            if let Err(e) = &committed {
                telemetry::record_error(&commit_span, &e.to_string());
            }
            drop(commit_span);
            match committed {
                Ok(Committed::Done { source_completed }) => {
                    METRICS.rows.with_label_values(&["accepted"]).inc_by(rows.0);
                    METRICS.rows.with_label_values(&["failed"]).inc_by(rows.1);
                    accepted += rows.0;
                    failed += rows.1;
                    if end == SliceEnd::Chunk {
                        tracing::info!(source = %lease.source_id, chunk = work.chunk.index, accepted, failed, source_completed, "chunk done");
                        return Ok(());
                    }
                }
                Ok(Committed::LeaseLost) => {
                    renewal.lost();
                    tracing::warn!(source = %lease.source_id, chunk = work.chunk.index, "lease lost before commit: another worker owns the chunk, or its source ended (cancelled or failed); dropping it");
                    return Ok(());
                }
                Err(e) => {
                    let transient = e.is_transient() || e.is_conflict();
                    self.release(lease, &renewal, &e.to_string(), transient)
                        .await;
                    return Err(e.into());
                }
            }
        }
    }

    /// Ends an attempt that could not read or validate its rows.
    async fn failed(
        &self,
        lease: &Lease,
        renewal: &LeaseRenewal,
        error: ProcessError,
    ) -> anyhow::Result<()> {
        match error {
            ProcessError::ObjectMissing(key) => {
                self.chunks
                    .fail_source(
                        lease.directory_id,
                        lease.source_id,
                        SourceError {
                            code: "object_missing".into(),
                            message: format!(
                                "the stored file {key} is gone; the remaining rows cannot be read"
                            ),
                        },
                    )
                    .await?;
                Ok(())
            }
            e => {
                let transient = matches!(e, ProcessError::Transient(_));
                self.release(lease, renewal, &e.to_string(), transient)
                    .await;
                Err(e.into())
            }
        }
    }

    /// Gives the chunk back after a failed attempt. Should that fail too (the database is
    /// gone), the chunk's lease runs out and the reaper publishes it again.
    async fn release(&self, lease: &Lease, renewal: &LeaseRenewal, error: &str, transient: bool) {
        let kind = if transient { "transient" } else { "permanent" };
        METRICS.chunk_failures.with_label_values(&[kind]).inc();
        let transient_for = transient.then_some(self.settings.worker.transient_retry_for);
        match self.chunks.release_chunk(lease, error, transient_for).await {
            Ok(true) => {}
            Ok(false) => renewal.lost(),
            Err(e) if transient && e.is_transient() => {
                tracing::warn!(chunk = %lease.chunk_id, error = %e, "could not release the chunk; releasing it once the database answers");
                let (chunks, lease, error) = (self.chunks.clone(), lease.clone(), error.to_owned());
                self.in_background("release", move || {
                    let (chunks, lease, error) = (chunks.clone(), lease.clone(), error.clone());
                    async move {
                        chunks
                            .release_chunk(&lease, &error, transient_for)
                            .await
                            .map(drop)
                    }
                });
            }
            Err(e) => {
                tracing::warn!(chunk = %lease.chunk_id, error = %e, "could not release the chunk; it returns when its lease expires")
            }
        }
    }

    /// A chunk this worker could not claim because the database (or, on Citus, the node that
    /// holds its directory) could not be reached: its message is acknowledged, and the chunk
    /// is given back as soon as the database answers (`Chunks::give_back`: no attempt counts),
    /// for the reaper to publish again. The worker meanwhile takes other work: other
    /// directories' chunks need not wait for a node that is down.
    fn give_back(&self, message: ChunkRef) {
        let (chunks, owner) = (self.chunks.clone(), self.owner.clone());
        self.in_background("give back", move || {
            let (chunks, message, owner) = (chunks.clone(), message.clone(), owner.clone());
            async move { chunks.give_back(&message, &owner).await }
        });
    }

    /// Tries `step` again and again, backing off up to 5 s between tries, until it succeeds
    /// or `worker.transient_retry_for` has passed; after that the chunk comes back the slow way
    /// (its lease expires, or the reaper finds it after `worker.requeue_after`), as it also
    /// does should this process exit first.
    fn in_background<F, Fut>(&self, what: &'static str, step: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = orbit_store::StoreResult<()>> + Send,
    {
        let give_up = Instant::now() + self.settings.worker.transient_retry_for;
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(250);
            loop {
                match step().await {
                    Ok(()) => return,
                    Err(e) if Instant::now() < give_up => {
                        tracing::debug!(what, error = %e, ?wait, "database still unreachable");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => {
                        tracing::warn!(what, error = %e, "gave up; the chunk comes back when its lease expires or the reaper finds it");
                        return;
                    }
                }
            }
        });
    }

    async fn reap(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            if let Err(e) = self.reap_once().await {
                tracing::warn!(error = %e, "reaper pass failed");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.worker.reap_interval) => {}
            }
        }
    }

    /// Publishes chunks that were never published, lost their message, or lost their worker.
    /// When the broker refuses one, that chunk and the rest of the batch are marked
    /// unpublished, so the next pass tries them again rather than after `requeue_after`.
    pub async fn reap_once(&self) -> anyhow::Result<usize> {
        let mut published = 0;
        loop {
            let batch = self
                .chunks
                .chunks_to_publish(self.settings.worker.requeue_after, 500)
                .await?;
            if batch.is_empty() {
                return Ok(published);
            }
            for (i, message) in batch.iter().enumerate() {
                if let Err(e) = queue::publish_traced(&*self.queue, message, "reaper").await {
                    QUEUE_METRICS
                        .publish_failures
                        .with_label_values(&[Publisher::Reaper.label()])
                        .inc();
                    if let Err(store) = self.chunks.mark_unpublished(&batch[i..]).await {
                        tracing::warn!(error = %store, "could not mark chunks unpublished; they are published again after worker.requeue_after");
                    }
                    return Err(e.into());
                }
                METRICS.reaper_republishes.inc();
                published += 1;
            }
        }
    }
}
