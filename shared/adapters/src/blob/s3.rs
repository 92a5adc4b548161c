//! The distributed object store: an S3 bucket (AWS, or any S3-compatible server such as MinIO or
//! s3s-fs), named by `object_store.url = s3://bucket[/prefix]`.
//!
//! Uploads are streamed as a multipart upload: bytes are buffered up to one part
//! ([`PART_SIZE`]) and each full part is sent as soon as it fills, so memory stays around one
//! part whatever the file size. The object only becomes visible when the upload is completed in
//! `finish`; an aborted or failed upload leaves nothing under the key. An object that never
//! fills a part is sent with a single PutObject instead: one request instead of three for the
//! common small file.
//!
//! Reads are ranged GetObjects whose body is passed on as it arrives, never collected.
//!
//! A multipart upload this process has open is in `LIVE`; `sweep_abandoned` aborts the open
//! uploads under the prefix that are not, once they are older than the threshold (other
//! gateways' uploads look the same from here, so only age tells them apart).

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio_util::task::TaskTracker;

use super::{BlobError, BlobResult, BlobStore, BlobWriter, ByteStream};
use orbit_config::ObjectStoreSettings;

/// Size of every multipart part but the last. S3 refuses parts under 5 MiB (except the last),
/// and some S3-compatible stores (Cloudflare R2) also require all non-final parts to be the
/// same size, so parts are cut to exactly this many bytes.
pub const PART_SIZE: usize = 8 << 20;

const DEFAULT_REGION: &str = "us-east-1";

/// Upload ids of the multipart uploads this process has open.
static LIVE: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

fn live() -> std::sync::MutexGuard<'static, HashSet<String>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub struct S3BlobStore {
    client: Client,
    bucket: String,
    /// Empty, or ends with `/`; prepended to every key.
    prefix: String,
    /// Where requests go, for error messages only.
    endpoint: String,
    /// Aborts of multipart uploads whose writers were dropped mid-write; `close` waits for them.
    aborts: TaskTracker,
}

impl S3BlobStore {
    pub async fn open(settings: &ObjectStoreSettings) -> BlobResult<Self> {
        let (bucket, prefix) = parse_url(&settings.url)?;

        // The region is never looked up: the default region chain ends at the EC2 instance
        // metadata service, which would be probed (and time out) on every machine that is not
        // in AWS. S3-compatible servers accept any region.
        let region = settings
            .region
            .as_deref()
            .filter(|r| !r.is_empty())
            .unwrap_or(DEFAULT_REGION)
            .to_owned();
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region));
        match (
            non_empty(&settings.access_key_id),
            non_empty(&settings.secret_access_key),
        ) {
            (Some(key), Some(secret)) => {
                loader = loader.credentials_provider(Credentials::new(
                    key,
                    secret,
                    None,
                    None,
                    "orbit-object-store-settings",
                ));
            }
            // Neither: the AWS default chain (environment, profile, web identity, instance
            // role), which is what a deployment on AWS wants.
            (None, None) => {}
            _ => {
                return Err(BlobError::Other(
                    "object_store.access_key_id and object_store.secret_access_key must be set \
                     together"
                        .into(),
                ))
            }
        }
        let sdk_config = loader.load().await;

        // Since 2025 the SDK adds CRC checksums to every upload and validates them on every
        // download by default; many S3-compatible servers reject or mangle those headers
        // (notably on multipart parts), so only send them when an operation requires them.
        let mut config = aws_sdk_s3::config::Builder::from(&sdk_config)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        let endpoint = match non_empty(&settings.endpoint) {
            Some(endpoint) => {
                // Self-hosted servers are reached by address, with no per-bucket DNS names, so
                // the bucket must go in the path.
                config = config.endpoint_url(endpoint).force_path_style(true);
                endpoint.to_owned()
            }
            None => "AWS S3".to_owned(),
        };

        Ok(S3BlobStore {
            client: Client::from_conf(config.build()),
            bucket,
            prefix,
            endpoint,
            aborts: TaskTracker::new(),
        })
    }

    fn key(&self, key: &str) -> BlobResult<String> {
        // The same rule as the local backend, so a key is valid on one backend exactly when it
        // is valid on the other (and file-backed S3 servers never see `..`).
        let valid = !key.is_empty()
            && key.split('/').all(|part| {
                !part.is_empty() && part != "." && part != ".." && !part.starts_with('.')
            });
        if !valid {
            return Err(BlobError::Other(format!("invalid object key {key:?}")));
        }
        Ok(format!("{}{key}", self.prefix))
    }

    fn error<E>(&self, action: &str, key: &str, err: SdkError<E>) -> BlobError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        BlobError::Backend {
            message: format!(
                "{action} {key:?} in bucket {:?} at {}: {}",
                self.bucket,
                self.endpoint,
                describe(&err)
            ),
            source: Box::new(err),
        }
    }
}

