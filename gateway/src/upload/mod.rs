//! `POST …/sources/csv-upload`: the handler, which reads the multipart form and answers.
//!
//! The file field is streamed once: each piece is hashed, written to the object store and fed
//! to the planner, which validates the synchronous prefix and cuts the rest into
//! chunks. Then one transaction records the source, its chunks, the prefix's rows and the
//! idempotency record; the chunks are published last. A request that fails before that
//! transaction leaves no object, no source and no key behind.
//!
//! Spans, children of the request's: `upload.object_write` and `upload.plan` (side by side as
//! the file streams in, each entered only while it works), `upload.commit`, then one
//! `chunk.publish` per chunk. The request's trace context is stored with every chunk.
//!
//! - this file: the axum handler, the form's fields, the request's clean-up and the answer;
//! - `idempotency.rs`: claiming, settling, replaying and releasing the idempotency key;
//! - `decode.rs`: telling a gzip or zstd file by its first bytes and decompressing it as it
//!   streams;
//! - `limits.rs`: admitting the upload under its organization's limits, or refusing it (`429`)
//!   before the body is read;
//! - `pipeline.rs`: hashing, the object write, the planner, the commit and the publish, with no
//!   HTTP in it.

use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use orbit_core::domain::csv::{delimiter_from_hint, TextEncoding};
use orbit_core::domain::header::{ColumnMapping, MAPPING_ERROR_PREFIX};
use orbit_core::domain::merge::MergeRules;
use orbit_core::domain::InvalidCsv;
use orbit_core::model::{SourceStatus, UploadReceipt};
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{parse_id, Caller};
use crate::problem::{ApiError, ApiResult};
use crate::types::UploadBody;
use decode::Decoded;
use idempotency::{bad_key, validate_key, KeyPlan};
use limits::Admitted;
use pipeline::{FileRead, Hints, StoredFile};

pub mod decode;
mod idempotency;
mod limits;
mod pipeline;
pub mod resumable;

pub use pipeline::PipelineError;

/// Text fields are tiny; anything bigger is not what the client meant to send.
const MAX_TEXT_FIELD_BYTES: usize = 1024;
/// `Retry-After` of a `503 too_many_uploads`, in seconds.
const UPLOAD_RETRY_AFTER_SECS: &str = "5";
/// Room for the multipart framing and text fields around the file, in the early size check.
const MULTIPART_OVERHEAD_BYTES: u64 = 1 << 20;

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
    writable_directory(&state, org, dir).await?;
    let ingest = &state.settings.ingest;
    // A body past both limits is refused before it is read: it is too large either way.
    let max = ingest
        .max_upload_bytes
        .max(ingest.max_compressed_upload_bytes);
    if content_length(&headers).is_some_and(|n| n > max + MULTIPART_OVERHEAD_BYTES) {
        return Err(too_large(max));
    }
    // Held until the response is made: each upload holds a part buffer and an object writer.
    let _slot = upload_slot(&state)?;
    // Last before the body: a refusal here has read nothing of it and stored nothing.
    let admitted = limits::admit(&state, org, dir, header_key.as_deref()).await?;
    let mut upload = Upload {
        state: &state,
        org,
        dir,
        key: header_key,
        key_plan: KeyPlan::None,
        file: None,
        object: None,
        options: None,
        admitted,
        resumable: None,
    };
    let multipart = Multipart::from_request(request, &state)
        .await
        .map_err(|e| ApiError::invalid_request(format!("malformed multipart body: {e}")));
    let multipart = match multipart {
        Ok(multipart) => multipart,
        Err(e) => {
            upload.release_admission().await;
            return Err(e);
        }
    };
    let longest = state.settings.ingest.max_upload_duration;
    let run = async { upload.run(multipart).await.map(|o| o.response(org)) };
    let result = tokio::select! {
        result = tokio::time::timeout(longest, run) => result.unwrap_or_else(|_| {
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
    // Whatever did not record a source (a failure, a replay) gives its admission back.
    upload.release_admission().await;
    result
}

/// One of the `http.max_uploads` slots of uploads streaming at once, or `503 too_many_uploads`.
fn upload_slot(state: &AppState) -> ApiResult<tokio::sync::OwnedSemaphorePermit> {
    state.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_uploads",
            format!(
                "{} uploads are streaming already; send this one again shortly",
                state.settings.http.max_uploads
            ),
        )
        .with_header(header::RETRY_AFTER, UPLOAD_RETRY_AFTER_SECS)
    })
}

