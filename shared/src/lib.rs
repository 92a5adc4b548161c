//! `orbit-shared`: everything the gateway and the workers have in common.
//!
//! - [`backends`]: the store, blob store and queue a process opens from its settings.
//! - [`config`]: settings from defaults, a TOML file and `ORBIT__` variables.
//! - [`domain`]: the CSV rules, normalization, validation and profile resolution; no I/O.
//! - [`liveness`]: the heartbeat that lets others release what a dead process held.
//! - [`ingest`]: the upload side of a file: dialect, header, synchronous prefix, chunk plan.
//! - [`model`]: the records passed between layers and stored by backends.
//! - [`store`]: the database trait and its SQLite backend.
//! - [`blob`]: the object store trait and its local-directory backend.
//! - [`queue`]: the work queue trait and its in-process backend.
//! - [`redact`]: passwords in URLs masked before any text leaves the process.
//! - [`telemetry`]: logging set-up (text or JSON, redacted) and fatal-error reporting.
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
