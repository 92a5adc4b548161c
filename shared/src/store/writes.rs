//! What materializing a chunk writes, worked out once for every backend: duplicates within the
//! batch, profile resolution, and the rows to insert. Backends only load what this needs and
//! store what it returns.

use std::collections::{BTreeMap, HashMap, HashSet};

use uuid::Uuid;

use super::rows::Applied;
use super::StoreResult;
use crate::domain::resolve::{self, Existing};
use crate::domain::row::{self, Issue};
use crate::model::{ChunkResults, Source};

pub(super) struct RecordWrite {
    pub row_number: i64,
    pub line_number: i64,
    pub profile_id: Uuid,
    pub email: Option<String>,
    pub linkedin_url: Option<String>,
    pub phone: Option<String>,
    pub fields: String,
    pub attributes: String,
}

pub(super) struct IssueWrite {
    pub row_number: i64,
    pub line_number: i64,
    pub issue: Issue,
}

pub(super) struct FailedWrite {
    pub row_number: i64,
    pub line_number: i64,
    pub fields: String,
    pub error_code: &'static str,
    pub error_message: String,
}

pub(super) struct Writes {
    /// New profiles and changed ones, with their state as JSON.
    pub created: Vec<(Uuid, String)>,
    pub updated: Vec<(Uuid, String)>,
    /// (kind, value, profile) identities to claim.
    pub identities: Vec<(String, String, Uuid)>,
    pub records: Vec<RecordWrite>,
    pub issues: Vec<IssueWrite>,
    pub failed: Vec<FailedWrite>,
    pub applied: Applied,
}

/// The distinct identity values of a batch, by kind: what the backend must look up.
pub(super) fn identity_lookups(results: &ChunkResults) -> Vec<(&'static str, Vec<String>)> {
    resolve::IDENTITY_KINDS
        .iter()
        .map(|kind| {
            let values: HashSet<&String> = results
                .accepted
                .iter()
                .filter_map(|r| r.fields.get(*kind))
                .collect();
            (*kind, values.into_iter().cloned().collect())
        })
        .collect()
}

/// The profiles the loaded identities point at: what the backend loads next.
pub(super) fn owners_to_load(existing: &Existing) -> Vec<Uuid> {
    let owners: HashSet<Uuid> = existing.owners.values().copied().collect();
    owners.into_iter().collect()
}

pub(super) fn plan_writes(
    mut results: ChunkResults,
    mut existing: Existing,
    source: &Source,
) -> StoreResult<Writes> {
    row::flag_duplicates_in_batch(&mut results.accepted);
    let plan = resolve::resolve_batch(&mut existing, &results.accepted, source.seq, Uuid::now_v7);
    let state_json =
        |m: BTreeMap<Uuid, resolve::ProfileState>| -> StoreResult<Vec<(Uuid, String)>> {
            m.into_iter()
                .map(|(id, state)| Ok((id, serde_json::to_string(&state)?)))
                .collect()
        };
    let assignments: HashMap<u64, Uuid> = plan.assignments.iter().copied().collect();
    let mut resolution_warnings: BTreeMap<u64, Vec<Issue>> = BTreeMap::new();
    for (row_number, issue) in plan.warnings {
        resolution_warnings
            .entry(row_number)
            .or_default()
            .push(issue);
    }
    let mut records = Vec::with_capacity(results.accepted.len());
    let mut issues = Vec::new();
    let mut warned_rows = 0u64;
    for record in results.accepted.iter_mut() {
        let extra = resolution_warnings
            .remove(&record.row_number)
            .unwrap_or_default();
        record.warnings.extend(extra);
        if !record.warnings.is_empty() {
            warned_rows += 1;
        }
        let (row_number, line_number) = (record.row_number as i64, record.line_number as i64);
        issues.extend(record.warnings.drain(..).map(|issue| IssueWrite {
            row_number,
            line_number,
            issue,
        }));
        records.push(RecordWrite {
            row_number,
            line_number,
            profile_id: assignments[&record.row_number],
            email: record.fields.get("email").cloned(),
            linkedin_url: record.fields.get("linkedin_url").cloned(),
            phone: record.fields.get("phone").cloned(),
            fields: serde_json::to_string(&record.fields)?,
            attributes: serde_json::to_string(&record.attributes)?,
        });
    }
    let mut failed = Vec::with_capacity(results.failed.len());
    for f in results.failed {
        let (row_number, line_number) = (f.row_number as i64, f.line_number as i64);
        failed.push(FailedWrite {
            row_number,
            line_number,
            fields: serde_json::to_string(&f.fields)?,
            error_code: f.error.code.as_str(),
            error_message: f.error.message.clone(),
        });
        issues.push(IssueWrite {
            row_number,
            line_number,
            issue: f.error,
        });
    }
    Ok(Writes {
        created: state_json(plan.created)?,
        updated: state_json(plan.updated)?,
        identities: plan.new_identities,
        applied: Applied {
            accepted: records.len() as u64,
            failed: failed.len() as u64,
            warnings: warned_rows,
        },
        records,
        issues,
        failed,
    })
}
