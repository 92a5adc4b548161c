//! `orbit-store`: the database behind Orbit. The store is a set of role traits ([`Database`],
//! [`Tenancy`], [`Uploads`], [`Profiles`], [`Chunks`], [`Liveness`], [`Outbox`], [`Stats`],
//! [`Limits`], [`Resumable`]),
//! and [`Store`] is their sum; each backend implements every role: [`sqlite`] (embedded) and
//! [`postgres`] (distributed), picked from the `database.url` scheme. Their migrations are in
//! `migrations/` beside `src/`; the SQL both backends run as it is, `sql`; the Rust they run
//! alike, as macros expanded per backend, `shared`; rows as stored and read back, `rows`; the
//! store's metrics, [`metrics`]. Every tenant-facing query takes the organization and filters by it,
//! so a token of one organization can never read or write another's data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use orbit_config::{DatabaseBackend, DatabaseSettings};
use orbit_core::domain::fair::{Advance, Pass};
use orbit_core::domain::header::KnownField;
use orbit_core::domain::resolve;
use orbit_core::model::*;

pub use limits::Limits;
pub use resumable::Resumable;

pub mod backlog;
pub mod limits;
pub mod metrics;
pub mod postgres;
pub mod resumable;
mod rows;
mod shared;
mod sql;
pub mod sqlite;
mod webhook_rows;
mod writes;

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Conflict(String),
}

