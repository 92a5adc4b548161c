//! Rust both SQL backends run as it is, written once, as `sql` holds the SQL they share. Each
//! macro here expands the same function bodies for one backend's pool and connection types.
//!
//! Macros rather than functions generic over `sqlx::Database`: every statement binds and
//! decodes several types, and a generic function would have to spell out an `Encode + Type`
//! bound per type, a `FromRow` bound per row shape and a higher-ranked `Executor` bound per
//! connection, all of it repeated on each function; expanded per backend, the code reads as
//! plain sqlx over one pool type.
//!
//! The role implementations are `roles`; here are the webhook store and the steps of a
//! transaction.

mod limits;
mod resumable;
mod roles;

pub(crate) use limits::limits_role;
pub(crate) use resumable::resumable_role;
pub(crate) use roles::store_roles;

/// A request to claim an idempotency key, as `Uploads::claim_idempotency_key` takes it.
pub(crate) struct KeyRequest<'a> {
    pub org: uuid::Uuid,
    pub key: &'a str,
    pub dir: uuid::Uuid,
    pub owner: &'a str,
    pub ttl: std::time::Duration,
    pub in_flight_timeout: std::time::Duration,
}

impl KeyRequest<'_> {
    /// The claim this request would hold, with a fresh token.
    pub fn claim(&self) -> orbit_core::model::IdempotencyClaim {
        orbit_core::model::IdempotencyClaim {
            organization_id: self.org,
            directory_id: self.dir,
            key: self.key.to_owned(),
            token: uuid::Uuid::new_v4(),
        }
    }
}

