//! Resumable uploads, tus 1.0 (<https://tus.io/protocols/resumable-upload>), at
//! `…/directories/{dir}/uploads`: core, creation, creation-with-upload,
//! creation-defer-length, termination, expiration and checksum (sha1, sha256).
//!
//! The bytes go to the object store as they arrive, in parts of about [`PART_BYTES`], each an
//! object of its own that the store records once it is written: an offset a `204` or a
//! `HEAD` reports is durable, whichever gateway is asked next. Separate objects rather than one
//! S3 multipart upload because a part must never be visible to an upload it does not belong
//! to: a `PATCH` takes the upload over (its generation) before it writes, and records each part
//! only while it still holds it, so a stale `PATCH` (its client gone, its gateway frozen) can
//! write but never add; and because S3's 5 MiB part minimum would not fit clients whose chunks
//! are smaller (tuspy's default is 5 MB). docs/imports.md has the rest.
//!
//! When the last byte is recorded, the parts are read back in order and imported as a
//! `csv-upload`'s file is ([`Upload::run_file`]): same limits, decompression, key, planner and
//! commit, which records the source on the upload in its transaction, so an upload imports
//! once however often its last `PATCH` is sent. Ended uploads' parts are removed right away
//! and, should that fail, by the gateway's sweep ([`sweep`]), which also expires uploads
//! nothing came to for `ingest.resumable_ttl`.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use orbit_adapters::blob::{BlobError, BlobStore, BlobWriter};
use orbit_core::model::{NewResumable, ResumablePart, ResumableState, ResumableUpload};
use orbit_store::resumable::Leftover;
use orbit_store::Store;
use serde::Serialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::idempotency::{validate_key, KeyPlan};
use super::pipeline::Hints;
use super::{
    apply_hint, content_length, decode, decode_limits, limits, pipeline_error, too_large,
    upload_slot, writable_directory, Outcome, Upload,
};
use crate::app::AppState;
use crate::auth::{parse_id, Caller};
use crate::metrics::METRICS;
use crate::problem::{ApiError, ApiResult};

/// The protocol version spoken, in `Tus-Resumable` and `Tus-Version`.
pub const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str =
    "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum";
const CHECKSUM_ALGORITHMS: &str = "sha1,sha256";
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
/// A part is closed and recorded once it holds this many bytes, so a `PATCH` cut off loses at
/// most this much; small enough for the S3 backend to store each part with one `PUT`.
pub const PART_BYTES: u64 = 4 << 20;
/// The response header of an imported upload's last `PATCH` (and its `GET`): the source's URL.
pub const SOURCE_HEADER: &str = "orbit-source-location";
/// Uploads whose parts one sweep removes at most, per round.
const CLEAN_BATCH: u32 = 100;

const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");

/// Adds `Tus-Resumable` to every answer of the upload routes, errors included, as the
/// protocol asks.
pub async fn tus_resumable(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
    response
}

/// `OPTIONS …/uploads`: what this server speaks. Asks no token: it says nothing of anyone's
/// data, and a browser's preflight has none to send.
pub async fn options(State(state): State<AppState>) -> Response {
    let headers = [
        ("tus-version", TUS_VERSION.to_owned()),
        ("tus-extension", EXTENSIONS.to_owned()),
        ("tus-checksum-algorithm", CHECKSUM_ALGORITHMS.to_owned()),
        ("tus-max-size", max_size(&state).to_string()),
    ];
    (StatusCode::NO_CONTENT, headers).into_response()
}

