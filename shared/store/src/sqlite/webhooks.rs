//! SQLite: webhook endpoints and the delivery outbox. One writer at a time, so a claim's read
//! and lease are one step no other gateway process can interleave with.

use std::time::Duration;

use sqlx::{Row, SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::rows::{dur_ms, ms, now_ms};
use crate::sql;
use crate::webhook_rows::*;
use crate::StoreResult;
use orbit_core::model::*;
use orbit_core::views::source_event;

/// Writes the outbox rows of `source`'s end, inside the transaction that ends it.
pub(super) async fn enqueue(
    conn: &mut SqliteConnection,
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
             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
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

pub(super) async fn create(pool: &SqlitePool, e: &WebhookEndpoint) -> StoreResult<()> {
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

pub(super) async fn list(pool: &SqlitePool, org: Uuid) -> StoreResult<Vec<WebhookEndpoint>> {
    let rows: Vec<EndpointRow> = sqlx::query_as(sql::ENDPOINTS)
        .bind(org)
        .fetch_all(pool)
        .await?;
    rows.into_iter().map(TryInto::try_into).collect()
}

pub(super) async fn get(
    pool: &SqlitePool,
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

pub(super) async fn delete(writer: &SqlitePool, org: Uuid, id: Uuid) -> StoreResult<bool> {
    let mut tx = writer.begin().await?;
    // The schema cascades, but only where foreign keys are enforced: delete explicitly.
    let owned = sqlx::query("SELECT 1 FROM webhook_endpoints WHERE organization_id = ? AND id = ?")
        .bind(org)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    if owned.is_none() {
        return Ok(false);
    }
    sqlx::query(
        "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE endpoint_id = ?)",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM webhook_deliveries WHERE endpoint_id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM webhook_endpoints WHERE id = ?")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn enable(
    writer: &SqlitePool,
    org: Uuid,
    id: Uuid,
) -> StoreResult<Option<WebhookEndpoint>> {
    let row: Option<EndpointRow> = sqlx::query_as(sql::ENABLE_ENDPOINT)
        .bind(org)
        .bind(id)
        .fetch_optional(writer)
        .await?;
    row.map(TryInto::try_into).transpose()
}

pub(super) async fn deliveries(
    pool: &SqlitePool,
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
    let mut attempts: Vec<AttemptRow> = Vec::new();
    for row in &rows {
        let mut of_one: Vec<AttemptRow> =
            sqlx::query_as("SELECT * FROM webhook_attempts WHERE delivery_id = ?")
                .bind(row.id())
                .fetch_all(pool)
                .await?;
        attempts.append(&mut of_one);
    }
    Ok(deliveries_with_attempts(rows, attempts))
}

pub(super) async fn claim(
    reader: &SqlitePool,
    writer: &SqlitePool,
    lease_for: Duration,
    limit: u32,
) -> StoreResult<Vec<DueDelivery>> {
    let now = now_ms();
    // Every gateway asks every `webhooks.poll_interval`; the one writer is only taken when
    // something is due, so an idle outbox never delays uploads and commits.
    let due = sqlx::query(
        "SELECT 1 FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_ms <= ?1
           AND (lease_until_ms IS NULL OR lease_until_ms < ?1) LIMIT 1",
    )
    .bind(now)
    .fetch_optional(reader)
    .await?;
    if due.is_none() {
        return Ok(Vec::new());
    }
    let token = Uuid::new_v4();
    let mut tx = writer.begin().await?;
    let rows = sqlx::query(
        "SELECT d.id, d.endpoint_id, e.url, e.secret, d.payload, d.attempts
         FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
         WHERE d.state = 'pending' AND d.next_attempt_ms <= ?1
           AND (d.lease_until_ms IS NULL OR d.lease_until_ms < ?1) AND e.disabled_ms IS NULL
         ORDER BY d.next_attempt_ms LIMIT ?2",
    )
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(&mut *tx)
    .await?;
    let mut due = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: Uuid = r.try_get("id")?;
        sqlx::query(
            "UPDATE webhook_deliveries SET lease_token = ?, lease_until_ms = ? WHERE id = ?",
        )
        .bind(token)
        .bind(now + dur_ms(lease_for))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        due.push(DueDelivery {
            id,
            endpoint_id: r.try_get("endpoint_id")?,
            url: r.try_get("url")?,
            secret: r.try_get("secret")?,
            payload: r.try_get("payload")?,
            attempts: r.try_get::<i64, _>("attempts")? as u32,
            lease_token: token,
        });
    }
    tx.commit().await?;
    Ok(due)
}

pub(super) async fn record(
    writer: &SqlitePool,
    delivery: &DueDelivery,
    attempt: &DeliveryAttempt,
    next: AttemptNext,
    disable_after: u32,
) -> StoreResult<()> {
    let mut tx = writer.begin().await?;
    let held = sqlx::query(
        "SELECT 1 FROM webhook_deliveries WHERE id = ? AND lease_token = ? AND state = 'pending'",
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
        "INSERT OR IGNORE INTO webhook_attempts (delivery_id, attempt, at_ms, status_code, error, duration_ms)
         VALUES (?, ?, ?, ?, ?, ?)",
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
        "UPDATE webhook_deliveries SET state = ?2, attempts = attempts + 1,
             next_attempt_ms = COALESCE(?3, next_attempt_ms), lease_token = NULL, lease_until_ms = NULL,
             delivered_ms = CASE WHEN ?4 THEN ?5 ELSE delivered_ms END
         WHERE id = ?1",
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
                 disabled_ms = CASE WHEN disabled_ms IS NULL AND failure_run + 1 >= ?2 THEN ?3 ELSE disabled_ms END
             WHERE id = ?1",
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
