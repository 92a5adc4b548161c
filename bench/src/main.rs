//! `orbit-bench`: Orbit measured against `psql \copy` and `pgloader` on the same file, the same
//! PostgreSQL and the same run, plus latency under load and peak memory. `deploy/bench.sh`
//! brings up the services, builds the release binaries and runs it; docs/performance.md
//! records a run.
//!
//! - `generate`: the deterministic contacts CSV;
//! - `baseline`: the `psql \copy` and `pgloader` loads;
//! - `orbit`: the release gateway and workers as processes, with /proc readings;
//! - `load`: the synchronous path under concurrent clients;
//! - `open`: small uploads offered at a fixed rate (open loop), latency from when each was
//!   due, and the CPU each costs the gateway, the workers and PostgreSQL;
//! - `scaleout`: one directory's file on 1, 2, 4… CPU-capped workers;
//! - `cgroup`: the cgroup v1 CPU cap each of those workers runs under;
//! - `citus`: the same stack on a Citus cluster and on PostgreSQL, one directory and several;
//! - `fairness`: one organization's small upload, idle and behind another's bulk files, and a
//!   lone organization's bulk ingest, with fair scheduling on and off;
//! - `reimport`: the same contacts imported again into their directory, once and twice at
//!   once, against the first import;
//! - `export`: a directory streamed out by `GET …/profiles/export` as CSV and NDJSON, against
//!   paging its JSON list, and the gateway's peak RSS meanwhile;
//! - `node`: the database servers a stack writes to, their WAL and CPU time;
//! - `wal`: PostgreSQL WAL positions, for the bytes of WAL a load writes per row.
//!
//! This file holds the flags, the bulk ingest measurement and the targets.

mod baseline;
mod cgroup;
mod citus;
mod compressed;
mod export;
mod fairness;
mod generate;
mod load;
mod node;
mod open;
mod orbit;
mod reimport;
mod scaleout;
mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use node::{Node, NodeUse};
use orbit::{Orbit, StackKind};
use orbit_testkit::TestDatabase;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Parser)]
#[command(about = "Benchmark Orbit against psql \\copy and pgloader; see docs/performance.md")]
struct Args {
    /// Rows in the bulk file.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Where files, results and the logs of failed runs go.
    #[arg(long, default_value = "/var/tmp/orbit-bench")]
    work_dir: PathBuf,
    /// orbit-worker processes on the distributed stack.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Concurrent clients on the synchronous path.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long the synchronous-path load runs, in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Rows per synchronous upload.
    #[arg(long, default_value_t = 100)]
    sync_rows: u64,
    /// Size of the file for the memory measurement.
    #[arg(long, default_value_t = 1 << 30)]
    rss_bytes: u64,
    /// Orbit settings for every gateway and worker, as `section.key=value` (repeatable), for
    /// example `--set ingest.chunk_rows=5000 --set worker.concurrency=4`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Phases to run, comma-separated. `citus` is not in the default run: it needs a Citus
    /// cluster (`bash deploy/citus.sh`); nor are `export` and `compressed`, which load their own
    /// 1M rows and take minutes. `fairness` is (about two minutes on 2 cores).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "copy,pgloader,distributed,embedded,scaleout,fairness,reimport,sync,open,rss",
        value_parser = PHASES,
    )]
    phases: Vec<String>,
    /// Scale-out phase: rows in the file uploaded into one directory.
    #[arg(long, default_value_t = 100_000)]
    scaleout_rows: u64,
    /// Scale-out phase: the numbers of orbit-worker processes to run it with, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64),
    )]
    scaleout_workers: Vec<usize>,
    /// Scale-out phase: CPU time each worker may use per period, in µs (10000 of 100000 is a
    /// tenth of a core).
    #[arg(long, default_value_t = 10_000)]
    scaleout_quota_us: u64,
    /// Scale-out phase: the CFS period the quota is counted in, in µs.
    #[arg(long, default_value_t = 100_000)]
    scaleout_period_us: u64,
    /// Scale-out phase: `ingest.chunk_rows`, small enough that each worker gets several chunks
    /// and the last round's stragglers are a small share of the run.
    #[arg(long, default_value_t = 2_500)]
    scaleout_chunk_rows: u64,
    /// Citus phase: the directories the `--rows` rows are split over, one upload each, all at
    /// once (after the run into one directory).
    #[arg(
        long,
        default_value_t = 8,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=64),
    )]
    citus_dirs: usize,
    /// Citus phase: the stacks to run it on, comma-separated: `plain` (the test PostgreSQL,
    /// `ORBIT_TEST_POSTGRES_URL`) and `citus` (the test Citus coordinator, `ORBIT_TEST_CITUS_URL`,
    /// default `deploy/citus.sh`'s).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "plain,citus",
        value_parser = citus::STACKS,
    )]
    citus_stacks: Vec<String>,
    /// Fairness phase: rows of organization B's upload, timed idle and behind A's files.
    #[arg(long, default_value_t = 20_000)]
    fairness_small_rows: u64,
    /// Fairness phase: rows of each of organization A's files.
    #[arg(long, default_value_t = 500_000)]
    fairness_big_rows: u64,
    /// Fairness phase: organization A's files, uploaded at once, each into a directory of its
    /// own, just before B's timed upload.
    #[arg(
        long,
        default_value_t = 4,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64),
    )]
    fairness_big_files: usize,
    /// Fairness phase: rows of the one-organization bulk ingest run with fair scheduling on and
    /// off.
    #[arg(long, default_value_t = 1_000_000)]
    fairness_bulk_rows: u64,
    /// Fairness phase: bulk ingests per setting, on and off taking turns; the median counts.
    #[arg(
        long,
        default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16),
    )]
    fairness_bulk_runs: usize,
    /// Export phase: profiles loaded into one directory, then exported and paged through.
    #[arg(long, default_value_t = 1_000_000)]
    export_rows: u64,
    /// Compressed phase: rows in the file uploaded as it is, gzip'ed and zstd'ed.
    #[arg(long, default_value_t = 1_000_000)]
    compressed_rows: u64,
    /// Re-import phase: rows of the file imported into a directory, then again.
    #[arg(long, default_value_t = 300_000)]
    reimport_rows: u64,
    /// Open-loop phase: uploads of `--sync-rows` rows offered per second, for `--seconds`.
    #[arg(long, default_value_t = 100.0)]
    open_rate: f64,
}

