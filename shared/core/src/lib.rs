//! `orbit-core`: the rules Orbit applies to a file and to profiles, as pure functions and
//! plain data. No I/O, no async runtime, no database, broker or object-store client: the
//! `orbit` upload client depends on this crate alone, so it and the server agree on the rules.
//!
//! - [`domain`]: the CSV rules (splitting with byte offsets, header aliases, normalization,
//!   row validation) and profile resolution. The contract they implement is docs/api.md.
//! - [`ingest`]: the upload side of a file: dialect, header, synchronous prefix, chunk plan.
//! - [`model`]: the records passed between layers and stored by backends.
//! - [`views`]: the JSON bodies of a source, served by the API and sent by webhooks.
//! - [`redact`]: passwords in URLs masked before any text leaves the process.

pub mod domain;
pub mod ingest;
pub mod model;
pub mod redact;
pub mod views;
