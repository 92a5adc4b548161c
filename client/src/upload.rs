//! `orbit upload`: per file, hash it, check its header, stream it as multipart with a
//! progress bar on bytes, retry safely, then follow the source until workers finish it.
//!
//! Retries are safe because every attempt carries the same idempotency key, by default
//! `orbit:<directory>:sha256:<file hash>`: if an earlier attempt reached the server and was
//! recorded (the connection dropped only on the way back), the retry is answered `200` with
//! the original source and `is_idempotent: true`; if it is still being processed, the retry
//! gets `409 idempotency_key_in_use` and waits; if it never got anywhere, the retry runs fresh.
//! The flip side: the same bytes sent to the same directory again within the server's
//! `idempotency.ttl` replay the first upload instead of importing twice; pass
//! `--idempotency-key` to import them again on purpose.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use orbit_core::domain::csv::{delimiter_from_hint, TextEncoding};
use orbit_core::domain::header::{ColumnMapping, MAPPING_ERROR_PREFIX};
use orbit_core::domain::merge::MergeRules;
use orbit_core::model::upload_options_fingerprint;
use reqwest::multipart::{Form, Part};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;
use tokio_util::io::ReaderStream;
use uuid::Uuid;

use crate::api::{self, Api, Attempt, SourceStatus, UploadBody};
use crate::exit::{ClientError, ExitCode, Result};
use crate::preflight::{self, PreflightError};
use crate::progress::{Progress, Tracker};

/// Pieces of the file handed to the HTTP body at a time.
const READ_CHUNK: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct UploadOptions {
    pub directory: Uuid,
    pub idempotency_key: Option<String>,
    pub delimiter: Option<String>,
    pub encoding: Option<String>,
    pub preflight: bool,
    pub wait: bool,
    pub parallel: usize,
    pub poll_interval: Duration,
    /// Print each file's summary line as it finishes (off with `--json`).
    pub print_lines: bool,
    /// The column mapping sent with every file.
    pub mapping: Option<ColumnMapping>,
    /// The merge rules sent with every file (none sent while they are the defaults).
    pub merge: MergeRules,
    /// Validate only (`dry_run=true`).
    pub dry_run: bool,
    /// How files are compressed on the way.
    pub compress: Compress,
    /// With [`Compress::Auto`], the size above which a file is compressed.
    pub compress_above: u64,
    /// Files larger than this go as resumable uploads (`crate::resumable`)...
    pub resume_above: u64,
    /// ...unless this is off (`--no-resume`): one request per file, whatever its size.
    pub resume: bool,
}

/// `--compress`: how a file travels. The server tells gzip and zstd by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    /// zstd above `--compress-above`, as it is below: small files gain little.
    Auto,
    Zstd,
    Gzip,
    None,
}

impl Compress {
    /// What a file of `bytes` bytes is sent as.
    pub fn for_file(self, bytes: u64, above: u64) -> Compress {
        match self {
            Compress::Auto if bytes > above => Compress::Zstd,
            Compress::Auto => Compress::None,
            other => other,
        }
    }
}

/// zstd's default level: about 3x on contact CSVs at a few hundred MB/s a core, well ahead
/// of most uplinks.
pub(crate) const ZSTD_LEVEL: i32 = 3;

/// `--mapping`: JSON, or `@FILE` holding it; checked as the server checks it.
pub fn parse_mapping(raw: &str) -> Result<ColumnMapping> {
    let text = json_argument("--mapping", raw)?;
    ColumnMapping::parse(&text).map_err(|e| ClientError::Usage(format!("--mapping: {e}")))
}

/// `--merge`: JSON, or `@FILE` holding it; checked as the server checks it.
pub fn parse_merge(raw: &str) -> Result<MergeRules> {
    let text = json_argument("--merge", raw)?;
    MergeRules::parse(&text).map_err(|e| ClientError::Usage(format!("--merge: {e}")))
}

/// A JSON argument as given, or the file it names after `@`.
fn json_argument(flag: &str, raw: &str) -> Result<String> {
    match raw.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| ClientError::Usage(format!("{flag} {path}: {e}"))),
        None => Ok(raw.to_owned()),
    }
}

