//! The chunk work the PostgreSQL store does its own way: retrying transactions, cancelling
//! sources, one try of an upload's or a slice's transaction (the writes themselves are
//! `commit`), and publishing chunks (candidates read without a lock, then each directory's
//! taken by key, since a sharded database cannot lock rows across shards). Claims, releases and
//! reopening a source are `shared::store_roles`.

use super::*;

/// The parts of an upload one try of its transaction reads.
pub(super) struct UploadParts<'a> {
    pub(super) source: &'a NewSource,
    pub(super) seq: i64,
    pub(super) sync_chunk: Option<&'a ChunkSpec>,
    pub(super) chunks: &'a [ChunkSpec],
    pub(super) idempotency: Option<&'a IdempotencyClaim>,
    pub(super) resumable: Option<Uuid>,
    pub(super) admission: Option<Uuid>,
    pub(super) trace: Trace<'a>,
}

impl PgStore {
    pub(super) fn retry(&self) -> Retry {
        Retry::new(self.retry_for, self.node_retry_for)
    }

    /// Runs `once` until it succeeds or fails in a way [`Retry`] does not retry.
    pub(super) async fn retrying<'a, T>(
        &'a self,
        mut once: impl FnMut() -> futures::future::BoxFuture<'a, StoreResult<T>>,
    ) -> StoreResult<T> {
        let mut retry = self.retry();
        loop {
            match once().await {
                Err(e) => retry.after(e).await?,
                done => return done,
            }
        }
    }

    pub(super) async fn cancel_source_once(
        &self,
        org: Uuid,
        dir: Uuid,
        source: Uuid,
    ) -> StoreResult<Cancelled> {
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query(
            "SELECT id FROM sources WHERE organization_id = $1 AND directory_id = $2 AND id = $3",
        )
        .bind(org)
        .bind(dir)
        .bind(source)
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
            return Ok(Cancelled::NotFound);
        }
        // Locks in the order every commit takes them, chunk before source (a commit locks its
        // chunk, then updates the source): a commit in flight finishes first, and counts; any
        // later one finds its chunk failed.
        sqlx::query(
            "SELECT id FROM chunks WHERE directory_id = $1 AND source_id = $2 AND state IN ('pending', 'running') ORDER BY id FOR UPDATE",
        )
        .bind(dir)
        .bind(source)
        .fetch_all(&mut *tx)
        .await?;
        let current: Source = sqlx::query_as::<_, SourceRow>(
            "SELECT * FROM sources WHERE directory_id = $1 AND id = $2 FOR UPDATE",
        )
        .bind(dir)
        .bind(source)
        .fetch_one(&mut *tx)
        .await?
        .try_into()?;
        let cancelled = cancel_in(&mut tx, current).await?;
        tx.commit().await?;
        Ok(cancelled)
    }

    pub(super) async fn try_commit_upload(
        &self,
        upload: &UploadParts<'_>,
        prepared: &mut Prepared,
    ) -> StoreResult<(Source, Vec<ChunkRef>)> {
        let s = upload.source;
        let target = Target {
            source: s.id,
            directory: s.directory_id,
            seq: upload.seq,
            keys: self.keys,
            dry_run: s.dry_run,
            merge: self.merge_rules(&s.columns),
        };
        let optimistic = match upload.sync_chunk {
            Some(_) => {
                let read = self.reads.before_commit(target.directory);
                Some(resolve_optimistically(&self.pool, &target, prepared, read).await?)
            }
            None => None,
        };
        let mut tx = self.pool.begin_with(self.begin_commit.clone()).await?;
        let chunk_count = upload.chunks.len() + usize::from(upload.sync_chunk.is_some());
        insert_source(
            &mut tx,
            "INSERT INTO sources (id, organization_id, directory_id, status, filename, byte_size, sha256, object_key, encoding, delimiter, bom_len, columns, max_field_bytes, default_region, total_rows, chunk_count, created_ms, updated_ms, dry_run, seq, owned_identities, compression, received_bytes)
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16, $17, $18, 0, $19, $20)",
            s,
            chunk_count,
            Some(upload.seq),
        )
        .await?;
        let mut queued = Vec::with_capacity(upload.chunks.len());
        for chunk in upload.chunks {
            queued.push(ChunkRef {
                directory_id: s.directory_id,
                source_id: s.id,
                chunk_id: insert_chunk(
                    &mut tx,
                    s.directory_id,
                    s.id,
                    chunk,
                    "pending",
                    upload.trace,
                )
                .await?,
                attempt: 0,
                traceparent: upload.trace.traceparent.map(str::to_owned),
                tracestate: upload.trace.tracestate.map(str::to_owned),
                takeover: false,
            });
        }
        match (upload.sync_chunk, optimistic) {
            (Some(chunk), Some(optimistic)) => {
                insert_chunk(&mut tx, s.directory_id, s.id, chunk, "done", upload.trace).await?;
                let (applied, owned) =
                    apply_results(&mut tx, &target, prepared, optimistic, &self.pause).await?;
                self.reads.after_commit(target.directory, owned);
                let sole = upload.chunks.is_empty();
                advance_source(&mut tx, &target, &applied, owned, 1, sole).await?;
            }
            _ if chunk_count == 0 => {
                let none = Applied {
                    accepted: 0,
                    failed: 0,
                    warnings: 0,
                };
                advance_source(&mut tx, &target, &none, 0, 0, true).await?;
            }
            _ => {}
        }
        let source = load_source(&mut tx, s.directory_id, s.id).await?;
        complete_key(&mut tx, upload.idempotency, &source).await?;
        link_resumable(&mut tx, upload.resumable, &source).await?;
        close_admission(&mut tx, upload.admission).await?;
        tx.commit().await?;
        Ok((source, queued))
    }

    pub(super) async fn try_commit_slice(
        &self,
        lease: &Lease,
        prepared: &mut Prepared,
        end: SliceEnd,
    ) -> StoreResult<Committed> {
        let source = load_source(
            &mut *self.pool.acquire().await?,
            lease.directory_id,
            lease.source_id,
        )
        .await?;
        let target = &Target::of(self, &source);
        let read = self.reads.before_commit(target.directory);
        let optimistic = resolve_optimistically(&self.pool, target, prepared, read).await?;
        let mut tx = self.pool.begin_with(self.begin_commit.clone()).await?;
        // The row lock fences a concurrent takeover: whoever holds it decides.
        let held = "SELECT 1 FROM chunks c JOIN sources s ON s.directory_id = c.directory_id AND s.id = c.source_id
             WHERE c.directory_id = $1 AND c.id = $2 AND c.lease_token = $3 AND c.state = 'running' AND s.status IN ('pending', 'processing')
             FOR UPDATE OF c";
        if !lease_held(&mut tx, held, lease).await? {
            return Ok(Committed::LeaseLost);
        }
        let (applied, owned) =
            apply_results(&mut tx, target, prepared, optimistic, &self.pause).await?;
        self.reads.after_commit(target.directory, owned);
        let chunks_done = end_slice(&mut tx, lease, end).await?;
        let completed =
            advance_source(&mut tx, target, &applied, owned, chunks_done, false).await?;
        self.pause.committing(lease.chunk_id);
        tx.commit().await?;
        if completed {
            self.analyze_after(&source);
        }
        Ok(Committed::Done {
            source_completed: completed,
        })
    }

    /// Analyzes the tables a large source wrote, once it is complete: the first import into a
    /// directory leaves PostgreSQL's statistics describing it as empty or small (until
    /// autovacuum gets to them; never, where it is off), and the next import into it, a
    /// re-import above all, was planned from them. It costs a sample of each table, once per
    /// large source, on a task of its own: the commit has answered, and on Citus an `ANALYZE`
    /// waits on every node, a node that is down included. A failure only loses the refresh.
    fn analyze_after(&self, source: &Source) {
        if self.analyze_after_rows == 0
            || source.total_rows < self.analyze_after_rows
            || self.analyzing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (pool, analyzing, id) = (self.pool.clone(), self.analyzing.clone(), source.id);
        tokio::spawn(async move {
            if let Err(e) = pool.execute("ANALYZE profiles, identities, records").await {
                tracing::warn!(error = %e, source = %id, "could not analyze the tables a completed source wrote");
            }
            analyzing.store(false, Ordering::Release);
        });
    }

    pub(super) async fn store_slice(
        &self,
        lease: &Lease,
        results: ChunkResults,
        end: SliceEnd,
    ) -> StoreResult<Committed> {
        let mut prepared = prepare(results)?;
        let mut retry = self.retry();
        loop {
            match self.try_commit_slice(lease, &mut prepared, end).await {
                Err(e) => retry.after(e).await?,
                done => return done,
            }
        }
    }

    pub(super) async fn requeue_chunks(
        &self,
        requeue_after: Duration,
        limit: u32,
    ) -> StoreResult<Vec<ChunkRef>> {
        let now = now_ms();
        let dead: Vec<String> = sqlx::query_scalar(DEAD_OWNERS)
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
        // $1 now, $2 the requeue cutoff, $3 the dead lease owners: which chunks are due.
        const DUE: &str = "(c.state = 'pending' AND c.not_before_ms <= $1 AND (c.queued_ms IS NULL OR c.queued_ms < $2))
             OR (c.state = 'running' AND (c.lease_expires_ms < $1 OR c.lease_owner = ANY($3)))";
        // Candidates without a lock (a sharded database cannot lock rows across shards), each
        // directory's then taken in one statement on its shard that checks them again: of two
        // reapers, the second finds them queued already. SKIP LOCKED there: a chunk whose row a
        // commit holds (or a frozen process, until the server ends its session) is left for
        // the next pass instead of holding up the pass. A chunk whose lease is void stays due
        // until someone claims it, as before.
        let candidates = sqlx::query(&format!(
            "SELECT c.directory_id, c.id FROM chunks c
             JOIN sources s ON s.directory_id = c.directory_id AND s.id = c.source_id
             WHERE s.status IN ('pending', 'processing') AND ({DUE})
             ORDER BY s.seq, c.idx LIMIT $4"
        ))
        .bind(now)
        .bind(now - dur_ms(requeue_after))
        .bind(&dead)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut by_directory: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for row in &candidates {
            let dir: Uuid = row.try_get(0)?;
            by_directory.entry(dir).or_default().push(row.try_get(1)?);
        }
        let mut refs = Vec::with_capacity(candidates.len());
        for (dir, ids) in by_directory {
            let rows = sqlx::query(&format!(
                "UPDATE chunks c SET queued_ms = $1 WHERE c.directory_id = $4 AND c.id IN (
                     SELECT c.id FROM chunks c WHERE c.directory_id = $4 AND c.id = ANY($5) AND ({DUE})
                     FOR UPDATE SKIP LOCKED)
                 RETURNING c.directory_id, c.id, c.source_id, c.attempts, c.traceparent, c.tracestate, c.state"
            ))
            .bind(now)
            .bind(now - dur_ms(requeue_after))
            .bind(&dead)
            .bind(dir)
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
            for row in rows {
                let takeover = row.try_get::<String, _>("state")? == "running";
                refs.push(ChunkMessageRow::from_row(&row)?.message(takeover));
            }
        }
        sqlx::query(sql::FORGET_DEAD_PROCESSES)
            .bind(now - FORGET_PROCESSES_AFTER_MS)
            .execute(&self.pool)
            .await?;
        Ok(refs)
    }

    pub(super) async fn read_passes(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, Pass>> {
        let rows = sqlx::query("SELECT id, pass, vtime FROM scheduler_shares WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("id")?,
                    Pass {
                        pass: row.try_get("pass")?,
                        vtime: row.try_get("vtime")?,
                    },
                ))
            })
            .collect()
    }

    pub(super) async fn unqueue_chunks(&self, chunks: &[ChunkRef]) -> StoreResult<()> {
        for chunk in chunks {
            sqlx::query(
                "UPDATE chunks SET queued_ms = NULL WHERE directory_id = $1 AND id = $2 AND state = 'pending'",
            )
            .bind(chunk.directory_id)
            .bind(chunk.chunk_id)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }
}
