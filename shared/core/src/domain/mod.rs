//! The domain rules, written once and free of any backend: CSV splitting with byte offsets
//! (`csv`), header matching (`header`), value normalization (`normalize`), per-row validation
//! (`row`), profile resolution and merging (`resolve`) under an upload's merge rules
//! (`merge`), and which waiting directory a worker serves next (`fair`).

pub mod csv;
pub mod fair;
pub mod header;
pub mod merge;
pub mod normalize;
pub mod resolve;
pub mod row;

/// A file-level problem: the upload is rejected with `422 invalid_csv` and nothing is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCsv(pub String);
