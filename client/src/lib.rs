//! `orbit-client`: the `orbit` command line for people who upload a lot.
//!
//! - [`cli`]: the commands and flags (clap), and `completions`.
//! - [`config`]: where the URL, token, organization and directory come from: flags, then
//!   `ORBIT_*` environment variables, then a profile file.
//! - [`api`]: the HTTP client: bearer auth, problem+json errors, retried reads, pagination.
//! - [`retry`]: exponential backoff with jitter, and `Retry-After`.
//! - [`upload`]: hashing, the derived idempotency key, the streamed multipart body, the wait
//!   for workers and the per-file report.
//! - [`resumable`]: big files over the server's resumable (tus) uploads, going on after a cut
//!   or a restart from the offset the server reports.
//! - [`preflight`]: the header check before a file is sent.
//! - [`progress`]: bars on a terminal, plain lines otherwise.
//! - [`commands`]: `watch`, `sources`, `errors`, `failed-rows`, `profiles`, `directories`.
//! - [`exit`]: errors and the exit codes they map to.
//!
//! ## CSV on the client
//!
//! The client reads CSV twice, both times with `csv-async` because both are naturally
//! asynchronous streams: the header of a file about to be uploaded (matched with the server's own
//! `orbit_core::domain::header` rules, so a column the client calls unmapped is one the server
//! keeps as a custom attribute), and the `failed-rows` download, parsed record by record as it
//! arrives and written to disk without holding it in memory.
//!
//! The server keeps its own csv-core splitter (`orbit_core::domain::csv`): planning chunks
//! needs the raw byte offset and physical line where every record starts, in the coordinates of
//! the original (possibly UTF-16 or windows-1252) bytes, so that a worker can re-read one byte
//! range on its own. `csv-async` hands out records, not the offsets of their raw bytes before
//! transcoding, so it cannot do that job; the client needs no offsets, only names and fields.
//! The dialect (encoding, BOM, delimiter) is settled on both sides by the same
//! `orbit_core::domain::csv::probe`.

pub mod api;
pub mod cli;
pub mod commands;
pub mod config;
pub mod exit;
pub mod preflight;
pub mod progress;
pub mod resumable;
pub mod retry;
pub mod upload;
