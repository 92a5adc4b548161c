//! Failure tests on the distributed stack (PostgreSQL, S3, RabbitMQ, orbit-worker processes):
//! a worker killed mid-chunk, a worker frozen past its lease, and a broker restart during an
//! ingest. Each upload must still complete with exact counts and no duplicate profile.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use orbit_gateway::app;
use orbit_shared::testing::DistributedStack;
use serde_json::Value;

const ROWS: usize = 12_000;

/// A gateway on a fresh distributed stack with small chunks and a short lease, and no worker yet.
async fn stack_app() -> TestApp {
    let data = tempfile::tempdir().unwrap();
    let mut settings = test_settings(data.path());
    settings.ingest.sync_rows = 0;
    settings.ingest.chunk_rows = 1000;
    settings.worker.lease = Duration::from_secs(3);
    let stack = DistributedStack::create().await;
    stack.apply(&mut settings);
    settings.database.max_connections = 5;
    app::connect(&settings)
        .await
        .unwrap()
        .store
        .migrate()
        .await
        .unwrap();
    let running = app::start(settings.clone()).await.unwrap();
    let tenant = new_tenant(&running).await;
    TestApp {
        base: format!("http://{}", running.addr),
        client: reqwest::Client::new(),
        settings,
        running: Some(running),
        tenant,
        data,
        workers: Vec::new(),
        stack: Some(stack),
    }
}

fn add_worker(app: &mut TestApp) {
    let worker = spawn_worker(app.stack.as_ref().unwrap(), &app.settings);
    app.workers.push(worker);
}

async fn wait_processed_over(app: &TestApp, source: &str, rows: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = app.source(source).await;
        let processed = body["processed_rows"].as_u64().unwrap();
        assert!(
            processed < ROWS as u64,
            "finished before the fault could be injected: {body}"
        );
        if processed >= rows {
            return;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn assert_exact(app: &TestApp, source: &str) {
    let done = app.wait_terminal(source, Duration::from_secs(180)).await;
    assert_eq!(done["source_status"], "completed", "{done}");
    assert_eq!(done["accepted"], ROWS);
    assert_eq!(done["failed"], 0);
    assert_eq!(done["processed_rows"], ROWS);
    assert_eq!(done["warnings"], 0);
    let profiles = app.collect(&app.dir_url("/profiles")).await;
    assert_eq!(profiles.len(), ROWS);
    let emails: HashSet<&str> = profiles
        .iter()
        .map(|p| p["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails.len(), ROWS);
}

async fn upload(app: &TestApp, prefix: &str) -> String {
    let body: Value = app.upload_ok(contacts_csv(ROWS, prefix)).await;
    body["source_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_chunk_loses_nothing() {
    let mut app = stack_app().await;
    add_worker(&mut app);
    let source = upload(&app, "kill").await;
    wait_processed_over(&app, &source, 1).await;
    app.workers[0].kill().await.unwrap();
    add_worker(&mut app);
    add_worker(&mut app);
    assert_exact(&app, &source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_lease_is_fenced() {
    let mut app = stack_app().await;
    add_worker(&mut app);
    add_worker(&mut app);
    let source = upload(&app, "freeze").await;
    wait_processed_over(&app, &source, 1).await;
    let pid = app.workers[0].id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    // Past the 3 s lease: the other worker takes the frozen one's chunk over.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    assert_exact(&app, &source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_an_ingest_loses_nothing() {
    let mut app = stack_app().await;
    add_worker(&mut app);
    add_worker(&mut app);
    let source = upload(&app, "broker").await;
    wait_processed_over(&app, &source, 1).await;
    for step in ["stop_app", "start_app"] {
        let status = std::process::Command::new("rabbitmqctl")
            .arg(step)
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success(), "rabbitmqctl {step}");
    }
    assert_exact(&app, &source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_and_others_finish() {
    let mut app = stack_app().await;
    add_worker(&mut app);
    let source = upload(&app, "term").await;
    wait_processed_over(&app, &source, 1).await;
    let pid = app.workers[0].id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(Duration::from_secs(30), app.workers[0].wait())
        .await
        .expect("the worker exits once its chunks are done")
        .unwrap();
    assert!(status.success(), "{status:?}");
    add_worker(&mut app);
    assert_exact(&app, &source).await;
}
