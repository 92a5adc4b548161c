//! Merge rules: which value a profile keeps when an import writes a field it already has.
//!
//! An upload may carry rules (its `merge` form field): a default rule, a rule per field or
//! custom attribute, and whether its empty cells clear. Every write a rule makes gets a
//! [`Rank`], and the value a profile keeps is the write of highest precedence: `overwrite`
//! over `newer_wins` over `keep_existing`; the newer write among `overwrite`s and among
//! `newer_wins`, the older one among `keep_existing`. That order is total, so the outcome does
//! not depend on the order in which commits arrive, and it is the outcome of applying the
//! writes one by one in (source sequence, row) order with these rules:
//!
//! - `newer_wins` replaces the value unless an `overwrite` wrote it;
//! - `keep_existing` fills a field nothing has written yet;
//! - `overwrite` always replaces the value.
//!
//! A cleared field holds the empty value: it shows as absent, and it counts as written, so a
//! later `keep_existing` import does not fill it again (a clear is a correction; a sync of
//! stale data must not undo it). Identity fields (email, phone, LinkedIn URL) always merge as
//! `newer_wins` and are never cleared: an identity is how a profile is found.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::header::{parse_target, Column, KnownField};
use super::resolve::IDENTITY_KINDS;

/// How one import's value meets the value a profile holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The newer write wins (by source sequence, then row): Orbit's behaviour without rules.
    #[default]
    NewerWins,
    /// Fill fields that no import has written; never replace a value.
    KeepExisting,
    /// This import's values win over every `newer_wins` and `keep_existing` value, older or
    /// newer; between two `overwrite` imports the newer wins.
    Overwrite,
}

impl Rule {
    const ALL: [Rule; 3] = [Rule::NewerWins, Rule::KeepExisting, Rule::Overwrite];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NewerWins => "newer_wins",
            Rule::KeepExisting => "keep_existing",
            Rule::Overwrite => "overwrite",
        }
    }

    /// The rank of the values this rule writes.
    pub fn rank(self) -> Rank {
        match self {
            Rule::NewerWins => Rank::Newer,
            Rule::KeepExisting => Rank::Keep,
            Rule::Overwrite => Rank::Overwrite,
        }
    }

    fn named(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// The rank of a stored value, by the rule that wrote it; ranks order before versions.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Rank {
    Keep,
    /// Every value written before rules existed, and by `newer_wins`.
    #[default]
    Newer,
    Overwrite,
}

impl Rank {
    pub fn is_newer(&self) -> bool {
        *self == Rank::Newer
    }

    /// The rank's number in storage that keeps one number per rank (PostgreSQL's typed
    /// profile columns): 0 is [`Rank::Newer`], so that values stored before ranks read back
    /// as what they were.
    pub fn number(self) -> u8 {
        match self {
            Rank::Newer => 0,
            Rank::Keep => 1,
            Rank::Overwrite => 2,
        }
    }

    pub fn from_number(n: u8) -> Option<Rank> {
        [Rank::Newer, Rank::Keep, Rank::Overwrite]
            .into_iter()
            .find(|r| r.number() == n)
    }
}

/// What an empty cell does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmptyCells {
    /// Nothing: an empty cell never blanks a value (Orbit's behaviour without rules).
    #[default]
    Ignore,
    /// Clears the field, under the field's rule (a `keep_existing` field ignores it); identity
    /// fields are never cleared.
    Clear,
}

/// An upload's merge rules (its `merge` form field), as stored with the source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRules {
    #[serde(default)]
    pub default: Rule,
    /// By field name (`company`) or `attributes.<name>`.
    #[serde(default)]
    pub fields: BTreeMap<String, Rule>,
    #[serde(default)]
    pub empty_cells: EmptyCells,
}

