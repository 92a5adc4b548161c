//! The Citus phase: the distributed stack (the gateway, `--workers` workers, RabbitMQ and S3)
//! on a Citus cluster, a coordinator and its worker nodes (`deploy/citus.sh`, reached as the
//! test kit does: `ORBIT_TEST_CITUS_URL`), and on the test PostgreSQL, in the same run. Each
//! stack ingests the bulk file's rows into one directory, then the same rows split over
//! `--citus-dirs` directories, one upload per directory, all sent at once. Every run has a
//! fresh database (PostgreSQL) or schema (Citus: the test kit's `TestDatabase::citus`).
//!
//! Besides rows/s it reads, on every node, the WAL written per row and the CPU time of the
//! node's processes during the import: the coordinator's share of the cluster's CPU says how
//! much of the work passes through the one node that does not scale out.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use sqlx::Connection;
use uuid::Uuid;

use orbit_testkit::citus_url;

use crate::node::{Node, NodeUse};
use crate::orbit::{Orbit, StackKind};
use crate::{generate, measure_uploads, report_ingest, Args, Ingest, Upload};

/// The stacks the phase runs on, in order.
pub const STACKS: [&str; 2] = ["plain", "citus"];

/// A Citus cluster as its coordinator sees it.
pub struct Cluster {
    /// The coordinator first, then each active primary worker node.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// The test kit's cluster (`ORBIT_TEST_CITUS_URL`, a superuser of the coordinator's database
    /// with the citus extension); its worker nodes are those of `pg_dist_node`, reached with
    /// the coordinator URL's user and database.
    pub async fn connect() -> anyhow::Result<Self> {
        let url = &citus_url();
        let mut conn = sqlx::PgConnection::connect(url).await.with_context(|| {
            format!("no Citus coordinator at {url}: start one with `bash deploy/citus.sh`")
        })?;
        let citus: Option<(String,)> =
            sqlx::query_as("SELECT extversion FROM pg_extension WHERE extname = 'citus'")
                .fetch_optional(&mut conn)
                .await?;
        anyhow::ensure!(
            citus.is_some(),
            "{url} has no citus extension: `bash deploy/citus.sh` prints a coordinator's URL"
        );
        let workers: Vec<(String, i32)> = sqlx::query_as(
            "SELECT nodename::text, nodeport FROM pg_dist_node \
             WHERE groupid <> 0 AND noderole = 'primary' AND isactive ORDER BY nodeid",
        )
        .fetch_all(&mut conn)
        .await?;
        anyhow::ensure!(
            !workers.is_empty(),
            "the coordinator at {url} has no worker node"
        );
        let mut nodes = vec![Node {
            name: "coordinator".into(),
            url: url.to_owned(),
        }];
        for (i, (host, port)) in workers.iter().enumerate() {
            nodes.push(Node {
                name: format!("worker {}", i + 1),
                url: node_url(url, host, u16::try_from(*port)?)?,
            });
        }
        Ok(Cluster { nodes })
    }
}

/// Where Citus put a stack's tables, in the schema a connection by the stack's URL uses: how
/// many it distributes by hash, keeps as reference tables (a copy on every node) and as Citus
/// local tables (on the coordinator only), and the shards of `sources` (every distributed table
/// is colocated with it).
struct Layout {
    schema: String,
    distributed: i64,
    reference: i64,
    local: i64,
    shards: i64,
}

async fn layout(database_url: &str) -> anyhow::Result<Layout> {
    let mut conn = sqlx::PgConnection::connect(database_url).await?;
    let (schema, distributed, reference, local, shards): (String, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT current_schema()::text, \
                count(*) FILTER (WHERE p.partmethod = 'h'), \
                count(*) FILTER (WHERE p.partmethod = 'n' AND p.repmodel = 't'), \
                count(*) FILTER (WHERE p.partmethod = 'n' AND p.repmodel = 's'), \
                (SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = to_regclass('sources')) \
         FROM pg_dist_partition p \
         JOIN pg_class c ON c.oid = p.logicalrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema()",
        )
        .fetch_one(&mut conn)
        .await?;
    Ok(Layout {
        schema,
        distributed,
        reference,
        local,
        shards,
    })
}

