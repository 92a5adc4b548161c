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
//! columns) is `layout`; the statements SQLite runs too are `sql`, and the code,
//! among it most of the role implementations, `shared`. New profiles, records
//! and identities go in with binary `COPY` (`copy`), failed rows with text `COPY`, row
//! issues through a staging table, since completion may flag one twice. Lookups take arrays,
//! so a chunk costs a handful of round trips whatever its size. docs/performance.md measures
//! where a commit's time goes.

mod api;
mod chunks;
mod citus;
mod commit;
mod copy;
mod identities;
mod layout;
mod webhooks;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{Executor, FromRow, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::metrics::METRICS;
use crate::rows::*;
use crate::shared::KeyRequest;
use crate::sql;
use crate::writes::{owners_to_load, prepare, resolve, Prepared, Resolution, Trace};
use crate::{
    Chunks, Database, Liveness, Outbox, Profiles, Stats, StoreError, StoreResult, Tenancy, Uploads,
};
use copy::BinaryRows;
use layout::{
    export_columns, exported_from_row, field_names, identities_text, kind_number, profile_columns,
    profile_from_row, KeySpace, ProfileColumns, ProfileColumnsAt,
};
use orbit_config::DatabaseSettings;
use orbit_core::domain::fair::Pass;
use orbit_core::domain::header::ColumnMap;
use orbit_core::domain::merge::MergeRules;
use orbit_core::domain::resolve::{self, Existing, IdentityMap, Owners, ProfileState};
use orbit_core::domain::row;
use orbit_core::domain::row::FieldName;
use orbit_core::model::*;

use chunks::UploadParts;
use commit::*;
use identities::*;

pub use citus::MIGRATION_LOCK;
pub use layout::identity_key;

pub struct PgStore {
    pool: PgPool,
    retry_for: Duration,
    node_retry_for: Duration,
    /// Begins an import's commit: its statements are bounded by `commit_statement_timeout`.
    begin_commit: String,
    pause: CommitPause,
    keys: KeySpace,
    reads: OwnerReads,
    /// A test's store that writes as if no upload had merge rules: how the split detector
    /// shows that it notices.
    ignore_merge_rules: bool,
    /// `database.analyze_after_rows`: see [`PgStore::analyze_after`].
    analyze_after_rows: u64,
    /// Set while this process analyzes, so that completions arriving meanwhile do not pile
    /// up `ANALYZE`s: the running one covers them.
    analyzing: Arc<AtomicBool>,
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
            node_retry_for: settings.node_retry_for,
            analyze_after_rows: settings.analyze_after_rows,
            analyzing: Arc::default(),
            // In the `BEGIN`'s round trip: a simple query may hold several statements.
            begin_commit: format!(
                "BEGIN; SET LOCAL statement_timeout = '{}'",
                pg_duration(settings.commit_statement_timeout)
            ),
            pause: CommitPause::default(),
            keys: KeySpace::FULL,
            reads: OwnerReads::default(),
            ignore_merge_rules: false,
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

