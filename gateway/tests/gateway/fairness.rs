//! Fair shares across organizations (issue 24, docs/concurrency.md "Fair shares"): one
//! organization's backlog does not hold up another's upload, and weights set the shares. Runs
//! on the embedded stack, and on the distributed one with `ORBIT_TEST_STACK=distributed`.

use std::time::{Duration, Instant};

use crate::common::*;
use reqwest::StatusCode;
use serde_json::Value;

/// Rows per chunk: small enough that a backlog of 100 chunks uploads in a moment, large enough
/// that a chunk's work, not an upload's, is what a waiting tenant waits for.
const CHUNK_ROWS: u64 = 1_000;

fn settings(s: &mut orbit_config::Settings) {
    s.ingest.sync_rows = 0;
    s.ingest.chunk_rows = CHUNK_ROWS;
    // One chunk at a time per worker: a chunk that shared a worker with three others would
    // take four times as long, whatever the order chunks are taken in.
    s.worker.concurrency = 1;
}

async fn upload_as(app: &TestApp, tenant: &Tenant, csv: String) -> String {
    let url = app.url(&format!(
        "/v2/organizations/{}/directories/{}/sources/csv-upload",
        tenant.org, tenant.dir
    ));
    let response = app
        .client
        .post(url)
        .bearer_auth(&tenant.token)
        .multipart(file_form(csv))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::CREATED,
        "{status}: {body}"
    );
    body["source_id"].as_str().unwrap().to_owned()
}

async fn status_of(app: &TestApp, tenant: &Tenant, source: &str) -> Value {
    let url = app.url(&format!(
        "/v2/organizations/{}/directories/{}/sources/{source}",
        tenant.org, tenant.dir
    ));
    let response = app
        .client
        .get(url)
        .bearer_auth(&tenant.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// Uploads `csv` as `tenant` and polls (closely, so the poll does not blur the figure) until
/// the source completes: how long that took, and the status at the end.
async fn time_to_complete(app: &TestApp, tenant: &Tenant, csv: String) -> (Duration, Value) {
    let started = Instant::now();
    let source = upload_as(app, tenant, csv).await;
    loop {
        let status = status_of(app, tenant, &source).await;
        match status["source_status"].as_str() {
            Some("completed") => return (started.elapsed(), status),
            Some("failed") => panic!("the upload failed: {status}"),
            _ => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not completed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_backlog_of_one_organization_does_not_hold_up_another_organizations_upload() {
    let app = TestApp::spawn_with(settings).await;
    let file = || contacts_csv(2 * CHUNK_ROWS as usize, "b");
    // The same two-chunk file, on the idle stack.
    let idle_tenant = app.another_tenant().await;
    let (idle, _) = time_to_complete(&app, &idle_tenant, file()).await;

    // Organization A queues 120 chunks, then B uploads the same two-chunk file.
    let backlog = upload_as(
        &app,
        &app.tenant,
        contacts_csv(120 * CHUNK_ROWS as usize, "a"),
    )
    .await;
    let busy_tenant = app.another_tenant().await;
    let (busy, done) = time_to_complete(&app, &busy_tenant, file()).await;
    assert_eq!(done["accepted"], 2 * CHUNK_ROWS, "{done}");
    let behind = status_of(&app, &app.tenant, &backlog).await;
    let ratio = busy.as_secs_f64() / idle.as_secs_f64();
    eprintln!("two chunks: {idle:?} idle, {busy:?} behind a backlog of 120 ({ratio:.2}x); the backlog then at {} of {} rows", behind["processed_rows"], behind["total_rows"]);
    assert_ne!(
        behind["source_status"], "completed",
        "the backlog was gone before B's upload completed, so this measured nothing: {behind}"
    );
    assert!(
        ratio <= 3.0,
        "B's upload took {busy:?} behind A's backlog, {ratio:.2}x the {idle:?} it takes on an idle stack"
    );
}