/// Checks that `dir` is `org`'s and takes uploads, as read within `http.lookup_ttl`
/// ([`crate::recent`]): an upload that starts just after another gateway archived it is
/// taken, as it would have been a moment earlier.
async fn writable_directory(state: &AppState, org: Uuid, dir: Uuid) -> ApiResult<()> {
    let directory = state
        .directories
        .get_or_load(&(org, dir), || state.store.get_directory(org, dir))
        .await?
        .ok_or_else(ApiError::directory_not_found)?;
    if directory.archived {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "directory_archived",
            "the directory is archived and takes no uploads",
        ));
    }
    Ok(())
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
    /// What the organization's limits said: an admission, held until a source is recorded.
    admitted: Admitted,
    /// The resumable upload whose bytes these are, recorded with the source.
    resumable: Option<Uuid>,
}

impl Upload<'_> {
    async fn run(&mut self, mut multipart: Multipart) -> ApiResult<Outcome> {
        let mut hints = Hints::default();
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_owned();
            match name.as_str() {
                "file" => {
                    if self.file.is_some() {
                        return Err(ApiError::invalid_request("send exactly one `file` field"));
                    }
                    self.options = hints.fingerprint();
                    if let Some(outcome) = self.settle_key().await? {
                        return Ok(outcome);
                    }
                    let filename = field.file_name().map(str::to_owned);
                    let ingest = &self.state.settings.ingest;
                    let body = decode::open(field, decode_limits(ingest))
                        .await
                        .map_err(|e| pipeline_error(e, multipart_error))?;
                    self.file = Some(
                        self.read_file(filename, body, &hints, multipart_error)
                            .await?,
                    );
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
                "mapping" | "merge" | "dry_run" | "delimiter" | "encoding" => {
                    if self.file.is_some() {
                        return Err(ApiError::invalid_request(format!(
                            "the `{name}` field must come before the `file` field"
                        )));
                    }
                    let limit = hint_limit(&name, &self.state.settings.ingest);
                    let value = read_bytes(field, limit).await?;
                    apply_hint(&mut hints, &name, &value, &self.state.settings.ingest)?;
                }
                // Unknown fields are read past, so clients may send extra metadata.
                _ => drain(field).await?,
            }
        }
        self.finish().await
    }

    /// Imports a file read from somewhere else than a form (a resumable upload's parts), as
    /// `run` imports the `file` field: same key, same pipeline, same commit.
    async fn run_file<E: Send>(
        &mut self,
        hints: &Hints,
        filename: Option<String>,
        body: Decoded<'_, E>,
        body_error: fn(E) -> ApiError,
    ) -> ApiResult<Outcome> {
        self.options = hints.fingerprint();
        if let Some(outcome) = self.settle_key().await? {
            return Ok(outcome);
        }
        self.file = Some(self.read_file(filename, body, hints, body_error).await?);
        self.finish().await
    }

    /// Stores and plans the file, or (for a replay) only hashes it.
    async fn read_file<E: Send>(
        &mut self,
        filename: Option<String>,
        body: Decoded<'_, E>,
        hints: &Hints,
        body_error: fn(E) -> ApiError,
    ) -> ApiResult<FileRead> {
        let failed = |e| pipeline_error(e, body_error);
        let ingest = &self.state.settings.ingest;
        if let KeyPlan::Replay { .. } = self.key_plan {
            return pipeline::hash_only(body, ingest.max_upload_bytes)
                .await
                .map_err(failed);
        }
        let filename = filename
            .map(|n| {
                n.chars()
                    .filter(|c| !c.is_control())
                    .take(255)
                    .collect::<String>()
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "upload.csv".to_owned());
        let file = pipeline::store_file(
            &*self.state.blobs,
            &self.state.settings,
            self.org,
            filename,
            body,
            hints,
        )
        .await
        .map_err(failed)?;
        self.object = Some(file.object_key.clone());
        Ok(FileRead::Stored(Box::new(file)))
    }

    /// Commits the file read, or answers from the key.
    async fn finish(&mut self) -> ApiResult<Outcome> {
        // A key sent after the file is settled now, against the hash we already have.
        if let Some(outcome) = self.settle_key().await? {
            return Ok(outcome);
        }
        match self.file.take() {
            Some(FileRead::Hashed { sha256 }) => self.replay(&sha256),
            Some(FileRead::Stored(file)) => self.commit(*file).await,
            None => Err(ApiError::invalid_request(
                "the multipart body has no `file` field",
            )),
        }
    }

    async fn commit(&mut self, file: StoredFile) -> ApiResult<Outcome> {
        let held = pipeline::Held {
            claim: self.key_plan.claim(),
            resumable: self.resumable,
            admission: match self.admitted {
                Admitted::Counted(admission) => Some(admission),
                _ => None,
            },
        };
        let (source, queued) = pipeline::commit(
            &*self.state.store,
            &self.state.settings,
            self.org,
            self.dir,
            file,
            held,
        )
        .await?;
        // Committed: from here on the key and the object belong to the source, and the
        // organization's in-flight count holds the source instead of the admission, which
        // the commit closed.
        self.key_plan = KeyPlan::None;
        self.object = None;
        self.admitted = Admitted::Unlimited;
        pipeline::publish(&*self.state.store, &*self.state.queue, &queued).await;
        tracing::info!(source = %source.id, rows = source.total_rows, chunks = queued.len(), status = source.status.as_str(), dry_run = source.dry_run, "upload recorded");
        Ok(Outcome {
            receipt: UploadReceipt::of(&source),
            replayed: false,
        })
    }

    /// Gives back the admission of a request that recorded no source.
    async fn release_admission(&mut self) {
        if let Admitted::Counted(admission) =
            std::mem::replace(&mut self.admitted, Admitted::Unlimited)
        {
            if let Err(e) = self.state.store.release_admission(admission).await {
                tracing::warn!(error = %e, %admission, "could not release the admission of an upload");
            }
        }
    }

    /// Drops what a failed request made: its object and its key claim.
    async fn clean_up(&mut self) {
        if let Some(key) = self.object.take() {
            if let Err(e) = self.state.blobs.delete(&key).await {
                tracing::warn!(error = %e, key, "could not delete the object of a failed upload");
            }
        }
        if let Some(claim) = self.key_plan.take_claim() {
            idempotency::release(&*self.state.store, &claim, "an idempotency key").await;
        }
    }
}

