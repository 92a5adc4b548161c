//! The splitter's unit tests: offsets, quoting, encodings, limits and malformed input.

use super::*;

const BIG: usize = 1 << 20;

fn dialect(encoding: TextEncoding, bom_len: u64) -> Dialect {
    Dialect {
        encoding,
        delimiter: b',',
        bom_len,
    }
}

fn options(dialect: Dialect, start_offset: u64, start_line: u64) -> SplitterOptions {
    SplitterOptions {
        dialect,
        start_offset,
        start_line,
        max_field_bytes: BIG,
        max_fields: 1000,
    }
}

/// Feeds `raw` (which starts at `opts.start_offset` of the file) in the given pieces.
fn split_pieces(opts: SplitterOptions, pieces: &[&[u8]]) -> Vec<RawRecord> {
    let start = opts.start_offset;
    let mut splitter = Splitter::new(opts);
    let mut out = Vec::new();
    let mut fed = 0;
    for piece in pieces {
        splitter.feed(piece, &mut out);
        fed += piece.len() as u64;
        assert_eq!(splitter.offset(), start + fed);
    }
    splitter.finish(&mut out);
    assert_eq!(splitter.offset(), start + fed);
    out
}

fn split_by(opts: SplitterOptions, raw: &[u8], chunk: usize) -> Vec<RawRecord> {
    let pieces: Vec<&[u8]> = raw.chunks(chunk.max(1)).collect();
    split_pieces(opts, &pieces)
}

fn split(opts: SplitterOptions, raw: &[u8]) -> Vec<RawRecord> {
    split_pieces(opts, &[raw])
}

/// Splits a whole file the way the upload path does: fed after the BOM, from line 1.
fn split_file(dialect: Dialect, raw: &[u8]) -> Vec<RawRecord> {
    let bom = dialect.bom_len as usize;
    split(options(dialect, dialect.bom_len, 1), &raw[bom..])
}

fn texts(records: &[RawRecord]) -> Vec<Vec<String>> {
    records
        .iter()
        .map(|r| {
            r.fields
                .iter()
                .map(|f| String::from_utf8_lossy(&f.bytes).into_owned())
                .collect()
        })
        .collect()
}

fn lines(records: &[RawRecord]) -> Vec<u64> {
    records.iter().map(|r| r.line_number).collect()
}

fn offsets(records: &[RawRecord]) -> Vec<u64> {
    records.iter().map(|r| r.start_offset).collect()
}

fn find(haystack: &[u8], needle: &[u8]) -> u64 {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle present") as u64
}

/// The invariants the worker relies on: chunking never changes the result, and any range
/// `[start of record k, start of record m)` re-parses to exactly records `k..m`.
fn check_invariants(dialect: Dialect, raw: &[u8]) -> Vec<RawRecord> {
    let bom = dialect.bom_len as usize;
    let reference = split_file(dialect, raw);

    // Feeding from offset 0 lets the splitter skip the BOM itself.
    assert_eq!(split(options(dialect, 0, 1), raw), reference);
    for cut in bom..=raw.len() {
        let pieces: [&[u8]; 2] = [&raw[bom..cut], &raw[cut..]];
        assert_eq!(
            split_pieces(options(dialect, dialect.bom_len, 1), &pieces),
            reference,
            "split at {cut}"
        );
    }
    for chunk in [1, 2, 3, 7] {
        assert_eq!(
            split_by(options(dialect, dialect.bom_len, 1), &raw[bom..], chunk),
            reference,
            "chunks of {chunk}"
        );
    }
    for k in 0..reference.len() {
        let start = reference[k].start_offset;
        let opts = options(dialect, start, reference[k].line_number);
        let from = start as usize;
        assert_eq!(
            split(opts.clone(), &raw[from..]),
            &reference[k..],
            "resume at {k}"
        );
        assert_eq!(split_by(opts.clone(), &raw[from..], 1), &reference[k..]);
        for m in k + 1..reference.len() {
            let end = reference[m].start_offset as usize;
            assert_eq!(
                split(opts.clone(), &raw[from..end]),
                &reference[k..m],
                "range {k}..{m}"
            );
        }
    }
    reference
}

