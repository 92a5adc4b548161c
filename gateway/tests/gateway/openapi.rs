//! The OpenAPI document names every operation, so generated clients get readable method names,
//! every documented operation is a route the gateway really serves, the document agrees with
//! docs/api.md, and the server does exactly what the document says (schemathesis, with real ids).

use crate::common;

use std::collections::HashSet;

use crate::common::{assert_problem, TestApp};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use uuid::Uuid;

/// The OpenAPI document as the gateway serves it.
async fn served_document(app: &TestApp) -> Value {
    let (status, doc) = app.get_json(&app.url("/openapi.json")).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    doc
}

#[tokio::test]
async fn every_route_has_an_operation_id_a_declared_tag_and_is_served() {
    let app = TestApp::spawn().await;
    let doc = served_document(&app).await;
    let servers = doc["servers"].as_array().expect("servers");
    assert!(!servers.is_empty() && servers.iter().all(|s| s["url"].is_string()));
    let declared: HashSet<&str> = doc["tags"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| t["name"].as_str().expect("tag name"))
        .collect();

    let mut ids = HashSet::new();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            operations += 1;
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(
                id.chars().next().unwrap().is_ascii_lowercase()
                    && id.chars().all(|c| c.is_ascii_alphanumeric()),
                "{id} is not lowerCamelCase"
            );
            assert!(ids.insert(id.to_owned()), "{id} is used twice");
            let tags = op["tags"].as_array().expect("tags");
            assert!(!tags.is_empty(), "{id} has no tag");
            for tag in tags {
                assert!(declared.contains(tag.as_str().unwrap()), "{id}: {tag}");
            }

            // Ids that exist nowhere: the route answers with its own 4xx, never the router's
            // fallbacks, and changes nothing.
            let url = app.url(
                &path
                    .replace("{organizationId}", &app.tenant.org.to_string())
                    .replace("{directoryId}", &Uuid::now_v7().to_string())
                    .replace("{sourceId}", &Uuid::now_v7().to_string())
                    .replace("{profileId}", &Uuid::now_v7().to_string()),
            );
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app
                .client
                .request(method.clone(), &url)
                .bearer_auth(&app.tenant.token)
                .send()
                .await
                .unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_ne!(status, 405, "{method} {path}: {body}");
            assert_ne!(body["code"], "not_found", "{method} {path} is not routed");
        }
    }
    // The other direction: every handler the router mounts is documented. A handler mounted
    // on two listeners (`/metrics`) is one operation.
    let router = include_str!("../../src/app.rs");
    let mut handlers = HashSet::new();
    for method in [
        "get(", "head(", "options(", "post(", "put(", "patch(", "delete(",
    ] {
        for prefix in ["routes::", "crate::"] {
            let start = format!("{method}{prefix}");
            for (at, _) in router.match_indices(&start) {
                let rest = &router[at + method.len()..];
                let end = rest.find(')').expect("a handler path ends");
                handlers.insert(&rest[..end]);
            }
        }
    }
    let mounted = handlers.len();
    assert_eq!(
        operations, mounted,
        "the router mounts {mounted} handlers, the document describes {operations}"
    );
}

/// docs/api.md and the OpenAPI document describe the same API: each names every route of the
/// other, and both cover every problem code the gateway can answer (`problem::CODES`), the
/// document with its `type` URI.
#[tokio::test]
async fn docs_api_md_and_the_openapi_document_agree() {
    let app = TestApp::spawn().await;
    let doc = served_document(&app).await;
    let docs = include_str!("../../../docs/api.md");

    let mut in_document = HashSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            in_document.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    // Each endpoint of docs/api.md has a heading "### `METHOD /path`".
    let in_docs: HashSet<String> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("### `")?.strip_suffix('`'))
        .map(str::to_owned)
        .collect();
    let mut missing: Vec<_> = in_document.difference(&in_docs).collect();
    missing.sort();
    assert!(missing.is_empty(), "routes not in docs/api.md: {missing:?}");
    let mut missing: Vec<_> = in_docs.difference(&in_document).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "routes of docs/api.md not in /openapi.json: {missing:?}"
    );

    let enumerated: HashSet<&str> = doc["components"]["schemas"]["Problem"]["properties"]["code"]
        ["enum"]
        .as_array()
        .expect("the Problem schema enumerates its codes")
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let listed: HashSet<&str> = orbit_gateway::problem::CODES.iter().copied().collect();
    assert_eq!(
        enumerated, listed,
        "/openapi.json's codes and problem::CODES"
    );
    for code in orbit_gateway::problem::CODES {
        let row = docs
            .lines()
            .find(|l| l.starts_with('|') && l.contains(&format!("| `{code}` |")))
            .unwrap_or_else(|| panic!("{code} has no row in docs/api.md's problem codes"));
        let uri = orbit_gateway::problem::type_uri(code);
        assert!(row.contains(&format!("`{uri}`")), "{code}: {row}");
    }
    // And the table lists nothing else: a row per code, no stale one.
    let table = docs
        .split("## Problem codes")
        .nth(1)
        .expect("a problem codes section")
        .split("\n## ")
        .next()
        .unwrap();
    let rows = table
        .lines()
        .filter(|l| l.starts_with('|') && l.contains("https://orbit.dev/problems/"))
        .count();
    assert_eq!(rows, orbit_gateway::problem::CODES.len(), "{table}");
}

