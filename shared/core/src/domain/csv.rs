//! Streaming CSV splitting that remembers where every record came from.
//!
//! Uploads can be a gigabyte, so nothing here holds a whole file, a whole record or even a whole
//! field: [`Splitter`] takes the raw bytes in whatever chunks they arrive in (a chunk may end in
//! the middle of a character or between the CR and LF of a CRLF) and emits a [`RawRecord`] per CSV
//! record, carrying the raw byte offset and the physical line where the record starts. Those two
//! numbers are what let a worker re-parse a byte range `[start of row N, start of row M)` of the
//! original file on its own and get exactly the rows a full pass produced, so they are always in
//! the coordinates of the original bytes, never of the transcoded text.
//!
//! [`probe`] looks at the first bytes of an upload to settle the [`Dialect`] (encoding, delimiter,
//! BOM) and to reject files that are obviously not CSV before any splitting starts.
//!
//! Parsing itself is csv-core's (RFC 4180 quoting, LF, CRLF and lone CR terminators, blank lines
//! skipped). Encodings other than UTF-8 are transcoded to UTF-8 with encoding_rs first, because
//! csv-core only understands ASCII-compatible bytes; each UTF-8 byte handed to csv-core is then
//! mapped back to the number of raw bytes it stands for.

use csv_core::{ReadFieldResult, Reader, ReaderBuilder};
use encoding_rs::{Decoder, DecoderResult, Encoding};

use super::InvalidCsv;

/// The delimiters a form may choose, in the order that wins a tie when guessing.
const DELIMITERS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// What a malformed UTF-16 sequence becomes, so the row survives and can be reported.
const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

/// csv-core copies a field into a caller buffer; a fixed one keeps memory flat whatever the
/// field size.
const FIELD_SCRATCH_BYTES: usize = 8 * 1024;

/// Size of the transcoding buffer; fixed for the same reason as [`FIELD_SCRATCH_BYTES`].
const DECODE_BYTES: usize = 16 * 1024;

/// The text encodings an upload may be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoding {
    Utf8,
    Utf16Le,
    Utf16Be,
    Windows1252,
    Latin1,
}

impl TextEncoding {
    /// Parses the `encoding` form hint: "utf-8" (also "utf8"), "utf-16" (little-endian, the
    /// Windows default; also "utf-16le"), "utf-16be", "windows-1252" (also "cp1252"),
    /// "iso-8859-1" (also "latin1", "latin-1"). Case-insensitive and tolerant of surrounding
    /// whitespace; `None` for anything else.
    pub fn from_hint(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "utf-8" | "utf8" => Some(Self::Utf8),
            "utf-16" | "utf-16le" => Some(Self::Utf16Le),
            "utf-16be" => Some(Self::Utf16Be),
            "windows-1252" | "cp1252" => Some(Self::Windows1252),
            "iso-8859-1" | "latin1" | "latin-1" => Some(Self::Latin1),
            _ => None,
        }
    }

    /// The canonical label; [`TextEncoding::from_hint`] accepts it back.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Utf8 => "utf-8",
            Self::Utf16Le => "utf-16le",
            Self::Utf16Be => "utf-16be",
            Self::Windows1252 => "windows-1252",
            Self::Latin1 => "iso-8859-1",
        }
    }

    /// The encoding_rs decoder to use. Latin-1 shares windows-1252's because that is what the
    /// WHATWG standard (and therefore every browser that produced the file's label) means by
    /// "iso-8859-1".
    fn encoding(self) -> &'static Encoding {
        match self {
            Self::Utf8 => encoding_rs::UTF_8,
            Self::Utf16Le => encoding_rs::UTF_16LE,
            Self::Utf16Be => encoding_rs::UTF_16BE,
            Self::Windows1252 | Self::Latin1 => encoding_rs::WINDOWS_1252,
        }
    }
}

/// Parses the `delimiter` form hint: ",", ";", "|", or a tab written as a real tab, "tab" (any
/// case) or the two characters `\t` (what people type into a text box). `None` for anything else,
/// so only `b','`, `b';'`, `b'\t'` and `b'|'` can come out.
pub fn delimiter_from_hint(s: &str) -> Option<u8> {
    match s {
        "," => Some(b','),
        ";" => Some(b';'),
        "|" => Some(b'|'),
        "\t" | "\\t" => Some(b'\t'),
        _ if s.eq_ignore_ascii_case("tab") => Some(b'\t'),
        _ => None,
    }
}

