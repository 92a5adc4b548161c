//! Row shapes both SQL backends share: the schemas use the same column names and types
//! (UUIDs, BIGINT millisecond timestamps, JSON kept as TEXT), so one mapping serves both.

use chrono::{DateTime, Utc};
use sqlx::FromRow;
use uuid::Uuid;

use super::{StoreError, StoreResult};
use orbit_core::domain::csv::{Dialect, TextEncoding};
use orbit_core::domain::row::{IssueCode, Severity};
use orbit_core::model::*;

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

/// A `processes` row whose heartbeat expired this long ago is deleted: any lease it held has
/// long been taken over.
pub(super) const FORGET_PROCESSES_AFTER_MS: i64 = 24 * 3600 * 1000;

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
    compression: String,
    /// NULL for a file that came as it is stored: `byte_size` bytes.
    received_bytes: Option<i64>,
    object_key: String,
    encoding: String,
    delimiter: i64,
    bom_len: i64,
    columns: String,
    max_field_bytes: i64,
    default_region: String,
    dry_run: bool,
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
    /// Only the queries that serve a source to clients (`sql::SOURCE`, `sql::SOURCES_PAGE`)
    /// select these; elsewhere they read as absent.
    #[sqlx(default)]
    retrying_since_ms: Option<i64>,
    #[sqlx(default)]
    retrying_error: Option<String>,
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
            compression: Compression::parse(&r.compression)
                .ok_or_else(|| StoreError::Corrupt(format!("compression {:?}", r.compression)))?,
            received_bytes: r.received_bytes.unwrap_or(r.byte_size) as u64,
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
            dry_run: r.dry_run,
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
            retrying: r.retrying_since_ms.map(|since| Retrying {
                since: at(since),
                message: r.retrying_error.unwrap_or_default(),
            }),
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
    /// Where the part of the chunk no slice has committed starts; NULL before the first slice.
    resume_offset: Option<i64>,
    resume_line: Option<i64>,
    resume_row: Option<i64>,
}

/// The part of the chunk still to do: all of it, or what follows its committed slices.
impl From<ChunkRow> for ChunkSpec {
    fn from(r: ChunkRow) -> ChunkSpec {
        let (start_offset, start_line, first_row) =
            match (r.resume_offset, r.resume_line, r.resume_row) {
                (Some(offset), Some(line), Some(row)) => (offset, line, row),
                _ => (r.start_offset, r.start_line, r.first_row),
            };
        ChunkSpec {
            index: r.idx as u32,
            first_row: first_row as u64,
            row_count: (r.row_count - (first_row - r.first_row)) as u64,
            start_offset: start_offset as u64,
            end_offset: r.end_offset as u64,
            start_line: start_line as u64,
        }
    }
}

/// Ends a chunk's last slice. (Both dialects read `$n` placeholders.)
pub(super) const CHUNK_DONE: &str = "UPDATE chunks SET state = 'done', lease_token = NULL, lease_owner = NULL, lease_expires_ms = NULL, transient_since_ms = NULL WHERE directory_id = $1 AND id = $2";
/// Ends a slice before the chunk's end: where the next one, or a takeover, starts. A slice
/// committed ends the chunk's run of transient failures, if it was in one: it is moving again.
pub(super) const CHUNK_RESUMES_AT: &str =
    "UPDATE chunks SET resume_offset = $1, resume_line = $2, resume_row = $3, transient_since_ms = NULL WHERE directory_id = $4 AND id = $5";

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

