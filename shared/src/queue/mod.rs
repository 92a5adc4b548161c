//! The work queue: chunk ids, published after an upload commits and by the reaper, consumed by
//! workers. It is only a wake-up call: the database holds every chunk's state, so a lost or
//! duplicated message costs time, never correctness.

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::ChunkRef;

pub mod memory;
pub mod rabbitmq;

#[derive(Debug, thiserror::Error)]
#[error("queue error: {0}")]
pub struct QueueError(pub String);

pub type QueueResult<T> = Result<T, QueueError>;

#[async_trait]
pub trait Queue: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn ping(&self) -> QueueResult<()>;
    /// Returns once the broker has taken responsibility for the message.
    async fn publish(&self, message: &ChunkRef) -> QueueResult<()>;
    /// A consumer receiving at most `prefetch` unacknowledged messages at a time.
    async fn consume(&self, prefetch: u16) -> QueueResult<Box<dyn Consumer>>;
    /// Messages waiting, for dashboards and autoscalers.
    async fn depth(&self) -> QueueResult<u64>;
}

#[async_trait]
pub trait Consumer: Send {
    /// The next message; `None` once the queue is closed for good.
    async fn next(&mut self) -> Option<QueueResult<Delivery>>;
}

pub struct Delivery {
    pub message: ChunkRef,
    pub acker: Box<dyn Acker>,
}

#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(self: Box<Self>) -> QueueResult<()>;
}

pub async fn open(settings: &crate::config::QueueSettings) -> anyhow::Result<Arc<dyn Queue>> {
    let url = settings.url.as_str();
    match url.split(':').next().unwrap_or_default() {
        "embedded" => Ok(Arc::new(memory::MemoryQueue::new())),
        "amqp" | "amqps" => Ok(Arc::new(rabbitmq::RabbitQueue::open(settings).await?)),
        scheme => anyhow::bail!(
            "queue.url {url:?}: unsupported scheme {scheme:?} (expected embedded or amqp://)"
        ),
    }
}
