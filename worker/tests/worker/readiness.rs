//! `orbit-worker`'s `/healthz` and `/readyz` on `worker.metrics_listen`, as an orchestrator
//! probes them: ready on a working stack, not ready (503 problem+json naming the object store)
//! when its bucket does not exist or its S3 endpoint does not answer, while `/healthz` still
//! says the process is up. Runs the real binary against PostgreSQL, S3 and RabbitMQ.

use std::path::Path;

use orbit_testkit::{spawn_worker_with_metrics, DistributedStack};
use serde_json::Value;
use tokio::process::Child;

const BIN: &str = env!("CARGO_BIN_EXE_orbit-worker");

/// Starts a worker with `env` plus `overrides`; returns it with its metrics listener's URL.
async fn start_worker(env: &[(String, String)], overrides: &[(&str, String)]) -> (Child, String) {
    let mut env = env.to_vec();
    env.push(("ORBIT__WORKER__CONCURRENCY".into(), "1".into()));
    env.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.clone())));
    spawn_worker_with_metrics(Path::new(BIN), &env).await
}

async fn get(url: String) -> (u16, String, Value) {
    let response = reqwest::get(url).await.expect("request sent");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.text().await.unwrap();
    (
        status,
        content_type,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn assert_not_ready_on_object_store(base: &str, reason: &str) {
    let (status, content_type, body) = get(format!("{base}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["code"], "not_ready", "{body}");
    assert_eq!(body["status"], 503, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("object store (s3): ") && detail.contains(reason),
        "{detail}"
    );
    assert!(
        !detail.contains("database") && !detail.contains("queue"),
        "{detail}"
    );
    let (status, _, _) = get(format!("{base}/healthz")).await;
    assert_eq!(status, 200, "the process itself is up");
}

#[tokio::test]
async fn readyz_checks_the_database_the_object_store_and_the_broker() {
    let stack = DistributedStack::create().await;
    orbit_store::open(&orbit_config::DatabaseSettings::for_url(
        &stack.database.url,
        2,
    ))
    .await
    .expect("database opens")
    .migrate()
    .await
    .expect("migrations");
    let env = stack.env();

    let (mut ready, base) = start_worker(&env, &[]).await;
    let (status, _, body) = get(format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready");
    assert_eq!(
        [&body["database"], &body["object_store"], &body["queue"]],
        ["postgres", "s3", "rabbitmq"]
    );

    // A bucket nobody created.
    let missing = format!("orbit-test-missing-{}", uuid::Uuid::new_v4().simple());
    let (mut no_bucket, base) = start_worker(
        &env,
        &[("ORBIT__OBJECT_STORE__URL", format!("s3://{missing}"))],
    )
    .await;
    assert_not_ready_on_object_store(&base, &format!("bucket \"{missing}\"")).await;
    assert_not_ready_on_object_store(&base, "does not exist").await;

    // An S3 endpoint where nothing listens (port 1 on loopback).
    let (mut no_server, base) = start_worker(
        &env,
        &[(
            "ORBIT__OBJECT_STORE__ENDPOINT",
            "http://127.0.0.1:1".to_owned(),
        )],
    )
    .await;
    assert_not_ready_on_object_store(&base, "is not reachable").await;

    for child in [&mut ready, &mut no_bucket, &mut no_server] {
        child.kill().await.unwrap();
    }
}

/// The command line as an operator first meets it: `help`, `--help` and `--version` answer
/// and exit 0; an unknown argument is refused with a usage hint.
#[tokio::test]
async fn the_command_line_helps() {
    let run = |args: &'static [&'static str]| async move {
        let out = tokio::process::Command::new(BIN)
            .args(args)
            .env_remove("ORBIT_CONFIG")
            .output()
            .await
            .expect("orbit-worker runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for args in [&["help"][..], &["--help"], &["help", "run"]] {
        let (ok, stdout, stderr) = run(args).await;
        assert!(ok, "{args:?}: {stderr}");
        assert!(stdout.contains("Usage: orbit-worker"), "{args:?}: {stdout}");
        assert!(stdout.contains("--config"), "{args:?}: {stdout}");
    }
    let (ok, stdout, _) = run(&["--version"]).await;
    assert!(ok && stdout.starts_with("orbit-worker 0."), "{stdout}");
    assert!(stdout.contains("(commit "), "{stdout}");
    let (ok, _, stderr) = run(&["--frobnicate"]).await;
    assert!(!ok && stderr.contains("--help"), "{stderr}");
}
