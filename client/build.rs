//! Puts the commit into `orbit --version`, detected as the gateway and worker detect theirs.
include!("../gateway/build.rs");
