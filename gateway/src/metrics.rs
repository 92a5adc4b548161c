//! The gateway's metrics, in the process's default Prometheus registry: requests and their
//! latency, upload bytes received, webhook delivery attempts. The rest of a gateway's
//! `/metrics` is its owners': the store's (`orbit_store::metrics`), the queue's
//! (`orbit_adapters::metrics`) and, for the sync prefix and the reaper, the worker's.
//!
//! Label values come from fixed sets only (see [`http_method_label`]): a value a client could
//! choose would let it create series without bound.

use std::sync::LazyLock;

use prometheus::{
    register_histogram_vec, register_int_counter, register_int_counter_vec, HistogramVec,
    IntCounter, IntCounterVec,
};

pub struct GatewayMetrics {
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub upload_bytes: IntCounter,
    pub webhook_attempts: IntCounterVec,
    pub exports: IntCounterVec,
    pub export_profiles: IntCounterVec,
    pub resumable_bytes: IntCounter,
    pub resumable_resumptions: IntCounter,
    pub resumable_expired: IntCounter,
}

/// What a webhook delivery attempt led to (`orbit_webhook_attempts_total{outcome}`).
pub const WEBHOOK_OUTCOMES: [&str; 3] = ["delivered", "retry", "given_up"];

/// The label value standing for every value outside a label's fixed set.
pub const OTHER: &str = "other";

pub static METRICS: LazyLock<GatewayMetrics> = LazyLock::new(|| {
    let webhook_attempts = register_int_counter_vec!(
        "orbit_webhook_attempts_total",
        "Webhook delivery attempts made by this gateway, by outcome: delivered (2xx), retry (failed, tried again later), given_up (failed, out of webhooks.max_attempts)",
        &["outcome"]
    )
    .expect("metric registered once");
    for outcome in WEBHOOK_OUTCOMES {
        webhook_attempts.with_label_values(&[outcome]);
    }
    let exports = register_int_counter_vec!(
        "orbit_exports_total",
        "Profile exports started by this gateway, by format (csv, ndjson)",
        &["format"]
    )
    .expect("metric registered once");
    let export_profiles = register_int_counter_vec!(
        "orbit_export_profiles_total",
        "Profiles written by this gateway's exports, by format (csv, ndjson), counted as each batch is sent",
        &["format"]
    )
    .expect("metric registered once");
    for format in ["csv", "ndjson"] {
        exports.with_label_values(&[format]);
        export_profiles.with_label_values(&[format]);
    }
    GatewayMetrics {
        http_requests: register_int_counter_vec!(
            "orbit_http_requests_total",
            "HTTP requests by route and status",
            &["method", "route", "status"]
        )
        .expect("metric registered once"),
        http_duration: register_histogram_vec!(
            "orbit_http_request_duration_seconds",
            "HTTP request latency",
            &["method", "route"],
            vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
        )
        .expect("metric registered once"),
        upload_bytes: register_int_counter!(
            "orbit_upload_bytes_total",
            "Bytes of uploaded files received by this gateway, counted as they arrive (rejected uploads too)"
        )
        .expect("metric registered once"),
        webhook_attempts,
        exports,
        export_profiles,
        resumable_bytes: register_int_counter!(
            "orbit_resumable_bytes_total",
            "Bytes of resumable (tus) uploads received by this gateway, counted as they arrive (also counted in orbit_upload_bytes_total once imported)"
        )
        .expect("metric registered once"),
        resumable_resumptions: register_int_counter!(
            "orbit_resumable_resumptions_total",
            "HEAD requests on unfinished resumable uploads that already hold bytes: how a tus client asks where to resume"
        )
        .expect("metric registered once"),
        resumable_expired: register_int_counter!(
            "orbit_resumable_expired_total",
            "Resumable uploads this gateway's sweep expired after ingest.resumable_ttl without bytes"
        )
        .expect("metric registered once"),
    }
});

/// Registers the gateway's metrics, so a scrape shows them before anything has counted.
pub fn register() {
    LazyLock::force(&METRICS);
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
