//! What the HTTP API reads and writes through in SQLite's own way: claiming idempotency
//! keys, recording uploads, and profiles (the rest of its roles is `shared::store_roles`).

use super::*;

pub(super) async fn identities_of(
    pool: &SqlitePool,
    profiles: &[Uuid],
) -> StoreResult<HashMap<Uuid, Vec<(String, String)>>> {
    let mut conn = pool.acquire().await?;
    identities_in(&mut conn, profiles).await
}

/// [`identities_of`] on one connection: inside an export's read transaction.
async fn identities_in(
    conn: &mut SqliteConnection,
    profiles: &[Uuid],
) -> StoreResult<HashMap<Uuid, Vec<(String, String)>>> {
    let mut out: HashMap<Uuid, Vec<(String, String)>> = HashMap::new();
    for batch in profiles.chunks(IN_BATCH) {
        let sql = format!(
            "SELECT profile_id, kind, value FROM profile_identities WHERE profile_id IN ({}) ORDER BY kind, value",
            placeholders(batch.len())
        );
        let mut query = sqlx::query(&sql);
        for id in batch {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            out.entry(row.try_get("profile_id")?)
                .or_default()
                .push((row.try_get("kind")?, row.try_get("value")?));
        }
    }
    Ok(out)
}

/// What SQLite does its own way in the roles `shared::store_roles` implements.
impl SqliteStore {
    pub(super) async fn store_upload(
        &self,
        upload: NewUpload,
    ) -> StoreResult<(Source, Vec<ChunkRef>)> {
        let sync_prepared = prepare(upload.sync_results)?;
        let mut tx = self.writer.begin().await?;
        let s = &upload.source;
        let chunk_count = upload.chunks.len() + usize::from(upload.sync_chunk.is_some());
        // A NULL seq: SQLite numbers the source itself.
        insert_source(
            &mut tx,
            "INSERT INTO sources (id, organization_id, directory_id, status, filename, byte_size, sha256, object_key, encoding, delimiter, bom_len, columns, max_field_bytes, default_region, total_rows, chunk_count, created_ms, updated_ms, dry_run, seq, compression, received_bytes)
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16, $17, $18, $19, $20)",
            s,
            chunk_count,
            None,
        )
        .await?;
        let trace = Trace {
            traceparent: upload.traceparent.as_deref(),
            tracestate: upload.tracestate.as_deref(),
        };
        let mut queued = Vec::with_capacity(upload.chunks.len());
        for chunk in &upload.chunks {
            queued.push(ChunkRef {
                directory_id: s.directory_id,
                source_id: s.id,
                chunk_id: insert_chunk(&mut tx, s.directory_id, s.id, chunk, "pending", trace)
                    .await?,
                attempt: 0,
                traceparent: upload.traceparent.clone(),
                tracestate: upload.tracestate.clone(),
                takeover: false,
            });
        }
        let source = load_source(&mut tx, s.directory_id, s.id).await?;
        match &upload.sync_chunk {
            Some(chunk) => {
                insert_chunk(&mut tx, s.directory_id, s.id, chunk, "done", trace).await?;
                let applied = apply_results(&mut tx, &source, sync_prepared).await?;
                advance_source(&mut tx, s.directory_id, s.id, &applied, 1).await?;
            }
            None if chunk_count == 0 => {
                let none = Applied {
                    accepted: 0,
                    failed: 0,
                    warnings: 0,
                };
                advance_source(&mut tx, s.directory_id, s.id, &none, 0).await?;
            }
            None => {}
        }
        let source = load_source(&mut tx, s.directory_id, s.id).await?;
        complete_key(&mut tx, upload.idempotency.as_ref(), &source).await?;
        link_resumable(&mut tx, upload.resumable, &source).await?;
        close_admission(&mut tx, upload.admission).await?;
        tx.commit().await?;
        Ok((source, queued))
    }

    pub(super) async fn claim_key(&self, request: KeyRequest<'_>) -> StoreResult<KeyState> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let row = sqlx::query(
            "SELECT k.*, COALESCE(p.expires_ms < ?3, 0) AS owner_dead FROM idempotency_keys k
                 LEFT JOIN processes p ON p.owner = k.owner
                 WHERE k.directory_id = ?1 AND k.key = ?2",
        )
        .bind(request.dir)
        .bind(request.key)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            let held = decide_key(&KeyRow::from_row(&row)?, now, request.in_flight_timeout)?;
            if let Some(held) = held {
                return Ok(held);
            }
        }
        commit_key_claim(
            tx,
            "INSERT OR REPLACE INTO idempotency_keys (organization_id, key, directory_id, state, claim_token, locked_ms, expires_ms, owner) VALUES ($1, $2, $3, 'in_flight', $4, $5, $6, $7)",
            &request,
            now,
        )
        .await
    }

    pub(super) async fn migrate_all(&self) -> StoreResult<()> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.writer)
            .await?;
        Ok(())
    }

    pub(super) async fn widest_failed_row(&self, dir: Uuid, source: Uuid) -> StoreResult<usize> {
        let row = sqlx::query("SELECT COALESCE(MAX(json_array_length(fields)), 0) FROM failed_rows WHERE directory_id = ? AND source_id = ?")
            .bind(dir)
            .bind(source)
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as usize)
    }

    pub(super) async fn cancel_source_once(
        &self,
        org: Uuid,
        dir: Uuid,
        source: Uuid,
    ) -> StoreResult<Cancelled> {
        // One writer at a time: no commit can interleave with this transaction.
        let mut tx = self.writer.begin().await?;
        let Some(row) = sqlx::query_as::<_, SourceRow>(sql::SOURCE)
            .bind(dir)
            .bind(org)
            .bind(source)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Cancelled::NotFound);
        };
        let cancelled = cancel_in(&mut tx, row.try_into()?).await?;
        tx.commit().await?;
        Ok(cancelled)
    }
}

