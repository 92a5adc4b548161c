//! Object storage for uploaded files: one trait, picked from the `object_store.url` scheme.
//! Uploads are written as a stream and read back by byte range, so neither side ever holds a
//! whole file.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use orbit_config::ObjectStoreBackend;

pub mod local;
pub mod s3;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("object {0} not found")]
    NotFound(String),
    /// A failure with no underlying error to keep (an invalid key, a malformed setting).
    #[error("object store error: {0}")]
    Other(String),
    /// A local file operation that failed, its `io::Error` kept as the source.
    #[error("object store error: {0}")]
    Io(#[from] std::io::Error),
    /// An S3 request that failed: `message` says what was being done and quotes the causes for
    /// people reading logs; `source` keeps the SDK's error for callers that look into it.
    #[error("object store error: {message}")]
    Backend {
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

pub type BlobResult<T> = Result<T, BlobError>;
pub type ByteStream = BoxStream<'static, BlobResult<Bytes>>;

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn ping(&self) -> BlobResult<()>;
    /// Starts writing `key`; nothing is visible under it until `finish`.
    async fn begin(&self, key: &str) -> BlobResult<Box<dyn BlobWriter>>;
    /// Bytes `start..end` of `key`.
    async fn read_range(&self, key: &str, start: u64, end: u64) -> BlobResult<ByteStream>;
    async fn delete(&self, key: &str) -> BlobResult<()>;
    /// Removes what writers of crashed or killed processes left behind (partial files, open
    /// multipart uploads), never a write this process still has open. A leftover whose owner
    /// cannot be told apart from a live one is removed once it is older than `older_than`.
    /// Returns how many were removed.
    async fn sweep_abandoned(&self, older_than: std::time::Duration) -> BlobResult<u64>;
    /// Waits, for at most `wait`, for clean-ups this store started in the background (a
    /// writer dropped mid-write aborts its upload on a task of its own), so none is cut off
    /// when the process exits. Returns whether all of them finished. Writers may still be
    /// dropped afterwards; their clean-ups are started and waited for by the next call.
    async fn close(&self, wait: std::time::Duration) -> bool {
        let _ = wait;
        true
    }
}

#[async_trait]
pub trait BlobWriter: Send {
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()>;
    async fn finish(self: Box<Self>) -> BlobResult<()>;
    /// Drops everything written so far.
    async fn abort(self: Box<Self>) -> BlobResult<()>;
}

pub async fn open(
    settings: &orbit_config::ObjectStoreSettings,
) -> anyhow::Result<Arc<dyn BlobStore>> {
    let url = settings.url.as_str();
    match settings.url.backend() {
        ObjectStoreBackend::Local => {
            let path = url.trim_start_matches("file://");
            anyhow::ensure!(
                !path.is_empty(),
                "object_store.url {url:?} names no directory"
            );
            Ok(Arc::new(local::LocalBlobStore::open(path).await?))
        }
        ObjectStoreBackend::S3 => Ok(Arc::new(s3::S3BlobStore::open(settings).await?)),
    }
}

/// Where a source's file lives.
pub fn object_key(organization: uuid::Uuid, source: uuid::Uuid) -> String {
    format!("sources/{organization}/{source}.csv")
}