/// Why a `merge` field was refused: the key at fault (`fields.email`, `default`, …; empty
/// when the whole value is) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMerge {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for InvalidMerge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.key.as_str() {
            "" => write!(f, "merge: {}", self.message),
            key => write!(f, "merge.{key}: {}", self.message),
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> InvalidMerge {
    InvalidMerge {
        key: key.into(),
        message: message.into(),
    }
}

fn parse_rule(key: &str, value: &serde_json::Value) -> Result<Rule, InvalidMerge> {
    let choices = || {
        let names: Vec<&str> = Rule::ALL.iter().map(|r| r.as_str()).collect();
        names.join(", ")
    };
    match value.as_str() {
        Some(name) => Rule::named(name).ok_or_else(|| {
            invalid(
                key,
                format!("unknown rule {name:?}; use one of {}", choices()),
            )
        }),
        None => Err(invalid(
            key,
            format!("a rule is a string, one of {}", choices()),
        )),
    }
}

impl MergeRules {
    /// Parses and checks a `merge` field: every key is known, every rule one of the three,
    /// every field a known field or `attributes.<name>`, and no identity field named.
    pub fn parse(json: &str) -> Result<MergeRules, InvalidMerge> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| invalid("", format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(object) = value else {
            return Err(invalid(
                "",
                "expected a JSON object with `default`, `fields` and `empty_cells`",
            ));
        };
        let mut rules = MergeRules::default();
        for (key, value) in &object {
            match key.as_str() {
                "default" => rules.default = parse_rule(key, value)?,
                "empty_cells" => {
                    rules.empty_cells = match value.as_str() {
                        Some("ignore") => EmptyCells::Ignore,
                        Some("clear") => EmptyCells::Clear,
                        _ => return Err(invalid(key, "must be \"ignore\" or \"clear\"")),
                    }
                }
                "fields" => {
                    let serde_json::Value::Object(fields) = value else {
                        return Err(invalid(key, "expected an object from field to rule"));
                    };
                    for (name, rule) in fields {
                        let at = format!("fields.{name}");
                        let name = field_key(name).map_err(|why| invalid(&at, why))?;
                        let rule = parse_rule(&at, rule)?;
                        if rules.fields.insert(name, rule).is_some() {
                            return Err(invalid(at, "the field is named twice"));
                        }
                    }
                }
                _ => {
                    return Err(invalid(
                        key,
                        "unknown key; use default, fields and empty_cells",
                    ))
                }
            }
        }
        Ok(rules)
    }

    pub fn is_default(&self) -> bool {
        *self == MergeRules::default()
    }

    /// The rule of a known field; identity fields always merge as `newer_wins`.
    pub fn field_rule(&self, field: &str) -> Rule {
        // Every row of an upload without rules comes through here, for every field.
        if self.fields.is_empty() && self.default == Rule::NewerWins {
            return Rule::NewerWins;
        }
        if IDENTITY_KINDS.contains(&field) {
            return Rule::NewerWins;
        }
        self.rule_of(field)
    }

    /// The rule of the custom attribute `name`.
    pub fn attribute_rule(&self, name: &str) -> Rule {
        if self.fields.is_empty() {
            return self.default;
        }
        self.rule_of(&format!("attributes.{name}"))
    }

    fn rule_of(&self, key: &str) -> Rule {
        self.fields.get(key).copied().unwrap_or(self.default)
    }

    /// Whether an empty cell of a column clears the profile's value.
    pub fn clears(&self, column: &Column) -> bool {
        if self.empty_cells == EmptyCells::Ignore {
            return false;
        }
        let rule = match column {
            Column::Known(field) if IDENTITY_KINDS.contains(&field.as_str()) => return false,
            Column::Known(field) => self.field_rule(field.as_str()),
            Column::Custom(name) => self.attribute_rule(name),
            Column::Ignored => return false,
        };
        rule != Rule::KeepExisting
    }
}

