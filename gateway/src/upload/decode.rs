//! Compressed uploads: a gzip or zstd file is told by its first bytes (whatever its name or
//! part headers say) and decompressed as it streams, so that everything after it (the hash,
//! the object write, the planner) sees the CSV itself.
//!
//! Memory stays flat: the decoder reads the body through a buffer of one body piece and
//! yields at most [`PIECE_BYTES`] of CSV at a time, which the pipeline hashes, stores and plans
//! before asking for more. A decompression bomb therefore costs at most
//! `ingest.max_upload_bytes` of work before the pipeline's size check refuses it; zstd's
//! window, the one buffer a frame can make large, is bounded by
//! `ingest.max_zstd_window_log`.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_compression::tokio::bufread::{GzipDecoder, ZstdDecoder};
use bytes::Bytes;
use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt};
use orbit_core::model::Compression;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};
use tokio_util::io::{ReaderStream, StreamReader};

use super::pipeline::PipelineError;
use crate::metrics::METRICS;

/// The most decompressed bytes handed on at once.
pub const PIECE_BYTES: usize = 64 * 1024;

/// The limits a compressed body is read under.
#[derive(Clone, Copy)]
pub struct Limits {
    /// `ingest.max_compressed_upload_bytes`.
    pub max_compressed_bytes: u64,
    /// `ingest.max_zstd_window_log`.
    pub zstd_window_log: u32,
}

/// A body being read: its compression, the CSV it carries, and how many bytes of it came.
pub struct Decoded<'a, E> {
    pub compression: Compression,
    pub csv: BoxStream<'a, Result<Bytes, PipelineError<E>>>,
    received: Arc<AtomicU64>,
}

impl<E> Decoded<'_, E> {
    /// The body's bytes read so far, as they came: all of them once `csv` has ended.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Reads the body's first bytes to tell its compression, then returns the CSV in it.
pub async fn open<'a, S, E>(mut body: S, limits: Limits) -> Result<Decoded<'a, E>, PipelineError<E>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'a,
    E: Send + 'a,
{
    let mut head = Vec::new();
    let mut head_len = 0;
    while head_len < Compression::MAGIC_LEN {
        match body.next().await {
            Some(Ok(piece)) => {
                head_len += piece.len();
                head.push(piece);
            }
            Some(Err(e)) => return Err(PipelineError::Body(e)),
            None => break,
        }
    }
    let magic: Vec<u8> = head
        .iter()
        .flat_map(|piece| piece.iter().copied())
        .take(Compression::MAGIC_LEN)
        .collect();
    let compression = Compression::sniff(&magic);
    let received = Arc::new(AtomicU64::new(0));
    let counted = {
        let received = received.clone();
        stream::iter(head.into_iter().map(Ok))
            .chain(body)
            .inspect(move |piece| {
                if let Ok(piece) = piece {
                    METRICS.upload_bytes.inc_by(piece.len() as u64);
                    received.fetch_add(piece.len() as u64, Ordering::Relaxed);
                }
            })
    };
    let csv = match compression {
        Compression::None => counted.map(|r| r.map_err(PipelineError::Body)).boxed(),
        Compression::Gzip | Compression::Zstd => {
            decompress(counted, compression, limits, received.clone())
        }
    };
    Ok(Decoded {
        compression,
        csv,
        received,
    })
}

