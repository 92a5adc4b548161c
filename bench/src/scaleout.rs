//! The scale-out phase: one file uploaded into one directory of a fresh distributed stack, run
//! once per worker count (1, 2, 4 by default), each `orbit-worker` process capped to a slice of
//! a core by its own cgroup and processing one chunk at a time. With the workers, not the
//! machine, as the bound, rows/s should grow with their number unless commits into one
//! directory wait for each other: the speed-up of 4 workers over 1 says which.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use crate::cgroup::{self, CpuCap};
use crate::orbit::{Orbit, StackKind};
use crate::{generate, measure_ingest, Args};

/// Fails unless a capped group can be made here: a run that cannot cap its workers would
/// measure something else, so it stops before the long phases.
pub fn check_caps(args: &Args) -> anyhow::Result<()> {
    let name = format!("orbit-bench-{}-probe", std::process::id());
    CpuCap::create(
        Path::new(cgroup::CPU_ROOT),
        &name,
        args.scaleout_period_us,
        args.scaleout_quota_us,
    )
    .context("the scale-out phase cannot cap its workers (leave it out with --phases)")?;
    Ok(())
}

/// The phase's own settings, then `--set`'s, which win.
fn settings(args: &Args) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = vec![
        // No prefix imported inside the request: every row goes through a worker.
        ("ORBIT__INGEST__SYNC_ROWS".to_owned(), "0".to_owned()),
        (
            "ORBIT__INGEST__CHUNK_ROWS".to_owned(),
            args.scaleout_chunk_rows.to_string(),
        ),
        // One chunk at a time per process: N workers are N committers, each of a known size.
        ("ORBIT__WORKER__CONCURRENCY".to_owned(), "1".to_owned()),
    ];
    env.extend(args.orbit_env()?);
    Ok(env)
}

/// Each run's rows/s over the rows/s of the run with the fewest workers, in the runs' order.
pub fn speedups(runs: &[(usize, f64)]) -> Vec<f64> {
    let Some(&(_, base)) = runs.iter().min_by_key(|(workers, _)| *workers) else {
        return Vec::new();
    };
    runs.iter().map(|(_, rate)| rate / base).collect()
}

/// Rows/s with `many` workers over rows/s with `one`, when both ran.
pub fn speedup(runs: &[(usize, f64)], many: usize, one: usize) -> Option<f64> {
    let rate = |n: usize| runs.iter().find(|(w, _)| *w == n).map(|(_, r)| *r);
    Some(rate(many)? / rate(one)?)
}

/// What the caps of one run recorded.
struct Throttling {
    periods: u64,
    time: Duration,
}

/// One run: a fresh stack with `workers` capped workers ingests `csv`.
async fn run_once(
    args: &Args,
    csv: &Path,
    rows: u64,
    workers: usize,
) -> anyhow::Result<(crate::Ingest, Throttling)> {
    let mut orbit = Orbit::start(
        StackKind::Distributed,
        &args.work_dir,
        workers,
        &settings(args)?,
    )
    .await?;
    // Only the workers may process chunks: the gateway runs none with a RabbitMQ queue.
    anyhow::ensure!(
        orbit
            .env()
            .iter()
            .any(|(k, v)| k == "ORBIT__QUEUE__URL" && v.starts_with("amqp")),
        "the scale-out phase needs the RabbitMQ queue, so that the gateway processes no chunk"
    );
    // Declared after `orbit`, so dropped before it: each group lets its worker go back to the
    // root group, then the worker is killed.
    let mut caps = Vec::new();
    for (i, worker) in orbit.workers.iter().enumerate() {
        let pid = worker
            .id()
            .context("a worker exited before it was capped")?;
        let name = format!("orbit-bench-{}-w{}", std::process::id(), i + 1);
        let cap = CpuCap::create(
            Path::new(cgroup::CPU_ROOT),
            &name,
            args.scaleout_period_us,
            args.scaleout_quota_us,
        )?;
        cap.add(pid)?;
        caps.push(cap);
    }
    let ingest = measure_ingest(&mut orbit, csv, rows).await?;
    let mut throttling = Throttling {
        periods: 0,
        time: Duration::ZERO,
    };
    for cap in &caps {
        let (periods, time) = cap.throttled()?;
        throttling.periods += periods;
        throttling.time += time;
    }
    Ok((ingest, throttling))
}

