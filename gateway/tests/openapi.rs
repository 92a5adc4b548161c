//! The OpenAPI document names every operation, so generated clients get readable method names,
//! and every documented operation is a route the gateway really serves.

mod common;

use std::collections::HashSet;

use common::TestApp;
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

#[tokio::test]
async fn every_route_has_an_operation_id_a_declared_tag_and_is_served() {
    let app = TestApp::spawn().await;
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
    let router = include_str!("../src/app.rs");
    let mut handlers = HashSet::new();
    for method in ["get(", "post(", "put(", "patch(", "delete("] {
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
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let docs = include_str!("../../docs/api.md");

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
