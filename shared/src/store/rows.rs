//! Row shapes both SQL backends share: the schemas use the same column names and types
//! (UUIDs, BIGINT millisecond timestamps, JSON kept as TEXT), so one mapping serves both.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{StoreError, StoreResult};
use crate::domain::csv::{Dialect, TextEncoding};
use crate::domain::row::{IssueCode, Severity};
use crate::model::*;

pub(super) fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

pub(super) fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(super) fn now_ms() -> i64 {
    ms(Utc::now())
}

pub(super) fn dur_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Back-off before a failed chunk is tried again: longer with each attempt, at most a minute.
pub(super) fn retry_backoff_ms(attempt: u32) -> i64 {
    500i64.saturating_mul(1 << attempt.min(7)).min(60_000)
}

#[derive(FromRow)]
pub(super) struct SourceRow {
    id: Uuid,
    seq: i64,
    organization_id: Uuid,
    directory_id: Uuid,
    status: String,
    filename: String,
    byte_size: i64,
    sha256: String,
    object_key: String,
    encoding: String,
    delimiter: i64,
    bom_len: i64,
    columns: String,
    max_field_bytes: i64,
    default_region: String,
    total_rows: i64,
    processed_rows: i64,
    accepted: i64,
    failed: i64,
    warnings: i64,
    error_code: Option<String>,
    error_message: Option<String>,
    created_ms: i64,
    updated_ms: i64,
    completed_ms: Option<i64>,
}

impl TryFrom<SourceRow> for Source {
    type Error = StoreError;

    fn try_from(r: SourceRow) -> StoreResult<Source> {
        Ok(Source {
            id: r.id,
            seq: r.seq,
            organization_id: r.organization_id,
            directory_id: r.directory_id,
            status: SourceStatus::parse(&r.status)
                .ok_or_else(|| StoreError::Corrupt(format!("source status {:?}", r.status)))?,
            filename: r.filename,
            byte_size: r.byte_size as u64,
            sha256: r.sha256,
            object_key: r.object_key,
            dialect: Dialect {
                encoding: TextEncoding::from_hint(&r.encoding)
                    .ok_or_else(|| StoreError::Corrupt(format!("encoding {:?}", r.encoding)))?,
                delimiter: r.delimiter as u8,
                bom_len: r.bom_len as u64,
            },
            columns: serde_json::from_str(&r.columns)?,
            max_field_bytes: r.max_field_bytes as usize,
            default_region: r.default_region,
            total_rows: r.total_rows as u64,
            processed_rows: r.processed_rows as u64,
            accepted: r.accepted as u64,
            failed: r.failed as u64,
            warnings: r.warnings as u64,
            error: r.error_code.map(|code| SourceError {
                code,
                message: r.error_message.unwrap_or_default(),
            }),
            created_at: at(r.created_ms),
            updated_at: at(r.updated_ms),
            completed_at: r.completed_ms.map(at),
        })
    }
}

#[derive(FromRow)]
pub(super) struct DirectoryRow {
    pub seq: i64,
    id: Uuid,
    organization_id: Uuid,
    name: String,
    created_ms: i64,
    archived_ms: Option<i64>,
}

impl From<DirectoryRow> for Directory {
    fn from(r: DirectoryRow) -> Directory {
        Directory {
            id: r.id,
            organization_id: r.organization_id,
            name: r.name,
            archived: r.archived_ms.is_some(),
            created_at: at(r.created_ms),
            archived_at: r.archived_ms.map(at),
        }
    }
}

#[derive(FromRow)]
pub(super) struct TokenRow {
    organization_id: Uuid,
    user_id: Uuid,
    expires_ms: Option<i64>,
    revoked_ms: Option<i64>,
}

impl From<TokenRow> for TokenRecord {
    fn from(r: TokenRow) -> TokenRecord {
        TokenRecord {
            organization_id: r.organization_id,
            user_id: r.user_id,
            expires_at: r.expires_ms.map(at),
            revoked_at: r.revoked_ms.map(at),
        }
    }
}

#[derive(FromRow)]
pub(super) struct ChunkRow {
    idx: i64,
    first_row: i64,
    row_count: i64,
    start_offset: i64,
    end_offset: i64,
    start_line: i64,
}

impl From<ChunkRow> for ChunkSpec {
    fn from(r: ChunkRow) -> ChunkSpec {
        ChunkSpec {
            index: r.idx as u32,
            first_row: r.first_row as u64,
            row_count: r.row_count as u64,
            start_offset: r.start_offset as u64,
            end_offset: r.end_offset as u64,
            start_line: r.start_line as u64,
        }
    }
}

#[derive(FromRow)]
pub(super) struct ProfileRow {
    pub seq: i64,
    id: Uuid,
    directory_id: Uuid,
    state: String,
    created_ms: i64,
    updated_ms: i64,
}

impl TryFrom<ProfileRow> for Profile {
    type Error = StoreError;

    fn try_from(r: ProfileRow) -> StoreResult<Profile> {
        Ok(Profile {
            id: r.id,
            directory_id: r.directory_id,
            state: serde_json::from_str(&r.state)?,
            identities: Vec::new(),
            created_at: at(r.created_ms),
            updated_at: at(r.updated_ms),
        })
    }
}

#[derive(FromRow)]
pub(super) struct IssueRow {
    pub id: i64,
    row_number: i64,
    line_number: i64,
    code: String,
    column_name: String,
    message: String,
    value: Option<String>,
}

impl From<IssueRow> for RowIssue {
    fn from(r: IssueRow) -> RowIssue {
        RowIssue {
            row_number: r.row_number as u64,
            line_number: r.line_number as u64,
            severity: IssueCode::parse(&r.code).map_or(Severity::Error, IssueCode::severity),
            code: r.code,
            column: (!r.column_name.is_empty()).then_some(r.column_name),
            message: r.message,
            value: r.value,
        }
    }
}

#[derive(FromRow)]
pub(super) struct FailedRowRow {
    row_number: i64,
    line_number: i64,
    fields: String,
    error_code: String,
    error_message: String,
}

impl TryFrom<FailedRowRow> for StoredFailedRow {
    type Error = StoreError;

    fn try_from(r: FailedRowRow) -> StoreResult<StoredFailedRow> {
        Ok(StoredFailedRow {
            row_number: r.row_number as u64,
            line_number: r.line_number as u64,
            fields: serde_json::from_str(&r.fields)?,
            error_code: r.error_code,
            error_message: r.error_message,
        })
    }
}

/// Keyset pagination: takes one row more than the page to learn whether there is a next one.
pub(super) fn paginate<T>(
    mut items: Vec<T>,
    limit: usize,
    cursor: impl Fn(&T) -> Cursor,
) -> Page<T> {
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(&cursor)
    } else {
        None
    };
    Page { items, next }
}

pub(super) fn page_limit(page: &PageRequest) -> i64 {
    i64::from(page.limit.clamp(1, 1000))
}

/// Counts one chunk's results add to its source.
pub(super) struct Applied {
    pub accepted: u64,
    pub failed: u64,
    pub warnings: u64,
}
