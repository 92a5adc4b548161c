//! One conformance suite for `BlobStore`, run against every backend: the local directory
//! (in a temporary directory) and S3 (against the S3-compatible server that
//! `bash deploy/s3.sh` starts on loopback).
//!
//! The S3 tests read:
//! - `ORBIT_TEST_S3_ENDPOINT` (default `http://127.0.0.1:9000`)
//! - `ORBIT_TEST_S3_ACCESS_KEY` (default `orbit`)
//! - `ORBIT_TEST_S3_SECRET_KEY` (default `orbit-secret`)
//!
//! Each S3 test creates its own bucket and removes it afterwards, so tests run in parallel and
//! leave nothing behind. When the server does not answer the S3 tests fail (they never skip):
//! a green run must mean both backends were exercised.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use orbit_adapters::blob::{self, BlobError, BlobStore};
use orbit_config::ObjectStoreSettings;
use orbit_testkit::S3Server;
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

/// The conformance suite proper: every function takes only the store(s) under test.
mod suite {
    use super::*;

    pub async fn small_pieces_read_back_whole_and_by_range(store: &dyn BlobStore) {
        let data = pattern(100_003, 1);
        let key = "sources/small/pieces.csv";
        write_in_pieces(store, key, &data, &[1, 2, 7, 100, 1000, 4096, 33]).await;

        let len = data.len() as u64;
        assert_eq!(read(store, key, 0, len).await, data, "whole object");
        assert_eq!(read(store, key, 0, 1).await, data[..1], "first byte");
        assert_eq!(
            read(store, key, len - 1, len).await,
            data[data.len() - 1..],
            "last byte"
        );
        assert_eq!(
            read(store, key, 4095, 50_001).await,
            data[4095..50_001],
            "middle range"
        );
        assert!(read(store, key, 0, 0).await.is_empty(), "empty range at 0");
        assert!(
            read(store, key, 777, 777).await.is_empty(),
            "empty range inside"
        );
        // Past the end: the bytes that exist, like a file read.
        assert_eq!(
            read(store, key, len - 3, len + 10).await,
            data[data.len() - 3..],
            "range running past the end"
        );
        assert!(
            read(store, key, len, len + 10).await.is_empty(),
            "range starting at the end"
        );
    }

    pub async fn empty_object(store: &dyn BlobStore) {
        let key = "sources/empty.csv";
        store.begin(key).await.unwrap().finish().await.unwrap();
        assert!(read(store, key, 0, 10).await.is_empty());
        store.delete(key).await.unwrap();
    }

