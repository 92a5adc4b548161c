//! Orbit under test: the release `orbit-gateway` and `orbit-worker` binaries started as
//! processes, as an operator runs them, on the embedded defaults or on a fresh PostgreSQL
//! database (or Citus schema), S3 bucket and RabbitMQ queue. Readings of their memory and CPU,
//! and of the database servers' CPU, come from /proc.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use orbit_testkit::{DistributedStack, TestBucket, TestDatabase, TestQueue};
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::Connection as _;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::citus::Cluster;
use crate::node::Node;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StackKind {
    Embedded,
    Distributed,
}

impl StackKind {
    pub fn name(self) -> &'static str {
        match self {
            StackKind::Embedded => "embedded",
            StackKind::Distributed => "distributed",
        }
    }
}

/// A binary built beside this one (`cargo build --release --workspace --bins`).
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace --bins` (deploy/bench.sh does)",
        path.display()
    );
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A process's peak resident set (VmHWM), in bytes.
pub fn peak_rss(child: &Child) -> anyhow::Result<u64> {
    let pid = child.id().context("the process has exited")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

/// User plus system CPU time a process has used so far (all its threads).
pub fn cpu_time(child: &Child) -> anyhow::Result<Duration> {
    let pid = child.id().context("the process has exited")?;
    let stat = ProcStat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)?;
    Ok(ticks(stat.utime + stat.stime))
}

/// The user plus system CPU time of a `/proc/<pid>/stat` line (the process's own, not its
/// children's).
pub fn stat_cpu(stat: &str) -> anyhow::Result<Duration> {
    let stat = ProcStat::parse(stat)?;
    Ok(ticks(stat.utime + stat.stime))
}

/// USER_HZ is 100 on every Linux architecture Orbit builds for.
fn ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 10)
}

/// The fields of `/proc/<pid>/stat` the CPU readings use, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    /// What the children it has waited for used (theirs and their own children's).
    cutime: u64,
    cstime: u64,
}

impl ProcStat {
    fn parse(stat: &str) -> anyhow::Result<Self> {
        // Fields after the parenthesised command name: ppid is the 2nd, utime, stime, cutime
        // and cstime the 12th to 15th.
        let rest = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        anyhow::ensure!(fields.len() > 14, "malformed stat: {stat}");
        Ok(ProcStat {
            ppid: fields[1].parse()?,
            utime: fields[11].parse()?,
            stime: fields[12].parse()?,
            cutime: fields[13].parse()?,
            cstime: fields[14].parse()?,
        })
    }

    fn all_ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// CPU time of process `root` and of all its descendants, those alive and those it (or they)
/// already waited for: for a PostgreSQL server, its postmaster and every backend and
/// background process, including backends whose connection closed meanwhile. A backend that
/// ends between two readings moves from the live sum into the postmaster's `cutime`/`cstime`
/// whole, so the difference of two readings is what the server used between them.
pub fn tree_cpu_time(root: u32) -> anyhow::Result<Duration> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if let Ok(stat) = ProcStat::parse(&text) {
                procs.push((pid, stat));
            }
        }
    }
    anyhow::ensure!(
        procs.iter().any(|(pid, _)| *pid == root),
        "process {root} is not running"
    );
    Ok(ticks(tree_ticks(root, &procs)))
}

/// The ticks of `root` and its descendants among `procs`.
fn tree_ticks(root: u32, procs: &[(u32, ProcStat)]) -> u64 {
    let mut total = 0;
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for (pid, stat) in procs {
            if *pid == parent {
                total += stat.all_ticks();
            }
            if stat.ppid == parent && *pid != parent {
                parents.push(*pid);
            }
        }
    }
    total
}

/// Busy CPU time of the whole machine (every core), for attributing what the services used.
pub fn machine_busy() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let values: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| values.get(i))
        .sum();
    Ok(Duration::from_millis(busy * 10))
}

/// An organization with a directory and a token of its own.
#[derive(Clone)]
pub struct Tenant {
    pub org: Uuid,
    pub dir: Uuid,
    pub token: String,
}

pub struct Orbit {
    pub kind: StackKind,
    pub base: String,
    pub client: reqwest::Client,
    pub tenant: Tenant,
    pub gateway: Child,
    pub workers: Vec<Child>,
    /// The database servers the stack writes to (none on the embedded stack).
    pub nodes: Vec<Node>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    /// Set when the measurement succeeded: only then do data and logs go with the run.
    succeeded: AtomicBool,
    // Dropped after the processes (field order): the services outlive their clients.
    stack: Option<DistributedStack>,
}

impl Orbit {
    /// Starts a gateway (and `workers` orbit-worker processes on the distributed stack) with
    /// their defaults plus `extra` settings, and bootstraps a tenant.
    pub async fn start(
        kind: StackKind,
        work: &Path,
        workers: usize,
        extra: &[(String, String)],
    ) -> anyhow::Result<Self> {
        Self::start_on(kind, None, work, workers, extra).await
    }

    /// As [`Orbit::start`]; with `citus`, the distributed stack's database is a fresh schema on
    /// that Citus cluster (the test kit's, `ORBIT_TEST_CITUS_URL`) instead of a fresh database
    /// on the test PostgreSQL, whatever `ORBIT_TEST_DATABASE` says: the benchmark measures
    /// both.
    pub async fn start_on(
        kind: StackKind,
        citus: Option<&Cluster>,
        work: &Path,
        workers: usize,
        extra: &[(String, String)],
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            citus.is_none() || kind == StackKind::Distributed,
            "only the distributed stack runs on Citus"
        );
        let dir = work.join(format!("{}-{}", kind.name(), Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let stack = match kind {
            StackKind::Distributed => Some(DistributedStack {
                database: match citus {
                    Some(_) => TestDatabase::citus().await,
                    None => TestDatabase::create().await,
                },
                bucket: TestBucket::create().await,
                queue: TestQueue::new(),
            }),
            StackKind::Embedded => None,
        };
        let nodes = match (&stack, citus) {
            (None, _) => Vec::new(),
            (Some(_), None) => vec![Node::postgres()],
            (Some(_), Some(cluster)) => cluster.nodes.clone(),
        };
        let mut env = match &stack {
            Some(stack) => stack.env(),
            None => vec![
                (
                    "ORBIT__DATABASE__URL".into(),
                    format!("sqlite://{}/orbit.db", dir.display()),
                ),
                (
                    "ORBIT__OBJECT_STORE__URL".into(),
                    format!("file://{}/objects", dir.display()),
                ),
            ],
        };
        env.push(("ORBIT__HTTP__LISTEN".into(), format!("127.0.0.1:{port}")));
        env.push(("RUST_LOG".into(), "warn".into()));
        env.extend(extra.iter().cloned());

        if kind == StackKind::Distributed {
            gateway_command(&env, &["migrate"]).await?;
        }
        let mut orbit = Orbit {
            kind,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            tenant: Tenant {
                org: Uuid::nil(),
                dir: Uuid::nil(),
                token: String::new(),
            },
            gateway: spawn(
                &binary("orbit-gateway")?,
                &[],
                &env,
                &dir.join("gateway.log"),
            )?,
            workers: Vec::new(),
            nodes,
            env,
            dir,
            succeeded: AtomicBool::new(false),
            stack,
        };
        orbit.wait_ready().await?;
        orbit.tenant = orbit.add_tenant().await?;
        if kind == StackKind::Distributed {
            for i in 0..workers {
                let log = orbit.dir.join(format!("worker-{i}.log"));
                orbit
                    .workers
                    .push(spawn(&binary("orbit-worker")?, &[], &orbit.env, &log)?);
            }
        }
        Ok(orbit)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = self
                .client
                .get(format!("{}/readyz", self.base))
                .send()
                .await
            {
                if r.status() == StatusCode::OK {
                    return Ok(());
                }
            }
            if let Some(status) = self.gateway.try_wait()? {
                bail!(
                    "the gateway exited ({status}); see {}",
                    self.dir.join("gateway.log").display()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the gateway was not ready within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `orbit-gateway admin …` against the same backends and returns its JSON.
    async fn admin(&self, args: &[&str]) -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(
            &gateway_command(&self.env, args).await?,
        )?)
    }

    /// Another organization, with a directory and a token, as `admin bootstrap` makes them
    /// (the stack's own tenant is the first).
    pub async fn add_tenant(&self) -> anyhow::Result<Tenant> {
        let out = self.admin(&["admin", "bootstrap"]).await?;
        Ok(Tenant {
            org: out["organization_id"].as_str().context("org")?.parse()?,
            dir: out["directory_id"].as_str().context("dir")?.parse()?,
            token: out["token"].as_str().context("token")?.to_owned(),
        })
    }

    fn dir_url(&self, tenant: &Tenant, dir: Uuid, rest: &str) -> String {
        format!(
            "{}/v2/organizations/{}/directories/{dir}{rest}",
            self.base, tenant.org
        )
    }

    pub async fn create_directory(&self, name: &str) -> anyhow::Result<Uuid> {
        self.create_directory_as(&self.tenant, name).await
    }

    /// Creates a directory in `tenant`'s organization.
    pub async fn create_directory_as(&self, tenant: &Tenant, name: &str) -> anyhow::Result<Uuid> {
        let response = self
            .client
            .post(format!(
                "{}/v2/organizations/{}/directories",
                self.base, tenant.org
            ))
            .bearer_auth(&tenant.token)
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == StatusCode::CREATED,
            "create directory: {}",
            response.status()
        );
        let body: Value = response.json().await?;
        Ok(body["id"].as_str().context("id")?.parse()?)
    }

    /// Uploads `body` (already in memory) to `dir`: the status and JSON body.
    pub async fn upload_bytes(
        &self,
        dir: Uuid,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let form = Form::new().part("file", Part::bytes(body).file_name("contacts.csv"));
        self.send_upload(&self.tenant, dir, form).await
    }

    /// Streams the file at `path` to directory `dir`.
    pub async fn upload_file(&self, dir: Uuid, path: &Path) -> anyhow::Result<(StatusCode, Value)> {
        self.upload_file_as(&self.tenant, dir, path).await
    }

    /// Streams the file at `path` to directory `dir` of `tenant`'s organization.
    pub async fn upload_file_as(
        &self,
        tenant: &Tenant,
        dir: Uuid,
        path: &Path,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
        let part = Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
            .file_name("contacts.csv")
            .mime_str("text/csv")?;
        self.send_upload(tenant, dir, Form::new().part("file", part))
            .await
    }

    async fn send_upload(
        &self,
        tenant: &Tenant,
        dir: Uuid,
        form: Form,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let response = self
            .client
            .post(self.dir_url(tenant, dir, "/sources/csv-upload"))
            .bearer_auth(&tenant.token)
            .multipart(form)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Polls the source (of directory `dir`) until it is completed (an error if it failed or
    /// `within` passes).
    pub async fn wait_completed(
        &mut self,
        dir: Uuid,
        source: &str,
        within: Duration,
    ) -> anyhow::Result<Value> {
        let tenant = self.tenant.clone();
        let poll = Duration::from_millis(100);
        self.wait_completed_as(&tenant, dir, source, within, poll)
            .await
    }

    /// As [`Orbit::wait_completed`], for a source of `tenant`'s organization, asking every
    /// `poll`.
    pub async fn wait_completed_as(
        &mut self,
        tenant: &Tenant,
        dir: Uuid,
        source: &str,
        within: Duration,
        poll: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let body = self.source(tenant, dir, source).await?;
            match body["source_status"].as_str() {
                Some("completed") => return Ok(body),
                Some("failed") => bail!("the source failed: {body}"),
                _ => {}
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "not completed within {within:?}: {body}"
            );
            self.ensure_running()?;
            tokio::time::sleep(poll).await;
        }
    }

    /// The source `source` of directory `dir` of `tenant`'s organization, as `GET` shows it.
    pub async fn source(&self, tenant: &Tenant, dir: Uuid, source: &str) -> anyhow::Result<Value> {
        let url = self.dir_url(tenant, dir, &format!("/sources/{source}"));
        Ok(self
            .client
            .get(&url)
            .bearer_auth(&tenant.token)
            .send()
            .await?
            .json()
            .await?)
    }

    /// Fails fast when a process died instead of waiting out a deadline.
    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.gateway.try_wait()? {
            bail!("the gateway exited ({status}); see {}", self.dir.display());
        }
        for worker in &mut self.workers {
            if let Some(status) = worker.try_wait()? {
                bail!("a worker exited ({status}); see {}", self.dir.display());
            }
        }
        Ok(())
    }

    /// The distributed stack's database, as its processes reach it.
    pub fn database_url(&self) -> Option<&str> {
        self.stack.as_ref().map(|s| s.database.url.as_str())
    }

    /// The settings every process of this stack runs with, as `ORBIT__…` variables.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Marks the measurement a success; a run that ends any other way keeps its logs.
    pub fn succeeded(&self) {
        self.succeeded.store(true, Ordering::Relaxed);
    }

    /// Gateway and worker CPU time so far.
    pub fn cpu(&self) -> anyhow::Result<(Duration, Duration)> {
        let workers = self
            .workers
            .iter()
            .map(cpu_time)
            .sum::<anyhow::Result<Duration>>()?;
        Ok((cpu_time(&self.gateway)?, workers))
    }
}

impl Drop for Orbit {
    fn drop(&mut self) {
        for child in self.workers.iter_mut().chain([&mut self.gateway]) {
            let _ = child.start_kill();
        }
        if self.succeeded.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "orbit-bench: logs of the failed run kept in {}",
                self.dir.display()
            );
        }
    }
}

/// Runs `orbit-gateway <args>` to completion: its standard output.
async fn gateway_command(env: &[(String, String)], args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(binary("orbit-gateway")?)
        .args(args)
        .envs(env.iter().cloned())
        .env_remove("ORBIT_CONFIG")
        .stdin(Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "orbit-gateway {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn spawn(
    binary: &Path,
    args: &[&str],
    env: &[(String, String)],
    log: &Path,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(binary)
        .args(args)
        .envs(env.iter().cloned())
        .env_remove("ORBIT_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))
}

/// The CPU time of the PostgreSQL backends connected to the stack's own database: those of
/// the gateway's and the workers' pools. Unlike the server's whole process tree
/// ([`crate::node`]), it leaves out whatever else the server does meanwhile, such as another
/// checkout's test suite on the same PostgreSQL.
pub struct BackendsMark {
    admin: String,
    database: String,
    cpu: HashMap<u32, Duration>,
}

impl BackendsMark {
    pub async fn new(orbit: &Orbit) -> anyhow::Result<Self> {
        let url = orbit.database_url().context("not a distributed stack")?;
        let database = reqwest::Url::parse(url)?
            .path()
            .trim_start_matches('/')
            .to_owned();
        let admin = orbit
            .nodes
            .first()
            .context("no database server")?
            .url
            .clone();
        let cpu = backends_cpu(&admin, &database).await?;
        Ok(BackendsMark {
            admin,
            database,
            cpu,
        })
    }

    /// Their CPU time since the mark. A backend that started since counts whole (a new pool
    /// connection); one that ended since is lost (pools keep theirs for minutes).
    pub async fn since(&self) -> anyhow::Result<Duration> {
        let now = backends_cpu(&self.admin, &self.database).await?;
        Ok(now
            .iter()
            .map(|(pid, cpu)| cpu.saturating_sub(self.cpu.get(pid).copied().unwrap_or_default()))
            .sum())
    }
}

async fn backends_cpu(admin: &str, database: &str) -> anyhow::Result<HashMap<u32, Duration>> {
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    let pids: Vec<(i32,)> = sqlx::query_as(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(&mut conn)
    .await?;
    conn.close().await?;
    let mut cpu = HashMap::new();
    for (pid,) in pids {
        let pid = pid as u32;
        // A backend may end between the query and the read.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            cpu.insert(pid, stat_cpu(&stat)?);
        }
    }
    Ok(cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with spaces and parentheses, as a backend's title can have.
        let line = "10790 (postgres: orbit (x) idle) S 10789 10789 10789 0 -1 4194560 120 0 0 0 \
                    311 42 7 3 20 0 1 0 5143 273932288 2660 18446744073709551615";
        assert_eq!(
            ProcStat::parse(line).unwrap(),
            ProcStat {
                ppid: 10789,
                utime: 311,
                stime: 42,
                cutime: 7,
                cstime: 3,
            }
        );
        assert!(ProcStat::parse("10790 (postgres) S 1 2").is_err());
    }

    #[test]
    fn a_tree_sums_its_live_processes_and_what_they_reaped() {
        let stat = |ppid, own, reaped| ProcStat {
            ppid,
            utime: own,
            stime: 0,
            cutime: reaped,
            cstime: 0,
        };
        let procs = [
            (1, stat(0, 1000, 0)),
            (100, stat(1, 5, 40)), // the postmaster, with 40 ticks of exited backends
            (101, stat(100, 7, 0)),
            (102, stat(100, 11, 0)),
            (103, stat(102, 13, 0)), // a child of a backend
            (200, stat(1, 17, 0)),   // another server
        ];
        assert_eq!(tree_ticks(100, &procs), 5 + 40 + 7 + 11 + 13);
        assert_eq!(tree_ticks(200, &procs), 17);
        assert_eq!(tree_ticks(999, &procs), 0);
    }

    #[test]
    fn this_process_tree_has_cpu_time() {
        let pid = std::process::id();
        assert!(tree_cpu_time(pid).is_ok());
        assert!(tree_cpu_time(u32::MAX).is_err());
    }
}
