//! The gateway's own metrics, exactly. The counters are process-wide and this binary runs many
//! suites at once, so the test reads a gateway process of its own (`process::serve`). Rows handled inside the request count in `orbit_rows_total`, every
//! byte of an upload in `orbit_upload_bytes_total` (a rejected one too), and the process says
//! which build it runs and what it costs (`process_*`).

use crate::common::*;
use crate::process::{admin, data_dir, serve};
use reqwest::StatusCode;

fn value(text: &str, series: &str) -> f64 {
    metric(text, series).unwrap_or(0.0)
}

#[tokio::test]
async fn rows_of_the_request_bytes_received_build_and_process() {
    let data = data_dir().await;
    let (_, boot, _) = admin(data.path(), &["bootstrap"]).await;
    let (_gateway, base) = serve(data.path()).await;
    let client = reqwest::Client::new();
    let upload_url = format!(
        "{base}/v2/organizations/{}/directories/{}/sources/csv-upload",
        boot["organization_id"].as_str().unwrap(),
        boot["directory_id"].as_str().unwrap()
    );
    let token = boot["token"].as_str().unwrap();
    let upload = |csv: &'static str| {
        client
            .post(&upload_url)
            .bearer_auth(token)
            .multipart(file_form(csv))
            .send()
    };
    let metrics = || async {
        let response = client.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    };
    let before = metrics().await;
    let accepted = r#"orbit_rows_total{outcome="accepted"}"#;
    let failed = r#"orbit_rows_total{outcome="failed"}"#;

    // Handled inside the request (201): two rows accepted, one failed, no worker involved.
    let csv = "email,phone\nann@example.com,\nbob@example.com,\nno-email,\n";
    let response = upload(csv).await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    // Rejected (422): its bytes were received all the same.
    let rejected = "name\nAnn\n";
    let response = upload(rejected).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let after = metrics().await;
    assert_eq!(value(&after, accepted) - value(&before, accepted), 2.0);
    assert_eq!(value(&after, failed) - value(&before, failed), 1.0);
    assert_eq!(
        value(&after, "orbit_upload_bytes_total") - value(&before, "orbit_upload_bytes_total"),
        (csv.len() + rejected.len()) as f64,
        "{after}"
    );
    // The embedded queue never dead-letters.
    assert_eq!(metric(&after, "orbit_dead_letters"), Some(0.0), "{after}");

    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |out| String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        );
    let build = format!(
        r#"orbit_build_info{{commit="{commit}",version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric(&after, &build), Some(1.0), "{after}");
    for process in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(value(&after, process) > 0.0, "{process} in\n{after}");
    }
    assert!(
        metric(&after, "process_cpu_seconds_total").is_some(),
        "{after}"
    );
}
