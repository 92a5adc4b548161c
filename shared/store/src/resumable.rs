//! Resumable (tus) uploads as stored: the [`Resumable`] role, its SQL and its row. The bytes
//! live in the object store, one object per part; this records which parts an upload has, how
//! far it has come, and what became of it (docs/imports.md, "Resumable uploads").
//!
//! Every write that adds to an upload names the generation that took it over: a `PATCH`
//! bumps the generation when it starts, so of two `PATCH`es on one upload (a client that
//! resumed while its first request still streams on another gateway, say) only the newer one
//! records parts; the older one's next part is refused and it removes what it wrote.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orbit_core::model::{NewResumable, ResumablePart, ResumableState, ResumableUpload};
use sqlx::FromRow;
use uuid::Uuid;

use crate::rows::at;
use crate::{StoreError, StoreResult};

/// An upload whose parts are to be removed from the object store, as `to_clean` lists them.
#[derive(Debug, Clone)]
pub struct Leftover {
    pub directory_id: Uuid,
    pub id: Uuid,
    pub state: ResumableState,
}

#[async_trait]
pub trait Resumable: Send + Sync + 'static {
    async fn create_resumable(&self, upload: &NewResumable) -> StoreResult<()>;
    /// The upload, if `org` owns it.
    async fn get_resumable(
        &self,
        org: Uuid,
        dir: Uuid,
        id: Uuid,
    ) -> StoreResult<Option<ResumableUpload>>;
    /// Takes the upload over for a `PATCH` at `offset`, bumping its generation; `None` unless
    /// it is receiving, unexpired at `now` and at that offset.
    async fn take_resumable(
        &self,
        org: Uuid,
        dir: Uuid,
        id: Uuid,
        offset: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<ResumableUpload>>;
    /// Records `part` (its `start` the upload's offset) and, if the client declares it now, the
    /// upload's `length`, for `generation`; the upload then expires at `expires`. `false` when
    /// another `PATCH` took the upload over (or it ended) meanwhile: nothing was recorded.
    async fn add_resumable_part(
        &self,
        dir: Uuid,
        id: Uuid,
        generation: i64,
        part: Option<&ResumablePart>,
        length: Option<u64>,
        expires: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// The upload's recorded parts, in order.
    async fn resumable_parts(&self, dir: Uuid, id: Uuid) -> StoreResult<Vec<ResumablePart>>;
    /// Ends a complete upload whose import was refused: `error` is the problem document.
    async fn fail_resumable(&self, dir: Uuid, id: Uuid, error: &str) -> StoreResult<()>;
    /// Ends the upload for its client (tus termination); `false` if there is none to end.
    async fn terminate_resumable(&self, org: Uuid, dir: Uuid, id: Uuid) -> StoreResult<bool>;
    /// Ends every receiving upload that expired by `now`; how many. Their records are kept
    /// for `keep_for` more, so that their clients are told `410` rather than `404`.
    async fn expire_resumables(
        &self,
        now: DateTime<Utc>,
        keep_for: std::time::Duration,
    ) -> StoreResult<u64>;
    /// Uploads that ended with parts still stored, oldest first, at most `limit`.
    async fn resumables_to_clean(&self, limit: u32) -> StoreResult<Vec<Leftover>>;
    /// Forgets the parts of an upload whose objects are gone, and a terminated upload itself.
    async fn cleaned_resumable(&self, leftover: &Leftover) -> StoreResult<()>;
    /// Forgets finished uploads whose records expired by `now`; how many.
    async fn forget_resumables(&self, now: DateTime<Utc>) -> StoreResult<u64>;
    /// Records `source` as the import of a receiving upload (one whose file replayed an
    /// earlier upload's idempotency key, so no commit of its own recorded it); `false` if the
    /// upload has a source or ended already.
    async fn imported_resumable(&self, dir: Uuid, id: Uuid, source: Uuid) -> StoreResult<bool>;
}

pub(crate) const INSERT: &str = "INSERT INTO resumable_uploads (directory_id, id, organization_id, upload_length, upload_offset, metadata, generation, state, created_ms, updated_ms, expires_ms) VALUES ($1, $2, $3, $4, 0, $5, 0, 'receiving', $6, $6, $7)";
pub(crate) const GET: &str =
    "SELECT * FROM resumable_uploads WHERE directory_id = $1 AND organization_id = $2 AND id = $3 AND state <> 'terminated'";
pub(crate) const TAKE: &str = "UPDATE resumable_uploads SET generation = generation + 1, updated_ms = $5 WHERE directory_id = $1 AND organization_id = $2 AND id = $3 AND upload_offset = $4 AND state = 'receiving' AND expires_ms > $5 RETURNING *";
pub(crate) const ADVANCE: &str = "UPDATE resumable_uploads SET upload_offset = upload_offset + $4, upload_length = COALESCE(upload_length, $5), updated_ms = $6, expires_ms = $7 WHERE directory_id = $1 AND id = $2 AND generation = $3 AND state = 'receiving'";
pub(crate) const INSERT_PART: &str = "INSERT INTO resumable_parts (directory_id, upload_id, start_offset, byte_size, object_key) VALUES ($1, $2, $3, $4, $5)";
pub(crate) const PARTS: &str = "SELECT start_offset, byte_size, object_key FROM resumable_parts WHERE directory_id = $1 AND upload_id = $2 ORDER BY start_offset";
pub(crate) const FAIL: &str = "UPDATE resumable_uploads SET state = 'failed', error = $3, generation = generation + 1, updated_ms = $4, cleanup_ms = $4 WHERE directory_id = $1 AND id = $2 AND state = 'receiving'";
pub(crate) const TERMINATE: &str = "UPDATE resumable_uploads SET state = 'terminated', generation = generation + 1, updated_ms = $4, cleanup_ms = $4 WHERE directory_id = $1 AND organization_id = $2 AND id = $3 AND state <> 'terminated'";
pub(crate) const EXPIRE: &str = "UPDATE resumable_uploads SET state = 'expired', generation = generation + 1, updated_ms = $1, cleanup_ms = $1, expires_ms = $2 WHERE state = 'receiving' AND expires_ms <= $1";
pub(crate) const TO_CLEAN: &str = "SELECT directory_id, id, state FROM resumable_uploads WHERE cleanup_ms IS NOT NULL ORDER BY cleanup_ms LIMIT $1";
pub(crate) const DELETE_PARTS: &str =
    "DELETE FROM resumable_parts WHERE directory_id = $1 AND upload_id = $2";
pub(crate) const CLEANED: &str =
    "UPDATE resumable_uploads SET cleanup_ms = NULL WHERE directory_id = $1 AND id = $2";
pub(crate) const DELETE_UPLOAD: &str =
    "DELETE FROM resumable_uploads WHERE directory_id = $1 AND id = $2";
pub(crate) const FORGET: &str = "DELETE FROM resumable_uploads WHERE state <> 'receiving' AND cleanup_ms IS NULL AND expires_ms <= $1";
pub(crate) const COUNT_RECEIVING: &str =
    "SELECT COUNT(*) FROM resumable_uploads WHERE state = 'receiving' AND expires_ms > $1";
/// Records the source of an upload's import, in the commit's transaction: `$1` the directory,
/// `$2` the upload, `$3` the source, `$4` now.
pub(crate) const LINK_SOURCE: &str = "UPDATE resumable_uploads SET state = 'imported', source_id = $3, updated_ms = $4, cleanup_ms = $4 WHERE directory_id = $1 AND id = $2 AND state = 'receiving' AND source_id IS NULL";

#[derive(FromRow)]
pub(crate) struct ResumableRow {
    directory_id: Uuid,
    id: Uuid,
    organization_id: Uuid,
    upload_length: Option<i64>,
    upload_offset: i64,
    metadata: String,
    generation: i64,
    state: String,
    source_id: Option<Uuid>,
    error: Option<String>,
    created_ms: i64,
    updated_ms: i64,
    expires_ms: i64,
}

impl TryFrom<ResumableRow> for ResumableUpload {
    type Error = StoreError;

    fn try_from(r: ResumableRow) -> StoreResult<Self> {
        Ok(ResumableUpload {
            id: r.id,
            organization_id: r.organization_id,
            directory_id: r.directory_id,
            length: r.upload_length.map(|n| n.max(0) as u64),
            offset: r.upload_offset.max(0) as u64,
            metadata: r.metadata,
            generation: r.generation,
            state: parse_state(&r.state)?,
            source_id: r.source_id,
            error: r.error,
            created_at: at(r.created_ms),
            updated_at: at(r.updated_ms),
            expires_at: at(r.expires_ms),
        })
    }
}

#[derive(FromRow)]
pub(crate) struct PartRow {
    start_offset: i64,
    byte_size: i64,
    object_key: String,
}

impl From<PartRow> for ResumablePart {
    fn from(r: PartRow) -> Self {
        ResumablePart {
            start: r.start_offset.max(0) as u64,
            byte_size: r.byte_size.max(0) as u64,
            object_key: r.object_key,
        }
    }
}

pub(crate) fn parse_state(s: &str) -> StoreResult<ResumableState> {
    ResumableState::parse(s)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown resumable upload state {s:?}")))
}
