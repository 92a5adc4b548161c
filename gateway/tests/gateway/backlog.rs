//! Each organization's backlog on `/metrics`, on the distributed stack with no worker, so what
//! is uploaded stays queued: two organizations' uploads wait, the per-organization gauges name
//! the one waiting longest (`tenants.metrics_top` is 1 here) and sum the other under
//! `organization="other"`, and the unlabelled gauges count both.
//!
//! The gauges are process-wide and every test of this binary runs its own gateway, each
//! mirroring its own database: the test reads until one scrape shows its own organizations.

use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_organizations_waiting_longest_and_sum_the_rest() {
    let mut app = distributed_app(|s| {
        s.ingest.chunk_rows = 5;
        s.tenants.metrics_top = 1;
    })
    .await;
    // The first organization: 40 rows in 8 chunks, no row in the request.
    let first = app.upload_ok(contacts_csv(40, "first")).await;
    assert_eq!(first["source_status"], "pending", "{first}");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // A second organization, a second later: 10 rows in 2 chunks.
    let second = app.another_tenant().await;
    let response = app
        .client
        .post(app.url(&format!(
            "/v2/organizations/{}/directories/{}/sources/csv-upload",
            second.org, second.dir
        )))
        .bearer_auth(&second.token)
        .multipart(file_form(contacts_csv(10, "second")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    let org = app.tenant.org.to_string();
    let series = |name: &str, org: &str| format!(r#"{name}{{organization="{org}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = app.metrics().await;
        let ours = metric(&text, &series("orbit_organization_queued_rows", &org)) == Some(40.0)
            && metric(&text, &series("orbit_organization_queued_rows", "other")) == Some(10.0);
        if ours {
            break text;
        }
        assert!(Instant::now() < deadline, "no backlog of {org}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let get = |name: &str, org: &str| {
        metric(&text, &series(name, org)).unwrap_or_else(|| panic!("{name} {org} in\n{text}"))
    };
    assert_eq!(get("orbit_organization_ready_chunks", &org), 8.0);
    assert_eq!(get("orbit_organization_ready_chunks", "other"), 2.0);
    let (waited, other_waited) = (
        get("orbit_organization_wait_seconds", &org),
        get("orbit_organization_wait_seconds", "other"),
    );
    assert!(waited >= 1.0 && waited > other_waited, "{text}");
    // The second organization is summed, never named: the label set stays bounded.
    assert!(!text.contains(&second.org.to_string()), "{text}");
    assert_eq!(metric(&text, "orbit_organizations_waiting"), Some(2.0));
    assert_eq!(
        metric(&text, "orbit_organization_max_wait_seconds"),
        Some(waited)
    );
    app.stop().await;
}