/// A file exercising quoted newlines, blank lines, all three terminators, escaped quotes,
/// a spaces-only line and a final record without a terminator.
const SAMPLE: &str =
    "name,city\r\n\r\n\"Zoë\",\"Köln\nNord\"\r\n\n  \r\nplain,\"a \"\"q\"\" b\"\rlast,€😀";

fn sample_texts() -> Vec<Vec<String>> {
    let rows: [&[&str]; 5] = [
        &["name", "city"],
        &["Zoë", "Köln\nNord"],
        &["  "],
        &["plain", "a \"q\" b"],
        &["last", "€😀"],
    ];
    rows.iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect()
}

/// Byte offsets of the sample's records in its UTF-8 form.
fn sample_utf8_offsets() -> Vec<usize> {
    let s = SAMPLE.as_bytes();
    ["name", "\"Zoë\"", "  \r\n", "plain", "last"]
        .iter()
        .map(|n| find(s, n.as_bytes()) as usize)
        .collect()
}

const SAMPLE_LINES: [u64; 5] = [1, 3, 6, 7, 8];

fn utf16(text: &str, big_endian: bool, bom: bool) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut push = |unit: u16| {
        raw.extend_from_slice(&if big_endian {
            unit.to_be_bytes()
        } else {
            unit.to_le_bytes()
        })
    };
    if bom {
        push(0xFEFF);
    }
    text.encode_utf16().for_each(push);
    raw
}

#[test]
fn utf8_sample_records_lines_and_offsets() {
    let raw = SAMPLE.as_bytes();
    let records = check_invariants(dialect(TextEncoding::Utf8, 0), raw);
    assert_eq!(texts(&records), sample_texts());
    assert_eq!(lines(&records), SAMPLE_LINES);
    let expected: Vec<u64> = sample_utf8_offsets().iter().map(|&o| o as u64).collect();
    assert_eq!(offsets(&records), expected);
    assert!(records.iter().all(|r| !r.malformed_encoding));
    assert_eq!(records[1].field_count, 2);
}

#[test]
fn utf8_with_bom() {
    let mut raw = b"\xEF\xBB\xBF".to_vec();
    raw.extend_from_slice(SAMPLE.as_bytes());
    let records = check_invariants(dialect(TextEncoding::Utf8, 3), &raw);
    assert_eq!(texts(&records), sample_texts());
    assert_eq!(lines(&records), SAMPLE_LINES);
    assert_eq!(records[0].start_offset, 3);
}

#[test]
fn utf8_feff_starting_a_record_is_kept_on_resume() {
    // csv-core would strip this as a BOM if it were the first thing it saw.
    let raw = "\u{FEFF}h\n\u{FEFF}x,y\n".as_bytes();
    let records = check_invariants(dialect(TextEncoding::Utf8, 3), raw);
    assert_eq!(
        texts(&records),
        vec![
            vec!["h".to_string()],
            vec!["\u{FEFF}x".to_string(), "y".to_string()]
        ]
    );
    assert_eq!(records[1].start_offset, 5);
}

#[test]
fn utf16_le_and_be_samples_map_offsets_to_code_units() {
    for big_endian in [false, true] {
        let raw = utf16(SAMPLE, big_endian, true);
        let encoding = if big_endian {
            TextEncoding::Utf16Be
        } else {
            TextEncoding::Utf16Le
        };
        let records = check_invariants(dialect(encoding, 2), &raw);
        assert_eq!(texts(&records), sample_texts());
        assert_eq!(lines(&records), SAMPLE_LINES);
        let expected: Vec<u64> = sample_utf8_offsets()
            .iter()
            .map(|&o| 2 + 2 * SAMPLE[..o].encode_utf16().count() as u64)
            .collect();
        assert_eq!(offsets(&records), expected);
        assert!(records.iter().all(|r| !r.malformed_encoding));
    }
}

