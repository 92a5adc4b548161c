//! The records every backend stores and every layer passes around.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::csv::Dialect;
use crate::domain::header::{ColumnMap, ColumnMapping};
use crate::domain::merge::MergeRules;
use crate::domain::resolve::ProfileState;
use crate::domain::row::{FailedRow, RecordDraft, Severity};

#[derive(Debug, Clone, Serialize)]
pub struct Organization {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Directory {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub name: String,
    pub archived: bool,
    pub created_at: DateTime<Utc>,
    pub archived_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub organization_id: Uuid,
    pub user_id: Uuid,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceStatus {
    Pending,
    Processing,
    Completed,
    Failed,
}

impl SourceStatus {
    pub const ALL: [SourceStatus; 4] = [
        SourceStatus::Pending,
        SourceStatus::Processing,
        SourceStatus::Completed,
        SourceStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceStatus::Pending => "pending",
            SourceStatus::Processing => "processing",
            SourceStatus::Completed => "completed",
            SourceStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, SourceStatus::Completed | SourceStatus::Failed)
    }
}

/// How an uploaded file was compressed, told by its first bytes whatever its name or headers.
/// The object store keeps the CSV decompressed (docs/imports.md, "Compressed files").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The most leading bytes [`Compression::sniff`] needs.
    pub const MAGIC_LEN: usize = 4;

    /// What a file starting with `head` is: gzip (RFC 1952's `1f 8b`), zstd (a frame's
    /// `28 b5 2f fd`), or anything else, read as text. `head` is the file's first
    /// [`Compression::MAGIC_LEN`] bytes, or all of a shorter file.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Compression::None, Compression::Gzip, Compression::Zstd]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// Where a resumable (tus) upload is (docs/imports.md, "Resumable uploads"). Only `Receiving`
/// takes bytes; every other state is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResumableState {
    /// Taking `PATCH`es; once every byte has come, the import starts from here.
    Receiving,
    /// The import recorded a source (`source_id`).
    Imported,
    /// The import refused the file (`error` says why, as the problem document it answered).
    Failed,
    /// Nothing came for `ingest.resumable_ttl`: its bytes were removed.
    Expired,
    /// Deleted by its client (tus termination); the record goes once its bytes have.
    Terminated,
}

impl ResumableState {
    pub fn as_str(self) -> &'static str {
        match self {
            ResumableState::Receiving => "receiving",
            ResumableState::Imported => "imported",
            ResumableState::Failed => "failed",
            ResumableState::Expired => "expired",
            ResumableState::Terminated => "terminated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            ResumableState::Receiving,
            ResumableState::Imported,
            ResumableState::Failed,
            ResumableState::Expired,
            ResumableState::Terminated,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// A resumable upload as stored: how much of it has come, durably, and what became of it.
#[derive(Debug, Clone)]
pub struct ResumableUpload {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub directory_id: Uuid,
    /// `Upload-Length`; `None` while the client defers it.
    pub length: Option<u64>,
    /// Bytes stored and recorded: what `HEAD` reports and the next `PATCH` must start at.
    pub offset: u64,
    /// `Upload-Metadata` as the client sent it.
    pub metadata: String,
    /// Bumped by every `PATCH` that takes the upload over: a part is recorded only by the
    /// generation that wrote it, so an older `PATCH` still running can never add to it.
    pub generation: i64,
    pub state: ResumableState,
    pub source_id: Option<Uuid>,
    /// The problem document (JSON) of a refused import.
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When a receiving upload expires unless more bytes come; for a finished one, when its
    /// record is forgotten.
    pub expires_at: DateTime<Utc>,
}

impl ResumableUpload {
    /// Every byte has come: what remains is the import.
    pub fn is_complete(&self) -> bool {
        self.length == Some(self.offset)
    }

    /// Expired by `now`: marked so by a sweep, or receiving past its expiry before one ran.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        match self.state {
            ResumableState::Expired => true,
            ResumableState::Receiving => self.expires_at <= now,
            _ => false,
        }
    }
}

