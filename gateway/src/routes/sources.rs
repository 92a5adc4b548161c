//! Sources: status, listing, per-row problems and the failed-rows CSV.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{stream, StreamExt};
use orbit_core::domain::row::failed_fields;
use orbit_core::model::{Cancelled, Retried, RowIssue};
use orbit_store::Store;
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

use super::{PageBody, PageQuery, ScopedDirectory, ScopedSource};
use crate::app::AppState;
use crate::auth::{parse_id, Caller};
use crate::problem::{ApiError, ApiResult};
use crate::types::SourceBody;

pub async fn get(ScopedSource(source): ScopedSource) -> Json<SourceBody> {
    Json(source.into())
}

/// Resumes a failed source: its unfinished chunks run again with fresh attempts, exactly once
/// (chunks already committed stay committed), and the source is `processing` again.
pub async fn retry(
    State(state): State<AppState>,
    ScopedDirectory(dir): ScopedDirectory,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Response> {
    // Not a ScopedSource: the store reads and reopens the source in one transaction.
    let source = parse_id(&params["source"], "source")?;
    let (source, chunks) = match state
        .store
        .retry_source(dir.organization_id, dir.id, source)
        .await?
    {
        Retried::NotFound => {
            return Err(ApiError::not_found(
                "source_not_found",
                "no such source in this directory",
            ))
        }
        Retried::NotFailed(s) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "source_not_failed",
                format!(
                    "the source is {}; only a failed source can be retried",
                    s.status.as_str()
                ),
            ))
        }
        Retried::NothingToRetry(_) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "source_not_retryable",
                "every chunk of the source was processed; running them again would not change how it ended",
            ))
        }
        Retried::Reopened(source, chunks) => (source, chunks),
    };
    for message in &chunks {
        if let Err(e) = orbit_adapters::queue::publish_traced(&*state.queue, message, "retry").await
        {
            // Marked queued just now: the reaper publishes it again after `requeue_after`.
            tracing::warn!(chunk = %message.chunk_id, error = %e, "publish failed; left to the reaper");
        }
    }
    tracing::info!(source = %source.id, chunks = chunks.len(), "source resumed");
    Ok((StatusCode::ACCEPTED, Json(SourceBody::from(source))).into_response())
}

/// Cancels a pending or processing source: it takes no more chunks and ends `failed` with
/// `error.code = "cancelled"`. Rows committed before the cancel stay, counted; a worker
/// holding a chunk drops it at its next commit. A cancelled source can be resumed with `retry`.
pub async fn cancel(
    State(state): State<AppState>,
    ScopedDirectory(dir): ScopedDirectory,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Json<SourceBody>> {
    // Not a ScopedSource: the store reads and cancels the source in one transaction.
    let source = parse_id(&params["source"], "source")?;
    match state
        .store
        .cancel_source(dir.organization_id, dir.id, source)
        .await?
    {
        Cancelled::NotFound => Err(ApiError::not_found(
            "source_not_found",
            "no such source in this directory",
        )),
        Cancelled::Terminal(s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "source_terminal",
            format!(
                "the source is {} already; only a pending or processing source can be cancelled",
                s.status.as_str()
            ),
        )),
        Cancelled::Cancelled(s) => {
            tracing::info!(source = %s.id, processed_rows = s.processed_rows, "source cancelled");
            Ok(Json(s.into()))
        }
    }
}

pub async fn list(
    State(state): State<AppState>,
    ScopedDirectory(dir): ScopedDirectory,
    Query(query): Query<PageQuery>,
) -> ApiResult<Json<PageBody<SourceBody>>> {
    let page = state
        .store
        .list_sources(dir.organization_id, dir.id, &query.parse()?)
        .await?;
    Ok(Json(PageBody::from_page(page, SourceBody::from)))
}

pub async fn errors(
    State(state): State<AppState>,
    ScopedSource(source): ScopedSource,
    Query(query): Query<PageQuery>,
) -> ApiResult<Json<PageBody<RowIssue>>> {
    let page = state
        .store
        .list_issues(
            source.organization_id,
            source.directory_id,
            source.id,
            &query.parse()?,
        )
        .await?;
    Ok(Json(PageBody::from_page(page, |i| i)))
}

