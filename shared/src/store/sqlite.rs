//! The embedded store: one SQLite file in WAL mode. Writes go through a single-connection pool,
//! which serializes writers without SQLite's lock-upgrade failures; reads use their own pool.

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

use super::rows::*;
use super::sql;
use super::writes::{
    identity_lookups, owners_to_load, prepare, resolve, IssueWrite, Prepared, Trace,
};
use super::{sqlite_webhooks, Store, StoreError, StoreResult};
use crate::domain::resolve::{self, Existing, ProfileState};
use crate::domain::row::{self, Issue};
use crate::metrics::METRICS;
use crate::model::*;
use crate::views::{SOURCE_COMPLETED, SOURCE_FAILED};

/// SQLite allows 32766 bound parameters; stay far below it.
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

/// Materializes validated rows: resolves them to profiles and writes records, profiles,
/// identities, issues and failed rows. Runs inside the caller's write transaction, which is
/// what makes resolution race-free: SQLite has one writer at a time.
async fn apply_results(
    conn: &mut SqliteConnection,
    source: &Source,
    mut prepared: Prepared,
) -> StoreResult<Applied> {
    let dir = source.directory_id;
    let mut existing = Existing::default();
    for (kind, values) in identity_lookups(&prepared) {
        for batch in values.chunks(IN_BATCH) {
            let sql = format!(
                "SELECT value, profile_id FROM profile_identities WHERE directory_id = ? AND kind = ? AND value IN ({})",
                placeholders(batch.len())
            );
            let mut query = sqlx::query(&sql).bind(dir).bind(kind);
            for v in batch {
                query = query.bind(*v);
            }
            for row in query.fetch_all(&mut *conn).await? {
                existing
                    .owners
                    .insert(kind, row.try_get("value")?, row.try_get("profile_id")?);
            }
        }
    }
    for batch in owners_to_load(&existing).chunks(IN_BATCH) {
        let sql = format!(
            "SELECT id, state FROM profiles WHERE id IN ({})",
            placeholders(batch.len())
        );
        let mut query = sqlx::query(&sql);
        for id in batch {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let state: String = row.try_get("state")?;
            existing.profiles.insert(
                row.try_get("id")?,
                serde_json::from_str::<ProfileState>(&state)?,
            );
        }
    }

    let writes = resolve(&mut prepared, existing, source.seq)?;
    // DRY RUN: the one point where a dry run leaves the write path: no profile, identity or
    // record; the counts, warnings and failed rows stay, as the import would have them.
    if source.dry_run {
        write_failed_and_issues(conn, source.id, &prepared, &writes.warnings).await?;
        return Ok(writes.applied);
    }
    let now = now_ms();
    let state_json = |profiles: BTreeMap<Uuid, ProfileState>| -> StoreResult<Vec<(Uuid, String)>> {
        profiles
            .into_iter()
            .map(|(id, state)| Ok((id, serde_json::to_string(&state)?)))
            .collect()
    };
    let (created, updated) = (state_json(writes.created)?, state_json(writes.updated)?);
    for batch in created.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO profiles (id, organization_id, directory_id, state, created_ms, updated_ms) ",
        );
        insert.push_values(batch, |mut row, (id, state)| {
            row.push_bind(id)
                .push_bind(source.organization_id)
                .push_bind(dir)
                .push_bind(state)
                .push_bind(now)
                .push_bind(now);
        });
        insert.build().execute(&mut *conn).await?;
    }
    for (id, state) in &updated {
        sqlx::query("UPDATE profiles SET state = ?, updated_ms = ? WHERE id = ?")
            .bind(state)
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    for batch in writes.identities.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO profile_identities (directory_id, kind, value, profile_id) ",
        );
        insert.push_values(batch, |mut row, (kind, value, profile)| {
            row.push_bind(dir)
                .push_bind(kind)
                .push_bind(value)
                .push_bind(profile);
        });
        insert.build().execute(&mut *conn).await?;
    }
    let mut records = Vec::with_capacity(prepared.records.len());
    for ((r, draft), profile) in prepared
        .records
        .iter()
        .zip(&prepared.accepted)
        .zip(&writes.profile_of)
    {
        let fields = serde_json::to_string(&draft.fields)?;
        let attributes = serde_json::to_string(&draft.attributes)?;
        records.push((r, &draft.fields, profile, fields, attributes));
    }
    for batch in records.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO records (source_id, row_number, line_number, profile_id, email, linkedin_url, phone, fields, attributes) ",
        );
        insert.push_values(
            batch,
            |mut row, (r, identities, profile, fields, attributes)| {
                row.push_bind(source.id)
                    .push_bind(r.row_number)
                    .push_bind(r.line_number)
                    .push_bind(**profile)
                    .push_bind(identities.get("email"))
                    .push_bind(identities.get("linkedin_url"))
                    .push_bind(identities.get("phone"))
                    .push_bind(fields)
                    .push_bind(attributes);
            },
        );
        insert.build().execute(&mut *conn).await?;
    }
    write_failed_and_issues(conn, source.id, &prepared, &writes.warnings).await?;
    Ok(writes.applied)
}

