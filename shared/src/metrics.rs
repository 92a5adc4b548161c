//! Prometheus metrics of gateway and worker. Gauges that mirror the database or the queue
//! (sources by status, failed sources by code, open chunks, queue depth, dead letters) are
//! refreshed when `/metrics` is scraped. On Linux the registry also carries the standard
//! `process_*` metrics (memory, CPU, open file descriptors) of the process.
//!
//! Label values come from fixed sets only (see [`http_method_label`]): a value a client could
//! choose would let it create series without bound.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
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
    pub leases_lost: IntCounter,
    pub chunk_failures: IntCounterVec,
    pub dead_letters: IntGauge,
    pub chunks_poisoned: IntCounter,
    pub sources_failed: IntGaugeVec,
    pub reaper_republishes: IntCounter,
    pub publish_failures: IntCounterVec,
    pub upload_bytes: IntCounter,
    pub build_info: IntGaugeVec,
    pub webhook_attempts: IntCounterVec,
}

/// The `error_code`s a source fails with; [`OTHER`] stands for any other.
pub const SOURCE_ERROR_CODES: [&str; 4] = [
    "chunk_poisoned",
    "object_missing",
    "row_count_mismatch",
    crate::model::CANCELLED,
];

/// What a webhook delivery attempt led to (`orbit_webhook_attempts_total{outcome}`).
pub const WEBHOOK_OUTCOMES: [&str; 3] = ["delivered", "retry", "given_up"];

/// Who published a chunk message: the upload that recorded it, or a reaper.
#[derive(Debug, Clone, Copy)]
pub enum Publisher {
    Upload,
    Reaper,
}

impl Publisher {
    pub fn label(self) -> &'static str {
        match self {
            Publisher::Upload => "upload",
            Publisher::Reaper => "reaper",
        }
    }
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
            "Rows materialized by this process, by outcome: the synchronous prefix of uploads in the gateway, chunks in workers",
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
    for reason in ["owner_dead", "expired"] {
        leases_taken_over.with_label_values(&[reason]);
    }
    let leases_lost = IntCounter::new(
        "orbit_leases_lost_total",
        "Chunk attempts of this worker that found their lease gone, at a renewal or a refused commit (taken over after the worker overran the lease or was presumed dead, or the source ended): the uncommitted work is dropped and the new owner does it",
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
    let dead_letters = IntGauge::new(
        "orbit_dead_letters",
        "Messages in the dead-letter queue (redelivered past queue.delivery_limit, or undecodable)",
    )
    .expect("valid metric");
    let chunks_poisoned = IntCounter::new(
        "orbit_chunks_poisoned_total",
        "Chunks found out of attempts (worker.max_attempts) by this process; each fails its source with chunk_poisoned",
    )
    .expect("valid metric");
    let sources_failed = IntGaugeVec::new(
        Opts::new(
            "orbit_sources_failed",
            "Failed sources by error code, from the database",
        ),
        &["code"],
    )
    .expect("valid metric");
    let webhook_attempts = IntCounterVec::new(
        Opts::new(
            "orbit_webhook_attempts_total",
            "Webhook delivery attempts made by this gateway, by outcome: delivered (2xx), retry (failed, tried again later), given_up (failed, out of webhooks.max_attempts)",
        ),
        &["outcome"],
    )
    .expect("valid metric");
    for outcome in WEBHOOK_OUTCOMES {
        webhook_attempts.with_label_values(&[outcome]);
    }
    let reaper_republishes = IntCounter::new(
        "orbit_reaper_republishes_total",
        "Chunk messages published by this process's reaper: chunks never published, whose message was lost, or whose worker died",
    )
    .expect("valid metric");
    let publish_failures = IntCounterVec::new(
        Opts::new(
            "orbit_publish_failures_total",
            "Chunk messages the broker did not take (after queue.reconnect_timeout of retries), by publisher: upload or reaper",
        ),
        &["publisher"],
    )
    .expect("valid metric");
    let upload_bytes = IntCounter::new(
        "orbit_upload_bytes_total",
        "Bytes of uploaded files received by this gateway, counted as they arrive (rejected uploads too)",
    )
    .expect("valid metric");
    let build_info = IntGaugeVec::new(
        Opts::new(
            "orbit_build_info",
            "Always 1; the labels say which build this process runs",
        ),
        &["version", "commit"],
    )
    .expect("valid metric");
    // Exported at 0 from the start, so a rate over them works before the first failure.
    for publisher in [Publisher::Upload, Publisher::Reaper] {
        publish_failures.with_label_values(&[publisher.label()]);
    }
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process metrics registered once");
    for c in [
        Box::new(commit_retries.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(dead_letters.clone()),
        Box::new(chunks_poisoned.clone()),
        Box::new(sources_failed.clone()),
        Box::new(reaper_republishes.clone()),
        Box::new(publish_failures.clone()),
        Box::new(upload_bytes.clone()),
        Box::new(build_info.clone()),
        Box::new(chunk_failures.clone()),
        Box::new(leases_taken_over.clone()),
        Box::new(leases_lost.clone()),
        Box::new(http_requests.clone()),
        Box::new(http_duration.clone()),
        Box::new(chunks_in_flight.clone()),
        Box::new(chunk_duration.clone()),
        Box::new(rows.clone()),
        Box::new(queue_depth.clone()),
        Box::new(chunks_open.clone()),
        Box::new(sources.clone()),
        Box::new(webhook_attempts.clone()),
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
        leases_lost,
        chunk_failures,
        dead_letters,
        chunks_poisoned,
        sources_failed,
        reaper_republishes,
        publish_failures,
        upload_bytes,
        build_info,
        webhook_attempts,
    }
});

/// Sets `orbit_build_info{version, commit}` to 1; each binary calls it once at start with
/// what it was built from.
pub fn set_build_info(version: &str, commit: &str) {
    METRICS
        .build_info
        .with_label_values(&[version, commit])
        .set(1);
}

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
    if let Ok(dead) = queue.dead_letters().await {
        m.dead_letters.set(dead as i64);
    }
    if let Ok(counts) = store.count_failed_sources_by_code().await {
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
