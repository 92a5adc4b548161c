//! The embedded-gateway harness: a real gateway on 127.0.0.1:0, a tenant made through the
//! admin functions, and helpers that speak HTTP to it like a client would.
//!
//! By default the gateway runs on the embedded stack over a temporary data directory. With
//! `ORBIT_TEST_STACK=distributed` the same tests run against PostgreSQL, S3 and RabbitMQ (a
//! fresh database, bucket and queue each) with two `orbit-worker` processes doing the work;
//! `ORBIT_TEST_DATABASE=citus` as well puts that database on the Citus cluster (a fresh schema).

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

use crate::services::DistributedStack;
use orbit_config::Settings;
use orbit_gateway::{admin, app};
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use uuid::Uuid;

pub struct Tenant {
    pub org: Uuid,
    pub dir: Uuid,
    pub token: String,
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub running: Option<app::Running>,
    pub tenant: Tenant,
    pub data: TempDir,
    /// Worker processes, killed when the test ends.
    pub workers: Vec<tokio::process::Child>,
    /// The distributed services in use, removed when the test ends.
    pub stack: Option<DistributedStack>,
}

pub fn distributed() -> bool {
    std::env::var("ORBIT_TEST_STACK").is_ok_and(|s| s == "distributed")
}

/// `orbit-worker`, built beside the test binary (deploy/test.sh builds every binary first).
pub fn worker_binary() -> std::path::PathBuf {
    binary("orbit-worker")
}

/// The workspace binary `name` of the profile the running test was built with: test binaries
/// live in `target/<profile>/deps`, binaries one level up.
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut dir = exe.parent().expect("a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (deploy/test.sh does)",
        path.display()
    );
    path
}

/// Starts an `orbit-worker` process on `stack` with the row rules of `settings`.
pub fn spawn_worker(stack: &DistributedStack, settings: &Settings) -> tokio::process::Child {
    spawn_worker_with(stack, settings, &[])
}

/// [`spawn_worker`], with `extra` settings (`ORBIT__…` variables) over the stack's.
pub fn spawn_worker_with(
    stack: &DistributedStack,
    settings: &Settings,
    extra: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(worker_binary())
        .env("RUST_LOG", "warn")
        .envs(worker_env(stack, settings, extra))
        .env_remove("ORBIT_CONFIG")
        .kill_on_drop(true)
        .spawn()
        .expect("orbit-worker starts")
}

/// [`spawn_worker`], serving its `/metrics`: the process and that endpoint's base URL.
pub async fn spawn_worker_serving_metrics(
    stack: &DistributedStack,
    settings: &Settings,
) -> (tokio::process::Child, String) {
    crate::services::spawn_worker_with_metrics(&worker_binary(), &worker_env(stack, settings, &[]))
        .await
}

