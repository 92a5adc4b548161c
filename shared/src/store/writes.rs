//! What materializing a chunk writes, worked out once for every backend: duplicates within the
//! batch, profile resolution, and the rows to insert. Backends only load what this needs and
//! store what it returns.

use std::collections::{BTreeMap, HashMap, HashSet};

use uuid::Uuid;

use super::rows::Applied;
use super::StoreResult;
use crate::domain::resolve::{self, Existing};
use crate::domain::row::{self, Issue, RecordDraft};
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

/// A chunk's results with everything that does not depend on other chunks worked out:
/// duplicates within the batch, the records' and failed rows' JSON. Backends prepare before
/// they serialize on the directory, so that the critical section only resolves profiles.
pub(super) struct Prepared {
    accepted: Vec<RecordDraft>,
    /// One per accepted record, in the same order; `profile_id` is set by [`plan_writes`].
    records: Vec<RecordWrite>,
    failed: Vec<FailedWrite>,
    failed_issues: Vec<IssueWrite>,
}

pub(super) fn prepare(mut results: ChunkResults) -> StoreResult<Prepared> {
    row::flag_duplicates_in_batch(&mut results.accepted);
    let mut records = Vec::with_capacity(results.accepted.len());
    for record in &results.accepted {
        records.push(RecordWrite {
            row_number: record.row_number as i64,
            line_number: record.line_number as i64,
            profile_id: Uuid::nil(),
            email: record.fields.get("email").cloned(),
            linkedin_url: record.fields.get("linkedin_url").cloned(),
            phone: record.fields.get("phone").cloned(),
            fields: serde_json::to_string(&record.fields)?,
            attributes: serde_json::to_string(&record.attributes)?,
        });
    }
    let mut failed = Vec::with_capacity(results.failed.len());
    let mut failed_issues = Vec::with_capacity(results.failed.len());
    for f in results.failed {
        let (row_number, line_number) = (f.row_number as i64, f.line_number as i64);
        failed.push(FailedWrite {
            row_number,
            line_number,
            fields: serde_json::to_string(&f.fields)?,
            error_code: f.error.code.as_str(),
            error_message: f.error.message.clone(),
        });
        failed_issues.push(IssueWrite {
            row_number,
            line_number,
            issue: f.error,
        });
    }
    Ok(Prepared {
        accepted: results.accepted,
        records,
        failed,
        failed_issues,
    })
}

/// The distinct identity values of a batch, by kind: what the backend must look up.
pub(super) fn identity_lookups(prepared: &Prepared) -> Vec<(&'static str, Vec<String>)> {
    resolve::IDENTITY_KINDS
        .iter()
        .map(|kind| {
            let values: HashSet<&String> = prepared
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

/// Resolves the prepared records against what the directory holds: the part of a commit that
/// must see every earlier commit of the directory.
pub(super) fn plan_writes(
    prepared: Prepared,
    mut existing: Existing,
    source: &Source,
) -> StoreResult<Writes> {
    let Prepared {
        accepted,
        mut records,
        failed,
        failed_issues,
    } = prepared;
    let plan = resolve::resolve_batch(&mut existing, &accepted, source.seq, Uuid::now_v7);
    let state_json =
        |m: BTreeMap<Uuid, resolve::ProfileState>| -> StoreResult<Vec<(Uuid, String)>> {
            m.into_iter()
                .map(|(id, state)| Ok((id, serde_json::to_string(&state)?)))
                .collect()
        };
    let assignments: HashMap<u64, Uuid> = plan.assignments.iter().copied().collect();
    let mut resolution_warnings: HashMap<u64, Vec<Issue>> = HashMap::new();
    for (row_number, issue) in plan.warnings {
        resolution_warnings
            .entry(row_number)
            .or_default()
            .push(issue);
    }
    let mut issues = Vec::new();
    let mut warned_rows = 0u64;
    for (record, write) in accepted.into_iter().zip(records.iter_mut()) {
        write.profile_id = assignments[&record.row_number];
        let extra = resolution_warnings
            .remove(&record.row_number)
            .unwrap_or_default();
        if record.warnings.is_empty() && extra.is_empty() {
            continue;
        }
        warned_rows += 1;
        let (row_number, line_number) = (write.row_number, write.line_number);
        issues.extend(
            record
                .warnings
                .into_iter()
                .chain(extra)
                .map(|issue| IssueWrite {
                    row_number,
                    line_number,
                    issue,
                }),
        );
    }
    issues.extend(failed_issues);
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
