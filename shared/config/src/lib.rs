//! `orbit-config`: Orbit's settings: built-in defaults, then an optional TOML file, then `ORBIT__SECTION__KEY`
//! environment variables, layered by the `config` crate.

use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use orbit_core::domain::row::RowRules;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub object_store: ObjectStoreSettings,
    pub queue: QueueSettings,
    pub ingest: IngestSettings,
    pub worker: WorkerSettings,
    pub idempotency: IdempotencySettings,
    pub telemetry: TelemetrySettings,
    pub webhooks: WebhookSettings,
    pub tenants: TenantSettings,
}

/// What one organization may take of the service: its share of the workers when several wait
/// (docs/concurrency.md, "Fair shares"), and the limits past which its uploads are refused
/// with `429` (docs/operations.md). `admin set-limits` overrides any of them per organization.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Whether a worker takes the chunk of whoever has had the least share lately (`true`),
    /// or the chunk its queue message names, first come first served (`false`).
    pub fair_scheduling: bool,
    /// An organization's share of the workers, against others waiting at the same time.
    pub default_weight: u32,
    /// Uploads of one organization admitted and not yet completed or failed; 0 is no limit.
    pub max_uploads_in_flight: u64,
    /// Rows of one organization's uploads not yet processed; 0 is no limit.
    pub max_queued_rows: u64,
    /// Uploads one organization may start in any minute; 0 is no limit.
    pub max_uploads_per_minute: u64,
    /// How many organizations the per-organization gauges show (those waiting longest); the
    /// rest are summed, so a dashboard's label set stays bounded whatever the tenant count.
    pub metrics_top: u32,
}

/// Delivery of signed webhook events from the outbox (docs/imports.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// How long one attempt may take, connect to last byte; longer is a failure.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Attempts per delivery before it is given up (`failed`).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each one after, up to `retry_max`.
    #[serde(with = "humantime_serde_compat")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub retry_max: Duration,
    /// Failed attempts in a row (across deliveries) after which an endpoint is disabled.
    pub disable_after: u32,
    /// How often a gateway looks for due deliveries when it found none.
    #[serde(with = "humantime_serde_compat")]
    pub poll_interval: Duration,
    /// Deliveries one gateway sends at once.
    pub concurrency: u32,
    /// Whether endpoints may be on private, loopback or link-local addresses.
    pub allow_private_targets: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
    /// Origin printed in hints and used in nothing else; empty means `http://{listen}`.
    pub public_url: String,
    /// Open client connections at most; clamped to half the process's file-descriptor limit so
    /// clients can never use up the descriptors the database, object store and logs need.
    pub max_connections: usize,
    /// A request's line and headers must arrive in full this long after the connection opened
    /// or the bytes of the request began.
    #[serde(with = "humantime_serde_compat")]
    pub header_timeout: Duration,
    /// A kept-alive connection with no request in progress is closed after this.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// A request body (or a response the client reads) must move `min_body_rate` bytes per
    /// second, measured over windows of this much waiting; a stalled body is cut after it.
    #[serde(with = "humantime_serde_compat")]
    pub body_timeout: Duration,
    /// Bytes per second a body must move, on average over `body_timeout`.
    pub min_body_rate: u64,
    /// Request line and headers, in bytes (`431`, or `414` for a request line alone).
    pub max_header_bytes: usize,
    /// Header lines per request (`431`).
    pub max_headers: usize,
    /// Body of any request but an upload (`413`); uploads have `ingest.max_upload_bytes`.
    pub max_body_bytes: usize,
    /// Uploads streaming at once; one more gets `503 too_many_uploads` with `Retry-After`.
    pub max_uploads: usize,
    /// On SIGTERM, how long in-flight requests may finish before they are cancelled.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    /// Where to serve `/metrics` alone (say `127.0.0.1:9100`); empty serves it on `listen`.
    pub metrics_listen: String,
    /// When set, `/metrics` wants `Authorization: Bearer <this>` (on either listener).
    pub metrics_token: String,
    /// The longest `x-request-id` a client may send; a longer or odd one is replaced.
    pub max_request_id_bytes: usize,
    /// How long a gateway keeps a token's record and a directory it looked up: a revocation or
    /// an archive made elsewhere holds here within this. Zero looks them up every request.
    #[serde(with = "humantime_serde_compat")]
    pub lookup_ttl: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://…` (embedded) or `postgres://…`.
    pub url: BackendUrl<DatabaseBackend>,
    pub max_connections: u32,
    /// PostgreSQL: the longest a statement waits for a lock (a commit waiting on another's
    /// identity claims) before its transaction is retried.
    #[serde(with = "humantime_serde_compat")]
    pub lock_timeout: Duration,
    /// PostgreSQL: a session idle inside a transaction this long (a frozen process) is ended by
    /// the server, which releases everything it held.
    #[serde(with = "humantime_serde_compat")]
    pub idle_in_transaction_timeout: Duration,
    /// PostgreSQL: the longest one statement of an import's commit may run. A process frozen
    /// in the middle of a `COPY` leaves its session active (the server waits for the data), so
    /// `idle_in_transaction_timeout` never applies: this ends the statement, and the idle
    /// timeout then ends the session. The duplicate scans that complete a source are exempt.
    #[serde(with = "humantime_serde_compat")]
    pub commit_statement_timeout: Duration,
    /// PostgreSQL: how long a transaction is retried after conflicts or while the database is
    /// unreachable, before the error counts as a failed attempt.
    #[serde(with = "humantime_serde_compat")]
    pub retry_for: Duration,
    /// Citus: how long a transaction is retried while the worker node holding its directory
    /// cannot be reached, before it fails (a request answers `503 directory_unavailable`; a
    /// worker gives the chunk back without counting an attempt). Short: the node is usually
    /// down for longer, and only that node's directories wait.
    #[serde(with = "humantime_serde_compat")]
    pub node_retry_for: Duration,
    /// PostgreSQL: a source of at least this many rows, once a worker completes it, has the
    /// tables it wrote analyzed, so that the next import into its directory is planned from
    /// statistics that know the directory's size. 0: never (autovacuum's own schedule only).
    pub analyze_after_rows: u64,
}

