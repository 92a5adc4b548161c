//! The upload's work once the handler has a byte stream: hash it, write it to the object
//! store, feed it to the [`FilePlanner`], commit the result in one transaction and publish the
//! chunks.
//!
//! Nothing here knows HTTP: inputs are a stream of bytes and plain settings, failures a
//! [`PipelineError`] the handler turns into a problem+json answer. That keeps the rules about
//! what is stored and when (a rejected file leaves no object; a committed one belongs to its
//! source) in one place that the handler's form reading cannot blur.

use futures::StreamExt;
use orbit_adapters::blob::{self, BlobStore};
use orbit_adapters::metrics::{Publisher, METRICS as QUEUE_METRICS};
use orbit_adapters::queue::Queue;
use orbit_config::Settings;
use orbit_core::domain::csv::TextEncoding;
use orbit_core::domain::header::ColumnMapping;
use orbit_core::domain::merge::MergeRules;
use orbit_core::domain::InvalidCsv;
use orbit_core::ingest::{FilePlan, FilePlanner, PlannerOptions};
use orbit_core::model::{
    upload_options_fingerprint, ChunkRef, Compression, IdempotencyClaim, NewSource, NewUpload,
    Source,
};
use orbit_store::{Store, StoreError};
use orbit_worker::metrics::METRICS as WORKER_METRICS;
use sha2::{Digest, Sha256};
use tracing::field::Empty;
use tracing::Instrument as _;
use uuid::Uuid;

use super::decode::Decoded;

/// Why the pipeline stopped; `E` is the byte stream's own error.
pub enum PipelineError<E> {
    /// The request body could not be read.
    Body(E),
    /// The file is over `ingest.max_upload_bytes` (the limit), decompressed.
    TooLarge(u64),
    /// The compressed file is over `ingest.max_compressed_upload_bytes` (the limit).
    CompressedTooLarge(u64),
    /// The compressed stream could not be decoded: `offset` compressed bytes were read.
    Corrupt {
        compression: Compression,
        offset: u64,
        detail: String,
    },
    /// The planner refused the file.
    Rejected(InvalidCsv),
    /// The object store failed; the text says how, for the client.
    ObjectStore(String),
}

/// The form fields that steer how the file is read; all must come before the `file` field.
#[derive(Default)]
pub struct Hints {
    pub delimiter: Option<u8>,
    pub encoding: Option<TextEncoding>,
    pub mapping: Option<ColumnMapping>,
    pub merge: MergeRules,
    pub dry_run: bool,
}

impl Hints {
    /// What a replay must match besides the file (see [`upload_options_fingerprint`]).
    pub fn fingerprint(&self) -> Option<String> {
        upload_options_fingerprint(self.mapping.as_ref(), &self.merge, self.dry_run)
    }
}

/// A file read in full: either stored and planned, or (for a replay) only hashed.
pub enum FileRead {
    Stored(Box<StoredFile>),
    Hashed { sha256: String },
}

pub struct StoredFile {
    pub source_id: Uuid,
    pub object_key: String,
    pub filename: String,
    pub byte_size: u64,
    pub sha256: String,
    pub compression: Compression,
    pub received_bytes: u64,
    pub plan: FilePlan,
    pub dry_run: bool,
}

