//! Recovery without workers and the metrics of failures, on the distributed stack (PostgreSQL,
//! S3, RabbitMQ): a chunk whose publish failed while the broker was down is published again
//! by the gateway's own reaper and completes once a worker starts (scale to zero is safe); a
//! poisoned chunk and a missing object show in the worker's and the gateway's metrics; dead
//! letters are counted, and `orbit-gateway admin replay-dead-letters` moves them back.

use std::time::{Duration, Instant};

use crate::common::*;
use orbit_testkit::{amqp_url, spawn_worker_with_metrics};
use serde_json::Value;

fn value(text: &str, series: &str) -> f64 {
    metric(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Polls the gateway's metrics until `accept` holds for `series`.
async fn wait_metric(app: &TestApp, series: &str, accept: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = app.metrics().await;
        if metric(&text, series).is_some_and(&accept) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never as expected:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn upload(app: &TestApp, rows: usize, prefix: &str) -> String {
    let body = app.upload_ok(contacts_csv(rows, prefix)).await;
    assert_eq!(body["source_status"], "pending", "{body}");
    body["source_id"].as_str().unwrap().to_owned()
}

/// The worker's environment: the stack's, a quick reaper, and `extra`.
fn worker_env(app: &TestApp, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = app.stack.as_ref().unwrap().env();
    env.push(("ORBIT__WORKER__REAP_INTERVAL".into(), "200ms".into()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_to_zero_a_chunk_whose_publish_failed_completes_once_a_worker_starts() {
    // The gateway reaches RabbitMQ through a proxy that can be cut; workers connect directly.
    let broker_url = url::Url::parse(&amqp_url()).unwrap();
    let broker = Proxy::start(
        &format!(
            "{}:{}",
            broker_url.host_str().unwrap(),
            broker_url.port().unwrap_or(5672)
        ),
        Fault::None,
    )
    .await;
    let mut proxied = broker_url.clone();
    let proxy_addr = url::Url::parse(&broker.url).unwrap();
    proxied.set_port(proxy_addr.port()).unwrap();
    let mut app = distributed_app(|s| {
        s.queue.url = proxied.to_string().parse().unwrap();
        s.queue.reconnect_timeout = Duration::from_secs(2);
    })
    .await;
    let failures = r#"orbit_publish_failures_total{publisher="upload"}"#;
    let before = app.metrics().await;
    let (failed_before, republished_before) = (
        metric(&before, failures).unwrap_or(0.0),
        metric(&before, "orbit_reaper_republishes_total").unwrap_or(0.0),
    );

    // The broker goes down during the upload: the upload is recorded, its publish fails.
    broker.set_up(false);
    let source = upload(&app, 500, "zero").await;
    let during = app.metrics().await;
    assert_eq!(value(&during, failures), failed_before + 1.0, "{during}");
    assert_eq!(value(&during, "orbit_chunks_open"), 1.0, "{during}");

    // The broker is back and no worker runs: the gateway's reaper publishes the chunk.
    broker.set_up(true);
    let published = wait_metric(&app, "orbit_queue_depth", |v| v == 1.0).await;
    assert!(
        value(&published, "orbit_reaper_republishes_total") > republished_before,
        "{published}"
    );
    assert_eq!(value(&published, "orbit_chunks_open"), 1.0, "{published}");
    assert_eq!(app.source(&source).await["source_status"], "pending");

    // A worker starts (scaled up from zero) and finishes it.
    let (worker, _) = spawn_worker_with_metrics(&worker_binary(), &worker_env(&app, &[])).await;
    app.workers.push(worker);
    let done = app.wait_terminal(&source, Duration::from_secs(60)).await;
    assert_eq!(done["source_status"], "completed", "{done}");
    assert_eq!(done["accepted"], 500, "{done}");
    let after = app.metrics().await;
    assert_eq!(value(&after, "orbit_chunks_open"), 0.0, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_chunk_and_a_missing_object_move_their_metrics() {
    let mut app = distributed_app(|_| {}).await;
    let poisoned = upload(&app, 500, "poison").await;
    let missing = upload(&app, 500, "missing").await;
    let blobs = app.running().state.blobs.clone();
    let key =
        |source: &str| orbit_adapters::blob::object_key(app.tenant.org, source.parse().unwrap());
    // One row fewer in the same number of bytes: the chunk no longer matches what the upload
    // recorded, a permanent failure. The other file is gone altogether.
    let mut corrupt = contacts_csv(500, "poison").into_bytes();
    // The line break before the last row: the two last rows become one.
    let last_break = corrupt[..corrupt.len() - 1]
        .iter()
        .rposition(|b| *b == b'\n')
        .unwrap();
    corrupt[last_break] = b' ';
    let mut writer = blobs.begin(&key(&poisoned)).await.unwrap();
    writer.write(corrupt.into()).await.unwrap();
    writer.finish().await.unwrap();
    blobs.delete(&key(&missing)).await.unwrap();
    // A code outside the known set, as a later version might write: counted as `other`.
    let odd = upload(&app, 10, "odd").await;
    let error = orbit_core::model::SourceError {
        code: "made_up_code".into(),
        message: "for the test".into(),
    };
    let store = app.running().state.store.clone();
    store
        .fail_source(app.tenant.dir, odd.parse().unwrap(), error)
        .await
        .unwrap();

    let (worker, worker_url) = spawn_worker_with_metrics(
        &worker_binary(),
        &worker_env(&app, &[("ORBIT__WORKER__MAX_ATTEMPTS", "2")]),
    )
    .await;
    app.workers.push(worker);
    for (source, code) in [(&poisoned, "chunk_poisoned"), (&missing, "object_missing")] {
        let done = app.wait_terminal(source, Duration::from_secs(60)).await;
        assert_eq!(done["source_status"], "failed", "{done}");
        assert_eq!(done["error"]["code"], code, "{done}");
    }
    let gateway = app.metrics().await;
    for (series, expected) in [
        (r#"orbit_sources_failed{code="chunk_poisoned"}"#, 1.0),
        (r#"orbit_sources_failed{code="object_missing"}"#, 1.0),
        (r#"orbit_sources_failed{code="row_count_mismatch"}"#, 0.0),
        (r#"orbit_sources_failed{code="other"}"#, 1.0),
        (r#"orbit_sources{status="failed"}"#, 3.0),
    ] {
        assert_eq!(value(&gateway, series), expected, "{series}\n{gateway}");
    }
    assert!(!gateway.contains("made_up_code"), "{gateway}");
    // The worker process saw two failed attempts, then found the chunk out of attempts.
    let worker = worker_metrics(&app, &worker_url).await;
    assert_eq!(
        value(&worker, "orbit_chunks_poisoned_total"),
        1.0,
        "{worker}"
    );
    assert_eq!(
        value(&worker, r#"orbit_chunk_failures_total{kind="permanent"}"#),
        2.0,
        "{worker}"
    );
    let build = format!(
        r#"orbit_build_info{{commit="{}",version="{}"}}"#,
        env!("ORBIT_COMMIT"),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&worker, &build), 1.0, "{worker}");
    assert!(
        value(&worker, "process_resident_memory_bytes") > 0.0,
        "{worker}"
    );
}

/// Runs `orbit-gateway admin replay-dead-letters` on the stack with `args`.
async fn replay(app: &TestApp, args: &[&str]) -> (bool, Value, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_orbit-gateway"))
        .envs(app.stack.as_ref().unwrap().env())
        .env_remove("ORBIT_CONFIG")
        .args(["admin", "replay-dead-letters"])
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    (
        out.status.success(),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_counted_and_replayed() {
    let mut app = distributed_app(|_| {}).await;
    let source = upload(&app, 1500, "dead").await;
    wait_metric(&app, "orbit_queue_depth", |v| v == 2.0).await;
    // Both chunk messages are dead-lettered, as a broker does past the delivery limit, and a
    // message that is no chunk message lands there too.
    let queue = &app.stack.as_ref().unwrap().queue;
    assert!(queue.dead_letter_next().await);
    assert!(queue.dead_letter_next().await);
    queue.publish_dead_letter(b"not a chunk message").await;
    let dead = wait_metric(&app, "orbit_dead_letters", |v| v == 3.0).await;
    assert_eq!(value(&dead, "orbit_queue_depth"), 0.0, "{dead}");

    let (ok, first, stderr) = replay(&app, &["--limit", "1"]).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        first,
        serde_json::json!({"replayed": 1, "kept": 0, "dead_letters_left": 2})
    );
    let (ok, rest, stderr) = replay(&app, &[]).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        rest,
        serde_json::json!({"replayed": 1, "kept": 1, "dead_letters_left": 1})
    );
    wait_metric(&app, "orbit_queue_depth", |v| v == 2.0).await;
    wait_metric(&app, "orbit_dead_letters", |v| v == 1.0).await;

    // The replayed messages are what the workers need: the source completes.
    let (worker, _) = spawn_worker_with_metrics(&worker_binary(), &worker_env(&app, &[])).await;
    app.workers.push(worker);
    let done = app.wait_terminal(&source, Duration::from_secs(60)).await;
    assert_eq!(done["source_status"], "completed", "{done}");
    assert_eq!(done["accepted"], 1500, "{done}");

    let (ok, _, stderr) = replay(&app, &["--limit", "0"]).await;
    assert!(!ok && stderr.contains("--limit"), "{stderr}");
}

#[tokio::test]
async fn the_embedded_queue_has_no_dead_letters_to_replay() {
    let data = tempfile::tempdir().unwrap();
    let command = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_orbit-gateway"));
        command
            .env(
                "ORBIT__DATABASE__URL",
                format!("sqlite://{}/orbit.db", data.path().display()),
            )
            .env(
                "ORBIT__OBJECT_STORE__URL",
                format!("file://{}/objects", data.path().display()),
            )
            .env_remove("ORBIT_CONFIG")
            .args(args);
        command
    };
    // Admin commands need the database a gateway made; `migrate` makes it here.
    assert!(command(&["migrate"])
        .output()
        .await
        .unwrap()
        .status
        .success());
    let out = command(&["admin", "replay-dead-letters"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no dead-letter queue"), "{stderr}");
    assert!(out.stdout.is_empty());
}
