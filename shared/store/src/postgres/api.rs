//! What the HTTP API reads and writes through in PostgreSQL's own way: claiming idempotency
//! keys, recording uploads, and profiles (the rest of its roles is `shared::store_roles`).

use futures::StreamExt as _;

use super::*;

/// A profile row selected with its id, directory and [`profile_columns`].
pub(super) fn profile_of_row(row: &PgRow) -> StoreResult<Profile> {
    let (state, identities) = profile_from_row(row)?;
    let columns = ProfileColumnsAt::of(row)?;
    Ok(Profile {
        id: row.try_get("id")?,
        directory_id: row.try_get("directory_id")?,
        state,
        identities,
        created_at: at(row.try_get(columns.created_ms())?),
        updated_at: at(row.try_get(columns.updated_ms())?),
    })
}

/// Profiles are paged by their id, which is time-ordered: the cursor is its two halves.
pub(super) fn profile_cursor(id: Uuid) -> Cursor {
    let (hi, lo) = id.as_u64_pair();
    Cursor(hi as i64, lo as i64)
}

pub(super) fn profile_after(cursor: Option<Cursor>) -> Uuid {
    cursor.map_or(Uuid::nil(), |Cursor(hi, lo)| {
        Uuid::from_u64_pair(hi as u64, lo as u64)
    })
}

/// What PostgreSQL does its own way in the roles `shared::store_roles` implements.
impl PgStore {
    pub(super) async fn claim_key(&self, request: KeyRequest<'_>) -> StoreResult<KeyState> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let claim = request.claim();
        let inserted = write_key_claim(
            &mut tx,
            "INSERT INTO idempotency_keys (organization_id, key, directory_id, state, claim_token, locked_ms, expires_ms, owner)
             VALUES ($1, $2, $3, 'in_flight', $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            &request,
            &claim,
            now,
        )
        .await?;
        if inserted == 1 {
            tx.commit().await?;
            return Ok(KeyState::Claimed(claim));
        }
        // Someone holds or held the key: decide under its row lock.
        let row = sqlx::query(
            "SELECT * FROM idempotency_keys WHERE directory_id = $1 AND key = $2 FOR UPDATE",
        )
        .bind(request.dir)
        .bind(request.key)
        .fetch_one(&mut *tx)
        .await?;
        let mut held = KeyRow::from_row(&row)?;
        if let Some(owner) = row.try_get::<Option<String>, _>("owner")? {
            held.owner_dead = self.owner_dead(&mut tx, &owner, now).await?;
        }
        if let Some(held) = decide_key(&held, now, request.in_flight_timeout)? {
            return Ok(held);
        }
        commit_key_claim(
            tx,
            "UPDATE idempotency_keys SET organization_id = $1, state = 'in_flight', claim_token = $4, sha256 = NULL, source_id = NULL,
                 response = NULL, locked_ms = $5, expires_ms = $6, owner = $7
             WHERE directory_id = $3 AND key = $2",
            &request,
            now,
        )
        .await
    }

    pub(super) async fn store_upload(
        &self,
        upload: NewUpload,
    ) -> StoreResult<(Source, Vec<ChunkRef>)> {
        let NewUpload {
            source,
            sync_chunk,
            sync_results,
            chunks,
            idempotency,
            resumable,
            admission,
            traceparent,
            tracestate,
        } = upload;
        let mut prepared = prepare(sync_results)?;
        // The source's sequence number versions its profile writes, which the optimistic
        // resolution needs before the transaction that inserts the source.
        let seq: i64 = sqlx::query("SELECT nextval(pg_get_serial_sequence('sources', 'seq'))")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        let upload = UploadParts {
            source: &source,
            seq,
            sync_chunk: sync_chunk.as_ref(),
            chunks: &chunks,
            idempotency: idempotency.as_ref(),
            resumable,
            admission,
            trace: Trace {
                traceparent: traceparent.as_deref(),
                tracestate: tracestate.as_deref(),
            },
        };
        let mut retry = self.retry();
        loop {
            match self.try_commit_upload(&upload, &mut prepared).await {
                Err(e) => retry.after(e).await?,
                done => return done,
            }
        }
    }

    /// Whether the process `owner` stopped heartbeating, read apart from the row it holds:
    /// `processes` stays on the coordinator of a sharded database.
    pub(super) async fn owner_dead(
        &self,
        conn: &mut PgConnection,
        owner: &str,
        now: i64,
    ) -> StoreResult<bool> {
        Ok(sqlx::query_scalar(OWNER_DEAD)
            .bind(owner)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?
            .unwrap_or(false))
    }

    pub(super) async fn widest_failed_row(&self, dir: Uuid, source: Uuid) -> StoreResult<usize> {
        let row = sqlx::query("SELECT COALESCE(MAX(json_array_length(fields::json)), 0)::BIGINT FROM failed_rows WHERE directory_id = $1 AND source_id = $2")
            .bind(dir)
            .bind(source)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as usize)
    }
}

