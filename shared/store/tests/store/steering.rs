//! The store side of clients steering imports (cancel, dry runs, the webhook outbox), on
//! SQLite, on PostgreSQL (a fresh database per test on `ORBIT_TEST_POSTGRES_URL`) and on Citus
//! (a fresh schema per test on `ORBIT_TEST_CITUS_URL`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use orbit_core::domain::csv::{Dialect, TextEncoding};
use orbit_core::domain::header::ColumnMap;
use orbit_core::domain::row::{FailedRow, Issue, IssueCode, RecordDraft};
use orbit_core::model::*;
use orbit_store::Store;
use uuid::Uuid;

use crate::common::{chunk, tenant, LEASE};

orbit_testkit::conformance!(sqlite_backend => on_sqlite, postgres_backend => on_postgres, citus_backend => on_citus; {
    a_cancel_fails_the_source_keeps_what_committed_and_fences_the_rest,
    a_dry_run_keeps_counts_and_problems_but_writes_no_profile,
    an_ending_source_writes_one_delivery_per_subscribed_endpoint,
    a_leased_delivery_is_not_handed_out_twice_and_attempts_are_fenced,
    failed_attempts_in_a_row_disable_an_endpoint,
});

fn record(row: u64, email: &str) -> RecordDraft {
    RecordDraft {
        row_number: row,
        line_number: row + 1,
        fields: BTreeMap::from([("email", email.to_string())]),
        attributes: BTreeMap::new(),
        warnings: vec![],
    }
}

fn failed(row: u64) -> FailedRow {
    FailedRow {
        row_number: row,
        line_number: row + 1,
        fields: vec!["no-email".into(), "x".into()],
        error: Issue {
            code: IssueCode::MissingIdentifier,
            column: None,
            message: "the row has no email, phone or LinkedIn URL".into(),
            value: None,
        },
    }
}

fn upload(
    org: Uuid,
    dir: Uuid,
    dry_run: bool,
    sync: ChunkResults,
    sync_rows: u64,
    chunks: Vec<ChunkSpec>,
) -> NewUpload {
    let id = Uuid::now_v7();
    let total_rows = sync_rows + chunks.iter().map(|c| c.row_count).sum::<u64>();
    NewUpload {
        source: NewSource {
            id,
            organization_id: org,
            directory_id: dir,
            filename: "contacts.csv".into(),
            byte_size: 1234,
            sha256: "ab".repeat(32),
            compression: Compression::None,
            received_bytes: 1234,
            object_key: format!("sources/{org}/{id}.csv"),
            dialect: Dialect {
                encoding: TextEncoding::Utf8,
                delimiter: b',',
                bom_len: 0,
            },
            columns: ColumnMap::from_header(&["email".into(), "phone".into()], 10).unwrap(),
            max_field_bytes: 100,
            default_region: "GB".into(),
            dry_run,
            total_rows,
        },
        sync_chunk: (sync_rows > 0).then(|| chunk(0, 1, sync_rows)),
        sync_results: sync,
        chunks,
        idempotency: None,
        resumable: None,
        admission: None,
        traceparent: None,
        tracestate: None,
    }
}

/// A source of one row that completes inside its upload.
async fn completed_source(store: &dyn Store, org: Uuid, dir: Uuid, email: &str) -> Source {
    let sync = ChunkResults {
        accepted: vec![record(1, email)],
        failed: vec![],
    };
    let (source, _) = store
        .commit_upload(upload(org, dir, false, sync, 1, vec![]))
        .await
        .unwrap();
    assert_eq!(source.status, SourceStatus::Completed);
    source
}

async fn claim(store: &dyn Store, chunk: &ChunkRef) -> ChunkWork {
    match store.claim_chunk(chunk, "test", LEASE, 5).await.unwrap() {
        Claim::Claimed(work) => *work,
        other => panic!("expected a claim, got {other:?}"),
    }
}

fn endpoint(org: Uuid, dir: Option<Uuid>, events: &[&str]) -> WebhookEndpoint {
    WebhookEndpoint {
        id: Uuid::now_v7(),
        organization_id: org,
        directory_id: dir,
        url: "https://hooks.example/orbit".into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        secret: "whsec_c2VjcmV0".into(),
        failure_run: 0,
        disabled_at: None,
        created_at: chrono::DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap(),
    }
}

