//! Clients steering their imports (issue 13): cancel, column mapping, dry runs and signed
//! completion webhooks. Runs on the embedded stack, and on the distributed one with
//! `ORBIT_TEST_STACK=distributed` (deploy/test.sh does both).

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::Value;

fn cancel_url(app: &TestApp, source: &str) -> String {
    app.dir_url(&format!("/sources/{source}/cancel"))
}

#[tokio::test]
async fn a_cancel_mid_ingest_ends_failed_and_nothing_commits_after_it() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 0;
        s.ingest.chunk_rows = 200;
        s.worker.slice_rows = 20;
    })
    .await;
    let body = app.upload_ok(contacts_csv(20_000, "c")).await;
    let source = body["source_id"].as_str().unwrap().to_owned();
    // Wait until workers are at it, so the cancel lands mid-ingest.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = app.source(&source).await;
        let processed = status["processed_rows"].as_u64().unwrap();
        seen.push(processed);
        if processed > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let response = app.post(&cancel_url(&app, &source)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cancelled: Value = response.json().await.unwrap();
    assert_eq!(cancelled["source_status"], "failed", "{cancelled}");
    assert_eq!(cancelled["error"]["code"], "cancelled", "{cancelled}");
    assert!(cancelled["completed_at"].is_string());
    let at_cancel = cancelled["processed_rows"].as_u64().unwrap();
    assert!(
        at_cancel < 20_000,
        "the cancel came after the end: {cancelled}"
    );
    assert!(at_cancel >= *seen.last().unwrap());
    // Workers holding chunks drop them at their next commit: nothing more is counted.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let status = app.source(&source).await;
        assert_eq!(status["source_status"], "failed", "{status}");
        assert_eq!(status["error"]["code"], "cancelled", "{status}");
        assert_eq!(
            status["processed_rows"].as_u64(),
            Some(at_cancel),
            "a chunk committed after the cancel: {status}"
        );
        assert_eq!(
            status["accepted"].as_u64().unwrap() + status["failed"].as_u64().unwrap(),
            at_cancel,
            "{status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The rows committed before the cancel stay: their profiles are there.
    let (_, profiles) = app
        .get_json(&app.dir_url("/profiles?email=c0@example.com"))
        .await;
    assert_eq!(profiles["data"].as_array().unwrap().len(), 1, "{profiles}");
    // A terminal source cannot be cancelled again.
    let again = app.post(&cancel_url(&app, &source)).send().await.unwrap();
    assert_problem(again, StatusCode::CONFLICT, "source_terminal").await;
}

#[tokio::test]
async fn cancelling_a_finished_or_unknown_source_is_refused() {
    let app = TestApp::spawn().await;
    let body = app
        .upload_ok("email\nann@example.com\nbob@example.com\n")
        .await;
    assert_eq!(body["source_status"], "completed");
    let source = body["source_id"].as_str().unwrap();
    let response = app.post(&cancel_url(&app, source)).send().await.unwrap();
    let problem = assert_problem(response, StatusCode::CONFLICT, "source_terminal").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("completed"),
        "{problem}"
    );
    assert_eq!(app.source(source).await["source_status"], "completed");
    let unknown = uuid::Uuid::now_v7().to_string();
    let response = app.post(&cancel_url(&app, &unknown)).send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "source_not_found").await;
    // Another organization's token sees nothing of it.
    let other = app.another_tenant().await;
    let response = app
        .client
        .post(cancel_url(&app, source))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

fn upload_form(csv: &str, fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    form.part(
        "file",
        reqwest::multipart::Part::bytes(csv.as_bytes().to_vec()).file_name("contacts.csv"),
    )
}

async fn upload_with(app: &TestApp, csv: &str, fields: &[(&str, &str)]) -> reqwest::Response {
    app.post(&app.upload_url())
        .multipart(upload_form(csv, fields))
        .send()
        .await
        .unwrap()
}

async fn profile_of(app: &TestApp, email: &str) -> Value {
    let (status, body) = app
        .get_json(&app.dir_url(&format!("/profiles?email={email}")))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let profiles = body["data"].as_array().unwrap();
    assert_eq!(profiles.len(), 1, "{email}: {body}");
    profiles[0].clone()
}