    /// Larger than two S3 parts, written in small pieces: exercises the multipart path, part
    /// boundaries and the final short part.
    pub async fn multipart_upload_round_trips(store: &dyn BlobStore) {
        let data = pattern(20 * MIB + 12_345, 2);
        let key = "sources/large/upload.csv";
        let mut writer = store.begin(key).await.unwrap();
        for piece in data.chunks(64 << 10) {
            writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        assert_not_found(store, key, "before finish").await;
        writer.finish().await.unwrap();

        let len = data.len() as u64;
        assert_eq!(
            sha256_of(store, key, 0, len).await,
            Sha256::digest(&data).to_vec(),
            "whole object hash"
        );
        // Around the first part boundary (8 MiB) and the tail.
        let boundary = 8 * MIB as u64;
        assert_eq!(
            read(store, key, boundary - 10, boundary + 10).await,
            data[8 * MIB - 10..8 * MIB + 10],
            "range across a part boundary"
        );
        assert_eq!(
            read(store, key, len - 5000, len).await,
            data[data.len() - 5000..],
            "tail"
        );
        store.delete(key).await.unwrap();
        assert_not_found(store, key, "after delete").await;
    }

    pub async fn abort_leaves_nothing(store: &dyn BlobStore) {
        // Aborted before anything was written.
        let key = "sources/aborted/nothing.csv";
        store.begin(key).await.unwrap().abort().await.unwrap();
        assert_not_found(store, key, "after abort with no writes").await;

        // Aborted while still within the first part.
        let key = "sources/aborted/small.csv";
        let mut writer = store.begin(key).await.unwrap();
        writer.write(Bytes::from(pattern(1000, 3))).await.unwrap();
        writer.abort().await.unwrap();
        assert_not_found(store, key, "after abort of a small upload").await;

        // Aborted after a part was uploaded.
        let key = "sources/aborted/large.csv";
        let mut writer = store.begin(key).await.unwrap();
        for piece in pattern(9 * MIB, 4).chunks(MIB) {
            writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        writer.abort().await.unwrap();
        assert_not_found(store, key, "after abort of a multipart upload").await;

        // An abort does not touch an object already stored under the key.
        let key = "sources/aborted/existing.csv";
        write_in_pieces(store, key, b"kept", &[4]).await;
        let mut writer = store.begin(key).await.unwrap();
        writer
            .write(Bytes::from_static(b"replacement"))
            .await
            .unwrap();
        writer.abort().await.unwrap();
        assert_eq!(read(store, key, 0, 100).await, b"kept");
        store.delete(key).await.unwrap();
    }

    pub async fn missing_key_is_not_found(store: &dyn BlobStore) {
        assert_not_found(store, "sources/never/written.csv", "never written").await;
    }

    pub async fn overwrite_replaces(store: &dyn BlobStore) {
        let key = "sources/overwritten.csv";
        write_in_pieces(store, key, b"first version, longer", &[5]).await;
        write_in_pieces(store, key, b"second", &[2]).await;
        assert_eq!(read(store, key, 0, 100).await, b"second");
        store.delete(key).await.unwrap();
    }

    pub async fn delete_is_idempotent(store: &dyn BlobStore) {
        let key = "sources/deleted.csv";
        write_in_pieces(store, key, b"a,b\n1,2\n", &[3]).await;
        store.delete(key).await.unwrap();
        assert_not_found(store, key, "after delete").await;
        store.delete(key).await.unwrap();
        store.delete("sources/never/existed.csv").await.unwrap();
    }

    pub async fn invalid_keys_are_refused(store: &dyn BlobStore) {
        for key in [
            "",
            "/abs",
            "a//b",
            "../escape",
            "a/./b",
            "a/../b",
            ".hidden",
        ] {
            assert!(
                matches!(store.begin(key).await, Err(BlobError::Other(_))),
                "begin({key:?}) should fail"
            );
            assert!(
                matches!(store.read_range(key, 0, 1).await, Err(BlobError::Other(_))),
                "read_range({key:?}) should fail"
            );
        }
    }

    pub async fn ping_works(store: &dyn BlobStore) {
        store.ping().await.unwrap();
    }

    /// `prefixed` stores its keys under `prefix` of the same space `root` sees.
    pub async fn keys_land_under_the_prefix(
        prefixed: &dyn BlobStore,
        root: &dyn BlobStore,
        prefix: &str,
    ) {
        let key = "sources/org/source.csv";
        write_in_pieces(prefixed, key, b"id,email\n", &[4]).await;
        assert_eq!(read(prefixed, key, 0, 100).await, b"id,email\n");
        let full = format!("{prefix}/{key}");
        assert_eq!(read(root, &full, 0, 100).await, b"id,email\n");
        assert_not_found(root, key, "unprefixed key in the root store").await;
        prefixed.delete(key).await.unwrap();
        assert_not_found(root, &full, "after delete through the prefix").await;
    }
}

/// Generates one test per suite function and backend.
use suite::*;

macro_rules! on_local {
    ($case:path) => {{
        let fixture = super::LocalFixture::new().await;
        $case(&*fixture.store).await;
    }};
}

macro_rules! on_s3 {
    ($case:path) => {{
        let fixture = super::S3Fixture::new().await;
        fixture
            .run(|store| async move { $case(&*store).await })
            .await;
    }};
}

orbit_testkit::conformance!(local => on_local, s3 => on_s3; {
    small_pieces_read_back_whole_and_by_range,
    empty_object,
    multipart_upload_round_trips,
    abort_leaves_nothing,
    missing_key_is_not_found,
    overwrite_replaces,
    delete_is_idempotent,
    invalid_keys_are_refused,
    ping_works,
});

// ---- Local backend -------------------------------------------------------------------------

struct LocalFixture {
    dir: tempfile::TempDir,
    store: Arc<dyn BlobStore>,
}

impl LocalFixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = blob::open(&settings(&format!("file://{}", dir.path().display()))).await;
        let store = store.unwrap();
        assert_eq!(store.backend(), "local");
        LocalFixture { dir, store }
    }
}

#[tokio::test]
async fn local_keys_land_under_the_prefix() {
    let root = LocalFixture::new().await;
    let prefixed = blob::open(&settings(&format!(
        "file://{}/tenant/a",
        root.dir.path().display()
    )))
    .await
    .unwrap();
    suite::keys_land_under_the_prefix(&*prefixed, &*root.store, "tenant/a").await;
}

#[tokio::test]
async fn local_ping_fails_when_the_directory_is_gone() {
    let fixture = LocalFixture::new().await;
    std::fs::remove_dir_all(fixture.dir.path()).unwrap();
    assert!(fixture.store.ping().await.is_err());
}

// ---- S3 backend ----------------------------------------------------------------------------

