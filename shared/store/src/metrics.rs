//! The store's metrics, in the process's default Prometheus registry: transactions tried
//! again and leases taken over (counted by the backends as they happen), and the gauges that
//! mirror the database (sources by status, failed sources by code, open chunks), set from
//! [`Stats`] by [`mirror`] (the caller decides how often: `orbit_adapters::backends::MetricsPage`
//! caches them for `telemetry.gauges_refresh`).
//!
//! Label values come from fixed sets only: a value a client could choose would let it create
//! series without bound.

use std::sync::LazyLock;

use orbit_core::model::{SourceStatus, CANCELLED};
use prometheus::{
    register_int_counter_vec, register_int_gauge, register_int_gauge_vec, IntCounterVec, IntGauge,
    IntGaugeVec,
};

use crate::Stats;

pub struct StoreMetrics {
    pub commit_retries: IntCounterVec,
    pub leases_taken_over: IntCounterVec,
    pub sources: IntGaugeVec,
    pub sources_failed: IntGaugeVec,
    pub chunks_open: IntGauge,
}

/// The `error_code`s a source fails with; [`OTHER`] stands for any other.
pub const SOURCE_ERROR_CODES: [&str; 4] = [
    "chunk_poisoned",
    "object_missing",
    "row_count_mismatch",
    CANCELLED,
];

/// The label value standing for every value outside a label's fixed set.
pub const OTHER: &str = "other";

pub static METRICS: LazyLock<StoreMetrics> = LazyLock::new(|| {
    let commit_retries = register_int_counter_vec!(
        "orbit_commit_retries_total",
        "Database transactions tried again, by reason: conflict (a concurrent commit won a lock or a deadlock was broken) unavailable (the database could not be reached) or node_unavailable (a Citus worker node could not be reached)",
        &["reason"]
    )
    .expect("metric registered once");
    let leases_taken_over = register_int_counter_vec!(
        "orbit_leases_taken_over_total",
        "Chunks claimed from another worker, by why its lease was void: owner_dead (its process stopped heartbeating) or expired",
        &["reason"]
    )
    .expect("metric registered once");
    for reason in ["owner_dead", "expired"] {
        leases_taken_over.with_label_values(&[reason]);
    }
    let sources = register_int_gauge_vec!("orbit_sources", "Sources by status", &["status"])
        .expect("metric registered once");
    let sources_failed = register_int_gauge_vec!(
        "orbit_sources_failed",
        "Failed sources by error code, from the database",
        &["code"]
    )
    .expect("metric registered once");
    let chunks_open = register_int_gauge!(
        "orbit_chunks_open",
        "Chunks not yet done (pending or running)"
    )
    .expect("metric registered once");
    StoreMetrics {
        commit_retries,
        leases_taken_over,
        sources,
        sources_failed,
        chunks_open,
    }
});

/// Registers the store's metrics, so a scrape shows them before anything has counted.
pub fn register() {
    LazyLock::force(&METRICS);
}

/// Sets the database-mirroring gauges from `stats`; whether every count was read. A count
/// that could not be read keeps its previous value.
pub async fn mirror(stats: &dyn Stats) -> bool {
    let m = &*METRICS;
    let (failed, open, by_status) = tokio::join!(
        stats.count_failed_sources_by_code(),
        stats.count_pending_chunks(),
        stats.count_sources_by_status()
    );
    let mut complete = true;
    match failed {
        Ok(counts) => {
            let mut by_label = [0u64; SOURCE_ERROR_CODES.len() + 1];
            for (code, n) in counts {
                let i = SOURCE_ERROR_CODES
                    .iter()
                    .position(|known| *known == code)
                    .unwrap_or(SOURCE_ERROR_CODES.len());
                by_label[i] += n;
            }
            for (label, n) in SOURCE_ERROR_CODES.iter().chain([&OTHER]).zip(by_label) {
                m.sources_failed.with_label_values(&[label]).set(n as i64);
            }
        }
        Err(_) => complete = false,
    }
    match open {
        Ok(open) => m.chunks_open.set(open as i64),
        Err(_) => complete = false,
    }
    match by_status {
        Ok(counts) => {
            // A status with no sources left is absent from the counts, and must read 0,
            // not its last value.
            for status in SourceStatus::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| *s == status)
                    .map_or(0, |(_, n)| *n);
                m.sources
                    .with_label_values(&[status.as_str()])
                    .set(n as i64);
            }
        }
        Err(_) => complete = false,
    }
    complete
}