/// Hashes the file (decompressed) without keeping it, for a replay to compare with the
/// original.
pub async fn hash_only<E>(
    mut body: Decoded<'_, E>,
    max: u64,
) -> Result<FileRead, PipelineError<E>> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(bytes) = body.csv.next().await.transpose()? {
        size += bytes.len() as u64;
        if size > max {
            return Err(PipelineError::TooLarge(max));
        }
        hasher.update(&bytes);
    }
    Ok(FileRead::Hashed {
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Streams the file (decompressed) once into the object store and the planner. On any
/// failure the object is dropped before returning; a future dropped mid-way leaves that to the
/// writer's own clean-up.
pub async fn store_file<E>(
    blobs: &dyn BlobStore,
    settings: &Settings,
    org: Uuid,
    filename: String,
    mut body: Decoded<'_, E>,
    hints: &Hints,
) -> Result<StoredFile, PipelineError<E>> {
    let ingest = &settings.ingest;
    let source_id = Uuid::now_v7();
    let object_key = blob::object_key(org, source_id);
    let mut planner = FilePlanner::new(PlannerOptions {
        sync_rows: ingest.sync_rows,
        chunk_rows: ingest.chunk_rows,
        max_field_bytes: ingest.max_field_bytes,
        max_columns: ingest.max_columns,
        max_header_bytes: ingest.max_header_bytes,
        encoding_hint: hints.encoding,
        delimiter_hint: hints.delimiter,
        rules: ingest.row_rules(),
        mapping: hints.mapping.clone(),
        merge: hints.merge.clone(),
    });
    let write_span = tracing::info_span!(
        "upload.object_write",
        object_store = blobs.backend(),
        orbit.bytes = Empty,
    );
    let plan_span = tracing::info_span!("upload.plan", orbit.rows = Empty, orbit.chunks = Empty,);
    let mut writer = blobs
        .begin(&object_key)
        .instrument(write_span.clone())
        .await
        .map_err(|e| {
            let detail = format!("the object store is unavailable: {e}");
            orbit_adapters::telemetry::record_error(&write_span, &detail);
            PipelineError::ObjectStore(detail)
        })?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let streamed: Result<(), PipelineError<E>> = async {
        while let Some(bytes) = body.csv.next().await.transpose()? {
            size += bytes.len() as u64;
            if size > ingest.max_upload_bytes {
                return Err(PipelineError::TooLarge(ingest.max_upload_bytes));
            }
            hasher.update(&bytes);
            plan_span
                .in_scope(|| planner.feed(&bytes))
                .map_err(PipelineError::Rejected)?;
            writer
                .write(bytes)
                .instrument(write_span.clone())
                .await
                .map_err(|e| PipelineError::ObjectStore(format!("the object store failed: {e}")))?;
        }
        Ok(())
    }
    .await;
    let plan = streamed.and_then(|()| {
        plan_span
            .in_scope(|| planner.finish())
            .map_err(PipelineError::Rejected)
    });
    if let Ok(plan) = &plan {
        plan_span.record("orbit.rows", plan.total_rows);
        plan_span.record(
            "orbit.chunks",
            plan.chunks.len() + usize::from(plan.sync_chunk.is_some()),
        );
    }
    drop(plan_span);
    write_span.record("orbit.bytes", size);
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => {
            orbit_adapters::telemetry::record_error(&write_span, "upload rejected; object dropped");
            if let Err(abort) = writer.abort().instrument(write_span.clone()).await {
                tracing::warn!(error = %abort, key = object_key, "could not drop a rejected upload's object");
            }
            return Err(e);
        }
    };
    writer
        .finish()
        .instrument(write_span.clone())
        .await
        .map_err(|e| {
            let detail = format!("the object store failed: {e}");
            orbit_adapters::telemetry::record_error(&write_span, &detail);
            PipelineError::ObjectStore(detail)
        })?;
    drop(write_span);
    Ok(StoredFile {
        source_id,
        object_key,
        filename,
        byte_size: size,
        sha256: hex::encode(hasher.finalize()),
        compression: body.compression,
        received_bytes: body.received_bytes(),
        plan,
        dry_run: hints.dry_run,
    })
}

/// What the request holds that its source takes over in the commit.
pub struct Held {
    /// The idempotency key's claim, completed with the source's receipt.
    pub claim: Option<IdempotencyClaim>,
    /// The resumable upload whose bytes these are, which records the source.
    pub resumable: Option<Uuid>,
    /// The organization-limit admission, closed: the source counts from then on.
    pub admission: Option<Uuid>,
}

/// Records the source, its chunks, the prefix's rows and the idempotency record in one
/// transaction. Returns without awaiting anything after the commit, so the caller can hand
/// the object and the key over to the source before anything else can interrupt it.
pub async fn commit(
    store: &dyn Store,
    settings: &Settings,
    org: Uuid,
    dir: Uuid,
    file: StoredFile,
    held: Held,
) -> Result<(Source, Vec<ChunkRef>), StoreError> {
    let plan = file.plan;
    let sync_accepted = plan.sync_results.accepted.len() as u64;
    let sync_failed = plan.sync_results.failed.len() as u64;
    // The request's trace context, kept with every chunk for whoever publishes it again.
    let (traceparent, tracestate) =
        orbit_adapters::telemetry::trace_context_of(&tracing::Span::current());
    let commit_span = tracing::info_span!(
        "upload.commit",
        orbit.source_id = %file.source_id,
        orbit.rows.sync = plan.sync_chunk.as_ref().map_or(0, |c| c.row_count),
        orbit.chunks.queued = plan.chunks.len(),
    );
    let upload = NewUpload {
        source: NewSource {
            id: file.source_id,
            organization_id: org,
            directory_id: dir,
            filename: file.filename,
            byte_size: file.byte_size,
            sha256: file.sha256,
            compression: file.compression,
            received_bytes: file.received_bytes,
            object_key: file.object_key,
            dialect: plan.dialect,
            columns: plan.columns,
            max_field_bytes: settings.ingest.max_field_bytes,
            default_region: settings.ingest.default_region.code(),
            dry_run: file.dry_run,
            total_rows: plan.total_rows,
        },
        sync_chunk: plan.sync_chunk,
        sync_results: plan.sync_results,
        chunks: plan.chunks,
        idempotency: held.claim,
        resumable: held.resumable,
        admission: held.admission,
        traceparent,
        tracestate,
    };
    let committed = store
        .commit_upload(upload)
        .instrument(commit_span.clone())
        .await;
    if let Err(e) = &committed {
        orbit_adapters::telemetry::record_error(&commit_span, &e.to_string());
    }
    drop(commit_span);
    let committed = committed?;
    WORKER_METRICS
        .rows
        .with_label_values(&["accepted"])
        .inc_by(sync_accepted);
    WORKER_METRICS
        .rows
        .with_label_values(&["failed"])
        .inc_by(sync_failed);
    Ok(committed)
}

/// Publishes a committed upload's chunks. A failure is not the upload's: what was not
/// published is marked so, for a reaper to publish.
pub async fn publish(store: &dyn Store, queue: &dyn Queue, queued: &[ChunkRef]) {
    for (i, message) in queued.iter().enumerate() {
        if let Err(e) = orbit_adapters::queue::publish_traced(queue, message, "upload").await {
            // The upload itself has succeeded: a reaper (this gateway's, or a worker's)
            // publishes the chunks on its next pass. The broker already had
            // `queue.reconnect_timeout` to come back, so the rest are not tried one by
            // one, which would hold the answer that long for each.
            QUEUE_METRICS
                .publish_failures
                .with_label_values(&[Publisher::Upload.label()])
                .inc();
            let unpublished = &queued[i..];
            tracing::warn!(chunks = unpublished.len(), error = %e, "publish failed; left to the reaper");
            if let Err(e) = store.mark_unpublished(unpublished).await {
                tracing::warn!(error = %e, "could not mark chunks unpublished; the reaper publishes them after worker.requeue_after");
            }
            break;
        }
    }
}
