//! What every request leaves behind: a request id (the client's `x-request-id` when it is a
//! sane one, else a new UUID) echoed in the response and carried by every log line of the
//! request, one access log line (target `orbit::access`), and the HTTP metrics.
//!
//! Only the route template (`/v2/organizations/{org}/…`) is logged or used as a label, never
//! the raw path: paths carry ids, and a label value a client could choose would let it create
//! metric series without bound. Unknown methods and unmatched paths become `other`.
//!
//! The request span is the root of the request's trace (kind server, named `{method}
//! {route}`), or the child of the caller's when the request carries a W3C `traceparent`.

use std::time::Instant;

use crate::metrics::{http_method_label, METRICS, OTHER};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use orbit_adapters::telemetry;
use tracing::Instrument as _;
use uuid::Uuid;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest `x-request-id` taken from a client (`http.max_request_id_bytes`).
#[derive(Clone, Copy)]
pub struct RequestIdLimit(pub usize);

/// The client's request id when it is 1 to `limit` bytes of letters, digits and `-_.:`; these
/// go into every log line of the request, so nothing that could break a log format or a
/// terminal is accepted.
pub fn accepted_request_id(value: Option<&HeaderValue>, limit: usize) -> Option<String> {
    let text = value?.to_str().ok()?;
    let sane = !text.is_empty()
        && text.len() <= limit
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    sane.then(|| text.to_owned())
}

pub async fn observe(
    State(RequestIdLimit(limit)): State<RequestIdLimit>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let request_id = accepted_request_id(request.headers().get(&REQUEST_ID), limit)
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    let method = http_method_label(request.method().as_str());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| OTHER.to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        otel.name = format!("{method} {route}").as_str(),
        otel.kind = "server",
    );
    {
        // Scoped: a borrow of the request must not be held across an await.
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        telemetry::set_parent(&span, header("traceparent"), header("tracestate"));
    }
    if telemetry::tracing_enabled() {
        telemetry::set_attribute(&span, "http.request.method", method);
        telemetry::set_attribute(&span, "http.route", route.clone());
    }
    let mut response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    if telemetry::tracing_enabled() {
        telemetry::set_attribute(
            &span,
            "http.response.status_code",
            i64::from(status.as_u16()),
        );
        if status.is_server_error() {
            telemetry::record_error(&span, status.as_str());
        }
    }
    let latency = started.elapsed();
    METRICS
        .http_requests
        .with_label_values(&[method, &route, status.as_str()])
        .inc();
    METRICS
        .http_duration
        .with_label_values(&[method, &route])
        .observe(latency.as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
    span.in_scope(|| {
        tracing::info!(
            target: "orbit::access",
            method,
            route = route.as_str(),
            status = status.as_u16(),
            latency_ms = latency.as_secs_f64() * 1000.0,
            request_id = request_id.as_str(),
            "request"
        );
    });
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_request_ids_are_taken() {
        let id = |s: &str| accepted_request_id(Some(&HeaderValue::from_str(s).unwrap()), 16);
        assert_eq!(id("abc-123_x.y:z").as_deref(), Some("abc-123_x.y:z"));
        assert_eq!(id(&"a".repeat(16)).as_deref(), Some("aaaaaaaaaaaaaaaa"));
        assert_eq!(id(&"a".repeat(17)), None);
        assert_eq!(id(""), None);
        assert_eq!(id("a b"), None);
        assert_eq!(id("a\"b"), None);
        assert_eq!(id("a\tb"), None);
        assert_eq!(accepted_request_id(None, 16), None);
        let binary = HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap();
        assert_eq!(accepted_request_id(Some(&binary), 16), None);
    }
}
