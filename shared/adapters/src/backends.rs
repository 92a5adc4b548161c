//! The three backends a process talks to, opened from configuration with a clear message
//! naming whichever one failed, and the readiness check that asks each of them to answer.

use std::sync::Arc;

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
/// queries per interval, not three per scrape), and everything the process counts itself.
pub struct MetricsPage {
    database: orbit_store::metrics::Mirror,
    broker: crate::metrics::QueueMirror,
}

impl MetricsPage {
    pub fn new(refresh: std::time::Duration) -> Self {
        MetricsPage {
            database: orbit_store::metrics::Mirror::new(refresh),
            broker: crate::metrics::QueueMirror::new(refresh),
        }
    }

    pub async fn render(&self, store: &dyn Stats, queue: &dyn Queue) -> String {
        tokio::join!(self.database.refresh(store), self.broker.refresh(queue));
        crate::metrics::encode()
    }
}
