//! The upload side of a file: fed the raw bytes as they stream in, it finds the dialect and the
//! header, validates the synchronous prefix, and cuts the rest into row-aligned chunks (byte
//! ranges of the original file) for the workers. Its memory is bounded by the synchronous
//! prefix, never by the file.

use crate::domain::csv::{
    probe, Dialect, Probe, ProbeOptions, RawRecord, Splitter, SplitterOptions, TextEncoding,
};
use crate::domain::header::{ColumnMap, ColumnMapping};
use crate::domain::merge::MergeRules;
use crate::domain::row::{self, RowOutcome, RowRules};
use crate::domain::InvalidCsv;
use crate::model::{ChunkResults, ChunkSpec};

#[derive(Debug, Clone)]
pub struct PlannerOptions {
    pub sync_rows: u64,
    pub chunk_rows: u64,
    pub max_field_bytes: usize,
    pub max_columns: usize,
    pub max_header_bytes: usize,
    pub encoding_hint: Option<TextEncoding>,
    pub delimiter_hint: Option<u8>,
    pub rules: RowRules,
    /// The client's column mapping, applied to the header before the aliases.
    pub mapping: Option<ColumnMapping>,
    /// The client's merge rules, kept with the columns.
    pub merge: MergeRules,
}

/// What the upload records: the file's dialect and header, its synchronous prefix (already
/// validated) and the chunks left for the workers.
#[derive(Debug)]
pub struct FilePlan {
    pub dialect: Dialect,
    pub columns: ColumnMap,
    pub total_rows: u64,
    pub sync_chunk: Option<ChunkSpec>,
    pub sync_results: ChunkResults,
    pub chunks: Vec<ChunkSpec>,
}

pub struct FilePlanner {
    opts: PlannerOptions,
    /// The first bytes, kept only until the dialect is known.
    prefix: Vec<u8>,
    splitter: Option<(Dialect, Splitter)>,
    columns: Option<ColumnMap>,
    records: Vec<RawRecord>,
    rows: u64,
    sync: ChunkResults,
    segments: Vec<ChunkSpec>,
    bytes: u64,
}

