//! Header matching: column names are compared case-insensitively after trimming and folding
//! spaces, hyphens and underscores, then mapped to known fields through their aliases. Any other
//! column is kept as a custom attribute.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::merge::MergeRules;
use super::InvalidCsv;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KnownField {
    FirstName,
    LastName,
    FullName,
    Email,
    Phone,
    Company,
    Title,
    LinkedinUrl,
    City,
    Country,
}

impl KnownField {
    pub const ALL: [KnownField; 10] = [
        KnownField::FirstName,
        KnownField::LastName,
        KnownField::FullName,
        KnownField::Email,
        KnownField::Phone,
        KnownField::Company,
        KnownField::Title,
        KnownField::LinkedinUrl,
        KnownField::City,
        KnownField::Country,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KnownField::FirstName => "first_name",
            KnownField::LastName => "last_name",
            KnownField::FullName => "full_name",
            KnownField::Email => "email",
            KnownField::Phone => "phone",
            KnownField::Company => "company",
            KnownField::Title => "title",
            KnownField::LinkedinUrl => "linkedin_url",
            KnownField::City => "city",
            KnownField::Country => "country",
        }
    }

    /// The field whose canonical name is `name`, exactly.
    pub fn named(name: &str) -> Option<KnownField> {
        KnownField::ALL.into_iter().find(|f| f.as_str() == name)
    }

    pub fn is_identifier(self) -> bool {
        matches!(
            self,
            KnownField::Email | KnownField::Phone | KnownField::LinkedinUrl
        )
    }

    /// Folded spellings that name this field.
    fn aliases(self) -> &'static [&'static str] {
        match self {
            KnownField::FirstName => &["firstname", "givenname", "forename"],
            KnownField::LastName => &["lastname", "surname", "familyname"],
            KnownField::FullName => &["fullname", "name"],
            KnownField::Email => &["email", "emailaddress", "mail"],
            KnownField::Phone => &["phone", "phonenumber", "mobile", "mobilephone", "telephone"],
            KnownField::Company => &["company", "companyname", "organization", "organisation"],
            KnownField::Title => &["title", "jobtitle"],
            KnownField::LinkedinUrl => &[
                "linkedinurl",
                "linkedin",
                "linkedinprofile",
                "linkedinprofileurl",
            ],
            KnownField::City => &["city"],
            KnownField::Country => &["country"],
        }
    }
}

/// Case-insensitive, with spaces, hyphens and underscores folded away: `E-mail` → `email`.
pub fn fold_name(name: &str) -> String {
    name.trim()
        .chars()
        .filter(|c| !(c.is_whitespace() || *c == '-' || *c == '_'))
        .flat_map(char::to_lowercase)
        .collect()
}