#[async_trait]
impl Profiles for SqliteStore {
    async fn list_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        email: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Profile>> {
        let after = page.after.map_or(0, |c| c.0);
        let rows = match email {
            Some(email) => {
                sqlx::query(
                    "SELECT p.* FROM profiles p JOIN profile_identities i ON i.profile_id = p.id
                     WHERE p.organization_id = ? AND p.directory_id = ? AND i.directory_id = p.directory_id
                       AND i.kind = 'email' AND i.value = ? AND p.seq > ? ORDER BY p.seq LIMIT ?",
                )
                .bind(org)
                .bind(dir)
                .bind(email)
                .bind(after)
                .bind(page_limit(page) + 1)
                .fetch_all(&self.reader)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT * FROM profiles WHERE organization_id = ? AND directory_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                )
                .bind(org)
                .bind(dir)
                .bind(after)
                .bind(page_limit(page) + 1)
                .fetch_all(&self.reader)
                .await?
            }
        };
        let items = rows
            .iter()
            .map(profile_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        let page = paginate(items, page_limit(page) as usize, |(seq, _)| Cursor(*seq, 0));
        let ids: Vec<Uuid> = page.items.iter().map(|(_, p)| p.id).collect();
        let mut identities = identities_of(&self.reader, &ids).await?;
        Ok(Page {
            items: page
                .items
                .into_iter()
                .map(|(_, mut p)| {
                    p.identities = identities.remove(&p.id).unwrap_or_default();
                    p
                })
                .collect(),
            next: page.next,
        })
    }

    async fn get_profile(
        &self,
        org: Uuid,
        dir: Uuid,
        profile: Uuid,
    ) -> StoreResult<Option<Profile>> {
        let row = sqlx::query(
            "SELECT * FROM profiles WHERE organization_id = ? AND directory_id = ? AND id = ?",
        )
        .bind(org)
        .bind(dir)
        .bind(profile)
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let (_, mut p) = profile_from_row(&row)?;
        p.identities = identities_of(&self.reader, &[p.id])
            .await?
            .remove(&p.id)
            .unwrap_or_default();
        Ok(Some(p))
    }

    async fn export_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        filter: &crate::ExportFilter,
    ) -> StoreResult<Option<crate::ProfileExport>> {
        let since = filter.since_ms();
        // One read transaction: in WAL mode its first read fixes the snapshot every later
        // statement sees, while the writer goes on committing.
        let mut tx = self.reader.begin().await?;
        let owned: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM directories WHERE id = ? AND organization_id = ?)",
        )
        .bind(dir)
        .bind(org)
        .fetch_one(&mut *tx)
        .await?;
        if !owned {
            return Ok(None);
        }
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM profiles WHERE organization_id = ?1 AND directory_id = ?2 AND (?3 IS NULL OR updated_ms >= ?3)",
        )
        .bind(org)
        .bind(dir)
        .bind(since)
        .fetch_one(&mut *tx)
        .await?;
        let mut attribute_names: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT a.key FROM profiles p, json_each(p.state, '$.attributes') a
             WHERE p.organization_id = ?1 AND p.directory_id = ?2 AND (?3 IS NULL OR p.updated_ms >= ?3)
               AND json_extract(a.value, '$.value') <> ''",
        )
        .bind(org)
        .bind(dir)
        .bind(since)
        .fetch_all(&mut *tx)
        .await?;
        attribute_names.sort_unstable();
        let batches = futures::stream::try_unfold(
            (Some(tx), 0i64),
            move |(tx, after)| async move {
                let Some(mut tx) = tx else {
                    return StoreResult::Ok(None);
                };
                let rows = sqlx::query(
                "SELECT * FROM profiles WHERE organization_id = ?1 AND directory_id = ?2 AND seq > ?3
                   AND (?4 IS NULL OR updated_ms >= ?4) ORDER BY seq LIMIT ?5",
            )
            .bind(org)
            .bind(dir)
            .bind(after)
            .bind(since)
            .bind(crate::EXPORT_BATCH)
            .fetch_all(&mut *tx)
            .await?;
                let mut batch = Vec::with_capacity(rows.len());
                let mut last = after;
                for row in &rows {
                    let (seq, profile) = profile_from_row(row)?;
                    last = seq;
                    batch.push(profile);
                }
                let ids: Vec<Uuid> = batch.iter().map(|p| p.id).collect();
                let mut identities = identities_in(&mut tx, &ids).await?;
                let batch: Vec<crate::ExportedProfile> = batch
                    .into_iter()
                    .map(|mut p| {
                        p.identities = identities.remove(&p.id).unwrap_or_default();
                        p.into()
                    })
                    .collect();
                let tx = if (rows.len() as i64) < crate::EXPORT_BATCH {
                    // The last batch: the snapshot is let go now, not when the stream is dropped.
                    tx.rollback().await?;
                    None
                } else {
                    Some(tx)
                };
                if batch.is_empty() {
                    return Ok(None);
                }
                Ok(Some((batch, (tx, last))))
            },
        );
        Ok(Some(crate::ProfileExport {
            attribute_names,
            count: count as u64,
            batches: Box::pin(batches),
        }))
    }
}
