//! The JSON bodies that describe a source, shared by the API (which serves them) and the
//! stores (which put a source's body into the webhook event written when it ends).

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::header::ColumnMapping;
use crate::domain::merge::MergeRules;
use crate::model::{Compression, Retrying, Source, SourceError, SourceStatus};

/// The upload response fields: what `csv-upload` answers and replays.
#[derive(Debug, Serialize)]
pub struct UploadBody {
    pub source_id: Uuid,
    pub directory_id: Uuid,
    pub source_status: SourceStatus,
    pub accepted: u64,
    pub failed: u64,
    pub warnings: u64,
    pub is_idempotent: bool,
}

#[derive(Serialize)]
pub struct SourceBody {
    #[serde(flatten)]
    pub upload: UploadBody,
    pub total_rows: u64,
    pub processed_rows: u64,
    pub filename: String,
    /// The CSV's size and SHA-256, decompressed when it came compressed.
    pub byte_size: u64,
    pub sha256: String,
    /// `none`, `gzip` or `zstd`: how the file came, and its size as it came.
    pub compression: Compression,
    pub received_bytes: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<SourceError>,
    /// Present while the source waits out transient trouble rather than failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrying: Option<Retrying>,
    /// Validated only: nothing of it was imported.
    pub dry_run: bool,
    /// The upload's column mapping, as sent; absent when it had none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping: Option<ColumnMapping>,
    /// The merge rules the source's rows were written under, in full (the defaults for an
    /// upload that sent none).
    pub merge: MergeRules,
}

impl From<Source> for SourceBody {
    fn from(s: Source) -> Self {
        SourceBody {
            upload: UploadBody {
                source_id: s.id,
                directory_id: s.directory_id,
                source_status: s.status,
                accepted: s.accepted,
                failed: s.failed,
                warnings: s.warnings,
                is_idempotent: false,
            },
            total_rows: s.total_rows,
            processed_rows: s.processed_rows,
            filename: s.filename,
            byte_size: s.byte_size,
            sha256: s.sha256,
            compression: s.compression,
            received_bytes: s.received_bytes,
            created_at: s.created_at,
            updated_at: s.updated_at,
            completed_at: s.completed_at,
            error: s.error,
            retrying: s.retrying,
            dry_run: s.dry_run,
            mapping: s.columns.mapping,
            merge: s.columns.merge,
        }
    }
}

/// The event types a webhook endpoint can subscribe to: a source ending either way.
pub const WEBHOOK_EVENTS: [&str; 2] = [SOURCE_COMPLETED, SOURCE_FAILED];
pub const SOURCE_COMPLETED: &str = "source.completed";
pub const SOURCE_FAILED: &str = "source.failed";

/// The body of a webhook event (Standard Webhooks): `{"type", "timestamp", "data"}` with the
/// source's status body as `data`. Fixed when the source ends, so every retry sends the same
/// bytes.
pub fn source_event(event: &str, source: Source, at: DateTime<Utc>) -> String {
    serde_json::json!({
        "type": event,
        "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "data": SourceBody::from(source),
    })
    .to_string()
}