const FAILED_ROWS_PAGE: u32 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedRowsQuery {
    /// Read with the query, before the source is looked up: a bad request is told so whether
    /// or not the source exists.
    #[serde(default, deserialize_with = "raw_flag")]
    raw: bool,
}

fn raw_flag<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    match String::deserialize(deserializer)?.as_str() {
        "false" | "0" => Ok(false),
        "true" | "1" => Ok(true),
        _ => Err(serde::de::Error::custom("raw must be true or false")),
    }
}

/// Every failed row's original fields (padded to the widest row, extra fields in `extra_N`
/// columns), then `line_number`, `error_code`, `error_message`; streamed page by page.
///
/// A spreadsheet runs a cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return as
/// a formula, so by default such cells get a leading `'` (OWASP's advice for CSV injection);
/// `?raw=true` returns the values exactly as uploaded, undecodable bytes included.
pub async fn failed_rows(
    State(state): State<AppState>,
    _authenticated: Caller,
    Query(query): Query<FailedRowsQuery>,
    ScopedSource(source): ScopedSource,
) -> ApiResult<Response> {
    let raw = query.raw;
    let width = state
        .store
        .failed_row_width(source.directory_id, source.id)
        .await?;
    let mut header: Vec<String> = source.columns.names.clone();
    for i in header.len()..width {
        header.push(format!("extra_{}", i + 1 - source.columns.names.len()));
    }
    let columns = header.len();
    header.extend(["line_number", "error_code", "error_message"].map(String::from));
    let first = csv_line(header.into_iter().map(String::into_bytes), raw);

    struct Cursor {
        store: Arc<dyn Store>,
        directory: Uuid,
        source: Uuid,
        after: u64,
        done: bool,
    }
    let pages = stream::unfold(
        Cursor {
            store: state.store.clone(),
            directory: source.directory_id,
            source: source.id,
            after: 0,
            done: false,
        },
        move |mut cur| async move {
            if cur.done {
                return None;
            }
            match cur
                .store
                .failed_rows(cur.directory, cur.source, cur.after, FAILED_ROWS_PAGE)
                .await
            {
                Ok(rows) => {
                    cur.done = rows.len() < FAILED_ROWS_PAGE as usize;
                    let mut out = Vec::new();
                    for row in rows {
                        cur.after = row.row_number;
                        let undecodable = row.error_code == "invalid_encoding";
                        let mut fields: Vec<Vec<u8>> = row
                            .fields
                            .iter()
                            .map(|f| failed_fields::bytes(f, undecodable))
                            .collect();
                        if !raw {
                            // Undecodable bytes shown as U+FFFD; `raw=true` has them as sent.
                            for field in &mut fields {
                                if let Cow::Owned(text) = String::from_utf8_lossy(field) {
                                    *field = text.into_bytes();
                                }
                            }
                        }
                        fields.resize(columns, Vec::new());
                        fields.extend([
                            row.line_number.to_string().into_bytes(),
                            row.error_code.into_bytes(),
                            row.error_message.into_bytes(),
                        ]);
                        out.extend(csv_line(fields, raw));
                    }
                    Some((Ok::<_, std::io::Error>(out), cur))
                }
                Err(e) => {
                    tracing::error!(error = %e, "failed-rows stream broke off");
                    Some((
                        Err(std::io::Error::other(e.to_string())),
                        Cursor { done: true, ..cur },
                    ))
                }
            }
        },
    );
    let body = Body::from_stream(stream::once(async move { Ok(first) }).chain(pages));
    let filename = format!("{}-failed-rows.csv", source.id);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        body,
    )
        .into_response())
}

fn csv_line(fields: impl IntoIterator<Item = Vec<u8>>, raw: bool) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .write_record(
            fields
                .into_iter()
                .map(|f| if raw { f } else { neutralize(f) }),
        )
        .expect("writing to memory cannot fail");
    writer.into_inner().expect("writing to memory cannot fail")
}

/// `'` before a value a spreadsheet would run as a formula.
fn neutralize(field: Vec<u8>) -> Vec<u8> {
    match field.first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => {
            let mut out = Vec::with_capacity(field.len() + 1);
            out.push(b'\'');
            out.extend_from_slice(&field);
            out
        }
        _ => field,
    }
}
