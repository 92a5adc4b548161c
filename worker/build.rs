// The same commit detection as the gateway's, so both binaries report one build.
include!("../gateway/build.rs");