#[test]
fn utf16_unpaired_surrogates_flag_only_their_record() {
    let mut raw = utf16("a,b\n", false, true);
    raw.extend_from_slice(&0xD800u16.to_le_bytes()); // high surrogate followed by 'x'
    raw.extend_from_slice(&utf16("x,y\n", false, false));
    raw.extend_from_slice(&utf16("ok,\u{FFFD}\n", false, false)); // a genuine U+FFFD
    raw.extend_from_slice(&0xDC00u16.to_le_bytes()); // lone low surrogate starts a record
    raw.extend_from_slice(&utf16(",z\r\n", false, false));
    raw.extend_from_slice(&utf16("end", false, false));
    raw.push(b'!'); // odd trailing byte
    let records = check_invariants(dialect(TextEncoding::Utf16Le, 2), &raw);
    assert_eq!(
        texts(&records),
        vec![
            vec!["a", "b"],
            vec!["\u{FFFD}x", "y"],
            vec!["ok", "\u{FFFD}"],
            vec!["\u{FFFD}", "z"],
            vec!["end\u{FFFD}"],
        ]
    );
    let flags: Vec<bool> = records.iter().map(|r| r.malformed_encoding).collect();
    assert_eq!(flags, [false, true, false, true, true]);
    assert_eq!(offsets(&records), [2, 10, 20, 30, 40]);
    assert_eq!(lines(&records), [1, 2, 3, 4, 5]);
}

#[test]
fn windows_1252_and_latin1_are_one_byte_per_char() {
    let text = "nom,ville\nCafé,\"naïve\r\n€\"\r\r\n\u{0081}x,fin";
    let (raw, _, unmappable) = encoding_rs::WINDOWS_1252.encode(text);
    assert!(!unmappable);
    assert!(raw.contains(&0xE9));
    for encoding in [TextEncoding::Windows1252, TextEncoding::Latin1] {
        let records = check_invariants(dialect(encoding, 0), &raw);
        assert_eq!(
            texts(&records),
            vec![
                vec!["nom", "ville"],
                vec!["Café", "naïve\r\n€"],
                vec!["\u{0081}x", "fin"],
            ]
        );
        let char_offset = |needle: &str| text[..text.find(needle).unwrap()].chars().count();
        assert_eq!(
            offsets(&records),
            [0, char_offset("Café"), char_offset("\u{0081}")].map(|o| o as u64)
        );
        assert_eq!(lines(&records), [1, 2, 5]);
    }
}

#[test]
fn line_terminators_lf_crlf_and_cr() {
    let utf8 = dialect(TextEncoding::Utf8, 0);
    for raw in [
        "a,b\nc,d\n\ne\n",
        "a,b\r\nc,d\r\n\r\ne\r\n",
        "a,b\rc,d\r\re\r",
    ] {
        let records = check_invariants(utf8, raw.as_bytes());
        assert_eq!(
            texts(&records),
            vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]],
            "{raw:?}"
        );
        assert_eq!(lines(&records), [1, 2, 4], "{raw:?}");
    }
}

#[test]
fn blank_lines_are_skipped_but_counted() {
    let raw = b"\n\r\n\rh1,h2\n\n\n\"q\nq\",1\r\n\r\r\n  \nlast";
    let records = check_invariants(dialect(TextEncoding::Utf8, 0), raw);
    assert_eq!(
        texts(&records),
        vec![
            vec!["h1", "h2"],
            vec!["q\nq", "1"],
            vec!["  "],
            vec!["last"]
        ]
    );
    assert_eq!(lines(&records), [4, 7, 11, 12]);
    assert_eq!(
        offsets(&records),
        [4, find(raw, b"\"q"), find(raw, b"  "), find(raw, b"last")]
    );
}

#[test]
fn quoted_newlines_advance_the_line_number() {
    let raw = b"h\n\"line1\r\nline2\rline3\nline4\",x\nnext\n";
    let records = check_invariants(dialect(TextEncoding::Utf8, 0), raw);
    assert_eq!(texts(&records)[1], ["line1\r\nline2\rline3\nline4", "x"]);
    assert_eq!(lines(&records), [1, 2, 6]);
}