/// `s3://bucket` or `s3://bucket/some/prefix` into the bucket and `""` or `"some/prefix/"`.
fn parse_url(url: &str) -> BlobResult<(String, String)> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        BlobError::Other(format!(
            "object_store.url {url:?} does not start with s3://"
        ))
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(BlobError::Other(format!(
            "object_store.url {url:?} names no bucket"
        )));
    }
    let prefix = prefix.trim_matches('/');
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

/// The HTTP status of a failed request, when the server answered at all.
fn status<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// A one-line account of a failed request: the server's code and message when it answered,
/// else the chain of causes (connection refused, timeout, ...). The SDK's `DisplayErrorContext`
/// would append a debug dump of the whole raw response: too much for a log line.
fn describe<E>(err: &SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let (Some(code), Some(status)) = (err.code(), status(err)) {
        return match err.message() {
            Some(message) => format!("{code} (HTTP {status}): {message}"),
            None => format!("{code} (HTTP {status})"),
        };
    }
    causes(err)
}

/// `err` and its causes on one line.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Wrappers often repeat their cause's text; say each thing once.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Whether `err` says the thing named by `code` does not exist. Answers to HEAD (and from some
/// compatible servers) carry no error code, only a 404; a 404 with another code (say
/// `NoSuchBucket`) is a different problem and must not be mistaken for a missing object.
fn is_missing<E: ProvideErrorMetadata>(err: &SdkError<E>, code: &str) -> bool {
    match err.code() {
        Some(c) => c == code,
        None => status(err) == Some(404),
    }
}

struct S3Writer {
    client: Client,
    bucket: String,
    key: String,
    endpoint: String,
    buffer: BytesMut,
    /// Set once the first part is sent; until then nothing exists on the server.
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    /// A part failed to upload: its bytes are gone, so completing would store a corrupt object.
    failed: bool,
    /// The store's, so a drop's abort is one shutdown waits for.
    aborts: TaskTracker,
}