impl StoreError {
    /// A lost race between transactions: deadlock (40P01), serialization failure (40001), a
    /// lock wait past `lock_timeout` (55P03), or a commit's statement cancelled past
    /// `commit_statement_timeout` (57014: a wait on a frozen peer, or on this process's own
    /// data after it was frozen). The same work will very likely pass if tried again.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self.sqlstate().as_deref(),
            Some("40P01" | "40001" | "55P03" | "57014")
        )
    }

    /// The database could not be reached or dropped the connection: a restart, a failover, a
    /// full connection table. Nothing is wrong with the data; wait and try again.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_),
            ) => true,
            StoreError::Database(sqlx::Error::Database(_)) => {
                let state = self.sqlstate().unwrap_or_default();
                // Class 08: connection exception; 57P01-57P03: the server is shutting down or
                // starting; 53300: too many connections.
                state.starts_with("08")
                    || matches!(state.as_str(), "57P01" | "57P02" | "57P03" | "53300")
                    || self.is_node_down()
            }
            _ => false,
        }
    }

    /// One node of a sharded database (a Citus worker node) could not be reached from the
    /// coordinator, or went away mid-statement: only the directories whose shards live there
    /// are affected. The coordinator reports it as a connection exception (class 08) of its
    /// own (a connection of ours that fails is an I/O error instead), except during a `COPY`,
    /// where Citus passes the node's last words on as an internal error (XX000) or, when
    /// there were none, as an I/O error (58030) "failed to complete COPY on …".
    pub fn is_node_down(&self) -> bool {
        let StoreError::Database(sqlx::Error::Database(e)) = self else {
            return false;
        };
        let message = e.message();
        match e.code().as_deref() {
            Some(code) if code.starts_with("08") => true,
            Some("58030") => message.starts_with("failed to complete COPY on"),
            Some("XX000") => {
                message.starts_with("terminating connection")
                    || message.starts_with("server closed the connection")
                    || message.contains("the database system is shutting down")
            }
            _ => false,
        }
    }

    /// A row refused by a unique index. Citus reports one that a worker node raised during a
    /// `COPY` as an internal error (XX000) with PostgreSQL's message, so the message decides
    /// there.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => {
                e.code().as_deref() == Some("23505")
                    || (e.code().as_deref() == Some("XX000")
                        && e.message()
                            .starts_with("duplicate key value violates unique constraint"))
            }
            _ => false,
        }
    }

    pub(crate) fn sqlstate(&self) -> Option<String> {
        match self {
            StoreError::Database(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// The database itself: which backend, its schema, whether it answers.
#[async_trait]
pub trait Database: Send + Sync + 'static {
    /// Which backend this is, for logs and `/readyz`.
    fn backend(&self) -> &'static str;
    async fn migrate(&self) -> StoreResult<()>;
    async fn ping(&self) -> StoreResult<()>;
}

/// Organizations, their users and tokens, and their directories.
#[async_trait]
pub trait Tenancy: Send + Sync + 'static {
    async fn create_organization(&self, name: &str) -> StoreResult<Organization>;
    async fn organization_exists(&self, org: Uuid) -> StoreResult<bool>;
    /// The user with this email in the organization, created if new.
    async fn ensure_user(&self, org: Uuid, email: &str) -> StoreResult<Uuid>;
    async fn insert_token(
        &self,
        hash: &[u8],
        org: Uuid,
        user: Uuid,
        expires_at: Option<DateTime<Utc>>,
    ) -> StoreResult<()>;
    async fn find_token(&self, hash: &[u8]) -> StoreResult<Option<TokenRecord>>;
    /// Whether a live token was revoked by this call.
    async fn revoke_token(&self, hash: &[u8]) -> StoreResult<bool>;
    async fn create_directory(&self, org: Uuid, name: &str) -> StoreResult<Directory>;
    async fn get_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>>;
    async fn list_directories(&self, org: Uuid, page: &PageRequest)
        -> StoreResult<Page<Directory>>;
    async fn archive_directory(&self, org: Uuid, dir: Uuid) -> StoreResult<Option<Directory>>;
}

/// What a client asks of its sources: idempotency keys, recording an upload, reading sources,
/// their issues and failed rows, and resuming or cancelling one.
#[async_trait]
pub trait Uploads: Send + Sync + 'static {
    /// Claims `(org, key)` for a request on `dir` served by the process `owner`, or reports who
    /// has it (`OtherDirectory` while the key lives on another directory). An in-flight claim is presumed dead and taken over once it is older than
    /// `in_flight_timeout` or its owner stopped heartbeating; a completed one older than `ttl`
    /// is forgotten.
    async fn claim_idempotency_key(
        &self,
        org: Uuid,
        key: &str,
        dir: Uuid,
        owner: &str,
        ttl: Duration,
        in_flight_timeout: Duration,
    ) -> StoreResult<KeyState>;
    /// Drops an in-flight claim of a request that created nothing, so a retry runs fresh.
    async fn release_idempotency_key(&self, claim: &IdempotencyClaim) -> StoreResult<()>;
    /// Records the source, its chunks and the synchronous prefix's results, and completes the
    /// idempotency claim with the resulting receipt, atomically. Returns the source and the
    /// chunks to publish, which are marked queued.
    async fn commit_upload(&self, upload: NewUpload) -> StoreResult<(Source, Vec<ChunkRef>)>;
    async fn get_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Option<Source>>;
    async fn list_sources(
        &self,
        org: Uuid,
        dir: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<Source>>;
    async fn list_issues(
        &self,
        org: Uuid,
        dir: Uuid,
        source: Uuid,
        page: &PageRequest,
    ) -> StoreResult<Page<RowIssue>>;
    /// The most fields any failed row of the source has.
    async fn failed_row_width(&self, dir: Uuid, source: Uuid) -> StoreResult<usize>;
    /// Failed rows after row `after_row`, in input order.
    async fn failed_rows(
        &self,
        dir: Uuid,
        source: Uuid,
        after_row: u64,
        limit: u32,
    ) -> StoreResult<Vec<StoredFailedRow>>;
    /// Re-opens a failed source: its failed (unfinished) chunks get fresh attempts and are
    /// returned to publish (the reaper publishes them too, should nobody else), chunks already
    /// done stay done, and the source is processing again.
    /// The one way a source leaves a terminal state, and only on a caller's explicit request.
    async fn retry_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Retried>;
    /// Ends a pending or processing source `failed` with `error.code = "cancelled"`, in one
    /// transaction that also fails its unfinished chunks: a worker holding one of them finds
    /// its lease gone at its next commit (the commit fence checks the source's status too), so
    /// no slice commits after this, and the slices committed before it stay, counted.
    async fn cancel_source(&self, org: Uuid, dir: Uuid, source: Uuid) -> StoreResult<Cancelled>;
}

/// Reading a directory's resolved profiles.
#[async_trait]
pub trait Profiles: Send + Sync + 'static {
    async fn list_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        email: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Profile>>;
    async fn get_profile(
        &self,
        org: Uuid,
        dir: Uuid,
        profile: Uuid,
    ) -> StoreResult<Option<Profile>>;
    /// Every profile of the directory that `filter` keeps, read from one snapshot, in creation
    /// order (the order `list_profiles` pages in), `None` when the directory is not the
    /// organization's. The snapshot is a transaction held for the life of the stream
    /// (PostgreSQL `REPEATABLE READ READ ONLY`, one SQLite read transaction), so an import
    /// committing meanwhile shows in none of it or, profile by profile, in all of it; rows are
    /// fetched [`EXPORT_BATCH`] at a time, so memory stays flat whatever the directory's size.
    /// Dropping the stream ends the transaction.
    async fn export_profiles(
        &self,
        org: Uuid,
        dir: Uuid,
        filter: &ExportFilter,
    ) -> StoreResult<Option<ProfileExport>>;
}

