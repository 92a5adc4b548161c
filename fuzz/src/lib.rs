//! `orbit-fuzz`: fuzz targets for the parts of Orbit that read what clients send.
//!
//! Each target is a function from arbitrary bytes that panics when a property fails; it is
//! driven three ways:
//!
//! - coverage-guided, by AFL++ through afl.rs (`src/bin/afl.rs`, feature `afl`, built with
//!   `cargo afl build`), for long campaigns on a developer's machine;
//! - by proptest with a fixed number of structured cases (`tests/fuzz/properties.rs`), a few
//!   seconds in `cargo test`;
//! - by replaying the committed corpus (`corpus/<target>/`, seeds and every input a fuzzer
//!   found interesting or failing) in `cargo test`.
//!
//! Targets, one module each:
//!
//! - [`splitter`]: CSV probing, splitting and chunk planning: chunks reassemble to the file,
//!   start on record boundaries, re-parse alone to exactly the rows a full pass finds (as a
//!   worker does), and agree with the `csv` crate's sequential reader and a count of lines.
//! - [`header`]: header matching is total and blind to case and separators; column maps hold
//!   their invariants.
//! - [`normalize`]: email, phone, LinkedIn URL and name normalization are total and idempotent;
//!   a row judged on its normalized values is judged the same.
//! - [`cursor`]: pagination cursors round-trip; anything else is a `400 invalid_request`.
//! - [`decompress`]: gzip and zstd uploads read back exactly, or fail with an offset inside
//!   the body, in bounded pieces, however the body is cut up.
//! - [`multipart`]: arbitrary upload requests through the real router (embedded stack,
//!   in-process): an answer within a deadline, never a 5xx, every error problem+json, and no
//!   object left behind by a request that failed.
//!
//! `docs/security.md` says how long each ran and what it found.

pub mod cursor;
pub mod decompress;
pub mod header;
pub mod multipart;
pub mod normalize;
pub mod splitter;

/// A target: panics when a property fails on the input.
pub type Target = fn(&[u8]);

/// The targets by name, as the AFL driver and the corpus replay know them. `multipart` is not
/// here: it needs a [`multipart::Gateway`].
pub const PURE_TARGETS: [(&str, Target); 5] = [
    ("splitter", splitter::check),
    ("header", header::check),
    ("normalize", normalize::check),
    ("cursor", cursor::check),
    ("decompress", decompress::check),
];

/// A few bytes of the input that choose options, so one input decides both the options and
/// the data; missing bytes read as zero.
pub(crate) struct Knobs<'a> {
    bytes: &'a [u8],
}

impl<'a> Knobs<'a> {
    /// Splits `n` option bytes off the front of `data`.
    pub(crate) fn split(data: &'a [u8], n: usize) -> (Knobs<'a>, &'a [u8]) {
        let n = n.min(data.len());
        (Knobs { bytes: &data[..n] }, &data[n..])
    }

    pub(crate) fn byte(&self, i: usize) -> u8 {
        self.bytes.get(i).copied().unwrap_or(0)
    }
}
