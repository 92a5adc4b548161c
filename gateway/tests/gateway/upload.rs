//! The csv-upload endpoint over HTTP: status codes, error codes, CSV rules and idempotency.

use std::time::Duration;

use crate::common::*;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;

async fn errors_of(app: &TestApp, source: &str) -> Vec<Value> {
    app.collect(&app.dir_url(&format!("/sources/{source}/errors")))
        .await
}

#[tokio::test]
async fn a_small_file_completes_inside_the_request() {
    let app = TestApp::spawn().await;
    let csv = "email,first name\nann@example.com,Ann\nbob@example.com,Bob\n";
    let response = app.upload(csv).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "accepted",
            "directory_id",
            "failed",
            "is_idempotent",
            "source_id",
            "source_status",
            "warnings"
        ]
    );
    assert_eq!(body["source_status"], "completed");
    assert_eq!(
        (body["accepted"].as_u64(), body["failed"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(body["is_idempotent"], false);
    assert_eq!(body["directory_id"], app.tenant.dir.to_string());
    assert_eq!(
        location,
        format!(
            "/v2/organizations/{}/directories/{}/sources/{}",
            app.tenant.org,
            app.tenant.dir,
            body["source_id"].as_str().unwrap()
        )
    );
    let status = app.source(body["source_id"].as_str().unwrap()).await;
    assert_eq!(status["total_rows"], 2);
    assert_eq!(status["processed_rows"], 2);
    assert_eq!(status["filename"], "contacts.csv");
    assert_eq!(status["byte_size"], csv.len());
    assert_eq!(status["sha256"].as_str().unwrap().len(), 64);
    assert!(status["completed_at"].is_string());
    assert!(status.get("error").is_none());
}

#[tokio::test]
async fn a_large_file_is_accepted_and_finished_by_workers() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 10;
        s.ingest.chunk_rows = 25;
        // Chunks commit in slices, the last one short.
        s.worker.slice_rows = 7;
    })
    .await;
    let body = app.upload_ok(contacts_csv(240, "w")).await;
    assert_eq!(body["source_status"], "processing");
    assert_eq!(
        body["accepted"], 10,
        "the synchronous prefix is counted in the response"
    );
    let done = app
        .wait_terminal(body["source_id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(done["source_status"], "completed");
    assert_eq!(
        (done["accepted"].as_u64(), done["failed"].as_u64()),
        (Some(240), Some(0))
    );
    assert_eq!(done["total_rows"], 240);
    let profiles = app.collect(&app.dir_url("/profiles")).await;
    assert_eq!(profiles.len(), 240);
}

#[tokio::test]
async fn sync_rows_zero_queues_everything() {
    let app = TestApp::spawn_with(|s| s.ingest.sync_rows = 0).await;
    let response = app.upload(contacts_csv(5, "z")).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["source_status"], "pending");
    assert_eq!(body["accepted"], 0);
    let done = app
        .wait_terminal(body["source_id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(done["accepted"], 5);
}

#[tokio::test]
async fn row_failures_and_warnings_carry_codes_rows_and_lines() {
    let app = TestApp::spawn().await;
    let csv = concat!(
        "Name,E-mail,Phone Number,LinkedIn,Favourite Colour\n",
        "Ann Lee,ann@example.com,(415) 555-2671,https://www.linkedin.com/in/Ann-Lee/,blue\n",
        "\n",
        "Bob,not-an-email,,,\n",
        "Cy,cy@example.com,12,nope,green\n",
        "\"Dee\nDoe\",ANN@example.com,,,\n",
        "Eve,eve@example.com\n",
        "Fay,,,,red\n",
    );
    let body = app.upload_ok(csv).await;
    assert_eq!(body["source_status"], "completed");
    assert_eq!(body["accepted"], 3);
    assert_eq!(body["failed"], 3);
    assert_eq!(body["warnings"], 2);
    let source = body["source_id"].as_str().unwrap();
    let errors = errors_of(&app, source).await;
    let seen: Vec<(u64, u64, &str, &str, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["row_number"].as_u64().unwrap(),
                e["line_number"].as_u64().unwrap(),
                e["severity"].as_str().unwrap(),
                e["code"].as_str().unwrap(),
                e["column"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (2, 4, "error", "missing_identifier", "E-mail"),
            (3, 5, "warning", "invalid_phone", "Phone Number"),
            (3, 5, "warning", "invalid_linkedin_url", "LinkedIn"),
            (4, 6, "warning", "duplicate_in_file", "email"),
            (5, 8, "error", "column_count_mismatch", ""),
            (6, 9, "error", "missing_identifier", ""),
        ]
    );
    assert_eq!(errors[1]["value"], "12");
    // Normalized and merged: Dee's row shares Ann's email, so one profile holds both.
    let profiles = app
        .collect(&app.dir_url("/profiles?email=ANN@example.com"))
        .await;
    assert_eq!(profiles.len(), 1);
    let ann = &profiles[0];
    assert_eq!(ann["email"], "ann@example.com");
    assert_eq!(ann["phone"], "+14155552671");
    assert_eq!(ann["linkedin_url"], "linkedin.com/in/ann-lee");
    assert_eq!(
        ann["first_name"], "Dee",
        "a later row of the same source wins"
    );
    assert_eq!(ann["attributes"]["Favourite Colour"], "blue");
}

#[tokio::test]
async fn field_too_long_and_invalid_encoding_fail_rows() {
    let app = TestApp::spawn_with(|s| s.ingest.max_field_bytes = 16).await;
    let mut csv = b"email,note\nok@example.com,short\nlong@example.com,".to_vec();
    csv.extend(std::iter::repeat_n(b'x', 100));
    csv.extend(b"\nbad@example.com,caf\xe9\n");
    let body = app.upload_ok(csv).await;
    assert_eq!(
        (body["accepted"].as_u64(), body["failed"].as_u64()),
        (Some(1), Some(2))
    );
    let errors = errors_of(&app, body["source_id"].as_str().unwrap()).await;
    assert_eq!(errors[0]["code"], "field_too_long");
    assert_eq!(errors[0]["column"], "note");
    assert_eq!(errors[1]["code"], "invalid_encoding");
}

#[tokio::test]
async fn queued_chunks_follow_the_row_rules_of_the_upload() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 1;
        s.ingest.chunk_rows = 2;
        s.ingest.max_field_bytes = 16;
        s.ingest.default_region = "GB".parse().unwrap();
    })
    .await;
    let long = "x".repeat(40);
    let csv = format!(
        "email,phone,note\na@example.com,,\nb@example.com,020 7946 0958,\nc@example.com,,{long}\n"
    );
    let body = app.upload_ok(csv).await;
    let done = app
        .wait_terminal(body["source_id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(
        (done["accepted"].as_u64(), done["failed"].as_u64()),
        (Some(2), Some(1))
    );
    let errors = app
        .collect(&app.dir_url(&format!(
            "/sources/{}/errors",
            body["source_id"].as_str().unwrap()
        )))
        .await;
    assert_eq!(errors[0]["code"], "field_too_long");
    let b = app
        .collect(&app.dir_url("/profiles?email=b@example.com"))
        .await;
    assert_eq!(
        b[0]["phone"], "+442079460958",
        "a national number read in the upload's region"
    );
}

