//! The README's "A first upload" block, run as a newcomer would: the built `orbit-gateway`
//! started in a fresh directory on its defaults, then the block's commands, word for word,
//! in that directory (with the built binary for `cargo run --release -p orbit-gateway --` and
//! the gateway's port for 8080). Each step's output is checked, and the secret token must not
//! be left in any file of the directory but the database.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_orbit-gateway");
const README: &str = include_str!("../../../README.md");
const MARK: &str = "@@step ";

/// The first `sh` block after the heading `## A first upload`.
fn first_upload_block() -> &'static str {
    let section = README
        .split("\n## A first upload\n")
        .nth(1)
        .expect("the README has a first-upload section");
    let start = section.find("```sh\n").expect("an sh block") + "```sh\n".len();
    let len = section[start..].find("\n```").expect("the block ends");
    &section[start..start + len]
}

/// The block's commands, a continued line (`\`) kept with its command; comments and blank
/// lines dropped.
fn steps(block: &str) -> Vec<String> {
    let mut steps = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        if current.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if !line.ends_with('\\') {
            steps.push(std::mem::take(&mut current));
        }
    }
    steps
}

#[tokio::test]
async fn the_first_upload_block_works_from_a_fresh_directory() {
    let home = tempfile::tempdir().unwrap();
    let mut gateway = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("ORBIT") {
            gateway.env_remove(key);
        }
    }
    let mut gateway = gateway
        .current_dir(home.path())
        .env("ORBIT__HTTP__LISTEN", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway starts");
    let mut lines = BufReader::new(gateway.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let base = loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .expect("the banner within 60s")
            .unwrap()
            .expect("the gateway exited before listening");
        if let Some(rest) = line.split("Orbit is listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let steps = steps(first_upload_block());
    let mut script = String::from("set -euo pipefail\n");
    for (i, step) in steps.iter().enumerate() {
        script.push_str(&format!("echo '{MARK}{i}'\n"));
        script.push_str(
            &step
                .replace(
                    "cargo run --release -p orbit-gateway --",
                    &format!("'{BIN}'"),
                )
                .replace("http://127.0.0.1:8080", &base),
        );
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(home.path())
        .env_remove("ORBIT_CONFIG")
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // Each step's output, by the step's first words.
    let outputs: Vec<&str> = stdout.split(MARK).skip(1).collect();
    assert_eq!(outputs.len(), steps.len(), "{stdout}");
    let output = |starts: &str| -> &str {
        let i = steps
            .iter()
            .position(|s| s.starts_with(starts))
            .unwrap_or_else(|| panic!("no step starts with {starts:?}"));
        let text = outputs[i];
        text.split_once('\n').map_or("", |(_, rest)| rest)
    };
    let json = |starts: &str| -> Value {
        let text = output(starts);
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{starts}: {e}: {text}"))
    };

    // Bootstrap writes its JSON to the private file only, and says which database it used.
    assert_eq!(output("cargo run"), "", "bootstrap printed to stdout");
    let database = std::fs::canonicalize(home.path())
        .unwrap()
        .join("data/orbit.db");
    assert!(
        stderr.contains(&format!("database: {}", database.display()))
            || stderr.contains(&format!(
                "database: {}/data/orbit.db",
                home.path().display()
            )),
        "{stderr}"
    );
    for quiet in [
        "BOOT=", "ORG=", "DIR=", "TOKEN=", "API=", "printf", "SOURCE=",
    ] {
        assert_eq!(output(quiet), "", "{quiet} printed something");
    }

    let upload = output("curl -sS -i");
    let (head, body) = upload.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 201 Created"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nlocation: /v2/organizations/"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["source_status"], "completed", "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["failed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(body["is_idempotent"], false);
    let source = body["source_id"].as_str().unwrap().to_owned();

    let status = json("curl -sS -H \"Authorization: Bearer $TOKEN\" \"$API/sources/$SOURCE\"\n");
    assert_eq!(status["source_id"], source.as_str());
    assert_eq!(status["filename"], "contacts.csv");
    assert_eq!(status["total_rows"], 2);

    let errors =
        json("curl -sS -H \"Authorization: Bearer $TOKEN\" \"$API/sources/$SOURCE/errors\"");
    let issue = &errors["data"][0];
    assert_eq!(errors["data"].as_array().unwrap().len(), 1, "{errors}");
    assert_eq!(issue["code"], "missing_identifier", "{issue}");
    assert_eq!(
        (issue["row_number"].as_u64(), issue["line_number"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(issue["column"], "E-mail", "{issue}");

    let failed =
        output("curl -sS -H \"Authorization: Bearer $TOKEN\" \"$API/sources/$SOURCE/failed-rows\"");
    let mut failed_lines = failed.lines();
    assert_eq!(
        failed_lines.next(),
        Some("First Name,Last Name,E-mail,Phone,line_number,error_code,error_message")
    );
    let bob = failed_lines.next().unwrap_or_default();
    assert!(
        bob.starts_with("Bob,Ray,not-an-email,,3,missing_identifier,"),
        "{failed}"
    );

    let profiles = json("curl -sS -H \"Authorization: Bearer $TOKEN\" \"$API/profiles");
    let ann = &profiles["data"][0];
    assert_eq!(profiles["data"].as_array().unwrap().len(), 1, "{profiles}");
    assert_eq!(
        (ann["first_name"].as_str(), ann["email"].as_str()),
        (Some("Ann"), Some("ann@example.com"))
    );
    assert_eq!(ann["phone"], "+14155552671");

    // Nothing in the directory holds the token, but the database (as a hash).
    let token = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| l.contains("orb_"))
        .map(str::to_owned);
    assert!(token.is_none(), "the token was printed: {token:?}");
    assert!(!home.path().join("bootstrap.json").exists());
    let names: Vec<String> = std::fs::read_dir(home.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = names;
    names.sort();
    assert_eq!(
        names,
        ["contacts.csv", "data"],
        "files left in the directory"
    );
    gateway.kill().await.unwrap();
}