/// `POST …/uploads`: creates an upload, and takes its first bytes if the request has a body
/// (creation-with-upload).
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, dir)): Path<(String, String)>,
    request: Request,
) -> ApiResult<Response> {
    let org = caller.scope(&org)?;
    let dir = parse_id(&dir, "directory")?;
    let headers = request.headers().clone();
    require_tus(&headers)?;
    writable_directory(&state, org, dir).await?;
    let length = header_u64(&headers, &UPLOAD_LENGTH)?;
    let deferred = match headers.get("upload-defer-length") {
        None => false,
        Some(v) if v == "1" => true,
        Some(_) => return Err(ApiError::invalid_request("Upload-Defer-Length must be 1")),
    };
    if length.is_some() == deferred {
        return Err(ApiError::invalid_request(
            "send Upload-Length, or Upload-Defer-Length: 1 if the length is not known yet",
        ));
    }
    let max = max_size(&state);
    if length.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let metadata = headers
        .get("upload-metadata")
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()
        .map_err(|_| ApiError::invalid_request("Upload-Metadata must be ASCII"))?
        .unwrap_or_default();
    // Checked now, so a bad option is refused before any byte is sent.
    Metadata::parse(&metadata, &state.settings.ingest)?;
    let id = Uuid::now_v7();
    let expires_at = expiry(&state);
    state
        .store
        .create_resumable(&NewResumable {
            id,
            organization_id: org,
            directory_id: dir,
            length,
            metadata,
            expires_at,
        })
        .await?;
    let location = upload_path(org, dir, id);
    tracing::info!(upload = %id, length, "resumable upload created");
    let with_body = is_offset_stream(&headers)
        && (content_length(&headers).is_some_and(|n| n > 0)
            || headers.contains_key(header::TRANSFER_ENCODING));
    let patched = if with_body {
        patch_spawned(state, org, dir, id, 0, request.into_body(), headers)
            .await
            .map_err(|e| e.with_header(header::LOCATION, &location))?
    } else {
        Patched {
            offset: 0,
            expires_at,
            source: None,
        }
    };
    let mut response = patched.response(StatusCode::CREATED);
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("a path is a header value"),
    );
    Ok(response)
}

/// `HEAD …/uploads/{id}`: how far the upload has come.
pub async fn head(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, dir, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    require_tus(&headers)?;
    let upload = find(&state, &caller, &org, &dir, &id).await?;
    if upload.state == ResumableState::Receiving && upload.offset > 0 && !upload.is_complete() {
        METRICS.resumable_resumptions.inc();
    }
    let mut response = StatusCode::OK.into_response();
    let out = response.headers_mut();
    out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    out.insert(UPLOAD_OFFSET, upload.offset.into());
    match upload.length {
        Some(length) => out.insert(UPLOAD_LENGTH, length.into()),
        None => out.insert("upload-defer-length", HeaderValue::from_static("1")),
    };
    if !upload.metadata.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&upload.metadata) {
            out.insert("upload-metadata", v);
        }
    }
    if upload.state == ResumableState::Receiving {
        out.insert(UPLOAD_EXPIRES, http_date(upload.expires_at));
    }
    if let Some(source) = upload.source_id {
        let path = source_path(upload.organization_id, upload.directory_id, source);
        out.insert(SOURCE_HEADER, header_value(&path));
    }
    Ok(response)
}

/// `PATCH …/uploads/{id}`: bytes at `Upload-Offset`.
pub async fn patch(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, dir, id)): Path<(String, String, String)>,
    request: Request,
) -> ApiResult<Response> {
    let org = caller.scope(&org)?;
    let dir = parse_id(&dir, "directory")?;
    let id = parse_upload_id(&id)?;
    let headers = request.headers().clone();
    require_tus(&headers)?;
    if !is_offset_stream(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the bytes as {OFFSET_OCTET_STREAM}"),
        ));
    }
    let offset = header_u64(&headers, &UPLOAD_OFFSET)?
        .ok_or_else(|| ApiError::invalid_request("a PATCH needs Upload-Offset"))?;
    let patched = patch_spawned(state, org, dir, id, offset, request.into_body(), headers).await?;
    Ok(patched.response(StatusCode::NO_CONTENT))
}

/// `DELETE …/uploads/{id}`: ends the upload and removes its bytes (termination). An upload
/// that was imported keeps its source.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, dir, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let org = caller.scope(&org)?;
    let dir = parse_id(&dir, "directory")?;
    let id = parse_upload_id(&id)?;
    require_tus(&headers)?;
    if !state.store.terminate_resumable(org, dir, id).await? {
        return Err(not_found());
    }
    clean_up_later(
        &state,
        Leftover {
            directory_id: dir,
            id,
            state: ResumableState::Terminated,
        },
    );
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The upload as JSON (not part of tus): its state, and the source its import recorded.
#[derive(Serialize)]
pub struct UploadView {
    id: Uuid,
    directory_id: Uuid,
    state: ResumableState,
    offset: u64,
    length: Option<u64>,
    metadata: serde_json::Map<String, serde_json::Value>,
    source_id: Option<Uuid>,
    source_url: Option<String>,
    /// The problem document a refused import answered.
    error: Option<serde_json::Value>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
}

