//! The distributed store: PostgreSQL.
//!
//! Chunks of one directory commit concurrently. A commit resolves its rows optimistically
//! against a lock-free read of the directory, then, in its one transaction fenced by the
//! chunk's lease: claims the identities it found free, at their hashed keys in ascending order
//! (one `COPY` in a savepoint; `INSERT … ON CONFLICT DO NOTHING` after a lost race: the primary
//! key arbitrates, and makes it wait for a concurrent claim of the same key), reads the owners
//! of the keys it lost, locks the existing profiles it merges into in id order, and resolves
//! again only if something changed under it. Locks are always taken in one order (chunk,
//! identity keys ascending, profiles ascending, source), so commits do not deadlock;
//! deadlocks, serialization failures, lock timeouts and a briefly unreachable database are
//! retried anyway (`Retry`), without counting an attempt of the chunk.
//!
//! How identities and profiles are laid out (hashed keys with open addressing, typed profile
//! columns) is `pg_layout`; the statements SQLite runs too are `sql`. New profiles, records
//! and identities go in with binary `COPY` (`pg_copy`), failed rows with text `COPY`, row
//! issues through a staging table, since completion may flag one twice. Lookups take arrays,
//! so a chunk costs a handful of round trips whatever its size. docs/performance.md measures
//! where a commit's time goes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Executor, FromRow, PgConnection, PgPool, Row};
use uuid::Uuid;

use super::pg_copy::BinaryRows;
use super::pg_layout::{
    field_names, identities_text, kind_number, profile_columns, profile_from_row, KeySpace,
    ProfileColumns,
};
use super::rows::*;
use super::sql;
use super::writes::{
    identity_lookups, owners_to_load, prepare, resolve, Prepared, Resolution, Trace,
};
use super::{pg_webhooks, Store, StoreError, StoreResult};
use crate::config::DatabaseSettings;
use crate::domain::resolve::{self, Existing, IdentityMap, Owners, ProfileState};
use crate::domain::row;
use crate::domain::row::FieldName;
use crate::metrics::METRICS;
use crate::model::*;
use crate::views::{SOURCE_COMPLETED, SOURCE_FAILED};

pub use super::pg_layout::identity_key;

pub struct PgStore {
    pool: PgPool,
    retry_for: Duration,
    pause: CommitPause,
    keys: KeySpace,
    reads: OwnerReads,
}

impl PgStore {
    pub async fn open(settings: &DatabaseSettings) -> StoreResult<Self> {
        let options: PgConnectOptions = settings.url.parse()?;
        // A commit waits on another only while that one writes; a frozen process must not hold
        // its claims for longer than these (docs/concurrency.md).
        let options = options.options([
            ("lock_timeout", pg_duration(settings.lock_timeout)),
            (
                "idle_in_transaction_session_timeout",
                pg_duration(settings.idle_in_transaction_timeout),
            ),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        Ok(PgStore {
            pool,
            retry_for: settings.retry_for,
            pause: CommitPause::default(),
            keys: KeySpace::FULL,
            reads: OwnerReads::default(),
        })
    }

    /// Overrides when commits read their identities' owners before claiming them: the split
    /// detector runs each way.
    #[cfg(feature = "testing")]
    pub fn read_owners(&self, when: ReadOwners) {
        self.reads.when.store(when as u8, Ordering::Relaxed);
    }

    /// Makes every commit pause for `pause()` between claiming its identities and committing:
    /// the split detector's way of widening the window in which commits race.
    #[cfg(feature = "testing")]
    pub fn pause_commits(&mut self, pause: impl Fn() -> Duration + Send + Sync + 'static) {
        self.pause.pause = Some(Arc::new(pause));
    }

    /// Keeps only the low `bits` of every identity's hash, so that distinct identities collide
    /// all the time: how the tests show that a collision never merges two people.
    #[cfg(feature = "testing")]
    pub fn mask_identity_keys(&mut self, bits: u32) {
        self.keys = KeySpace::masked(bits);
    }

    /// Calls `seen(chunk)` inside each commit of a chunk once it holds its source's row lock,
    /// which it keeps until it commits: the calls come in the commit order of the chunks of one
    /// source (a try that then fails is followed by another call for the same chunk).
    #[cfg(feature = "testing")]
    pub fn observe_commits(&mut self, seen: impl Fn(Uuid) + Send + Sync + 'static) {
        self.pause.observe = Some(Arc::new(seen));
    }
}

/// When a commit reads the current owners of its identities before it claims them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReadOwners {
    /// When the directory's last commit in this process found any of its identities owned
    /// already; otherwise the commit claims blind (docs/concurrency.md, "Blind claims").
    Adaptive,
    Always,
    Never,
}

/// The directories whose last commit in this process found some of its identities owned:
/// their next commit reads owners first. A commit into any other directory claims blind,
/// which for new contacts saves a primary-key probe per identity and a round trip, and costs
/// a refused `COPY` when it guessed wrong (that commit then takes the lost-race path).
struct OwnerReads {
    when: AtomicU8,
    owned_last: Mutex<HashSet<Uuid>>,
}

impl Default for OwnerReads {
    fn default() -> Self {
        OwnerReads {
            when: AtomicU8::new(ReadOwners::Adaptive as u8),
            owned_last: Mutex::default(),
        }
    }
}

impl OwnerReads {
    /// Enough directories for every busy one of a process; past it the set starts over, and
    /// each directory costs at most one wrong guess.
    const REMEMBERED: usize = 10_000;

    fn before_commit(&self, directory: Uuid) -> bool {
        match self.when.load(Ordering::Relaxed) {
            w if w == ReadOwners::Always as u8 => true,
            w if w == ReadOwners::Never as u8 => false,
            _ => self.owned_last.lock().unwrap().contains(&directory),
        }
    }

    fn after_commit(&self, directory: Uuid, owned: u64) {
        let mut last = self.owned_last.lock().unwrap();
        if owned == 0 {
            last.remove(&directory);
        } else {
            if last.len() >= Self::REMEMBERED {
                last.clear();
            }
            last.insert(directory);
        }
    }
}

/// The parts of an upload one try of its transaction reads.
struct UploadParts<'a> {
    source: &'a NewSource,
    seq: i64,
    sync_chunk: Option<&'a ChunkSpec>,
    chunks: &'a [ChunkSpec],
    idempotency: Option<&'a IdempotencyClaim>,
    trace: Trace<'a>,
}

