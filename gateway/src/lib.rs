//! `orbit-gateway`: the HTTP face of Orbit.
//!
//! - [`app`]: start-up, backend wiring, the router and graceful shutdown.
//! - [`auth`]: bearer tokens and the [`auth::Caller`] extractor that scopes every request.
//! - [`upload`]: the streaming `csv-upload` pipeline and idempotency.
//! - [`routes`]: directories, sources, errors, failed rows, profiles, health and metrics.
//! - [`server`]: the accept loop under the router: connection cap, header and idle deadlines,
//!   head-size limits, shutdown in steps.
//! - [`guard`]: the router's outer middleware: request bodies keep moving, framework errors
//!   become problem+json.
//! - [`observe`]: request ids, the access log and the HTTP metrics of every request.
//! - [`problem`]: RFC 9457 problem+json errors with stable codes.
//! - [`webhooks`]: the dispatcher that sends signed webhook events from the outbox.
//! - [`admin`]: the `admin` subcommands (bootstrap, organizations, directories, tokens).

pub mod admin;
pub mod app;
pub mod auth;
pub mod guard;
pub mod observe;
pub mod problem;
pub mod routes;
pub mod server;
pub mod upload;
pub mod webhooks;
