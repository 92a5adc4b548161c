//! The lease of a chunk is renewed only while a worker works on it: however an attempt ends,
//! including when the store fails to record how it ended, the renewal stops. A renewal left
//! running would keep a chunk nobody works on from every other worker until the process exits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orbit_shared::blob::local::LocalBlobStore;
use orbit_shared::config::{DatabaseSettings, Settings};
use orbit_shared::domain::csv::{Dialect, TextEncoding};
use orbit_shared::domain::header::ColumnMap;
use orbit_shared::model::*;
use orbit_shared::queue::memory::MemoryQueue;
use orbit_shared::store::{self, Store, StoreError, StoreResult};
use orbit_worker::Worker;
use uuid::Uuid;

/// A real SQLite store whose `fail_source` and `release_chunk` fail, as they would in a
/// database blip, and which counts lease renewals.
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
impl Store for FailingEnds {
    async fn fail_source(&self, _source: Uuid, _error: SourceError) -> StoreResult<()> {
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

    // Everything else is the real store's.
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn cancel_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Cancelled> {
        self.inner.cancel_source(org, dir, source).await
    }
    async fn create_webhook(&self, endpoint: &WebhookEndpoint) -> StoreResult<()> {
        self.inner.create_webhook(endpoint).await
    }
    async fn list_webhooks(&self, org: Uuid) -> StoreResult<Vec<WebhookEndpoint>> {
        self.inner.list_webhooks(org).await
    }
    async fn get_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        self.inner.get_webhook(org, id).await
    }
    async fn delete_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<bool> {
        self.inner.delete_webhook(org, id).await
    }
    async fn enable_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        self.inner.enable_webhook(org, id).await
    }
    async fn list_deliveries(
        &self,
        org: Uuid,
        endpoint: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        self.inner.list_deliveries(org, endpoint, limit).await
    }
    async fn claim_deliveries(
        &self,
        lease_for: Duration,
        limit: u32,
    ) -> StoreResult<Vec<DueDelivery>> {
        self.inner.claim_deliveries(lease_for, limit).await
    }
    async fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: &DeliveryAttempt,
        next: AttemptNext,
        disable_after: u32,
    ) -> StoreResult<()> {
        self.inner
            .record_attempt(delivery, attempt, next, disable_after)
            .await
    }
    async fn migrate(&self) -> StoreResult<()> {
        self.inner.migrate().await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn create_organization(&self, name: &str) -> StoreResult<Organization> {
        self.inner.create_organization(name).await
    }
    async fn organization_exists(&self, org: Uuid) -> StoreResult<bool> {
        self.inner.organization_exists(org).await
    }
    async fn ensure_user(&self, org: Uuid, email: &str) -> StoreResult<Uuid> {
        self.inner.ensure_user(org, email).await
    }
    async fn insert_token(
        &self,
        hash: &[u8],
        org: Uuid,
        user: Uuid,
        expires_at: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        self.inner.insert_token(hash, org, user, expires_at).await
    }
    async fn find_token(&self, hash: &[u8]) -> StoreResult<Option<TokenRecord>> {
        self.inner.find_token(hash).await
    }
    async fn revoke_token(&self, hash: &[u8]) -> StoreResult<bool> {
        self.inner.revoke_token(hash).await
    }
    async fn create_directory(&self, org: Uuid, name: &str) -> StoreResult<Directory> {
        self.inner.create_directory(org, name).await
    }
    async fn get_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        self.inner.get_directory(org, dir).await
    }
    async fn list_directories(
        &self,
        org: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Directory>> {
        self.inner.list_directories(org, page).await
    }
    async fn archive_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        self.inner.archive_directory(org, dir).await
    }
    async fn claim_idempotency_key(
        &self,
        org: Uuid,
        key: &str,
        dir: Uuid,
        owner: &str,
        ttl: Duration,
        in_flight_timeout: Duration,
    ) -> StoreResult<KeyState> {
        self.inner
            .claim_idempotency_key(org, key, dir, owner, ttl, in_flight_timeout)
            .await
    }
    async fn release_idempotency_key(&self, claim: &IdempotencyClaim) -> StoreResult<()> {
        self.inner.release_idempotency_key(claim).await
    }
    async fn commit_upload(&self, upload: NewUpload) -> StoreResult<(Source, Vec<ChunkRef>)> {
        self.inner.commit_upload(upload).await
    }
    async fn get_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Option<Source>> {
        self.inner.get_source(org, dir, source).await
    }
    async fn list_sources(
        &self,
        org: Uuid,
        dir: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Source>> {
        self.inner.list_sources(org, dir, page).await
    }
    async fn list_issues(
        &self,
        org: Uuid,
        dir: Uuid,
        source: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<RowIssue>> {
        self.inner.list_issues(org, dir, source, page).await
    }
    async fn failed_row_width(&self, source: Uuid) -> StoreResult<usize> {
        self.inner.failed_row_width(source).await
    }
    async fn failed_rows(
        &self,
        source: Uuid,
        after_row: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredFailedRow>> {
        self.inner.failed_rows(source, after_row, limit).await
    }
    async fn list_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        email: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Profile>> {
        self.inner.list_profiles(org, dir, email, page).await
    }
    async fn get_profile(
        &self,
        org: Uuid,
        dir: Uuid,
        profile: Uuid,
    ) -> StoreResult<Option<Profile>> {
        self.inner.get_profile(org, dir, profile).await
    }
    async fn claim_chunk(
        &self,
        chunk: Uuid,
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
    async fn retry_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Retried> {
        self.inner.retry_source(org, dir, source).await
    }
    async fn chunks_to_publish(
        &self,
        requeue_after: Duration,
        limit: u32,
    ) -> StoreResult<Vec<ChunkRef>> {
        self.inner.chunks_to_publish(requeue_after, limit).await
    }
    async fn heartbeat(&self, owner: &str, valid_for: Duration) -> StoreResult<()> {
        self.inner.heartbeat(owner, valid_for).await
    }
    async fn retire(&self, owner: &str) -> StoreResult<()> {
        self.inner.retire(owner).await
    }
    async fn forget_queued(&self) -> StoreResult<u64> {
        self.inner.forget_queued().await
    }
    async fn mark_unpublished(&self, chunks: &[Uuid]) -> StoreResult<()> {
        self.inner.mark_unpublished(chunks).await
    }
    async fn count_sources_by_status(&self) -> StoreResult<Vec<(SourceStatus, u64)>> {
        self.inner.count_sources_by_status().await
    }
    async fn count_pending_chunks(&self) -> StoreResult<u64> {
        self.inner.count_pending_chunks().await
    }
    async fn count_failed_sources_by_code(&self) -> StoreResult<Vec<(String, u64)>> {
        self.inner.count_failed_sources_by_code().await
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
        inner,
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
        blobs,
        Arc::new(MemoryQueue::new()),
        Arc::new(settings),
    );

    let org = store.create_organization("Acme").await.unwrap().id;
    let directory = store.create_directory(org, "Contacts").await.unwrap().id;
    let id = Uuid::now_v7();
    let (_, chunks) = store
        .commit_upload(NewUpload {
            source: NewSource {
                id,
                organization_id: org,
                directory_id: directory,
                filename: "contacts.csv".into(),
                byte_size: 100,
                sha256: "ab".repeat(32),
                object_key: orbit_shared::blob::object_key(org, id),
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
