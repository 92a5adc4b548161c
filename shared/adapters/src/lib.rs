//! `orbit-adapters`: what a process talks to besides its database, and what it tells
//! operators. Each backend trait has its implementations beside it.
//!
//! - [`blob`]: the object store trait and its backends, a local directory and S3.
//! - [`queue`]: the work queue trait and its backends, in-process and RabbitMQ.
//! - [`backends`]: the store, blob store and queue a process opens from its settings, and the
//!   readiness check over the three.
//! - [`liveness`]: the heartbeat that lets others release what a dead process held.
//! - [`telemetry`]: logs (text or JSON, redacted), OTLP traces, fatal-error reporting.
//! - [`metrics`]: the queue's metrics, the build's, and the text every `/metrics` serves.

pub mod backends;
pub mod blob;
pub mod liveness;
pub mod metrics;
pub mod queue;
pub mod telemetry;
