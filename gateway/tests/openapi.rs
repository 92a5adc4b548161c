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
