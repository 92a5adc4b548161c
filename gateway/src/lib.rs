//! `orbit-gateway`: the HTTP face of Orbit.
//!
//! - [`app`]: start-up, backend wiring, the router and graceful shutdown.
//! - [`auth`]: bearer tokens and the [`auth::Caller`] extractor that scopes every request.
//! - [`upload`]: the streaming `csv-upload` pipeline and idempotency.
//! - [`routes`]: directories, sources, errors, failed rows, profiles, health and metrics.
//! - [`observe`]: request ids, the access log and the HTTP metrics of every request.
//! - [`problem`]: RFC 9457 problem+json errors with stable codes.
//! - [`admin`]: the `admin` subcommands (bootstrap, organizations, directories, tokens).

pub mod admin;
pub mod app;
pub mod auth;
pub mod observe;
pub mod problem;
pub mod routes;
pub mod upload;