/// What happened to one file; printed as a line, or as JSON with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub file: PathBuf,
    pub bytes: u64,
    /// How the file was sent, and the bytes that went over the wire (its last attempt's).
    pub compression: Compress,
    pub sent_bytes: u64,
    /// Sent as a resumable upload, and the byte it went on from when an earlier run had
    /// started it.
    pub resumable: bool,
    pub resumed_from: u64,
    pub sha256: Option<String>,
    pub idempotency_key: Option<String>,
    /// Columns Orbit keeps as custom attributes rather than profile fields.
    pub unmapped_columns: Vec<String>,
    pub source_id: Option<Uuid>,
    /// `completed`, `failed`, `pending`/`processing` (with `--no-wait`), or `rejected`.
    pub status: String,
    pub is_idempotent: bool,
    pub total_rows: u64,
    pub accepted: u64,
    pub failed: u64,
    pub warnings: u64,
    pub attempts: u32,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Why the file or its source failed.
    pub error: Option<ErrorReport>,
    #[serde(skip)]
    pub exit: ExitCode,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorReport {
    pub code: String,
    pub message: String,
}

impl FileReport {
    fn new(file: &Path) -> Self {
        FileReport {
            file: file.to_owned(),
            bytes: 0,
            compression: Compress::None,
            sent_bytes: 0,
            resumable: false,
            resumed_from: 0,
            sha256: None,
            idempotency_key: None,
            unmapped_columns: Vec::new(),
            source_id: None,
            status: "rejected".into(),
            is_idempotent: false,
            total_rows: 0,
            accepted: 0,
            failed: 0,
            warnings: 0,
            attempts: 0,
            seconds: 0.0,
            rows_per_second: 0.0,
            error: None,
            exit: ExitCode::Completed,
        }
    }

    /// A report for a source followed by `watch`, which sent nothing.
    pub fn for_source(name: &str, status: &SourceStatus) -> Self {
        let mut report = Self::new(Path::new(name));
        report.source_id = Some(status.source_id);
        report
    }

    fn fail(&mut self, error: &ClientError) {
        self.error = Some(ErrorReport {
            code: error.code().to_owned(),
            message: error.to_string(),
        });
        self.exit = error.exit_code();
    }

    /// The one-line summary.
    pub fn line(&self) -> String {
        let name = self.file.display();
        if let Some(error) = &self.error {
            if self.source_id.is_none() {
                return format!("{name}: rejected: {} ({})", error.message, error.code);
            }
        }
        let mut line = format!(
            "{name}: {}, {} accepted, {} failed, {} warnings, {} rows",
            self.status, self.accepted, self.failed, self.warnings, self.total_rows
        );
        if !self.is_idempotent {
            line.push_str(&format!(
                " in {:.1}s ({:.0} rows/s)",
                self.seconds, self.rows_per_second
            ));
        }
        if let Some(id) = self.source_id {
            line.push_str(&format!(", source {id}"));
        }
        if self.compression != Compress::None && self.sent_bytes > 0 {
            line.push_str(&format!(
                ", sent {} as {:?} ({:.1}x)",
                human_bytes(self.sent_bytes),
                self.compression,
                self.bytes as f64 / self.sent_bytes as f64
            ));
        }
        if self.resumed_from > 0 {
            line.push_str(&format!(
                ", went on from {} sent by an earlier run",
                human_bytes(self.resumed_from)
            ));
        }
        if self.is_idempotent {
            line.push_str(" (already uploaded: replayed)");
        }
        if let Some(error) = &self.error {
            line.push_str(&format!(": {} ({})", error.message, error.code));
        }
        line
    }
}

/// The default key: the same directory, bytes and options always give the same key. Options
/// (a mapping, merge rules, a dry run) add their fingerprint, so that a dry run and the real
/// import of a file, or two mappings of it, are different uploads rather than a reused key.
pub fn derived_key(directory: Uuid, sha256: &str, options: Option<&str>) -> String {
    match options {
        None => format!("orbit:{directory}:sha256:{sha256}"),
        Some(options) => format!("orbit:{directory}:sha256:{sha256}:options:{options}"),
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err(ClientError::Usage(
            "the idempotency key must be 1 to 255 printable ASCII characters".into(),
        ));
    }
    Ok(())
}