#[test]
fn final_record_without_terminator_and_trailing_cr() {
    let utf8 = dialect(TextEncoding::Utf8, 0);
    assert_eq!(
        texts(&check_invariants(utf8, b"a\nb,")),
        [vec!["a"], vec!["b", ""]]
    );
    assert_eq!(texts(&check_invariants(utf8, b"a\nb\r")), [["a"], ["b"]]);
    assert_eq!(texts(&check_invariants(utf8, b"a\r\r\r")), [["a"]]);
    assert_eq!(
        texts(&check_invariants(utf8, b"a\n\"open")),
        [["a"], ["open"]]
    );
    assert!(check_invariants(utf8, b"").is_empty());
    assert!(check_invariants(utf8, b"\r\n\n").is_empty());
    // A CR at the end of one feed and the LF at the start of the next count as one line.
    let records = split_pieces(options(utf8, 0, 1), &[b"a\r", b"\nb\r", b"\r\nc"]);
    assert_eq!(lines(&records), [1, 2, 4]);
}

#[test]
fn long_fields_are_truncated() {
    let raw = "abcdefgh,xy,\"quoted, long\",éééé,\"\"\n1234,12345\n".as_bytes();
    let mut opts = options(dialect(TextEncoding::Utf8, 0), 0, 1);
    opts.max_field_bytes = 4;
    for chunk in [1, 3, raw.len()] {
        let records = split_by(opts.clone(), raw, chunk);
        let fields: Vec<(&[u8], bool)> = records[0]
            .fields
            .iter()
            .map(|f| (f.bytes.as_slice(), f.truncated))
            .collect();
        let expected: [(&[u8], bool); 5] = [
            (b"abcd", true),
            (b"xy", false),
            (b"quot", true),
            ("éé".as_bytes(), true),
            (b"", false),
        ];
        assert_eq!(fields, expected);
        assert!(!records[1].fields[0].truncated);
        assert!(records[1].fields[1].truncated);
        assert_eq!(records[1].start_offset, find(raw, b"1234"));
    }
    opts.max_field_bytes = 0;
    let records = split(opts, b"a,,b\n");
    let truncated: Vec<bool> = records[0].fields.iter().map(|f| f.truncated).collect();
    assert_eq!(truncated, [true, false, true]);
}

#[test]
fn truncation_is_counted_in_decoded_bytes() {
    let raw = utf16("ééé,x\n", false, false);
    let mut opts = options(dialect(TextEncoding::Utf16Le, 0), 0, 1);
    opts.max_field_bytes = 4;
    let records = split_by(opts, &raw, 1);
    assert_eq!(records[0].fields[0].bytes, "éé".as_bytes());
    assert!(records[0].fields[0].truncated);
}

#[test]
fn fields_beyond_max_fields_are_counted_not_kept() {
    let mut opts = options(dialect(TextEncoding::Utf8, 0), 0, 1);
    opts.max_fields = 2;
    let raw = b"a,b,c,\"d\nd\",e\nf\n";
    for chunk in [1, raw.len()] {
        let records = split_by(opts.clone(), raw, chunk);
        assert_eq!(texts(&records), [vec!["a", "b"], vec!["f"]]);
        assert_eq!(records[0].field_count, 5);
        assert_eq!(records[1].field_count, 1);
        assert_eq!(records[1].line_number, 3);
    }
    opts.max_fields = 0;
    let records = split(opts, b"a,b\n");
    assert!(records[0].fields.is_empty());
    assert_eq!(records[0].field_count, 2);
}

#[test]
fn other_delimiters() {
    let mut opts = options(dialect(TextEncoding::Utf8, 0), 0, 1);
    opts.dialect.delimiter = b';';
    let records = split(opts.clone(), b"a;b,c;\"d;e\"\n");
    assert_eq!(texts(&records), [["a", "b,c", "d;e"]]);
    opts.dialect.delimiter = b'\t';
    assert_eq!(texts(&split(opts, b"a\tb c\n")), [["a", "b c"]]);
}