/// The disagreements schemathesis once found, each as a client meets it.
#[tokio::test]
async fn the_server_answers_what_the_document_says() {
    let app = TestApp::spawn().await;
    // A parameter given twice is a problem+json 400, not the framework's text/plain.
    let response = app
        .get(&app.dir_url("/sources?limit=1&limit=2"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    // An empty cursor is the first page.
    let (status, body) = app.get_json(&app.dir_url("/sources?cursor=")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["data"].is_array(), "{body}");
    // The directory body takes `name` and nothing else, as its schema says.
    let response = app
        .post(&app.url(&format!("/v2/organizations/{}/directories", app.tenant.org)))
        .json(&serde_json::json!({"name": "Leads", "colour": "blue"}))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    // Ids are hyphenated UUIDs, the document's pattern; other spellings are refused.
    let simple = app.tenant.dir.simple().to_string();
    let response = app
        .get(&app.url(&format!(
            "/v2/organizations/{}/directories/{simple}/sources",
            app.tenant.org
        )))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    // A key outside printable ASCII, as the document's pattern says.
    let response = app
        .post(&app.upload_url())
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes("café".as_bytes()).unwrap(),
        )
        .multipart(common::file_form("email\nann@example.com\n"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
}

/// schemathesis (deploy/schemathesis.sh installs it from PyPI) generates requests from the
/// served /openapi.json, valid and invalid, and runs every check it has against the answers:
/// no server error, every status, content type, header and body as documented, schema-valid
/// requests accepted and invalid ones rejected. Path ids are real (the tenant's organization
/// and directory, a source and a profile of an upload), so requests reach the handlers rather
/// than stopping at 404; archiving gets a directory of its own, so uploads keep theirs. Two
/// things a schema cannot say are configured: a cursor is opaque (pinned to the empty one,
/// the first page), and whether a file is a valid CSV is decided by its content (`422`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure() {
    let app = TestApp::spawn().await;
    let upload = app
        .upload_ok(
            "First Name,Email,Phone\nAnn,ann@example.com,(415) 555-2671\nBob,not-an-email,\n",
        )
        .await;
    let source = upload["source_id"].as_str().unwrap().to_owned();
    let profiles = app.collect(&app.dir_url("/profiles")).await;
    let profile = profiles[0]["id"].as_str().unwrap().to_owned();
    let (status, archive_me) = {
        let response = app
            .post(&app.url(&format!("/v2/organizations/{}/directories", app.tenant.org)))
            .json(&serde_json::json!({"name": "Archive me"}))
            .send()
            .await
            .unwrap();
        (response.status(), response.json::<Value>().await.unwrap())
    };
    assert_eq!(status, StatusCode::CREATED, "{archive_me}");
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[parameters]
"path.organizationId" = "{org}"
"path.directoryId" = "{dir}"
"path.sourceId" = "{source}"
"path.profileId" = "{profile}"
"query.cursor" = ""

[[operations]]
include-operation-id = "archiveDirectory"
parameters = {{ "path.organizationId" = "{org}", "path.directoryId" = "{archive}" }}

# 400: a `mapping` names headers of the file it comes with, and 422: the content must be CSV;
# no schema can say either.
[[operations]]
include-operation-id = "uploadCsv"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "422"]

# 412: tus answers a request without Tus-Resumable: 1.0.0 (or with another version) so, as its
# protocol requires, where schemathesis expects a 400.
[[operations]]
include-operation-id = ["getResumableUploadOffset", "deleteResumableUpload"]
checks.negative_data_rejection.expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "412", "415", "422", "428", "429", "5xx"]
checks.missing_required_header.expected-statuses = ["400", "401", "403", "406", "412", "415", "422"]

# 400: a webhook's host must resolve (here only loopback names do) to an address it may target;
# no schema can say that.
[[operations]]
include-operation-id = "createWebhook"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409"]
"#,
            org = app.tenant.org,
            dir = app.tenant.dir,
            archive = archive_me["id"].as_str().unwrap(),
        ),
    )
    .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/schemathesis.sh");
    let output = tokio::process::Command::new("bash")
        .arg(script)
        .args([
            "--no-color",
            "--config-file",
            config.to_str().unwrap(),
            "run",
        ])
        .arg(app.url("/openapi.json"))
        .args([
            "--header",
            &format!("Authorization: Bearer {}", app.tenant.token),
        ])
        // Every check; a bounded number of cases per operation and a fixed seed, so a run
        // takes about a minute and a failure can be replayed.
        .args([
            "--checks",
            "all",
            "--max-examples",
            "40",
            "--seed",
            "20261129",
        ])
        // The tus requests with a body: schemathesis cannot write an
        // application/offset+octet-stream body, and they are tested byte for byte, with a
        // real tus client too, by the resumable:: suite.
        .args([
            "--exclude-operation-id",
            "createResumableUpload",
            "--exclude-operation-id",
            "appendResumableUpload",
        ])
        // One worker: two threads have tripped CPython 3.11 ("AST constructor recursion depth
        // mismatch") inside schemathesis, an error of the tool rather than a finding.
        .args(["--workers", "1"])
        .current_dir(work.path())
        .kill_on_drop(true)
        .output()
        .await
        .expect("bash runs deploy/schemathesis.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("generated"), "{stdout}");
}