/// What the uploader told us, and how far [`probe`] may look for the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOptions {
    pub encoding_hint: Option<TextEncoding>,
    pub delimiter_hint: Option<u8>,
    /// Longest header row accepted, in decoded UTF-8 bytes (terminator excluded). The same bound
    /// also applies to blank lines before the header, so the caller's buffer stays bounded.
    pub max_header_bytes: usize,
}

/// How to read a file: decided once by [`probe`], then used by every [`Splitter`] over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    pub encoding: TextEncoding,
    pub delimiter: u8,
    /// raw bytes of BOM to skip (0, 2 or 3)
    pub bom_len: u64,
}

/// The outcome of [`probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The header row is not complete yet: call again with more bytes (or with `at_eof`).
    NeedMore,
    Ready(Dialect),
}

/// Looks at the first raw bytes of the file; the caller keeps appending and calling again while
/// it gets [`Probe::NeedMore`], with `at_eof` true once no more bytes will come.
///
/// - A BOM always wins (EF BB BF => UTF-8, FF FE => UTF-16LE, FE FF => UTF-16BE), then the
///   encoding hint, then UTF-8.
/// - The header row is found after skipping leading blank lines: it runs up to the first CR or LF
///   outside double quotes (a quoted header field may contain newlines).
/// - The delimiter is the hint if given, otherwise whichever of `,` `;` tab `|` occurs most
///   often outside quotes in the header row (ties won in that order, `,` if none occurs).
///
/// Errors are meant to be shown to the uploader as they are.
pub fn probe(prefix: &[u8], at_eof: bool, opts: &ProbeOptions) -> Result<Probe, InvalidCsv> {
    if prefix.is_empty() {
        return if at_eof {
            Err(invalid("the file is empty"))
        } else {
            Ok(Probe::NeedMore)
        };
    }
    let (bom_encoding, bom_len) = match sniff_bom(prefix) {
        BomSniff::Found(encoding, len) => (Some(encoding), len),
        BomSniff::Undecided if !at_eof => return Ok(Probe::NeedMore),
        BomSniff::Undecided | BomSniff::Absent => (None, 0),
    };
    let encoding = bom_encoding
        .or(opts.encoding_hint)
        .unwrap_or(TextEncoding::Utf8);
    let limit = opts.max_header_bytes;
    // Blank lines and the header are each capped at `limit`, so nothing past this can matter;
    // stopping here keeps a huge first chunk from being transcoded for nothing.
    let budget = limit.saturating_mul(2).saturating_add(4);
    let decoded = decode_prefix(encoding, &prefix[bom_len..], at_eof, budget);
    let not_valid = || {
        invalid(format!(
            "the header row is not valid {} text",
            encoding.as_str()
        ))
    };

    let text = &decoded.text;
    let blank_len = text.iter().take_while(|&&b| is_line_break(b)).count();
    if blank_len == text.len() {
        // Too many blank lines is decided first: a caller that is fed fewer bytes at a time
        // stops here before it sees what follows them, and the answer must not depend on that.
        if blank_len > limit {
            return Err(too_many_blank_lines(limit));
        }
        if decoded.malformed {
            return Err(not_valid());
        }
        if decoded.complete {
            return Err(invalid("the file has no header row"));
        }
        return Ok(Probe::NeedMore);
    }
    if blank_len > limit {
        return Err(too_many_blank_lines(limit));
    }

    let delimiters = match opts.delimiter_hint.as_slice() {
        [] => &DELIMITERS[..],
        hint => hint,
    };
    let scan = scan_header(&text[blank_len..], delimiters, limit)?;
    if !scan.terminated {
        if decoded.malformed {
            return Err(not_valid());
        }
        if !decoded.complete {
            // Cannot happen while the budget exceeds blank lines plus header, but never ask for
            // more bytes that would be thrown away again.
            if text.len() > budget {
                return Err(header_too_long(limit));
            }
            return Ok(Probe::NeedMore);
        }
    }
    let delimiter = opts
        .delimiter_hint
        .unwrap_or_else(|| pick_delimiter(scan.counts));
    Ok(Probe::Ready(Dialect {
        encoding,
        delimiter,
        bom_len: bom_len as u64,
    }))
}

