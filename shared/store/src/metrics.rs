//! The store's metrics, in the process's default Prometheus registry: transactions tried
//! again and leases taken over (counted by the backends as they happen), and the gauges that
//! mirror the database (sources by status, failed sources by code, open chunks), refreshed
//! from [`Stats`] by [`Mirror`] at most once per `telemetry.gauges_refresh`.
//!
//! Label values come from fixed sets only: a value a client could choose would let it create
//! series without bound.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

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
        "Database transactions tried again, by reason: conflict (a concurrent commit won a lock or a deadlock was broken) or unavailable (the database could not be reached)",
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

/// The database-mirroring gauges of one process, read at most once per `every`: scrapes in
/// between (of this process) are served what the last read found. Concurrent scrapes share
/// one read.
pub struct Mirror {
    every: Duration,
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl Mirror {
    pub fn new(every: Duration) -> Self {
        register();
        Mirror {
            every,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Reads the counts again unless the last read is fresher than `every`. A failed read
    /// keeps the previous values and is tried at the next scrape.
    pub async fn refresh(&self, stats: &dyn Stats) {
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.every) {
            return;
        }
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
        if complete {
            *last = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;
    use crate::{StoreError, StoreResult};

    /// Counts the reads of each refresh; fails them while `failing` is set.
    #[derive(Default)]
    struct Counting {
        reads: AtomicUsize,
        failing: AtomicBool,
    }

    impl Counting {
        fn read(&self) -> StoreResult<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Conflict("injected".into()));
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Stats for Counting {
        async fn count_sources_by_status(&self) -> StoreResult<Vec<(SourceStatus, u64)>> {
            self.read().map(|()| Vec::new())
        }
        async fn count_pending_chunks(&self) -> StoreResult<u64> {
            self.read().map(|()| 0)
        }
        async fn count_failed_sources_by_code(&self) -> StoreResult<Vec<(String, u64)>> {
            self.read().map(|()| Vec::new())
        }
    }

    #[tokio::test]
    async fn scrapes_within_the_refresh_interval_read_the_database_once() {
        let stats = Counting::default();
        let mirror = Mirror::new(Duration::from_secs(3600));
        for _ in 0..5 {
            mirror.refresh(&stats).await;
        }
        assert_eq!(
            stats.reads.load(Ordering::SeqCst),
            3,
            "one read of each count"
        );
    }

    #[tokio::test]
    async fn a_zero_interval_reads_at_every_scrape() {
        let stats = Counting::default();
        let mirror = Mirror::new(Duration::ZERO);
        for _ in 0..4 {
            mirror.refresh(&stats).await;
        }
        assert_eq!(stats.reads.load(Ordering::SeqCst), 12);
    }

    #[tokio::test]
    async fn a_failed_read_is_tried_again_at_the_next_scrape() {
        let stats = Counting::default();
        let mirror = Mirror::new(Duration::from_secs(3600));
        stats.failing.store(true, Ordering::SeqCst);
        mirror.refresh(&stats).await;
        stats.failing.store(false, Ordering::SeqCst);
        mirror.refresh(&stats).await;
        mirror.refresh(&stats).await;
        assert_eq!(
            stats.reads.load(Ordering::SeqCst),
            6,
            "read again once, then cached"
        );
    }
}