/// One stored piece of a resumable upload: bytes `start..start + byte_size` in `object_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumablePart {
    pub start: u64,
    pub byte_size: u64,
    pub object_key: String,
}

/// A resumable upload to create.
#[derive(Debug, Clone)]
pub struct NewResumable {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub directory_id: Uuid,
    pub length: Option<u64>,
    pub metadata: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Source {
    pub id: Uuid,
    /// Creation order across the whole store: the version of every profile write it makes.
    pub seq: i64,
    pub organization_id: Uuid,
    pub directory_id: Uuid,
    pub status: SourceStatus,
    pub filename: String,
    /// The CSV's size and hash, decompressed: the bytes stored and read.
    pub byte_size: u64,
    pub sha256: String,
    /// How the file came over the wire, and how many bytes did.
    pub compression: Compression,
    pub received_bytes: u64,
    pub object_key: String,
    pub dialect: Dialect,
    pub columns: ColumnMap,
    /// The row rules of the upload, so every worker judges rows as the gateway did.
    pub max_field_bytes: usize,
    pub default_region: String,
    /// Validate only: rows are counted and their problems kept, but no record, profile or
    /// identity is written.
    pub dry_run: bool,
    pub total_rows: u64,
    pub processed_rows: u64,
    pub accepted: u64,
    pub failed: u64,
    pub warnings: u64,
    pub error: Option<SourceError>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// Set while some unfinished chunk of the source is failing on transient trouble (storage,
    /// network, database): the oldest such run. Filled only where a source is served to
    /// clients.
    pub retrying: Option<Retrying>,
}

/// A source waiting out transient trouble: since when, and what its last attempt said.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Retrying {
    pub since: DateTime<Utc>,
    pub message: String,
}

/// A row-aligned byte range of a source's object, processed as one unit of work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSpec {
    pub index: u32,
    pub first_row: u64,
    pub row_count: u64,
    pub start_offset: u64,
    pub end_offset: u64,
    pub start_line: u64,
}

/// Where a committed slice of a chunk ends. A worker commits a chunk in slices of
/// `worker.slice_rows` rows, each in its own fenced transaction, so that it holds one slice in
/// memory rather than the whole chunk; the chunk remembers where the next slice starts, and a
/// worker that takes the chunk over after a crash starts there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceEnd {
    /// The slice holds the chunk's last rows: the chunk is done.
    Chunk,
    /// The chunk goes on from this record.
    Before(Resume),
}

/// The first record a chunk has not committed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Its byte offset in the file.
    pub offset: u64,
    /// The physical line it starts on.
    pub line: u64,
    /// Its row number.
    pub row: u64,
}

/// A message on the queue: ids only; the database holds the truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The directory the chunk's rows go to: where its rows live, on a sharded database (a
    /// message from before it was carried has the nil id, finds no chunk and is dropped; the
    /// reaper publishes that chunk again with it).
    #[serde(default)]
    pub directory_id: Uuid,
    pub source_id: Uuid,
    pub chunk_id: Uuid,
    pub attempt: u32,
    /// W3C trace context of the upload that queued the chunk (or of whoever published it
    /// again on the upload's behalf), so the worker's spans join the upload's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// Published by the reaper for a chunk whose lease is void (its worker died or froze):
    /// the worker takes this chunk over before choosing by fair shares, so recovery does not
    /// wait its turn behind other organizations' work, which it already had.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub takeover: bool,
}

/// A directory with a chunk ready to run, as the fair scheduler sees it: its organization's
/// weight and the oldest such chunk.
#[derive(Debug, Clone)]
pub struct ReadyChunk {
    pub waiting: crate::domain::fair::Waiting,
    pub chunk: ChunkRef,
    pub rows: u64,
}

impl AsRef<crate::domain::fair::Waiting> for ReadyChunk {
    fn as_ref(&self) -> &crate::domain::fair::Waiting {
        &self.waiting
    }
}

/// A chunk claimed by one worker: writes of its results hold only while the lease does.
#[derive(Debug, Clone)]
pub struct Lease {
    pub directory_id: Uuid,
    pub chunk_id: Uuid,
    pub source_id: Uuid,
    pub token: Uuid,
    pub attempt: u32,
}