/// A `fields` key in its stored form: a known field's name, or `attributes.<name>` trimmed.
fn field_key(name: &str) -> Result<String, String> {
    match parse_target(name) {
        Ok(Column::Known(field)) if IDENTITY_KINDS.contains(&field.as_str()) => Err(format!(
            "{} is an identity: identity fields always merge as newer_wins and are never \
             cleared, as an identity is how a profile is found",
            field.as_str()
        )),
        Ok(Column::Known(field)) => Ok(field.as_str().to_owned()),
        Ok(Column::Custom(name)) => Ok(format!("attributes.{name}")),
        Ok(Column::Ignored) | Err(_) => {
            let fields: Vec<&str> = KnownField::ALL
                .iter()
                .map(|f| f.as_str())
                .filter(|f| !IDENTITY_KINDS.contains(f))
                .collect();
            Err(format!(
                "unknown field; use one of {} or attributes.<name>",
                fields.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_defaults_and_named_fields() {
        let rules = MergeRules::parse(
            r#"{"default": "keep_existing", "fields": {"company": "overwrite", "attributes.plan": "newer_wins"}, "empty_cells": "clear"}"#,
        )
        .unwrap();
        assert_eq!(rules.default, Rule::KeepExisting);
        assert_eq!(rules.field_rule("company"), Rule::Overwrite);
        assert_eq!(rules.field_rule("city"), Rule::KeepExisting);
        assert_eq!(rules.field_rule("email"), Rule::NewerWins, "identities");
        assert_eq!(rules.attribute_rule("plan"), Rule::NewerWins);
        assert_eq!(rules.attribute_rule("tier"), Rule::KeepExisting);
        assert!(MergeRules::parse("{}").unwrap().is_default());
    }

    #[test]
    fn bad_rules_name_the_key_at_fault() {
        let key = |json: &str| MergeRules::parse(json).unwrap_err().key;
        assert_eq!(key(r#"{"default": "sometimes"}"#), "default");
        assert_eq!(
            key(r#"{"fields": {"shoe_size": "overwrite"}}"#),
            "fields.shoe_size"
        );
        assert_eq!(key(r#"{"fields": {"company": "later"}}"#), "fields.company");
        assert_eq!(key(r#"{"fields": {"email": "overwrite"}}"#), "fields.email");
        assert_eq!(
            key(r#"{"fields": {"attributes.": "overwrite"}}"#),
            "fields.attributes."
        );
        assert_eq!(key(r#"{"empty_cells": "blank"}"#), "empty_cells");
        assert_eq!(key(r#"{"defaults": "overwrite"}"#), "defaults");
        assert_eq!(key("[1]"), "");
        assert_eq!(key("{"), "");
        let error = MergeRules::parse(r#"{"fields": {"phone": "keep_existing"}}"#).unwrap_err();
        assert!(error
            .to_string()
            .starts_with("merge.fields.phone: phone is an identity"));
    }

    #[test]
    fn empty_cells_clear_under_the_fields_rule_and_never_identities() {
        let rules = MergeRules::parse(
            r#"{"fields": {"company": "keep_existing"}, "empty_cells": "clear"}"#,
        )
        .unwrap();
        assert!(rules.clears(&Column::Known(KnownField::City)));
        assert!(!rules.clears(&Column::Known(KnownField::Company)));
        assert!(!rules.clears(&Column::Known(KnownField::Email)));
        assert!(rules.clears(&Column::Custom("plan".into())));
        assert!(!rules.clears(&Column::Ignored));
        assert!(!MergeRules::default().clears(&Column::Known(KnownField::City)));
    }

    #[test]
    fn rank_numbers_read_back_and_newer_is_zero() {
        for rank in [Rank::Keep, Rank::Newer, Rank::Overwrite] {
            assert_eq!(Rank::from_number(rank.number()), Some(rank));
        }
        assert_eq!(Rank::Newer.number(), 0);
        assert!(Rank::Keep < Rank::Newer && Rank::Newer < Rank::Overwrite);
    }
}