/// Checks the flags, then the token and directory with one cheap request, so that a typo is
/// reported at once rather than after the first file has been sent.
pub async fn validate(api: &Api, files: &[PathBuf], options: &UploadOptions) -> Result<()> {
    if let Some(key) = &options.idempotency_key {
        check_key(key)?;
        if files.len() > 1 {
            return Err(ClientError::Usage(
                "--idempotency-key names one upload: pass one file with it".into(),
            ));
        }
    }
    hints(options)?;
    for file in files {
        let meta = std::fs::metadata(file)
            .map_err(|e| ClientError::Usage(format!("{}: {e}", file.display())))?;
        if !meta.is_file() {
            return Err(ClientError::Usage(format!(
                "{}: not a regular file",
                file.display()
            )));
        }
    }
    let _: serde_json::Value = api
        .get_json(&api.dir_url(options.directory, "/sources?limit=1"))
        .await?;
    Ok(())
}

fn hints(options: &UploadOptions) -> Result<(Option<u8>, Option<TextEncoding>)> {
    let delimiter = options
        .delimiter
        .as_deref()
        .map(|d| {
            delimiter_from_hint(d).ok_or_else(|| {
                ClientError::Usage(format!("--delimiter {d:?}: use one of , ; tab |"))
            })
        })
        .transpose()?;
    let encoding = options
        .encoding
        .as_deref()
        .map(|e| {
            TextEncoding::from_hint(e).ok_or_else(|| {
                ClientError::Usage(format!(
                    "--encoding {e:?}: use one of utf-8, utf-16, windows-1252, iso-8859-1"
                ))
            })
        })
        .transpose()?;
    Ok((delimiter, encoding))
}

/// Uploads every file, `options.parallel` at a time; reports come back in the files' order.
pub async fn upload_all(
    api: &Api,
    progress: &Progress,
    files: &[PathBuf],
    options: &UploadOptions,
) -> Vec<FileReport> {
    let mut reports: Vec<(usize, FileReport)> = futures::stream::iter(files.iter().enumerate())
        .map(|(i, file)| async move {
            let report = upload_one(api, progress, file, options).await;
            if options.print_lines {
                progress.print(&report.line());
            }
            (i, report)
        })
        .buffer_unordered(options.parallel.max(1))
        .collect()
        .await;
    reports.sort_by_key(|(i, _)| *i);
    reports.into_iter().map(|(_, r)| r).collect()
}