#[test]
fn larger_file_is_chunk_independent() {
    let mut text = String::from("id,name,note\n");
    for i in 0..500 {
        text.push_str(&format!("{i},\"Zoë {i}\",\"multi\r\nline {i}\"\r\n"));
        if i % 7 == 0 {
            text.push_str("\r\n");
        }
    }
    let encodings = [
        (TextEncoding::Utf8, text.as_bytes().to_vec()),
        (TextEncoding::Utf16Le, utf16(&text, false, false)),
        (TextEncoding::Utf16Be, utf16(&text, true, false)),
    ];
    for (encoding, raw) in encodings {
        let d = dialect(encoding, 0);
        let reference = split_file(d, &raw);
        assert_eq!(reference.len(), 501);
        // Row 499: after the header, two lines per row and 72 blank lines (rows 0, 7, .., 497).
        assert_eq!(reference[500].line_number, 2 + 2 * 499 + 72);
        for chunk in [1, 5, 4093, 20_000] {
            assert_eq!(split_by(options(d, 0, 1), &raw, chunk), reference);
        }
        let k = 250;
        let start = reference[k].start_offset as usize;
        let end = reference[k + 10].start_offset as usize;
        let opts = options(d, start as u64, reference[k].line_number);
        assert_eq!(split(opts, &raw[start..end]), &reference[k..k + 10]);
    }
}

fn popts() -> ProbeOptions {
    ProbeOptions {
        encoding_hint: None,
        delimiter_hint: None,
        max_header_bytes: 64,
    }
}

fn ready(encoding: TextEncoding, delimiter: u8, bom_len: u64) -> Result<Probe, InvalidCsv> {
    Ok(Probe::Ready(Dialect {
        encoding,
        delimiter,
        bom_len,
    }))
}

fn probe_err(prefix: &[u8], at_eof: bool, opts: &ProbeOptions) -> String {
    probe(prefix, at_eof, opts).expect_err("should fail").0
}

#[test]
fn probe_boms_win_over_hints() {
    let mut opts = popts();
    opts.encoding_hint = Some(TextEncoding::Windows1252);
    let mut raw = b"\xEF\xBB\xBFa;b\n".to_vec();
    assert_eq!(
        probe(&raw, false, &opts),
        ready(TextEncoding::Utf8, b';', 3)
    );
    raw = utf16("a\tb\n", false, true);
    assert_eq!(
        probe(&raw, false, &opts),
        ready(TextEncoding::Utf16Le, b'\t', 2)
    );
    raw = utf16("x|y|\"é\"\r\n1|2|3", true, true);
    assert_eq!(
        probe(&raw, false, &opts),
        ready(TextEncoding::Utf16Be, b'|', 2)
    );
    assert_eq!(
        probe(b"caf\xE9\n", false, &opts),
        ready(TextEncoding::Windows1252, b',', 0)
    );
    opts.encoding_hint = Some(TextEncoding::Utf16Le);
    raw = utf16("a;b\n", false, false);
    assert_eq!(
        probe(&raw, true, &opts),
        ready(TextEncoding::Utf16Le, b';', 0)
    );
    assert_eq!(
        probe(b"a,b\n", true, &popts()),
        ready(TextEncoding::Utf8, b',', 0)
    );
}

#[test]
fn probe_partial_bom_needs_more() {
    assert_eq!(probe(b"\xEF", false, &popts()), Ok(Probe::NeedMore));
    assert_eq!(probe(b"\xEF\xBB", false, &popts()), Ok(Probe::NeedMore));
    assert_eq!(probe(b"\xFE", false, &popts()), Ok(Probe::NeedMore));
    assert_eq!(
        probe_err(b"\xEF\xBB", true, &popts()),
        "the header row is not valid utf-8 text"
    );
}