/// Profiles an export fetches per round trip: a batch is what the stream yields.
pub const EXPORT_BATCH: i64 = 1000;

/// Which profiles an export takes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportFilter {
    /// Only profiles updated at or after this time (millisecond precision).
    pub updated_since: Option<DateTime<Utc>>,
}

impl ExportFilter {
    pub(crate) fn since_ms(&self) -> Option<i64> {
        self.updated_since.map(|t| t.timestamp_millis())
    }
}

/// An export in progress: what is known before the first profile, then the profiles.
pub struct ProfileExport {
    /// The custom attribute names that at least one exported profile has a value for
    /// (a value that is not empty: an empty one is a cleared attribute), sorted by bytes:
    /// read in the snapshot, so a CSV header can name them before the first row.
    pub attribute_names: Vec<String>,
    /// How many profiles the stream will yield (from the same snapshot).
    pub count: u64,
    /// The profiles, in batches of at most [`EXPORT_BATCH`].
    pub batches: futures::stream::BoxStream<'static, StoreResult<Vec<ExportedProfile>>>,
}

/// A profile as an export writes it: the values, without the versions and ranks that only
/// merging needs, and without cleared (empty) values. PostgreSQL reads just these columns.
/// Decoding and encoding them is most of an export's CPU, so the values live in one buffer:
/// a profile costs a couple of allocations rather than one per value.
#[derive(Clone)]
pub struct ExportedProfile {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    text: String,
    fields: [Option<Span>; KnownField::ALL.len()],
    attributes: Vec<(Span, Span)>,
    identities: Vec<(&'static str, Span)>,
}

/// Where a value is in [`ExportedProfile`]'s buffer.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn of(self, text: &str) -> &str {
        &text[self.start as usize..self.end as usize]
    }
}

impl ExportedProfile {
    /// No values yet; `capacity` is a guess of their total length.
    pub fn new(
        id: Uuid,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        capacity: usize,
    ) -> Self {
        ExportedProfile {
            id,
            created_at,
            updated_at,
            text: String::with_capacity(capacity),
            fields: [None; KnownField::ALL.len()],
            attributes: Vec::new(),
            identities: Vec::new(),
        }
    }

    /// Appends what `write` writes to the buffer: where it is.
    fn keep_with(&mut self, write: impl FnOnce(&mut String)) -> Span {
        let start = self.text.len() as u32;
        write(&mut self.text);
        Span {
            start,
            end: self.text.len() as u32,
        }
    }

    fn keep(&mut self, value: &str) -> Span {
        self.keep_with(|text| text.push_str(value))
    }

