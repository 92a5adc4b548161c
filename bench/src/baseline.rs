//! The baselines Orbit is measured against: `psql \copy` and `pgloader` loading the same file,
//! on the same server, into a table keyed the way a directory's contacts would be: an identity
//! primary key, a constant directory column, and a unique `(directory_id, email)` index.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use orbit_testkit::TestDatabase;
use sqlx::Connection;

use crate::generate::HEADER;
use crate::wal;

/// What one baseline load measured.
pub struct Load {
    /// Wall time of the loader process.
    pub took: Duration,
    /// WAL the server wrote during it.
    pub wal_bytes: u64,
}

fn columns() -> Vec<&'static str> {
    HEADER.split(',').collect()
}

/// Creates `table`: a generated identity primary key, a directory column that defaults to one
/// constant id (the whole file goes to one directory, as in Orbit's runs), every CSV column as
/// text, and the unique `(directory_id, email)` index. Both loaders name the CSV columns, so the
/// key and the directory come from their defaults.
async fn create_table(db: &TestDatabase, table: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let cols: Vec<String> = columns().iter().map(|c| format!("{c} TEXT")).collect();
    sqlx::query(&format!(
        "CREATE TABLE {table} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         directory_id UUID NOT NULL DEFAULT '{}', {})",
        uuid::Uuid::new_v4(),
        cols.join(", ")
    ))
    .execute(&mut conn)
    .await?;
    sqlx::query(&format!(
        "CREATE UNIQUE INDEX {table}_directory_email ON {table} (directory_id, email)"
    ))
    .execute(&mut conn)
    .await?;
    // Each load starts from a clean slate, not paying for the previous one's dirty pages.
    sqlx::query("CHECKPOINT").execute(&mut conn).await?;
    Ok(())
}

async fn truncate(db: &TestDatabase, table: &str) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    sqlx::query(&format!("TRUNCATE {table}"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

async fn count(db: &TestDatabase, table: &str) -> anyhow::Result<i64> {
    let mut conn = sqlx::PgConnection::connect(&db.url).await?;
    let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(&mut conn)
        .await?;
    Ok(n)
}

async fn run(command: &mut tokio::process::Command, what: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = command
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {what}"))?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(took)
}

/// `psql \copy` of `csv` into a fresh indexed table.
pub async fn psql_copy(db: &TestDatabase, csv: &Path, rows: u64) -> anyhow::Result<Load> {
    create_table(db, "contacts_copy").await?;
    let copy = format!(
        "\\copy contacts_copy ({}) FROM '{}' WITH (FORMAT csv, HEADER true)",
        columns().join(", "),
        csv.display()
    );
    let mark = wal::mark().await?;
    let took = run(
        tokio::process::Command::new("psql").args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &db.url,
            "-c",
            &copy,
        ]),
        "psql \\copy",
    )
    .await?;
    let wal_bytes = mark.bytes_since().await?;
    let loaded = count(db, "contacts_copy").await?;
    anyhow::ensure!(loaded == rows as i64, "psql loaded {loaded} rows of {rows}");
    Ok(Load { took, wal_bytes })
}

/// `pgloader` with its default batch and concurrency settings, into a fresh indexed table.
pub async fn pgloader(
    db: &TestDatabase,
    csv: &Path,
    rows: u64,
    work: &Path,
) -> anyhow::Result<Load> {
    create_table(db, "contacts_pgloader").await?;
    let cols = columns().join(", ");
    let script = format!(
        "LOAD CSV\n  FROM '{csv}' ({cols})\n  INTO {url}?contacts_pgloader ({cols})\n  \
         WITH skip header = 1, fields optionally enclosed by '\"', fields escaped by double-quote,\n       \
         fields terminated by ',';\n",
        csv = csv.display(),
        url = db.url.replacen("postgres://", "postgresql://", 1),
    );
    let load = work.join("contacts.load");
    std::fs::write(&load, script)?;
    // Debian's pgloader 3.6.9 sometimes dies at start-up, before loading anything, with
    // "Failed to start the monitor thread" (a race in its logger, dimitri/pgloader#1380): such
    // a run is retried against the emptied table; any other failure is an error.
    let mut attempt = 1;
    let mut mark = wal::mark().await?;
    let took = loop {
        let result = run(
            tokio::process::Command::new("pgloader")
                .arg("--quiet")
                .arg("--root-dir")
                .arg(work.join("pgloader"))
                .arg(&load),
            "pgloader",
        )
        .await;
        match result {
            Err(e)
                if attempt < 3 && e.to_string().contains("Failed to start the monitor thread") =>
            {
                eprintln!("pgloader failed to start (attempt {attempt}); retrying");
                truncate(db, "contacts_pgloader").await?;
                mark = wal::mark().await?;
                attempt += 1;
            }
            other => break other?,
        }
    };
    let wal_bytes = mark.bytes_since().await?;
    let loaded = count(db, "contacts_pgloader").await?;
    anyhow::ensure!(
        loaded == rows as i64,
        "pgloader loaded {loaded} rows of {rows}; see {}",
        work.join("pgloader").display()
    );
    Ok(Load { took, wal_bytes })
}