/// `GET …/uploads/{id}`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, dir, id)): Path<(String, String, String)>,
) -> ApiResult<Json<UploadView>> {
    let upload = find(&state, &caller, &org, &dir, &id).await?;
    let metadata = parse_pairs(&upload.metadata)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let v = v.map_or(serde_json::Value::Null, |v| {
                serde_json::Value::String(String::from_utf8_lossy(&v).into_owned())
            });
            (k, v)
        })
        .collect();
    Ok(Json(UploadView {
        id: upload.id,
        directory_id: upload.directory_id,
        state: upload.state,
        offset: upload.offset,
        length: upload.length,
        metadata,
        source_id: upload.source_id,
        source_url: upload
            .source_id
            .map(|s| source_path(upload.organization_id, upload.directory_id, s)),
        error: upload
            .error
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok()),
        created_at: upload.created_at,
        updated_at: upload.updated_at,
        expires_at: (upload.state == ResumableState::Receiving).then_some(upload.expires_at),
    }))
}

/// What a `PATCH` left: the offset, when the upload expires, and its source's URL once
/// imported.
struct Patched {
    offset: u64,
    expires_at: DateTime<Utc>,
    source: Option<String>,
}

impl Patched {
    fn response(&self, status: StatusCode) -> Response {
        let mut response = status.into_response();
        let out = response.headers_mut();
        out.insert(UPLOAD_OFFSET, self.offset.into());
        match &self.source {
            Some(path) => {
                out.insert(SOURCE_HEADER, header_value(path));
            }
            None => {
                out.insert(UPLOAD_EXPIRES, http_date(self.expires_at));
            }
        }
        response
    }
}

/// Runs a `PATCH` (or a creation's body) on a task of its own, which the request awaits: a
/// client that goes away mid-body drops the request, not the task, which records what came
/// before it ends (a `PATCH` without a checksum keeps every byte it received).
async fn patch_spawned(
    state: AppState,
    org: Uuid,
    dir: Uuid,
    id: Uuid,
    offset: u64,
    body: Body,
    headers: HeaderMap,
) -> ApiResult<Patched> {
    // Held until the task ends: each PATCH holds a part buffer and an object writer.
    let slot = upload_slot(&state)?;
    let tracker = state.cleanups.clone();
    let task = tracker.spawn(async move {
        let _slot = slot;
        let longest = state.settings.ingest.max_upload_duration;
        tokio::time::timeout(
            longest,
            patch_at(&state, org, dir, id, offset, body, &headers),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_timeout",
                format!(
                    "the PATCH took longer than the {} allowed; HEAD the upload for its offset and go on from there",
                    humantime::format_duration(longest)
                ),
            )
            .with_header(header::CONNECTION, "close"))
        })
    });
    task.await.map_err(ApiError::internal)?
}

async fn patch_at(
    state: &AppState,
    org: Uuid,
    dir: Uuid,
    id: Uuid,
    offset: u64,
    body: Body,
    headers: &HeaderMap,
) -> ApiResult<Patched> {
    let declared = header_u64(headers, &UPLOAD_LENGTH)?;
    let checksum = Checksum::parse(headers)?;
    let max = max_size(state);
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let Some(upload) = state
        .store
        .take_resumable(org, dir, id, offset, Utc::now())
        .await?
    else {
        return explain(state, org, dir, id, offset).await;
    };
    if let (Some(length), Some(declared)) = (upload.length, declared) {
        if length != declared {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "upload_length_mismatch",
                format!("the upload's length is {length} already; it cannot become {declared}"),
            ));
        }
    }
    let limit = upload.length.or(declared).unwrap_or(max);
    if content_length(headers).is_some_and(|n| offset.saturating_add(n) > limit) {
        return Err(past_length(limit));
    }
    let receiver = Receiver {
        state,
        upload: &upload,
        limit,
        length: declared.filter(|_| upload.length.is_none()),
        expires_at: expiry(state),
    };
    let offset = receiver.receive(body, checksum).await?;
    let expires_at = receiver.expires_at;
    let length = upload.length.or(declared);
    if length != Some(offset) {
        return Ok(Patched {
            offset,
            expires_at,
            source: None,
        });
    }
    let upload = ResumableUpload {
        length,
        offset,
        ..upload
    };
    let source = import(state, &upload).await?;
    Ok(Patched {
        offset,
        expires_at,
        source: Some(source_path(org, dir, source)),
    })
}

