//! Merge rules (issue 23): an upload's `merge` field decides which value a profile keeps, in
//! the request and in workers alike. Runs on the embedded stack, and on the distributed one
//! with `ORBIT_TEST_STACK=distributed` (deploy/test.sh does both, and Citus).

use std::time::Duration;

use crate::common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn form(csv: &str, fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    form.part(
        "file",
        reqwest::multipart::Part::bytes(csv.as_bytes().to_vec()).file_name("contacts.csv"),
    )
}

/// Uploads `csv` with `fields` and waits for the source to complete; returns its status body.
async fn import(app: &TestApp, csv: &str, fields: &[(&str, &str)]) -> Value {
    let response = app
        .post(&app.upload_url())
        .multipart(form(csv, fields))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let body: Value = response.json().await.unwrap();
    let done = app
        .wait_terminal(body["source_id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(done["source_status"], "completed", "{done}");
    done
}

async fn profile_of(app: &TestApp, email: &str) -> Value {
    let (status, body) = app
        .get_json(&app.dir_url(&format!("/profiles?email={email}")))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let profiles = body["data"].as_array().unwrap();
    assert_eq!(profiles.len(), 1, "{email}: {body}");
    profiles[0].clone()
}

/// `rows` people, each row `email,phone,city,title,company,plan` from `row(i)`.
fn csv(rows: usize, row: impl Fn(usize) -> String) -> String {
    let mut csv = String::from("email,phone,city,title,company,plan\n");
    for i in 0..rows {
        csv.push_str(&row(i));
        csv.push('\n');
    }
    csv
}

/// Enough rows that the first are committed in the request and the rest by workers.
const ROWS: usize = 10;

fn small_chunks() -> impl FnOnce(&mut orbit_config::Settings) {
    |s| {
        s.ingest.sync_rows = 2;
        s.ingest.chunk_rows = 3;
    }
}

#[tokio::test]
async fn each_rule_decides_which_value_stays_in_the_request_and_in_workers() {
    let app = TestApp::spawn_with(small_chunks()).await;
    let phone = |i: usize| format!("+1 415 555 {:04}", 1000 + i);
    import(
        &app,
        &csv(ROWS, |i| {
            format!("p{i}@example.com,{},Paris,CTO,Acme,gold", phone(i))
        }),
        &[],
    )
    .await;
    // Keeps what is there, except the title, which this import overwrites, and the plan, which
    // is newer and blank: cleared. The phone cell is empty: identities are never cleared.
    let rules = r#"{"default": "keep_existing", "fields": {"title": "overwrite", "attributes.plan": "newer_wins"}, "empty_cells": "clear"}"#;
    let second = import(
        &app,
        &csv(ROWS, |i| format!("p{i}@example.com,,Rome,CEO,,")),
        &[("merge", rules)],
    )
    .await;
    assert_eq!(
        second["merge"],
        serde_json::from_str::<Value>(rules).unwrap(),
        "the source shows its rules"
    );
    // A later plain import cannot undo the overwrite, but fills what was cleared.
    import(
        &app,
        &csv(ROWS, |i| format!("p{i}@example.com,,Lyon,VP,Initech,")),
        &[],
    )
    .await;
    for i in [0, 1, ROWS - 1] {
        let profile = profile_of(&app, &format!("p{i}@example.com")).await;
        assert_eq!(profile["city"], "Lyon", "newer_wins after keep: {profile}");
        assert_eq!(profile["title"], "CEO", "the overwrite stays: {profile}");
        assert_eq!(profile["company"], "Initech", "{profile}");
        assert_eq!(profile["attributes"], json!({}), "plan cleared: {profile}");
        assert_eq!(
            profile["identities"]["phones"].as_array().unwrap().len(),
            1,
            "{profile}"
        );
        assert_eq!(
            profile["phone"],
            format!("+1415555{:04}", 1000 + i),
            "{profile}"
        );
    }
}

#[tokio::test]
async fn a_cleared_field_reads_null_and_keep_existing_does_not_refill_it() {
    let app = TestApp::spawn_with(small_chunks()).await;
    import(
        &app,
        &csv(ROWS, |i| format!("c{i}@example.com,,Paris,CTO,,")),
        &[],
    )
    .await;
    import(
        &app,
        &csv(ROWS, |i| format!("c{i}@example.com,,,CTO,,")),
        // The company's rule keeps values, so its empty cells clear nothing.
        &[(
            "merge",
            r#"{"fields": {"company": "keep_existing"}, "empty_cells": "clear"}"#,
        )],
    )
    .await;
    let cleared = profile_of(&app, "c3@example.com").await;
    assert_eq!(cleared["city"], Value::Null, "{cleared}");
    assert_eq!(cleared["title"], "CTO", "{cleared}");
    // The stale sync keep_existing is for does not bring the old value back.
    import(
        &app,
        &csv(ROWS, |i| format!("c{i}@example.com,,Paris,CTO,Acme,")),
        &[("merge", r#"{"default": "keep_existing"}"#)],
    )
    .await;
    let synced = profile_of(&app, "c3@example.com").await;
    assert_eq!(synced["city"], Value::Null, "{synced}");
    assert_eq!(
        synced["company"], "Acme",
        "never written, so filled: {synced}"
    );
    // Without rules an upload behaves as before: an empty cell clears nothing.
    import(&app, &csv(ROWS, |i| format!("c{i}@example.com,,,,,")), &[]).await;
    let plain = profile_of(&app, "c3@example.com").await;
    assert_eq!(plain["company"], "Acme", "{plain}");
    assert_eq!(plain["title"], "CTO", "{plain}");
}

#[tokio::test]
async fn bad_merge_rules_are_refused_naming_the_key_and_store_nothing() {
    let app = TestApp::spawn_with(|s| s.ingest.max_merge_bytes = 200).await;
    let file = csv(2, |i| format!("b{i}@example.com,,Paris,,,"));
    let long = format!(
        r#"{{"default": "newer_wins", "fields": {{"attributes.{}": "overwrite"}}}}"#,
        "x".repeat(200)
    );
    for (merge, key) in [
        (r#"{"default": "sometimes"}"#, "merge.default"),
        (
            r#"{"fields": {"shoe_size": "overwrite"}}"#,
            "merge.fields.shoe_size",
        ),
        (
            r#"{"fields": {"email": "keep_existing"}}"#,
            "merge.fields.email",
        ),
        (r#"{"fields": {"city": 3}}"#, "merge.fields.city"),
        (r#"{"empty_cells": "blank"}"#, "merge.empty_cells"),
        (r#"{"defaults": "overwrite"}"#, "merge.defaults"),
        ("{not json", "merge"),
        (long.as_str(), "merge"),
    ] {
        let response = app
            .post(&app.upload_url())
            .multipart(form(&file, &[("merge", merge)]))
            .send()
            .await
            .unwrap();
        let problem =
            assert_problem(response, StatusCode::BAD_REQUEST, "invalid_merge_rules").await;
        assert_eq!(problem["key"], key, "{merge}: {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.starts_with(key), "{merge}: {detail}");
    }
    // After the file it cannot steer the rows the request already committed.
    let late = form(&file, &[]).text("merge", "{}");
    let response = app
        .post(&app.upload_url())
        .multipart(late)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let (_, sources) = app.get_json(&app.dir_url("/sources")).await;
    assert_eq!(sources["data"].as_array().unwrap().len(), 0, "{sources}");
    let (_, profiles) = app.get_json(&app.dir_url("/profiles")).await;
    assert_eq!(profiles["data"].as_array().unwrap().len(), 0, "{profiles}");
}

#[tokio::test]
async fn the_idempotency_fingerprint_covers_the_rules() {
    let app = TestApp::spawn().await;
    let file = csv(3, |i| format!("k{i}@example.com,,Paris,,,"));
    let send = |merge: Option<&'static str>| {
        let fields: Vec<(&str, &str)> = merge.into_iter().map(|m| ("merge", m)).collect();
        app.post(&app.upload_url())
            .header("idempotency-key", "merged-1")
            .multipart(form(&file, &fields))
            .send()
    };
    let keep = r#"{"default": "keep_existing"}"#;
    let first = send(Some(keep)).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let replay = send(Some(keep)).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["source_id"], first["source_id"]);
    for other in [Some(r#"{"default": "overwrite"}"#), None] {
        let response = send(other).await.unwrap();
        assert_problem(
            response,
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
        )
        .await;
    }
    // `{}` is the defaults: it replays an upload that sent no rules.
    let plain = app
        .post(&app.upload_url())
        .header("idempotency-key", "plain-1")
        .multipart(form(&file, &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), StatusCode::CREATED);
    let plain: Value = plain.json().await.unwrap();
    let defaults = app
        .post(&app.upload_url())
        .header("idempotency-key", "plain-1")
        .multipart(form(&file, &[("merge", "{}")]))
        .send()
        .await
        .unwrap();
    assert_eq!(defaults.status(), StatusCode::OK);
    let defaults: Value = defaults.json().await.unwrap();
    assert_eq!(defaults["source_id"], plain["source_id"]);
    let (_, source) = app
        .get_json(&app.dir_url(&format!(
            "/sources/{}",
            plain["source_id"].as_str().unwrap()
        )))
        .await;
    assert_eq!(
        source["merge"],
        json!({"default": "newer_wins", "fields": {}, "empty_cells": "ignore"}),
        "{source}"
    );
}
