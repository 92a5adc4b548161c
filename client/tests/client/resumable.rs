//! `orbit upload` of big files over resumable uploads: through a link that drops every 50 MB
//! it finishes with one source and sends at most one `PATCH` more per cut; killed mid-upload
//! and run again, it goes on from where the server is.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::common::{code, json, run, stderr, Fault, Gateway, Proxy};

/// `orbit`'s `PATCH` size (`orbit_client::resumable::PATCH_BYTES`).
const PATCH_BYTES: u64 = 16 << 20;

/// About `rows` × `width` bytes of contacts whose notes are wide, so a big file has few rows.
fn wide_csv(rows: usize, width: usize) -> String {
    let notes = "n".repeat(width);
    let mut out = String::with_capacity(rows * (width + 40));
    out.push_str("email,company,notes\n");
    for i in 0..rows {
        out.push_str(&format!("w{i}@example.com,Co {},{notes}\n", i % 50));
    }
    out
}

/// 300 MB through a proxy that cuts the connection every 50 MB.
#[tokio::test]
async fn a_big_file_gets_through_a_link_that_drops_every_50_mb() {
    let gw = Gateway::start().await;
    let csv = wide_csv(100_000, 3000);
    assert!(csv.len() > 300_000_000, "{}", csv.len());
    let sha256 = hex::encode(Sha256::digest(csv.as_bytes()));
    let file = gw.file("big.csv", &csv);
    let proxy = Proxy::start(&gw.base, Fault::cut_every(50_000_000)).await;
    let out = run(&mut gw.orbit_at(
        &proxy.url,
        &[
            "upload",
            &file,
            "--compress",
            "none",
            "--dry-run",
            "--no-wait",
            "--json",
        ],
    ))
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = &json(&out)[0];
    assert_eq!(report["resumable"], true, "{report}");
    let (bytes, sent) = (
        report["bytes"].as_u64().unwrap(),
        report["sent_bytes"].as_u64().unwrap(),
    );
    let cuts = bytes / 50_000_000;
    // Each cut is a PATCH that broke off, after which orbit asked the server where it was.
    let notes = stderr(&out);
    assert_eq!(
        notes.matches("going on from the server's offset").count() as u64,
        cuts,
        "{notes}"
    );
    assert!(
        sent <= bytes + cuts * PATCH_BYTES,
        "sent {sent} for {bytes} bytes and {cuts} cuts: {report}"
    );
    let sources = gw.sources().await;
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0]["sha256"], sha256);
    assert_eq!(report["sha256"], sha256);
    assert_eq!(sources[0]["total_rows"], 100_000, "{}", sources[0]);
}

/// `orbit` killed mid-upload, then run again: it finds the upload in its state file, asks the
/// server where it is, and sends only the rest.
#[tokio::test]
async fn a_killed_orbit_upload_goes_on_when_run_again() {
    let gw = Gateway::start().await;
    let csv = wide_csv(40_000, 2500);
    let sha256 = hex::encode(Sha256::digest(csv.as_bytes()));
    let file = gw.file("restart.csv", &csv);
    let args = [
        "upload",
        file.as_str(),
        "--compress",
        "none",
        "--dry-run",
        "--no-wait",
        "--json",
    ];
    let mut first = gw.orbit(&args).spawn().expect("orbit starts");
    // Killed once the server holds some of it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let uploads = std::fs::read_dir(gw.app.data.path().join("orbit/uploads"))
            .map(|d| d.count())
            .unwrap_or(0);
        let stored = gw
            .app
            .stored_objects()
            .await
            .iter()
            .filter(|k| k.contains("uploads/"))
            .count();
        if uploads == 1 && stored >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the upload never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().await.unwrap();

    let out = run(&mut gw.orbit(&args)).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = &json(&out)[0];
    let (bytes, sent, from) = (
        report["bytes"].as_u64().unwrap(),
        report["sent_bytes"].as_u64().unwrap(),
        report["resumed_from"].as_u64().unwrap(),
    );
    assert!(from > 0, "{report}");
    assert!(
        sent <= bytes - from,
        "sent {sent} after going on from {from}: {report}"
    );
    let sources = gw.sources().await;
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0]["sha256"], sha256);
    // Done: the state file is gone.
    let left = std::fs::read_dir(gw.app.data.path().join("orbit/uploads"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
}

/// A compressed file over the threshold goes resumable too, of deferred length.
#[tokio::test]
async fn a_compressed_big_file_goes_resumable() {
    let gw = Gateway::start().await;
    let csv = wide_csv(5_000, 100);
    let file = gw.file("zipped.csv", &csv);
    let out = run(&mut gw.orbit(&[
        "upload",
        &file,
        "--resume-above",
        "1000",
        "--compress",
        "zstd",
        "--poll-interval",
        "50ms",
        "--json",
    ]))
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = &json(&out)[0];
    assert_eq!(report["resumable"], true, "{report}");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["accepted"], 5_000);
    let source_id = report["source_id"].as_str().unwrap();
    let source = gw
        .get_json(&gw.dir_url(&format!("/sources/{source_id}")))
        .await;
    assert_eq!(source["compression"], "zstd", "{source}");
    assert_eq!(source["received_bytes"], report["sent_bytes"], "{source}");
    assert_eq!(source["sha256"], report["sha256"]);
}

