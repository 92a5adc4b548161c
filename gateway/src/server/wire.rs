//! Guards on the raw bytes of a connection, below hyper: a request line or header block over
//! its limits (and a request target hyper cannot parse) is answered with a problem+json
//! `414`/`431`/`400` before hyper would send its own empty one, and a response the client has
//! stopped reading is cut.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::connections::Conn;
use super::Limits;

/// When closing, how long and how much more input is read and dropped so the client gets the
/// answer instead of a reset (a close with unread input sends RST).
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Where the request head being read stands, byte by byte.
#[derive(Default)]
struct HeadScan {
    /// Off while a request is in progress (its body is not a head) and for HTTP/2.
    off: bool,
    http2: bool,
    bytes: usize,
    lines: usize,
    started: bool,
    at_line_start: bool,
    ended_seen: u64,
    /// The request line so far, to check its target once it ends.
    request_line: Vec<u8>,
}

enum HeadProblem {
    /// A target hyper would refuse with an empty `400` (an unencoded `<`, `>`, space or
    /// backquote, such as a README placeholder pasted as is).
    InvalidTarget,
    UriTooLong,
    HeadersTooLarge,
    TooManyHeaders,
}

impl HeadScan {
    /// Looks at freshly read bytes; `Some` when the head in progress is over a limit.
    fn scan(&mut self, bytes: &[u8], limits: &Limits) -> Option<HeadProblem> {
        if self.http2 {
            return None;
        }
        if !self.started && self.bytes == 0 && bytes.starts_with(b"PRI ") {
            self.http2 = true;
            return None;
        }
        for &b in bytes {
            if self.off {
                return None;
            }
            self.bytes += 1;
            if self.lines == 0 && b != b'\n' && b != b'\r' && (self.started || b != b' ') {
                self.request_line.push(b);
                // A space ends a token: hyper may judge the line from here on, before its end.
                if b == b' ' && !request_line_ok(&self.request_line, false) {
                    return Some(HeadProblem::InvalidTarget);
                }
            }
            if b == b'\n' {
                if self.started && self.lines == 0 && !request_line_ok(&self.request_line, true) {
                    return Some(HeadProblem::InvalidTarget);
                }
                if self.started {
                    if self.at_line_start {
                        self.off = true;
                    } else {
                        self.lines += 1;
                        self.at_line_start = true;
                    }
                }
            } else if b != b'\r' {
                self.started = true;
                self.at_line_start = false;
            }
            if self.bytes > limits.max_header_bytes {
                return Some(if self.lines == 0 {
                    HeadProblem::UriTooLong
                } else {
                    HeadProblem::HeadersTooLarge
                });
            }
            // `lines` counts the request line too.
            if self.lines > limits.max_headers + 1 {
                return Some(HeadProblem::TooManyHeaders);
            }
        }
        // hyper parses what it has so far, so the line is judged at each read's end too.
        if self.lines == 0 && !self.off && !request_line_ok(&self.request_line, false) {
            return Some(HeadProblem::InvalidTarget);
        }
        None
    }

    fn restart(&mut self, ended: u64) {
        *self = HeadScan {
            http2: self.http2,
            ended_seen: ended,
            ..HeadScan::default()
        };
    }
}

/// Whether the request line so far (`METHOD TARGET VERSION`, `ended` once its line break came)
/// can still be one hyper accepts, judged as hyper does: the target by the same parser
/// (`http::Uri`), and a third token that must be the version. What hyper would refuse with an
/// empty `400` is answered here with a problem+json one instead; anything else wrong with the
/// line (say, a method with odd bytes) is left to hyper.
fn request_line_ok(line: &[u8], ended: bool) -> bool {
    let tokens: Vec<&[u8]> = line
        .split(|&b| b == b' ')
        .filter(|t| !t.is_empty())
        .collect();
    let token_ended = ended || line.last() == Some(&b' ');
    match tokens[..] {
        // A fourth token: a space inside the target (`/sources/<source id>/errors`).
        [_, _, _, _, ..] => false,
        [_, _, _] if token_ended && line.last() == Some(&b' ') => false,
        [_, target, version] => {
            axum::http::Uri::try_from(target).is_ok()
                && (version.starts_with(b"HTTP/") || b"HTTP/".starts_with(version))
        }
        [_, target] if token_ended => axum::http::Uri::try_from(target).is_ok(),
        _ => true,
    }
}

