//! Migrating, and sharding the schema by directory when the database is a Citus coordinator
//! (the `citus` extension is installed in it): what `migrate` does after the migrations, every
//! time, so a table a later migration adds is placed too, and an existing database moves onto
//! its worker nodes the first time it runs. On plain PostgreSQL nothing more happens.
//! docs/scaling.md says why each table lives where it does.

use super::*;

/// The organization's tables, small and read on every request: a copy on every node
/// (reference tables), listed so that a referenced table comes before the ones that
/// reference it.
const REFERENCE: &[&str] = &[
    "organizations",
    "users",
    "tokens",
    "directories",
    "webhook_endpoints",
    "organization_limits",
];

/// Every table a directory's imports write, sharded by `directory_id` and colocated with
/// `sources`: a directory's rows of all of them live on one node, so a commit touches one.
const DISTRIBUTED: &[&str] = &[
    "sources",
    "chunks",
    "records",
    "row_issues",
    "failed_rows",
    "identities",
    "profiles",
    "idempotency_keys",
    "webhook_deliveries",
    "webhook_attempts",
    "resumable_uploads",
    "resumable_parts",
];

// `processes` (heartbeats, once a second per process), `idempotency_scopes`,
// `scheduler_shares` (written by every chunk claim) and `upload_admissions` (written by every
// upload an organization's limits admit) stay on the coordinator as plain tables: writing a
// copy on every node would stop every heartbeat, claim or upload while any one node is down.
// Admissions are taken under an advisory lock of the organization, which lives on the
// coordinator too, so the lock and the rows it guards are one node's; their organization is
// no key to shard by (one busy organization would be one node's work), and no directory's
// transaction reads them (an upload's commit closes the admission it held: a write of a
// coordinator table beside the directory's shard, in one distributed transaction).

/// The advisory lock every process migrating the database holds while it migrates; anything
/// else that changes the schema (a test dropping its own) takes it too.
pub const MIGRATION_LOCK: i64 = 7_316_042_211;

impl PgStore {
    /// Runs the migrations, then places the tables, under one lock across every process
    /// migrating this database: on Citus, DDL in one schema (a migration) and distributing
    /// tables in another deadlock on Citus's own catalog otherwise.
    pub(super) async fn migrate_all(&self) -> StoreResult<()> {
        let mut conn = self.pool.acquire().await?;
        // The lock is the session's: should this be cancelled half-way, the connection must
        // not go back to the pool still holding it.
        conn.close_on_drop();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await?;
        let mut retry = self.retry();
        let done = loop {
            let once = async {
                sqlx::migrate!("migrations/postgres")
                    .run(&self.pool)
                    .await?;
                self.place_tables(&mut conn).await
            };
            // Schema changes made by others than Orbit (an operator, Citus's own maintenance)
            // can still deadlock with a migration: each migration is one transaction, so the
            // run starts over where it stopped.
            match once.await {
                Err(e) => match retry.after(migration_error(e)).await {
                    Ok(()) => continue,
                    Err(e) => break Err(e),
                },
                done => break done,
            }
        };
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *conn)
            .await?;
        done
    }

    async fn place_tables(&self, conn: &mut PgConnection) -> StoreResult<()> {
        let citus: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
        )
        .fetch_one(&mut *conn)
        .await?;
        if !citus {
            return Ok(());
        }
        self.place_each(conn).await
    }

    async fn place_each(&self, conn: &mut PgConnection) -> StoreResult<()> {
        for table in REFERENCE {
            if !placed(conn, table, REFERENCE_TABLE).await? {
                sqlx::query("SELECT create_reference_table($1)")
                    .bind(table)
                    .execute(&mut *conn)
                    .await?;
                tracing::info!(table, "made a reference table");
                forget_local_copy(conn, table).await?;
            }
        }
        for table in DISTRIBUTED {
            if !placed(conn, table, DISTRIBUTED_TABLE).await? {
                let colocate_with = if *table == "sources" {
                    "default"
                } else {
                    "sources"
                };
                sqlx::query(
                    "SELECT create_distributed_table($1, 'directory_id', colocate_with => $2)",
                )
                .bind(table)
                .bind(colocate_with)
                .execute(&mut *conn)
                .await?;
                tracing::info!(table, "distributed by directory_id");
                forget_local_copy(conn, table).await?;
            }
        }
        Ok(())
    }
}

/// How `pg_dist_partition` describes a reference table and a table distributed by hash.
const REFERENCE_TABLE: &str = "partmethod = 'n' AND repmodel = 't'";
const DISTRIBUTED_TABLE: &str = "partmethod = 'h'";

/// Whether Citus has the table placed as `kind` already. Only that counts: making a table a
/// reference table turns the local tables that reference it into Citus local tables
/// (coordinator only, but listed in `pg_dist_partition` too), which still have to become
/// reference tables themselves.
async fn placed(conn: &mut PgConnection, table: &str, kind: &str) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = to_regclass($1) AND {kind})"
    ))
    .bind(table)
    .fetch_one(&mut *conn)
    .await?)
}

/// Distributing a table that has rows copies them to the nodes and leaves the original on the
/// coordinator's disk, unseen: a database moved onto Citus gets that space back.
async fn forget_local_copy(conn: &mut PgConnection, table: &str) -> StoreResult<()> {
    sqlx::query("SELECT truncate_local_data_after_distributing_table($1)")
        .bind(table)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A migration that failed on a database error is retried as that error would be.
fn migration_error(e: StoreError) -> StoreError {
    match e {
        StoreError::Migrate(sqlx::migrate::MigrateError::ExecuteMigration(e, _)) => {
            StoreError::Database(e)
        }
        e => e,
    }
}