/// Every phase, in the order they run.
const PHASES: [&str; 13] = [
    "copy",
    "pgloader",
    "distributed",
    "embedded",
    "scaleout",
    "citus",
    "fairness",
    "reimport",
    "export",
    "compressed",
    "sync",
    "open",
    "rss",
];

impl Args {
    /// `--set section.key=value` as the `ORBIT__SECTION__KEY` variables Orbit reads.
    fn orbit_env(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.settings
            .iter()
            .map(|s| {
                let (key, value) = s
                    .split_once('=')
                    .with_context(|| format!("--set {s}: expected section.key=value"))?;
                let name = format!("ORBIT__{}", key.to_uppercase().replace('.', "__"));
                Ok((name, value.to_owned()))
            })
            .collect()
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Each bulk load starts without the previous one's dirty pages to write back.
async fn checkpoint() -> anyhow::Result<()> {
    Node::postgres().checkpoint().await
}

/// What one bulk ingest into Orbit measured.
pub struct Ingest {
    took: Duration,
    gateway_cpu: Duration,
    workers_cpu: Duration,
    machine_busy: Duration,
    gateway_rss: u64,
    workers_rss: u64,
    upload_response: Duration,
    /// WAL the database servers wrote from the first byte to `completed`, all together
    /// (distributed only).
    wal_bytes: Option<u64>,
    /// What each database server did meanwhile (distributed only).
    nodes: Vec<NodeUse>,
    /// Each upload's source as `GET` showed it once `completed`.
    sources: Vec<Value>,
}

/// One file uploaded into one directory.
pub struct Upload<'a> {
    pub dir: Uuid,
    pub csv: &'a Path,
    pub rows: u64,
}

/// A fresh stack of `kind` with this run's workers and `--set` settings.
async fn stack(kind: StackKind, args: &Args) -> anyhow::Result<Orbit> {
    Orbit::start(kind, &args.work_dir, args.workers, &args.orbit_env()?).await
}

/// Uploads `csv` (`rows` rows) to a fresh Orbit and times first byte to `completed`.
async fn ingest(kind: StackKind, args: &Args, csv: &Path, rows: u64) -> anyhow::Result<Ingest> {
    let mut orbit = stack(kind, args).await?;
    measure_ingest(&mut orbit, csv, rows).await
}

/// Uploads `csv` (`rows` rows) to a started Orbit and times first byte to `completed`.
pub async fn measure_ingest(orbit: &mut Orbit, csv: &Path, rows: u64) -> anyhow::Result<Ingest> {
    let dir = orbit.tenant.dir;
    measure_uploads(orbit, &[Upload { dir, csv, rows }]).await
}

/// Sends every upload at once, each to its directory, and times the first byte to the last
/// `completed`. The upload response is the last of their answers.
pub async fn measure_uploads(orbit: &mut Orbit, uploads: &[Upload<'_>]) -> anyhow::Result<Ingest> {
    for node in &orbit.nodes {
        node.checkpoint().await?;
    }
    let mut marks = Vec::new();
    for node in &orbit.nodes {
        marks.push(node.mark().await?);
    }
    let busy_before = orbit::machine_busy()?;
    let (gateway_before, workers_before) = orbit.cpu()?;
    let started = Instant::now();
    let answers =
        futures::future::try_join_all(uploads.iter().map(|u| orbit.upload_file(u.dir, u.csv)))
            .await?;
    let upload_response = started.elapsed();
    // The gateway's peak so far is the peak of accepting the uploads.
    let gateway_rss = orbit::peak_rss(&orbit.gateway)?;
    let mut sources = Vec::new();
    for (status, receipt) in answers {
        anyhow::ensure!(
            status == StatusCode::ACCEPTED || status == StatusCode::CREATED,
            "upload answered {status}: {receipt}"
        );
        sources.push(
            receipt["source_id"]
                .as_str()
                .context("source_id")?
                .to_owned(),
        );
    }
    let mut done = Vec::new();
    for (upload, source) in uploads.iter().zip(&sources) {
        done.push(
            orbit
                .wait_completed(upload.dir, source, Duration::from_secs(3600))
                .await?,
        );
    }
    let took = started.elapsed();
    let (gateway_after, workers_after) = orbit.cpu()?;
    let busy_after = orbit::machine_busy()?;
    let mut nodes = Vec::new();
    for mark in &marks {
        nodes.push(mark.since().await?);
    }
    // The generated files are clean: anything but every row accepted without a warning means
    // the run measured something else (or Orbit lost rows).
    for (upload, done) in uploads.iter().zip(&done) {
        let rows = upload.rows;
        anyhow::ensure!(
            done["accepted"] == rows && done["failed"] == 0 && done["warnings"] == 0,
            "expected {rows} rows accepted without warnings: {done}"
        );
    }
    orbit.succeeded();
    let workers_rss = orbit
        .workers
        .iter()
        .map(orbit::peak_rss)
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    Ok(Ingest {
        took,
        gateway_cpu: gateway_after - gateway_before,
        workers_cpu: workers_after - workers_before,
        machine_busy: busy_after - busy_before,
        gateway_rss,
        workers_rss,
        upload_response,
        wal_bytes: (!nodes.is_empty()).then(|| nodes.iter().map(|n| n.wal_bytes).sum()),
        nodes,
        sources: done,
    })
}

fn baseline_rate(name: &str, rows: u64, load: &baseline::Load) -> f64 {
    let rate = rows as f64 / load.took.as_secs_f64();
    println!(
        "{name:<20} {:>8.2} s  {rate:>9.0} rows/s  (WAL {:.0} bytes/row)",
        load.took.as_secs_f64(),
        load.wal_bytes as f64 / rows as f64
    );
    rate
}

/// One target and what this run measured for it.
#[derive(Debug, PartialEq)]
struct Verdict {
    name: &'static str,
    value: f64,
    target: f64,
    at_least: bool,
}

impl Verdict {
    fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.target
        } else {
            self.value <= self.target
        }
    }
}

