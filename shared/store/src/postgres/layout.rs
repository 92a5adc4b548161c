//! How PostgreSQL lays out identities and profiles (migration `0010_narrow_rows`): identities
//! keyed by a 64-bit hash with open addressing, profiles as typed columns with packed
//! versions (one the fields share, and a field's own where it differs) and the fields' merge
//! ranks packed in one more (`0017_merge_ranks`), a profile's identities as lines of text.
//! Pure functions, so that the encodings are tested without a database.

use std::borrow::Cow;
use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

use crate::{StoreError, StoreResult};
use orbit_core::domain::header::KnownField;
use orbit_core::domain::merge::Rank;
use orbit_core::domain::resolve::{self, ProfileState, Version, Versioned, IDENTITY_KINDS};

/// The stored number of an identity kind: its place in resolution order.
pub(super) fn kind_number(kind: &str) -> StoreResult<i16> {
    resolve::kind_index(kind)
        .map(|n| n as i16)
        .ok_or_else(|| StoreError::Corrupt(format!("unknown identity kind {kind}")))
}

/// The home key of an identity: the first 8 bytes of SHA-256(directory id || kind number ||
/// value), big-endian, as the SQL function `orbit_identity_key` computes it.
pub fn identity_key(directory: Uuid, kind: i16, value: &str) -> i64 {
    let mut hash = Sha256::new();
    hash.update(directory.as_bytes());
    hash.update([kind as u8]);
    hash.update(value.as_bytes());
    let digest = hash.finalize();
    i64::from_be_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has 8 bytes"),
    )
}

/// Where identities live in the key space. In production every key is possible; a test can
/// keep only the low bits of the hash, so that distinct identities collide all the time and
/// the probing is exercised (a collision must never merge two people).
#[derive(Debug, Clone, Copy)]
pub(super) struct KeySpace {
    mask: Option<i64>,
}

impl KeySpace {
    pub const FULL: KeySpace = KeySpace { mask: None };

    #[cfg(any(test, feature = "testing"))]
    pub fn masked(bits: u32) -> KeySpace {
        assert!((1..63).contains(&bits), "a key space of 1 to 62 bits");
        KeySpace {
            mask: Some((1i64 << bits) - 1),
        }
    }

    pub fn home(self, directory: Uuid, kind: i16, value: &str) -> i64 {
        let key = identity_key(directory, kind, value);
        self.mask.map_or(key, |mask| key & mask)
    }

    /// The key probed after `key` when it holds another identity. Identities are never
    /// deleted, so a probe that meets a free key has seen every key its identity could be at.
    pub fn next(self, key: i64) -> i64 {
        match self.mask {
            None => key.wrapping_add(1),
            Some(mask) => (key + 1) & mask,
        }
    }
}

/// A version in one column: source sequence × 2^32 + row number. Both bounds are checked
/// rather than wrapped: a wrapped version would let an old write win over a new one.
pub(super) fn pack_version((seq, row): Version) -> StoreResult<i64> {
    if !(0..1 << 31).contains(&seq) || !(0..1 << 32).contains(&row) {
        return Err(StoreError::Corrupt(format!(
            "version (source {seq}, row {row}) does not fit the profile columns: at most 2^31 \
             sources and 2^32 rows per file"
        )));
    }
    Ok(seq << 32 | row)
}

pub(super) fn unpack_version(packed: i64) -> Version {
    (packed >> 32, packed & 0xffff_ffff)
}

/// The profile fields stored as columns, each with a `<name>_v` version column.
pub(super) fn field_names() -> impl Iterator<Item = &'static str> {
    KnownField::ALL.into_iter().map(KnownField::as_str)
}

/// The columns of a profile row after its key, in the order [`ProfileColumns`] fills them.
pub(super) fn profile_columns() -> String {
    let mut columns = String::from("created_ms, updated_ms, version");
    for name in field_names() {
        columns.push_str(&format!(", {name}, {name}_v"));
    }
    columns.push_str(", field_ranks, attributes, identities");
    columns
}

/// Where the columns of [`profile_columns`] are in a row that selected them, in one block and
/// in that order.
#[derive(Clone, Copy)]
pub(super) struct ProfileColumnsAt(usize);

impl ProfileColumnsAt {
    pub fn of(row: &PgRow) -> StoreResult<Self> {
        Ok(ProfileColumnsAt(sqlx::Column::ordinal(
            row.try_column("created_ms")?,
        )))
    }

    pub fn created_ms(self) -> usize {
        self.0
    }

    pub fn updated_ms(self) -> usize {
        self.0 + 1
    }

    fn version(self) -> usize {
        self.0 + 2
    }

