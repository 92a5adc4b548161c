//! PostgreSQL: webhook endpoints and the delivery outbox. Gateways lease due deliveries with
//! `FOR UPDATE SKIP LOCKED`, so several of them share the outbox without sending a delivery
//! twice at once; a lease that runs out (its gateway died mid-attempt) makes the delivery due
//! again: at least once. What SQLite does the same way is `crate::shared::webhook_store`.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::rows::{dur_ms, now_ms};
use crate::webhook_rows::*;
use crate::StoreResult;
use orbit_core::model::*;

crate::shared::webhook_store! {
    connection: PgConnection,
    pool: PgPool,
    lease_held: "SELECT 1 FROM webhook_deliveries WHERE id = $1 AND lease_token = $2 AND state = 'pending' FOR UPDATE",
    attempts_of: attempts_of,
}

/// The attempts of a page of deliveries, in one query.
async fn attempts_of(pool: &PgPool, deliveries: &[DeliveryRow]) -> StoreResult<Vec<AttemptRow>> {
    let ids: Vec<Uuid> = deliveries.iter().map(DeliveryRow::id).collect();
    Ok(
        sqlx::query_as("SELECT * FROM webhook_attempts WHERE delivery_id = ANY($1)")
            .bind(&ids)
            .fetch_all(pool)
            .await?,
    )
}

pub(super) async fn delete(pool: &PgPool, org: Uuid, id: Uuid) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM webhook_endpoints WHERE organization_id = $1 AND id = $2")
        .bind(org)
        .bind(id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn claim(
    store: &super::PgStore,
    lease_for: Duration,
    limit: u32,
) -> StoreResult<Vec<DueDelivery>> {
    store
        .retrying(|| Box::pin(claim_once(&store.pool, lease_for, limit)))
        .await
}

async fn claim_once(
    pool: &PgPool,
    lease_for: Duration,
    limit: u32,
) -> StoreResult<Vec<DueDelivery>> {
    let now = now_ms();
    let token = Uuid::new_v4();
    let rows: Vec<DueRow> = sqlx::query_as(
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
    Ok(rows.into_iter().map(|r| r.leased(token)).collect())
}
