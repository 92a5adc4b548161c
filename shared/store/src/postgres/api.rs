//! The roles the HTTP API reads and writes through: tenancy, uploads and profiles.

use super::*;

/// A profile row selected with its id, directory and [`profile_columns`].
pub(super) fn profile_of_row(row: &PgRow) -> StoreResult<Profile> {
    let (state, identities) = profile_from_row(row)?;
    Ok(Profile {
        id: row.try_get("id")?,
        directory_id: row.try_get("directory_id")?,
        state,
        identities,
        created_at: at(row.try_get("created_ms")?),
        updated_at: at(row.try_get("updated_ms")?),
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

#[async_trait]
impl Tenancy for PgStore {
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
            .execute(&self.pool)
            .await?;
        Ok(org)
    }

    async fn organization_exists(&self, org: Uuid) -> StoreResult<bool> {
        Ok(sqlx::query(sql::ORGANIZATION_EXISTS)
            .bind(org)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    async fn ensure_user(&self, org: Uuid, email: &str) -> StoreResult<Uuid> {
        sqlx::query(
            "INSERT INTO users (id, organization_id, email, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id, email) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(org)
        .bind(email)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(sql::USER_BY_EMAIL)
            .bind(org)
            .bind(email)
            .fetch_one(&self.pool)
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
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn find_token(&self, hash: &[u8]) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query_as::<_, TokenRow>(sql::TOKEN_BY_HASH)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(TokenRecord::from))
    }

    async fn revoke_token(&self, hash: &[u8]) -> StoreResult<bool> {
        let done = sqlx::query(sql::REVOKE_TOKEN)
            .bind(now_ms())
            .bind(hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_directory(&self, org: Uuid, name: &str) -> StoreResult<Directory> {
        let row = sqlx::query_as::<_, DirectoryRow>(
            "INSERT INTO directories (id, organization_id, name, created_ms) VALUES ($1, $2, $3, $4) RETURNING *",
        )
        .bind(Uuid::now_v7())
        .bind(org)
        .bind(name)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.into())
    }

    async fn get_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        Ok(sqlx::query_as::<_, DirectoryRow>(sql::DIRECTORY)
            .bind(org)
            .bind(dir)
            .fetch_optional(&self.pool)
            .await?
            .map(Directory::from))
    }

    async fn list_directories(
        &self,
        org: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Directory>> {
        let rows = sqlx::query_as::<_, DirectoryRow>(sql::DIRECTORIES_PAGE)
            .bind(org)
            .bind(page.after.map_or(0, |c| c.0))
            .bind(page_limit(page) + 1)
            .fetch_all(&self.pool)
            .await?;
        let page = paginate(rows, page_limit(page) as usize, |d| Cursor(d.seq, 0));
        Ok(Page {
            items: page.items.into_iter().map(Directory::from).collect(),
            next: page.next,
        })
    }

    async fn archive_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        let row = sqlx::query_as::<_, DirectoryRow>(
            "UPDATE directories SET archived_ms = COALESCE(archived_ms, $1) WHERE organization_id = $2 AND id = $3 RETURNING *",
        )
        .bind(now_ms())
        .bind(org)
        .bind(dir)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Directory::from))
    }
}

#[async_trait]
impl Uploads for PgStore {
    async fn claim_idempotency_key(
        &self,
        org: Uuid,
        key: &str,
        dir: Uuid,
        owner: &str,
        ttl: Duration,
        in_flight_timeout: Duration,
    ) -> StoreResult<KeyState> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let claim = IdempotencyClaim {
            organization_id: org,
            key: key.to_owned(),
            token: Uuid::new_v4(),
        };
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (organization_id, key, directory_id, state, claim_token, locked_ms, expires_ms, owner)
             VALUES ($1, $2, $3, 'in_flight', $4, $5, $6, $7) ON CONFLICT DO NOTHING",
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
        if inserted.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(KeyState::Claimed(claim));
        }
        // Someone holds or held the key: decide under its row lock.
        let row = sqlx::query(&format!(
            "SELECT k.*, {OWNER_DEAD} AS owner_dead FROM idempotency_keys k
             LEFT JOIN processes p ON p.owner = k.owner
             WHERE k.organization_id = $1 AND k.key = $3 FOR UPDATE OF k"
        ))
        .bind(org)
        .bind(now)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(held) = decide_key(&KeyRow::from_row(&row)?, now, in_flight_timeout)? {
            return Ok(held);
        }
        sqlx::query(
            "UPDATE idempotency_keys SET directory_id = $3, state = 'in_flight', claim_token = $4, sha256 = NULL, source_id = NULL,
                 response = NULL, locked_ms = $5, expires_ms = $6, owner = $7
             WHERE organization_id = $1 AND key = $2",
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
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn commit_upload(&self, upload: NewUpload) -> StoreResult<(Source, Vec<ChunkRef>)> {
        let NewUpload {
            source,
            sync_chunk,
            sync_results,
            chunks,
            idempotency,
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
            trace: Trace {
                traceparent: traceparent.as_deref(),
                tracestate: tracestate.as_deref(),
            },
        };
        let mut retry = Retry::new(self.retry_for);
        loop {
            match self.try_commit_upload(&upload, &mut prepared).await {
                Err(e) => retry.after(e).await?,
                done => return done,
            }
        }
    }

    async fn get_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Option<Source>> {
        sqlx::query(sql::SOURCE)
            .bind(org)
            .bind(dir)
            .bind(source)
            .fetch_optional(&self.pool)
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
            .fetch_all(&self.pool)
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
        let rows = sqlx::query_as::<_, IssueRow>(
            "SELECT i.* FROM row_issues i JOIN sources s ON s.id = i.source_id
             WHERE s.organization_id = $1 AND s.directory_id = $2 AND i.source_id = $3
               AND (i.row_number, i.id) > ($4, $5)
             ORDER BY i.row_number, i.id LIMIT $6",
        )
        .bind(org)
        .bind(dir)
        .bind(source)
        .bind(after_row)
        .bind(after_id)
        .bind(page_limit(page) + 1)
        .fetch_all(&self.pool)
        .await?;
        let items: Vec<(i64, RowIssue)> = rows
            .into_iter()
            .map(|r| (r.id, RowIssue::from(r)))
            .collect();
        let page = paginate(items, page_limit(page) as usize, |(id, i)| {
            Cursor(i.row_number as i64, *id)
        });
        Ok(Page {
            items: page.items.into_iter().map(|(_, i)| i).collect(),
            next: page.next,
        })
    }

    async fn failed_row_width(&self, source: Uuid) -> StoreResult<usize> {
        let row = sqlx::query("SELECT COALESCE(MAX(json_array_length(fields::json)), 0)::BIGINT FROM failed_rows WHERE source_id = $1")
            .bind(source)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as usize)
    }

    async fn failed_rows(
        &self,
        source: Uuid,
        after_row: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredFailedRow>> {
        let rows = sqlx::query_as::<_, FailedRowRow>(sql::FAILED_ROWS_PAGE)
            .bind(source)
            .bind(after_row as i64)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(StoredFailedRow::try_from).collect()
    }

    async fn retry_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Retried> {
        self.retrying(|| Box::pin(self.retry_source_once(org, dir, source)))
            .await
    }

    async fn cancel_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Cancelled> {
        self.retrying(|| Box::pin(self.cancel_source_once(org, dir, source)))
            .await
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
}
