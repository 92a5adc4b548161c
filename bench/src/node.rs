//! The PostgreSQL servers an Orbit stack writes to: the test PostgreSQL, or each node of a Citus
//! cluster. Around an ingest the benchmark checkpoints each one, then reads its WAL position and
//! the CPU time of its processes before and after. The servers must run on this machine: their
//! CPU time comes from /proc.

use std::time::Duration;

use anyhow::Context;
use orbit_testkit::postgres_admin_url;
use sqlx::Connection;

use crate::orbit::tree_cpu_time;
use crate::wal::{self, WalMark};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What the figures call it: `postgres`, `coordinator`, `worker 1`…
    pub name: String,
    /// A superuser's URL: checkpoints, WAL positions and `data_directory` need one.
    pub url: String,
}

impl Node {
    /// The test PostgreSQL (`ORBIT_TEST_POSTGRES_URL`), where a distributed stack's fresh
    /// database is.
    pub fn postgres() -> Self {
        Node {
            name: "postgres".into(),
            url: postgres_admin_url(),
        }
    }

    /// `host:port`, for the results.
    pub fn address(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(url) => format!(
                "{}:{}",
                url.host_str().unwrap_or_default(),
                url.port().unwrap_or(5432)
            ),
            Err(_) => String::new(),
        }
    }

    async fn connect(&self) -> anyhow::Result<sqlx::PgConnection> {
        sqlx::PgConnection::connect(&self.url)
            .await
            .with_context(|| format!("cannot connect to {} ({})", self.name, self.address()))
    }

    /// So that a load starts without the previous one's dirty pages to write back.
    pub async fn checkpoint(&self) -> anyhow::Result<()> {
        sqlx::query("CHECKPOINT")
            .execute(&mut self.connect().await?)
            .await?;
        Ok(())
    }

    /// The server's postmaster: the first line of `postmaster.pid` in its data directory.
    async fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let (dir,): (String,) = sqlx::query_as("SHOW data_directory")
            .fetch_one(&mut self.connect().await?)
            .await?;
        let path = std::path::Path::new(&dir).join("postmaster.pid");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} of {}: the server must run on this machine",
                path.display(),
                self.name
            )
        })?;
        postmaster_pid(&text)
            .with_context(|| format!("{}: no pid on its first line", path.display()))
    }

    /// The WAL position and the CPU time of the server's processes, now.
    pub async fn mark(&self) -> anyhow::Result<NodeMark> {
        let pid = self.postmaster_pid().await?;
        Ok(NodeMark {
            node: self.clone(),
            wal: wal::mark_at(&self.url).await?,
            pid,
            cpu: tree_cpu_time(pid)?,
        })
    }
}

fn postmaster_pid(text: &str) -> Option<u32> {
    text.lines().next()?.trim().parse().ok()
}

/// A node's readings before a load.
pub struct NodeMark {
    node: Node,
    wal: WalMark,
    pid: u32,
    cpu: Duration,
}

impl NodeMark {
    /// What the node did since the mark.
    pub async fn since(&self) -> anyhow::Result<NodeUse> {
        let cpu = tree_cpu_time(self.pid)
            .with_context(|| format!("{} restarted during the load", self.node.name))?;
        Ok(NodeUse {
            name: self.node.name.clone(),
            address: self.node.address(),
            wal_bytes: self.wal.bytes_since().await?,
            cpu: cpu.saturating_sub(self.cpu),
        })
    }
}

/// What one node did during a load.
#[derive(Debug, Clone)]
pub struct NodeUse {
    pub name: String,
    pub address: String,
    pub wal_bytes: u64,
    /// CPU time of the postmaster and all its processes.
    pub cpu: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_postmaster_is_the_first_line_of_postmaster_pid() {
        let text = "10789\n/var/tmp/orbit-citus/node0\n1765082640\n9700\n/var/tmp/orbit-citus/node0\n127.0.0.1\n  9700001 0\nready\n";
        assert_eq!(postmaster_pid(text), Some(10789));
        assert_eq!(postmaster_pid(""), None);
        assert_eq!(postmaster_pid("x\n1\n"), None);
    }

    #[test]
    fn the_address_is_host_and_port() {
        let node = |url: &str| Node {
            name: "n".into(),
            url: url.into(),
        };
        assert_eq!(
            node("postgres://postgres@127.0.0.1:9701/orbit").address(),
            "127.0.0.1:9701"
        );
        assert_eq!(
            node("postgres://postgres@127.0.0.1/postgres").address(),
            "127.0.0.1:5432"
        );
    }
}
