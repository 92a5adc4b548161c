//! `GET …/profiles/export`: every profile of a directory as CSV or NDJSON, streamed from one
//! snapshot of the store (`Profiles::export_profiles`).
//!
//! A task pulls the store's batches ahead into a channel of two, so the database fetches the
//! next batch while this one is encoded and sent; the channel's bound is the back-pressure, and
//! a client that goes away drops the body, whose receiver going away ends the task and with it
//! the snapshot's transaction. The CSV layout (how a profile with several identities of a kind
//! becomes rows that import back into one profile) is `csv_rows`; docs/api.md states what the
//! round trip keeps.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use orbit_core::domain::header::KnownField;
use orbit_store::{ExportFilter, ExportedProfile, StoreResult};
use serde::Deserialize;
use uuid::Uuid;

use super::ScopedDirectory;
use crate::app::AppState;
use crate::metrics::METRICS;
use crate::problem::{ApiError, ApiResult};

/// The response header with the number of profiles in the export, read in its snapshot.
pub const PROFILE_COUNT: &str = "orbit-profile-count";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Ndjson,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
        }
    }

    fn media_type(self) -> (&'static str, &'static str) {
        match self {
            Format::Csv => ("text", "csv"),
            Format::Ndjson => ("application", "x-ndjson"),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ExportQuery {
    pub format: Option<String>,
    pub updated_since: Option<String>,
}

/// `?format=` wins; otherwise the `Accept` header's preference (q-values, the most specific
/// range that matches deciding a type's weight), CSV when it is absent or allows both equally.
pub fn negotiate(format: Option<&str>, accept: Option<&HeaderValue>) -> ApiResult<Format> {
    match format.filter(|f| !f.is_empty()) {
        Some("csv") => return Ok(Format::Csv),
        Some("ndjson") => return Ok(Format::Ndjson),
        Some(other) => {
            return Err(ApiError::invalid_request(format!(
                "format must be csv or ndjson, not {other:?}"
            )))
        }
        None => {}
    }
    let Some(accept) = accept else {
        return Ok(Format::Csv);
    };
    let accept = accept.to_str().unwrap_or_default();
    if accept.trim().is_empty() {
        return Ok(Format::Csv);
    }
    let weight = |format: Format| -> f32 {
        let (kind, sub) = format.media_type();
        // (specificity, q) of the most specific range that matches.
        let mut best: Option<(u8, f32)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").map(str::to_owned))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            let Some((t, s)) = media.split_once('/') else {
                continue;
            };
            let specificity = match (t, s) {
                ("*", "*") => 0,
                (t, "*") if t == kind => 1,
                (t, s) if t == kind && s == sub => 2,
                _ => continue,
            };
            if best.is_none_or(|(b, _)| specificity > b) {
                best = Some((specificity, q));
            }
        }
        best.map_or(0.0, |(_, q)| q)
    };
    let (csv, ndjson) = (weight(Format::Csv), weight(Format::Ndjson));
    if csv <= 0.0 && ndjson <= 0.0 {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
            "the export is text/csv or application/x-ndjson, and Accept allows neither",
        ));
    }
    Ok(if ndjson > csv {
        Format::Ndjson
    } else {
        Format::Csv
    })
}

/// `updated_since`: an RFC 3339 time; empty is no filter, as with `cursor=`.
pub fn parse_since(raw: Option<&str>) -> ApiResult<Option<DateTime<Utc>>> {
    match raw.filter(|r| !r.is_empty()) {
        None => Ok(None),
        Some(raw) => DateTime::parse_from_rfc3339(raw)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|e| {
                ApiError::invalid_request(format!(
                    "updated_since must be an RFC 3339 time such as 2026-11-29T12:00:00Z ({e}): {raw:?}"
                ))
            }),
    }
}

