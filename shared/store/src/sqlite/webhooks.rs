//! SQLite: webhook endpoints and the delivery outbox. One writer at a time, so a claim's read
//! and lease are one step no other gateway process can interleave with. What PostgreSQL does
//! the same way is `crate::shared::webhook_store`.

use std::time::Duration;

use sqlx::{SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::rows::{dur_ms, now_ms};
use crate::webhook_rows::*;
use crate::StoreResult;
use orbit_core::model::*;

crate::shared::webhook_store! {
    connection: SqliteConnection,
    pool: SqlitePool,
    lease_held: "SELECT 1 FROM webhook_deliveries WHERE directory_id = $1 AND id = $2 AND lease_token = $3 AND state = 'pending'",
    attempts_of: attempts_of,
    lock_endpoint: "SELECT 1 FROM webhook_endpoints WHERE organization_id = $1 AND id = $2",
    delete_attempts: "DELETE FROM webhook_attempts WHERE delivery_id IN (SELECT id FROM webhook_deliveries WHERE endpoint_id = $1)",
}

/// The attempts of a page of deliveries, a query per delivery: SQLite binds no arrays.
async fn attempts_of(
    pool: &SqlitePool,
    deliveries: &[DeliveryRow],
) -> StoreResult<Vec<AttemptRow>> {
    let mut attempts: Vec<AttemptRow> = Vec::new();
    for row in deliveries {
        let mut of_one: Vec<AttemptRow> =
            sqlx::query_as("SELECT * FROM webhook_attempts WHERE delivery_id = ?")
                .bind(row.id())
                .fetch_all(pool)
                .await?;
        attempts.append(&mut of_one);
    }
    Ok(attempts)
}

pub(super) async fn claim(
    store: &super::SqliteStore,
    lease_for: Duration,
    limit: u32,
) -> StoreResult<Vec<DueDelivery>> {
    let (reader, writer) = (&store.reader, &store.writer);
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
    let rows: Vec<DueRow> = sqlx::query_as(
        "SELECT d.directory_id, d.id, d.endpoint_id, e.url, e.secret, d.payload, d.attempts
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
    for r in rows {
        sqlx::query(
            "UPDATE webhook_deliveries SET lease_token = ?, lease_until_ms = ? WHERE id = ?",
        )
        .bind(token)
        .bind(now + dur_ms(lease_for))
        .bind(r.id)
        .execute(&mut *tx)
        .await?;
        due.push(r.leased(token));
    }
    tx.commit().await?;
    Ok(due)
}