fn invalid(message: impl Into<String>) -> InvalidCsv {
    InvalidCsv(message.into())
}

fn header_too_long(limit: usize) -> InvalidCsv {
    invalid(format!("the header row is longer than {limit} bytes"))
}

fn too_many_blank_lines(limit: usize) -> InvalidCsv {
    invalid(format!(
        "the file has no header row in its first {limit} bytes, only blank lines"
    ))
}

fn is_line_break(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

enum BomSniff {
    Found(TextEncoding, usize),
    /// The prefix is a proper prefix of some BOM, so one more byte could change the answer.
    Undecided,
    Absent,
}

fn sniff_bom(prefix: &[u8]) -> BomSniff {
    const BOMS: [(&[u8], TextEncoding); 3] = [
        (b"\xEF\xBB\xBF", TextEncoding::Utf8),
        (b"\xFF\xFE", TextEncoding::Utf16Le),
        (b"\xFE\xFF", TextEncoding::Utf16Be),
    ];
    if let Some((bom, encoding)) = BOMS.iter().find(|(bom, _)| prefix.starts_with(bom)) {
        return BomSniff::Found(*encoding, bom.len());
    }
    if BOMS.iter().any(|(bom, _)| bom.starts_with(prefix)) {
        BomSniff::Undecided
    } else {
        BomSniff::Absent
    }
}

struct DecodedPrefix {
    /// UTF-8, cut at the first malformed sequence (if any).
    text: Vec<u8>,
    malformed: bool,
    /// Every raw byte was decoded and no more will come.
    complete: bool,
}

fn decode_prefix(
    encoding: TextEncoding,
    mut raw: &[u8],
    at_eof: bool,
    budget: usize,
) -> DecodedPrefix {
    let mut decoder = encoding.encoding().new_decoder_without_bom_handling();
    let mut text = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let (result, read, written) =
            decoder.decode_to_utf8_without_replacement(raw, &mut buf, at_eof);
        raw = &raw[read..];
        text.extend_from_slice(&buf[..written]);
        let (malformed, complete) = match result {
            DecoderResult::InputEmpty => (false, at_eof),
            DecoderResult::Malformed(..) => (true, false),
            DecoderResult::OutputFull if text.len() > budget => (false, false),
            DecoderResult::OutputFull => continue,
        };
        return DecodedPrefix {
            text,
            malformed,
            complete,
        };
    }
}

struct HeaderScan {
    /// A CR or LF outside quotes ended the header (otherwise the text ran out first).
    terminated: bool,
    /// Occurrences of each of [`DELIMITERS`] outside quotes.
    counts: [usize; 4],
}

/// Walks the header row with csv-core's quoting rules (a quote only opens a quoted field at the
/// start of a field), so a stray quote inside a value does not swallow the rest of the file.
/// Without a delimiter hint, any candidate delimiter counts as starting a new field.
fn scan_header(text: &[u8], delimiters: &[u8], limit: usize) -> Result<HeaderScan, InvalidCsv> {
    #[derive(Clone, Copy)]
    enum State {
        FieldStart,
        Unquoted,
        Quoted,
        /// A quote inside a quoted field: either the closing one or the first of `""`.
        QuoteInQuoted,
    }
    let mut state = State::FieldStart;
    let mut counts = [0; 4];
    for (i, &b) in text.iter().enumerate() {
        let quoted = matches!(state, State::Quoted);
        if !quoted && is_line_break(b) {
            return Ok(HeaderScan {
                terminated: true,
                counts,
            });
        }
        if i >= limit {
            return Err(header_too_long(limit));
        }
        if is_control(b, text.get(i + 1).copied()) {
            return Err(invalid("the header row contains binary data"));
        }
        state = match (state, b) {
            (State::Quoted, b'"') => State::QuoteInQuoted,
            (State::Quoted, _) => State::Quoted,
            (State::FieldStart | State::QuoteInQuoted, b'"') => State::Quoted,
            (_, b) if delimiters.contains(&b) => {
                if let Some(k) = DELIMITERS.iter().position(|&d| d == b) {
                    counts[k] += 1;
                }
                State::FieldStart
            }
            _ => State::Unquoted,
        };
    }
    Ok(HeaderScan {
        terminated: false,
        counts,
    })
}

