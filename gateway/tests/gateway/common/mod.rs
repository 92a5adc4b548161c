//! The harness and the proxy are the test kit's (`orbit_testkit::gateway`,
//! `orbit_testkit::proxy`), shared with the client's suites.

pub use orbit_testkit::gateway::*;
pub use orbit_testkit::proxy::{Fault, Proxy};
