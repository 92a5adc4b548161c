//! The three backends a process talks to, opened from configuration with a clear message
//! naming whichever one failed.

use std::sync::Arc;

use anyhow::Context as _;

use crate::blob::{self, BlobStore};
use crate::config::Settings;
use crate::queue::{self, Queue};
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
            .with_context(|| format!("cannot open database {}", settings.database.url))?;
        let blobs = blob::open(&settings.object_store)
            .await
            .with_context(|| format!("cannot open object store {}", settings.object_store.url))?;
        let queue = queue::open(&settings.queue)
            .await
            .with_context(|| format!("cannot open queue {}", settings.queue.url))?;
        Ok(Backends {
            store,
            blobs,
            queue,
        })
    }
}