/// A chunk's queue message as read back from its row, to publish again or to choose: the
/// columns `directory_id, source_id, id, attempts, traceparent, tracestate`.
#[derive(FromRow)]
pub(super) struct ChunkMessageRow {
    pub directory_id: Uuid,
    pub source_id: Uuid,
    pub id: Uuid,
    #[sqlx(try_from = "i64")]
    pub attempts: u32,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl ChunkMessageRow {
    /// The message; `takeover` when its lease is void and it is published to be taken over.
    pub(super) fn message(self, takeover: bool) -> ChunkRef {
        ChunkRef {
            directory_id: self.directory_id,
            source_id: self.source_id,
            chunk_id: self.id,
            attempt: self.attempts,
            traceparent: self.traceparent,
            tracestate: self.tracestate,
            takeover,
        }
    }
}

/// What `claim_chunk` found, read under the chunk's row lock.
#[derive(FromRow)]
pub(super) struct ChunkState {
    pub state: String,
    pub source_status: String,
    pub lease_expires_ms: Option<i64>,
    pub lease_owner: Option<String>,
    /// The lease's owner stopped heartbeating: its process is gone. Read apart from the
    /// chunk's row (`store_roles`' `owner_dead`).
    #[sqlx(default)]
    pub owner_dead: bool,
    #[sqlx(try_from = "i64")]
    pub attempts: u32,
    #[sqlx(rename = "idx")]
    pub index: i64,
    pub last_error: Option<String>,
}

pub(super) enum ClaimDecision {
    /// Done, failed, or its source is terminal: the message is stale.
    Nothing,
    Busy,
    /// Out of attempts: fail the source with this message.
    Poison(String),
    /// Take the lease; `Some(reason)` when it takes over another worker's void lease.
    Take(Option<&'static str>),
}

/// The one place that decides a claim, for every backend.
pub(super) fn decide_claim(c: &ChunkState, now: i64, max_attempts: u32) -> ClaimDecision {
    if matches!(c.state.as_str(), "done" | "failed")
        || matches!(c.source_status.as_str(), "completed" | "failed")
    {
        return ClaimDecision::Nothing;
    }
    let running = c.state == "running";
    let unexpired = c.lease_expires_ms.is_some_and(|e| e > now);
    if running && unexpired && !c.owner_dead {
        return ClaimDecision::Busy;
    }
    if c.attempts >= max_attempts {
        return ClaimDecision::Poison(format!(
            "chunk {} failed {} times; last error: {}",
            c.index,
            c.attempts,
            c.last_error
                .as_deref()
                .unwrap_or("its worker stopped before finishing")
        ));
    }
    ClaimDecision::Take(match (running, unexpired) {
        (true, true) => Some("owner_dead"),
        (true, false) => Some("expired"),
        _ => None,
    })
}

/// An idempotency key's row, read under its lock when a request with the same key arrives.
#[derive(FromRow)]
pub(super) struct KeyRow {
    pub state: String,
    pub directory_id: Uuid,
    pub sha256: Option<String>,
    pub response: Option<String>,
    pub locked_ms: i64,
    pub expires_ms: i64,
    /// The process that claimed it stopped heartbeating.
    #[sqlx(default)]
    pub owner_dead: bool,
}

/// The one place that decides what a held key means, for every backend: the answer to replay,
/// a request still running, or `None` when the new request may take the key over (the old
/// answer expired, or the claim's process died or ran past `in_flight_timeout`).
pub(super) fn decide_key(
    k: &KeyRow,
    now: i64,
    in_flight_timeout: std::time::Duration,
) -> StoreResult<Option<KeyState>> {
    if k.state == "completed" && k.expires_ms > now {
        let (Some(sha256), Some(response)) = (&k.sha256, &k.response) else {
            return Err(StoreError::Corrupt(
                "a completed idempotency key without its answer".into(),
            ));
        };
        return Ok(Some(KeyState::Completed {
            directory_id: k.directory_id,
            sha256: sha256.clone(),
            receipt: serde_json::from_str(response)?,
        }));
    }
    let fresh = k.locked_ms > now - in_flight_timeout.as_millis() as i64;
    if k.state == "in_flight" && fresh && !k.owner_dead {
        return Ok(Some(KeyState::InFlight));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(state: &str, locked_ms: i64, expires_ms: i64, owner_dead: bool) -> KeyRow {
        let receipt = UploadReceipt {
            source_id: Uuid::from_u128(7),
            directory_id: Uuid::from_u128(2),
            source_status: SourceStatus::Completed,
            accepted: 3,
            failed: 0,
            warnings: 0,
            options: None,
        };
        KeyRow {
            state: state.into(),
            directory_id: Uuid::from_u128(2),
            sha256: Some("ab".into()),
            response: Some(serde_json::to_string(&receipt).unwrap()),
            locked_ms,
            expires_ms,
            owner_dead,
        }
    }

    #[test]
    fn a_held_key_is_replayed_waited_for_or_taken_over() {
        let timeout = std::time::Duration::from_secs(60);
        let now = 1_000_000;
        let replay = decide_key(&key("completed", 0, now + 1, false), now, timeout).unwrap();
        assert!(matches!(replay, Some(KeyState::Completed { ref sha256, .. }) if sha256 == "ab"));
        assert!(
            decide_key(&key("completed", 0, now, false), now, timeout)
                .unwrap()
                .is_none(),
            "an expired answer is taken over"
        );
        assert!(matches!(
            decide_key(&key("in_flight", now - 1_000, now + 1, false), now, timeout).unwrap(),
            Some(KeyState::InFlight)
        ));
        assert!(
            decide_key(&key("in_flight", now - 1_000, now + 1, true), now, timeout)
                .unwrap()
                .is_none(),
            "a dead process's claim is taken over at once"
        );
        assert!(
            decide_key(
                &key("in_flight", now - 60_000, now + 1, false),
                now,
                timeout
            )
            .unwrap()
            .is_none(),
            "so is one older than in_flight_timeout"
        );
        let mut broken = key("completed", 0, now + 1, false);
        broken.response = None;
        assert!(decide_key(&broken, now, timeout).is_err());
    }

    fn chunk(state: &str, expires: Option<i64>, owner_dead: bool, attempts: u32) -> ChunkState {
        ChunkState {
            state: state.into(),
            source_status: "processing".into(),
            lease_expires_ms: expires,
            lease_owner: Some("w".into()),
            owner_dead,
            attempts,
            index: 3,
            last_error: None,
        }
    }

    #[test]
    fn a_live_owners_unexpired_lease_is_respected() {
        assert!(matches!(
            decide_claim(&chunk("running", Some(2_000), false, 1), 1_000, 5),
            ClaimDecision::Busy
        ));
    }

    #[test]
    fn a_dead_owners_lease_is_void_before_it_expires() {
        assert!(matches!(
            decide_claim(&chunk("running", Some(2_000), true, 1), 1_000, 5),
            ClaimDecision::Take(Some("owner_dead"))
        ));
        assert!(matches!(
            decide_claim(&chunk("running", Some(500), false, 1), 1_000, 5),
            ClaimDecision::Take(Some("expired"))
        ));
        assert!(matches!(
            decide_claim(&chunk("pending", None, false, 0), 1_000, 5),
            ClaimDecision::Take(None)
        ));
    }

    #[test]
    fn attempts_run_out_and_terminal_chunks_are_left_alone() {
        match decide_claim(&chunk("pending", None, false, 5), 1_000, 5) {
            ClaimDecision::Poison(message) => {
                assert!(message.starts_with("chunk 3 failed 5 times"), "{message}")
            }
            _ => panic!("expected poison"),
        }
        assert!(matches!(
            decide_claim(&chunk("done", None, false, 1), 1_000, 5),
            ClaimDecision::Nothing
        ));
    }
}

/// How `release_chunk` leaves a chunk after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Release {
    /// Give the attempt back: the failure said nothing about the chunk's data.
    pub refund: bool,
    /// When the chunk's current run of transient failures began, if it is in one.
    pub transient_since_ms: Option<i64>,
    pub not_before_ms: i64,
}

/// Decides a release, for every backend. A transient failure (storage, network, database)
/// refunds the attempt for as long as the chunk has been failing that way for less than
/// `transient_for`, and backs off by half the time it has been failing (1 s to 30 s), so an
/// outage of any length costs no attempt up to the ceiling. Past it, or for any other failure,
/// the attempt counts, and enough of them poison the chunk.
pub(super) fn decide_release(
    now: i64,
    attempt: u32,
    transient_for: Option<std::time::Duration>,
    transient_since_ms: Option<i64>,
) -> Release {
    match transient_for {
        Some(ceiling) => {
            let since = transient_since_ms.unwrap_or(now);
            let failing_for = now - since;
            Release {
                refund: failing_for < dur_ms(ceiling),
                transient_since_ms: Some(since),
                not_before_ms: now + (failing_for / 2).clamp(1_000, 30_000),
            }
        }
        None => Release {
            refund: false,
            transient_since_ms: None,
            not_before_ms: now + retry_backoff_ms(attempt),
        },
    }
}

#[cfg(test)]
mod release_tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn transient_failures_cost_no_attempt_until_the_ceiling() {
        let ceiling = Some(Duration::from_secs(600));
        let first = decide_release(10_000, 1, ceiling, None);
        assert_eq!(
            first,
            Release {
                refund: true,
                transient_since_ms: Some(10_000),
                not_before_ms: 11_000
            }
        );
        let later = decide_release(70_000, 1, ceiling, Some(10_000));
        assert!(later.refund);
        assert_eq!(later.not_before_ms, 100_000, "backs off by half the outage");
        let past = decide_release(700_000, 1, ceiling, Some(10_000));
        assert!(!past.refund, "past the ceiling the attempt counts");
        assert_eq!(past.not_before_ms, 730_000, "at most 30 s");
    }

    #[test]
    fn other_failures_count_and_end_a_transient_run() {
        let r = decide_release(10_000, 2, None, Some(5_000));
        assert!(!r.refund);
        assert_eq!(r.transient_since_ms, None);
        assert_eq!(r.not_before_ms, 10_000 + retry_backoff_ms(2));
    }
}
