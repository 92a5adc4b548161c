//! `POST …/sources/csv-upload`: the streaming upload pipeline.
//!
//! The file field is streamed once: each piece is hashed, written to the object store and fed
//! to the [`FilePlanner`], which validates the synchronous prefix and cuts the rest into
//! chunks. Then one transaction records the source, its chunks, the prefix's rows and the
//! idempotency record; the chunks are published last. A request that fails before that
//! transaction leaves no object, no source and no key behind.
//!
//! Spans, children of the request's: `upload.object_write` and `upload.plan` (side by side as
//! the file streams in, each entered only while it works), `upload.commit`, then one
//! `chunk.publish` per chunk. The request's trace context is stored with every chunk.

use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use orbit_adapters::blob;
use orbit_adapters::metrics::{Publisher, METRICS as QUEUE_METRICS};
use orbit_core::domain::csv::{delimiter_from_hint, TextEncoding};
use orbit_core::domain::header::{ColumnMapping, MAPPING_ERROR_PREFIX};
use orbit_core::domain::InvalidCsv;
use orbit_core::ingest::{FilePlan, FilePlanner, PlannerOptions};
use orbit_worker::metrics::METRICS as WORKER_METRICS;

use crate::metrics::METRICS;
use orbit_core::model::{
    upload_options_fingerprint, IdempotencyClaim, KeyState, NewSource, NewUpload, SourceStatus,
    UploadReceipt,
};
use sha2::{Digest, Sha256};
use tracing::field::Empty;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{parse_id, Caller};
use crate::problem::{ApiError, ApiResult};
use crate::routes::sources::UploadBody;

/// Text fields are tiny; anything bigger is not what the client meant to send.
const MAX_TEXT_FIELD_BYTES: usize = 1024;
/// `Retry-After` of a `503 too_many_uploads`, in seconds.
const UPLOAD_RETRY_AFTER_SECS: &str = "5";
/// Room for the multipart framing and text fields around the file, in the early size check.
const MULTIPART_OVERHEAD_BYTES: u64 = 1 << 20;

/// The form fields that steer how the file is read; all must come before the `file` field.
#[derive(Default)]
struct Hints {
    delimiter: Option<u8>,
    encoding: Option<TextEncoding>,
    mapping: Option<ColumnMapping>,
    dry_run: bool,
}

impl Hints {
    /// What a replay must match besides the file (see [`upload_options_fingerprint`]).
    fn fingerprint(&self) -> Option<String> {
        upload_options_fingerprint(self.mapping.as_ref(), self.dry_run)
    }
}

/// A file read in full: either stored and planned, or (for a replay) only hashed.
enum FileRead {
    Stored(Box<StoredFile>),
    Hashed { sha256: String },
}

struct StoredFile {
    source_id: Uuid,
    object_key: String,
    filename: String,
    byte_size: u64,
    sha256: String,
    plan: FilePlan,
    dry_run: bool,
}

/// What the idempotency key said before the file was read.
enum KeyPlan {
    None,
    Claimed(IdempotencyClaim),
    /// A finished request with this key on this directory: hash the file and compare.
    Replay {
        sha256: String,
        receipt: UploadReceipt,
    },
}

pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, dir)): Path<(String, String)>,
    request: Request,
) -> ApiResult<Response> {
    let org = caller.scope(&org)?;
    let dir = parse_id(&dir, "directory")?;
    let headers = request.headers().clone();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the CSV as multipart/form-data with a `file` field",
        ));
    }
    let header_key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map_err(|_| bad_key()).and_then(validate_key))
        .transpose()?;
    let directory = state.store.get_directory(org, dir).await?.ok_or_else(|| {
        ApiError::not_found(
            "directory_not_found",
            "no such directory in this organization",
        )
    })?;
    if directory.archived {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "directory_archived",
            "the directory is archived and takes no uploads",
        ));
    }
    let max = state.settings.ingest.max_upload_bytes;
    if content_length(&headers).is_some_and(|n| n > max + MULTIPART_OVERHEAD_BYTES) {
        return Err(too_large(max));
    }
    // Held until the response is made: each upload holds a part buffer and an object writer.
    let _slot = state.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_uploads",
            format!(
                "{} uploads are streaming already; send this one again shortly",
                state.settings.http.max_uploads
            ),
        )
        .with_header(header::RETRY_AFTER, UPLOAD_RETRY_AFTER_SECS)
    })?;
    let multipart = Multipart::from_request(request, &state)
        .await
        .map_err(|e| ApiError::invalid_request(format!("malformed multipart body: {e}")))?;

    let mut upload = Upload {
        state: &state,
        org,
        dir,
        key: header_key,
        key_plan: KeyPlan::None,
        file: None,
        object: None,
        options: None,
    };
    let longest = state.settings.ingest.max_upload_duration;
    let result = tokio::select! {
        result = tokio::time::timeout(longest, upload.run(multipart)) => result.unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_timeout",
                format!(
                    "the upload took longer than the {} allowed",
                    humantime::format_duration(longest)
                ),
            )
            .with_header(header::CONNECTION, "close"))
        }),
        () = state.cancel.cancelled() => Err(ApiError::unavailable(
            "the gateway is shutting down; nothing of this upload was kept, send it again",
        )
        .with_header(header::CONNECTION, "close")),
    };
    if result.is_err() {
        upload.clean_up().await;
    }
    result
}

struct Upload<'a> {
    state: &'a AppState,
    org: Uuid,
    dir: Uuid,
    key: Option<String>,
    key_plan: KeyPlan,
    file: Option<FileRead>,
    /// The object this request stored, until a committed source owns it.
    object: Option<String>,
    /// The fingerprint of the upload's options, fixed once the file field starts.
    options: Option<String>,
}

