//! PostgreSQL's write-ahead log position, read before and after a load to count the WAL bytes
//! it wrote. The position is the server's, not one database's: on a shared server, whatever
//! else writes during the load is counted too.

use orbit_testkit::postgres_admin_url;
use sqlx::Connection;

/// A WAL position (`pg_lsn`, as text) on the server at `url`.
pub struct WalMark {
    url: String,
    lsn: String,
}

/// The test PostgreSQL's current WAL insert position.
pub async fn mark() -> anyhow::Result<WalMark> {
    mark_at(&postgres_admin_url()).await
}

/// The current WAL insert position of the server at `url`.
pub async fn mark_at(url: &str) -> anyhow::Result<WalMark> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let (lsn,): (String,) = sqlx::query_as("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut conn)
        .await?;
    Ok(WalMark {
        url: url.to_owned(),
        lsn,
    })
}

impl WalMark {
    /// WAL bytes written on the server since this mark (`pg_wal_lsn_diff`).
    pub async fn bytes_since(&self) -> anyhow::Result<u64> {
        let mut conn = sqlx::PgConnection::connect(&self.url).await?;
        let (bytes,): (i64,) =
            sqlx::query_as("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint")
                .bind(&self.lsn)
                .fetch_one(&mut conn)
                .await?;
        Ok(u64::try_from(bytes)?)
    }
}