/// Why a `PATCH` at `offset` could not take the upload over: or, for a repeat of the last
/// `PATCH` of an upload imported since, the same answer again.
async fn explain(
    state: &AppState,
    org: Uuid,
    dir: Uuid,
    id: Uuid,
    offset: u64,
) -> ApiResult<Patched> {
    let upload = state
        .store
        .get_resumable(org, dir, id)
        .await?
        .ok_or_else(not_found)?;
    if upload.is_expired(Utc::now()) {
        return Err(expired());
    }
    match upload.state {
        ResumableState::Imported if offset == upload.offset => {
            return Ok(Patched {
                offset,
                expires_at: upload.expires_at,
                source: upload.source_id.map(|s| source_path(org, dir, s)),
            })
        }
        ResumableState::Failed if offset == upload.offset => {
            return Err(upload
                .error
                .as_deref()
                .and_then(ApiError::from_document)
                .unwrap_or_else(|| ApiError::internal("a failed upload kept no error")))
        }
        _ => {}
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "upload_offset_mismatch",
        format!(
            "the upload is at offset {}, not {offset}: send the bytes from there",
            upload.offset
        ),
    )
    .with_member("offset", upload.offset)
    .with_header(UPLOAD_OFFSET, &upload.offset.to_string()))
}

/// A `PATCH` holding the upload (its generation): writes the body into parts and records them.
struct Receiver<'a> {
    state: &'a AppState,
    upload: &'a ResumableUpload,
    /// The most bytes the upload may have: its length, or the size limit while deferred.
    limit: u64,
    /// A length the client declares with this `PATCH`, to record with its first part.
    length: Option<u64>,
    expires_at: DateTime<Utc>,
}

/// A part being written.
struct OpenPart {
    writer: Box<dyn BlobWriter>,
    part: ResumablePart,
}

