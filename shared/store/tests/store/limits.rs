//! Per-organization limits in the store: an organization's own values, and the admission of
//! uploads under them, on SQLite, PostgreSQL and Citus. The HTTP side (refusals, `Retry-After`,
//! two gateways at once) is gateway/tests/gateway/limits.rs.

use std::sync::Arc;
use std::time::Duration;

use orbit_store::limits::{Admission, LimitChange, LimitKind, LimitOverrides, UploadLimits};
use orbit_store::Store;
use uuid::Uuid;

use crate::common::tenant;

orbit_testkit::conformance!(sqlite_backend => on_sqlite, postgres_backend => on_postgres, citus_backend => on_citus; {
    an_organizations_values_are_set_kept_and_reset_field_by_field,
    streaming_admissions_count_in_flight_until_recorded_or_released,
    admissions_of_a_process_that_stopped_heartbeating_do_not_count,
    the_minute_counts_every_admission_that_was_not_released,
    concurrent_admissions_never_pass_the_limit,
});

const OPEN_FOR: Duration = Duration::from_secs(3600);

fn limits(in_flight: u64, rows: u64, per_minute: u64) -> UploadLimits {
    UploadLimits {
        max_uploads_in_flight: in_flight,
        max_queued_rows: rows,
        max_uploads_per_minute: per_minute,
    }
}

async fn admit(store: &dyn Store, org: Uuid, owner: &str, limits: &UploadLimits) -> Admission {
    store
        .admit_upload(org, owner, limits, OPEN_FOR)
        .await
        .unwrap()
}

fn admitted(admission: Admission) -> Uuid {
    match admission {
        Admission::Admitted(id) => id,
        refused => panic!("refused: {refused:?}"),
    }
}

fn refused_by(admission: Admission) -> LimitKind {
    match admission {
        Admission::Refused { limit, .. } => limit,
        Admission::Admitted(_) => panic!("admitted"),
    }
}

async fn an_organizations_values_are_set_kept_and_reset_field_by_field(store: Arc<dyn Store>) {
    let (org, _) = tenant(&*store).await;
    assert_eq!(
        store.organization_limits(org).await.unwrap(),
        LimitOverrides::default()
    );
    let set = store
        .set_organization_limits(
            org,
            &LimitChange {
                weight: Some(Some(3)),
                max_uploads_in_flight: Some(Some(0)),
                max_queued_rows: Some(Some(5_000_000_000)),
                ..LimitChange::default()
            },
        )
        .await
        .unwrap();
    let expected = LimitOverrides {
        weight: Some(3),
        max_uploads_in_flight: Some(0),
        max_queued_rows: Some(5_000_000_000),
        max_uploads_per_minute: None,
    };
    assert_eq!(set, expected);
    assert_eq!(store.organization_limits(org).await.unwrap(), expected);
    // A change names only what it changes; a reset goes back to the default.
    let changed = store
        .set_organization_limits(
            org,
            &LimitChange {
                max_queued_rows: Some(None),
                max_uploads_per_minute: Some(Some(10)),
                ..LimitChange::default()
            },
        )
        .await
        .unwrap();
    let expected = LimitOverrides {
        max_queued_rows: None,
        max_uploads_per_minute: Some(10),
        ..expected
    };
    assert_eq!(changed, expected);
    assert_eq!(store.organization_limits(org).await.unwrap(), expected);
    // Another organization's values are its own.
    let (other, _) = tenant(&*store).await;
    assert_eq!(
        store.organization_limits(other).await.unwrap(),
        LimitOverrides::default()
    );
}

