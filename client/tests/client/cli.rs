//! The `orbit` binary against a real embedded gateway: what a user types, what they see, and
//! what ends up on the server.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{code, contacts, json, run, stderr, stdout, Fault, Gateway, LimitOnce, Proxy};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::Notify;

const FAST: [&str; 2] = ["--poll-interval", "50ms"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut all = extra.to_vec();
    all.extend(FAST);
    all
}

#[tokio::test]
async fn several_files_upload_in_parallel_then_replay_instead_of_importing_twice() {
    let gw = Gateway::start().await;
    let a = gw.file("a.csv", &contacts(120, "a", Some(10)));
    let b = gw.file("b.csv", &contacts(5, "b", None));
    let c = gw.file("c.csv", &contacts(60, "c", Some(20)));
    let out = run(&mut gw.orbit(&args(&["upload", &a, &b, &c, "--parallel", "2", "--json"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let reports = json(&out);
    let reports = reports.as_array().expect("one report per file");
    assert_eq!(reports.len(), 3);
    for (report, (file, rows, failed)) in
        reports.iter().zip([(&a, 120, 12), (&b, 5, 0), (&c, 60, 3)])
    {
        assert_eq!(report["file"], file.as_str(), "{report}");
        assert_eq!(report["status"], "completed", "{report}");
        assert_eq!(report["total_rows"], rows, "{report}");
        assert_eq!(report["accepted"], rows - failed, "{report}");
        assert_eq!(report["failed"], failed, "{report}");
        assert_eq!(report["is_idempotent"], false, "{report}");
        assert_eq!(report["attempts"], 1, "{report}");
        assert_eq!(
            report["unmapped_columns"],
            serde_json::json!(["Favourite Colour"])
        );
        assert!(report["idempotency_key"]
            .as_str()
            .unwrap()
            .ends_with(report["sha256"].as_str().unwrap()));
    }
    assert!(
        stderr(&out).contains("\"Favourite Colour\""),
        "the unmapped column is warned about: {}",
        stderr(&out)
    );
    assert_eq!(gw.sources().await.len(), 3);

    // The same files again: the derived keys replay the first uploads.
    let again = run(&mut gw.orbit(&args(&["upload", &a, &b, &c, "--json"]))).await;
    assert_eq!(code(&again), 0, "{}", stderr(&again));
    let replays = json(&again);
    for (first, replay) in reports.iter().zip(replays.as_array().unwrap()) {
        assert_eq!(replay["is_idempotent"], true, "{replay}");
        assert_eq!(replay["source_id"], first["source_id"]);
        assert_eq!(replay["accepted"], first["accepted"]);
    }
    assert_eq!(gw.sources().await.len(), 3, "nothing was imported twice");
    gw.stop().await;
}

#[tokio::test]
async fn plain_progress_shows_bytes_sent_then_rows_processed_then_a_summary() {
    let gw = Gateway::start().await;
    let file = gw.file("big.csv", &contacts(300, "p", None));
    let out = run(&mut gw.orbit(&args(&["upload", &file, "--progress", "plain"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let err = stderr(&out);
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(
        err.contains(&format!(
            "big.csv: sent 0 B of {}",
            indicatif::HumanBytes(size)
        )),
        "{err}"
    );
    assert!(err.contains("(100%)\n") && err.contains(": sent "), "{err}");
    assert!(err.contains("big.csv: processed "), "{err}");
    assert!(err.contains("of 300 rows (100%)"), "{err}");
    let sent = err.find(": sent ").unwrap();
    let processed = err.find(": processed ").unwrap();
    assert!(sent < processed, "bytes first, then rows: {err}");
    let summary = stdout(&out);
    assert!(
        summary.contains("big.csv: completed, 300 accepted, 0 failed, 0 warnings, 300 rows in "),
        "{summary}"
    );
    assert!(summary.contains(" rows/s), source "), "{summary}");
    gw.stop().await;
}

#[tokio::test]
async fn on_a_terminal_both_phases_draw_as_bars() {
    let gw = Gateway::start().await;
    let file = gw.file("tty.csv", &contacts(200, "t", None));
    // `script` gives the client a pseudo-terminal; the typescript is what a user would see.
    let orbit = env!("CARGO_BIN_EXE_orbit");
    let typescript = gw.app.data.path().join("typescript");
    let mut script = tokio::process::Command::new("script");
    script
        .args(["-q", "-e", "-c"])
        .arg(format!(
            "{orbit} upload {file} --poll-interval 50ms --progress auto"
        ))
        .arg(&typescript)
        .envs(gw.env())
        .env("TERM", "xterm-256color")
        .env("COLUMNS", "120")
        .stdin(Stdio::null());
    let out = run(&mut script).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    assert!(screen.contains("tty.csv sending    ["), "{screen}");
    assert!(screen.contains("tty.csv processing ["), "{screen}");
    assert!(screen.contains("/200 rows"), "{screen}");
    assert!(
        screen.contains("completed, 200 accepted, 0 failed"),
        "{screen}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_connection_cut_mid_upload_is_retried_into_exactly_one_source() {
    let gw = Gateway::start().await;
    let file = gw.file("cut.csv", &contacts(100, "cut", None));
    let broken = Proxy::start(&gw.addr.to_string(), Fault::CutRequest(2_000)).await;
    let out = run(&mut gw.orbit_at(&broken.url, &args(&["upload", &file, "--json"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(broken.tripped.load(std::sync::atomic::Ordering::SeqCst));
    let report = &json(&out)[0];
    // Two, or three when the retry arrived before the server had let go of the cut request.
    assert!(report["attempts"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(report["is_idempotent"], false, "{report}");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["accepted"], 100, "{report}");
    assert!(
        stderr(&out).contains("the connection failed") && stderr(&out).contains("retry 1/5 in "),
        "{}",
        stderr(&out)
    );
    let sources = gw.sources().await;
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0]["source_id"], report["source_id"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_response_lost_after_the_server_recorded_the_upload_replays_it() {
    let gw = Gateway::start().await;
    let file = gw.file("lost.csv", &contacts(100, "lost", Some(25)));
    let broken = Proxy::start(&gw.addr.to_string(), Fault::DropResponse(2_000)).await;
    let out = run(&mut gw.orbit_at(&broken.url, &args(&["upload", &file, "--json"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = &json(&out)[0];
    assert_eq!(report["attempts"], 2, "{report}");
    assert_eq!(
        report["is_idempotent"], true,
        "the second attempt found the first one's source: {report}"
    );
    assert_eq!(report["accepted"], 96, "{report}");
    assert_eq!(report["failed"], 4, "{report}");
    let sources = gw.sources().await;
    assert_eq!(sources.len(), 1, "imported once: {sources:?}");
    assert_eq!(sources[0]["source_id"], report["source_id"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_429_is_waited_out_for_its_retry_after_and_retried_under_the_same_key() {
    let gw = Gateway::start().await;
    let file = gw.file("limited.csv", &contacts(100, "limited", Some(25)));
    // The first upload is refused as an organization over its limits is, with
    // `Retry-After: 1`; the client's own first backoff is at most half a second.
    let front = LimitOnce::start(&gw.base, 1).await;
    let out = run(&mut gw.orbit_at(&front.url, &args(&["upload", &file, "--json"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = &json(&out)[0];
    assert_eq!(report["attempts"], 2, "{report}");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(
        report["is_idempotent"], false,
        "the refused attempt recorded nothing: {report}"
    );
    assert_eq!(report["accepted"], 96, "{report}");

    let uploads = front.uploads.lock().unwrap().clone();
    assert_eq!(uploads.len(), 2, "{uploads:?}");
    let key = uploads[0].idempotency_key.as_deref().expect("a key");
    assert_eq!(uploads[1].idempotency_key.as_deref(), Some(key));
    assert_eq!(report["idempotency_key"], key, "{report}");
    let refused_at = front.refused_at.lock().unwrap().expect("refused once");
    let waited = uploads[1].at - refused_at;
    assert!(
        waited >= Duration::from_secs(1),
        "retried {waited:?} after the 429, before its Retry-After"
    );
    let sources = gw.sources().await;
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0]["source_id"], report["source_id"]);
    gw.stop().await;
}

#[tokio::test]
async fn an_upload_still_in_flight_is_waited_out_then_replayed() {
    let gw = Gateway::start().await;
    let contents = contacts(100, "fly", None);
    let file = gw.file("fly.csv", &contents);
    let (held, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let slow = Proxy::start(
        &gw.addr.to_string(),
        Fault::Hold {
            bytes: 2_000,
            held: held.clone(),
            release: release.clone(),
        },
    )
    .await;
    let key = "in-flight-test";
    let first = gw
        .orbit_at(
            &slow.url,
            &args(&["upload", &file, "--json", "--idempotency-key", key]),
        )
        .output();
    let first = tokio::spawn(first);
    tokio::time::timeout(Duration::from_secs(60), held.notified())
        .await
        .expect("the first upload reached the proxy");
    // Wait until the server has claimed the key for the first upload (it does once it sees the
    // file field start). Read from the gateway's database rather than probed over HTTP: a probe
    // with the same key could win the claim and make the held upload itself answer 409.
    let db = format!("sqlite://{}/orbit.db?mode=ro", gw.app.data.path().display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&db)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM idempotency_keys WHERE key = ?")
                .bind(key)
                .fetch_optional(&mut conn)
                .await
                .unwrap();
        if state.as_deref() == Some("in_flight") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "key state {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut second = gw
        .orbit(&args(&[
            "upload",
            &file,
            "--json",
            "--idempotency-key",
            key,
        ]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(second.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("still in flight") {
                return;
            }
        }
        panic!("orbit ended without waiting: {seen}");
    })
    .await
    .expect("the second upload reports the 409 and waits");
    assert!(seen.contains("409 idempotency_key_in_use"), "{seen}");
    release.notify_one();

    let first = first.await.unwrap().unwrap();
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let first = json(&first)[0].clone();
    assert_eq!(first["is_idempotent"], false, "{first}");
    let mut stdout_pipe = second.stdout.take().unwrap();
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stdout_pipe, &mut out)
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), second.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let second: Value = serde_json::from_slice(&out).unwrap();
    let second = &second[0];
    assert_eq!(second["is_idempotent"], true, "{second}");
    assert_eq!(second["source_id"], first["source_id"]);
    assert!(second["attempts"].as_u64().unwrap() >= 2, "{second}");
    assert_eq!(gw.sources().await.len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn exit_codes_say_what_went_wrong() {
    let gw = Gateway::start().await;
    let good = gw.file("good.csv", &contacts(3, "g", None));
    let no_id = gw.file("no-id.csv", "first name,company\nAnn,Acme\n");

    // 2: authentication.
    let out = run(gw.orbit(&["upload", &good]).env("ORBIT_TOKEN", "orb_nope")).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("401 unauthenticated"),
        "{}",
        stderr(&out)
    );
    // 2: usage: no directory, an unknown directory, a missing file.
    let out = run(gw.orbit(&["upload", &good]).env_remove("ORBIT_DIRECTORY")).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("--directory"), "{}", stderr(&out));
    let unknown = uuid::Uuid::now_v7().to_string();
    let out = run(&mut gw.orbit(&["upload", &good, "--directory", &unknown])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("directory_not_found"),
        "{}",
        stderr(&out)
    );
    let out = run(&mut gw.orbit(&["upload", "/nonexistent/file.csv"])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = run(&mut gw.orbit(&["upload"])).await;
    assert_eq!(code(&out), 2, "clap's usage error: {}", stderr(&out));

    // 1: a file Orbit rejects, caught before sending, and by the server without the check.
    let out = run(&mut gw.orbit(&["upload", &good, &no_id, "--json"])).await;
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let reports = json(&out);
    assert_eq!(reports[0]["status"], "completed");
    assert_eq!(reports[1]["status"], "rejected");
    assert_eq!(reports[1]["error"]["code"], "invalid_csv");
    assert!(reports[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not sent"));
    let out = run(&mut gw.orbit(&["upload", &no_id, "--no-preflight"])).await;
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no identifier column"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("(invalid_csv)"), "{}", stdout(&out));
    assert_eq!(
        gw.sources().await.len(),
        1,
        "only the good file became a source"
    );

    // 3: nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let out = run(&mut gw.orbit_at(&closed, &["upload", &good, "--retries", "1", "--json"])).await;
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(json(&out)["error"]["code"], "network");
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
    gw.stop().await;
}

#[tokio::test]
async fn reports_watch_sources_errors_failed_rows_profiles_and_directories() {
    let gw = Gateway::start().await;
    let file = gw.file("mixed.csv", &contacts(80, "m", Some(8)));
    let out = run(&mut gw.orbit(&args(&["upload", &file, "--json", "--no-wait"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let source = json(&out)[0]["source_id"].as_str().unwrap().to_owned();

    let out = run(&mut gw.orbit(&args(&["watch", &source, "--json"]))).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let watched = json(&out);
    assert_eq!(watched["status"], "completed");
    assert_eq!(
        (watched["accepted"].clone(), watched["failed"].clone()),
        (70.into(), 10.into())
    );

    let out = run(&mut gw.orbit(&["sources"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("SOURCE"), "{table}");
    assert!(
        table.contains(&source) && table.contains("80/80") && table.contains("mixed.csv"),
        "{table}"
    );

    let out = run(&mut gw.orbit(&["errors", &source, "--json"])).await;
    let errors = json(&out);
    let errors = errors.as_array().unwrap();
    assert_eq!(errors.len(), 10);
    assert!(errors.iter().all(|e| e["code"] == "missing_identifier"));
    let out = run(&mut gw.orbit(&["errors", &source, "--limit", "3"])).await;
    assert_eq!(stdout(&out).lines().count(), 4, "{}", stdout(&out));

    let saved = gw.app.data.path().join("failed.csv");
    let out = run(&mut gw.orbit(&["failed-rows", &source, "-o", saved.to_str().unwrap()])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("wrote 10 failed rows"),
        "{}",
        stderr(&out)
    );
    let direct = gw
        .http
        .get(gw.dir_url(&format!("/sources/{source}/failed-rows")))
        .bearer_auth(&gw.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), direct);
    assert!(!gw.app.data.path().join("failed.csv.part").exists());

    let out = run(&mut gw.orbit(&["profiles", "--email", "M3@Example.com", "--json"])).await;
    let profiles = json(&out);
    assert_eq!(profiles.as_array().unwrap().len(), 1, "{profiles}");
    assert_eq!(profiles[0]["first_name"], "First3");
    let out = run(&mut gw.orbit(&["profiles", "--email", "m3@example.com"])).await;
    assert!(stdout(&out).contains("First3 Last3"), "{}", stdout(&out));

    let out = run(&mut gw.orbit(&["directories", "--json"])).await;
    assert_eq!(json(&out)[0]["id"], gw.dir.as_str());

    let out = run(&mut gw.orbit(&["watch", &uuid::Uuid::now_v7().to_string()])).await;
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("source_not_found"),
        "{}",
        stderr(&out)
    );
    gw.stop().await;
}

#[tokio::test]
async fn version_names_the_commit_and_completions_are_printed() {
    let gw = Gateway::start().await;
    let out = run(&mut gw.orbit(&["--version"])).await;
    let version = stdout(&out);
    assert!(
        version.starts_with(&format!("orbit {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&mut gw.orbit(&["completions", shell])).await;
        assert_eq!(code(&out), 0);
        assert!(stdout(&out).contains("failed-rows"), "{shell}");
    }
    gw.stop().await;
}
