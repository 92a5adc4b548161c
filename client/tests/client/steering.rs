//! `orbit upload --mapping/--merge/--dry-run` and `orbit cancel` against a real embedded gateway.

use crate::common::{code, json, run, stderr, stdout, Gateway};

const FAST: [&str; 2] = ["--poll-interval", "50ms"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut all = extra.to_vec();
    all.extend(FAST);
    all
}

#[tokio::test]
async fn a_dry_run_then_the_import_with_a_mapping_then_a_refused_cancel() {
    let gw = Gateway::start().await;
    let mut csv = String::from("Correo,Nombre,Notas\n");
    for i in 0..30 {
        csv.push_str(&format!("p{i}@example.com,Name{i},private {i}\n"));
    }
    let file = gw.file("contactos.csv", &csv);
    let mapping = gw.file(
        "mapping.json",
        r#"{"Correo": "email", "Nombre": "first_name", "Notas": "ignore"}"#,
    );
    let mapping_arg = format!("@{mapping}");

    // A mapping the header does not fit is caught before sending.
    let out = run(&mut gw.orbit(&args(&[
        "upload",
        &file,
        "--mapping",
        r#"{"Mail": "email"}"#,
        "--json",
    ])))
    .await;
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report[0]["error"]["code"], "invalid_request", "{report}");
    assert!(gw.sources().await.is_empty());

    let dry = run(&mut gw.orbit(&args(&[
        "upload",
        &file,
        "--mapping",
        &mapping_arg,
        "--dry-run",
        "--json",
    ])))
    .await;
    assert_eq!(code(&dry), 0, "{}", stderr(&dry));
    let dry = json(&dry);
    assert_eq!(dry[0]["status"], "completed", "{dry}");
    assert_eq!(dry[0]["accepted"], 30);
    assert_eq!(
        dry[0]["unmapped_columns"],
        serde_json::json!([]),
        "mapped columns are not warned about"
    );
    let profiles = gw.get_json(&gw.dir_url("/profiles")).await;
    assert!(
        profiles["data"].as_array().unwrap().is_empty(),
        "{profiles}"
    );

    // The real import of the same bytes is another upload, not a replay of the dry run.
    let real = run(&mut gw.orbit(&args(&[
        "upload",
        &file,
        "--mapping",
        &mapping_arg,
        "--json",
    ])))
    .await;
    assert_eq!(code(&real), 0, "{}", stderr(&real));
    let real = json(&real);
    assert_eq!(real[0]["is_idempotent"], false, "{real}");
    assert_ne!(real[0]["source_id"], dry[0]["source_id"]);
    assert_ne!(real[0]["idempotency_key"], dry[0]["idempotency_key"]);
    let profile = gw
        .get_json(&gw.dir_url("/profiles?email=p7@example.com"))
        .await;
    assert_eq!(profile["data"][0]["first_name"], "Name7", "{profile}");
    assert!(profile["data"][0]["attributes"]
        .as_object()
        .unwrap()
        .is_empty());

    // A finished source cannot be cancelled: exit 1 with the server's code.
    let source = real[0]["source_id"].as_str().unwrap();
    let out = run(&mut gw.orbit(&args(&["cancel", source]))).await;
    assert_eq!(code(&out), 1, "{}", stdout(&out));
    assert!(stderr(&out).contains("source_terminal"), "{}", stderr(&out));
}

#[tokio::test]
async fn cancel_stops_a_source_in_progress() {
    let gw = Gateway::start().await;
    let file = gw.file("big.csv", &crate::common::contacts(20_000, "big", None));
    let out = run(&mut gw.orbit(&args(&["upload", &file, "--no-wait", "--json"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let source = json(&out)[0]["source_id"].as_str().unwrap().to_owned();
    let out = run(&mut gw.orbit(&args(&["cancel", &source, "--json"]))).await;
    if code(&out) == 0 {
        let body = json(&out);
        assert_eq!(body["source_status"], "failed", "{body}");
        assert_eq!(body["error"]["code"], "cancelled", "{body}");
        let out = run(&mut gw.orbit(&args(&["cancel", &source]))).await;
        assert_eq!(code(&out), 1);
    } else {
        // The workers were faster than the cancel: the only other honest answer.
        assert!(stderr(&out).contains("source_terminal"), "{}", stderr(&out));
    }
}

#[tokio::test]
async fn merge_rules_go_with_the_upload_and_bad_ones_are_caught_before_sending() {
    let gw = Gateway::start().await;
    let first = gw.file("first.csv", "email,city,title\nann@example.com,Paris,CTO\n");
    let second = gw.file("second.csv", "email,city,title\nann@example.com,Rome,\n");
    let out = run(&mut gw.orbit(&args(&["upload", &first, "--json"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // Checked as the server checks it, before any byte is sent: a usage error (exit 2).
    let out = run(&mut gw.orbit(&args(&[
        "upload",
        &second,
        "--merge",
        r#"{"fields": {"email": "overwrite"}}"#,
    ])))
    .await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("merge.fields.email"),
        "{}",
        stderr(&out)
    );
    assert_eq!(gw.sources().await.len(), 1);

    let rules = gw.file(
        "rules.json",
        r#"{"default": "keep_existing", "empty_cells": "clear"}"#,
    );
    let out = run(&mut gw.orbit(&args(&[
        "upload",
        &second,
        "--merge",
        &format!("@{rules}"),
        "--json",
    ])))
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let profile = gw
        .get_json(&gw.dir_url("/profiles?email=ann@example.com"))
        .await;
    // keep_existing: the city stays, and the empty title is not cleared by a keeping rule.
    assert_eq!(profile["data"][0]["city"], "Paris", "{profile}");
    assert_eq!(profile["data"][0]["title"], "CTO", "{profile}");
    let sources = gw.sources().await;
    assert!(
        sources
            .iter()
            .any(|s| s["merge"]["default"] == "keep_existing"),
        "{sources:?}"
    );
}
