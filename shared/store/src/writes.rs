//! What materializing a chunk writes, worked out once for every backend: duplicates within the
//! batch, profile resolution, and the rows to insert. Backends only load what this needs and
//! store what it returns.
//!
//! A commit is split in two so that a backend can resolve more than once: [`prepare`] does the
//! work that depends on the chunk alone, [`resolve`] the work that depends on what the
//! directory holds. PostgreSQL resolves optimistically against a lock-free read, then again
//! inside its transaction should a concurrent commit have claimed one of the chunk's
//! identities first; SQLite, with its single writer, resolves once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use uuid::Uuid;

use super::rows::Applied;
use super::StoreResult;
use orbit_core::domain::merge::MergeRules;
use orbit_core::domain::resolve::{self, Existing, Owners};
use orbit_core::domain::row::{self, FieldName, Issue, RecordDraft};
use orbit_core::model::ChunkResults;

/// The upload's W3C trace context, written into each of its chunks' rows.
#[derive(Debug, Clone, Copy)]
pub(super) struct Trace<'a> {
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

/// An accepted row's place in the file; its identities are read from its draft
/// ([`Prepared::accepted`]), which it goes with.
pub(super) struct RecordWrite {
    pub row_number: i64,
    pub line_number: i64,
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

/// A chunk's results with everything that does not depend on other chunks worked out:
/// duplicates within the batch, the failed rows' JSON.
pub(super) struct Prepared {
    pub accepted: Vec<RecordDraft>,
    /// One per accepted record, in the same order.
    pub records: Vec<RecordWrite>,
    pub failed: Vec<FailedWrite>,
    /// The failed rows' errors, as row issues.
    pub failed_issues: Vec<IssueWrite>,
    /// The profile id each row would create, fixed once so that resolving again names the
    /// same new profiles.
    new_ids: foldhash::HashMap<u64, Uuid>,
}

/// Where a prepared chunk's records go, given what the directory holds.
pub(super) struct Resolution {
    /// The profile of each record of [`Prepared::records`], in the same order.
    pub profile_of: Vec<Uuid>,
    /// New profiles and changed ones, in their final state. An existing profile that gains an
    /// identity counts as changed even when its fields do not.
    pub created: BTreeMap<Uuid, resolve::ProfileState>,
    pub updated: BTreeMap<Uuid, resolve::ProfileState>,
    /// (kind, value, profile) identities to claim, sorted by (kind, value): the one order in
    /// which every commit claims keys, so that two commits never wait on each other in a
    /// circle.
    pub identities: Vec<(FieldName, String, Uuid)>,
    /// Warnings of accepted rows: their own and those resolution found.
    pub warnings: Vec<IssueWrite>,
    pub applied: Applied,
}

pub(super) fn prepare(mut results: ChunkResults) -> StoreResult<Prepared> {
    row::flag_duplicates_in_batch(&mut results.accepted);
    let mut records = Vec::with_capacity(results.accepted.len());
    for record in &results.accepted {
        records.push(RecordWrite {
            row_number: record.row_number as i64,
            line_number: record.line_number as i64,
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
        new_ids: Default::default(),
    })
}

/// The distinct identity values of a batch, by kind: what the backend must look up.
pub(super) fn identity_lookups(prepared: &Prepared) -> Vec<(FieldName, Vec<&str>)> {
    resolve::IDENTITY_KINDS
        .iter()
        .map(|kind| {
            let values: foldhash::HashSet<&str> = prepared
                .accepted
                .iter()
                .filter_map(|r| r.fields.get(*kind).map(String::as_str))
                .collect();
            (*kind, values.into_iter().collect())
        })
        .collect()
}

/// The profiles the loaded identities point at, in ascending id order: what the backend loads
/// (and, in PostgreSQL, locks) next.
pub(super) fn owners_to_load(owners: &Owners) -> Vec<Uuid> {
    let owners: HashSet<Uuid> = owners.values().collect();
    let mut owners: Vec<Uuid> = owners.into_iter().collect();
    owners.sort_unstable();
    owners
}

/// Resolves the prepared records against what the directory holds: the part of a commit that
/// must see every earlier commit of the directory.
pub(super) fn resolve(
    prepared: &mut Prepared,
    mut existing: Existing,
    source_seq: i64,
    rules: &MergeRules,
) -> StoreResult<Resolution> {
    let new_ids = &mut prepared.new_ids;
    let mut plan = resolve::resolve_batch(
        &mut existing,
        &prepared.accepted,
        source_seq,
        rules,
        |row| *new_ids.entry(row).or_insert_with(Uuid::now_v7),
    );
    // An existing profile that gains an identity is written even when its fields stay.
    for (_, _, profile) in &plan.new_identities {
        if !plan.created.contains(profile) {
            plan.updated.insert(*profile);
        }
    }
    // `existing` ends here: its final states move into the resolution.
    let mut take = |ids: &BTreeSet<Uuid>| -> BTreeMap<Uuid, resolve::ProfileState> {
        ids.iter()
            .filter_map(|id| existing.profiles.remove(id).map(|state| (*id, state)))
            .collect()
    };
    let (created, updated) = (take(&plan.created), take(&plan.updated));
    let mut resolution_warnings: HashMap<u64, Vec<Issue>> = HashMap::new();
    for (row_number, issue) in plan.warnings {
        resolution_warnings
            .entry(row_number)
            .or_default()
            .push(issue);
    }
    let mut warnings = Vec::new();
    let mut warned_rows = 0u64;
    // One assignment per record, in the records' order.
    debug_assert_eq!(plan.assignments.len(), prepared.accepted.len());
    let profile_of: Vec<Uuid> = plan.assignments.iter().map(|(_, id)| *id).collect();
    for (record, write) in prepared.accepted.iter().zip(&prepared.records) {
        let extra = resolution_warnings
            .remove(&record.row_number)
            .unwrap_or_default();
        if record.warnings.is_empty() && extra.is_empty() {
            continue;
        }
        warned_rows += 1;
        let (row_number, line_number) = (write.row_number, write.line_number);
        warnings.extend(
            record
                .warnings
                .iter()
                .cloned()
                .chain(extra)
                .map(|issue| IssueWrite {
                    row_number,
                    line_number,
                    issue,
                }),
        );
    }
    let mut identities = plan.new_identities;
    identities.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(Resolution {
        profile_of,
        created,
        updated,
        identities,
        warnings,
        applied: Applied {
            accepted: prepared.records.len() as u64,
            failed: prepared.failed.len() as u64,
            warnings: warned_rows,
        },
    })
}
