//! Process liveness: every process that holds leases or idempotency claims heartbeats into the
//! store, so that what a dead process held is released in seconds instead of when its timeout
//! runs out (docs/concurrency.md).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use orbit_store::Liveness;

/// A name for this process that no other process, here or on another machine, will have.
pub fn process_name(role: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!(
        "{role}/{host}/{}/{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    )
}

/// Heartbeats as `owner` every `interval`, each good for `valid_for`, until `stop`; then
/// retires the process. A failed heartbeat is logged and tried again at the next tick.
pub async fn keep_alive(
    store: Arc<dyn Liveness>,
    owner: String,
    interval: Duration,
    valid_for: Duration,
    stop: CancellationToken,
) {
    loop {
        if let Err(e) = store.heartbeat(&owner, valid_for).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    if let Err(e) = store.retire(&owner).await {
        tracing::warn!(error = %e, "could not retire this process; its row expires on its own");
    }
}