impl PgStore {
    /// Runs `once` until it succeeds or fails in a way [`Retry`] does not retry.
    async fn retrying<'a, T>(
        &'a self,
        mut once: impl FnMut() -> futures::future::BoxFuture<'a, StoreResult<T>>,
    ) -> StoreResult<T> {
        let mut retry = Retry::new(self.retry_for);
        loop {
            match once().await {
                Err(e) => retry.after(e).await?,
                done => return done,
            }
        }
    }

    async fn claim_chunk_once(
        &self,
        chunk: Uuid,
        owner: &str,
        lease_for: Duration,
        max_attempts: u32,
    ) -> StoreResult<Claim> {
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let row = sqlx::query(&format!(
            "SELECT c.*, s.status AS source_status, {OWNER_DEAD} AS owner_dead
             FROM chunks c JOIN sources s ON s.id = c.source_id
             LEFT JOIN processes p ON p.owner = c.lease_owner
             WHERE c.id = $1 FOR UPDATE OF c"
        ))
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
        let spec: ChunkSpec = ChunkRow::from_row(&row)?.into();
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

    async fn release_chunk_once(
        &self,
        lease: &Lease,
        error: &str,
        transient_for: Option<Duration>,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT transient_since_ms FROM chunks WHERE id = $1 AND lease_token = $2 AND state = 'running' FOR UPDATE",
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

    async fn retry_source_once(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Retried> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(
            "SELECT * FROM sources WHERE organization_id = $1 AND directory_id = $2 AND id = $3 FOR UPDATE",
        )
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
             WHERE source_id = $1 AND state = 'failed'
             RETURNING id, traceparent, tracestate",
        )
        .bind(source)
        .fetch_all(&mut *tx)
        .await?;
        if chunks.is_empty() {
            return Ok(Retried::NothingToRetry(found));
        }
        sqlx::query(
            "UPDATE sources SET status = 'processing', error_code = NULL, error_message = NULL, completed_ms = NULL, updated_ms = $2
             WHERE id = $1",
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

    async fn cancel_source_once(
        &self,
        org: Uuid,
        dir: Uuid,
        source: Uuid,
    ) -> StoreResult<Cancelled> {
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query(
            "SELECT id FROM sources WHERE organization_id = $1 AND directory_id = $2 AND id = $3",
        )
        .bind(org)
        .bind(dir)
        .bind(source)
        .fetch_optional(&mut *tx)
        .await?;
        if found.is_none() {
            return Ok(Cancelled::NotFound);
        }
        // Locks in the order every commit takes them, chunk before source (a commit locks its
        // chunk, then updates the source): a commit in flight finishes first, and counts; any
        // later one finds its chunk failed.
        sqlx::query(
            "SELECT id FROM chunks WHERE source_id = $1 AND state IN ('pending', 'running') ORDER BY id FOR UPDATE",
        )
        .bind(source)
        .fetch_all(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT * FROM sources WHERE id = $1 FOR UPDATE")
            .bind(source)
            .fetch_one(&mut *tx)
            .await?;
        let current = source_from_row(&row)?;
        if current.status.is_terminal() {
            return Ok(Cancelled::Terminal(current));
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

    async fn fail_source_once(&self, source: Uuid, error: &SourceError) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        fail_source_in(&mut tx, source, &error.code, &error.message).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn try_commit_upload(
        &self,
        upload: &UploadParts<'_>,
        prepared: &mut Prepared,
    ) -> StoreResult<(Source, Vec<ChunkRef>)> {
        let s = upload.source;
        let target = Target {
            source: s.id,
            directory: s.directory_id,
            seq: upload.seq,
            keys: self.keys,
            dry_run: s.dry_run,
        };
        let optimistic = match upload.sync_chunk {
            Some(_) => {
                let read = self.reads.before_commit(target.directory);
                Some(resolve_optimistically(&self.pool, &target, prepared, read).await?)
            }
            None => None,
        };
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let chunk_count = upload.chunks.len() + usize::from(upload.sync_chunk.is_some());
        sqlx::query(
            "INSERT INTO sources (id, seq, organization_id, directory_id, status, filename, byte_size, sha256, object_key, encoding, delimiter, bom_len, columns, max_field_bytes, default_region, total_rows, chunk_count, created_ms, updated_ms, dry_run, owned_identities)
             VALUES ($1, $17, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $16, $18, 0)",
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
        .bind(upload.seq)
        .bind(s.dry_run)
        .execute(&mut *tx)
        .await?;
        let mut queued = Vec::with_capacity(upload.chunks.len());
        for chunk in upload.chunks {
            queued.push(ChunkRef {
                source_id: s.id,
                chunk_id: insert_chunk(&mut tx, s.id, chunk, "pending", upload.trace).await?,
                attempt: 0,
                traceparent: upload.trace.traceparent.map(str::to_owned),
                tracestate: upload.trace.tracestate.map(str::to_owned),
            });
        }
        match (upload.sync_chunk, optimistic) {
            (Some(chunk), Some(optimistic)) => {
                insert_chunk(&mut tx, s.id, chunk, "done", upload.trace).await?;
                let (applied, owned) =
                    apply_results(&mut tx, &target, prepared, optimistic, &self.pause).await?;
                self.reads.after_commit(target.directory, owned);
                advance_source(&mut tx, s.id, &applied, owned, 1).await?;
            }
            _ if chunk_count == 0 => {
                let none = Applied {
                    accepted: 0,
                    failed: 0,
                    warnings: 0,
                };
                advance_source(&mut tx, s.id, &none, 0, 0).await?;
            }
            _ => {}
        }
        let source = load_source(&mut tx, s.id).await?;
        if let Some(claim) = upload.idempotency {
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

    async fn try_commit_slice(
        &self,
        lease: &Lease,
        prepared: &mut Prepared,
        end: SliceEnd,
    ) -> StoreResult<Committed> {
        let target = &Target::of(
            &load_source(&mut *self.pool.acquire().await?, lease.source_id).await?,
            self.keys,
        );
        let read = self.reads.before_commit(target.directory);
        let optimistic = resolve_optimistically(&self.pool, target, prepared, read).await?;
        let mut tx = self.pool.begin().await?;
        // The row lock fences a concurrent takeover: whoever holds it decides.
        let held = sqlx::query(
            "SELECT 1 FROM chunks c JOIN sources s ON s.id = c.source_id
             WHERE c.id = $1 AND c.lease_token = $2 AND c.state = 'running' AND s.status IN ('pending', 'processing')
             FOR UPDATE OF c",
        )
        .bind(lease.chunk_id)
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?;
        if held.is_none() {
            return Ok(Committed::LeaseLost);
        }
        let (applied, owned) =
            apply_results(&mut tx, target, prepared, optimistic, &self.pause).await?;
        self.reads.after_commit(target.directory, owned);
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
        let completed =
            advance_source(&mut tx, target.source, &applied, owned, chunks_done).await?;
        self.pause.committing(lease.chunk_id);
        tx.commit().await?;
        Ok(Committed::Done {
            source_completed: completed,
        })
    }
}

/// Whether the lease owner `p` (a `processes` row joined on `lease_owner`) is gone, given the
/// time `$2`: its heartbeat expired, and the server has been up for at least one heartbeat
/// window since it started, so that a database restart does not make every worker look dead
/// before it had a chance to heartbeat again.
const OWNER_DEAD: &str = "COALESCE(p.expires_ms < $2
    AND $2 - (EXTRACT(EPOCH FROM pg_postmaster_start_time()) * 1000)::BIGINT > p.expires_ms - p.heartbeat_ms, FALSE)";

fn pg_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Test hooks of the commit path; both empty outside the split detector.
#[derive(Default, Clone)]
struct CommitPause {
    #[allow(clippy::type_complexity)]
    pause: Option<Arc<dyn Fn() -> Duration + Send + Sync>>,
    #[allow(clippy::type_complexity)]
    observe: Option<Arc<dyn Fn(Uuid) + Send + Sync>>,
}

impl CommitPause {
    async fn wait(&self) {
        if let Some(pause) = &self.pause {
            tokio::time::sleep(pause()).await;
        }
    }

    fn committing(&self, chunk: Uuid) {
        if let Some(observe) = &self.observe {
            observe(chunk);
        }
    }
}

/// Runs a transaction again after errors that say nothing about its data: a lost race
/// (deadlock, serialization failure, lock timeout) at once with a short jittered backoff, and
/// a database that cannot be reached (a restart, a failover) with a longer one, for at most
/// `retry_for` in all. Any other error is returned as it is.
struct Retry {
    deadline: Instant,
    tries: u32,
}

impl Retry {
    fn new(retry_for: Duration) -> Self {
        Retry {
            deadline: Instant::now() + retry_for,
            tries: 0,
        }
    }

    /// Waits before the next try, or gives `error` back when it is not worth one.
    async fn after(&mut self, error: StoreError) -> StoreResult<()> {
        let (reason, ceiling_ms) = if error.is_conflict() {
            ("conflict", 1_000u64)
        } else if error.is_transient() {
            ("unavailable", 5_000)
        } else {
            return Err(error);
        };
        if Instant::now() >= self.deadline {
            return Err(error);
        }
        self.tries += 1;
        METRICS.commit_retries.with_label_values(&[reason]).inc();
        let ceiling = (20u64 << self.tries.min(10)).min(ceiling_ms);
        let wait = Duration::from_millis(rand::rng().random_range(ceiling / 2..=ceiling));
        tracing::debug!(reason, tries = self.tries, error = %error, ?wait, "retrying a transaction");
        tokio::time::sleep(wait.min(self.deadline.saturating_duration_since(Instant::now()))).await;
        Ok(())
    }
}

fn source_from_row(row: &PgRow) -> StoreResult<Source> {
    SourceRow::from_row(row)?.try_into()
}

async fn load_source(conn: &mut PgConnection, id: Uuid) -> StoreResult<Source> {
    let row = sqlx::query(sql::SOURCE_BY_ID)
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    source_from_row(&row)
}

/// Appends one row in COPY's text format: tab-separated, `\N` for NULL, backslash escapes.
fn copy_row(buf: &mut Vec<u8>, fields: &[Option<&str>]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            buf.push(b'\t');
        }
        match field {
            None => buf.extend_from_slice(b"\\N"),
            // Most values need no escaping: copy them whole.
            Some(text)
                if !text
                    .bytes()
                    .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) =>
            {
                buf.extend_from_slice(text.as_bytes())
            }
            Some(text) => {
                for &b in text.as_bytes() {
                    match b {
                        b'\\' => buf.extend_from_slice(b"\\\\"),
                        b'\t' => buf.extend_from_slice(b"\\t"),
                        b'\n' => buf.extend_from_slice(b"\\n"),
                        b'\r' => buf.extend_from_slice(b"\\r"),
                        _ => buf.push(b),
                    }
                }
            }
        }
    }
    buf.push(b'\n');
}

async fn copy_in(conn: &mut PgConnection, statement: &str, data: Vec<u8>) -> StoreResult<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(data).await?;
    copy.finish().await?;
    Ok(())
}

/// Row issues are staged: the pass that completes a source may flag an issue a chunk already
/// recorded, and `ON CONFLICT DO NOTHING` keeps one. The table lives per connection and empties
/// itself at commit.
const STAGE_ISSUES: &str = "CREATE TEMP TABLE IF NOT EXISTS stage_issues (
    source_id UUID, row_number BIGINT, line_number BIGINT, severity TEXT, code TEXT,
    column_name TEXT, message TEXT, value TEXT) ON COMMIT DELETE ROWS";

/// Inserts row issues given as COPY text rows, skipping any already recorded.
async fn insert_issues(conn: &mut PgConnection, rows: Vec<u8>) -> StoreResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    conn.execute(STAGE_ISSUES).await?;
    copy_in(
        conn,
        "COPY stage_issues (source_id, row_number, line_number, severity, code, column_name, message, value) FROM STDIN",
        rows,
    )
    .await?;
    // DELETE, not TRUNCATE: a truncate swaps the table's files, which cost more than the
    // handful of rows here, and the table may be used again before the commit.
    conn.execute(
        "INSERT INTO row_issues (source_id, row_number, line_number, severity, code, column_name, message, value)
           SELECT * FROM stage_issues ORDER BY row_number ON CONFLICT DO NOTHING;
         DELETE FROM stage_issues;",
    )
    .await?;
    Ok(())
}

fn issue_row(
    buf: &mut Vec<u8>,
    source: &str,
    row_number: i64,
    line_number: i64,
    issue: &row::Issue,
) {
    copy_row(
        buf,
        &[
            Some(source),
            Some(&row_number.to_string()),
            Some(&line_number.to_string()),
            Some(issue.code.severity().as_str()),
            Some(issue.code.as_str()),
            Some(issue.column.as_deref().unwrap_or("")),
            Some(&issue.message),
            issue.value.as_deref(),
        ],
    );
}

/// What a commit writes into: the source its rows belong to. `seq` versions every profile
/// write of the source.
struct Target {
    source: Uuid,
    directory: Uuid,
    seq: i64,
    keys: KeySpace,
    /// A dry run's commits write only what validation found: see [`apply_results`].
    dry_run: bool,
}

impl Target {
    fn of(source: &Source, keys: KeySpace) -> Self {
        Target {
            source: source.id,
            directory: source.directory_id,
            seq: source.seq,
            keys,
            dry_run: source.dry_run,
        }
    }
}

/// An identity of a chunk: (kind, value).
type Identity = (FieldName, String);

/// The key each of a chunk's identities sits at, or would go to if claimed now.
type Slots = IdentityMap<i64>;

/// A probe longer than this means the key space is full, which only a test's tiny masked
/// space can be (64 bits hold far more identities than any table).
const MAX_PROBE_ROUNDS: usize = 1024;

/// The identities stored at `keys`, each probed by primary key, whatever the statistics say:
/// a plain join let the planner, estimating a young table from stale statistics, hash-join
/// against the whole table, which made each chunk slower than the one before it. The
/// `LIMIT 1` keeps the lateral subquery from being flattened into such a join.
async fn stored_at(
    conn: &mut PgConnection,
    keys: &[i64],
) -> StoreResult<HashMap<i64, StoredIdentity>> {
    let rows = sqlx::query(
        "SELECT u.key, i.directory_id, i.kind, i.value, i.profile_id FROM UNNEST($1::int8[]) AS u(key)
         CROSS JOIN LATERAL (SELECT directory_id, kind, value, profile_id FROM identities
             WHERE key = u.key LIMIT 1) i",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("key")?,
                StoredIdentity {
                    directory: row.try_get("directory_id")?,
                    kind: row.try_get("kind")?,
                    value: row.try_get("value")?,
                    profile: row.try_get("profile_id")?,
                },
            ))
        })
        .collect()
}