    fn at(&self, span: Span) -> &str {
        span.of(&self.text)
    }

    /// The `i`th of [`KnownField::ALL`]; an empty value is a cleared one, and stays unset.
    pub fn set_field(&mut self, i: usize, value: &str) {
        if !value.is_empty() {
            self.fields[i] = Some(self.keep(value));
        }
    }

    /// A custom attribute, given in order of name; an empty (cleared) value is left out.
    pub fn push_attribute(&mut self, name: &str, value: &str) {
        if !value.is_empty() {
            let name = self.keep(name);
            let value = self.keep(value);
            self.attributes.push((name, value));
        }
    }

    /// An identity, its value written by `write` (which may unescape it on the way).
    pub fn push_identity_with(&mut self, kind: &'static str, write: impl FnOnce(&mut String)) {
        let value = self.keep_with(write);
        self.identities.push((kind, value));
    }

    /// Puts the identities in the order [`Profile::identities`] keeps: by kind (which is
    /// resolution order), then value.
    pub fn sort_identities(&mut self) {
        let text = &self.text;
        self.identities
            .sort_unstable_by(|a, b| (a.0, a.1.of(text)).cmp(&(b.0, b.1.of(text))));
    }

    /// The value of the `i`th of [`KnownField::ALL`], unless unset or cleared.
    pub fn field(&self, i: usize) -> Option<&str> {
        self.fields[i].map(|span| self.at(span))
    }

    /// The custom attributes that have a value, sorted by name.
    pub fn attributes(&self) -> impl Iterator<Item = (&str, &str)> + Clone + '_ {
        self.attributes
            .iter()
            .map(|(name, value)| (self.at(*name), self.at(*value)))
    }

    /// (kind, value), sorted as [`Profile::identities`].
    pub fn identities(&self) -> impl Iterator<Item = (&'static str, &str)> + Clone + '_ {
        self.identities
            .iter()
            .map(|(kind, value)| (*kind, self.at(*value)))
    }
}

impl PartialEq for ExportedProfile {
    fn eq(&self, other: &Self) -> bool {
        (self.id, self.created_at, self.updated_at)
            == (other.id, other.created_at, other.updated_at)
            && (0..KnownField::ALL.len()).all(|i| self.field(i) == other.field(i))
            && self.attributes().eq(other.attributes())
            && self.identities().eq(other.identities())
    }
}

impl Eq for ExportedProfile {}

impl std::fmt::Debug for ExportedProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fields: Vec<(&str, &str)> = KnownField::ALL
            .iter()
            .enumerate()
            .filter_map(|(i, name)| Some((name.as_str(), self.field(i)?)))
            .collect();
        f.debug_struct("ExportedProfile")
            .field("id", &self.id)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .field("fields", &fields)
            .field("attributes", &self.attributes().collect::<Vec<_>>())
            .field("identities", &self.identities().collect::<Vec<_>>())
            .finish()
    }
}

impl From<Profile> for ExportedProfile {
    fn from(p: Profile) -> Self {
        let mut out = ExportedProfile::new(p.id, p.created_at, p.updated_at, 256);
        for (i, field) in KnownField::ALL.iter().enumerate() {
            if let Some(v) = p.state.fields.get(field.as_str()) {
                out.set_field(i, &v.value);
            }
        }
        for (name, v) in &p.state.attributes {
            out.push_attribute(name, &v.value);
        }
        for (kind, value) in &p.identities {
            if let Some(i) = resolve::kind_index(kind) {
                out.push_identity_with(resolve::IDENTITY_KINDS[i], |text| text.push_str(value));
            }
        }
        out.sort_identities();
        out
    }
}

