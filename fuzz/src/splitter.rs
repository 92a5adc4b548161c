//! Target `splitter`: probing, splitting and chunk planning of an upload
//! (`orbit_core::domain::csv` and `orbit_core::ingest`).
//!
//! Input: four option bytes, then the file (after a generated BOM and header unless bit 7 of
//! the first byte is set). The options pick the encoding and delimiter hints, a BOM, the
//! header, `max_field_bytes`, `sync_rows`, `chunk_rows` and the size of the pieces the file
//! arrives in.
//!
//! Properties:
//! - the plan (or the error) does not depend on how the bytes are cut into pieces;
//! - the synchronous prefix and the chunks are contiguous, start on a row, end where the next
//!   begins (the last at the end of the file), and hold `sync_rows` / `chunk_rows` rows;
//! - each chunk's byte range, split alone from its `start_offset` and `start_line` as a
//!   worker does, gives exactly the rows of a full pass, offsets and lines included; so does
//!   a resume from any row to the end;
//! - the rows the gateway validated itself are judged exactly as a worker would judge them;
//! - the full pass agrees with the `csv` crate's sequential reader over the decoded text
//!   (fields, field counts, truncation) and every record's line number is one plus the line
//!   breaks (CR, LF, CRLF) before its offset, which lies on a code unit that is not a break.

use orbit_core::domain::csv::{Dialect, RawRecord, Splitter, SplitterOptions, TextEncoding};
use orbit_core::domain::header::ColumnMap;
use orbit_core::domain::normalize;
use orbit_core::domain::row::{self, RowOutcome, RowRules};
use orbit_core::domain::InvalidCsv;
use orbit_core::ingest::{FilePlan, FilePlanner, PlannerOptions};
use orbit_core::model::ChunkSpec;

use crate::Knobs;

const ENCODINGS: [Option<TextEncoding>; 8] = [
    None,
    Some(TextEncoding::Utf8),
    Some(TextEncoding::Utf16Le),
    Some(TextEncoding::Utf16Be),
    Some(TextEncoding::Windows1252),
    Some(TextEncoding::Latin1),
    None,
    None,
];
const DELIMITERS: [Option<u8>; 8] = [
    None,
    Some(b','),
    Some(b';'),
    Some(b'\t'),
    Some(b'|'),
    None,
    None,
    None,
];
const HEADERS: [&str; 8] = [
    "email,name",
    "email;first name;Company",
    "Email\tPhone",
    "phone|city",
    "E-mail",
    "\"email\",\"Full\nName\"",
    "linkedin, email ,x",
    "email,a,b,c,d,e,f",
];
const FIELD_LIMITS: [usize; 4] = [1 << 16, 3, 16, 100];
const HEADER_LIMITS: [usize; 4] = [4096, 12, 40, 1024];
const MAX_COLUMNS: usize = 8;
/// Above this, the one-byte-pieces plan is skipped to keep an execution short.
const BYTEWISE_LIMIT: usize = 4096;

struct Case {
    opts: PlannerOptions,
    piece: usize,
    resume: usize,
}

pub fn check(data: &[u8]) {
    let (knobs, body) = Knobs::split(data, 4);
    let (case, file) = build(&knobs, body);
    let whole = plan(&case.opts, [&file[..]]);
    let pieces = plan(&case.opts, file.chunks(case.piece));
    assert_same(&whole, &pieces, "whole file vs pieces");
    if file.len() <= BYTEWISE_LIMIT {
        let bytes = plan(&case.opts, file.chunks(1));
        assert_same(&whole, &bytes, "whole file vs single bytes");
    }
    if let Ok(plan) = whole {
        check_plan(&case, &file, &plan);
    }
}