/// A row of `identities`, as read at some key.
struct StoredIdentity {
    directory: Uuid,
    kind: i16,
    value: String,
    profile: Uuid,
}

impl StoredIdentity {
    /// Whether this row is the identity looked for, not another one that collided with it.
    fn is(&self, directory: Uuid, kind: &str, value: &str) -> bool {
        self.directory == directory
            && kind_number(kind).ok() == Some(self.kind)
            && self.value == value
    }
}

/// Follows each identity's probe sequence from its home key to the key that holds it (its
/// owner is that row's profile) or to the first free key (where a claim would put it). Keys
/// held by other identities are collisions: the probe moves on.
async fn locate(
    conn: &mut PgConnection,
    keys: KeySpace,
    directory: Uuid,
    identities: Vec<Identity>,
) -> StoreResult<(Owners, Slots)> {
    let mut owners = Owners::default();
    let mut slots = Slots::default();
    let mut pending = Vec::with_capacity(identities.len());
    for (kind, value) in identities {
        let home = keys.home(directory, kind_number(kind)?, &value);
        pending.push(((kind, value), home));
    }
    for _ in 0..MAX_PROBE_ROUNDS {
        if pending.is_empty() {
            return Ok((owners, slots));
        }
        let probed: Vec<i64> = pending.iter().map(|(_, key)| *key).collect();
        let found = stored_at(conn, &probed).await?;
        let mut collided = Vec::new();
        for ((kind, value), key) in pending {
            match found.get(&key) {
                Some(stored) if stored.is(directory, kind, &value) => {
                    owners.insert(kind, value.clone(), stored.profile);
                    slots.insert(kind, value, key);
                }
                Some(_) => collided.push(((kind, value), keys.next(key))),
                None => {
                    slots.insert(kind, value, key);
                }
            }
        }
        pending = collided;
    }
    Err(StoreError::Corrupt("the identity key space is full".into()))
}

/// The current owners of a chunk's identities and the state of those owners, read without a
/// lock: what the optimistic resolution works from; and where each identity is or would go.
async fn read_owners(
    conn: &mut PgConnection,
    target: &Target,
    prepared: &Prepared,
) -> StoreResult<(Existing, Slots)> {
    let identities: Vec<Identity> = identity_lookups(prepared)
        .into_iter()
        .flat_map(|(kind, values)| values.into_iter().map(move |v| (kind, v.to_owned())))
        .collect();
    let (owners, slots) = locate(conn, target.keys, target.directory, identities).await?;
    let mut existing = Existing {
        owners,
        ..Existing::default()
    };
    existing.profiles =
        load_profiles(conn, target.directory, &owners_to_load(&existing), false).await?;
    Ok((existing, slots))
}

