//! The export phase (issue 23): how fast `GET …/profiles/export` streams a large directory out,
//! against paging the JSON list through it, and what the gateway's memory does meanwhile.
//!
//! A fresh distributed stack (the gateway and `--workers` workers on PostgreSQL, S3 and
//! RabbitMQ) ingests `--export-rows` generated rows into one directory, waiting for
//! `completed`. Then, one after the other, it exports the directory as CSV, as NDJSON (both
//! uncompressed) and as CSV with `Accept-Encoding: zstd`, each read to its end, counting bytes
//! and lines; then it pages `GET …/profiles?limit=1000` from the first page to the last.
//!
//! The gateway's peak RSS during each export is its `VmHWM`, reset to the current RSS just
//! before the export (`5` written to `/proc/<pid>/clear_refs`, Linux 4.0 and later), since the
//! load's upload has already raised it. Its `VmRSS` is also sampled every 50 ms: the figure
//! that counts when the reset is refused, and a check on the other when it is not.
//!
//! Where the time goes: the CPU time of the gateway, of the PostgreSQL backends connected to
//! the stack's database and of this process (the client), over each read.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt as _;
use reqwest::header::{HeaderMap, ACCEPT_ENCODING, CONTENT_ENCODING};
use reqwest::StatusCode;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::Connection as _;
use uuid::Uuid;

use crate::orbit::{self, Orbit, StackKind};
use crate::{generate, measure_ingest, mib, Args};

/// The largest page the list allows (docs/api.md, "Pagination").
const PAGE_LIMIT: usize = 1000;

/// How often the gateway's RSS is read while an export runs.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// What one run of the phase reads: the exports, in the order they run.
const EXPORTS: [Export; 3] = [
    Export {
        key: "csv",
        format: "csv",
        encoding: None,
    },
    Export {
        key: "ndjson",
        format: "ndjson",
        encoding: None,
    },
    Export {
        key: "csv_zstd",
        format: "csv",
        encoding: Some("zstd"),
    },
];

struct Export {
    /// Its name in results.json.
    key: &'static str,
    format: &'static str,
    /// `Accept-Encoding`; none asks for the body as it is.
    encoding: Option<&'static str>,
}

/// What one export measured.
struct Exported {
    took: Duration,
    /// The `orbit-profile-count` header.
    profiles: u64,
    /// As they came over the wire (compressed, for a compressed export).
    wire_bytes: u64,
    /// Decompressed.
    bytes: u64,
    lines: u64,
    gateway_cpu: Duration,
    postgres_cpu: Duration,
    /// This process's, which reads (and decodes) the body on the same cores.
    client_cpu: Duration,
    /// `VmHWM` after a reset just before the export, or `None` when the reset was refused.
    peak_rss: Option<u64>,
    /// The largest `VmRSS` read every [`SAMPLE_EVERY`].
    sampled_rss: u64,
}

/// Counts the bytes and lines written to it: the body, after any decompression.
#[derive(Default)]
struct Counter {
    bytes: u64,
    lines: u64,
}

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes += buf.len() as u64;
        self.lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A field of `/proc/<pid>/status` given in kB, in bytes.
fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kib(&status, field)
        .map(|kib| kib * 1024)
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Sets the process's `VmHWM` back to its current RSS; false when the kernel refuses.
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Reads `pid`'s `VmRSS` every [`SAMPLE_EVERY`] on a thread of its own (the runtime's threads
/// are busy reading the body) until stopped: the largest reading.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut max = 0;
            loop {
                if let Ok(rss) = status_bytes(pid, "VmRSS") {
                    max = max.max(rss);
                }
                if flag.load(Ordering::Relaxed) {
                    return max;
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        RssSampler { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// A client that neither asks for nor decodes a compressed body by itself, whatever features
/// reqwest was built with in this workspace: each request says what it accepts, and the bytes
/// counted are those the gateway sent.
fn plain_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_gzip()
        .no_brotli()
        .no_zstd()
        .no_deflate()
        .build()?)
}

async fn export(orbit: &Orbit, client: &reqwest::Client, e: &Export) -> anyhow::Result<Exported> {
    let gateway = orbit.gateway.id().context("the gateway has exited")?;
    let url = format!(
        "{}/v2/organizations/{}/directories/{}/profiles/export?format={}",
        orbit.base, orbit.tenant.org, orbit.tenant.dir, e.format
    );
    let mut request = client.get(&url).bearer_auth(&orbit.tenant.token);
    if let Some(encoding) = e.encoding {
        request = request.header(ACCEPT_ENCODING, encoding);
    }
    let reset = reset_peak_rss(gateway);
    let sampler = RssSampler::start(gateway);
    let pg = orbit::BackendsMark::new(orbit).await?;
    let (gateway_before, _) = orbit.cpu()?;
    let client_before = own_cpu()?;
    let started = Instant::now();
    let response = request.send().await?;
    anyhow::ensure!(
        response.status() == StatusCode::OK,
        "export {} answered {}",
        e.key,
        response.status()
    );
    let profiles = profile_count(response.headers())?;
    let encoding = response
        .headers()
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    anyhow::ensure!(
        encoding.as_deref() == e.encoding,
        "export {} came with Content-Encoding {encoding:?}",
        e.key
    );
    let mut wire_bytes = 0;
    let mut body = response.bytes_stream();
    let counter = match e.encoding {
        None => {
            let mut counter = Counter::default();
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                wire_bytes += chunk.len() as u64;
                counter.write_all(&chunk)?;
            }
            counter
        }
        Some("zstd") => {
            // Decoded as it comes, as a client that wants the rows would.
            let mut decoder = zstd::stream::write::Decoder::new(Counter::default())?;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                wire_bytes += chunk.len() as u64;
                decoder.write_all(&chunk)?;
            }
            decoder.flush()?;
            decoder.into_inner()
        }
        Some(other) => anyhow::bail!("the phase does not decode {other}"),
    };
    let took = started.elapsed();
    let client_cpu = own_cpu()? - client_before;
    let (gateway_after, _) = orbit.cpu()?;
    let postgres_cpu = pg.since().await?;
    let sampled_rss = sampler.stop();
    let peak_rss = match reset {
        true => Some(status_bytes(gateway, "VmHWM")?),
        false => None,
    };
    Ok(Exported {
        took,
        profiles,
        wire_bytes,
        bytes: counter.bytes,
        lines: counter.lines,
        gateway_cpu: gateway_after - gateway_before,
        postgres_cpu,
        client_cpu,
        peak_rss,
        sampled_rss,
    })
}

/// The profiles directory `dir` of the stack's tenant holds, from the export's
/// `orbit-profile-count` header (the body is not read).
pub async fn directory_profiles(orbit: &Orbit, dir: Uuid) -> anyhow::Result<u64> {
    let url = format!(
        "{}/v2/organizations/{}/directories/{dir}/profiles/export?format=csv",
        orbit.base, orbit.tenant.org
    );
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&orbit.tenant.token)
        .send()
        .await?;
    anyhow::ensure!(
        response.status().is_success(),
        "export answered {}",
        response.status()
    );
    profile_count(response.headers())
}

/// The `orbit-profile-count` header of an export's answer.
pub fn profile_count(headers: &HeaderMap) -> anyhow::Result<u64> {
    headers
        .get("orbit-profile-count")
        .context("no orbit-profile-count header")?
        .to_str()?
        .parse()
        .context("orbit-profile-count is not a number")
}

/// A page of the JSON list, the profiles only counted.
#[derive(Deserialize)]
struct Page {
    data: Vec<IgnoredAny>,
    next_cursor: Option<String>,
}

/// What paging the JSON list measured.
struct Paged {
    took: Duration,
    profiles: u64,
    pages: u64,
    bytes: u64,
    gateway_cpu: Duration,
    postgres_cpu: Duration,
    client_cpu: Duration,
}

/// This process's CPU time so far.
fn own_cpu() -> anyhow::Result<Duration> {
    orbit::stat_cpu(&std::fs::read_to_string("/proc/self/stat")?)
}

async fn page_through(orbit: &Orbit, client: &reqwest::Client) -> anyhow::Result<Paged> {
    let url = format!(
        "{}/v2/organizations/{}/directories/{}/profiles",
        orbit.base, orbit.tenant.org, orbit.tenant.dir
    );
    let pg = orbit::BackendsMark::new(orbit).await?;
    let (gateway_before, _) = orbit.cpu()?;
    let client_before = own_cpu()?;
    let started = Instant::now();
    let (mut profiles, mut pages, mut bytes) = (0u64, 0u64, 0u64);
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("limit", PAGE_LIMIT.to_string())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let response = client
            .get(&url)
            .query(&query)
            .bearer_auth(&orbit.tenant.token)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == StatusCode::OK,
            "page {} answered {}",
            pages + 1,
            response.status()
        );
        let body = response.bytes().await?;
        bytes += body.len() as u64;
        let page: Page = serde_json::from_slice(&body)?;
        pages += 1;
        profiles += page.data.len() as u64;
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let took = started.elapsed();
    let client_cpu = own_cpu()? - client_before;
    let (gateway_after, _) = orbit.cpu()?;
    Ok(Paged {
        took,
        profiles,
        pages,
        bytes,
        gateway_cpu: gateway_after - gateway_before,
        postgres_cpu: pg.since().await?,
        client_cpu,
    })
}