    /// The value of the `i`th of [`field_names`].
    fn field(self, i: usize) -> usize {
        self.0 + 3 + 2 * i
    }

    fn field_version(self, i: usize) -> usize {
        self.field(i) + 1
    }

    /// `field_ranks`, then `attributes`, then `identities`.
    fn field_ranks(self) -> usize {
        self.field(KnownField::ALL.len())
    }
}

/// Bits of `field_ranks` per field, in [`field_names`] order: a [`Rank::number`] each.
const RANK_BITS: usize = 2;

/// A profile's state as column values: the version most of its fields share, one (value,
/// version) per known field with the version left out (`None`) where it is the shared one, the
/// fields' ranks (`None` while every one is `newer_wins`, as without merge rules), and the
/// free-form attributes as JSON (`None` when there are none), which carry their own ranks.
/// Values are borrowed from the state: every new profile of a bulk load goes through here.
pub(super) struct ProfileColumns<'a> {
    pub version: Option<i64>,
    pub fields: Vec<(Option<&'a str>, Option<i64>)>,
    pub ranks: Option<i64>,
    pub attributes: Option<String>,
}

impl<'a> ProfileColumns<'a> {
    pub fn of(state: &'a ProfileState) -> StoreResult<ProfileColumns<'a>> {
        let mut packed = Vec::with_capacity(KnownField::ALL.len());
        let mut ranks = 0i64;
        for (i, name) in field_names().enumerate() {
            packed.push(match state.fields.get(name) {
                Some(v) => {
                    ranks |= i64::from(v.rank.number()) << (RANK_BITS * i);
                    Some((v.value.as_str(), pack_version(v.version)?))
                }
                None => None,
            });
        }
        // The most common version (the newest among equals) is stored once. A profile has at
        // most one version per field, so a linear count beats a map (and its allocation).
        let mut counts = [(0i64, 0usize); KnownField::ALL.len()];
        let mut distinct = 0;
        for (_, version) in packed.iter().flatten() {
            match counts[..distinct].iter_mut().find(|(v, _)| v == version) {
                Some((_, n)) => *n += 1,
                None => {
                    counts[distinct] = (*version, 1);
                    distinct += 1;
                }
            }
        }
        let version = counts[..distinct]
            .iter()
            .max_by_key(|(version, n)| (*n, *version))
            .map(|(version, _)| *version);
        let fields = packed
            .into_iter()
            .map(|field| match field {
                Some((value, v)) => (Some(value), (Some(v) != version).then_some(v)),
                None => (None, None),
            })
            .collect();
        if let Some(name) = state
            .fields
            .keys()
            .find(|k| !field_names().any(|f| f == **k))
        {
            return Err(StoreError::Corrupt(format!(
                "profile field {name} has no column"
            )));
        }
        let attributes = if state.attributes.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&state.attributes)?)
        };
        Ok(ProfileColumns {
            version,
            fields,
            ranks: (ranks != 0).then_some(ranks),
            attributes,
        })
    }
}

/// The columns an export reads, by position from the first: the values without their
/// versions and ranks, which is fewer than half of [`profile_columns`] for PostgreSQL to send
/// and the gateway to decode.
pub(super) fn export_columns() -> String {
    let mut columns = String::from("p.id, p.created_ms, p.updated_ms");
    for name in field_names() {
        columns.push_str(&format!(", p.{name}"));
    }
    columns.push_str(", p.attributes, p.identities");
    columns
}

/// Reads a row selected with [`export_columns`]. The column types are the query's own, so
/// they are not checked value by value (a tenth of an export's gateway CPU when they were).
pub(super) fn exported_from_row(row: &PgRow) -> StoreResult<crate::ExportedProfile> {
    /// An attribute as stored, of which an export needs the value only.
    #[derive(serde::Deserialize)]
    struct Value<'a> {
        #[serde(borrow)]
        value: Cow<'a, str>,
    }
    const FIELDS: usize = 3;
    let mut profile = crate::ExportedProfile::new(
        row.try_get_unchecked(0)?,
        crate::rows::at(row.try_get_unchecked(1)?),
        crate::rows::at(row.try_get_unchecked(2)?),
        256,
    );
    for i in 0..KnownField::ALL.len() {
        if let Some(value) = row.try_get_unchecked::<Option<&str>, _>(FIELDS + i)? {
            profile.set_field(i, value);
        }
    }
    let after = FIELDS + KnownField::ALL.len();
    if let Some(json) = row.try_get_unchecked::<Option<&str>, _>(after)? {
        let attributes: BTreeMap<Cow<str>, Value> = serde_json::from_str(json)?;
        for (name, v) in &attributes {
            profile.push_attribute(name, &v.value);
        }
    }
    for line in identity_lines(row.try_get_unchecked(after + 1)?) {
        let (kind, escaped) = line?;
        profile.push_identity_with(kind, |text| unescape_into(text, escaped));
    }
    profile.sort_identities();
    Ok(profile)
}

