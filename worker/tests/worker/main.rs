//! The worker's suites, compiled as one test binary.
//!
//! - `lease`: a chunk's lease is renewed only while a worker works on it.
//! - `readiness`: `orbit-worker`'s `/healthz` and `/readyz`, as an orchestrator probes them.

mod lease;
mod readiness;