fn build(knobs: &Knobs, body: &[u8]) -> (Case, Vec<u8>) {
    let b0 = knobs.byte(0);
    let b1 = knobs.byte(1);
    let b2 = knobs.byte(2);
    let hint = ENCODINGS[usize::from(b0 & 7)];
    let bom = b0 & 8 != 0;
    let delimiter = DELIMITERS[usize::from((b0 >> 4) & 7)];
    let generated_header = b0 & 0x80 == 0;
    let max_field_bytes = FIELD_LIMITS[usize::from((b1 >> 3) & 3)];
    let opts = PlannerOptions {
        sync_rows: u64::from(b2 & 7),
        chunk_rows: u64::from((b2 >> 3) & 7) + 1,
        max_field_bytes,
        max_columns: MAX_COLUMNS,
        max_header_bytes: HEADER_LIMITS[usize::from((b1 >> 5) & 3)],
        encoding_hint: hint,
        delimiter_hint: delimiter,
        rules: rules(max_field_bytes),
        mapping: None,
        merge: Default::default(),
    };
    // A BOM wins over the hint, so the header is written in the encoding the file will be read in.
    let (encoding, bom_bytes): (TextEncoding, &[u8]) = match (bom, hint) {
        (true, Some(TextEncoding::Utf16Le)) => (TextEncoding::Utf16Le, b"\xFF\xFE"),
        (true, Some(TextEncoding::Utf16Be)) => (TextEncoding::Utf16Be, b"\xFE\xFF"),
        (true, _) => (TextEncoding::Utf8, b"\xEF\xBB\xBF"),
        (false, hint) => (hint.unwrap_or(TextEncoding::Utf8), b""),
    };
    let mut file = bom_bytes.to_vec();
    if generated_header {
        let header = format!("{}\n", HEADERS[usize::from(b1 & 7)]);
        file.extend(encode(encoding, &header));
    }
    file.extend_from_slice(body);
    let case = Case {
        opts,
        piece: usize::from(knobs.byte(3)) + 1,
        resume: usize::from(knobs.byte(3)),
    };
    (case, file)
}

fn rules(max_field_bytes: usize) -> RowRules {
    RowRules {
        max_field_bytes,
        default_region: normalize::parse_region("US").expect("US is a region"),
    }
}

/// `text` (ASCII or not) in `encoding`, as a client's editor would have saved it.
fn encode(encoding: TextEncoding, text: &str) -> Vec<u8> {
    match encoding {
        TextEncoding::Utf16Le => text.encode_utf16().flat_map(u16::to_le_bytes).collect(),
        TextEncoding::Utf16Be => text.encode_utf16().flat_map(u16::to_be_bytes).collect(),
        TextEncoding::Windows1252 | TextEncoding::Latin1 => {
            encoding_rs::WINDOWS_1252.encode(text).0.into_owned()
        }
        TextEncoding::Utf8 => text.as_bytes().to_vec(),
    }
}

fn plan<'a>(
    opts: &PlannerOptions,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> Result<FilePlan, InvalidCsv> {
    let mut planner = FilePlanner::new(opts.clone());
    for piece in pieces {
        planner.feed(piece)?;
    }
    planner.finish()
}

fn assert_same(a: &Result<FilePlan, InvalidCsv>, b: &Result<FilePlan, InvalidCsv>, what: &str) {
    // FilePlan has no PartialEq (it holds validated rows); its Debug form shows every field.
    assert_eq!(format!("{a:?}"), format!("{b:?}"), "{what}");
}

/// Splits `bytes` (which start at raw offset `start_offset`) the way a worker does.
fn split_range<'a>(
    dialect: Dialect,
    columns: &ColumnMap,
    max_field_bytes: usize,
    start_offset: u64,
    start_line: u64,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<RawRecord> {
    let mut splitter = Splitter::new(SplitterOptions {
        dialect,
        start_offset,
        start_line,
        max_field_bytes,
        max_fields: columns.columns.len() + 1,
    });
    let mut out = Vec::new();
    let mut fed = 0u64;
    for piece in pieces {
        splitter.feed(piece, &mut out);
        fed += piece.len() as u64;
    }
    splitter.finish(&mut out);
    assert_eq!(splitter.offset(), start_offset + fed, "splitter offset");
    out
}

