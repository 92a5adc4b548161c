//! Service fixtures for the distributed backends: a fresh PostgreSQL database, a fresh S3
//! bucket and a uniquely named RabbitMQ queue, each removed when its guard drops. The services
//! are shared by every test run on a machine, so nothing is reused.
//!
//! Environment: `ORBIT_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `ORBIT_TEST_S3_ENDPOINT` (`http://127.0.0.1:9000`), `ORBIT_TEST_S3_ACCESS_KEY` (`orbit`),
//! `ORBIT_TEST_S3_SECRET_KEY` (`orbit-secret`), `ORBIT_TEST_AMQP_URL`
//! (`amqp://guest:guest@127.0.0.1:5672/%2f`). An unreachable service fails the test with a
//! message pointing at `deploy/services.sh`; nothing is skipped.

use std::future::Future;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use uuid::Uuid;

use orbit_config::Settings;

/// `name`'s value, or `default` when it is unset or empty.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

pub fn postgres_admin_url() -> String {
    env_or(
        "ORBIT_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    )
}

pub fn amqp_url() -> String {
    env_or(
        "ORBIT_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

/// Runs cleanup on a runtime of its own: `Drop` cannot await, and the test's runtime may be
/// shutting down.
fn block_on_side<F: Future<Output = ()> + Send + 'static>(cleanup: F) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(cleanup)
    })
    .join();
}

/// A database of its own; dropped (forcibly) with the guard.
pub struct TestDatabase {
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let admin_url = postgres_admin_url();
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {admin_url} is unreachable ({e}): run `bash deploy/services.sh`"
                )
            });
        let name = format!("orbit_test_{}", Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("a postgres URL has a path");
        TestDatabase {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        block_on_side(async move {
            use sqlx::Connection;
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await;
            }
        });
    }
}

/// The S3-compatible test server: where it listens and the keys it accepts.
pub struct S3Server {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Server {
    pub fn from_env() -> Self {
        S3Server {
            endpoint: env_or("ORBIT_TEST_S3_ENDPOINT", "http://127.0.0.1:9000"),
            access_key: env_or("ORBIT_TEST_S3_ACCESS_KEY", "orbit"),
            secret_key: env_or("ORBIT_TEST_S3_SECRET_KEY", "orbit-secret"),
        }
    }

    /// A client configuration addressing the server as Orbit's S3 store does: path-style, with
    /// checksums only where an operation requires them.
    pub fn client_config(&self) -> aws_sdk_s3::Config {
        aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(
                &self.access_key,
                &self.secret_key,
                None,
                None,
                "orbit-test",
            ))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build()
    }
}

/// A bucket of its own on the S3-compatible test server; emptied and removed with the guard.
pub struct TestBucket {
    pub bucket: String,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    config: aws_sdk_s3::Config,
}

impl TestBucket {
    pub async fn create() -> Self {
        let server = S3Server::from_env();
        let config = server.client_config();
        let S3Server {
            endpoint,
            access_key,
            secret_key,
        } = server;
        let client = aws_sdk_s3::Client::from_conf(config.clone());
        let bucket = format!("orbit-test-{}", Uuid::new_v4().simple());
        client
            .create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                "cannot create bucket {bucket} at {endpoint}: {}; run `bash deploy/services.sh`",
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
            });
        TestBucket {
            bucket,
            endpoint,
            access_key,
            secret_key,
            config,
        }
    }

    /// Keys stored in the bucket, for tests that check nothing was left behind.
    pub async fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let client = aws_sdk_s3::Client::from_conf(self.config.clone());
        let mut pages = client
            .list_objects_v2()
            .bucket(&self.bucket)
            .into_paginator()
            .send();
        while let Some(Ok(page)) = pages.next().await {
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        keys
    }
}

impl Drop for TestBucket {
    fn drop(&mut self) {
        let (config, bucket) = (self.config.clone(), self.bucket.clone());
        block_on_side(async move {
            // A client of the cleanup's own runtime: pooled connections belong to the one
            // that made them.
            let client = aws_sdk_s3::Client::from_conf(config);
            let mut pages = client
                .list_objects_v2()
                .bucket(&bucket)
                .into_paginator()
                .send();
            while let Some(Ok(page)) = pages.next().await {
                for object in page.contents() {
                    if let Some(key) = object.key() {
                        let _ = client.delete_object().bucket(&bucket).key(key).send().await;
                    }
                }
            }
            let _ = client.delete_bucket().bucket(&bucket).send().await;
        });
    }
}

/// How long a cleanup waits for a service before giving up (and saying so).
const CLEANUP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(15);

/// A queue name of its own; the queue, its dead-letter queue and exchange go with the guard.
pub struct TestQueue {
    pub url: String,
    pub name: String,
}

impl TestQueue {
    pub fn new() -> Self {
        TestQueue {
            url: amqp_url(),
            name: format!("orbit-test-{}", Uuid::new_v4().simple()),
        }
    }
}

impl TestQueue {
    async fn channel(&self) -> (lapin::Connection, lapin::Channel) {
        let connection =
            lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
                .await
                .expect("RabbitMQ reachable (deploy/services.sh starts it)");
        let channel = connection.create_channel().await.expect("a channel");
        (connection, channel)
    }

