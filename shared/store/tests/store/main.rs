//! The store's suites, compiled as one test binary: each module is one suite, and every case
//! of `conformance` and `steering` runs on SQLite (a temporary file) and on PostgreSQL (a
//! fresh database per test on `ORBIT_TEST_POSTGRES_URL`, dropped afterwards).
//!
//! - `conformance`: the store's roles, as the gateway and the workers use them.
//! - `steering`: cancelling sources, dry runs and the webhook outbox.
//! - `split_detector`: concurrent commits into one PostgreSQL directory against a serial
//!   replay (docs/concurrency.md).

#[macro_use]
mod common;

mod conformance;
mod split_detector;
mod steering;
