//! Every error leaves as `application/problem+json` (RFC 9457) with a stable `code`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Every `code` an error of the API can carry: the contract's list, which docs/api.md and
/// the OpenAPI document must both cover (gateway/tests/gateway/openapi.rs checks they do).
pub const CODES: &[&str] = &[
    "invalid_request",
    "unauthenticated",
    "organization_mismatch",
    "directory_not_found",
    "source_not_found",
    "profile_not_found",
    "not_found",
    "method_not_allowed",
    "not_acceptable",
    "body_timeout",
    "upload_timeout",
    "request_timeout",
    "directory_archived",
    "idempotency_key_in_use",
    "source_not_failed",
    "source_not_retryable",
    "source_terminal",
    "webhook_not_found",
    "invalid_merge_rules",
    "webhook_target_not_allowed",
    "length_required",
    "upload_too_large",
    "payload_too_large",
    "uri_too_long",
    "unsupported_media_type",
    "invalid_csv",
    "invalid_compression",
    "idempotency_key_reused",
    "idempotency_key_mismatch",
    "headers_too_large",
    "internal_error",
    "service_unavailable",
    "directory_unavailable",
    "not_ready",
    "too_many_uploads",
    "organization_limit_exceeded",
    "upload_not_found",
    "upload_expired",
    "upload_offset_mismatch",
    "upload_length_mismatch",
    "upload_taken_over",
    "checksum_mismatch",
    "tus_version_unsupported",
];

/// The problem `type` URI of `code`.
pub fn type_uri(code: &str) -> String {
    format!("https://orbit.dev/problems/{}", code.replace('_', "-"))
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Extra headers, such as `WWW-Authenticate` or `Retry-After`.
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
    /// Extension members of the problem document beside the standard ones (RFC 9457, 3.2),
    /// such as the `limit` of an `organization_limit_exceeded`.
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(flatten)]
    extensions: &'a serde_json::Map<String, serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        debug_assert!(
            CODES.contains(&code),
            "{code} is missing from problem::CODES"
        );
        ApiError {
            status,
            code,
            detail: detail.into(),
            headers: Vec::new(),
            extensions: serde_json::Map::new(),
        }
    }

    /// Adds the extension member `name` to the problem document.
    pub fn with_member(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extensions.insert(name.to_owned(), value.into());
        self
    }

    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }

    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    pub fn unauthenticated(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", detail)
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, detail)
    }

    /// The directory named is not the organization's (or does not exist).
    pub fn directory_not_found() -> Self {
        Self::not_found(
            "directory_not_found",
            "no such directory in this organization",
        )
    }

    pub fn invalid_csv(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_csv", detail)
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!(%error, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the server failed to handle the request; it is safe to retry",
        )
    }

    /// The problem document, as answered: to keep, and answer again ([`ApiError::from_document`]).
    pub fn document(&self) -> String {
        String::from_utf8(body_with(
            self.status,
            self.code,
            &self.detail,
            &self.extensions,
        ))
        .expect("JSON is UTF-8")
    }

    /// The error a kept [`ApiError::document`] answered; `None` if it is not one.
    pub fn from_document(document: &str) -> Option<Self> {
        let serde_json::Value::Object(mut members) = serde_json::from_str(document).ok()? else {
            return None;
        };
        let status = StatusCode::from_u16(members.remove("status")?.as_u64()? as u16).ok()?;
        let code = members.remove("code")?;
        let code = CODES.iter().copied().find(|c| Some(*c) == code.as_str())?;
        let detail = members.remove("detail")?.as_str()?.to_owned();
        members.remove("type");
        members.remove("title");
        Some(ApiError {
            status,
            code,
            detail,
            headers: Vec::new(),
            extensions: members,
        })
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            detail,
        )
        .with_header(header::RETRY_AFTER, "5")
    }
}

impl From<orbit_store::StoreError> for ApiError {
    fn from(e: orbit_store::StoreError) -> Self {
        if e.is_node_down() {
            // On Citus: the worker node holding this directory is down. Nothing was written;
            // other directories are served as usual.
            tracing::warn!(error = %e, "a database node is unreachable");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "directory_unavailable",
                "the database node that holds this directory cannot be reached; nothing was changed, try again later",
            )
            .with_header(header::RETRY_AFTER, "10")
        } else if e.is_transient() {
            tracing::warn!(error = %e, "the database is unreachable");
            ApiError::unavailable(
                "the database cannot be reached; nothing was changed, try again later",
            )
        } else {
            ApiError::internal(e)
        }
    }
}

/// The problem+json document for `status`, `code` and `detail`.
pub fn body(status: StatusCode, code: &str, detail: &str) -> Vec<u8> {
    body_with(status, code, detail, &serde_json::Map::new())
}

/// [`body`] with extension members.
fn body_with(
    status: StatusCode,
    code: &str,
    detail: &str,
    extensions: &serde_json::Map<String, serde_json::Value>,
) -> Vec<u8> {
    debug_assert!(
        CODES.contains(&code),
        "{code} is missing from problem::CODES"
    );
    serde_json::to_vec(&Problem {
        kind: type_uri(code),
        title: status.canonical_reason().unwrap_or("Error"),
        status: status.as_u16(),
        detail,
        code,
        extensions,
    })
    .expect("problem serializes")
}

/// The stable code of an error the framework produced itself (an extractor's rejection, a
/// body limit), by its status.
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "unauthenticated",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        411 => "length_required",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        431 => "headers_too_large",
        503 => "service_unavailable",
        500..=599 => "internal_error",
        _ => "invalid_request",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = body_with(self.status, self.code, &self.detail, &self.extensions);
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_framework_code_is_listed() {
        for status in 400..600 {
            let status = StatusCode::from_u16(status).unwrap();
            assert!(CODES.contains(&code_for_status(status)), "{status}");
        }
    }
}
