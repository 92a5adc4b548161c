//! Hostile and broken clients against a real gateway: connections that send nothing, half a
//! request or a stalled body; floods of idle sockets; too many uploads; request heads over the
//! limits; framework errors; CSV injection in `failed-rows`; `/metrics` access; leftovers of
//! dead uploads.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::{
    assert_problem, contacts_csv, file_form, problem_code, read_response, time_to_close, TestApp,
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Generous: the timeouts under test are a second or two; a busy machine may be slow.
const CLOSE_WITHIN: Duration = Duration::from_secs(20);

fn addr(app: &TestApp) -> SocketAddr {
    app.running().addr
}

/// The head and the first bytes of a multipart upload whose file never ends.
fn stalled_upload_head(app: &TestApp, key: &str) -> Vec<u8> {
    let path = app.upload_url().strip_prefix(&app.base).unwrap().to_owned();
    let boundary = "XbOuNdArYx";
    let start = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.csv\"\r\n\
         Content-Type: text/csv\r\n\r\nemail,city\na@example.com,Paris\n"
    );
    format!(
        "POST {path} HTTP/1.1\r\nHost: orbit\r\nAuthorization: Bearer {}\r\n\
         Idempotency-Key: {key}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: 100000\r\n\r\n{start}",
        app.tenant.token
    )
    .into_bytes()
}

fn partial_files(app: &TestApp) -> Vec<String> {
    std::fs::read_dir(app.data.path().join("objects/.partial"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + CLOSE_WITHIN;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {CLOSE_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn silent_half_sent_and_idle_connections_are_closed_in_time() {
    let app = TestApp::spawn_with(|s| {
        s.http.header_timeout = Duration::from_secs(1);
        s.http.idle_timeout = Duration::from_secs(2);
    })
    .await;

    let mut silent = TcpStream::connect(addr(&app)).await.unwrap();
    let mut half = TcpStream::connect(addr(&app)).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: orbit\r\nX-Slow: ")
        .await
        .unwrap();
    let mut kept_alive = TcpStream::connect(addr(&app)).await.unwrap();
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: orbit\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut kept_alive, CLOSE_WITHIN).await;
    assert_eq!(status, 200);

    let (silent, half, idle) = tokio::join!(
        time_to_close(&mut silent, CLOSE_WITHIN),
        time_to_close(&mut half, CLOSE_WITHIN),
        time_to_close(&mut kept_alive, CLOSE_WITHIN),
    );
    // Closed by the timeouts, not before them.
    assert!(silent >= Duration::from_millis(900), "{silent:?}");
    assert!(half >= Duration::from_millis(900), "{half:?}");
    assert!(idle >= Duration::from_millis(1900), "{idle:?}");
}

#[tokio::test]
async fn a_stalled_body_is_cut_and_a_stalled_upload_leaves_nothing() {
    let app = TestApp::spawn_with(|s| {
        s.http.body_timeout = Duration::from_secs(1);
        s.http.min_body_rate = 1;
    })
    .await;

    // A JSON body that stops half-way.
    let path = format!("/v2/organizations/{}/directories", app.tenant.org);
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: orbit\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":",
                app.tenant.token
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (status, head, body) = read_response(&mut stream, CLOSE_WITHIN).await;
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    assert_eq!(problem_code(&body), "body_timeout");
    time_to_close(&mut stream, CLOSE_WITHIN).await;

    // An upload that stops mid-file: cut, its partial object removed, its key released.
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(&stalled_upload_head(&app, "stalled-1"))
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut stream, CLOSE_WITHIN).await;
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert_eq!(problem_code(&body), "body_timeout");
    wait_for("the partial object removed", || {
        partial_files(&app).is_empty()
    })
    .await;
    assert!(app.stored_objects().await.is_empty());
    let retry = app
        .post(&app.upload_url())
        .header("Idempotency-Key", "stalled-1")
        .multipart(file_form("email,city\na@example.com,Paris\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_slow_but_moving_upload_is_not_cut() {
    let app = TestApp::spawn_with(|s| {
        s.http.body_timeout = Duration::from_secs(1);
        s.http.min_body_rate = 100;
    })
    .await;
    // About 4 s at 250 bytes per second: slower than a body timeout, faster than the rate.
    let csv = contacts_csv(14, "slow");
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        csv.as_bytes().chunks(50).map(|c| Ok(c.to_vec())).collect();
    let stream = futures::stream::iter(pieces).then(|piece| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        piece
    });
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(stream)).file_name("slow.csv"),
    );
    let response = app
        .post(&app.upload_url())
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["accepted"], 14);
}

