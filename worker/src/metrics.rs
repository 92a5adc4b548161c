//! The worker's metrics, in the process's default Prometheus registry: chunks in flight and
//! their durations, rows materialized, failed attempts, leases lost, poisoned chunks, and the
//! reaper's republishes (a gateway runs the reaper too, so it exports them as well), and the
//! fair scheduler's choices.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
    HistogramVec, IntCounter, IntCounterVec, IntGauge,
};

pub struct WorkerMetrics {
    pub chunks_in_flight: IntGauge,
    pub chunk_duration: HistogramVec,
    pub rows: IntCounterVec,
    pub leases_lost: IntCounter,
    pub chunk_failures: IntCounterVec,
    pub chunks_poisoned: IntCounter,
    pub reaper_republishes: IntCounter,
    pub fair_choices: IntCounterVec,
}

pub static METRICS: LazyLock<WorkerMetrics> = LazyLock::new(|| {
    WorkerMetrics {
    chunks_in_flight: register_int_gauge!(
        "orbit_chunks_in_flight",
        "Chunks being processed by this process"
    )
    .expect("metric registered once"),
    chunk_duration: register_histogram_vec!(
        "orbit_chunk_duration_seconds",
        "Time to process one chunk",
        &["outcome"],
        vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    )
    .expect("metric registered once"),
    rows: register_int_counter_vec!(
        "orbit_rows_total",
        "Rows materialized by this process, by outcome: the synchronous prefix of uploads in the gateway, chunks in workers",
        &["outcome"]
    )
    .expect("metric registered once"),
    leases_lost: register_int_counter!(
        "orbit_leases_lost_total",
        "Chunk attempts of this worker that found their lease gone, at a renewal or a refused commit (taken over after the worker overran the lease or was presumed dead, or the source ended): the uncommitted work is dropped and the new owner does it"
    )
    .expect("metric registered once"),
    chunk_failures: register_int_counter_vec!(
        "orbit_chunk_failures_total",
        "Failed attempts at a chunk, by kind: transient (storage, network or database trouble; costs no attempt until worker.transient_retry_for) or permanent (counts toward worker.max_attempts)",
        &["kind"]
    )
    .expect("metric registered once"),
    chunks_poisoned: register_int_counter!(
        "orbit_chunks_poisoned_total",
        "Chunks found out of attempts (worker.max_attempts) by this process; each fails its source with chunk_poisoned"
    )
    .expect("metric registered once"),
    reaper_republishes: register_int_counter!(
        "orbit_reaper_republishes_total",
        "Chunk messages published by this process's reaper: chunks never published, whose message was lost, or whose worker died"
    )
    .expect("metric registered once"),
    fair_choices: register_int_counter_vec!(
        "orbit_fair_choices_total",
        "Chunks this process chose by fair shares, by which: named (the chunk its queue message named) or other (another directory's, whose turn it was)",
        &["taken"]
    )
    .expect("metric registered once"),
}
});

/// Registers the worker's metrics, so a scrape shows them before anything has counted.
pub fn register() {
    LazyLock::force(&METRICS);
}
