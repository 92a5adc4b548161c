//! Header matching: column names are compared case-insensitively after trimming and folding
//! spaces, hyphens and underscores, then mapped to known fields through their aliases. Any other
//! column is kept as a custom attribute.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

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
    Custom(String),
}

/// How each position of a file's rows maps to record fields; stored with the source so that
/// workers interpret chunks exactly as the gateway did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnMap {
    /// The header as written (trimmed), for error messages and the failed-rows CSV.
    pub names: Vec<String>,
    pub columns: Vec<Column>,
}

impl ColumnMap {
    pub fn from_header(names: &[String], max_columns: usize) -> Result<Self, InvalidCsv> {
        if names.len() > max_columns {
            return Err(InvalidCsv(format!(
                "the header has {} columns; at most {max_columns} are allowed",
                names.len()
            )));
        }
        let mut seen: HashMap<String, &str> = HashMap::new();
        let mut columns = Vec::with_capacity(names.len());
        let mut trimmed = Vec::with_capacity(names.len());
        for (i, raw) in names.iter().enumerate() {
            let name = raw.trim();
            let name = if name.is_empty() {
                format!("column_{}", i + 1)
            } else {
                name.to_owned()
            };
            let column = match match_known(&name) {
                Some(field) => Column::Known(field),
                None => Column::Custom(name.clone()),
            };
            let identity = match &column {
                Column::Known(field) => format!("known:{}", field.as_str()),
                Column::Custom(_) => format!("custom:{}", fold_name(&name)),
            };
            if let Some(first) = seen.get(&identity) {
                return Err(InvalidCsv(format!(
                    "duplicate header names: {first:?} and {name:?} name the same column"
                )));
            }
            seen.insert(identity, &raw[..]);
            columns.push(column);
            trimmed.push(name);
        }
        let has_identifier = columns
            .iter()
            .any(|c| matches!(c, Column::Known(f) if f.is_identifier()));
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

    #[test]
    fn empty_names_get_a_positional_name() {
        let map = header(&["email", ""]).unwrap();
        assert_eq!(map.columns[1], Column::Custom("column_2".into()));
    }
}