use futures::StreamExt as _;

#[tokio::test]
async fn idle_sockets_beyond_the_cap_do_not_lock_out_requests() {
    const IDLE: usize = 2000;
    let app = TestApp::spawn_with(|s| {
        s.http.max_connections = 200;
        // Longer than the test: only the cap can free these sockets.
        s.http.header_timeout = Duration::from_secs(300);
    })
    .await;
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(addr(&app)).await.unwrap());
    }
    let client = reqwest::Client::new();
    let started = Instant::now();
    let health = client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let upload = tokio::time::timeout(
        CLOSE_WITHIN,
        client
            .post(app.upload_url())
            .bearer_auth(&app.tenant.token)
            .multipart(file_form(contacts_csv(5, "flood")))
            .send(),
    )
    .await
    .expect("the upload is answered")
    .unwrap();
    assert_eq!(upload.status(), StatusCode::CREATED);
    assert!(started.elapsed() < CLOSE_WITHIN);

    // The cap held: all but at most `max_connections` of the idle sockets were closed.
    let mut open = 0;
    let mut buf = [0u8; 16];
    for stream in &mut idle {
        match tokio::time::timeout(Duration::from_millis(20), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(_)) => panic!("an idle socket got bytes"),
            Err(_) => open += 1,
        }
    }
    assert!(open <= 200, "{open} idle sockets still open");
}

