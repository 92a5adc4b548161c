//! Clients steering their imports (issue 13): cancel, column mapping, dry runs and signed
//! completion webhooks. Runs on the embedded stack, and on the distributed one with
//! `ORBIT_TEST_STACK=distributed` (deploy/test.sh does both).

use std::time::{Duration, Instant};

use crate::common::*;
use reqwest::StatusCode;
use serde_json::Value;

fn cancel_url(app: &TestApp, source: &str) -> String {
    app.dir_url(&format!("/sources/{source}/cancel"))
}

#[tokio::test]
async fn a_cancel_mid_ingest_ends_failed_and_nothing_commits_after_it() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 0;
        s.ingest.chunk_rows = 200;
        s.worker.slice_rows = 20;
    })
    .await;
    let body = app.upload_ok(contacts_csv(20_000, "c")).await;
    let source = body["source_id"].as_str().unwrap().to_owned();
    // Wait until workers are at it, so the cancel lands mid-ingest.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = app.source(&source).await;
        let processed = status["processed_rows"].as_u64().unwrap();
        seen.push(processed);
        if processed > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let response = app.post(&cancel_url(&app, &source)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cancelled: Value = response.json().await.unwrap();
    assert_eq!(cancelled["source_status"], "failed", "{cancelled}");
    assert_eq!(cancelled["error"]["code"], "cancelled", "{cancelled}");
    assert!(cancelled["completed_at"].is_string());
    let at_cancel = cancelled["processed_rows"].as_u64().unwrap();
    assert!(
        at_cancel < 20_000,
        "the cancel came after the end: {cancelled}"
    );
    assert!(at_cancel >= *seen.last().unwrap());
    // Workers holding chunks drop them at their next commit: nothing more is counted.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let status = app.source(&source).await;
        assert_eq!(status["source_status"], "failed", "{status}");
        assert_eq!(status["error"]["code"], "cancelled", "{status}");
        assert_eq!(
            status["processed_rows"].as_u64(),
            Some(at_cancel),
            "a chunk committed after the cancel: {status}"
        );
        assert_eq!(
            status["accepted"].as_u64().unwrap() + status["failed"].as_u64().unwrap(),
            at_cancel,
            "{status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The rows committed before the cancel stay: a profile for each (every row has an email
    // of its own). Which rows those are depends on which chunks the workers took first.
    let accepted = app.source(&source).await["accepted"].as_u64().unwrap();
    assert!(accepted > 0, "no row was committed before the cancel");
    let profiles = app.collect(&app.dir_url("/profiles")).await;
    assert_eq!(profiles.len() as u64, accepted);
    // A terminal source cannot be cancelled again.
    let again = app.post(&cancel_url(&app, &source)).send().await.unwrap();
    assert_problem(again, StatusCode::CONFLICT, "source_terminal").await;
    // Operators see cancellations apart from failures.
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, r#"orbit_sources_failed{code="cancelled"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, r#"orbit_sources_failed{code="other"}"#),
        Some(0.0)
    );
}

