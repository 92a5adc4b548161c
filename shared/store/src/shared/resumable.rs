//! The `Resumable` role both SQL backends share; see the parent module for why a macro.

/// `crate::resumable::Resumable` for a backend's `store` type, whose `write` pool serves its
/// statements: reads too, since a `PATCH` reads what the previous one just wrote.
macro_rules! resumable_role {
    (store: $store:ty, write: $write:ident $(,)?) => {
        #[async_trait]
        impl $crate::resumable::Resumable for $store {
            async fn create_resumable(
                &self,
                upload: &::orbit_core::model::NewResumable,
            ) -> StoreResult<()> {
                sqlx::query($crate::resumable::INSERT)
                    .bind(upload.directory_id)
                    .bind(upload.id)
                    .bind(upload.organization_id)
                    .bind(upload.length.map(|n| n as i64))
                    .bind(&upload.metadata)
                    .bind($crate::rows::now_ms())
                    .bind($crate::rows::ms(upload.expires_at))
                    .execute(&self.$write)
                    .await?;
                Ok(())
            }

            async fn get_resumable(
                &self,
                org: Uuid,
                dir: Uuid,
                id: Uuid,
            ) -> StoreResult<Option<::orbit_core::model::ResumableUpload>> {
                sqlx::query_as::<_, $crate::resumable::ResumableRow>($crate::resumable::GET)
                    .bind(dir)
                    .bind(org)
                    .bind(id)
                    .fetch_optional(&self.$write)
                    .await?
                    .map(TryInto::try_into)
                    .transpose()
            }

            async fn take_resumable(
                &self,
                org: Uuid,
                dir: Uuid,
                id: Uuid,
                offset: u64,
                now: DateTime<Utc>,
            ) -> StoreResult<Option<::orbit_core::model::ResumableUpload>> {
                sqlx::query_as::<_, $crate::resumable::ResumableRow>($crate::resumable::TAKE)
                    .bind(dir)
                    .bind(org)
                    .bind(id)
                    .bind(offset as i64)
                    .bind($crate::rows::ms(now))
                    .fetch_optional(&self.$write)
                    .await?
                    .map(TryInto::try_into)
                    .transpose()
            }

            async fn add_resumable_part(
                &self,
                dir: Uuid,
                id: Uuid,
                generation: i64,
                part: Option<&::orbit_core::model::ResumablePart>,
                length: Option<u64>,
                expires: DateTime<Utc>,
            ) -> StoreResult<bool> {
                let mut tx = self.$write.begin().await?;
                let advanced = sqlx::query($crate::resumable::ADVANCE)
                    .bind(dir)
                    .bind(id)
                    .bind(generation)
                    .bind(part.map_or(0, |p| p.byte_size as i64))
                    .bind(length.map(|n| n as i64))
                    .bind($crate::rows::now_ms())
                    .bind($crate::rows::ms(expires))
                    .execute(&mut *tx)
                    .await?;
                if advanced.rows_affected() == 0 {
                    return Ok(false);
                }
                if let Some(part) = part {
                    sqlx::query($crate::resumable::INSERT_PART)
                        .bind(dir)
                        .bind(id)
                        .bind(part.start as i64)
                        .bind(part.byte_size as i64)
                        .bind(&part.object_key)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(true)
            }

            async fn resumable_parts(
                &self,
                dir: Uuid,
                id: Uuid,
            ) -> StoreResult<Vec<::orbit_core::model::ResumablePart>> {
                Ok(
                    sqlx::query_as::<_, $crate::resumable::PartRow>($crate::resumable::PARTS)
                        .bind(dir)
                        .bind(id)
                        .fetch_all(&self.$write)
                        .await?
                        .into_iter()
                        .map(Into::into)
                        .collect(),
                )
            }

            async fn fail_resumable(&self, dir: Uuid, id: Uuid, error: &str) -> StoreResult<()> {
                sqlx::query($crate::resumable::FAIL)
                    .bind(dir)
                    .bind(id)
                    .bind(error)
                    .bind($crate::rows::now_ms())
                    .execute(&self.$write)
                    .await?;
                Ok(())
            }

            async fn terminate_resumable(
                &self,
                org: Uuid,
                dir: Uuid,
                id: Uuid,
            ) -> StoreResult<bool> {
                let ended = sqlx::query($crate::resumable::TERMINATE)
                    .bind(dir)
                    .bind(org)
                    .bind(id)
                    .bind($crate::rows::now_ms())
                    .execute(&self.$write)
                    .await?;
                Ok(ended.rows_affected() > 0)
            }

            async fn expire_resumables(
                &self,
                now: DateTime<Utc>,
                keep_for: Duration,
            ) -> StoreResult<u64> {
                let now = $crate::rows::ms(now);
                let forget_at = now.saturating_add($crate::rows::dur_ms(keep_for));
                let expired = sqlx::query($crate::resumable::EXPIRE)
                    .bind(now)
                    .bind(forget_at)
                    .execute(&self.$write)
                    .await?;
                Ok(expired.rows_affected())
            }

            async fn resumables_to_clean(
                &self,
                limit: u32,
            ) -> StoreResult<Vec<$crate::resumable::Leftover>> {
                let rows = sqlx::query($crate::resumable::TO_CLEAN)
                    .bind(i64::from(limit))
                    .fetch_all(&self.$write)
                    .await?;
                rows.into_iter()
                    .map(|row| {
                        Ok($crate::resumable::Leftover {
                            directory_id: row.try_get("directory_id")?,
                            id: row.try_get("id")?,
                            state: $crate::resumable::parse_state(
                                &row.try_get::<String, _>("state")?,
                            )?,
                        })
                    })
                    .collect()
            }

            async fn cleaned_resumable(
                &self,
                leftover: &$crate::resumable::Leftover,
            ) -> StoreResult<()> {
                let mut tx = self.$write.begin().await?;
                sqlx::query($crate::resumable::DELETE_PARTS)
                    .bind(leftover.directory_id)
                    .bind(leftover.id)
                    .execute(&mut *tx)
                    .await?;
                let statement = match leftover.state {
                    ::orbit_core::model::ResumableState::Terminated => {
                        $crate::resumable::DELETE_UPLOAD
                    }
                    _ => $crate::resumable::CLEANED,
                };
                sqlx::query(statement)
                    .bind(leftover.directory_id)
                    .bind(leftover.id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn forget_resumables(&self, now: DateTime<Utc>) -> StoreResult<u64> {
                let forgotten = sqlx::query($crate::resumable::FORGET)
                    .bind($crate::rows::ms(now))
                    .execute(&self.$write)
                    .await?;
                Ok(forgotten.rows_affected())
            }

            async fn imported_resumable(
                &self,
                dir: Uuid,
                id: Uuid,
                source: Uuid,
            ) -> StoreResult<bool> {
                let linked = sqlx::query($crate::resumable::LINK_SOURCE)
                    .bind(dir)
                    .bind(id)
                    .bind(source)
                    .bind($crate::rows::now_ms())
                    .execute(&self.$write)
                    .await?;
                Ok(linked.rows_affected() > 0)
            }
        }
    };
}

pub(crate) use resumable_role;