/// The database a `database.url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseBackend {
    Sqlite,
    Postgres,
}

/// The object store an `object_store.url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectStoreBackend {
    Local,
    S3,
}

/// The queue a `queue.url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueBackend {
    /// In-process: the gateway runs the workers itself.
    Embedded,
    RabbitMq,
}

/// How a backend is recognized from its URL.
pub trait Backend: Copy + PartialEq + std::fmt::Debug {
    /// The setting, for messages.
    const SETTING: &'static str;
    /// What it accepts, for messages.
    const EXPECTED: &'static str;
    /// The backend of the URL's scheme (the text before the first `:`).
    fn from_scheme(scheme: &str) -> Option<Self>;
}

impl Backend for DatabaseBackend {
    const SETTING: &'static str = "database.url";
    const EXPECTED: &'static str = "sqlite:// or postgres://";
    fn from_scheme(scheme: &str) -> Option<Self> {
        match scheme {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }
}

impl Backend for ObjectStoreBackend {
    const SETTING: &'static str = "object_store.url";
    const EXPECTED: &'static str = "file:// or s3://";
    fn from_scheme(scheme: &str) -> Option<Self> {
        match scheme {
            "file" => Some(Self::Local),
            "s3" => Some(Self::S3),
            _ => None,
        }
    }
}

impl Backend for QueueBackend {
    const SETTING: &'static str = "queue.url";
    const EXPECTED: &'static str = "embedded or amqp://";
    fn from_scheme(scheme: &str) -> Option<Self> {
        match scheme {
            "embedded" => Some(Self::Embedded),
            "amqp" | "amqps" => Some(Self::RabbitMq),
            _ => None,
        }
    }
}

/// A backend's URL, with the backend it names decided once, when the configuration is read:
/// an unknown scheme fails the load, and code asks [`BackendUrl::backend`] rather than
/// comparing strings. Reads as the URL's text (`&*url`, `as_str`).
#[derive(Clone, PartialEq, Eq)]
pub struct BackendUrl<B> {
    url: String,
    backend: B,
}

impl<B: Backend> BackendUrl<B> {
    pub fn backend(&self) -> B {
        self.backend
    }

