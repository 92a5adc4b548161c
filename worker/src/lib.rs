//! `orbit-worker`: turns queued chunks into records and profiles.
//!
//! - [`metrics`]: what the worker counts (chunks, rows, failed attempts, leases lost, republishes).
//! - [`process`]: reads one chunk's byte range back from the object store and validates its rows
//!   with the same rules the gateway applies to the synchronous prefix.
//! - [`runtime`]: the consumer loop (claim, heartbeat, commit under the lease, ack) and the
//!   reaper that re-publishes chunks whose message or worker was lost (also run alone by
//!   gateways on a broker, so recovery needs no worker).
//! - `schedule`: which chunk a message makes the worker take: fair shares across
//!   organizations and their directories, or the message's own chunk.
//!
//! The embedded deployment runs this inside the gateway process; `orbit-worker` runs it alone.

pub mod metrics;
pub mod process;
pub mod runtime;
mod schedule;

pub use runtime::{Worker, WorkerHandle};