impl Receiver<'_> {
    /// Streams `body` into parts; the upload's offset after it. Without a checksum every part
    /// is recorded once written, so a body cut off keeps what came; with one, nothing is
    /// recorded before the whole body has been checked.
    async fn receive(&self, body: Body, checksum: Option<Checksum>) -> ApiResult<u64> {
        let mut body = body.into_data_stream();
        let mut hasher = checksum.as_ref().map(Checksum::hasher);
        let mut length = self.length;
        let mut recorded = self.upload.offset;
        let mut written = recorded;
        let mut open: Option<OpenPart> = None;
        let mut held: Vec<ResumablePart> = Vec::new();
        let broken = loop {
            let next = tokio::select! {
                next = body.next() => next,
                () = self.state.cancel.cancelled() => break Some(ApiError::unavailable(
                    "the gateway is shutting down; HEAD the upload for its offset and go on from there",
                ).with_header(header::CONNECTION, "close")),
            };
            let bytes = match next {
                None => break None,
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => {
                    break Some(ApiError::invalid_request(format!(
                        "the request body broke off: {e}"
                    )))
                }
            };
            METRICS.resumable_bytes.inc_by(bytes.len() as u64);
            if written + bytes.len() as u64 > self.limit {
                self.discard(open, &held).await;
                return Err(past_length(self.limit));
            }
            if let Some(hasher) = &mut hasher {
                hasher.update(&bytes);
            }
            written += bytes.len() as u64;
            let result = self
                .write(&mut open, written - bytes.len() as u64, bytes)
                .await;
            if let Err(e) = result {
                self.discard(open, &held).await;
                return Err(e);
            }
            if open
                .as_ref()
                .is_some_and(|o| o.part.byte_size >= PART_BYTES)
            {
                let part = self.close(open.take().expect("checked")).await;
                let part = match part {
                    Ok(part) => part,
                    Err(e) => {
                        self.discard(None, &held).await;
                        return Err(e);
                    }
                };
                if hasher.is_some() {
                    held.push(part);
                } else {
                    recorded = self.record(&part, &mut length).await?;
                }
            }
        };
        let broken = match broken {
            // Unchecked bytes are never kept.
            Some(e) if hasher.is_some() => {
                self.discard(open, &held).await;
                return Err(e);
            }
            broken => broken,
        };
        if let Some(part) = open {
            let part = match self.close(part).await {
                Ok(part) => part,
                Err(e) => {
                    self.discard(None, &held).await;
                    return Err(e);
                }
            };
            held.push(part);
        }
        if let (Some(hasher), Some(checksum)) = (hasher, checksum) {
            if hasher.finish() != checksum.digest {
                self.discard(None, &held).await;
                return Err(ApiError::new(
                    StatusCode::from_u16(460).expect("460 is a status"),
                    "checksum_mismatch",
                    format!(
                        "the body's {} does not match Upload-Checksum; none of it was kept",
                        checksum.algorithm
                    ),
                ));
            }
        }
        for (i, part) in held.iter().enumerate() {
            if let Err(e) = self.record(part, &mut length).await {
                self.discard(None, &held[i + 1..]).await;
                return Err(e);
            }
            recorded = part.start + part.byte_size;
        }
        if length.is_some() {
            // A deferred length declared with no bytes to record it with.
            self.advance(None, &mut length).await?;
        }
        match broken {
            Some(e) => Err(e),
            None => Ok(recorded),
        }
    }

    async fn write(&self, open: &mut Option<OpenPart>, start: u64, bytes: Bytes) -> ApiResult<()> {
        if open.is_none() {
            let object_key = part_key(self.upload, start);
            let writer = self
                .state
                .blobs
                .begin(&object_key)
                .await
                .map_err(object_store_error)?;
            *open = Some(OpenPart {
                writer,
                part: ResumablePart {
                    start,
                    byte_size: 0,
                    object_key,
                },
            });
        }
        let part = open.as_mut().expect("opened above");
        part.part.byte_size += bytes.len() as u64;
        part.writer.write(bytes).await.map_err(object_store_error)
    }

    async fn close(&self, open: OpenPart) -> ApiResult<ResumablePart> {
        open.writer.finish().await.map_err(object_store_error)?;
        Ok(open.part)
    }

    /// Records a written part, or removes it if the upload was taken over meanwhile; the
    /// upload's offset after it.
    async fn record(&self, part: &ResumablePart, length: &mut Option<u64>) -> ApiResult<u64> {
        match self.advance(Some(part), length).await {
            Ok(()) => Ok(part.start + part.byte_size),
            Err(e) => {
                self.discard(None, std::slice::from_ref(part)).await;
                Err(e)
            }
        }
    }

    async fn advance(
        &self,
        part: Option<&ResumablePart>,
        length: &mut Option<u64>,
    ) -> ApiResult<()> {
        let u = self.upload;
        let held = self
            .state
            .store
            .add_resumable_part(
                u.directory_id,
                u.id,
                u.generation,
                part,
                *length,
                self.expires_at,
            )
            .await?;
        if !held {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "upload_taken_over",
                "another PATCH took this upload over (or it ended) while this one streamed; HEAD it for its offset",
            ));
        }
        *length = None;
        Ok(())
    }

    /// Removes parts written but not recorded.
    async fn discard(&self, open: Option<OpenPart>, written: &[ResumablePart]) {
        if let Some(open) = open {
            if let Err(e) = open.writer.abort().await {
                tracing::warn!(error = %e, key = open.part.object_key, "could not drop an unrecorded part");
            }
        }
        for part in written {
            if let Err(e) = self.state.blobs.delete(&part.object_key).await {
                tracing::warn!(error = %e, key = part.object_key, "could not delete an unrecorded part");
            }
        }
    }
}