    pub fn as_str(&self) -> &str {
        &self.url
    }
}

impl<B: Backend> std::str::FromStr for BackendUrl<B> {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let scheme = url.split(':').next().unwrap_or_default();
        let backend = B::from_scheme(scheme).ok_or_else(|| {
            format!(
                "{} {:?}: unsupported scheme {scheme:?} (expected {})",
                B::SETTING,
                orbit_core::redact::redact(url),
                B::EXPECTED
            )
        })?;
        Ok(BackendUrl {
            url: url.to_owned(),
            backend,
        })
    }
}

impl<B> std::ops::Deref for BackendUrl<B> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.url
    }
}

impl<B> std::fmt::Display for BackendUrl<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Masks a password, as logs do: settings are printed with `{:?}` in places.
impl<B> std::fmt::Debug for BackendUrl<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&orbit_core::redact::redact(&self.url), f)
    }
}

impl<B> PartialEq<&str> for BackendUrl<B> {
    fn eq(&self, other: &&str) -> bool {
        self.url == *other
    }
}

impl<B> Serialize for BackendUrl<B> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.url)
    }
}

impl<'de, B: Backend> Deserialize<'de> for BackendUrl<B> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl IngestSettings {
    /// The rules rows are judged by under these settings: the gateway's for the rows of the
    /// request, and what it records with each source for the workers.
    pub fn row_rules(&self) -> RowRules {
        RowRules {
            max_field_bytes: self.max_field_bytes,
            default_region: self.default_region.id(),
        }
    }
}

/// An ISO 3166-1 region code such as `US`, parsed when the configuration is read, so that an
/// unknown one stops the process at start-up and nothing parses it again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region(rlibphonenumber::Region);

impl Region {
    pub fn id(self) -> rlibphonenumber::Region {
        self.0
    }

    /// The code as written in configuration and recorded with sources (`US`).
    pub fn code(&self) -> String {
        self.0.to_string()
    }
}

impl std::str::FromStr for Region {
    type Err = String;

    fn from_str(code: &str) -> Result<Self, String> {
        orbit_core::domain::normalize::parse_region(code)
            .map(Region)
            .ok_or_else(|| format!("{code:?} is not an ISO 3166 region code"))
    }
}

impl Serialize for Region {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.code())
    }
}