/// The webhook functions both backends write the same way, expanded into a backend's
/// `webhooks` module: `connection` and `pool` are its sqlx types, `lease_held` its query that
/// a delivery's lease is still this attempt's (taking the row lock where there are row locks),
/// `attempts_of` its function reading the attempts of a page of deliveries, `lock_endpoint` its
/// query that an organization's endpoint exists (locking it where it can), and
/// `delete_attempts` its statement deleting the attempts of an endpoint's deliveries.
macro_rules! webhook_store {
    (
        connection: $conn:ty,
        pool: $pool:ty,
        lease_held: $lease_held:expr,
        attempts_of: $attempts_of:path,
        lock_endpoint: $lock_endpoint:expr,
        delete_attempts: $delete_attempts:expr $(,)?
    ) => {
        /// Writes the outbox rows of `source`'s end, inside the transaction that ends it.
        pub(super) async fn enqueue(
            conn: &mut $conn,
            source: ::orbit_core::model::Source,
            event: &str,
        ) -> $crate::StoreResult<()> {
            let rows: Vec<$crate::webhook_rows::EndpointRow> =
                sqlx::query_as($crate::sql::SUBSCRIBED_ENDPOINTS)
                    .bind(source.organization_id)
                    .fetch_all(&mut *conn)
                    .await?;
            let endpoints = $crate::webhook_rows::subscribed(rows, event, source.directory_id);
            if endpoints.is_empty() {
                return Ok(());
            }
            let now = $crate::rows::now_ms();
            let source_id = source.id;
            let directory_id = source.directory_id;
            let payload = ::orbit_core::views::source_event(event, source, $crate::rows::at(now));
            for endpoint in endpoints {
                sqlx::query($crate::sql::INSERT_DELIVERY)
                    .bind(::uuid::Uuid::now_v7())
                    .bind(directory_id)
                    .bind(endpoint)
                    .bind(source_id)
                    .bind(event)
                    .bind(&payload)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }

        pub(super) async fn create(
            pool: &$pool,
            e: &::orbit_core::model::WebhookEndpoint,
        ) -> $crate::StoreResult<()> {
            sqlx::query($crate::sql::INSERT_ENDPOINT)
                .bind(e.id)
                .bind(e.organization_id)
                .bind(e.directory_id)
                .bind(&e.url)
                .bind(serde_json::to_string(&e.events)?)
                .bind(&e.secret)
                .bind($crate::rows::ms(e.created_at))
                .execute(pool)
                .await?;
            Ok(())
        }

        pub(super) async fn list(
            pool: &$pool,
            org: ::uuid::Uuid,
        ) -> $crate::StoreResult<Vec<::orbit_core::model::WebhookEndpoint>> {
            let rows: Vec<$crate::webhook_rows::EndpointRow> =
                sqlx::query_as($crate::sql::ENDPOINTS)
                    .bind(org)
                    .fetch_all(pool)
                    .await?;
            rows.into_iter().map(TryInto::try_into).collect()
        }

        pub(super) async fn get(
            pool: &$pool,
            org: ::uuid::Uuid,
            id: ::uuid::Uuid,
        ) -> $crate::StoreResult<Option<::orbit_core::model::WebhookEndpoint>> {
            endpoint_row($crate::sql::ENDPOINT, pool, org, id).await
        }

        pub(super) async fn enable(
            pool: &$pool,
            org: ::uuid::Uuid,
            id: ::uuid::Uuid,
        ) -> $crate::StoreResult<Option<::orbit_core::model::WebhookEndpoint>> {
            endpoint_row($crate::sql::ENABLE_ENDPOINT, pool, org, id).await
        }

        /// The one endpoint `statement` selects or returns, given the organization and id.
        async fn endpoint_row(
            statement: &str,
            pool: &$pool,
            org: ::uuid::Uuid,
            id: ::uuid::Uuid,
        ) -> $crate::StoreResult<Option<::orbit_core::model::WebhookEndpoint>> {
            let row: Option<$crate::webhook_rows::EndpointRow> = sqlx::query_as(statement)
                .bind(org)
                .bind(id)
                .fetch_optional(pool)
                .await?;
            row.map(TryInto::try_into).transpose()
        }

        pub(super) async fn deliveries(
            pool: &$pool,
            org: ::uuid::Uuid,
            endpoint: ::uuid::Uuid,
            limit: u32,
        ) -> $crate::StoreResult<Vec<::orbit_core::model::WebhookDelivery>> {
            let rows: Vec<$crate::webhook_rows::DeliveryRow> =
                sqlx::query_as($crate::sql::DELIVERIES_PAGE)
                    .bind(org)
                    .bind(endpoint)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
            let attempts = $attempts_of(pool, &rows).await?;
            Ok($crate::webhook_rows::deliveries_with_attempts(
                rows, attempts,
            ))
        }

        /// Deletes the endpoint with its deliveries and their attempts, explicitly: on a sharded
        /// database they live on their sources' shards, where no foreign key cascades, and in
        /// SQLite a cascade holds only where foreign keys are enforced.
        pub(super) async fn delete(
            pool: &$pool,
            org: ::uuid::Uuid,
            id: ::uuid::Uuid,
        ) -> $crate::StoreResult<bool> {
            let mut tx = pool.begin().await?;
            let owned = sqlx::query($lock_endpoint)
                .bind(org)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if owned.is_none() {
                return Ok(false);
            }
            for statement in [
                $delete_attempts,
                "DELETE FROM webhook_deliveries WHERE endpoint_id = $1",
                "DELETE FROM webhook_endpoints WHERE id = $1",
            ] {
                sqlx::query(statement).bind(id).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(true)
        }

        /// Records an attempt of a leased delivery; nothing when the lease was lost.
        pub(super) async fn record(
            writer: &$pool,
            delivery: &::orbit_core::model::DueDelivery,
            attempt: &::orbit_core::model::DeliveryAttempt,
            next: ::orbit_core::model::AttemptNext,
            disable_after: u32,
        ) -> $crate::StoreResult<()> {
            let mut tx = writer.begin().await?;
            let held = sqlx::query($lease_held)
                .bind(delivery.directory_id)
                .bind(delivery.id)
                .bind(delivery.lease_token)
                .fetch_optional(&mut *tx)
                .await?;
            if held.is_none() {
                return Ok(());
            }
            let now = $crate::rows::now_ms();
            sqlx::query($crate::sql::INSERT_ATTEMPT)
                .bind(delivery.directory_id)
                .bind(delivery.id)
                .bind(i64::from(attempt.attempt))
                .bind($crate::rows::ms(attempt.at))
                .bind(attempt.status_code.map(i64::from))
                .bind(&attempt.error)
                .bind(attempt.duration_ms as i64)
                .execute(&mut *tx)
                .await?;
            let effect = $crate::webhook_rows::effect(next);
            sqlx::query($crate::sql::DELIVERY_ATTEMPTED)
                .bind(effect.state)
                .bind(effect.next_attempt_ms)
                .bind(effect.delivered)
                .bind(now)
                .bind(delivery.directory_id)
                .bind(delivery.id)
                .execute(&mut *tx)
                .await?;
            if effect.delivered {
                sqlx::query($crate::sql::ENDPOINT_SUCCEEDED)
                    .bind(delivery.endpoint_id)
                    .execute(&mut *tx)
                    .await?;
            } else {
                sqlx::query($crate::sql::ENDPOINT_FAILED)
                    .bind(i64::from(disable_after))
                    .bind(now)
                    .bind(delivery.endpoint_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        }
    };
}
pub(crate) use webhook_store;

/// The steps of a transaction both backends take the same way, expanded into a backend's
/// `commit` module over its `connection` type; the module has the backend's `webhooks` in
/// scope. How a backend writes a commit's rows (`apply_results`) is its own.
macro_rules! transaction_steps {
    (connection: $conn:ty, database: $db:ty, bytewise_collation: $collate:literal $(,)?) => {
        /// A source by id, unscoped: for the store's own use after a scoped check.
        pub(super) async fn load_source(
            conn: &mut $conn,
            dir: ::uuid::Uuid,
            id: ::uuid::Uuid,
        ) -> $crate::StoreResult<::orbit_core::model::Source> {
            sqlx::query_as::<_, $crate::rows::SourceRow>($crate::sql::SOURCE_BY_ID)
                .bind(dir)
                .bind(id)
                .fetch_one(&mut *conn)
                .await?
                .try_into()
        }

        pub(super) async fn fail_source_in(
            conn: &mut $conn,
            dir: ::uuid::Uuid,
            source: ::uuid::Uuid,
            code: &str,
            message: &str,
        ) -> $crate::StoreResult<()> {
            let updated = sqlx::query($crate::sql::FAIL_SOURCE)
                .bind(code)
                .bind(message)
                .bind($crate::rows::now_ms())
                .bind(dir)
                .bind(source)
                .execute(&mut *conn)
                .await?;
            if updated.rows_affected() > 0 {
                sqlx::query($crate::sql::FAIL_OPEN_CHUNKS)
                    .bind(dir)
                    .bind(source)
                    .execute(&mut *conn)
                    .await?;
                let failed = load_source(conn, dir, source).await?;
                webhooks::enqueue(conn, failed, ::orbit_core::views::SOURCE_FAILED).await?;
            }
            Ok(())
        }

        /// Ends a source cancelled, unless it ended already; the caller holds what it locks.
        pub(super) async fn cancel_in(
            conn: &mut $conn,
            current: ::orbit_core::model::Source,
        ) -> $crate::StoreResult<::orbit_core::model::Cancelled> {
            use ::orbit_core::model::Cancelled;
            if current.status.is_terminal() {
                return Ok(Cancelled::Terminal(current));
            }
            fail_source_in(
                conn,
                current.directory_id,
                current.id,
                ::orbit_core::model::CANCELLED,
                "the import was cancelled on request; rows committed before the cancel stay",
            )
            .await?;
            Ok(Cancelled::Cancelled(
                load_source(conn, current.directory_id, current.id).await?,
            ))
        }

        /// Completes a source whose every chunk is in and whose duplicates across chunks are
        /// flagged; fails it should its counts not add up.
        pub(super) async fn complete_source(
            conn: &mut $conn,
            dir: ::uuid::Uuid,
            source_id: ::uuid::Uuid,
        ) -> $crate::StoreResult<()> {
            let source = load_source(conn, dir, source_id).await?;
            if source.accepted + source.failed != source.total_rows {
                let message = format!(
                    "processed {} rows of {}; the source cannot be completed",
                    source.accepted + source.failed,
                    source.total_rows
                );
                return fail_source_in(conn, dir, source_id, "row_count_mismatch", &message).await;
            }
            let completed = sqlx::query($crate::sql::COMPLETE_SOURCE)
                .bind(dir)
                .bind(source_id)
                .bind($crate::rows::now_ms())
                .execute(&mut *conn)
                .await?;
            if completed.rows_affected() > 0 {
                let source = load_source(conn, dir, source_id).await?;
                webhooks::enqueue(conn, source, ::orbit_core::views::SOURCE_COMPLETED).await?;
            }
            Ok(())
        }

        /// The (row, line, value) of each row of the source whose `kind` identity an earlier
        /// row has.
        pub(super) async fn repeated_identities(
            conn: &mut $conn,
            dir: ::uuid::Uuid,
            source_id: ::uuid::Uuid,
            kind: &str,
        ) -> $crate::StoreResult<Vec<(i64, i64, String)>> {
            Ok(
                sqlx::query_as($crate::sql::repeated_identities(kind, $collate).as_str())
                    .bind(dir)
                    .bind(source_id)
                    .fetch_all(&mut *conn)
                    .await?,
            )
        }

        /// Ends a committed slice: the chunk done, or where its next slice starts. Returns the
        /// chunks it finished.
        pub(super) async fn end_slice(
            conn: &mut $conn,
            lease: &::orbit_core::model::Lease,
            end: ::orbit_core::model::SliceEnd,
        ) -> $crate::StoreResult<u64> {
            Ok(match end {
                ::orbit_core::model::SliceEnd::Chunk => {
                    sqlx::query($crate::rows::CHUNK_DONE)
                        .bind(lease.directory_id)
                        .bind(lease.chunk_id)
                        .execute(&mut *conn)
                        .await?;
                    1
                }
                ::orbit_core::model::SliceEnd::Before(next) => {
                    sqlx::query($crate::rows::CHUNK_RESUMES_AT)
                        .bind(next.offset as i64)
                        .bind(next.line as i64)
                        .bind(next.row as i64)
                        .bind(lease.directory_id)
                        .bind(lease.chunk_id)
                        .execute(&mut *conn)
                        .await?;
                    0
                }
            })
        }

        /// Inserts a pending source with `statement`, which binds $1 to $17 in the order
        /// below, the source's sequence number as $18 (NULL: the database assigns it), its
        /// compression as $19 and the bytes received as $20 (NULL when uncompressed).
        pub(super) async fn insert_source(
            conn: &mut $conn,
            statement: &str,
            s: &::orbit_core::model::NewSource,
            chunk_count: usize,
            seq: Option<i64>,
        ) -> $crate::StoreResult<()> {
            sqlx::query(statement)
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
                .bind($crate::rows::now_ms())
                .bind(s.dry_run)
                .bind(seq)
                .bind(s.compression.as_str())
                .bind(
                    (s.compression != ::orbit_core::model::Compression::None)
                        .then_some(s.received_bytes as i64),
                )
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// Completes the upload's idempotency claim, if any, with the receipt of `source`;
        /// a conflict when another request took the key over.
        pub(super) async fn complete_key(
            conn: &mut $conn,
            claim: Option<&::orbit_core::model::IdempotencyClaim>,
            source: &::orbit_core::model::Source,
        ) -> $crate::StoreResult<()> {
            let Some(claim) = claim else { return Ok(()) };
            let receipt = ::orbit_core::model::UploadReceipt::of(source);
            let done = sqlx::query($crate::sql::IDEMPOTENCY_COMPLETED)
                .bind(&source.sha256)
                .bind(source.id)
                .bind(serde_json::to_string(&receipt)?)
                .bind(claim.directory_id)
                .bind(&claim.key)
                .bind(claim.token)
                .execute(&mut *conn)
                .await?;
            if done.rows_affected() == 0 {
                return Err($crate::StoreError::Conflict(
                    "the idempotency key was taken over by another request".into(),
                ));
            }
            Ok(())
        }

        /// Records `source` as the import of the resumable upload `upload`, if any; a conflict
        /// when that upload has a source already (another gateway imported it first) or
        /// ended meanwhile, so the transaction adds no second source.
        pub(super) async fn link_resumable(
            conn: &mut $conn,
            upload: Option<uuid::Uuid>,
            source: &::orbit_core::model::Source,
        ) -> $crate::StoreResult<()> {
            let Some(upload) = upload else { return Ok(()) };
            let linked = sqlx::query($crate::resumable::LINK_SOURCE)
                .bind(source.directory_id)
                .bind(upload)
                .bind(source.id)
                .bind($crate::rows::now_ms())
                .execute(&mut *conn)
                .await?;
            if linked.rows_affected() == 0 {
                return Err($crate::StoreError::Conflict(
                    "the resumable upload was imported or ended by another request".into(),
                ));
            }
            Ok(())
        }

        /// Closes the organization-limit admission the upload held, if any: from the commit
        /// on, the source counts as in flight instead (as [`Limits::upload_recorded`] does on
        /// its own).
        ///
        /// [`Limits::upload_recorded`]: crate::Limits::upload_recorded
        pub(super) async fn close_admission(
            conn: &mut $conn,
            admission: Option<uuid::Uuid>,
        ) -> $crate::StoreResult<()> {
            if let Some(admission) = admission {
                sqlx::query($crate::sql::CLOSE_ADMISSION)
                    .bind(admission)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }

        /// Writes the in-flight `claim` of `request` with `statement`, which binds the
        /// organization, key, directory, claim token, now, expiry and owner as $1 to $7; rows
        /// written.
        pub(super) async fn write_key_claim(
            conn: &mut $conn,
            statement: &str,
            request: &$crate::shared::KeyRequest<'_>,
            claim: &::orbit_core::model::IdempotencyClaim,
            now: i64,
        ) -> $crate::StoreResult<u64> {
            let done = sqlx::query(statement)
                .bind(claim.organization_id)
                .bind(&claim.key)
                .bind(request.dir)
                .bind(claim.token)
                .bind(now)
                .bind(now + $crate::rows::dur_ms(request.ttl))
                .bind(request.owner)
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        }

        /// Writes a new claim of `request` with `statement` (as [`write_key_claim`] does) and
        /// commits the transaction that decided it could.
        pub(super) async fn commit_key_claim(
            mut tx: sqlx::Transaction<'_, $db>,
            statement: &str,
            request: &$crate::shared::KeyRequest<'_>,
            now: i64,
        ) -> $crate::StoreResult<::orbit_core::model::KeyState> {
            let claim = request.claim();
            write_key_claim(&mut tx, statement, request, &claim, now).await?;
            tx.commit().await?;
            Ok(::orbit_core::model::KeyState::Claimed(claim))
        }

        /// Whether `lease` is still held, by `statement` ($1 the directory, $2 the chunk, $3 the
        /// lease token), which in PostgreSQL also takes the row lock that fences a takeover.
        pub(super) async fn lease_held(
            conn: &mut $conn,
            statement: &str,
            lease: &::orbit_core::model::Lease,
        ) -> $crate::StoreResult<bool> {
            Ok(sqlx::query(statement)
                .bind(lease.directory_id)
                .bind(lease.chunk_id)
                .bind(lease.token)
                .fetch_optional(&mut *conn)
                .await?
                .is_some())
        }

        pub(super) async fn insert_chunk(
            conn: &mut $conn,
            dir: ::uuid::Uuid,
            source: ::uuid::Uuid,
            chunk: &::orbit_core::model::ChunkSpec,
            state: &str,
            trace: $crate::writes::Trace<'_>,
        ) -> $crate::StoreResult<::uuid::Uuid> {
            let id = ::uuid::Uuid::now_v7();
            sqlx::query($crate::sql::INSERT_CHUNK)
                .bind(id)
                .bind(dir)
                .bind(source)
                .bind(i64::from(chunk.index))
                .bind(chunk.first_row as i64)
                .bind(chunk.row_count as i64)
                .bind(chunk.start_offset as i64)
                .bind(chunk.end_offset as i64)
                .bind(chunk.start_line as i64)
                .bind(state)
                .bind($crate::rows::now_ms())
                .bind(trace.traceparent)
                .bind(trace.tracestate)
                .execute(&mut *conn)
                .await?;
            Ok(id)
        }
    };
}
pub(crate) use transaction_steps;