#[derive(Debug, Clone)]
pub struct ChunkWork {
    pub lease: Lease,
    pub chunk: ChunkSpec,
    pub source: Source,
}

#[derive(Debug)]
pub enum Claim {
    Claimed(Box<ChunkWork>),
    /// Done already, its source is terminal, or it no longer exists: the message is stale.
    Nothing,
    /// Another worker holds an unexpired lease.
    Busy,
    /// Over its attempts: the chunk and its source were failed.
    Poisoned,
}

/// The validated rows of one chunk, ready to be materialized.
#[derive(Debug, Default)]
pub struct ChunkResults {
    pub accepted: Vec<RecordDraft>,
    pub failed: Vec<FailedRow>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    Done {
        source_completed: bool,
    },
    /// The lease was lost (expired and taken over): nothing of this slice was written.
    LeaseLost,
}

/// What asking to retry a source did.
#[derive(Debug)]
pub enum Retried {
    NotFound,
    /// Only a failed source can be retried.
    NotFailed(Source),
    /// Failed, but with no unfinished chunk: its rows were all processed (a count mismatch).
    NothingToRetry(Source),
    /// Processing again; these chunks are to be published.
    Reopened(Source, Vec<ChunkRef>),
}

/// A webhook endpoint: where an organization's source events go.
#[derive(Debug, Clone)]
pub struct WebhookEndpoint {
    pub id: Uuid,
    pub organization_id: Uuid,
    /// Only this directory's sources; `None` for every directory of the organization.
    pub directory_id: Option<Uuid>,
    pub url: String,
    pub events: Vec<String>,
    /// `whsec_<base64>`: the HMAC key, base64 after the prefix.
    pub secret: String,
    /// Failed attempts in a row, across deliveries; a success resets it.
    pub failure_run: u32,
    /// Set once `failure_run` reached `webhooks.disable_after`: nothing is sent until enabled.
    pub disabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// One event for one endpoint, from the outbox, with its attempts.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookDelivery {
    /// The `webhook-id` header, the same on every attempt.
    pub id: String,
    pub event_type: String,
    pub source_id: Uuid,
    /// `pending`, `delivered` or `failed` (out of attempts).
    pub state: String,
    pub attempt_count: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub attempts: Vec<DeliveryAttempt>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryAttempt {
    pub attempt: u32,
    pub at: DateTime<Utc>,
    /// The receiver's status code; absent when no answer came (timeout, refused, …).
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A delivery a dispatcher has leased and is to send.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    /// The directory of the source the delivery tells of, where the delivery is stored.
    pub directory_id: Uuid,
    pub id: Uuid,
    pub endpoint_id: Uuid,
    pub url: String,
    pub secret: String,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u32,
    pub lease_token: Uuid,
}

/// What an attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptNext {
    Delivered,
    RetryAt(DateTime<Utc>),
    /// Out of attempts: the delivery is `failed`.
    GiveUp,
}

/// `msg_<uuid>`: how a delivery's id is shown, and sent as `webhook-id`.
pub fn webhook_id(id: Uuid) -> String {
    format!("msg_{}", id.simple())
}

/// What asking to cancel a source did.
#[derive(Debug)]
pub enum Cancelled {
    NotFound,
    /// Completed or failed already: nothing left to stop.
    Terminal(Source),
    /// Failed now with `error.code = "cancelled"`; what was committed before stays.
    Cancelled(Source),
}

/// The error code of a source a client cancelled.
pub const CANCELLED: &str = "cancelled";

pub struct NewSource {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub directory_id: Uuid,
    pub filename: String,
    pub byte_size: u64,
    pub sha256: String,
    pub compression: Compression,
    pub received_bytes: u64,
    pub object_key: String,
    pub dialect: Dialect,
    pub columns: ColumnMap,
    pub max_field_bytes: usize,
    pub default_region: String,
    pub dry_run: bool,
    pub total_rows: u64,
}

