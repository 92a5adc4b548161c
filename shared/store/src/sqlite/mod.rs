//! The embedded store: one SQLite file in WAL mode. Writes go through a single-connection pool,
//! which serializes writers without SQLite's lock-upgrade failures; reads use their own pool.

mod api;
mod chunks;
mod commit;
mod webhooks;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{FromRow, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::metrics::METRICS;
use crate::rows::*;
use crate::sql;
use crate::writes::{
    identity_lookups, owners_to_load, prepare, resolve, IssueWrite, Prepared, Trace,
};
use crate::{
    Chunks, Database, Liveness, Outbox, Profiles, Stats, StoreError, StoreResult, Tenancy, Uploads,
};
use orbit_core::domain::resolve::{self, Existing, ProfileState};
use orbit_core::domain::row::{self, Issue};
use orbit_core::model::*;
use orbit_core::views::{SOURCE_COMPLETED, SOURCE_FAILED};

/// SQLite allows 32766 bound parameters; stay far below it.
use commit::*;

const IN_BATCH: usize = 500;
/// Rows per multi-row `INSERT`: every statement is a round trip to SQLite's worker thread, and
/// one statement per row spent more time switching threads than writing (docs/performance.md).
/// 500 rows of at most 9 columns stay far below SQLite's 32,766 bound parameters.
const ROWS_PER_INSERT: usize = 500;

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

impl SqliteStore {
    pub async fn open(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        if let Some(parent) = options.get_filename().parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StoreError::Conflict(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
        }
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options.read_only(true))
            .await;
        // A read-only pool cannot open a file that does not exist yet; the writer just made it.
        let reader = match reader {
            Ok(pool) => pool,
            Err(e) => return Err(e.into()),
        };
        Ok(SqliteStore { writer, reader })
    }
}

fn source_from_row(row: &SqliteRow) -> StoreResult<Source> {
    SourceRow::from_row(row)?.try_into()
}

fn directory_from_row(row: &SqliteRow) -> StoreResult<Directory> {
    Ok(DirectoryRow::from_row(row)?.into())
}

fn chunk_from_row(row: &SqliteRow) -> StoreResult<ChunkSpec> {
    Ok(ChunkRow::from_row(row)?.into())
}

fn profile_from_row(row: &SqliteRow) -> StoreResult<(i64, Profile)> {
    let r = ProfileRow::from_row(row)?;
    Ok((r.seq, r.try_into()?))
}

async fn load_source(conn: &mut SqliteConnection, id: Uuid) -> StoreResult<Source> {
    sqlx::query_as::<_, SourceRow>(sql::SOURCE_BY_ID)
        .bind(id)
        .fetch_one(&mut *conn)
        .await?
        .try_into()
}

#[async_trait]
impl Database for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("migrations/sqlite")
            .run(&self.writer)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

#[async_trait]
impl Liveness for SqliteStore {
    async fn heartbeat(&self, owner: &str, valid_for: Duration) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO processes (owner, heartbeat_ms, expires_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (owner) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms, expires_ms = excluded.expires_ms",
        )
        .bind(owner)
        .bind(now)
        .bind(now + dur_ms(valid_for))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn retire(&self, owner: &str) -> StoreResult<()> {
        sqlx::query(sql::RETIRE_PROCESS)
            .bind(owner)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Outbox for SqliteStore {
    async fn create_webhook(&self, endpoint: &WebhookEndpoint) -> StoreResult<()> {
        webhooks::create(&self.writer, endpoint).await
    }

    async fn list_webhooks(&self, org: Uuid) -> StoreResult<Vec<WebhookEndpoint>> {
        webhooks::list(&self.reader, org).await
    }

    async fn get_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        webhooks::get(&self.reader, org, id).await
    }

    async fn delete_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<bool> {
        webhooks::delete(&self.writer, org, id).await
    }

    async fn enable_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        webhooks::enable(&self.writer, org, id).await
    }

    async fn list_deliveries(
        &self,
        org: Uuid,
        endpoint: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        webhooks::deliveries(&self.reader, org, endpoint, limit).await
    }

    async fn claim_deliveries(
        &self,
        lease_for: Duration,
        limit: u32,
    ) -> StoreResult<Vec<DueDelivery>> {
        webhooks::claim(&self.reader, &self.writer, lease_for, limit).await
    }

    async fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: &DeliveryAttempt,
        next: AttemptNext,
        disable_after: u32,
    ) -> StoreResult<()> {
        webhooks::record(&self.writer, delivery, attempt, next, disable_after).await
    }
}

#[async_trait]
impl Stats for SqliteStore {
    async fn count_failed_sources_by_code(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows = sqlx::query(sql::FAILED_SOURCES_BY_CODE)
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("code")?, row.try_get::<i64, _>("n")? as u64)))
            .collect()
    }

    async fn count_sources_by_status(&self) -> StoreResult<Vec<(SourceStatus, u64)>> {
        let rows = sqlx::query(sql::SOURCES_BY_STATUS)
            .fetch_all(&self.reader)
            .await?;
        let mut counts: HashMap<SourceStatus, u64> = HashMap::new();
        for row in rows {
            let status: String = row.try_get("status")?;
            if let Some(s) = SourceStatus::parse(&status) {
                counts.insert(s, row.try_get::<i64, _>("n")? as u64);
            }
        }
        Ok(SourceStatus::ALL
            .into_iter()
            .map(|s| (s, counts.get(&s).copied().unwrap_or(0)))
            .collect())
    }

    async fn count_pending_chunks(&self) -> StoreResult<u64> {
        let row = sqlx::query(sql::OPEN_CHUNKS)
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }
}
