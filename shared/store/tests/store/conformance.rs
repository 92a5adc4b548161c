//! One conformance suite for the `Store` trait, run against SQLite (a temporary file),
//! PostgreSQL (a fresh database per test on `ORBIT_TEST_POSTGRES_URL`, dropped afterwards) and
//! Citus (a fresh schema per test on `ORBIT_TEST_CITUS_URL`, dropped afterwards).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use orbit_core::domain::csv::{Dialect, TextEncoding};
use orbit_core::domain::header::ColumnMap;
use orbit_core::domain::row::{FailedRow, Issue, IssueCode, RecordDraft};
use orbit_core::model::*;
use orbit_store::Store;
use uuid::Uuid;

use crate::common::{chunk, tenant, LEASE};

orbit_testkit::conformance!(sqlite_backend => on_sqlite, postgres_backend => on_postgres, citus_backend => on_citus; {
    tenancy_is_scoped_by_organization,
    tokens_are_found_by_hash_and_revoked_once,
    idempotency_keys_claim_release_and_complete,
    an_upload_and_its_chunks_complete_the_source,
    an_upload_imported_whole_flags_its_duplicates_among_known_contacts,
    a_lost_lease_writes_nothing,
    a_chunk_commits_in_slices_and_a_takeover_resumes_after_the_last,
    a_chunk_out_of_attempts_fails_its_source,
    a_source_says_it_is_retrying_until_its_chunk_moves_again,
    the_reaper_finds_unpublished_and_abandoned_chunks,
    a_chunk_marked_unpublished_is_reaped_at_once,
    a_chunk_given_back_after_an_unanswered_claim_counts_no_attempt,
    failed_sources_are_counted_by_code,
    organizations_backlogs_are_read_longest_waiting_first,
    a_dead_processes_leases_are_void_before_they_expire,
    concurrent_chunks_never_split_an_identity,
    terminal_states_never_change,
    ready_chunks_are_each_directorys_oldest_and_passes_only_advance,
});

