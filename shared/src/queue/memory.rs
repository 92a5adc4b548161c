//! The in-process queue of the embedded deployment: a channel shared by the worker tasks of the
//! same process. Messages die with the process; the start-up re-queue covers that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, Mutex};

use super::{Acker, Consumer, Delivery, Queue, QueueError, QueueResult};
use crate::model::ChunkRef;

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
}

struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(self: Box<Self>) -> QueueResult<()> {
        Ok(())
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<QueueResult<Delivery>> {
        let message = self.receiver.lock().await.recv().await?;
        self.depth.fetch_sub(1, Ordering::Relaxed);
        Some(Ok(Delivery {
            message,
            acker: Box::new(NoAck),
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
            QueueError("the in-process queue is closed".into())
        })
    }

    async fn consume(&self, _prefetch: u16) -> QueueResult<Box<dyn Consumer>> {
        Ok(Box::new(MemoryConsumer {
            receiver: self.receiver.clone(),
            depth: self.depth.clone(),
        }))
    }

    async fn depth(&self) -> QueueResult<u64> {
        Ok(self.depth.load(Ordering::Relaxed))
    }
}
