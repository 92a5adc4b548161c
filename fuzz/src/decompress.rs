//! Target `decompress`: the reader that tells a gzip or zstd upload by its first bytes and
//! decompresses it as it streams (`orbit_gateway::upload::decode`).
//!
//! Input: two option bytes, then data. Option byte 0 chooses what the body is: the data as it
//! is (told by its own first bytes), the data behind a gzip or a zstd magic (arbitrary streams
//! that claim to be compressed), or the data compressed by gzip or zstd (with zstd's checksum),
//! then cut short or with one byte flipped where option byte 1 says. Option byte 1 also sets
//! the size of the pieces the body arrives in.
//!
//! Properties:
//! - never a panic, and an answer for every body: the CSV, or an error of the body's own;
//! - no piece of CSV is larger than `decode::PIECE_BYTES`, whatever the body decompresses to
//!   (a bomb cannot make the reader hold more);
//! - a body read whole counts every byte received; a decoding error's offset lies within the
//!   body;
//! - what was compressed intact reads back as exactly the data; cut short or flipped, it is an
//!   error, never other rows (zstd with its checksum, gzip with its CRC);
//! - the answer is the same whether the body comes in one piece or many.

use std::io::Write as _;

use bytes::Bytes;
use futures::StreamExt;
use orbit_core::model::Compression;
use orbit_gateway::upload::decode::{self, Limits, PIECE_BYTES};
use orbit_gateway::upload::PipelineError;

use crate::Knobs;

/// Where reading stops: enough to see a bomb go past any limit the pipeline would set.
const READ_AT_MOST: usize = 4 << 20;

const LIMITS: Limits = Limits {
    max_compressed_bytes: 1 << 30,
    zstd_window_log: 23,
};

/// What reading a body gave: the CSV (its first `READ_AT_MOST` bytes), or a decoding error.
#[derive(Debug, PartialEq)]
enum Outcome {
    Csv(Vec<u8>),
    Corrupt,
}

pub fn check(data: &[u8]) {
    let (knobs, data) = Knobs::split(data, 2);
    let (mode, spot) = (knobs.byte(0) % 5, knobs.byte(1));
    let (body, expected) = match mode {
        0 => (data.to_vec(), Expect::Anything),
        1 => ([&[0x1f, 0x8b][..], data].concat(), Expect::Anything),
        2 => (
            [&[0x28, 0xb5, 0x2f, 0xfd][..], data].concat(),
            Expect::Anything,
        ),
        _ => {
            let packed = if mode == 3 { gzip(data) } else { zstd(data) };
            damage(packed, spot, data)
        }
    };
    let piece = 1 + usize::from(spot) * 37;
    let whole = read(&body, body.len().max(1));
    let in_pieces = read(&body, piece);
    assert_eq!(whole, in_pieces, "whole and in pieces of {piece} differ");
    match expected {
        Expect::Exactly(outcome) => assert_eq!(whole, outcome),
        Expect::DataOrCorrupt(data) => assert!(
            whole == Outcome::Csv(data) || whole == Outcome::Corrupt,
            "a damaged stream read as other rows"
        ),
        Expect::Anything => {}
    }
    if mode == 0 && Compression::sniff(&body[..body.len().min(4)]) == Compression::None {
        assert_eq!(whole, Outcome::Csv(body.clone()), "plain text was changed");
    }
}

/// What a body must read as.
enum Expect {
    Exactly(Outcome),
    /// A flipped bit: the data whole (in a header field the format ignores, such as gzip's
    /// mtime), or an error; never other rows.
    DataOrCorrupt(Vec<u8>),
    Anything,
}

/// The compressed body, maybe damaged, and what it must read as.
fn damage(packed: Vec<u8>, spot: u8, data: &[u8]) -> (Vec<u8>, Expect) {
    let at = usize::from(spot) * packed.len() / 256;
    match spot % 3 {
        0 => (packed, Expect::Exactly(Outcome::Csv(data.to_vec()))),
        // Cut inside the magic, what is left is text.
        1 if at < Compression::MAGIC_LEN => (packed[..at].to_vec(), Expect::Anything),
        1 => (packed[..at].to_vec(), Expect::Exactly(Outcome::Corrupt)),
        _ => {
            let mut flipped = packed;
            let at = at.min(flipped.len() - 1);
            flipped[at] ^= 1 << (spot % 8);
            let expect = match at < Compression::MAGIC_LEN {
                true => Expect::Anything,
                false => Expect::DataOrCorrupt(data.to_vec()),
            };
            (flipped, expect)
        }
    }
}

fn read(body: &[u8], piece: usize) -> Outcome {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let pieces: Vec<Result<Bytes, std::io::Error>> = body
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let Ok(mut decoded) = decode::open(futures::stream::iter(pieces), LIMITS).await else {
            panic!("opening a body that has no error of its own failed");
        };
        let mut csv = Vec::new();
        while let Some(next) = decoded.csv.next().await {
            match next {
                Ok(bytes) => {
                    assert!(
                        bytes.len() <= PIECE_BYTES,
                        "a piece of {} bytes",
                        bytes.len()
                    );
                    csv.extend_from_slice(&bytes);
                    if csv.len() > READ_AT_MOST {
                        // Cut at the same place however the pieces fell.
                        csv.truncate(READ_AT_MOST);
                        return Outcome::Csv(csv);
                    }
                }
                Err(PipelineError::Corrupt { offset, .. }) => {
                    assert!(offset <= body.len() as u64, "offset {offset} past the body");
                    return Outcome::Corrupt;
                }
                Err(_) => panic!("an error that is not the body's"),
            }
        }
        assert_eq!(decoded.received_bytes(), body.len() as u64);
        Outcome::Csv(csv)
    })
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("in memory");
    e.finish().expect("in memory")
}

fn zstd(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 1).expect("in memory");
    e.include_checksum(true).expect("a known parameter");
    e.write_all(data).expect("in memory");
    e.finish().expect("in memory")
}