impl Drop for Upload<'_> {
    /// A request dropped mid-way (the client went away, or the connection was dropped at
    /// shutdown) never reaches `clean_up`: its object, key claim and admission are released
    /// here, on a task of their own that shutdown waits for.
    fn drop(&mut self) {
        let object = self.object.take();
        let claim = self.key_plan.take_claim();
        let admission = match std::mem::replace(&mut self.admitted, Admitted::Unlimited) {
            Admitted::Counted(admission) => Some(admission),
            _ => None,
        };
        if object.is_none() && claim.is_none() && admission.is_none() {
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
                    idempotency::release(&*store, &claim, "the key of a dropped upload").await;
                }
                if let Some(admission) = admission {
                    if let Err(e) = store.release_admission(admission).await {
                        tracing::warn!(error = %e, %admission, "could not release the admission of a dropped upload");
                    }
                }
            },
            &runtime,
        );
    }
}

/// What an upload came to: a new source's receipt, or an earlier one's, replayed for its key.
pub(crate) struct Outcome {
    pub receipt: UploadReceipt,
    pub replayed: bool,
}

impl Outcome {
    /// The `csv-upload` answer: `201` or `202` with the receipt, `200` for a replay.
    fn response(self, org: Uuid) -> Response {
        let mut response = receipt_response(org, self.receipt, self.replayed);
        if self.replayed {
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
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

/// What the pipeline's failures are to the client; `body` says what a failure to read the body
/// is.
fn pipeline_error<E>(e: PipelineError<E>, body: fn(E) -> ApiError) -> ApiError {
    match e {
        PipelineError::Body(e) => body(e),
        PipelineError::TooLarge(max) => too_large(max),
        PipelineError::CompressedTooLarge(max) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_too_large",
            format!("the compressed file is larger than the {max} bytes allowed"),
        ),
        PipelineError::Corrupt {
            compression,
            offset,
            detail,
        } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_compression",
            format!(
                "the {} stream cannot be decoded after {offset} bytes of the file: {detail}; nothing of it was imported",
                compression.as_str()
            ),
        )
        .with_member("compression", compression.as_str())
        .with_member("offset", offset),
        PipelineError::Rejected(e) => plan_error(e),
        PipelineError::ObjectStore(detail) => ApiError::unavailable(detail),
    }
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

fn decode_limits(ingest: &orbit_config::IngestSettings) -> decode::Limits {
    decode::Limits {
        max_compressed_bytes: ingest.max_compressed_upload_bytes,
        zstd_window_log: ingest.max_zstd_window_log,
    }
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
    let name = field.name().unwrap_or_default().to_owned();
    let bytes = read_bytes(field, MAX_TEXT_FIELD_BYTES).await?;
    if bytes.len() > MAX_TEXT_FIELD_BYTES {
        return Err(too_long(&name, MAX_TEXT_FIELD_BYTES));
    }
    String::from_utf8(bytes)
        .map_err(|_| ApiError::invalid_request(format!("the `{name}` field is not UTF-8")))
}

/// A field's bytes, read up to one past `limit`: enough to tell it is too long.
async fn read_bytes(mut field: Field<'_>, limit: usize) -> ApiResult<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(bytes) = field.chunk().await.map_err(multipart_error)? {
        out.extend_from_slice(&bytes[..bytes.len().min(limit + 1 - out.len())]);
        if out.len() > limit {
            break;
        }
    }
    Ok(out)
}

fn too_long(name: &str, limit: usize) -> ApiError {
    ApiError::invalid_request(format!(
        "the `{name}` field is longer than the {limit} bytes allowed"
    ))
}

/// The most bytes the option `name` may have.
fn hint_limit(name: &str, ingest: &orbit_config::IngestSettings) -> usize {
    match name {
        "mapping" => ingest.max_mapping_bytes,
        "merge" => ingest.max_merge_bytes,
        _ => MAX_TEXT_FIELD_BYTES,
    }
}

/// Sets the option `name` (a form field of `csv-upload`, a metadata key of a resumable upload)
/// from its `value`, checked before anything is stored. A bad `merge` is
/// `400 invalid_merge_rules`, its `key` member naming the key at fault (`merge` itself when
/// the whole value is); any other bad option is `400 invalid_request`.
pub(crate) fn apply_hint(
    hints: &mut Hints,
    name: &str,
    value: &[u8],
    ingest: &orbit_config::IngestSettings,
) -> ApiResult<()> {
    let limit = hint_limit(name, ingest);
    if name == "merge" {
        let refused = |key: String, detail: String| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_merge_rules", detail)
                .with_member("key", key)
        };
        if value.len() > limit {
            return Err(refused(
                "merge".into(),
                format!("merge: the field is longer than the {limit} bytes allowed"),
            ));
        }
        let text = std::str::from_utf8(value)
            .map_err(|_| refused("merge".into(), "merge: the field is not UTF-8".into()))?;
        hints.merge = MergeRules::parse(text).map_err(|e| {
            let key = match e.key.as_str() {
                "" => "merge".to_owned(),
                key => format!("merge.{key}"),
            };
            refused(key, e.to_string())
        })?;
        return Ok(());
    }
    if value.len() > limit {
        return Err(too_long(name, limit));
    }
    let value = std::str::from_utf8(value)
        .map_err(|_| ApiError::invalid_request(format!("the `{name}` field is not UTF-8")))?;
    match name {
        "mapping" => {
            let mapping = ColumnMapping::parse(value).map_err(ApiError::invalid_request)?;
            hints.mapping = (!mapping.is_empty()).then_some(mapping);
        }
        "dry_run" => {
            hints.dry_run = match value.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => return Err(ApiError::invalid_request("dry_run must be true or false")),
            };
        }
        "delimiter" => {
            hints.delimiter =
                Some(delimiter_from_hint(value).ok_or_else(|| {
                    ApiError::invalid_request("delimiter must be one of , ; \\t |")
                })?);
        }
        "encoding" => {
            hints.encoding = Some(TextEncoding::from_hint(value).ok_or_else(|| {
                ApiError::invalid_request(
                    "encoding must be one of utf-8, utf-16, windows-1252, iso-8859-1",
                )
            })?);
        }
        _ => unreachable!("only the options are applied"),
    }
    Ok(())
}

async fn drain(mut field: Field<'_>) -> ApiResult<()> {
    while field.chunk().await.map_err(multipart_error)?.is_some() {}
    Ok(())
}