/// The failed rows and the row issues (`warnings` of accepted rows, the failed rows' errors).
async fn write_failed_and_issues(
    conn: &mut SqliteConnection,
    source: Uuid,
    prepared: &Prepared,
    warnings: &[IssueWrite],
) -> StoreResult<()> {
    for batch in prepared.failed.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO failed_rows (source_id, row_number, line_number, fields, error_code, error_message) ",
        );
        insert.push_values(batch, |mut row, f| {
            row.push_bind(source)
                .push_bind(f.row_number)
                .push_bind(f.line_number)
                .push_bind(&f.fields)
                .push_bind(f.error_code)
                .push_bind(&f.error_message);
        });
        insert.build().execute(&mut *conn).await?;
    }
    for i in warnings.iter().chain(&prepared.failed_issues) {
        insert_issue(
            conn,
            source,
            i.row_number as u64,
            i.line_number as u64,
            &i.issue,
        )
        .await?;
    }
    Ok(())
}

async fn insert_issue(
    conn: &mut SqliteConnection,
    source: Uuid,
    row_number: u64,
    line_number: u64,
    issue: &Issue,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT OR IGNORE INTO row_issues (source_id, row_number, line_number, severity, code, column_name, message, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(source)
    .bind(row_number as i64)
    .bind(line_number as i64)
    .bind(issue.code.severity().as_str())
    .bind(issue.code.as_str())
    .bind(issue.column.as_deref().unwrap_or(""))
    .bind(&issue.message)
    .bind(&issue.value)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Adds the applied counts to the source and completes it when its last chunk is in.
async fn advance_source(
    conn: &mut SqliteConnection,
    source: Uuid,
    applied: &Applied,
    chunks_done: u64,
) -> StoreResult<bool> {
    let now = now_ms();
    sqlx::query(
        "UPDATE sources SET accepted = accepted + ?, failed = failed + ?, warnings = warnings + ?, processed_rows = processed_rows + ?, chunks_done = chunks_done + ?, status = 'processing', updated_ms = ? WHERE id = ? AND status IN ('pending', 'processing')",
    )
    .bind(applied.accepted as i64)
    .bind(applied.failed as i64)
    .bind(applied.warnings as i64)
    .bind((applied.accepted + applied.failed) as i64)
    .bind(chunks_done as i64)
    .bind(now)
    .bind(source)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query("SELECT chunk_count, chunks_done FROM sources WHERE id = ?")
        .bind(source)
        .fetch_one(&mut *conn)
        .await?;
    let (count, done): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    if done < count {
        return Ok(false);
    }
    finalize_source(conn, source).await?;
    Ok(true)
}

/// Every chunk is in: flags duplicates across chunks, settles the warning count and completes
/// the source (or fails it, should the counts not add up).
async fn finalize_source(conn: &mut SqliteConnection, source_id: Uuid) -> StoreResult<()> {
    for kind in resolve::IDENTITY_KINDS {
        // Set-based: one grouping pass finds each repeated identity's first row.
        let sql = format!(
            "SELECT r.row_number, r.line_number, r.{kind} AS value FROM records r
             JOIN (SELECT {kind} AS value, MIN(row_number) AS first FROM records
                   WHERE source_id = ?1 AND {kind} IS NOT NULL GROUP BY {kind} HAVING COUNT(*) > 1) d
               ON r.{kind} = d.value
             WHERE r.source_id = ?1 AND r.{kind} IS NOT NULL AND r.row_number > d.first"
        );
        let rows = sqlx::query(&sql)
            .bind(source_id)
            .fetch_all(&mut *conn)
            .await?;
        for r in rows {
            let value: String = r.try_get("value")?;
            let issue = row::duplicate_issue(kind, &value);
            insert_issue(
                conn,
                source_id,
                r.try_get::<i64, _>("row_number")? as u64,
                r.try_get::<i64, _>("line_number")? as u64,
                &issue,
            )
            .await?;
        }
    }
    let source = load_source(conn, source_id).await?;
    let now = now_ms();
    if source.accepted + source.failed != source.total_rows {
        let message = format!(
            "processed {} rows of {}; the source cannot be completed",
            source.accepted + source.failed,
            source.total_rows
        );
        return fail_source_in(conn, source_id, "row_count_mismatch", &message).await;
    }
    let completed = sqlx::query(
        "UPDATE sources SET warnings = (SELECT COUNT(DISTINCT row_number) FROM row_issues WHERE source_id = ?1 AND severity = 'warning'),
         status = 'completed', completed_ms = ?2, updated_ms = ?2 WHERE id = ?1 AND status IN ('pending', 'processing')",
    )
    .bind(source_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if completed.rows_affected() > 0 {
        let source = load_source(conn, source_id).await?;
        sqlite_webhooks::enqueue(conn, source, SOURCE_COMPLETED).await?;
    }
    Ok(())
}

async fn fail_source_in(
    conn: &mut SqliteConnection,
    source: Uuid,
    code: &str,
    message: &str,
) -> StoreResult<()> {
    let now = now_ms();
    let updated = sqlx::query(
        "UPDATE sources SET status = 'failed', error_code = ?, error_message = ?, completed_ms = ?, updated_ms = ? WHERE id = ? AND status IN ('pending', 'processing')",
    )
    .bind(code)
    .bind(message)
    .bind(now)
    .bind(now)
    .bind(source)
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() > 0 {
        sqlx::query(sql::FAIL_OPEN_CHUNKS)
            .bind(source)
            .execute(&mut *conn)
            .await?;
        let failed = load_source(conn, source).await?;
        sqlite_webhooks::enqueue(conn, failed, SOURCE_FAILED).await?;
    }
    Ok(())
}

async fn insert_chunk(
    conn: &mut SqliteConnection,
    source: Uuid,
    chunk: &ChunkSpec,
    state: &str,
    trace: Trace<'_>,
) -> StoreResult<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(sql::INSERT_CHUNK)
        .bind(id)
        .bind(source)
        .bind(chunk.index as i64)
        .bind(chunk.first_row as i64)
        .bind(chunk.row_count as i64)
        .bind(chunk.start_offset as i64)
        .bind(chunk.end_offset as i64)
        .bind(chunk.start_line as i64)
        .bind(state)
        .bind(now_ms())
        .bind(trace.traceparent)
        .bind(trace.tracestate)
        .execute(&mut *conn)
        .await?;
    Ok(id)
}

async fn identities_of(
    pool: &SqlitePool,
    profiles: &[Uuid],
) -> StoreResult<HashMap<Uuid, Vec<(String, String)>>> {
    let mut out: HashMap<Uuid, Vec<(String, String)>> = HashMap::new();
    for batch in profiles.chunks(IN_BATCH) {
        let sql = format!(
            "SELECT profile_id, kind, value FROM profile_identities WHERE profile_id IN ({}) ORDER BY kind, value",
            placeholders(batch.len())
        );
        let mut query = sqlx::query(&sql);
        for id in batch {
            query = query.bind(*id);
        }
        for row in query.fetch_all(pool).await? {
            out.entry(row.try_get("profile_id")?)
                .or_default()
                .push((row.try_get("kind")?, row.try_get("value")?));
        }
    }
    Ok(out)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("../migrations/sqlite")
            .run(&self.writer)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn create_organization(&self, name: &str) -> StoreResult<Organization> {
        let org = Organization {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            created_at: at(now_ms()),
        };
        sqlx::query(sql::INSERT_ORGANIZATION)
            .bind(org.id)
            .bind(&org.name)
            .bind(ms(org.created_at))
            .execute(&self.writer)
            .await?;
        Ok(org)
    }

    async fn organization_exists(&self, org: Uuid) -> StoreResult<bool> {
        Ok(sqlx::query(sql::ORGANIZATION_EXISTS)
            .bind(org)
            .fetch_optional(&self.reader)
            .await?
            .is_some())
    }

    async fn ensure_user(&self, org: Uuid, email: &str) -> StoreResult<Uuid> {
        sqlx::query("INSERT OR IGNORE INTO users (id, organization_id, email, created_ms) VALUES (?, ?, ?, ?)")
            .bind(Uuid::now_v7())
            .bind(org)
            .bind(email)
            .bind(now_ms())
            .execute(&self.writer)
            .await?;
        let row = sqlx::query(sql::USER_BY_EMAIL)
            .bind(org)
            .bind(email)
            .fetch_one(&self.writer)
            .await?;
        Ok(row.try_get("id")?)
    }

    async fn insert_token(
        &self,
        hash: &[u8],
        org: Uuid,
        user: Uuid,
        expires_at: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        sqlx::query(sql::INSERT_TOKEN)
            .bind(hash)
            .bind(org)
            .bind(user)
            .bind(now_ms())
            .bind(expires_at.map(ms))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn find_token(&self, hash: &[u8]) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query(sql::TOKEN_BY_HASH)
            .bind(hash)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row
            .as_ref()
            .map(TokenRow::from_row)
            .transpose()?
            .map(TokenRecord::from))
    }

    async fn revoke_token(&self, hash: &[u8]) -> StoreResult<bool> {
        let done = sqlx::query(sql::REVOKE_TOKEN)
            .bind(now_ms())
            .bind(hash)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_directory(&self, org: Uuid, name: &str) -> StoreResult<Directory> {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO directories (id, organization_id, name, created_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(org)
        .bind(name)
        .bind(now_ms())
        .execute(&self.writer)
        .await?;
        let row = sqlx::query("SELECT * FROM directories WHERE id = ?")
            .bind(id)
            .fetch_one(&self.writer)
            .await?;
        directory_from_row(&row)
    }

    async fn get_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        sqlx::query(sql::DIRECTORY)
            .bind(org)
            .bind(dir)
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(directory_from_row)
            .transpose()
    }

    async fn list_directories(
        &self,
        org: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Directory>> {
        let rows = sqlx::query(sql::DIRECTORIES_PAGE)
            .bind(org)
            .bind(page.after.map_or(0, |c| c.0))
            .bind(page_limit(page) + 1)
            .fetch_all(&self.reader)
            .await?;
        let items = rows
            .iter()
            .map(|r| Ok((r.try_get::<i64, _>("seq")?, directory_from_row(r)?)))
            .collect::<StoreResult<Vec<_>>>()?;
        let page = paginate(items, page_limit(page) as usize, |(seq, _)| Cursor(*seq, 0));
        Ok(Page {
            items: page.items.into_iter().map(|(_, d)| d).collect(),
            next: page.next,
        })
    }

    async fn archive_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        sqlx::query("UPDATE directories SET archived_ms = ? WHERE organization_id = ? AND id = ? AND archived_ms IS NULL")
            .bind(now_ms())
            .bind(org)
            .bind(dir)
            .execute(&self.writer)
            .await?;
        sqlx::query(sql::DIRECTORY)
            .bind(org)
            .bind(dir)
            .fetch_optional(&self.writer)
            .await?
            .as_ref()
            .map(directory_from_row)
            .transpose()
    }

    async fn claim_idempotency_key(
        &self,
        org: Uuid,
        key: &str,
        dir: Uuid,
        owner: &str,
        ttl: Duration,
        in_flight_timeout: Duration,
    ) -> StoreResult<KeyState> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let row = sqlx::query(
            "SELECT k.*, COALESCE(p.expires_ms < ?3, 0) AS owner_dead FROM idempotency_keys k
                 LEFT JOIN processes p ON p.owner = k.owner
                 WHERE k.organization_id = ?1 AND k.key = ?2",
        )
        .bind(org)
        .bind(key)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            if let Some(held) = decide_key(&KeyRow::from_row(&row)?, now, in_flight_timeout)? {
                return Ok(held);
            }
        }
        let claim = IdempotencyClaim {
            organization_id: org,
            key: key.to_owned(),
            token: Uuid::new_v4(),
        };
        sqlx::query(
            "INSERT OR REPLACE INTO idempotency_keys (organization_id, key, directory_id, state, claim_token, locked_ms, expires_ms, owner) VALUES (?, ?, ?, 'in_flight', ?, ?, ?, ?)",
        )
        .bind(org)
        .bind(key)
        .bind(dir)
        .bind(claim.token)
        .bind(now)
        .bind(now + dur_ms(ttl))
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(KeyState::Claimed(claim))
    }

    async fn release_idempotency_key(&self, claim: &IdempotencyClaim) -> StoreResult<()> {
        sqlx::query(sql::RELEASE_IDEMPOTENCY_KEY)
            .bind(claim.organization_id)
            .bind(&claim.key)
            .bind(claim.token)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn commit_upload(&self, upload: NewUpload) -> StoreResult<(Source, Vec<ChunkRef>)> {
        let sync_prepared = prepare(upload.sync_results)?;
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let s = &upload.source;
        let chunk_count = upload.chunks.len() + usize::from(upload.sync_chunk.is_some());
        sqlx::query(
            "INSERT INTO sources (id, organization_id, directory_id, status, filename, byte_size, sha256, object_key, encoding, delimiter, bom_len, columns, max_field_bytes, default_region, total_rows, chunk_count, created_ms, updated_ms, dry_run)
             VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id)
        .bind(s.organization_id)
        .bind(s.directory_id)
        .bind(&s.filename)
        .bind(s.byte_size as i64)
        .bind(&s.sha256)
        .bind(&s.object_key)
        .bind(s.dialect.encoding.as_str())
        .bind(i64::from(s.dialect.delimiter))
        .bind(s.dialect.bom_len as i64)
        .bind(serde_json::to_string(&s.columns)?)
        .bind(s.max_field_bytes as i64)
        .bind(&s.default_region)
        .bind(s.total_rows as i64)
        .bind(chunk_count as i64)
        .bind(now)
        .bind(now)
        .bind(s.dry_run)
        .execute(&mut *tx)
        .await?;
        let trace = Trace {
            traceparent: upload.traceparent.as_deref(),
            tracestate: upload.tracestate.as_deref(),
        };
        let mut queued = Vec::with_capacity(upload.chunks.len());
        for chunk in &upload.chunks {
            queued.push(ChunkRef {
                source_id: s.id,
                chunk_id: insert_chunk(&mut tx, s.id, chunk, "pending", trace).await?,
                attempt: 0,
                traceparent: upload.traceparent.clone(),
                tracestate: upload.tracestate.clone(),
            });
        }
        let source = load_source(&mut tx, s.id).await?;
        match &upload.sync_chunk {
            Some(chunk) => {
                insert_chunk(&mut tx, s.id, chunk, "done", trace).await?;
                let applied = apply_results(&mut tx, &source, sync_prepared).await?;
                advance_source(&mut tx, s.id, &applied, 1).await?;
            }
            None if chunk_count == 0 => {
                let none = Applied {
                    accepted: 0,
                    failed: 0,
                    warnings: 0,
                };
                advance_source(&mut tx, s.id, &none, 0).await?;
            }
            None => {}
        }
        let source = load_source(&mut tx, s.id).await?;
        if let Some(claim) = &upload.idempotency {
            let receipt = UploadReceipt::of(&source);
            let done = sqlx::query(sql::IDEMPOTENCY_COMPLETED)
                .bind(&source.sha256)
                .bind(source.id)
                .bind(serde_json::to_string(&receipt)?)
                .bind(claim.organization_id)
                .bind(&claim.key)
                .bind(claim.token)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(StoreError::Conflict(
                    "the idempotency key was taken over by another request".into(),
                ));
            }
        }
        tx.commit().await?;
        Ok((source, queued))
    }

    async fn get_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Option<Source>> {
        sqlx::query(sql::SOURCE)
            .bind(org)
            .bind(dir)
            .bind(source)
            .fetch_optional(&self.reader)
            .await?
            .as_ref()
            .map(source_from_row)
            .transpose()
    }

    async fn list_sources(
        &self,
        org: Uuid,
        dir: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Source>> {
        let rows = sqlx::query(sql::SOURCES_PAGE)
            .bind(org)
            .bind(dir)
            .bind(page.after.map_or(i64::MAX, |c| c.0))
            .bind(page_limit(page) + 1)
            .fetch_all(&self.reader)
            .await?;
        let items = rows
            .iter()
            .map(source_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page_limit(page) as usize, |s| {
            Cursor(s.seq, 0)
        }))
    }

    async fn list_issues(
        &self,
        org: Uuid,
        dir: Uuid,
        source: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<RowIssue>> {
        let (after_row, after_id) = page.after.map_or((0, 0), |c| (c.0, c.1));
        let rows = sqlx::query(
            "SELECT i.* FROM row_issues i JOIN sources s ON s.id = i.source_id
             WHERE s.organization_id = ? AND s.directory_id = ? AND i.source_id = ?
               AND (i.row_number > ? OR (i.row_number = ? AND i.id > ?))
             ORDER BY i.row_number, i.id LIMIT ?",
        )
        .bind(org)
        .bind(dir)
        .bind(source)
        .bind(after_row)
        .bind(after_row)
        .bind(after_id)
        .bind(page_limit(page) + 1)
        .fetch_all(&self.reader)
        .await?;
        let items = rows
            .iter()
            .map(|r| {
                let row = IssueRow::from_row(r)?;
                Ok((row.id, RowIssue::from(row)))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        let page = paginate(items, page_limit(page) as usize, |(id, i)| {
            Cursor(i.row_number as i64, *id)
        });
        Ok(Page {
            items: page.items.into_iter().map(|(_, i)| i).collect(),
            next: page.next,
        })
    }

    async fn failed_row_width(&self, source: Uuid) -> StoreResult<usize> {
        let row = sqlx::query("SELECT COALESCE(MAX(json_array_length(fields)), 0) FROM failed_rows WHERE source_id = ?")
            .bind(source)
            .fetch_one(&self.reader)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as usize)
    }

    async fn failed_rows(
        &self,
        source: Uuid,
        after_row: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredFailedRow>> {
        let rows = sqlx::query(sql::FAILED_ROWS_PAGE)
            .bind(source)
            .bind(after_row as i64)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| FailedRowRow::from_row(r)?.try_into())
            .collect()
    }

    async fn list_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        email: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Profile>> {
        let after = page.after.map_or(0, |c| c.0);
        let rows = match email {
            Some(email) => {
                sqlx::query(
                    "SELECT p.* FROM profiles p JOIN profile_identities i ON i.profile_id = p.id
                     WHERE p.organization_id = ? AND p.directory_id = ? AND i.directory_id = p.directory_id
                       AND i.kind = 'email' AND i.value = ? AND p.seq > ? ORDER BY p.seq LIMIT ?",
                )
                .bind(org)
                .bind(dir)
                .bind(email)
                .bind(after)
                .bind(page_limit(page) + 1)
                .fetch_all(&self.reader)
                .await?
            }
            None => {
                sqlx::query(
                    "SELECT * FROM profiles WHERE organization_id = ? AND directory_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                )
                .bind(org)
                .bind(dir)
                .bind(after)
                .bind(page_limit(page) + 1)
                .fetch_all(&self.reader)
                .await?
            }
        };
        let items = rows
            .iter()
            .map(profile_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        let page = paginate(items, page_limit(page) as usize, |(seq, _)| Cursor(*seq, 0));
        let ids: Vec<Uuid> = page.items.iter().map(|(_, p)| p.id).collect();
        let mut identities = identities_of(&self.reader, &ids).await?;
        Ok(Page {
            items: page
                .items
                .into_iter()
                .map(|(_, mut p)| {
                    p.identities = identities.remove(&p.id).unwrap_or_default();
                    p
                })
                .collect(),
            next: page.next,
        })
    }

    async fn get_profile(
        &self,
        org: Uuid,
        dir: Uuid,
        profile: Uuid,
    ) -> StoreResult<Option<Profile>> {
        let row = sqlx::query(
            "SELECT * FROM profiles WHERE organization_id = ? AND directory_id = ? AND id = ?",
        )
        .bind(org)
        .bind(dir)
        .bind(profile)
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let (_, mut p) = profile_from_row(&row)?;
        p.identities = identities_of(&self.reader, &[p.id])
            .await?
            .remove(&p.id)
            .unwrap_or_default();
        Ok(Some(p))
    }

    async fn claim_chunk(
        &self,
        chunk: Uuid,
        owner: &str,
        lease_for: Duration,
        max_attempts: u32,
    ) -> StoreResult<Claim> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let row = sqlx::query(
            "SELECT c.*, s.status AS source_status, COALESCE(p.expires_ms < ?2, 0) AS owner_dead
             FROM chunks c JOIN sources s ON s.id = c.source_id
             LEFT JOIN processes p ON p.owner = c.lease_owner
             WHERE c.id = ?1",
        )
        .bind(chunk)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(Claim::Nothing);
        };
        let source_id: Uuid = row.try_get("source_id")?;
        let found = ChunkState::from_row(&row)?;
        let attempts = found.attempts;
        match decide_claim(&found, now, max_attempts) {
            ClaimDecision::Nothing => return Ok(Claim::Nothing),
            ClaimDecision::Busy => return Ok(Claim::Busy),
            ClaimDecision::Poison(message) => {
                fail_source_in(&mut tx, source_id, "chunk_poisoned", &message).await?;
                tx.commit().await?;
                return Ok(Claim::Poisoned);
            }
            ClaimDecision::Take(over) => {
                if let Some(reason) = over {
                    METRICS.leases_taken_over.with_label_values(&[reason]).inc();
                }
            }
        }
        let token = Uuid::new_v4();
        sqlx::query(sql::TAKE_LEASE)
            .bind(owner)
            .bind(token)
            .bind(now + dur_ms(lease_for))
            .bind(chunk)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql::SOURCE_PROCESSING)
            .bind(now)
            .bind(source_id)
            .execute(&mut *tx)
            .await?;
        let spec = chunk_from_row(&row)?;
        let source = load_source(&mut tx, source_id).await?;
        tx.commit().await?;
        Ok(Claim::Claimed(Box::new(ChunkWork {
            lease: Lease {
                chunk_id: chunk,
                source_id,
                token,
                attempt: attempts + 1,
            },
            chunk: spec,
            source,
        })))
    }

    async fn renew_lease(&self, lease: &Lease, lease_for: Duration) -> StoreResult<bool> {
        let done = sqlx::query(sql::RENEW_LEASE)
            .bind(now_ms() + dur_ms(lease_for))
            .bind(lease.chunk_id)
            .bind(lease.token)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn commit_slice(
        &self,
        lease: &Lease,
        results: ChunkResults,
        end: SliceEnd,
    ) -> StoreResult<Committed> {
        // Outside the transaction: only resolution needs to see the directory.
        let prepared = prepare(results)?;
        let mut tx = self.writer.begin().await?;
        let held = sqlx::query(
            "SELECT 1 FROM chunks c JOIN sources s ON s.id = c.source_id
             WHERE c.id = ? AND c.lease_token = ? AND c.state = 'running' AND s.status IN ('pending', 'processing')",
        )
        .bind(lease.chunk_id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?;
        if held.is_none() {
            return Ok(Committed::LeaseLost);
        }
        let source = load_source(&mut tx, lease.source_id).await?;
        let applied = apply_results(&mut tx, &source, prepared).await?;
        let chunks_done = match end {
            SliceEnd::Chunk => {
                sqlx::query(CHUNK_DONE)
                    .bind(lease.chunk_id)
                    .execute(&mut *tx)
                    .await?;
                1
            }
            SliceEnd::Before(next) => {
                sqlx::query(CHUNK_RESUMES_AT)
                    .bind(next.offset as i64)
                    .bind(next.line as i64)
                    .bind(next.row as i64)
                    .bind(lease.chunk_id)
                    .execute(&mut *tx)
                    .await?;
                0
            }
        };
        let completed = advance_source(&mut tx, source.id, &applied, chunks_done).await?;
        tx.commit().await?;
        Ok(Committed::Done {
            source_completed: completed,
        })
    }

    async fn release_chunk(
        &self,
        lease: &Lease,
        error: &str,
        transient_for: Option<Duration>,
    ) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT transient_since_ms FROM chunks WHERE id = ? AND lease_token = ? AND state = 'running'",
        )
        .bind(lease.chunk_id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(false);
        };
        let release = decide_release(
            now_ms(),
            lease.attempt,
            transient_for,
            row.try_get("transient_since_ms")?,
        );
        sqlx::query(sql::RELEASE_CHUNK)
            .bind(release.not_before_ms)
            .bind(error)
            .bind(i64::from(release.refund))
            .bind(release.transient_since_ms)
            .bind(lease.chunk_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn retry_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Retried> {
        let mut tx = self.writer.begin().await?;
        let Some(row) = sqlx::query(sql::SOURCE)
            .bind(org)
            .bind(dir)
            .bind(source)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Retried::NotFound);
        };
        let found = source_from_row(&row)?;
        if found.status != SourceStatus::Failed {
            return Ok(Retried::NotFailed(found));
        }
        let chunks = sqlx::query(
            "UPDATE chunks SET state = 'pending', attempts = 0, lease_owner = NULL, lease_token = NULL, lease_expires_ms = NULL,
                 queued_ms = NULL, not_before_ms = 0, last_error = NULL, transient_since_ms = NULL
             WHERE source_id = ?1 AND state = 'failed'
             RETURNING id, traceparent, tracestate",
        )
        .bind(source)
        .fetch_all(&mut *tx)
        .await?;
        if chunks.is_empty() {
            return Ok(Retried::NothingToRetry(found));
        }
        sqlx::query(
            "UPDATE sources SET status = 'processing', error_code = NULL, error_message = NULL, completed_ms = NULL, updated_ms = ?2
             WHERE id = ?1",
        )
        .bind(source)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let retried = load_source(&mut tx, source).await?;
        tx.commit().await?;
        let refs = chunks
            .iter()
            .map(|row| {
                Ok(ChunkRef {
                    source_id: source,
                    chunk_id: row.try_get("id")?,
                    attempt: 0,
                    traceparent: row.try_get("traceparent")?,
                    tracestate: row.try_get("tracestate")?,
                })
            })
            .collect::<StoreResult<_>>()?;
        Ok(Retried::Reopened(retried, refs))
    }

    async fn cancel_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Cancelled> {
        // One writer at a time: no commit can interleave with this transaction.
        let mut tx = self.writer.begin().await?;
        let Some(row) = sqlx::query(sql::SOURCE)
            .bind(org)
            .bind(dir)
            .bind(source)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Cancelled::NotFound);
        };
        let found = source_from_row(&row)?;
        if found.status.is_terminal() {
            return Ok(Cancelled::Terminal(found));
        }
        fail_source_in(
            &mut tx,
            source,
            CANCELLED,
            "the import was cancelled on request; rows committed before the cancel stay",
        )
        .await?;
        let cancelled = load_source(&mut tx, source).await?;
        tx.commit().await?;
        Ok(Cancelled::Cancelled(cancelled))
    }

    async fn fail_source(&self, source: Uuid, error: SourceError) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        fail_source_in(&mut tx, source, &error.code, &error.message).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn chunks_to_publish(
        &self,
        requeue_after: Duration,
        limit: u32,
    ) -> StoreResult<Vec<ChunkRef>> {
        let mut tx = self.writer.begin().await?;
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT c.id, c.source_id, c.attempts, c.traceparent, c.tracestate FROM chunks c JOIN sources s ON s.id = c.source_id
             LEFT JOIN processes p ON p.owner = c.lease_owner
             WHERE s.status IN ('pending', 'processing') AND (
                 (c.state = 'pending' AND c.not_before_ms <= ?1 AND (c.queued_ms IS NULL OR c.queued_ms < ?2))
              OR (c.state = 'running' AND (c.lease_expires_ms < ?1 OR p.expires_ms < ?1)))
             ORDER BY s.seq, c.idx LIMIT ?3",
        )
        .bind(now)
        .bind(now - dur_ms(requeue_after))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        let mut refs = Vec::with_capacity(rows.len());
        for row in rows {
            let chunk_id: Uuid = row.try_get("id")?;
            sqlx::query("UPDATE chunks SET queued_ms = ? WHERE id = ?")
                .bind(now)
                .bind(chunk_id)
                .execute(&mut *tx)
                .await?;
            refs.push(ChunkRef {
                source_id: row.try_get("source_id")?,
                chunk_id,
                attempt: row.try_get::<i64, _>("attempts")? as u32,
                traceparent: row.try_get("traceparent")?,
                tracestate: row.try_get("tracestate")?,
            });
        }
        sqlx::query(sql::FORGET_DEAD_PROCESSES)
            .bind(now - FORGET_PROCESSES_AFTER_MS)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(refs)
    }

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

    async fn forget_queued(&self) -> StoreResult<u64> {
        let done = sqlx::query(sql::FORGET_QUEUED)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn mark_unpublished(&self, chunks: &[Uuid]) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        for chunk in chunks {
            sqlx::query("UPDATE chunks SET queued_ms = NULL WHERE id = ? AND state = 'pending'")
                .bind(chunk)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_webhook(&self, endpoint: &WebhookEndpoint) -> StoreResult<()> {
        sqlite_webhooks::create(&self.writer, endpoint).await
    }

    async fn list_webhooks(&self, org: Uuid) -> StoreResult<Vec<WebhookEndpoint>> {
        sqlite_webhooks::list(&self.reader, org).await
    }

    async fn get_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        sqlite_webhooks::get(&self.reader, org, id).await
    }

    async fn delete_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<bool> {
        sqlite_webhooks::delete(&self.writer, org, id).await
    }

    async fn enable_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        sqlite_webhooks::enable(&self.writer, org, id).await
    }

    async fn list_deliveries(
        &self,
        org: Uuid,
        endpoint: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        sqlite_webhooks::deliveries(&self.reader, org, endpoint, limit).await
    }

    async fn claim_deliveries(
        &self,
        lease_for: Duration,
        limit: u32,
    ) -> StoreResult<Vec<DueDelivery>> {
        sqlite_webhooks::claim(&self.reader, &self.writer, lease_for, limit).await
    }

    async fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: &DeliveryAttempt,
        next: AttemptNext,
        disable_after: u32,
    ) -> StoreResult<()> {
        sqlite_webhooks::record(&self.writer, delivery, attempt, next, disable_after).await
    }

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
