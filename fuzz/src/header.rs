//! Target `header`: header matching (`orbit_core::domain::header`).
//!
//! Input: one option byte, then text (lossy UTF-8) whose lines are header names.
//!
//! Properties:
//! - matching is total and blind to ASCII case, to spaces, hyphens and underscores anywhere,
//!   and to surrounding whitespace; a name matches exactly when its folded form is an alias;
//!   folding is idempotent;
//! - every alias, decorated by the input (case flips and separators inserted where the input
//!   says), matches its field;
//! - a column map is built exactly when there are at most `max_columns` names, no two name the
//!   same column and one is an identifier; then it has a column per name, trimmed and never
//!   empty, known fields where a name matches.

use std::collections::HashSet;

use orbit_core::domain::header::{fold_name, match_known, Column, ColumnMap, KnownField};

use crate::Knobs;

/// The aliases of `KnownField::aliases`, spelled as people write them: a second copy on
/// purpose, so that a change to the list is a visible change here.
const ALIASES: &[(&str, KnownField)] = &[
    ("first name", KnownField::FirstName),
    ("given name", KnownField::FirstName),
    ("forename", KnownField::FirstName),
    ("last name", KnownField::LastName),
    ("surname", KnownField::LastName),
    ("family name", KnownField::LastName),
    ("full name", KnownField::FullName),
    ("name", KnownField::FullName),
    ("email", KnownField::Email),
    ("email address", KnownField::Email),
    ("mail", KnownField::Email),
    ("phone", KnownField::Phone),
    ("phone number", KnownField::Phone),
    ("mobile", KnownField::Phone),
    ("mobile phone", KnownField::Phone),
    ("telephone", KnownField::Phone),
    ("company", KnownField::Company),
    ("company name", KnownField::Company),
    ("organization", KnownField::Company),
    ("organisation", KnownField::Company),
    ("title", KnownField::Title),
    ("job title", KnownField::Title),
    ("linkedin url", KnownField::LinkedinUrl),
    ("linkedin", KnownField::LinkedinUrl),
    ("linkedin profile", KnownField::LinkedinUrl),
    ("linkedin profile url", KnownField::LinkedinUrl),
    ("city", KnownField::City),
    ("country", KnownField::Country),
];

const MAX_COLUMNS: usize = 12;
const SEPARATORS: [char; 4] = [' ', '-', '_', '\t'];

pub fn check(data: &[u8]) {
    let (knobs, rest) = Knobs::split(data, 1);
    let text = String::from_utf8_lossy(rest);
    let names: Vec<String> = text.split('\n').take(64).map(str::to_owned).collect();
    for name in &names {
        check_name(name);
    }
    check_alias(usize::from(knobs.byte(0)), rest);
    check_map(&names);
}

fn check_name(name: &str) {
    let field = match_known(name);
    let folded = fold_name(name);
    assert_eq!(
        fold_name(&folded),
        folded,
        "folding is idempotent: {name:?}"
    );
    let is_alias = ALIASES.iter().any(|(a, f)| {
        fold_name(a) == folded && {
            assert_eq!(field, Some(*f), "{name:?} folds to an alias of {f:?}");
            true
        }
    });
    assert_eq!(
        field.is_some(),
        is_alias,
        "{name:?} matches only through an alias"
    );

    let variants = [
        flip_ascii_case(name),
        name.to_ascii_uppercase(),
        format!("  {name}\t"),
        name.chars().flat_map(|c| [c, '_']).collect(),
        name.replace([' ', '-', '_'], ""),
        name.replace(' ', "-"),
    ];
    for variant in &variants {
        assert_eq!(match_known(variant), field, "{name:?} vs {variant:?}");
    }
}

/// Decorates one alias as `noise` says and checks it still names its field.
fn check_alias(pick: usize, noise: &[u8]) {
    let (alias, field) = ALIASES[pick % ALIASES.len()];
    let mut name = String::new();
    let mut noise = noise.iter().copied().cycle().take(64 + alias.len());
    for c in alias.chars() {
        let n = noise.next().unwrap_or(0);
        if n & 1 != 0 {
            name.push(SEPARATORS[usize::from(n >> 1) % SEPARATORS.len()]);
        }
        name.push(if n & 8 != 0 {
            c.to_ascii_uppercase()
        } else {
            c
        });
    }
    assert_eq!(
        match_known(&name),
        Some(field),
        "{name:?} decorates {alias:?}"
    );
}

fn flip_ascii_case(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_uppercase() {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect()
}

fn check_map(names: &[String]) {
    // The column each name stands for, as the rules in `header.rs`'s docs describe it.
    let identity = |i: usize, raw: &str| {
        let trimmed = raw.trim();
        let name = if trimmed.is_empty() {
            format!("column_{}", i + 1)
        } else {
            trimmed.to_owned()
        };
        match match_known(&name) {
            Some(field) => (format!("known:{}", field.as_str()), name),
            None => (format!("custom:{}", fold_name(&name)), name),
        }
    };
    let identities: Vec<(String, String)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| identity(i, n))
        .collect();
    let distinct: HashSet<&String> = identities.iter().map(|(id, _)| id).collect();
    let has_duplicate = distinct.len() < identities.len();
    let has_identifier = names
        .iter()
        .filter_map(|n| match_known(n.trim()))
        .any(KnownField::is_identifier);
    let expect_ok = names.len() <= MAX_COLUMNS && !has_duplicate && has_identifier;

    match ColumnMap::from_header(names, MAX_COLUMNS) {
        Ok(map) => {
            assert!(expect_ok, "accepted {names:?}");
            assert_eq!(map.columns.len(), names.len());
            assert_eq!(map.names.len(), names.len());
            for (i, (column, name)) in map.columns.iter().zip(&map.names).enumerate() {
                assert_eq!(name, &identities[i].1, "column {i}'s name");
                assert!(!name.is_empty() && name.trim() == name);
                match column {
                    Column::Known(field) => assert_eq!(match_known(name), Some(*field)),
                    Column::Custom(custom) => {
                        assert_eq!(match_known(name), None);
                        assert_eq!(custom, name);
                    }
                    Column::Ignored => panic!("column {i} ignored without a mapping"),
                }
            }
        }
        Err(e) => {
            assert!(!expect_ok, "rejected {names:?}: {e}");
            let message = &e.0;
            if names.len() > MAX_COLUMNS {
                assert!(message.contains("at most"), "{message}");
            } else if has_duplicate {
                assert!(message.contains("duplicate"), "{message}");
            } else {
                assert!(message.contains("no identifier"), "{message}");
            }
        }
    }
}
