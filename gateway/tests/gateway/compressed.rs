//! Compressed uploads (issue 22): a gzip or zstd `file` is told by its magic bytes, whatever
//! its name, and imports as the CSV inside it would; a bomb, a corrupt or a truncated stream
//! is refused with nothing stored. Runs on the embedded stack, and on the distributed one with
//! `ORBIT_TEST_STACK=distributed` (deploy/test.sh does both, and Citus).

use std::io::Write as _;
use std::time::Duration;

use crate::common::*;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// As the zstd tool writes it: with the content checksum (the library leaves it out, and a
/// frame without one can only be checked for its structure).
fn zstd(data: &[u8]) -> Vec<u8> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    encoder.include_checksum(true).unwrap();
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// The file part as a careless client sends it: a `.csv` name and a text type, whatever the
/// bytes are.
fn form(file: Vec<u8>) -> Form {
    Form::new().part(
        "file",
        Part::bytes(file)
            .file_name("contacts.csv")
            .mime_str("text/csv")
            .unwrap(),
    )
}

async fn upload(app: &TestApp, file: Vec<u8>) -> reqwest::Response {
    app.post(&app.upload_url())
        .multipart(form(file))
        .send()
        .await
        .unwrap()
}

fn small_chunks() -> impl FnOnce(&mut orbit_config::Settings) {
    |s| {
        s.ingest.sync_rows = 50;
        s.ingest.chunk_rows = 200;
    }
}

/// What a directory holds: each profile without what differs between two directories (ids
/// and times), sorted, for comparing two imports.
async fn profiles(app: &TestApp, dir_url: &str) -> Vec<String> {
    let mut out: Vec<String> = app
        .collect(&format!("{dir_url}/profiles"))
        .await
        .into_iter()
        .map(|mut p| {
            let p = p.as_object_mut().unwrap();
            for volatile in ["id", "directory_id", "created_at", "updated_at"] {
                p.remove(volatile);
            }
            serde_json::to_string(p).unwrap()
        })
        .collect();
    out.sort();
    out
}

/// A new directory of the app's organization: its URL.
async fn new_directory(app: &TestApp, name: &str) -> String {
    let response = app
        .post(&app.url(&format!("/v2/organizations/{}/directories", app.tenant.org)))
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    app.url(&format!(
        "/v2/organizations/{}/directories/{}",
        app.tenant.org,
        body["id"].as_str().unwrap()
    ))
}