fn check_plan(case: &Case, file: &[u8], plan: &FilePlan) {
    let dialect = plan.dialect;
    let columns = &plan.columns;
    let limit = case.opts.max_field_bytes;
    let bom = dialect.bom_len as usize;
    assert!(file.starts_with(bom_of(dialect.encoding, dialect.bom_len)));

    // The full pass, as the upload path feeds it: after the BOM, from line 1.
    let records = split_range(
        dialect,
        columns,
        limit,
        dialect.bom_len,
        1,
        file[bom..].chunks(case.piece),
    );
    assert!(!records.is_empty(), "a planned file has a header record");
    let rows = &records[1..];
    assert_eq!(rows.len() as u64, plan.total_rows, "rows of the full pass");
    // From the file start the splitter skips the BOM itself.
    assert_eq!(
        split_range(dialect, columns, limit, 0, 1, [file]),
        records,
        "fed from offset 0"
    );

    check_segments(case, file, plan, rows);
    check_sync_results(case, plan, rows);
    check_against_reference(case, file, dialect, columns, &records);

    // Resuming at any row reads the rest of the file exactly.
    if !rows.is_empty() {
        let k = case.resume % rows.len();
        let at = &rows[k];
        let rest = split_range(
            dialect,
            columns,
            limit,
            at.start_offset,
            at.line_number,
            [&file[at.start_offset as usize..]],
        );
        assert_eq!(rest, &rows[k..], "resume at row {}", k + 1);
    }
}

fn bom_of(encoding: TextEncoding, len: u64) -> &'static [u8] {
    match (encoding, len) {
        (_, 0) => b"",
        (TextEncoding::Utf8, 3) => b"\xEF\xBB\xBF",
        (TextEncoding::Utf16Le, 2) => b"\xFF\xFE",
        (TextEncoding::Utf16Be, 2) => b"\xFE\xFF",
        other => panic!("no such BOM: {other:?}"),
    }
}

fn check_segments(case: &Case, file: &[u8], plan: &FilePlan, rows: &[RawRecord]) {
    let segments: Vec<&ChunkSpec> = plan.sync_chunk.iter().chain(&plan.chunks).collect();
    if rows.is_empty() {
        assert!(segments.is_empty(), "no rows, no chunks");
        return;
    }
    let sync_rows = case.opts.sync_rows;
    assert_eq!(
        plan.sync_chunk.is_some(),
        sync_rows > 0,
        "sync chunk iff sync_rows"
    );
    let mut next_row = 1u64;
    for (i, segment) in segments.iter().enumerate() {
        let is_sync = plan.sync_chunk.is_some() && i == 0;
        assert_eq!(segment.index as usize, i, "segments are numbered from 0");
        assert_eq!(
            segment.first_row, next_row,
            "segments are contiguous in rows"
        );
        let first = &rows[(segment.first_row - 1) as usize];
        assert_eq!(
            segment.start_offset, first.start_offset,
            "starts on its first row"
        );
        assert_eq!(
            segment.start_line, first.line_number,
            "starts on its first row's line"
        );
        let end_row = segment.first_row - 1 + segment.row_count;
        let expected_end = match rows.get(end_row as usize) {
            Some(next) => next.start_offset,
            None => file.len() as u64,
        };
        assert_eq!(
            segment.end_offset, expected_end,
            "ends where the next row starts"
        );
        let full = if is_sync {
            sync_rows
        } else {
            case.opts.chunk_rows
        };
        let remaining = plan.total_rows - (segment.first_row - 1);
        assert_eq!(segment.row_count, full.min(remaining), "rows per segment");
        assert!(segment.row_count > 0);

        // What a worker does with it.
        let range = &file[segment.start_offset as usize..segment.end_offset as usize];
        let expected = &rows[(segment.first_row - 1) as usize..end_row as usize];
        for pieces in [range.chunks(range.len().max(1)), range.chunks(case.piece)] {
            let got = split_range(
                plan.dialect,
                &plan.columns,
                case.opts.max_field_bytes,
                segment.start_offset,
                segment.start_line,
                pieces,
            );
            assert_eq!(got, expected, "chunk {i} re-parsed alone");
        }
        next_row = end_row + 1;
    }
    assert_eq!(next_row - 1, plan.total_rows, "segments cover every row");
}

fn check_sync_results(case: &Case, plan: &FilePlan, rows: &[RawRecord]) {
    let sync = plan.sync_chunk.as_ref().map_or(0, |c| c.row_count) as usize;
    let mut accepted = Vec::new();
    let mut failed = Vec::new();
    for (i, record) in rows[..sync].iter().enumerate() {
        match row::validate(record, i as u64 + 1, &plan.columns, &case.opts.rules) {
            RowOutcome::Accepted(r) => accepted.push(r),
            RowOutcome::Failed(f) => failed.push(f),
        }
    }
    assert_eq!(
        plan.sync_results.accepted, accepted,
        "gateway and worker accept the same rows"
    );
    assert_eq!(
        plan.sync_results.failed, failed,
        "gateway and worker fail the same rows alike"
    );
}