#[tokio::test]
async fn cancelling_a_finished_or_unknown_source_is_refused() {
    let app = TestApp::spawn().await;
    let body = app
        .upload_ok("email\nann@example.com\nbob@example.com\n")
        .await;
    assert_eq!(body["source_status"], "completed");
    let source = body["source_id"].as_str().unwrap();
    let response = app.post(&cancel_url(&app, source)).send().await.unwrap();
    let problem = assert_problem(response, StatusCode::CONFLICT, "source_terminal").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("completed"),
        "{problem}"
    );
    assert_eq!(app.source(source).await["source_status"], "completed");
    let unknown = uuid::Uuid::now_v7().to_string();
    let response = app.post(&cancel_url(&app, &unknown)).send().await.unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "source_not_found").await;
    // Another organization's token sees nothing of it.
    let other = app.another_tenant().await;
    let response = app
        .client
        .post(cancel_url(&app, source))
        .bearer_auth(&other.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

fn upload_form(csv: &str, fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new();
    for (name, value) in fields {
        form = form.text(name.to_string(), value.to_string());
    }
    form.part(
        "file",
        reqwest::multipart::Part::bytes(csv.as_bytes().to_vec()).file_name("contacts.csv"),
    )
}

async fn upload_with(app: &TestApp, csv: &str, fields: &[(&str, &str)]) -> reqwest::Response {
    app.post(&app.upload_url())
        .multipart(upload_form(csv, fields))
        .send()
        .await
        .unwrap()
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

const MAPPING: &str = r#"{"Correo": "email", "Nombre": "first_name", "Notas": "ignore", "Colour": "attributes.favourite_colour"}"#;

/// `rows` rows under headers only the mapping (and, for `Phone`, the aliases) explain.
fn mapped_csv(rows: usize) -> String {
    let mut csv = String::from("Correo,Nombre,Notas,Colour,Phone\n");
    for i in 0..rows {
        csv.push_str(&format!(
            "m{i}@example.com,Name{i},secret {i},blue{i},+1 415 555 {:04}\n",
            1000 + i
        ));
    }
    csv
}

#[tokio::test]
async fn a_mapping_renames_and_ignores_columns_in_the_request_and_in_workers() {
    // Rows 1-2 in the request, the rest by workers: both must apply the mapping.
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 2;
        s.ingest.chunk_rows = 3;
    })
    .await;
    let response = upload_with(&app, &mapped_csv(10), &[("mapping", MAPPING)]).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    let source = body["source_id"].as_str().unwrap();
    let done = app.wait_terminal(source, Duration::from_secs(30)).await;
    assert_eq!(done["source_status"], "completed", "{done}");
    assert_eq!(
        (done["accepted"].as_u64(), done["failed"].as_u64()),
        (Some(10), Some(0)),
        "{done}"
    );
    assert_eq!(
        done["mapping"],
        serde_json::from_str::<Value>(MAPPING).unwrap(),
        "the source shows its mapping"
    );
    for i in [0, 9] {
        let profile = profile_of(&app, &format!("m{i}@example.com")).await;
        assert_eq!(profile["first_name"], format!("Name{i}"), "{profile}");
        assert_eq!(
            profile["attributes"],
            serde_json::json!({ "favourite_colour": format!("blue{i}") }),
            "the ignored column is kept nowhere: {profile}"
        );
        // Not in the mapping: the `Phone` alias still applies.
        assert_eq!(
            profile["identities"]["phones"].as_array().unwrap().len(),
            1,
            "{profile}"
        );
    }
}

