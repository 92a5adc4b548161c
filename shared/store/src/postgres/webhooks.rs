//! PostgreSQL: webhook endpoints and the delivery outbox. Gateways lease due deliveries with
//! `FOR UPDATE SKIP LOCKED`, so several of them share the outbox without sending a delivery
//! twice at once; a lease that runs out (its gateway died mid-attempt) makes the delivery due
//! again: at least once.

use std::time::Duration;

use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::rows::{dur_ms, ms, now_ms};
use crate::sql;
use crate::webhook_rows::*;
use crate::StoreResult;
use orbit_core::model::*;
use orbit_core::views::source_event;

/// Writes the outbox rows of `source`'s end, inside the transaction that ends it.
pub(super) async fn enqueue(
    conn: &mut PgConnection,
    source: Source,
    event: &str,
) -> StoreResult<()> {
    let rows: Vec<EndpointRow> = sqlx::query_as(sql::SUBSCRIBED_ENDPOINTS)
        .bind(source.organization_id)
        .fetch_all(&mut *conn)
        .await?;
    let endpoints = subscribed(rows, event, source.directory_id);
    if endpoints.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let source_id = source.id;
    let payload = source_event(event, source, crate::rows::at(now));
    for endpoint in endpoints {
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, endpoint_id, source_id, event_type, payload, state, next_attempt_ms, created_ms)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6)",
        )
        .bind(Uuid::now_v7())
        .bind(endpoint)
        .bind(source_id)
        .bind(event)
        .bind(&payload)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

pub(super) async fn create(pool: &PgPool, e: &WebhookEndpoint) -> StoreResult<()> {
    sqlx::query(sql::INSERT_ENDPOINT)
        .bind(e.id)
        .bind(e.organization_id)
        .bind(e.directory_id)
        .bind(&e.url)
        .bind(serde_json::to_string(&e.events)?)
        .bind(&e.secret)
        .bind(ms(e.created_at))
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn list(pool: &PgPool, org: Uuid) -> StoreResult<Vec<WebhookEndpoint>> {
    let rows: Vec<EndpointRow> = sqlx::query_as(sql::ENDPOINTS)
        .bind(org)
        .fetch_all(pool)
        .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

pub(super) async fn get(
    pool: &PgPool,
    org: Uuid,
    id: Uuid,
) -> StoreResult<Option<WebhookEndpoint>> {
    let row: Option<EndpointRow> = sqlx::query_as(sql::ENDPOINT)
        .bind(org)
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn delete(pool: &PgPool, org: Uuid, id: Uuid) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM webhook_endpoints WHERE organization_id = $1 AND id = $2")
        .bind(org)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn enable(
    pool: &PgPool,
    org: Uuid,
    id: Uuid,
) -> StoreResult<Option<WebhookEndpoint>> {
    let row: Option<EndpointRow> = sqlx::query_as(sql::ENABLE_ENDPOINT)
        .bind(org)
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn deliveries(
    pool: &PgPool,
    org: Uuid,
    endpoint: Uuid,
    limit: u32,
) -> StoreResult<Vec<WebhookDelivery>> {
    let rows: Vec<DeliveryRow> = sqlx::query_as(sql::DELIVERIES_PAGE)
        .bind(org)
        .bind(endpoint)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    let ids: Vec<Uuid> = rows.iter().map(DeliveryRow::id).collect();
    let attempts: Vec<AttemptRow> =
        sqlx::query_as("SELECT * FROM webhook_attempts WHERE delivery_id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
    Ok(deliveries_with_attempts(rows, attempts))
}

pub(super) async fn claim(
    pool: &PgPool,
    lease_for: Duration,
    limit: u32,
) -> StoreResult<Vec<DueDelivery>> {
    let now = now_ms();
    let token = Uuid::new_v4();
    let rows = sqlx::query(
        "WITH due AS (
             SELECT d.id FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
             WHERE d.state = 'pending' AND d.next_attempt_ms <= $1
               AND (d.lease_until_ms IS NULL OR d.lease_until_ms < $1) AND e.disabled_ms IS NULL
             ORDER BY d.next_attempt_ms LIMIT $2
             FOR UPDATE OF d SKIP LOCKED)
         UPDATE webhook_deliveries d SET lease_token = $3, lease_until_ms = $4
         FROM due, webhook_endpoints e
         WHERE d.id = due.id AND e.id = d.endpoint_id
         RETURNING d.id, d.endpoint_id, e.url, e.secret, d.payload, d.attempts",
    )
    .bind(now)
    .bind(i64::from(limit))
    .bind(token)
    .bind(now + dur_ms(lease_for))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DueDelivery {
                id: r.try_get("id")?,
                endpoint_id: r.try_get("endpoint_id")?,
                url: r.try_get("url")?,
                secret: r.try_get("secret")?,
                payload: r.try_get("payload")?,
                attempts: r.try_get::<i64, _>("attempts")? as u32,
                lease_token: token,
            })
        })
        .collect()
}

pub(super) async fn record(
    pool: &PgPool,
    delivery: &DueDelivery,
    attempt: &DeliveryAttempt,
    next: AttemptNext,
    disable_after: u32,
) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    let held = sqlx::query(
        "SELECT 1 FROM webhook_deliveries WHERE id = $1 AND lease_token = $2 AND state = 'pending' FOR UPDATE",
    )
    .bind(delivery.id)
    .bind(delivery.lease_token)
    .fetch_optional(&mut *tx)
    .await?;
    if held.is_none() {
        return Ok(());
    }
    let now = now_ms();
    sqlx::query(
        "INSERT INTO webhook_attempts (delivery_id, attempt, at_ms, status_code, error, duration_ms)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(delivery.id)
    .bind(i64::from(attempt.attempt))
    .bind(ms(attempt.at))
    .bind(attempt.status_code.map(i64::from))
    .bind(&attempt.error)
    .bind(attempt.duration_ms as i64)
    .execute(&mut *tx)
    .await?;
    let effect = effect(next);
    sqlx::query(
        "UPDATE webhook_deliveries SET state = $2, attempts = attempts + 1,
             next_attempt_ms = COALESCE($3, next_attempt_ms), lease_token = NULL, lease_until_ms = NULL,
             delivered_ms = CASE WHEN $4 THEN $5 ELSE delivered_ms END
         WHERE id = $1",
    )
    .bind(delivery.id)
    .bind(effect.state)
    .bind(effect.next_attempt_ms)
    .bind(effect.delivered)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if effect.delivered {
        sqlx::query(sql::ENDPOINT_SUCCEEDED)
            .bind(delivery.endpoint_id)
            .execute(&mut *tx)
            .await?;
    } else {
        sqlx::query(
            "UPDATE webhook_endpoints SET failure_run = failure_run + 1,
                 disabled_ms = CASE WHEN disabled_ms IS NULL AND failure_run + 1 >= $2 THEN $3 ELSE disabled_ms END
             WHERE id = $1",
        )
        .bind(delivery.endpoint_id)
        .bind(i64::from(disable_after))
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}