async fn upload_one(
    api: &Api,
    progress: &Progress,
    file: &Path,
    options: &UploadOptions,
) -> FileReport {
    let mut report = FileReport::new(file);
    let name = file.file_name().map_or_else(
        || file.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let tracker = progress.track(&name);
    if let Err(e) = run(api, progress, &tracker, file, options, &mut report).await {
        report.fail(&e);
    }
    tracker.finish();
    report
}

async fn run(
    api: &Api,
    progress: &Progress,
    tracker: &Arc<Tracker>,
    file: &Path,
    options: &UploadOptions,
    report: &mut FileReport,
) -> Result<()> {
    let (delimiter, encoding) = hints(options)?;
    let name = file.display();
    if options.preflight {
        match preflight::check(file, delimiter, encoding, options.mapping.as_ref()).await {
            Ok(header) => {
                if !header.unmapped.is_empty() {
                    progress.note(&format!(
                        "warning: {name}: {} column(s) match no profile field and will be kept as custom attributes: {}",
                        header.unmapped.len(),
                        header
                            .unmapped
                            .iter()
                            .map(|c| format!("{c:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                report.unmapped_columns = header.unmapped;
            }
            Err(PreflightError::Invalid(message)) => {
                let code = match message.starts_with(MAPPING_ERROR_PREFIX) {
                    true => "invalid_request",
                    false => "invalid_csv",
                };
                return Err(ClientError::Rejected {
                    code: code.into(),
                    message: format!("not sent, Orbit would reject it: {message}"),
                });
            }
            Err(PreflightError::Io(e)) => return Err(ClientError::Usage(format!("{name}: {e}"))),
        }
    }
    let (bytes, sha256) = hash_file(file)
        .await
        .map_err(|e| ClientError::Usage(format!("{name}: {e}")))?;
    report.bytes = bytes;
    let key = options.idempotency_key.clone().unwrap_or_else(|| {
        let fingerprint =
            upload_options_fingerprint(options.mapping.as_ref(), &options.merge, options.dry_run);
        derived_key(options.directory, &sha256, fingerprint.as_deref())
    });
    report.sha256 = Some(sha256);
    report.idempotency_key = Some(key.clone());

    report.compression = options.compress.for_file(bytes, options.compress_above);
    let started = Instant::now();
    report.resumable = options.resume && bytes > options.resume_above;
    let source = if report.resumable {
        report.attempts = 1;
        crate::resumable::send(api, progress, tracker, file, bytes, &key, options, report).await?
    } else {
        let body = send(api, progress, tracker, file, bytes, &key, options, report).await?;
        report.is_idempotent = body.is_idempotent;
        report.status = body.source_status.clone();
        report.accepted = body.accepted;
        report.failed = body.failed;
        report.warnings = body.warnings;
        body.source_id
    };
    report.source_id = Some(source);

    let status = if options.wait {
        follow(
            api,
            tracker,
            options.directory,
            source,
            options.poll_interval,
        )
        .await?
    } else {
        api.source(options.directory, source).await?
    };
    report.settle(&status, started.elapsed());
    Ok(())
}

impl FileReport {
    /// Takes the final counts from the status endpoint.
    pub fn settle(&mut self, status: &SourceStatus, elapsed: Duration) {
        self.status = status.source_status.clone();
        self.total_rows = status.total_rows;
        self.accepted = status.accepted;
        self.failed = status.failed;
        self.warnings = status.warnings;
        self.seconds = elapsed.as_secs_f64();
        // A replay processed nothing now: a rate would only measure the status request.
        self.rows_per_second = if self.is_idempotent {
            0.0
        } else {
            status.processed_rows as f64 / self.seconds.max(1e-3)
        };
        if status.source_status == "failed" {
            let error = status.error.clone();
            self.error = Some(ErrorReport {
                code: error
                    .as_ref()
                    .map_or_else(|| "source_failed".into(), |e| e.code.clone()),
                message: error.map_or_else(|| "the source failed".into(), |e| e.message),
            });
            self.exit = ExitCode::SourceFailed;
        }
    }
}

/// Polls a source until it completes or fails, with the rows bar.
pub async fn follow(
    api: &Api,
    tracker: &Tracker,
    dir: Uuid,
    source: Uuid,
    poll_interval: Duration,
) -> Result<SourceStatus> {
    let mut started = false;
    loop {
        let status = api.source(dir, source).await?;
        if !started {
            tracker.start_processing(status.processed_rows, status.total_rows);
            started = true;
        } else {
            tracker.processed(status.processed_rows, status.total_rows);
        }
        tracker.retrying(status.retrying.as_ref());
        if status.is_terminal() {
            tracker.end_phase();
            return Ok(status);
        }
        tokio::time::sleep(poll_interval).await;
    }
}

/// SHA-256 and size, streaming: the file is never in memory whole.
async fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// Sends the file until the server has it: transient failures are retried and an in-flight
/// twin is waited out, always with the same key.
#[allow(clippy::too_many_arguments)]
async fn send(
    api: &Api,
    progress: &Progress,
    tracker: &Arc<Tracker>,
    file: &Path,
    bytes: u64,
    key: &str,
    options: &UploadOptions,
    report: &mut FileReport,
) -> Result<UploadBody> {
    let url = api.dir_url(options.directory, "/sources/csv-upload");
    let attempts = AtomicU32::new(0);
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let compression = report.compression;
    let (url, attempts_ref, sent_ref) = (&url, &attempts, &sent_bytes);
    let result = api
        .retrying(
            move || async move {
                attempts_ref.fetch_add(1, Ordering::Relaxed);
                tracker.start_sending(bytes);
                sent_ref.store(0, Ordering::Relaxed);
                let body = match file_body(file, bytes, compression, tracker, sent_ref).await {
                    Ok(body) => body,
                    Err(e) => return Attempt::Fatal(e),
                };
                let form = match form(file, body, options) {
                    Ok(form) => form,
                    Err(e) => return Attempt::Fatal(e),
                };
                let sent = api
                    .http
                    .post(url)
                    .bearer_auth(&api.conn.token)
                    .header("Idempotency-Key", key)
                    .multipart(form)
                    .send()
                    .await;
                tracker.end_phase();
                match sent {
                    Ok(response) => api::json_attempt::<UploadBody>(response).await,
                    Err(e) => Attempt::transient(api::transport_error(&e), None),
                }
            },
            |why| progress.note(&format!("{}: {why}", file.display())),
        )
        .await;
    report.attempts = attempts.load(Ordering::Relaxed);
    report.sent_bytes = sent_bytes.load(Ordering::Relaxed);
    result
}

/// The file part's body: the file streamed from disk, compressed on the way when asked. The
/// bar counts bytes read from disk, so it ends at the file's size whatever goes over the
/// wire; `sent` counts what does.
async fn file_body(
    file: &Path,
    bytes: u64,
    compression: Compress,
    tracker: &Arc<Tracker>,
    sent: &Arc<AtomicU64>,
) -> Result<Part> {
    let handle = tokio::fs::File::open(file)
        .await
        .map_err(|e| ClientError::Usage(format!("{}: {e}", file.display())))?;
    let counter = tracker.clone();
    let read =
        tokio_util::io::InspectReader::new(handle, move |chunk| counter.sent(chunk.len() as u64));
    let read = tokio::io::BufReader::with_capacity(READ_CHUNK, read);
    let sent = sent.clone();
    let count = move |chunk: &bytes::Bytes| {
        sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    };
    Ok(match compression {
        // A known length lets the server refuse an oversized file before reading it.
        Compress::None | Compress::Auto => Part::stream_with_length(
            reqwest::Body::wrap_stream(
                ReaderStream::with_capacity(read, READ_CHUNK).inspect_ok(count),
            ),
            bytes,
        ),
        Compress::Zstd => {
            let encoder = async_compression::tokio::bufread::ZstdEncoder::with_quality(
                read,
                async_compression::Level::Precise(ZSTD_LEVEL),
            );
            Part::stream(reqwest::Body::wrap_stream(
                ReaderStream::with_capacity(encoder, READ_CHUNK).inspect_ok(count),
            ))
        }
        Compress::Gzip => {
            let encoder = async_compression::tokio::bufread::GzipEncoder::new(read);
            Part::stream(reqwest::Body::wrap_stream(
                ReaderStream::with_capacity(encoder, READ_CHUNK).inspect_ok(count),
            ))
        }
    })
}

/// A byte count as people read it.
fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// The multipart body: hints first (the server reads them before the file), then the file.
fn form(file: &Path, part: Part, options: &UploadOptions) -> Result<Form> {
    let filename = file
        .file_name()
        .map_or_else(|| "upload.csv".to_owned(), |n| n.to_string_lossy().into());
    let part = part
        .file_name(filename)
        .mime_str("text/csv")
        .expect("a valid MIME type");
    let mut form = Form::new();
    if let Some(mapping) = &options.mapping {
        form = form.text(
            "mapping",
            serde_json::to_string(mapping).expect("a mapping serializes"),
        );
    }
    if !options.merge.is_default() {
        form = form.text(
            "merge",
            serde_json::to_string(&options.merge).expect("merge rules serialize"),
        );
    }
    if options.dry_run {
        form = form.text("dry_run", "true");
    }
    if let Some(delimiter) = &options.delimiter {
        form = form.text("delimiter", delimiter.clone());
    }
    if let Some(encoding) = &options.encoding {
        form = form.text("encoding", encoding.clone());
    }
    Ok(form.part("file", part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_key_is_a_valid_key_and_names_directory_and_bytes() {
        let dir = Uuid::now_v7();
        let key = derived_key(dir, &"ab".repeat(32), None);
        check_key(&key).unwrap();
        assert!(key.contains(&dir.to_string()) && key.ends_with(&"ab".repeat(32)));
        assert_ne!(key, derived_key(Uuid::now_v7(), &"ab".repeat(32), None));
        let with_options = derived_key(dir, &"ab".repeat(32), Some(&"cd".repeat(32)));
        assert_ne!(with_options, key);
        check_key(&with_options).unwrap();
        assert!(check_key("").is_err() && check_key("é").is_err());
        assert!(check_key(&"k".repeat(256)).is_err());
    }
}
