//! PostgreSQL: webhook endpoints and the delivery outbox. Gateways lease due deliveries one
//! by one with a conditional update, so several of them share the outbox without sending a
//! delivery twice at once; a lease that runs out (its gateway died mid-attempt) makes the delivery due
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
    lease_held: "SELECT 1 FROM webhook_deliveries WHERE directory_id = $1 AND id = $2 AND lease_token = $3 AND state = 'pending' FOR UPDATE",
    attempts_of: attempts_of,
    lock_endpoint: "SELECT 1 FROM webhook_endpoints WHERE organization_id = $1 AND id = $2 FOR UPDATE",
    // Joined on the directory too: on Citus the delete then runs on every shard at once.
    delete_attempts: "DELETE FROM webhook_attempts a USING webhook_deliveries d
         WHERE a.directory_id = d.directory_id AND a.delivery_id = d.id AND d.endpoint_id = $1",
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

pub(super) async fn claim(
    store: &super::PgStore,
    lease_for: Duration,
    limit: u32,
) -> StoreResult<Vec<DueDelivery>> {
    store
        .retrying(|| Box::pin(claim_once(&store.pool, lease_for, limit)))
        .await
}

/// Due deliveries are read without a lock (a sharded database cannot lock rows across
/// shards), then each is leased by key in a statement that checks it is still due: of two
/// dispatchers, the second finds it leased.
async fn claim_once(
    pool: &PgPool,
    lease_for: Duration,
    limit: u32,
) -> StoreResult<Vec<DueDelivery>> {
    let now = now_ms();
    let token = Uuid::new_v4();
    let candidates: Vec<DueRow> = sqlx::query_as(
        "SELECT d.directory_id, d.id, d.endpoint_id, e.url, e.secret, d.payload, d.attempts
         FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
         WHERE d.state = 'pending' AND d.next_attempt_ms <= $1
           AND (d.lease_until_ms IS NULL OR d.lease_until_ms < $1) AND e.disabled_ms IS NULL
         ORDER BY d.next_attempt_ms LIMIT $2",
    )
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(pool)
    .await?;
    let mut due = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let leased = sqlx::query(
            "UPDATE webhook_deliveries SET lease_token = $1, lease_until_ms = $2
             WHERE directory_id = $3 AND id = $4 AND state = 'pending' AND next_attempt_ms <= $5
               AND (lease_until_ms IS NULL OR lease_until_ms < $5)",
        )
        .bind(token)
        .bind(now + dur_ms(lease_for))
        .bind(candidate.directory_id)
        .bind(candidate.id)
        .bind(now)
        .execute(pool)
        .await?;
        if leased.rows_affected() > 0 {
            due.push(candidate.leased(token));
        }
    }
    Ok(due)
}