impl Upload<'_> {
    async fn run(&mut self, mut multipart: Multipart) -> ApiResult<Response> {
        let mut hints = Hints::default();
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_owned();
            match name.as_str() {
                "file" => {
                    if self.file.is_some() {
                        return Err(ApiError::invalid_request("send exactly one `file` field"));
                    }
                    self.options = hints.fingerprint();
                    if let Some(response) = self.settle_key().await? {
                        return Ok(response);
                    }
                    let read = match &self.key_plan {
                        KeyPlan::Replay { .. } => self.hash_only(field).await?,
                        _ => self.store_file(field, &hints).await?,
                    };
                    self.file = Some(read);
                }
                "idempotency_key" => {
                    let value = validate_key(&read_text(field).await?)?;
                    match &self.key {
                        Some(existing) if *existing != value => {
                            // Each is well formed; together they contradict each other, which the
                            // request's syntax (and so the OpenAPI document) cannot rule out.
                            return Err(ApiError::new(
                                StatusCode::UNPROCESSABLE_ENTITY,
                                "idempotency_key_mismatch",
                                "the Idempotency-Key header and the idempotency_key field differ",
                            ));
                        }
                        _ => self.key = Some(value),
                    }
                }
                "mapping" => {
                    if self.file.is_some() {
                        return Err(ApiError::invalid_request(
                            "the `mapping` field must come before the `file` field",
                        ));
                    }
                    let limit = self.state.settings.ingest.max_mapping_bytes;
                    let value = read_text_limited(field, limit).await?;
                    let mapping =
                        ColumnMapping::parse(&value).map_err(ApiError::invalid_request)?;
                    hints.mapping = (!mapping.is_empty()).then_some(mapping);
                }
                "dry_run" => {
                    if self.file.is_some() {
                        return Err(ApiError::invalid_request(
                            "the `dry_run` field must come before the `file` field",
                        ));
                    }
                    hints.dry_run = match read_text(field).await?.trim() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(ApiError::invalid_request("dry_run must be true or false"))
                        }
                    };
                }
                "delimiter" | "encoding" => {
                    if self.file.is_some() {
                        return Err(ApiError::invalid_request(format!(
                            "the `{name}` field must come before the `file` field"
                        )));
                    }
                    let value = read_text(field).await?;
                    if name == "delimiter" {
                        hints.delimiter = Some(delimiter_from_hint(&value).ok_or_else(|| {
                            ApiError::invalid_request("delimiter must be one of , ; \\t |")
                        })?);
                    } else {
                        hints.encoding =
                            Some(TextEncoding::from_hint(&value).ok_or_else(|| {
                                ApiError::invalid_request(
                                "encoding must be one of utf-8, utf-16, windows-1252, iso-8859-1",
                            )
                            })?);
                    }
                }
                // Unknown fields are read past, so clients may send extra metadata.
                _ => drain(field).await?,
            }
        }
        if self.file.is_none() {
            return Err(ApiError::invalid_request(
                "the multipart body has no `file` field",
            ));
        }
        // A key sent after the file is settled now, against the hash we already have.
        if let Some(response) = self.settle_key().await? {
            return Ok(response);
        }
        match self.file.take() {
            Some(FileRead::Hashed { sha256 }) => self.replay(&sha256),
            Some(FileRead::Stored(file)) => self.commit(*file).await,
            None => unreachable!("checked above"),
        }
    }

    /// Claims the key, or answers from it. Returns a response when the request ends here.
    async fn settle_key(&mut self) -> ApiResult<Option<Response>> {
        let Some(key) = self.key.clone() else {
            return Ok(None);
        };
        if !matches!(self.key_plan, KeyPlan::None) {
            return Ok(None);
        }
        let settings = &self.state.settings.idempotency;
        let state = self
            .state
            .store
            .claim_idempotency_key(
                self.org,
                &key,
                self.dir,
                &self.state.process,
                settings.ttl,
                settings.in_flight_timeout,
            )
            .await?;
        match state {
            KeyState::Claimed(claim) => self.key_plan = KeyPlan::Claimed(claim),
            KeyState::InFlight => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    "a request with this idempotency key is still in progress",
                )
                .with_header(header::RETRY_AFTER, "1"))
            }
            KeyState::Completed {
                directory_id,
                sha256,
                receipt,
            } => {
                if directory_id != self.dir {
                    return Err(key_reused());
                }
                if let Some(FileRead::Stored(file)) = &self.file {
                    // The file was stored before the key arrived: compare, then drop our copy.
                    let same = file.sha256 == sha256 && receipt.options == self.options;
                    self.clean_up().await;
                    return if same {
                        self.replay_receipt(receipt).map(Some)
                    } else {
                        Err(key_reused())
                    };
                }
                self.key_plan = KeyPlan::Replay { sha256, receipt };
            }
        }
        Ok(None)
    }

    fn replay(&self, sha256: &str) -> ApiResult<Response> {
        match &self.key_plan {
            KeyPlan::Replay {
                sha256: original,
                receipt,
            } if original == sha256 && receipt.options == self.options => {
                self.replay_receipt(receipt.clone())
            }
            _ => Err(key_reused()),
        }
    }

    fn replay_receipt(&self, receipt: UploadReceipt) -> ApiResult<Response> {
        let mut response = receipt_response(self.org, receipt, true);
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        Ok(response)
    }

    async fn hash_only(&self, mut field: Field<'_>) -> ApiResult<FileRead> {
        let max = self.state.settings.ingest.max_upload_bytes;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(bytes) = field.chunk().await.map_err(multipart_error)? {
            METRICS.upload_bytes.inc_by(bytes.len() as u64);
            size += bytes.len() as u64;
            if size > max {
                return Err(too_large(max));
            }
            hasher.update(&bytes);
        }
        Ok(FileRead::Hashed {
            sha256: hex::encode(hasher.finalize()),
        })
    }

    async fn store_file(&mut self, mut field: Field<'_>, hints: &Hints) -> ApiResult<FileRead> {
        let settings = &self.state.settings;
        let ingest = &settings.ingest;
        let source_id = Uuid::now_v7();
        let object_key = blob::object_key(self.org, source_id);
        let filename = field
            .file_name()
            .map(|n| {
                n.chars()
                    .filter(|c| !c.is_control())
                    .take(255)
                    .collect::<String>()
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "upload.csv".to_owned());
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
        });
        let write_span = tracing::info_span!(
            "upload.object_write",
            object_store = self.state.blobs.backend(),
            orbit.bytes = Empty,
        );
        let plan_span =
            tracing::info_span!("upload.plan", orbit.rows = Empty, orbit.chunks = Empty,);
        let mut writer = self
            .state
            .blobs
            .begin(&object_key)
            .instrument(write_span.clone())
            .await
            .map_err(|e| {
                let e = ApiError::unavailable(format!("the object store is unavailable: {e}"));
                orbit_adapters::telemetry::record_error(&write_span, &e.detail);
                e
            })?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let streamed: ApiResult<()> = async {
            while let Some(bytes) = field.chunk().await.map_err(multipart_error)? {
                METRICS.upload_bytes.inc_by(bytes.len() as u64);
                size += bytes.len() as u64;
                if size > ingest.max_upload_bytes {
                    return Err(too_large(ingest.max_upload_bytes));
                }
                hasher.update(&bytes);
                plan_span
                    .in_scope(|| planner.feed(&bytes))
                    .map_err(plan_error)?;
                writer
                    .write(bytes)
                    .instrument(write_span.clone())
                    .await
                    .map_err(|e| ApiError::unavailable(format!("the object store failed: {e}")))?;
            }
            Ok(())
        }
        .await;
        let plan =
            streamed.and_then(|()| plan_span.in_scope(|| planner.finish()).map_err(plan_error));
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
                orbit_adapters::telemetry::record_error(
                    &write_span,
                    "upload rejected; object dropped",
                );
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
                let e = ApiError::unavailable(format!("the object store failed: {e}"));
                orbit_adapters::telemetry::record_error(&write_span, &e.detail);
                e
            })?;
        drop(write_span);
        self.object = Some(object_key.clone());
        Ok(FileRead::Stored(Box::new(StoredFile {
            source_id,
            object_key,
            filename,
            byte_size: size,
            sha256: hex::encode(hasher.finalize()),
            plan,
            dry_run: hints.dry_run,
        })))
    }

    async fn commit(&mut self, file: StoredFile) -> ApiResult<Response> {
        let claim = match &self.key_plan {
            KeyPlan::Claimed(claim) => Some(claim.clone()),
            _ => None,
        };
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
                organization_id: self.org,
                directory_id: self.dir,
                filename: file.filename,
                byte_size: file.byte_size,
                sha256: file.sha256,
                object_key: file.object_key,
                dialect: plan.dialect,
                columns: plan.columns,
                max_field_bytes: self.state.settings.ingest.max_field_bytes,
                default_region: self.state.settings.ingest.default_region.code(),
                dry_run: file.dry_run,
                total_rows: plan.total_rows,
            },
            sync_chunk: plan.sync_chunk,
            sync_results: plan.sync_results,
            chunks: plan.chunks,
            idempotency: claim,
            traceparent,
            tracestate,
        };
        let committed = self
            .state
            .store
            .commit_upload(upload)
            .instrument(commit_span.clone())
            .await;
        if let Err(e) = &committed {
            orbit_adapters::telemetry::record_error(&commit_span, &e.to_string());
        }
        drop(commit_span);
        let (source, queued) = committed?;
        // Committed: from here on the key and the object belong to the source.
        self.key_plan = KeyPlan::None;
        self.object = None;
        WORKER_METRICS
            .rows
            .with_label_values(&["accepted"])
            .inc_by(sync_accepted);
        WORKER_METRICS
            .rows
            .with_label_values(&["failed"])
            .inc_by(sync_failed);
        for (i, message) in queued.iter().enumerate() {
            if let Err(e) =
                orbit_adapters::queue::publish_traced(&*self.state.queue, message, "upload").await
            {
                // The upload itself has succeeded: a reaper (this gateway's, or a worker's)
                // publishes the chunks on its next pass. The broker already had
                // `queue.reconnect_timeout` to come back, so the rest are not tried one by
                // one, which would hold the answer that long for each.
                QUEUE_METRICS
                    .publish_failures
                    .with_label_values(&[Publisher::Upload.label()])
                    .inc();
                let unpublished: Vec<_> = queued[i..].iter().map(|m| m.chunk_id).collect();
                tracing::warn!(chunks = unpublished.len(), error = %e, "publish failed; left to the reaper");
                if let Err(e) = self.state.store.mark_unpublished(&unpublished).await {
                    tracing::warn!(error = %e, "could not mark chunks unpublished; the reaper publishes them after worker.requeue_after");
                }
                break;
            }
        }
        tracing::info!(source = %source.id, rows = source.total_rows, chunks = queued.len(), status = source.status.as_str(), dry_run = source.dry_run, "upload recorded");
        Ok(receipt_response(
            self.org,
            UploadReceipt::of(&source),
            false,
        ))
    }

    /// Drops what a failed request made: its object and its key claim.
    async fn clean_up(&mut self) {
        if let Some(key) = self.object.take() {
            if let Err(e) = self.state.blobs.delete(&key).await {
                tracing::warn!(error = %e, key, "could not delete the object of a failed upload");
            }
        }
        if let KeyPlan::Claimed(claim) = std::mem::replace(&mut self.key_plan, KeyPlan::None) {
            if let Err(e) = self.state.store.release_idempotency_key(&claim).await {
                tracing::warn!(error = %e, "could not release an idempotency key");
            }
        }
    }
}

