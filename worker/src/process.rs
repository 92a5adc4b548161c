//! One chunk's rows, from bytes to validated results, a slice at a time.

use std::collections::VecDeque;

use futures::StreamExt;
use orbit_shared::blob::{BlobError, BlobStore, ByteStream};
use orbit_shared::config::IngestSettings;
use orbit_shared::domain::csv::{RawRecord, Splitter, SplitterOptions};
use orbit_shared::domain::header::ColumnMap;
use orbit_shared::domain::normalize;
use orbit_shared::domain::row::{self, RowOutcome, RowRules};
use orbit_shared::model::{ChunkResults, ChunkSpec, Resume, SliceEnd, Source};

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

/// A chunk's rows read from the stored file and validated, a slice at a time: a worker holds
/// one slice of rows, not the chunk, whatever `ingest.chunk_rows` is.
pub struct ChunkReader<'a> {
    source: &'a Source,
    chunk: &'a ChunkSpec,
    rules: RowRules,
    slice_rows: usize,
    stream: ByteStream,
    splitter: Splitter,
    /// Records split and not handed out yet, in file order.
    pending: VecDeque<RawRecord>,
    next_row: u64,
    read: u64,
    /// The range is read to its end and the splitter flushed.
    read_all: bool,
    /// The slice that ends the chunk was handed out.
    finished: bool,
}

impl<'a> ChunkReader<'a> {
    /// Starts reading `chunk` of `source`'s object.
    pub async fn open(
        blobs: &dyn BlobStore,
        source: &'a Source,
        chunk: &'a ChunkSpec,
        slice_rows: u64,
    ) -> Result<Self, ProcessError> {
        let rules = source_rules(source)?;
        let stream = blobs
            .read_range(&source.object_key, chunk.start_offset, chunk.end_offset)
            .await
            .map_err(|e| match e {
                BlobError::NotFound(key) => ProcessError::ObjectMissing(key),
                other => ProcessError::Transient(other.to_string()),
            })?;
        let splitter = Splitter::new(SplitterOptions {
            dialect: source.dialect,
            start_offset: chunk.start_offset,
            start_line: chunk.start_line,
            max_field_bytes: source.max_field_bytes,
            max_fields: source.columns.columns.len() + 1,
        });
        Ok(ChunkReader {
            source,
            chunk,
            rules,
            slice_rows: usize::try_from(slice_rows).unwrap_or(usize::MAX).max(1),
            stream,
            splitter,
            pending: VecDeque::new(),
            next_row: chunk.first_row,
            read: 0,
            read_all: false,
            finished: false,
        })
    }

    /// The next slice's validated rows and where the slice ends; `None` after the slice that
    /// ends the chunk.
    pub async fn next_slice(&mut self) -> Result<Option<(ChunkResults, SliceEnd)>, ProcessError> {
        if self.finished {
            return Ok(None);
        }
        // Split one record past the slice when there is one: where it starts is where the
        // next slice, or a worker taking the chunk over, starts.
        let mut records = Vec::new();
        while self.pending.len() <= self.slice_rows && !self.read_all {
            match self.stream.next().await {
                Some(bytes) => {
                    let bytes = bytes.map_err(|e| ProcessError::Transient(e.to_string()))?;
                    self.read += bytes.len() as u64;
                    self.splitter.feed(&bytes, &mut records);
                }
                None => {
                    self.splitter.finish(&mut records);
                    self.read_all = true;
                    let expected = self.chunk.end_offset - self.chunk.start_offset;
                    if self.read != expected {
                        return Err(ProcessError::Transient(format!(
                            "read {} bytes of chunk {} where {expected} were expected",
                            self.read, self.chunk.index
                        )));
                    }
                }
            }
            self.pending.extend(records.drain(..));
        }
        let take = self.pending.len().min(self.slice_rows);
        let mut results = ChunkResults::default();
        validate_into(
            &mut results,
            self.pending.drain(..take),
            &mut self.next_row,
            &self.source.columns,
            &self.rules,
        );
        let rows = self.next_row - self.chunk.first_row;
        let end = match self.pending.front() {
            Some(next) if rows < self.chunk.row_count => SliceEnd::Before(Resume {
                offset: next.start_offset,
                line: next.line_number,
                row: self.next_row,
            }),
            Some(_) => {
                return Err(self.miscounted(format!(
                    "more rows than the {} recorded at upload",
                    self.chunk.row_count
                )))
            }
            None if rows != self.chunk.row_count => {
                return Err(self.miscounted(format!(
                    "{rows} rows where {} were recorded at upload",
                    self.chunk.row_count
                )))
            }
            None => {
                self.finished = true;
                SliceEnd::Chunk
            }
        };
        Ok(Some((results, end)))
    }

    fn miscounted(&self, what: String) -> ProcessError {
        ProcessError::Corrupt(format!(
            "chunk {} holds {what}, counting from row {}",
            self.chunk.index, self.chunk.first_row
        ))
    }
}
