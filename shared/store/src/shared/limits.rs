//! The `Limits` role both SQL backends share; see the parent module for why a macro.

/// `crate::limits::Limits` for a backend's `store` type, whose `read` pool serves reads and
/// `write` pool writes, over connections of type `connection`. The arguments are what differs between the backends: `lock`, the
/// statement that serializes one organization's admissions (`$1` a lock class, `$2` the
/// organization as text; `None` where one writer serializes every transaction anyway);
/// `open_admissions`, the count of an organization's (`$1`) admissions still streaming at `$2`
/// whose gateway still heartbeats; `prune_admissions`, deleting an organization's (`$1`)
/// admissions older than `$2` that no longer count as in flight at `$3`.
macro_rules! limits_role {
    (
        store: $store:ty,
        read: $read:ident,
        write: $write:ident,
        connection: $conn:ty,
        lock: $lock:expr,
        open_admissions: $open_admissions:expr,
        prune_admissions: $prune_admissions:expr $(,)?
    ) => {
        impl $store {
            /// Reads what `limits` needs of `org`'s usage at `now`, admissions before sources:
            /// an upload whose source is recorded between the two reads is counted twice
            /// (its admission closes only after its source commits), never missed.
            async fn limit_usage(
                conn: &mut $conn,
                org: Uuid,
                limits: &$crate::limits::UploadLimits,
                now: i64,
            ) -> StoreResult<$crate::limits::Usage> {
                let mut usage = $crate::limits::Usage::default();
                if limits.max_uploads_per_minute > 0 {
                    let row = sqlx::query($crate::sql::ADMISSIONS_SINCE)
                        .bind(org)
                        .bind(now - $crate::rows::dur_ms($crate::limits::RATE_WINDOW))
                        .fetch_one(&mut *conn)
                        .await?;
                    usage.uploads_last_minute = row.try_get::<i64, _>("n")?.max(0) as u64;
                    usage.oldest_in_window_ms = row.try_get("oldest")?;
                }
                if limits.max_uploads_in_flight > 0 || limits.max_queued_rows > 0 {
                    let streaming: i64 = sqlx::query_scalar($open_admissions)
                        .bind(org)
                        .bind(now)
                        .fetch_one(&mut *conn)
                        .await?;
                    let row = sqlx::query($crate::sql::OPEN_SOURCES)
                        .bind(org)
                        .fetch_one(&mut *conn)
                        .await?;
                    let sources: i64 = row.try_get("n")?;
                    let rows: i64 = row.try_get("queued_rows")?;
                    usage.uploads_in_flight = (streaming.max(0) + sources.max(0)) as u64;
                    usage.queued_rows = rows.max(0) as u64;
                }
                Ok(usage)
            }

            async fn admit_once(
                &self,
                org: Uuid,
                owner: &str,
                limits: &$crate::limits::UploadLimits,
                open_for: Duration,
            ) -> StoreResult<$crate::limits::Admission> {
                let mut tx = self.$write.begin().await?;
                let lock: Option<&str> = $lock;
                if let Some(lock) = lock {
                    sqlx::query(lock)
                        .bind($crate::limits::ADMISSION_LOCK_CLASS)
                        .bind(org.to_string())
                        .execute(&mut *tx)
                        .await?;
                }
                // The clock is read under the lock, so admissions of one organization are
                // stamped in the order they were counted.
                let now = $crate::rows::now_ms();
                sqlx::query($prune_admissions)
                    .bind(org)
                    .bind(now - $crate::rows::dur_ms($crate::limits::RATE_WINDOW))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                let usage = Self::limit_usage(&mut *tx, org, limits, now).await?;
                if let Some(refused) = $crate::limits::refusal(limits, &usage, now) {
                    tx.commit().await?;
                    return Ok(refused);
                }
                let id = Uuid::now_v7();
                sqlx::query($crate::sql::INSERT_ADMISSION)
                    .bind(id)
                    .bind(org)
                    .bind(owner)
                    .bind(now)
                    .bind(now.saturating_add($crate::rows::dur_ms(open_for)))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok($crate::limits::Admission::Admitted(id))
            }
        }

        #[async_trait]
        impl $crate::limits::Limits for $store {
            async fn organization_limits(
                &self,
                org: Uuid,
            ) -> StoreResult<$crate::limits::LimitOverrides> {
                let row = sqlx::query($crate::sql::ORGANIZATION_LIMITS)
                    .bind(org)
                    .fetch_optional(&self.$read)
                    .await?;
                let Some(row) = row else {
                    return Ok($crate::limits::LimitOverrides::default());
                };
                let count = |name: &str| -> StoreResult<Option<u64>> {
                    Ok(row
                        .try_get::<Option<i64>, _>(name)?
                        .map(|v| v.max(0) as u64))
                };
                Ok($crate::limits::LimitOverrides {
                    weight: row
                        .try_get::<Option<i64>, _>("weight")?
                        .map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
                    max_uploads_in_flight: count("max_uploads_in_flight")?,
                    max_queued_rows: count("max_queued_rows")?,
                    max_uploads_per_minute: count("max_uploads_per_minute")?,
                })
            }

            async fn set_organization_limits(
                &self,
                org: Uuid,
                change: &$crate::limits::LimitChange,
            ) -> StoreResult<$crate::limits::LimitOverrides> {
                let new = self.organization_limits(org).await?.changed(change);
                let count = |v: Option<u64>| v.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
                sqlx::query($crate::sql::UPSERT_ORGANIZATION_LIMITS)
                    .bind(org)
                    .bind(new.weight.map(i64::from))
                    .bind(count(new.max_uploads_in_flight))
                    .bind(count(new.max_queued_rows))
                    .bind(count(new.max_uploads_per_minute))
                    .bind($crate::rows::now_ms())
                    .execute(&self.$write)
                    .await?;
                Ok(new)
            }

            async fn organization_usage(&self, org: Uuid) -> StoreResult<$crate::limits::Usage> {
                let every = $crate::limits::UploadLimits {
                    max_uploads_in_flight: 1,
                    max_queued_rows: 1,
                    max_uploads_per_minute: 1,
                };
                let mut conn = self.$read.acquire().await?;
                Self::limit_usage(&mut conn, org, &every, $crate::rows::now_ms()).await
            }

            async fn admit_upload(
                &self,
                org: Uuid,
                owner: &str,
                limits: &$crate::limits::UploadLimits,
                open_for: Duration,
            ) -> StoreResult<$crate::limits::Admission> {
                let owner = owner.to_owned();
                let limits = *limits;
                self.retrying(|| {
                    let owner = owner.clone();
                    Box::pin(async move { self.admit_once(org, &owner, &limits, open_for).await })
                })
                .await
            }

            async fn upload_recorded(&self, admission: Uuid) -> StoreResult<()> {
                sqlx::query($crate::sql::CLOSE_ADMISSION)
                    .bind(admission)
                    .execute(&self.$write)
                    .await?;
                Ok(())
            }

            async fn release_admission(&self, admission: Uuid) -> StoreResult<()> {
                sqlx::query($crate::sql::DELETE_ADMISSION)
                    .bind(admission)
                    .execute(&self.$write)
                    .await?;
                Ok(())
            }

            async fn idempotency_key_completed(
                &self,
                org: Uuid,
                dir: Uuid,
                key: &str,
            ) -> StoreResult<bool> {
                Ok(sqlx::query($crate::sql::KEY_COMPLETED)
                    .bind(dir)
                    .bind(key)
                    .bind(org)
                    .bind($crate::rows::now_ms())
                    .fetch_optional(&self.$read)
                    .await?
                    .is_some())
            }
        }
    };
}

pub(crate) use limits_role;