impl FilePlanner {
    pub fn new(opts: PlannerOptions) -> Self {
        FilePlanner {
            opts,
            prefix: Vec::new(),
            splitter: None,
            columns: None,
            records: Vec::new(),
            rows: 0,
            sync: ChunkResults::default(),
            segments: Vec::new(),
            bytes: 0,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), InvalidCsv> {
        self.bytes += bytes.len() as u64;
        match &mut self.splitter {
            Some((_, splitter)) => splitter.feed(bytes, &mut self.records),
            None => {
                self.prefix.extend_from_slice(bytes);
                self.try_start(false)?;
            }
        }
        self.take_records()
    }

    pub fn finish(mut self) -> Result<FilePlan, InvalidCsv> {
        if self.splitter.is_none() {
            self.try_start(true)?;
        }
        let (dialect, mut splitter) = self
            .splitter
            .take()
            .ok_or_else(|| InvalidCsv("the file has no header row".into()))?;
        splitter.finish(&mut self.records);
        self.take_records()?;
        let columns = self
            .columns
            .take()
            .ok_or_else(|| InvalidCsv("the file has no header row".into()))?;
        if let Some(last) = self.segments.last_mut() {
            last.end_offset = self.bytes;
        }
        let mut chunks = self.segments;
        let sync_chunk = (self.opts.sync_rows > 0 && !chunks.is_empty()).then(|| chunks.remove(0));
        Ok(FilePlan {
            dialect,
            columns,
            total_rows: self.rows,
            sync_chunk,
            sync_results: self.sync,
            chunks,
        })
    }

    fn try_start(&mut self, at_eof: bool) -> Result<(), InvalidCsv> {
        let options = ProbeOptions {
            encoding_hint: self.opts.encoding_hint,
            delimiter_hint: self.opts.delimiter_hint,
            max_header_bytes: self.opts.max_header_bytes,
        };
        let Probe::Ready(dialect) = probe(&self.prefix, at_eof, &options)? else {
            return Ok(());
        };
        let mut splitter = Splitter::new(SplitterOptions {
            dialect,
            start_offset: dialect.bom_len,
            start_line: 1,
            max_field_bytes: self.opts.max_field_bytes,
            // One more than allowed, so that a header over the limit is seen as such.
            max_fields: self.opts.max_columns + 1,
        });
        let prefix = std::mem::take(&mut self.prefix);
        splitter.feed(&prefix[dialect.bom_len as usize..], &mut self.records);
        self.splitter = Some((dialect, splitter));
        Ok(())
    }

    fn take_records(&mut self) -> Result<(), InvalidCsv> {
        let mut records = std::mem::take(&mut self.records);
        for record in &mut records {
            let Some(columns) = &self.columns else {
                let mut columns =
                    header_of(record, self.opts.max_columns, self.opts.mapping.as_ref())?;
                columns.merge = self.opts.merge.clone();
                self.columns = Some(columns);
                continue;
            };
            self.rows += 1;
            let row = self.rows;
            let sync = self.opts.sync_rows;
            let starts_segment =
                row == 1 || (row > sync && (row - sync - 1) % self.opts.chunk_rows == 0);
            if starts_segment {
                if let Some(last) = self.segments.last_mut() {
                    last.end_offset = record.start_offset;
                }
                self.segments.push(ChunkSpec {
                    index: self.segments.len() as u32,
                    first_row: row,
                    row_count: 0,
                    start_offset: record.start_offset,
                    end_offset: record.start_offset,
                    start_line: record.line_number,
                });
            }
            if let Some(segment) = self.segments.last_mut() {
                segment.row_count += 1;
            }
            if row <= sync {
                // The splitter keeps `max_columns + 1` fields, to tell a header over the limit;
                // a worker keeps the header's width plus one. A row is judged on what a worker
                // would see, so it fails alike (message, kept fields) wherever it is in the file.
                record.fields.truncate(columns.columns.len() + 1);
                match row::validate(record, row, columns, &self.opts.rules) {
                    RowOutcome::Accepted(r) => self.sync.accepted.push(r),
                    RowOutcome::Failed(f) => self.sync.failed.push(f),
                }
            }
        }
        // Hand the allocation back: the splitter reuses it for the next records.
        self.records = records;
        self.records.clear();
        Ok(())
    }
}

fn header_of(
    record: &RawRecord,
    max_columns: usize,
    mapping: Option<&ColumnMapping>,
) -> Result<ColumnMap, InvalidCsv> {
    if record.field_count > max_columns {
        return Err(InvalidCsv(format!(
            "the header has {} columns; at most {max_columns} are allowed",
            record.field_count
        )));
    }
    let mut names = Vec::with_capacity(record.fields.len());
    for field in &record.fields {
        let name = std::str::from_utf8(&field.bytes).map_err(|_| {
            InvalidCsv("the header row is not valid text in the file's encoding".into())
        })?;
        if name.chars().any(|c| c.is_control() && c != '\t') {
            return Err(InvalidCsv("the header row contains binary data".into()));
        }
        names.push(name.to_owned());
    }
    ColumnMap::from_header_mapped(&names, max_columns, mapping)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::normalize;

    fn options(sync_rows: u64, chunk_rows: u64) -> PlannerOptions {
        PlannerOptions {
            sync_rows,
            chunk_rows,
            max_field_bytes: 1024,
            max_columns: 10,
            max_header_bytes: 1024,
            encoding_hint: None,
            delimiter_hint: None,
            rules: RowRules {
                max_field_bytes: 1024,
                default_region: normalize::parse_region("US").unwrap(),
            },
            mapping: None,
            merge: MergeRules::default(),
        }
    }

    fn plan(
        file: &[u8],
        sync_rows: u64,
        chunk_rows: u64,
        feed: usize,
    ) -> Result<FilePlan, InvalidCsv> {
        let mut planner = FilePlanner::new(options(sync_rows, chunk_rows));
        for piece in file.chunks(feed) {
            planner.feed(piece)?;
        }
        planner.finish()
    }

    fn file(rows: usize) -> Vec<u8> {
        let mut out = b"\xEF\xBB\xBFemail;name\r\n".to_vec();
        for i in 1..=rows {
            out.extend(format!("u{i}@example.com;\"Name\n{i}\"\r\n").bytes());
        }
        out
    }

    #[test]
    fn chunks_cover_the_rows_after_the_synchronous_prefix() {
        let data = file(25);
        for feed in [1, 7, 4096] {
            let p = plan(&data, 5, 8, feed).unwrap();
            assert_eq!(p.dialect.delimiter, b';');
            assert_eq!(p.total_rows, 25);
            let sync = p.sync_chunk.as_ref().unwrap();
            assert_eq!((sync.first_row, sync.row_count, sync.start_line), (1, 5, 2));
            assert_eq!(p.sync_results.accepted.len(), 5);
            let rows: Vec<_> = p
                .chunks
                .iter()
                .map(|c| (c.first_row, c.row_count))
                .collect();
            assert_eq!(rows, vec![(6, 8), (14, 8), (22, 4)]);
            // Row-aligned and contiguous, up to the end of the file.
            assert_eq!(sync.end_offset, p.chunks[0].start_offset);
            for pair in p.chunks.windows(2) {
                assert_eq!(pair[0].end_offset, pair[1].start_offset);
            }
            assert_eq!(p.chunks.last().unwrap().end_offset, data.len() as u64);
            // Each row spans two lines because of its quoted newline.
            assert_eq!(p.chunks[0].start_line, 2 + 5 * 2);
            let start = p.chunks[1].start_offset as usize;
            assert!(data[start..].starts_with(b"u14@example.com"));
        }
    }

    #[test]
    fn everything_is_synchronous_when_the_file_is_small() {
        let p = plan(&file(3), 1000, 10, 64).unwrap();
        assert_eq!(p.sync_chunk.unwrap().row_count, 3);
        assert!(p.chunks.is_empty());
    }

    #[test]
    fn no_synchronous_prefix_when_sync_rows_is_zero() {
        let p = plan(&file(3), 0, 2, 64).unwrap();
        assert!(p.sync_chunk.is_none());
        assert_eq!(p.chunks.len(), 2);
        assert!(p.sync_results.accepted.is_empty());
    }

    #[test]
    fn a_header_only_file_has_no_rows() {
        let p = plan(b"email\n", 10, 10, 64).unwrap();
        assert_eq!(p.total_rows, 0);
        assert!(p.sync_chunk.is_none() && p.chunks.is_empty());
    }

    #[test]
    fn a_wide_row_in_the_prefix_keeps_what_a_worker_keeps() {
        // Found by the `splitter` fuzz target: the prefix kept `max_columns + 1` fields of a
        // wide row where a worker keeps the header's width plus one.
        let data = b"email,name\nu@example.com,a,b,c,d,e,f,g,h,i,j,k\n";
        let p = plan(data, 10, 10, 64).unwrap();
        let failed = &p.sync_results.failed[0];
        assert_eq!(
            failed.fields,
            [
                "u@example.com",
                "a",
                "b",
                "[…9 more fields not kept by Orbit]"
            ]
        );
        assert!(
            failed.error.message.contains("keeps the first 3"),
            "{}",
            failed.error.message
        );
    }

    #[test]
    fn file_level_problems_are_rejected() {
        let err = |data: &[u8]| plan(data, 10, 10, 3).unwrap_err().0;
        assert!(err(b"").contains("empty"));
        assert!(err(b"\n\n").contains("no header"));
        assert!(err(b"name,city\nAnn,Paris\n").contains("no identifier"));
        assert!(err(b"email,Email\n").contains("duplicate"));
        assert!(err(b"email,a\x00b\n").contains("binary"));
        assert!(err(b"email,a,b,c,d,e,f,g,h,i,j\n").contains("at most 10"));
    }
}
