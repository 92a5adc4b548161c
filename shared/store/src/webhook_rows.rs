//! Row shapes of the webhook tables, shared by both SQL backends (same column names and
//! types), and what both decide the same way.

use std::collections::HashMap;

use sqlx::FromRow;
use uuid::Uuid;

use super::rows::at;
use super::StoreResult;
use orbit_core::model::*;

#[derive(FromRow)]
pub(super) struct EndpointRow {
    id: Uuid,
    organization_id: Uuid,
    directory_id: Option<Uuid>,
    url: String,
    events: String,
    secret: String,
    failure_run: i64,
    disabled_ms: Option<i64>,
    created_ms: i64,
}

impl TryFrom<EndpointRow> for WebhookEndpoint {
    type Error = super::StoreError;

    fn try_from(r: EndpointRow) -> StoreResult<Self> {
        Ok(WebhookEndpoint {
            id: r.id,
            organization_id: r.organization_id,
            directory_id: r.directory_id,
            url: r.url,
            events: serde_json::from_str(&r.events)?,
            secret: r.secret,
            failure_run: r.failure_run as u32,
            disabled_at: r.disabled_ms.map(at),
            created_at: at(r.created_ms),
        })
    }
}

/// The endpoints a source's end goes to: subscribed to `event`, enabled, and for the source's
/// directory or every directory (the query has selected the organization's).
pub(super) fn subscribed(rows: Vec<EndpointRow>, event: &str, directory: Uuid) -> Vec<Uuid> {
    rows.into_iter()
        .filter(|r| r.disabled_ms.is_none())
        .filter(|r| r.directory_id.is_none_or(|d| d == directory))
        .filter(|r| {
            serde_json::from_str::<Vec<String>>(&r.events)
                .is_ok_and(|events| events.iter().any(|e| e == event))
        })
        .map(|r| r.id)
        .collect()
}

#[derive(FromRow)]
pub(super) struct DeliveryRow {
    id: Uuid,
    source_id: Uuid,
    event_type: String,
    state: String,
    attempts: i64,
    next_attempt_ms: i64,
    created_ms: i64,
    delivered_ms: Option<i64>,
}

impl DeliveryRow {
    pub(super) fn id(&self) -> Uuid {
        self.id
    }
}

#[derive(FromRow)]
pub(super) struct AttemptRow {
    delivery_id: Uuid,
    attempt: i64,
    at_ms: i64,
    status_code: Option<i64>,
    error: Option<String>,
    duration_ms: i64,
}

/// A due delivery as a claim selects it, before it is leased.
#[derive(FromRow)]
pub(super) struct DueRow {
    pub directory_id: Uuid,
    pub id: Uuid,
    endpoint_id: Uuid,
    url: String,
    secret: String,
    payload: String,
    attempts: i64,
}

impl DueRow {
    pub(super) fn leased(self, lease_token: Uuid) -> DueDelivery {
        DueDelivery {
            directory_id: self.directory_id,
            id: self.id,
            endpoint_id: self.endpoint_id,
            url: self.url,
            secret: self.secret,
            payload: self.payload,
            attempts: self.attempts as u32,
            lease_token,
        }
    }
}

/// Deliveries with their attempts, in the order of `deliveries`.
pub(super) fn deliveries_with_attempts(
    deliveries: Vec<DeliveryRow>,
    attempts: Vec<AttemptRow>,
) -> Vec<WebhookDelivery> {
    let mut by_delivery: HashMap<Uuid, Vec<DeliveryAttempt>> = HashMap::new();
    for a in attempts {
        by_delivery
            .entry(a.delivery_id)
            .or_default()
            .push(DeliveryAttempt {
                attempt: a.attempt as u32,
                at: at(a.at_ms),
                status_code: a.status_code.map(|c| c as u16),
                error: a.error,
                duration_ms: a.duration_ms as u64,
            });
    }
    deliveries
        .into_iter()
        .map(|d| {
            let mut log = by_delivery.remove(&d.id).unwrap_or_default();
            log.sort_by_key(|a| a.attempt);
            WebhookDelivery {
                id: webhook_id(d.id),
                event_type: d.event_type,
                source_id: d.source_id,
                next_attempt_at: (d.state == "pending").then(|| at(d.next_attempt_ms)),
                state: d.state,
                attempt_count: d.attempts as u32,
                created_at: at(d.created_ms),
                delivered_at: d.delivered_ms.map(at),
                attempts: log,
            }
        })
        .collect()
}

/// The delivery's state and the endpoint's failure-run change after an attempt.
pub(super) struct AttemptEffect {
    pub state: &'static str,
    pub next_attempt_ms: Option<i64>,
    pub delivered: bool,
}

pub(super) fn effect(next: AttemptNext) -> AttemptEffect {
    match next {
        AttemptNext::Delivered => AttemptEffect {
            state: "delivered",
            next_attempt_ms: None,
            delivered: true,
        },
        AttemptNext::RetryAt(when) => AttemptEffect {
            state: "pending",
            next_attempt_ms: Some(when.timestamp_millis()),
            delivered: false,
        },
        AttemptNext::GiveUp => AttemptEffect {
            state: "failed",
            next_attempt_ms: None,
            delivered: false,
        },
    }
}