/// Control characters (C0, DEL, C1) other than tab and line breaks in a header mean the file is
/// not text in the chosen encoding (typically UTF-16 without a BOM, or a binary upload). `text` is
/// UTF-8, so a C1 character is the pair C2 80..=9F.
fn is_control(b: u8, next: Option<u8>) -> bool {
    match b {
        b'\t' | b'\r' | b'\n' => false,
        0x00..=0x1F | 0x7F => true,
        0xC2 => matches!(next, Some(0x80..=0x9F)),
        _ => false,
    }
}

fn pick_delimiter(counts: [usize; 4]) -> u8 {
    let mut best = 0;
    for k in 1..DELIMITERS.len() {
        // Strictly greater, so earlier candidates win ties.
        if counts[k] > counts[best] {
            best = k;
        }
    }
    if counts[best] == 0 {
        b','
    } else {
        DELIMITERS[best]
    }
}

/// Where a [`Splitter`] starts and how much of each record it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitterOptions {
    pub dialect: Dialect,
    /// raw offset of the first byte that will be fed. If it lies inside the BOM
    /// (`start_offset < dialect.bom_len`), the rest of the BOM is skipped, so a caller may feed
    /// the file either from 0 or from `bom_len`.
    pub start_offset: u64,
    /// physical line number (1-based) at start_offset
    pub start_line: u64,
    /// a field longer than this (in decoded UTF-8 bytes) is kept truncated to this many bytes,
    /// with `truncated` set. The cut is exact, so it may split a multi-byte character.
    pub max_field_bytes: usize,
    /// fields beyond this many in one record are counted but not kept
    pub max_fields: usize,
}

/// One field as found in the file, quotes removed and `""` unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawField {
    pub bytes: Vec<u8>,
    /// The field was longer than `max_field_bytes`; `bytes` holds only its beginning.
    pub truncated: bool,
}

/// One CSV record and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Raw offset (in the original file) of the record's first byte, after any blank lines
    /// before it.
    pub start_offset: u64,
    /// Physical line where the record starts (quoted newlines in earlier records count).
    pub line_number: u64,
    /// At most `max_fields` kept. For UTF-8 input: the raw bytes (possibly invalid UTF-8, the
    /// caller validates); for the other encodings: the decoded UTF-8 bytes.
    pub fields: Vec<RawField>,
    /// The true number of fields, even beyond `max_fields`.
    pub field_count: usize,
    /// Only for UTF-16: the decoder hit malformed input (an unpaired surrogate) inside this
    /// record and replaced it with U+FFFD.
    pub malformed_encoding: bool,
}

/// Splits a stream of raw bytes into [`RawRecord`]s with bounded memory: at most `max_fields`
/// fields of at most `max_field_bytes` bytes each, plus fixed-size buffers.
pub struct Splitter {
    parser: RecordParser,
    /// `None` for UTF-8, which csv-core reads as is.
    decoder: Option<Decoder>,
    decoded: Box<[u8]>,
    offset: u64,
    bom_left: u64,
    finished: bool,
}

