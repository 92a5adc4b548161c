//! `orbit upload` of a big file over the server's resumable (tus 1.0) uploads: sent in
//! `PATCH`es of [`PATCH_BYTES`], each going on from the offset the server reports, so a dropped
//! connection, a `5xx` or a restarted gateway costs at most the `PATCH` in flight, and bytes
//! the server acknowledged are never sent again.
//!
//! The upload's URL is kept in a small state file (`$XDG_STATE_HOME/orbit/uploads/`, else
//! `~/.local/state/orbit/uploads/`) named after the directory and the idempotency key (which
//! holds the file's hash and options): run the same `orbit upload` again after the command
//! itself was killed and it asks the server where it stands and goes on. The file is removed
//! once the upload is imported, or when the server no longer knows it.
//!
//! A compressed upload does not know its length before the end: it is created with
//! `Upload-Defer-Length` and its last `PATCH` says the length. zstd and gzip at a fixed level
//! write the same bytes for the same file, so a restart compresses from the start again and
//! skips what the server has; within one run, a cut `PATCH` resends from the bytes it holds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use uuid::Uuid;

use crate::api::{self, Api};
use crate::exit::{ClientError, Result};
use crate::progress::{Progress, Tracker};
use crate::upload::{Compress, FileReport, UploadOptions, ZSTD_LEVEL};

/// The bytes of one `PATCH`: what a cut can cost at most, and the memory it holds.
pub const PATCH_BYTES: usize = 16 << 20;
const TUS_VERSION: &str = "1.0.0";
const OFFSET_STREAM: &str = "application/offset+octet-stream";

/// What is kept between runs about an upload in progress.
#[derive(Serialize, Deserialize)]
struct State {
    url: String,
    compression: Compress,
}

/// Where the upload stands on the server.
struct Remote {
    url: String,
    offset: u64,
    /// The source, once the upload was imported.
    source: Option<Uuid>,
}

/// Sends `file` (of `bytes` bytes on disk) as a resumable upload and returns the source it
/// became.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    api: &Api,
    progress: &Progress,
    tracker: &Arc<Tracker>,
    file: &Path,
    bytes: u64,
    key: &str,
    options: &UploadOptions,
    report: &mut FileReport,
) -> Result<Uuid> {
    let name = file.display().to_string();
    let note = |why: &str| progress.note(&format!("{name}: {why}"));
    let state_file = state_path(options.directory, key);
    let compression = report.compression;
    let mut remote = match load(state_file.as_deref(), compression) {
        Some(url) => match probe(api, &url, &note).await? {
            Some(remote) => {
                note(&format!(
                    "going on with the upload started earlier, from byte {}",
                    remote.offset
                ));
                report.resumed_from = remote.offset;
                Some(remote)
            }
            None => None,
        },
        None => None,
    };
    let sent = Arc::new(AtomicU64::new(0));
    let mut failures = 0;
    // The wire bytes being sent, and the PATCH in memory: `(start, bytes)`.
    let mut wire: Option<Wire> = None;
    let mut pending: Option<(u64, Bytes)> = None;
    let result = loop {
        let Some(r) = &mut remote else {
            let created = create(api, file, bytes, key, options, compression).await?;
            if let Err(why) = save(state_file.as_deref(), &created, compression) {
                note(&why);
            }
            remote = Some(Remote {
                url: created,
                offset: 0,
                source: None,
            });
            wire = None;
            pending = None;
            continue;
        };
        if let Some(source) = r.source {
            break Ok(source);
        }
        // The next PATCH's bytes: from the one in memory if the server stopped inside it,
        // else read on from the file.
        let (start, body, last) = match pending.take() {
            Some((start, buf)) if r.offset >= start && r.offset <= start + buf.len() as u64 => {
                let from = (r.offset - start) as usize;
                let last = wire.as_ref().is_some_and(|w| w.ended);
                (r.offset, buf.slice(from..), last)
            }
            _ => {
                if wire.as_ref().is_none_or(|w| w.position != r.offset) {
                    tracker.start_sending(bytes);
                    wire = Some(Wire::open(file, compression, tracker, r.offset).await?);
                }
                let w = wire.as_mut().expect("opened above");
                let buf = Bytes::from(w.next_patch().await?);
                (r.offset, buf, w.ended)
            }
        };
        let length = (last && compression_defers(compression)).then(|| start + body.len() as u64);
        pending = Some((start, body.clone()));
        match patch(api, &r.url, start, body, length, &sent).await {
            Ok(Patched { offset, source }) => {
                failures = 0;
                r.offset = offset;
                r.source = source;
                if pending
                    .as_ref()
                    .is_some_and(|(s, b)| offset >= s + b.len() as u64)
                {
                    pending = None;
                }
            }
            Err(Failure::Gone(why)) => {
                note(&format!("{why}; starting the upload over"));
                forget(state_file.as_deref());
                remote = None;
            }
            Err(Failure::Fatal(e)) => break Err(e),
            Err(Failure::Transient { why, retry_after }) => {
                failures += 1;
                if failures > api.policy.retries {
                    break Err(ClientError::Network(format!(
                        "{why} (gave up after {} retries; run the same command again to go on)",
                        api.policy.retries
                    )));
                }
                let wait = api.policy.wait(failures, retry_after);
                note(&format!(
                    "{why}; going on from the server's offset in {}",
                    humantime::format_duration(std::time::Duration::from_millis(
                        wait.as_millis() as u64
                    ))
                ));
                tokio::time::sleep(wait).await;
                match probe(api, &r.url, &note).await? {
                    Some(now) => *r = now,
                    None => {
                        forget(state_file.as_deref());
                        remote = None;
                    }
                }
            }
        }
    };
    report.sent_bytes = sent.load(Ordering::Relaxed);
    tracker.end_phase();
    if result.is_ok() || matches!(&result, Err(ClientError::Api(_))) {
        forget(state_file.as_deref());
    }
    result
}