impl Drop for Upload<'_> {
    /// A request dropped mid-way (the client went away, or the connection was dropped at
    /// shutdown) never reaches `clean_up`: its object and key claim are released here, on a
    /// task of their own that shutdown waits for.
    fn drop(&mut self) {
        let object = self.object.take();
        let claim = match std::mem::replace(&mut self.key_plan, KeyPlan::None) {
            KeyPlan::Claimed(claim) => Some(claim),
            _ => None,
        };
        if object.is_none() && claim.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.state.store.clone();
        let blobs = self.state.blobs.clone();
        self.state.cleanups.spawn_on(
            async move {
                if let Some(key) = object {
                    if let Err(e) = blobs.delete(&key).await {
                        tracing::warn!(error = %e, key, "could not delete the object of a dropped upload");
                    }
                }
                if let Some(claim) = claim {
                    if let Err(e) = store.release_idempotency_key(&claim).await {
                        tracing::warn!(error = %e, "could not release the key of a dropped upload");
                    }
                }
            },
            &runtime,
        );
    }
}

fn receipt_response(org: Uuid, receipt: UploadReceipt, is_idempotent: bool) -> Response {
    let status = match (is_idempotent, receipt.source_status) {
        (true, _) => StatusCode::OK,
        (false, SourceStatus::Completed | SourceStatus::Failed) => StatusCode::CREATED,
        (false, _) => StatusCode::ACCEPTED,
    };
    let location = format!(
        "/v2/organizations/{org}/directories/{}/sources/{}",
        receipt.directory_id, receipt.source_id
    );
    let body = UploadBody {
        source_id: receipt.source_id,
        directory_id: receipt.directory_id,
        source_status: receipt.source_status,
        accepted: receipt.accepted,
        failed: receipt.failed,
        warnings: receipt.warnings,
        is_idempotent,
    };
    (status, [(header::LOCATION, location)], Json(body)).into_response()
}

