//! `orbit-gateway`: the HTTP face of Orbit.
//!
//! - [`app`]: start-up, backend wiring, the router and graceful shutdown in steps.
//! - [`background`]: the composition root of every task beside the requests (server, sweep,
//!   webhook dispatcher, worker or reaper, heartbeat), spawned in one place and awaited in
//!   order at shutdown.
//! - [`auth`]: bearer tokens and the [`auth::Caller`] extractor that scopes every request.
//! - [`upload`]: `csv-upload`: the handler reading the multipart form, the idempotency key
//!   (`upload/idempotency.rs`), and the hash, object write, planning, commit and publish
//!   (`upload/pipeline.rs`), which take bytes rather than requests so they carry no HTTP.
//! - [`routes`]: directories, sources, errors, failed rows, profiles, health and metrics,
//!   with the [`routes::ScopedDirectory`] and [`routes::ScopedSource`] extractors that scope
//!   a path's ids to the caller's organization.
//! - [`server`]: the accept loop under the router, with its connection cap and shutdown in
//!   steps; the connection registry and the header and idle deadlines
//!   (`server/connections.rs`); the guards on raw bytes, such as head-size limits
//!   (`server/wire.rs`).
//! - [`types`]: request and response bodies and validators shared by routes, the upload and
//!   `admin`, so that none borrows them from another.
//! - [`guard`]: the router's outer middleware: request bodies keep moving, framework errors
//!   become problem+json.
//! - [`metrics`]: what the gateway counts (requests, upload bytes, webhook attempts).
//! - [`observe`]: request ids, the access log and the HTTP metrics of every request.
//! - [`recent`]: token records and directories kept for `http.lookup_ttl`, so that a request
//!   need not query them each time.
//! - [`problem`]: RFC 9457 problem+json errors with stable codes ([`problem::CODES`], the
//!   list docs/api.md and `openapi.json` must cover).
//! - [`webhooks`]: the dispatcher that sends signed webhook events from the outbox.
//! - [`admin`]: the `admin` subcommands (bootstrap, organizations, directories, tokens), which
//!   never create a database.
//!
//! The command line (`serve`, `migrate`, `admin …`) is `src/main.rs`; the OpenAPI document
//! served at `/openapi.json` is `openapi.json` beside `src/`; the in-process worker of the
//! embedded deployment is `orbit-worker`'s, started by [`app::start`].

pub mod admin;
pub mod app;
pub mod auth;
pub mod background;
pub mod guard;
pub mod metrics;
pub mod observe;
pub mod problem;
pub mod recent;
pub mod routes;
pub mod server;
pub mod types;
pub mod upload;
pub mod webhooks;
