//! The rest of the surface: directories, source listing, profiles, tenancy, health and metrics.

use std::time::Duration;

use crate::common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn directories_are_created_listed_and_archived() {
    let app = TestApp::spawn().await;
    let base = app.url(&format!("/v2/organizations/{}/directories", app.tenant.org));
    let response = app
        .post(&base)
        .json(&json!({"name": "  Leads  "}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["name"], "Leads");
    assert_eq!(created["archived"], false);

    for bad in [json!({"name": ""}), json!({"nom": "x"}), json!("x")] {
        let response = app.post(&base).json(&bad).send().await.unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let response = app.post(&base).body("{not json").send().await.unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;

    let all = app.collect(&base).await;
    let names: Vec<&str> = all.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Contacts", "Leads"]);

    // Pages of one, following next_cursor.
    let (_, first) = app.get_json(&format!("{base}?limit=1")).await;
    assert_eq!(first["data"].as_array().unwrap().len(), 1);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = app
        .get_json(&format!("{base}?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(second["data"][0]["name"], "Leads");
    assert!(second["next_cursor"].is_null());
    for bad in [
        "limit=0",
        "limit=abc",
        "limit=5000",
        "cursor=%%%",
        "cursor=bm9wZQ",
    ] {
        let response = app.get(&format!("{base}?{bad}")).send().await.unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    }

    let archive = format!("{base}/{}/archive", created["id"].as_str().unwrap());
    let archived: Value = app
        .post(&archive)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(archived["archived"], true);
    assert!(archived["archived_at"].is_string());
    // Archiving again is harmless.
    let again = app.post(&archive).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let missing = format!("{base}/{}/archive", uuid::Uuid::new_v4());
    let response = app.post(&missing).send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "directory_not_found").await;
}

#[tokio::test]
async fn sources_are_listed_newest_first_with_pagination() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = app.upload_ok(format!("email\nuser{i}@example.com\n")).await;
        ids.push(body["source_id"].as_str().unwrap().to_owned());
    }
    ids.reverse();
    let (_, page) = app.get_json(&app.dir_url("/sources?limit=2")).await;
    let first: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source_id"].as_str().unwrap())
        .collect();
    assert_eq!(first, ids[..2]);
    let all = app.collect(&app.dir_url("/sources")).await;
    let listed: Vec<&str> = all
        .iter()
        .map(|s| s["source_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ids);
    assert_eq!(all[0]["source_status"], "completed");
    let missing = app.dir_url(&format!("/sources/{}", uuid::Uuid::new_v4()));
    let response = app.get(&missing).send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "source_not_found").await;
    let response = app
        .get(&app.dir_url("/sources/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test]
async fn errors_are_paginated_in_row_order() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 3;
        s.ingest.chunk_rows = 4;
    })
    .await;
    let mut csv = String::from("email\n");
    for i in 0..30 {
        if i % 2 == 0 {
            csv.push_str("not-an-email\n");
        } else {
            csv.push_str(&format!("u{i}@example.com\n"));
        }
    }
    let body = app.upload_ok(csv).await;
    let source = body["source_id"].as_str().unwrap();
    let done = app.wait_terminal(source, Duration::from_secs(30)).await;
    assert_eq!(
        (done["accepted"].as_u64(), done["failed"].as_u64()),
        (Some(15), Some(15))
    );
    let errors = app
        .collect(&app.dir_url(&format!("/sources/{source}/errors")))
        .await;
    let rows: Vec<u64> = errors
        .iter()
        .map(|e| e["row_number"].as_u64().unwrap())
        .collect();
    assert_eq!(rows, (0..15).map(|i| 2 * i + 1).collect::<Vec<u64>>());
    let lines: Vec<u64> = errors
        .iter()
        .map(|e| e["line_number"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, rows.iter().map(|r| r + 1).collect::<Vec<u64>>());
    let (_, page) = app
        .get_json(&app.dir_url(&format!("/sources/{source}/errors?limit=4")))
        .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 4);
    assert!(page["next_cursor"].is_string());
}

#[tokio::test]
async fn duplicates_across_chunks_are_flagged_when_the_source_completes() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 2;
        s.ingest.chunk_rows = 3;
    })
    .await;
    let csv = "email,phone\na@example.com,\nb@example.com,\nc@example.com,+14155552671\nd@example.com,\nA@example.com,\ne@example.com,4155552671\nb@example.com,\n";
    let body = app.upload_ok(csv).await;
    let source = body["source_id"].as_str().unwrap();
    let done = app.wait_terminal(source, Duration::from_secs(30)).await;
    assert_eq!(done["accepted"], 7);
    assert_eq!(done["warnings"], 3);
    let errors = app
        .collect(&app.dir_url(&format!("/sources/{source}/errors")))
        .await;
    let dups: Vec<(u64, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["row_number"].as_u64().unwrap(),
                e["column"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(dups, [(5, "email"), (6, "phone"), (7, "email")]);
    assert!(errors
        .iter()
        .all(|e| e["code"] == "duplicate_in_file" && e["severity"] == "warning"));
    // a/A share an email and c/e a phone: a, b, c+e and d.
    assert_eq!(app.collect(&app.dir_url("/profiles")).await.len(), 4);
}

#[tokio::test]
async fn profiles_resolve_across_sources_and_newer_sources_win() {
    let app = TestApp::spawn().await;
    app.upload_ok("email,phone,company,title\nann@example.com,,Acme,CTO\nbob@example.com,+14155550100,Bobco,\n").await;
    let second = app
        .upload_ok("email,phone,company,city\nann@example.com,,Initech,\nrob@example.com,+14155550100,,Oslo\n")
        .await;
    assert_eq!(second["warnings"], 0);
    let profiles = app.collect(&app.dir_url("/profiles")).await;
    assert_eq!(profiles.len(), 2);
    let ann = app
        .collect(&app.dir_url("/profiles?email=ann@example.com"))
        .await
        .remove(0);
    assert_eq!(ann["company"], "Initech");
    assert_eq!(
        ann["title"], "CTO",
        "a field the newer source lacks is kept"
    );
    let bob = app
        .collect(&app.dir_url("/profiles?email=bob@example.com"))
        .await
        .remove(0);
    assert_eq!(
        bob["identities"]["emails"],
        json!(["bob@example.com", "rob@example.com"])
    );
    assert_eq!(bob["city"], "Oslo");
    assert_eq!(bob["email"], "rob@example.com");

    let (status, one) = app
        .get_json(&app.dir_url(&format!("/profiles/{}", bob["id"].as_str().unwrap())))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["id"], bob["id"]);
    let response = app
        .get(&app.dir_url(&format!("/profiles/{}", uuid::Uuid::new_v4())))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "profile_not_found").await;
    assert!(app
        .collect(&app.dir_url("/profiles?email=nobody@example.com"))
        .await
        .is_empty());

    // A record whose identities point at two profiles joins the email's and is warned.
    let third = app
        .upload_ok("email,phone\nann@example.com,+14155550100\n")
        .await;
    assert_eq!(third["warnings"], 1);
    let errors = app
        .collect(&app.dir_url(&format!(
            "/sources/{}/errors",
            third["source_id"].as_str().unwrap()
        )))
        .await;
    assert_eq!(errors[0]["code"], "identity_conflict");
    assert_eq!(errors[0]["column"], "phone");
    assert_eq!(app.collect(&app.dir_url("/profiles")).await.len(), 2);
}