/// Imports a complete upload as `csv-upload` would its file; the source recorded (or, for an
/// idempotency key that replays an earlier upload, that upload's). A file the import refuses
/// ends the upload `failed`, with the answer kept for its `GET` and any repeated `PATCH`; any
/// other failure (the limits, a backend) leaves it complete and receiving, for the client's
/// next `PATCH` to try again.
async fn import(state: &AppState, upload: &ResumableUpload) -> ApiResult<Uuid> {
    let (org, dir, id) = (upload.organization_id, upload.directory_id, upload.id);
    let result = import_once(state, upload).await;
    let leftover = |state| Leftover {
        directory_id: dir,
        id,
        state,
    };
    match result {
        Ok(outcome) => {
            if outcome.replayed
                && !state
                    .store
                    .imported_resumable(dir, id, outcome.receipt.source_id)
                    .await?
            {
                return settled(state, org, dir, id).await;
            }
            clean_up_later(state, leftover(ResumableState::Imported));
            tracing::info!(upload = %id, source = %outcome.receipt.source_id, replayed = outcome.replayed, "resumable upload imported");
            Ok(outcome.receipt.source_id)
        }
        Err(e) if refuses_the_file(&e) => {
            state.store.fail_resumable(dir, id, &e.document()).await?;
            clean_up_later(state, leftover(ResumableState::Failed));
            Err(e)
        }
        // Another gateway imported it meanwhile (the commit found the upload linked already),
        // or this was tried again after a failure: the upload says which.
        Err(e) => settled(state, org, dir, id).await.map_err(|_| e),
    }
}

/// The source of an upload imported by someone else; an error if it was not.
async fn settled(state: &AppState, org: Uuid, dir: Uuid, id: Uuid) -> ApiResult<Uuid> {
    match state.store.get_resumable(org, dir, id).await? {
        Some(ResumableUpload {
            state: ResumableState::Imported,
            source_id: Some(source),
            ..
        }) => Ok(source),
        _ => Err(ApiError::internal(
            "the upload's import ended without a source",
        )),
    }
}

/// A `4xx` about the file or its options, which another try cannot change; a limit (`429`)
/// or a key still in flight (`409`) can.
fn refuses_the_file(e: &ApiError) -> bool {
    matches!(e.status.as_u16(), 400 | 413 | 422)
}

async fn import_once(state: &AppState, upload: &ResumableUpload) -> ApiResult<Outcome> {
    let (org, dir) = (upload.organization_id, upload.directory_id);
    let meta = Metadata::parse(&upload.metadata, &state.settings.ingest)?;
    let parts = state.store.resumable_parts(dir, upload.id).await?;
    let mut next = 0;
    for part in &parts {
        if part.start != next {
            return Err(ApiError::internal(format!(
                "upload {} has no part at offset {next}",
                upload.id
            )));
        }
        next += part.byte_size;
    }
    if Some(next) != upload.length {
        return Err(ApiError::internal(format!(
            "upload {}'s parts hold {next} bytes, not its length",
            upload.id
        )));
    }
    let admitted = limits::admit(state, org, dir, meta.key.as_deref()).await?;
    let blobs = state.blobs.clone();
    let body = futures::stream::iter(parts)
        .then(move |part| {
            let blobs = blobs.clone();
            async move { blobs.read_range(&part.object_key, 0, part.byte_size).await }
        })
        .try_flatten()
        .boxed();
    let mut run = Upload {
        state,
        org,
        dir,
        key: meta.key,
        key_plan: KeyPlan::None,
        file: None,
        object: None,
        options: None,
        admitted,
        resumable: Some(upload.id),
    };
    let result = async {
        let body = decode::open(body, decode_limits(&state.settings.ingest))
            .await
            .map_err(|e| pipeline_error(e, parts_unreadable))?;
        run.run_file(&meta.hints, meta.filename, body, parts_unreadable)
            .await
    }
    .await;
    if result.is_err() {
        run.clean_up().await;
    }
    run.release_admission().await;
    result
}

fn parts_unreadable(e: BlobError) -> ApiError {
    ApiError::unavailable(format!(
        "the upload's bytes could not be read back from the object store: {e}"
    ))
}

/// Removes an ended upload's parts on a task of its own (shutdown waits for it); what it
/// cannot remove is left to the sweep.
fn clean_up_later(state: &AppState, leftover: Leftover) {
    let (store, blobs) = (state.store.clone(), state.blobs.clone());
    state.cleanups.spawn(async move {
        if let Err(e) = remove_parts(&*store, &*blobs, &leftover).await {
            tracing::warn!(error = %e, upload = %leftover.id, "could not remove an ended upload's parts; the sweep will");
        }
    });
}