fn compression_defers(compression: Compress) -> bool {
    matches!(compression, Compress::Zstd | Compress::Gzip)
}

/// Creates the upload; its URL.
async fn create(
    api: &Api,
    file: &Path,
    bytes: u64,
    key: &str,
    options: &UploadOptions,
    compression: Compress,
) -> Result<String> {
    let url = api.dir_url(options.directory, "/uploads");
    let metadata = metadata(file, key, options);
    let (url, metadata) = (&url, &metadata);
    api.retrying(
        move || async move {
            let mut request = api
                .http
                .post(url)
                .bearer_auth(&api.conn.token)
                .header("tus-resumable", TUS_VERSION)
                .header("upload-metadata", metadata);
            request = match compression_defers(compression) {
                true => request.header("upload-defer-length", "1"),
                false => request.header("upload-length", bytes),
            };
            match request.send().await {
                Ok(response) if response.status() == reqwest::StatusCode::CREATED => match response
                    .headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                {
                    Some(location) => api::Attempt::Done(absolute(api, location)),
                    None => api::Attempt::Fatal(ClientError::Network(
                        "the server created the upload but named no Location".into(),
                    )),
                },
                Ok(response) => match api::json_attempt::<serde_json::Value>(response).await {
                    api::Attempt::Done(_) => api::Attempt::Fatal(ClientError::Network(
                        "the server answered the upload's creation without 201".into(),
                    )),
                    api::Attempt::Transient { why, retry_after } => {
                        api::Attempt::Transient { why, retry_after }
                    }
                    api::Attempt::InFlight { retry_after } => {
                        api::Attempt::InFlight { retry_after }
                    }
                    api::Attempt::Fatal(e) => api::Attempt::Fatal(e),
                },
                Err(e) => api::Attempt::transient(api::transport_error(&e), None),
            }
        },
        |_| {},
    )
    .await
}