    /// Takes the next message off the work queue and rejects it without requeueing, so the
    /// broker dead-letters it as it does one redelivered past the delivery limit. False when
    /// the queue was empty.
    pub async fn dead_letter_next(&self) -> bool {
        use lapin::options::{BasicGetOptions, BasicRejectOptions};
        let (connection, channel) = self.channel().await;
        let got = channel
            .basic_get(self.name.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get on the work queue");
        let found = match got {
            Some(message) => {
                message
                    .delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                    .expect("reject");
                true
            }
            None => false,
        };
        let _ = connection.close(200, "OK".into()).await;
        found
    }

    /// Publishes `body` straight into the dead-letter queue (`{name}.dead`), confirmed.
    pub async fn publish_dead_letter(&self, body: &[u8]) {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        let (connection, channel) = self.channel().await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let dead = format!("{}.dead", self.name);
        channel
            .basic_publish(
                "".into(),
                dead.as_str().into(),
                BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
        let _ = connection.close(200, "OK".into()).await;
    }
}

impl Default for TestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        block_on_side(async move {
            use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
            let connect = lapin::Connection::connect(&url, lapin::ConnectionProperties::default());
            let Ok(Ok(conn)) = tokio::time::timeout(CLEANUP_PATIENCE, connect).await else {
                eprintln!("cleanup: cannot reach RabbitMQ to delete {name}");
                return;
            };
            // One channel per operation: a failed operation closes its channel.
            for queue in [name.clone(), format!("{name}.dead")] {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            }
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .exchange_delete(
                        format!("{name}.dlx").as_str().into(),
                        ExchangeDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = conn.close(200, "OK".into()).await;
        });
    }
}

/// The whole distributed stack for one test: settings pointing at a fresh database, bucket
/// and queue, and the guards that remove them.
pub struct DistributedStack {
    pub database: TestDatabase,
    pub bucket: TestBucket,
    pub queue: TestQueue,
}

impl DistributedStack {
    pub async fn create() -> Self {
        DistributedStack {
            database: TestDatabase::create().await,
            bucket: TestBucket::create().await,
            queue: TestQueue::new(),
        }
    }

    /// Points `settings` at this stack.
    pub fn apply(&self, settings: &mut Settings) {
        settings.database.url = self.database.url.parse().expect("a postgres URL");
        settings.object_store.url = format!("s3://{}", self.bucket.bucket)
            .parse()
            .expect("an s3 URL");
        settings.object_store.endpoint = Some(self.bucket.endpoint.clone());
        settings.object_store.region = Some("us-east-1".into());
        settings.object_store.access_key_id = Some(self.bucket.access_key.clone());
        settings.object_store.secret_access_key = Some(self.bucket.secret_key.clone());
        settings.queue.url = self.queue.url.parse().expect("an amqp URL");
        settings.queue.name = self.queue.name.clone();
    }

    /// The same settings as `ORBIT__…` variables, for child processes.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("ORBIT__DATABASE__URL".into(), self.database.url.clone()),
            (
                "ORBIT__OBJECT_STORE__URL".into(),
                format!("s3://{}", self.bucket.bucket),
            ),
            (
                "ORBIT__OBJECT_STORE__ENDPOINT".into(),
                self.bucket.endpoint.clone(),
            ),
            ("ORBIT__OBJECT_STORE__REGION".into(), "us-east-1".into()),
            (
                "ORBIT__OBJECT_STORE__ACCESS_KEY_ID".into(),
                self.bucket.access_key.clone(),
            ),
            (
                "ORBIT__OBJECT_STORE__SECRET_ACCESS_KEY".into(),
                self.bucket.secret_key.clone(),
            ),
            ("ORBIT__QUEUE__URL".into(), self.queue.url.clone()),
            ("ORBIT__QUEUE__NAME".into(), self.queue.name.clone()),
        ]
    }
}

/// Starts the `orbit-worker` at `binary` with `env` (on top of the caller's environment), JSON
/// logs and its metrics listener on an ephemeral port. Returns the process and the base URL of
/// that listener, read from the worker's start-up log; stderr is drained from then on so the
/// worker never blocks on a full pipe.
pub async fn spawn_worker_with_metrics(
    binary: &std::path::Path,
    env: &[(String, String)],
) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(binary)
        .env("ORBIT__WORKER__METRICS_LISTEN", "127.0.0.1:0")
        .env("ORBIT__TELEMETRY__LOG_FORMAT", "json")
        // Tests read the mirrored gauges right after what moves them.
        .env("ORBIT__TELEMETRY__GAUGES_REFRESH", "0s")
        .env("RUST_LOG", "info")
        .env_remove("ORBIT_CONFIG")
        .envs(env.iter().cloned())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("orbit-worker starts");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("piped")).lines();
    let patience = std::time::Duration::from_secs(60);
    loop {
        let line = tokio::time::timeout(patience, lines.next_line())
            .await
            .expect("the worker listens within 60s")
            .expect("stderr readable")
            .expect("the worker exited before listening");
        let event: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if event["fields"]["message"] == "worker metrics listening" {
            let addr = event["fields"]["addr"].as_str().expect("addr").to_owned();
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return (child, format!("http://{addr}"));
        }
    }
}
