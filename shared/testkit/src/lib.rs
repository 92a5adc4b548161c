//! `orbit-testkit`: what Orbit's test suites share. Only ever a dev-dependency (the
//! benchmark, test tooling itself, is the one other user), so `cargo tree -e normal -p
//! orbit-gateway` shows none of it.
//!
//! - [`services`] (re-exported here): a fresh PostgreSQL database (or a schema on the Citus
//!   cluster), S3 bucket and RabbitMQ queue per test, and `orbit-worker` processes on them.
//! - [`gateway`]: the embedded-gateway harness ([`gateway::TestApp`]): a real gateway on
//!   127.0.0.1:0 with a fresh tenant, on the embedded stack or, with
//!   `ORBIT_TEST_STACK=distributed`, on PostgreSQL (Citus with `ORBIT_TEST_DATABASE=citus`),
//!   S3 and RabbitMQ with two workers.
//! - [`proxy`]: a loopback TCP proxy that breaks connections on purpose.
//! - [`conformance!`]: one test per (backend, case) pair of a conformance suite.

pub mod gateway;
pub mod proxy;
pub mod services;

pub use services::*;

/// A conformance suite: every case run against every backend, as one test per pair in a
/// module per backend. A backend is a `runner!` macro of the test file that runs one case
/// (`$case` is the case function's path) on a fresh instance of that backend:
///
/// ```ignore
/// macro_rules! on_sqlite {
///     ($case:path) => { $case(super::sqlite().await.store).await };
/// }
/// orbit_testkit::conformance!(sqlite => on_sqlite, postgres => on_postgres; { case_one, case_two });
/// ```
#[macro_export]
macro_rules! conformance {
    ($($backend:ident => $runner:ident),+ $(,)?; $cases:tt) => {
        $( $crate::conformance!(@backend $backend $runner $cases); )+
    };
    (@backend $backend:ident $runner:ident { $($case:ident),* $(,)? }) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    $runner!(super::$case);
                }
            )*
        }
    };
}
