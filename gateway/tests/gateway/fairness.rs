//! Fair shares across organizations (issue 24, docs/concurrency.md "Fair shares"): one
//! organization's backlog does not hold up another's upload, and weights set the shares. Runs
//! on the embedded stack, and on the distributed one with `ORBIT_TEST_STACK=distributed`.

use std::time::{Duration, Instant};

use crate::common::*;
use orbit_gateway::admin::{self, LimitValue, SetLimits};
use reqwest::StatusCode;
use serde_json::Value;

/// Rows per chunk of the latency test: small enough that a backlog of 100 chunks uploads in a
/// few seconds, large enough that a chunk's work, not an upload's fixed cost, is what a
/// waiting tenant waits for (so the figure measures the order of chunks, not the machine).
const CHUNK_ROWS: u64 = 2_000;
/// Held by each test here: both load the machine, and each measures it.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Rows per chunk of the weights test, which counts rows and can take many small chunks.
const SMALL_CHUNK_ROWS: u64 = 500;

fn settings(chunk_rows: u64) -> impl FnOnce(&mut orbit_config::Settings) {
    move |s| {
        s.ingest.sync_rows = 0;
        s.ingest.chunk_rows = chunk_rows;
        // One chunk at a time per worker: a chunk that shared a worker with three others
        // would take four times as long, whatever the order chunks are taken in.
        s.worker.concurrency = 1;
    }
}

/// Uploads `csv` as `tenant`, asserting it is accepted; its source id.
async fn accepted_upload(app: &TestApp, tenant: &Tenant, csv: String) -> String {
    let response = app.upload_as(tenant, csv).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::CREATED,
        "{status}: {body}"
    );
    body["source_id"].as_str().unwrap().to_owned()
}

/// Uploads `csv` as `tenant` and polls (closely, so the poll does not blur the figure) until
/// the source completes: how long that took, and the status at the end.
async fn time_to_complete(app: &TestApp, tenant: &Tenant, csv: String) -> (Duration, Value) {
    let started = Instant::now();
    let source = accepted_upload(app, tenant, csv).await;
    loop {
        let status = app.source_as(tenant, &source).await;
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
    let _alone = ALONE.lock().await;
    let app = TestApp::spawn_with(settings(CHUNK_ROWS)).await;
    let file = || contacts_csv(2 * CHUNK_ROWS as usize, "b");
    // The same two-chunk file, on the idle stack.
    let idle_tenant = app.another_tenant().await;
    let (idle, _) = time_to_complete(&app, &idle_tenant, file()).await;

    // Organization A queues 100 chunks, then B uploads the same two-chunk file.
    let backlog = accepted_upload(
        &app,
        &app.tenant,
        contacts_csv(100 * CHUNK_ROWS as usize, "a"),
    )
    .await;
    let busy_tenant = app.another_tenant().await;
    let (busy, done) = time_to_complete(&app, &busy_tenant, file()).await;
    assert_eq!(done["accepted"], 2 * CHUNK_ROWS, "{done}");
    let behind = app.source(&backlog).await;
    let ratio = busy.as_secs_f64() / idle.as_secs_f64();
    eprintln!("two chunks: {idle:?} idle, {busy:?} behind a backlog of 100 ({ratio:.2}x); the backlog then at {} of {} rows", behind["processed_rows"], behind["total_rows"]);
    assert_ne!(
        behind["source_status"], "completed",
        "the backlog was gone before B's upload completed, so this measured nothing: {behind}"
    );
    // Counted, not timed (the time ratio is orbit-bench's `fairness` figure, on a quiet
    // machine): first come, first served would finish all 100 of A's chunks before B's two;
    // fair shares interleave them, so A gets a few chunks in, whatever the machine's speed.
    let ahead = behind["processed_rows"].as_u64().unwrap() / CHUNK_ROWS;
    assert!(
        ahead <= 10,
        "{ahead} of A's 100 chunks went before B's 2 ({busy:?} behind the backlog, {ratio:.2}x the {idle:?} on an idle stack)"
    );
}

/// Rows processed of each source, once.
async fn processed(app: &TestApp, of: &[(&Tenant, &str)]) -> Vec<u64> {
    let mut rows = Vec::new();
    for (tenant, source) in of {
        let status = app.source_as(tenant, source).await;
        assert_ne!(
            status["source_status"], "completed",
            "a backlog ran out while both should be waiting: {status}"
        );
        rows.push(status["processed_rows"].as_u64().unwrap());
    }
    rows
}

#[tokio::test]
async fn organizations_waiting_together_are_served_in_proportion_to_their_weights() {
    let _alone = ALONE.lock().await;
    let app = TestApp::spawn_with(settings(SMALL_CHUNK_ROWS)).await;
    let heavy = app.another_tenant().await;
    let set = SetLimits {
        weight: Some(LimitValue(Some(3))),
        ..SetLimits::default()
    };
    let store = &*app.running().state.store;
    admin::set_limits(store, &app.settings.tenants, heavy.org, set)
        .await
        .unwrap();
    // The heavier organization's backlog first (it is the larger), then the other's: from
    // the moment both are queued, both wait for the whole measurement.
    let chunks = |n: u64| contacts_csv((n * SMALL_CHUNK_ROWS) as usize, "w");
    let heavy_source = accepted_upload(&app, &heavy, chunks(240)).await;
    let light_source = accepted_upload(&app, &app.tenant, chunks(80)).await;
    let sources = [
        (&heavy, heavy_source.as_str()),
        (&app.tenant, light_source.as_str()),
    ];
    let start = processed(&app, &sources).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (heavy_done, light_done) = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = processed(&app, &sources).await;
        let done = (now[0] - start[0], now[1] - start[1]);
        if done.1 >= 30 * SMALL_CHUNK_ROWS {
            break done;
        }
        assert!(Instant::now() < deadline, "too slow: {done:?} rows");
    };
    let ratio = heavy_done as f64 / light_done as f64;
    eprintln!(
        "weights 3 and 1: {heavy_done} and {light_done} rows done while both waited ({ratio:.2}:1)"
    );
    assert!(
        (2.4..=3.6).contains(&ratio),
        "weights 3 and 1 got {heavy_done} and {light_done} rows, {ratio:.2}:1"
    );
}
