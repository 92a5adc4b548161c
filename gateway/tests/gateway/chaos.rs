//! Failure tests on the distributed stack (PostgreSQL, S3, RabbitMQ, orbit-worker processes):
//! a worker killed mid-chunk (and how soon its chunks are taken over), a worker frozen past its
//! lease, a broker restart and a PostgreSQL restart during an ingest. Each upload must still
//! complete with exact counts and no duplicate profile.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;

const ROWS: usize = 12_000;

/// Tests hold it shared; the PostgreSQL restart and the Citus node outage (`crate::citus`, a
/// heavy ingest that would starve the frozen worker's takeover) hold it alone.
pub(crate) static FAULTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A gateway on a fresh distributed stack with small chunks and a short lease, and no worker yet.
async fn stack_app() -> TestApp {
    stack_app_with(Duration::from_secs(3)).await
}

async fn stack_app_with(lease: Duration) -> TestApp {
    distributed_app(|s| {
        // Several slices per chunk, so a kill lands between two of them as often as inside one.
        s.worker.slice_rows = 150;
        s.worker.lease = lease;
    })
    .await
}

fn add_worker(app: &mut TestApp) {
    let worker = spawn_worker(app.stack.as_ref().unwrap(), &app.settings);
    app.workers.push(worker);
}

/// [`add_worker`], serving its metrics: the base URL of its `/metrics`.
async fn add_watched_worker(app: &mut TestApp) -> String {
    let (worker, url) =
        spawn_worker_serving_metrics(app.stack.as_ref().unwrap(), &app.settings).await;
    app.workers.push(worker);
    url
}

/// The sum of `series` in a worker's metrics `text`; 0 for a series that is absent.
fn sum(text: &str, series: &[&str]) -> f64 {
    series.iter().map(|s| metric(text, s).unwrap_or(0.0)).sum()
}

/// Chunks a worker took over from a process that stopped heartbeating.
const OWNER_DEAD: &str = r#"orbit_leases_taken_over_total{reason="owner_dead"}"#;
/// Every way a worker takes a chunk over: from a dead owner, or after a lease expired.
const TAKEN_OVER: [&str; 2] = [
    OWNER_DEAD,
    r#"orbit_leases_taken_over_total{reason="expired"}"#,
];

