//! The roles the HTTP API reads and writes through: tenancy, uploads and profiles.

use super::*;

pub(super) async fn identities_of(
    pool: &SqlitePool,
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
        for row in query.fetch_all(pool).await? {
            out.entry(row.try_get("profile_id")?)
                .or_default()
                .push((row.try_get("kind")?, row.try_get("value")?));
        }
    }
    Ok(out)
}

#[async_trait]
impl Tenancy for SqliteStore {
    async fn create_organization(&self, name: &str) -> StoreResult<Organization> {
        let org = Organization {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            created_at: at(now_ms()),
        };
        sqlx::query(sql::INSERT_ORGANIZATION)
            .bind(org.id)
            .bind(&org.name)
            .bind(ms(org.created_at))
            .execute(&self.writer)
            .await?;
        Ok(org)
    }

    async fn organization_exists(&self, org: Uuid) -> StoreResult<bool> {
        Ok(sqlx::query(sql::ORGANIZATION_EXISTS)
            .bind(org)
            .fetch_optional(&self.reader)
            .await?
            .is_some())
    }

    async fn ensure_user(&self, org: Uuid, email: &str) -> StoreResult<Uuid> {
        sqlx::query("INSERT OR IGNORE INTO users (id, organization_id, email, created_ms) VALUES (?, ?, ?, ?)")
            .bind(Uuid::now_v7())
            .bind(org)
            .bind(email)
            .bind(now_ms())
            .execute(&self.writer)
            .await?;
        let row = sqlx::query(sql::USER_BY_EMAIL)
            .bind(org)
            .bind(email)
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get("id")?)
    }

    async fn insert_token(
        &self,
        hash: &[u8],
        org: Uuid,
        user: Uuid,
        expires_at: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        sqlx::query(sql::INSERT_TOKEN)
            .bind(hash)
            .bind(org)
            .bind(user)
            .bind(now_ms())
            .bind(expires_at.map(ms))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn find_token(&self, hash: &[u8]) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query(sql::TOKEN_BY_HASH)
            .bind(hash)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row
            .as_ref()
            .map(TokenRow::from_row)
            .transpose()?
            .map(TokenRecord::from))
    }

    async fn revoke_token(&self, hash: &[u8]) -> StoreResult<bool> {
        let done = sqlx::query(sql::REVOKE_TOKEN)
            .bind(now_ms())
            .bind(hash)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_directory(&self, org: Uuid, name: &str) -> StoreResult<Directory> {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO directories (id, organization_id, name, created_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(org)
        .bind(name)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        let row = sqlx::query("SELECT * FROM directories WHERE id = ?")
            .bind(id)
            .fetch_one(&self.writer)
            .await?;
        directory_from_row(&row)
    }

    async fn get_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        sqlx::query(sql::DIRECTORY)
            .bind(org)
            .bind(dir)
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(directory_from_row)
            .transpose()
    }

    async fn list_directories(
        &self,
        org: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Directory>> {
        let rows = sqlx::query(sql::DIRECTORIES_PAGE)
            .bind(org)
            .bind(page.after.map_or(0, |c| c.0))
            .bind(page_limit(page) + 1)
            .fetch_all(&self.reader)
            .await?;
        let items = rows
            .iter()
            .map(|r| Ok((r.try_get::<i64, _>("seq")?, directory_from_row(r)?)))
            .collect::<StoreResult<Vec<_>>>()?;
        let page = paginate(items, page_limit(page) as usize, |(seq, _)| Cursor(*seq, 0));
        Ok(Page {
            items: page.items.into_iter().map(|(_, d)| d).collect(),
            next: page.next,
        })
    }

    async fn archive_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        sqlx::query("UPDATE directories SET archived_ms = ? WHERE organization_id = ? AND id = ? AND archived_ms IS NULL")
            .bind(now_ms())
            .bind(org)
            .bind(dir)
            .execute(&self.writer)
            .await?;
        sqlx::query(sql::DIRECTORY)
            .bind(org)
            .bind(dir)
            .fetch_optional(&self.writer)
            .await?
            .as_ref()
            .map(directory_from_row)
            .transpose()
    }
}

