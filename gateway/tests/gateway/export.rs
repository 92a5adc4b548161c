//! `GET …/profiles/export`: the CSV round trip, NDJSON, `updated_since`, format negotiation,
//! compression, tenancy, a snapshot taken while an import runs, and a client that goes away.
//! Each runs on the embedded stack and, with `ORBIT_TEST_STACK=distributed`, on PostgreSQL
//! (or Citus); the one about database sessions needs PostgreSQL.

use std::io::Read as _;
use std::time::{Duration, Instant};

use crate::common::*;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

/// A client that hands back the body as sent (no transparent decompression).
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_gzip()
        .no_zstd()
        .build()
        .unwrap()
}

async fn export(
    app: &TestApp,
    dir: Uuid,
    query: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let url = app.url(&format!(
        "/v2/organizations/{}/directories/{dir}/profiles/export{query}",
        app.tenant.org
    ));
    let mut request = raw_client().get(url).bearer_auth(&app.tenant.token);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.bytes().await.unwrap().to_vec())
}

async fn export_ok(app: &TestApp, dir: Uuid, query: &str) -> String {
    let (status, _, body) = export(app, dir, query, &[]).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    String::from_utf8(body).unwrap()
}

/// Every profile as NDJSON, without what differs between two directories, keyed by the
/// profile's sorted identities.
async fn profiles(app: &TestApp, dir: Uuid) -> Vec<Value> {
    let body = export_ok(app, dir, "?format=ndjson").await;
    let mut out: Vec<Value> = body
        .lines()
        .map(|line| {
            let mut p: Value = serde_json::from_str(line).unwrap();
            let object = p.as_object_mut().unwrap();
            for volatile in ["id", "directory_id", "created_at", "updated_at"] {
                assert!(object.remove(volatile).is_some(), "{volatile} in {line}");
            }
            p
        })
        .collect();
    out.sort_by_key(|p| p["identities"].to_string());
    out
}