struct Refusal {
    response: Vec<u8>,
    sent: usize,
}

/// Closing our side, then reading and dropping what the client still sends for a while: a
/// socket closed with unread input sends a reset, which can destroy the response before the
/// client reads it (say, a `413` while the client is still sending the body).
struct Linger {
    shut: bool,
    drained: usize,
    timer: Pin<Box<Sleep>>,
}

impl Linger {
    fn new() -> Self {
        Linger {
            shut: false,
            drained: 0,
            timer: Box::pin(tokio::time::sleep(LINGER)),
        }
    }

    fn poll(&mut self, inner: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            ready!(Pin::new(&mut *inner).poll_shutdown(cx))?;
            self.shut = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            if self.drained > LINGER_BYTES {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => self.drained += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    ready!(self.timer.as_mut().poll(cx));
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// The client's socket as hyper sees it: reads are watched for request heads over the limits,
/// writes for a client that stopped reading.
pub(super) struct GuardedIo {
    inner: TcpStream,
    conn: Arc<Conn>,
    limits: Arc<Limits>,
    head: HeadScan,
    refusal: Option<Refusal>,
    linger: Option<Linger>,
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl GuardedIo {
    pub(super) fn new(inner: TcpStream, conn: Arc<Conn>, limits: Arc<Limits>) -> Self {
        GuardedIo {
            inner,
            conn,
            limits,
            head: HeadScan::default(),
            refusal: None,
            linger: None,
            write_stall: None,
        }
    }

    /// Writes the refusal and lingers, then reports end of input so hyper drops the connection
    /// without an answer of its own.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let refusal = self.refusal.as_mut().expect("a refusal in progress");
        while refusal.sent < refusal.response.len() {
            let n = ready!(
                Pin::new(&mut self.inner).poll_write(cx, &refusal.response[refusal.sent..])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            refusal.sent += n;
        }
        self.linger
            .get_or_insert_with(Linger::new)
            .poll(&mut self.inner, cx)
    }

    fn refuse(&mut self, problem: HeadProblem) {
        let limits = &self.limits;
        let (status, code, detail) = match problem {
            HeadProblem::InvalidTarget => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request target is not a valid URI: characters such as <, >, spaces \
                 and backquotes must be percent-encoded (is a placeholder such \
                 as <source_id> still in the URL?)"
                    .to_owned(),
            ),
            HeadProblem::UriTooLong => (
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!(
                    "the request line is longer than the {} bytes allowed",
                    limits.max_header_bytes
                ),
            ),
            HeadProblem::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!(
                    "the request headers are larger than the {} bytes allowed",
                    limits.max_header_bytes
                ),
            ),
            HeadProblem::TooManyHeaders => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!(
                    "the request has more than the {} header lines allowed",
                    limits.max_headers
                ),
            ),
        };
        let body = crate::problem::body(status, code, &detail);
        let mut response = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error"),
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(&body);
        self.refusal = Some(Refusal { response, sent: 0 });
    }

    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.limits.send_timeout;
        let stall = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(stall.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading the response",
        ))
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.refusal.is_some() {
            return this.poll_refusal(cx);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() == before {
            return Poll::Ready(Ok(()));
        }
        this.conn.head_bytes_arrived();
        let ended = this.conn.ended.load(Ordering::SeqCst);
        if this.head.off
            && ended != this.head.ended_seen
            && this.conn.in_flight.load(Ordering::SeqCst) == 0
        {
            this.head.restart(ended);
        }
        if let Some(problem) = this.head.scan(&buf.filled()[before..], &this.limits) {
            // hyper never sees these bytes: it would answer with an empty error of its own.
            buf.set_filled(before);
            this.refuse(problem);
            return this.poll_refusal(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(result) => {
                this.write_stall = None;
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_stall(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(result) => {
                this.write_stall = None;
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_stall(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.linger
            .get_or_insert_with(Linger::new)
            .poll(&mut this.inner, cx)
    }
}
