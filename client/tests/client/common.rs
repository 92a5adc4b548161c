//! The harness for the `orbit` binary: a real embedded gateway on 127.0.0.1:0 with a fresh
//! tenant, a way to run `orbit` against it, and a loopback TCP proxy that breaks connections
//! on purpose.

use std::net::SocketAddr;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use orbit_config::Settings;
use orbit_gateway::{admin, app};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rows validated inside the request; the rest goes to the in-process workers in chunks.
pub const SYNC_ROWS: u64 = 10;
pub const CHUNK_ROWS: u64 = 50;
/// No test waits longer than this for the `orbit` process.
const RUN_LIMIT: Duration = Duration::from_secs(120);

pub struct Gateway {
    pub base: String,
    pub addr: SocketAddr,
    pub org: String,
    pub dir: String,
    pub token: String,
    pub http: reqwest::Client,
    running: Option<app::Running>,
    /// The gateway's data, and the files and home directory the client uses.
    pub data: TempDir,
}

impl Gateway {
    pub async fn start() -> Self {
        let data = tempfile::tempdir().expect("temp dir");
        let mut s = Settings::defaults();
        s.http.listen = "127.0.0.1:0".into();
        s.database.url = format!("sqlite://{}/orbit.db", data.path().display())
            .parse()
            .unwrap();
        s.object_store.url = format!("file://{}/objects", data.path().display())
            .parse()
            .unwrap();
        s.worker.concurrency = 2;
        s.worker.reap_interval = Duration::from_millis(200);
        s.ingest.sync_rows = SYNC_ROWS;
        s.ingest.chunk_rows = CHUNK_ROWS;
        let running = app::start(s).await.expect("gateway starts");
        let tenant = admin::bootstrap(&*running.state.store)
            .await
            .expect("bootstrap");
        let field = |k: &str| tenant[k].as_str().expect("bootstrap field").to_owned();
        Gateway {
            base: format!("http://{}", running.addr),
            addr: running.addr,
            org: field("organization_id"),
            dir: field("directory_id"),
            token: field("token"),
            http: reqwest::Client::new(),
            running: Some(running),
            data,
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
            ("XDG_CONFIG_HOME", self.data.path().display().to_string()),
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
        let path = self.data.path().join(name);
        std::fs::write(&path, contents).expect("write test file");
        path.display().to_string()
    }

    pub fn dir_url(&self, rest: &str) -> String {
        format!(
            "{}/v2/organizations/{}/directories/{}{rest}",
            self.base, self.org, self.dir
        )
    }

    pub async fn get_json(&self, url: &str) -> Value {
        self.http
            .get(url)
            .bearer_auth(&self.token)
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
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
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

/// What the proxy does to the one connection it breaks (every other connection passes).
#[derive(Clone)]
pub enum Fault {
    /// Forward this many request bytes of a connection, then close it both ways.
    CutRequest(u64),
    /// Forward the whole request of a connection that sent more than this many bytes, then
    /// close it instead of forwarding the response: the server did the work, the client
    /// never hears of it.
    DropResponse(u64),
    /// Forward this many request bytes, tell `held`, and forward the rest after `release`.
    Hold {
        bytes: u64,
        held: Arc<Notify>,
        release: Arc<Notify>,
    },
}

pub struct Proxy {
    pub url: String,
    /// Set once the fault has been applied.
    pub tripped: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A loopback proxy to `upstream` that applies `fault` to the first connection it fits.
pub async fn proxy(upstream: SocketAddr, fault: Fault) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let tripped = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    {
        let (tripped, stop) = (tripped.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                tokio::spawn(relay(
                    client,
                    server,
                    fault.clone(),
                    tripped.clone(),
                    stop.child_token(),
                ));
            }
        });
    }
    Proxy { url, tripped, stop }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    fault: Fault,
    tripped: Arc<AtomicBool>,
    cut: CancellationToken,
) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let request_bytes = Arc::new(AtomicU64::new(0));
    // Claims the one fault; false when another connection already took it.
    let trip = {
        let tripped = tripped.clone();
        move || !tripped.swap(true, Ordering::SeqCst)
    };
    let upstream = {
        let (fault, trip, cut, request_bytes) = (
            fault.clone(),
            trip.clone(),
            cut.clone(),
            request_bytes.clone(),
        );
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    _ = cut.cancelled() => return,
                    n = from_client.read(&mut buf) => n.unwrap_or(0),
                };
                if n == 0 {
                    let _ = to_server.shutdown().await;
                    return;
                }
                let before = request_bytes.fetch_add(n as u64, Ordering::SeqCst);
                let after = before + n as u64;
                let split = |limit: u64| (limit.saturating_sub(before) as usize).min(n);
                match &fault {
                    Fault::CutRequest(limit) if after > *limit && trip() => {
                        let _ = to_server.write_all(&buf[..split(*limit)]).await;
                        cut.cancel();
                        return;
                    }
                    Fault::Hold {
                        bytes,
                        held,
                        release,
                    } if after > *bytes && trip() => {
                        let k = split(*bytes);
                        if to_server.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                        held.notify_one();
                        release.notified().await;
                        if to_server.write_all(&buf[k..n]).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            cut.cancel();
                            return;
                        }
                    }
                }
            }
        }
    };
    let downstream = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                _ = cut.cancelled() => return,
                n = from_server.read(&mut buf) => n.unwrap_or(0),
            };
            if n == 0 {
                let _ = to_client.shutdown().await;
                return;
            }
            if let Fault::DropResponse(limit) = &fault {
                if request_bytes.load(Ordering::SeqCst) > *limit && trip() {
                    cut.cancel();
                    return;
                }
            }
            if to_client.write_all(&buf[..n]).await.is_err() {
                cut.cancel();
                return;
            }
        }
    };
    // Both directions end when the cut is made; dropping their halves closes both sockets.
    tokio::join!(upstream, downstream);
}
