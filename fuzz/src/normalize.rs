//! Target `normalize`: value normalization (`orbit_core::domain::normalize`) and the row
//! validation around it (`orbit_core::domain::row`).
//!
//! Input: two option bytes (the default region, the row's columns), then the value (lossy
//! UTF-8); for the row, the raw bytes split at commas are its fields.
//!
//! Properties:
//! - every normalizer is total and idempotent: `f(f(x)) == f(x)`;
//! - an email comes out trimmed and lower-case, with an `@` and a dotted domain;
//! - a phone comes out in E.164 (`+` and digits), read the same whatever the default region;
//! - a LinkedIn URL comes out as `linkedin.com/in/<slug>`, lower-case;
//! - a split name has no empty, untrimmed or doubly spaced part, and "first last" splits back;
//! - a row is validated without panicking, and an accepted row fed its own normalized values
//!   is accepted with the same values.

use orbit_core::domain::csv::{RawField, RawRecord};
use orbit_core::domain::header::{match_known, ColumnMap};
use orbit_core::domain::normalize::{email, linkedin_url, parse_region, phone, split_full_name};
use orbit_core::domain::row::{self, RowOutcome, RowRules};

use crate::Knobs;

const MAX_FIELD_BYTES: usize = 64;
const REGIONS: [&str; 8] = ["US", "GB", "DE", "FR", "IN", "BR", "JP", "AU"];
const COLUMNS: [&str; 8] = [
    "email",
    "phone",
    "linkedin_url",
    "first_name",
    "last_name",
    "full_name",
    "company",
    "favourite colour",
];

pub fn check(data: &[u8]) {
    let (knobs, rest) = Knobs::split(data, 2);
    let text = String::from_utf8_lossy(rest);
    let region_code = REGIONS[usize::from(knobs.byte(0)) % REGIONS.len()];
    let region = parse_region(region_code).expect("a region code");
    let _ = parse_region(&text);

    if let Some(v) = email(&text) {
        assert_eq!(v.trim(), v, "email trimmed");
        assert_eq!(v.to_lowercase(), v, "email lower-case");
        assert!(v.contains('@'), "{v:?} has an @");
        assert_eq!(
            email(&v),
            Some(v.clone()),
            "email idempotent, from {text:?}"
        );
    }
    if let Some(v) = phone(&text, region) {
        assert!(
            v.starts_with('+') && v.len() > 1 && v[1..].bytes().all(|b| b.is_ascii_digit()),
            "{v:?} is E.164"
        );
        for other in REGIONS {
            let other = parse_region(other).expect("a region code");
            assert_eq!(
                phone(&v, other),
                Some(v.clone()),
                "phone idempotent in any region, from {text:?} in {region_code}"
            );
        }
    }
    if let Some(v) = linkedin_url(&text) {
        assert!(v.starts_with("linkedin.com/in/"), "{v:?}");
        assert_eq!(v.to_lowercase(), v, "LinkedIn URL lower-case");
        assert_eq!(
            linkedin_url(&v),
            Some(v.clone()),
            "LinkedIn URL idempotent, from {text:?}"
        );
    }
    check_name(&text);
    check_row(knobs.byte(1), rest, region_code);
}

fn check_name(text: &str) {
    let (first, last) = split_full_name(text);
    for part in first.iter().chain(&last) {
        assert!(!part.is_empty(), "empty name part from {text:?}");
        assert_eq!(part.trim(), part, "untrimmed name part from {text:?}");
        assert!(!part.contains("  "), "double space from {text:?}");
    }
    if let (Some(f), Some(l)) = (&first, &last) {
        if !text.contains(',') {
            assert_eq!(
                split_full_name(&format!("{f} {l}")),
                (first.clone(), last.clone()),
                "split of {text:?} splits back"
            );
        }
    }
}

fn check_row(columns_mask: u8, raw: &[u8], region_code: &str) {
    // Always an email column, so the header is valid; the mask adds the others.
    let names: Vec<String> = COLUMNS
        .iter()
        .enumerate()
        .filter(|(i, _)| *i == 0 || columns_mask & (1 << i) != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let columns = ColumnMap::from_header(&names, 16).expect("a valid header");
    let rules = RowRules {
        max_field_bytes: MAX_FIELD_BYTES,
        default_region: parse_region(region_code).expect("a region code"),
    };
    let fields: Vec<&[u8]> = raw.split(|&b| b == b',').collect();
    let first = record(&fields, MAX_FIELD_BYTES);
    let RowOutcome::Accepted(draft) = row::validate(&first, 1, &columns, &rules) else {
        return;
    };
    // The row again, made of its own normalized values. Columns that were empty stay empty:
    // a name derived from `full_name` fills `first_name` only if the file had it blank.
    let again: Vec<Vec<u8>> = names
        .iter()
        .zip(&fields)
        .map(|(name, raw)| {
            let value = match match_known(name) {
                _ if String::from_utf8_lossy(raw).trim().is_empty() => None,
                Some(field) => draft.fields.get(field.as_str()),
                None => draft.attributes.get(name),
            };
            value.cloned().unwrap_or_default().into_bytes()
        })
        .collect();
    let again: Vec<&[u8]> = again.iter().map(Vec::as_slice).collect();
    // Lower-casing may lengthen a value: the second pass is not cut.
    match row::validate(&record(&again, usize::MAX), 1, &columns, &rules) {
        RowOutcome::Accepted(second) => {
            assert_eq!(
                second.fields, draft.fields,
                "row normalization is idempotent"
            );
            assert_eq!(second.attributes, draft.attributes);
        }
        RowOutcome::Failed(f) => panic!("an accepted row fails on its own values: {f:?}"),
    }
}

/// A record as the splitter makes it, fields cut at `limit`.
fn record(fields: &[&[u8]], limit: usize) -> RawRecord {
    RawRecord {
        start_offset: 0,
        line_number: 2,
        fields: fields
            .iter()
            .map(|bytes| RawField {
                truncated: bytes.len() > limit,
                bytes: bytes[..bytes.len().min(limit)].to_vec(),
            })
            .collect(),
        field_count: fields.len(),
        malformed_encoding: false,
    }
}
