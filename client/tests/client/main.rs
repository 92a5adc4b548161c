//! The `orbit` client's suites, compiled as one test binary: the built binary against a real
//! embedded gateway.
//!
//! - `cli`: what a user types, what they see, and what ends up on the server, directly and
//!   through a proxy that breaks connections.
//! - `resumable`: big files over resumable uploads, through a link that drops every 50 MB
//!   and across a restart of `orbit` itself.
//! - `steering`: `orbit upload --mapping/--merge/--dry-run` and `orbit cancel`.

mod common;

mod cli;
mod compress;
mod export;
mod resumable;
mod steering;