async fn remove_parts(
    store: &dyn Store,
    blobs: &dyn BlobStore,
    leftover: &Leftover,
) -> anyhow::Result<()> {
    for part in store
        .resumable_parts(leftover.directory_id, leftover.id)
        .await?
    {
        blobs.delete(&part.object_key).await?;
    }
    store.cleaned_resumable(leftover).await?;
    Ok(())
}

/// Expires the uploads nothing came to for `ingest.resumable_ttl`, removes the parts of every
/// ended upload, and forgets ended uploads whose records expired. Run by the gateway's sweep.
pub async fn sweep(store: &dyn Store, blobs: &dyn BlobStore, ttl: Duration) -> anyhow::Result<()> {
    let expired = store.expire_resumables(Utc::now(), ttl).await?;
    if expired > 0 {
        METRICS.resumable_expired.inc_by(expired);
        tracing::info!(expired, "expired resumable uploads");
    }
    loop {
        let leftovers = store.resumables_to_clean(CLEAN_BATCH).await?;
        for leftover in &leftovers {
            remove_parts(store, blobs, leftover).await?;
        }
        if leftovers.len() < CLEAN_BATCH as usize {
            break;
        }
    }
    store.forget_resumables(Utc::now()).await?;
    Ok(())
}

/// What `Upload-Metadata` carries: the options a `csv-upload` takes as form fields.
struct Metadata {
    filename: Option<String>,
    key: Option<String>,
    hints: Hints,
}

impl Metadata {
    fn parse(raw: &str, ingest: &orbit_config::IngestSettings) -> ApiResult<Self> {
        let mut meta = Metadata {
            filename: None,
            key: None,
            hints: Hints::default(),
        };
        for (name, value) in parse_pairs(raw)? {
            let value = value.unwrap_or_default();
            match name.as_str() {
                "filename" => {
                    meta.filename = Some(String::from_utf8_lossy(&value).into_owned());
                }
                "idempotency_key" => {
                    let key =
                        std::str::from_utf8(&value).map_err(|_| bad_metadata("idempotency_key"))?;
                    meta.key = Some(validate_key(key)?);
                }
                "mapping" | "merge" | "dry_run" | "delimiter" | "encoding" => {
                    apply_hint(&mut meta.hints, &name, &value, ingest)?;
                }
                // Clients send their own keys too (tuspy a `filetype`, say): kept, not read.
                _ => {}
            }
        }
        Ok(meta)
    }
}

/// `Upload-Metadata`'s pairs: a key, a space and the value in base64, comma-separated; a key
/// may come without a value.
fn parse_pairs(raw: &str) -> ApiResult<Vec<(String, Option<Vec<u8>>)>> {
    let mut pairs: Vec<(String, Option<Vec<u8>>)> = Vec::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = match pair.split_once(' ') {
            Some((key, value)) => (key, Some(value.trim())),
            None => (pair, None),
        };
        if key.is_empty() || pairs.iter().any(|(k, _)| k == key) {
            return Err(bad_metadata(key));
        }
        let value = value
            .map(|v| base64::engine::general_purpose::STANDARD.decode(v))
            .transpose()
            .map_err(|_| bad_metadata(key))?;
        pairs.push((key.to_owned(), value));
    }
    Ok(pairs)
}

fn bad_metadata(key: &str) -> ApiError {
    ApiError::invalid_request(format!(
        "Upload-Metadata is malformed at {key:?}: send `key base64value` pairs, each key once, separated by commas"
    ))
}

/// `Upload-Checksum`: the algorithm and the digest of the `PATCH`'s body.
struct Checksum {
    algorithm: &'static str,
    digest: Vec<u8>,
}

enum Hasher {
    Sha1(Sha1),
    Sha256(Sha256),
}

