//! The router's outer middleware: request bodies must keep moving, and every error the framework
//! produces itself (extractor rejections, body limits) leaves as problem+json like ours.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::future::Future as _;
use tokio::time::Sleep;

use crate::problem::{code_for_status, ApiError};

/// How much of a framework error's plain-text body becomes the problem's `detail`.
const MAX_DETAIL_BYTES: usize = 4096;

/// `http.body_timeout` and `http.min_body_rate`.
#[derive(Debug, Clone, Copy)]
pub struct BodyPace {
    pub window: Duration,
    pub min_rate: u64,
}

impl BodyPace {
    fn need(&self) -> u64 {
        self.min_rate
            .saturating_mul(self.window.as_secs().max(1))
            .max(1)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body moved slower than {min_rate} bytes per second for {window:?}")]
pub struct BodyTooSlow {
    min_rate: u64,
    window: Duration,
}

pub async fn guard(State(pace): State<BodyPace>, request: Request, next: Next) -> Response {
    let too_slow = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| Body::new(PacedBody::new(body, pace, too_slow.clone())));
    let response = next.run(request).await;
    if too_slow.load(Ordering::SeqCst) {
        // Whatever the handler made of the broken body, the client is told why; the connection
        // is not reused since the rest of the body was never read.
        return ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body must keep moving at {} bytes per second or more; it stalled for {}",
                pace.min_rate,
                humantime::format_duration(pace.window)
            ),
        )
        .with_header(header::CONNECTION, "close")
        .into_response();
    }
    as_problem(response).await
}

/// A framework error (plain text or empty) rewritten as problem+json; anything else unchanged.
async fn as_problem(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_DETAIL_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text
    };
    let mut problem = ApiError::new(status, code_for_status(status), detail).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    problem
}

/// A request body that fails once the client, while being waited for, has not sent
/// `min_rate × window` bytes within `window` of waiting. Time the handler spends elsewhere
/// (writing to the object store) does not count against the client.
struct PacedBody {
    inner: Body,
    pace: BodyPace,
    got: u64,
    waited: Duration,
    waiting_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    too_slow: Arc<AtomicBool>,
}

impl PacedBody {
    fn new(inner: Body, pace: BodyPace, too_slow: Arc<AtomicBool>) -> Self {
        PacedBody {
            inner,
            pace,
            got: 0,
            waited: Duration::ZERO,
            waiting_since: None,
            timer: Box::pin(tokio::time::sleep(pace.window)),
            too_slow,
        }
    }
}

impl http_body::Body for PacedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(since) = this.waiting_since.take() {
                    this.waited += since.elapsed();
                }
                if let Some(Ok(frame)) = &frame {
                    if let Some(data) = frame.data_ref() {
                        this.got += data.len() as u64;
                        if this.got >= this.pace.need() {
                            this.got = 0;
                            this.waited = Duration::ZERO;
                        }
                    }
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if this.waiting_since.is_none() {
                    let now = Instant::now();
                    this.waiting_since = Some(now);
                    let left = this.pace.window.saturating_sub(this.waited);
                    this.timer.as_mut().reset((now + left).into());
                }
                if this.timer.as_mut().poll(cx).is_ready() {
                    this.too_slow.store(true, Ordering::SeqCst);
                    return Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow {
                        min_rate: this.pace.min_rate,
                        window: this.pace.window,
                    }))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