fn attempt(number: u32, status: u16) -> DeliveryAttempt {
    DeliveryAttempt {
        attempt: number,
        at: Utc::now(),
        status_code: Some(status),
        error: (status >= 300).then(|| format!("the endpoint answered {status}")),
        duration_ms: 3,
    }
}

async fn a_cancel_fails_the_source_keeps_what_committed_and_fences_the_rest(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let (other_org, _) = tenant(&*store).await;
    let (source, queued) = store
        .commit_upload(upload(
            org,
            dir,
            false,
            ChunkResults::default(),
            0,
            vec![chunk(0, 1, 4), chunk(1, 5, 4)],
        ))
        .await
        .unwrap();
    let work = claim(&*store, &queued[0]).await;
    let slice = ChunkResults {
        accepted: vec![record(1, "a@x.co"), record(2, "b@x.co")],
        failed: vec![],
    };
    let next = Resume {
        offset: 300,
        line: 4,
        row: 3,
    };
    let done = store
        .commit_slice(&work.lease, slice, SliceEnd::Before(next))
        .await
        .unwrap();
    assert_eq!(
        done,
        Committed::Done {
            source_completed: false
        }
    );
    assert!(matches!(
        store
            .cancel_source(other_org, dir, source.id)
            .await
            .unwrap(),
        Cancelled::NotFound
    ));
    let Cancelled::Cancelled(cancelled) = store.cancel_source(org, dir, source.id).await.unwrap()
    else {
        panic!("not cancelled");
    };
    assert_eq!(cancelled.status, SourceStatus::Failed);
    assert_eq!(cancelled.error.as_ref().unwrap().code, CANCELLED);
    assert_eq!(cancelled.processed_rows, 2, "the committed slice stays");
    assert!(cancelled.completed_at.is_some());
    // The worker holding the chunk finds it gone at its next commit; nobody takes the other.
    let rest = ChunkResults {
        accepted: vec![record(3, "c@x.co"), record(4, "d@x.co")],
        failed: vec![],
    };
    assert_eq!(
        store.commit_chunk(&work.lease, rest).await.unwrap(),
        Committed::LeaseLost
    );
    assert!(matches!(
        store
            .claim_chunk(&queued[1], "test", LEASE, 5)
            .await
            .unwrap(),
        Claim::Nothing
    ));
    let now = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((now.processed_rows, now.accepted), (2, 2));
    assert!(matches!(
        store.cancel_source(org, dir, source.id).await.unwrap(),
        Cancelled::Terminal(s) if s.status == SourceStatus::Failed
    ));
    // Resumable like any failed source.
    assert!(matches!(
        store.retry_source(org, dir, source.id).await.unwrap(),
        Retried::Reopened(_, chunks) if chunks.len() == 2
    ));
}

