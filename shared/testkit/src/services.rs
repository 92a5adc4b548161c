//! Service fixtures for the distributed backends: a fresh PostgreSQL database (or a fresh
//! schema on the Citus cluster), a fresh S3 bucket and a uniquely named RabbitMQ queue, each
//! removed when its guard drops. The services are shared by every test run on a machine, so
//! nothing is reused.
//!
//! Environment: `ORBIT_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `ORBIT_TEST_CITUS_URL` (`postgres://postgres@127.0.0.1:9700/orbit`, the coordinator),
//! `ORBIT_TEST_S3_ENDPOINT` (`http://127.0.0.1:9000`), `ORBIT_TEST_S3_ACCESS_KEY` (`orbit`),
//! `ORBIT_TEST_S3_SECRET_KEY` (`orbit-secret`), `ORBIT_TEST_AMQP_URL`
//! (`amqp://guest:guest@127.0.0.1:5672/%2f`), and `ORBIT_TEST_DATABASE=citus` to put
//! [`DistributedStack`] on Citus. An unreachable service fails the test with a message pointing
//! at `deploy/services.sh` (or `deploy/citus.sh`); nothing is skipped.

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

/// The Citus coordinator's database (deploy/citus.sh prints it); tests get a schema in it.
pub fn citus_url() -> String {
    env_or(
        "ORBIT_TEST_CITUS_URL",
        "postgres://postgres@127.0.0.1:9700/orbit",
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

/// A database of its own; dropped (forcibly) with the guard. On Citus it is a schema of its
/// own instead: a database there needs the extension and the node registrations again, on
/// every node.
pub struct TestDatabase {
    /// What the store is given: the database, or the coordinator's database with this schema
    /// as every connection's search_path.
    pub url: String,
    admin_url: String,
    name: String,
    citus: bool,
}

impl TestDatabase {
    /// A fresh database on `ORBIT_TEST_POSTGRES_URL`.
    pub async fn create() -> Self {
        let admin_url = postgres_admin_url();
        let name = format!("orbit_test_{}", Uuid::new_v4().simple());
        let mut admin = connect(&admin_url, "deploy/services.sh").await;
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
            citus: false,
        }
    }

    /// A fresh schema in the Citus coordinator's database (`ORBIT_TEST_CITUS_URL`). The URL
    /// passes startup options, which sqlx keeps and appends the store's own `-c` options to:
    /// the schema as search_path, so unqualified names (the migrations', sqlx's migration
    /// table) land in it, and four shards per distributed table instead of 32, since each
    /// test distributes a whole schema. The schema's name is also the connections'
    /// application_name, by which the drop (and a test killing sessions) finds them. sqlx's
    /// migration lock is keyed on the database's name, so concurrent tests' migrations on Citus
    /// run one at a time.
    pub async fn citus() -> Self {
        let admin_url = citus_url();
        let name = format!("orbit_test_{}", Uuid::new_v4().simple());
        let mut admin = connect(&admin_url, "deploy/citus.sh").await;
        // Citus propagates the schema to the worker nodes.
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .await
            .expect("create test schema");
        let sep = if admin_url.contains('?') { '&' } else { '?' };
        TestDatabase {
            url: format!(
                "{admin_url}{sep}application_name={name}\
                 &options=-c%20search_path%3D{name}%20-c%20citus.shard_count%3D4"
            ),
            admin_url,
            name,
            citus: true,
        }
    }

    /// The database [`DistributedStack`] runs on: Citus with `ORBIT_TEST_DATABASE=citus`,
    /// otherwise PostgreSQL.
    pub async fn for_stack() -> Self {
        match std::env::var("ORBIT_TEST_DATABASE")
            .unwrap_or_default()
            .as_str()
        {
            "" | "postgres" => Self::create().await,
            "citus" => Self::citus().await,
            other => panic!("ORBIT_TEST_DATABASE={other:?}: expected postgres or citus"),
        }
    }

    /// How `pg_stat_activity` tells this database's sessions from other tests': the column
    /// to compare and its value (the database's name, or on Citus the schema's, as
    /// application_name, since every test there shares one database).
    pub fn sessions(&self) -> (&'static str, &str) {
        let column = if self.citus {
            "application_name"
        } else {
            "datname"
        };
        (column, &self.name)
    }
}

/// A connection to `url`, or a failed test naming the script that starts the server.
async fn connect(url: &str, script: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {url} is unreachable ({e}): run `bash {script}`"))
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name, citus) = (self.admin_url.clone(), self.name.clone(), self.citus);
        block_on_side(async move {
            use sqlx::Connection;
            let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url).await else {
                eprintln!("cleanup: cannot reach {admin_url} to drop {name}");
                return;
            };
            if citus {
                // What `DROP DATABASE … WITH (FORCE)` does: a session left in a transaction
                // (a killed worker's, say) would hold its locks and stall the drop.
                let _ = sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&name)
                .execute(&mut conn)
                .await;
                // Under the store's migration lock (`orbit_store::postgres::MIGRATION_LOCK`):
                // dropping distributed tables while another test migrates deadlocks on
                // Citus's catalog otherwise.
                let _ = sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(orbit_store::postgres::MIGRATION_LOCK)
                    .execute(&mut conn)
                    .await;
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&mut conn)
                    .await;
            } else {
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

/// The whole distributed stack for one test: settings pointing at a fresh database (a Citus
/// schema with `ORBIT_TEST_DATABASE=citus`: [`TestDatabase::for_stack`]), bucket and queue,
/// and the guards that remove them.
pub struct DistributedStack {
    pub database: TestDatabase,
    pub bucket: TestBucket,
    pub queue: TestQueue,
}

impl DistributedStack {
    pub async fn create() -> Self {
        Self::on(TestDatabase::for_stack().await).await
    }

    /// The stack on a Citus schema, whatever `ORBIT_TEST_DATABASE` says: for the tests that
    /// are about Citus itself.
    pub async fn citus() -> Self {
        Self::on(TestDatabase::citus().await).await
    }

    async fn on(database: TestDatabase) -> Self {
        DistributedStack {
            database,
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
