//! The fairness phase (issue 24): what a small upload of one organization waits while another
//! organization's bulk files are queued, with fair scheduling (`tenants.fair_scheduling`) on
//! and off, and what the scheduler costs a lone tenant's bulk ingest.
//!
//! For each setting, a fresh distributed stack (the gateway and `--workers` workers on
//! PostgreSQL, S3 and RabbitMQ) with two organizations, A and B:
//!
//! - *idle*: B uploads `--fairness-small-rows` rows into a directory, timed from the first
//!   byte to `completed`, with nothing else running: once untimed to warm the stack up, then
//!   three times, each into a fresh directory; the median counts;
//! - *busy*: A uploads `--fairness-big-files` files of `--fairness-big-rows` rows, each into a
//!   directory of its own, all at once; as soon as every one is accepted, B uploads the same
//!   small file into a second, empty directory (the same work as the idle run), timed the same
//!   way. How far A's files had got when B's completed is read at once.
//!
//! Then, for each setting again on a fresh stack, one organization ingests
//! `--fairness-bulk-rows` rows into one directory (`--fairness-bulk-runs` times, the settings
//! taking turns); the median rows/s of each and their ratio say what fair scheduling costs
//! when there is nobody to be fair to.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::orbit::{Orbit, StackKind, Tenant};
use crate::{generate, measure_ingest, Args};

/// The settings the phase compares, in the order they run: `tenants.fair_scheduling` on, then
/// off (what Orbit did before issue 24).
pub const MODES: [(&str, bool); 2] = [("on", true), ("off", false)];

const FAIR_VARIABLE: &str = "ORBIT__TENANTS__FAIR_SCHEDULING";

/// How often a timed source is asked about: fine enough for an upload of well under a second.
const POLL: Duration = Duration::from_millis(20);

/// Idle uploads per stack, each into a directory of its own; the median is the idle time. One
/// upload of half a second is at the mercy of whatever else the machine does meanwhile.
const IDLE_RUNS: usize = 3;

/// `--set`'s settings with the switch the phase compares, which wins over any `--set` of it.
fn settings(args: &Args, fair: bool) -> anyhow::Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = args
        .orbit_env()?
        .into_iter()
        .filter(|(k, _)| k != FAIR_VARIABLE)
        .collect();
    env.push((FAIR_VARIABLE.to_owned(), fair.to_string()));
    Ok(env)
}

/// A fresh distributed stack with [`settings`].
async fn start(args: &Args, fair: bool) -> anyhow::Result<Orbit> {
    let env = settings(args, fair)?;
    Orbit::start(StackKind::Distributed, &args.work_dir, args.workers, &env).await
}

/// The source id of an accepted upload.
fn accepted(status: StatusCode, receipt: &Value) -> anyhow::Result<String> {
    anyhow::ensure!(
        status == StatusCode::ACCEPTED || status == StatusCode::CREATED,
        "upload answered {status}: {receipt}"
    );
    Ok(receipt["source_id"]
        .as_str()
        .context("source_id")?
        .to_owned())
}

/// Uploads `csv` (`rows` clean rows) into `dir` of `tenant`'s organization and times the first
/// byte to `completed`.
async fn timed_upload(
    orbit: &mut Orbit,
    tenant: &Tenant,
    dir: Uuid,
    csv: &Path,
    rows: u64,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let (status, receipt) = orbit.upload_file_as(tenant, dir, csv).await?;
    let source = accepted(status, &receipt)?;
    let done = orbit
        .wait_completed_as(tenant, dir, &source, Duration::from_secs(3600), POLL)
        .await?;
    let took = started.elapsed();
    anyhow::ensure!(
        done["accepted"] == rows && done["failed"] == 0 && done["warnings"] == 0,
        "expected {rows} rows accepted without warnings: {done}"
    );
    Ok(took)
}

/// What one setting's small upload measured, idle and behind the bulk files.
#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    /// The median of the idle uploads.
    pub idle: Duration,
    pub busy: Duration,
    /// From the first byte of A's uploads until the last was answered.
    pub bulk_accepted: Duration,
    /// A's rows processed, and in all, when B's busy upload completed.
    pub bulk_processed: u64,
    pub bulk_total: u64,
    /// Every idle upload, in order.
    pub idle_runs: Vec<Duration>,
}

impl Latency {
    pub fn ratio(&self) -> f64 {
        self.busy.as_secs_f64() / self.idle.as_secs_f64()
    }