/// The targets against what this run measured; those whose phase did not run are left out.
fn targets(results: &serde_json::Map<String, Value>) -> Vec<Verdict> {
    let at = |path: &[&str]| -> Option<f64> {
        let mut v = results.get(path[0])?;
        for key in &path[1..] {
            v = v.get(key)?;
        }
        v.as_f64()
    };
    let kb = |bytes: Option<f64>| bytes.map(|b| b / 1000.0);
    let targets: [(&str, Option<f64>, f64, bool); 19] = [
        (
            "distributed rows/s / psql \\copy",
            at(&["ratio_orbit_distributed_to_psql_copy"]),
            0.3,
            true,
        ),
        (
            "distributed rows/s / pgloader",
            at(&["ratio_orbit_distributed_to_pgloader"]),
            1.0,
            true,
        ),
        (
            "distributed WAL KB/row",
            kb(at(&["wal_bytes_per_row", "orbit_distributed"])),
            1.2,
            false,
        ),
        (
            "scale-out rows/s, 4 capped workers / 1",
            at(&["scaleout", "speedup_4_vs_1"]),
            3.2,
            true,
        ),
        (
            "citus rows/s / PostgreSQL, 8 directories",
            at(&["citus", "ratio_citus_to_plain", "8_dirs"]),
            0.5,
            true,
        ),
        (
            "fair: small upload busy / idle",
            at(&["fairness", "on", "busy_to_idle"]),
            3.0,
            false,
        ),
        (
            "fair: bulk rows/s, fair on / off",
            at(&["fairness", "bulk_ratio_on_to_off"]),
            0.95,
            true,
        ),
        (
            "re-import rows/s / import",
            at(&["reimport", "ratio_reimport_to_import"]),
            0.8,
            true,
        ),
        (
            "two re-imports at once, rows/s / import",
            at(&["reimport", "ratio_two_reimports_to_import"]),
            1.0,
            true,
        ),
        (
            "export CSV profiles/s",
            at(&["export", "csv", "profiles_per_second"]),
            150_000.0,
            true,
        ),
        (
            "export NDJSON profiles/s",
            at(&["export", "ndjson", "profiles_per_second"]),
            150_000.0,
            true,
        ),
        (
            "export CSV / paging the JSON list",
            at(&["export", "ratio_csv_to_paging"]),
            10.0,
            true,
        ),
        (
            "gateway peak RSS MiB, exports",
            at(&["export", "gateway_peak_rss_mib"]),
            64.0,
            false,
        ),
        (
            "compressed: gzip rows/s / plain",
            at(&["compressed", "ratio_gzip_to_plain"]),
            0.9,
            true,
        ),
        (
            "compressed: zstd rows/s / plain",
            at(&["compressed", "ratio_zstd_to_plain"]),
            0.9,
            true,
        ),
        (
            "sync p99 ms, 16 clients, one directory",
            at(&["sync", "distributed_one_dir", "p99_ms"]),
            50.0,
            false,
        ),
        (
            "open loop p99 ms, uploads offered at --open-rate",
            at(&["open", "latency", "p99_ms"]),
            25.0,
            false,
        ),
        (
            "gateway peak RSS MiB, memory run",
            at(&["rss_run", "run", "peak_rss_mib", "gateway"]),
            64.0,
            false,
        ),
        (
            "worker peak RSS MiB, memory run",
            at(&["rss_run", "run", "peak_rss_mib", "worker"]),
            64.0,
            false,
        ),
    ];
    targets
        .into_iter()
        .filter_map(|(name, value, target, at_least)| {
            Some(Verdict {
                name,
                value: value?,
                target,
                at_least,
            })
        })
        .collect()
}

