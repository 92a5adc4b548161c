//! The role implementations both SQL backends share; see the parent module for why a macro.

/// The role implementations both backends share, expanded into a backend's `mod.rs` for its
/// `store` type, whose `read` pool serves reads and `write` pool writes (one pool in
/// PostgreSQL). The module has in scope what its own code uses: the model, `Uuid`,
/// `Duration`, `DateTime`/`Utc`, the role traits, `async_trait`, `FromRow`/`Row`, its
/// `commit` steps (`shared::transaction_steps`) and `webhooks`, and a `retrying` method
/// on the store.
///
/// The backend writes the rest itself, as methods on the store: `claim_key`, `store_upload`,
/// `cancel_source_once` and `widest_failed_row` (Uploads); `store_slice`, `requeue_chunks`,
/// `unqueue_chunks` and `read_passes` (Chunks); `migrate_all` (Database); and the whole of Profiles. The arguments are the statements that lock in
/// PostgreSQL and not in SQLite (one writer at a time): `lock_source` reads a source to
/// reopen, `lock_chunk` a chunk to claim (`$1` its directory, `$2` itself), `lock_lease` a
/// chunk to release; and `owner_dead`, whether the process `$1` stopped heartbeating, given
/// `$2` now. Heartbeats are read apart from the chunk or key they vouch for: on a sharded
/// database `processes` stays on the coordinator, which a statement about one shard cannot
/// join. `ready_chunks` reads, given `$1` now, every directory's oldest chunk ready to run with
/// its organization and that one's weight override (`organization_id, directory_id, id,
/// source_id, attempts, traceparent, tracestate, row_count, created_ms, weight`): what the
/// fair scheduler chooses among.
macro_rules! store_roles {
    (
        store: $store:ty,
        backend: $backend:literal,
        read: $read:ident,
        write: $write:ident,
        lock_source: $lock_source:expr,
        lock_chunk: $lock_chunk:expr,
        lock_lease: $lock_lease:expr,
        owner_dead: $owner_dead:expr,
        ready_chunks: $ready_chunks:expr $(,)?
    ) => {
        #[async_trait]
        impl Database for $store {
            fn backend(&self) -> &'static str {
                $backend
            }

            async fn migrate(&self) -> StoreResult<()> {
                self.migrate_all().await
            }

            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.$read).await?;
                Ok(())
            }
        }

        #[async_trait]
        impl Liveness for $store {
            async fn heartbeat(&self, owner: &str, valid_for: Duration) -> StoreResult<()> {
                let now = $crate::rows::now_ms();
                sqlx::query($crate::sql::HEARTBEAT)
                    .bind(owner)
                    .bind(now)
                    .bind(now + $crate::rows::dur_ms(valid_for))
                    .execute(&self.$write)
                    .await?;
                Ok(())
            }

            async fn retire(&self, owner: &str) -> StoreResult<()> {
                sqlx::query($crate::sql::RETIRE_PROCESS)
                    .bind(owner)
                    .execute(&self.$write)
                    .await?;
                Ok(())
            }
        }

        #[async_trait]
        impl Tenancy for $store {
            async fn create_organization(&self, name: &str) -> StoreResult<Organization> {
                let org = Organization {
                    id: Uuid::now_v7(),
                    name: name.to_owned(),
                    created_at: $crate::rows::at($crate::rows::now_ms()),
                };
                sqlx::query($crate::sql::INSERT_ORGANIZATION)
                    .bind(org.id)
                    .bind(&org.name)
                    .bind($crate::rows::ms(org.created_at))
                    .execute(&self.$write)
                    .await?;
                Ok(org)
            }

            async fn organization_exists(&self, org: Uuid) -> StoreResult<bool> {
                Ok(sqlx::query($crate::sql::ORGANIZATION_EXISTS)
                    .bind(org)
                    .fetch_optional(&self.$read)
                    .await?
                    .is_some())
            }

            async fn ensure_user(&self, org: Uuid, email: &str) -> StoreResult<Uuid> {
                sqlx::query($crate::sql::INSERT_USER)
                    .bind(Uuid::now_v7())
                    .bind(org)
                    .bind(email)
                    .bind($crate::rows::now_ms())
                    .execute(&self.$write)
                    .await?;
                // From the writer: the reader may not see the insert yet.
                let row = sqlx::query($crate::sql::USER_BY_EMAIL)
                    .bind(org)
                    .bind(email)
                    .fetch_one(&self.$write)
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
                sqlx::query($crate::sql::INSERT_TOKEN)
                    .bind(hash)
                    .bind(org)
                    .bind(user)
                    .bind($crate::rows::now_ms())
                    .bind(expires_at.map($crate::rows::ms))
                    .execute(&self.$write)
                    .await?;
                Ok(())
            }

            async fn find_token(&self, hash: &[u8]) -> StoreResult<Option<TokenRecord>> {
                let row = sqlx::query_as::<_, $crate::rows::TokenRow>($crate::sql::TOKEN_BY_HASH)
                    .bind(hash)
                    .fetch_optional(&self.$read)
                    .await?;
                Ok(row.map(TokenRecord::from))
            }

            async fn revoke_token(&self, hash: &[u8]) -> StoreResult<bool> {
                let done = sqlx::query($crate::sql::REVOKE_TOKEN)
                    .bind($crate::rows::now_ms())
                    .bind(hash)
                    .execute(&self.$write)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn create_directory(&self, org: Uuid, name: &str) -> StoreResult<Directory> {
                let row =
                    sqlx::query_as::<_, $crate::rows::DirectoryRow>($crate::sql::INSERT_DIRECTORY)
                        .bind(Uuid::now_v7())
                        .bind(org)
                        .bind(name)
                        .bind($crate::rows::now_ms())
                        .fetch_one(&self.$write)
                        .await?;
                Ok(row.into())
            }

            async fn get_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
                Ok(
                    sqlx::query_as::<_, $crate::rows::DirectoryRow>($crate::sql::DIRECTORY)
                        .bind(org)
                        .bind(dir)
                        .fetch_optional(&self.$read)
                        .await?
                        .map(Directory::from),
                )
            }

            async fn list_directories(
                &self,
                org: Uuid,
                page: &PageRequest,
            ) -> StoreResult<Page<Directory>> {
                let limit = $crate::rows::page_limit(page);
                let rows =
                    sqlx::query_as::<_, $crate::rows::DirectoryRow>($crate::sql::DIRECTORIES_PAGE)
                        .bind(org)
                        .bind(page.after.map_or(0, |c| c.0))
                        .bind(limit + 1)
                        .fetch_all(&self.$read)
                        .await?;
                let page = $crate::rows::paginate(rows, limit as usize, |d| Cursor(d.seq, 0));
                Ok(Page {
                    items: page.items.into_iter().map(Directory::from).collect(),
                    next: page.next,
                })
            }

            async fn archive_directory(
                &self,
                org: Uuid,
                dir: Uuid,
            ) -> StoreResult<Option<Directory>> {
                let row =
                    sqlx::query_as::<_, $crate::rows::DirectoryRow>($crate::sql::ARCHIVE_DIRECTORY)
                        .bind($crate::rows::now_ms())
                        .bind(org)
                        .bind(dir)
                        .fetch_optional(&self.$write)
                        .await?;
                Ok(row.map(Directory::from))
            }
        }

        #[async_trait]
        impl Uploads for $store {
            async fn claim_idempotency_key(
                &self,
                org: Uuid,
                key: &str,
                dir: Uuid,
                owner: &str,
                ttl: Duration,
                in_flight_timeout: Duration,
            ) -> StoreResult<KeyState> {
                // The organization's keys live per directory; this says which directory a key
                // is in use on, so that a reuse on another one is refused.
                let now = $crate::rows::now_ms();
                let scoped = sqlx::query($crate::sql::SCOPE_KEY)
                    .bind(org)
                    .bind(key)
                    .bind(dir)
                    .bind(now + $crate::rows::dur_ms(ttl))
                    .bind(now)
                    .fetch_optional(&self.$write)
                    .await?;
                if scoped.is_none() {
                    return Ok(KeyState::OtherDirectory);
                }
                self.claim_key($crate::shared::KeyRequest {
                    org,
                    key,
                    dir,
                    owner,
                    ttl,
                    in_flight_timeout,
                })
                .await
            }

            async fn release_idempotency_key(&self, claim: &IdempotencyClaim) -> StoreResult<()> {
                let released = sqlx::query($crate::sql::RELEASE_IDEMPOTENCY_KEY)
                    .bind(claim.directory_id)
                    .bind(&claim.key)
                    .bind(claim.token)
                    .execute(&self.$write)
                    .await?;
                if released.rows_affected() > 0 {
                    sqlx::query($crate::sql::UNSCOPE_KEY)
                        .bind(claim.organization_id)
                        .bind(&claim.key)
                        .bind(claim.directory_id)
                        .execute(&self.$write)
                        .await?;
                }
                Ok(())
            }

            async fn commit_upload(
                &self,
                upload: NewUpload,
            ) -> StoreResult<(Source, Vec<ChunkRef>)> {
                self.store_upload(upload).await
            }

            async fn get_source(
                &self,
                org: Uuid,
                dir: Uuid,
                source: Uuid,
            ) -> StoreResult<Option<Source>> {
                sqlx::query_as::<_, $crate::rows::SourceRow>($crate::sql::SOURCE)
                    .bind(dir)
                    .bind(org)
                    .bind(source)
                    .fetch_optional(&self.$read)
                    .await?
                    .map(TryInto::try_into)
                    .transpose()
            }

            async fn list_sources(
                &self,
                org: Uuid,
                dir: Uuid,
                page: &PageRequest,
            ) -> StoreResult<Page<Source>> {
                let limit = $crate::rows::page_limit(page);
                let rows = sqlx::query_as::<_, $crate::rows::SourceRow>($crate::sql::SOURCES_PAGE)
                    .bind(dir)
                    .bind(org)
                    .bind(page.after.map_or(i64::MAX, |c| c.0))
                    .bind(limit + 1)
                    .fetch_all(&self.$read)
                    .await?;
                let items = rows
                    .into_iter()
                    .map(Source::try_from)
                    .collect::<StoreResult<Vec<_>>>()?;
                Ok($crate::rows::paginate(items, limit as usize, |s| {
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
                let limit = $crate::rows::page_limit(page);
                let (after_row, after_id) = page.after.map_or((0, 0), |c| (c.0, c.1));
                let rows = sqlx::query_as::<_, $crate::rows::IssueRow>($crate::sql::ISSUES_PAGE)
                    .bind(org)
                    .bind(dir)
                    .bind(source)
                    .bind(after_row)
                    .bind(after_id)
                    .bind(limit + 1)
                    .fetch_all(&self.$read)
                    .await?;
                let items: Vec<(i64, RowIssue)> = rows
                    .into_iter()
                    .map(|r| (r.id, RowIssue::from(r)))
                    .collect();
                let page = $crate::rows::paginate(items, limit as usize, |(id, i)| {
                    Cursor(i.row_number as i64, *id)
                });
                Ok(Page {
                    items: page.items.into_iter().map(|(_, i)| i).collect(),
                    next: page.next,
                })
            }

            async fn failed_row_width(&self, dir: Uuid, source: Uuid) -> StoreResult<usize> {
                self.widest_failed_row(dir, source).await
            }

            async fn failed_rows(
                &self,
                dir: Uuid,
                source: Uuid,
                after_row: u64,
                limit: u32,
            ) -> StoreResult<Vec<StoredFailedRow>> {
                let rows =
                    sqlx::query_as::<_, $crate::rows::FailedRowRow>($crate::sql::FAILED_ROWS_PAGE)
                        .bind(dir)
                        .bind(source)
                        .bind(after_row as i64)
                        .bind(i64::from(limit))
                        .fetch_all(&self.$read)
                        .await?;
                rows.into_iter().map(StoredFailedRow::try_from).collect()
            }

            async fn retry_source(
                &self,
                org: Uuid,
                dir: Uuid,
                source: Uuid,
            ) -> StoreResult<Retried> {
                self.retrying(|| Box::pin(self.retry_source_once(org, dir, source)))
                    .await
            }

            async fn cancel_source(
                &self,
                org: Uuid,
                dir: Uuid,
                source: Uuid,
            ) -> StoreResult<Cancelled> {
                self.retrying(|| Box::pin(self.cancel_source_once(org, dir, source)))
                    .await
            }
        }

        impl $store {
            async fn retry_source_once(
                &self,
                org: Uuid,
                dir: Uuid,
                source: Uuid,
            ) -> StoreResult<Retried> {
                let mut tx = self.$write.begin().await?;
                let Some(row) = sqlx::query_as::<_, $crate::rows::SourceRow>($lock_source)
                    .bind(org)
                    .bind(dir)
                    .bind(source)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(Retried::NotFound);
                };
                let found = Source::try_from(row)?;
                if found.status != SourceStatus::Failed {
                    return Ok(Retried::NotFailed(found));
                }
                let chunks = sqlx::query($crate::sql::REOPEN_CHUNKS)
                    .bind(dir)
                    .bind(source)
                    .fetch_all(&mut *tx)
                    .await?;
                if chunks.is_empty() {
                    return Ok(Retried::NothingToRetry(found));
                }
                sqlx::query($crate::sql::REOPEN_SOURCE)
                    .bind($crate::rows::now_ms())
                    .bind(dir)
                    .bind(source)
                    .execute(&mut *tx)
                    .await?;
                let retried = load_source(&mut tx, dir, source).await?;
                tx.commit().await?;
                let refs = chunks
                    .iter()
                    .map(|row| {
                        Ok(ChunkRef {
                            directory_id: dir,
                            source_id: source,
                            chunk_id: row.try_get("id")?,
                            attempt: 0,
                            traceparent: row.try_get("traceparent")?,
                            tracestate: row.try_get("tracestate")?,
                            takeover: false,
                        })
                    })
                    .collect::<StoreResult<_>>()?;
                Ok(Retried::Reopened(retried, refs))
            }

            async fn claim_chunk_once(
                &self,
                queued: &ChunkRef,
                owner: &str,
                lease_for: Duration,
                max_attempts: u32,
            ) -> StoreResult<Claim> {
                let (dir, chunk) = (queued.directory_id, queued.chunk_id);
                let mut tx = self.$write.begin().await?;
                let now = $crate::rows::now_ms();
                let row = sqlx::query($lock_chunk)
                    .bind(dir)
                    .bind(chunk)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(row) = row else {
                    return Ok(Claim::Nothing);
                };
                let source_id: Uuid = row.try_get("source_id")?;
                let mut found = $crate::rows::ChunkState::from_row(&row)?;
                if let Some(holder) = &found.lease_owner {
                    found.owner_dead = sqlx::query_scalar($owner_dead)
                        .bind(holder)
                        .bind(now)
                        .fetch_optional(&mut *tx)
                        .await?
                        .unwrap_or(false);
                }
                let attempts = found.attempts;
                match $crate::rows::decide_claim(&found, now, max_attempts) {
                    $crate::rows::ClaimDecision::Nothing => return Ok(Claim::Nothing),
                    $crate::rows::ClaimDecision::Busy => return Ok(Claim::Busy),
                    $crate::rows::ClaimDecision::Poison(message) => {
                        fail_source_in(&mut tx, dir, source_id, "chunk_poisoned", &message).await?;
                        tx.commit().await?;
                        return Ok(Claim::Poisoned);
                    }
                    $crate::rows::ClaimDecision::Take(over) => {
                        if let Some(reason) = over {
                            $crate::metrics::METRICS
                                .leases_taken_over
                                .with_label_values(&[reason])
                                .inc();
                        }
                    }
                }
                let token = Uuid::new_v4();
                sqlx::query($crate::sql::TAKE_LEASE)
                    .bind(owner)
                    .bind(token)
                    .bind(now + $crate::rows::dur_ms(lease_for))
                    .bind(dir)
                    .bind(chunk)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query($crate::sql::SOURCE_PROCESSING)
                    .bind(now)
                    .bind(dir)
                    .bind(source_id)
                    .execute(&mut *tx)
                    .await?;
                let spec: ChunkSpec = $crate::rows::ChunkRow::from_row(&row)?.into();
                let source = load_source(&mut tx, dir, source_id).await?;
                tx.commit().await?;
                Ok(Claim::Claimed(Box::new(ChunkWork {
                    lease: Lease {
                        directory_id: dir,
                        chunk_id: chunk,
                        source_id,
                        token,
                        attempt: attempts + 1,
                    },
                    chunk: spec,
                    source,
                })))
            }

            async fn release_chunk_once(
                &self,
                lease: &Lease,
                error: &str,
                transient_for: Option<Duration>,
            ) -> StoreResult<bool> {
                let mut tx = self.$write.begin().await?;
                let Some(row) = sqlx::query($lock_lease)
                    .bind(lease.directory_id)
                    .bind(lease.chunk_id)
                    .bind(lease.token)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(false);
                };
                let release = $crate::rows::decide_release(
                    $crate::rows::now_ms(),
                    lease.attempt,
                    transient_for,
                    row.try_get("transient_since_ms")?,
                );
                sqlx::query($crate::sql::RELEASE_CHUNK)
                    .bind(release.not_before_ms)
                    .bind(error)
                    .bind(i64::from(release.refund))
                    .bind(release.transient_since_ms)
                    .bind(lease.directory_id)
                    .bind(lease.chunk_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn fail_source_once(
                &self,
                dir: Uuid,
                source: Uuid,
                error: &SourceError,
            ) -> StoreResult<()> {
                let mut tx = self.$write.begin().await?;
                fail_source_in(&mut tx, dir, source, &error.code, &error.message).await?;
                tx.commit().await?;
                Ok(())
            }
        }

        #[async_trait]
        impl Chunks for $store {
            async fn claim_chunk(
                &self,
                chunk: &ChunkRef,
                owner: &str,
                lease_for: Duration,
                max_attempts: u32,
            ) -> StoreResult<Claim> {
                self.retrying(|| {
                    Box::pin(self.claim_chunk_once(chunk, owner, lease_for, max_attempts))
                })
                .await
            }

            async fn renew_lease(&self, lease: &Lease, lease_for: Duration) -> StoreResult<bool> {
                let done = sqlx::query($crate::sql::RENEW_LEASE)
                    .bind($crate::rows::now_ms() + $crate::rows::dur_ms(lease_for))
                    .bind(lease.directory_id)
                    .bind(lease.chunk_id)
                    .bind(lease.token)
                    .execute(&self.$write)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn commit_slice(
                &self,
                lease: &Lease,
                results: ChunkResults,
                end: SliceEnd,
            ) -> StoreResult<Committed> {
                self.store_slice(lease, results, end).await
            }

            async fn release_chunk(
                &self,
                lease: &Lease,
                error: &str,
                transient_for: Option<Duration>,
            ) -> StoreResult<bool> {
                self.retrying(|| Box::pin(self.release_chunk_once(lease, error, transient_for)))
                    .await
            }

            async fn fail_source(
                &self,
                dir: Uuid,
                source: Uuid,
                error: SourceError,
            ) -> StoreResult<()> {
                self.retrying(|| Box::pin(self.fail_source_once(dir, source, &error)))
                    .await
            }

            async fn chunks_to_publish(
                &self,
                requeue_after: Duration,
                limit: u32,
            ) -> StoreResult<Vec<ChunkRef>> {
                self.requeue_chunks(requeue_after, limit).await
            }

            async fn forget_queued(&self) -> StoreResult<u64> {
                let done = sqlx::query($crate::sql::FORGET_QUEUED)
                    .execute(&self.$write)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn give_back(&self, chunk: &ChunkRef, owner: &str) -> StoreResult<()> {
                sqlx::query($crate::sql::GIVE_BACK)
                    .bind(chunk.directory_id)
                    .bind(chunk.chunk_id)
                    .bind(owner)
                    .execute(&self.$write)
                    .await?;
                Ok(())
            }

            async fn mark_unpublished(&self, chunks: &[ChunkRef]) -> StoreResult<()> {
                self.unqueue_chunks(chunks).await
            }

            async fn ready_chunks(&self, default_weight: u32) -> StoreResult<Vec<ReadyChunk>> {
                let rows = sqlx::query($ready_chunks)
                    .bind($crate::rows::now_ms())
                    .fetch_all(&self.$read)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let weight: Option<i64> = row.try_get("weight")?;
                        let chunk = $crate::rows::ChunkMessageRow::from_row(row)?.message(false);
                        Ok(ReadyChunk {
                            waiting: orbit_core::domain::fair::Waiting {
                                organization: row.try_get("organization_id")?,
                                directory: chunk.directory_id,
                                weight: weight.map_or(default_weight, |w| {
                                    w.clamp(1, i64::from(u32::MAX)) as u32
                                }),
                                since_ms: row.try_get("created_ms")?,
                            },
                            chunk,
                            rows: row.try_get::<i64, _>("row_count")?.max(0) as u64,
                        })
                    })
                    .collect()
            }

            async fn passes(
                &self,
                ids: &[Uuid],
            ) -> StoreResult<std::collections::HashMap<Uuid, orbit_core::domain::fair::Pass>> {
                self.read_passes(ids).await
            }

            async fn advance_passes(
                &self,
                advances: &[orbit_core::domain::fair::Advance],
            ) -> StoreResult<()> {
                let now = $crate::rows::now_ms();
                for a in advances {
                    sqlx::query($crate::sql::ADVANCE_PASS)
                        .bind(a.id)
                        .bind(a.floor)
                        .bind(a.charge)
                        .bind(a.vtime_floor)
                        .bind(now)
                        .execute(&self.$write)
                        .await?;
                }
                Ok(())
            }
        }

        #[async_trait]
        impl Outbox for $store {
            async fn create_webhook(&self, endpoint: &WebhookEndpoint) -> StoreResult<()> {
                webhooks::create(&self.$write, endpoint).await
            }

            async fn list_webhooks(&self, org: Uuid) -> StoreResult<Vec<WebhookEndpoint>> {
                webhooks::list(&self.$read, org).await
            }

            async fn get_webhook(
                &self,
                org: Uuid,
                id: Uuid,
            ) -> StoreResult<Option<WebhookEndpoint>> {
                webhooks::get(&self.$read, org, id).await
            }

            async fn delete_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<bool> {
                webhooks::delete(&self.$write, org, id).await
            }

            async fn enable_webhook(
                &self,
                org: Uuid,
                id: Uuid,
            ) -> StoreResult<Option<WebhookEndpoint>> {
                webhooks::enable(&self.$write, org, id).await
            }

            async fn list_deliveries(
                &self,
                org: Uuid,
                endpoint: Uuid,
                limit: u32,
            ) -> StoreResult<Vec<WebhookDelivery>> {
                webhooks::deliveries(&self.$read, org, endpoint, limit).await
            }

            async fn claim_deliveries(
                &self,
                lease_for: Duration,
                limit: u32,
            ) -> StoreResult<Vec<DueDelivery>> {
                webhooks::claim(self, lease_for, limit).await
            }

            async fn record_attempt(
                &self,
                delivery: &DueDelivery,
                attempt: &DeliveryAttempt,
                next: AttemptNext,
                disable_after: u32,
            ) -> StoreResult<()> {
                self.retrying(|| {
                    Box::pin(webhooks::record(
                        &self.$write,
                        delivery,
                        attempt,
                        next,
                        disable_after,
                    ))
                })
                .await
            }
        }

        #[async_trait]
        impl Stats for $store {
            async fn count_failed_sources_by_code(&self) -> StoreResult<Vec<(String, u64)>> {
                let rows = sqlx::query($crate::sql::FAILED_SOURCES_BY_CODE)
                    .fetch_all(&self.$read)
                    .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("code")?, row.try_get::<i64, _>("n")? as u64)))
                    .collect()
            }

            async fn count_sources_by_status(&self) -> StoreResult<Vec<(SourceStatus, u64)>> {
                let rows = sqlx::query($crate::sql::SOURCES_BY_STATUS)
                    .fetch_all(&self.$read)
                    .await?;
                let mut counts = std::collections::HashMap::new();
                for row in rows {
                    let status: String = row.try_get("status")?;
                    if let Some(s) = SourceStatus::parse(&status) {
                        counts.insert(s, row.try_get::<i64, _>("n")? as u64);
                    }
                }
                Ok(SourceStatus::ALL
                    .into_iter()
                    .map(|s| (s, counts.get(&s).copied().unwrap_or(0)))
                    .collect())
            }

            async fn count_resumable_receiving(&self, now: DateTime<Utc>) -> StoreResult<u64> {
                let n: i64 = sqlx::query_scalar($crate::resumable::COUNT_RECEIVING)
                    .bind($crate::rows::ms(now))
                    .fetch_one(&self.$read)
                    .await?;
                Ok(n.max(0) as u64)
            }

            async fn count_pending_chunks(&self) -> StoreResult<u64> {
                let row = sqlx::query($crate::sql::OPEN_CHUNKS)
                    .fetch_one(&self.$read)
                    .await?;
                Ok(row.try_get::<i64, _>(0)? as u64)
            }

            async fn organization_backlog(
                &self,
                now: DateTime<Utc>,
                top: usize,
            ) -> StoreResult<$crate::backlog::Backlog> {
                let now = $crate::rows::ms(now);
                let queued = sqlx::query($crate::sql::ORGANIZATION_QUEUED_ROWS)
                    .fetch_all(&self.$read)
                    .await?
                    .iter()
                    .map(|row| {
                        Ok($crate::backlog::Queued {
                            organization_id: row.try_get("organization_id")?,
                            queued_rows: row.try_get("queued_rows")?,
                            progress_ms: row.try_get("progress_ms")?,
                        })
                    })
                    .collect::<StoreResult<Vec<_>>>()?;
                let ready = sqlx::query($crate::sql::ORGANIZATION_READY_CHUNKS)
                    .bind(now)
                    .fetch_all(&self.$read)
                    .await?
                    .iter()
                    .map(|row| {
                        Ok($crate::backlog::Ready {
                            organization_id: row.try_get("organization_id")?,
                            ready_chunks: row.try_get("ready_chunks")?,
                            ready_since_ms: row.try_get("ready_since_ms")?,
                        })
                    })
                    .collect::<StoreResult<Vec<_>>>()?;
                Ok($crate::backlog::summarize(queued, ready, now, top))
            }
        }
    };
}
pub(crate) use store_roles;