/// How many of `dirs` have their shards on each worker node (`host:port`), in node order.
async fn directories_per_node(
    database_url: &str,
    dirs: &[Uuid],
) -> anyhow::Result<Vec<(String, i64)>> {
    let mut conn = sqlx::PgConnection::connect(database_url).await?;
    Ok(sqlx::query_as(
        "SELECT n.nodename || ':' || n.nodeport, count(*) \
         FROM unnest($1::uuid[]) AS d(id) \
         JOIN pg_dist_placement p \
           ON p.shardid = get_shard_id_for_distribution_column('sources', d.id) \
         JOIN pg_dist_node n ON n.groupid = p.groupid \
         GROUP BY n.nodeid, n.nodename, n.nodeport ORDER BY n.nodeid",
    )
    .bind(dirs)
    .fetch_all(&mut conn)
    .await?)
}

/// `url` with another host and port.
fn node_url(url: &str, host: &str, port: u16) -> anyhow::Result<String> {
    let mut url = reqwest::Url::parse(url)?;
    url.set_host(Some(host))?;
    url.set_port(Some(port))
        .map_err(|()| anyhow::anyhow!("{url} cannot have a port"))?;
    Ok(url.into())
}

/// The coordinator's CPU time over all the nodes' (the coordinator is the first node).
fn coordinator_share(nodes: &[NodeUse]) -> Option<f64> {
    let total: Duration = nodes.iter().map(|n| n.cpu).sum();
    let first = nodes.first()?;
    (nodes.len() > 1 && !total.is_zero()).then(|| first.cpu.as_secs_f64() / total.as_secs_f64())
}

/// `1_dir`, `8_dirs`: the results' key for a run into `dirs` directories.
fn shape(dirs: usize) -> String {
    if dirs == 1 {
        "1_dir".into()
    } else {
        format!("{dirs}_dirs")
    }
}

/// Prints the line of a run's nodes (CPU time and WAL per row on each, the coordinator's share
/// of their CPU on a cluster): the share, when there is one.
fn report_nodes(rows: u64, i: &Ingest) -> Option<f64> {
    let each: Vec<String> = i
        .nodes
        .iter()
        .map(|n| {
            format!(
                "{} CPU {:.1} s, WAL {:.0} bytes/row",
                n.name,
                n.cpu.as_secs_f64(),
                n.wal_bytes as f64 / rows as f64
            )
        })
        .collect();
    let share = coordinator_share(&i.nodes);
    let total: Duration = i.nodes.iter().map(|n| n.cpu).sum();
    println!(
        "{:<22}nodes: {}{}",
        "",
        each.join("; "),
        share.map_or(String::new(), |s| format!(
            "; coordinator CPU share {:.0}% ({:.1} of {:.1} s on {} nodes)",
            s * 100.0,
            i.nodes[0].cpu.as_secs_f64(),
            total.as_secs_f64(),
            i.nodes.len()
        ))
    );
    share
}

/// Where a Citus run's data went.
struct Placement {
    layout: Layout,
    /// The run's directories on each worker node, by name.
    directories: Vec<(String, i64)>,
}