#[tokio::test]
async fn failed_rows_come_back_as_csv_in_input_order() {
    let app = TestApp::spawn().await;
    let body = app
        .upload(
            "email,city\nbad,Paris\nok@example.com,Rome\n,\"Oslo, NO\"\nx@example.com,Lyon,extra\n",
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    let response = app
        .get(&app.dir_url(&format!(
            "/sources/{}/failed-rows",
            body["source_id"].as_str().unwrap()
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let text = response.text().await.unwrap();
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    assert_eq!(
        header,
        [
            "email",
            "city",
            "extra_1",
            "line_number",
            "error_code",
            "error_message"
        ]
    );
    let rows: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0][..5],
        ["bad", "Paris", "", "2", "missing_identifier"]
    );
    assert_eq!(
        rows[1][..5],
        ["", "Oslo, NO", "", "4", "missing_identifier"]
    );
    assert_eq!(
        rows[2][..5],
        [
            "x@example.com",
            "Lyon",
            "extra",
            "5",
            "column_count_mismatch"
        ]
    );
}

#[tokio::test]
async fn dialects_encodings_and_hints() {
    let app = TestApp::spawn().await;
    // Semicolons detected, UTF-8 BOM stripped, CR line endings.
    let body = app
        .upload_ok("\u{feff}Email;City\rann@example.com;Zürich\rbob@example.com;Köln\r")
        .await;
    assert_eq!(body["accepted"], 2);
    let profiles = app
        .collect(&app.dir_url("/profiles?email=ann@example.com"))
        .await;
    assert_eq!(profiles[0]["city"], "Zürich");

    // UTF-16LE with its BOM, tab-separated.
    let text = "email\tcity\r\ncy@example.com\tMalmö\r\n";
    let mut utf16 = vec![0xFF, 0xFE];
    utf16.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
    assert_eq!(app.upload_ok(utf16).await["accepted"], 1);
    let cy = app
        .collect(&app.dir_url("/profiles?email=cy@example.com"))
        .await;
    assert_eq!(cy[0]["city"], "Malmö");

    // windows-1252 by hint, pipe by hint.
    let form = Form::new()
        .text("delimiter", "|")
        .text("encoding", "windows-1252")
        .part(
            "file",
            Part::bytes(b"email|city\ndee@example.com|S\xe8te\n".to_vec()).file_name("w.csv"),
        );
    let response = app
        .post(&app.upload_url())
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let dee = app
        .collect(&app.dir_url("/profiles?email=dee@example.com"))
        .await;
    assert_eq!(dee[0]["city"], "Sète");
}

#[tokio::test]
async fn bad_hints_are_invalid_requests() {
    let app = TestApp::spawn().await;
    for (name, value) in [("delimiter", ":"), ("encoding", "ebcdic")] {
        let form = Form::new()
            .text(name, value)
            .part("file", Part::bytes(b"email\na@b.co\n".to_vec()));
        let response = app
            .post(&app.upload_url())
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
}

#[tokio::test]
async fn file_level_problems_are_422_and_leave_nothing() {
    let app = TestApp::spawn_with(|s| s.ingest.max_columns = 4).await;
    for csv in [
        "",
        "\n\n",
        "name,city\nAnn,Paris\n",
        "email,E-mail\na@b.co,a@b.co\n",
        "email,a\u{0}b\n",
        "email,a,b,c,d\n",
    ] {
        let response = app.upload(csv).await;
        let body = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, "invalid_csv").await;
        assert!(!body["detail"].as_str().unwrap().is_empty());
    }
    assert!(app.collect(&app.dir_url("/sources")).await.is_empty());
    let stored = app.stored_objects().await;
    assert!(stored.is_empty(), "{stored:?}");
}

#[tokio::test]
async fn request_level_errors_have_their_codes() {
    let app = TestApp::spawn_with(|s| s.ingest.max_upload_bytes = 1000).await;
    let url = app.upload_url();

    // 401: missing, malformed, unknown.
    let response = app
        .client
        .post(&url)
        .multipart(file_form("email\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_problem(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    for token in ["nonsense", "orb_unknown"] {
        let response = app
            .client
            .post(&url)
            .bearer_auth(token)
            .multipart(file_form("email\n"))
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    }

    // 400: no file, bad UUID in the path, bad key.
    let response = app
        .post(&url)
        .multipart(Form::new().text("x", "y"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let bad = app.url(&format!(
        "/v2/organizations/{}/directories/nope/sources/csv-upload",
        app.tenant.org
    ));
    let response = app
        .post(&bad)
        .multipart(file_form("email\n"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let response = app
        .post(&url)
        .header("Idempotency-Key", "")
        .multipart(file_form("email\n"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let response = app
        .post(&url)
        .header("Idempotency-Key", "a")
        .multipart(file_form("email\n").text("idempotency_key", "b"))
        .send()
        .await
        .unwrap();
    // Each well formed, together contradictory: what no schema can rule out is a 422.
    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_mismatch",
    )
    .await;

    // 415: not multipart.
    let response = app
        .post(&url)
        .header("content-type", "text/csv")
        .body("email\n")
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    // 413: over ingest.max_upload_bytes.
    let response = app.upload(contacts_csv(50, "big")).await;
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large").await;

    // 404: unknown directory; 409: archived directory.
    let missing = app.url(&format!(
        "/v2/organizations/{}/directories/{}/sources/csv-upload",
        app.tenant.org,
        uuid::Uuid::new_v4()
    ));
    let response = app
        .post(&missing)
        .multipart(file_form("email\n"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "directory_not_found").await;
    let archived = app.post(&app.dir_url("/archive")).send().await.unwrap();
    assert_eq!(archived.status(), StatusCode::OK);
    let response = app.upload("email\na@b.co\n").await;
    assert_problem(response, StatusCode::CONFLICT, "directory_archived").await;
    assert!(app.collect(&app.dir_url("/sources")).await.is_empty());
}

/// A gateway keeps a token's record and a directory for `http.lookup_ttl`: what another
/// process changes (`orbit-gateway admin` revoking the token, archiving the directory) holds
/// here once that has passed.
#[tokio::test]
async fn a_revocation_or_archive_made_elsewhere_holds_within_the_lookup_ttl() {
    let ttl = Duration::from_millis(300);
    let app = TestApp::spawn_with(|s| s.http.lookup_ttl = ttl).await;
    let store = &*app.running().state.store;
    let created = orbit_gateway::admin::create_token(store, app.tenant.org, None, None)
        .await
        .unwrap();
    let token = created["token"].as_str().unwrap();
    let list = || {
        app.client
            .get(app.dir_url("/sources"))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(list().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        app.upload("email\na@b.co\n").await.status(),
        StatusCode::CREATED
    );
    orbit_gateway::admin::revoke_token(store, token)
        .await
        .unwrap();
    orbit_gateway::admin::archive_directory(store, app.tenant.org, app.tenant.dir)
        .await
        .unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_problem(
        list().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    let response = app.upload("email\nb@b.co\n").await;
    assert_problem(response, StatusCode::CONFLICT, "directory_archived").await;
}

#[tokio::test]
async fn an_expired_or_revoked_token_is_refused() {
    let app = TestApp::spawn().await;
    let store = &*app.running().state.store;
    let revoked = orbit_gateway::admin::create_token(store, app.tenant.org, None, None)
        .await
        .unwrap();
    let token = revoked["token"].as_str().unwrap();
    orbit_gateway::admin::revoke_token(store, token)
        .await
        .unwrap();
    let expired = orbit_gateway::admin::create_token(
        store,
        app.tenant.org,
        None,
        Some(Duration::from_millis(1)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for token in [token, expired["token"].as_str().unwrap()] {
        let response = app
            .client
            .get(app.dir_url("/sources"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    }
}

async fn upload_with_key(app: &TestApp, key: &str, csv: &str) -> reqwest::Response {
    app.post(&app.upload_url())
        .header("Idempotency-Key", key)
        .multipart(file_form(csv))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn idempotent_replay_reuse_and_fresh_retry() {
    let app = TestApp::spawn().await;
    let csv = "email\nann@example.com\n";
    let first = upload_with_key(&app, "key-1", csv).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();

    let replay = upload_with_key(&app, "key-1", csv).await;
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["source_id"], first["source_id"]);
    assert_eq!(replay["is_idempotent"], true);
    assert_eq!(replay["accepted"], first["accepted"]);

    // The key may also come as a form field, before or after the file.
    let form = file_form(csv).text("idempotency_key", "key-1");
    let late = app
        .post(&app.upload_url())
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), StatusCode::OK);

    let other_file = upload_with_key(&app, "key-1", "email\nbob@example.com\n").await;
    assert_problem(
        other_file,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    let form = file_form("email\nbob@example.com\n").text("idempotency_key", "key-1");
    let other_late = app
        .post(&app.upload_url())
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_problem(
        other_late,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;

    let created = app
        .post(&app.url(&format!("/v2/organizations/{}/directories", app.tenant.org)))
        .json(&serde_json::json!({"name": "Other"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let other_dir = app.url(&format!(
        "/v2/organizations/{}/directories/{}/sources/csv-upload",
        app.tenant.org,
        created["id"].as_str().unwrap()
    ));
    let response = app
        .post(&other_dir)
        .header("Idempotency-Key", "key-1")
        .multipart(file_form(csv))
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;

    // A rejected request stores no key: the retry with a good file runs fresh.
    let rejected = upload_with_key(&app, "key-2", "no identifier\nx\n").await;
    assert_problem(rejected, StatusCode::UNPROCESSABLE_ENTITY, "invalid_csv").await;
    let retry = upload_with_key(&app, "key-2", csv).await;
    assert_eq!(retry.status(), StatusCode::CREATED);

    assert_eq!(app.collect(&app.dir_url("/sources")).await.len(), 2);
    // Keys are scoped by organization: another tenant's same key is its own.
    let other = app.another_tenant().await;
    let url = app.url(&format!(
        "/v2/organizations/{}/directories/{}/sources/csv-upload",
        other.org, other.dir
    ));
    let response = app
        .client
        .post(&url)
        .bearer_auth(&other.token)
        .header("Idempotency-Key", "key-1")
        .multipart(file_form(csv))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn concurrent_identical_requests_make_one_source() {
    let app = TestApp::spawn().await;
    let csv = contacts_csv(300, "c");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = app.client.clone();
        let url = app.upload_url();
        let token = app.tenant.token.clone();
        let csv = csv.clone();
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .bearer_auth(token)
                .header("Idempotency-Key", "same-key")
                .multipart(file_form(csv))
                .send()
                .await
                .unwrap();
            let status = response.status();
            let retry_after = response.headers().get("retry-after").is_some();
            let body: Value = response.json().await.unwrap();
            (status, retry_after, body)
        }));
    }
    let mut source_ids = std::collections::HashSet::new();
    let mut created = 0;
    for task in tasks {
        let (status, retry_after, body) = task.await.unwrap();
        match status {
            StatusCode::CREATED | StatusCode::ACCEPTED => {
                created += 1;
                source_ids.insert(body["source_id"].as_str().unwrap().to_owned());
            }
            StatusCode::OK => {
                source_ids.insert(body["source_id"].as_str().unwrap().to_owned());
            }
            StatusCode::CONFLICT => {
                assert_eq!(body["code"], "idempotency_key_in_use");
                assert!(retry_after);
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(source_ids.len(), 1);
    assert_eq!(app.collect(&app.dir_url("/sources")).await.len(), 1);
    assert_eq!(app.collect(&app.dir_url("/profiles")).await.len(), 300);
}