struct S3Fixture {
    server: S3Server,
    /// Our own client, to create, inspect and remove the bucket behind the store's back.
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Fixture {
    /// Checks the server answers, then creates a fresh bucket.
    async fn new() -> Self {
        let server = S3Server::from_env();
        let endpoint = &server.endpoint;
        let address = url::Url::parse(endpoint)
            .ok()
            .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
            .unwrap_or_else(|| panic!("ORBIT_TEST_S3_ENDPOINT={endpoint:?} is not an http URL"));
        let connect = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(&address),
        )
        .await;
        if !matches!(connect, Ok(Ok(_))) {
            panic!(
                "no S3-compatible server answers at {endpoint} (ORBIT_TEST_S3_ENDPOINT): \
                 run `bash deploy/s3.sh` first"
            );
        }

        let config = server.client_config();
        let client = aws_sdk_s3::Client::from_conf(config);
        let bucket = format!("orbit-test-{}", uuid::Uuid::new_v4().simple());
        client
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "creating bucket {bucket} at {endpoint}: {} (is `bash deploy/s3.sh` running \
                     with the same credentials?)",
                    aws_sdk_s3::error::DisplayErrorContext(e)
                )
            });
        S3Fixture {
            server,
            client,
            bucket,
        }
    }

    fn settings(&self, url: &str) -> ObjectStoreSettings {
        ObjectStoreSettings {
            url: url.parse().unwrap(),
            endpoint: Some(self.server.endpoint.clone()),
            region: None,
            access_key_id: Some(self.server.access_key.clone()),
            secret_access_key: Some(self.server.secret_key.clone()),
        }
    }

    /// A store on this fixture's bucket, opened through the scheme dispatch like the services.
    async fn store(&self, prefix: &str) -> Arc<dyn BlobStore> {
        let store = blob::open(&self.settings(&format!("s3://{}{prefix}", self.bucket)))
            .await
            .unwrap();
        assert_eq!(store.backend(), "s3");
        store
    }

    /// Runs `test` against a store on the bucket, then removes the bucket even if it failed.
    async fn run<F, Fut>(self, test: F)
    where
        F: FnOnce(Arc<dyn BlobStore>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let store = self.store("").await;
        let outcome = AssertUnwindSafe(test(store)).catch_unwind().await;
        self.cleanup().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    async fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.unwrap();
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
        }
        keys
    }

    async fn cleanup(&self) {
        // Uploads a failed test left open, then objects, then the bucket. Best effort: a
        // leftover bucket in a scratch server is no reason to hide the test's own result.
        if let Ok(uploads) = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .send()
            .await
        {
            for upload in uploads.uploads() {
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(upload.key().unwrap_or_default())
                    .upload_id(upload.upload_id().unwrap_or_default())
                    .send()
                    .await;
            }
        }
        for key in self.keys().await {
            let _ = self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await;
        }
        if let Err(e) = self
            .client
            .delete_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            eprintln!(
                "removing test bucket {}: {}",
                self.bucket,
                aws_sdk_s3::error::DisplayErrorContext(e)
            );
        }
    }
}