pub async fn export(
    State(state): State<AppState>,
    ScopedDirectory(dir): ScopedDirectory,
    Query(query): Query<ExportQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let format = negotiate(query.format.as_deref(), headers.get(header::ACCEPT))?;
    let filter = ExportFilter {
        updated_since: parse_since(query.updated_since.as_deref())?,
    };
    let export = state
        .store
        .export_profiles(dir.organization_id, dir.id, &filter)
        .await?
        .ok_or_else(ApiError::directory_not_found)?;
    METRICS.exports.with_label_values(&[format.as_str()]).inc();
    let count = export.count;
    let (tx, rx) = tokio::sync::mpsc::channel::<StoreResult<Vec<ExportedProfile>>>(2);
    let mut batches = export.batches;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                // The client went away (the body, and with it the receiver, was dropped):
                // stop now, even mid-fetch, so the snapshot's transaction ends with the stream.
                _ = tx.closed() => break,
                next = batches.next() => match next {
                    None => break,
                    Some(batch) => {
                        if tx.send(batch).await.is_err() {
                            break;
                        }
                    }
                },
            }
        }
    });
    let mut encoder = Encoder::new(format, dir.id, export.attribute_names);
    let head = encoder.head();
    let profiles = METRICS
        .export_profiles
        .with_label_values(&[format.as_str()]);
    let body = futures::stream::once(async move { Ok::<_, std::io::Error>(head) }).chain(
        tokio_stream_of(rx).map(move |batch| match batch {
            Ok(batch) => {
                profiles.inc_by(batch.len() as u64);
                Ok(encoder.batch(batch))
            }
            Err(e) => {
                tracing::error!(error = %e, "profile export broke off");
                Err(std::io::Error::other(e.to_string()))
            }
        }),
    );
    let filename = format!("{}-profiles.{}", dir.id, format.as_str());
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
            (
                header::HeaderName::from_static(PROFILE_COUNT),
                count.to_string(),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Turns batches of profiles into the bytes of one format.
struct Encoder {
    format: Format,
    directory_id: Uuid,
    attributes: Vec<String>,
    /// `"name":` of each known field with its place in [`KnownField::ALL`], in the order a
    /// [`ProfileBody`](super::profiles::ProfileBody) serializes them (by name).
    json_fields: Vec<(usize, String)>,
    /// The size of the last batch's bytes: the next buffer starts that large.
    last_len: usize,
}

impl Encoder {
    fn new(format: Format, directory_id: Uuid, attributes: Vec<String>) -> Self {
        let mut json_fields: Vec<(usize, String)> = KnownField::ALL
            .iter()
            .enumerate()
            .map(|(i, f)| (i, format!("{}:", json_string(f.as_str()))))
            .collect();
        json_fields.sort_by_key(|(i, _)| KnownField::ALL[*i].as_str());
        Encoder {
            format,
            directory_id,
            attributes,
            json_fields,
            last_len: 64 * 1024,
        }
    }

    /// The CSV header (the known fields by their canonical names, then the custom attributes);
    /// nothing for NDJSON.
    fn head(&self) -> Bytes {
        match self.format {
            Format::Ndjson => Bytes::new(),
            Format::Csv => {
                let mut out = csv::Writer::from_writer(Vec::new());
                let known = KnownField::ALL.iter().map(|f| f.as_str());
                out.write_record(known.chain(self.attributes.iter().map(String::as_str)))
                    .expect("writing to memory");
                Bytes::from(out.into_inner().expect("writing to memory"))
            }
        }
    }

    fn batch(&mut self, batch: Vec<ExportedProfile>) -> Bytes {
        let buf = Vec::with_capacity(self.last_len + self.last_len / 8);
        let out = match self.format {
            Format::Csv => {
                let mut out = csv::Writer::from_writer(buf);
                let width = KnownField::ALL.len() + self.attributes.len();
                let mut record: Vec<&str> = Vec::with_capacity(width);
                for profile in &batch {
                    for row in csv_rows(profile) {
                        record.clear();
                        record.extend(row.cells.iter().map(|v| v.unwrap_or("")));
                        if row.is_main {
                            extend_attributes(&mut record, &self.attributes, profile.attributes());
                        } else {
                            record.resize(width, "");
                        }
                        out.write_record(&record).expect("writing to memory");
                    }
                }
                out.into_inner().expect("writing to memory")
            }
            Format::Ndjson => {
                let mut out = buf;
                for profile in &batch {
                    self.json_line(&mut out, profile);
                }
                out
            }
        };
        self.last_len = out.len();
        Bytes::from(out)
    }

    /// One profile as the object of `GET …/profiles`
    /// ([`ProfileBody`](super::profiles::ProfileBody)), byte for byte, and a line end: written
    /// directly, since serde's `flatten` of the fields buffers every value of every profile.
    fn json_line(&self, out: &mut Vec<u8>, p: &ExportedProfile) {
        let mut uuid = Uuid::encode_buffer();
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(p.id.hyphenated().encode_lower(&mut uuid).as_bytes());
        out.extend_from_slice(b"\",\"directory_id\":\"");
        out.extend_from_slice(
            self.directory_id
                .hyphenated()
                .encode_lower(&mut uuid)
                .as_bytes(),
        );
        out.extend_from_slice(b"\"");
        for (i, name) in &self.json_fields {
            out.push(b',');
            out.extend_from_slice(name.as_bytes());
            match p.field(*i) {
                Some(value) => write_json(out, value),
                None => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b",\"attributes\":{");
        for (n, (name, value)) in p.attributes().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            write_json(out, name);
            out.push(b':');
            write_json(out, value);
        }
        out.extend_from_slice(b"},\"identities\":{");
        for (n, (list, kind)) in [
            ("emails", "email"),
            ("phones", "phone"),
            ("linkedin_urls", "linkedin_url"),
        ]
        .into_iter()
        .enumerate()
        {
            if n > 0 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(list.as_bytes());
            out.extend_from_slice(b"\":[");
            let values = p.identities().filter(|(k, _)| *k == kind);
            for (m, (_, value)) in values.enumerate() {
                if m > 0 {
                    out.push(b',');
                }
                write_json(out, value);
            }
            out.push(b']');
        }
        out.extend_from_slice(b"},\"created_at\":");
        write_json(out, &p.created_at);
        out.extend_from_slice(b",\"updated_at\":");
        write_json(out, &p.updated_at);
        out.extend_from_slice(b"}\n");
    }
}

/// The attribute cells of a main row, in the header's order: the profile's attributes are
/// sorted by name, as the header is, so one merge-like walk finds them.
fn extend_attributes<'a>(
    record: &mut Vec<&'a str>,
    header: &[String],
    attributes: impl Iterator<Item = (&'a str, &'a str)>,
) {
    let mut have = attributes.peekable();
    for name in header {
        while have.next_if(|(n, _)| *n < name.as_str()).is_some() {}
        record.push(match have.next_if(|(n, _)| *n == name) {
            Some((_, value)) => value,
            None => "",
        });
    }
}

fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    serde_json::to_writer(out, value).expect("writing to memory");
}

fn json_string(value: &str) -> String {
    serde_json::to_string(value).expect("a string serializes")
}

/// The column of each identity kind among [`KnownField::ALL`].
fn kind_column(kind: &str) -> Option<usize> {
    KnownField::ALL.iter().position(|f| f.as_str() == kind)
}

/// One CSV row of a profile: a cell per known field; the attributes go on the main row only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvRow<'a> {
    pub cells: [Option<&'a str>; KnownField::ALL.len()],
    pub is_main: bool,
}

/// The rows that import back into this one profile. The main row has every field; a field
/// of an identity kind only when the profile holds it as an identity (a value it lost to
/// another profile in a conflict would claim it on import). A profile with more identities than
/// the main row carries gets, after the main row, one row per extra identity that also carries
/// an identity imported before it, of another kind (so the importer joins it to the same
/// profile whatever its resolution order), and then the main row again, so that its values are
/// the last written to every field.
pub fn csv_rows(profile: &ExportedProfile) -> Vec<CsvRow<'_>> {
    let mut main = CsvRow {
        cells: [None; KnownField::ALL.len()],
        is_main: true,
    };
    let holds =
        |kind: &str, value: &str| profile.identities().any(|(k, v)| k == kind && v == value);
    for (i, field) in KnownField::ALL.iter().enumerate() {
        let value = profile.field(i);
        main.cells[i] = match value {
            Some(v) if field.is_identifier() && !holds(field.as_str(), v) => None,
            other => other,
        };
    }
    // The identities the rows import so far, in resolution order of kind.
    let mut imported: Vec<(&str, &str)> = Vec::new();
    for (kind, value) in profile.identities() {
        let column = kind_column(kind).expect("an identity kind is a known field");
        if main.cells[column] == Some(value) {
            imported.push((kind, value));
        }
    }
    if imported.is_empty() {
        // No identity field is set (all were cleared): the main row carries the first
        // identity, or the importer would fail it.
        if let Some((kind, value)) = profile.identities().next() {
            let column = kind_column(kind).expect("an identity kind is a known field");
            main.cells[column] = Some(value);
            imported.push((kind, value));
        }
    }
    let mut pending: Vec<(&str, &str)> = profile
        .identities()
        .filter(|identity| !imported.contains(identity))
        .collect();
    let mut links = Vec::new();
    while let Some(at) = pending
        .iter()
        .position(|(kind, _)| imported.iter().any(|(k, _)| k != kind))
    {
        let (kind, value) = pending.remove(at);
        let anchor = *imported
            .iter()
            .find(|(k, _)| *k != kind)
            .expect("found above");
        let mut row = CsvRow {
            cells: [None; KnownField::ALL.len()],
            is_main: false,
        };
        row.cells[kind_column(kind).expect("a known kind")] = Some(value);
        row.cells[kind_column(anchor.0).expect("a known kind")] = Some(anchor.1);
        links.push(row);
        imported.push((kind, value));
    }
    // What is still pending shares the one kind the profile has: no row could carry it
    // into this profile, so it is left out (docs/api.md, the limits of the round trip).
    if links.is_empty() {
        return vec![main];
    }
    let mut rows = Vec::with_capacity(links.len() + 2);
    rows.push(main.clone());
    rows.extend(links);
    rows.push(main);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use orbit_core::domain::resolve::{ProfileState, Versioned};
    use orbit_core::model::Profile;

    fn profile(fields: &[(&'static str, &str)], identities: &[(&str, &str)]) -> ExportedProfile {
        full(fields, &[], identities).into()
    }

    fn full(
        fields: &[(&'static str, &str)],
        attributes: &[(&str, &str)],
        identities: &[(&str, &str)],
    ) -> Profile {
        let mut state = ProfileState::default();
        for (name, value) in fields {
            state.fields.insert(
                name,
                Versioned {
                    value: (*value).to_owned(),
                    version: (1, 1),
                    rank: Default::default(),
                },
            );
        }
        for (name, value) in attributes {
            state.attributes.insert(
                (*name).to_owned(),
                Versioned {
                    value: (*value).to_owned(),
                    version: (2, 1),
                    rank: Default::default(),
                },
            );
        }
        Profile {
            id: Uuid::now_v7(),
            directory_id: Uuid::nil(),
            state,
            identities: identities
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            created_at: Utc::now(),
            updated_at: Utc::now(),
        }
    }

    fn cell(row: &CsvRow, field: &str) -> Option<String> {
        row.cells[kind_column(field).unwrap()].map(str::to_owned)
    }

    #[test]
    fn format_comes_from_the_query_then_accept() {
        let accept = |v: &str| HeaderValue::from_str(v).unwrap();
        assert_eq!(negotiate(None, None).unwrap(), Format::Csv);
        assert_eq!(negotiate(None, Some(&accept("*/*"))).unwrap(), Format::Csv);
        assert_eq!(
            negotiate(None, Some(&accept("application/x-ndjson"))).unwrap(),
            Format::Ndjson
        );
        assert_eq!(
            negotiate(
                None,
                Some(&accept("text/csv;q=0.5, application/x-ndjson;q=0.9"))
            )
            .unwrap(),
            Format::Ndjson
        );
        assert_eq!(
            negotiate(None, Some(&accept("text/*, */*;q=0.1"))).unwrap(),
            Format::Csv
        );
        assert_eq!(
            negotiate(Some("csv"), Some(&accept("application/x-ndjson"))).unwrap(),
            Format::Csv
        );
        for refused in ["application/json", "text/csv;q=0, application/*;q=0"] {
            let e = negotiate(None, Some(&accept(refused))).unwrap_err();
            assert_eq!(e.code, "not_acceptable", "{refused}");
        }
        assert_eq!(
            negotiate(Some("xml"), None).unwrap_err().code,
            "invalid_request"
        );
    }

    #[test]
    fn a_malformed_time_names_the_parameter() {
        assert!(parse_since(Some("")).unwrap().is_none());
        assert!(parse_since(Some("2026-11-29T12:00:00+01:00"))
            .unwrap()
            .is_some());
        let e = parse_since(Some("yesterday")).unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.detail.contains("updated_since"), "{}", e.detail);
    }

    #[test]
    fn one_identity_of_each_kind_is_one_row() {
        let p = profile(
            &[("first_name", "Ann"), ("email", "a@x.io"), ("phone", "+1")],
            &[("email", "a@x.io"), ("phone", "+1")],
        );
        let rows = csv_rows(&p);
        assert_eq!(rows.len(), 1);
        assert_eq!(cell(&rows[0], "first_name").as_deref(), Some("Ann"));
        assert_eq!(cell(&rows[0], "phone").as_deref(), Some("+1"));
    }

    #[test]
    fn extra_identities_ride_on_an_imported_one_and_the_main_row_comes_last() {
        let p = profile(
            &[("email", "a@x.io"), ("phone", "+1"), ("title", "CTO")],
            &[
                ("email", "a@x.io"),
                ("email", "b@x.io"),
                ("phone", "+1"),
                ("phone", "+2"),
                ("linkedin_url", "linkedin.com/in/a"),
            ],
        );
        let rows = csv_rows(&p);
        assert_eq!(rows.len(), 5, "{rows:?}");
        assert_eq!(rows[0], rows[4]);
        assert!(rows[0].is_main && !rows[1].is_main);
        let mut imported: Vec<(String, String)> = Vec::new();
        for (n, row) in rows.iter().enumerate() {
            let ids: Vec<(String, String)> = ["email", "linkedin_url", "phone"]
                .iter()
                .filter_map(|k| cell(row, k).map(|v| ((*k).to_owned(), v)))
                .collect();
            if n > 0 {
                assert!(ids.iter().any(|i| imported.contains(i)), "{row:?}");
            }
            imported.extend(ids);
            if !row.is_main {
                assert_eq!(cell(row, "title"), None);
            }
        }
        for (k, v) in p.identities() {
            assert!(imported.contains(&(k.to_owned(), v.to_owned())), "{k} {v}");
        }
    }

    #[test]
    fn cleared_values_are_empty_cells_and_lost_identities_are_left_out() {
        let p = profile(
            &[("first_name", ""), ("email", "a@x.io"), ("phone", "+9")],
            &[("email", "a@x.io")],
        );
        let rows = csv_rows(&p);
        assert_eq!(rows.len(), 1);
        assert_eq!(cell(&rows[0], "first_name"), None);
        // +9 belongs to another profile: claiming it on import would move it.
        assert_eq!(cell(&rows[0], "phone"), None);
    }

    #[test]
    fn an_ndjson_line_is_the_profile_of_the_json_api() {
        let directory = Uuid::now_v7();
        let mut p = full(
            &[
                ("first_name", "Zoë \"Z\""),
                ("email", "a@x.io"),
                ("title", ""),
                ("city", "Paris\nNord"),
            ],
            &[("tier", "gold"), ("Team Name", "a\\b"), ("gone", "")],
            &[("email", "a@x.io"), ("email", "b@x.io"), ("phone", "+1")],
        );
        p.directory_id = directory;
        let exported = ExportedProfile::from(p.clone());
        // What `GET …/profiles/{id}` shows: cleared values are null or left out.
        p.state.fields.retain(|_, v| !v.value.is_empty());
        p.state.attributes.retain(|_, v| !v.value.is_empty());
        let api = serde_json::to_vec(&super::super::profiles::ProfileBody::from(p)).unwrap();
        for attributes in [vec![], vec!["tier".to_owned()]] {
            let mut encoder = Encoder::new(Format::Ndjson, directory, attributes);
            let line = encoder.batch(vec![exported.clone()]);
            assert_eq!(
                String::from_utf8_lossy(&line),
                format!("{}\n", String::from_utf8_lossy(&api))
            );
        }
    }

    #[test]
    fn attribute_cells_follow_the_header() {
        let header: Vec<String> = ["a", "c", "d", "f"].map(str::to_owned).to_vec();
        let have = [("b", "1"), ("c", "2"), ("f", "3"), ("g", "4")];
        let mut record = vec!["x"];
        extend_attributes(&mut record, &header, have.into_iter());
        assert_eq!(record, ["x", "", "2", "", "3"]);
        let mut csv = Encoder::new(Format::Csv, Uuid::nil(), header);
        let p = profile(&[("email", "a@x.io")], &[("email", "a@x.io")]);
        let text = String::from_utf8(csv.batch(vec![p]).to_vec()).unwrap();
        assert_eq!(text, ",,,a@x.io,,,,,,,,,,\n");
    }
}
