//! The store suites' harness: a fresh store on SQLite, PostgreSQL or Citus, kept alive (and
//! cleaned up) by its guard, and the runners `orbit_testkit::conformance!` calls each case with.

use std::sync::Arc;
use std::time::Duration;

use orbit_config::DatabaseSettings;
use orbit_core::model::ChunkSpec;
use orbit_store::{self as store, Store};
use orbit_testkit::TestDatabase;
use uuid::Uuid;

pub const LEASE: Duration = Duration::from_secs(60);

/// A store plus whatever keeps its database alive; dropping it cleans up.
pub struct Backend {
    pub store: Arc<dyn Store>,
    _guard: Guard,
}

enum Guard {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] TestDatabase),
}

/// SQLite in a temporary file.
pub async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/orbit.db", dir.path().display());
    let store = store::open(&DatabaseSettings::for_url(&url, 4))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Backend {
        store,
        _guard: Guard::Sqlite(dir),
    }
}

/// A fresh PostgreSQL database on `ORBIT_TEST_POSTGRES_URL`, dropped afterwards.
pub async fn postgres() -> Backend {
    on(TestDatabase::create().await).await
}

/// A fresh schema on the Citus cluster of `ORBIT_TEST_CITUS_URL`, dropped afterwards.
pub async fn citus() -> Backend {
    on(TestDatabase::citus().await).await
}

/// The store on `database`, migrated.
async fn on(database: TestDatabase) -> Backend {
    let store = store::open(&DatabaseSettings::for_url(&database.url, 10))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Backend {
        store,
        _guard: Guard::Postgres(database),
    }
}

/// A chunk of `row_count` rows from `first_row`, 100 bytes a row.
pub fn chunk(index: u32, first_row: u64, row_count: u64) -> ChunkSpec {
    ChunkSpec {
        index,
        first_row,
        row_count,
        start_offset: first_row * 100,
        end_offset: (first_row + row_count) * 100,
        start_line: first_row + 1,
    }
}

/// A new organization and a directory in it.
pub async fn tenant(store: &dyn Store) -> (Uuid, Uuid) {
    let org = store.create_organization("Acme").await.unwrap();
    let dir = store.create_directory(org.id, "Contacts").await.unwrap();
    (org.id, dir.id)
}

macro_rules! on_sqlite {
    ($case:path) => {
        $case(crate::common::sqlite().await.store).await
    };
}

macro_rules! on_postgres {
    ($case:path) => {
        $case(crate::common::postgres().await.store).await
    };
}

macro_rules! on_citus {
    ($case:path) => {
        $case(crate::common::citus().await.store).await
    };
}
