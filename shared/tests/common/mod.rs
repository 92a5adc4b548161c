//! The store suites' harness: a fresh store on either backend, kept alive (and cleaned up)
//! by its guard, and the runners `orbit_shared::conformance!` calls each case with.

use std::sync::Arc;
use std::time::Duration;

use orbit_shared::config::DatabaseSettings;
use orbit_shared::store::{self, Store};
use orbit_shared::testing::TestDatabase;

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
    let database = TestDatabase::create().await;
    let store = store::open(&DatabaseSettings::for_url(&database.url, 10))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    Backend {
        store,
        _guard: Guard::Postgres(database),
    }
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
