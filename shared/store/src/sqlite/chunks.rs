//! The chunk work of the SQLite store: claims and releases under leases, slice commits, and
//! the chunks to publish.

use super::*;

#[async_trait]
impl Chunks for SqliteStore {
    async fn claim_chunk(
        &self,
        chunk: Uuid,
        owner: &str,
        lease_for: Duration,
        max_attempts: u32,
    ) -> StoreResult<Claim> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let row = sqlx::query(
            "SELECT c.*, s.status AS source_status, COALESCE(p.expires_ms < ?2, 0) AS owner_dead
             FROM chunks c JOIN sources s ON s.id = c.source_id
             LEFT JOIN processes p ON p.owner = c.lease_owner
             WHERE c.id = ?1",
        )
        .bind(chunk)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Claim::Nothing);
        };
        let source_id: Uuid = row.try_get("source_id")?;
        let found = ChunkState::from_row(&row)?;
        let attempts = found.attempts;
        match decide_claim(&found, now, max_attempts) {
            ClaimDecision::Nothing => return Ok(Claim::Nothing),
            ClaimDecision::Busy => return Ok(Claim::Busy),
            ClaimDecision::Poison(message) => {
                fail_source_in(&mut tx, source_id, "chunk_poisoned", &message).await?;
                tx.commit().await?;
                return Ok(Claim::Poisoned);
            }
            ClaimDecision::Take(over) => {
                if let Some(reason) = over {
                    METRICS.leases_taken_over.with_label_values(&[reason]).inc();
                }
            }
        }
        let token = Uuid::new_v4();
        sqlx::query(sql::TAKE_LEASE)
            .bind(owner)
            .bind(token)
            .bind(now + dur_ms(lease_for))
            .bind(chunk)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql::SOURCE_PROCESSING)
            .bind(now)
            .bind(source_id)
            .execute(&mut *tx)
            .await?;
        let spec = chunk_from_row(&row)?;
        let source = load_source(&mut tx, source_id).await?;
        tx.commit().await?;
        Ok(Claim::Claimed(Box::new(ChunkWork {
            lease: Lease {
                chunk_id: chunk,
                source_id,
                token,
                attempt: attempts + 1,
            },
            chunk: spec,
            source,
        })))
    }

    async fn renew_lease(&self, lease: &Lease, lease_for: Duration) -> StoreResult<bool> {
        let done = sqlx::query(sql::RENEW_LEASE)
            .bind(now_ms() + dur_ms(lease_for))
            .bind(lease.chunk_id)
            .bind(lease.token)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn commit_slice(
        &self,
        lease: &Lease,
        results: ChunkResults,
        end: SliceEnd,
    ) -> StoreResult<Committed> {
        // Outside the transaction: only resolution needs to see the directory.
        let prepared = prepare(results)?;
        let mut tx = self.writer.begin().await?;
        let held = sqlx::query(
            "SELECT 1 FROM chunks c JOIN sources s ON s.id = c.source_id
             WHERE c.id = ? AND c.lease_token = ? AND c.state = 'running' AND s.status IN ('pending', 'processing')",
        )
        .bind(lease.chunk_id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?;
        if held.is_none() {
            return Ok(Committed::LeaseLost);
        }
        let source = load_source(&mut tx, lease.source_id).await?;
        let applied = apply_results(&mut tx, &source, prepared).await?;
        let chunks_done = match end {
            SliceEnd::Chunk => {
                sqlx::query(CHUNK_DONE)
                    .bind(lease.chunk_id)
                    .execute(&mut *tx)
                    .await?;
                1
            }
            SliceEnd::Before(next) => {
                sqlx::query(CHUNK_RESUMES_AT)
                    .bind(next.offset as i64)
                    .bind(next.line as i64)
                    .bind(next.row as i64)
                    .bind(lease.chunk_id)
                    .execute(&mut *tx)
                    .await?;
                0
            }
        };
        let completed = advance_source(&mut tx, source.id, &applied, chunks_done).await?;
        tx.commit().await?;
        Ok(Committed::Done {
            source_completed: completed,
        })
    }

    async fn release_chunk(
        &self,
        lease: &Lease,
        error: &str,
        transient_for: Option<Duration>,
    ) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT transient_since_ms FROM chunks WHERE id = ? AND lease_token = ? AND state = 'running'",
        )
        .bind(lease.chunk_id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(false);
        };
        let release = decide_release(
            now_ms(),
            lease.attempt,
            transient_for,
            row.try_get("transient_since_ms")?,
        );
        sqlx::query(sql::RELEASE_CHUNK)
            .bind(release.not_before_ms)
            .bind(error)
            .bind(i64::from(release.refund))
            .bind(release.transient_since_ms)
            .bind(lease.chunk_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn fail_source(&self, source: Uuid, error: SourceError) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        fail_source_in(&mut tx, source, &error.code, &error.message).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn chunks_to_publish(
        &self,
        requeue_after: Duration,
        limit: u32,
    ) -> StoreResult<Vec<ChunkRef>> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT c.id, c.source_id, c.attempts, c.traceparent, c.tracestate FROM chunks c JOIN sources s ON s.id = c.source_id
             LEFT JOIN processes p ON p.owner = c.lease_owner
             WHERE s.status IN ('pending', 'processing') AND (
                 (c.state = 'pending' AND c.not_before_ms <= ?1 AND (c.queued_ms IS NULL OR c.queued_ms < ?2))
              OR (c.state = 'running' AND (c.lease_expires_ms < ?1 OR p.expires_ms < ?1)))
             ORDER BY s.seq, c.idx LIMIT ?3",
        )
        .bind(now)
        .bind(now - dur_ms(requeue_after))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut refs = Vec::with_capacity(rows.len());
        for row in rows {
            let chunk_id: Uuid = row.try_get("id")?;
            sqlx::query("UPDATE chunks SET queued_ms = ? WHERE id = ?")
                .bind(now)
                .bind(chunk_id)
                .execute(&mut *tx)
                .await?;
            refs.push(ChunkRef {
                source_id: row.try_get("source_id")?,
                chunk_id,
                attempt: row.try_get::<i64, _>("attempts")? as u32,
                traceparent: row.try_get("traceparent")?,
                tracestate: row.try_get("tracestate")?,
            });
        }
        sqlx::query(sql::FORGET_DEAD_PROCESSES)
            .bind(now - FORGET_PROCESSES_AFTER_MS)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(refs)
    }

    async fn forget_queued(&self) -> StoreResult<u64> {
        let done = sqlx::query(sql::FORGET_QUEUED)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn mark_unpublished(&self, chunks: &[Uuid]) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        for chunk in chunks {
            sqlx::query("UPDATE chunks SET queued_ms = NULL WHERE id = ? AND state = 'pending'")
                .bind(chunk)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
