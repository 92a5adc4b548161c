//! Webhook endpoints of an organization: create (the secret is shown once), list, delete,
//! enable again after failures disabled one, and the deliveries of one with their attempts.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use orbit_core::model::{WebhookDelivery, WebhookEndpoint};
use orbit_core::views::WEBHOOK_EVENTS;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::{parse_id, Caller};
use crate::problem::{ApiError, ApiResult};
use crate::webhooks::{check_target, new_secret, TargetError};

const MAX_URL_BYTES: usize = 2048;
const DEFAULT_DELIVERIES: u32 = 50;
const MAX_DELIVERIES: u32 = 100;

#[derive(Serialize)]
pub struct WebhookBody {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub directory_id: Option<Uuid>,
    /// Shown once, in the answer to the create request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub disabled: bool,
    pub disabled_at: Option<DateTime<Utc>>,
    /// Failed attempts in a row; the endpoint is disabled at `webhooks.disable_after`.
    pub failure_run: u32,
    pub created_at: DateTime<Utc>,
}

impl From<WebhookEndpoint> for WebhookBody {
    fn from(e: WebhookEndpoint) -> Self {
        WebhookBody {
            id: e.id,
            url: e.url,
            events: e.events,
            directory_id: e.directory_id,
            secret: None,
            disabled: e.disabled_at.is_some(),
            disabled_at: e.disabled_at,
            failure_run: e.failure_run,
            created_at: e.created_at,
        }
    }
}

#[derive(Serialize)]
pub struct ListBody<T> {
    pub data: Vec<T>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateWebhook {
    url: String,
    events: Vec<String>,
    #[serde(default)]
    directory_id: Option<String>,
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let org = caller.scope(&org)?;
    let request: CreateWebhook = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid_request(format!(
            "expected {{\"url\", \"events\", \"directory_id\"?}}: {e}"
        ))
    })?;
    if request.url.len() > MAX_URL_BYTES {
        return Err(ApiError::invalid_request(format!(
            "url is longer than {MAX_URL_BYTES} bytes"
        )));
    }
    let url = url::Url::parse(&request.url)
        .map_err(|e| ApiError::invalid_request(format!("url is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(ApiError::invalid_request(
            "url must be an http:// or https:// URL with a host",
        ));
    }
    let mut events = request.events;
    events.sort();
    events.dedup();
    if events.is_empty() {
        return Err(ApiError::invalid_request(format!(
            "events must name at least one of {}",
            WEBHOOK_EVENTS.join(", ")
        )));
    }
    if let Some(unknown) = events
        .iter()
        .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
    {
        return Err(ApiError::invalid_request(format!(
            "unknown event {unknown:?}; events are {}",
            WEBHOOK_EVENTS.join(", ")
        )));
    }
    let directory_id = match request.directory_id.as_deref() {
        None => None,
        Some(raw) => {
            let dir = parse_id(raw, "directory")?;
            state
                .store
                .get_directory(org, dir)
                .await?
                .ok_or_else(ApiError::directory_not_found)?;
            Some(dir)
        }
    };
    // Last: it may wait on DNS.
    check_target(&url, state.settings.webhooks.allow_private_targets)
        .await
        .map_err(|e| match e {
            TargetError::Invalid(why) => ApiError::invalid_request(format!("url: {why}")),
            TargetError::Private(why) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "webhook_target_not_allowed",
                format!("url: {why}; webhook endpoints must be on public addresses"),
            ),
        })?;
    let endpoint = WebhookEndpoint {
        id: Uuid::now_v7(),
        organization_id: org,
        directory_id,
        url: url.to_string(),
        events,
        secret: new_secret(),
        failure_run: 0,
        disabled_at: None,
        created_at: DateTime::from_timestamp_millis(Utc::now().timestamp_millis())
            .unwrap_or_default(),
    };
    state.store.create_webhook(&endpoint).await?;
    tracing::info!(webhook = %endpoint.id, url = endpoint.url, "webhook endpoint created");
    let secret = endpoint.secret.clone();
    let mut body = WebhookBody::from(endpoint);
    body.secret = Some(secret);
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(org): Path<String>,
) -> ApiResult<Json<ListBody<WebhookBody>>> {
    let org = caller.scope(&org)?;
    let endpoints = state.store.list_webhooks(org).await?;
    Ok(Json(ListBody {
        data: endpoints.into_iter().map(WebhookBody::from).collect(),
    }))
}

fn not_found() -> ApiError {
    ApiError::not_found(
        "webhook_not_found",
        "no such webhook endpoint in this organization",
    )
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, webhook)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let org = caller.scope(&org)?;
    let webhook = parse_id(&webhook, "webhook")?;
    if !state.store.delete_webhook(org, webhook).await? {
        return Err(not_found());
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn enable(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, webhook)): Path<(String, String)>,
) -> ApiResult<Json<WebhookBody>> {
    let org = caller.scope(&org)?;
    let webhook = parse_id(&webhook, "webhook")?;
    let endpoint = state
        .store
        .enable_webhook(org, webhook)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(endpoint.into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    limit: Option<String>,
}

pub async fn deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path((org, webhook)): Path<(String, String)>,
    Query(query): Query<DeliveriesQuery>,
) -> ApiResult<Json<ListBody<WebhookDelivery>>> {
    let org = caller.scope(&org)?;
    let webhook = parse_id(&webhook, "webhook")?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_DELIVERIES,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_DELIVERIES).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "limit must be a number from 1 to {MAX_DELIVERIES}"
                ))
            })?,
    };
    state
        .store
        .get_webhook(org, webhook)
        .await?
        .ok_or_else(not_found)?;
    let data = state.store.list_deliveries(org, webhook, limit).await?;
    Ok(Json(ListBody { data }))
}