pub fn match_known(name: &str) -> Option<KnownField> {
    let folded = fold_name(name);
    KnownField::ALL
        .into_iter()
        .find(|f| f.aliases().contains(&folded.as_str()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Column {
    Known(KnownField),
    /// A custom attribute, by the name it is kept under.
    Custom(String),
    /// Left out of the record on the client's request (a mapping's `ignore`).
    Ignored,
}

/// What every mapping error starts with, so that the upload can tell the client's mapping
/// (`400 invalid_request`) from the file (`422 invalid_csv`).
pub const MAPPING_ERROR_PREFIX: &str = "mapping: ";

/// The mapping target that keeps a column as a custom attribute: `attributes.<name>`.
pub const ATTRIBUTE_PREFIX: &str = "attributes.";

/// The longest custom attribute name a mapping may give.
pub const MAX_ATTRIBUTE_NAME: usize = 255;

/// A client's column mapping (the upload's `mapping` field): header name, as written in the
/// file (trimmed), to an Orbit field (`email`, …), `attributes.<name>` or `ignore`. Columns it
/// leaves out are matched through the aliases as usual.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnMapping(pub BTreeMap<String, String>);

impl ColumnMapping {
    /// Parses and checks the targets; which headers exist is checked against the file's.
    pub fn parse(json: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| format!("{MAPPING_ERROR_PREFIX}not valid JSON: {e}"))?;
        let serde_json::Value::Object(object) = value else {
            return Err(format!(
                "{MAPPING_ERROR_PREFIX}expected a JSON object from header to field"
            ));
        };
        let mut mapping = BTreeMap::new();
        for (header, target) in object {
            let serde_json::Value::String(target) = target else {
                return Err(format!(
                    "{MAPPING_ERROR_PREFIX}the target of {header:?} must be a string"
                ));
            };
            let header = header.trim().to_owned();
            if header.is_empty() {
                return Err(format!("{MAPPING_ERROR_PREFIX}a header name is empty"));
            }
            parse_target(&target)
                .map_err(|why| format!("{MAPPING_ERROR_PREFIX}{header:?} -> {target:?}: {why}"))?;
            if mapping.insert(header.clone(), target).is_some() {
                return Err(format!("{MAPPING_ERROR_PREFIX}{header:?} is mapped twice"));
            }
        }
        Ok(ColumnMapping(mapping))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The column a mapping target stands for (also how merge rules name a field).
pub(crate) fn parse_target(target: &str) -> Result<Column, String> {
    if target == "ignore" {
        return Ok(Column::Ignored);
    }
    if let Some(name) = target.strip_prefix(ATTRIBUTE_PREFIX) {
        let name = name.trim();
        if name.is_empty() {
            return Err("the attribute name is empty".into());
        }
        if name.len() > MAX_ATTRIBUTE_NAME || name.chars().any(char::is_control) {
            return Err(format!(
                "an attribute name is at most {MAX_ATTRIBUTE_NAME} bytes of printable text"
            ));
        }
        return Ok(Column::Custom(name.to_owned()));
    }
    KnownField::ALL
        .into_iter()
        .find(|f| f.as_str() == target)
        .map(Column::Known)
        .ok_or_else(|| {
            let fields: Vec<&str> = KnownField::ALL.iter().map(|f| f.as_str()).collect();
            format!(
                "unknown target; use one of {}, attributes.<name> or ignore",
                fields.join(", ")
            )
        })
}

/// How each position of a file's rows maps to record fields; stored with the source so that
/// workers interpret chunks exactly as the gateway did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnMap {
    /// The header as written (trimmed), for error messages and the failed-rows CSV.
    pub names: Vec<String>,
    pub columns: Vec<Column>,
    /// The client's mapping that made these columns, as sent, kept to show with the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mapping: Option<ColumnMapping>,
    /// How the columns' values merge into profiles (the upload's `merge` field): kept here,
    /// with the mapping, because every row of the source is read under both.
    #[serde(default, skip_serializing_if = "MergeRules::is_default")]
    pub merge: MergeRules,
}

impl ColumnMap {
    pub fn from_header(names: &[String], max_columns: usize) -> Result<Self, InvalidCsv> {
        Self::from_header_mapped(names, max_columns, None)
    }

    /// [`ColumnMap::from_header`], with the columns `mapping` names taken from it. A mapping
    /// error's message starts with [`MAPPING_ERROR_PREFIX`] and names the header or target.
    pub fn from_header_mapped(
        names: &[String],
        max_columns: usize,
        mapping: Option<&ColumnMapping>,
    ) -> Result<Self, InvalidCsv> {
        if names.len() > max_columns {
            return Err(InvalidCsv(format!(
                "the header has {} columns; at most {max_columns} are allowed",
                names.len()
            )));
        }
        let mut seen: HashMap<String, &str> = HashMap::new();
        let mut columns = Vec::with_capacity(names.len());
        let mut trimmed = Vec::with_capacity(names.len());
        let mut used: Vec<&str> = Vec::new();
        for (i, raw) in names.iter().enumerate() {
            let name = raw.trim();
            let name = if name.is_empty() {
                format!("column_{}", i + 1)
            } else {
                name.to_owned()
            };
            let mapped = mapping.and_then(|m| m.0.get_key_value(&name));
            let column = match mapped {
                Some((key, target)) => {
                    used.push(key);
                    parse_target(target).map_err(|why| {
                        InvalidCsv(format!("{MAPPING_ERROR_PREFIX}{name:?}: {why}"))
                    })?
                }
                None => match match_known(&name) {
                    Some(field) => Column::Known(field),
                    None => Column::Custom(name.clone()),
                },
            };
            let identity = match &column {
                Column::Known(field) => Some(format!("known:{}", field.as_str())),
                Column::Custom(custom) => Some(format!("custom:{}", fold_name(custom))),
                Column::Ignored => None,
            };
            if let Some(identity) = identity {
                if let Some(first) = seen.get(&identity) {
                    let prefix = if mapping.is_some() {
                        MAPPING_ERROR_PREFIX
                    } else {
                        ""
                    };
                    return Err(InvalidCsv(format!(
                        "{prefix}duplicate header names: {first:?} and {name:?} name the same column"
                    )));
                }
                seen.insert(identity, &raw[..]);
            }
            columns.push(column);
            trimmed.push(name);
        }
        if let Some(mapping) = mapping {
            if let Some(unknown) = mapping.0.keys().find(|k| !used.contains(&k.as_str())) {
                return Err(InvalidCsv(format!(
                    "{MAPPING_ERROR_PREFIX}the header has no column {unknown:?} (it has {})",
                    trimmed
                        .iter()
                        .map(|n| format!("{n:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        let has_identifier = columns
            .iter()
            .any(|c| matches!(c, Column::Known(f) if f.is_identifier()));
        if !has_identifier && mapping.is_some() {
            return Err(InvalidCsv(format!(
                "{MAPPING_ERROR_PREFIX}with this mapping no column is an identifier: map one to email, linkedin_url or phone"
            )));
        }
        if !has_identifier {
            let looks_like_data = names.iter().any(|n| n.contains('@'));
            let mut message = String::from(
                "the header has no identifier column: it needs at least one of email, linkedin_url or phone",
            );
            if looks_like_data {
                message.push_str(" (the first line looks like data: is the header row missing?)");
            }
            return Err(InvalidCsv(message));
        }
        Ok(ColumnMap {
            names: trimmed,
            columns,
            mapping: mapping.cloned(),
            merge: MergeRules::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(names: &[&str]) -> Result<ColumnMap, InvalidCsv> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        ColumnMap::from_header(&names, 100)
    }

    #[test]
    fn aliases_match_after_folding() {
        for (name, field) in [
            ("First Name", KnownField::FirstName),
            ("given_name", KnownField::FirstName),
            ("  SURNAME ", KnownField::LastName),
            ("Family-Name", KnownField::LastName),
            ("Name", KnownField::FullName),
            ("E-mail", KnownField::Email),
            ("Email Address", KnownField::Email),
            ("Phone Number", KnownField::Phone),
            ("Mobile", KnownField::Phone),
            ("Company Name", KnownField::Company),
            ("Organization", KnownField::Company),
            ("Job Title", KnownField::Title),
            ("LinkedIn", KnownField::LinkedinUrl),
            ("LinkedIn URL", KnownField::LinkedinUrl),
            ("linkedin_profile", KnownField::LinkedinUrl),
            ("CITY", KnownField::City),
            ("country", KnownField::Country),
        ] {
            assert_eq!(match_known(name), Some(field), "{name}");
        }
        assert_eq!(match_known("favourite colour"), None);
    }

    #[test]
    fn other_columns_are_custom_attributes() {
        let map = header(&["email", " Favourite Colour "]).unwrap();
        assert_eq!(map.columns[0], Column::Known(KnownField::Email));
        assert_eq!(map.columns[1], Column::Custom("Favourite Colour".into()));
        assert_eq!(map.names[1], "Favourite Colour");
    }

    #[test]
    fn duplicate_names_are_rejected_even_through_aliases() {
        assert!(header(&["email", "Email"])
            .unwrap_err()
            .0
            .contains("duplicate"));
        assert!(header(&["E-mail", "Email Address"])
            .unwrap_err()
            .0
            .contains("duplicate"));
        assert!(header(&["email", "Shoe Size", "shoe_size"])
            .unwrap_err()
            .0
            .contains("duplicate"));
    }

    #[test]
    fn an_identifier_column_is_required() {
        let err = header(&["first name", "company"]).unwrap_err();
        assert!(err.0.contains("no identifier column"), "{err}");
        let err = header(&["ann@example.com", "Ann"]).unwrap_err();
        assert!(err.0.contains("looks like data"), "{err}");
        assert!(header(&["phone"]).is_ok());
        assert!(header(&["LinkedIn"]).is_ok());
    }

    #[test]
    fn too_many_columns_are_rejected() {
        let names: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
        let err = ColumnMap::from_header(&names, 4).unwrap_err();
        assert!(err.0.contains("at most 4"), "{err}");
    }

    fn mapping(json: &str) -> ColumnMapping {
        ColumnMapping::parse(json).unwrap()
    }

    fn mapped(names: &[&str], json: &str) -> Result<ColumnMap, InvalidCsv> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        ColumnMap::from_header_mapped(&names, 100, Some(&mapping(json)))
    }

    #[test]
    fn a_mapping_renames_keeps_and_ignores_columns() {
        let map = mapped(
            &["Correo", "Nombre", "Notes", "Phone", "Colour"],
            r#"{"Correo": "email", "Nombre": "first_name", "Notes": "ignore", "Colour": "attributes.favourite_colour"}"#,
        )
        .unwrap();
        assert_eq!(
            map.columns,
            [
                Column::Known(KnownField::Email),
                Column::Known(KnownField::FirstName),
                Column::Ignored,
                // Not in the mapping: the aliases still apply.
                Column::Known(KnownField::Phone),
                Column::Custom("favourite_colour".into()),
            ]
        );
        assert_eq!(map.names[0], "Correo");
        assert!(map.mapping.is_some());
        // Ignoring the column an alias would make a duplicate resolves the clash.
        assert!(mapped(&["email", "E-mail"], r#"{"E-mail": "ignore"}"#).is_ok());
    }

    #[test]
    fn mapping_errors_name_the_header_or_target() {
        for (json, needle) in [
            (r#"{"Nope": "email"}"#, "\"Nope\""),
            (r#"{"email": "emial"}"#, "\"emial\""),
            (r#"{"email": "attributes."}"#, "attribute name is empty"),
            (r#"{"email": 3}"#, "must be a string"),
            ("[1]", "JSON object"),
            ("{", "not valid JSON"),
        ] {
            let err = match ColumnMapping::parse(json) {
                Err(e) => e,
                Ok(m) => {
                    let names = vec!["email".to_owned()];
                    ColumnMap::from_header_mapped(&names, 10, Some(&m))
                        .unwrap_err()
                        .0
                }
            };
            assert!(err.starts_with(MAPPING_ERROR_PREFIX), "{err}");
            assert!(err.contains(needle), "{json}: {err}");
        }
        let err = mapped(&["email", "Work"], r#"{"Work": "email"}"#).unwrap_err();
        assert!(err.0.contains("duplicate"), "{err}");
        let err = mapped(&["email", "x"], r#"{"email": "ignore"}"#).unwrap_err();
        assert!(err.0.contains("no column is an identifier"), "{err}");
    }

    #[test]
    fn empty_names_get_a_positional_name() {
        let map = header(&["email", ""]).unwrap();
        assert_eq!(map.columns[1], Column::Custom("column_2".into()));
    }
}
