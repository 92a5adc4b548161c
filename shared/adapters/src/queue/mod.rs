//! The work queue: chunk ids, published after an upload commits and by the reaper, consumed by
//! workers. It is only a wake-up call: the database holds every chunk's state, so a lost or
//! duplicated message costs time, never correctness.
//!
//! Publish through [`publish_traced`]: it records a `chunk.publish` span and sends the
//! message with that span's trace context, which the worker continues.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::Instrument as _;

use orbit_config::QueueBackend;
use orbit_core::model::ChunkRef;

pub mod memory;
pub mod rabbitmq;

/// A queue operation that failed. `message` says what was being done (and, for people reading
/// logs, what went wrong); `source` keeps the broker client's own error, when there is one,
/// for callers that look into it.
#[derive(Debug, thiserror::Error)]
#[error("queue error: {message}")]
pub struct QueueError {
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl QueueError {
    pub fn new(message: impl Into<String>) -> Self {
        QueueError {
            message: message.into(),
            source: None,
        }
    }

    /// `message`, caused by `source` (kept, not only quoted).
    pub fn caused(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        QueueError {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

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
    /// Messages in the dead-letter queue: those redelivered past the delivery limit, or that
    /// could not be decoded.
    async fn dead_letters(&self) -> QueueResult<u64>;
    /// Moves up to `limit` dead letters back to the work queue, oldest first. A dead letter
    /// that does not decode as a chunk message stays where it is (counted in `kept`).
    async fn replay_dead_letters(&self, limit: u64) -> QueueResult<Replayed>;
}

/// What [`Queue::replay_dead_letters`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Replayed {
    /// Moved back to the work queue.
    pub replayed: u64,
    /// Undecodable, left in the dead-letter queue.
    pub kept: u64,
    /// Still in the dead-letter queue afterwards.
    pub dead_letters_left: u64,
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

pub async fn open(settings: &orbit_config::QueueSettings) -> anyhow::Result<Arc<dyn Queue>> {
    Ok(match settings.url.backend() {
        QueueBackend::Embedded => Arc::new(memory::MemoryQueue::new()),
        QueueBackend::RabbitMq => Arc::new(rabbitmq::RabbitQueue::open(settings).await?),
    })
}

/// Why a chunk is being published, for its span: `upload` (the first time), `reaper` (again,
/// its message or its worker having been lost) or `retry` (its failed source was resumed).
pub type PublishReason = &'static str;

/// Publishes `message` inside a `chunk.publish` span (kind producer). The span is a child of
/// the message's own trace context when it carries one (the upload's, kept with the chunk:
/// so a chunk published again by the reaper stays in its upload's trace), else of the current
/// span; the message leaves with the span's context, so the worker's spans are its children.
pub async fn publish_traced(
    queue: &dyn Queue,
    message: &ChunkRef,
    reason: PublishReason,
) -> QueueResult<()> {
    let span = tracing::info_span!(
        "chunk.publish",
        otel.kind = "producer",
        messaging.system = queue.backend(),
        messaging.operation.type = "send",
        orbit.source_id = %message.source_id,
        orbit.chunk_id = %message.chunk_id,
        orbit.attempt = message.attempt,
        orbit.publish_reason = reason,
    );
    crate::telemetry::set_parent(
        &span,
        message.traceparent.as_deref(),
        message.tracestate.as_deref(),
    );
    let mut message = message.clone();
    if let (Some(traceparent), tracestate) = crate::telemetry::trace_context_of(&span) {
        message.traceparent = Some(traceparent);
        message.tracestate = tracestate;
    }
    let result = queue.publish(&message).instrument(span.clone()).await;
    if let Err(e) = &result {
        crate::telemetry::record_error(&span, &e.message);
    }
    result
}