/// Reads the state and identities of a profile row selected with [`profile_columns`].
pub(super) fn profile_from_row(row: &PgRow) -> StoreResult<(ProfileState, Vec<(String, String)>)> {
    // The block of `profile_columns` is read by position from where it starts: by name, each
    // of its columns cost a lookup in the row's column map and each field's version a string
    // made for it, for every profile an export or a resolution reads.
    let at = ProfileColumnsAt::of(row)?;
    let shared: Option<i64> = row.try_get(at.version())?;
    let ranks: Option<i64> = row.try_get(at.field_ranks())?;
    let mut fields = BTreeMap::new();
    for (i, name) in field_names().enumerate() {
        let value: Option<String> = row.try_get(at.field(i))?;
        let own: Option<i64> = row.try_get(at.field_version(i))?;
        if let Some(value) = value {
            let version = own.or(shared).ok_or_else(|| {
                StoreError::Corrupt(format!("profile field {name} has no version"))
            })?;
            let number = ranks.unwrap_or(0) >> (RANK_BITS * i) & ((1 << RANK_BITS) - 1);
            let rank = Rank::from_number(number as u8).ok_or_else(|| {
                StoreError::Corrupt(format!("profile field {name} has rank {number}"))
            })?;
            fields.insert(
                name,
                Versioned {
                    value,
                    version: unpack_version(version),
                    rank,
                },
            );
        }
    }
    let attributes: Option<String> = row.try_get(at.field_ranks() + 1)?;
    let attributes = match attributes {
        Some(json) => serde_json::from_str(&json)?,
        None => BTreeMap::new(),
    };
    let stored: String = row.try_get(at.field_ranks() + 2)?;
    let mut identities = parse_identities(&stored)?;
    identities.sort_unstable();
    Ok((ProfileState { fields, attributes }, identities))
}

/// A profile's identities as its row keeps them: one per line, `<kind number>:<value>`, with
/// backslash and newline escaped.
pub(super) fn identities_text<'a>(
    identities: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> StoreResult<String> {
    let mut out = String::new();
    for (kind, value) in identities {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&kind_number(kind)?.to_string());
        out.push(':');
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
    }
    Ok(out)
}

fn parse_identities(text: &str) -> StoreResult<Vec<(String, String)>> {
    identity_lines(text)
        .map(|line| {
            let (kind, escaped) = line?;
            let mut value = String::with_capacity(escaped.len());
            unescape_into(&mut value, escaped);
            Ok((kind.to_owned(), value))
        })
        .collect()
}