/// The chunk life cycle of workers and reapers: leases, slice commits, releases, and the
/// chunks to publish.
#[async_trait]
pub trait Chunks: Send + Sync + 'static {
    /// Takes the lease of the chunk a queue message names for `lease_for`, unless it is done,
    /// leased by a live process, or out of attempts (which fails the source).
    async fn claim_chunk(
        &self,
        chunk: &ChunkRef,
        owner: &str,
        lease_for: Duration,
        max_attempts: u32,
    ) -> StoreResult<Claim>;
    /// Extends a lease still held; false when it was lost.
    async fn renew_lease(&self, lease: &Lease, lease_for: Duration) -> StoreResult<bool>;
    /// Materializes one slice of the chunk's rows, only while `lease` is held, in one
    /// transaction with the chunk's progress: at `SliceEnd::Chunk` the chunk is done (and the
    /// source completes when it was the last chunk), before it the chunk records where the next
    /// slice starts.
    async fn commit_slice(
        &self,
        lease: &Lease,
        results: ChunkResults,
        end: SliceEnd,
    ) -> StoreResult<Committed>;
    /// Materializes the rest of the chunk's rows in one slice.
    async fn commit_chunk(&self, lease: &Lease, results: ChunkResults) -> StoreResult<Committed> {
        self.commit_slice(lease, results, SliceEnd::Chunk).await
    }
    /// Gives up a lease after a failed attempt so the chunk can be tried again. A transient
    /// failure (`transient_for` set: storage, network or database trouble) gives its attempt
    /// back until the chunk has been failing that way for `transient_for`; any other counts.
    /// `false` when the lease was no longer this attempt's (taken over, or its source ended):
    /// nothing is changed then.
    async fn release_chunk(
        &self,
        lease: &Lease,
        error: &str,
        transient_for: Option<Duration>,
    ) -> StoreResult<bool>;
    /// Fails a source that cannot be finished (its object is gone, say); rows stay.
    async fn fail_source(&self, dir: Uuid, source: Uuid, error: SourceError) -> StoreResult<()>;
    /// Chunks to publish (again): never published, queued longer ago than `requeue_after`, or
    /// whose lease expired or whose lease owner stopped heartbeating. Marks them queued now.
    async fn chunks_to_publish(
        &self,
        requeue_after: Duration,
        limit: u32,
    ) -> StoreResult<Vec<ChunkRef>>;
    /// Marks every unfinished chunk as not queued, so the next `chunks_to_publish` returns it:
    /// what a single-process deployment calls on start, since its in-process queue died with it.
    async fn forget_queued(&self) -> StoreResult<u64>;
    /// Marks these pending chunks as not queued after their publish failed, so the next
    /// reaper pass (of any process) publishes them again instead of waiting `requeue_after`.
    async fn mark_unpublished(&self, chunks: &[ChunkRef]) -> StoreResult<()>;
    /// Gives back a chunk the process `owner` tried to claim when the database did not
    /// answer: unpublished, for the reaper to publish, and, had the claim gone through after
    /// all, its lease dropped and its attempt given back. No attempt counts for a claim that
    /// never answered.
    async fn give_back(&self, chunk: &ChunkRef, owner: &str) -> StoreResult<()>;
    /// Every directory with a chunk ready to run (pending, past its backoff, of an unfinished
    /// source), with its oldest such chunk and its organization's weight (`default_weight`
    /// unless set): what the fair scheduler chooses among. Reads without a lock.
    async fn ready_chunks(&self, default_weight: u32) -> StoreResult<Vec<ReadyChunk>>;
    /// The fair scheduler's passes of `ids` (organizations, directories, the service); an id
    /// that has none yet is left out.
    async fn passes(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, Pass>>;
    /// Moves passes as `fair::charge` says, each row in its own atomic statement.
    async fn advance_passes(&self, advances: &[Advance]) -> StoreResult<()>;
}

/// Heartbeats of the processes that hold leases and idempotency claims (docs/concurrency.md).
#[async_trait]
pub trait Liveness: Send + Sync + 'static {
    /// Records that the process `owner` is alive for `valid_for` more: until then, the leases it
    /// holds stand; after it, they are void and its chunks are taken over.
    async fn heartbeat(&self, owner: &str, valid_for: Duration) -> StoreResult<()>;
    /// Forgets the process `owner`, which exits cleanly and holds no lease any more.
    async fn retire(&self, owner: &str) -> StoreResult<()>;
}

