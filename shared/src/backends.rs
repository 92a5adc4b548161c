//! The three backends a process talks to, opened from configuration with a clear message
//! naming whichever one failed, and the readiness check that asks each of them to answer.

use std::sync::Arc;

use anyhow::Context as _;

use crate::blob::{self, BlobStore};
use crate::config::Settings;
use crate::queue::{self, Queue};
use crate::redact::redact;
use crate::store::{self, Store};

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
pub async fn not_ready(store: &dyn Store, blobs: &dyn BlobStore, queue: &dyn Queue) -> Vec<String> {
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