async fn a_dry_run_keeps_counts_and_problems_but_writes_no_profile(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let sync = ChunkResults {
        accepted: vec![record(1, "a@x.co"), record(3, "b@x.co")],
        failed: vec![failed(2)],
    };
    let (source, queued) = store
        .commit_upload(upload(org, dir, true, sync, 3, vec![chunk(1, 4, 2)]))
        .await
        .unwrap();
    assert!(source.dry_run);
    let work = claim(&*store, &queued[0]).await;
    assert!(work.source.dry_run, "workers see the flag");
    let rest = ChunkResults {
        accepted: vec![record(4, "c@x.co")],
        failed: vec![failed(5)],
    };
    assert_eq!(
        store.commit_chunk(&work.lease, rest).await.unwrap(),
        Committed::Done {
            source_completed: true
        }
    );
    let done = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, SourceStatus::Completed);
    assert_eq!((done.processed_rows, done.accepted, done.failed), (5, 3, 2));
    let page = PageRequest {
        after: None,
        limit: 100,
    };
    let profiles = store.list_profiles(org, dir, None, &page).await.unwrap();
    assert!(profiles.items.is_empty(), "a dry run wrote profiles");
    let issues = store.list_issues(org, dir, source.id, &page).await.unwrap();
    let rows: Vec<u64> = issues.items.iter().map(|i| i.row_number).collect();
    assert_eq!(rows, [2, 5]);
    assert_eq!(
        store
            .failed_rows(dir, source.id, 0, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    // The same rows imported for real are resolved as if the dry run never happened.
    completed_source(&*store, org, dir, "a@x.co").await;
    let profiles = store.list_profiles(org, dir, None, &page).await.unwrap();
    assert_eq!(profiles.items.len(), 1);
}

async fn an_ending_source_writes_one_delivery_per_subscribed_endpoint(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let other_dir = store.create_directory(org, "Other").await.unwrap().id;
    let (other_org, other_org_dir) = tenant(&*store).await;
    let everything = endpoint(org, None, &["source.completed", "source.failed"]);
    let this_dir = endpoint(org, Some(dir), &["source.completed"]);
    let failures_only = endpoint(org, None, &["source.failed"]);
    let elsewhere = endpoint(org, Some(other_dir), &["source.completed"]);
    let other_tenant = endpoint(other_org, None, &["source.completed"]);
    for e in [
        &everything,
        &this_dir,
        &failures_only,
        &elsewhere,
        &other_tenant,
    ] {
        store.create_webhook(e).await.unwrap();
    }
    assert_eq!(store.list_webhooks(org).await.unwrap().len(), 4);
    assert!(store
        .get_webhook(other_org, everything.id)
        .await
        .unwrap()
        .is_none());
    let source = completed_source(&*store, org, dir, "a@x.co").await;
    completed_source(&*store, other_org, other_org_dir, "z@x.co").await;
    let due = store.claim_deliveries(LEASE, 100).await.unwrap();
    let mut to: Vec<Uuid> = due.iter().map(|d| d.endpoint_id).collect();
    to.sort();
    let mut expected = vec![everything.id, this_dir.id, other_tenant.id];
    expected.sort();
    assert_eq!(to, expected);
    let mine = due.iter().find(|d| d.endpoint_id == everything.id).unwrap();
    assert_eq!(mine.attempts, 0);
    assert_eq!(mine.url, everything.url);
    assert_eq!(mine.secret, everything.secret);
    let event: serde_json::Value = serde_json::from_str(&mine.payload).unwrap();
    assert_eq!(event["type"], "source.completed");
    assert_eq!(event["data"]["source_id"], source.id.to_string());
    assert_eq!(event["data"]["source_status"], "completed");
    assert_eq!(event["data"]["accepted"], 1);
    assert!(event["timestamp"].is_string());
    // Failing a source (cancel is one way) writes source.failed events.
    let (pending, _) = store
        .commit_upload(upload(
            org,
            dir,
            false,
            ChunkResults::default(),
            0,
            vec![chunk(0, 1, 1)],
        ))
        .await
        .unwrap();
    store.cancel_source(org, dir, pending.id).await.unwrap();
    let due = store.claim_deliveries(LEASE, 100).await.unwrap();
    let mut to: Vec<Uuid> = due.iter().map(|d| d.endpoint_id).collect();
    to.sort();
    let mut expected = vec![everything.id, failures_only.id];
    expected.sort();
    assert_eq!(to, expected);
    let event: serde_json::Value = serde_json::from_str(&due[0].payload).unwrap();
    assert_eq!(event["type"], "source.failed");
    assert_eq!(event["data"]["error"]["code"], "cancelled");
    // Deleting an endpoint deletes its deliveries.
    assert!(store.delete_webhook(org, everything.id).await.unwrap());
    assert!(!store.delete_webhook(org, everything.id).await.unwrap());
    assert!(store
        .list_deliveries(org, everything.id, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn a_leased_delivery_is_not_handed_out_twice_and_attempts_are_fenced(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let hook = endpoint(org, None, &["source.completed"]);
    store.create_webhook(&hook).await.unwrap();
    for i in 0..40 {
        completed_source(&*store, org, dir, &format!("u{i}@x.co")).await;
    }
    // Four dispatchers at once share the outbox: no delivery is handed to two of them.
    let claims = (0..4).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { store.claim_deliveries(LEASE, 15).await.unwrap() })
    });
    let mut seen = HashSet::new();
    let mut total = 0;
    for claim in claims {
        for d in claim.await.unwrap() {
            total += 1;
            assert!(seen.insert(d.id), "{} handed out twice", d.id);
        }
    }
    assert_eq!(total, 40);
    assert!(store.claim_deliveries(LEASE, 100).await.unwrap().is_empty());

    // A lease that ran out makes the delivery due again; the old lease can record nothing.
    let (org2, dir2) = tenant(&*store).await;
    let hook2 = endpoint(org2, None, &["source.completed"]);
    store.create_webhook(&hook2).await.unwrap();
    completed_source(&*store, org2, dir2, "a@x.co").await;
    let first = store
        .claim_deliveries(Duration::from_millis(1), 100)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = store.claim_deliveries(LEASE, 100).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, first[0].id);
    store
        .record_attempt(&first[0], &attempt(1, 200), AttemptNext::Delivered, 10)
        .await
        .unwrap();
    let listed = store.list_deliveries(org2, hook2.id, 10).await.unwrap();
    assert_eq!(
        listed[0].state, "pending",
        "a stale lease recorded an attempt"
    );
    assert!(listed[0].attempts.is_empty());
    // The holder's failure schedules a retry; its success then delivers.
    let retry_at = Utc::now() - chrono::Duration::milliseconds(1);
    store
        .record_attempt(
            &second[0],
            &attempt(1, 500),
            AttemptNext::RetryAt(retry_at),
            10,
        )
        .await
        .unwrap();
    let third = store.claim_deliveries(LEASE, 100).await.unwrap();
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].attempts, 1);
    store
        .record_attempt(&third[0], &attempt(2, 204), AttemptNext::Delivered, 10)
        .await
        .unwrap();
    assert!(store.claim_deliveries(LEASE, 100).await.unwrap().is_empty());
    let listed = store.list_deliveries(org2, hook2.id, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    let d = &listed[0];
    assert_eq!(d.id, webhook_id(first[0].id));
    assert_eq!((d.state.as_str(), d.attempt_count), ("delivered", 2));
    assert!(d.delivered_at.is_some() && d.next_attempt_at.is_none());
    let codes: Vec<Option<u16>> = d.attempts.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, [Some(500), Some(204)]);
    assert!(store
        .list_deliveries(org, hook2.id, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn failed_attempts_in_a_row_disable_an_endpoint(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let hook = endpoint(org, None, &["source.completed"]);
    store.create_webhook(&hook).await.unwrap();
    let past = Utc::now() - chrono::Duration::milliseconds(1);
    completed_source(&*store, org, dir, "a@x.co").await;
    for n in 1..=2 {
        let due = store.claim_deliveries(LEASE, 10).await.unwrap();
        assert_eq!(due.len(), 1, "attempt {n}");
        store
            .record_attempt(&due[0], &attempt(n, 500), AttemptNext::RetryAt(past), 3)
            .await
            .unwrap();
    }
    let e = store.get_webhook(org, hook.id).await.unwrap().unwrap();
    assert_eq!((e.failure_run, e.disabled_at.is_some()), (2, false));
    let due = store.claim_deliveries(LEASE, 10).await.unwrap();
    store
        .record_attempt(&due[0], &attempt(3, 500), AttemptNext::GiveUp, 3)
        .await
        .unwrap();
    let e = store.get_webhook(org, hook.id).await.unwrap().unwrap();
    assert_eq!(e.failure_run, 3);
    assert!(
        e.disabled_at.is_some(),
        "disabled at the third failure in a row"
    );
    assert_eq!(
        store.list_deliveries(org, hook.id, 10).await.unwrap()[0].state,
        "failed"
    );
    // Disabled: its sources' ends write nothing for it.
    completed_source(&*store, org, dir, "b@x.co").await;
    assert!(store.claim_deliveries(LEASE, 10).await.unwrap().is_empty());
    assert_eq!(
        store.list_deliveries(org, hook.id, 10).await.unwrap().len(),
        1
    );
    let enabled = store.enable_webhook(org, hook.id).await.unwrap().unwrap();
    assert_eq!((enabled.failure_run, enabled.disabled_at), (0, None));
    completed_source(&*store, org, dir, "c@x.co").await;
    assert_eq!(store.claim_deliveries(LEASE, 10).await.unwrap().len(), 1);
}
