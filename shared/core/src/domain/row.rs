//! Per-row validation: turns a raw CSV record into an accepted record draft (with its warnings)
//! or a failed row (with the one error that failed it).

use std::collections::BTreeMap;

use rlibphonenumber::Region;
use serde::{Deserialize, Serialize};

use super::csv::{RawField, RawRecord};
use super::header::{Column, ColumnMap, KnownField};
use super::normalize;

/// How much of an offending value an issue quotes back to the user.
const QUOTED_VALUE_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueCode {
    ColumnCountMismatch,
    MissingIdentifier,
    FieldTooLong,
    InvalidEncoding,
    InvalidEmail,
    InvalidPhone,
    InvalidLinkedinUrl,
    DuplicateInFile,
    IdentityConflict,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::ColumnCountMismatch => "column_count_mismatch",
            IssueCode::MissingIdentifier => "missing_identifier",
            IssueCode::FieldTooLong => "field_too_long",
            IssueCode::InvalidEncoding => "invalid_encoding",
            IssueCode::InvalidEmail => "invalid_email",
            IssueCode::InvalidPhone => "invalid_phone",
            IssueCode::InvalidLinkedinUrl => "invalid_linkedin_url",
            IssueCode::DuplicateInFile => "duplicate_in_file",
            IssueCode::IdentityConflict => "identity_conflict",
        }
    }

    pub fn parse(code: &str) -> Option<Self> {
        [
            IssueCode::ColumnCountMismatch,
            IssueCode::MissingIdentifier,
            IssueCode::FieldTooLong,
            IssueCode::InvalidEncoding,
            IssueCode::InvalidEmail,
            IssueCode::InvalidPhone,
            IssueCode::InvalidLinkedinUrl,
            IssueCode::DuplicateInFile,
            IssueCode::IdentityConflict,
        ]
        .into_iter()
        .find(|c| c.as_str() == code)
    }

    pub fn severity(self) -> Severity {
        match self {
            IssueCode::ColumnCountMismatch
            | IssueCode::MissingIdentifier
            | IssueCode::FieldTooLong
            | IssueCode::InvalidEncoding => Severity::Error,
            _ => Severity::Warning,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    pub code: IssueCode,
    /// The column as named in the header, when one column is at fault.
    pub column: Option<String>,
    pub message: String,
    pub value: Option<String>,
}

impl Issue {
    fn new(code: IssueCode, column: Option<&str>, message: String, value: Option<&str>) -> Self {
        Issue {
            code,
            column: column.map(str::to_owned),
            message,
            value: value.map(|v| truncate(v, QUOTED_VALUE_BYTES).to_owned()),
        }
    }
}

/// The three identities a record can be resolved by, normalized.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identities {
    pub email: Option<String>,
    pub linkedin_url: Option<String>,
    pub phone: Option<String>,
}

/// A known field's canonical name ([`KnownField::as_str`]): drafts and profile states key
/// their fields by it, so that a row's fields cost no allocation for their names.
pub type FieldName = &'static str;

/// An accepted row, normalized, before resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordDraft {
    pub row_number: u64,
    pub line_number: u64,
    /// Known fields by their canonical name (`first_name`, `email`, …). An empty cell is
    /// absent, or the empty value where the upload's merge rules say it clears the field.
    pub fields: BTreeMap<FieldName, String>,
    /// Custom columns by their header name; empty cells as for `fields`.
    pub attributes: BTreeMap<String, String>,
    pub warnings: Vec<Issue>,
}

impl RecordDraft {
    pub fn identities(&self) -> Identities {
        Identities {
            email: self.fields.get("email").cloned(),
            linkedin_url: self.fields.get("linkedin_url").cloned(),
            phone: self.fields.get("phone").cloned(),
        }
    }
}

/// A row that was not imported, with its original fields for the failed-rows CSV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRow {
    pub row_number: u64,
    pub line_number: u64,
    pub fields: Vec<String>,
    pub error: Issue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    Accepted(RecordDraft),
    Failed(FailedRow),
}

#[derive(Debug, Clone)]
pub struct RowRules {
    pub max_field_bytes: usize,
    pub default_region: Region,
}

