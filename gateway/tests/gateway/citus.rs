//! Orbit on Citus with a worker node down: only that node's directories wait. The stack is a
//! Citus schema, S3, RabbitMQ and two `orbit-worker` processes whatever `ORBIT_TEST_STACK`
//! says; the node is stopped and started with `deploy/citus.sh`, so this suite changes the
//! shared Citus cluster while it runs: no other test of this binary uses Citus in the pass
//! that runs it, and deploy/test.sh's Citus pass leaves it out.

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

use crate::common::*;
use orbit_testkit::services::DistributedStack;

const ROWS: usize = 200_000;
/// How long the node stays down.
const OUTAGE: Duration = Duration::from_secs(30);

/// Starts the stopped worker node again however the test ends, so that a failed assertion
/// does not leave the cluster broken for the next test.
struct NodeDown(u8);

impl NodeDown {
    fn stop(node: u8) -> Self {
        citus_sh(&["stop-worker", &node.to_string()]);
        NodeDown(node)
    }
}

impl Drop for NodeDown {
    fn drop(&mut self) {
        citus_sh(&["start-worker", &self.0.to_string()]);
    }
}

fn citus_sh(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/citus.sh");
    let status = Command::new("bash")
        .arg(script)
        .args(args)
        .status()
        .expect("bash runs");
    assert!(status.success(), "deploy/citus.sh {args:?} failed");
}

/// The port of the worker node holding `dir`'s shards.
async fn node_of(db: &mut PgConnection, dir: Uuid) -> i32 {
    sqlx::query(
        "SELECT nodeport FROM citus_shards
         WHERE table_name = 'sources'::regclass
           AND shardid = get_shard_id_for_distribution_column('sources', $1)",
    )
    .bind(dir)
    .fetch_one(&mut *db)
    .await
    .unwrap()
    .get(0)
}

fn upload_url(app: &TestApp, dir: Uuid) -> String {
    app.url(&format!(
        "/v2/organizations/{}/directories/{dir}/sources/csv-upload",
        app.tenant.org
    ))
}

fn source_url(app: &TestApp, dir: Uuid, source: &str) -> String {
    app.url(&format!(
        "/v2/organizations/{}/directories/{dir}/sources/{source}",
        app.tenant.org
    ))
}

async fn wait_completed(app: &TestApp, dir: Uuid, source: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = app.get_json(&source_url(app, dir, source)).await;
        if status == StatusCode::OK && body["source_status"] == "completed" {
            return body;
        }
        assert_ne!(body["source_status"], "failed", "{body}");
        assert!(
            Instant::now() < deadline,
            "not completed after {within:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_stops_only_its_directories() {
    let _alone = crate::chaos::FAULTS.write().await;
    let app = TestApp::spawn_on(Some(DistributedStack::citus().await), |s| {
        s.worker.reap_interval = Duration::from_millis(500);
    })
    .await;
    let url = app.stack.as_ref().unwrap().database.url.clone();
    let mut db = PgConnection::connect(&url).await.unwrap();
    let store = app.running().state.store.clone();

    // One directory on each worker node (9701 and 9702).
    let mut on = std::collections::BTreeMap::new();
    while on.len() < 2 {
        let dir = store
            .create_directory(app.tenant.org, "placed")
            .await
            .unwrap()
            .id;
        on.entry(node_of(&mut db, dir).await).or_insert(dir);
    }
    let (stays, stops) = (on[&9701], on[&9702]);

    let mut sources = Vec::new();
    for (dir, prefix) in [(stays, "stays"), (stops, "stops")] {
        let response = app
            .post(&upload_url(&app, dir))
            .multipart(file_form(contacts_csv(ROWS, prefix)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.unwrap();
        sources.push(body["source_id"].as_str().unwrap().to_owned());
    }
    // Mid-ingest: some of the second node's chunks are in.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = app.get_json(&source_url(&app, stops, &sources[1])).await;
        if body["processed_rows"].as_u64().unwrap_or(0) >= 20_000 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let down = NodeDown::stop(2);
    let stopped = Instant::now();
    // The other node's source completes while the node is down: the node stays down until
    // it has, for at least OUTAGE. (How soon it completes is the machine's, not the test's:
    // under the whole suite's load its last 10,000 rows once took longer than OUTAGE.)
    let done = wait_completed(&app, stays, &sources[0], Duration::from_secs(120)).await;
    assert_eq!(done["accepted"], ROWS, "{done}");
    // The stopped node's directory answers 503 with Retry-After, and a new upload into it
    // leaves nothing behind: no object, and its key is free for the retry below.
    let (status, body) = app.get_json(&source_url(&app, stops, &sources[1])).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "directory_unavailable", "{body}");
    let objects = app.stored_objects().await.len();
    let retried = || async {
        app.post(&upload_url(&app, stops))
            .header("Idempotency-Key", "after-the-outage")
            .multipart(file_form(contacts_csv(100, "retried")))
            .send()
            .await
            .unwrap()
    };
    let refused = retried().await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    assert_problem(
        refused,
        StatusCode::SERVICE_UNAVAILABLE,
        "directory_unavailable",
    )
    .await;
    assert_eq!(
        app.stored_objects().await.len(),
        objects,
        "the refused upload left its object"
    );

    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;
    drop(down);

    let done = wait_completed(&app, stops, &sources[1], Duration::from_secs(180)).await;
    assert_eq!(done["accepted"], ROWS, "{done}");
    // Waiting on the node counted no attempt: no chunk was tried more than once for good.
    let attempts: i64 = sqlx::query("SELECT MAX(attempts) FROM chunks WHERE directory_id = $1")
        .bind(stops)
        .fetch_one(&mut db)
        .await
        .unwrap()
        .get(0);
    if attempts > 1 {
        let rows = sqlx::query("SELECT idx, attempts, last_error, transient_since_ms FROM chunks WHERE directory_id = $1 AND attempts > 1")
            .bind(stops)
            .fetch_all(&mut db)
            .await
            .unwrap();
        for r in rows {
            eprintln!(
                "chunk {} attempts {} error {:?} transient {:?}",
                r.get::<i64, _>(0),
                r.get::<i64, _>(1),
                r.get::<Option<String>, _>(2),
                r.get::<Option<i64>, _>(3)
            );
        }
    }
    assert!(attempts <= 1, "a chunk counted {attempts} attempts");
    // Exact counts, and no identity in two profiles: every row's email is its own profile.
    for dir in [stays, stops] {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM profiles WHERE directory_id = $1),
                    (SELECT COUNT(DISTINCT profile_id) FROM identities WHERE directory_id = $1 AND kind = 0),
                    (SELECT COUNT(*) FROM identities WHERE directory_id = $1 AND kind = 0)",
        )
        .bind(dir)
        .fetch_one(&mut db)
        .await
        .unwrap();
        let (profiles, owners, emails): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            (profiles, owners, emails),
            (ROWS as i64, ROWS as i64, ROWS as i64)
        );
    }
    // The upload refused during the outage goes through once now, under the same key.
    for replayed in [false, true] {
        let response = retried().await;
        assert!(response.status().is_success(), "{}", response.status());
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["is_idempotent"], replayed, "{body}");
        assert_eq!(body["accepted"], 100, "{body}");
    }
}
