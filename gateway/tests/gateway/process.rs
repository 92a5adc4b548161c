//! The `orbit-gateway` binary as operators run it: the admin CLI's JSON, a gateway killed
//! with SIGKILL mid-processing that finishes the work after a restart without adding a row twice,
//! and SIGTERM with a stalled upload, which exits after the shutdown grace and leaves nothing.

use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::contacts_csv;
use futures::StreamExt as _;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_orbit-gateway");

fn command(data: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env(
        "ORBIT__DATABASE__URL",
        format!("sqlite://{}/orbit.db", data.display()),
    )
    .env(
        "ORBIT__OBJECT_STORE__URL",
        format!("file://{}/objects", data.display()),
    )
    .env("ORBIT__HTTP__LISTEN", "127.0.0.1:0")
    .env("ORBIT__INGEST__SYNC_ROWS", "100")
    .env("ORBIT__INGEST__CHUNK_ROWS", "400")
    .env("ORBIT__WORKER__CONCURRENCY", "1")
    .env_remove("ORBIT_CONFIG")
    .kill_on_drop(true);
    cmd
}

/// A data directory with a migrated database, as a gateway leaves it on first start: admin
/// commands refuse to create one.
pub(crate) async fn data_dir() -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    let out = command(data.path())
        .arg("migrate")
        .output()
        .await
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

pub(crate) async fn admin(data: &Path, args: &[&str]) -> (bool, Value, String) {
    let out = command(data)
        .arg("admin")
        .args(args)
        .output()
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Starts the gateway and returns it with its base URL, read from its start-up banner.
pub(crate) async fn serve(data: &Path) -> (Child, String) {
    serve_with(data, &[]).await
}

/// [`serve`] with more `ORBIT__…` settings.
async fn serve_with(data: &Path, env: &[(&str, &str)]) -> (Child, String) {
    let mut child = command(data)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gateway starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("banner within 30s")
            .expect("stderr readable")
            .expect("gateway exited before listening");
        if let Some(rest) = line.split("Orbit is listening on ").nth(1) {
            let base = rest.split_whitespace().next().unwrap().to_owned();
            // Keep draining stderr so the gateway never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return (child, base);
        }
    }
}

/// Run from the wrong directory, an admin command would make a second database that no
/// gateway reads, and print a token that gets 401: it refuses, says where it looked, and
/// creates nothing. Where the database exists it says which one it used.
#[tokio::test]
async fn admin_commands_never_create_a_database() {
    let data = tempfile::tempdir().unwrap();
    let (ok, out, stderr) = admin(data.path(), &["bootstrap"]).await;
    assert!(!ok && out.is_null(), "{out}");
    let file = data.path().join("orbit.db");
    assert!(
        stderr.contains(&format!("there is no database at {}", file.display()))
            && stderr.contains("orbit-gateway migrate"),
        "{stderr}"
    );
    assert!(!file.exists());
    let out = command(data.path()).arg("migrate").output().await.unwrap();
    assert!(out.status.success());
    let (ok, boot, stderr) = admin(data.path(), &["bootstrap"]).await;
    assert!(ok && boot["token"].is_string(), "{boot}");
    assert!(
        stderr.contains(&format!("database: {}", file.display())),
        "{stderr}"
    );
}

#[tokio::test]
async fn admin_commands_print_json() {
    let data = data_dir().await;
    let (ok, org, _) = admin(data.path(), &["create-org", "--name", "Acme"]).await;
    assert!(ok);
    let org = org["organization_id"].as_str().unwrap().to_owned();
    let (ok, dir, _) = admin(
        data.path(),
        &["create-directory", "--org", &org, "--name", "Leads"],
    )
    .await;
    assert!(ok);
    let dir = dir["directory_id"].as_str().unwrap().to_owned();
    let (ok, token, _) = admin(
        data.path(),
        &[
            "create-token",
            "--org",
            &org,
            "--user-email",
            "Ops@Example.com",
            "--expires-in",
            "30d",
        ],
    )
    .await;
    assert!(ok);
    assert!(token["token"].as_str().unwrap().starts_with("orb_"));
    assert!(token["user_id"].is_string());
    let (ok, revoked, _) = admin(
        data.path(),
        &["revoke-token", "--token", token["token"].as_str().unwrap()],
    )
    .await;
    assert!(ok && revoked["revoked"] == true);
    let (ok, _, stderr) = admin(data.path(), &["revoke-token", "--token", "orb_nothing"]).await;
    assert!(!ok && stderr.contains("no live token"), "{stderr}");
    let (ok, archived, _) = admin(
        data.path(),
        &["archive-directory", "--org", &org, "--directory", &dir],
    )
    .await;
    assert!(ok && archived["archived"] == true);
    let (ok, _, stderr) = admin(
        data.path(),
        &[
            "create-directory",
            "--org",
            "00000000-0000-0000-0000-000000000000",
            "--name",
            "x",
        ],
    )
    .await;
    assert!(!ok && stderr.contains("no organization"), "{stderr}");
    let (ok, boot, _) = admin(data.path(), &["bootstrap"]).await;
    assert!(ok);
    for key in ["organization_id", "directory_id", "token"] {
        assert!(boot[key].is_string(), "{boot}");
    }
}