#[tokio::test]
async fn gzip_and_zstd_files_import_as_the_csv_inside_them() {
    let app = TestApp::spawn_with(small_chunks()).await;
    let csv = contacts_csv(1000, "c");
    let plain = app.upload_ok(csv.clone()).await;
    let plain = app
        .wait_terminal(
            plain["source_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    let expected = profiles(&app, &app.dir_url("")).await;
    assert_eq!(expected.len(), 1000);
    let sha = hex::encode(Sha256::digest(csv.as_bytes()));
    assert_eq!(plain["compression"], "none");
    assert_eq!(plain["received_bytes"], csv.len());

    for (name, file) in [
        ("gzip", gzip(csv.as_bytes())),
        ("zstd", zstd(csv.as_bytes())),
    ] {
        // A directory of its own, so the outcome is this file's alone.
        let dir_url = new_directory(&app, name).await;
        let response = app
            .post(&format!("{dir_url}/sources/csv-upload"))
            .multipart(form(file.clone()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{name}");
        let body: Value = response.json().await.unwrap();
        let id = body["source_id"].as_str().unwrap();
        let done = {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let (status, s) = app.get_json(&format!("{dir_url}/sources/{id}")).await;
                assert_eq!(status, StatusCode::OK, "{s}");
                if s["source_status"] == "completed" || s["source_status"] == "failed" {
                    break s;
                }
                assert!(std::time::Instant::now() < deadline, "{s}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        assert_eq!(done["source_status"], "completed", "{name}: {done}");
        assert_eq!(
            (&done["accepted"], &done["failed"], &done["total_rows"]),
            (&plain["accepted"], &plain["failed"], &plain["total_rows"]),
            "{name}"
        );
        // byte_size and sha256 are the CSV's; received_bytes the file's as sent.
        assert_eq!(done["compression"], name);
        assert_eq!(done["byte_size"], csv.len(), "{name}");
        assert_eq!(done["sha256"], sha, "{name}");
        assert_eq!(done["received_bytes"], file.len(), "{name}");
        assert!(file.len() * 3 < csv.len(), "{name} hardly compressed");
        let got = profiles(&app, &dir_url).await;
        assert_eq!(got, expected, "{name}");
    }
}

#[tokio::test]
async fn the_same_csv_compressed_replays_its_idempotency_key() {
    let app = TestApp::spawn().await;
    let csv = contacts_csv(20, "k");
    let send = |file: Vec<u8>| {
        app.post(&app.upload_url())
            .header("idempotency-key", "nightly-1")
            .multipart(form(file))
            .send()
    };
    let first = send(csv.clone().into_bytes()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    // The key guards the CSV, not its wrapping: the same rows gzip'ed are the same upload.
    let again = send(gzip(csv.as_bytes())).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["source_id"], first["source_id"]);
    assert_eq!(again["is_idempotent"], true);
    // Other rows under the same key are refused, compressed or not.
    let other = send(zstd(contacts_csv(21, "k").as_bytes())).await.unwrap();
    assert_problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
}

/// Nothing of a refused file is left: no source, no object.
async fn assert_nothing_stored(app: &TestApp) {
    let sources = app.collect(&app.dir_url("/sources")).await;
    assert!(sources.is_empty(), "{sources:?}");
    let objects = app.stored_objects().await;
    assert!(objects.is_empty(), "{objects:?}");
}

#[tokio::test]
async fn a_bomb_is_refused_once_it_decompresses_past_the_limit() {
    let app = TestApp::spawn_with(|s| s.ingest.max_upload_bytes = 4 << 20).await;
    // 10 GB of rows: a 10 MB frame of rows, a thousand times (a zstd file may hold many
    // frames), after one that starts with the header.
    let row = b"bomb@example.com,Bo,Mb\n";
    let rows = row.repeat(10_000_000 / row.len());
    let first = zstd::encode_all(
        &[&b"email,first_name,last_name\n"[..], &rows].concat()[..],
        3,
    )
    .unwrap();
    let mut bomb = first;
    bomb.extend(zstd::encode_all(&rows[..], 3).unwrap().repeat(999));
    assert!(bomb.len() < 2_000_000, "{} bytes", bomb.len());
    let response = upload(&app, bomb).await;
    let body = assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large").await;
    assert!(
        body["detail"].as_str().unwrap().contains("4194304"),
        "{body}"
    );
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn the_compressed_size_has_a_limit_of_its_own() {
    let app = TestApp::spawn_with(|s| s.ingest.max_compressed_upload_bytes = 10_000).await;
    let file = gzip(contacts_csv(5000, "big").as_bytes());
    assert!(file.len() > 10_000);
    let response = upload(&app, file).await;
    let body = assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large").await;
    assert!(
        body["detail"].as_str().unwrap().contains("compressed"),
        "{body}"
    );
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn corrupt_and_truncated_streams_are_refused_with_where_they_broke() {
    let app = TestApp::spawn_with(small_chunks()).await;
    let csv = contacts_csv(5000, "x");
    for (name, packed) in [
        ("gzip", gzip(csv.as_bytes())),
        ("zstd", zstd(csv.as_bytes())),
    ] {
        let cut = packed.len() * 2 / 3;
        let truncated = packed[..cut].to_vec();
        let mut corrupt = packed.clone();
        for b in &mut corrupt[cut..cut + 32] {
            *b = !*b;
        }
        for (what, file) in [("truncated", truncated), ("corrupt", corrupt)] {
            let response = upload(&app, file).await;
            let body = assert_problem(
                response,
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_compression",
            )
            .await;
            assert_eq!(body["compression"], name, "{what}: {body}");
            let offset = body["offset"].as_u64().expect("an offset");
            assert!(offset <= packed.len() as u64, "{what} {name}: {body}");
            // The rows before the damage were not imported either.
            assert_nothing_stored(&app).await;
        }
    }
    let profiles = app.collect(&app.dir_url("/profiles")).await;
    assert!(profiles.is_empty());
}