/// An `orbit-gateway` process on the embedded backends in `data`, listening on `port`.
async fn gateway_process(data: &std::path::Path, port: u16) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(orbit_testkit::gateway::binary("orbit-gateway"))
        .env(
            "ORBIT__DATABASE__URL",
            format!("sqlite://{}/orbit.db", data.display()),
        )
        .env(
            "ORBIT__OBJECT_STORE__URL",
            format!("file://{}/objects", data.display()),
        )
        .env("ORBIT__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("ORBIT_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the gateway never listened");
        assert!(child.try_wait().unwrap().is_none(), "the gateway exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}

/// The gateway killed with SIGKILL mid-upload and started again: `orbit`, retrying, asks the
/// new process where the upload is and sends the rest; one cut costs at most one `PATCH`.
#[tokio::test]
async fn orbit_upload_goes_on_after_the_gateway_is_killed_and_restarted() {
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gateway = gateway_process(data.path(), port).await;
    let admin = tokio::process::Command::new(orbit_testkit::gateway::binary("orbit-gateway"))
        .env(
            "ORBIT__DATABASE__URL",
            format!("sqlite://{}/orbit.db", data.path().display()),
        )
        .env_remove("ORBIT_CONFIG")
        .args(["admin", "bootstrap"])
        .output()
        .await
        .unwrap();
    assert!(
        admin.status.success(),
        "{}",
        String::from_utf8_lossy(&admin.stderr)
    );
    let boot: serde_json::Value = serde_json::from_slice(&admin.stdout).unwrap();
    let csv = wide_csv(40_000, 2500);
    let sha256 = hex::encode(Sha256::digest(csv.as_bytes()));
    let file = data.path().join("big.csv");
    std::fs::write(&file, &csv).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let orbit = tokio::process::Command::new(env!("CARGO_BIN_EXE_orbit"))
        .args(["upload", file.to_str().unwrap()])
        .args(["--compress", "none", "--dry-run", "--no-wait", "--json"])
        .args(["--retries", "10"])
        .env("ORBIT_URL", &base)
        .env("ORBIT_TOKEN", boot["token"].as_str().unwrap())
        .env("ORBIT_ORG", boot["organization_id"].as_str().unwrap())
        .env("ORBIT_DIRECTORY", boot["directory_id"].as_str().unwrap())
        .env("XDG_CONFIG_HOME", data.path())
        .env("XDG_STATE_HOME", data.path())
        .env_remove("ORBIT_PROFILE")
        .env_remove("ORBIT_PROFILES_FILE")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once parts of the upload are stored.
    let uploads = data.path().join("objects/uploads");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let parts: usize = std::fs::read_dir(&uploads)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| std::fs::read_dir(e.path()).map_or(0, |p| p.count()))
                    .sum()
            })
            .unwrap_or(0);
        if parts >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the upload never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _gateway = gateway_process(data.path(), port).await;

    let out = tokio::time::timeout(Duration::from_secs(120), orbit.wait_with_output())
        .await
        .expect("orbit finished in time")
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = &json(&out)[0];
    let (bytes, sent) = (
        report["bytes"].as_u64().unwrap(),
        report["sent_bytes"].as_u64().unwrap(),
    );
    assert!(
        sent <= bytes + PATCH_BYTES,
        "sent {sent} for {bytes}: {report}"
    );
    let http = reqwest::Client::new();
    let sources: serde_json::Value = http
        .get(format!(
            "{base}/v2/organizations/{}/directories/{}/sources",
            boot["organization_id"].as_str().unwrap(),
            boot["directory_id"].as_str().unwrap()
        ))
        .bearer_auth(boot["token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sources = sources["data"].as_array().unwrap();
    assert_eq!(sources.len(), 1, "{sources:?}");
    assert_eq!(sources[0]["sha256"], sha256);
}