#[tokio::test]
async fn admin_set_limits_and_get_limits_show_each_value_and_its_source() {
    let data = data_dir().await;
    let (_, org, _) = admin(data.path(), &["create-org", "--name", "Acme"]).await;
    let org = org["organization_id"].as_str().unwrap().to_owned();
    let (ok, limits, stderr) = admin(data.path(), &["get-limits", "--org", &org]).await;
    assert!(ok, "{stderr}");
    assert_eq!(limits["organization_id"], org.as_str());
    assert_eq!(
        limits["weight"],
        serde_json::json!({"value": 1, "source": "default"})
    );
    assert_eq!(
        limits["max_uploads_in_flight"],
        serde_json::json!({"value": 1000, "source": "default"})
    );
    assert_eq!(limits["usage"]["uploads_in_flight"], 0, "{limits}");
    let (ok, limits, stderr) = admin(
        data.path(),
        &[
            "set-limits",
            "--org",
            &org,
            "--weight",
            "3",
            "--max-uploads-in-flight",
            "5",
            "--max-uploads-per-minute",
            "0",
        ],
    )
    .await;
    assert!(ok, "{stderr}");
    assert_eq!(
        limits["weight"],
        serde_json::json!({"value": 3, "source": "override"})
    );
    assert_eq!(
        limits["max_uploads_in_flight"],
        serde_json::json!({"value": 5, "source": "override"})
    );
    assert_eq!(
        limits["max_uploads_per_minute"],
        serde_json::json!({"value": 0, "source": "override"})
    );
    assert_eq!(
        limits["max_queued_rows"],
        serde_json::json!({"value": 100000000, "source": "default"})
    );
    // `default` drops one value; the others stay, as get-limits shows.
    let (ok, _, _) = admin(
        data.path(),
        &[
            "set-limits",
            "--org",
            &org,
            "--max-uploads-in-flight",
            "default",
        ],
    )
    .await;
    assert!(ok);
    let (_, limits, _) = admin(data.path(), &["get-limits", "--org", &org]).await;
    assert_eq!(
        limits["max_uploads_in_flight"]["source"], "default",
        "{limits}"
    );
    assert_eq!(limits["weight"]["value"], 3, "{limits}");
    // --reset drops them all, then applies what is given with it.
    let (ok, limits, _) = admin(
        data.path(),
        &[
            "set-limits",
            "--org",
            &org,
            "--reset",
            "--max-queued-rows",
            "10",
        ],
    )
    .await;
    assert!(ok);
    assert_eq!(limits["weight"]["source"], "default", "{limits}");
    assert_eq!(
        limits["max_uploads_per_minute"]["source"], "default",
        "{limits}"
    );
    assert_eq!(
        limits["max_queued_rows"],
        serde_json::json!({"value": 10, "source": "override"})
    );
    // Mistakes are errors, on stderr.
    let unknown = "00000000-0000-0000-0000-000000000000";
    for args in [
        vec!["get-limits", "--org", unknown],
        vec!["set-limits", "--org", unknown, "--weight", "2"],
    ] {
        let (ok, out, stderr) = admin(data.path(), &args).await;
        assert!(
            !ok && out.is_null() && stderr.contains("no organization"),
            "{stderr}"
        );
    }
    let (ok, _, stderr) = admin(data.path(), &["set-limits", "--org", &org, "--weight", "0"]).await;
    assert!(!ok && stderr.contains("--weight"), "{stderr}");
    let (ok, _, stderr) = admin(
        data.path(),
        &["set-limits", "--org", &org, "--max-queued-rows", "lots"],
    )
    .await;
    assert!(!ok && stderr.contains("default"), "{stderr}");
}

