//! The fuzz crate's suites, compiled as one test binary.
//!
//! - `properties`: the committed corpus replayed, then structured random cases per target.

mod properties;
