//! What every process's `/metrics` has in common, and the queue's metrics. Each crate keeps
//! its own metrics beside the code that counts them (`orbit_store::metrics`, the worker's and
//! the gateway's `metrics` modules), all in the process's default Prometheus registry, which
//! on Linux also carries the standard `process_*` metrics; [`encode`] renders it.
//!
//! Label values come from fixed sets only: a value a client could choose would let it create
//! series without bound.

use std::sync::LazyLock;

use prometheus::{
    register_int_counter_vec, register_int_gauge, register_int_gauge_vec, Encoder, IntCounterVec,
    IntGauge, IntGaugeVec, TextEncoder,
};

use crate::queue::Queue;

pub struct QueueMetrics {
    pub queue_depth: IntGauge,
    pub dead_letters: IntGauge,
    pub publish_failures: IntCounterVec,
}

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

pub static METRICS: LazyLock<QueueMetrics> = LazyLock::new(|| {
    let queue_depth =
        register_int_gauge!("orbit_queue_depth", "Messages waiting in the work queue")
            .expect("metric registered once");
    let dead_letters = register_int_gauge!(
        "orbit_dead_letters",
        "Messages in the dead-letter queue (redelivered past queue.delivery_limit, or undecodable)"
    )
    .expect("metric registered once");
    let publish_failures = register_int_counter_vec!(
        "orbit_publish_failures_total",
        "Chunk messages the broker did not take (after queue.reconnect_timeout of retries), by publisher: upload or reaper",
        &["publisher"]
    )
    .expect("metric registered once");
    // Exported at 0 from the start, so a rate over them works before the first failure.
    for publisher in [Publisher::Upload, Publisher::Reaper] {
        publish_failures.with_label_values(&[publisher.label()]);
    }
    QueueMetrics {
        queue_depth,
        dead_letters,
        publish_failures,
    }
});

static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "orbit_build_info",
        "Always 1; the labels say which build this process runs",
        &["version", "commit"]
    )
    .expect("metric registered once")
});

/// Sets `orbit_build_info{version, commit}` to 1; each binary calls it once at start with
/// what it was built from.
pub fn set_build_info(version: &str, commit: &str) {
    BUILD_INFO.with_label_values(&[version, commit]).set(1);
}

/// Sets the broker-mirroring gauges (queue depth, dead letters) from `queue`, as
/// `orbit_store::metrics::mirror` does the database's; whether both were read.
pub async fn mirror_queue(queue: &dyn Queue) -> bool {
    let (depth, dead) = tokio::join!(queue.depth(), queue.dead_letters());
    if let Ok(depth) = &depth {
        METRICS.queue_depth.set(*depth as i64);
    }
    if let Ok(dead) = &dead {
        METRICS.dead_letters.set(*dead as i64);
    }
    depth.is_ok() && dead.is_ok()
}

/// The process's metrics in the Prometheus text format.
pub fn encode() -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&prometheus::gather(), &mut out)
        .expect("text encoding cannot fail");
    String::from_utf8(out).expect("prometheus text is utf-8")
}
