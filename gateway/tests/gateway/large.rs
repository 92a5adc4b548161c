//! A 100,000-row upload followed to `completed` with exact counts and profiles.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_rows_complete_with_exact_counts() {
    let app = TestApp::spawn().await;
    const ROWS: usize = 100_000;
    let mut csv = String::from("first_name,last_name,email,phone,company,city\n");
    for i in 0..ROWS {
        match i % 1000 {
            // One row in a thousand fails: no identifier at all.
            7 => csv.push_str(&format!("Nobody{i},X,,,Acme,Paris\n")),
            // One in a thousand repeats the email of the row before it.
            9 => csv.push_str(&format!(
                "Again{i},Y,user{}@example.com,,Acme,Paris\n",
                i - 1
            )),
            _ => csv.push_str(&format!(
                "First{i},Last{i},user{i}@example.com,,Acme,Paris\n"
            )),
        }
    }
    let body = app.upload_ok(csv).await;
    assert_eq!(
        (body["accepted"].as_u64(), body["failed"].as_u64()),
        (Some(999), Some(1)),
        "the synchronous prefix"
    );
    let source = body["source_id"].as_str().unwrap().to_owned();
    let done = app.wait_terminal(&source, Duration::from_secs(300)).await;
    assert_eq!(done["source_status"], "completed");
    assert_eq!(done["total_rows"], ROWS);
    assert_eq!(done["processed_rows"], ROWS);
    assert_eq!(done["failed"], ROWS / 1000);
    assert_eq!(done["accepted"], ROWS - ROWS / 1000);
    assert_eq!(
        done["warnings"],
        ROWS / 1000,
        "each repeated email is a duplicate_in_file warning"
    );

    let profiles = app.collect(&app.dir_url("/profiles")).await;
    assert_eq!(profiles.len(), ROWS - 2 * (ROWS / 1000));
    let emails: HashSet<&str> = profiles
        .iter()
        .map(|p| p["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails.len(), profiles.len(), "one profile per email");
    let errors = app
        .collect(&app.dir_url(&format!("/sources/{source}/errors")))
        .await;
    assert_eq!(errors.len(), 2 * (ROWS / 1000));
    assert!(errors
        .iter()
        .filter(|e| e["severity"] == "error")
        .all(|e| e["code"] == "missing_identifier"));
}
