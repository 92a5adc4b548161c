//! The three backends a process talks to, opened from configuration with a clear message
//! naming whichever one failed, and the readiness check that asks each of them to answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::blob::{self, BlobStore};
use crate::queue::{self, Queue};
use orbit_config::Settings;
use orbit_core::redact::redact;
use orbit_store::{self as store, Database, Stats, Store};

#[derive(Clone)]
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub blobs: Arc<dyn BlobStore>,
    pub queue: Arc<dyn Queue>,
}

impl Backends {
    pub async fn open(settings: &Settings) -> anyhow::Result<Self> {
        let store = store::open(&settings.database)
            .await
            .with_context(|| format!("cannot open database {}", redact(&settings.database.url)))?;
        let blobs = blob::open(&settings.object_store).await.with_context(|| {
            format!(
                "cannot open object store {}",
                redact(&settings.object_store.url)
            )
        })?;
        let queue = queue::open(&settings.queue)
            .await
            .with_context(|| format!("cannot open queue {}", redact(&settings.queue.url)))?;
        Ok(Backends {
            store,
            blobs,
            queue,
        })
    }

    /// What keeps this process from being ready; see [`not_ready`].
    pub async fn not_ready(&self) -> Vec<String> {
        not_ready(&*self.store, &*self.blobs, &*self.queue).await
    }
}

/// Asks the database, the object store and the queue to answer, all at once, and names each
/// one that did not; empty when the process is ready.
pub async fn not_ready(
    store: &dyn Database,
    blobs: &dyn BlobStore,
    queue: &dyn Queue,
) -> Vec<String> {
    let (db, objects, broker) = tokio::join!(store.ping(), blobs.ping(), queue.ping());
    [
        db.err()
            .map(|e| format!("database ({}): {e}", store.backend())),
        objects
            .err()
            .map(|e| format!("object store ({}): {e}", blobs.backend())),
        broker
            .err()
            .map(|e| format!("queue ({}): {e}", queue.backend())),
    ]
    .into_iter()
    .flatten()
    .map(|failure| redact(&failure).into_owned())
    .collect()
}

/// A process's `/metrics` page: the gauges that mirror the database and the broker, read at
/// most once per `telemetry.gauges_refresh` (so replicas scraped often cost the database a few
/// queries per interval, not five per scrape; concurrent scrapes share one read), and
/// everything the process counts itself. A read that failed in part is tried again at the
/// next scrape.
pub struct MetricsPage {
    every: Duration,
    /// How many organizations the per-organization gauges name (`tenants.metrics_top`).
    top: usize,
    last_read: tokio::sync::Mutex<Option<Instant>>,
}

impl MetricsPage {
    pub fn new(every: Duration, top: usize) -> Self {
        orbit_store::metrics::register();
        std::sync::LazyLock::force(&crate::metrics::METRICS);
        MetricsPage {
            every,
            top,
            last_read: tokio::sync::Mutex::new(None),
        }
    }

    /// The page `settings` ask for.
    pub fn from_settings(settings: &Settings) -> Self {
        Self::new(
            settings.telemetry.gauges_refresh,
            settings.tenants.metrics_top as usize,
        )
    }

    pub async fn render(&self, store: &dyn Stats, queue: &dyn Queue) -> String {
        let mut last_read = self.last_read.lock().await;
        if !last_read.is_some_and(|at| at.elapsed() < self.every) {
            let (database, broker) = tokio::join!(
                orbit_store::metrics::mirror(store, self.top),
                crate::metrics::mirror_queue(queue)
            );
            if database && broker {
                *last_read = Some(Instant::now());
            }
        }
        drop(last_read);
        crate::metrics::encode()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use async_trait::async_trait;
    use orbit_core::model::SourceStatus;
    use orbit_store::{StoreError, StoreResult};

    use super::*;
    use crate::queue::memory::MemoryQueue;

    /// Counts the database reads of each refresh; fails them while `failing` is set.
    #[derive(Default)]
    struct Counting {
        reads: AtomicUsize,
        failing: AtomicBool,
    }

    impl Counting {
        fn read(&self) -> StoreResult<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Conflict("injected".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Stats for Counting {
        async fn count_sources_by_status(&self) -> StoreResult<Vec<(SourceStatus, u64)>> {
            self.read().map(|()| Vec::new())
        }
        async fn count_pending_chunks(&self) -> StoreResult<u64> {
            self.read().map(|()| 0)
        }
        async fn count_resumable_receiving(
            &self,
            _now: chrono::DateTime<chrono::Utc>,
        ) -> StoreResult<u64> {
            self.read().map(|()| 0)
        }
        async fn count_failed_sources_by_code(&self) -> StoreResult<Vec<(String, u64)>> {
            self.read().map(|()| Vec::new())
        }
        async fn organization_backlog(
            &self,
            _now: chrono::DateTime<chrono::Utc>,
            _top: usize,
        ) -> StoreResult<orbit_store::backlog::Backlog> {
            self.read().map(|()| Default::default())
        }
    }

    #[tokio::test]
    async fn scrapes_within_the_refresh_interval_read_the_database_once() {
        let (stats, queue) = (Counting::default(), MemoryQueue::new());
        let page = MetricsPage::new(Duration::from_secs(3600), 10);
        for _ in 0..5 {
            page.render(&stats, &queue).await;
        }
        assert_eq!(
            stats.reads.load(Ordering::SeqCst),
            5,
            "one read of each count"
        );
    }

    #[tokio::test]
    async fn a_zero_interval_reads_at_every_scrape() {
        let (stats, queue) = (Counting::default(), MemoryQueue::new());
        let page = MetricsPage::new(Duration::ZERO, 10);
        for _ in 0..4 {
            page.render(&stats, &queue).await;
        }
        assert_eq!(stats.reads.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_failed_read_is_tried_again_at_the_next_scrape() {
        let (stats, queue) = (Counting::default(), MemoryQueue::new());
        let page = MetricsPage::new(Duration::from_secs(3600), 10);
        stats.failing.store(true, Ordering::SeqCst);
        page.render(&stats, &queue).await;
        stats.failing.store(false, Ordering::SeqCst);
        page.render(&stats, &queue).await;
        page.render(&stats, &queue).await;
        assert_eq!(
            stats.reads.load(Ordering::SeqCst),
            10,
            "read again once, then cached"
        );
    }
}