/// A file the planner refused: the client's mapping not fitting the header is a bad request,
/// anything else a bad file.
fn plan_error(e: InvalidCsv) -> ApiError {
    if e.0.starts_with(MAPPING_ERROR_PREFIX) {
        ApiError::invalid_request(e.0)
    } else {
        ApiError::invalid_csv(e.0)
    }
}

fn validate_key(raw: &str) -> ApiResult<String> {
    if raw.is_empty() || raw.len() > 255 || !raw.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(bad_key());
    }
    Ok(raw.to_owned())
}

fn bad_key() -> ApiError {
    ApiError::invalid_request("the idempotency key must be 1 to 255 printable ASCII characters")
}

fn key_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this idempotency key was used for a different file or directory",
    )
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "upload_too_large",
        format!("the file is larger than the {max} bytes allowed"),
    )
}

fn multipart_error(e: MultipartError) -> ApiError {
    ApiError::invalid_request(format!("malformed multipart body: {}", e.body_text()))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

async fn read_text(field: Field<'_>) -> ApiResult<String> {
    read_text_limited(field, MAX_TEXT_FIELD_BYTES).await
}

async fn read_text_limited(mut field: Field<'_>, limit: usize) -> ApiResult<String> {
    let name = field.name().unwrap_or_default().to_owned();
    let mut out = Vec::new();
    while let Some(bytes) = field.chunk().await.map_err(multipart_error)? {
        out.extend_from_slice(&bytes);
        if out.len() > limit {
            return Err(ApiError::invalid_request(format!(
                "the `{name}` field is longer than the {limit} bytes allowed"
            )));
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::invalid_request(format!("the `{name}` field is not UTF-8")))
}

async fn drain(mut field: Field<'_>) -> ApiResult<()> {
    while field.chunk().await.map_err(multipart_error)?.is_some() {}
    Ok(())
}
