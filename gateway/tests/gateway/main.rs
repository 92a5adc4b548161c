//! The gateway's HTTP and process suites, compiled as one test binary (one link instead of a
//! dozen, and `common` checked for dead code as a whole): each module is one suite.
//!
//! A new suite is a file in this directory plus a `mod` line below; it reaches the harness through
//! `crate::common` (not `mod common;`, which would compile the harness again). Run one
//! suite with `cargo test --workspace --test gateway -- upload::`; filters match test paths by
//! substring, so `api::` also matches `openapi::` (add `--skip openapi::`).
//!
//! `chaos` restarts the shared PostgreSQL: skip it on a machine others use
//! (`-- --skip chaos::`). `citus` stops and starts a node of the Citus cluster
//! (`deploy/citus.sh`), which every Citus test shares: keep it out of a run on Citus.

mod common;

mod api;
mod backlog;
mod chaos;
mod citus;
mod compressed;
mod export;
mod fairness;
mod hardening;
mod large;
mod limits;
mod logs;
mod merge;
mod metrics;
mod monitoring;
mod openapi;
mod process;
mod readme;
mod recovery;
mod resumable;
mod steer;
mod traces;
mod upload;