fn print_targets(results: &serde_json::Map<String, Value>) {
    println!("targets:");
    for v in targets(results) {
        println!(
            "  {:<42} {:>8.2}  target {} {:<6} {}",
            v.name,
            v.value,
            if v.at_least { ">=" } else { "<=" },
            v.target,
            if v.met() { "met" } else { "MISSED" }
        );
    }
}

fn report_ingest(name: &str, rows: u64, i: &Ingest) -> Value {
    let rate = rows as f64 / i.took.as_secs_f64();
    let others = i.machine_busy.saturating_sub(i.gateway_cpu + i.workers_cpu);
    let wal_per_row = i.wal_bytes.map(|b| b as f64 / rows as f64);
    println!(
        "{name:<20} {:>8.2} s  {rate:>9.0} rows/s  (upload answered after {:.2} s; CPU s: gateway {:.1}, workers {:.1}, everything else {:.1}; peak RSS MiB: gateway {:.1}, worker {:.1}{})",
        i.took.as_secs_f64(),
        i.upload_response.as_secs_f64(),
        i.gateway_cpu.as_secs_f64(),
        i.workers_cpu.as_secs_f64(),
        others.as_secs_f64(),
        mib(i.gateway_rss),
        mib(i.workers_rss),
        wal_per_row.map_or(String::new(), |w| format!("; WAL {w:.0} bytes/row")),
    );
    json!({
        "seconds": i.took.as_secs_f64(),
        "rows_per_second": rate,
        "upload_response_seconds": i.upload_response.as_secs_f64(),
        "cpu_seconds": {
            "gateway": i.gateway_cpu.as_secs_f64(),
            "workers": i.workers_cpu.as_secs_f64(),
            "everything_else": others.as_secs_f64(),
        },
        "peak_rss_mib": { "gateway": mib(i.gateway_rss), "worker": mib(i.workers_rss) },
        "wal_bytes": i.wal_bytes,
        "wal_bytes_per_row": wal_per_row,
        "nodes": i.nodes.iter().map(|n| json!({
            "name": n.name,
            "address": n.address,
            "cpu_seconds": n.cpu.as_secs_f64(),
            "wal_bytes": n.wal_bytes,
            "wal_bytes_per_row": n.wal_bytes as f64 / rows as f64,
        })).collect::<Vec<_>>(),
    })
}