fn record(row: u64, fields: &[(&'static str, &str)]) -> RecordDraft {
    RecordDraft {
        row_number: row,
        line_number: row + 1,
        fields: fields.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        attributes: BTreeMap::from([(
            "note".to_string(),
            format!("row {row}\twith\\tab\nand newline"),
        )]),
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
            column: Some("email".into()),
            message: "the row has no email, phone or LinkedIn URL".into(),
            value: None,
        },
    }
}

fn new_upload(
    org: Uuid,
    dir: Uuid,
    total_rows: u64,
    sync: ChunkResults,
    sync_rows: u64,
    chunks: Vec<ChunkSpec>,
) -> NewUpload {
    let id = Uuid::now_v7();
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
            dry_run: false,
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

/// An upload with no synchronous prefix and one queued chunk of `rows` rows.
async fn one_chunk_upload(
    store: &dyn Store,
    org: Uuid,
    dir: Uuid,
    rows: u64,
) -> (Source, Vec<ChunkRef>) {
    store
        .commit_upload(new_upload(
            org,
            dir,
            rows,
            ChunkResults::default(),
            0,
            vec![chunk(0, 1, rows)],
        ))
        .await
        .unwrap()
}

/// An upload with no synchronous prefix and `n` queued chunks of one row each; their messages.
async fn one_row_chunks(store: &dyn Store, org: Uuid, dir: Uuid, n: u32) -> Vec<ChunkRef> {
    let chunks = (0..n).map(|i| chunk(i, u64::from(i) + 1, 1)).collect();
    store
        .commit_upload(new_upload(
            org,
            dir,
            u64::from(n),
            ChunkResults::default(),
            0,
            chunks,
        ))
        .await
        .unwrap()
        .1
}

async fn claim(store: &dyn Store, chunk: &ChunkRef) -> ChunkWork {
    match store.claim_chunk(chunk, "test", LEASE, 5).await.unwrap() {
        Claim::Claimed(work) => *work,
        other => panic!("expected a claim, got {other:?}"),
    }
}

async fn tenancy_is_scoped_by_organization(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let (other_org, _) = tenant(&*store).await;
    assert!(store.organization_exists(org).await.unwrap());
    assert!(!store.organization_exists(Uuid::new_v4()).await.unwrap());
    assert!(store.get_directory(org, dir).await.unwrap().is_some());
    assert!(store.get_directory(other_org, dir).await.unwrap().is_none());
    assert!(store
        .archive_directory(other_org, dir)
        .await
        .unwrap()
        .is_none());
    for i in 0..4 {
        store.create_directory(org, &format!("D{i}")).await.unwrap();
    }
    let first = store
        .list_directories(
            org,
            &PageRequest {
                after: None,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(first.items.len(), 3);
    let rest = store
        .list_directories(
            org,
            &PageRequest {
                after: first.next,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 2);
    assert!(rest.next.is_none());
    assert_eq!(
        store
            .list_directories(
                other_org,
                &PageRequest {
                    after: None,
                    limit: 10
                }
            )
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    let archived = store.archive_directory(org, dir).await.unwrap().unwrap();
    assert!(archived.archived);
    let again = store.archive_directory(org, dir).await.unwrap().unwrap();
    assert_eq!(
        again.archived_at, archived.archived_at,
        "archiving twice keeps the first time"
    );

    let (source, _) = store
        .commit_upload(new_upload(
            org,
            dir,
            1,
            ChunkResults {
                accepted: vec![record(1, &[("email", "a@x.co")])],
                failed: vec![],
            },
            1,
            vec![],
        ))
        .await
        .unwrap();
    assert!(store
        .get_source(other_org, dir, source.id)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .list_sources(
            other_org,
            dir,
            &PageRequest {
                after: None,
                limit: 10
            }
        )
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(store
        .list_issues(
            other_org,
            dir,
            source.id,
            &PageRequest {
                after: None,
                limit: 10
            }
        )
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(store
        .list_profiles(
            other_org,
            dir,
            None,
            &PageRequest {
                after: None,
                limit: 10
            }
        )
        .await
        .unwrap()
        .items
        .is_empty());
    let profile = store
        .list_profiles(
            org,
            dir,
            None,
            &PageRequest {
                after: None,
                limit: 10,
            },
        )
        .await
        .unwrap()
        .items
        .remove(0);
    assert!(store
        .get_profile(other_org, dir, profile.id)
        .await
        .unwrap()
        .is_none());
    exports_are_scoped_ordered_and_filtered(&*store, org, other_org, dir).await;
}

/// An export is the organization's only, yields what the list pages through in the same
/// order, names the attributes before the first profile, and filters on the update time.
async fn exports_are_scoped_ordered_and_filtered(
    store: &dyn Store,
    org: Uuid,
    other_org: Uuid,
    dir: Uuid,
) {
    use futures::TryStreamExt as _;
    use orbit_store::{ExportFilter, ExportedProfile};
    assert!(store
        .export_profiles(other_org, dir, &ExportFilter::default())
        .await
        .unwrap()
        .is_none());
    let export = store
        .export_profiles(org, dir, &ExportFilter::default())
        .await
        .unwrap()
        .unwrap();
    let listed = store
        .list_profiles(
            org,
            dir,
            None,
            &PageRequest {
                after: None,
                limit: 1000,
            },
        )
        .await
        .unwrap()
        .items;
    assert!(!listed.is_empty());
    assert_eq!(export.count as usize, listed.len());
    let mut names: Vec<String> = listed
        .iter()
        .flat_map(|p| p.state.attributes.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(export.attribute_names, names);
    let batches: Vec<Vec<ExportedProfile>> = export.batches.try_collect().await.unwrap();
    // Values as the list reads them, without versions, ranks or cleared values.
    let expected: Vec<ExportedProfile> = listed.iter().cloned().map(Into::into).collect();
    assert_eq!(batches.concat(), expected);

    let newest = listed.iter().map(|p| p.updated_at).max().unwrap();
    let later = ExportFilter {
        updated_since: Some(newest + chrono::Duration::milliseconds(1)),
    };
    let none = store
        .export_profiles(org, dir, &later)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(none.count, 0);
    assert!(none.attribute_names.is_empty());
    let batches: Vec<Vec<ExportedProfile>> = none.batches.try_collect().await.unwrap();
    assert!(batches.is_empty());
    let at = ExportFilter {
        updated_since: Some(newest),
    };
    let some = store.export_profiles(org, dir, &at).await.unwrap().unwrap();
    assert!(some.count >= 1);
}

async fn tokens_are_found_by_hash_and_revoked_once(store: Arc<dyn Store>) {
    let (org, _) = tenant(&*store).await;
    let user = store.ensure_user(org, "ops@example.com").await.unwrap();
    assert_eq!(
        store.ensure_user(org, "ops@example.com").await.unwrap(),
        user
    );
    store
        .insert_token(&[1, 2, 3], org, user, None)
        .await
        .unwrap();
    let found = store.find_token(&[1, 2, 3]).await.unwrap().unwrap();
    assert_eq!((found.organization_id, found.user_id), (org, user));
    assert!(found.revoked_at.is_none());
    assert!(store.find_token(&[9]).await.unwrap().is_none());
    assert!(store.revoke_token(&[1, 2, 3]).await.unwrap());
    assert!(!store.revoke_token(&[1, 2, 3]).await.unwrap());
    assert!(store
        .find_token(&[1, 2, 3])
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_some());
}

async fn idempotency_keys_claim_release_and_complete(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let ttl = Duration::from_secs(3600);
    let KeyState::Claimed(claim) = store
        .claim_idempotency_key(org, "k", dir, "gw", ttl, ttl)
        .await
        .unwrap()
    else {
        panic!("first claim")
    };
    assert!(matches!(
        store
            .claim_idempotency_key(org, "k", dir, "gw", ttl, ttl)
            .await
            .unwrap(),
        KeyState::InFlight
    ));
    // Another organization's same key is its own.
    let (other, other_dir) = tenant(&*store).await;
    assert!(matches!(
        store
            .claim_idempotency_key(other, "k", other_dir, "gw", ttl, ttl)
            .await
            .unwrap(),
        KeyState::Claimed(_)
    ));
    store.release_idempotency_key(&claim).await.unwrap();
    let KeyState::Claimed(claim) = store
        .claim_idempotency_key(org, "k", dir, "gw", ttl, ttl)
        .await
        .unwrap()
    else {
        panic!("claim after release")
    };
    // A stale in-flight claim is taken over, and the old claimant can no longer complete.
    let KeyState::Claimed(takeover) = store
        .claim_idempotency_key(org, "k", dir, "gw", ttl, Duration::ZERO)
        .await
        .unwrap()
    else {
        panic!("takeover")
    };
    let mut upload = new_upload(org, dir, 0, ChunkResults::default(), 0, vec![]);
    upload.idempotency = Some(claim);
    assert!(store.commit_upload(upload).await.is_err());
    // A claim whose process died is taken over as soon as its heartbeat expires, long before
    // the in-flight timeout; a live process's claim stands.
    store.heartbeat("crashing-gw", ttl).await.unwrap();
    let KeyState::Claimed(_) = store
        .claim_idempotency_key(org, "crash", dir, "crashing-gw", ttl, ttl)
        .await
        .unwrap()
    else {
        panic!("claim by a live process")
    };
    assert!(matches!(
        store
            .claim_idempotency_key(org, "crash", dir, "gw", ttl, ttl)
            .await
            .unwrap(),
        KeyState::InFlight
    ));
    store
        .heartbeat("crashing-gw", Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(
        store
            .claim_idempotency_key(org, "crash", dir, "gw", ttl, ttl)
            .await
            .unwrap(),
        KeyState::Claimed(_)
    ));
    let mut upload = new_upload(org, dir, 0, ChunkResults::default(), 0, vec![]);
    upload.idempotency = Some(takeover);
    let (source, _) = store.commit_upload(upload).await.unwrap();
    match store
        .claim_idempotency_key(org, "k", dir, "gw", ttl, ttl)
        .await
        .unwrap()
    {
        KeyState::Completed {
            directory_id,
            sha256,
            receipt,
        } => {
            assert_eq!(directory_id, dir);
            assert_eq!(sha256, source.sha256);
            assert_eq!(receipt.source_id, source.id);
            assert_eq!(receipt.source_status, SourceStatus::Completed);
        }
        other => panic!("expected completed, got {other:?}"),
    }
    // Past its TTL a completed key is forgotten.
    assert!(matches!(
        store
            .claim_idempotency_key(org, "k2", dir, "gw", Duration::ZERO, ttl)
            .await
            .unwrap(),
        KeyState::Claimed(_)
    ));
}

async fn an_upload_and_its_chunks_complete_the_source(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let sync = ChunkResults {
        accepted: vec![
            record(1, &[("email", "a@x.co")]),
            record(2, &[("email", "b@x.co")]),
        ],
        failed: vec![failed(3)],
    };
    let upload = new_upload(org, dir, 7, sync, 3, vec![chunk(1, 4, 2), chunk(2, 6, 2)]);
    let (source, queued) = store.commit_upload(upload).await.unwrap();
    assert_eq!(source.status, SourceStatus::Processing);
    assert_eq!(
        (source.accepted, source.failed, source.processed_rows),
        (2, 1, 3)
    );
    assert_eq!(queued.len(), 2);
    assert_eq!(store.count_pending_chunks().await.unwrap(), 2);

    let work = claim(&*store, &queued[0]).await;
    assert_eq!(work.chunk, chunk(1, 4, 2));
    assert_eq!(work.source.id, source.id);
    assert_eq!(
        (
            work.source.max_field_bytes,
            work.source.default_region.as_str()
        ),
        (100, "GB")
    );
    assert!(matches!(
        store
            .claim_chunk(&queued[0], "other", LEASE, 5)
            .await
            .unwrap(),
        Claim::Busy
    ));
    assert!(store.renew_lease(&work.lease, LEASE).await.unwrap());
    let results = ChunkResults {
        // Row 5 repeats row 1's email: flagged when the source completes.
        accepted: vec![
            record(4, &[("email", "c@x.co")]),
            record(5, &[("email", "a@x.co")]),
        ],
        failed: vec![],
    };
    assert_eq!(
        store.commit_chunk(&work.lease, results).await.unwrap(),
        Committed::Done {
            source_completed: false
        }
    );
    assert!(matches!(
        store
            .claim_chunk(&queued[0], "test", LEASE, 5)
            .await
            .unwrap(),
        Claim::Nothing
    ));

    let work = claim(&*store, &queued[1]).await;
    let results = ChunkResults {
        accepted: vec![record(6, &[("phone", "+14155552671")])],
        failed: vec![failed(7)],
    };
    assert_eq!(
        store.commit_chunk(&work.lease, results).await.unwrap(),
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
    assert_eq!(
        (
            done.accepted,
            done.failed,
            done.processed_rows,
            done.warnings
        ),
        (5, 2, 7, 1)
    );
    assert!(done.completed_at.is_some());
    let issues = store
        .list_issues(
            org,
            dir,
            source.id,
            &PageRequest {
                after: None,
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        issues
            .items
            .iter()
            .map(|i| i.row_number)
            .collect::<Vec<_>>(),
        [3, 5]
    );
    let rest = store
        .list_issues(
            org,
            dir,
            source.id,
            &PageRequest {
                after: issues.next,
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        rest.items
            .iter()
            .map(|i| (i.row_number, i.code.as_str()))
            .collect::<Vec<_>>(),
        [(7, "missing_identifier")]
    );
    let failed_rows = store.failed_rows(dir, source.id, 0, 10).await.unwrap();
    assert_eq!(
        failed_rows.iter().map(|f| f.row_number).collect::<Vec<_>>(),
        [3, 7]
    );
    assert_eq!(failed_rows[0].fields, ["no-email", "x"]);
    assert_eq!(store.failed_row_width(dir, source.id).await.unwrap(), 2);
    let profiles = store
        .list_profiles(
            org,
            dir,
            None,
            &PageRequest {
                after: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(profiles.items.len(), 4);
    let a = store
        .list_profiles(
            org,
            dir,
            Some("a@x.co"),
            &PageRequest {
                after: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(a.items.len(), 1);
    assert_eq!(
        a.items[0].identities,
        [("email".to_string(), "a@x.co".to_string())]
    );
    assert_eq!(
        a.items[0].state.attributes["note"].value,
        "row 5\twith\\tab\nand newline"
    );
    assert_eq!(store.count_pending_chunks().await.unwrap(), 0);
    let counts: HashMap<SourceStatus, u64> = store
        .count_sources_by_status()
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(counts[&SourceStatus::Completed], 1);
}

/// An upload imported whole inside its request is one commit, which flags its own repeated
/// rows: into a directory that knows its contacts (where PostgreSQL does not skip the scans for
/// that reason), each repeat is still flagged once, and only once.
async fn an_upload_imported_whole_flags_its_duplicates_among_known_contacts(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let rows = || ChunkResults {
        accepted: vec![
            record(1, &[("email", "a@x.co"), ("phone", "+14155552671")]),
            record(2, &[("email", "b@x.co")]),
            // Row 3 repeats row 1's email, row 4 row 2's.
            record(3, &[("email", "a@x.co")]),
            record(4, &[("email", "b@x.co")]),
        ],
        failed: vec![],
    };
    for round in ["first", "again"] {
        let (source, queued) = store
            .commit_upload(new_upload(org, dir, 4, rows(), 4, vec![]))
            .await
            .unwrap();
        assert!(queued.is_empty());
        assert_eq!(
            (source.status, source.accepted, source.warnings),
            (SourceStatus::Completed, 4, 2),
            "{round}: rows 3 and 4 are duplicates in the file"
        );
        let page = PageRequest {
            after: None,
            limit: 100,
        };
        let issues = store.list_issues(org, dir, source.id, &page).await.unwrap();
        let flagged: Vec<(u64, &str)> = issues
            .items
            .iter()
            .map(|i| (i.row_number, i.code.as_str()))
            .collect();
        assert_eq!(
            flagged,
            [(3, "duplicate_in_file"), (4, "duplicate_in_file")],
            "{round}"
        );
    }
}

async fn a_lost_lease_writes_nothing(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let (source, queued) = one_chunk_upload(&*store, org, dir, 1).await;
    // A lease that has already expired: another worker takes the chunk over.
    let zombie = match store
        .claim_chunk(&queued[0], "zombie", Duration::ZERO, 5)
        .await
        .unwrap()
    {
        Claim::Claimed(w) => *w,
        other => panic!("{other:?}"),
    };
    let live = claim(&*store, &queued[0]).await;
    assert_eq!(live.lease.attempt, 2);
    assert!(!store.renew_lease(&zombie.lease, LEASE).await.unwrap());
    let results = || ChunkResults {
        accepted: vec![record(1, &[("email", "z@x.co")])],
        failed: vec![],
    };
    assert_eq!(
        store.commit_chunk(&zombie.lease, results()).await.unwrap(),
        Committed::LeaseLost
    );
    let mid = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mid.accepted, 0, "the zombie's write was refused");
    assert!(
        !store
            .release_chunk(&zombie.lease, "failed late", None)
            .await
            .unwrap(),
        "the zombie's release finds its lease gone and leaves the live one alone"
    );
    assert_eq!(
        store.commit_chunk(&live.lease, results()).await.unwrap(),
        Committed::Done {
            source_completed: true
        }
    );
    // A late replay of the same lease changes nothing either.
    assert_eq!(
        store.commit_chunk(&live.lease, results()).await.unwrap(),
        Committed::LeaseLost
    );
    let done = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((done.accepted, done.processed_rows), (1, 1));
}

async fn a_chunk_commits_in_slices_and_a_takeover_resumes_after_the_last(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let (source, queued) = one_chunk_upload(&*store, org, dir, 5).await;
    let first = claim(&*store, &queued[0]).await;
    let slice = ChunkResults {
        accepted: vec![
            record(1, &[("email", "a@x.co")]),
            record(2, &[("email", "b@x.co")]),
        ],
        failed: vec![],
    };
    let resume = Resume {
        offset: 300,
        line: 4,
        row: 3,
    };
    assert_eq!(
        store
            .commit_slice(&first.lease, slice, SliceEnd::Before(resume))
            .await
            .unwrap(),
        Committed::Done {
            source_completed: false
        }
    );
    let mid = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (mid.status, mid.accepted, mid.processed_rows),
        (SourceStatus::Processing, 2, 2),
        "a committed slice shows in the source's progress"
    );

    // The attempt ends (a worker's death ends it the same way, once its lease is void); the
    // next claim is handed the part no slice committed.
    let zombie = first.lease.clone();
    store
        .release_chunk(&zombie, "worker killed", None)
        .await
        .unwrap();
    let next = claim(&*store, &queued[0]).await;
    assert_eq!(
        next.chunk,
        ChunkSpec {
            index: 0,
            first_row: 3,
            row_count: 3,
            start_offset: 300,
            end_offset: 600,
            start_line: 4,
        }
    );
    // The dead worker's next slice is refused.
    let late = ChunkResults {
        accepted: vec![record(3, &[("email", "late@x.co")])],
        failed: vec![],
    };
    assert_eq!(
        store
            .commit_slice(&zombie, late, SliceEnd::Chunk)
            .await
            .unwrap(),
        Committed::LeaseLost
    );
    let rest = ChunkResults {
        accepted: vec![
            record(3, &[("email", "c@x.co")]),
            record(4, &[("email", "a@x.co")]),
        ],
        failed: vec![failed(5)],
    };
    assert_eq!(
        store.commit_chunk(&next.lease, rest).await.unwrap(),
        Committed::Done {
            source_completed: true
        }
    );
    let done = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            done.status,
            done.accepted,
            done.failed,
            done.processed_rows,
            done.warnings
        ),
        (SourceStatus::Completed, 4, 1, 5, 1),
        "row 4 repeats row 1's email across slices: one duplicate warning"
    );
}

async fn a_source_says_it_is_retrying_until_its_chunk_moves_again(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let (source, queued) = one_chunk_upload(&*store, org, dir, 4).await;
    let get = || async {
        store
            .get_source(org, dir, source.id)
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(get().await.retrying, None);

    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    for error in [
        "object store error: connection refused",
        "object store error: timed out",
    ] {
        let work = claim(&*store, &queued[0]).await;
        assert!(store
            .release_chunk(&work.lease, error, Some(Duration::from_secs(600)))
            .await
            .unwrap());
    }
    let waiting = get().await;
    let retrying = waiting
        .retrying
        .expect("a chunk in a run of transient failures");
    assert_eq!(
        retrying.message, "object store error: timed out",
        "the last attempt's"
    );
    assert!(
        before <= retrying.since && retrying.since <= chrono::Utc::now(),
        "since the first failure of the run: {retrying:?}"
    );
    let page = store
        .list_sources(
            org,
            dir,
            &PageRequest {
                after: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        page.items[0].retrying.as_ref(),
        Some(&retrying),
        "the list says it too"
    );

    // The since of the run stays while it lasts, through a running retry.
    let work = claim(&*store, &queued[0]).await;
    assert_eq!(get().await.retrying.as_ref(), Some(&retrying));
    // A committed slice ends the run: the chunk is moving again.
    let slice = ChunkResults {
        accepted: vec![record(1, &[("email", "a@x.co")])],
        failed: vec![],
    };
    let resume = Resume {
        offset: 200,
        line: 3,
        row: 2,
    };
    store
        .commit_slice(&work.lease, slice, SliceEnd::Before(resume))
        .await
        .unwrap();
    assert_eq!(get().await.retrying, None);

    // A new run ends with the chunk, and a completed source never says it retries.
    store
        .release_chunk(
            &work.lease,
            "database error: pool timed out",
            Some(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    assert!(get().await.retrying.is_some());
    let last = claim(&*store, &queued[0]).await;
    let rest = ChunkResults {
        accepted: vec![
            record(2, &[("email", "b@x.co")]),
            record(3, &[("email", "c@x.co")]),
            record(4, &[("email", "d@x.co")]),
        ],
        failed: vec![],
    };
    store.commit_chunk(&last.lease, rest).await.unwrap();
    let done = get().await;
    assert_eq!(
        (done.status, done.retrying),
        (SourceStatus::Completed, None)
    );
}

async fn a_chunk_out_of_attempts_fails_its_source(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let (source, queued) = one_chunk_upload(&*store, org, dir, 1).await;
    // Transient failures (an outage) cost no attempt while they last less than the ceiling,
    // however many there are.
    for _ in 0..5 {
        let work = match store.claim_chunk(&queued[0], "w", LEASE, 2).await.unwrap() {
            Claim::Claimed(w) => *w,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            work.lease.attempt, 1,
            "transient failures gave their attempts back"
        );
        store
            .release_chunk(
                &work.lease,
                "object store error: Too many open files",
                Some(Duration::from_secs(600)),
            )
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let work = match store.claim_chunk(&queued[0], "w", LEASE, 2).await.unwrap() {
            Claim::Claimed(w) => *w,
            other => panic!("{other:?}"),
        };
        store
            .release_chunk(&work.lease, "the rows do not match the file", None)
            .await
            .unwrap();
    }
    assert!(matches!(
        store.claim_chunk(&queued[0], "w", LEASE, 2).await.unwrap(),
        Claim::Poisoned
    ));
    let failed = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.status, SourceStatus::Failed);
    let error = failed.error.unwrap();
    assert_eq!(error.code, "chunk_poisoned");
    assert!(
        error.message.contains("the rows do not match the file"),
        "{}",
        error.message
    );
    assert!(matches!(
        store.claim_chunk(&queued[0], "w", LEASE, 2).await.unwrap(),
        Claim::Nothing
    ));

    // Resumed: the failed chunk runs again with fresh attempts, and the source completes.
    let reopened = match store.retry_source(org, dir, source.id).await.unwrap() {
        Retried::Reopened(source, chunks) => {
            assert_eq!(
                chunks.iter().map(|c| c.chunk_id).collect::<Vec<_>>(),
                [queued[0].chunk_id]
            );
            source
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(reopened.status, SourceStatus::Processing);
    assert!(reopened.error.is_none());
    assert!(matches!(
        store.retry_source(org, dir, source.id).await.unwrap(),
        Retried::NotFailed(_)
    ));
    let work = claim(&*store, &queued[0]).await;
    assert_eq!(work.lease.attempt, 1);
    let results = ChunkResults {
        accepted: vec![record(1, &[("email", "resumed@x.co")])],
        failed: vec![],
    };
    assert_eq!(
        store.commit_chunk(&work.lease, results).await.unwrap(),
        Committed::Done {
            source_completed: true
        }
    );
    let done = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (done.status, done.accepted, done.processed_rows),
        (SourceStatus::Completed, 1, 1)
    );
    let (other_org, _) = tenant(&*store).await;
    assert!(matches!(
        store.retry_source(other_org, dir, source.id).await.unwrap(),
        Retried::NotFound
    ));
}

async fn the_reaper_finds_unpublished_and_abandoned_chunks(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let mut upload = new_upload(
        org,
        dir,
        2,
        ChunkResults::default(),
        0,
        vec![chunk(0, 1, 1), chunk(1, 2, 1)],
    );
    // The upload's trace context goes with every chunk it queued, to every later publish.
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    upload.traceparent = Some(traceparent.into());
    upload.tracestate = Some("vendor=opaque".into());
    let traced = |refs: &[ChunkRef]| {
        refs.iter().all(|c| {
            c.traceparent.as_deref() == Some(traceparent)
                && c.tracestate.as_deref() == Some("vendor=opaque")
        })
    };
    let (_, queued) = store.commit_upload(upload).await.unwrap();
    assert!(traced(&queued), "{queued:?}");
    let long = Duration::from_secs(3600);
    assert!(
        store.chunks_to_publish(long, 10).await.unwrap().is_empty(),
        "just published by the upload"
    );
    // Timestamps are in milliseconds: let one pass, or the upload's chunks were queued 0 ms
    // ago, which is not longer than a zero requeue_after (fast enough, SQLite got there).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = store.chunks_to_publish(Duration::ZERO, 10).await.unwrap();
    assert_eq!(again.len(), 2, "queued longer ago than requeue_after");
    assert!(traced(&again), "{again:?}");
    // A worker that died holding a lease: its chunk comes back once the lease expires.
    match store
        .claim_chunk(&queued[0], "dead", Duration::ZERO, 5)
        .await
        .unwrap()
    {
        Claim::Claimed(_) => {}
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let reaped = store.chunks_to_publish(long, 10).await.unwrap();
    assert_eq!(
        reaped.iter().map(|c| c.chunk_id).collect::<Vec<_>>(),
        [queued[0].chunk_id]
    );
    assert!(traced(&reaped), "{reaped:?}");
    assert_eq!(store.forget_queued().await.unwrap(), 2);
    assert_eq!(store.chunks_to_publish(long, 10).await.unwrap().len(), 2);
}

async fn a_chunk_marked_unpublished_is_reaped_at_once(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let queued = one_row_chunks(&*store, org, dir, 3).await;
    let long = Duration::from_secs(3600);
    assert!(store.chunks_to_publish(long, 10).await.unwrap().is_empty());
    // The publish of chunks 1 and 2 failed; chunk 0 is meanwhile claimed by a worker, whose
    // lease a stale mark must not undo.
    assert!(matches!(
        store
            .claim_chunk(&queued[0], "worker", long, 5)
            .await
            .unwrap(),
        Claim::Claimed(_)
    ));
    store.mark_unpublished(&queued).await.unwrap();
    let reaped: std::collections::HashSet<_> = store
        .chunks_to_publish(long, 10)
        .await
        .unwrap()
        .iter()
        .map(|c| c.chunk_id)
        .collect();
    assert_eq!(
        reaped,
        [queued[1].chunk_id, queued[2].chunk_id]
            .into_iter()
            .collect()
    );
    assert!(store.chunks_to_publish(long, 10).await.unwrap().is_empty());
}

async fn a_chunk_given_back_after_an_unanswered_claim_counts_no_attempt(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let queued = one_row_chunks(&*store, org, dir, 2).await;
    let long = Duration::from_secs(3600);
    // Chunk 0's claim went through but its answer was lost; chunk 1's never happened.
    let taken = claim(&*store, &queued[0]).await;
    assert_eq!(taken.lease.attempt, 1);
    // Another process's give-back does not touch a lease it does not hold.
    store.give_back(&queued[0], "other").await.unwrap();
    assert!(matches!(
        store
            .claim_chunk(&queued[0], "thief", long, 5)
            .await
            .unwrap(),
        Claim::Busy
    ));
    for chunk in &queued {
        store.give_back(chunk, "test").await.unwrap();
    }
    let reaped = store.chunks_to_publish(long, 10).await.unwrap();
    assert_eq!(reaped.len(), 2, "{reaped:?}");
    // The lease is gone and its attempt given back: the next claim is the first.
    let again = claim(&*store, &queued[0]).await;
    assert_eq!(again.lease.attempt, 1);
}

async fn failed_sources_are_counted_by_code(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    assert!(store
        .count_failed_sources_by_code()
        .await
        .unwrap()
        .is_empty());
    let mut sources = Vec::new();
    for _ in 0..3 {
        let (source, _) = store
            .commit_upload(new_upload(
                org,
                dir,
                1,
                ChunkResults::default(),
                0,
                vec![chunk(0, 1, 1)],
            ))
            .await
            .unwrap();
        sources.push(source.id);
    }
    for (source, code) in sources
        .iter()
        .zip(["object_missing", "object_missing", "chunk_poisoned"])
    {
        let error = SourceError {
            code: code.into(),
            message: "gone".into(),
        };
        store.fail_source(dir, *source, error).await.unwrap();
    }
    let mut counts = store.count_failed_sources_by_code().await.unwrap();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("chunk_poisoned".to_owned(), 1),
            ("object_missing".to_owned(), 2)
        ]
    );
}

/// The per-organization backlog behind the gauges: rows queued, chunks ready and how long each
/// organization has waited, the longest waits one by one and the rest summed.
async fn organizations_backlogs_are_read_longest_waiting_first(store: Arc<dyn Store>) {
    use orbit_store::backlog::BacklogRest;
    let secs = |d: Duration| d.as_secs_f64();
    // A waits longest: three ready chunks of 10 rows, uploaded first.
    let (a, a_dir) = tenant(&*store).await;
    let a_chunks = (0..3)
        .map(|i| chunk(i, 10 * u64::from(i) + 1, 10))
        .collect();
    let (_, a_queued) = store
        .commit_upload(new_upload(
            a,
            a_dir,
            30,
            ChunkResults::default(),
            0,
            a_chunks,
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // B: two ready chunks of 5 rows, over a second later.
    let (b, b_dir) = tenant(&*store).await;
    store
        .commit_upload(new_upload(
            b,
            b_dir,
            10,
            ChunkResults::default(),
            0,
            vec![chunk(0, 1, 5), chunk(1, 6, 5)],
        ))
        .await
        .unwrap();
    // C: unfinished but nothing ready, its one chunk running.
    let (c, c_dir) = tenant(&*store).await;
    let (_, c_queued) = one_chunk_upload(&*store, c, c_dir, 7).await;
    claim(&*store, &c_queued[0]).await;
    // D: done, so absent.
    let (d, d_dir) = tenant(&*store).await;
    let (_, d_queued) = one_chunk_upload(&*store, d, d_dir, 1).await;
    let work = claim(&*store, &d_queued[0]).await;
    let results = ChunkResults {
        accepted: vec![record(1, &[("email", "d@x.co")])],
        failed: vec![],
    };
    store.commit_chunk(&work.lease, results).await.unwrap();

    // A minute on, the top one is A; B and C are summed.
    let later = chrono::Utc::now() + chrono::Duration::seconds(60);
    let backlog = store.organization_backlog(later, 1).await.unwrap();
    assert_eq!(backlog.top.len(), 1, "{backlog:?}");
    let top = &backlog.top[0];
    assert_eq!(
        (top.organization_id, top.queued_rows, top.ready_chunks),
        (a, 30, 3)
    );
    assert!(
        (61.0..75.0).contains(&secs(top.wait)),
        "since A's upload: {backlog:?}"
    );
    assert_eq!(
        (
            backlog.rest.organizations,
            backlog.rest.queued_rows,
            backlog.rest.ready_chunks
        ),
        (2, 17, 2),
        "B's 10 rows and C's 7"
    );
    assert!(
        (60.0..secs(top.wait) - 1.0).contains(&secs(backlog.rest.max_wait)),
        "B's wait: {backlog:?}"
    );
    assert_eq!((backlog.waiting, backlog.max_wait), (2, top.wait));

    // Every one of them: C last, with nothing ready and so no wait.
    let all = store.organization_backlog(later, 10).await.unwrap();
    let ids: Vec<_> = all.top.iter().map(|o| o.organization_id).collect();
    assert_eq!(ids, [a, b, c], "{all:?}");
    assert_eq!(
        (
            all.top[2].queued_rows,
            all.top[2].ready_chunks,
            all.top[2].wait
        ),
        (7, 0, Duration::ZERO)
    );
    assert_eq!(all.rest, BacklogRest::default());

    // A worker serves A: a slice commits, then the chunk fails and backs off. A has waited
    // only since then, so B is now the one waiting longest; A's chunk in its backoff is not
    // ready until the backoff ends.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before_release = chrono::Utc::now();
    let work = claim(&*store, &a_queued[0]).await;
    let slice = ChunkResults {
        accepted: vec![record(1, &[("email", "a@x.co")])],
        failed: vec![],
    };
    let resume = Resume {
        offset: 200,
        line: 3,
        row: 2,
    };
    store
        .commit_slice(&work.lease, slice, SliceEnd::Before(resume))
        .await
        .unwrap();
    assert!(store
        .release_chunk(&work.lease, "object store error: timed out", Some(LEASE))
        .await
        .unwrap());
    let now = store
        .organization_backlog(before_release, 10)
        .await
        .unwrap();
    let a_now = now.top.iter().find(|o| o.organization_id == a).unwrap();
    assert_eq!((a_now.queued_rows, a_now.ready_chunks), (29, 2), "{now:?}");
    let backlog = store.organization_backlog(later, 1).await.unwrap();
    assert_eq!(backlog.top[0].organization_id, b, "{backlog:?}");
    assert!(
        (59.0..61.0).contains(&secs(backlog.rest.max_wait)),
        "A waits since its slice: {backlog:?}"
    );
    assert_eq!((backlog.rest.ready_chunks, backlog.waiting), (3, 2));
}

async fn a_dead_processes_leases_are_void_before_they_expire(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let queued = one_row_chunks(&*store, org, dir, 2).await;
    let long = Duration::from_secs(3600);
    store.heartbeat("alive", long).await.unwrap();
    store.heartbeat("doomed", long).await.unwrap();
    for (chunk, owner) in [(&queued[0], "alive"), (&queued[1], "doomed")] {
        assert!(matches!(
            store.claim_chunk(chunk, owner, long, 5).await.unwrap(),
            Claim::Claimed(_)
        ));
    }
    // Both leases run for an hour, and both owners are alive: nobody else may take them, and
    // the reaper leaves them alone.
    for c in &queued {
        assert!(matches!(
            store.claim_chunk(c, "thief", long, 5).await.unwrap(),
            Claim::Busy
        ));
    }
    assert!(store.chunks_to_publish(long, 10).await.unwrap().is_empty());
    // "doomed" dies: its last heartbeat runs out (a heartbeat valid for no time at all), and
    // its lease is void at once, long before it expires. A process that has no row at all
    // (it never heartbeated) is judged by its lease alone.
    store.heartbeat("doomed", Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let reaped = store.chunks_to_publish(long, 10).await.unwrap();
    assert_eq!(
        reaped.iter().map(|c| c.chunk_id).collect::<Vec<_>>(),
        [queued[1].chunk_id]
    );
    assert!(matches!(
        store
            .claim_chunk(&queued[0], "thief", long, 5)
            .await
            .unwrap(),
        Claim::Busy
    ));
    match store
        .claim_chunk(&queued[1], "heir", long, 5)
        .await
        .unwrap()
    {
        Claim::Claimed(work) => assert_eq!(work.lease.attempt, 2),
        other => panic!("expected a takeover, got {other:?}"),
    }
    // A process that exits cleanly retires; retiring twice is harmless.
    store.retire("alive").await.unwrap();
    store.retire("alive").await.unwrap();
}

async fn concurrent_chunks_never_split_an_identity(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    const CHUNKS: u64 = 8;
    const ROWS: u64 = 50;
    let chunks: Vec<ChunkSpec> = (0..CHUNKS)
        .map(|i| chunk(i as u32, 1 + i * ROWS, ROWS))
        .collect();
    let (source, queued) = store
        .commit_upload(new_upload(
            org,
            dir,
            CHUNKS * ROWS,
            ChunkResults::default(),
            0,
            chunks,
        ))
        .await
        .unwrap();
    // Every chunk holds the same 50 people, each by email in even chunks and by phone plus
    // email in odd ones: 8 workers race to create and merge the same profiles.
    let mut tasks = Vec::new();
    for (i, message) in queued.into_iter().enumerate() {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let work = claim(&*store, &message).await;
            let first = 1 + i as u64 * ROWS;
            let accepted = (0..ROWS)
                .map(|p| {
                    let email = format!("p{p}@x.co");
                    let phone = format!("+1415555{:04}", p);
                    if i % 2 == 0 {
                        record(first + p, &[("email", &email)])
                    } else {
                        record(first + p, &[("email", &email), ("phone", &phone)])
                    }
                })
                .collect();
            store
                .commit_chunk(
                    &work.lease,
                    ChunkResults {
                        accepted,
                        failed: vec![],
                    },
                )
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        assert!(matches!(task.await.unwrap(), Committed::Done { .. }));
    }
    let done = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, SourceStatus::Completed);
    assert_eq!(done.accepted, CHUNKS * ROWS);
    assert_eq!(
        done.warnings,
        (CHUNKS - 1) * ROWS,
        "every repeat is a duplicate_in_file"
    );
    let mut all = Vec::new();
    let mut page = PageRequest {
        after: None,
        limit: 1000,
    };
    loop {
        let p = store.list_profiles(org, dir, None, &page).await.unwrap();
        all.extend(p.items);
        match p.next {
            Some(next) => page.after = Some(next),
            None => break,
        }
    }
    assert_eq!(all.len(), ROWS as usize, "one profile per person");
    for profile in &all {
        assert_eq!(profile.identities.len(), 2, "{:?}", profile.identities);
    }
}

async fn ready_chunks_are_each_directorys_oldest_and_passes_only_advance(store: Arc<dyn Store>) {
    use orbit_core::domain::fair::{Advance, SERVICE};
    let (org_a, dir_a) = tenant(&*store).await;
    let (org_b, dir_b) = tenant(&*store).await;
    let a = one_row_chunks(&*store, org_a, dir_a, 3).await;
    let b = one_row_chunks(&*store, org_b, dir_b, 2).await;
    let heavier = orbit_store::limits::LimitChange {
        weight: Some(Some(3)),
        ..Default::default()
    };
    store
        .set_organization_limits(org_b, &heavier)
        .await
        .unwrap();
    let ready = |store: Arc<dyn Store>| async move {
        let mut ready = store.ready_chunks(1).await.unwrap();
        ready.sort_by_key(|r| r.waiting.organization == org_b);
        ready
    };
    let found = ready(store.clone()).await;
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(
        (
            found[0].waiting.organization,
            found[0].chunk.chunk_id,
            found[0].rows
        ),
        (org_a, a[0].chunk_id, 1)
    );
    assert_eq!(found[1].chunk.chunk_id, b[0].chunk_id);
    // The default weight, unless the organization has its own.
    assert_eq!((found[0].waiting.weight, found[1].waiting.weight), (1, 3));
    // A claimed chunk is not ready; the directory's next one is.
    claim(&*store, &a[0]).await;
    let found = ready(store.clone()).await;
    assert_eq!(found[0].chunk.chunk_id, a[1].chunk_id);
    // A directory whose chunks are all taken is not waiting.
    claim(&*store, &b[0]).await;
    claim(&*store, &b[1]).await;
    let found = ready(store.clone()).await;
    assert_eq!(found.len(), 1, "{found:?}");

    let advance = |id, floor, charge, vtime_floor| Advance {
        id,
        floor,
        charge,
        vtime_floor,
    };
    assert!(store.passes(&[org_a]).await.unwrap().is_empty());
    store
        .advance_passes(&[advance(org_a, 5.0, 1.0, 2.0)])
        .await
        .unwrap();
    // Below its floor a pass is lifted to it; above, the charge adds; a vtime only rises.
    store
        .advance_passes(&[
            advance(org_a, 0.0, 0.5, 1.0),
            advance(SERVICE, f64::MIN, 0.0, 3.0),
        ])
        .await
        .unwrap();
    let passes = store.passes(&[org_a, org_b, SERVICE]).await.unwrap();
    assert_eq!(passes.len(), 2, "{passes:?}");
    assert_eq!((passes[&org_a].pass, passes[&org_a].vtime), (6.5, 2.0));
    assert_eq!(passes[&SERVICE].vtime, 3.0);
}

async fn terminal_states_never_change(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let (source, _) = store
        .commit_upload(new_upload(
            org,
            dir,
            1,
            ChunkResults {
                accepted: vec![record(1, &[("email", "a@x.co")])],
                failed: vec![],
            },
            1,
            vec![],
        ))
        .await
        .unwrap();
    assert_eq!(source.status, SourceStatus::Completed);
    store
        .fail_source(
            dir,
            source.id,
            SourceError {
                code: "object_missing".into(),
                message: "gone".into(),
            },
        )
        .await
        .unwrap();
    let after = store
        .get_source(org, dir, source.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.status, SourceStatus::Completed);
    assert!(after.error.is_none());
    assert_eq!(after.completed_at, source.completed_at);
}

/// On Citus, every transaction of the ingest path reaches the one worker node that holds its
/// directory: an upload with its synchronous rows, each claim, and each chunk commit (the
/// last one completing the source), for a directory on each node. With
/// `citus.log_remote_commands` the coordinator tells the session every command it sends to a
/// node, naming the shards; where Citus placed each shard says which node that was.
#[tokio::test]
async fn on_citus_every_ingest_transaction_reaches_one_worker_node() {
    use sqlx::{Connection, Row};

    let database = orbit_testkit::TestDatabase::citus().await;
    let commands = RemoteCommands::global();
    let logged = format!(
        "{}&options=-c%20citus.log_remote_commands%3Don%20-c%20client_min_messages%3Dlog",
        database.url
    );
    let store = orbit_store::open(&orbit_config::DatabaseSettings::for_url(&logged, 4))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let mut db = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let node_of_shard: HashMap<i64, i32> = sqlx::query(
        "SELECT shardid, nodeport FROM citus_shards WHERE citus_table_type = 'distributed'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let org = store.create_organization("citus").await.unwrap().id;
    let mut directories = BTreeMap::new();
    while directories.len() < 2 {
        let dir = store.create_directory(org, "placed").await.unwrap().id;
        let node: i32 = sqlx::query(
            "SELECT nodeport FROM citus_shards WHERE table_name = 'sources'::regclass
               AND shardid = get_shard_id_for_distribution_column('sources', $1)",
        )
        .bind(dir)
        .fetch_one(&mut db)
        .await
        .unwrap()
        .get(0);
        directories.entry(node).or_insert(dir);
    }
    for (node, dir) in directories {
        let nodes = |what: &str| {
            let reached = commands.nodes(&node_of_shard, what);
            assert_eq!(
                reached,
                [node].into(),
                "{what} in a directory on node {node}"
            );
        };
        commands.clear();
        let rows = |first: u64| {
            (first..first + 3)
                .map(|r| record(r, &[("email", &format!("{r}@{dir}.co"))]))
                .collect()
        };
        let sync = ChunkResults {
            accepted: rows(1),
            failed: vec![failed(4)],
        };
        let (_, queued) = store
            .commit_upload(new_upload(
                org,
                dir,
                10,
                sync,
                4,
                vec![chunk(1, 5, 3), chunk(2, 8, 3)],
            ))
            .await
            .unwrap();
        nodes("the upload");
        for (i, message) in queued.iter().enumerate() {
            let work = claim(&*store, message).await;
            nodes("a claim");
            let results = ChunkResults {
                accepted: rows(5 + 3 * i as u64),
                failed: vec![],
            };
            let committed = store.commit_chunk(&work.lease, results).await.unwrap();
            nodes("a chunk commit");
            assert_eq!(
                committed,
                Committed::Done {
                    source_completed: i == 1
                }
            );
        }
    }
}

/// What the coordinator said it sent to worker nodes, as the session's log notices arrive.
#[derive(Clone, Default)]
struct RemoteCommands(Arc<std::sync::Mutex<Vec<String>>>);

impl RemoteCommands {
    /// The process-wide collector. sqlx reports notices as tracing events wherever the
    /// connection's task runs, and a subscriber scoped to this test's thread missed them while
    /// other tests ran: this one is every thread's. Only this test's sessions log remote
    /// commands, so only its commands are collected.
    fn global() -> RemoteCommands {
        static GLOBAL: std::sync::OnceLock<RemoteCommands> = std::sync::OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                use tracing_subscriber::layer::SubscriberExt;
                let commands = RemoteCommands::default();
                tracing::subscriber::set_global_default(
                    tracing_subscriber::registry().with(commands.clone()),
                )
                .expect("no other global subscriber in the store's tests");
                commands
            })
            .clone()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// The nodes the commands since the last `clear` reached, by the shards they name
    /// (`<table>_<shard id>`).
    fn nodes(
        &self,
        node_of_shard: &HashMap<i64, i32>,
        what: &str,
    ) -> std::collections::BTreeSet<i32> {
        let commands = std::mem::take(&mut *self.0.lock().unwrap());
        assert!(!commands.is_empty(), "{what}: no command reached a node");
        commands
            .iter()
            .flat_map(|c| c.split(|ch: char| !ch.is_ascii_alphanumeric() && ch != '_'))
            .filter_map(|word| word.rsplit_once('_')?.1.parse::<i64>().ok())
            .filter_map(|shard| node_of_shard.get(&shard).copied())
            .collect()
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RemoteCommands {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(Option<String>);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = Some(format!("{value:?}"));
                }
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "message" {
                    self.0 = Some(value.to_owned());
                }
            }
        }
        if event.metadata().target() != "sqlx::postgres::notice" {
            return;
        }
        let mut message = Message(None);
        event.record(&mut message);
        if let Some(m) = message.0.filter(|m| m.starts_with("issuing ")) {
            self.0.lock().unwrap().push(m);
        }
    }
}

/// On PostgreSQL, a source of at least `database.analyze_after_rows` rows, completed by a
/// chunk's commit, leaves the tables it wrote analyzed soon after: the planner's row count for
/// `profiles` becomes the table's (`pg_class.reltuples`, which `ANALYZE` sets). A smaller one
/// leaves them to autovacuum, off on the test server.
#[tokio::test]
async fn on_postgres_a_large_source_completed_leaves_its_tables_analyzed() {
    use sqlx::Connection;

    let database = orbit_testkit::TestDatabase::create().await;
    let mut settings = orbit_config::DatabaseSettings::for_url(&database.url, 4);
    settings.analyze_after_rows = 3;
    let store = orbit_store::open(&settings).await.unwrap();
    store.migrate().await.unwrap();
    let mut db = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let (org, dir) = tenant(&*store).await;
    let mut ingested = 0;
    for rows in [2, 3] {
        let (_, queued) = one_chunk_upload(&*store, org, dir, rows).await;
        let work = claim(&*store, &queued[0]).await;
        let accepted = (1..=rows)
            .map(|r| record(r, &[("email", &format!("{r}-of-{rows}@x.co"))]))
            .collect();
        let results = ChunkResults {
            accepted,
            failed: vec![],
        };
        assert_eq!(
            store.commit_chunk(&work.lease, results).await.unwrap(),
            Committed::Done {
                source_completed: true
            }
        );
        ingested += rows;
        // The analysis runs on a task of its own, after the commit answered.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let planned = loop {
            let planned: f32 =
                sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE relname = 'profiles'")
                    .fetch_one(&mut db)
                    .await
                    .unwrap();
            if planned == ingested as f32 || rows < 3 || std::time::Instant::now() > deadline {
                break planned;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if rows < 3 {
            assert_ne!(
                planned, ingested as f32,
                "{rows} rows are under the setting"
            );
        } else {
            assert_eq!(planned, ingested as f32, "{rows} rows analyzed the table");
        }
    }
}