#[test]
fn probe_delimiter_detection() {
    let detect = |header: &str| match probe(header.as_bytes(), true, &popts()) {
        Ok(Probe::Ready(d)) => d.delimiter,
        other => panic!("{header:?}: {other:?}"),
    };
    assert_eq!(detect("a;b;c,d\n"), b';');
    assert_eq!(detect("a\tb\tc|d\n"), b'\t');
    assert_eq!(detect("a|b|c\n"), b'|');
    assert_eq!(detect("name\n"), b',');
    // Ties go to , then ; then tab then |.
    assert_eq!(detect("a,b;c\n"), b',');
    assert_eq!(detect("a|b;c\tc\n"), b';');
    assert_eq!(detect("a|b\tc\n"), b'\t');
    // Delimiters inside quotes do not count, even across a quoted newline.
    assert_eq!(detect("\"a;b;c\",d\n"), b',');
    assert_eq!(detect("\"x\"\"; y;\",a|b|c\n"), b'|');
    assert_eq!(detect("\"a\nb,c,d\",e;f;g\nx,y,z,w,v\n"), b';');
    // A quote in the middle of a value is literal, as csv-core reads it.
    assert_eq!(detect("a\"b;c\nx,y,z\n"), b';');
    // Only the header row is looked at.
    assert_eq!(detect("a;b\nc,d,e,f\n"), b';');

    let mut opts = popts();
    opts.delimiter_hint = Some(b';');
    assert_eq!(
        probe(b"a,b,c\n", true, &opts),
        ready(TextEncoding::Utf8, b';', 0)
    );
    // With a hint, only the hinted delimiter starts a field that may be quoted.
    assert_eq!(
        probe(b"a,\"b\nc\";d\n", false, &opts),
        ready(TextEncoding::Utf8, b';', 0)
    );
}

#[test]
fn probe_needs_more_until_the_header_ends() {
    let opts = popts();
    assert_eq!(probe(b"", false, &opts), Ok(Probe::NeedMore));
    assert_eq!(probe(b"a,b", false, &opts), Ok(Probe::NeedMore));
    assert_eq!(
        probe(b"a,b", true, &opts),
        ready(TextEncoding::Utf8, b',', 0)
    );
    assert_eq!(probe(b"\r\n\n", false, &opts), Ok(Probe::NeedMore));
    assert_eq!(probe(b"\"a\nb\";c", false, &opts), Ok(Probe::NeedMore));
    assert_eq!(
        probe(b"\"a\nb\";c\r", false, &opts),
        ready(TextEncoding::Utf8, b';', 0)
    );
    assert_eq!(
        probe(b"\"unclosed\n", true, &opts),
        ready(TextEncoding::Utf8, b',', 0)
    );
    // A multi-byte character cut by the end of the prefix.
    assert_eq!(probe(b"caf\xC3", false, &opts), Ok(Probe::NeedMore));
    assert_eq!(
        probe(&utf16("a,b", false, true)[..5], false, &opts),
        Ok(Probe::NeedMore)
    );
    // Data rows after the header are not the probe's business.
    assert_eq!(
        probe(b"\n\na;b\n\xFF\x00", false, &opts),
        ready(TextEncoding::Utf8, b';', 0)
    );
}

