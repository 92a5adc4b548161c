//! Profile resolution and merging, as pure functions over what the store loaded.
//!
//! A record resolves to the profile holding any of its identities (email first, then LinkedIn,
//! then phone), else to a new profile. An identity belongs to at most one profile: identities
//! already held elsewhere stay there and the record gets an `identity_conflict` warning.
//! Merging follows the upload's merge rules (`super::merge`): by default it fills empty
//! profile fields and, where both have a value, the newer write wins. A write's version is
//! (source sequence, row number) and its rank comes from its rule, so the outcome does not
//! depend on the order in which workers happen to process chunks.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use super::header::KnownField;
use super::merge::{MergeRules, Rank, Rule};
use super::row::{FieldName, Issue, IssueCode, RecordDraft};

/// Identity kinds in resolution priority order.
pub const IDENTITY_KINDS: [FieldName; 3] = ["email", "linkedin_url", "phone"];

/// Where `kind` stands in [`IDENTITY_KINDS`] (PostgreSQL stores it as the kind's number).
pub fn kind_index(kind: &str) -> Option<usize> {
    IDENTITY_KINDS.iter().position(|k| *k == kind)
}

/// (source sequence, row number): later sources win, and later rows within a source.
pub type Version = (i64, i64);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// Empty for a field an import cleared: absent to readers, but written (see
    /// `super::merge`).
    pub value: String,
    pub version: Version,
    #[serde(default, skip_serializing_if = "Rank::is_newer")]
    pub rank: Rank,
}

impl Versioned {
    /// Whether this write takes precedence over `other`: rank first; then the newer version,
    /// except among `keep_existing` writes, where the older one was there first.
    pub fn beats(&self, other: &Versioned) -> bool {
        let key = |v: &Versioned| match v.rank {
            Rank::Keep => (v.rank, -v.version.0, -v.version.1),
            _ => (v.rank, v.version.0, v.version.1),
        };
        key(self) > key(other)
    }

