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
    let response = app.upload_as(&second, contacts_csv(10, "second")).await;
    assert_eq!(response.status(), 202);

    let org = app.tenant.org.to_string();
    let second_org = second.org.to_string();
    // What one scrape must show; read again until one does (another test's gateway may have
    // refreshed the process's gauges from its own database in between).
    let check = |text: &str| -> Result<(), String> {
        let get = |name: &str, org: &str| {
            metric(text, &format!(r#"{name}{{organization="{org}"}}"#))
                .ok_or_else(|| format!("no {name} of {org}"))
        };
        let expect = |what: &str, got: f64, want: f64| match got == want {
            true => Ok(()),
            false => Err(format!("{what}: {got}, not {want}")),
        };
        expect(
            "queued rows",
            get("orbit_organization_queued_rows", &org)?,
            40.0,
        )?;
        expect(
            "others' rows",
            get("orbit_organization_queued_rows", "other")?,
            10.0,
        )?;
        expect(
            "ready chunks",
            get("orbit_organization_ready_chunks", &org)?,
            8.0,
        )?;
        expect(
            "others' chunks",
            get("orbit_organization_ready_chunks", "other")?,
            2.0,
        )?;
        let waited = get("orbit_organization_wait_seconds", &org)?;
        let other_waited = get("orbit_organization_wait_seconds", "other")?;
        if !(waited >= 1.0 && waited > other_waited) {
            return Err(format!("waits {waited} and {other_waited}"));
        }
        // The second organization is summed, never named: the label set stays bounded.
        if text.contains(&second_org) {
            return Err("the second organization is named".into());
        }
        expect(
            "waiting",
            metric(text, "orbit_organizations_waiting").unwrap_or(-1.0),
            2.0,
        )?;
        let longest = metric(text, "orbit_organization_max_wait_seconds").unwrap_or(-1.0);
        expect("longest wait", longest, waited)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = app.metrics().await;
        match check(&text) {
            Ok(()) => break,
            Err(why) => assert!(Instant::now() < deadline, "{why}:\n{text}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}