#[async_trait]
impl Profiles for PgStore {
    async fn list_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        email: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Profile>> {
        let only = match email {
            Some(email) => {
                let identity = ("email", email.to_owned());
                let mut conn = self.pool.acquire().await?;
                let (owners, _) = locate(&mut conn, self.keys, dir, vec![identity]).await?;
                match owners.get("email", email) {
                    Some(owner) => Some(owner),
                    None => {
                        return Ok(Page {
                            items: Vec::new(),
                            next: None,
                        })
                    }
                }
            }
            None => None,
        };
        let rows = sqlx::query(&format!(
            "SELECT p.id, p.directory_id, {columns} FROM profiles p
             WHERE p.directory_id = $2 AND p.id > $3 AND ($4::uuid IS NULL OR p.id = $4)
               AND EXISTS (SELECT 1 FROM directories d WHERE d.id = $2 AND d.organization_id = $1)
             ORDER BY p.id LIMIT $5",
            columns = profile_columns()
        ))
        .bind(org)
        .bind(dir)
        .bind(profile_after(page.after))
        .bind(only)
        .bind(page_limit(page) + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(profile_of_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page_limit(page) as usize, |p| {
            profile_cursor(p.id)
        }))
    }

    async fn get_profile(
        &self,
        org: Uuid,
        dir: Uuid,
        profile: Uuid,
    ) -> StoreResult<Option<Profile>> {
        let row = sqlx::query(&format!(
            "SELECT p.id, p.directory_id, {columns} FROM profiles p
             WHERE p.directory_id = $2 AND p.id = $3
               AND EXISTS (SELECT 1 FROM directories d WHERE d.id = $2 AND d.organization_id = $1)",
            columns = profile_columns()
        ))
        .bind(org)
        .bind(dir)
        .bind(profile)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(profile_of_row).transpose()
    }

    async fn export_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        filter: &crate::ExportFilter,
    ) -> StoreResult<Option<crate::ProfileExport>> {
        let since = filter.since_ms();
        let mut tx = self.pool.begin().await?;
        // One snapshot for every statement below, the batches included: an import committing
        // meanwhile is in all of it or none of it. On Citus a directory's rows live on one
        // shard, whose node runs the transaction at the coordinator's isolation level.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        // The backend's pid, for cancelling the export's query should its reader go away.
        let (owned, backend): (bool, i32) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM directories WHERE id = $1 AND organization_id = $2), pg_backend_pid()",
        )
        .bind(dir)
        .bind(org)
        .fetch_one(&mut *tx)
        .await?;
        if !owned {
            return Ok(None);
        }
        // The count and the attribute names in one round trip, but two scans: one pass (every
        // row joined with its attributes, counting and collecting) took 0.9 s for a million
        // profiles without attributes, the two scans 0.17 s.
        let (count, mut attribute_names): (i64, Vec<String>) = sqlx::query_as(
            "SELECT count(*),
                    (SELECT COALESCE(array_agg(DISTINCT a.key), '{}')
                     FROM profiles p CROSS JOIN LATERAL jsonb_each(p.attributes::jsonb) AS a(key, value)
                     WHERE p.directory_id = $1 AND p.attributes IS NOT NULL AND a.value->>'value' <> ''
                       AND ($2::BIGINT IS NULL OR p.updated_ms >= $2))
             FROM profiles WHERE directory_id = $1 AND ($2::BIGINT IS NULL OR updated_ms >= $2)",
        )
        .bind(dir)
        .bind(since)
        .fetch_one(&mut *tx)
        .await?;
        attribute_names.sort_unstable();
        // One query streamed to the end rather than a query per batch: PostgreSQL produces
        // rows while this side decodes and encodes the ones before, instead of the two taking
        // turns. A task owns the transaction; the channel's bound is the back-pressure, which
        // reaches PostgreSQL through the socket.
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let sql = format!(
            "SELECT {columns} FROM profiles p
             WHERE p.directory_id = $1 AND ($2::BIGINT IS NULL OR p.updated_ms >= $2)
             ORDER BY p.id",
            columns = export_columns()
        );
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let mut tx = tx;
            let finished = {
                let mut rows = sqlx::query(&sql)
                    .bind(dir)
                    .bind(since)
                    .fetch(&mut *tx)
                    .chunks(crate::EXPORT_BATCH as usize);
                loop {
                    let Some(chunk) = rows.next().await else {
                        break true;
                    };
                    let batch = chunk
                        .into_iter()
                        .map(|row| exported_from_row(&row?))
                        .collect::<StoreResult<Vec<_>>>();
                    let failed = batch.is_err();
                    if sender.send(batch).await.is_err() || failed {
                        break false;
                    }
                }
            };
            if !finished {
                // The reader went away mid-stream: stop the query rather than have the
                // connection's next user read the rest of its rows off it. The transaction is
                // still this task's, so the backend runs nothing of anyone else's.
                if let Err(e) = sqlx::query("SELECT pg_cancel_backend($1)")
                    .bind(backend)
                    .execute(&pool)
                    .await
                {
                    tracing::warn!(error = %e, "could not cancel an abandoned export's query");
                }
            }
            if let Err(e) = tx.rollback().await {
                tracing::debug!(error = %e, "an export's snapshot ended with an error");
            }
        });
        let mut receiver = receiver;
        let batches = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
        Ok(Some(crate::ProfileExport {
            attribute_names,
            count: count as u64,
            batches: Box::pin(batches),
        }))
    }
}
