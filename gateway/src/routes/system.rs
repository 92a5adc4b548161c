//! Process health, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::problem::ApiError;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database, the object store and the queue all answer.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let failures =
        orbit_adapters::backends::not_ready(&*state.store, &*state.blobs, &*state.queue).await;
    if failures.is_empty() {
        Json(json!({
            "status": "ready",
            "database": state.store.backend(),
            "object_store": state.blobs.backend(),
            "queue": state.queue.backend(),
        }))
        .into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            failures.join("; "),
        )
        .into_response()
    }
}

/// Prometheus text; with `http.metrics_token` set, only for `Authorization: Bearer <token>`.
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let expected = &state.settings.http.metrics_token;
    if !expected.is_empty() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Digests are compared, so the time taken says nothing about the token's bytes.
        if Sha256::digest(given.trim()) != Sha256::digest(expected) {
            return ApiError::unauthenticated(
                "/metrics needs the bearer token of http.metrics_token",
            )
            .into_response();
        }
    }
    let body = state.metrics.render(&*state.store, &*state.queue).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../../openapi.json"),
    )
        .into_response()
}