#[async_trait]
impl Uploads for SqliteStore {
    async fn claim_idempotency_key(
        &self,
        org: Uuid,
        key: &str,
        dir: Uuid,
        owner: &str,
        ttl: Duration,
        in_flight_timeout: Duration,
    ) -> StoreResult<KeyState> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let row = sqlx::query(
            "SELECT k.*, COALESCE(p.expires_ms < ?3, 0) AS owner_dead FROM idempotency_keys k
                 LEFT JOIN processes p ON p.owner = k.owner
                 WHERE k.organization_id = ?1 AND k.key = ?2",
        )
        .bind(org)
        .bind(key)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            if let Some(held) = decide_key(&KeyRow::from_row(&row)?, now, in_flight_timeout)? {
                return Ok(held);
            }
        }
        let claim = IdempotencyClaim {
            organization_id: org,
            key: key.to_owned(),
            token: Uuid::new_v4(),
        };
        sqlx::query(
            "INSERT OR REPLACE INTO idempotency_keys (organization_id, key, directory_id, state, claim_token, locked_ms, expires_ms, owner) VALUES (?, ?, ?, 'in_flight', ?, ?, ?, ?)",
        )
        .bind(org)
        .bind(key)
        .bind(dir)
        .bind(claim.token)
        .bind(now)
        .bind(now + dur_ms(ttl))
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(KeyState::Claimed(claim))
    }

    async fn release_idempotency_key(&self, claim: &IdempotencyClaim) -> StoreResult<()> {
        sqlx::query(sql::RELEASE_IDEMPOTENCY_KEY)
            .bind(claim.organization_id)
            .bind(&claim.key)
            .bind(claim.token)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn commit_upload(&self, upload: NewUpload) -> StoreResult<(Source, Vec<ChunkRef>)> {
        let sync_prepared = prepare(upload.sync_results)?;
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let s = &upload.source;
        let chunk_count = upload.chunks.len() + usize::from(upload.sync_chunk.is_some());
        sqlx::query(
            "INSERT INTO sources (id, organization_id, directory_id, status, filename, byte_size, sha256, object_key, encoding, delimiter, bom_len, columns, max_field_bytes, default_region, total_rows, chunk_count, created_ms, updated_ms, dry_run)
             VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id)
        .bind(s.organization_id)
        .bind(s.directory_id)
        .bind(&s.filename)
        .bind(s.byte_size as i64)
        .bind(&s.sha256)
        .bind(&s.object_key)
        .bind(s.dialect.encoding.as_str())
        .bind(i64::from(s.dialect.delimiter))
        .bind(s.dialect.bom_len as i64)
        .bind(serde_json::to_string(&s.columns)?)
        .bind(s.max_field_bytes as i64)
        .bind(&s.default_region)
        .bind(s.total_rows as i64)
        .bind(chunk_count as i64)
        .bind(now)
        .bind(now)
        .bind(s.dry_run)
        .execute(&mut *tx)
        .await?;
        let trace = Trace {
            traceparent: upload.traceparent.as_deref(),
            tracestate: upload.tracestate.as_deref(),
        };
        let mut queued = Vec::with_capacity(upload.chunks.len());
        for chunk in &upload.chunks {
            queued.push(ChunkRef {
                source_id: s.id,
                chunk_id: insert_chunk(&mut tx, s.id, chunk, "pending", trace).await?,
                attempt: 0,
                traceparent: upload.traceparent.clone(),
                tracestate: upload.tracestate.clone(),
            });
        }
        let source = load_source(&mut tx, s.id).await?;
        match &upload.sync_chunk {
            Some(chunk) => {
                insert_chunk(&mut tx, s.id, chunk, "done", trace).await?;
                let applied = apply_results(&mut tx, &source, sync_prepared).await?;
                advance_source(&mut tx, s.id, &applied, 1).await?;
            }
            None if chunk_count == 0 => {
                let none = Applied {
                    accepted: 0,
                    failed: 0,
                    warnings: 0,
                };
                advance_source(&mut tx, s.id, &none, 0).await?;
            }
            None => {}
        }
        let source = load_source(&mut tx, s.id).await?;
        if let Some(claim) = &upload.idempotency {
            let receipt = UploadReceipt::of(&source);
            let done = sqlx::query(sql::IDEMPOTENCY_COMPLETED)
                .bind(&source.sha256)
                .bind(source.id)
                .bind(serde_json::to_string(&receipt)?)
                .bind(claim.organization_id)
                .bind(&claim.key)
                .bind(claim.token)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::Conflict(
                    "the idempotency key was taken over by another request".into(),
                ));
            }
        }
        tx.commit().await?;
        Ok((source, queued))
    }

    async fn get_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Option<Source>> {
        sqlx::query(sql::SOURCE)
            .bind(org)
            .bind(dir)
            .bind(source)
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(source_from_row)
            .transpose()
    }

    async fn list_sources(
        &self,
        org: Uuid,
        dir: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Source>> {
        let rows = sqlx::query(sql::SOURCES_PAGE)
            .bind(org)
            .bind(dir)
            .bind(page.after.map_or(i64::MAX, |c| c.0))
            .bind(page_limit(page) + 1)
            .fetch_all(&self.reader)
            .await?;
        let items = rows
            .iter()
            .map(source_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page_limit(page) as usize, |s| {
            Cursor(s.seq, 0)
        }))
    }

    async fn list_issues(
        &self,
        org: Uuid,
        dir: Uuid,
        source: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<RowIssue>> {
        let (after_row, after_id) = page.after.map_or((0, 0), |c| (c.0, c.1));
        let rows = sqlx::query(
            "SELECT i.* FROM row_issues i JOIN sources s ON s.id = i.source_id
             WHERE s.organization_id = ? AND s.directory_id = ? AND i.source_id = ?
               AND (i.row_number > ? OR (i.row_number = ? AND i.id > ?))
             ORDER BY i.row_number, i.id LIMIT ?",
        )
        .bind(org)
        .bind(dir)
        .bind(source)
        .bind(after_row)
        .bind(after_row)
        .bind(after_id)
        .bind(page_limit(page) + 1)
        .fetch_all(&self.reader)
        .await?;
        let items = rows
            .iter()
            .map(|r| {
                let row = IssueRow::from_row(r)?;
                Ok((row.id, RowIssue::from(row)))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let page = paginate(items, page_limit(page) as usize, |(id, i)| {
            Cursor(i.row_number as i64, *id)
        });
        Ok(Page {
            items: page.items.into_iter().map(|(_, i)| i).collect(),
            next: page.next,
        })
    }

    async fn failed_row_width(&self, source: Uuid) -> StoreResult<usize> {
        let row = sqlx::query("SELECT COALESCE(MAX(json_array_length(fields)), 0) FROM failed_rows WHERE source_id = ?")
            .bind(source)
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as usize)
    }

    async fn failed_rows(
        &self,
        source: Uuid,
        after_row: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredFailedRow>> {
        let rows = sqlx::query(sql::FAILED_ROWS_PAGE)
            .bind(source)
            .bind(after_row as i64)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| FailedRowRow::from_row(r)?.try_into())
            .collect()
    }

    async fn retry_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Retried> {
        let mut tx = self.writer.begin().await?;
        let Some(row) = sqlx::query(sql::SOURCE)
            .bind(org)
            .bind(dir)
            .bind(source)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Retried::NotFound);
        };
        let found = source_from_row(&row)?;
        if found.status != SourceStatus::Failed {
            return Ok(Retried::NotFailed(found));
        }
        let chunks = sqlx::query(
            "UPDATE chunks SET state = 'pending', attempts = 0, lease_owner = NULL, lease_token = NULL, lease_expires_ms = NULL,
                 queued_ms = NULL, not_before_ms = 0, last_error = NULL, transient_since_ms = NULL
             WHERE source_id = ?1 AND state = 'failed'
             RETURNING id, traceparent, tracestate",
        )
        .bind(source)
        .fetch_all(&mut *tx)
        .await?;
        if chunks.is_empty() {
            return Ok(Retried::NothingToRetry(found));
        }
        sqlx::query(
            "UPDATE sources SET status = 'processing', error_code = NULL, error_message = NULL, completed_ms = NULL, updated_ms = ?2
             WHERE id = ?1",
        )
        .bind(source)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let retried = load_source(&mut tx, source).await?;
        tx.commit().await?;
        let refs = chunks
            .iter()
            .map(|row| {
                Ok(ChunkRef {
                    source_id: source,
                    chunk_id: row.try_get("id")?,
                    attempt: 0,
                    traceparent: row.try_get("traceparent")?,
                    tracestate: row.try_get("tracestate")?,
                })
            })
            .collect::<StoreResult<_>>()?;
        Ok(Retried::Reopened(retried, refs))
    }

    async fn cancel_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Cancelled> {
        // One writer at a time: no commit can interleave with this transaction.
        let mut tx = self.writer.begin().await?;
        let Some(row) = sqlx::query(sql::SOURCE)
            .bind(org)
            .bind(dir)
            .bind(source)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Cancelled::NotFound);
        };
        let found = source_from_row(&row)?;
        if found.status.is_terminal() {
            return Ok(Cancelled::Terminal(found));
        }
        fail_source_in(
            &mut tx,
            source,
            CANCELLED,
            "the import was cancelled on request; rows committed before the cancel stay",
        )
        .await?;
        let cancelled = load_source(&mut tx, source).await?;
        tx.commit().await?;
        Ok(Cancelled::Cancelled(cancelled))
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
}
