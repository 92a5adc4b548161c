//! The chunk work the SQLite store does its own way: slice commits, and publishing chunks
//! with one writer (claims and releases are `shared::store_roles`).

use super::*;

impl SqliteStore {
    pub(super) async fn store_slice(
        &self,
        lease: &Lease,
        results: ChunkResults,
        end: SliceEnd,
    ) -> StoreResult<Committed> {
        // Outside the transaction: only resolution needs to see the directory.
        let prepared = prepare(results)?;
        let mut tx = self.writer.begin().await?;
        let held = "SELECT 1 FROM chunks c JOIN sources s ON s.id = c.source_id
             WHERE c.directory_id = $1 AND c.id = $2 AND c.lease_token = $3 AND c.state = 'running' AND s.status IN ('pending', 'processing')";
        if !lease_held(&mut tx, held, lease).await? {
            return Ok(Committed::LeaseLost);
        }
        let source = load_source(&mut tx, lease.directory_id, lease.source_id).await?;
        let applied = apply_results(&mut tx, &source, prepared).await?;
        let chunks_done = end_slice(&mut tx, lease, end).await?;
        let completed = advance_source(
            &mut tx,
            source.directory_id,
            source.id,
            &applied,
            chunks_done,
        )
        .await?;
        tx.commit().await?;
        Ok(Committed::Done {
            source_completed: completed,
        })
    }

    pub(super) async fn requeue_chunks(
        &self,
        requeue_after: Duration,
        limit: u32,
    ) -> StoreResult<Vec<ChunkRef>> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT c.id, c.directory_id, c.source_id, c.attempts, c.traceparent, c.tracestate, c.state FROM chunks c JOIN sources s ON s.id = c.source_id
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
            let takeover = row.try_get::<String, _>("state")? == "running";
            refs.push(ChunkMessageRow::from_row(&row)?.message(takeover));
        }
        sqlx::query(sql::FORGET_DEAD_PROCESSES)
            .bind(now - FORGET_PROCESSES_AFTER_MS)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(refs)
    }

    /// One statement per id: the embedded store serves one process's few tenants.
    pub(super) async fn read_passes(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, Pass>> {
        let mut passes = HashMap::with_capacity(ids.len());
        for &id in ids {
            let row = sqlx::query("SELECT pass, vtime FROM scheduler_shares WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?;
            if let Some(row) = row {
                let pass = Pass {
                    pass: row.try_get("pass")?,
                    vtime: row.try_get("vtime")?,
                };
                passes.insert(id, pass);
            }
        }
        Ok(passes)
    }

    pub(super) async fn unqueue_chunks(&self, chunks: &[ChunkRef]) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        for chunk in chunks {
            sqlx::query("UPDATE chunks SET queued_ms = NULL WHERE id = ? AND state = 'pending'")
                .bind(chunk.chunk_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
