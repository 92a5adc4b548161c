//! Prometheus metrics of gateway and worker. Gauges that mirror the database or the queue
//! (sources by status, open chunks, queue depth) are refreshed when `/metrics` is scraped.
//!
//! Label values come from fixed sets only (see [`http_method_label`]): a value a client could
//! choose would let it create series without bound.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::queue::Queue;
use crate::store::Store;

pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub chunks_in_flight: IntGauge,
    pub chunk_duration: HistogramVec,
    pub rows: IntCounterVec,
    pub queue_depth: IntGauge,
    pub chunks_open: IntGauge,
    pub sources: IntGaugeVec,
    pub commit_retries: IntCounterVec,
    pub leases_taken_over: IntCounterVec,
    pub chunk_failures: IntCounterVec,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let http_requests = IntCounterVec::new(
        Opts::new(
            "orbit_http_requests_total",
            "HTTP requests by route and status",
        ),
        &["method", "route", "status"],
    )
    .expect("valid metric");
    let http_duration = HistogramVec::new(
        HistogramOpts::new(
            "orbit_http_request_duration_seconds",
            "HTTP request latency",
        )
        .buckets(vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]),
        &["method", "route"],
    )
    .expect("valid metric");
    let chunks_in_flight = IntGauge::new(
        "orbit_chunks_in_flight",
        "Chunks being processed by this process",
    )
    .expect("valid metric");
    let chunk_duration = HistogramVec::new(
        HistogramOpts::new("orbit_chunk_duration_seconds", "Time to process one chunk")
            .buckets(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
        &["outcome"],
    )
    .expect("valid metric");
    let rows = IntCounterVec::new(
        Opts::new(
            "orbit_rows_total",
            "Rows materialized by this process, by outcome",
        ),
        &["outcome"],
    )
    .expect("valid metric");
    let queue_depth = IntGauge::new("orbit_queue_depth", "Messages waiting in the work queue")
        .expect("valid metric");
    let chunks_open = IntGauge::new(
        "orbit_chunks_open",
        "Chunks not yet done (pending or running)",
    )
    .expect("valid metric");
    let sources = IntGaugeVec::new(Opts::new("orbit_sources", "Sources by status"), &["status"])
        .expect("valid metric");
    let commit_retries = IntCounterVec::new(
        Opts::new(
            "orbit_commit_retries_total",
            "Database transactions tried again, by reason: conflict (a concurrent commit won a lock or a deadlock was broken) or unavailable (the database could not be reached)",
        ),
        &["reason"],
    )
    .expect("valid metric");
    let leases_taken_over = IntCounterVec::new(
        Opts::new(
            "orbit_leases_taken_over_total",
            "Chunks claimed from another worker, by why its lease was void: owner_dead (its process stopped heartbeating) or expired",
        ),
        &["reason"],
    )
    .expect("valid metric");
    let chunk_failures = IntCounterVec::new(
        Opts::new(
            "orbit_chunk_failures_total",
            "Failed attempts at a chunk, by kind: transient (storage, network or database trouble; costs no attempt until worker.transient_retry_for) or permanent (counts toward worker.max_attempts)",
        ),
        &["kind"],
    )
    .expect("valid metric");
    for c in [
        Box::new(commit_retries.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(chunk_failures.clone()),
        Box::new(leases_taken_over.clone()),
        Box::new(http_requests.clone()),
        Box::new(http_duration.clone()),
        Box::new(chunks_in_flight.clone()),
        Box::new(chunk_duration.clone()),
        Box::new(rows.clone()),
        Box::new(queue_depth.clone()),
        Box::new(chunks_open.clone()),
        Box::new(sources.clone()),
    ] {
        registry.register(c).expect("metric registered once");
    }
    Metrics {
        registry,
        http_requests,
        http_duration,
        chunks_in_flight,
        chunk_duration,
        rows,
        queue_depth,
        chunks_open,
        sources,
        commit_retries,
        leases_taken_over,
        chunk_failures,
    }
});

/// Label value to use for an HTTP method: the standard ones by name, anything else `other`.
pub fn http_method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN
        .into_iter()
        .find(|known| *known == method)
        .unwrap_or(OTHER)
}

/// The label value standing for every value outside a label's fixed set.
pub const OTHER: &str = "other";

/// Refreshes the mirrored gauges and renders the Prometheus text format.
pub async fn render(store: &dyn Store, queue: &dyn Queue) -> String {
    let m = &*METRICS;
    if let Ok(depth) = queue.depth().await {
        m.queue_depth.set(depth as i64);
    }
    if let Ok(open) = store.count_pending_chunks().await {
        m.chunks_open.set(open as i64);
    }
    if let Ok(counts) = store.count_sources_by_status().await {
        // A status with no sources left is absent from the counts, and must read 0, not its
        // last value.
        for status in crate::model::SourceStatus::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == status)
                .map_or(0, |(_, n)| *n);
            m.sources
                .with_label_values(&[status.as_str()])
                .set(n as i64);
        }
    }
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&m.registry.gather(), &mut out)
        .expect("text encoding cannot fail");
    String::from_utf8(out).expect("prometheus text is utf-8")
}