impl S3Writer {
    fn error<E>(&self, action: &str, err: SdkError<E>) -> BlobError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        BlobError::Backend {
            message: format!(
                "{action} {:?} in bucket {:?} at {}: {}",
                self.key,
                self.bucket,
                self.endpoint,
                describe(&err)
            ),
            source: Box::new(err),
        }
    }

    async fn upload_part(&mut self, body: Bytes) -> BlobResult<()> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let created = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .send()
                    .await
                    .map_err(|e| self.error("starting multipart upload of", e))?;
                let id = created.upload_id.ok_or_else(|| {
                    BlobError::Other(format!(
                        "starting multipart upload of {:?}: the server returned no upload id",
                        self.key
                    ))
                })?;
                live().insert(id.clone());
                self.upload_id = Some(id.clone());
                id
            }
        };
        let part_number = i32::try_from(self.parts.len() + 1)
            .ok()
            .filter(|n| *n <= 10_000)
            .ok_or_else(|| {
                BlobError::Other(format!(
                    "{:?} is larger than S3's 10000 parts of {PART_SIZE} bytes",
                    self.key
                ))
            })?;
        let uploaded = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .part_number(part_number)
            .body(S3Body::from(body))
            .send()
            .await
            .map_err(|e| self.error(&format!("uploading part {part_number} of"), e))?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(uploaded.e_tag)
                .build(),
        );
        Ok(())
    }

    async fn abort_upload(&mut self) -> BlobResult<()> {
        let Some(upload_id) = self.upload_id.take() else {
            return Ok(());
        };
        live().remove(&upload_id);
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: aborted or expired by a lifecycle rule.
            Err(e) if is_missing(&e, "NoSuchUpload") => Ok(()),
            Err(e) => Err(self.error("aborting multipart upload of", e)),
        }
    }

    async fn complete(&mut self) -> BlobResult<()> {
        if !self.buffer.is_empty() {
            let last = self.buffer.split().freeze();
            self.upload_part(last).await?;
        }
        let upload_id = self.upload_id.clone().unwrap_or_default();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.error("completing multipart upload of", e))?;
        if let Some(id) = self.upload_id.take() {
            live().remove(&id);
        }
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for S3Writer {
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()> {
        self.buffer.extend_from_slice(&bytes);
        while self.buffer.len() >= PART_SIZE {
            let part = self.buffer.split_to(PART_SIZE).freeze();
            if let Err(e) = self.upload_part(part).await {
                self.failed = true;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> BlobResult<()> {
        if self.failed {
            let _ = self.abort_upload().await;
            return Err(BlobError::Other(format!(
                "{:?} was not stored: an earlier write failed",
                self.key
            )));
        }
        if self.upload_id.is_none() {
            let body = self.buffer.split().freeze();
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&self.key)
                .body(S3Body::from(body))
                .send()
                .await
                .map_err(|e| self.error("writing", e))?;
            return Ok(());
        }
        match self.complete().await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Leave nothing behind; the original error is the one worth reporting.
                let _ = self.abort_upload().await;
                Err(e)
            }
        }
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        self.buffer = BytesMut::new();
        self.abort_upload().await
    }
}