    pub fn bulk_progress(&self) -> f64 {
        if self.bulk_total == 0 {
            return 0.0;
        }
        self.bulk_processed as f64 / self.bulk_total as f64
    }
}

/// The files of a run: B's small one, A's bulk ones with their rows.
struct Files {
    small: PathBuf,
    small_rows: u64,
    big: Vec<(PathBuf, u64)>,
}

async fn latency(args: &Args, fair: bool, files: &Files) -> anyhow::Result<Latency> {
    let mut orbit = start(args, fair).await?;
    let a = orbit.tenant.clone();
    let b = orbit.add_tenant().await?;
    let mut a_dirs = vec![a.dir];
    for i in 1..files.big.len() {
        a_dirs.push(orbit.create_directory_as(&a, &format!("bulk {i}")).await?);
    }
    let b_busy = orbit.create_directory_as(&b, "behind the bulk").await?;
    let b_warm = orbit.create_directory_as(&b, "warm-up").await?;

    // Untimed, so that the idle runs find the stack's pools and caches as the busy one does.
    timed_upload(&mut orbit, &b, b_warm, &files.small, files.small_rows).await?;
    let mut idle_runs = Vec::new();
    for i in 0..IDLE_RUNS {
        let dir = match i {
            0 => b.dir,
            _ => orbit.create_directory_as(&b, &format!("idle {i}")).await?,
        };
        idle_runs.push(timed_upload(&mut orbit, &b, dir, &files.small, files.small_rows).await?);
    }
    let idle = Duration::from_secs_f64(
        median(
            &idle_runs
                .iter()
                .map(Duration::as_secs_f64)
                .collect::<Vec<_>>(),
        )
        .expect("IDLE_RUNS is not 0"),
    );

    let started = Instant::now();
    let answers = futures::future::try_join_all(
        files
            .big
            .iter()
            .zip(&a_dirs)
            .map(|((csv, _), dir)| orbit.upload_file_as(&a, *dir, csv)),
    )
    .await?;
    let bulk_accepted = started.elapsed();
    let mut sources = Vec::new();
    for (status, receipt) in &answers {
        sources.push(accepted(*status, receipt)?);
    }

    let busy = timed_upload(&mut orbit, &b, b_busy, &files.small, files.small_rows).await?;

    let (mut bulk_processed, mut bulk_total) = (0, 0);
    for (dir, source) in a_dirs.iter().zip(&sources) {
        let s = orbit.source(&a, *dir, source).await?;
        bulk_processed += s["processed_rows"].as_u64().context("processed_rows")?;
        bulk_total += s["total_rows"].as_u64().unwrap_or(0);
    }
    // A's files are left unfinished: the stack goes with them.
    orbit.succeeded();
    Ok(Latency {
        idle,
        busy,
        bulk_accepted,
        bulk_processed,
        bulk_total,
        idle_runs,
    })
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Runs the phase and prints its lines: the results.json `fairness` object.
pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let phase_started = Instant::now();
    let small = args
        .work_dir
        .join(format!("fairness-small-{}.csv", args.fairness_small_rows));
    let small_rows = generate::write_csv(&small, args.fairness_small_rows, u64::MAX)?.rows;
    let big_paths: Vec<PathBuf> = (0..args.fairness_big_files)
        .map(|i| {
            args.work_dir
                .join(format!("fairness-big-{}-{i}.csv", args.fairness_big_rows))
        })
        .collect();
    let generated = generate::write_csv_parts(
        &big_paths,
        args.fairness_big_rows * args.fairness_big_files as u64,
    )?;
    let files = Files {
        small,
        small_rows,
        big: big_paths
            .into_iter()
            .zip(generated.iter().map(|g| g.rows))
            .collect(),
    };
    let big_bytes: u64 = generated.iter().map(|g| g.bytes).sum();
    println!(
        "fairness: organization B's {small_rows}-row upload, idle and right after organization A's {} files of {} rows ({:.0} MB) are accepted, {} workers",
        args.fairness_big_files,
        args.fairness_big_rows,
        big_bytes as f64 / 1e6,
        args.workers,
    );

    let mut report = serde_json::Map::new();
    for (name, fair) in MODES {
        let l = latency(args, fair, &files).await?;
        println!(
            "  fair scheduling {name:<3}  idle {:>6.2} s (median of {IDLE_RUNS})  busy {:>6.2} s  busy/idle {:>6.2}  (A's uploads answered after {:.2} s; A {:.1}% processed when B completed)",
            l.idle.as_secs_f64(),
            l.busy.as_secs_f64(),
            l.ratio(),
            l.bulk_accepted.as_secs_f64(),
            l.bulk_progress() * 100.0,
        );
        report.insert(
            name.to_owned(),
            json!({
                "idle_seconds": l.idle.as_secs_f64(),
                "idle_runs_seconds": l.idle_runs.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
                "busy_seconds": l.busy.as_secs_f64(),
                "busy_to_idle": l.ratio(),
                "bulk_accepted_seconds": l.bulk_accepted.as_secs_f64(),
                "bulk_processed_rows": l.bulk_processed,
                "bulk_total_rows": l.bulk_total,
                "bulk_progress": l.bulk_progress(),
            }),
        );
    }
    std::fs::remove_file(&files.small)?;
    for (path, _) in &files.big {
        std::fs::remove_file(path)?;
    }

    let csv = args
        .work_dir
        .join(format!("contacts-{}.csv", args.fairness_bulk_rows));
    let rows = generate::write_csv(&csv, args.fairness_bulk_rows, u64::MAX)?.rows;
    println!(
        "fairness: one organization's {rows} rows into one directory, fair scheduling on and off, {} run{} each",
        args.fairness_bulk_runs,
        if args.fairness_bulk_runs == 1 { "" } else { "s" },
    );
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for _ in 0..args.fairness_bulk_runs {
        for (i, (name, fair)) in MODES.into_iter().enumerate() {
            let mut orbit = start(args, fair).await?;
            let ingest = measure_ingest(&mut orbit, &csv, rows).await?;
            let rate = rows as f64 / ingest.took.as_secs_f64();
            println!(
                "  fair scheduling {name:<3}  {:>8.2} s  {rate:>9.0} rows/s  (CPU s: workers {:.1}, gateway {:.1})",
                ingest.took.as_secs_f64(),
                ingest.workers_cpu.as_secs_f64(),
                ingest.gateway_cpu.as_secs_f64(),
            );
            rates[i].push(rate);
        }
    }
    for ((name, _), runs) in MODES.iter().zip(&rates) {
        let entry = report
            .get_mut(*name)
            .and_then(Value::as_object_mut)
            .expect("every mode has its latency entry");
        entry.insert("bulk_rows_per_second".into(), json!(median(runs)));
        entry.insert("bulk_runs_rows_per_second".into(), json!(runs));
    }
    let bulk_ratio = match (median(&rates[0]), median(&rates[1])) {
        (Some(on), Some(off)) => Some(on / off),
        _ => None,
    };
    if let Some(r) = bulk_ratio {
        println!("  bulk rows/s, fair scheduling on / off: {r:.3}");
    }
    let took = phase_started.elapsed();
    println!("  the fairness phase took {:.0} s", took.as_secs_f64());
    report.insert("small_rows".into(), json!(small_rows));
    report.insert("big_files".into(), json!(args.fairness_big_files));
    report.insert("big_rows".into(), json!(args.fairness_big_rows));
    report.insert("bulk_rows".into(), json!(rows));
    report.insert("workers".into(), json!(args.workers));
    report.insert("bulk_ratio_on_to_off".into(), json!(bulk_ratio));
    report.insert("phase_seconds".into(), json!(took.as_secs_f64()));
    Ok(Value::Object(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_switch_wins_over_set() {
        let args = <Args as clap::Parser>::try_parse_from([
            "orbit-bench",
            "--set",
            "tenants.fair_scheduling=false",
            "--set",
            "worker.concurrency=4",
        ])
        .unwrap();
        let env = settings(&args, true).unwrap();
        assert_eq!(
            env,
            [
                ("ORBIT__WORKER__CONCURRENCY".to_owned(), "4".to_owned()),
                (FAIR_VARIABLE.to_owned(), "true".to_owned()),
            ]
        );
        let env = settings(&args, false).unwrap();
        assert_eq!(env.last().unwrap().1, "false");
    }

    #[test]
    fn ratios_and_medians() {
        let l = Latency {
            idle: Duration::from_millis(700),
            busy: Duration::from_millis(2100),
            bulk_accepted: Duration::from_secs(5),
            bulk_processed: 500_000,
            bulk_total: 2_000_000,
            idle_runs: vec![Duration::from_millis(700)],
        };
        assert!((l.ratio() - 3.0).abs() < 1e-9);
        assert!((l.bulk_progress() - 0.25).abs() < 1e-9);
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