/// Profile states by id; with `lock`, each row is locked in the order of `ids` (ascending),
/// the one order in which every commit locks profiles.
async fn load_profiles(
    conn: &mut PgConnection,
    directory: Uuid,
    ids: &[Uuid],
    lock: bool,
) -> StoreResult<HashMap<Uuid, ProfileState>> {
    let mut profiles = HashMap::with_capacity(ids.len());
    if ids.is_empty() {
        return Ok(profiles);
    }
    let sql = format!(
        "SELECT p.id, {columns} FROM UNNEST($2::uuid[]) WITH ORDINALITY AS u(id, n)
         CROSS JOIN LATERAL (SELECT * FROM profiles WHERE directory_id = $1 AND id = u.id {lock}) p
         ORDER BY u.n",
        columns = profile_columns(),
        lock = if lock { "FOR UPDATE" } else { "LIMIT 1" },
    );
    for row in sqlx::query(&sql)
        .bind(directory)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?
    {
        profiles.insert(row.try_get("id")?, profile_from_row(&row)?.0);
    }
    Ok(profiles)
}

/// What claiming a chunk's new identities found: the keys this transaction now holds, and the
/// owners of the identities a concurrent commit claimed first.
struct Claimed<'a> {
    /// (kind, value, key), in no particular order; only a re-resolution looks them up.
    won: Vec<(FieldName, &'a str, i64)>,
    lost: Vec<(FieldName, String, Uuid)>,
}

/// Claims identities for their profiles, each at the key its probe found free, in ascending
/// key order. A key another transaction inserted but has not committed makes this one wait for
/// it (the primary key arbitrates). A key refused is then read: if it holds the same identity,
/// a concurrent commit claimed it first and owns it; if another (a collision that arrived in
/// the meantime), the claim moves on to the next key.
async fn claim_identities<'a>(
    conn: &mut PgConnection,
    target: &Target,
    identities: &'a [(FieldName, String, Uuid)],
    slots: &Slots,
) -> StoreResult<Claimed<'a>> {
    let mut claimed = Claimed {
        won: Vec::with_capacity(identities.len()),
        lost: Vec::new(),
    };
    let mut pending = Vec::with_capacity(identities.len());
    for (kind, value, profile) in identities {
        let key = match slots.get(kind, value) {
            Some(key) => key,
            None => target
                .keys
                .home(target.directory, kind_number(kind)?, value),
        };
        pending.push((*kind, value.as_str(), *profile, key));
    }
    pending.sort_unstable_by_key(|p| p.3);
    if claim_all_by_copy(conn, target.directory, &pending).await? {
        claimed.won = pending
            .into_iter()
            .map(|(kind, value, _, key)| (kind, value, key))
            .collect();
        return Ok(claimed);
    }
    for _ in 0..MAX_PROBE_ROUNDS {
        if pending.is_empty() {
            return Ok(claimed);
        }
        pending.sort_unstable_by_key(|p| p.3);
        let mut kinds = Vec::with_capacity(pending.len());
        for (kind, ..) in &pending {
            kinds.push(kind_number(kind)?);
        }
        let values: Vec<&str> = pending.iter().map(|p| p.1).collect();
        let profiles: Vec<Uuid> = pending.iter().map(|p| p.2).collect();
        let keys: Vec<i64> = pending.iter().map(|p| p.3).collect();
        let inserted: HashSet<(i64, i16, String)> = sqlx::query(
            "INSERT INTO identities (key, directory_id, kind, value, profile_id)
             SELECT u.key, $1, u.kind, u.value, u.profile_id
             FROM UNNEST($2::int8[], $3::int2[], $4::text[], $5::uuid[]) AS u(key, kind, value, profile_id)
             ORDER BY u.key
             ON CONFLICT DO NOTHING
             RETURNING key, kind, value",
        )
        .bind(target.directory)
        .bind(&keys)
        .bind(&kinds)
        .bind(&values)
        .bind(&profiles)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("key")?, row.try_get("kind")?, row.try_get("value")?)))
        .collect::<StoreResult<_>>()?;
        let mut refused = Vec::new();
        for (p, kind) in pending.into_iter().zip(kinds) {
            if inserted.contains(&(p.3, kind, p.1.to_owned())) {
                claimed.won.push((p.0, p.1, p.3));
            } else {
                refused.push(p);
            }
        }
        if refused.is_empty() {
            return Ok(claimed);
        }
        let keys: Vec<i64> = refused.iter().map(|p| p.3).collect();
        let found = stored_at(conn, &keys).await?;
        pending = Vec::new();
        for (kind, value, profile, key) in refused {
            match found.get(&key) {
                Some(stored) if stored.is(target.directory, kind, value) => {
                    claimed.lost.push((kind, value.to_owned(), stored.profile));
                }
                Some(_) => pending.push((kind, value, profile, target.keys.next(key))),
                // Whoever held the key rolled back: try it again.
                None => pending.push((kind, value, profile, key)),
            }
        }
    }
    Err(StoreError::Corrupt("the identity key space is full".into()))
}

