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