pub fn validate(
    record: &RawRecord,
    row_number: u64,
    columns: &ColumnMap,
    rules: &RowRules,
) -> RowOutcome {
    let decoded: Vec<Option<&str>> = record.fields.iter().map(decode).collect();
    let bad_encoding = decoded.iter().position(Option::is_none);
    let invalid_encoding = bad_encoding.is_some() || record.malformed_encoding;
    let fail = |error: Issue| {
        RowOutcome::Failed(FailedRow {
            row_number,
            line_number: record.line_number,
            fields: failed_fields::keep(record, &decoded, invalid_encoding),
            error,
        })
    };
    let column_name = |i: usize| columns.names.get(i).map(String::as_str);

    if invalid_encoding {
        let i = bad_encoding.unwrap_or(0);
        return fail(Issue::new(
            IssueCode::InvalidEncoding,
            bad_encoding.and(column_name(i)),
            "the row has bytes that do not decode in the file's encoding; failed-rows?raw=true \
             returns the row's bytes as they were sent"
                .into(),
            bad_encoding
                .map(|_| String::from_utf8_lossy(&record.fields[i].bytes))
                .as_deref(),
        ));
    }
    if record.field_count != columns.columns.len() {
        let dropped = record.field_count.saturating_sub(record.fields.len());
        let kept = if dropped > 0 {
            format!(
                "; failed-rows keeps the first {} and then a field saying how many more there were",
                record.fields.len()
            )
        } else {
            String::new()
        };
        return fail(Issue::new(
            IssueCode::ColumnCountMismatch,
            None,
            format!(
                "expected {} fields as in the header, found {}{kept}",
                columns.columns.len(),
                record.field_count
            ),
            None,
        ));
    }
    if let Some(i) = record.fields.iter().position(|f| f.truncated) {
        return fail(Issue::new(
            IssueCode::FieldTooLong,
            column_name(i),
            format!(
                "the value is longer than {} bytes; failed-rows keeps its first {} bytes followed by {:?}",
                rules.max_field_bytes,
                rules.max_field_bytes,
                failed_fields::TRUNCATED_MARKER
            ),
            decoded[i],
        ));
    }

    let mut fields = BTreeMap::new();
    let mut attributes = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut invalid_identifiers = Vec::new();
    let mut cleared = Vec::new();
    for (i, column) in columns.columns.iter().enumerate() {
        let value = decoded[i].unwrap_or_default().trim();
        if value.is_empty() {
            if columns.merge.clears(column) {
                cleared.push(column);
            }
            continue;
        }
        let name = &columns.names[i];
        match column {
            Column::Custom(custom) => {
                attributes.insert(custom.clone(), value.to_owned());
            }
            Column::Ignored => {}
            Column::Known(field) => {
                let normalized = match field {
                    KnownField::Email => normalize::email(value).ok_or(IssueCode::InvalidEmail),
                    KnownField::Phone => {
                        normalize::phone(value, rules.default_region).ok_or(IssueCode::InvalidPhone)
                    }
                    KnownField::LinkedinUrl => {
                        normalize::linkedin_url(value).ok_or(IssueCode::InvalidLinkedinUrl)
                    }
                    _ => Ok(normalize::fold_spaces(value)),
                };
                match normalized {
                    Ok(v) => {
                        fields.insert(field.as_str(), v);
                    }
                    Err(code) => {
                        let what = field.as_str().replace('_', " ");
                        invalid_identifiers.push(Issue::new(
                            code,
                            Some(name),
                            format!("{value:?} is not a valid {what}; the value was dropped"),
                            Some(value),
                        ));
                    }
                }
            }
        }
    }
    let has_identifier = ["email", "phone", "linkedin_url"]
        .iter()
        .any(|k| fields.contains_key(*k));
    if !has_identifier {
        let message = if invalid_identifiers.is_empty() {
            "the row has no email, phone or LinkedIn URL".to_owned()
        } else {
            let what: Vec<String> = invalid_identifiers
                .iter()
                .map(|i| i.message.replace("; the value was dropped", ""))
                .collect();
            format!("the row has no valid identifier: {}", what.join("; "))
        };
        let first_bad = invalid_identifiers.first();
        return fail(Issue::new(
            IssueCode::MissingIdentifier,
            first_bad.and_then(|i| i.column.as_deref()),
            message,
            first_bad.and_then(|i| i.value.as_deref()),
        ));
    }
    warnings.extend(invalid_identifiers);
    if !fields.contains_key("first_name") && !fields.contains_key("last_name") {
        if let Some(full) = fields.get("full_name") {
            let (first, last) = normalize::split_full_name(full);
            if let Some(first) = first {
                fields.insert("first_name", first);
            }
            if let Some(last) = last {
                fields.insert("last_name", last);
            }
        }
    }
    // After the split: a name taken from `full_name` is a value, not an empty cell.
    for column in cleared {
        match column {
            Column::Known(field) => fields.entry(field.as_str()).or_default(),
            Column::Custom(name) => attributes.entry(name.clone()).or_default(),
            Column::Ignored => continue,
        };
    }
    RowOutcome::Accepted(RecordDraft {
        row_number,
        line_number: record.line_number,
        fields,
        attributes,
        warnings,
    })
}