fn decompress<'a, S, E>(
    body: S,
    compression: Compression,
    limits: Limits,
    received: Arc<AtomicU64>,
) -> BoxStream<'a, Result<Bytes, PipelineError<E>>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'a,
    E: Send + 'a,
{
    // The decoder speaks io::Error; what stopped the body itself (the client's error, the
    // compressed limit) waits here to be handed on as it was.
    let stopped: Arc<Mutex<Option<PipelineError<E>>>> = Arc::new(Mutex::new(None));
    let stop = {
        let stopped = stopped.clone();
        move |why: PipelineError<E>| {
            *stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            io::Error::other("the body stopped")
        }
    };
    let max = limits.max_compressed_bytes;
    let body = body.map(move |piece| match piece {
        Ok(_) if received.load(Ordering::Relaxed) > max => {
            Err(stop(PipelineError::CompressedTooLarge(max)))
        }
        Ok(piece) => Ok(piece),
        Err(e) => Err(stop(PipelineError::Body(e))),
    });
    let reader = Consumed::new(StreamReader::new(Box::pin(body)));
    let consumed = reader.consumed.clone();
    let decoder: Pin<Box<dyn AsyncRead + Send>> = match compression {
        Compression::Gzip => {
            let mut decoder = GzipDecoder::new(reader);
            // `cat a.gz b.gz` is a valid gzip file, as it is for gunzip.
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        _ => {
            let window =
                async_compression::zstd::DParameter::window_log_max(limits.zstd_window_log);
            let mut decoder = ZstdDecoder::with_params(reader, &[window]);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
    };
    ReaderStream::with_capacity(decoder, PIECE_BYTES)
        .map(move |piece| {
            piece.map_err(|e| {
                let taken = stopped.lock().unwrap_or_else(|p| p.into_inner()).take();
                taken.unwrap_or_else(|| PipelineError::Corrupt {
                    compression,
                    offset: consumed.load(Ordering::Relaxed),
                    detail: corrupt_detail(compression, &e, limits.zstd_window_log),
                })
            })
        })
        .boxed()
}

/// What a decoder's error tells the client.
fn corrupt_detail(compression: Compression, e: &io::Error, window_log: u32) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "the stream ends before its end mark (truncated)".into();
    }
    let text = e.to_string();
    if compression == Compression::Zstd && text.contains("memory") {
        return format!(
            "{text}: the frame's window is larger than the {} bytes allowed (ingest.max_zstd_window_log; do not compress with --long)",
            1u64 << window_log
        );
    }
    text
}

/// A buffered reader that counts the bytes its reader has used: where decoding stopped.
struct Consumed<R> {
    inner: R,
    consumed: Arc<AtomicU64>,
}