/// Compares the full pass with the `csv` crate over the decoded text, and line numbers and
/// offsets with a plain count over the raw code units.
fn check_against_reference(
    case: &Case,
    file: &[u8],
    dialect: Dialect,
    columns: &ColumnMap,
    records: &[RawRecord],
) {
    let body = &file[dialect.bom_len as usize..];
    let mut text = b"\n".to_vec();
    // The leading blank line keeps csv from taking a U+FEFF that starts the text for a BOM:
    // the BOM, if any, is already gone, and a second one is data.
    match dialect.encoding {
        TextEncoding::Utf8 => text.extend_from_slice(body),
        TextEncoding::Utf16Le => text.extend(
            encoding_rs::UTF_16LE
                .decode_without_bom_handling(body)
                .0
                .as_bytes(),
        ),
        TextEncoding::Utf16Be => text.extend(
            encoding_rs::UTF_16BE
                .decode_without_bom_handling(body)
                .0
                .as_bytes(),
        ),
        TextEncoding::Windows1252 | TextEncoding::Latin1 => text.extend(
            encoding_rs::WINDOWS_1252
                .decode_without_bom_handling(body)
                .0
                .as_bytes(),
        ),
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(dialect.delimiter)
        .from_reader(&text[..]);
    let reference: Vec<csv::ByteRecord> = reader
        .byte_records()
        .collect::<Result<_, _>>()
        .expect("csv reads from memory without error");
    assert_eq!(
        records.len(),
        reference.len(),
        "record count vs the csv crate"
    );
    let max_fields = columns.columns.len() + 1;
    let limit = case.opts.max_field_bytes;
    for (i, (ours, theirs)) in records.iter().zip(&reference).enumerate() {
        assert_eq!(ours.field_count, theirs.len(), "record {i}: field count");
        assert_eq!(
            ours.fields.len(),
            theirs.len().min(max_fields),
            "record {i}: kept fields"
        );
        for (j, (field, expected)) in ours.fields.iter().zip(theirs).enumerate() {
            let kept = &expected[..expected.len().min(limit)];
            assert_eq!(field.bytes, kept, "record {i} field {j}");
            assert_eq!(
                field.truncated,
                expected.len() > limit,
                "record {i} field {j}: truncated"
            );
        }
    }

    let units = code_units(dialect, file);
    let mut line = 1u64;
    let mut prev_cr = false;
    let mut at = 0;
    for (i, record) in records.iter().enumerate() {
        while at < units.len() && units[at].0 < record.start_offset {
            let unit = units[at].1;
            if unit == 0x0D || (unit == 0x0A && !prev_cr) {
                line += 1;
            }
            prev_cr = unit == 0x0D;
            at += 1;
        }
        let (offset, unit) = units
            .get(at)
            .copied()
            .expect("a record starts inside the file");
        assert_eq!(
            offset, record.start_offset,
            "record {i} starts on a code unit"
        );
        assert!(
            unit != 0x0A && unit != 0x0D,
            "record {i} starts on a line break"
        );
        assert_eq!(record.line_number, line, "record {i}: line number");
    }
}

/// The raw offset and value of every code unit after the BOM: bytes for UTF-8 and the
/// single-byte encodings, 16-bit units for UTF-16.
fn code_units(dialect: Dialect, file: &[u8]) -> Vec<(u64, u32)> {
    let start = dialect.bom_len as usize;
    let body = &file[start..];
    let at = |i: usize| (start + i) as u64;
    match dialect.encoding {
        TextEncoding::Utf16Le | TextEncoding::Utf16Be => body
            .chunks(2)
            .enumerate()
            .map(|(i, pair)| {
                let unit = match *pair {
                    [a, b] if dialect.encoding == TextEncoding::Utf16Le => {
                        u32::from(u16::from_le_bytes([a, b]))
                    }
                    [a, b] => u32::from(u16::from_be_bytes([a, b])),
                    // A last odd byte decodes to U+FFFD, which can start a record of its own.
                    _ => 0xFFFD,
                };
                (at(2 * i), unit)
            })
            .collect(),
        _ => body
            .iter()
            .enumerate()
            .map(|(i, &b)| (at(i), u32::from(b)))
            .collect(),
    }
}