#[tokio::test]
async fn a_killed_gateway_finishes_the_work_after_restart() {
    let data = data_dir().await;
    let (_, boot, _) = admin(data.path(), &["bootstrap"]).await;
    let (org, dir, token) = (
        boot["organization_id"].as_str().unwrap().to_owned(),
        boot["directory_id"].as_str().unwrap().to_owned(),
        boot["token"].as_str().unwrap().to_owned(),
    );
    let client = reqwest::Client::new();
    let (mut gateway, base) = serve(data.path()).await;
    const ROWS: usize = 30_000;
    let upload = format!("{base}/v2/organizations/{org}/directories/{dir}/sources/csv-upload");
    let response = client
        .post(&upload)
        .bearer_auth(&token)
        .multipart(common::file_form(contacts_csv(ROWS, "k")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();

    // Kill it as soon as the workers are part-way through.
    let status_at = |base: &str| format!("{base}{location}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body: Value = client
            .get(status_at(&base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let processed = body["processed_rows"].as_u64().unwrap();
        assert!(
            processed < ROWS as u64,
            "finished before it could be killed: {body}"
        );
        if processed > 100 {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.kill().await.unwrap();

    let (_gateway, base) = serve(data.path()).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let body: Value = client
            .get(status_at(&base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if body["source_status"] == "completed" {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "not completed after restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["accepted"], ROWS);
    assert_eq!(done["failed"], 0);
    assert_eq!(done["processed_rows"], ROWS);
    assert_eq!(done["warnings"], 0);

    let mut profiles = 0;
    let mut cursor = String::new();
    loop {
        let url =
            format!("{base}/v2/organizations/{org}/directories/{dir}/profiles?limit=1000{cursor}");
        let page: Value = client
            .get(url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        profiles += page["data"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(profiles, ROWS);
}

#[tokio::test]
async fn create_token_refuses_bad_lifetimes_before_writing_anything() {
    let data = data_dir().await;
    let (ok, org, _) = admin(data.path(), &["create-org", "--name", "Acme"]).await;
    assert!(ok);
    let org = org["organization_id"].as_str().unwrap().to_owned();
    for lifetime in ["99999999999d", "0s", "10s"] {
        let (ok, out, stderr) = admin(
            data.path(),
            &["create-token", "--org", &org, "--expires-in", lifetime],
        )
        .await;
        assert!(!ok, "{lifetime}: {out}");
        assert!(out.is_null(), "{lifetime}: printed {out}");
        assert!(
            stderr.contains("must be from 1m to 100years"),
            "{lifetime}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{lifetime}: {stderr}");
    }
    let (ok, token, _) = admin(
        data.path(),
        &["create-token", "--org", &org, "--expires-in", "1m"],
    )
    .await;
    assert!(ok);
    assert!(token["expires_at"].is_string(), "{token}");
}

#[tokio::test]
async fn sigterm_with_a_stalled_upload_exits_within_the_grace_and_leaves_nothing() {
    let data = data_dir().await;
    let (_, boot, _) = admin(data.path(), &["bootstrap"]).await;
    let (org, dir, token) = (
        boot["organization_id"].as_str().unwrap().to_owned(),
        boot["directory_id"].as_str().unwrap().to_owned(),
        boot["token"].as_str().unwrap().to_owned(),
    );
    let (mut gateway, base) =
        serve_with(data.path(), &[("ORBIT__HTTP__SHUTDOWN_GRACE", "2s")]).await;
    let addr = base.trim_start_matches("http://").to_owned();
    let path = format!("/v2/organizations/{org}/directories/{dir}/sources/csv-upload");
    let boundary = "XbOuNdArYx";
    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: orbit\r\nAuthorization: Bearer {token}\r\n\
                 Idempotency-Key: term-1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n\
                 Content-Length: 100000\r\n\r\n--{boundary}\r\n\
                 Content-Disposition: form-data; name=\"file\"; filename=\"c.csv\"\r\n\r\n\
                 email,city\na@example.com,Paris\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let partial = data.path().join("objects/.partial");
    let count = || std::fs::read_dir(&partial).map_or(0, |d| d.count());
    let deadline = Instant::now() + Duration::from_secs(30);
    while count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the upload never started streaming"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &gateway.id().unwrap().to_string()])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let (status, _, body) = common::read_response(&mut stalled, Duration::from_secs(30)).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(common::problem_code(&body), "service_unavailable");
    let exit = tokio::time::timeout(Duration::from_secs(30), gateway.wait())
        .await
        .expect("the gateway exits after the grace")
        .unwrap();
    let took = signalled.elapsed();
    assert!(exit.success(), "{exit:?}");
    assert!(
        took >= Duration::from_millis(1900),
        "exited before the grace: {took:?}"
    );
    assert_eq!(count(), 0, "the partial object was removed");

    // The key was released: the same upload with the same key runs fresh.
    let (_gateway, base) = serve(data.path()).await;
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(&token)
        .header("Idempotency-Key", "term-1")
        .multipart(common::file_form("email,city\na@example.com,Paris\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

/// The files in the local object store's `.partial/`: uploads still being written, or left by
/// a process that died writing them.
fn partial_files(data: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(data.join("objects").join(".partial"))
        .map(|dir| dir.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_killed_gateways_partial_upload_and_idempotency_key_are_gone_after_restart() {
    let data = data_dir().await;
    let (_, boot, _) = admin(data.path(), &["bootstrap"]).await;
    let (org, dir, token) = (
        boot["organization_id"].as_str().unwrap().to_owned(),
        boot["directory_id"].as_str().unwrap().to_owned(),
        boot["token"].as_str().unwrap().to_owned(),
    );
    let (mut gateway, base) = serve(data.path()).await;
    let client = reqwest::Client::new();
    let upload = format!("{base}/v2/organizations/{org}/directories/{dir}/sources/csv-upload");
    // An upload that sends its key and the start of its file, then stalls: the gateway holds
    // the key in flight when it is killed. Its sender is returned so the body stays open.
    let stall = || {
        let (client, upload, token) = (client.clone(), upload.clone(), token.clone());
        let (open, held) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
        let first = b"email\na@x.co\n".to_vec();
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(first) })
            .chain(tokio_stream_from(held));
        let task = tokio::spawn(async move {
            let part = reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(body))
                .file_name("contacts.csv");
            let form = reqwest::multipart::Form::new()
                .text("idempotency_key", "crash-key")
                .part("file", part);
            let _ = client
                .post(&upload)
                .bearer_auth(&token)
                .multipart(form)
                .send()
                .await;
        });
        (open, task)
    };
    let mut stalled = stall();
    let path = format!("/v2/organizations/{org}/directories/{dir}/sources/csv-upload");
    let send = |base: String, csv: String| {
        let (client, token, url) = (client.clone(), token.clone(), format!("{base}{path}"));
        async move {
            client
                .post(url)
                .bearer_auth(&token)
                .header("Idempotency-Key", "crash-key")
                .multipart(common::file_form(csv))
                .send()
                .await
                .unwrap()
        }
    };
    // An empty file is refused (422) and stores no key, so probing with one never takes the
    // key for good: it answers 409 once the stalled upload holds it. A probe holds the key for
    // a moment too, and a stall that arrives then is answered 409 and ends: start another.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = send(base.clone(), String::new()).await.status();
        if status == StatusCode::CONFLICT {
            break;
        }
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            Instant::now() < deadline,
            "the stalled upload never held its key"
        );
        if stalled.1.is_finished() {
            stalled = stall();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stalled upload's bytes are on disk, in a partial file, when the gateway dies.
    let deadline = Instant::now() + Duration::from_secs(10);
    while partial_files(data.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stalled upload never began its object"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway.kill().await.unwrap();
    stalled.1.abort();
    let orphans = partial_files(data.path());

    // The restarted gateway answers 409 only until the dead one's heartbeat expires (5 s), not
    // for the hour of `idempotency.in_flight_timeout`.
    let (_gateway, base) = serve(data.path()).await;
    let restarted = Instant::now();
    loop {
        let response = send(base.clone(), contacts_csv(3, "retry")).await;
        let status = response.status();
        if status == StatusCode::CREATED || status == StatusCode::ACCEPTED {
            break;
        }
        assert_eq!(status, StatusCode::CONFLICT, "{:?}", response.text().await);
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "the key is still held by the killed gateway"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The restarted gateway's start-up sweep removed what the dead one was writing.
    let left: Vec<_> = partial_files(data.path())
        .into_iter()
        .filter(|f| orphans.contains(f))
        .collect();
    assert!(
        left.is_empty(),
        "partial files of the killed gateway: {left:?}"
    );
}

/// The receiving half of a channel as a stream (what `tokio-stream` would give).
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