impl<'de> Deserialize<'de> for Region {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl DatabaseSettings {
    /// The default settings for the database at `url`, with a pool of `max_connections`.
    ///
    /// # Panics
    /// When `url` names no database Orbit knows: callers pass literal test URLs.
    pub fn for_url(url: &str, max_connections: u32) -> Self {
        DatabaseSettings {
            url: url.parse().unwrap_or_else(|e| panic!("{e}")),
            max_connections,
            ..Settings::defaults().database
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreSettings {
    /// `file://…` (embedded) or `s3://bucket[/prefix]`.
    pub url: BackendUrl<ObjectStoreBackend>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    /// `embedded` (in-process) or `amqp://…`.
    pub url: BackendUrl<QueueBackend>,
    /// Name of the work queue (the dead-letter queue is `{name}.dead`).
    pub name: String,
    /// RabbitMQ: times one message may go back to the queue unacknowledged (its consumer died)
    /// before it is dead-lettered to `{name}.dead`: the queue's `x-delivery-limit`, fixed when
    /// the queue is first declared.
    pub delivery_limit: u32,
    /// RabbitMQ: how long `publish` keeps reconnecting to a lost broker before it fails.
    #[serde(with = "humantime_serde_compat")]
    pub reconnect_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    pub sync_rows: u64,
    pub chunk_rows: u64,
    /// The largest file, in bytes, once decompressed: what is stored and read.
    pub max_upload_bytes: u64,
    /// The most bytes of a gzip or zstd file received before it is refused, whatever it
    /// decompresses to (`413 upload_too_large`).
    pub max_compressed_upload_bytes: u64,
    /// The largest zstd window accepted, as a power of two (23: 8 MiB, the limit RFC 9659 sets
    /// for HTTP). The window is memory the gateway holds per upload; a frame asking for more
    /// (`zstd --long`) is refused with `422 invalid_compression`.
    pub max_zstd_window_log: u32,
    pub max_field_bytes: usize,
    pub max_columns: usize,
    pub max_header_bytes: usize,
    /// The longest `mapping` form field of an upload, in bytes (`400 invalid_request`).
    pub max_mapping_bytes: usize,
    /// The longest `merge` form field (an upload's merge rules) accepted.
    pub max_merge_bytes: usize,
    /// ISO 3166 region used for phone numbers written without a country code; parsed (and so
    /// checked) when the configuration is read.
    pub default_region: Region,
    /// An upload still streaming after this long is cut (`408 upload_timeout`); a partial
    /// object or multipart upload older than this that no live request owns is swept away.
    #[serde(with = "humantime_serde_compat")]
    pub max_upload_duration: Duration,
    /// How often the gateway sweeps abandoned partial objects (also once at start-up), expires
    /// resumable uploads and removes the parts of ended ones.
    #[serde(with = "humantime_serde_compat")]
    pub sweep_interval: Duration,
    /// A resumable upload that receives no bytes for this long expires: its parts are removed
    /// and it answers `410 upload_expired`.
    #[serde(with = "humantime_serde_compat")]
    pub resumable_ttl: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Chunks one worker process runs at once; 0 means the number of cores.
    pub concurrency: usize,
    /// Rows a worker holds and commits at once: it commits each chunk in slices of this many
    /// rows, each in its own transaction, so its memory follows this rather than
    /// `ingest.chunk_rows`. A takeover after a crash resumes after the last committed slice.
    pub slice_rows: u64,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde_compat")]
    pub lease: Duration,
    /// How long a chunk may keep failing for transient reasons (storage, network, database
    /// trouble) before those failures count toward `max_attempts`.
    #[serde(with = "humantime_serde_compat")]
    pub transient_retry_for: Duration,
    /// How often a worker process tells the database it is alive.
    #[serde(with = "humantime_serde_compat")]
    pub heartbeat_interval: Duration,
    /// A process silent this long is presumed dead, and its chunks are taken over.
    #[serde(with = "humantime_serde_compat")]
    pub liveness_timeout: Duration,
    /// How often the reaper looks for chunks that lost their message or their worker.
    #[serde(with = "humantime_serde_compat")]
    pub reap_interval: Duration,
    /// A pending chunk queued longer ago than this is published again.
    #[serde(with = "humantime_serde_compat")]
    pub requeue_after: Duration,
    /// Where `orbit-worker` serves `/metrics` and `/healthz`; empty turns it off.
    pub metrics_listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySettings {
    #[serde(with = "humantime_serde_compat")]
    pub ttl: Duration,
    /// An in-flight key older than this is presumed abandoned (its request died) and may be taken over.
    #[serde(with = "humantime_serde_compat")]
    pub in_flight_timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Where to send traces (OTLP), as a base URL like `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (`/v1/traces` is appended for HTTP). Unset: the `OTEL_EXPORTER_OTLP_*` variables decide,
    /// and with none of them set nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Unset: `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    pub otlp_protocol: Option<OtlpProtocol>,
    /// The `service.name` of this process's spans. Unset: `OTEL_SERVICE_NAME` (or a
    /// `service.name` in `OTEL_RESOURCE_ATTRIBUTES`), else the binary's name.
    pub service_name: Option<String>,
    /// The share of new traces kept (0 to 1), parent-based: a trace begun elsewhere keeps its
    /// own decision. Unset: `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`, else every trace.
    pub sampling_ratio: Option<f64>,
    pub log_format: LogFormat,
    /// How old the gauges that mirror the database and the broker (sources by status, open
    /// chunks, queue depth …) may be when `/metrics` is scraped: a scrape within this of the
    /// last refresh serves the cached values, so many replicas scraped often cost the
    /// database a few queries per interval, not a few per scrape. `0s` refreshes every scrape.
    #[serde(with = "humantime_serde_compat")]
    pub gauges_refresh: Duration,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The protocol named the way `OTEL_EXPORTER_OTLP_PROTOCOL` names it.
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim() {
            "grpc" => Some(OtlpProtocol::Grpc),
            "http/protobuf" => Some(OtlpProtocol::HttpProtobuf),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Durations are written the human way (`24h`, `30s`, `500ms`) in TOML and the environment.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

const DEFAULTS: &str = r#"
[http]
listen = "127.0.0.1:8080"
public_url = ""
max_connections = 4096
header_timeout = "20s"
idle_timeout = "60s"
body_timeout = "30s"
min_body_rate = 1024
max_header_bytes = 32768
max_headers = 100
max_body_bytes = 2097152
max_uploads = 32
shutdown_grace = "30s"
metrics_listen = ""
metrics_token = ""
max_request_id_bytes = 128
lookup_ttl = "1s"

[database]
url = "sqlite://./data/orbit.db"
max_connections = 16
lock_timeout = "15s"
idle_in_transaction_timeout = "30s"
commit_statement_timeout = "10s"
retry_for = "2m"
node_retry_for = "2s"
analyze_after_rows = 10000

[object_store]
url = "file://./data/objects"

[queue]
url = "embedded"
name = "orbit.chunks"
delivery_limit = 20
reconnect_timeout = "30s"

[ingest]
sync_rows = 1000
chunk_rows = 10000
max_upload_bytes = 1073741824
max_compressed_upload_bytes = 1073741824
max_zstd_window_log = 23
max_field_bytes = 8192
max_columns = 512
max_header_bytes = 65536
max_mapping_bytes = 262144
max_merge_bytes = 65536
default_region = "US"
max_upload_duration = "24h"
sweep_interval = "15m"
resumable_ttl = "24h"

[worker]
concurrency = 0
slice_rows = 750
max_attempts = 5
lease = "60s"
transient_retry_for = "15m"
heartbeat_interval = "1s"
liveness_timeout = "5s"
reap_interval = "2s"
requeue_after = "5m"
metrics_listen = ""

[idempotency]
ttl = "24h"
in_flight_timeout = "1h"

[telemetry]
log_format = "text"
gauges_refresh = "10s"

[webhooks]
timeout = "10s"
max_attempts = 12
retry_base = "5s"
retry_max = "1h"
disable_after = 50
poll_interval = "1s"
concurrency = 16
allow_private_targets = false

[tenants]
fair_scheduling = true
default_weight = 1
max_uploads_in_flight = 1000
max_queued_rows = 100000000
max_uploads_per_minute = 0
metrics_top = 10
"#;

impl Settings {
    /// Defaults, then `file` (or `ORBIT_CONFIG`) if given, then `ORBIT__SECTION__KEY` variables.
    pub fn load(file: Option<&str>) -> anyhow::Result<Self> {
        let env_file = std::env::var("ORBIT_CONFIG").ok();
        let file = file.map(str::to_owned).or(env_file);
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = &file {
            builder = builder.add_source(config::File::new(path, config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("ORBIT")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .with_context(|| match &file {
                Some(path) => format!("invalid configuration (file {path} and ORBIT__* variables)"),
                None => "invalid configuration (ORBIT__* variables)".to_owned(),
            })?;
        settings.validate()?;
        Ok(settings)
    }

    /// The embedded defaults with no file and no environment: what tests build on.
    pub fn defaults() -> Self {
        config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("built-in defaults deserialize")
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.webhooks.max_attempts > 0
                && self.webhooks.disable_after > 0
                && self.webhooks.concurrency > 0,
            "webhooks.max_attempts, webhooks.disable_after and webhooks.concurrency must be at least 1"
        );
        anyhow::ensure!(
            !self.webhooks.timeout.is_zero() && !self.webhooks.poll_interval.is_zero(),
            "webhooks.timeout and webhooks.poll_interval must be more than zero"
        );
        anyhow::ensure!(
            self.ingest.chunk_rows > 0,
            "ingest.chunk_rows must be at least 1"
        );
        anyhow::ensure!(
            self.worker.slice_rows > 0,
            "worker.slice_rows must be at least 1"
        );
        anyhow::ensure!(
            self.ingest.max_field_bytes > 0,
            "ingest.max_field_bytes must be at least 1"
        );
        anyhow::ensure!(
            self.ingest.max_columns > 0,
            "ingest.max_columns must be at least 1"
        );
        anyhow::ensure!(
            !self.ingest.max_upload_duration.is_zero()
                && !self.ingest.sweep_interval.is_zero()
                && !self.ingest.resumable_ttl.is_zero(),
            "ingest.max_upload_duration, ingest.sweep_interval and ingest.resumable_ttl must be longer than 0s"
        );
        anyhow::ensure!(
            (10..=31).contains(&self.ingest.max_zstd_window_log),
            "ingest.max_zstd_window_log must be between 10 and 31"
        );
        let http = &self.http;
        anyhow::ensure!(
            http.max_connections > 0 && http.max_uploads > 0,
            "http.max_connections and http.max_uploads must be at least 1"
        );
        anyhow::ensure!(
            !http.header_timeout.is_zero()
                && !http.idle_timeout.is_zero()
                && !http.body_timeout.is_zero(),
            "http.header_timeout, http.idle_timeout and http.body_timeout must be longer than 0s"
        );
        anyhow::ensure!(
            http.max_header_bytes >= 1024 && http.max_headers > 0,
            "http.max_header_bytes must be at least 1024 and http.max_headers at least 1"
        );
        anyhow::ensure!(
            self.worker.max_attempts > 0,
            "worker.max_attempts must be at least 1"
        );
        anyhow::ensure!(
            self.worker.liveness_timeout > self.worker.heartbeat_interval,
            "worker.liveness_timeout must be longer than worker.heartbeat_interval"
        );
        anyhow::ensure!(
            self.tenants.default_weight > 0,
            "tenants.default_weight must be at least 1"
        );
        let telemetry = &self.telemetry;
        if let Some(ratio) = telemetry.sampling_ratio {
            anyhow::ensure!(
                (0.0..=1.0).contains(&ratio),
                "telemetry.sampling_ratio must be between 0 and 1, not {ratio}"
            );
        }
        if let Some(endpoint) = &telemetry.otlp_endpoint {
            let scheme = url::Url::parse(endpoint).map(|u| u.scheme().to_owned());
            anyhow::ensure!(
                matches!(scheme.as_deref(), Ok("http" | "https")),
                "telemetry.otlp_endpoint {:?} is not an http:// or https:// URL",
                orbit_core::redact::redact(endpoint)
            );
        }
        if let Some(name) = &telemetry.service_name {
            anyhow::ensure!(
                !name.trim().is_empty(),
                "telemetry.service_name must not be empty"
            );
        }
        Ok(())
    }

    pub fn worker_concurrency(&self) -> usize {
        match self.worker.concurrency {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    pub fn public_url(&self) -> String {
        if self.http.public_url.is_empty() {
            format!("http://{}", self.http.listen)
        } else {
            self.http.public_url.trim_end_matches('/').to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_values() {
        let s = Settings::defaults();
        assert_eq!(s.http.listen, "127.0.0.1:8080");
        assert_eq!(s.database.url, "sqlite://./data/orbit.db");
        assert_eq!(s.object_store.url, "file://./data/objects");
        assert_eq!(s.queue.url, "embedded");
        assert_eq!(s.ingest.sync_rows, 1000);
        assert_eq!(s.ingest.chunk_rows, 10000);
        assert_eq!(s.ingest.max_upload_bytes, 1 << 30);
        assert_eq!(s.ingest.max_field_bytes, 8 << 10);
        assert_eq!(s.idempotency.ttl, Duration::from_secs(24 * 3600));
        assert!(s.telemetry.otlp_endpoint.is_none());
        assert!(s.telemetry.otlp_protocol.is_none() && s.telemetry.sampling_ratio.is_none());
        assert!(s.http.header_timeout <= Duration::from_secs(30));
        assert!(s.http.idle_timeout <= Duration::from_secs(60));
        assert_eq!(s.http.max_uploads, 32);
        assert_eq!(s.http.shutdown_grace, Duration::from_secs(30));
        assert!(s.http.metrics_listen.is_empty() && s.http.metrics_token.is_empty());
        assert!(s.tenants.fair_scheduling);
        assert_eq!(s.tenants.default_weight, 1);
        assert_eq!(s.tenants.max_uploads_per_minute, 0);
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orbit.toml");
        std::fs::write(&path, "[ingest]\nsync_rows = 5\nchunk_rows = 7\n").unwrap();
        // Only this test sets this variable, so parallel tests do not see it.
        std::env::set_var("ORBIT__INGEST__CHUNK_ROWS", "9");
        let s = Settings::load(Some(path.to_str().unwrap())).unwrap();
        std::env::remove_var("ORBIT__INGEST__CHUNK_ROWS");
        assert_eq!(s.ingest.sync_rows, 5);
        assert_eq!(s.ingest.chunk_rows, 9);
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orbit.toml");
        std::fs::write(&path, "[ingest]\nsync_rowz = 5\n").unwrap();
        let err = Settings::load(Some(path.to_str().unwrap())).unwrap_err();
        assert!(format!("{err:#}").contains("sync_rowz"), "{err:#}");
    }

    #[test]
    fn backends_are_decided_as_the_configuration_loads() {
        let s = Settings::defaults();
        assert_eq!(s.database.url.backend(), DatabaseBackend::Sqlite);
        assert_eq!(s.object_store.url.backend(), ObjectStoreBackend::Local);
        assert_eq!(s.queue.url.backend(), QueueBackend::Embedded);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orbit.toml");
        std::fs::write(
            &path,
            "[database]\nurl = \"mysql://orbit:secret@db/orbit\"\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            Settings::load(Some(path.to_str().unwrap())).unwrap_err()
        );
        assert!(
            err.contains("unsupported scheme \"mysql\" (expected sqlite:// or postgres://)"),
            "{err}"
        );
        assert!(!err.contains("secret"), "the password is masked: {err}");
        std::fs::write(&path, "[queue]\nurl = \"amqps://mq/%2f\"\n").unwrap();
        let s = Settings::load(Some(path.to_str().unwrap())).unwrap();
        assert_eq!(s.queue.url.backend(), QueueBackend::RabbitMq);
        assert_eq!(s.queue.url.as_str(), "amqps://mq/%2f");
    }

    #[test]
    fn the_default_region_is_parsed_as_the_configuration_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orbit.toml");
        std::fs::write(&path, "[ingest]\ndefault_region = \"ZZ\"\n").unwrap();
        let err = Settings::load(Some(path.to_str().unwrap())).unwrap_err();
        assert!(
            format!("{err:#}").contains("\"ZZ\" is not an ISO 3166 region code"),
            "{err:#}"
        );
        std::fs::write(&path, "[ingest]\ndefault_region = \"gb\"\n").unwrap();
        let s = Settings::load(Some(path.to_str().unwrap())).unwrap();
        assert_eq!(s.ingest.default_region.code(), "GB");
        assert_eq!(
            s.ingest.row_rules().default_region,
            s.ingest.default_region.id()
        );
    }

    #[test]
    fn telemetry_settings_are_checked() {
        let mut s = Settings::defaults();
        s.telemetry.sampling_ratio = Some(1.5);
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("sampling_ratio"));
        s.telemetry.sampling_ratio = Some(0.25);
        s.telemetry.otlp_endpoint = Some("collector:4317".into());
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("otlp_endpoint"));
        s.telemetry.otlp_endpoint = Some("http://collector:4318".into());
        s.validate().unwrap();
        let protocol: OtlpProtocol = serde_json::from_str("\"http/protobuf\"").unwrap();
        assert_eq!(protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(OtlpProtocol::parse("grpc"), Some(OtlpProtocol::Grpc));
        assert_eq!(OtlpProtocol::parse("http/json"), None);
    }
}
