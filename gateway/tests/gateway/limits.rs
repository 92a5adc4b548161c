//! Per-organization upload limits over HTTP (docs/operations.md, "Per-organization limits"):
//! each limit refuses with `429 organization_limit_exceeded` at its threshold, naming itself,
//! with `Retry-After`; a refused upload leaves no source, object or idempotency key; room made
//! admits uploads again; a replay is answered at the limit; and two gateways on one database
//! (on the distributed stack) never admit past the limit together.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use orbit_store::limits::{LimitChange, Usage};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::common::{assert_problem, contacts_csv, distributed, file_form, TestApp};

async fn set_limits(app: &TestApp, change: LimitChange) {
    app.running()
        .state
        .store
        .set_organization_limits(app.tenant.org, &change)
        .await
        .unwrap();
}

async fn usage(app: &TestApp) -> Usage {
    app.running()
        .state
        .store
        .organization_usage(app.tenant.org)
        .await
        .unwrap()
}

/// Waits until the organization has `n` uploads in flight.
async fn wait_in_flight(app: &TestApp, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = usage(app).await;
        if now.uploads_in_flight == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in flight: {now:?}, waiting for {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upload to `url` whose body stops after its header line until the sender is used (or
/// dropped): an upload admitted and still streaming.
fn held_upload(
    app: &TestApp,
    url: String,
    csv: String,
) -> (oneshot::Sender<()>, JoinHandle<reqwest::Response>) {
    let (release, released) = oneshot::channel::<()>();
    let split = csv.find('\n').unwrap() + 1;
    let (head, rest) = (csv[..split].to_owned(), csv[split..].to_owned());
    let body = futures::stream::iter([Ok::<_, std::io::Error>(head.into_bytes())]).chain(
        futures::stream::once(async move {
            let _ = released.await;
            Ok(rest.into_bytes())
        }),
    );
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(body)).file_name("held.csv"),
    );
    let request = app.post(&url).multipart(form);
    (
        release,
        tokio::spawn(async move { request.send().await.unwrap() }),
    )
}

/// The seconds of the response's `Retry-After`.
fn retry_after(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts `response` is the refusal of `limit` at `value`, and returns its `Retry-After`.
async fn assert_refused(response: reqwest::Response, limit: &str, value: u64) -> u64 {
    let after = retry_after(&response);
    assert!(after >= 1);
    let body = assert_problem(
        response,
        StatusCode::TOO_MANY_REQUESTS,
        "organization_limit_exceeded",
    )
    .await;
    assert_eq!(body["limit"], limit, "{body}");
    assert_eq!(body["limit_value"], value, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains(limit) && detail.contains(&value.to_string()),
        "{body}"
    );
    after
}

async fn upload_keyed(app: &TestApp, csv: &str, key: &str) -> reqwest::Response {
    app.post(&app.upload_url())
        .header("Idempotency-Key", key)
        .multipart(file_form(csv.to_owned()))
        .send()
        .await
        .unwrap()
}

async fn sources(app: &TestApp) -> Vec<Value> {
    app.collect(&app.dir_url("/sources")).await
}

#[tokio::test]
async fn the_in_flight_limit_refuses_at_its_threshold_and_admits_again_once_room_is_made() {
    let app = TestApp::spawn().await;
    set_limits(
        &app,
        LimitChange {
            max_uploads_in_flight: Some(Some(2)),
            ..LimitChange::default()
        },
    )
    .await;
    let (first, first_done) = held_upload(&app, app.upload_url(), contacts_csv(5, "a"));
    let (second, second_done) = held_upload(&app, app.upload_url(), contacts_csv(5, "b"));
    wait_in_flight(&app, 2).await;

    let refused = upload_keyed(&app, &contacts_csv(3, "c"), "refused-once").await;
    let after = assert_refused(refused, "max_uploads_in_flight", 2).await;
    assert_eq!(after, 30);
    // Nothing of it is kept: no source (the two held uploads have none yet), and its key is
    // free, as the retry below shows.
    assert!(sources(&app).await.is_empty());

    // A held upload completes: room for one more.
    first.send(()).unwrap();
    assert_eq!(first_done.await.unwrap().status(), StatusCode::CREATED);
    let retried = upload_keyed(&app, &contacts_csv(3, "c"), "refused-once").await;
    assert_eq!(retried.status(), StatusCode::CREATED);
    let body: Value = retried.json().await.unwrap();
    assert_eq!(body["is_idempotent"], false, "{body}");
    // At the limit again (the second held upload and a completed one are not both in flight:
    // the completed one is done), so one more goes through, then the next is refused.
    wait_in_flight(&app, 1).await;
    assert_eq!(
        app.upload(contacts_csv(2, "d")).await.status(),
        StatusCode::CREATED
    );
    second.send(()).unwrap();
    assert_eq!(second_done.await.unwrap().status(), StatusCode::CREATED);
    wait_in_flight(&app, 0).await;
    // Every source has its object, and the refused upload left none.
    assert_eq!(sources(&app).await.len(), 4);
    assert_eq!(app.stored_objects().await.len(), 4);
}

#[tokio::test]
async fn the_queued_rows_limit_refuses_while_rows_wait_and_admits_once_they_are_gone() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.sync_rows = 0;
        s.ingest.chunk_rows = 200;
        s.worker.slice_rows = 20;
    })
    .await;
    set_limits(
        &app,
        LimitChange {
            max_queued_rows: Some(Some(1000)),
            ..LimitChange::default()
        },
    )
    .await;
    // Under the limit when it starts: admitted, and it queues far more rows than the limit.
    let big = app.upload_ok(contacts_csv(40_000, "big")).await;
    let source = big["source_id"].as_str().unwrap().to_owned();
    let refused = app.upload(contacts_csv(3, "r")).await;
    let after = assert_refused(refused, "max_queued_rows", 1000).await;
    assert_eq!(after, 30);
    let held = usage(&app).await;
    assert!(
        held.queued_rows > 1000 && held.uploads_in_flight == 1,
        "{held:?}"
    );
    assert_eq!(sources(&app).await.len(), 1);
    // Room: the big one is cancelled, and its rows are no longer queued.
    let cancel = app
        .post(&app.dir_url(&format!("/sources/{source}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::OK);
    let admitted = app.upload(contacts_csv(3, "r")).await;
    assert!(admitted.status().is_success(), "{}", admitted.status());
    assert_eq!(sources(&app).await.len(), 2);
    assert_eq!(app.stored_objects().await.len(), 2);
}

/// Ages the organization's admissions by a minute, as if a minute had passed.
async fn age_admissions(app: &TestApp, org: Uuid) {
    const AGE: &str =
        "UPDATE upload_admissions SET admitted_ms = admitted_ms - 60000 WHERE organization_id = $1";
    let url: &str = &app.settings.database.url;
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::query(AGE).bind(org).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::query(AGE).bind(org).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

#[tokio::test]
async fn the_per_minute_limit_refuses_until_the_oldest_upload_ages_out() {
    let app = TestApp::spawn().await;
    set_limits(
        &app,
        LimitChange {
            max_uploads_per_minute: Some(Some(2)),
            ..LimitChange::default()
        },
    )
    .await;
    // A rejected file is no upload: it does not count toward the minute.
    let rejected = app.upload("no,identifier\n1,2\n").await;
    assert_eq!(rejected.status(), StatusCode::UNPROCESSABLE_ENTITY);
    for n in 0..2 {
        let csv = contacts_csv(2, &format!("m{n}-"));
        assert_eq!(app.upload(csv).await.status(), StatusCode::CREATED);
    }
    let refused = upload_keyed(&app, &contacts_csv(2, "late"), "late").await;
    let after = assert_refused(refused, "max_uploads_per_minute", 2).await;
    assert!((55..=60).contains(&after), "Retry-After: {after}");
    assert_eq!(sources(&app).await.len(), 2);
    assert_eq!(app.stored_objects().await.len(), 2);
    // A minute later (the admissions aged by one) there is room again, and the refused key
    // was never taken.
    age_admissions(&app, app.tenant.org).await;
    let response = upload_keyed(&app, &contacts_csv(2, "late"), "late").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(usage(&app).await.uploads_last_minute, 1);
}

#[tokio::test]
async fn a_replay_is_answered_at_the_limit_and_other_organizations_are_not_held_back() {
    let app = TestApp::spawn().await;
    let csv = contacts_csv(3, "replay");
    let first = upload_keyed(&app, &csv, "the-key").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    set_limits(
        &app,
        LimitChange {
            max_uploads_in_flight: Some(Some(1)),
            ..LimitChange::default()
        },
    )
    .await;
    let (release, held) = held_upload(&app, app.upload_url(), contacts_csv(3, "h"));
    wait_in_flight(&app, 1).await;
    // The same upload again with its key: answered from the key, not refused.
    let replay = upload_keyed(&app, &csv, "the-key").await;
    assert_eq!(replay.status(), StatusCode::OK);
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["source_id"], first["source_id"]);
    assert_eq!(replay["is_idempotent"], true);
    // A new key is a new upload: refused.
    let refused = upload_keyed(&app, &csv, "another-key").await;
    assert_refused(refused, "max_uploads_in_flight", 1).await;
    // Another organization has limits of its own.
    let other = app.another_tenant().await;
    let response = app.upload_as(&other, contacts_csv(2, "o")).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    release.send(()).unwrap();
    assert_eq!(held.await.unwrap().status(), StatusCode::CREATED);
    // With no limit at all, uploads are not counted.
    set_limits(
        &app,
        LimitChange {
            max_uploads_in_flight: Some(Some(0)),
            max_queued_rows: Some(Some(0)),
            max_uploads_per_minute: Some(Some(0)),
            ..LimitChange::default()
        },
    )
    .await;
    assert_eq!(
        app.upload(contacts_csv(2, "free")).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(usage(&app).await.uploads_last_minute, 2);
}

/// Uploads fired at once at two gateways on one database (on the distributed stack; one
/// gateway on the embedded one, which runs a single process): the limit holds across them.
#[tokio::test]
async fn concurrent_uploads_on_two_gateways_never_pass_the_limit() {
    const LIMIT: u64 = 3;
    const UPLOADS: usize = 12;
    let app = TestApp::spawn().await;
    set_limits(
        &app,
        LimitChange {
            max_uploads_in_flight: Some(Some(LIMIT)),
            ..LimitChange::default()
        },
    )
    .await;
    let second = match distributed() {
        true => Some(
            orbit_gateway::app::start(app.settings.clone())
                .await
                .expect("a second gateway starts"),
        ),
        false => None,
    };
    let bases = match &second {
        Some(second) => vec![app.base.clone(), format!("http://{}", second.addr)],
        None => vec![app.base.clone()],
    };
    let path = format!(
        "/v2/organizations/{}/directories/{}/sources/csv-upload",
        app.tenant.org, app.tenant.dir
    );
    let mut held = Vec::new();
    for n in 0..UPLOADS {
        let url = format!("{}{path}", bases[n % bases.len()]);
        held.push(held_upload(&app, url, contacts_csv(3, &format!("u{n}-"))));
    }
    // Every upload is either refused at once or admitted and held.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    let mut waiting = held;
    let mut admitted = Vec::new();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for (release, done) in waiting {
            if done.is_finished() {
                assert_refused(done.await.unwrap(), "max_uploads_in_flight", LIMIT).await;
                refused += 1;
            } else {
                still.push((release, done));
            }
        }
        waiting = still;
        // The uploads not answered are all admitted once the organization's count matches.
        if waiting.len() as u64 <= LIMIT + 1
            && usage(&app).await.uploads_in_flight == waiting.len() as u64
        {
            admitted = std::mem::take(&mut waiting);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{refused} refused, {} waiting",
            waiting.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No overshoot at all: the admissions are counted under one lock.
    assert_eq!(admitted.len() as u64, LIMIT, "{refused} refused");
    for (release, done) in admitted {
        release.send(()).unwrap();
        assert_eq!(done.await.unwrap().status(), StatusCode::CREATED);
    }
    assert_eq!(sources(&app).await.len() as u64, LIMIT);
    assert_eq!(app.stored_objects().await.len() as u64, LIMIT);
    wait_in_flight(&app, 0).await;
    if let Some(second) = second {
        second.shutdown().await;
    }
}