/// Webhook endpoints and the durable outbox of their deliveries. Ending a source (completing
/// or failing it) writes one outbox row per matching enabled endpoint in the transaction that
/// ends it.
#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    async fn create_webhook(&self, endpoint: &WebhookEndpoint) -> StoreResult<()>;
    async fn list_webhooks(&self, org: Uuid) -> StoreResult<Vec<WebhookEndpoint>>;
    async fn get_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>>;
    /// Whether it existed; its deliveries go with it.
    async fn delete_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<bool>;
    /// Enables a disabled endpoint again (its failure run starts over); its pending
    /// deliveries are sent again.
    async fn enable_webhook(&self, org: Uuid, id: Uuid) -> StoreResult<Option<WebhookEndpoint>>;
    /// The endpoint's newest deliveries, with their attempts.
    async fn list_deliveries(
        &self,
        org: Uuid,
        endpoint: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<WebhookDelivery>>;
    /// Leases up to `limit` due deliveries of enabled endpoints for `lease_for`; one a
    /// dispatcher holds is not handed to another until its lease runs out.
    async fn claim_deliveries(
        &self,
        lease_for: Duration,
        limit: u32,
    ) -> StoreResult<Vec<DueDelivery>>;
    /// Records an attempt of a leased delivery and what follows it; the endpoint's failure run
    /// grows or resets, and the endpoint is disabled once the run reaches `disable_after`.
    /// Nothing is recorded when the lease was lost.
    async fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: &DeliveryAttempt,
        next: AttemptNext,
        disable_after: u32,
    ) -> StoreResult<()>;
}

/// The counts behind the gauges that mirror the database (`crate::metrics::mirror`).
#[async_trait]
pub trait Stats: Send + Sync + 'static {
    async fn count_sources_by_status(&self) -> StoreResult<Vec<(SourceStatus, u64)>>;
    async fn count_pending_chunks(&self) -> StoreResult<u64>;
    /// Resumable uploads receiving bytes, unexpired at `now`.
    async fn count_resumable_receiving(&self, now: DateTime<Utc>) -> StoreResult<u64>;
    /// Failed sources by their `error_code`.
    async fn count_failed_sources_by_code(&self) -> StoreResult<Vec<(String, u64)>>;
    /// Every organization with unfinished work at `now`: the `top` that have waited longest,
    /// one by one, and the rest summed ([`backlog`]). Aggregates over every directory (on
    /// Citus, every shard), without locks.
    async fn organization_backlog(
        &self,
        now: DateTime<Utc>,
        top: usize,
    ) -> StoreResult<backlog::Backlog>;
}

/// The whole database: every role. Backends implement the roles; a caller that needs only
/// some of them (the worker, a test decorator) takes those.
pub trait Store:
    Database + Tenancy + Uploads + Profiles + Chunks + Liveness + Outbox + Stats + Limits + Resumable
{
}

impl<T> Store for T where
    T: Database
        + Tenancy
        + Uploads
        + Profiles
        + Chunks
        + Liveness
        + Outbox
        + Stats
        + Limits
        + Resumable
        + ?Sized
{
}

/// Every role trait, for code that calls a concrete store's methods (`PgStore`, say); through
/// `dyn Store` they need no import.
pub mod prelude {
    pub use crate::{
        Chunks as _, Database as _, Limits as _, Liveness as _, Outbox as _, Profiles as _,
        Resumable as _, Stats as _, Tenancy as _, Uploads as _,
    };
}

/// Opens the store named by `database.url` (its scheme was checked when it was read).
pub async fn open(settings: &DatabaseSettings) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match settings.url.backend() {
        DatabaseBackend::Sqlite => {
            Arc::new(sqlite::SqliteStore::open(&settings.url, settings.max_connections).await?)
        }
        DatabaseBackend::Postgres => Arc::new(postgres::PgStore::open(settings).await?),
    })
}
