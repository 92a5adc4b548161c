//! `orbit-shared`: everything the gateway and the workers have in common. Nothing here serves
//! HTTP (that is `orbit-gateway`) or runs the chunk loop (that is `orbit-worker`).
//!
//! - [`config`]: settings from defaults, a TOML file and `ORBIT__` variables, checked and
//!   parsed as they load (backend URLs into [`config::DatabaseBackend`] and its siblings, the
//!   default region, the row rules of [`config::IngestSettings::row_rules`]).
//! - [`domain`]: the CSV rules (splitting, header aliases, normalization, row validation) and
//!   profile resolution; pure functions, no I/O. The contract they implement is docs/api.md.
//! - [`ingest`]: the upload side of a file: dialect, header, synchronous prefix, chunk plan.
//! - [`model`]: the records passed between layers and stored by backends.
//! - [`store`]: the database trait and its backends, [`store::sqlite`] (embedded) and
//!   [`store::postgres`] (distributed).
//! - [`blob`]: the object store trait and its backends, a local directory and S3.
//! - [`queue`]: the work queue trait and its backends, in-process and RabbitMQ.
//! - [`backends`]: the store, blob store and queue a process opens from its settings, and the
//!   readiness check over the three.
//! - [`liveness`]: the heartbeat that lets others release what a dead process held.
//! - [`redact`]: passwords in URLs masked before any text leaves the process.
//! - [`telemetry`]: logs (text or JSON, redacted), OTLP traces, fatal-error reporting.
//! - [`views`]: the JSON bodies of a source, served by the API and sent by webhooks.
//! - [`metrics`]: the Prometheus registry shared by gateway and worker.
//! - `testing` (feature `testing`): fixtures for tests against the distributed backends.

pub mod backends;
pub mod blob;
pub mod config;
pub mod domain;
pub mod ingest;
pub mod liveness;
pub mod metrics;
pub mod model;
pub mod queue;
pub mod redact;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod views;
