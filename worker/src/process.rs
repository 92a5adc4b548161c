//! One chunk's rows, from bytes to validated results, a slice at a time.
//!
//! Reading and validating take turns as the bytes stream in, so their spans (`chunk.read`,
//! `chunk.validate`) run side by side over the chunk's slices; each is entered only while it
//! works, and its busy time (`busy_ns` on the exported span) tells how the chunk's time was
//! split.

use std::collections::VecDeque;

use futures::StreamExt;
use orbit_adapters::blob::{BlobError, BlobStore, ByteStream};
use orbit_core::domain::csv::{RawRecord, Splitter, SplitterOptions};
use orbit_core::domain::header::ColumnMap;
use orbit_core::domain::normalize;
use orbit_core::domain::row::{self, RowOutcome, RowRules};
use orbit_core::model::{ChunkResults, ChunkSpec, Resume, SliceEnd, Source};
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
    read_span: tracing::Span,
    validate_span: tracing::Span,
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
        let read_span = tracing::info_span!(
            "chunk.read",
            object_store = blobs.backend(),
            orbit.bytes = chunk.end_offset - chunk.start_offset,
        );
        let validate_span = tracing::info_span!("chunk.validate", orbit.rows = chunk.row_count);
        let stream = blobs
            .read_range(&source.object_key, chunk.start_offset, chunk.end_offset)
            .instrument(read_span.clone())
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
            read_span,
            validate_span,
        })
    }

    /// The next slice's validated rows and where the slice ends. Called again after
    /// `SliceEnd::Chunk`, it gives an empty slice with the same end.
    pub async fn next_slice(&mut self) -> Result<(ChunkResults, SliceEnd), ProcessError> {
        // Split one record past the slice when there is one: where it starts is where the
        // next slice, or a worker taking the chunk over, starts.
        let mut records = Vec::new();
        while self.pending.len() <= self.slice_rows && !self.read_all {
            match self.stream.next().instrument(self.read_span.clone()).await {
                Some(bytes) => {
                    let bytes = bytes.map_err(|e| ProcessError::Transient(e.to_string()))?;
                    self.read += bytes.len() as u64;
                    self.validate_span
                        .in_scope(|| self.splitter.feed(&bytes, &mut records));
                }
                None => {
                    self.validate_span
                        .in_scope(|| self.splitter.finish(&mut records));
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
        self.validate_span.in_scope(|| {
            validate_into(
                &mut results,
                self.pending.drain(..take),
                &mut self.next_row,
                &self.source.columns,
                &self.rules,
            )
        });
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
            None => SliceEnd::Chunk,
        };
        Ok((results, end))
    }

    fn miscounted(&self, what: String) -> ProcessError {
        ProcessError::Corrupt(format!(
            "chunk {} holds {what}, counting from row {}",
            self.chunk.index, self.chunk.first_row
        ))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use orbit_adapters::blob::local::LocalBlobStore;
    use orbit_core::domain::csv::{Dialect, TextEncoding};
    use orbit_core::model::{Compression, SourceStatus};
    use uuid::Uuid;

    use super::*;

    /// Quoted newlines and blank lines make rows, lines and byte offsets disagree, which is
    /// what a resume point must get right.
    const CSV: &str = "email,first_name,notes\n\
        a@x.co,Ann,\"two\nlines\"\n\
        \n\
        b@x.co,Bob,plain\n\
        not-an-email,Cy,\"x\"\"y\"\n\
        \n\
        \n\
        d@x.co,Di,\"a\n\nb\"\n\
        e@x.co,Ed,last\n";

    fn source(columns: ColumnMap) -> Source {
        let now = chrono::Utc::now();
        Source {
            id: Uuid::nil(),
            seq: 1,
            organization_id: Uuid::nil(),
            directory_id: Uuid::nil(),
            status: SourceStatus::Processing,
            filename: "c.csv".into(),
            byte_size: CSV.len() as u64,
            sha256: String::new(),
            compression: Compression::None,
            received_bytes: CSV.len() as u64,
            object_key: "c.csv".into(),
            dialect: Dialect {
                encoding: TextEncoding::Utf8,
                delimiter: b',',
                bom_len: 0,
            },
            columns,
            max_field_bytes: 100,
            default_region: "US".into(),
            dry_run: false,
            total_rows: 5,
            processed_rows: 0,
            accepted: 0,
            failed: 0,
            warnings: 0,
            error: None,
            created_at: now,
            updated_at: now,
            completed_at: None,
            retrying: None,
        }
    }

    /// Every row of the chunk from `chunk`, and the resume points between slices.
    async fn read(
        blobs: &LocalBlobStore,
        source: &Source,
        chunk: &ChunkSpec,
        slice_rows: u64,
    ) -> (Vec<(u64, u64, bool)>, Vec<Resume>) {
        let mut reader = ChunkReader::open(blobs, source, chunk, slice_rows)
            .await
            .unwrap();
        let (mut rows, mut resumes) = (Vec::new(), Vec::new());
        loop {
            let (results, end) = reader.next_slice().await.unwrap();
            assert!(results.accepted.len() + results.failed.len() <= slice_rows as usize);
            let mut slice: Vec<(u64, u64, bool)> = results
                .accepted
                .iter()
                .map(|r| (r.row_number, r.line_number, true))
                .chain(
                    results
                        .failed
                        .iter()
                        .map(|f| (f.row_number, f.line_number, false)),
                )
                .collect();
            slice.sort_unstable();
            rows.extend(slice);
            match end {
                SliceEnd::Chunk => return (rows, resumes),
                SliceEnd::Before(resume) => resumes.push(resume),
            }
        }
    }

    #[tokio::test]
    async fn slices_cover_the_chunk_and_each_resume_point_reads_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = LocalBlobStore::open(dir.path()).await.unwrap();
        let mut writer = blobs.begin("c.csv").await.unwrap();
        writer
            .write(Bytes::from_static(CSV.as_bytes()))
            .await
            .unwrap();
        writer.finish().await.unwrap();
        let header = ["email", "first_name", "notes"].map(String::from);
        let source = source(ColumnMap::from_header(&header, 10).unwrap());
        let header_len = CSV.find('\n').unwrap() as u64 + 1;
        let whole = ChunkSpec {
            index: 0,
            first_row: 1,
            row_count: 5,
            start_offset: header_len,
            end_offset: CSV.len() as u64,
            start_line: 2,
        };
        let (all, none) = read(&blobs, &source, &whole, 100).await;
        assert!(none.is_empty());
        assert_eq!(
            all,
            vec![
                (1, 2, true),
                (2, 5, true),
                (3, 6, false),
                (4, 9, true),
                (5, 12, true)
            ]
        );
        for slice_rows in 1..=5 {
            let (rows, resumes) = read(&blobs, &source, &whole, slice_rows).await;
            assert_eq!(rows, all, "slices of {slice_rows}");
            assert_eq!(resumes.len(), (5 - 1) / slice_rows as usize);
            for resume in resumes {
                // What a worker taking the chunk over is handed (see the stores' ChunkRow).
                let rest = ChunkSpec {
                    first_row: resume.row,
                    row_count: whole.row_count - (resume.row - whole.first_row),
                    start_offset: resume.offset,
                    start_line: resume.line,
                    ..whole.clone()
                };
                let (after, _) = read(&blobs, &source, &rest, slice_rows).await;
                let expected: Vec<_> = all.iter().filter(|r| r.0 >= resume.row).copied().collect();
                assert_eq!(after, expected, "resumed at {resume:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_chunk_with_more_rows_than_recorded_is_corrupt_before_its_extra_row_commits() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = LocalBlobStore::open(dir.path()).await.unwrap();
        let mut writer = blobs.begin("c.csv").await.unwrap();
        writer
            .write(Bytes::from_static(CSV.as_bytes()))
            .await
            .unwrap();
        writer.finish().await.unwrap();
        let header = ["email", "first_name", "notes"].map(String::from);
        let source = source(ColumnMap::from_header(&header, 10).unwrap());
        let chunk = ChunkSpec {
            index: 0,
            first_row: 1,
            row_count: 2,
            start_offset: CSV.find('\n').unwrap() as u64 + 1,
            end_offset: CSV.len() as u64,
            start_line: 2,
        };
        let mut reader = ChunkReader::open(&blobs, &source, &chunk, 2).await.unwrap();
        let error = reader.next_slice().await.unwrap_err();
        assert!(
            matches!(&error, ProcessError::Corrupt(m) if m.contains("more rows than the 2")),
            "{error}"
        );
    }
}