/// The lines of [`identities_text`]: each identity's kind and its still escaped value.
fn identity_lines(text: &str) -> impl Iterator<Item = StoreResult<(&'static str, &str)>> + '_ {
    text.split('\n').filter(|l| !l.is_empty()).map(move |line| {
        let corrupt = || StoreError::Corrupt(format!("stored identities {text:?}"));
        let (kind, escaped) = line.split_once(':').ok_or_else(corrupt)?;
        let kind = kind
            .parse::<usize>()
            .ok()
            .and_then(|n| IDENTITY_KINDS.get(n))
            .ok_or_else(corrupt)?;
        if !valid_escapes(escaped) {
            return Err(corrupt());
        }
        Ok((*kind, escaped))
    })
}

/// Every backslash starts `\\` or `\n`.
fn valid_escapes(escaped: &str) -> bool {
    let mut bytes = escaped.bytes();
    while let Some(b) = bytes.next() {
        if b == b'\\' && !matches!(bytes.next(), Some(b'\\' | b'n')) {
            return false;
        }
    }
    true
}

/// Appends a value of [`identity_lines`], unescaped; most have nothing to unescape.
fn unescape_into(out: &mut String, escaped: &str) {
    if !escaped.contains('\\') {
        out.push_str(escaped);
        return;
    }
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        out.push(match c {
            '\\' => match chars.next() {
                Some('n') => '\n',
                _ => '\\',
            },
            c => c,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_pack_in_order_and_refuse_what_would_wrap() {
        let versions = [
            (0, 0),
            (0, 1),
            (0, u32::MAX as i64),
            (1, 0),
            (7, 12),
            ((1 << 31) - 1, 5),
        ];
        let packed: Vec<i64> = versions.iter().map(|v| pack_version(*v).unwrap()).collect();
        assert!(
            packed.windows(2).all(|w| w[0] < w[1]),
            "packing keeps the order"
        );
        for (v, p) in versions.iter().zip(&packed) {
            assert_eq!(unpack_version(*p), *v);
        }
        assert!(pack_version((1 << 31, 0)).is_err());
        assert!(pack_version((1, 1 << 32)).is_err());
        assert!(pack_version((-1, 0)).is_err());
    }

    #[test]
    fn keys_depend_on_directory_kind_and_value_and_masks_keep_the_low_bits() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let k = identity_key(a, 0, "ann@example.com");
        assert_eq!(k, identity_key(a, 0, "ann@example.com"));
        assert_ne!(k, identity_key(b, 0, "ann@example.com"));
        assert_ne!(k, identity_key(a, 2, "ann@example.com"));
        assert_ne!(k, identity_key(a, 0, "bob@example.com"));
        let space = KeySpace::masked(4);
        let home = space.home(a, 0, "ann@example.com");
        assert_eq!(home, k & 15);
        assert_eq!(space.next(15), 0, "a masked probe wraps");
        assert_eq!(
            KeySpace::FULL.next(i64::MAX),
            i64::MIN,
            "so does a full one"
        );
    }

    #[test]
    fn profile_columns_are_read_where_profile_columns_puts_them() {
        let names: Vec<String> = format!("id, directory_id, {}", profile_columns())
            .split(", ")
            .map(str::to_owned)
            .collect();
        let at = ProfileColumnsAt(2);
        assert_eq!(names[at.created_ms()], "created_ms");
        assert_eq!(names[at.updated_ms()], "updated_ms");
        assert_eq!(names[at.version()], "version");
        for (i, name) in field_names().enumerate() {
            assert_eq!(names[at.field(i)], name);
            assert_eq!(names[at.field_version(i)], format!("{name}_v"));
        }
        assert_eq!(
            &names[at.field_ranks()..],
            ["field_ranks", "attributes", "identities"]
        );
    }

    #[test]
    fn profile_columns_cover_every_known_field_and_refuse_others() {
        let mut state = ProfileState::default();
        state.fields.insert(
            "city",
            Versioned {
                value: "Paris".into(),
                version: (3, 9),
                rank: Rank::Newer,
            },
        );
        state.fields.insert(
            "title",
            Versioned {
                value: "CTO".into(),
                version: (3, 9),
                rank: Rank::Overwrite,
            },
        );
        state.fields.insert(
            "company",
            Versioned {
                value: "Acme".into(),
                version: (2, 4),
                rank: Rank::Newer,
            },
        );
        let columns = ProfileColumns::of(&state).unwrap();
        assert_eq!(columns.fields.len(), KnownField::ALL.len());
        assert_eq!(columns.attributes, None);
        assert_eq!(
            columns.version,
            Some(3 << 32 | 9),
            "the version two fields share"
        );
        let at = |name: &str| field_names().position(|f| f == name).unwrap();
        assert_eq!(columns.fields[at("city")], (Some("Paris"), None));
        assert_eq!(columns.fields[at("title")], (Some("CTO"), None));
        assert_eq!(
            columns.fields[at("company")],
            (Some("Acme"), Some(2 << 32 | 4)),
            "a field written by another row keeps its own"
        );
        assert_eq!(columns.fields[at("email")], (None, None));
        assert_eq!(
            columns.ranks,
            Some(i64::from(Rank::Overwrite.number()) << (RANK_BITS * at("title"))),
            "only the overwritten title has a rank other than newer_wins"
        );
        state.fields.insert(
            "shoe_size",
            Versioned {
                value: "44".into(),
                version: (3, 9),
                rank: Rank::Newer,
            },
        );
        assert!(ProfileColumns::of(&state).is_err());
    }

    #[test]
    fn identities_round_trip_through_their_text() {
        let identities = [
            ("email", "a@x.co"),
            ("linkedin_url", "linkedin.com/in/a"),
            ("phone", "odd\\value\nwith:colons"),
        ];
        let text = identities_text(identities).unwrap();
        assert_eq!(text.lines().count(), 3, "one line per identity: {text:?}");
        assert!(text.starts_with("0:a@x.co\n1:linkedin.com/in/a\n2:"));
        let back = parse_identities(&text).unwrap();
        let want: Vec<(String, String)> = identities
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(back, want);
        assert!(parse_identities("").unwrap().is_empty());
        assert!(parse_identities("9:x").is_err());
        assert!(
            parse_identities("0:a\\tb").is_err(),
            "an escape that was never written"
        );
        assert!(parse_identities("0:a\\").is_err());
        assert!(identities_text([("shoe", "x")]).is_err());
    }
}