/// Polls a worker's metrics until `series` add up to at least 1, for up to `within`; `what`
/// says what never happened.
async fn wait_worker_counts(
    app: &TestApp,
    url: &str,
    series: &[&str],
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        let text = worker_metrics(app, url).await;
        if sum(&text, series) >= 1.0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    let _shared = FAULTS.read().await;
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
    let _shared = FAULTS.read().await;
    let mut app = stack_app().await;
    let frozen = add_watched_worker(&mut app).await;
    let other = add_watched_worker(&mut app).await;
    let source = upload(&app, "freeze").await;
    wait_processed_over(&app, &source, 1).await;
    // Frozen while it holds a chunk, so that there is a lease to lose and one to take over.
    wait_worker_counts(
        &app,
        &frozen,
        &["orbit_chunks_in_flight"],
        Duration::from_secs(30),
        "the worker to freeze took no chunk",
    )
    .await;
    let pid = app.workers[0].id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    // Past the 3 s lease the other worker takes the frozen one's chunk over, and shows it in
    // its metrics. (A worker thawed before anyone took its chunk would simply renew.) Frozen
    // inside a slice's commit, the worker holds the chunk's row until PostgreSQL ends its
    // session: the statement after `database.commit_statement_timeout` (10 s), the idle
    // transaction after `database.idle_in_transaction_timeout` (30 s); only then can a
    // reaper's pass republish the chunk. On a loaded machine that took over 60 s once.
    wait_worker_counts(
        &app,
        &other,
        &TAKEN_OVER,
        Duration::from_secs(120),
        "the other worker took no chunk over",
    )
    .await;
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    assert_exact(&app, &source).await;
    // The source can complete before the thawed worker has got as far as its renewal or its
    // commit: give it the time.
    wait_worker_counts(
        &app,
        &frozen,
        &["orbit_leases_lost_total"],
        Duration::from_secs(30),
        "the frozen worker never counted its lost lease",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_during_an_ingest_loses_nothing() {
    let _shared = FAULTS.read().await;
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
    let _shared = FAULTS.read().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_chunks_are_taken_over_long_before_its_lease_ends() {
    let _shared = FAULTS.read().await;
    // A lease as long as the default: only the dead worker's silence can explain a takeover
    // within the bound below.
    let mut app = stack_app_with(Duration::from_secs(60)).await;
    add_worker(&mut app);
    let source = upload(&app, "sigkill").await;
    wait_processed_over(&app, &source, 1).await;
    app.workers[0].kill().await.unwrap();
    let killed = Instant::now();
    let heir = add_watched_worker(&mut app).await;
    assert_exact(&app, &source).await;
    let took = killed.elapsed();
    let heirs = worker_metrics(&app, &heir).await;
    assert!(
        sum(&heirs, &[OWNER_DEAD]) >= 1.0,
        "the takeover of the dead worker's chunks is not in the metrics:\n{heirs}"
    );
    eprintln!("completed {took:?} after the SIGKILL");
    assert!(
        took < Duration::from_secs(40),
        "the source completed {took:?} after its worker was killed: its chunks waited for the 60 s lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_during_an_ingest_loses_nothing() {
    // Every other fault test here talks to the same server: none runs while it restarts.
    let _alone = FAULTS.write().await;
    let mut app = stack_app_with(Duration::from_secs(60)).await;
    add_worker(&mut app);
    add_worker(&mut app);
    let source = upload(&app, "pgrestart").await;
    wait_processed_over(&app, &source, 1).await;
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .expect("a cluster version");
    let restarted = Instant::now();
    let status = std::process::Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "fast",
        ])
        .status()
        .expect("pg_ctlcluster runs");
    assert!(status.success(), "pg_ctlcluster restart");
    assert_exact(&app, &source).await;
    let took = restarted.elapsed();
    eprintln!("completed {took:?} after the restart began");
    assert!(
        took < Duration::from_secs(60),
        "the source completed {took:?} after a PostgreSQL restart: work waited for leases"
    );
}

/// A worker that reads the object store through `proxy`, with `extra` settings.
fn add_proxied_worker(app: &mut TestApp, proxy: &Proxy, extra: &[(&str, &str)]) {
    let mut env = vec![("ORBIT__OBJECT_STORE__ENDPOINT", proxy.url.as_str())];
    env.extend_from_slice(extra);
    let worker = spawn_worker_with(app.stack.as_ref().unwrap(), &app.settings, &env);
    app.workers.push(worker);
}

/// Still processing, and saying why it makes no progress: since when it has been retrying
/// (the same time at every look, as the outage is one run of failures) and the last error.
async fn assert_still_retrying(app: &TestApp, source: &str) -> Value {
    let body = app.source(source).await;
    assert_eq!(body["source_status"], "processing", "{body}");
    let retrying = &body["retrying"];
    assert!(
        retrying["since"].is_string()
            && retrying["message"]
                .as_str()
                .is_some_and(|m| m.contains("object store")),
        "{body}"
    );
    retrying["since"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_outage_of_90_seconds_costs_no_import() {
    let _shared = FAULTS.read().await;
    let mut app = stack_app().await;
    let proxy = Proxy::start(
        app.settings.object_store.endpoint.as_deref().unwrap(),
        Fault::None,
    )
    .await;
    // The upload goes to the object store directly; the worker reads through the proxy, which
    // is down from before its first read until 90 s later. Five attempts, each failing, would
    // poison the source in well under a minute if outages counted.
    let source = upload(&app, "outage").await;
    proxy.set_up(false);
    add_proxied_worker(&mut app, &proxy, &[]);
    tokio::time::sleep(Duration::from_secs(45)).await;
    let since = assert_still_retrying(&app, &source).await;
    tokio::time::sleep(Duration::from_secs(45)).await;
    assert_eq!(assert_still_retrying(&app, &source).await, since);
    proxy.set_up(true);
    assert_exact(&app, &source).await;
    let done = app.source(&source).await;
    assert!(done.get("retrying").is_none(), "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_source_resumed_completes_exactly() {
    let _shared = FAULTS.read().await;
    let mut app = stack_app().await;
    let proxy = Proxy::start(
        app.settings.object_store.endpoint.as_deref().unwrap(),
        Fault::None,
    )
    .await;
    let source = upload(&app, "resume").await;
    // Failures count from the first one here, so the outage poisons the source quickly.
    proxy.set_up(false);
    add_proxied_worker(
        &mut app,
        &proxy,
        &[
            ("ORBIT__WORKER__TRANSIENT_RETRY_FOR", "0s"),
            ("ORBIT__WORKER__MAX_ATTEMPTS", "2"),
        ],
    );
    let failed = app.wait_terminal(&source, Duration::from_secs(120)).await;
    assert_eq!(failed["source_status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "chunk_poisoned", "{failed}");
    proxy.set_up(true);
    let retry_url = app.dir_url(&format!("/sources/{source}/retry"));
    let response = app.post(&retry_url).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["source_status"], "processing", "{body}");
    assert!(body.get("error").is_none(), "{body}");
    assert_exact(&app, &source).await;
    // Completed now: nothing left to retry.
    let again = app.post(&retry_url).send().await.unwrap();
    assert_eq!(again.status(), reqwest::StatusCode::CONFLICT);
    let problem: Value = again.json().await.unwrap();
    assert_eq!(problem["code"], "source_not_failed");
}