impl Splitter {
    /// A splitter positioned at `opts.start_offset`, which must be the file start, the end of the
    /// BOM or a previous record's `start_offset` (with its `line_number` as `start_line`).
    pub fn new(opts: SplitterOptions) -> Self {
        let dialect = opts.dialect;
        let width = match dialect.encoding {
            TextEncoding::Utf8 => RawWidth::Same,
            TextEncoding::Utf16Le | TextEncoding::Utf16Be => RawWidth::Utf16,
            TextEncoding::Windows1252 | TextEncoding::Latin1 => RawWidth::OnePerChar,
        };
        let decoder = (dialect.encoding != TextEncoding::Utf8).then(|| {
            dialect
                .encoding
                .encoding()
                .new_decoder_without_bom_handling()
        });
        let decoded = if decoder.is_some() {
            vec![0; DECODE_BYTES].into_boxed_slice()
        } else {
            Box::default()
        };
        Splitter {
            parser: RecordParser {
                reader: ReaderBuilder::new().delimiter(dialect.delimiter).build(),
                primed: false,
                width,
                max_field_bytes: opts.max_field_bytes,
                max_fields: opts.max_fields,
                pos: opts.start_offset,
                line: opts.start_line,
                prev_cr: false,
                in_record: false,
                record_offset: 0,
                record_line: 0,
                fields: Vec::new(),
                field_count: 0,
                field: Vec::new(),
                field_truncated: false,
                malformed: false,
                scratch: vec![0; FIELD_SCRATCH_BYTES].into_boxed_slice(),
            },
            decoder,
            decoded,
            offset: opts.start_offset,
            bom_left: dialect.bom_len.saturating_sub(opts.start_offset),
            finished: false,
        }
    }

    /// Feeds the next raw bytes; every record completed by them is pushed to `out`. Bytes fed
    /// after [`Splitter::finish`] are ignored.
    pub fn feed(&mut self, raw: &[u8], out: &mut Vec<RawRecord>) {
        if self.finished {
            return;
        }
        self.offset += raw.len() as u64;
        let skip = usize::try_from(self.bom_left).map_or(raw.len(), |left| left.min(raw.len()));
        self.bom_left -= skip as u64;
        self.parser.pos += skip as u64;
        self.push(&raw[skip..], false, out);
    }

    /// End of input: flushes a final record that has no trailing line terminator.
    pub fn finish(&mut self, out: &mut Vec<RawRecord>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.push(&[], true, out);
        self.parser.finish(out);
    }

    /// Raw bytes consumed so far, as an absolute offset (start_offset + fed bytes).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn push(&mut self, mut raw: &[u8], last: bool, out: &mut Vec<RawRecord>) {
        let Some(decoder) = self.decoder.as_mut() else {
            self.parser.process(raw, out);
            return;
        };
        loop {
            let (result, read, written) =
                decoder.decode_to_utf8_without_replacement(raw, &mut self.decoded, last);
            raw = &raw[read..];
            self.parser.process(&self.decoded[..written], out);
            match result {
                DecoderResult::InputEmpty => return,
                DecoderResult::OutputFull => {}
                DecoderResult::Malformed(..) => {
                    // Replacing ourselves (rather than letting encoding_rs do it) is how we learn
                    // which record the damage is in; a genuine U+FFFD in the file is not damage.
                    self.parser.process(REPLACEMENT, out);
                    self.parser.malformed = true;
                }
            }
        }
    }
}

/// How many raw bytes a UTF-8 byte handed to csv-core stands for. Summing per byte (rather than
/// per character) keeps the mapping exact even when csv-core stops in the middle of a character.
#[derive(Clone, Copy)]
enum RawWidth {
    /// UTF-8 input is parsed as is.
    Same,
    /// windows-1252 / Latin-1: one raw byte per character, charged to its UTF-8 lead byte.
    OnePerChar,
    /// UTF-16: two raw bytes per code unit, four for a character outside the BMP (UTF-8 lead
    /// byte F0..=F4). An unpaired surrogate becomes U+FFFD, whose lead byte EF also charges two.
    Utf16,
}

impl RawWidth {
    fn raw_len(self, utf8: &[u8]) -> u64 {
        match self {
            RawWidth::Same => utf8.len() as u64,
            RawWidth::OnePerChar => utf8.iter().filter(|&&b| !is_continuation(b)).count() as u64,
            RawWidth::Utf16 => utf8
                .iter()
                .map(|&b| match b {
                    0x80..=0xBF => 0,
                    0xF0..=0xF4 => 4,
                    _ => 2,
                })
                .sum(),
        }
    }
}

fn is_continuation(b: u8) -> bool {
    b & 0xC0 == 0x80
}