async fn sync_load(kind: StackKind, args: &Args, per_client_dirs: bool) -> anyhow::Result<Value> {
    let orbit = stack(kind, args).await?;
    let dirs = if per_client_dirs {
        let mut dirs = Vec::new();
        for i in 0..args.clients {
            dirs.push(orbit.create_directory(&format!("client {i}")).await?);
        }
        dirs
    } else {
        vec![orbit.tenant.dir]
    };
    let orbit = Arc::new(orbit);
    let r = load::run(
        orbit.clone(),
        &dirs,
        args.clients,
        Duration::from_secs(args.seconds),
        args.sync_rows,
    )
    .await?;
    let name = format!(
        "{} sync, {}",
        kind.name(),
        if per_client_dirs {
            "dir per client"
        } else {
            "one dir"
        }
    );
    println!(
        "{name:<36} {:>7.1} uploads/s  p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  ({} uploads, {} errors)",
        r.per_second(),
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3,
        r.max.as_secs_f64() * 1e3,
        r.uploads,
        r.errors,
    );
    anyhow::ensure!(r.errors == 0, "{} uploads did not answer 201", r.errors);
    orbit.succeeded();
    Ok(json!({
        "uploads_per_second": r.per_second(),
        "p50_ms": r.p50.as_secs_f64() * 1e3,
        "p99_ms": r.p99.as_secs_f64() * 1e3,
        "max_ms": r.max.as_secs_f64() * 1e3,
        "uploads": r.uploads,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let phase = |name: &str| args.phases.iter().any(|p| p == name);
    std::fs::create_dir_all(&args.work_dir)?;
    if phase("scaleout") {
        // Before anything long runs: a machine where the caps cannot be made fails now.
        scaleout::check_caps(&args)?;
    }
    let mut results = serde_json::Map::new();

    let mut rates = serde_json::Map::new();
    let mut wal = serde_json::Map::new();
    let bulk = ["copy", "pgloader", "distributed", "embedded"];
    if bulk.iter().any(|p| phase(p)) {
        let csv = args.work_dir.join(format!("contacts-{}.csv", args.rows));
        let generated = generate::write_csv(&csv, args.rows, u64::MAX)?;
        let rows = generated.rows;
        println!(
            "file: {} ({rows} rows, {:.1} MB)",
            csv.display(),
            generated.bytes as f64 / 1e6
        );
        results.insert(
            "file".into(),
            json!({ "rows": rows, "bytes": generated.bytes }),
        );

        if phase("copy") || phase("pgloader") {
            let db = TestDatabase::create().await;
            if phase("copy") {
                checkpoint().await?;
                let load = baseline::psql_copy(&db, &csv, rows).await?;
                rates.insert(
                    "psql_copy".into(),
                    json!(baseline_rate("psql \\copy", rows, &load)),
                );
                wal.insert(
                    "psql_copy".into(),
                    json!(load.wal_bytes as f64 / rows as f64),
                );
            }
            if phase("pgloader") {
                checkpoint().await?;
                let load = baseline::pgloader(&db, &csv, rows, &args.work_dir).await?;
                rates.insert(
                    "pgloader".into(),
                    json!(baseline_rate("pgloader", rows, &load)),
                );
                wal.insert(
                    "pgloader".into(),
                    json!(load.wal_bytes as f64 / rows as f64),
                );
            }
        }
        for kind in [StackKind::Distributed, StackKind::Embedded] {
            if phase(kind.name()) {
                let i = ingest(kind, &args, &csv, rows).await?;
                let report = report_ingest(&format!("orbit {}", kind.name()), rows, &i);
                rates.insert(
                    format!("orbit_{}", kind.name()),
                    report["rows_per_second"].clone(),
                );
                if let Some(w) = report["wal_bytes_per_row"].as_f64() {
                    wal.insert(format!("orbit_{}", kind.name()), json!(w));
                }
                results.insert(format!("orbit_{}", kind.name()), report);
            }
        }
    }
    for orbit in ["orbit_distributed", "orbit_embedded"] {
        for base in ["psql_copy", "pgloader"] {
            if let (Some(o), Some(b)) = (
                rates.get(orbit).and_then(Value::as_f64),
                rates.get(base).and_then(Value::as_f64),
            ) {
                println!("ratio {orbit} / {base}: {:.2}", o / b);
                results.insert(format!("ratio_{orbit}_to_{base}"), json!(o / b));
            }
        }
    }
    results.insert("rows_per_second".into(), Value::Object(rates));
    results.insert("wal_bytes_per_row".into(), Value::Object(wal));

    if phase("scaleout") {
        results.insert("scaleout".into(), scaleout::run(&args).await?);
    }

    if phase("citus") {
        results.insert("citus".into(), citus::run(&args).await?);
    }

    if phase("fairness") {
        results.insert("fairness".into(), fairness::run(&args).await?);
    }

    if phase("reimport") {
        results.insert("reimport".into(), reimport::run(&args).await?);
    }

    if phase("export") {
        results.insert("export".into(), export::run(&args).await?);
    }

    if phase("compressed") {
        results.insert("compressed".into(), compressed::run(&args).await?);
    }

    if phase("sync") {
        let mut sync = serde_json::Map::new();
        for (kind, per_client) in [
            (StackKind::Distributed, false),
            (StackKind::Distributed, true),
            (StackKind::Embedded, false),
        ] {
            let key = format!(
                "{}_{}",
                kind.name(),
                if per_client {
                    "dir_per_client"
                } else {
                    "one_dir"
                }
            );
            sync.insert(key, sync_load(kind, &args, per_client).await?);
        }
        results.insert("sync".into(), Value::Object(sync));
    }

    if phase("open") {
        results.insert("open".into(), open::run(&args).await?);
    }

    if phase("rss") {
        let big = args.work_dir.join("contacts-rss.csv");
        let g = generate::write_csv(&big, u64::MAX, args.rss_bytes)?;
        println!(
            "memory file: {} ({} rows, {:.2} GiB)",
            big.display(),
            g.rows,
            g.bytes as f64 / (1u64 << 30) as f64
        );
        let i = ingest(StackKind::Distributed, &args, &big, g.rows).await?;
        let report = report_ingest("orbit memory run", g.rows, &i);
        results.insert(
            "rss_run".into(),
            json!({ "rows": g.rows, "bytes": g.bytes, "run": report }),
        );
        std::fs::remove_file(&big)?;
    }

    print_targets(&results);
    let out = args.work_dir.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&Value::Object(results))?)?;
    println!("results: {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_run_has_every_phase_but_citus_and_export_and_their_settings() {
        let args = Args::try_parse_from(["orbit-bench"]).unwrap();
        let mut phases = PHASES.to_vec();
        phases.retain(|p| !["citus", "export", "compressed"].contains(p));
        assert_eq!(args.phases, phases);
        assert_eq!(args.citus_dirs, 8);
        assert_eq!(args.citus_stacks, ["plain", "citus"]);
        assert_eq!(args.scaleout_workers, [1, 2, 4]);
        assert_eq!(args.scaleout_rows, 100_000);
        assert_eq!(
            (args.scaleout_quota_us, args.scaleout_period_us),
            (10_000, 100_000)
        );
        // The shape: B's 20,000 rows behind A's four files of 500,000.
        assert_eq!(
            (
                args.fairness_small_rows,
                args.fairness_big_files,
                args.fairness_big_rows
            ),
            (20_000, 4, 500_000)
        );
        assert_eq!(
            (args.fairness_bulk_rows, args.fairness_bulk_runs),
            (1_000_000, 1)
        );
        // The directory: 1M profiles.
        assert_eq!(args.export_rows, 1_000_000);
        // The open loop: 100 uploads a second.
        assert_eq!(args.open_rate, 100.0);
    }

    #[test]
    fn phase_and_worker_lists_are_parsed_and_checked() {
        let args = Args::try_parse_from([
            "orbit-bench",
            "--phases",
            "scaleout,copy",
            "--scaleout-workers",
            "1,3,8",
            "--scaleout-rows",
            "30000",
        ])
        .unwrap();
        assert_eq!(args.phases, ["scaleout", "copy"]);
        assert_eq!(args.scaleout_workers, [1, 3, 8]);
        assert_eq!(args.scaleout_rows, 30_000);

        let e = Args::try_parse_from(["orbit-bench", "--phases", "copy,scale-out"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("scale-out") && e.contains("scaleout"), "{e}");
        for bad in ["0", "1,x", "65"] {
            assert!(
                Args::try_parse_from(["orbit-bench", "--scaleout-workers", bad]).is_err(),
                "{bad}"
            );
        }
        let args = Args::try_parse_from([
            "orbit-bench",
            "--phases",
            "citus",
            "--citus-stacks",
            "plain",
            "--citus-dirs",
            "4",
        ])
        .unwrap();
        assert_eq!(
            (args.citus_stacks, args.citus_dirs),
            (vec!["plain".into()], 4)
        );
        let args = Args::try_parse_from([
            "orbit-bench",
            "--phases",
            "fairness",
            "--fairness-big-files",
            "2",
            "--fairness-bulk-runs",
            "3",
        ])
        .unwrap();
        assert_eq!(args.phases, ["fairness"]);
        assert_eq!((args.fairness_big_files, args.fairness_bulk_runs), (2, 3));
        let args = Args::try_parse_from([
            "orbit-bench",
            "--phases",
            "export",
            "--export-rows",
            "300000",
        ])
        .unwrap();
        assert_eq!(
            (args.phases, args.export_rows),
            (vec!["export".into()], 300_000)
        );
        for bad in [
            ["--citus-stacks", "postgres"],
            ["--citus-dirs", "1"],
            ["--fairness-big-files", "0"],
            ["--fairness-bulk-runs", "0"],
        ] {
            assert!(
                Args::try_parse_from(["orbit-bench", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn settings_become_orbit_variables() {
        let args = Args::try_parse_from(["orbit-bench", "--set", "worker.concurrency=4"]).unwrap();
        assert_eq!(
            args.orbit_env().unwrap(),
            [("ORBIT__WORKER__CONCURRENCY".to_owned(), "4".to_owned())]
        );
        let args = Args::try_parse_from(["orbit-bench", "--set", "worker.concurrency"]).unwrap();
        assert!(args.orbit_env().is_err());
    }

    #[test]
    fn targets_are_judged_from_what_ran() {
        let results = json!({
            "ratio_orbit_distributed_to_psql_copy": 0.31,
            "ratio_orbit_distributed_to_pgloader": 0.9,
            "wal_bytes_per_row": { "orbit_distributed": 1250.0 },
            "scaleout": { "speedup_4_vs_1": 3.25 },
            "sync": { "distributed_one_dir": { "p99_ms": 49.0 } },
            "citus": { "ratio_citus_to_plain": { "1_dir": 0.3, "8_dirs": 0.55 } },
            "fairness": {
                "on": { "busy_to_idle": 2.4 },
                "off": { "busy_to_idle": 40.0 },
                "bulk_ratio_on_to_off": 0.93,
            },
        });
        let verdicts = targets(results.as_object().unwrap());
        let got: Vec<(&str, f64, bool)> = verdicts
            .iter()
            .map(|v| (v.name, v.value, v.met()))
            .collect();
        assert_eq!(
            got,
            [
                ("distributed rows/s / psql \\copy", 0.31, true),
                ("distributed rows/s / pgloader", 0.9, false),
                ("distributed WAL KB/row", 1.25, false),
                ("scale-out rows/s, 4 capped workers / 1", 3.25, true),
                ("citus rows/s / PostgreSQL, 8 directories", 0.55, true),
                ("fair: small upload busy / idle", 2.4, true),
                ("fair: bulk rows/s, fair on / off", 0.93, false),
                ("sync p99 ms, 16 clients, one directory", 49.0, true),
            ]
        );
        // A run of only the memory phase judges only memory.
        let results = json!({ "rss_run": { "run": { "peak_rss_mib": { "gateway": 58.4, "worker": 64.5 } } } });
        let verdicts = targets(results.as_object().unwrap());
        assert_eq!(verdicts.len(), 2);
        assert!(verdicts[0].met() && !verdicts[1].met());
        // The fairness targets judge fair scheduling on: off's ratio is not a target.
        let results = json!({ "fairness": {
            "on": { "busy_to_idle": 3.1 },
            "off": { "busy_to_idle": 1.0 },
            "bulk_ratio_on_to_off": 0.95,
        } });
        let got: Vec<(&str, bool)> = targets(results.as_object().unwrap())
            .iter()
            .map(|v| (v.name, v.met()))
            .collect();
        assert_eq!(
            got,
            [
                ("fair: small upload busy / idle", false),
                ("fair: bulk rows/s, fair on / off", true),
            ]
        );
        // The export targets: both formats' rate, CSV against paging, and the gateway's peak.
        let results = json!({ "export": {
            "csv": { "profiles_per_second": 180_000.0 },
            "ndjson": { "profiles_per_second": 120_000.0 },
            "csv_zstd": { "profiles_per_second": 90_000.0 },
            "ratio_csv_to_paging": 12.5,
            "gateway_peak_rss_mib": 66.0,
        } });
        let got: Vec<(&str, bool)> = targets(results.as_object().unwrap())
            .iter()
            .map(|v| (v.name, v.met()))
            .collect();
        assert_eq!(
            got,
            [
                ("export CSV profiles/s", true),
                ("export NDJSON profiles/s", false),
                ("export CSV / paging the JSON list", true),
                ("gateway peak RSS MiB, exports", false),
            ]
        );
        let results = json!({ "reimport": {
            "ratio_reimport_to_import": 0.81,
            "ratio_two_reimports_to_import": 0.7,
        } });
        let got: Vec<(&str, bool)> = targets(results.as_object().unwrap())
            .iter()
            .map(|v| (v.name, v.met()))
            .collect();
        assert_eq!(
            got,
            [
                ("re-import rows/s / import", true),
                ("two re-imports at once, rows/s / import", false),
            ]
        );
    }
}