impl<R> Consumed<R> {
    fn new(inner: R) -> Self {
        Consumed {
            inner,
            consumed: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl<R: AsyncBufRead + Unpin> AsyncRead for Consumed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.consumed.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl<R: AsyncBufRead + Unpin> AsyncBufRead for Consumed<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().inner).poll_fill_buf(cx)
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        self.consumed.fetch_add(amt as u64, Ordering::Relaxed);
        Pin::new(&mut self.inner).consume(amt);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    const LIMITS: Limits = Limits {
        max_compressed_bytes: 1 << 30,
        zstd_window_log: 23,
    };

    fn csv(rows: usize) -> Vec<u8> {
        let mut out = b"email,first_name\n".to_vec();
        for i in 0..rows {
            out.extend_from_slice(format!("person{i}@example.com,Name{i}\n").as_bytes());
        }
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// The body in pieces of `piece` bytes, as a client's request would come.
    fn body(data: Vec<u8>, piece: usize) -> impl Stream<Item = Result<Bytes, io::Error>> + Unpin {
        let pieces: Vec<_> = data
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        stream::iter(pieces)
    }

    async fn read_all(
        data: Vec<u8>,
        piece: usize,
        limits: Limits,
    ) -> (Compression, Result<Vec<u8>, PipelineError<io::Error>>, u64) {
        let mut decoded = match open(body(data, piece), limits).await {
            Ok(d) => d,
            Err(e) => return (Compression::None, Err(e), 0),
        };
        let mut out = Vec::new();
        let mut largest = 0;
        while let Some(piece) = decoded.csv.next().await {
            match piece {
                Ok(piece) => {
                    largest = largest.max(piece.len());
                    out.extend_from_slice(&piece);
                }
                Err(e) => return (decoded.compression, Err(e), decoded.received_bytes()),
            }
        }
        assert!(largest <= PIECE_BYTES, "a piece of {largest} bytes");
        (decoded.compression, Ok(out), decoded.received_bytes())
    }

    #[tokio::test]
    async fn each_format_is_told_by_its_magic_and_read_back_whole() {
        let plain = csv(20_000);
        let zstd = zstd::encode_all(&plain[..], 3).unwrap();
        for (data, expected) in [
            (plain.clone(), Compression::None),
            (gzip(&plain), Compression::Gzip),
            (zstd, Compression::Zstd),
        ] {
            let sent = data.len() as u64;
            // Pieces of one byte: the magic spans several of them.
            for piece in [1, 3, 8192] {
                let (compression, out, received) = read_all(data.clone(), piece, LIMITS).await;
                assert_eq!(compression, expected);
                assert!(
                    out.ok() == Some(plain.clone()),
                    "{expected:?} in pieces of {piece}"
                );
                assert_eq!(received, sent);
            }
        }
    }

    #[tokio::test]
    async fn concatenated_members_and_frames_are_one_file() {
        let (a, b) = (csv(10), b"x@example.com,X\n".to_vec());
        let mut both = gzip(&a);
        both.extend(gzip(&b));
        let (_, out, _) = read_all(both, 100, LIMITS).await;
        assert_eq!(out.ok().unwrap(), [a.clone(), b.clone()].concat());
        let mut both = zstd::encode_all(&a[..], 1).unwrap();
        both.extend(zstd::encode_all(&b[..], 1).unwrap());
        let (_, out, _) = read_all(both, 100, LIMITS).await;
        assert_eq!(out.ok().unwrap(), [a, b].concat());
    }

    #[tokio::test]
    async fn short_and_empty_files_are_plain() {
        for data in [&b""[..], b"a", b"\x1f", b"\x28\xb5\x2f"] {
            let (compression, out, _) = read_all(data.to_vec(), 1, LIMITS).await;
            assert_eq!(compression, Compression::None);
            assert_eq!(out.ok().unwrap(), data);
        }
    }

    /// As the zstd tool writes it: with the content checksum, without which a frame can only
    /// be checked for its structure.
    fn zstd_checked(data: &[u8]) -> Vec<u8> {
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_checksum(true).unwrap();
        encoder.write_all(data).unwrap();
        encoder.finish().unwrap()
    }

    #[tokio::test]
    async fn truncated_and_corrupt_streams_say_where() {
        let plain = csv(50_000);
        for packed in [gzip(&plain), zstd_checked(&plain)] {
            let cut = packed.len() / 2;
            let (_, out, _) = read_all(packed[..cut].to_vec(), 4096, LIMITS).await;
            match out {
                Err(PipelineError::Corrupt { offset, detail, .. }) => {
                    assert!(offset <= cut as u64, "{offset} past the end");
                    assert!(detail.contains("truncated"), "{detail}");
                }
                _ => panic!("a truncated stream was read"),
            }
            let mut bad = packed.clone();
            for b in &mut bad[cut..cut + 64] {
                *b ^= 0x5a;
            }
            let (_, out, _) = read_all(bad, 4096, LIMITS).await;
            match out {
                Err(PipelineError::Corrupt { offset, .. }) => {
                    // It fails in the damage, or (gzip's CRC) at the end: never before it.
                    assert!(
                        offset >= cut as u64 - 4096,
                        "failed at {offset}, before {cut}"
                    );
                }
                _ => panic!("a corrupt stream was read"),
            }
        }
    }

    #[tokio::test]
    async fn the_compressed_limit_stops_the_body() {
        let packed = gzip(&csv(50_000));
        let limits = Limits {
            max_compressed_bytes: 10_000,
            ..LIMITS
        };
        let (_, out, received) = read_all(packed, 1000, limits).await;
        assert!(matches!(
            out,
            Err(PipelineError::CompressedTooLarge(10_000))
        ));
        assert!(received <= 11_000, "read {received} bytes");
    }

    #[tokio::test]
    async fn a_zstd_window_over_the_limit_is_refused() {
        let plain = csv(1000);
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        encoder.long_distance_matching(true).unwrap();
        encoder.window_log(27).unwrap();
        encoder.write_all(&plain).unwrap();
        let packed = encoder.finish().unwrap();
        let (_, out, _) = read_all(packed, 4096, LIMITS).await;
        match out {
            Err(PipelineError::Corrupt { detail, .. }) => {
                assert!(detail.contains("max_zstd_window_log"), "{detail}")
            }
            _ => panic!("a 128 MiB window was accepted"),
        }
    }

    #[tokio::test]
    async fn a_body_error_is_handed_on_as_it_was() {
        let packed = gzip(&csv(10_000));
        let mut pieces: Vec<Result<Bytes, io::Error>> = packed[..1000]
            .chunks(100)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        pieces.push(Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone")));
        let mut decoded = open(stream::iter(pieces), LIMITS).await.ok().unwrap();
        let mut last = None;
        while let Some(piece) = decoded.csv.next().await {
            if let Err(e) = piece {
                last = Some(e);
                break;
            }
        }
        match last {
            Some(PipelineError::Body(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            _ => panic!("the client's error was lost"),
        }
    }
}