impl Hasher {
    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

impl Checksum {
    fn parse(headers: &HeaderMap) -> ApiResult<Option<Self>> {
        let Some(value) = headers.get("upload-checksum") else {
            return Ok(None);
        };
        let bad = || {
            ApiError::invalid_request(format!(
                "Upload-Checksum must be an algorithm ({CHECKSUM_ALGORITHMS}), a space and the body's digest in base64"
            ))
        };
        let (algorithm, digest) = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().split_once(' '))
            .ok_or_else(bad)?;
        let algorithm = match algorithm {
            "sha1" => "sha1",
            "sha256" => "sha256",
            _ => return Err(bad()),
        };
        let digest = base64::engine::general_purpose::STANDARD
            .decode(digest.trim())
            .map_err(|_| bad())?;
        Ok(Some(Checksum { algorithm, digest }))
    }

    fn hasher(&self) -> Hasher {
        match self.algorithm {
            "sha1" => Hasher::Sha1(Sha1::new()),
            _ => Hasher::Sha256(Sha256::new()),
        }
    }
}

/// The upload `org` owns under `dir`, or `404`; `410` once expired.
async fn find(
    state: &AppState,
    caller: &Caller,
    org: &str,
    dir: &str,
    id: &str,
) -> ApiResult<ResumableUpload> {
    let org = caller.scope(org)?;
    let dir = parse_id(dir, "directory")?;
    let id = parse_upload_id(id)?;
    let upload = state
        .store
        .get_resumable(org, dir, id)
        .await?
        .ok_or_else(not_found)?;
    if upload.is_expired(Utc::now()) {
        return Err(expired());
    }
    Ok(upload)
}

fn require_tus(headers: &HeaderMap) -> ApiResult<()> {
    match headers.get(&TUS_RESUMABLE) {
        Some(v) if v == TUS_VERSION => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "tus_version_unsupported",
            format!("send Tus-Resumable: {TUS_VERSION}, the tus version this server speaks"),
        )
        .with_header(HeaderName::from_static("tus-version"), TUS_VERSION)),
    }
}

fn header_u64(headers: &HeaderMap, name: &HeaderName) -> ApiResult<Option<u64>> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| {
                    ApiError::invalid_request(format!("{name} must be a non-negative integer"))
                })
        })
        .transpose()
}

fn is_offset_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(OFFSET_OCTET_STREAM))
}

fn parse_upload_id(raw: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| not_found())
}

/// The most bytes an upload may have: compressed or not, as its bytes will be judged when
/// imported.
fn max_size(state: &AppState) -> u64 {
    let ingest = &state.settings.ingest;
    ingest
        .max_upload_bytes
        .max(ingest.max_compressed_upload_bytes)
}

fn expiry(state: &AppState) -> DateTime<Utc> {
    Utc::now()
        + chrono::Duration::from_std(state.settings.ingest.resumable_ttl)
            .unwrap_or(chrono::Duration::MAX)
}

/// Where a part starting at `start` goes: unique to the `PATCH` writing it (two may write the
/// same start, one of them stale), and no longer than a source's key, which every S3 server
/// takes.
fn part_key(upload: &ResumableUpload, start: u64) -> String {
    let writer = Uuid::new_v4().simple().to_string();
    format!("uploads/{}/{start}-{}", upload.id, &writer[..12])
}

fn upload_path(org: Uuid, dir: Uuid, id: Uuid) -> String {
    format!("/v2/organizations/{org}/directories/{dir}/uploads/{id}")
}

fn source_path(org: Uuid, dir: Uuid, source: Uuid) -> String {
    format!("/v2/organizations/{org}/directories/{dir}/sources/{source}")
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("a path is a header value")
}

/// An HTTP date (RFC 9110's IMF-fixdate), as `Upload-Expires` takes it.
fn http_date(at: DateTime<Utc>) -> HeaderValue {
    header_value(&at.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
}

fn not_found() -> ApiError {
    ApiError::not_found("upload_not_found", "no such upload in this directory")
}

fn expired() -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "upload_expired",
        "the upload expired after ingest.resumable_ttl without bytes; its bytes were removed, start a new one",
    )
}

fn past_length(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "upload_too_large",
        format!("the body goes past the upload's {limit} bytes; nothing of this PATCH past its last recorded part was kept"),
    )
}

fn object_store_error(e: BlobError) -> ApiError {
    ApiError::unavailable(format!(
        "the object store failed: {e}; HEAD the upload for its offset and go on from there"
    ))
}
