//! Process health, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;
use crate::problem::ApiError;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database, the object store and the queue all answer.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let failures =
        orbit_shared::backends::not_ready(&*state.store, &*state.blobs, &*state.queue).await;
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

pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = orbit_shared::metrics::render(&*state.store, &*state.queue).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../../openapi.json"),
    )
        .into_response()
}
