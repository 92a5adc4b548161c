//! The lease of a chunk is renewed only while a worker works on it: however an attempt ends,
//! including when the store fails to record how it ended, the renewal stops. A renewal left
//! running would keep a chunk nobody works on from every other worker until the process exits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use orbit_adapters::blob::local::LocalBlobStore;
use orbit_adapters::queue::memory::MemoryQueue;
use orbit_config::{DatabaseSettings, Settings};
use orbit_core::domain::csv::{Dialect, TextEncoding};
use orbit_core::domain::fair::{Advance, Pass};
use orbit_core::domain::header::ColumnMap;
use orbit_core::model::*;
use orbit_store::{self as store, Chunks, Store, StoreError, StoreResult};
use orbit_worker::Worker;
use uuid::Uuid;

/// The chunk work of a real SQLite store, except that `fail_source` and `release_chunk` fail,
/// as they would in a database blip, and lease renewals are counted. The worker takes only
/// this role of the store, so nothing else is forwarded.
struct FailingEnds {
    inner: Arc<dyn Store>,
    renewals: AtomicUsize,
}

fn blip<T>() -> StoreResult<T> {
    Err(StoreError::Conflict(
        "injected: the database is gone".into(),
    ))
}

#[async_trait]
impl Chunks for FailingEnds {
    async fn fail_source(&self, _dir: Uuid, _source: Uuid, _error: SourceError) -> StoreResult<()> {
        blip()
    }
    async fn release_chunk(
        &self,
        _lease: &Lease,
        _error: &str,
        _transient_for: Option<Duration>,
    ) -> StoreResult<bool> {
        blip()
    }
    async fn renew_lease(&self, lease: &Lease, lease_for: Duration) -> StoreResult<bool> {
        self.renewals.fetch_add(1, Ordering::SeqCst);
        self.inner.renew_lease(lease, lease_for).await
    }

    // The rest of the role is the real store's.
    async fn claim_chunk(
        &self,
        chunk: &ChunkRef,
        owner: &str,
        lease_for: Duration,
        max_attempts: u32,
    ) -> StoreResult<Claim> {
        self.inner
            .claim_chunk(chunk, owner, lease_for, max_attempts)
            .await
    }
    async fn commit_slice(
        &self,
        lease: &Lease,
        results: ChunkResults,
        end: SliceEnd,
    ) -> StoreResult<Committed> {
        self.inner.commit_slice(lease, results, end).await
    }
    async fn chunks_to_publish(
        &self,
        requeue_after: Duration,
        limit: u32,
    ) -> StoreResult<Vec<ChunkRef>> {
        self.inner.chunks_to_publish(requeue_after, limit).await
    }
    async fn forget_queued(&self) -> StoreResult<u64> {
        self.inner.forget_queued().await
    }
    async fn mark_unpublished(&self, chunks: &[ChunkRef]) -> StoreResult<()> {
        self.inner.mark_unpublished(chunks).await
    }
    async fn give_back(&self, chunk: &ChunkRef, owner: &str) -> StoreResult<()> {
        self.inner.give_back(chunk, owner).await
    }
    async fn ready_chunks(&self, default_weight: u32) -> StoreResult<Vec<ReadyChunk>> {
        self.inner.ready_chunks(default_weight).await
    }
    async fn passes(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, Pass>> {
        self.inner.passes(ids).await
    }
    async fn advance_passes(&self, advances: &[Advance]) -> StoreResult<()> {
        self.inner.advance_passes(advances).await
    }
}

/// The renewal period: a third of the lease.
const LEASE: Duration = Duration::from_millis(300);

struct Setup {
    worker: Arc<Worker>,
    store: Arc<FailingEnds>,
    chunk: ChunkRef,
    _dir: tempfile::TempDir,
}

/// A worker on the failing store and an empty object store, and one queued chunk of a source
/// recorded with `region` as its default region. No object is ever written, so reading the
/// chunk finds it missing (when the region is valid and the rules are checked first).
async fn setup(region: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/orbit.db", dir.path().display());
    let inner = store::open(&DatabaseSettings::for_url(&url, 4))
        .await
        .unwrap();
    inner.migrate().await.unwrap();
    let store = Arc::new(FailingEnds {
        inner: inner.clone(),
        renewals: AtomicUsize::new(0),
    });
    let blobs = Arc::new(
        LocalBlobStore::open(dir.path().join("objects"))
            .await
            .unwrap(),
    );
    let mut settings = Settings::defaults();
    settings.worker.lease = LEASE;
    let worker = Worker::new(
        store.clone(),
        inner.clone(),
        blobs,
        Arc::new(MemoryQueue::new()),
        Arc::new(settings),
    );

    let org = inner.create_organization("Acme").await.unwrap().id;
    let directory = inner.create_directory(org, "Contacts").await.unwrap().id;
    let id = Uuid::now_v7();
    let (_, chunks) = inner
        .commit_upload(NewUpload {
            source: NewSource {
                id,
                organization_id: org,
                directory_id: directory,
                filename: "contacts.csv".into(),
                byte_size: 100,
                sha256: "ab".repeat(32),
                compression: Compression::None,
                received_bytes: 100,
                object_key: orbit_adapters::blob::object_key(org, id),
                dialect: Dialect {
                    encoding: TextEncoding::Utf8,
                    delimiter: b',',
                    bom_len: 0,
                },
                columns: ColumnMap::from_header(&["email".into()], 10).unwrap(),
                max_field_bytes: 100,
                default_region: region.into(),
                dry_run: false,
                total_rows: 2,
            },
            sync_chunk: None,
            sync_results: ChunkResults::default(),
            chunks: vec![ChunkSpec {
                index: 0,
                first_row: 1,
                row_count: 2,
                start_offset: 6,
                end_offset: 100,
                start_line: 2,
            }],
            idempotency: None,
            resumable: None,
            admission: None,
            traceparent: None,
            tracestate: None,
        })
        .await
        .unwrap();
    Setup {
        worker,
        store,
        chunk: chunks.into_iter().next().expect("one chunk to publish"),
        _dir: dir,
    }
}

/// Runs the chunk, which must fail, then watches the renewals for several renewal periods.
async fn assert_renewal_stops(setup: Setup) {
    let outcome = setup.worker.run_chunk(&setup.chunk).await;
    assert!(
        outcome.is_err(),
        "the injected store failure is reported: {outcome:?}"
    );
    let after_return = setup.store.renewals.load(Ordering::SeqCst);
    tokio::time::sleep(LEASE * 3).await;
    assert_eq!(
        setup.store.renewals.load(Ordering::SeqCst),
        after_return,
        "the lease was renewed after the attempt ended"
    );
}

/// The chunk cannot be read (the source's region is no region code: corrupt, permanent), so
/// the worker releases it, and the release fails.
#[tokio::test]
async fn a_failed_release_stops_the_lease_renewal() {
    assert_renewal_stops(setup("not a region").await).await;
}

/// The stored file is gone, so the worker fails the source, and that fails.
#[tokio::test]
async fn a_failed_fail_source_stops_the_lease_renewal() {
    assert_renewal_stops(setup("GB").await).await;
}