#[tokio::test]
async fn another_organization_sees_and_touches_nothing() {
    let app = TestApp::spawn().await;
    let body = app.upload_ok("email\nann@example.com\nbad\n").await;
    let source = body["source_id"].as_str().unwrap().to_owned();
    let profile = app.collect(&app.dir_url("/profiles")).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = app.another_tenant().await;
    let ours = format!("/v2/organizations/{}", app.tenant.org);
    let dir = format!("{ours}/directories/{}", app.tenant.dir);
    let gets = [
        format!("{ours}/directories"),
        format!("{dir}/sources"),
        format!("{dir}/sources/{source}"),
        format!("{dir}/sources/{source}/errors"),
        format!("{dir}/sources/{source}/failed-rows"),
        format!("{dir}/profiles"),
        format!("{dir}/profiles/{profile}"),
    ];
    for path in &gets {
        let response = app
            .client
            .get(app.url(path))
            .bearer_auth(&other.token)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::FORBIDDEN, "organization_mismatch").await;
    }
    let response = app
        .client
        .post(app.url(&format!("{ours}/directories")))
        .bearer_auth(&other.token)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::FORBIDDEN, "organization_mismatch").await;
    let response = app
        .client
        .post(app.url(&format!("{dir}/archive")))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::FORBIDDEN, "organization_mismatch").await;
    let response = app
        .client
        .post(app.url(&format!("{dir}/sources/csv-upload")))
        .bearer_auth(&other.token)
        .multipart(file_form("email\nx@y.co\n"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::FORBIDDEN, "organization_mismatch").await;

    // Our directory under their organization: not found, never revealed.
    let theirs = format!(
        "/v2/organizations/{}/directories/{}",
        other.org, app.tenant.dir
    );
    for path in [
        format!("{theirs}/sources"),
        format!("{theirs}/sources/{source}"),
        format!("{theirs}/sources/{source}/errors"),
        format!("{theirs}/sources/{source}/failed-rows"),
        format!("{theirs}/profiles"),
        format!("{theirs}/profiles/{profile}"),
    ] {
        let response = app
            .client
            .get(app.url(&path))
            .bearer_auth(&other.token)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::NOT_FOUND, "directory_not_found").await;
    }
    let response = app
        .client
        .post(app.url(&format!("{theirs}/archive")))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "directory_not_found").await;
    let response = app
        .client
        .post(app.url(&format!("{theirs}/sources/csv-upload")))
        .bearer_auth(&other.token)
        .multipart(file_form("email\nx@y.co\n"))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "directory_not_found").await;
    // Their own source id under their own directory does not reach ours either.
    let theirs_own = format!(
        "/v2/organizations/{}/directories/{}/sources/{source}",
        other.org, other.dir
    );
    let response = app
        .client
        .get(app.url(&theirs_own))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "source_not_found").await;
    // And our data is as it was.
    assert_eq!(app.collect(&app.dir_url("/sources")).await.len(), 1);
    assert_eq!(app.collect(&app.dir_url("/profiles")).await.len(), 1);
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi() {
    let app = TestApp::spawn().await;
    app.upload_ok("email\nann@example.com\n").await;
    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready: Value = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    let expected = if distributed() {
        ["postgres", "s3", "rabbitmq"]
    } else {
        ["sqlite", "local", "embedded"]
    };
    assert_eq!(
        [&ready["database"], &ready["object_store"], &ready["queue"]],
        expected
    );
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "orbit_queue_depth",
        "orbit_sources{status=\"completed\"} 1",
        "orbit_http_requests_total{method=\"POST\",route=\"/v2/organizations/{org}/directories/{dir}/sources/csv-upload\",status=\"201\"}",
        "orbit_chunks_open 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let openapi: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(openapi["openapi"].as_str().unwrap().starts_with("3."));
    assert!(openapi["paths"]
        ["/v2/organizations/{organizationId}/directories/{directoryId}/sources/csv-upload"]
        ["post"]
        .is_object());
    let response = app.client.get(app.url("/nope")).send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = app.client.delete(app.url("/healthz")).send().await.unwrap();
    assert_problem(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn clients_cannot_mint_metric_label_values() {
    let app = TestApp::spawn().await;
    let odd = reqwest::Method::from_bytes(b"FOOBAR").unwrap();
    let response = app
        .client
        .request(odd, app.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let path = format!("/minted-{}", uuid::Uuid::new_v4().simple());
    let response = app.client.get(app.url(&path)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("FOOBAR"), "{metrics}");
    assert!(!metrics.contains(&path), "{metrics}");
    for needle in [
        "orbit_http_requests_total{method=\"other\",route=\"/healthz\",status=\"405\"}",
        "orbit_http_requests_total{method=\"GET\",route=\"other\",status=\"404\"}",
        "orbit_http_request_duration_seconds_count{method=\"other\",route=\"/healthz\"}",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
}