/// Which reading the phase's peak is: the exact `VmHWM` when every reset was allowed.
fn peak_of(exports: &[Exported]) -> (f64, &'static str) {
    let hwm: Option<Vec<u64>> = exports.iter().map(|e| e.peak_rss).collect();
    match hwm {
        Some(peaks) if !peaks.is_empty() => (
            mib(peaks.into_iter().max().unwrap_or(0)),
            "VmHWM, reset before each export",
        ),
        _ => (
            mib(exports.iter().map(|e| e.sampled_rss).max().unwrap_or(0)),
            "VmRSS sampled every 50 ms (VmHWM could not be reset)",
        ),
    }
}

/// Runs the phase and prints its lines: the results.json `export` object.
pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let phase_started = Instant::now();
    let csv = args
        .work_dir
        .join(format!("contacts-{}.csv", args.export_rows));
    let generated = generate::write_csv(&csv, args.export_rows, u64::MAX)?;
    let rows = generated.rows;
    let mut orbit = crate::stack(StackKind::Distributed, args).await?;
    let load = measure_ingest(&mut orbit, &csv, rows).await?;
    println!(
        "export: {rows} profiles loaded into one directory in {:.2} s ({:.0} rows/s, {} workers); gateway VmHWM after the load {:.1} MiB",
        load.took.as_secs_f64(),
        rows as f64 / load.took.as_secs_f64(),
        args.workers,
        mib(orbit::peak_rss(&orbit.gateway)?),
    );

    // A million fresh rows set autovacuum off on every table the load wrote, and it would run
    // beside whichever read came first: let the database settle first, as it would have long
    // before anyone exports or pages a directory, so that both reads are timed alike.
    let settle = Instant::now();
    let url = orbit
        .database_url()
        .context("the export phase runs on PostgreSQL")?;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query("VACUUM (ANALYZE)").execute(&mut conn).await?;
    conn.close().await?;
    println!(
        "  the database vacuumed and analyzed in {:.1} s, before any read",
        settle.elapsed().as_secs_f64()
    );

    let client = plain_client()?;
    let mut report = serde_json::Map::new();
    let mut exports = Vec::new();
    for e in &EXPORTS {
        let x = export(&orbit, &client, e).await?;
        anyhow::ensure!(
            x.profiles == rows,
            "export {} counted {} profiles, not {rows}",
            e.key,
            x.profiles
        );
        // Every generated row is a profile with one identity of each kind it has: one line
        // each (NDJSON), plus the header (CSV). Fewer means a body cut short.
        let expected_lines = rows + u64::from(e.format == "csv");
        anyhow::ensure!(
            x.lines == expected_lines,
            "export {} had {} lines, not {expected_lines}",
            e.key,
            x.lines
        );
        let rate = rows as f64 / x.took.as_secs_f64();
        println!(
            "  export {:<9} {:>7.2} s  {rate:>9.0} profiles/s  {:>7.1} MB{}  (CPU s: gateway {:.1}, its PostgreSQL backends {:.1}, client {:.1}; gateway peak RSS {})",
            e.key,
            x.took.as_secs_f64(),
            x.wire_bytes as f64 / 1e6,
            match e.encoding {
                Some(enc) => format!(" {enc} ({:.1} MB decoded)", x.bytes as f64 / 1e6),
                None => String::new(),
            },
            x.gateway_cpu.as_secs_f64(),
            x.postgres_cpu.as_secs_f64(),
            x.client_cpu.as_secs_f64(),
            match x.peak_rss {
                Some(p) => format!("{:.1} MiB VmHWM, {:.1} MiB sampled", mib(p), mib(x.sampled_rss)),
                None => format!("{:.1} MiB sampled", mib(x.sampled_rss)),
            },
        );
        report.insert(
            e.key.to_owned(),
            json!({
                "seconds": x.took.as_secs_f64(),
                "profiles_per_second": rate,
                "wire_bytes": x.wire_bytes,
                "bytes": x.bytes,
                "lines": x.lines,
                "content_encoding": e.encoding,
                "cpu_seconds": {
                    "gateway": x.gateway_cpu.as_secs_f64(),
                    "postgres_backends": x.postgres_cpu.as_secs_f64(),
                    "client": x.client_cpu.as_secs_f64(),
                },
                "gateway_peak_rss_mib": x.peak_rss.map(mib),
                "gateway_sampled_rss_mib": mib(x.sampled_rss),
            }),
        );
        exports.push(x);
    }

    let p = page_through(&orbit, &client).await?;
    anyhow::ensure!(
        p.profiles == rows,
        "paging the list gave {} profiles, not {rows}",
        p.profiles
    );
    let paging_rate = rows as f64 / p.took.as_secs_f64();
    println!(
        "  paging the JSON list {:>7.2} s  {paging_rate:>9.0} profiles/s  {:>7.1} MB in {} pages of {PAGE_LIMIT}  (CPU s: gateway {:.1}, its PostgreSQL backends {:.1}, client {:.1})",
        p.took.as_secs_f64(),
        p.bytes as f64 / 1e6,
        p.pages,
        p.gateway_cpu.as_secs_f64(),
        p.postgres_cpu.as_secs_f64(),
        p.client_cpu.as_secs_f64(),
    );
    let csv_rate = report["csv"]["profiles_per_second"]
        .as_f64()
        .context("the CSV export ran")?;
    let ratio = csv_rate / paging_rate;
    println!("  export CSV / paging: {ratio:.1} x");
    let (peak, peak_source) = peak_of(&exports);
    println!("  gateway peak RSS over the exports: {peak:.1} MiB ({peak_source})");
    orbit.succeeded();

    let took = phase_started.elapsed();
    println!("  the export phase took {:.0} s", took.as_secs_f64());
    report.insert(
        "paging".into(),
        json!({
            "seconds": p.took.as_secs_f64(),
            "profiles_per_second": paging_rate,
            "pages": p.pages,
            "page_limit": PAGE_LIMIT,
            "bytes": p.bytes,
            "cpu_seconds": {
                "gateway": p.gateway_cpu.as_secs_f64(),
                "postgres_backends": p.postgres_cpu.as_secs_f64(),
                "client": p.client_cpu.as_secs_f64(),
            },
        }),
    );
    report.insert("ratio_csv_to_paging".into(), json!(ratio));
    report.insert("gateway_peak_rss_mib".into(), json!(peak));
    report.insert("gateway_peak_rss_source".into(), json!(peak_source));
    report.insert("rows".into(), json!(rows));
    report.insert("workers".into(), json!(args.workers));
    report.insert("load_seconds".into(), json!(load.took.as_secs_f64()));
    report.insert("phase_seconds".into(), json!(took.as_secs_f64()));
    Ok(Value::Object(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read_by_exact_name() {
        let status =
            "Name:\torbit-gateway\nVmHWM:\t   61234 kB\nVmRSS:\t   40960 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(61234));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(40960));
        assert_eq!(parse_status_kib(status, "Rss"), None);
        assert_eq!(parse_status_kib(status, "VmPeak"), None);
    }

    #[test]
    fn this_process_peak_can_be_read_and_sampled() {
        let pid = std::process::id();
        assert!(status_bytes(pid, "VmHWM").unwrap() >= status_bytes(pid, "VmRSS").unwrap() / 2);
        assert!(RssSampler::start(pid).stop() > 0);
    }

    #[test]
    fn lines_are_counted_through_zstd() {
        let body = "a,b\n1,2\n3,4\n".repeat(1000);
        let packed = zstd::encode_all(body.as_bytes(), 1).unwrap();
        let mut decoder = zstd::stream::write::Decoder::new(Counter::default()).unwrap();
        for piece in packed.chunks(7) {
            decoder.write_all(piece).unwrap();
        }
        decoder.flush().unwrap();
        let counter = decoder.into_inner();
        assert_eq!((counter.bytes, counter.lines), (body.len() as u64, 3000));
    }

    fn exported(peak_rss: Option<u64>, sampled_rss: u64) -> Exported {
        Exported {
            took: Duration::from_secs(1),
            profiles: 1,
            wire_bytes: 1,
            bytes: 1,
            lines: 1,
            gateway_cpu: Duration::ZERO,
            postgres_cpu: Duration::ZERO,
            client_cpu: Duration::ZERO,
            peak_rss,
            sampled_rss,
        }
    }

    #[test]
    fn the_peak_is_the_high_water_mark_unless_one_reset_failed() {
        let m = 1 << 20;
        let (peak, source) = peak_of(&[
            exported(Some(40 * m), 38 * m),
            exported(Some(50 * m), 45 * m),
        ]);
        assert_eq!((peak, source.starts_with("VmHWM")), (50.0, true));
        let (peak, source) = peak_of(&[exported(Some(40 * m), 38 * m), exported(None, 45 * m)]);
        assert_eq!((peak, source.starts_with("VmRSS")), (45.0, true));
    }
}