    /// The value as readers see it: `None` once cleared.
    pub fn shown(&self) -> Option<&str> {
        (!self.value.is_empty()).then_some(self.value.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileState {
    #[serde(deserialize_with = "known_fields")]
    pub fields: BTreeMap<FieldName, Versioned>,
    pub attributes: BTreeMap<String, Versioned>,
}

/// Reads stored fields back under their static names; a name that is not a known field is
/// refused rather than dropped.
fn known_fields<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<FieldName, Versioned>, D::Error> {
    BTreeMap::<String, Versioned>::deserialize(deserializer)?
        .into_iter()
        .map(|(name, value)| match KnownField::named(&name) {
            Some(field) => Ok((field.as_str(), value)),
            None => Err(serde::de::Error::custom(format!(
                "{name:?} is not a known profile field"
            ))),
        })
        .collect()
}

impl ProfileState {
    /// Writes the record's values under `rules`: each field keeps the write of highest
    /// precedence ([`Versioned::beats`]). An empty value in the record clears the field.
    /// Returns whether anything changed.
    pub fn merge(&mut self, record: &RecordDraft, version: Version, rules: &MergeRules) -> bool {
        let mut changed = merge_map(&mut self.fields, &record.fields, version, |field| {
            rules.field_rule(field)
        });
        changed |= merge_map(&mut self.attributes, &record.attributes, version, |name| {
            rules.attribute_rule(name)
        });
        changed
    }
}

fn merge_map<K: Ord + Clone + std::borrow::Borrow<str>>(
    target: &mut BTreeMap<K, Versioned>,
    source: &BTreeMap<K, String>,
    version: Version,
    rule: impl Fn(&str) -> Rule,
) -> bool {
    let mut changed = false;
    for (key, value) in source {
        let name: &str = key.borrow();
        let rule = rule(name);
        if value.is_empty() && rule == Rule::KeepExisting {
            // Validation never makes such a clear; a rule that keeps values never blanks one.
            continue;
        }
        let write = Versioned {
            value: String::new(),
            version,
            rank: rule.rank(),
        };
        match target.get_mut(name) {
            // A write of lower or equal precedence (an older `newer_wins`, the same row again)
            // changes nothing.
            Some(current) if !write.beats(current) => {}
            // The version moves even when the value is the same, so that an older source
            // processed afterwards cannot replace what a newer source confirmed.
            Some(current) => {
                *current = Versioned {
                    value: value.clone(),
                    ..write
                };
                changed = true;
            }
            None => {
                target.insert(
                    key.clone(),
                    Versioned {
                        value: value.clone(),
                        ..write
                    },
                );
                changed = true;
            }
        }
    }
    changed
}

/// A value per identity, kept by kind, so that a lookup borrows the value it looks for. Hashed
/// with foldhash, randomly seeded: SipHash was a twelfth of a worker's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityMap<V>([foldhash::HashMap<String, V>; 3]);

/// The profile that owns each identity.
pub type Owners = IdentityMap<Uuid>;

impl<V> Default for IdentityMap<V> {
    fn default() -> Self {
        IdentityMap(Default::default())
    }
}

impl<V: Copy> IdentityMap<V> {
    pub fn get(&self, kind: &str, value: &str) -> Option<V> {
        self.0[kind_index(kind)?].get(value).copied()
    }

    /// Sets the value of (`kind`, `value`); `kind` is one of [`IDENTITY_KINDS`].
    pub fn insert(&mut self, kind: &str, value: String, v: V) {
        let index = kind_index(kind).unwrap_or_else(|| panic!("{kind:?} is not an identity kind"));
        self.0[index].insert(value, v);
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|kind| kind.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values, once per identity.
    pub fn values(&self) -> impl Iterator<Item = V> + '_ {
        self.0.iter().flat_map(|kind| kind.values().copied())
    }

    /// (kind, value, its value here) for every identity.
    pub fn iter(&self) -> impl Iterator<Item = (FieldName, &str, V)> + '_ {
        IDENTITY_KINDS
            .into_iter()
            .zip(&self.0)
            .flat_map(|(kind, map)| map.iter().map(move |(value, v)| (kind, value.as_str(), *v)))
    }
}

/// What the store knows before resolving a batch: the owners of the batch's identities and
/// the state of those owners.
#[derive(Debug, Default, Clone)]
pub struct Existing {
    pub owners: Owners,
    pub profiles: HashMap<Uuid, ProfileState>,
}

#[derive(Debug, Default)]
pub struct Plan {
    /// Record row number → its profile.
    pub assignments: Vec<(u64, Uuid)>,
    /// (kind, value, profile) identities claimed by this batch.
    pub new_identities: Vec<(FieldName, String, Uuid)>,
    /// Profiles created by this batch; their final state is in `existing.profiles`.
    pub created: BTreeSet<Uuid>,
    /// Existing profiles whose fields this batch changed; their final state is in
    /// `existing.profiles`. (Naming them, rather than keeping a copy of each state per row that
    /// touched it, saved a clone and a drop of every new profile of a bulk load.)
    pub updated: BTreeSet<Uuid>,
    /// Warnings found while resolving: (row number, issue).
    pub warnings: Vec<(u64, Issue)>,
}

/// Resolves records (in row order) against `existing`, which it updates as it goes so that
/// later records of the batch see profiles created by earlier ones. `new_id` names the profile
/// a record creates, given the record's row number: a store that resolves a batch twice (once
/// optimistically, once after losing a race) keeps the same ids for the rows that create the
/// same profiles both times.
pub fn resolve_batch(
    existing: &mut Existing,
    records: &[RecordDraft],
    source_seq: i64,
    rules: &MergeRules,
    mut new_id: impl FnMut(u64) -> Uuid,
) -> Plan {
    let mut plan = Plan::default();
    for record in records {
        // At most one of each kind, in priority order, with its current owner.
        let mut identities: [Option<(FieldName, &String, Option<Uuid>)>; 3] = [None; 3];
        for (slot, kind) in identities.iter_mut().zip(IDENTITY_KINDS) {
            *slot = record
                .fields
                .get(kind)
                .map(|value| (kind, value, existing.owners.get(kind, value)));
        }
        let identities = identities.iter().flatten();
        let chosen = identities.clone().find_map(|(_, _, owner)| *owner);
        let profile_id = match chosen {
            Some(id) => id,
            None => {
                let id = new_id(record.row_number);
                existing.profiles.insert(id, ProfileState::default());
                plan.created.insert(id);
                id
            }
        };
        for (kind, value, owner) in identities.clone() {
            match owner {
                None => {
                    existing.owners.insert(kind, (*value).clone(), profile_id);
                    plan.new_identities
                        .push((kind, (*value).clone(), profile_id));
                }
                Some(other) if *other != profile_id => {
                    let kept_by = identities
                        .clone()
                        .find(|(_, _, owner)| *owner == Some(profile_id))
                        .or(identities.clone().next())
                        .map_or(*kind, |(kind, ..)| *kind);
                    plan.warnings.push((
                        record.row_number,
                        Issue {
                            code: IssueCode::IdentityConflict,
                            column: Some(kind.to_string()),
                            message: format!(
                                "{kind} {value} belongs to another profile than this row's other identities; the row was merged into the profile of its {kept_by}"
                            ),
                            value: Some(value.to_string()),
                        },
                    ))
                }
                Some(_) => {}
            }
        }
        let profile = existing.profiles.entry(profile_id).or_default();
        let changed = profile.merge(record, (source_seq, record.row_number as i64), rules);
        if changed && !plan.created.contains(&profile_id) {
            plan.updated.insert(profile_id);
        }
        plan.assignments.push((record.row_number, profile_id));
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(row: u64, fields: &[(FieldName, &str)]) -> RecordDraft {
        RecordDraft {
            row_number: row,
            line_number: row + 1,
            fields: fields.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            attributes: BTreeMap::new(),
            warnings: vec![],
        }
    }

    fn ids() -> impl FnMut(u64) -> Uuid {
        let mut n = 0u128;
        move |_| {
            n += 1;
            Uuid::from_u128(n)
        }
    }

    #[test]
    fn records_sharing_an_identity_share_a_profile() {
        let mut existing = Existing::default();
        let recs = [
            record(1, &[("email", "a@x.co"), ("city", "Paris")]),
            record(2, &[("phone", "+14155552671")]),
            record(3, &[("email", "a@x.co"), ("phone", "+14155552671")]),
        ];
        let plan = resolve_batch(&mut existing, &recs, 1, &MergeRules::default(), ids());
        assert_eq!(plan.created.len(), 2);
        assert_eq!(
            plan.assignments[2].1, plan.assignments[0].1,
            "email wins over phone"
        );
        let conflict = &plan.warnings[0];
        assert_eq!(conflict.0, 3);
        assert_eq!(conflict.1.code, IssueCode::IdentityConflict);
        assert_eq!(conflict.1.column.as_deref(), Some("phone"));
        // The phone stays with the profile that held it.
        assert_eq!(
            existing.owners.get("phone", "+14155552671").unwrap(),
            plan.assignments[1].1
        );
    }

    #[test]
    fn linkedin_is_consulted_before_phone() {
        let a = Uuid::from_u128(100);
        let b = Uuid::from_u128(200);
        let mut existing = Existing::default();
        existing.owners.insert("phone", "+1".into(), a);
        existing
            .owners
            .insert("linkedin_url", "linkedin.com/in/x".into(), b);
        existing.profiles.insert(a, ProfileState::default());
        existing.profiles.insert(b, ProfileState::default());
        let plan = resolve_batch(
            &mut existing,
            &[record(
                1,
                &[("phone", "+1"), ("linkedin_url", "linkedin.com/in/x")],
            )],
            1,
            &MergeRules::default(),
            ids(),
        );
        assert_eq!(plan.assignments[0].1, b);
    }

    #[test]
    fn merge_fills_gaps_never_blanks_and_newer_wins() {
        let mut existing = Existing::default();
        let first = resolve_batch(
            &mut existing,
            &[record(
                5,
                &[("email", "a@x.co"), ("city", "Paris"), ("title", "CTO")],
            )],
            1,
            &MergeRules::default(),
            ids(),
        );
        let id = first.assignments[0].1;
        // An older source, processed later, fills gaps only.
        resolve_batch(
            &mut existing,
            &[record(
                1,
                &[("email", "a@x.co"), ("city", "Lyon"), ("company", "Acme")],
            )],
            0,
            &MergeRules::default(),
            ids(),
        );
        let p = &existing.profiles[&id];
        assert_eq!(p.fields["city"].value, "Paris");
        assert_eq!(p.fields["company"].value, "Acme");
        // A newer source overwrites conflicts, and a missing value never blanks.
        let plan = resolve_batch(
            &mut existing,
            &[record(1, &[("email", "a@x.co"), ("city", "Berlin")])],
            2,
            &MergeRules::default(),
            ids(),
        );
        assert!(plan.updated.contains(&id));
        let p = &existing.profiles[&id];
        assert_eq!(p.fields["city"].value, "Berlin");
        assert_eq!(p.fields["title"].value, "CTO");
    }

    #[test]
    fn the_outcome_does_not_depend_on_processing_order() {
        let batches = [
            (
                1,
                vec![record(1, &[("email", "a@x.co"), ("city", "Paris")])],
            ),
            (2, vec![record(1, &[("email", "a@x.co"), ("city", "Rome")])]),
        ];
        let run = |order: &[usize]| {
            let mut existing = Existing::default();
            for &i in order {
                resolve_batch(
                    &mut existing,
                    &batches[i].1,
                    batches[i].0,
                    &MergeRules::default(),
                    ids(),
                );
            }
            let (_, p) = existing.profiles.into_iter().next().unwrap();
            p.fields["city"].value.clone()
        };
        assert_eq!(run(&[0, 1]), "Rome");
        assert_eq!(run(&[1, 0]), "Rome");
    }

    #[test]
    fn an_older_write_leaves_the_profile_unchanged() {
        let mut existing = Existing::default();
        resolve_batch(
            &mut existing,
            &[record(1, &[("email", "a@x.co")])],
            1,
            &MergeRules::default(),
            ids(),
        );
        let plan = resolve_batch(
            &mut existing,
            &[record(1, &[("email", "a@x.co")])],
            0,
            &MergeRules::default(),
            ids(),
        );
        assert!(plan.updated.is_empty());
        assert!(plan.created.is_empty());
    }

    #[test]
    fn a_stored_state_reads_back_with_known_fields_only() {
        let mut existing = Existing::default();
        let plan = resolve_batch(
            &mut existing,
            &[record(1, &[("email", "a@x.co"), ("city", "Paris")])],
            1,
            &MergeRules::default(),
            ids(),
        );
        let state = &existing.profiles[&plan.assignments[0].1];
        let json = serde_json::to_string(state).unwrap();
        assert_eq!(&serde_json::from_str::<ProfileState>(&json).unwrap(), state);
        let unknown = json.replace("\"city\"", "\"shoe_size\"");
        let error = serde_json::from_str::<ProfileState>(&unknown).unwrap_err();
        assert!(error
            .to_string()
            .contains("\"shoe_size\" is not a known profile field"));
    }

    fn rules(json: &str) -> MergeRules {
        MergeRules::parse(json).unwrap()
    }

    /// Imports `rows` (one per source, in sequence order) into an empty directory under each
    /// source's rules and returns the one profile's city.
    fn city_after(rows: &[(&str, &str)]) -> Option<String> {
        let mut existing = Existing::default();
        for (seq, (json, city)) in rows.iter().enumerate() {
            resolve_batch(
                &mut existing,
                &[record(1, &[("email", "a@x.co"), ("city", city)])],
                seq as i64,
                &rules(json),
                ids(),
            );
        }
        let (_, p) = existing.profiles.into_iter().next().unwrap();
        p.fields
            .get("city")
            .and_then(|v| v.shown().map(str::to_owned))
    }

    #[test]
    fn each_rule_decides_which_value_stays() {
        let newer = r#"{}"#;
        let keep = r#"{"default": "keep_existing"}"#;
        let over = r#"{"default": "overwrite"}"#;
        assert_eq!(
            city_after(&[(newer, "Paris"), (newer, "Rome")]).as_deref(),
            Some("Rome")
        );
        assert_eq!(
            city_after(&[(newer, "Paris"), (keep, "Rome")]).as_deref(),
            Some("Paris")
        );
        assert_eq!(
            city_after(&[(keep, "Paris"), (keep, "Rome")]).as_deref(),
            Some("Paris")
        );
        assert_eq!(
            city_after(&[(keep, "Paris"), (newer, "Rome")]).as_deref(),
            Some("Rome")
        );
        // An overwrite wins over later newer_wins imports, and only a later overwrite beats it.
        assert_eq!(
            city_after(&[(over, "Paris"), (newer, "Rome")]).as_deref(),
            Some("Paris")
        );
        assert_eq!(
            city_after(&[(over, "Paris"), (over, "Rome")]).as_deref(),
            Some("Rome")
        );
        // Per field: the default may keep while one field overwrites.
        let mixed = r#"{"default": "keep_existing", "fields": {"city": "overwrite"}}"#;
        assert_eq!(
            city_after(&[(over, "Paris"), (mixed, "Rome")]).as_deref(),
            Some("Rome")
        );
    }

    #[test]
    fn a_clear_blanks_a_field_and_a_keep_does_not_refill_it() {
        let clear = r#"{"empty_cells": "clear"}"#;
        let keep = r#"{"default": "keep_existing"}"#;
        assert_eq!(city_after(&[("{}", "Paris"), (clear, "")]), None);
        assert_eq!(
            city_after(&[("{}", "Paris"), (clear, ""), (keep, "Rome")]),
            None
        );
        assert_eq!(
            city_after(&[("{}", "Paris"), (clear, ""), ("{}", "Rome")]).as_deref(),
            Some("Rome")
        );
        // A clear under newer_wins does not undo an overwrite.
        let over = r#"{"default": "overwrite"}"#;
        assert_eq!(
            city_after(&[(over, "Paris"), (clear, "")]).as_deref(),
            Some("Paris")
        );
    }

    /// The literal reading of the rules: writes applied one by one in version order.
    fn serial(mut writes: Vec<(Version, Rule, &str)>) -> Option<String> {
        writes.sort_by_key(|w| w.0);
        let mut state: Option<(String, bool)> = None;
        for (_, rule, value) in writes {
            let overwritten = state.as_ref().is_some_and(|(_, o)| *o);
            match rule {
                Rule::NewerWins if !overwritten => state = Some((value.into(), false)),
                Rule::KeepExisting if state.is_none() => state = Some((value.into(), false)),
                Rule::Overwrite => state = Some((value.into(), true)),
                _ => {}
            }
        }
        state.map(|(value, _)| value)
    }

    #[test]
    fn any_arrival_order_gives_the_serial_outcome() {
        use rand::seq::SliceRandom;
        use rand::{Rng, SeedableRng};
        let seed = rand::rng().random::<u64>();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let rules = [Rule::NewerWins, Rule::KeepExisting, Rule::Overwrite];
        for _ in 0..2000 {
            let n = rng.random_range(1..7);
            let mut writes: Vec<(Version, Rule, &str)> = Vec::new();
            while writes.len() < n {
                let version = (rng.random_range(0..4), rng.random_range(0..4));
                if writes.iter().any(|w| w.0 == version) {
                    continue;
                }
                let rule = rules[rng.random_range(0..3)];
                let values = if rule == Rule::KeepExisting {
                    &["a", "b", "c"][..]
                } else {
                    &["", "a", "b", "c"][..]
                };
                writes.push((version, rule, values[rng.random_range(0..values.len())]));
            }
            let want = serial(writes.clone());
            writes.shuffle(&mut rng);
            let mut state = ProfileState::default();
            for (version, rule, value) in &writes {
                let rules = MergeRules {
                    default: *rule,
                    ..MergeRules::default()
                };
                state.merge(
                    &record(version.1 as u64, &[("city", value)]),
                    *version,
                    &rules,
                );
            }
            let got = state.fields.get("city").map(|v| v.value.clone());
            assert_eq!(got, want, "seed {seed}: writes {writes:?}");
        }
    }
}
