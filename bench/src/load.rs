//! The synchronous path under load: small uploads, each handled entirely inside its request,
//! from concurrent clients for a fixed time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use uuid::Uuid;

use crate::generate;
use crate::orbit::Orbit;

pub struct LoadReport {
    pub uploads: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl LoadReport {
    pub fn per_second(&self) -> f64 {
        self.uploads as f64 / self.elapsed.as_secs_f64()
    }
}

/// Each client uploads `rows`-row files one after another into `dirs[client % dirs.len()]`
/// until `duration` has passed. Only `201 Created` with every row accepted cleanly counts as
/// an upload; anything else is an error. A body is generated before its request's clock starts (tens of microseconds).
pub async fn run(
    orbit: Arc<Orbit>,
    dirs: &[Uuid],
    clients: usize,
    duration: Duration,
    rows: u64,
) -> anyhow::Result<LoadReport> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let orbit = orbit.clone();
        let dir = dirs[client % dirs.len()];
        // Indexes above a 10M-row bulk file's, 5M per client: no upload repeats another's
        // identities (phones stay unique below 160M).
        let base = 10_000_000 + client as u64 * 5_000_000;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            for n in 0.. {
                if Instant::now() >= deadline {
                    break;
                }
                let body = generate::rows(base + n * rows, rows).into_bytes();
                let sent = Instant::now();
                let answer = orbit.upload_bytes(dir, body).await;
                if imported_whole(&answer, rows) {
                    latencies.push(sent.elapsed())
                } else {
                    errors += 1
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(LoadReport {
        uploads: latencies.len() as u64,
        errors,
        elapsed,
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
    })
}

/// Whether an upload's answer is `201 Created` with all its `rows` accepted and no warning:
/// what the synchronous phases count as an upload.
pub fn imported_whole(answer: &anyhow::Result<(StatusCode, serde_json::Value)>, rows: u64) -> bool {
    matches!(
        answer,
        Ok((StatusCode::CREATED, receipt)) if receipt["accepted"] == rows && receipt["warnings"] == 0
    )
}

/// The `q` quantile of `sorted` (nearest rank); zero when it is empty.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
}