impl Drop for S3Writer {
    /// A writer dropped mid-upload (a cancelled request) has parts on the server that are
    /// invisible but still stored and billed: abort the upload in the background. A bucket
    /// lifecycle rule expiring incomplete uploads remains the backstop for crashes.
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        live().remove(&upload_id);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let request = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id);
        let key = self.key.clone();
        self.aborts.spawn_on(
            async move {
                if let Err(e) = request.send().await {
                    tracing::warn!(
                        key,
                        error = %describe(&e),
                        "aborting abandoned multipart upload failed"
                    );
                }
            },
            &runtime,
        );
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    fn backend(&self) -> &'static str {
        "s3"
    }

    async fn close(&self, wait: Duration) -> bool {
        // Closed for good: a writer dropped later is still tracked, and a later call waits for it.
        self.aborts.close();
        tokio::time::timeout(wait, self.aborts.wait()).await.is_ok()
    }

    async fn ping(&self) -> BlobResult<()> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| {
                let reason = match status(&e) {
                    Some(404) => "does not exist".to_owned(),
                    Some(403) => "is not accessible with these credentials".to_owned(),
                    _ => format!("is not reachable: {}", describe(&e)),
                };
                BlobError::Backend {
                    message: format!("bucket {:?} at {} {reason}", self.bucket, self.endpoint),
                    source: Box::new(e),
                }
            })?;
        Ok(())
    }

    async fn begin(&self, key: &str) -> BlobResult<Box<dyn BlobWriter>> {
        Ok(Box::new(S3Writer {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: self.key(key)?,
            endpoint: self.endpoint.clone(),
            buffer: BytesMut::new(),
            upload_id: None,
            parts: Vec::new(),
            failed: false,
            aborts: self.aborts.clone(),
        }))
    }

    async fn read_range(&self, key: &str, start: u64, end: u64) -> BlobResult<ByteStream> {
        let full_key = self.key(key)?;
        if start >= end {
            // An empty range cannot be expressed as an HTTP Range.
            return Ok(futures::stream::empty().boxed());
        }
        let response = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full_key)
            .range(format!("bytes={start}-{}", end - 1))
            .send()
            .await
        {
            Ok(response) => response,
            Err(e) if is_missing(&e, "NoSuchKey") => {
                return Err(BlobError::NotFound(key.to_owned()))
            }
            // A range that starts at or past the end: like the local backend (and a file read),
            // return the bytes that exist, i.e. none.
            Err(e) if e.code() == Some("InvalidRange") || status(&e) == Some(416) => {
                return Ok(futures::stream::empty().boxed())
            }
            Err(e) => return Err(self.error("reading", key, e)),
        };
        // A server that ignores Range would send the whole object from byte 0; passing that on
        // would hand the caller the wrong bytes without a word.
        let wanted = end - start;
        let whole = start == 0 && response.content_length().unwrap_or(i64::MAX) as u64 <= wanted;
        if response.content_range().is_none() && !whole {
            return Err(BlobError::Other(format!(
                "reading {key:?} in bucket {:?} at {}: the server ignored the byte range",
                self.bucket, self.endpoint
            )));
        }
        let key = key.to_owned();
        let body = futures::stream::unfold(response.body, move |mut body| {
            let key = key.clone();
            async move {
                let item = body.next().await?;
                Some((
                    item.map_err(|e| BlobError::Backend {
                        message: format!("reading {key:?}: {}", causes(&e)),
                        source: Box::new(e),
                    }),
                    body,
                ))
            }
        });
        Ok(body.boxed())
    }

    async fn delete(&self, key: &str) -> BlobResult<()> {
        let full_key = self.key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full_key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // S3 answers 204 for a missing key; some compatible servers answer 404 instead.
            Err(e) if is_missing(&e, "NoSuchKey") => Ok(()),
            Err(e) => Err(self.error("deleting", key, e)),
        }
    }

    async fn sweep_abandoned(&self, older_than: Duration) -> BlobResult<u64> {
        let mut removed = 0;
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&self.prefix)
                .set_key_marker(markers.0.take())
                .set_upload_id_marker(markers.1.take())
                .send()
                .await
                .map_err(|e| self.error("listing multipart uploads under", &self.prefix, e))?;
            for upload in page.uploads() {
                let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                    continue;
                };
                let age = upload
                    .initiated()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .and_then(|t| SystemTime::now().duration_since(t).ok());
                if live().contains(id) || age.is_none_or(|age| age < older_than) {
                    continue;
                }
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                {
                    Ok(_) => removed += 1,
                    Err(e) if is_missing(&e, "NoSuchUpload") => {}
                    Err(e) => return Err(self.error("aborting multipart upload of", key, e)),
                }
            }
            if page.is_truncated() != Some(true) {
                return Ok(removed);
            }
            markers = (
                page.next_key_marker().map(str::to_owned),
                page.next_upload_id_marker().map(str::to_owned),
            );
            if markers.0.is_none() && markers.1.is_none() {
                return Ok(removed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_name_a_bucket_and_an_optional_prefix() {
        let parse = |url: &str| parse_url(url).ok();
        assert_eq!(parse("s3://b"), Some(("b".into(), "".into())));
        assert_eq!(parse("s3://b/"), Some(("b".into(), "".into())));
        assert_eq!(parse("s3://b/p/q/"), Some(("b".into(), "p/q/".into())));
        assert_eq!(parse("s3://b/p"), Some(("b".into(), "p/".into())));
        assert_eq!(parse("s3:///p"), None);
        assert_eq!(parse("file:///p"), None);
    }
}
