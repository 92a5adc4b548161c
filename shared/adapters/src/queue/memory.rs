//! The in-process queue of the embedded deployment: a channel shared by the worker tasks of the
//! same process. Messages die with the process; the start-up re-queue covers that.
//!
//! It has no dead-letter queue: a message is never redelivered (an in-process worker cannot
//! crash without the queue going with it), so none is ever dead-lettered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, Mutex, OwnedSemaphorePermit, Semaphore};

use super::{Acker, Consumer, Delivery, Queue, QueueError, QueueResult, Replayed};
use orbit_core::model::ChunkRef;

pub struct MemoryQueue {
    sender: mpsc::UnboundedSender<ChunkRef>,
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<ChunkRef>>>,
    depth: Arc<AtomicU64>,
}

impl MemoryQueue {
    pub fn new() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        MemoryQueue {
            sender,
            receiver: Arc::new(Mutex::new(receiver)),
            depth: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new()
    }
}

struct MemoryConsumer {
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<ChunkRef>>>,
    depth: Arc<AtomicU64>,
    /// One permit per unacknowledged delivery, as a broker's prefetch would allow.
    unacked: Arc<Semaphore>,
}

/// Acknowledging frees the delivery's prefetch slot; there is nothing to tell a broker.
struct SlotAck {
    _slot: OwnedSemaphorePermit,
}

#[async_trait]
impl Acker for SlotAck {
    async fn ack(self: Box<Self>) -> QueueResult<()> {
        Ok(())
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<QueueResult<Delivery>> {
        let slot = self.unacked.clone().acquire_owned().await.ok()?;
        let message = self.receiver.lock().await.recv().await?;
        self.depth.fetch_sub(1, Ordering::Relaxed);
        Some(Ok(Delivery {
            message,
            acker: Box::new(SlotAck { _slot: slot }),
        }))
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn ping(&self) -> QueueResult<()> {
        Ok(())
    }

    async fn publish(&self, message: &ChunkRef) -> QueueResult<()> {
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.sender.send(message.clone()).map_err(|_| {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            QueueError::new("the in-process queue is closed")
        })
    }

    async fn consume(&self, prefetch: u16) -> QueueResult<Box<dyn Consumer>> {
        Ok(Box::new(MemoryConsumer {
            receiver: self.receiver.clone(),
            depth: self.depth.clone(),
            unacked: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
        }))
    }

    async fn depth(&self) -> QueueResult<u64> {
        Ok(self.depth.load(Ordering::Relaxed))
    }

    async fn dead_letters(&self) -> QueueResult<u64> {
        Ok(0)
    }

    async fn replay_dead_letters(&self, _limit: u64) -> QueueResult<Replayed> {
        Err(QueueError::new(
            "the embedded queue has no dead-letter queue: its messages live inside the gateway \
             process and are never dead-lettered",
        ))
    }
}