/// Flags `duplicate_in_file` on every record whose identity appeared on an earlier record of
/// the same batch. Batches are in row order; duplicates across batches are found when the
/// source completes.
pub fn flag_duplicates_in_batch(records: &mut [RecordDraft]) {
    let mut seen: foldhash::HashSet<(&str, &str)> = Default::default();
    for RecordDraft {
        fields, warnings, ..
    } in records.iter_mut()
    {
        let fields: &BTreeMap<FieldName, String> = fields;
        for kind in ["email", "linkedin_url", "phone"] {
            let Some(value) = fields.get(kind) else {
                continue;
            };
            if !seen.insert((kind, value)) {
                warnings.push(duplicate_issue(kind, value));
            }
        }
    }
}

pub fn duplicate_issue(kind: &str, value: &str) -> Issue {
    Issue::new(
        IssueCode::DuplicateInFile,
        Some(kind),
        format!("{kind} {value} already appears on an earlier row of this file"),
        Some(value),
    )
}

/// How a failed row's fields are kept for `failed-rows`. The splitter keeps a bounded part of
/// each row (`max_field_bytes` per field, one field more than the header), so a cut is marked
/// rather than silent, and bytes that do not decode are kept exactly rather than replaced.
pub mod failed_fields {
    use base64::Engine as _;

    use super::super::csv::RawRecord;

    /// Appended to a field cut at `ingest.max_field_bytes`.
    pub const TRUNCATED_MARKER: &str = "[…truncated by Orbit]";
    /// Fields of an `invalid_encoding` row are kept as this prefix and their bytes in base64.
    pub const RAW_PREFIX: &str = "b64:";

    /// The stored fields of a failed row: text (or, for a row that does not decode, the exact
    /// bytes in base64), cut fields marked, and a last field counting fields not kept.
    pub fn keep(
        record: &RawRecord,
        decoded: &[Option<&str>],
        invalid_encoding: bool,
    ) -> Vec<String> {
        let mut fields: Vec<String> = record
            .fields
            .iter()
            .zip(decoded)
            .map(|(field, text)| {
                let marker = if field.truncated {
                    TRUNCATED_MARKER
                } else {
                    ""
                };
                match text {
                    Some(text) if !invalid_encoding => format!("{text}{marker}"),
                    _ => {
                        let mut bytes = field.bytes.clone();
                        bytes.extend_from_slice(marker.as_bytes());
                        format!(
                            "{RAW_PREFIX}{}",
                            base64::engine::general_purpose::STANDARD.encode(bytes)
                        )
                    }
                }
            })
            .collect();
        let dropped = record.field_count.saturating_sub(record.fields.len());
        if dropped > 0 {
            fields.push(format!("[…{dropped} more fields not kept by Orbit]"));
        }
        fields
    }

    /// The bytes of a stored field: `invalid_encoding` rows' fields are decoded from base64.
    pub fn bytes(field: &str, invalid_encoding: bool) -> Vec<u8> {
        if invalid_encoding {
            if let Some(encoded) = field.strip_prefix(RAW_PREFIX) {
                if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(encoded) {
                    return bytes;
                }
            }
        }
        field.as_bytes().to_vec()
    }
}