/// Runs the phase and prints a line per worker count: the results.json `scaleout` object.
pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let csv = args
        .work_dir
        .join(format!("contacts-{}.csv", args.scaleout_rows));
    let generated = generate::write_csv(&csv, args.scaleout_rows, u64::MAX)?;
    let rows = generated.rows;
    let cores = args.scaleout_quota_us as f64 / args.scaleout_period_us as f64;
    println!(
        "scale-out: {rows} rows into one directory, chunks of {} rows, each worker capped at {cores:.2} core ({} µs per {} µs)",
        args.scaleout_chunk_rows, args.scaleout_quota_us, args.scaleout_period_us
    );
    let mut rates = Vec::new();
    let mut reports = Vec::new();
    for &workers in &args.scaleout_workers {
        let (i, throttling) = run_once(args, &csv, rows, workers).await?;
        let rate = rows as f64 / i.took.as_secs_f64();
        let allowed = i.took.as_secs_f64() * cores * workers as f64;
        rates.push((workers, rate));
        let speedup = *speedups(&rates).last().expect("a run was pushed");
        println!(
            "  {workers} worker{:<2} {:>8.2} s  {rate:>9.0} rows/s  speed-up {speedup:>5.2}  (worker CPU {:.1} s of {allowed:.1} s allowed, throttled in {} periods; gateway CPU {:.1} s; WAL {:.0} bytes/row)",
            if workers == 1 { "" } else { "s" },
            i.took.as_secs_f64(),
            i.workers_cpu.as_secs_f64(),
            throttling.periods,
            i.gateway_cpu.as_secs_f64(),
            i.wal_bytes.unwrap_or(0) as f64 / rows as f64,
        );
        reports.push(json!({
            "workers": workers,
            "seconds": i.took.as_secs_f64(),
            "rows_per_second": rate,
            "cpu_seconds": {
                "workers": i.workers_cpu.as_secs_f64(),
                "workers_allowed": allowed,
                "gateway": i.gateway_cpu.as_secs_f64(),
            },
            "throttled": {
                "periods": throttling.periods,
                "seconds": throttling.time.as_secs_f64(),
            },
            "wal_bytes_per_row": i.wal_bytes.map(|b| b as f64 / rows as f64),
        }));
    }
    // Speed-ups against the smallest run, now that every run is in.
    for (report, speedup) in reports.iter_mut().zip(speedups(&rates)) {
        report["speedup"] = json!(speedup);
    }
    let four = speedup(&rates, 4, 1);
    if let Some(s) = four {
        println!("  4 workers / 1 worker: {s:.2}");
    }
    Ok(json!({
        "rows": rows,
        "chunk_rows": args.scaleout_chunk_rows,
        "cpu_quota_us": args.scaleout_quota_us,
        "cpu_period_us": args.scaleout_period_us,
        "runs": reports,
        "speedup_4_vs_1": four,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speedups_are_against_the_run_with_fewest_workers() {
        let runs = [(1, 3000.0), (2, 5100.0), (4, 5300.0)];
        let s = speedups(&runs);
        assert_eq!(s.len(), 3);
        assert!((s[0] - 1.0).abs() < 1e-9);
        assert!((s[1] - 1.7).abs() < 1e-9);
        assert!((s[2] - 5300.0 / 3000.0).abs() < 1e-9);
        // In any order, and without a run of 1.
        let s = speedups(&[(4, 8000.0), (2, 4000.0)]);
        assert!(
            (s[0] - 2.0).abs() < 1e-9 && (s[1] - 1.0).abs() < 1e-9,
            "{s:?}"
        );
        assert!(speedups(&[]).is_empty());
    }

    #[test]
    fn the_four_to_one_speedup_needs_both_runs() {
        let runs = [(1, 3000.0), (2, 5100.0), (4, 9900.0)];
        assert!((speedup(&runs, 4, 1).unwrap() - 3.3).abs() < 1e-9);
        assert_eq!(speedup(&runs[..2], 4, 1), None);
        assert_eq!(speedup(&runs[1..], 4, 1), None);
    }
}
