//! Which chunk a queue message makes this worker take (docs/concurrency.md, "Fair shares").
//!
//! A message is a turn, not an order: with `tenants.fair_scheduling` on, the worker serves the
//! directory that fair shares choose among every directory with a chunk ready, and takes that
//! directory's oldest ready chunk (the message's own chunk, when it is of that directory, so
//! that the message's trace goes on). A chunk taken out of turn leaves its message in the queue
//! for another turn, and the chunk whose message it used is marked unpublished, so the reaper
//! publishes it a message of its own: every pending chunk keeps a message that names it, so
//! that no worker idles while a chunk is ready, and a turn that cannot choose (the shares
//! unreadable, a Citus node down) can always fall back to the message's own chunk, first come,
//! first served, as with the scheduler off. So does a takeover (the reaper's message for a
//! chunk whose worker died).

use std::collections::HashMap;

use orbit_core::domain::fair::{self, Pass, Waiting};
use orbit_core::model::ChunkRef;
use uuid::Uuid;

use crate::metrics::METRICS;
use crate::runtime::Worker;

/// Times a worker chooses again after another took the chunk it chose, before it takes the
/// message's own chunk.
pub(crate) const CHOICES: u32 = 3;

/// The chunk to claim, and, when fair shares chose it, what charging it needs.
pub(crate) struct Choice {
    pub chunk: ChunkRef,
    pub fair: Option<(Waiting, HashMap<Uuid, Pass>)>,
    /// The message whose turn this is, when it names another chunk than `chunk`.
    pub turn_of: Option<ChunkRef>,
}

impl Choice {
    pub(crate) fn named(message: &ChunkRef) -> Self {
        Choice {
            chunk: message.clone(),
            fair: None,
            turn_of: None,
        }
    }
}

impl Worker {
    /// The chunk to take for `message`. `again` after a lost claim: the message's own chunk is
    /// then not preferred (it may be the one just lost).
    pub(crate) async fn choose(&self, message: &ChunkRef, again: bool) -> Choice {
        let tenants = &self.settings.tenants;
        if !tenants.fair_scheduling || message.takeover {
            return Choice::named(message);
        }
        let (ready, passes) = match self.read_shares(tenants.default_weight).await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read fair shares; taking the message's chunk");
                return Choice::named(message);
            }
        };
        let Some(ready) = fair::choose(&ready, &passes) else {
            return Choice::named(message);
        };
        let chosen = &ready.waiting;
        let chunk = if !again && message.directory_id == chosen.directory {
            message.clone()
        } else {
            ready.chunk.clone()
        };
        let named = chunk.chunk_id == message.chunk_id;
        METRICS
            .fair_choices
            .with_label_values(&[if named { "named" } else { "other" }])
            .inc();
        Choice {
            chunk,
            fair: Some((chosen.clone(), passes)),
            turn_of: (!named).then(|| message.clone()),
        }
    }

    async fn read_shares(
        &self,
        default_weight: u32,
    ) -> orbit_store::StoreResult<(Vec<orbit_core::model::ReadyChunk>, HashMap<Uuid, Pass>)> {
        let ready = self.chunks.ready_chunks(default_weight).await?;
        let mut ids = vec![fair::SERVICE];
        for r in &ready {
            ids.push(r.waiting.organization);
            ids.push(r.waiting.directory);
        }
        ids.sort_unstable();
        ids.dedup();
        let passes = self.chunks.passes(&ids).await?;
        Ok((ready, passes))
    }

    /// What taking the chosen chunk, now claimed, settles: the chunk whose message this turn
    /// was gets a message again (from the reaper's next pass), and the chunk's `rows` rows are
    /// charged to its organization and directory. Either failing is only logged: a lost
    /// republish costs that chunk `worker.requeue_after` at worst, a lost charge the order one
    /// chunk.
    pub(crate) async fn settle(&self, choice: &Choice, rows: u64) {
        if let Some(message) = &choice.turn_of {
            if let Err(e) = self
                .chunks
                .mark_unpublished(std::slice::from_ref(message))
                .await
            {
                tracing::warn!(chunk = %message.chunk_id, error = %e, "cannot mark a chunk taken out of turn for republishing");
            }
        }
        self.charge(choice, rows).await;
    }

    async fn charge(&self, choice: &Choice, rows: u64) {
        let Some((waiting, passes)) = &choice.fair else {
            return;
        };
        let advances = fair::charge(waiting, passes, rows, self.settings.ingest.chunk_rows);
        if let Err(e) = self.chunks.advance_passes(&advances).await {
            tracing::warn!(error = %e, "cannot charge a chunk to its organization's share");
        }
    }
}
