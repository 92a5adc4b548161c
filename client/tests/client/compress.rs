//! `orbit upload --compress`: files compressed on the fly, stored and counted as the CSV they
//! carry, against a real embedded gateway.

use crate::common::{code, contacts, json, run, stderr, stdout, Gateway};

#[tokio::test]
async fn files_are_compressed_on_the_way_and_imported_as_their_csv() {
    let gw = Gateway::start().await;
    let csv = contacts(3000, "z", None);
    let files = [
        ("zstd", gw.file("a.csv", &csv)),
        ("gzip", gw.file("b.csv", &contacts(3000, "g", None))),
    ];
    for (codec, file) in &files {
        let out = run(&mut gw.orbit(&[
            "upload",
            file,
            "--compress",
            codec,
            "--poll-interval",
            "50ms",
            "--json",
        ]))
        .await;
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let report = json(&out);
        let report = &report[0];
        assert_eq!(report["status"], "completed", "{report}");
        assert_eq!(report["accepted"], 3000);
        assert_eq!(report["compression"], *codec);
        let (bytes, sent) = (
            report["bytes"].as_u64().unwrap(),
            report["sent_bytes"].as_u64().unwrap(),
        );
        assert!(sent > 0 && sent * 3 < bytes, "{report}");
        // The server saw the compressed file and kept the CSV.
        let source_id = report["source_id"].as_str().unwrap();
        let source = gw
            .get_json(&gw.dir_url(&format!("/sources/{source_id}")))
            .await;
        assert_eq!(source["compression"], *codec, "{source}");
        assert_eq!(source["received_bytes"], sent, "{source}");
        assert_eq!(source["byte_size"], bytes, "{source}");
        assert_eq!(source["sha256"], report["sha256"], "{source}");
    }

    // The same file sent plain is the same upload: the key is the CSV's, and so is the hash.
    let out = run(&mut gw.orbit(&["upload", &files[0].1, "--compress", "none"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("already uploaded"),
        "{}",
        stdout(&out)
    );
    // `auto` leaves a file under the threshold as it is.
    let small = gw.file("small.csv", &contacts(10, "s", None));
    let out = run(&mut gw.orbit(&["upload", &small, "--json"])).await;
    assert_eq!(json(&out)[0]["compression"], "none");
    let out = run(&mut gw.orbit(&["upload", &small, "--compress-above", "10", "--json"])).await;
    let report = json(&out);
    // Over a 10-byte threshold it goes as zstd, and is still the same upload.
    assert_eq!(report[0]["compression"], "zstd", "{report}");
    assert_eq!(report[0]["is_idempotent"], true, "{report}");
    assert_eq!(gw.sources().await.len(), 3);
}