async fn streaming_admissions_count_in_flight_until_recorded_or_released(store: Arc<dyn Store>) {
    let (org, _) = tenant(&*store).await;
    store
        .heartbeat("gw-a", Duration::from_secs(60))
        .await
        .unwrap();
    let two = limits(2, 0, 0);
    let first = admitted(admit(&*store, org, "gw-a", &two).await);
    let second = admitted(admit(&*store, org, "gw-a", &two).await);
    let refused = admit(&*store, org, "gw-a", &two).await;
    let Admission::Refused {
        limit,
        value,
        usage,
        retry_after,
    } = refused
    else {
        panic!("admitted past the limit")
    };
    assert_eq!(
        (limit, value, usage.uploads_in_flight),
        (LimitKind::UploadsInFlight, 2, 2)
    );
    assert!(retry_after >= Duration::from_secs(1));
    assert_eq!(
        store
            .organization_usage(org)
            .await
            .unwrap()
            .uploads_in_flight,
        2
    );
    // An upload that ended without a source gives its slot back.
    store.release_admission(first).await.unwrap();
    let third = admitted(admit(&*store, org, "gw-a", &two).await);
    // One whose source is recorded counts through the source from then on, not twice.
    store.upload_recorded(second).await.unwrap();
    assert_eq!(
        store
            .organization_usage(org)
            .await
            .unwrap()
            .uploads_in_flight,
        1
    );
    admitted(admit(&*store, org, "gw-a", &two).await);
    assert_eq!(
        refused_by(admit(&*store, org, "gw-a", &two).await),
        LimitKind::UploadsInFlight
    );
    store.release_admission(third).await.unwrap();
    // Another organization is not held back by this one.
    let (other, _) = tenant(&*store).await;
    admitted(admit(&*store, other, "gw-a", &limits(1, 0, 0)).await);
}

async fn admissions_of_a_process_that_stopped_heartbeating_do_not_count(store: Arc<dyn Store>) {
    let (org, _) = tenant(&*store).await;
    store
        .heartbeat("gw-live", Duration::from_secs(60))
        .await
        .unwrap();
    // A process whose heartbeat has already run out, as a gateway killed mid-upload.
    store.heartbeat("gw-dead", Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let one = limits(1, 0, 0);
    admitted(admit(&*store, org, "gw-dead", &one).await);
    admitted(admit(&*store, org, "gw-live", &one).await);
    assert_eq!(
        refused_by(admit(&*store, org, "gw-live", &one).await),
        LimitKind::UploadsInFlight
    );
    // A process never seen counts as gone too.
    let (other, _) = tenant(&*store).await;
    admitted(admit(&*store, other, "gw-unknown", &one).await);
    admitted(admit(&*store, other, "gw-live", &one).await);
}

async fn the_minute_counts_every_admission_that_was_not_released(store: Arc<dyn Store>) {
    let (org, _) = tenant(&*store).await;
    store
        .heartbeat("gw-a", Duration::from_secs(60))
        .await
        .unwrap();
    let two = limits(0, 0, 2);
    let first = admitted(admit(&*store, org, "gw-a", &two).await);
    store.upload_recorded(first).await.unwrap();
    let second = admitted(admit(&*store, org, "gw-a", &two).await);
    let Admission::Refused {
        limit,
        retry_after,
        usage,
        ..
    } = admit(&*store, org, "gw-a", &two).await
    else {
        panic!("admitted past the limit")
    };
    assert_eq!(limit, LimitKind::UploadsPerMinute);
    assert_eq!(usage.uploads_last_minute, 2);
    assert!(
        (Duration::from_secs(55)..=Duration::from_secs(60)).contains(&retry_after),
        "{retry_after:?}"
    );
    // A released admission (no source came of it) is not counted.
    store.release_admission(second).await.unwrap();
    admitted(admit(&*store, org, "gw-a", &two).await);
    assert_eq!(
        store
            .organization_usage(org)
            .await
            .unwrap()
            .uploads_last_minute,
        2
    );
}

async fn concurrent_admissions_never_pass_the_limit(store: Arc<dyn Store>) {
    let (org, _) = tenant(&*store).await;
    store
        .heartbeat("gw-a", Duration::from_secs(60))
        .await
        .unwrap();
    store
        .heartbeat("gw-b", Duration::from_secs(60))
        .await
        .unwrap();
    let five = limits(5, 0, 0);
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let store = store.clone();
            let owner = if i % 2 == 0 { "gw-a" } else { "gw-b" };
            tokio::spawn(async move { admit(&*store, org, owner, &five).await })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        if let Admission::Admitted(_) = task.await.unwrap() {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 5);
    assert_eq!(
        store
            .organization_usage(org)
            .await
            .unwrap()
            .uploads_in_flight,
        5
    );
}
