//! The monitoring recipe against a real Prometheus (Debian's `prometheus`; deploy/check.sh
//! installs it): it scrapes a gateway and an `orbit-worker` on the distributed stack, loads
//! deploy/prometheus/alerts.yml, and answers PromQL over its HTTP API: the queue depth while
//! no worker runs, then a worker appearing and draining it. Every query of the Grafana
//! dashboard runs against it, and every Orbit metric the dashboard and the alerts use must be
//! one the processes really export.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use orbit_gateway::app;
use orbit_testkit::{spawn_worker_with_metrics, DistributedStack};
use serde_json::Value;
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(60);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A port nothing listens on right now, for a process that takes its address as an argument.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Prometheus {
    child: Child,
    base: String,
    client: reqwest::Client,
    /// Where the worker job's targets are listed; Prometheus watches it.
    worker_targets: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(gateway: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let worker_targets = dir.path().join("workers.json");
        std::fs::write(&worker_targets, "[]").unwrap();
        let alerts = repo_file("deploy/prometheus/alerts.yml");
        let config = format!(
            r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{alerts}"]
scrape_configs:
  - job_name: orbit-gateway
    static_configs: [{{targets: ["{gateway}"]}}]
  - job_name: orbit-worker
    file_sd_configs: [{{files: ["{workers}"]}}]
"#,
            alerts = alerts.display(),
            workers = worker_targets.display(),
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect(
                "`prometheus` runs: install Debian's prometheus package (deploy/check.sh does)",
            );
        let prometheus = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            worker_targets,
            _dir: dir,
        };
        prometheus
            .wait_for("Prometheus ready", |p| async move {
                p.client
                    .get(format!("{}/-/ready", p.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                    .then_some(())
            })
            .await;
        prometheus
    }

    fn add_worker(&self, addr: &str) {
        // Written whole then renamed, so Prometheus never reads half a file.
        let partial = self.worker_targets.with_extension("partial");
        std::fs::write(&partial, format!(r#"[{{"targets": ["{addr}"]}}]"#)).unwrap();
        std::fs::rename(partial, &self.worker_targets).unwrap();
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let response = self
            .client
            .get(format!("{}/api/v1/{path}", self.base))
            .query(query)
            .send()
            .await
            .expect("Prometheus answers");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// The samples of an instant query, as (labels, value).
    async fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let data = self.api("query", &[("query", promql)]).await;
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// Polls `probe` until it returns something, for at most [`DEADLINE`].
    async fn wait_for<'a, T, F, Fut>(&'a self, what: &str, probe: F) -> T
    where
        F: Fn(&'a Self) -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(found) = probe(self).await {
                return found;
            }
            assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The single value of `promql` once it satisfies `accept`.
    async fn wait_value(&self, promql: &str, accept: impl Fn(f64) -> bool) -> f64 {
        let accept = &accept;
        self.wait_for(promql, |p| async move {
            match p.query(promql).await.as_slice() {
                [(_, v)] if accept(*v) => Some(*v),
                _ => None,
            }
        })
        .await
    }
}

/// Orbit's metric names in a PromQL expression.
fn orbit_metrics(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| token.starts_with("orbit_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_gateway_and_worker_and_answers_queue_depth() {
    let stack = DistributedStack::create().await;
    let data = tempfile::tempdir().unwrap();
    let mut settings = common::test_settings(data.path());
    stack.apply(&mut settings);
    settings.database.max_connections = 5;
    settings.ingest.sync_rows = 2;
    settings.ingest.chunk_rows = 5;
    app::connect(&settings)
        .await
        .unwrap()
        .store
        .migrate()
        .await
        .unwrap();
    let running = app::start(settings.clone()).await.expect("gateway starts");
    let base = format!("http://{}", running.addr);
    let tenant = common::new_tenant(&running).await;
    let client = reqwest::Client::new();

    // 42 rows: 2 in the request, 8 chunks of 5 left in the queue, with no worker to take them.
    let response = client
        .post(format!(
            "{base}/v2/organizations/{}/directories/{}/sources/csv-upload",
            tenant.org, tenant.dir
        ))
        .bearer_auth(&tenant.token)
        .multipart(common::file_form(common::contacts_csv(42, "prom")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let source: Value = response.json().await.unwrap();
    let source_id = source["source_id"].as_str().unwrap().to_owned();

    let prometheus = Prometheus::start(&running.addr.to_string()).await;
    let depth = prometheus
        .wait_value(r#"orbit_queue_depth{job="orbit-gateway"}"#, |v| v > 0.0)
        .await;
    assert_eq!(depth, 8.0, "all 8 chunks wait in RabbitMQ");
    assert_eq!(
        prometheus
            .wait_value("max(orbit_chunks_open)", |v| v > 0.0)
            .await,
        8.0
    );
    // The worker job has no target yet: none is up.
    assert!(prometheus
        .query(r#"up{job="orbit-worker"} == 1"#)
        .await
        .is_empty());

    let (mut worker, worker_url) =
        spawn_worker_with_metrics(&common::worker_binary(), &stack.env()).await;
    prometheus.add_worker(worker_url.trim_start_matches("http://"));
    prometheus
        .wait_value(r#"count(up{job="orbit-worker"} == 1)"#, |v| v == 1.0)
        .await;
    let status_url = format!(
        "{base}/v2/organizations/{}/directories/{}/sources/{source_id}",
        tenant.org, tenant.dir
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let body: Value = client
            .get(&status_url)
            .bearer_auth(&tenant.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["source_status"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Both processes report the drained queue; the worker counted the rows it materialized.
    for job in ["orbit-gateway", "orbit-worker"] {
        prometheus
            .wait_value(&format!(r#"orbit_queue_depth{{job="{job}"}}"#), |v| {
                v == 0.0
            })
            .await;
    }
    prometheus
        .wait_value(r#"sum(orbit_rows_total{job="orbit-worker"})"#, |v| {
            v == 40.0
        })
        .await;

    // Every metric the dashboard and the alert rules use exists in what was scraped.
    let names: BTreeSet<String> = prometheus
        .api("label/__name__/values", &[])
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/orbit.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m");
            used.extend(orbit_metrics(&expr));
            // Runs: a query Prometheus cannot parse or evaluate fails in `api`.
            prometheus.api("query", &[("query", expr.as_str())]).await;
        }
    }
    let groups = prometheus.api("rules", &[]).await;
    let rules: Vec<Value> = groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect();
    assert_eq!(rules.len(), 7, "alerts.yml loaded: {groups}");
    for rule in &rules {
        used.extend(orbit_metrics(rule["query"].as_str().unwrap()));
    }
    let missing: Vec<_> = used.iter().filter(|n| !names.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "not exported by gateway or worker: {missing:?}"
    );
    for metric in [
        "orbit_queue_depth",
        "orbit_chunks_open",
        "orbit_rows_total",
        "orbit_chunk_duration_seconds_bucket",
        "orbit_chunks_in_flight",
        "orbit_sources",
        "orbit_http_requests_total",
    ] {
        assert!(
            used.contains(metric),
            "the dashboard and alerts use {metric}"
        );
    }
    // Each rule has been evaluated without error.
    let rules_ok = prometheus
        .wait_for("alert rules evaluated", |p| async move {
            let groups = p.api("rules", &[]).await;
            let all: Vec<Value> = groups["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_array().unwrap().clone())
                .collect();
            all.iter().all(|r| r["health"] == "ok").then_some(all)
        })
        .await;
    assert!(rules_ok
        .iter()
        .all(|r| r["lastError"].as_str().unwrap_or("").is_empty()));

    worker.kill().await.unwrap();
    running.shutdown().await;
    let mut child = prometheus.child;
    child.kill().await.unwrap();
}