#[test]
fn probe_errors() {
    let opts = popts();
    assert_eq!(probe_err(b"", true, &opts), "the file is empty");
    for raw in [
        &b"\xEF\xBB\xBF"[..],
        b"\xFF\xFE",
        b"\r\n\n\r",
        b"\xEF\xBB\xBF\n\n",
    ] {
        assert_eq!(
            probe_err(raw, true, &opts),
            "the file has no header row",
            "{raw:?}"
        );
    }
    assert_eq!(
        probe_err(&utf16("\r\n", true, true), true, &opts),
        "the file has no header row"
    );

    let mut small = popts();
    small.max_header_bytes = 8;
    assert_eq!(probe(b"abcdefgh", false, &small), Ok(Probe::NeedMore));
    assert_eq!(
        probe(b"abcdefgh\n", false, &small),
        ready(TextEncoding::Utf8, b',', 0)
    );
    assert_eq!(
        probe(b"\n\nabcdefgh\r", false, &small),
        ready(TextEncoding::Utf8, b',', 0)
    );
    let too_long = "the header row is longer than 8 bytes";
    assert_eq!(probe_err(b"abcdefghi", false, &small), too_long);
    assert_eq!(probe_err(b"abcdefghi\n", true, &small), too_long);
    assert_eq!(probe_err(b"\"abc\ndefg", false, &small), too_long);
    assert_eq!(probe_err("abcdefgé".as_bytes(), true, &small), too_long);
    // The same answer whether the bytes after the blank lines have arrived or not (the
    // `splitter` fuzz target found it depending on how the upload was cut into pieces).
    let blank = "the file has no header row in its first 8 bytes, only blank lines";
    let mut blank_then_bad = vec![b'\n'; 20];
    blank_then_bad.push(0xFF);
    for at_eof in [false, true] {
        assert_eq!(probe_err(&[b'\n'; 20], at_eof, &small), blank);
        assert_eq!(probe_err(&blank_then_bad, at_eof, &small), blank);
    }

    let binary = "the header row contains binary data";
    assert_eq!(probe_err(b"a,b\x00c\n", false, &opts), binary);
    assert_eq!(probe_err(b"a\x01", false, &opts), binary);
    assert_eq!(probe_err(b"a\x7F\n", false, &opts), binary);
    assert_eq!(probe_err("a\u{0085}b\n".as_bytes(), false, &opts), binary);
    // UTF-16 without a BOM read as UTF-8 is full of NULs.
    assert_eq!(
        probe_err(&utf16("a,b\n", false, false), false, &opts),
        binary
    );
    let mut cp1252 = popts();
    cp1252.encoding_hint = Some(TextEncoding::Windows1252);
    assert_eq!(probe_err(b"a\x81b\n", false, &cp1252), binary);
    // Tabs and quoted newlines are text.
    assert_eq!(
        probe(b"a\tb\n", false, &opts),
        ready(TextEncoding::Utf8, b'\t', 0)
    );

    assert_eq!(
        probe_err(b"a\xFF,b\n", false, &opts),
        "the header row is not valid utf-8 text"
    );
    assert_eq!(
        probe_err(b"\n\xC3(\n", false, &opts),
        "the header row is not valid utf-8 text"
    );
    let mut bad16 = utf16("a", false, true);
    bad16.extend_from_slice(&0xDC00u16.to_le_bytes());
    bad16.extend_from_slice(&utf16(",b\n", false, false));
    assert_eq!(
        probe_err(&bad16, false, &opts),
        "the header row is not valid utf-16le text"
    );
}

#[test]
fn encoding_hints() {
    use TextEncoding::*;
    let cases = [
        ("utf-8", Utf8),
        ("UTF8", Utf8),
        ("utf-16", Utf16Le),
        ("UTF-16LE", Utf16Le),
        ("utf-16be", Utf16Be),
        ("Windows-1252", Windows1252),
        ("cp1252", Windows1252),
        ("ISO-8859-1", Latin1),
        ("latin1", Latin1),
        ("Latin-1", Latin1),
    ];
    for (hint, encoding) in cases {
        assert_eq!(TextEncoding::from_hint(hint), Some(encoding), "{hint}");
    }
    for encoding in [Utf8, Utf16Le, Utf16Be, Windows1252, Latin1] {
        assert_eq!(TextEncoding::from_hint(encoding.as_str()), Some(encoding));
    }
    for hint in ["", "utf-32", "ascii", "shift_jis", "utf-8-bom"] {
        assert_eq!(TextEncoding::from_hint(hint), None, "{hint}");
    }
}

#[test]
fn delimiter_hints() {
    let cases = [
        (",", Some(b',')),
        (";", Some(b';')),
        ("|", Some(b'|')),
        ("\t", Some(b'\t')),
        ("tab", Some(b'\t')),
        ("TAB", Some(b'\t')),
        ("\\t", Some(b'\t')),
        ("", None),
        (":", None),
        (",,", None),
        (" ", None),
    ];
    for (hint, expected) in cases {
        assert_eq!(delimiter_from_hint(hint), expected, "{hint:?}");
    }
}
