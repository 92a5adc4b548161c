//! `orbit export` against a real embedded gateway: the file it writes is the server's export,
//! the count is of profiles (not rows), and a failed export leaves no file behind.

use crate::common::{code, json, run, stderr, stdout, Gateway};

/// Ann holds two emails (the second joined her through her phone), so her profile is three
/// CSV rows; Bob and Cy one each.
const CONTACTS: &str = "\
email,phone,first_name,Team
ann@example.com,+14155552671,Ann,red
bob@example.com,,Bob,blue
ann.lee@example.com,+14155552671,,
cy@example.com,+14155552672,Cy,
";

#[tokio::test]
async fn export_writes_the_servers_file_and_counts_profiles() {
    let gw = Gateway::start().await;
    let file = gw.file("contacts.csv", CONTACTS);
    let out = run(&mut gw.orbit(&["upload", &file, "--poll-interval", "50ms"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let saved = gw.app.data.path().join("profiles.csv");
    let out = run(&mut gw.orbit(&["export", "-o", saved.to_str().unwrap()])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("wrote 3 profiles"),
        "{}",
        stderr(&out)
    );
    let direct = gw
        .http
        .get(gw.dir_url("/profiles/export?format=csv"))
        .bearer_auth(&gw.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let written = std::fs::read_to_string(&saved).unwrap();
    assert_eq!(written, direct);
    assert_eq!(written.lines().count(), 1 + 5, "{written}");
    assert!(!gw.app.data.path().join("profiles.csv.part").exists());

    // NDJSON on stdout, as JSON for scripts: the report goes to stdout after the lines.
    let out = run(&mut gw.orbit(&["export", "--format", "ndjson"])).await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[0]["identities"]["emails"].as_array().unwrap().len(),
        2
    );

    let out = run(&mut gw.orbit(&[
        "export",
        "--format",
        "ndjson",
        "--since",
        "2999-01-01T00:00:00Z",
        "-o",
        saved.to_str().unwrap(),
        "--json",
    ]))
    .await;
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["profiles"], 0);
    assert_eq!(std::fs::read_to_string(&saved).unwrap(), "");

    // A malformed time: the server's 400, exit 1, and no file under the name asked for.
    let bad = gw.app.data.path().join("bad.csv");
    let out = run(&mut gw.orbit(&[
        "export",
        "--since",
        "last week",
        "-o",
        bad.to_str().unwrap(),
    ]))
    .await;
    assert_ne!(code(&out), 0);
    assert!(stderr(&out).contains("updated_since"), "{}", stderr(&out));
    assert!(!bad.exists());
    assert!(!gw.app.data.path().join("bad.csv.part").exists());
}