/// The options a `csv-upload` takes as form fields, as tus metadata.
fn metadata(file: &Path, key: &str, options: &UploadOptions) -> String {
    let filename = file
        .file_name()
        .map_or_else(|| "upload.csv".to_owned(), |n| n.to_string_lossy().into());
    let mut pairs = vec![("filename", filename), ("idempotency_key", key.to_owned())];
    if let Some(mapping) = &options.mapping {
        pairs.push((
            "mapping",
            serde_json::to_string(mapping).expect("a mapping serializes"),
        ));
    }
    if !options.merge.is_default() {
        pairs.push((
            "merge",
            serde_json::to_string(&options.merge).expect("merge rules serialize"),
        ));
    }
    if options.dry_run {
        pairs.push(("dry_run", "true".into()));
    }
    if let Some(delimiter) = &options.delimiter {
        pairs.push(("delimiter", delimiter.clone()));
    }
    if let Some(encoding) = &options.encoding {
        pairs.push(("encoding", encoding.clone()));
    }
    pairs
        .into_iter()
        .map(|(k, v)| {
            format!(
                "{k} {}",
                base64::engine::general_purpose::STANDARD.encode(v)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Asks the server where the upload stands; `None` if it no longer knows it.
async fn probe(api: &Api, url: &str, note: &impl Fn(&str)) -> Result<Option<Remote>> {
    api.retrying(
        move || async move {
            let sent = api
                .http
                .head(url)
                .bearer_auth(&api.conn.token)
                .header("tus-resumable", TUS_VERSION)
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(e) => return api::Attempt::transient(api::transport_error(&e), None),
            };
            let status = response.status();
            if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
                return api::Attempt::Done(None);
            }
            if !status.is_success() {
                let after = crate::retry::retry_after(response.headers());
                return match crate::retry::transient_status(status.as_u16()) {
                    true => api::Attempt::transient(format!("HEAD answered {status}"), after),
                    false => api::Attempt::Fatal(ClientError::Network(format!(
                        "HEAD on the upload answered {status}"
                    ))),
                };
            }
            let offset = header(&response, "upload-offset").and_then(|v| v.parse().ok());
            let Some(offset) = offset else {
                return api::Attempt::Fatal(ClientError::Network(
                    "HEAD on the upload named no Upload-Offset".into(),
                ));
            };
            let source = header(&response, "orbit-source-location").and_then(|l| source_of(&l));
            api::Attempt::Done(Some(Remote {
                url: url.to_owned(),
                offset,
                source,
            }))
        },
        |why| note(why),
    )
    .await
}

struct Patched {
    offset: u64,
    source: Option<Uuid>,
}

enum Failure {
    /// The upload is gone (expired, ended): start a new one.
    Gone(String),
    Transient {
        why: String,
        retry_after: Option<std::time::Duration>,
    },
    Fatal(ClientError),
}

/// Sends `body` at `offset`; `length` with the last bytes of an upload of deferred length.
async fn patch(
    api: &Api,
    url: &str,
    offset: u64,
    body: Bytes,
    length: Option<u64>,
    sent: &Arc<AtomicU64>,
) -> std::result::Result<Patched, Failure> {
    let counted = sent.clone();
    let pieces: Vec<Bytes> = (0..body.len())
        .step_by(256 << 10)
        .map(|at| body.slice(at..(at + (256 << 10)).min(body.len())))
        .collect();
    let stream = futures::stream::iter(pieces).map(move |piece| {
        counted.fetch_add(piece.len() as u64, Ordering::Relaxed);
        Ok::<_, std::io::Error>(piece)
    });
    let mut request = api
        .http
        .patch(url)
        .bearer_auth(&api.conn.token)
        .header("tus-resumable", TUS_VERSION)
        .header("content-type", OFFSET_STREAM)
        .header("upload-offset", offset)
        .header("content-length", body.len());
    if let Some(length) = length {
        request = request.header("upload-length", length);
    }
    let response = match request
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
    {
        Ok(response) => response,
        Err(e) => {
            return Err(Failure::Transient {
                why: api::transport_error(&e),
                retry_after: None,
            })
        }
    };
    let status = response.status();
    if status == reqwest::StatusCode::NO_CONTENT {
        let offset = header(&response, "upload-offset").and_then(|v| v.parse().ok());
        let Some(offset) = offset else {
            return Err(Failure::Fatal(ClientError::Network(
                "a PATCH answered without Upload-Offset".into(),
            )));
        };
        let source = header(&response, "orbit-source-location").and_then(|l| source_of(&l));
        return Ok(Patched { offset, source });
    }
    let after = crate::retry::retry_after(response.headers());
    let problem = api::problem(response).await;
    Err(match (problem.status, problem.code.as_str()) {
        (404, _) | (410, _) => Failure::Gone(problem.to_string()),
        // The server is elsewhere than we thought, or another copy of this command sends
        // too: ask it where the upload stands.
        (409, "upload_offset_mismatch" | "upload_taken_over" | "idempotency_key_in_use") => {
            Failure::Transient {
                why: problem.to_string(),
                retry_after: after,
            }
        }
        (status, _) if crate::retry::transient_status(status) => Failure::Transient {
            why: problem.to_string(),
            retry_after: after,
        },
        _ => Failure::Fatal(ClientError::Api(problem)),
    })
}

/// The bytes that go over the wire, in order: the file, or the file compressed.
struct Wire {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    /// Wire bytes read so far.
    position: u64,
    ended: bool,
    /// One byte read ahead, to know the end has come before the last `PATCH` is sent.
    peeked: Option<u8>,
}

impl Wire {
    /// The wire bytes from `offset` on.
    async fn open(
        file: &Path,
        compression: Compress,
        tracker: &Arc<Tracker>,
        offset: u64,
    ) -> Result<Self> {
        let unreadable = |e: std::io::Error| ClientError::Usage(format!("{}: {e}", file.display()));
        let mut handle = tokio::fs::File::open(file).await.map_err(unreadable)?;
        let plain = !compression_defers(compression);
        if plain {
            use tokio::io::AsyncSeekExt as _;
            handle
                .seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(unreadable)?;
            tracker.sent(offset);
        }
        let counter = tracker.clone();
        let read = tokio_util::io::InspectReader::new(handle, move |chunk| {
            counter.sent(chunk.len() as u64)
        });
        let read = tokio::io::BufReader::with_capacity(256 << 10, read);
        let reader: Box<dyn AsyncRead + Send + Unpin> = match compression {
            Compress::Zstd => Box::new(
                async_compression::tokio::bufread::ZstdEncoder::with_quality(
                    read,
                    async_compression::Level::Precise(ZSTD_LEVEL),
                ),
            ),
            Compress::Gzip => Box::new(async_compression::tokio::bufread::GzipEncoder::new(read)),
            Compress::None | Compress::Auto => Box::new(read),
        };
        let mut wire = Wire {
            reader,
            position: if plain { offset } else { 0 },
            ended: false,
            peeked: None,
        };
        // A compressed stream is written again from its start; what the server has is skipped.
        let mut skip = offset - wire.position;
        let mut sink = vec![0u8; 256 << 10];
        while skip > 0 {
            let n = wire
                .reader
                .read(&mut sink[..(skip as usize).min(256 << 10)])
                .await
                .map_err(unreadable)?;
            if n == 0 {
                return Err(ClientError::Usage(format!(
                    "{}: the file changed since the upload started (it compresses to fewer bytes than the server has)",
                    file.display()
                )));
            }
            skip -= n as u64;
            wire.position += n as u64;
        }
        Ok(wire)
    }

    /// The next `PATCH`'s bytes, up to [`PATCH_BYTES`]; `ended` says whether they are the last.
    async fn next_patch(&mut self) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(PATCH_BYTES);
        if let Some(b) = self.peeked.take() {
            buf.push(b);
        }
        let io = |e: std::io::Error| ClientError::Usage(format!("reading the file: {e}"));
        while buf.len() < PATCH_BYTES {
            let at = buf.len();
            buf.resize(PATCH_BYTES, 0);
            let n = self.reader.read(&mut buf[at..]).await.map_err(io)?;
            buf.truncate(at + n);
            if n == 0 {
                self.ended = true;
                break;
            }
        }
        if !self.ended {
            let mut one = [0u8; 1];
            match self.reader.read(&mut one).await.map_err(io)? {
                0 => self.ended = true,
                _ => self.peeked = Some(one[0]),
            }
        }
        self.position += buf.len() as u64;
        Ok(buf)
    }
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn source_of(location: &str) -> Option<Uuid> {
    location.rsplit('/').next().and_then(|id| id.parse().ok())
}

fn absolute(api: &Api, location: &str) -> String {
    match location.starts_with('/') {
        true => format!("{}{location}", api.conn.url.trim_end_matches('/')),
        false => location.to_owned(),
    }
}

/// The state file of an upload of `key` to `directory`.
fn state_path(directory: Uuid, key: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local").join("state"))
        })?;
    Some(state_path_in(&base, directory, key))
}

