//! The open-loop phase (issue 21): small uploads offered at a fixed rate, whatever the answers
//! do, rather than by clients that wait for each answer before sending the next.
//!
//! A closed loop measures throughput (its latency is clients / rate, Little's law) and hides a
//! stall: the clients stuck in it send nothing, so the stall is one slow sample per client.
//! Here upload `i` is due at `start + i / rate` and its latency is counted from then, not from
//! when it went out, so a stall shows in every upload that fell due during it (no coordinated
//! omission). Each upload runs on a task of its own; none waits for another.
//!
//! Where the time goes: the CPU time of the gateway, of the workers and of the PostgreSQL
//! backends connected to the stack's database over the run, per upload and per row.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::load::{imported_whole, quantile};
use crate::orbit::{BackendsMark, StackKind};
use crate::{generate, Args};

/// Latency quantiles reported, with their names.
const QUANTILES: [(&str, f64); 5] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p999", 0.999),
    ("max", 1.0),
];

pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let orbit = crate::stack(StackKind::Distributed, args).await?;
    let orbit = Arc::new(orbit);
    let rate = args.open_rate;
    let rows = args.sync_rows;
    let count = (rate * args.seconds as f64).round() as u64;
    anyhow::ensure!(count > 0, "--open-rate × --seconds offers no upload");
    // Warm the pools and caches: the first uploads of a fresh stack open connections.
    for n in 0..20 {
        let body = generate::rows(20_000_000 + n * rows, rows).into_bytes();
        orbit.upload_bytes(orbit.tenant.dir, body).await?;
    }
    let (gateway_before, workers_before) = orbit.cpu()?;
    let postgres = BackendsMark::new(&orbit).await?;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count as usize);
    for i in 0..count {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        // Made before it falls due, so an upload is not late by its own generation;
        // identities above every other phase's.
        let body = generate::rows(30_000_000 + i * rows, rows).into_bytes();
        tokio::time::sleep_until(due).await;
        let orbit = orbit.clone();
        tasks.push(tokio::spawn(async move {
            let answer = orbit.upload_bytes(orbit.tenant.dir, body).await;
            (due.elapsed(), imported_whole(&answer, rows))
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut errors = 0u64;
    for task in tasks {
        let (latency, ok) = task.await?;
        if ok {
            latencies.push(latency);
        } else {
            errors += 1;
        }
    }
    let elapsed = started.elapsed();
    let (gateway_after, workers_after) = orbit.cpu()?;
    let postgres = postgres.since().await?;
    latencies.sort();
    let at = |q: f64| quantile(&latencies, q).as_secs_f64() * 1e3;
    anyhow::ensure!(!latencies.is_empty(), "no upload answered 201");
    let uploads = latencies.len() as f64;
    let per_upload_ms = |cpu: Duration| cpu.as_secs_f64() * 1e3 / uploads;
    let gateway = per_upload_ms(gateway_after - gateway_before);
    let workers = per_upload_ms(workers_after - workers_before);
    let postgres = per_upload_ms(postgres);
    println!(
        "open loop: {count} uploads of {rows} rows offered at {rate}/s over {:.1} s, {errors} errors",
        elapsed.as_secs_f64()
    );
    println!(
        "  latency from when each was due: {}",
        QUANTILES
            .iter()
            .map(|(name, q)| format!("{name} {:.1} ms", at(*q)))
            .collect::<Vec<_>>()
            .join("  ")
    );
    println!(
        "  CPU ms per upload: gateway {gateway:.2}, workers {workers:.2}, PostgreSQL backends {postgres:.2}, together {:.2} ({:.1} µs a row)",
        gateway + workers + postgres,
        (gateway + workers + postgres) * 1e3 / rows as f64,
    );
    anyhow::ensure!(errors == 0, "{errors} uploads did not answer 201");
    orbit.succeeded();
    let mut latency = serde_json::Map::new();
    for (name, q) in QUANTILES {
        latency.insert(format!("{name}_ms"), json!(at(q)));
    }
    Ok(json!({
        "rate": rate,
        "rows_per_upload": rows,
        "uploads": latencies.len(),
        "seconds": elapsed.as_secs_f64(),
        "latency": latency,
        "cpu_ms_per_upload": {
            "gateway": gateway,
            "workers": workers,
            "postgres_backends": postgres,
        },
        "cpu_us_per_row": (gateway + workers + postgres) * 1e3 / rows as f64,
    }))
}
