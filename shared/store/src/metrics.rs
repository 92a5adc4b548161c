//! The store's metrics, in the process's default Prometheus registry: transactions tried
//! again and leases taken over (counted by the backends as they happen), and the gauges that
//! mirror the database (sources by status, failed sources by code, open chunks), set from
//! [`Stats`] by [`mirror`] (the caller decides how often: `orbit_adapters::backends::MetricsPage`
//! caches them for `telemetry.gauges_refresh`).
//!
//! Label values come from fixed sets only: a value a client could choose would let it create
//! series without bound. The per-organization gauges are the one exception, and bounded
//! another way: they name the `tenants.metrics_top` organizations waiting longest, sum the rest
//! under `organization="other"`, and drop every other label at each refresh.

use std::sync::LazyLock;

use orbit_core::model::{SourceStatus, CANCELLED};
use prometheus::{
    register_gauge, register_gauge_vec, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec, Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec,
};

use crate::backlog::Backlog;
use crate::Stats;

pub struct StoreMetrics {
    pub commit_retries: IntCounterVec,
    pub leases_taken_over: IntCounterVec,
    pub sources: IntGaugeVec,
    pub sources_failed: IntGaugeVec,
    pub chunks_open: IntGauge,
    pub resumable_uploads: IntGauge,
    pub organization_queued_rows: IntGaugeVec,
    pub organization_ready_chunks: IntGaugeVec,
    pub organization_wait: GaugeVec,
    pub organizations_waiting: IntGauge,
    pub organization_max_wait: Gauge,
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
    let resumable_uploads = register_int_gauge!(
        "orbit_resumable_uploads",
        "Resumable (tus) uploads in progress: receiving bytes and not expired"
    )
    .expect("metric registered once");
    let organization_queued_rows = register_int_gauge_vec!(
        "orbit_organization_queued_rows",
        "Rows of an organization's unfinished sources not yet processed, for the tenants.metrics_top organizations waiting longest; organization=\"other\" sums the rest",
        &["organization"]
    )
    .expect("metric registered once");
    let organization_ready_chunks = register_int_gauge_vec!(
        "orbit_organization_ready_chunks",
        "An organization's chunks a worker could take now (pending, past their backoff), for the same organizations as orbit_organization_queued_rows",
        &["organization"]
    )
    .expect("metric registered once");
    let organization_wait = register_gauge_vec!(
        "orbit_organization_wait_seconds",
        "How long an organization has had ready chunks without progress, for the same organizations as orbit_organization_queued_rows; organization=\"other\" is the longest among the rest",
        &["organization"]
    )
    .expect("metric registered once");
    let organizations_waiting = register_int_gauge!(
        "orbit_organizations_waiting",
        "Organizations with chunks ready and waiting for a worker"
    )
    .expect("metric registered once");
    let organization_max_wait = register_gauge!(
        "orbit_organization_max_wait_seconds",
        "The longest wait of any organization (orbit_organization_wait_seconds, over every organization)"
    )
    .expect("metric registered once");
    for gauge in [&organization_queued_rows, &organization_ready_chunks] {
        gauge.with_label_values(&[OTHER]);
    }
    organization_wait.with_label_values(&[OTHER]);
    StoreMetrics {
        commit_retries,
        leases_taken_over,
        sources,
        sources_failed,
        chunks_open,
        resumable_uploads,
        organization_queued_rows,
        organization_ready_chunks,
        organization_wait,
        organizations_waiting,
        organization_max_wait,
    }
});

/// Registers the store's metrics, so a scrape shows them before anything has counted.
pub fn register() {
    LazyLock::force(&METRICS);
}

/// Sets the database-mirroring gauges from `stats`, the per-organization ones for the `top`
/// organizations waiting longest; whether every count was read. A count that could not be
/// read keeps its previous value.
pub async fn mirror(stats: &dyn Stats, top: usize) -> bool {
    let m = &*METRICS;
    let now = chrono::Utc::now();
    let (failed, open, by_status, backlog, resumable) = tokio::join!(
        stats.count_failed_sources_by_code(),
        stats.count_pending_chunks(),
        stats.count_sources_by_status(),
        stats.organization_backlog(now, top),
        stats.count_resumable_receiving(now)
    );
    let mut complete = match backlog {
        Ok(backlog) => {
            set_backlog(m, &backlog);
            true
        }
        Err(_) => false,
    };
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
    match resumable {
        Ok(n) => m.resumable_uploads.set(n as i64),
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

/// Sets the per-organization gauges to `backlog`: the labels of organizations no longer in
/// the top go, so the series stay `tenants.metrics_top` plus `other` whatever the tenant count.
/// They are cleared and set again with nothing awaited in between.
fn set_backlog(m: &StoreMetrics, backlog: &Backlog) {
    m.organization_queued_rows.reset();
    m.organization_ready_chunks.reset();
    m.organization_wait.reset();
    for org in &backlog.top {
        let label = org.organization_id.to_string();
        m.organization_queued_rows
            .with_label_values(&[&label])
            .set(org.queued_rows as i64);
        m.organization_ready_chunks
            .with_label_values(&[&label])
            .set(org.ready_chunks as i64);
        m.organization_wait
            .with_label_values(&[&label])
            .set(org.wait.as_secs_f64());
    }
    let rest = &backlog.rest;
    m.organization_queued_rows
        .with_label_values(&[OTHER])
        .set(rest.queued_rows as i64);
    m.organization_ready_chunks
        .with_label_values(&[OTHER])
        .set(rest.ready_chunks as i64);
    m.organization_wait
        .with_label_values(&[OTHER])
        .set(rest.max_wait.as_secs_f64());
    m.organizations_waiting.set(backlog.waiting as i64);
    m.organization_max_wait.set(backlog.max_wait.as_secs_f64());
}