const MAPPING: &str = r#"{"Correo": "email", "Nombre": "first_name", "Notas": "ignore", "Colour": "attributes.favourite_colour"}"#;

/// `rows` rows under headers only the mapping (and, for `Phone`, the aliases) explain.
fn mapped_csv(rows: usize) -> String {
    let mut csv = String::from("Correo,Nombre,Notas,Colour,Phone\n");
    for i in 0..rows {
        csv.push_str(&format!(
            "m{i}@example.com,Name{i},secret {i},blue{i},+1 415 555 {:04}\n",
            1000 + i
        ));
    }
    csv
}

#[tokio::test]
async fn a_mapping_renames_and_ignores_columns_in_the_request_and_in_workers() {
    // Rows 1-2 in the request, the rest by workers: both must apply the mapping.
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 2;
        s.ingest.chunk_rows = 3;
    })
    .await;
    let response = upload_with(&app, &mapped_csv(10), &[("mapping", MAPPING)]).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    let source = body["source_id"].as_str().unwrap();
    let done = app.wait_terminal(source, Duration::from_secs(30)).await;
    assert_eq!(done["source_status"], "completed", "{done}");
    assert_eq!(
        (done["accepted"].as_u64(), done["failed"].as_u64()),
        (Some(10), Some(0)),
        "{done}"
    );
    assert_eq!(
        done["mapping"],
        serde_json::from_str::<Value>(MAPPING).unwrap(),
        "the source shows its mapping"
    );
    for i in [0, 9] {
        let profile = profile_of(&app, &format!("m{i}@example.com")).await;
        assert_eq!(profile["first_name"], format!("Name{i}"), "{profile}");
        assert_eq!(
            profile["attributes"],
            serde_json::json!({ "favourite_colour": format!("blue{i}") }),
            "the ignored column is kept nowhere: {profile}"
        );
        // Not in the mapping: the `Phone` alias still applies.
        assert_eq!(
            profile["identities"]["phones"].as_array().unwrap().len(),
            1,
            "{profile}"
        );
    }
}