/// The usual case, every identity still free where the optimistic read found it, in one COPY
/// (rows in ascending key order): a multi-row insert logs about a third of what `INSERT … ON
/// CONFLICT` logs, which writes a speculative insertion and its confirmation per row. If any
/// key was claimed meanwhile, the unique index refuses the COPY (after waiting for the claim's
/// transaction, as `ON CONFLICT` would), the savepoint undoes it, and the caller claims one by
/// one. Returns whether the COPY claimed them all.
async fn claim_all_by_copy(
    conn: &mut PgConnection,
    directory: Uuid,
    pending: &[(&str, &str, Uuid, i64)],
) -> StoreResult<bool> {
    let mut rows = BinaryRows::new();
    for (kind, value, profile, key) in pending {
        rows.row(5)
            .int8(*key)
            .uuid(directory)
            .int2(kind_number(kind)?)
            .text(value)
            .uuid(*profile);
    }
    let Some(data) = rows.finish() else {
        return Ok(true);
    };
    conn.execute("SAVEPOINT claim_by_copy").await?;
    let copied = copy_in(
        conn,
        "COPY identities (key, directory_id, kind, value, profile_id) FROM STDIN (FORMAT binary)",
        data,
    )
    .await;
    match copied {
        Ok(()) => {
            conn.execute("RELEASE SAVEPOINT claim_by_copy").await?;
            Ok(true)
        }
        Err(e) if e.sqlstate().as_deref() == Some("23505") => {
            conn.execute("ROLLBACK TO SAVEPOINT claim_by_copy").await?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Turns the optimistic resolution into the one this transaction commits: claims its
/// identities, learns the owners of the ones a concurrent commit claimed first, locks the
/// existing profiles it merges into, and resolves again if any of that differs from what the
/// lock-free read saw. After it, every identity of the chunk is either held by this
/// transaction or owned by a committed one (identities never change owner), and every profile
/// it reads is locked, so the outcome is the one a serial commit at this point would give.
/// Also returns how many of the chunk's identities were owned already.
async fn settle(
    conn: &mut PgConnection,
    target: &Target,
    prepared: &mut Prepared,
    (mut existing, slots): (Existing, Slots),
    optimistic: Resolution,
    pause: &CommitPause,
) -> StoreResult<(Resolution, u64)> {
    let Claimed { won, lost } =
        claim_identities(conn, target, &optimistic.identities, &slots).await?;
    pause.wait().await;
    let mut stale = !lost.is_empty();
    for (kind, value, owner) in lost {
        existing.owners.insert(kind, value, owner);
    }
    let owned = existing.owners.len() as u64;
    let locked = load_profiles(conn, target.directory, &owners_to_load(&existing), true).await?;
    stale |= locked != existing.profiles;
    if !stale {
        return Ok((optimistic, owned));
    }
    existing.profiles = locked;
    let settled = resolve(prepared, existing, target.seq)?;
    let won: HashMap<(&str, &str), i64> = won
        .into_iter()
        .map(|(kind, value, key)| ((kind, value), key))
        .collect();
    // The settled resolution claims exactly the keys this transaction won: the others have
    // owners now. Rows that create the same profile keep its id (`Prepared` fixes new ids per
    // row), so only the identities whose profile changed are pointed elsewhere.
    if settled.identities.len() != won.len()
        || settled
            .identities
            .iter()
            .any(|(kind, value, _)| !won.contains_key(&(*kind, value.as_str())))
    {
        return Err(StoreError::Corrupt(
            "re-resolution claimed other identities than the transaction holds".into(),
        ));
    }
    let optimistic_owner: HashMap<(&str, &str), Uuid> = optimistic
        .identities
        .iter()
        .map(|(kind, value, profile)| ((*kind, value.as_str()), *profile))
        .collect();
    let (keys, profiles): (Vec<i64>, Vec<Uuid>) = settled
        .identities
        .iter()
        .filter(|(kind, value, profile)| {
            optimistic_owner.get(&(*kind, value.as_str())) != Some(profile)
        })
        .map(|(kind, value, profile)| (won[&(*kind, value.as_str())], *profile))
        .unzip();
    if !keys.is_empty() {
        sqlx::query(
            "UPDATE identities i SET profile_id = u.profile_id
             FROM UNNEST($1::int8[], $2::uuid[]) AS u(key, profile_id)
             WHERE i.key = u.key",
        )
        .bind(&keys)
        .bind(&profiles)
        .execute(&mut *conn)
        .await?;
    }
    Ok((settled, owned))
}

/// The optimistic half of a commit, on a connection of its own before any lock is taken, so
/// that a commit holds its locks only while it writes: the directory's current owners of the
/// chunk's identities, and the resolution they give. Without `read`, it assumes every identity
/// is new and free at its home key; claiming them (`settle`) corrects the guess where it was
/// wrong, exactly as it does after a concurrent commit claimed a key first.
async fn resolve_optimistically(
    pool: &PgPool,
    target: &Target,
    prepared: &mut Prepared,
    read: bool,
) -> StoreResult<((Existing, Slots), Resolution)> {
    let (snapshot, slots) = if read {
        read_owners(&mut *pool.acquire().await?, target, prepared).await?
    } else {
        (Existing::default(), Slots::default())
    };
    let optimistic = resolve(prepared, snapshot.clone(), target.seq)?;
    Ok(((snapshot, slots), optimistic))
}

/// The locked half: settles the resolution and writes it, inside the caller's transaction,
/// which has fenced the chunk (or created the source) already.
async fn apply_results(
    tx: &mut PgConnection,
    target: &Target,
    prepared: &mut Prepared,
    (snapshot, optimistic): ((Existing, Slots), Resolution),
    pause: &CommitPause,
) -> StoreResult<(Applied, u64)> {
    // DRY RUN: the one point where a dry run leaves the write path. It claims no identity and
    // writes no record or profile; it keeps what validation and the lock-free resolution
    // found (counts, warnings, failed rows), as the import would have.
    if target.dry_run {
        // What the lock-free read found (nothing, if the commit claimed blind), so that a dry
        // run does not tell the next commit into a directory of known contacts to claim blind.
        let owned = snapshot.0.owners.len() as u64;
        let applied = write_failed_and_issues(tx, target, prepared, optimistic).await?;
        return Ok((applied, owned));
    }
    let (resolution, owned) = settle(tx, target, prepared, snapshot, optimistic, pause).await?;
    Ok((write_all(tx, target, prepared, resolution).await?, owned))
}

/// Writes the profiles a resolution created (COPY) and changed (one UPDATE, in place), each
/// with the identities it claimed.
async fn write_profiles(
    conn: &mut PgConnection,
    target: &Target,
    resolution: &Resolution,
    now: i64,
) -> StoreResult<()> {
    let mut gained: HashMap<Uuid, Vec<(&str, &str)>> = HashMap::new();
    for (kind, value, profile) in &resolution.identities {
        gained
            .entry(*profile)
            .or_default()
            .push((*kind, value.as_str()));
    }
    // New profiles go straight in with COPY: their ids are new. (Array-bound `INSERT … SELECT
    // FROM UNNEST` measured within 5% of COPY both ways: slower on 10,000-row chunks, faster on
    // 100-row uploads.)
    // directory, id, created, updated, version, a value and a version per field, attributes,
    // identities.
    let width = 7 + 2 * field_names().count() as i16;
    let mut rows = BinaryRows::new();
    for (id, state) in &resolution.created {
        let columns = ProfileColumns::of(state)?;
        let mut identities = gained.remove(id).unwrap_or_default();
        identities.sort_unstable();
        rows.row(width)
            .uuid(target.directory)
            .uuid(*id)
            .int8(now)
            .int8(now)
            .int8_or_null(columns.version);
        for (value, version) in &columns.fields {
            rows.text_or_null(*value).int8_or_null(*version);
        }
        rows.text_or_null(columns.attributes.as_deref())
            .text(&identities_text(identities)?);
    }
    if let Some(data) = rows.finish() {
        let statement = format!(
            "COPY profiles (directory_id, id, {}) FROM STDIN (FORMAT binary)",
            profile_columns()
        );
        copy_in(conn, &statement, data).await?;
    }
    if resolution.updated.is_empty() {
        return Ok(());
    }
    let n = resolution.updated.len();
    let names: Vec<&str> = field_names().collect();
    let mut ids = Vec::with_capacity(n);
    let mut values: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(n); names.len()];
    let mut versions: Vec<Vec<Option<i64>>> = vec![Vec::with_capacity(n); names.len()];
    let mut attributes = Vec::with_capacity(n);
    let mut gains = Vec::with_capacity(n);
    let mut shared = Vec::with_capacity(n);
    for (id, state) in &resolution.updated {
        let columns = ProfileColumns::of(state)?;
        ids.push(*id);
        shared.push(columns.version);
        for (f, (value, version)) in columns.fields.into_iter().enumerate() {
            values[f].push(value);
            versions[f].push(version);
        }
        attributes.push(columns.attributes);
        gains.push(identities_text(gained.remove(id).unwrap_or_default())?);
    }
    // $1 directory, $2 now, $3 ids, $4 attributes, $5 gained identities (lines), $6 shared
    // versions, then a value and a version array per field.
    let mut set = String::from(
        "updated_ms = $2, attributes = u.attributes, version = u.version,
         identities = CASE WHEN u.gained = '' THEN p.identities WHEN p.identities = '' THEN u.gained
                           ELSE p.identities || E'\\n' || u.gained END",
    );
    let mut unnest = String::from("$3::uuid[], $4::text[], $5::text[], $6::int8[]");
    let mut aliases = String::from("id, attributes, gained, version");
    for (f, name) in names.iter().enumerate() {
        set.push_str(&format!(", {name} = u.{name}, {name}_v = u.{name}_v"));
        unnest.push_str(&format!(", ${}::text[], ${}::int8[]", 7 + 2 * f, 8 + 2 * f));
        aliases.push_str(&format!(", {name}, {name}_v"));
    }
    let sql = format!(
        "UPDATE profiles p SET {set} FROM UNNEST({unnest}) AS u({aliases})
         WHERE p.directory_id = $1 AND p.id = u.id"
    );
    let mut query = sqlx::query(&sql)
        .bind(target.directory)
        .bind(now)
        .bind(&ids)
        .bind(&attributes)
        .bind(&gains)
        .bind(&shared);
    for (value, version) in values.iter().zip(&versions) {
        query = query.bind(value).bind(version);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

async fn write_all(
    conn: &mut PgConnection,
    target: &Target,
    prepared: &Prepared,
    resolution: Resolution,
) -> StoreResult<Applied> {
    write_profiles(conn, target, &resolution, now_ms()).await?;
    // Records and failed rows go straight in too. None can exist yet: a chunk commits once,
    // fenced by its lease and its `running` state, and the upload's own rows belong to a new
    // source. Should that ever fail, the primary keys refuse the second copy loudly.
    let mut rows = BinaryRows::new();
    for ((r, draft), profile) in prepared
        .records
        .iter()
        .zip(&prepared.accepted)
        .zip(&resolution.profile_of)
    {
        let identity = |kind| draft.fields.get(kind).map(String::as_str);
        rows.row(7)
            .uuid(target.source)
            .int8(r.row_number)
            .int8(r.line_number)
            .uuid(*profile)
            .text_or_null(identity("email"))
            .text_or_null(identity("linkedin_url"))
            .text_or_null(identity("phone"));
    }
    if let Some(data) = rows.finish() {
        copy_in(
            conn,
            "COPY records (source_id, row_number, line_number, profile_id, email, linkedin_url, phone) FROM STDIN (FORMAT binary)",
            data,
        )
        .await?;
    }
    write_failed_and_issues(conn, target, prepared, resolution).await
}

/// What every commit writes, a dry run's too: the failed rows and the row issues.
async fn write_failed_and_issues(
    conn: &mut PgConnection,
    target: &Target,
    prepared: &Prepared,
    resolution: Resolution,
) -> StoreResult<Applied> {
    let source_id = target.source.to_string();
    let mut buf = Vec::new();
    for f in &prepared.failed {
        copy_row(
            &mut buf,
            &[
                Some(&source_id),
                Some(&f.row_number.to_string()),
                Some(&f.line_number.to_string()),
                Some(&f.fields),
                Some(f.error_code),
                Some(&f.error_message),
            ],
        );
    }
    copy_in(
        conn,
        "COPY failed_rows (source_id, row_number, line_number, fields, error_code, error_message) FROM STDIN",
        buf,
    )
    .await?;
    let mut buf = Vec::new();
    for i in resolution.warnings.iter().chain(&prepared.failed_issues) {
        issue_row(&mut buf, &source_id, i.row_number, i.line_number, &i.issue);
    }
    insert_issues(conn, buf).await?;
    Ok(resolution.applied)
}

/// Adds a commit's counts to its source (`owned`: how many of its identities were owned
/// already), and completes the source when this was its last chunk.
async fn advance_source(
    conn: &mut PgConnection,
    source: Uuid,
    applied: &Applied,
    owned: u64,
    chunks_done: u64,
) -> StoreResult<bool> {
    let row = sqlx::query(
        "UPDATE sources SET accepted = accepted + $1, failed = failed + $2, warnings = warnings + $3,
             processed_rows = processed_rows + $4, chunks_done = chunks_done + $5, status = 'processing', updated_ms = $6,
             owned_identities = owned_identities + $8
         WHERE id = $7 AND status IN ('pending', 'processing')
         RETURNING chunk_count, chunks_done, owned_identities",
    )
    .bind(applied.accepted as i64)
    .bind(applied.failed as i64)
    .bind(applied.warnings as i64)
    .bind((applied.accepted + applied.failed) as i64)
    .bind(chunks_done as i64)
    .bind(now_ms())
    .bind(source)
    .bind(owned as i64)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(false) };
    let (count, done): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    if done < count {
        return Ok(false);
    }
    finalize_source(conn, source, row.try_get(2)?).await?;
    Ok(true)
}

/// Completes a source whose last chunk just committed; `owned` is its `owned_identities`.
async fn finalize_source(
    conn: &mut PgConnection,
    source_id: Uuid,
    owned: Option<i64>,
) -> StoreResult<()> {
    // A value on two rows committed apart makes the later commit find its identity owned. If
    // no commit did, every duplicate was within one commit's rows, which flagged it already
    // (`row::flag_duplicates_in_batch`), and the scans below (about 2.4 s for 1M rows, on one
    // core, at the very end of the ingest) would find nothing new.
    let kinds = if owned == Some(0) {
        &[][..]
    } else {
        &resolve::IDENTITY_KINDS[..]
    };
    for kind in kinds {
        let sql = format!(
            "SELECT r.row_number, r.line_number, r.{kind} AS value FROM records r
             JOIN (SELECT {kind} AS value, MIN(row_number) AS first FROM records
                   WHERE source_id = $1 AND {kind} IS NOT NULL GROUP BY {kind} HAVING COUNT(*) > 1) d
               ON r.{kind} = d.value
             WHERE r.source_id = $1 AND r.{kind} IS NOT NULL AND r.row_number > d.first"
        );
        let rows = sqlx::query(&sql)
            .bind(source_id)
            .fetch_all(&mut *conn)
            .await?;
        if rows.is_empty() {
            continue;
        }
        let mut buf = Vec::new();
        let source = source_id.to_string();
        for r in rows {
            let value: String = r.try_get("value")?;
            let issue = row::duplicate_issue(kind, &value);
            issue_row(
                &mut buf,
                &source,
                r.try_get("row_number")?,
                r.try_get("line_number")?,
                &issue,
            );
        }
        insert_issues(conn, buf).await?;
    }
    let source = load_source(conn, source_id).await?;
    if source.accepted + source.failed != source.total_rows {
        let message = format!(
            "processed {} rows of {}; the source cannot be completed",
            source.accepted + source.failed,
            source.total_rows
        );
        return fail_source_in(conn, source_id, "row_count_mismatch", &message).await;
    }
    let now = now_ms();
    let completed = sqlx::query(
        "UPDATE sources SET warnings = (SELECT COUNT(DISTINCT row_number) FROM row_issues WHERE source_id = $1 AND severity = 'warning'),
             status = 'completed', completed_ms = $2, updated_ms = $2
         WHERE id = $1 AND status IN ('pending', 'processing')",
    )
    .bind(source_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if completed.rows_affected() > 0 {
        let source = load_source(conn, source_id).await?;
        pg_webhooks::enqueue(conn, source, SOURCE_COMPLETED).await?;
    }
    Ok(())
}

async fn fail_source_in(
    conn: &mut PgConnection,
    source: Uuid,
    code: &str,
    message: &str,
) -> StoreResult<()> {
    let now = now_ms();
    let updated = sqlx::query(
        "UPDATE sources SET status = 'failed', error_code = $1, error_message = $2, completed_ms = $3, updated_ms = $3
         WHERE id = $4 AND status IN ('pending', 'processing')",
    )
    .bind(code)
    .bind(message)
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
        pg_webhooks::enqueue(conn, failed, SOURCE_FAILED).await?;
    }
    Ok(())
}

async fn insert_chunk(
    conn: &mut PgConnection,
    source: Uuid,
    chunk: &ChunkSpec,
    state: &str,
    trace: Trace<'_>,
) -> StoreResult<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query(sql::INSERT_CHUNK)
        .bind(id)
        .bind(source)
        .bind(i64::from(chunk.index))
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

/// A profile row selected with its id, directory and [`profile_columns`].
fn profile_of_row(row: &PgRow) -> StoreResult<Profile> {
    let (state, identities) = profile_from_row(row)?;
    Ok(Profile {
        id: row.try_get("id")?,
        directory_id: row.try_get("directory_id")?,
        state,
        identities,
        created_at: at(row.try_get("created_ms")?),
        updated_at: at(row.try_get("updated_ms")?),
    })
}

/// Profiles are paged by their id, which is time-ordered: the cursor is its two halves.
fn profile_cursor(id: Uuid) -> Cursor {
    let (hi, lo) = id.as_u64_pair();
    Cursor(hi as i64, lo as i64)
}

fn profile_after(cursor: Option<Cursor>) -> Uuid {
    cursor.map_or(Uuid::nil(), |Cursor(hi, lo)| {
        Uuid::from_u64_pair(hi as u64, lo as u64)
    })
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("../migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
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
            .execute(&self.pool)
            .await?;
        Ok(org)
    }

    async fn organization_exists(&self, org: Uuid) -> StoreResult<bool> {
        Ok(sqlx::query(sql::ORGANIZATION_EXISTS)
            .bind(org)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    async fn ensure_user(&self, org: Uuid, email: &str) -> StoreResult<Uuid> {
        sqlx::query(
            "INSERT INTO users (id, organization_id, email, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id, email) DO NOTHING",
        )
        .bind(Uuid::now_v7())
        .bind(org)
        .bind(email)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(sql::USER_BY_EMAIL)
            .bind(org)
            .bind(email)
            .fetch_one(&self.pool)
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
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn find_token(&self, hash: &[u8]) -> StoreResult<Option<TokenRecord>> {
        let row = sqlx::query_as::<_, TokenRow>(sql::TOKEN_BY_HASH)
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(TokenRecord::from))
    }

    async fn revoke_token(&self, hash: &[u8]) -> StoreResult<bool> {
        let done = sqlx::query(sql::REVOKE_TOKEN)
            .bind(now_ms())
            .bind(hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn create_directory(&self, org: Uuid, name: &str) -> StoreResult<Directory> {
        let row = sqlx::query_as::<_, DirectoryRow>(
            "INSERT INTO directories (id, organization_id, name, created_ms) VALUES ($1, $2, $3, $4) RETURNING *",
        )
        .bind(Uuid::now_v7())
        .bind(org)
        .bind(name)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.into())
    }

    async fn get_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        Ok(sqlx::query_as::<_, DirectoryRow>(sql::DIRECTORY)
            .bind(org)
            .bind(dir)
            .fetch_optional(&self.pool)
            .await?
            .map(Directory::from))
    }

    async fn list_directories(
        &self,
        org: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Directory>> {
        let rows = sqlx::query_as::<_, DirectoryRow>(sql::DIRECTORIES_PAGE)
            .bind(org)
            .bind(page.after.map_or(0, |c| c.0))
            .bind(page_limit(page) + 1)
            .fetch_all(&self.pool)
            .await?;
        let page = paginate(rows, page_limit(page) as usize, |d| Cursor(d.seq, 0));
        Ok(Page {
            items: page.items.into_iter().map(Directory::from).collect(),
            next: page.next,
        })
    }

    async fn archive_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>> {
        let row = sqlx::query_as::<_, DirectoryRow>(
            "UPDATE directories SET archived_ms = COALESCE(archived_ms, $1) WHERE organization_id = $2 AND id = $3 RETURNING *",
        )
        .bind(now_ms())
        .bind(org)
        .bind(dir)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Directory::from))
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
        let mut tx = self.pool.begin().await?;
        let now = now_ms();
        let claim = IdempotencyClaim {
            organization_id: org,
            key: key.to_owned(),
            token: Uuid::new_v4(),
        };
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (organization_id, key, directory_id, state, claim_token, locked_ms, expires_ms, owner)
             VALUES ($1, $2, $3, 'in_flight', $4, $5, $6, $7) ON CONFLICT DO NOTHING",
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
        if inserted.rows_affected() == 1 {
            tx.commit().await?;
            return Ok(KeyState::Claimed(claim));
        }
        // Someone holds or held the key: decide under its row lock.
        let row = sqlx::query(&format!(
            "SELECT k.*, {OWNER_DEAD} AS owner_dead FROM idempotency_keys k
             LEFT JOIN processes p ON p.owner = k.owner
             WHERE k.organization_id = $1 AND k.key = $3 FOR UPDATE OF k"
        ))
        .bind(org)
        .bind(now)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(held) = decide_key(&KeyRow::from_row(&row)?, now, in_flight_timeout)? {
            return Ok(held);
        }
        sqlx::query(
            "UPDATE idempotency_keys SET directory_id = $3, state = 'in_flight', claim_token = $4, sha256 = NULL, source_id = NULL,
                 response = NULL, locked_ms = $5, expires_ms = $6, owner = $7
             WHERE organization_id = $1 AND key = $2",
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
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn commit_upload(&self, upload: NewUpload) -> StoreResult<(Source, Vec<ChunkRef>)> {
        let NewUpload {
            source,
            sync_chunk,
            sync_results,
            chunks,
            idempotency,
            traceparent,
            tracestate,
        } = upload;
        let mut prepared = prepare(sync_results)?;
        // The source's sequence number versions its profile writes, which the optimistic
        // resolution needs before the transaction that inserts the source.
        let seq: i64 = sqlx::query("SELECT nextval(pg_get_serial_sequence('sources', 'seq'))")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        let upload = UploadParts {
            source: &source,
            seq,
            sync_chunk: sync_chunk.as_ref(),
            chunks: &chunks,
            idempotency: idempotency.as_ref(),
            trace: Trace {
                traceparent: traceparent.as_deref(),
                tracestate: tracestate.as_deref(),
            },
        };
        let mut retry = Retry::new(self.retry_for);
        loop {
            match self.try_commit_upload(&upload, &mut prepared).await {
                Err(e) => retry.after(e).await?,
                done => return done,
            }
        }
    }

    async fn get_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Option<Source>> {
        sqlx::query(sql::SOURCE)
            .bind(org)
            .bind(dir)
            .bind(source)
            .fetch_optional(&self.pool)
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
            .fetch_all(&self.pool)
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
        let rows = sqlx::query_as::<_, IssueRow>(
            "SELECT i.* FROM row_issues i JOIN sources s ON s.id = i.source_id
             WHERE s.organization_id = $1 AND s.directory_id = $2 AND i.source_id = $3
               AND (i.row_number, i.id) > ($4, $5)
             ORDER BY i.row_number, i.id LIMIT $6",
        )
        .bind(org)
        .bind(dir)
        .bind(source)
        .bind(after_row)
        .bind(after_id)
        .bind(page_limit(page) + 1)
        .fetch_all(&self.pool)
        .await?;
        let items: Vec<(i64, RowIssue)> = rows
            .into_iter()
            .map(|r| (r.id, RowIssue::from(r)))
            .collect();
        let page = paginate(items, page_limit(page) as usize, |(id, i)| {
            Cursor(i.row_number as i64, *id)
        });
        Ok(Page {
            items: page.items.into_iter().map(|(_, i)| i).collect(),
            next: page.next,
        })
    }

    async fn failed_row_width(&self, source: Uuid) -> StoreResult<usize> {
        let row = sqlx::query("SELECT COALESCE(MAX(json_array_length(fields::json)), 0)::BIGINT FROM failed_rows WHERE source_id = $1")
            .bind(source)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)? as usize)
    }

    async fn failed_rows(
        &self,
        source: Uuid,
        after_row: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredFailedRow>> {
        let rows = sqlx::query_as::<_, FailedRowRow>(sql::FAILED_ROWS_PAGE)
            .bind(source)
            .bind(after_row as i64)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(StoredFailedRow::try_from).collect()
    }

    async fn list_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        email: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Profile>> {
        let only = match email {
            Some(email) => {
                let identity = ("email", email.to_owned());
                let mut conn = self.pool.acquire().await?;
                let (owners, _) = locate(&mut conn, self.keys, dir, vec![identity]).await?;
                match owners.get("email", email) {
                    Some(owner) => Some(owner),
                    None => {
                        return Ok(Page {
                            items: Vec::new(),
                            next: None,
                        })
                    }
                }
            }
            None => None,
        };
        let rows = sqlx::query(&format!(
            "SELECT p.id, p.directory_id, {columns} FROM profiles p
             WHERE p.directory_id = $2 AND p.id > $3 AND ($4::uuid IS NULL OR p.id = $4)
               AND EXISTS (SELECT 1 FROM directories d WHERE d.id = $2 AND d.organization_id = $1)
             ORDER BY p.id LIMIT $5",
            columns = profile_columns()
        ))
        .bind(org)
        .bind(dir)
        .bind(profile_after(page.after))
        .bind(only)
        .bind(page_limit(page) + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(profile_of_row)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page_limit(page) as usize, |p| {
            profile_cursor(p.id)
        }))
    }

    async fn get_profile(
        &self,
        org: Uuid,
        dir: Uuid,
        profile: Uuid,
    ) -> StoreResult<Option<Profile>> {
        let row = sqlx::query(&format!(
            "SELECT p.id, p.directory_id, {columns} FROM profiles p
             WHERE p.directory_id = $2 AND p.id = $3
               AND EXISTS (SELECT 1 FROM directories d WHERE d.id = $2 AND d.organization_id = $1)",
            columns = profile_columns()
        ))
        .bind(org)
        .bind(dir)
        .bind(profile)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(profile_of_row).transpose()
    }

    async fn claim_chunk(
        &self,
        chunk: Uuid,
        owner: &str,
        lease_for: Duration,
        max_attempts: u32,
    ) -> StoreResult<Claim> {
        self.retrying(|| Box::pin(self.claim_chunk_once(chunk, owner, lease_for, max_attempts)))
            .await
    }

    async fn renew_lease(&self, lease: &Lease, lease_for: Duration) -> StoreResult<bool> {
        let done = sqlx::query(sql::RENEW_LEASE)
            .bind(now_ms() + dur_ms(lease_for))
            .bind(lease.chunk_id)
            .bind(lease.token)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn commit_slice(
        &self,
        lease: &Lease,
        results: ChunkResults,
        end: SliceEnd,
    ) -> StoreResult<Committed> {
        let mut prepared = prepare(results)?;
        let mut retry = Retry::new(self.retry_for);
        loop {
            match self.try_commit_slice(lease, &mut prepared, end).await {
                Err(e) => retry.after(e).await?,
                done => return done,
            }
        }
    }

    async fn release_chunk(
        &self,
        lease: &Lease,
        error: &str,
        transient_for: Option<Duration>,
    ) -> StoreResult<bool> {
        self.retrying(|| Box::pin(self.release_chunk_once(lease, error, transient_for)))
            .await
    }

    async fn retry_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Retried> {
        self.retrying(|| Box::pin(self.retry_source_once(org, dir, source)))
            .await
    }

    async fn cancel_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Cancelled> {
        self.retrying(|| Box::pin(self.cancel_source_once(org, dir, source)))
            .await
    }

    async fn fail_source(&self, source: Uuid, error: SourceError) -> StoreResult<()> {
        self.retrying(|| Box::pin(self.fail_source_once(source, &error)))
            .await
    }

    async fn chunks_to_publish(
        &self,
        requeue_after: Duration,
        limit: u32,
    ) -> StoreResult<Vec<ChunkRef>> {
        let now = now_ms();
        // SKIP LOCKED: several reapers (gateways, workers) share the work without waiting.
        let rows = sqlx::query(&format!(
            "UPDATE chunks SET queued_ms = $1 WHERE id IN (
                 SELECT c.id FROM chunks c JOIN sources s ON s.id = c.source_id
                 LEFT JOIN processes p ON p.owner = c.lease_owner
                 WHERE s.status IN ('pending', 'processing') AND (
                     (c.state = 'pending' AND c.not_before_ms <= $1 AND (c.queued_ms IS NULL OR c.queued_ms < $3))
                  OR (c.state = 'running' AND (c.lease_expires_ms < $1 OR {OWNER_DEAD})))
                 ORDER BY s.seq, c.idx LIMIT $4 FOR UPDATE OF c SKIP LOCKED)
             RETURNING id, source_id, attempts, traceparent, tracestate"
        ))
        .bind(now)
        .bind(now)
        .bind(now - dur_ms(requeue_after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        sqlx::query(sql::FORGET_DEAD_PROCESSES)
            .bind(now - FORGET_PROCESSES_AFTER_MS)
            .execute(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                Ok(ChunkRef {
                    source_id: row.try_get("source_id")?,
                    chunk_id: row.try_get("id")?,
                    attempt: row.try_get::<i64, _>("attempts")? as u32,
                    traceparent: row.try_get("traceparent")?,
                    tracestate: row.try_get("tracestate")?,
                })
            })
            .collect()
    }

    async fn heartbeat(&self, owner: &str, valid_for: Duration) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO processes (owner, heartbeat_ms, expires_ms) VALUES ($1, $2, $3)
             ON CONFLICT (owner) DO UPDATE SET heartbeat_ms = EXCLUDED.heartbeat_ms, expires_ms = EXCLUDED.expires_ms",
        )
        .bind(owner)
        .bind(now)
        .bind(now + dur_ms(valid_for))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn retire(&self, owner: &str) -> StoreResult<()> {
        sqlx::query(sql::RETIRE_PROCESS)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn forget_queued(&self) -> StoreResult<u64> {
        let done = sqlx::query(sql::FORGET_QUEUED).execute(&self.pool).await?;
        Ok(done.rows_affected())
    }

    async fn mark_unpublished(&self, chunks: &[Uuid]) -> StoreResult<()> {
        sqlx::query("UPDATE chunks SET queued_ms = NULL WHERE id = ANY($1) AND state = 'pending'")
            .bind(chunks)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_webhook(&self, endpoint: &WebhookEndpoint) -> StoreResult<()> {
        pg_webhooks::create(&self.pool, endpoint).await
    }

    async fn list_webhooks(&self, org: Uuid) -> StoreResult<Vec<WebhookEndpoint>> {
        pg_webhooks::list(&self.pool, org).await
    }

    async fn get_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        pg_webhooks::get(&self.pool, org, id).await
    }

    async fn delete_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<bool> {
        pg_webhooks::delete(&self.pool, org, id).await
    }

    async fn enable_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>> {
        pg_webhooks::enable(&self.pool, org, id).await
    }

    async fn list_deliveries(
        &self,
        org: Uuid,
        endpoint: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        pg_webhooks::deliveries(&self.pool, org, endpoint, limit).await
    }

    async fn claim_deliveries(
        &self,
        lease_for: Duration,
        limit: u32,
    ) -> StoreResult<Vec<DueDelivery>> {
        self.retrying(|| Box::pin(pg_webhooks::claim(&self.pool, lease_for, limit)))
            .await
    }

    async fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: &DeliveryAttempt,
        next: AttemptNext,
        disable_after: u32,
    ) -> StoreResult<()> {
        self.retrying(|| {
            Box::pin(pg_webhooks::record(
                &self.pool,
                delivery,
                attempt,
                next,
                disable_after,
            ))
        })
        .await
    }

    async fn count_failed_sources_by_code(&self) -> StoreResult<Vec<(String, u64)>> {
        let rows = sqlx::query(sql::FAILED_SOURCES_BY_CODE)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("code")?, row.try_get::<i64, _>("n")? as u64)))
            .collect()
    }

    async fn count_sources_by_status(&self) -> StoreResult<Vec<(SourceStatus, u64)>> {
        let rows = sqlx::query(sql::SOURCES_BY_STATUS)
            .fetch_all(&self.pool)
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
        let row = sqlx::query(sql::OPEN_CHUNKS).fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>(0)? as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::copy_row;

    #[test]
    fn copy_rows_escape_only_what_copy_text_format_requires() {
        let mut buf = Vec::new();
        copy_row(&mut buf, &[Some("plain, \"quoted\" é"), None, Some("")]);
        copy_row(&mut buf, &[Some("tab\there"), Some("a\\b\r\nc")]);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "plain, \"quoted\" é\t\\N\t\ntab\\there\ta\\\\b\\r\\nc\n"
        );
    }
}
