//! The embedded store: one SQLite file in WAL mode. Writes go through a single-connection pool,
//! which serializes writers without SQLite's lock-upgrade failures; reads use their own pool.
//! Most of the role implementations, shared with PostgreSQL, are `crate::shared`; the modules
//! here hold what SQLite does its own way.

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

use crate::rows::*;
use crate::shared::KeyRequest;
use crate::sql;
use crate::writes::{
    identity_lookups, owners_to_load, prepare, resolve, IssueWrite, Prepared, Trace,
};
use crate::{
    Chunks, Database, Liveness, Outbox, Profiles, Stats, StoreError, StoreResult, Tenancy, Uploads,
};
use orbit_core::domain::fair::Pass;
use orbit_core::domain::resolve::{self, Existing, ProfileState};
use orbit_core::domain::row::{self, Issue};
use orbit_core::model::*;

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

fn profile_from_row(row: &SqliteRow) -> StoreResult<(i64, Profile)> {
    let r = ProfileRow::from_row(row)?;
    Ok((r.seq, r.try_into()?))
}

impl SqliteStore {
    /// Runs `once` once: with one writer at a time, SQLite loses no race worth trying again.
    async fn retrying<'a, T>(
        &'a self,
        mut once: impl FnMut() -> futures::future::BoxFuture<'a, StoreResult<T>>,
    ) -> StoreResult<T> {
        once().await
    }
}

crate::shared::store_roles! {
    store: SqliteStore,
    backend: "sqlite",
    read: reader,
    write: writer,
    lock_source: "SELECT * FROM sources WHERE organization_id = $1 AND directory_id = $2 AND id = $3",
    lock_chunk: "SELECT c.*, s.status AS source_status
         FROM chunks c JOIN sources s ON s.id = c.source_id
         WHERE c.directory_id = $1 AND c.id = $2",
    lock_lease: "SELECT transient_since_ms FROM chunks WHERE directory_id = $1 AND id = $2 AND lease_token = $3 AND state = 'running'",
    owner_dead: "SELECT p.expires_ms < $2 FROM processes p WHERE p.owner = $1",
    // SQLite has no lateral join: a window over the waiting chunks, which one process's
    // backlog keeps small.
    ready_chunks: "SELECT r.organization_id, r.directory_id, r.id, r.source_id, r.attempts, r.traceparent, r.tracestate, r.row_count, r.created_ms, l.weight
         FROM (SELECT s.organization_id, c.directory_id, c.id, c.source_id, c.attempts, c.traceparent, c.tracestate, c.row_count, s.created_ms,
                      ROW_NUMBER() OVER (PARTITION BY c.directory_id ORDER BY s.seq, c.idx) AS n
               FROM chunks c JOIN sources s ON s.id = c.source_id
               WHERE c.state = 'pending' AND c.not_before_ms <= $1 AND s.status IN ('pending', 'processing')) r
         LEFT JOIN organization_limits l ON l.organization_id = r.organization_id
         WHERE r.n = 1",
}

crate::shared::limits_role! {
    store: SqliteStore,
    read: reader,
    write: writer,
    connection: SqliteConnection,
    // One writer: a transaction on it is the organization's lock, and every other's.
    lock: None,
    open_admissions: "SELECT COUNT(*) FROM upload_admissions WHERE organization_id = $1 AND open_until_ms > $2 AND EXISTS (SELECT 1 FROM processes p WHERE p.owner = upload_admissions.owner AND p.expires_ms >= $2)",
    prune_admissions: "DELETE FROM upload_admissions WHERE organization_id = $1 AND admitted_ms <= $2 AND (open_until_ms <= $3 OR NOT EXISTS (SELECT 1 FROM processes p WHERE p.owner = upload_admissions.owner AND p.expires_ms >= $3))",
}

crate::shared::resumable_role! {
    store: SqliteStore,
    write: writer,
}
