//! One chunk's rows, from bytes to validated results.
//!
//! Reading and validating take turns as the bytes stream in, so their spans (`chunk.read`,
//! `chunk.validate`) run side by side; each is entered only while it works, and its busy time
//! (`busy_ns` on the exported span) tells how the chunk's time was split.

use futures::StreamExt;
use orbit_shared::blob::{BlobError, BlobStore};
use orbit_shared::config::IngestSettings;
use orbit_shared::domain::csv::{RawRecord, Splitter, SplitterOptions};
use orbit_shared::domain::header::ColumnMap;
use orbit_shared::domain::normalize;
use orbit_shared::domain::row::{self, RowOutcome, RowRules};
use orbit_shared::model::{ChunkResults, ChunkSpec, Source};
use tracing::Instrument as _;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The stored file is gone: the source cannot be finished.
    #[error("the stored file {0} is missing")]
    ObjectMissing(String),
    /// Worth another attempt: a network or storage hiccup.
    #[error("{0}")]
    Transient(String),
    /// The stored file does not match the chunk's boundaries; retrying will not help.
    #[error("{0}")]
    Corrupt(String),
}

pub fn row_rules(ingest: &IngestSettings) -> RowRules {
    RowRules {
        max_field_bytes: ingest.max_field_bytes,
        default_region: normalize::parse_region(&ingest.default_region)
            .expect("default_region validated at start-up"),
    }
}

/// Collects validated rows into the results a store commits.
pub fn push_outcome(results: &mut ChunkResults, outcome: RowOutcome) {
    match outcome {
        RowOutcome::Accepted(record) => results.accepted.push(record),
        RowOutcome::Failed(failed) => results.failed.push(failed),
    }
}

pub fn validate_into(
    results: &mut ChunkResults,
    records: impl IntoIterator<Item = RawRecord>,
    next_row: &mut u64,
    columns: &ColumnMap,
    rules: &RowRules,
) {
    for record in records {
        push_outcome(results, row::validate(&record, *next_row, columns, rules));
        *next_row += 1;
    }
}

/// The rules recorded with a source at upload: a worker judges its rows as the gateway did,
/// whatever the worker's own configuration says.
pub fn source_rules(source: &Source) -> Result<RowRules, ProcessError> {
    let region = normalize::parse_region(&source.default_region).ok_or_else(|| {
        ProcessError::Corrupt(format!(
            "source region {:?} is not a region code",
            source.default_region
        ))
    })?;
    Ok(RowRules {
        max_field_bytes: source.max_field_bytes,
        default_region: region,
    })
}

/// Reads `chunk` of `source`'s object and validates its rows.
pub async fn process_chunk(
    blobs: &dyn BlobStore,
    source: &Source,
    chunk: &ChunkSpec,
) -> Result<ChunkResults, ProcessError> {
    let rules = source_rules(source)?;
    let read_span = tracing::info_span!(
        "chunk.read",
        object_store = blobs.backend(),
        orbit.bytes = chunk.end_offset - chunk.start_offset,
    );
    let validate_span = tracing::info_span!(
        "chunk.validate",
        orbit.rows = chunk.row_count,
        orbit.rows.accepted = tracing::field::Empty,
        orbit.rows.failed = tracing::field::Empty,
    );
    let mut stream = blobs
        .read_range(&source.object_key, chunk.start_offset, chunk.end_offset)
        .instrument(read_span.clone())
        .await
        .map_err(|e| match e {
            BlobError::NotFound(key) => ProcessError::ObjectMissing(key),
            other => ProcessError::Transient(other.to_string()),
        })?;
    let mut splitter = Splitter::new(SplitterOptions {
        dialect: source.dialect,
        start_offset: chunk.start_offset,
        start_line: chunk.start_line,
        max_field_bytes: source.max_field_bytes,
        max_fields: source.columns.columns.len() + 1,
    });
    let mut results = ChunkResults::default();
    let mut next_row = chunk.first_row;
    let mut records = Vec::new();
    let mut read = 0u64;
    while let Some(bytes) = stream.next().instrument(read_span.clone()).await {
        let bytes = bytes.map_err(|e| ProcessError::Transient(e.to_string()))?;
        read += bytes.len() as u64;
        validate_span.in_scope(|| {
            splitter.feed(&bytes, &mut records);
            validate_into(
                &mut results,
                records.drain(..),
                &mut next_row,
                &source.columns,
                &rules,
            );
        });
    }
    drop(read_span);
    validate_span.in_scope(|| {
        splitter.finish(&mut records);
        validate_into(
            &mut results,
            records.drain(..),
            &mut next_row,
            &source.columns,
            &rules,
        );
    });
    validate_span.record("orbit.rows.accepted", results.accepted.len());
    validate_span.record("orbit.rows.failed", results.failed.len());
    let expected_bytes = chunk.end_offset - chunk.start_offset;
    if read != expected_bytes {
        return Err(ProcessError::Transient(format!(
            "read {read} bytes of chunk {} where {expected_bytes} were expected",
            chunk.index
        )));
    }
    let rows = next_row - chunk.first_row;
    if rows != chunk.row_count {
        return Err(ProcessError::Corrupt(format!(
            "chunk {} holds {rows} rows where {} were recorded at upload",
            chunk.index, chunk.row_count
        )));
    }
    Ok(results)
}