#[tokio::test]
async fn a_bad_mapping_is_refused_naming_the_header_or_target() {
    let app = TestApp::spawn().await;
    let csv = mapped_csv(2);
    for (mapping, needle) in [
        (r#"{"Correo": "email", "Missing": "phone"}"#, "\"Missing\""),
        (r#"{"Correo": "e-mail"}"#, "\"e-mail\""),
        (r#"{"Correo": "attributes."}"#, "attribute name"),
        ("[\"Correo\"]", "JSON object"),
        (r#"{"Phone": "ignore"}"#, "identifier"),
    ] {
        let response = upload_with(&app, &csv, &[("mapping", mapping)]).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{mapping}: {detail}");
    }
    // After the file it cannot steer how the file is read.
    let form = upload_form(&csv, &[]).text("mapping", MAPPING);
    let response = app
        .post(&app.upload_url())
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    // Nothing was kept of any of them.
    let (_, sources) = app.get_json(&app.dir_url("/sources")).await;
    assert_eq!(sources["data"].as_array().unwrap().len(), 0, "{sources}");
}

#[tokio::test]
async fn the_idempotency_fingerprint_covers_the_mapping() {
    let app = TestApp::spawn().await;
    let csv = mapped_csv(3);
    let send = |mapping: &'static str| {
        let form = upload_form(&csv, &[("mapping", mapping)]);
        app.post(&app.upload_url())
            .header("idempotency-key", "mapped-1")
            .multipart(form)
            .send()
    };
    let first = send(MAPPING).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    // The same bytes and the same mapping replay.
    let replay = send(MAPPING).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["source_id"], first["source_id"]);
    assert_eq!(replay["is_idempotent"], true);
    // The same bytes under another mapping are another request.
    let other =
        send(r#"{"Correo": "email", "Nombre": "ignore", "Notas": "ignore", "Colour": "ignore"}"#)
            .await
            .unwrap();
    assert_problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    // And without one, too (the header has no identifier without it, but the key answers first).
    let plain = app
        .post(&app.upload_url())
        .header("idempotency-key", "mapped-1")
        .multipart(upload_form(&csv, &[]))
        .send()
        .await
        .unwrap();
    assert_problem(
        plain,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
}

/// 40 rows: every tenth from the fourth on fails (no valid identifier), every tenth from the
/// sixth on has a warning (an unusable phone beside a good email).
fn checked_csv() -> String {
    let mut csv = String::from("email,phone,first_name\n");
    for i in 0..40 {
        match i % 10 {
            3 => csv.push_str(&format!("not-an-email-{i},,Bad{i}\n")),
            5 => csv.push_str(&format!("d{i}@example.com,12,Warn{i}\n")),
            _ => csv.push_str(&format!("d{i}@example.com,,Ok{i}\n")),
        }
    }
    csv
}

fn counts(source: &Value) -> [Option<u64>; 5] {
    [
        "total_rows",
        "processed_rows",
        "accepted",
        "failed",
        "warnings",
    ]
    .map(|k| source[k].as_u64())
}

async fn issues_of(app: &TestApp, source: &str) -> Vec<(u64, String)> {
    let mut issues: Vec<(u64, String)> = app
        .collect(&app.dir_url(&format!("/sources/{source}/errors")))
        .await
        .iter()
        .map(|i| {
            (
                i["row_number"].as_u64().unwrap(),
                i["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    issues.sort();
    issues
}

async fn import(app: &TestApp, csv: &str, dry_run: bool) -> Value {
    let flag = if dry_run { "true" } else { "false" };
    let response = upload_with(app, csv, &[("dry_run", flag)]).await;
    assert!(response.status().is_success(), "{}", response.status());
    let body: Value = response.json().await.unwrap();
    app.wait_terminal(body["source_id"].as_str().unwrap(), Duration::from_secs(30))
        .await
}

#[tokio::test]
async fn a_dry_run_reports_what_the_import_would_and_writes_no_profile() {
    // Rows 1-5 in the request, the rest by workers.
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 5;
        s.ingest.chunk_rows = 7;
    })
    .await;
    let csv = checked_csv();
    let dry = import(&app, &csv, true).await;
    assert_eq!(dry["source_status"], "completed", "{dry}");
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(
        counts(&dry),
        [Some(40), Some(40), Some(36), Some(4), Some(4)],
        "{dry}"
    );
    assert!(
        app.collect(&app.dir_url("/profiles")).await.is_empty(),
        "a dry run wrote profiles"
    );
    let dry_id = dry["source_id"].as_str().unwrap();
    let dry_issues = issues_of(&app, dry_id).await;
    assert_eq!(dry_issues.len(), 8, "{dry_issues:?}");
    let failed_rows = app
        .get(&app.dir_url(&format!("/sources/{dry_id}/failed-rows")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(failed_rows.lines().count(), 1 + 4, "{failed_rows}");

    let real = import(&app, &csv, false).await;
    assert_eq!(real["dry_run"], false, "{real}");
    assert_eq!(
        counts(&real),
        counts(&dry),
        "the dry run's counts are the import's"
    );
    assert_eq!(
        issues_of(&app, real["source_id"].as_str().unwrap()).await,
        dry_issues
    );
    let profiles = app.collect(&app.dir_url("/profiles")).await.len();
    assert_eq!(profiles, 36);

    // Another dry run over the imported directory leaves it as it was.
    let again = import(&app, &csv, true).await;
    assert_eq!(again["source_status"], "completed", "{again}");
    assert_eq!(
        (again["accepted"].as_u64(), again["failed"].as_u64()),
        (Some(36), Some(4))
    );
    assert_eq!(app.collect(&app.dir_url("/profiles")).await.len(), profiles);
    assert_eq!(
        profile_of(&app, "d0@example.com").await["first_name"],
        "Ok0"
    );
}

#[tokio::test]
async fn dry_run_takes_true_or_false_and_is_part_of_the_idempotency_fingerprint() {
    let app = TestApp::spawn().await;
    let response = upload_with(&app, "email\na@example.com\n", &[("dry_run", "maybe")]).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let send = |dry_run: &'static str| {
        app.post(&app.upload_url())
            .header("idempotency-key", "dry-1")
            .multipart(upload_form(
                "email\na@example.com\n",
                &[("dry_run", dry_run)],
            ))
            .send()
    };
    let first = send("true").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let replay = send("true").await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    // The real import of the same bytes is not a replay of the dry run.
    let real = send("false").await.unwrap();
    assert_problem(
        real,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
}