/// The text of the `/metrics` of a worker serving them at `url` (from
/// [`spawn_worker_serving_metrics`] or `spawn_worker_with_metrics`).
pub async fn worker_metrics(app: &TestApp, url: &str) -> String {
    app.client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The environment of a worker on `stack` with the row rules, worker and tenant settings of
/// `settings`, then `extra` (`ORBIT__…` variables) over them.
fn worker_env(
    stack: &DistributedStack,
    settings: &Settings,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = stack.env();
    env.extend(
        [
            (
                "ORBIT__INGEST__MAX_FIELD_BYTES",
                settings.ingest.max_field_bytes.to_string(),
            ),
            (
                "ORBIT__INGEST__DEFAULT_REGION",
                settings.ingest.default_region.code().to_string(),
            ),
            (
                "ORBIT__WORKER__CONCURRENCY",
                settings.worker.concurrency.to_string(),
            ),
            (
                "ORBIT__TENANTS__FAIR_SCHEDULING",
                settings.tenants.fair_scheduling.to_string(),
            ),
            (
                "ORBIT__TENANTS__DEFAULT_WEIGHT",
                settings.tenants.default_weight.to_string(),
            ),
            (
                "ORBIT__INGEST__CHUNK_ROWS",
                settings.ingest.chunk_rows.to_string(),
            ),
            (
                "ORBIT__WORKER__SLICE_ROWS",
                settings.worker.slice_rows.to_string(),
            ),
            ("ORBIT__WORKER__REAP_INTERVAL", "200ms".to_string()),
            (
                "ORBIT__WORKER__LEASE",
                humantime::format_duration(settings.worker.lease).to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// Settings for a test: everything embedded under `data`, on an ephemeral port.
pub fn test_settings(data: &std::path::Path) -> Settings {
    let mut s = Settings::defaults();
    s.http.listen = "127.0.0.1:0".into();
    s.database.url = format!("sqlite://{}/orbit.db", data.display())
        .parse()
        .unwrap();
    s.object_store.url = format!("file://{}/objects", data.display())
        .parse()
        .unwrap();
    s.worker.concurrency = 2;
    s.worker.reap_interval = Duration::from_millis(200);
    // The suites read gauges right after what moves them; the cache has its own tests
    // (`orbit_store::metrics`).
    s.telemetry.gauges_refresh = Duration::ZERO;
    s
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let stack = match distributed() {
            true => Some(DistributedStack::create().await),
            false => None,
        };
        Self::spawn_on(stack, configure).await
    }

    /// A gateway (and, on a distributed `stack`, two workers) on `stack`, or on the embedded
    /// backends without one.
    pub async fn spawn_on(
        stack: Option<DistributedStack>,
        configure: impl FnOnce(&mut Settings),
    ) -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let mut settings = test_settings(data.path());
        configure(&mut settings);
        let stack = if let Some(stack) = stack {
            stack.apply(&mut settings);
            settings.database.max_connections = 5;
            app::connect(&settings)
                .await
                .expect("backends open")
                .store
                .migrate()
                .await
                .expect("migrations");
            Some(stack)
        } else {
            None
        };
        let running = app::start(settings.clone()).await.expect("gateway starts");
        let workers = match &stack {
            Some(stack) => (0..2).map(|_| spawn_worker(stack, &settings)).collect(),
            None => Vec::new(),
        };
        let base = format!("http://{}", running.addr);
        let tenant = new_tenant(&running).await;
        TestApp {
            base,
            client: reqwest::Client::new(),
            settings,
            running: Some(running),
            tenant,
            data,
            workers,
            stack,
        }
    }

    pub fn running(&self) -> &app::Running {
        self.running.as_ref().expect("running")
    }

    pub async fn another_tenant(&self) -> Tenant {
        new_tenant(self.running()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `/v2/organizations/{org}/directories/{dir}{rest}` for the default tenant.
    pub fn dir_url(&self, rest: &str) -> String {
        self.tenant_url(&self.tenant, rest)
    }

    pub fn upload_url(&self) -> String {
        self.dir_url("/sources/csv-upload")
    }

    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.client.get(url).bearer_auth(&self.tenant.token)
    }

    pub fn post(&self, url: &str) -> reqwest::RequestBuilder {
        self.client.post(url).bearer_auth(&self.tenant.token)
    }

    /// `/v2/organizations/{org}/directories/{dir}{rest}` for `tenant`.
    pub fn tenant_url(&self, tenant: &Tenant, rest: &str) -> String {
        self.url(&format!(
            "/v2/organizations/{}/directories/{}{rest}",
            tenant.org, tenant.dir
        ))
    }

    /// Uploads `csv` as `tenant` (another organization than the app's own, say).
    pub async fn upload_as(&self, tenant: &Tenant, csv: impl Into<Vec<u8>>) -> reqwest::Response {
        self.client
            .post(self.tenant_url(tenant, "/sources/csv-upload"))
            .bearer_auth(&tenant.token)
            .multipart(file_form(csv))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn upload(&self, csv: impl Into<Vec<u8>>) -> reqwest::Response {
        self.post(&self.upload_url())
            .multipart(file_form(csv))
            .send()
            .await
            .expect("request sent")
    }

    /// Uploads and returns the body, asserting a 201 or 202.
    pub async fn upload_ok(&self, csv: impl Into<Vec<u8>>) -> Value {
        let response = self.upload(csv).await;
        let status = response.status();
        let body: Value = response.json().await.expect("json body");
        assert!(
            status == StatusCode::CREATED || status == StatusCode::ACCEPTED,
            "{status}: {body}"
        );
        body
    }

    pub async fn get_json(&self, url: &str) -> (StatusCode, Value) {
        let response = self.get(url).send().await.expect("request sent");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn source(&self, source_id: &str) -> Value {
        self.source_as(&self.tenant, source_id).await
    }

    /// A source's status as `tenant` reads it, asserting a 200.
    pub async fn source_as(&self, tenant: &Tenant, source_id: &str) -> Value {
        let response = self
            .client
            .get(self.tenant_url(tenant, &format!("/sources/{source_id}")))
            .bearer_auth(&tenant.token)
            .send()
            .await
            .expect("request sent");
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Polls the status endpoint until the source is completed or failed.
    pub async fn wait_terminal(&self, source_id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let body = self.source(source_id).await;
            let status = body["source_status"].as_str().unwrap_or_default();
            if status == "completed" || status == "failed" {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "source still {status} after {within:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every item of a cursor-paginated list.
    pub async fn collect(&self, url: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if url.contains('?') { '&' } else { '?' };
            let page_url = match &cursor {
                Some(c) => format!("{url}{sep}limit=1000&cursor={c}"),
                None => format!("{url}{sep}limit=1000"),
            };
            let (status, body) = self.get_json(&page_url).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            items.extend(body["data"].as_array().expect("data array").iter().cloned());
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return items,
            }
        }
    }

    /// Keys of every stored object, whichever object store is in use.
    pub async fn stored_objects(&self) -> Vec<String> {
        match &self.stack {
            Some(stack) => stack.bucket.keys().await,
            None => walk(&self.data.path().join("objects"))
                .into_iter()
                .filter(|p| !p.contains(".partial"))
                .collect(),
        }
    }

    /// The gateway's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let response = self.client.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// A gateway on a fresh distributed stack (no worker), one chunk per 1000 rows and no rows in
/// the request, with `configure` applied last.
pub async fn distributed_app(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let data = tempfile::tempdir().unwrap();
    let mut settings = test_settings(data.path());
    settings.ingest.sync_rows = 0;
    settings.ingest.chunk_rows = 1000;
    let stack = DistributedStack::create().await;
    stack.apply(&mut settings);
    settings.database.max_connections = 5;
    configure(&mut settings);
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

pub async fn new_tenant(running: &app::Running) -> Tenant {
    let out = admin::bootstrap(&*running.state.store)
        .await
        .expect("bootstrap");
    Tenant {
        org: out["organization_id"].as_str().unwrap().parse().unwrap(),
        dir: out["directory_id"].as_str().unwrap().parse().unwrap(),
        token: out["token"].as_str().unwrap().to_owned(),
    }
}

pub fn file_form(csv: impl Into<Vec<u8>>) -> Form {
    Form::new().part("file", Part::bytes(csv.into()).file_name("contacts.csv"))
}

/// Asserts a problem+json error with `status` and `code`, and returns its body.
pub async fn assert_problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    let got = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(body["title"].is_string() && body["detail"].is_string() && body["type"].is_string());
    body
}

/// `rows` contacts with unique emails, in the columns of the upload contract, docs/api.md (first name, last name, email, phone, ...).
pub fn contacts_csv(rows: usize, email_prefix: &str) -> String {
    let mut out =
        String::from("first_name,last_name,email,phone,company,title,linkedin_url,city,country\n");
    for i in 0..rows {
        out.push_str(&format!(
            "First{i},Last{i},{email_prefix}{i}@example.com,,Acme {},Engineer,,Paris,FR\n",
            i % 100
        ));
    }
    out
}

/// The value of the sample `series` (a name with its labels as the text format writes them,
/// such as `orbit_rows_total{outcome="accepted"}`) in Prometheus text; `None` when absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.trim().parse().expect("a sample value"))
    })
}

/// Reads until the peer closes (or errors); how long that took.
pub async fn time_to_close(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was still open after {within:?}"),
        }
    }
}

/// One HTTP/1.1 response read off a raw socket: status, lower-cased head, body.
pub async fn read_response(stream: &mut TcpStream, within: Duration) -> (u16, String, Vec<u8>) {
    let deadline = Instant::now() + within;
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("readable");
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&data)
        );
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while data.len() < head_end + length {
        let n = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf))
            .await
            .expect("the body in time")
            .expect("readable");
        assert!(n > 0, "closed inside the body");
        data.extend_from_slice(&buf[..n]);
    }
    (status, head, data[head_end..head_end + length].to_vec())
}

pub fn problem_code(body: &[u8]) -> String {
    let value: Value = serde_json::from_slice(body).expect("a JSON body");
    value["code"].as_str().unwrap_or_default().to_owned()
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out
}
