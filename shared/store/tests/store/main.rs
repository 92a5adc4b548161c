//! The store's suites, compiled as one test binary: each module is one suite, and every case
//! of `conformance` and `steering` runs on SQLite (a temporary file), on PostgreSQL (a fresh
//! database per test on `ORBIT_TEST_POSTGRES_URL`) and on Citus (a fresh schema per test on
//! `ORBIT_TEST_CITUS_URL`, the cluster of deploy/citus.sh), each dropped afterwards.
//!
//! - `conformance`: the store's roles, as the gateway and the workers use them.
//! - `steering`: cancelling sources, dry runs and the webhook outbox.
//! - `limits`: per-organization limits and the admission of uploads under them.
//! - `resumable`: resumable uploads' parts, generations, expiry and clean-up.
//! - `split_detector`: concurrent commits into one directory against a serial replay
//!   (docs/concurrency.md), on PostgreSQL and on Citus.

#[macro_use]
mod common;

mod conformance;
mod limits;
mod resumable;
mod split_detector;
mod steering;
