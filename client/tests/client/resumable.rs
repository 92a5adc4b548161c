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