#[tokio::test]
async fn a_bad_mapping_is_refused_naming_the_header_or_target() {
    let app = TestApp::spawn().await;
    let csv = mapped_csv(2);
    for (mapping, needle) in [
        (r#"{"Correo": "email", "Missing": "phone"}"#, "\"Missing\""),
        (r#"{"Correo": "e-mail"}"#, "\"e-mail\""),
        (r#"{"Correo": "attributes."}"#, "attribute name"),
        ("[\"Correo\"]", "JSON object"),
        (r#"{"Phone": "ignore"}"#, "identifier"),
    ] {
        let response = upload_with(&app, &csv, &[("mapping", mapping)]).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(needle), "{mapping}: {detail}");
    }
    // After the file it cannot steer how the file is read.
    let form = upload_form(&csv, &[]).text("mapping", MAPPING);
    let response = app
        .post(&app.upload_url())
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    // Nothing was kept of any of them.
    let (_, sources) = app.get_json(&app.dir_url("/sources")).await;
    assert_eq!(sources["data"].as_array().unwrap().len(), 0, "{sources}");
}

#[tokio::test]
async fn the_idempotency_fingerprint_covers_the_mapping() {
    let app = TestApp::spawn().await;
    let csv = mapped_csv(3);
    let send = |mapping: &'static str| {
        let form = upload_form(&csv, &[("mapping", mapping)]);
        app.post(&app.upload_url())
            .header("idempotency-key", "mapped-1")
            .multipart(form)
            .send()
    };
    let first = send(MAPPING).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    // The same bytes and the same mapping replay.
    let replay = send(MAPPING).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["source_id"], first["source_id"]);
    assert_eq!(replay["is_idempotent"], true);
    // The same bytes under another mapping are another request.
    let other =
        send(r#"{"Correo": "email", "Nombre": "ignore", "Notas": "ignore", "Colour": "ignore"}"#)
            .await
            .unwrap();
    assert_problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    // And without one, too (the header has no identifier without it, but the key answers first).
    let plain = app
        .post(&app.upload_url())
        .header("idempotency-key", "mapped-1")
        .multipart(upload_form(&csv, &[]))
        .send()
        .await
        .unwrap();
    assert_problem(
        plain,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
}

/// 40 rows: every tenth from the fourth on fails (no valid identifier), every tenth from the
/// sixth on has a warning (an unusable phone beside a good email).
fn checked_csv() -> String {
    let mut csv = String::from("email,phone,first_name\n");
    for i in 0..40 {
        match i % 10 {
            3 => csv.push_str(&format!("not-an-email-{i},,Bad{i}\n")),
            5 => csv.push_str(&format!("d{i}@example.com,12,Warn{i}\n")),
            _ => csv.push_str(&format!("d{i}@example.com,,Ok{i}\n")),
        }
    }
    csv
}

fn counts(source: &Value) -> [Option<u64>; 5] {
    [
        "total_rows",
        "processed_rows",
        "accepted",
        "failed",
        "warnings",
    ]
    .map(|k| source[k].as_u64())
}

async fn issues_of(app: &TestApp, source: &str) -> Vec<(u64, String)> {
    let mut issues: Vec<(u64, String)> = app
        .collect(&app.dir_url(&format!("/sources/{source}/errors")))
        .await
        .iter()
        .map(|i| {
            (
                i["row_number"].as_u64().unwrap(),
                i["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    issues.sort();
    issues
}

async fn import(app: &TestApp, csv: &str, dry_run: bool) -> Value {
    let flag = if dry_run { "true" } else { "false" };
    let response = upload_with(app, csv, &[("dry_run", flag)]).await;
    assert!(response.status().is_success(), "{}", response.status());
    let body: Value = response.json().await.unwrap();
    app.wait_terminal(body["source_id"].as_str().unwrap(), Duration::from_secs(30))
        .await
}

#[tokio::test]
async fn a_dry_run_reports_what_the_import_would_and_writes_no_profile() {
    // Rows 1-5 in the request, the rest by workers.
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 5;
        s.ingest.chunk_rows = 7;
    })
    .await;
    let csv = checked_csv();
    let dry = import(&app, &csv, true).await;
    assert_eq!(dry["source_status"], "completed", "{dry}");
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(
        counts(&dry),
        [Some(40), Some(40), Some(36), Some(4), Some(4)],
        "{dry}"
    );
    assert!(
        app.collect(&app.dir_url("/profiles")).await.is_empty(),
        "a dry run wrote profiles"
    );
    let dry_id = dry["source_id"].as_str().unwrap();
    let dry_issues = issues_of(&app, dry_id).await;
    assert_eq!(dry_issues.len(), 8, "{dry_issues:?}");
    let failed_rows = app
        .get(&app.dir_url(&format!("/sources/{dry_id}/failed-rows")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(failed_rows.lines().count(), 1 + 4, "{failed_rows}");

    let real = import(&app, &csv, false).await;
    assert_eq!(real["dry_run"], false, "{real}");
    assert_eq!(
        counts(&real),
        counts(&dry),
        "the dry run's counts are the import's"
    );
    assert_eq!(
        issues_of(&app, real["source_id"].as_str().unwrap()).await,
        dry_issues
    );
    let profiles = app.collect(&app.dir_url("/profiles")).await.len();
    assert_eq!(profiles, 36);

    // Another dry run over the imported directory leaves it as it was.
    let again = import(&app, &csv, true).await;
    assert_eq!(again["source_status"], "completed", "{again}");
    assert_eq!(
        (again["accepted"].as_u64(), again["failed"].as_u64()),
        (Some(36), Some(4))
    );
    assert_eq!(app.collect(&app.dir_url("/profiles")).await.len(), profiles);
    assert_eq!(
        profile_of(&app, "d0@example.com").await["first_name"],
        "Ok0"
    );
}

#[tokio::test]
async fn dry_run_takes_true_or_false_and_is_part_of_the_idempotency_fingerprint() {
    let app = TestApp::spawn().await;
    let response = upload_with(&app, "email\na@example.com\n", &[("dry_run", "maybe")]).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    let send = |dry_run: &'static str| {
        app.post(&app.upload_url())
            .header("idempotency-key", "dry-1")
            .multipart(upload_form(
                "email\na@example.com\n",
                &[("dry_run", dry_run)],
            ))
            .send()
    };
    let first = send("true").await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let replay = send("true").await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    // The real import of the same bytes is not a replay of the dry run.
    let real = send("false").await.unwrap();
    assert_problem(
        real,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
}

// ---- Webhooks ----

/// A request the receiver got: its headers (lower-cased names) and body.
#[derive(Clone, Debug)]
struct Received {
    headers: std::collections::HashMap<String, String>,
    body: String,
}

/// A webhook receiver on loopback that answers with `script` in turn (then 200).
struct Receiver {
    url: String,
    got: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    /// Once set, every request is answered 200 whatever the script says.
    healthy: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    async fn start(script: Vec<u16>) -> Self {
        Self::start_slow(script, Duration::ZERO).await
    }

    /// [`Receiver::start`], answering each request only after `delay`.
    async fn start_slow(script: Vec<u16>, delay: Duration) -> Self {
        use axum::http::HeaderMap;
        let got: std::sync::Arc<std::sync::Mutex<Vec<Received>>> = Default::default();
        let sink = got.clone();
        let script = std::sync::Arc::new(script);
        let healthy: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let is_healthy = healthy.clone();
        let handler = move |headers: HeaderMap, body: String| {
            let sink = sink.clone();
            let script = script.clone();
            let is_healthy = is_healthy.clone();
            async move {
                tokio::time::sleep(delay).await;
                let mut got = sink.lock().unwrap();
                let status = match is_healthy.load(std::sync::atomic::Ordering::SeqCst) {
                    true => 200,
                    false => script.get(got.len()).copied().unwrap_or(200),
                };
                got.push(Received {
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                        .collect(),
                    body,
                });
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        };
        let router = axum::Router::new().route("/hook", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Receiver { url, got, healthy }
    }

    fn heal(&self) {
        self.healthy
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    async fn wait_for(&self, count: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.received();
            if got.len() >= count {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} requests after {within:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Verifies a Standard Webhooks signature the way a receiver would, with its own HMAC.
fn verify(secret: &str, request: &Received) -> bool {
    use base64::Engine as _;
    use hmac::Mac as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .unwrap();
    let id = &request.headers["webhook-id"];
    let timestamp = &request.headers["webhook-timestamp"];
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{}", request.body).as_bytes());
    let expected = format!("v1,{}", engine.encode(mac.finalize().into_bytes()));
    // The header may carry several space-separated signatures.
    request.headers["webhook-signature"]
        .split(' ')
        .any(|s| s == expected)
}

fn webhooks_url(app: &TestApp) -> String {
    app.url(&format!("/v2/organizations/{}/webhooks", app.tenant.org))
}

async fn create_webhook(app: &TestApp, body: Value) -> Value {
    let response = app
        .post(&webhooks_url(app))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

fn fast_webhooks(s: &mut orbit_config::Settings) {
    s.webhooks.allow_private_targets = true;
    s.webhooks.retry_base = Duration::from_millis(100);
    s.webhooks.poll_interval = Duration::from_millis(50);
}

#[tokio::test]
async fn a_failing_receiver_gets_the_same_signed_event_until_it_answers_2xx() {
    let app = TestApp::spawn_with(fast_webhooks).await;
    let receiver = Receiver::start(vec![500, 500, 200]).await;
    let hook = create_webhook(
        &app,
        serde_json::json!({"url": receiver.url, "events": ["source.completed", "source.failed"]}),
    )
    .await;
    let secret = hook["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{hook}");
    assert_eq!(
        hook["events"],
        serde_json::json!(["source.completed", "source.failed"])
    );
    assert_eq!(hook["disabled"], false);

    let body = app
        .upload_ok("email\nann@example.com\nbob@example.com\n")
        .await;
    let source = body["source_id"].as_str().unwrap();
    let got = receiver.wait_for(3, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_all = receiver.received();
    assert_eq!(
        got_all.len(),
        3,
        "delivered once more after the 2xx: {got_all:?}"
    );
    let id = &got[0].headers["webhook-id"];
    assert!(id.starts_with("msg_"), "{id}");
    for request in &got {
        assert_eq!(
            &request.headers["webhook-id"], id,
            "one webhook-id on every retry"
        );
        assert!(verify(&secret, request), "bad signature: {request:?}");
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(request.body, got[0].body, "the same body on every retry");
        let ts: i64 = request.headers["webhook-timestamp"].parse().unwrap();
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
    }
    let event: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(event["type"], "source.completed");
    assert!(event["timestamp"].is_string());
    assert_eq!(event["data"]["source_id"], source);
    assert_eq!(event["data"]["source_status"], "completed");
    assert_eq!(event["data"]["accepted"], 2);
    // A tampered body does not verify.
    let mut forged = got[0].clone();
    forged.body = forged.body.replace("completed", "failed");
    assert!(!verify(&secret, &forged));

    // The deliveries show the attempts.
    let hook_id = hook["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let delivery = loop {
        let (status, body) = app
            .get_json(&format!("{}/{hook_id}/deliveries", webhooks_url(&app)))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let delivery = body["data"][0].clone();
        if delivery["state"] == "delivered" {
            break delivery;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(&delivery["id"], id);
    assert_eq!(delivery["event_type"], "source.completed");
    assert_eq!(delivery["attempt_count"], 3);
    let codes: Vec<u64> = delivery["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [500, 500, 200], "{delivery}");
    let metrics = app.metrics().await;
    let count = |outcome: &str| {
        metric(
            &metrics,
            &format!("orbit_webhook_attempts_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap()
    };
    assert!(
        count("retry") >= 2.0 && count("delivered") >= 1.0,
        "{metrics}"
    );
    // The secret is shown once.
    let (_, list) = app.get_json(&webhooks_url(&app)).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(list["data"][0].get("secret").is_none(), "{list}");
}

#[tokio::test]
async fn endpoints_get_only_their_events_and_directory() {
    let app = TestApp::spawn_with(|s| {
        fast_webhooks(s);
        s.ingest.sync_rows = 0;
    })
    .await;
    let failed = Receiver::start(vec![]).await;
    let completed = Receiver::start(vec![]).await;
    let elsewhere = Receiver::start(vec![]).await;
    create_webhook(
        &app,
        serde_json::json!({"url": failed.url, "events": ["source.failed"]}),
    )
    .await;
    create_webhook(
        &app,
        serde_json::json!({"url": completed.url, "events": ["source.completed"], "directory_id": app.tenant.dir}),
    )
    .await;
    // Another directory of the organization: its endpoint hears nothing of this one.
    let other_dir = app
        .post(&app.url(&format!("/v2/organizations/{}/directories", app.tenant.org)))
        .json(&serde_json::json!({"name": "Other"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    create_webhook(
        &app,
        serde_json::json!({"url": elsewhere.url, "events": ["source.completed", "source.failed"], "directory_id": other_dir["id"]}),
    )
    .await;

    // A cancelled source ends failed: a source.failed event with error.code "cancelled".
    let body = app.upload_ok(contacts_csv(5000, "w")).await;
    let source = body["source_id"].as_str().unwrap();
    let response = app.post(&cancel_url(&app, source)).send().await.unwrap();
    let cancelled = response.status() == StatusCode::OK;
    let done = app.wait_terminal(source, Duration::from_secs(30)).await;
    let (expected_failed, expected_completed) = if cancelled { (1, 0) } else { (0, 1) };
    let got = failed
        .wait_for(expected_failed, Duration::from_secs(20))
        .await;
    if cancelled {
        let event: Value = serde_json::from_str(&got[0].body).unwrap();
        assert_eq!(event["type"], "source.failed");
        assert_eq!(event["data"]["error"]["code"], "cancelled", "{event}");
        assert_eq!(event["data"]["processed_rows"], done["processed_rows"]);
    }
    // And a completed one.
    let body = app.upload_ok("email\nann@example.com\n").await;
    app.wait_terminal(body["source_id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    let got = completed
        .wait_for(expected_completed + 1, Duration::from_secs(20))
        .await;
    let event: Value = serde_json::from_str(&got.last().unwrap().body).unwrap();
    assert_eq!(event["type"], "source.completed");
    assert_eq!(event["data"]["source_id"], body["source_id"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(failed.received().len(), expected_failed);
    assert_eq!(completed.received().len(), expected_completed + 1);
    assert!(elsewhere.received().is_empty());
}

#[tokio::test]
async fn webhook_requests_are_checked() {
    // The default: no private targets.
    let app = TestApp::spawn().await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest",
        "http://[::1]/hook",
        "http://localhost:8080/hook",
    ] {
        let response = app
            .post(&webhooks_url(&app))
            .json(&serde_json::json!({"url": url, "events": ["source.completed"]}))
            .send()
            .await
            .unwrap();
        assert_problem(
            response,
            StatusCode::BAD_REQUEST,
            "webhook_target_not_allowed",
        )
        .await;
    }
    for body in [
        serde_json::json!({"url": "ftp://example.com/x", "events": ["source.completed"]}),
        serde_json::json!({"url": "not a url", "events": ["source.completed"]}),
        serde_json::json!({"url": "https://93.184.215.14/x", "events": []}),
        serde_json::json!({"url": "https://93.184.215.14/x", "events": ["source.started"]}),
        serde_json::json!({"url": "https://93.184.215.14/x"}),
        serde_json::json!({"url": "https://93.184.215.14/x", "events": ["source.failed"], "extra": 1}),
    ] {
        let response = app
            .post(&webhooks_url(&app))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
    let response = app
        .post(&webhooks_url(&app))
        .json(&serde_json::json!({"url": "https://93.184.215.14/x", "events": ["source.failed"], "directory_id": uuid::Uuid::now_v7()}))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "directory_not_found").await;
    let unknown = uuid::Uuid::now_v7();
    let response = app
        .client
        .delete(format!("{}/{unknown}", webhooks_url(&app)))
        .bearer_auth(&app.tenant.token)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "webhook_not_found").await;
    let response = app
        .get(&format!("{}/{unknown}/deliveries", webhooks_url(&app)))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "webhook_not_found").await;
}

#[tokio::test]
async fn an_endpoint_failing_in_a_row_is_disabled_until_enabled_and_can_be_deleted() {
    let app = TestApp::spawn_with(|s| {
        fast_webhooks(s);
        s.webhooks.max_attempts = 5;
        s.webhooks.disable_after = 2;
    })
    .await;
    let receiver = Receiver::start(vec![500; 100]).await;
    let hook = create_webhook(
        &app,
        serde_json::json!({"url": receiver.url, "events": ["source.completed"]}),
    )
    .await;
    let hook_url = format!("{}/{}", webhooks_url(&app), hook["id"].as_str().unwrap());
    app.upload_ok("email\na@example.com\n").await;
    app.upload_ok("email\nb@example.com\n").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, list) = app.get_json(&webhooks_url(&app)).await;
        if list["data"][0]["disabled"] == true {
            assert!(
                list["data"][0]["failure_run"].as_u64().unwrap() >= 2,
                "{list}"
            );
            assert!(list["data"][0]["disabled_at"].is_string(), "{list}");
            break;
        }
        assert!(Instant::now() < deadline, "{list}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Attempts already in flight may still land; after them, nothing is sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = receiver.received().len();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        receiver.received().len(),
        sent,
        "a disabled endpoint is sent nothing"
    );
    // Enabled again, its pending deliveries go out.
    receiver.heal();
    let response = app
        .post(&format!("{hook_url}/enable"))
        .send()
        .await
        .unwrap();
    let enabled: Value = response.json().await.unwrap();
    assert_eq!(
        (
            enabled["disabled"].as_bool(),
            enabled["failure_run"].as_u64()
        ),
        (Some(false), Some(0)),
        "{enabled}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, deliveries) = app.get_json(&format!("{hook_url}/deliveries")).await;
        let states: Vec<&str> = deliveries["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["state"].as_str().unwrap())
            .collect();
        if states == ["delivered", "delivered"] {
            break;
        }
        assert!(Instant::now() < deadline, "{deliveries}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = app
        .client
        .delete(&hook_url)
        .bearer_auth(&app.tenant.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (_, list) = app.get_json(&webhooks_url(&app)).await;
    assert!(list["data"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn a_delivery_out_of_attempts_is_failed_and_sent_no_more() {
    let app = TestApp::spawn_with(|s| {
        fast_webhooks(s);
        s.webhooks.max_attempts = 2;
    })
    .await;
    let receiver = Receiver::start(vec![503; 100]).await;
    let hook = create_webhook(
        &app,
        serde_json::json!({"url": receiver.url, "events": ["source.completed"]}),
    )
    .await;
    app.upload_ok("email\na@example.com\n").await;
    let hook_url = format!("{}/{}", webhooks_url(&app), hook["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let delivery = loop {
        let (_, deliveries) = app.get_json(&format!("{hook_url}/deliveries")).await;
        if deliveries["data"][0]["state"] == "failed" {
            break deliveries["data"][0].clone();
        }
        assert!(Instant::now() < deadline, "{deliveries}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(delivery["attempt_count"], 2, "{delivery}");
    assert!(delivery["next_attempt_at"].is_null(), "{delivery}");
    assert_eq!(delivery["attempts"][1]["status_code"], 503, "{delivery}");
    assert!(delivery["attempts"][1]["error"]
        .as_str()
        .unwrap()
        .contains("503"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 2);
}

/// `orbit-gateway` processes on one data directory (embedded) or one distributed stack, for
/// the test that kills one.
struct Gateways {
    data: tempfile::TempDir,
    stack: Option<orbit_testkit::DistributedStack>,
}

impl Gateways {
    async fn new() -> Self {
        let data = tempfile::tempdir().unwrap();
        let stack = match distributed() {
            true => Some(orbit_testkit::DistributedStack::create().await),
            false => None,
        };
        Gateways { data, stack }
    }

    fn command(&self, env: &[(&str, &str)]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_orbit-gateway"));
        match &self.stack {
            Some(stack) => {
                cmd.envs(stack.env());
            }
            None => {
                let dir = self.data.path().display();
                cmd.env("ORBIT__DATABASE__URL", format!("sqlite://{dir}/orbit.db"))
                    .env("ORBIT__OBJECT_STORE__URL", format!("file://{dir}/objects"));
            }
        }
        cmd.env("ORBIT__HTTP__LISTEN", "127.0.0.1:0")
            .env("ORBIT__WEBHOOKS__ALLOW_PRIVATE_TARGETS", "true")
            .env("ORBIT__WEBHOOKS__RETRY_BASE", "100ms")
            .env("ORBIT__DATABASE__MAX_CONNECTIONS", "4")
            .env("RUST_LOG", "warn,orbit_gateway=info")
            .envs(env.iter().copied())
            .env_remove("ORBIT_CONFIG")
            .kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Value {
        let out = self.command(&[]).args(args).output().await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// A serving gateway and its base URL, read from its start-up banner.
    async fn serve(&self, env: &[(&str, &str)]) -> (tokio::process::Child, String) {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = self
            .command(env)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
                .await
                .expect("banner within 30s")
                .unwrap()
                .expect("gateway exited before listening");
            if let Some(rest) = line.split("Orbit is listening on ").nth(1) {
                let base = rest.split_whitespace().next().unwrap().to_owned();
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return (child, base);
            }
        }
    }
}

#[tokio::test]
async fn a_gateway_killed_before_delivering_delivers_after_restart() {
    let gateways = Gateways::new().await;
    // Admin commands never create a database: migrate first, on either stack.
    gateways.run(&["migrate"]).await;
    let tenant = gateways.run(&["admin", "bootstrap"]).await;
    let (org, dir, token) = (
        tenant["organization_id"].as_str().unwrap(),
        tenant["directory_id"].as_str().unwrap(),
        tenant["token"].as_str().unwrap(),
    );
    let receiver = Receiver::start(vec![]).await;
    // This gateway looks for deliveries once at start-up, then not for an hour.
    let (mut first, base) = gateways
        .serve(&[("ORBIT__WEBHOOKS__POLL_INTERVAL", "1h")])
        .await;
    let client = reqwest::Client::new();
    let hook: Value = client
        .post(format!("{base}/v2/organizations/{org}/webhooks"))
        .bearer_auth(token)
        .json(&serde_json::json!({"url": receiver.url, "events": ["source.completed"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = hook["secret"].as_str().unwrap().to_owned();
    let uploaded: Value = client
        .post(format!(
            "{base}/v2/organizations/{org}/directories/{dir}/sources/csv-upload"
        ))
        .bearer_auth(token)
        .multipart(upload_form("email\nann@example.com\n", &[]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(uploaded["source_status"], "completed", "{uploaded}");
    // The source has ended and its event is in the outbox; the gateway dies before sending it.
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    assert!(receiver.received().is_empty());

    // After a restart the event goes out. On the distributed stack two gateways come back at
    // once and share the outbox: the event still goes out once.
    let count = if gateways.stack.is_some() { 2 } else { 1 };
    let mut restarted = Vec::new();
    for _ in 0..count {
        restarted.push(
            gateways
                .serve(&[("ORBIT__WEBHOOKS__POLL_INTERVAL", "50ms")])
                .await,
        );
    }
    let got = receiver.wait_for(1, Duration::from_secs(30)).await;
    assert!(verify(&secret, &got[0]), "{got:?}");
    let event: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(event["type"], "source.completed");
    assert_eq!(event["data"]["source_id"], uploaded["source_id"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.received().len(), 1, "sent twice");
}

#[tokio::test]
async fn a_slow_endpoint_holds_one_delivery_slot_not_the_others() {
    let app = TestApp::spawn_with(|s| {
        fast_webhooks(s);
        s.webhooks.concurrency = 4;
    })
    .await;
    let slow = Receiver::start_slow(vec![], Duration::from_secs(3)).await;
    let fast = Receiver::start(vec![]).await;
    for receiver in [&slow, &fast] {
        create_webhook(
            &app,
            serde_json::json!({"url": receiver.url, "events": ["source.completed"]}),
        )
        .await;
    }
    for i in 0..3 {
        app.upload_ok(format!("email\nslow{i}@example.com\n")).await;
    }
    // Sent in batches, the third source's events would wait for the slow endpoint's first two.
    fast.wait_for(3, Duration::from_millis(2500)).await;
    slow.wait_for(3, Duration::from_secs(20)).await;
}