fn state_path_in(base: &Path, directory: Uuid, key: &str) -> PathBuf {
    let name = hex::encode(&Sha256::digest(format!("{directory}\n{key}").as_bytes())[..16]);
    base.join("orbit")
        .join("uploads")
        .join(format!("{name}.json"))
}

fn load(path: Option<&Path>, compression: Compress) -> Option<String> {
    let text = std::fs::read_to_string(path?).ok()?;
    let state: State = serde_json::from_str(&text).ok()?;
    // Sent another way this time: the bytes on the server are not this run's.
    (state.compression == compression).then_some(state.url)
}

/// Keeps the upload's URL for a later run; failing to only costs resuming after a restart.
fn save(path: Option<&Path>, url: &str, compression: Compress) -> std::result::Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    let state = State {
        url: url.to_owned(),
        compression,
    };
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::write(
                path,
                serde_json::to_vec(&state).expect("the state serializes"),
            )
        });
    written.map_err(|e| {
        format!(
            "cannot keep the upload's state in {}: {e}; were this command stopped, the upload would start over",
            path.display()
        )
    })
}

fn forget(path: Option<&Path>) {
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_is_per_directory_and_key() {
        let base = Path::new("/state");
        let dir = Uuid::now_v7();
        let a = state_path_in(base, dir, "k1");
        assert!(a.starts_with("/state/orbit/uploads"));
        assert_ne!(a, state_path_in(base, dir, "k2"));
        assert_ne!(a, state_path_in(base, Uuid::now_v7(), "k1"));
        assert_eq!(a, state_path_in(base, dir, "k1"));
    }
}
