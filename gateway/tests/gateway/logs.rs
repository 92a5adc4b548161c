//! The gateway's logs as an operator reads them: with `telemetry.log_format = "json"` every
//! line on stderr is a JSON object (start-up hints, access log, shutdown, a fatal error), no
//! password from a configured URL appears anywhere, every request leaves one access log line
//! with its route template and request id, and text logs carry no colour codes when stderr is
//! not a terminal. Runs `orbit-gateway` on PostgreSQL (with a password in its URL), S3 and
//! RabbitMQ.

use crate::common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use orbit_testkit::DistributedStack;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

const BIN: &str = env!("CARGO_BIN_EXE_orbit-gateway");

/// The stack's settings as variables, with a password put into the database URL (the test
/// server trusts loopback connections, so any password is accepted).
fn env_with_password(stack: &DistributedStack, password: &str) -> Vec<(String, String)> {
    let mut env = stack.env();
    for (key, value) in &mut env {
        if key == "ORBIT__DATABASE__URL" {
            *value = value.replacen("://postgres@", &format!("://postgres:{password}@"), 1);
            assert!(value.contains(password), "{value}");
        }
    }
    env
}

fn gateway(env: &[(String, String)], format: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.envs(env.iter().cloned())
        .env("ORBIT__HTTP__LISTEN", "127.0.0.1:0")
        .env("ORBIT__TELEMETRY__LOG_FORMAT", format)
        .env("ORBIT__INGEST__SYNC_ROWS", "2")
        .env("ORBIT__INGEST__CHUNK_ROWS", "2")
        .env_remove("RUST_LOG")
        .env_remove("ORBIT_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Every secret of the stack that must never be printed.
fn secrets(stack: &DistributedStack, password: &str) -> Vec<String> {
    let amqp = url::Url::parse(&stack.queue.url).unwrap();
    vec![
        password.to_owned(),
        format!(
            ":{}@",
            amqp.password().expect("the test broker URL has a password")
        ),
        stack.bucket.secret_key.clone(),
    ]
}

fn assert_clean(lines: &[String], secrets: &[String]) {
    for line in lines {
        for secret in secrets {
            assert!(
                !line.contains(secret.as_str()),
                "secret {secret:?} in {line}"
            );
        }
        assert!(!line.contains('\x1b'), "colour codes in {line:?}");
    }
}

fn parse_json_lines(lines: &[String]) -> Vec<Value> {
    assert!(!lines.is_empty(), "no log lines at all");
    lines
        .iter()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"))
        })
        .inspect(|event| assert!(event.is_object(), "{event}"))
        .collect()
}

async fn next_line(lines: &mut Lines<BufReader<ChildStderr>>, deadline: Instant) -> String {
    tokio::time::timeout_at(deadline.into(), lines.next_line())
        .await
        .expect("a log line in time")
        .expect("stderr readable")
        .expect("the gateway exited early")
}

