//! The compressed phase (issue 22): the bulk file uploaded as it is, gzip'ed and zstd'ed,
//! each into a fresh distributed stack, with the same counts and profiles expected of each.
//!
//! Before the uploads it compresses the file as a client would (gzip level 6, the `gzip`
//! default; zstd level 3 with its checksum, the `zstd` default) and times decoding each on one
//! core: what it would cost a worker per row to read a stored compressed object, one of the
//! figures behind what the object store keeps (docs/imports.md, "Compressed files").

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};

use crate::orbit::StackKind;
use crate::{export, generate, measure_ingest, mib, report_ingest, Args};

/// One way of sending the file.
struct Variant {
    key: &'static str,
    path: PathBuf,
    bytes: u64,
    /// Client CPU to compress it; zero for the plain file.
    compress: Duration,
    /// One core's time to decode it whole; zero for the plain file.
    decode: Duration,
}

fn gzip(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut input = BufReader::new(std::fs::File::open(from)?);
    let mut e = flate2::write::GzEncoder::new(
        BufWriter::new(std::fs::File::create(to)?),
        flate2::Compression::new(6),
    );
    std::io::copy(&mut input, &mut e)?;
    e.finish()?.flush()?;
    Ok(())
}

fn zstd(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut input = BufReader::new(std::fs::File::open(from)?);
    let mut e = zstd::stream::Encoder::new(BufWriter::new(std::fs::File::create(to)?), 3)?;
    e.include_checksum(true)?;
    std::io::copy(&mut input, &mut e)?;
    e.finish()?.flush()?;
    Ok(())
}

/// Decodes `path` whole into nothing: the time, and the bytes it decompressed to.
fn decode(path: &Path, key: &str) -> anyhow::Result<(Duration, u64)> {
    let file = BufReader::new(std::fs::File::open(path)?);
    let started = Instant::now();
    let mut reader: Box<dyn Read> = match key {
        "gzip" => Box::new(flate2::read::MultiGzDecoder::new(file)),
        _ => Box::new(zstd::stream::Decoder::new(file)?),
    };
    let n = std::io::copy(&mut reader, &mut std::io::sink())?;
    Ok((started.elapsed(), n))
}

fn variant(key: &'static str, plain: &Path, work_dir: &Path) -> anyhow::Result<Variant> {
    if key == "plain" {
        return Ok(Variant {
            key,
            path: plain.to_owned(),
            bytes: std::fs::metadata(plain)?.len(),
            compress: Duration::ZERO,
            decode: Duration::ZERO,
        });
    }
    let name = plain.file_name().context("a file name")?.to_string_lossy();
    let path = work_dir.join(format!(
        "{name}.{}",
        if key == "gzip" { "gz" } else { "zst" }
    ));
    let started = Instant::now();
    match key {
        "gzip" => gzip(plain, &path)?,
        _ => zstd(plain, &path)?,
    }
    let compress = started.elapsed();
    let (decode, decoded) = decode(&path, key)?;
    anyhow::ensure!(
        decoded == std::fs::metadata(plain)?.len(),
        "{key} decoded to {decoded} bytes"
    );
    Ok(Variant {
        key,
        bytes: std::fs::metadata(&path)?.len(),
        path,
        compress,
        decode,
    })
}

pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let plain = args
        .work_dir
        .join(format!("contacts-{}.csv", args.compressed_rows));
    let rows = generate::write_csv(&plain, args.compressed_rows, u64::MAX)?.rows;
    let plain_bytes = std::fs::metadata(&plain)?.len();
    let mut report = serde_json::Map::new();
    let mut rates = Vec::new();
    for key in ["plain", "gzip", "zstd"] {
        let v = variant(key, &plain, &args.work_dir)?;
        let mut orbit = crate::stack(StackKind::Distributed, args).await?;
        let ingest = measure_ingest(&mut orbit, &v.path, rows).await?;
        let source = ingest.sources.first().context("a source")?;
        let expected = if key == "plain" { "none" } else { key };
        anyhow::ensure!(
            source["compression"] == expected
                && source["byte_size"] == plain_bytes
                && source["received_bytes"] == v.bytes,
            "the {key} source does not describe its file: {source}"
        );
        let profiles = export::directory_profiles(&orbit, orbit.tenant.dir).await?;
        anyhow::ensure!(profiles == rows, "{key}: {profiles} profiles, not {rows}");
        let mut line = report_ingest(&format!("compressed {key}"), rows, &ingest);
        let rate = rows as f64 / ingest.took.as_secs_f64();
        rates.push((key, rate));
        if key != "plain" {
            println!(
                "  {key}: {:.1} MB of {:.1} MB ({:.1}x); compressed by the client in {:.2} s; one core decodes it in {:.2} s ({:.0} MB/s, {:.2} µs a row)",
                v.bytes as f64 / 1e6,
                plain_bytes as f64 / 1e6,
                plain_bytes as f64 / v.bytes as f64,
                v.compress.as_secs_f64(),
                v.decode.as_secs_f64(),
                plain_bytes as f64 / 1e6 / v.decode.as_secs_f64(),
                v.decode.as_secs_f64() * 1e6 / rows as f64,
            );
        }
        let extra = line.as_object_mut().context("an object")?;
        extra.insert("file_bytes".into(), json!(v.bytes));
        extra.insert("ratio".into(), json!(plain_bytes as f64 / v.bytes as f64));
        extra.insert(
            "client_compress_seconds".into(),
            json!(v.compress.as_secs_f64()),
        );
        extra.insert(
            "decode_one_core_seconds".into(),
            json!(v.decode.as_secs_f64()),
        );
        extra.insert(
            "decode_microseconds_per_row".into(),
            json!(v.decode.as_secs_f64() * 1e6 / rows as f64),
        );
        extra.insert(
            "gateway_peak_rss_mib".into(),
            json!(mib(ingest.gateway_rss)),
        );
        report.insert(v.key.into(), line);
        if v.path != plain {
            std::fs::remove_file(&v.path)?;
        }
    }
    let plain_rate = rates[0].1;
    for (key, rate) in &rates[1..] {
        let ratio = rate / plain_rate;
        println!("  {key} / plain rows/s: {ratio:.2}");
        report.insert(format!("ratio_{key}_to_plain"), json!(ratio));
    }
    report.insert("rows".into(), json!(rows));
    report.insert("plain_bytes".into(), json!(plain_bytes));
    Ok(Value::Object(report))
}