#[tokio::test]
async fn s3_keys_land_under_the_prefix() {
    let fixture = S3Fixture::new().await;
    let prefixed = fixture.store("/tenant/a").await;
    let root = fixture.store("").await;
    let outcome = AssertUnwindSafe(async {
        // Checked through the SDK too, not only through another store.
        let mut writer = prefixed.begin("sources/listed.csv").await.unwrap();
        writer.write(Bytes::from_static(b"x\n")).await.unwrap();
        writer.finish().await.unwrap();
        assert_eq!(fixture.keys().await, ["tenant/a/sources/listed.csv"]);
        prefixed.delete("sources/listed.csv").await.unwrap();

        suite::keys_land_under_the_prefix(&*prefixed, &*root, "tenant/a").await;
    })
    .catch_unwind()
    .await;
    fixture.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// The object appears only when the multipart upload completes, as seen by other clients.
#[tokio::test]
async fn s3_multipart_object_is_visible_only_after_finish() {
    let fixture = S3Fixture::new().await;
    let store = fixture.store("").await;
    let outcome = AssertUnwindSafe(async {
        let key = "sources/visible.csv";
        let data = pattern(17 * MIB, 5);
        let mut writer = store.begin(key).await.unwrap();
        for piece in data.chunks(64 << 10) {
            writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        assert!(fixture.keys().await.is_empty(), "listed before finish");
        let head = fixture
            .client
            .head_object()
            .bucket(&fixture.bucket)
            .key(key)
            .send()
            .await;
        assert!(head.is_err(), "HeadObject succeeded before finish");

        writer.finish().await.unwrap();
        assert_eq!(fixture.keys().await, [key]);
        let head = fixture
            .client
            .head_object()
            .bucket(&fixture.bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(head.content_length(), Some(data.len() as i64));
        // S3 and the compatible servers give a completed multipart upload the ETag
        // `<md5 of part md5s>-<part count>`: 17 MiB makes two 8 MiB parts and a short last one.
        let e_tag = head.e_tag().unwrap_or_default().trim_matches('"');
        assert!(
            e_tag.ends_with("-3"),
            "ETag {e_tag:?} is not a 3-part upload's"
        );
        assert_eq!(
            sha256_of(&*store, key, 0, data.len() as u64).await,
            Sha256::digest(&data).to_vec()
        );
    })
    .catch_unwind()
    .await;
    fixture.cleanup().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn s3_ping_fails_clearly_for_a_missing_bucket() {
    let fixture = S3Fixture::new().await;
    let missing = format!("orbit-missing-{}", uuid::Uuid::new_v4().simple());
    let store = blob::open(&fixture.settings(&format!("s3://{missing}")))
        .await
        .unwrap();
    let error = store.ping().await.unwrap_err();
    fixture.cleanup().await;
    // The SDK's error is kept as the source, not only quoted in the message.
    assert!(std::error::Error::source(&error).is_some(), "{error:?}");
    let error = error.to_string();
    assert!(error.contains(&missing), "{error}");
    assert!(error.contains(&fixture.server.endpoint), "{error}");
}

/// A part that cannot be stored fails the write, and the writer then refuses to finish (rather
/// than storing what is left): the failed part's bytes are gone.
#[tokio::test]
async fn s3_failed_part_fails_the_upload() {
    let fixture = S3Fixture::new().await;
    // Refused credentials make the first part fail. (A missing bucket would not do: s3s-fs
    // accepts parts for it and creates it on completion.)
    let mut settings = fixture.settings(&format!("s3://{}", fixture.bucket));
    settings.secret_access_key = Some("not-the-secret".into());
    let store = blob::open(&settings).await.unwrap();
    let mut writer = store.begin("sources/failed.csv").await.unwrap();
    let mut write_failed = false;
    for piece in pattern(9 * MIB, 7).chunks(MIB) {
        if writer.write(Bytes::copy_from_slice(piece)).await.is_err() {
            write_failed = true;
            break;
        }
    }
    let finished = writer.finish().await;
    let keys = fixture.keys().await;
    fixture.cleanup().await;
    assert!(write_failed, "writing a part with a wrong secret succeeded");
    let error = finished.unwrap_err().to_string();
    assert!(error.contains("an earlier write failed"), "{error}");
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn s3_settings_are_checked() {
    let mut settings = settings("s3://");
    assert!(blob::open(&settings).await.is_err(), "no bucket");
    settings.url = "s3://bucket".parse().unwrap();
    settings.access_key_id = Some("only-the-key".into());
    assert!(blob::open(&settings).await.is_err(), "key without secret");
}

// ---- Helpers -------------------------------------------------------------------------------

fn settings(url: &str) -> ObjectStoreSettings {
    ObjectStoreSettings {
        url: url.parse().unwrap(),
        endpoint: None,
        region: None,
        access_key_id: None,
        secret_access_key: None,
    }
}

/// Deterministic bytes that differ at every offset within a part, so a misplaced range shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` in pieces whose sizes cycle through `sizes`, then finishes.
async fn write_in_pieces(store: &dyn BlobStore, key: &str, data: &[u8], sizes: &[usize]) {
    let mut writer = store.begin(key).await.unwrap();
    let mut rest = data;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, tail) = rest.split_at((*size).min(rest.len()));
        writer.write(Bytes::copy_from_slice(piece)).await.unwrap();
        rest = tail;
    }
    writer.finish().await.unwrap();
}

async fn read(store: &dyn BlobStore, key: &str, start: u64, end: u64) -> Vec<u8> {
    let mut stream = store
        .read_range(key, start, end)
        .await
        .unwrap_or_else(|e| panic!("read_range({key:?}, {start}, {end}): {e}"));
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// Hashes a range as it streams, without holding it.
async fn sha256_of(store: &dyn BlobStore, key: &str, start: u64, end: u64) -> Vec<u8> {
    let mut stream = store.read_range(key, start, end).await.unwrap();
    let mut hasher = Sha256::new();
    while let Some(chunk) = stream.next().await {
        hasher.update(chunk.unwrap());
    }
    hasher.finalize().to_vec()
}

async fn assert_not_found(store: &dyn BlobStore, key: &str, when: &str) {
    match store.read_range(key, 0, 10).await {
        Err(BlobError::NotFound(k)) => assert_eq!(k, key),
        Err(e) => panic!("{when}: reading {key:?} should be NotFound, got {e}"),
        Ok(_) => panic!("{when}: {key:?} is readable"),
    }
}