impl Placement {
    /// Prints the run's placement line: its part of the results.
    fn report(&self) -> Value {
        let l = &self.layout;
        println!(
            "{:<22}placement: tables distributed by directory {} ({} shards each), reference {}, Citus local (coordinator only) {}; directories per worker node: {}",
            "",
            l.distributed,
            l.shards,
            l.reference,
            l.local,
            self.directories
                .iter()
                .map(|(node, n)| format!("{node} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        json!({
            "schema": l.schema,
            "distributed_tables": l.distributed,
            "reference_tables": l.reference,
            "citus_local_tables": l.local,
            "shards_per_table": l.shards,
            "directories_per_node": self.directories.iter().map(|(node, n)| (node.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// One run: a fresh stack ingests `files` (each into a fresh directory of its own, or the one
/// file into the tenant's directory). On Citus, where its tables and directories went too.
async fn run_once(
    args: &Args,
    citus: Option<&Cluster>,
    files: &[(PathBuf, u64)],
) -> anyhow::Result<(Ingest, Option<Placement>)> {
    let mut orbit = Orbit::start_on(
        StackKind::Distributed,
        citus,
        &args.work_dir,
        args.workers,
        &args.orbit_env()?,
    )
    .await?;
    let database_url = orbit
        .database_url()
        .context("a distributed stack")?
        .to_owned();
    let layout = match citus {
        Some(_) => {
            let layout = layout(&database_url).await?;
            // Without distributed tables the run would measure PostgreSQL on the coordinator
            // (and if the URL's search_path did not reach the server, they are not where
            // Orbit's connections look).
            anyhow::ensure!(
                layout.distributed > 0 && layout.schema != "public",
                "`orbit-gateway migrate` distributed no table in schema {} on Citus",
                layout.schema
            );
            Some(layout)
        }
        None => None,
    };
    let dirs = if files.len() == 1 {
        vec![orbit.tenant.dir]
    } else {
        let mut dirs = Vec::new();
        for i in 0..files.len() {
            dirs.push(orbit.create_directory(&format!("part {}", i + 1)).await?);
        }
        dirs
    };
    let uploads: Vec<Upload> = files
        .iter()
        .zip(&dirs)
        .map(|((csv, rows), dir)| Upload {
            dir: *dir,
            csv,
            rows: *rows,
        })
        .collect();
    let ingest = measure_uploads(&mut orbit, &uploads).await?;
    let placement = match (citus, layout) {
        (Some(cluster), Some(layout)) => {
            let mut directories = Vec::new();
            for (address, n) in directories_per_node(&database_url, &dirs).await? {
                let node = cluster.nodes.iter().find(|node| node.address() == address);
                directories.push((node.map_or(address, |node| node.name.clone()), n));
            }
            Some(Placement {
                layout,
                directories,
            })
        }
        _ => None,
    };
    Ok((ingest, placement))
}

/// Runs the phase and prints a line per run and a line of its nodes: the results.json `citus`
/// object.
pub async fn run(args: &Args) -> anyhow::Result<Value> {
    let whole = args.work_dir.join(format!("contacts-{}.csv", args.rows));
    let rows = generate::write_csv(&whole, args.rows, u64::MAX)?.rows;
    let parts: Vec<PathBuf> = (1..=args.citus_dirs)
        .map(|i| {
            args.work_dir.join(format!(
                "contacts-{rows}-part-{i}-of-{}.csv",
                args.citus_dirs
            ))
        })
        .collect();
    let split = generate::write_csv_parts(&parts, rows)?;
    let shapes: [Vec<(PathBuf, u64)>; 2] = [
        vec![(whole, rows)],
        parts
            .iter()
            .cloned()
            .zip(split.iter().map(|g| g.rows))
            .collect(),
    ];

    let cluster = if args.citus_stacks.iter().any(|s| s == "citus") {
        Some(Cluster::connect().await?)
    } else {
        None
    };
    let on: Vec<String> = args
        .citus_stacks
        .iter()
        .map(|stack| match (stack.as_str(), &cluster) {
            ("citus", Some(c)) => format!(
                "Citus ({})",
                c.nodes
                    .iter()
                    .map(|n| format!("{} {}", n.name, n.address()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => format!("PostgreSQL ({})", Node::postgres().address()),
        })
        .collect();
    println!(
        "citus: {rows} rows into 1 directory, then into {} directories at once ({} rows each); gateway and {} workers on {}",
        args.citus_dirs,
        rows / args.citus_dirs as u64,
        args.workers,
        on.join(" and "),
    );

    let mut runs = serde_json::Map::new();
    let mut rates = std::collections::HashMap::new();
    for stack in STACKS {
        if !args.citus_stacks.iter().any(|s| s == stack) {
            continue;
        }
        let citus = if stack == "citus" {
            cluster.as_ref()
        } else {
            None
        };
        for files in &shapes {
            let (i, placement) = run_once(args, citus, files).await?;
            let dirs = files.len();
            let name = format!("  {stack}, {dirs} dir{}", if dirs == 1 { "" } else { "s" });
            let mut report = report_ingest(&name, rows, &i);
            if let Some(share) = report_nodes(rows, &i) {
                report["coordinator_cpu_share"] = json!(share);
            }
            if let Some(placement) = placement {
                report["placement"] = placement.report();
            }
            rates.insert((stack, dirs), rows as f64 / i.took.as_secs_f64());
            runs.insert(format!("{stack}_{}", shape(dirs)), report);
        }
    }
    let mut ratios = serde_json::Map::new();
    for dirs in [1, args.citus_dirs] {
        if let (Some(c), Some(p)) = (rates.get(&("citus", dirs)), rates.get(&("plain", dirs))) {
            println!(
                "ratio citus / plain, {}: {:.2}",
                shape(dirs).replace('_', " "),
                c / p
            );
            ratios.insert(shape(dirs), json!(c / p));
        }
    }
    for part in &parts {
        std::fs::remove_file(part)?;
    }
    Ok(json!({
        "rows": rows,
        "directories": args.citus_dirs,
        "coordinator": cluster.as_ref().map(|c| c.nodes[0].address()),
        "runs": runs,
        "ratio_citus_to_plain": ratios,
    }))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use sqlx::postgres::PgConnectOptions;

    use super::*;

    #[test]
    fn sqlx_passes_the_search_path_of_a_citus_test_database_url() {
        // The shape of `TestDatabase::citus`'s URL, which Orbit's processes connect by.
        let url = "postgres://postgres@127.0.0.1:9700/orbit?application_name=s1\
                   &options=-c%20search_path%3Ds1%20-c%20citus.shard_count%3D4";
        let options = PgConnectOptions::from_str(url).unwrap();
        assert_eq!(
            options.get_options(),
            Some("-c search_path=s1 -c citus.shard_count=4")
        );
        assert_eq!(options.get_database(), Some("orbit"));
        // The store adds its own settings after them (PgStore::open): all reach the server.
        let options = options.options([("lock_timeout", "15s")]);
        assert_eq!(
            options.get_options(),
            Some("-c search_path=s1 -c citus.shard_count=4 -c lock_timeout=15s")
        );
    }

    #[test]
    fn worker_nodes_are_reached_like_the_coordinator() {
        assert_eq!(
            node_url(
                "postgres://postgres@127.0.0.1:9700/orbit",
                "127.0.0.1",
                9701
            )
            .unwrap(),
            "postgres://postgres@127.0.0.1:9701/orbit"
        );
        assert_eq!(
            node_url(
                "postgres://orbit:secret@coordinator/orbit",
                "worker-2",
                5432
            )
            .unwrap(),
            "postgres://orbit:secret@worker-2:5432/orbit"
        );
    }

    #[test]
    fn the_coordinator_share_is_of_every_node_cpu() {
        let node = |name: &str, secs: u64| NodeUse {
            name: name.into(),
            address: String::new(),
            wal_bytes: 0,
            cpu: Duration::from_secs(secs),
        };
        let share = coordinator_share(&[
            node("coordinator", 10),
            node("worker 1", 20),
            node("worker 2", 10),
        ])
        .unwrap();
        assert!((share - 0.25).abs() < 1e-9, "{share}");
        // Plain PostgreSQL is one node: no share to speak of.
        assert_eq!(coordinator_share(&[node("postgres", 10)]), None);
        assert_eq!(coordinator_share(&[node("c", 0), node("w", 0)]), None);
        assert_eq!(coordinator_share(&[]), None);
    }

    #[test]
    fn shapes_name_the_directories() {
        assert_eq!(shape(1), "1_dir");
        assert_eq!(shape(8), "8_dirs");
    }
}