async fn create_directory(app: &TestApp, name: &str) -> Uuid {
    let response = app
        .post(&app.url(&format!("/v2/organizations/{}/directories", app.tenant.org)))
        .json(&json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().parse().unwrap()
}

/// Uploads `csv` into `dir` and waits for its source to complete.
async fn import(app: &TestApp, dir: Uuid, csv: impl Into<Vec<u8>>) -> Value {
    let base = format!("/v2/organizations/{}/directories/{dir}", app.tenant.org);
    let response = app
        .post(&app.url(&format!("{base}/sources/csv-upload")))
        .multipart(file_form(csv))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    let url = app.url(&format!(
        "{base}/sources/{}",
        body["source_id"].as_str().unwrap()
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, source) = app.get_json(&url).await;
        match source["source_status"].as_str().unwrap() {
            "completed" => return source,
            "failed" => panic!("import failed: {source}"),
            _ if Instant::now() > deadline => panic!("import still running: {source}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

const CONTACTS: &str = "\
First Name,Last Name,E-mail,Phone,Company,LinkedIn,City,Favourite Colour,Notes
Ann,Lee,ann@example.com,+14155552671,Acme,linkedin.com/in/annlee,Paris,green,\"likes, commas\"
Bob,Ray,bob@example.com,,Initech,,,\"say \"\"hi\"\"\",
,,cy@example.com,+14155552672,,,Berlin,,\"two
lines\"
Ann,Lee,ann.lee@work.example,+14155552671,Acme Corp,,,,
,,ann@example.com,+14155552673,,,,,
";

#[tokio::test]
async fn a_csv_export_imports_back_into_the_same_profiles() {
    let app = TestApp::spawn().await;
    import(&app, app.tenant.dir, CONTACTS).await;
    let before = profiles(&app, app.tenant.dir).await;
    assert_eq!(before.len(), 3, "{before:#?}");
    // Ann holds two emails and three phones: rows 4 and 5 joined her through her phone and
    // her email.
    let ann = before
        .iter()
        .find(|p| p["first_name"] == "Ann")
        .expect("Ann");
    assert_eq!(
        ann["identities"],
        json!({"emails": ["ann.lee@work.example", "ann@example.com"],
               "phones": ["+14155552671", "+14155552673"],
               "linkedin_urls": ["linkedin.com/in/annlee"]}),
        "{ann}"
    );

    let csv = export_ok(&app, app.tenant.dir, "").await;
    let header = csv.lines().next().unwrap();
    assert_eq!(
        header,
        "first_name,last_name,full_name,email,phone,company,title,linkedin_url,city,country,Favourite Colour,Notes"
    );
    let copy = create_directory(&app, "Copy").await;
    import(&app, copy, csv.clone()).await;
    let after = profiles(&app, copy).await;
    assert_eq!(before, after, "exported:\n{csv}");
    // And again: the copy's export is the same file.
    assert_eq!(export_ok(&app, copy, "").await, csv);
}

#[tokio::test]
async fn ndjson_carries_ids_fields_attributes_identities_and_times() {
    let app = TestApp::spawn().await;
    import(&app, app.tenant.dir, CONTACTS).await;
    let (status, headers, body) = export(
        &app,
        app.tenant.dir,
        "",
        &[("accept", "application/x-ndjson")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/x-ndjson");
    assert_eq!(headers["orbit-profile-count"], "3");
    let lines: Vec<Value> = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    // Creation order, as the list pages; each line is the JSON API's profile.
    let listed = app.collect(&app.dir_url("/profiles")).await;
    assert_eq!(lines, listed);
    assert_eq!(lines[1]["email"], "bob@example.com");
    assert_eq!(lines[1]["phone"], Value::Null);
    assert_eq!(
        lines[1]["attributes"],
        json!({"Favourite Colour": "say \"hi\""})
    );
}

#[tokio::test]
async fn updated_since_takes_only_what_changed_after() {
    let app = TestApp::spawn().await;
    import(
        &app,
        app.tenant.dir,
        "email,city\na@example.com,Oslo\nb@example.com,Rome\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mark = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    import(
        &app,
        app.tenant.dir,
        "email,city\nb@example.com,Lima\nc@example.com,Kyiv\n",
    )
    .await;
    let since = mark.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let body = export_ok(
        &app,
        app.tenant.dir,
        &format!("?format=ndjson&updated_since={}", since.replace('+', "%2B")),
    )
    .await;
    let emails: Vec<String> = body
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["email"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(emails, ["b@example.com", "c@example.com"]);
    // Empty is no filter.
    assert_eq!(
        export_ok(&app, app.tenant.dir, "?format=ndjson&updated_since=")
            .await
            .lines()
            .count(),
        3
    );

    for bad in ["yesterday", "2026-13-01T00:00:00Z", "2026-11-29"] {
        let response = app
            .get(&app.dir_url(&format!("/profiles/export?updated_since={bad}")))
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("updated_since"),
            "{problem}"
        );
    }
}

#[tokio::test]
async fn format_is_chosen_by_query_then_accept_and_refused_with_406() {
    let app = TestApp::spawn().await;
    import(&app, app.tenant.dir, "email\na@example.com\n").await;
    let dir = app.tenant.dir;
    let content_type = |h: &HeaderMap| h["content-type"].to_str().unwrap().to_owned();
    for (query, accept, expected) in [
        ("", None, "text/csv; charset=utf-8"),
        ("", Some("*/*"), "text/csv; charset=utf-8"),
        ("", Some("application/x-ndjson"), "application/x-ndjson"),
        (
            "",
            Some("text/csv;q=0.2, application/x-ndjson"),
            "application/x-ndjson",
        ),
        (
            "?format=csv",
            Some("application/x-ndjson"),
            "text/csv; charset=utf-8",
        ),
        (
            "?format=ndjson",
            Some("application/json"),
            "application/x-ndjson",
        ),
    ] {
        let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
        let (status, h, _) = export(&app, dir, query, &headers).await;
        assert_eq!(status, StatusCode::OK, "{query} {accept:?}");
        assert_eq!(content_type(&h), expected, "{query} {accept:?}");
    }
    let response = app
        .get(&app.dir_url("/profiles/export"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_ACCEPTABLE, "not_acceptable").await;
    let response = app
        .get(&app.dir_url("/profiles/export?format=xlsx"))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    assert!(problem["detail"].as_str().unwrap().contains("format"));
}

#[tokio::test]
async fn gzip_and_zstd_bodies_decode_to_the_plain_export() {
    let app = TestApp::spawn().await;
    import(&app, app.tenant.dir, contacts_csv(3000, "z")).await;
    let dir = app.tenant.dir;
    let (_, plain_headers, plain) = export(&app, dir, "", &[]).await;
    assert!(plain_headers.get("content-encoding").is_none());
    assert_eq!(plain.iter().filter(|b| **b == b'\n').count(), 3001);
    for (accept, expected) in [
        ("gzip", "gzip"),
        ("zstd", "zstd"),
        ("gzip, zstd", "zstd"),
        ("zstd;q=0.5, gzip", "gzip"),
    ] {
        let (status, headers, body) = export(&app, dir, "", &[("accept-encoding", accept)]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-encoding"], expected, "{accept}");
        assert!(
            headers["vary"]
                .to_str()
                .unwrap()
                .to_ascii_lowercase()
                .contains("accept-encoding"),
            "{headers:?}"
        );
        assert!(
            body.len() < plain.len() / 3,
            "{accept}: {} bytes",
            body.len()
        );
        let mut decoded = Vec::new();
        match expected {
            "gzip" => {
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_end(&mut decoded)
                    .unwrap();
            }
            _ => decoded = zstd::decode_all(&body[..]).unwrap(),
        }
        assert_eq!(decoded, plain, "{accept}");
    }
    // Errors stay plain problem+json, framework rejections (a parameter given twice) too.
    for query in ["?updated_since=never", "?format=csv&format=csv"] {
        let (status, headers, body) =
            export(&app, dir, query, &[("accept-encoding", "gzip, zstd")]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert!(headers.get("content-encoding").is_none(), "{query}");
        let problem: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "invalid_request", "{query}");
    }
}

#[tokio::test]
async fn another_organization_gets_what_other_routes_give_it() {
    let app = TestApp::spawn().await;
    import(&app, app.tenant.dir, "email\na@example.com\n").await;
    let other = app.another_tenant().await;
    // Its token on our path: 403, as everywhere.
    let response = app
        .client
        .get(app.dir_url("/profiles/export"))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::FORBIDDEN, "organization_mismatch").await;
    // Our directory under its organization: not found, as the list says.
    let path = format!(
        "/v2/organizations/{}/directories/{}/profiles",
        other.org, app.tenant.dir
    );
    for rest in ["", "/export"] {
        let response = app
            .client
            .get(app.url(&format!("{path}{rest}")))
            .bearer_auth(&other.token)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::NOT_FOUND, "directory_not_found").await;
    }
    let response = app
        .client
        .get(app.dir_url("/profiles/export"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

/// Row `r` writes `{prefix}{r}` to every field and the attribute of profile `p{r}`: a
/// profile whose values disagree was read in the middle of a commit. Each email appears once,
/// as in a real sync (a file repeating its emails is a different workload, see
/// docs/performance.md).
fn values_csv(rows: usize, prefix: &str) -> String {
    let mut out = String::from("email,first_name,last_name,company,title,tag\n");
    for r in 0..rows {
        let v = format!("{prefix}{r}");
        out.push_str(&format!("p{r}@example.com,{v},{v},{v},{v},{v}\n"));
    }
    out
}

#[tokio::test]
async fn an_export_during_an_import_shows_every_profile_whole() {
    // The import rewrites the first PROFILES profiles and adds the rest.
    const PROFILES: usize = 20_000;
    const ROWS: usize = 200_000;
    let app = TestApp::spawn().await;
    let dir = app.tenant.dir;
    import(&app, dir, values_csv(PROFILES, "old")).await;
    let upload = {
        let url = app.upload_url();
        let client = app.client.clone();
        let token = app.tenant.token.clone();
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(token)
                .multipart(file_form(values_csv(ROWS, "new")))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let mut exports = 0;
    let mut midway = 0;
    let started = Instant::now();
    loop {
        let (status, headers, body) = export(&app, dir, "?format=csv", &[]).await;
        assert_eq!(status, StatusCode::OK);
        let counted: usize = headers["orbit-profile-count"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut reader = csv::Reader::from_reader(&body[..]);
        let (mut rows, mut rewritten) = (0, 0);
        for record in reader.records() {
            let record = record.unwrap();
            // first_name, last_name, company, title and the attribute: one row's values.
            let values = [&record[0], &record[1], &record[5], &record[6], &record[10]];
            assert!(
                values.iter().all(|v| *v == values[0]),
                "a torn profile: {record:?}"
            );
            let n = &record[3][1..record[3].find('@').unwrap()];
            assert!(values[0].ends_with(n), "{record:?}");
            rewritten += usize::from(values[0].starts_with("new"));
            rows += 1;
        }
        // The count and the rows come from one snapshot, whatever committed in between.
        assert_eq!(rows, counted);
        exports += 1;
        if counted > PROFILES && counted < ROWS || rewritten > 0 && rewritten < ROWS {
            midway += 1;
        }
        if upload.is_finished() {
            let sources = app.collect(&app.dir_url("/sources")).await;
            if sources.len() == 2 && sources.iter().all(|s| s["source_status"] == "completed") {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the import never ended"
        );
        // Back to back, the exports take the machine from the import they watch: on a loaded
        // 2-core machine CI once saw the import not end within 900 s.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(upload.await.unwrap().is_success());
    let body = export_ok(&app, dir, "?format=ndjson").await;
    assert_eq!(body.lines().count(), ROWS);
    for line in body.lines() {
        let p: Value = serde_json::from_str(line).unwrap();
        let email = p["email"].as_str().unwrap();
        assert_eq!(
            p["first_name"],
            format!("new{}", &email[1..email.find('@').unwrap()]),
            "{p}"
        );
    }
    assert!(
        midway > 0,
        "no export ran while the import was half done ({exports} exports)"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_leaves_no_session_in_the_export() {
    if !distributed() {
        return; // database sessions are PostgreSQL's
    }
    let app = TestApp::spawn().await;
    // More than loopback's socket buffers hold (several MB each way): with fewer, a plan that
    // sorts first (as fresh statistics after the import may choose) sent the whole export
    // into the buffers and ended it before it could be seen stalled.
    import(&app, app.tenant.dir, contacts_csv(100_000, "gone")).await;
    let database = &app.stack.as_ref().unwrap().database;
    let (column, value) = database.sessions();
    let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
    // A session inside the export's snapshot, its one query streaming.
    let in_export = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE {column} = $1 AND xact_start IS NOT NULL
           AND query LIKE '%FROM profiles p%ORDER BY p.id%' AND pid <> pg_backend_pid()"
    );
    let sessions = || async {
        sqlx::query_scalar::<_, i64>(&in_export)
            .bind(value)
            .fetch_one(&pool)
            .await
            .unwrap()
    };

    let addr = app.running().addr;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let path = format!(
        "/v2/organizations/{}/directories/{}/profiles/export",
        app.tenant.org, app.tenant.dir
    );
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
                app.tenant.token
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut first = [0u8; 4096];
    let n = stream.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    // The client reads no more: the export stalls on back-pressure, its snapshot open.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions().await == 0 {
        assert!(Instant::now() < deadline, "no export session seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions().await > 0 {
        assert!(
            Instant::now() < deadline,
            "the export's transaction outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;
}