/// Everything an upload writes, in one transaction: the source, its queued chunks, the results
/// of the synchronous prefix, and the idempotency record's response.
pub struct NewUpload {
    pub source: NewSource,
    /// The synchronous prefix: row-aligned like any chunk, so that it can be redone from the
    /// object if the transaction is replayed.
    pub sync_chunk: Option<ChunkSpec>,
    pub sync_results: ChunkResults,
    pub chunks: Vec<ChunkSpec>,
    pub idempotency: Option<IdempotencyClaim>,
    /// The resumable upload whose bytes these are: the commit records the source on it, and
    /// fails should it have one already, so an upload imports once however often it is tried.
    pub resumable: Option<Uuid>,
    /// The organization-limit admission the upload held: closed in the same transaction, so
    /// the source takes over its count with no round trip or `fsync` of its own.
    pub admission: Option<Uuid>,
    /// The upload's W3C trace context, kept with each chunk so that a chunk published again
    /// later (by the reaper) still leads back to the upload's trace.
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// The response fields of an upload, kept to replay it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReceipt {
    pub source_id: Uuid,
    pub directory_id: Uuid,
    pub source_status: SourceStatus,
    pub accepted: u64,
    pub failed: u64,
    pub warnings: u64,
    /// [`upload_options_fingerprint`] of the upload; absent for a plain upload, so receipts
    /// kept before options existed still replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<String>,
}

impl UploadReceipt {
    pub fn of(source: &Source) -> Self {
        UploadReceipt {
            source_id: source.id,
            directory_id: source.directory_id,
            source_status: source.status,
            accepted: source.accepted,
            failed: source.failed,
            warnings: source.warnings,
            options: upload_options_fingerprint(
                source.columns.mapping.as_ref(),
                &source.columns.merge,
                source.dry_run,
            ),
        }
    }
}

/// What an idempotent replay must match besides the file's bytes: the upload's options that
/// change what is imported (the column mapping, the merge rules, a dry run). `None` when there
/// are none, as before options existed.
pub fn upload_options_fingerprint(
    mapping: Option<&ColumnMapping>,
    merge: &MergeRules,
    dry_run: bool,
) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mapping = mapping.filter(|m| !m.is_empty());
    if mapping.is_none() && merge.is_default() && !dry_run {
        return None;
    }
    // A BTreeMap serializes in key order: the same options always hash the same. Default
    // rules stay out, so that receipts kept before merge rules existed still match.
    let mut canonical = serde_json::json!({ "mapping": mapping, "dry_run": dry_run });
    if !merge.is_default() {
        canonical["merge"] = serde_json::to_value(merge).expect("merge rules serialize");
    }
    Some(hex::encode(Sha256::digest(canonical.to_string())))
}

#[derive(Debug, Clone)]
pub struct IdempotencyClaim {
    pub organization_id: Uuid,
    pub directory_id: Uuid,
    pub key: String,
    pub token: Uuid,
}

#[derive(Debug, Clone)]
pub enum KeyState {
    /// This request owns the key now.
    Claimed(IdempotencyClaim),
    /// Another request holds it and has not finished.
    InFlight,
    /// The key was used on another directory of the organization within its lifetime.
    OtherDirectory,
    /// A finished request: replay it if directory and file match.
    Completed {
        directory_id: Uuid,
        sha256: String,
        receipt: UploadReceipt,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct RowIssue {
    pub row_number: u64,
    pub line_number: u64,
    pub severity: Severity,
    pub code: String,
    pub column: Option<String>,
    pub message: String,
    pub value: Option<String>,
}

#[derive(Debug, Clone)]
pub struct StoredFailedRow {
    pub row_number: u64,
    pub line_number: u64,
    pub fields: Vec<String>,
    pub error_code: String,
    pub error_message: String,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub id: Uuid,
    pub directory_id: Uuid,
    pub state: ProfileState,
    /// (kind, value) identities the profile holds.
    pub identities: Vec<(String, String)>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A keyset position: the sort key of the last item of the previous page (the second part is
/// a tie-breaker where the first is not unique, else 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(pub i64, pub i64);

#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub after: Option<Cursor>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}