async fn run_to_end(mut cmd: Command) -> (bool, Vec<String>, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("exits within 60s")
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    (
        out.status.success(),
        stderr.lines().map(str::to_owned).collect(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn access_lines(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["target"] == "orbit::access")
        .collect()
}

#[tokio::test]
async fn json_logs_are_json_redacted_and_have_an_access_line_per_request() {
    let stack = DistributedStack::create().await;
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let env = env_with_password(&stack, &password);
    let secrets = secrets(&stack, &password);

    let mut migrate = gateway(&env, "json");
    migrate.arg("migrate");
    let (ok, lines, _) = run_to_end(migrate).await;
    assert!(ok, "{lines:?}");
    assert_clean(&lines, &secrets);
    let events = parse_json_lines(&lines);
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "migrations applied"),
        "{lines:?}"
    );

    let mut admin = gateway(&env, "json");
    admin.args(["admin", "bootstrap"]);
    let (ok, lines, stdout) = run_to_end(admin).await;
    assert!(ok, "{lines:?}");
    let tenant: Value = serde_json::from_str(&stdout).expect("bootstrap prints JSON");

    let mut child: Child = gateway(&env, "json").spawn().expect("gateway starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let base = loop {
        let line = next_line(&mut stderr, deadline).await;
        lines.push(line.clone());
        let event: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        if event["fields"]["message"] == "Orbit is listening" {
            assert_eq!(
                event["fields"]["database"].as_str().unwrap(),
                env.iter()
                    .find(|(k, _)| k == "ORBIT__DATABASE__URL")
                    .unwrap()
                    .1
                    .replace(&password, "***"),
                "{line}"
            );
            break event["fields"]["url"].as_str().unwrap().to_owned();
        }
    };

    let client = reqwest::Client::new();
    // A sane client id is taken and echoed.
    let response = client
        .get(format!("{base}/healthz"))
        .header("x-request-id", "ops-test.42:a_b")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "ops-test.42:a_b");
    // An id too long or with odd characters is replaced with a fresh UUID, as is a missing one.
    let mut generated = Vec::new();
    for id in [Some("x".repeat(129)), Some("two words".to_owned()), None] {
        let mut request = client.get(format!("{base}/healthz"));
        if let Some(id) = &id {
            request = request.header("x-request-id", id.as_str());
        }
        let response = request.send().await.unwrap();
        let echoed = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(uuid::Uuid::parse_str(&echoed).is_ok(), "{echoed:?}");
        generated.push(echoed);
    }
    // A route with ids in its path, answered 404.
    let org = tenant["organization_id"].as_str().unwrap();
    let dir = tenant["directory_id"].as_str().unwrap();
    let missing = uuid::Uuid::new_v4();
    let response = client
        .get(format!(
            "{base}/v2/organizations/{org}/directories/{dir}/sources/{missing}"
        ))
        .bearer_auth(tenant["token"].as_str().unwrap())
        .header("x-request-id", "missing-source")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // An upload, whose own log lines carry its request id.
    let response = client
        .post(format!(
            "{base}/v2/organizations/{org}/directories/{dir}/sources/csv-upload"
        ))
        .bearer_auth(tenant["token"].as_str().unwrap())
        .header("x-request-id", "the-upload")
        .multipart(common::file_form(common::contacts_csv(5, "logs")))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());

    assert!(std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap()
        .success());
    let exit = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = stderr.next_line().await {
            lines.push(line);
        }
        child.wait().await
    })
    .await
    .expect("the gateway drains and exits within 60s")
    .unwrap();
    assert!(exit.success(), "{exit:?}: {lines:#?}");

    assert_clean(&lines, &secrets);
    let events = parse_json_lines(&lines);
    let access = access_lines(&events);
    assert_eq!(access.len(), 6, "one access line per request: {access:#?}");
    let by_id = |id: &str| {
        access
            .iter()
            .find(|e| e["fields"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}: {access:#?}"))
    };
    let health = by_id("ops-test.42:a_b");
    assert_eq!(health["fields"]["method"], "GET");
    assert_eq!(health["fields"]["route"], "/healthz");
    assert_eq!(health["fields"]["status"], 200);
    assert!(health["fields"]["latency_ms"].as_f64().unwrap() >= 0.0);
    for id in &generated {
        assert_eq!(by_id(id)["fields"]["route"], "/healthz");
    }
    let source = by_id("missing-source");
    assert_eq!(
        source["fields"]["route"],
        "/v2/organizations/{org}/directories/{dir}/sources/{source}"
    );
    assert_eq!(source["fields"]["status"], 404);
    assert!(
        !source.to_string().contains(&missing.to_string()),
        "{source}"
    );
    let upload = by_id("the-upload");
    assert_eq!(upload["fields"]["method"], "POST");
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "upload recorded"
                && e["span"]["request_id"] == "the-upload"),
        "the upload's own log line carries its request id: {lines:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"]
                == "shutting down: finishing in-flight requests and chunks"),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn a_failed_start_is_one_redacted_line_in_either_format() {
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    // An unsupported database, refused as the configuration loads (before logging is set up,
    // which must still give one JSON line): the error quotes the URL.
    let env = vec![(
        "ORBIT__DATABASE__URL".to_owned(),
        format!("mysql://orbit:{password}@127.0.0.1:3306/orbit"),
    )];
    let secrets = vec![password.clone()];

    let (ok, lines, _) = run_to_end(gateway(&env, "json")).await;
    assert!(!ok);
    assert_clean(&lines, &secrets);
    let events = parse_json_lines(&lines);
    let fatal = events.last().unwrap();
    assert_eq!(fatal["level"], "ERROR", "{fatal}");
    let error = fatal["fields"]["error"].as_str().unwrap();
    assert!(
        error.contains(
            "database.url \"mysql://orbit:***@127.0.0.1:3306/orbit\": unsupported scheme"
        ),
        "{error}"
    );

    let (ok, lines, _) = run_to_end(gateway(&env, "text")).await;
    assert!(!ok);
    assert_clean(&lines, &secrets);
    let last = lines.last().unwrap();
    assert!(
        last.starts_with("orbit-gateway: ")
            && last.contains(
                "database.url \"mysql://orbit:***@127.0.0.1:3306/orbit\": unsupported scheme"
            ),
        "{last}"
    );
}

#[tokio::test]
async fn text_logs_have_a_redacted_banner_and_no_colour_codes_on_a_pipe() {
    let stack = DistributedStack::create().await;
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let env = env_with_password(&stack, &password);
    let secrets = secrets(&stack, &password);
    let mut migrate = gateway(&env, "text");
    migrate.arg("migrate");
    let (ok, lines, _) = run_to_end(migrate).await;
    assert!(ok, "{lines:?}");
    assert_clean(&lines, &secrets);

    let mut child = gateway(&env, "text").spawn().expect("gateway starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    let base = loop {
        let line = next_line(&mut stderr, deadline).await;
        lines.push(line.clone());
        if let Some(rest) = line.split("Orbit is listening on ").nth(1) {
            assert!(
                line.contains("database: postgres://postgres:***@"),
                "{line}"
            );
            assert!(
                line.contains("queue: amqp://") && line.contains(":***@"),
                "{line}"
            );
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let response = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    child.start_kill().unwrap();
    while let Ok(Some(line)) = stderr.next_line().await {
        lines.push(line);
    }
    assert_clean(&lines, &secrets);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("orbit::access") && l.contains("route=\"/readyz\"")),
        "{lines:#?}"
    );
}