/// The csv-core side of a [`Splitter`]: takes UTF-8 (or raw UTF-8 input) and tracks raw
/// offsets, line numbers and the record being built.
struct RecordParser {
    reader: Reader,
    /// csv-core strips a UTF-8 BOM from the first input it is given. The BOM is our business
    /// (via `bom_len`), and a resumed splitter must not strip a U+FEFF that happens to start a
    /// record, so the very first call gets a single byte, which is too short to be stripped.
    primed: bool,
    width: RawWidth,
    max_field_bytes: usize,
    max_fields: usize,
    /// Raw offset of the next byte csv-core will see.
    pos: u64,
    /// Physical line of the next byte.
    line: u64,
    /// The last byte seen was CR, so an LF now completes a CRLF rather than starting a new line.
    prev_cr: bool,
    in_record: bool,
    record_offset: u64,
    record_line: u64,
    fields: Vec<RawField>,
    field_count: usize,
    field: Vec<u8>,
    field_truncated: bool,
    malformed: bool,
    scratch: Box<[u8]>,
}

impl RecordParser {
    fn process(&mut self, mut input: &[u8], out: &mut Vec<RawRecord>) {
        while !input.is_empty() {
            if !self.in_record {
                // csv-core would skip these too, but only by stepping over them ourselves do we
                // learn the offset and line of the record's first real byte. Every state csv-core
                // can be in between records treats CR and LF the same way, so skipping them here
                // does not change how it parses what follows.
                let blank = input
                    .iter()
                    .position(|&b| !is_line_break(b))
                    .unwrap_or(input.len());
                self.account(&input[..blank]);
                input = &input[blank..];
                if input.is_empty() {
                    return;
                }
                self.in_record = true;
                self.record_offset = self.pos;
                self.record_line = self.line;
                self.malformed = false;
            }
            let chunk = if self.primed { input } else { &input[..1] };
            self.primed = true;
            let (result, read, written) = self.reader.read_field(chunk, &mut self.scratch);
            self.account(&input[..read]);
            input = &input[read..];
            self.keep(written);
            if let ReadFieldResult::Field { record_end } = result {
                self.end_field();
                if record_end {
                    self.end_record(out);
                }
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<RawRecord>) {
        if !self.in_record {
            return;
        }
        // An empty input tells csv-core the data is over; it then closes the open field and
        // record (one call per remaining field, though in practice only the last one is open).
        loop {
            let (result, _, written) = self.reader.read_field(&[], &mut self.scratch);
            self.keep(written);
            match result {
                ReadFieldResult::Field { record_end } => {
                    self.end_field();
                    if record_end {
                        self.end_record(out);
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Advances the raw offset and the physical line over bytes csv-core (or the blank-line skip)
    /// consumed.
    fn account(&mut self, utf8: &[u8]) {
        for &b in utf8 {
            if b == b'\r' || (b == b'\n' && !self.prev_cr) {
                self.line += 1;
            }
            self.prev_cr = b == b'\r';
        }
        self.pos += self.width.raw_len(utf8);
    }

    /// Adds the `written` bytes csv-core just put in `scratch` to the current field, as far as
    /// the limits allow.
    fn keep(&mut self, written: usize) {
        if written == 0 || self.field_count >= self.max_fields {
            return;
        }
        let bytes = &self.scratch[..written];
        let room = self.max_field_bytes.saturating_sub(self.field.len());
        let kept = room.min(bytes.len());
        self.field.extend_from_slice(&bytes[..kept]);
        if kept < bytes.len() {
            self.field_truncated = true;
        }
    }

    fn end_field(&mut self) {
        if self.field_count < self.max_fields {
            self.fields.push(RawField {
                bytes: std::mem::take(&mut self.field),
                truncated: self.field_truncated,
            });
        }
        self.field_truncated = false;
        self.field_count += 1;
    }

    fn end_record(&mut self, out: &mut Vec<RawRecord>) {
        let width = self.fields.len();
        out.push(RawRecord {
            start_offset: self.record_offset,
            line_number: self.record_line,
            // The next record most likely has as many fields as this one: sized for them, its
            // vector grows once instead of four times.
            fields: std::mem::replace(&mut self.fields, Vec::with_capacity(width)),
            field_count: self.field_count,
            malformed_encoding: self.malformed,
        });
        self.field_count = 0;
        self.malformed = false;
        self.in_record = false;
    }
}

#[cfg(test)]
mod tests;
