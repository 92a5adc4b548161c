//! The `orbit` binary's side of the harness: the test kit's embedded gateway with a fresh
//! tenant, spelled as a user points `orbit` at it, and a way to run `orbit` against it.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use orbit_testkit::gateway::TestApp;
use serde_json::Value;

pub use orbit_testkit::proxy::{Fault, Proxy};

/// Rows validated inside the request; the rest goes to the in-process workers in chunks.
pub const SYNC_ROWS: u64 = 10;
pub const CHUNK_ROWS: u64 = 50;
/// No test waits longer than this for the `orbit` process.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The test kit's gateway, with what `orbit` is pointed at spelled as a user would type it.
pub struct Gateway {
    pub base: String,
    pub addr: SocketAddr,
    pub org: String,
    pub dir: String,
    pub token: String,
    pub http: reqwest::Client,
    /// The gateway; its temporary directory also holds the files and home the client uses.
    pub app: TestApp,
}

impl Gateway {
    pub async fn start() -> Self {
        let app = TestApp::spawn_with(|s| {
            s.ingest.sync_rows = SYNC_ROWS;
            s.ingest.chunk_rows = CHUNK_ROWS;
        })
        .await;
        Gateway {
            base: app.base.clone(),
            addr: app.running().addr,
            org: app.tenant.org.to_string(),
            dir: app.tenant.dir.to_string(),
            token: app.tenant.token.clone(),
            http: app.client.clone(),
            app,
        }
    }

    /// The environment that points `orbit` at this gateway, as a user would set it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ORBIT_URL", self.base.clone()),
            ("ORBIT_TOKEN", self.token.clone()),
            ("ORBIT_ORG", self.org.clone()),
            ("ORBIT_DIRECTORY", self.dir.clone()),
            // No profiles file of the person running the tests gets in.
            (
                "XDG_CONFIG_HOME",
                self.app.data.path().display().to_string(),
            ),
            // Nor its resumable uploads' state.
            ("XDG_STATE_HOME", self.app.data.path().display().to_string()),
        ]
    }

    /// `orbit ARGS` against `base`.
    pub fn orbit_at(&self, base: &str, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_orbit"));
        cmd.args(args)
            .envs(self.env())
            .env("ORBIT_URL", base)
            .env_remove("ORBIT_PROFILE")
            .env_remove("ORBIT_PROFILES_FILE")
            .kill_on_drop(true);
        cmd
    }

    pub fn orbit(&self, args: &[&str]) -> tokio::process::Command {
        self.orbit_at(&self.base, args)
    }

    /// Writes `contents` to a file under the temp dir and returns its path.
    pub fn file(&self, name: &str, contents: &str) -> String {
        let path = self.app.data.path().join(name);
        std::fs::write(&path, contents).expect("write test file");
        path.display().to_string()
    }

    pub fn dir_url(&self, rest: &str) -> String {
        self.app.dir_url(rest)
    }

    pub async fn get_json(&self, url: &str) -> Value {
        self.app
            .get(url)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json")
    }

    /// Every source of the directory.
    pub async fn sources(&self) -> Vec<Value> {
        self.get_json(&self.dir_url("/sources?limit=1000")).await["data"]
            .as_array()
            .expect("data")
            .clone()
    }

    pub async fn stop(mut self) {
        self.app.stop().await;
    }
}

/// Runs a prepared `orbit` command to its end.
pub async fn run(cmd: &mut tokio::process::Command) -> Output {
    tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .expect("orbit finished in time")
        .expect("orbit runs")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON on stdout, with stderr in the panic message when it is not JSON.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            stdout(out),
            stderr(out)
        )
    })
}

pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

/// `rows` contacts with unique emails, and every `bad_every`-th row without any identifier.
pub fn contacts(rows: usize, prefix: &str, bad_every: Option<usize>) -> String {
    let mut out = String::from("first_name,last_name,email,company,Favourite Colour\n");
    for i in 1..=rows {
        let email = match bad_every {
            Some(n) if i % n == 0 => String::new(),
            _ => format!("{prefix}{i}@example.com"),
        };
        out.push_str(&format!("First{i},Last{i},{email},Acme,blue\n"));
    }
    out
}

/// One upload that reached [`LimitOnce`]: when, and under which `Idempotency-Key`.
#[derive(Debug, Clone)]
pub struct UploadSeen {
    pub at: std::time::Instant,
    pub idempotency_key: Option<String>,
}

/// A loopback HTTP front for the gateway that refuses the first upload as the gateway does
/// an organization over its limits (`429 organization_limit_exceeded` with `Retry-After`),
/// reading its whole body first, and forwards every other request to the gateway and its
/// answer back. It records every upload it sees and when it answered the refusal.
pub struct LimitOnce {
    /// `http://127.0.0.1:PORT`: where to point `orbit` instead of the gateway.
    pub url: String,
    pub uploads: std::sync::Arc<std::sync::Mutex<Vec<UploadSeen>>>,
    pub refused_at: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    serving: tokio::task::JoinHandle<()>,
}

impl Drop for LimitOnce {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

#[derive(Clone)]
struct Front {
    upstream: String,
    retry_after_secs: u64,
    http: reqwest::Client,
    uploads: std::sync::Arc<std::sync::Mutex<Vec<UploadSeen>>>,
    refused_at: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl LimitOnce {
    pub async fn start(upstream: &str, retry_after_secs: u64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind front");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let front = Front {
            upstream: upstream.trim_end_matches('/').to_owned(),
            retry_after_secs,
            http: reqwest::Client::new(),
            uploads: Default::default(),
            refused_at: Default::default(),
        };
        let (uploads, refused_at) = (front.uploads.clone(), front.refused_at.clone());
        let app = axum::Router::new().fallback(answer).with_state(front);
        let serving = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("front serves");
        });
        LimitOnce {
            url,
            uploads,
            refused_at,
            serving,
        }
    }
}

async fn answer(
    axum::extract::State(front): axum::extract::State<Front>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse as _;

    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .expect("the whole request body");
    if parts.method == axum::http::Method::POST && parts.uri.path().ends_with("/sources/csv-upload")
    {
        let first = {
            let mut uploads = front.uploads.lock().unwrap();
            uploads.push(UploadSeen {
                at: std::time::Instant::now(),
                idempotency_key: parts
                    .headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            });
            uploads.len() == 1
        };
        if first {
            let problem = serde_json::json!({
                "type": "https://orbit.dev/problems/organization_limit_exceeded",
                "title": "Too Many Requests",
                "status": 429,
                "detail": "the organization has too many rows queued; try again later",
                "code": "organization_limit_exceeded",
            });
            *front.refused_at.lock().unwrap() = Some(std::time::Instant::now());
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::CONTENT_TYPE, "application/problem+json".to_owned()),
                    (header::RETRY_AFTER, front.retry_after_secs.to_string()),
                ],
                problem.to_string(),
            )
                .into_response();
        }
    }
    let target = format!(
        "{}{}",
        front.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut headers = parts.headers.clone();
    for hop in [
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(hop);
    }
    let upstream = front
        .http
        .request(parts.method, target)
        .headers(headers)
        .body(body)
        .send()
        .await
        .expect("the gateway answers");
    let status = upstream.status();
    let mut headers = upstream.headers().clone();
    for hop in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
    ] {
        headers.remove(hop);
    }
    let body = upstream.bytes().await.expect("the gateway's body");
    (status, headers, body).into_response()
}