#[tokio::test]
async fn uploads_beyond_the_cap_get_503_with_retry_after() {
    let app = TestApp::spawn_with(|s| {
        s.http.max_uploads = 1;
        s.http.body_timeout = Duration::from_secs(60);
    })
    .await;
    let mut stalled = TcpStream::connect(addr(&app)).await.unwrap();
    stalled
        .write_all(&stalled_upload_head(&app, "holding"))
        .await
        .unwrap();
    wait_for("the first upload streaming", || {
        !partial_files(&app).is_empty()
    })
    .await;

    let response = app.upload(contacts_csv(3, "busy")).await;
    let retry_after = response.headers().get("retry-after").cloned();
    assert_problem(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_uploads",
    )
    .await;
    assert_eq!(retry_after.unwrap(), "5");

    // The slot is given back when the stalled client goes away.
    drop(stalled);
    wait_for("the stalled upload's partial removed", || {
        partial_files(&app).is_empty()
    })
    .await;
    let deadline = Instant::now() + CLOSE_WITHIN;
    loop {
        let response = app.upload(contacts_csv(3, "after")).await;
        if response.status() == StatusCode::CREATED {
            break;
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "the upload slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn framework_errors_are_problem_json() {
    let app = TestApp::spawn().await;

    let dup = app
        .get(&app.dir_url("/sources?limit=1&limit=2"))
        .send()
        .await
        .unwrap();
    assert_problem(dup, StatusCode::BAD_REQUEST, "invalid_request").await;

    let big = app
        .post(&app.url(&format!("/v2/organizations/{}/directories", app.tenant.org)))
        .header("content-type", "application/json")
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .unwrap();
    assert_problem(big, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    let method = app.client.delete(app.url("/healthz")).send().await.unwrap();
    assert_problem(method, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;

    let bad_raw = app
        .get(&app.dir_url(&format!(
            "/sources/{}/failed-rows?raw=maybe",
            uuid::Uuid::nil()
        )))
        .send()
        .await
        .unwrap();
    assert_problem(bad_raw, StatusCode::BAD_REQUEST, "invalid_request").await;

    let long_uri = app
        .get(&app.url(&format!("/healthz?pad={}", "a".repeat(40_000))))
        .send()
        .await
        .unwrap();
    assert_problem(long_uri, StatusCode::URI_TOO_LONG, "uri_too_long").await;

    let big_header = app
        .get(&app.url("/healthz"))
        .header("x-pad", "a".repeat(40_000))
        .send()
        .await
        .unwrap();
    assert_problem(
        big_header,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
    )
    .await;

    let mut many = app.client.get(app.url("/healthz"));
    for i in 0..150 {
        many = many.header(format!("x-h{i}"), "1");
    }
    let many = many.send().await.unwrap();
    assert_problem(
        many,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
    )
    .await;

    // Just under the limits is served.
    let fine = app
        .get(&app.url("/healthz"))
        .header("x-pad", "a".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(fine.status(), StatusCode::OK);
}

#[tokio::test]
async fn failed_rows_neutralise_formulas_mark_cuts_and_keep_raw_bytes() {
    let app = TestApp::spawn_with(|s| {
        s.ingest.max_field_bytes = 32;
        // Rows keep the header's width plus one field wherever they are in the file, whatever
        // this allows (the synchronous prefix used to keep `max_columns + 1`).
        s.ingest.max_columns = 5;
    })
    .await;
    let mut csv = b"email,note,city\n".to_vec();
    csv.extend_from_slice(b"=cmd|' /C calc'!A0,=HYPERLINK(\"http://x\"),a\n");
    csv.extend_from_slice(b"@SUM(1+1),+1+1,-2\n");
    csv.extend_from_slice(b"\tx,\"\rcr\",ok\n");
    csv.extend_from_slice(b"long@example.com,");
    csv.extend_from_slice(&[b'y'; 100]);
    csv.extend_from_slice(b",Rome\n");
    csv.extend_from_slice(b"wide@example.com,a,b,c,d,e,f,g,h,i\n");
    csv.extend_from_slice(b"bad@example.com,caf\xe9,Paris\n");
    let body = app.upload_ok(csv.clone()).await;
    let source = body["source_id"].as_str().unwrap().to_owned();
    assert_eq!(body["failed"], 6, "{body}");

    let fetch = |raw: bool| {
        let url = app.dir_url(&format!(
            "/sources/{source}/failed-rows{}",
            if raw { "?raw=true" } else { "" }
        ));
        let request = app.get(&url);
        async move { request.send().await.unwrap().bytes().await.unwrap() }
    };
    let rows = |bytes: &[u8]| -> Vec<Vec<Vec<u8>>> {
        csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(bytes)
            .byte_records()
            .map(|r| r.unwrap().iter().map(<[u8]>::to_vec).collect())
            .collect()
    };
    let safe = rows(&fetch(false).await);
    let raw = rows(&fetch(true).await);
    let text = |row: &Vec<Vec<u8>>, i: usize| String::from_utf8_lossy(&row[i]).into_owned();

    assert_eq!(text(&safe[0], 0), "'=cmd|' /C calc'!A0");
    assert_eq!(text(&safe[0], 1), "'=HYPERLINK(\"http://x\")");
    assert_eq!(text(&safe[1], 0), "'@SUM(1+1)");
    assert_eq!(text(&safe[1], 1), "'+1+1");
    assert_eq!(text(&safe[1], 2), "'-2");
    assert_eq!(text(&safe[2], 0), "'\tx");
    assert_eq!(text(&safe[2], 1), "'\rcr");
    assert_eq!(text(&raw[0], 0), "=cmd|' /C calc'!A0");
    assert_eq!(text(&raw[1], 1), "+1+1");
    assert_eq!(text(&raw[2], 0), "\tx");

    // A field cut at the limit says so, and so does its /errors entry.
    let long = text(&safe[3], 1);
    assert_eq!(long, format!("{}[…truncated by Orbit]", "y".repeat(32)));
    // Fields beyond those kept are counted in a last field.
    assert_eq!(safe[4].len(), 5 + 3, "{:?}", safe[4]);
    assert_eq!(text(&safe[4], 3), "c");
    assert_eq!(text(&safe[4], 4), "[…6 more fields not kept by Orbit]");
    // Undecodable bytes: U+FFFD by default, exactly as sent with raw=true.
    assert_eq!(text(&safe[5], 1), "caf\u{FFFD}");
    assert_eq!(raw[5][1], b"caf\xe9");

    let errors = app
        .collect(&app.dir_url(&format!("/sources/{source}/errors")))
        .await;
    let message = |code: &str| {
        errors
            .iter()
            .find(|e| e["code"] == code)
            .unwrap_or_else(|| panic!("no {code} in {errors:?}"))["message"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(message("field_too_long").contains("keeps its first 32 bytes"));
    assert!(message("column_count_mismatch").contains("keeps the first 4"));
    assert!(message("invalid_encoding").contains("raw=true"));
}

#[tokio::test]
async fn metrics_can_want_a_token() {
    let app = TestApp::spawn_with(|s| s.http.metrics_token = "scrape-secret".into()).await;
    let anonymous = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_problem(anonymous, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    let wrong = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let scraped = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth("scrape-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(scraped.text().await.unwrap().contains("orbit_sources"));
}

#[tokio::test]
async fn metrics_can_have_a_listener_of_their_own() {
    let app = TestApp::spawn_with(|s| s.http.metrics_listen = "127.0.0.1:0".into()).await;
    let on_api = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_problem(on_api, StatusCode::NOT_FOUND, "not_found").await;
    let metrics = app.running().metrics_addr.expect("a metrics listener");
    let scraped = app
        .client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status(), StatusCode::OK);
    assert!(scraped.text().await.unwrap().contains("orbit_sources"));
    let api = app
        .client
        .get(format!("http://{metrics}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn partial_objects_of_dead_uploads_are_swept_and_live_ones_kept() {
    let mut app = TestApp::spawn().await;
    let blobs = app.running().state.blobs.clone();
    let partial = app.data.path().join("objects/.partial");
    // A live write of this process, and what a dead process and a dropped writer left.
    let mut live = blobs.begin("sources/x/live.csv").await.unwrap();
    live.write(bytes::Bytes::from_static(b"email\n"))
        .await
        .unwrap();
    let dead = partial.join(format!("{}-{}", u32::MAX - 7, uuid::Uuid::new_v4()));
    std::fs::write(&dead, b"half a file").unwrap();
    let orphan = partial.join(format!("{}-{}", std::process::id(), uuid::Uuid::new_v4()));
    std::fs::write(&orphan, b"left by a writer that never ran its drop").unwrap();

    let removed = blobs
        .sweep_abandoned(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(partial_files(&app).len(), 1, "the live write is kept");
    live.finish().await.unwrap();
    assert!(partial_files(&app).is_empty());

    // At start-up too: a restarted gateway finds the dead process's file and removes it.
    std::fs::write(&dead, b"half a file").unwrap();
    app.stop().await;
    let settings = app.settings.clone();
    let restarted = orbit_gateway::app::start(settings).await.unwrap();
    assert!(partial_files(&app).is_empty());
    restarted.shutdown().await;
}

/// A request target hyper cannot parse (the README's `<source_id>` pasted as is, a space, a
/// backquote) gets a problem+json 400 saying what is wrong, not hyper's empty one; a
/// valid target on the same kind of line is unaffected.
#[tokio::test]
async fn an_invalid_request_target_is_a_problem() {
    let app = TestApp::spawn().await;
    let source_path = app.dir_url("/sources/<source_id>/errors");
    let source_path = source_path.trim_start_matches(&app.base);
    for target in [
        source_path.to_owned(),
        "/healthz/a b".to_owned(),
        "/`".to_owned(),
    ] {
        let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
        stream
            .write_all(format!("GET {target} HTTP/1.1\r\nHost: orbit\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, head, body) = read_response(&mut stream, CLOSE_WITHIN).await;
        assert_eq!(status, 400, "{target}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{target}: {head}"
        );
        assert_eq!(problem_code(&body), "invalid_request", "{target}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            body["detail"].as_str().unwrap().contains("percent-encoded"),
            "{body}"
        );
    }
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(b"GET /healthz?a=%3Cb%3E HTTP/1.1\r\nHost: orbit\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut stream, CLOSE_WITHIN).await;
    assert_eq!(status, 200);
}