/// A field's text; a truncated field may end inside a character, which is not an encoding error.
fn decode(field: &RawField) -> Option<&str> {
    match std::str::from_utf8(&field.bytes) {
        Ok(text) => Some(text),
        Err(e) if field.truncated && e.error_len().is_none() => {
            std::str::from_utf8(&field.bytes[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

fn truncate(value: &str, max: usize) -> &str {
    if value.len() <= max {
        return value;
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(names: &[&str]) -> ColumnMap {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        ColumnMap::from_header(&names, 100).unwrap()
    }

    fn raw(fields: &[&[u8]]) -> RawRecord {
        RawRecord {
            start_offset: 0,
            line_number: 7,
            fields: fields
                .iter()
                .map(|f| RawField {
                    bytes: f.to_vec(),
                    truncated: false,
                })
                .collect(),
            field_count: fields.len(),
            malformed_encoding: false,
        }
    }

    fn rules() -> RowRules {
        RowRules {
            max_field_bytes: 64,
            default_region: normalize::parse_region("US").unwrap(),
        }
    }

    fn failed_code(outcome: RowOutcome) -> IssueCode {
        match outcome {
            RowOutcome::Failed(f) => f.error.code,
            RowOutcome::Accepted(a) => panic!("accepted: {a:?}"),
        }
    }

    fn accepted(outcome: RowOutcome) -> RecordDraft {
        match outcome {
            RowOutcome::Accepted(a) => a,
            RowOutcome::Failed(f) => panic!("failed: {f:?}"),
        }
    }

    #[test]
    fn empty_cells_clear_only_where_the_rules_say() {
        let mut cols = columns(&[
            "Email",
            "Phone",
            "Full Name",
            "First Name",
            "Company",
            "Plan",
        ]);
        let row = raw(&[b"ann@example.com", b"", b"Ann Lee", b"", b" ", b""]);
        let plain = accepted(validate(&row, 1, &cols, &rules()));
        assert!(!plain.fields.contains_key("company"), "ignored by default");
        cols.merge = crate::domain::merge::MergeRules::parse(
            r#"{"fields": {"attributes.Plan": "keep_existing"}, "empty_cells": "clear"}"#,
        )
        .unwrap();
        let rec = accepted(validate(&row, 1, &cols, &rules()));
        assert_eq!(rec.fields["company"], "", "cleared");
        assert!(
            !rec.fields.contains_key("phone"),
            "identities are never cleared"
        );
        assert_eq!(rec.fields["first_name"], "Ann", "taken from the full name");
        assert!(
            !rec.attributes.contains_key("Plan"),
            "a keep_existing column ignores its empty cells"
        );
    }

    #[test]
    fn a_valid_row_is_normalized() {
        let cols = columns(&["Name", "E-mail", "Phone", "LinkedIn", "Shoe Size"]);
        let rec = accepted(validate(
            &raw(&[
                b" Ann  Lee ",
                b"ANN@Example.com",
                b"415 555 2671",
                b"linkedin.com/in/Ann",
                b"38",
            ]),
            3,
            &cols,
            &rules(),
        ));
        assert_eq!(rec.row_number, 3);
        assert_eq!(rec.line_number, 7);
        assert_eq!(rec.fields["email"], "ann@example.com");
        assert_eq!(rec.fields["phone"], "+14155552671");
        assert_eq!(rec.fields["linkedin_url"], "linkedin.com/in/ann");
        assert_eq!(rec.fields["full_name"], "Ann Lee");
        assert_eq!(rec.fields["first_name"], "Ann");
        assert_eq!(rec.fields["last_name"], "Lee");
        assert_eq!(rec.attributes["Shoe Size"], "38");
        assert!(rec.warnings.is_empty());
    }

    fn failed(outcome: RowOutcome) -> FailedRow {
        match outcome {
            RowOutcome::Failed(f) => f,
            RowOutcome::Accepted(a) => panic!("accepted: {a:?}"),
        }
    }

    #[test]
    fn failed_rows_mark_cuts_and_keep_undecodable_bytes() {
        let cols = columns(&["email", "city"]);
        let mut long = raw(&[b"a@b.co", b"Par"]);
        long.fields[1].truncated = true;
        let row = failed(validate(&long, 1, &cols, &rules()));
        assert_eq!(
            row.fields[1],
            format!("Par{}", failed_fields::TRUNCATED_MARKER)
        );
        assert!(row
            .error
            .message
            .contains("failed-rows keeps its first 64 bytes"));

        let mut wide = raw(&[b"a@b.co", b"x", b"y"]);
        wide.field_count = 7;
        let row = failed(validate(&wide, 1, &cols, &rules()));
        assert_eq!(row.fields.len(), 4);
        assert_eq!(row.fields[3], "[…4 more fields not kept by Orbit]");
        assert!(
            row.error.message.contains("keeps the first 3"),
            "{}",
            row.error.message
        );

        let row = failed(validate(
            &raw(&[b"a\xff@b.co", b"Paris"]),
            1,
            &cols,
            &rules(),
        ));
        assert_eq!(row.error.code, IssueCode::InvalidEncoding);
        assert_eq!(failed_fields::bytes(&row.fields[0], true), b"a\xff@b.co");
        assert_eq!(failed_fields::bytes(&row.fields[1], true), b"Paris");
    }

    #[test]
    fn failures_have_the_documented_codes_in_order() {
        let cols = columns(&["email", "city"]);
        assert_eq!(
            failed_code(validate(&raw(&[b"a@b.co"]), 1, &cols, &rules())),
            IssueCode::ColumnCountMismatch
        );
        assert_eq!(
            failed_code(validate(&raw(&[b"\xff", b"x"]), 1, &cols, &rules())),
            IssueCode::InvalidEncoding
        );
        assert_eq!(
            failed_code(validate(&raw(&[b"", b"Paris"]), 1, &cols, &rules())),
            IssueCode::MissingIdentifier
        );
        let mut long = raw(&[b"a@b.co", b"x"]);
        long.fields[1].truncated = true;
        assert_eq!(
            failed_code(validate(&long, 1, &cols, &rules())),
            IssueCode::FieldTooLong
        );
        // Cut inside a multi-byte character: still too long, not badly encoded.
        let mut cut = raw(&[b"a@b.co", b"caf\xc3"]);
        cut.fields[1].truncated = true;
        assert_eq!(
            failed_code(validate(&cut, 1, &cols, &rules())),
            IssueCode::FieldTooLong
        );
    }

    #[test]
    fn an_invalid_identifier_alone_fails_and_says_why() {
        let cols = columns(&["email", "city"]);
        match validate(&raw(&[b"not-an-email", b"Paris"]), 1, &cols, &rules()) {
            RowOutcome::Failed(f) => {
                assert_eq!(f.error.code, IssueCode::MissingIdentifier);
                assert_eq!(f.error.column.as_deref(), Some("email"));
                assert!(
                    f.error.message.contains("not-an-email"),
                    "{}",
                    f.error.message
                );
                assert_eq!(f.fields, vec!["not-an-email", "Paris"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_invalid_identifier_beside_a_valid_one_is_a_warning() {
        let cols = columns(&["email", "phone", "linkedin"]);
        let rec = accepted(validate(
            &raw(&[b"a@b.co", b"12", b"nope"]),
            1,
            &cols,
            &rules(),
        ));
        let codes: Vec<_> = rec.warnings.iter().map(|w| w.code).collect();
        assert_eq!(
            codes,
            vec![IssueCode::InvalidPhone, IssueCode::InvalidLinkedinUrl]
        );
        assert!(!rec.fields.contains_key("phone"));
        assert_eq!(rec.warnings[0].value.as_deref(), Some("12"));
    }

    #[test]
    fn explicit_first_and_last_names_are_not_overwritten_by_full_name() {
        let cols = columns(&["email", "first name", "full name"]);
        let rec = accepted(validate(
            &raw(&[b"a@b.co", b"Annie", b"Ann Lee"]),
            1,
            &cols,
            &rules(),
        ));
        assert_eq!(rec.fields["first_name"], "Annie");
        assert!(!rec.fields.contains_key("last_name"));
    }

    #[test]
    fn duplicates_within_a_batch_are_flagged_after_the_first() {
        let cols = columns(&["email", "phone"]);
        let mut recs = vec![
            accepted(validate(&raw(&[b"a@b.co", b""]), 1, &cols, &rules())),
            accepted(validate(
                &raw(&[b"A@b.co", b"4155552671"]),
                2,
                &cols,
                &rules(),
            )),
            accepted(validate(
                &raw(&[b"c@b.co", b"(415) 555-2671"]),
                3,
                &cols,
                &rules(),
            )),
        ];
        flag_duplicates_in_batch(&mut recs);
        assert!(recs[0].warnings.is_empty());
        assert_eq!(recs[1].warnings[0].code, IssueCode::DuplicateInFile);
        assert_eq!(recs[1].warnings[0].column.as_deref(), Some("email"));
        assert_eq!(recs[2].warnings[0].column.as_deref(), Some("phone"));
    }

    #[test]
    fn whitespace_inside_a_value_folds_to_one_space() {
        for (value, folded) in [
            ("Acme", "Acme"),
            ("Acme Corp", "Acme Corp"),
            ("Acme  Corp", "Acme Corp"),
            ("Acme\tCorp", "Acme Corp"),
            ("New \n York  City", "New York City"),
            ("São\u{a0}Paulo", "São Paulo"),
            (" Ann  Lee ", "Ann Lee"),
        ] {
            assert_eq!(normalize::fold_spaces(value), folded, "{value:?}");
        }
    }
}