    /// Makes every commit merge as if its upload had no merge rules: a broken store, for the
    /// split detector to catch.
    #[cfg(feature = "testing")]
    pub fn ignore_merge_rules(&mut self) {
        self.ignore_merge_rules = true;
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

/// Whether the process `p` (a `processes` row) is gone, given the time `$now`: its heartbeat
/// expired, and the server has been up for at least one heartbeat window since it started, so
/// that a database restart does not make every worker look dead before it had a chance to
/// heartbeat again.
macro_rules! owner_dead {
    ($now:literal) => {
        concat!(
            "COALESCE(p.expires_ms < ", $now, " AND ", $now,
            " - (EXTRACT(EPOCH FROM pg_postmaster_start_time()) * 1000)::BIGINT > p.expires_ms - p.heartbeat_ms, FALSE)"
        )
    };
}

/// Whether the process `$1` is gone, given the time `$2`.
const OWNER_DEAD: &str = concat!(
    "SELECT ",
    owner_dead!("$2"),
    " FROM processes p WHERE p.owner = $1"
);
/// The processes gone at `$1`.
const DEAD_OWNERS: &str = concat!("SELECT owner FROM processes p WHERE ", owner_dead!("$1"));

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
/// `retry_for` in all; a Citus worker node that cannot be reached, for `node_retry_for` only, so
/// that the caller turns to other directories' work instead of waiting for that node. Any
/// other error is returned as it is.
struct Retry {
    deadline: Instant,
    node_deadline: Instant,
    tries: u32,
}

impl Retry {
    fn new(retry_for: Duration, node_retry_for: Duration) -> Self {
        let now = Instant::now();
        Retry {
            deadline: now + retry_for,
            node_deadline: now + node_retry_for.min(retry_for),
            tries: 0,
        }
    }

    /// Waits before the next try, or gives `error` back when it is not worth one.
    async fn after(&mut self, error: StoreError) -> StoreResult<()> {
        let (reason, ceiling_ms, deadline) = if error.is_conflict() {
            ("conflict", 1_000u64, self.deadline)
        } else if error.is_node_down() {
            ("node_unavailable", 500, self.node_deadline)
        } else if error.is_transient() {
            ("unavailable", 5_000, self.deadline)
        } else {
            return Err(error);
        };
        if Instant::now() >= deadline {
            return Err(error);
        }
        self.tries += 1;
        METRICS.commit_retries.with_label_values(&[reason]).inc();
        let ceiling = (20u64 << self.tries.min(10)).min(ceiling_ms);
        let wait = Duration::from_millis(rand::rng().random_range(ceiling / 2..=ceiling));
        tracing::debug!(reason, tries = self.tries, error = %error, ?wait, "retrying a transaction");
        tokio::time::sleep(wait.min(deadline.saturating_duration_since(Instant::now()))).await;
        Ok(())
    }
}

crate::shared::store_roles! {
    store: PgStore,
    backend: "postgres",
    read: pool,
    write: pool,
    lock_source: "SELECT * FROM sources WHERE organization_id = $1 AND directory_id = $2 AND id = $3 FOR UPDATE",
    lock_chunk: "SELECT c.*, s.status AS source_status
         FROM chunks c JOIN sources s ON s.directory_id = c.directory_id AND s.id = c.source_id
         WHERE c.directory_id = $1 AND c.id = $2 FOR UPDATE OF c",
    lock_lease: "SELECT transient_since_ms FROM chunks WHERE directory_id = $1 AND id = $2 AND lease_token = $3 AND state = 'running' FOR UPDATE",
    owner_dead: OWNER_DEAD,
    // One probe of `chunks_ready` per unfinished source, so the read costs as many sources
    // are open, not as many chunks wait (1.9 ms for 200 sources with 20,000 chunks waiting,
    // where a window over the waiting chunks took 31 ms). On Citus each shard runs it for its
    // directories (the lateral join and the DISTINCT ON are on the shard key);
    // `organization_limits` is a copy on every node.
    ready_chunks: "SELECT DISTINCT ON (s.directory_id) s.organization_id, c.directory_id, c.id, c.source_id, c.attempts, c.traceparent, c.tracestate, c.row_count, s.created_ms, CAST(l.weight AS BIGINT) AS weight
         FROM sources s
         CROSS JOIN LATERAL (SELECT c.* FROM chunks c
             WHERE c.directory_id = s.directory_id AND c.source_id = s.id AND c.state = 'pending' AND c.not_before_ms <= $1
             ORDER BY c.idx LIMIT 1) c
         LEFT JOIN organization_limits l ON l.organization_id = s.organization_id
         WHERE s.status IN ('pending', 'processing')
         ORDER BY s.directory_id, s.seq",
}

/// Whether the process owning an admission still heartbeats at `$2` (the opposite of
/// `owner_dead!`, and an admission whose process row is gone is dead too).
macro_rules! admission_live {
    () => {
        concat!(
            "EXISTS (SELECT 1 FROM processes p WHERE p.owner = upload_admissions.owner AND NOT ",
            owner_dead!("$2"),
            ")"
        )
    };
}

crate::shared::limits_role! {
    store: PgStore,
    read: pool,
    write: pool,
    connection: PgConnection,
    // The admission commits without waiting for its WAL to reach disk (the same statement,
    // no round trip of its own): a database crash can lose only admissions whose uploads
    // never committed (an upload's commit flushes the WAL before it, and closes the
    // admission), which then count for nothing: an undercount that ends with their requests.
    lock: Some(
        "SELECT pg_advisory_xact_lock($1, hashtext($2)), set_config('synchronous_commit', 'off', true)"
    ),
    open_admissions: concat!(
        "SELECT COUNT(*) FROM upload_admissions WHERE organization_id = $1 AND open_until_ms > $2 AND ",
        admission_live!()
    ),
    prune_admissions: concat!(
        "DELETE FROM upload_admissions WHERE organization_id = $1 AND admitted_ms <= $2 AND (open_until_ms <= $3 OR NOT ",
        "EXISTS (SELECT 1 FROM processes p WHERE p.owner = upload_admissions.owner AND NOT ",
        owner_dead!("$3"),
        "))"
    ),
}

crate::shared::resumable_role! {
    store: PgStore,
    write: pool,
}
