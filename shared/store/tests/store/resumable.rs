//! Resumable uploads in the store, on SQLite, PostgreSQL and Citus: a `PATCH` takes an upload
//! over by its generation, and only the generation holding it records parts; what ended is
//! listed for clean-up until its parts are forgotten; expiry and forgetting. The HTTP side is
//! gateway/tests/gateway/resumable.rs.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use orbit_core::model::{NewResumable, ResumablePart, ResumableState};
use orbit_store::Store;
use uuid::Uuid;

use crate::common::tenant;

orbit_testkit::conformance!(sqlite_backend => on_sqlite, postgres_backend => on_postgres, citus_backend => on_citus; {
    only_the_patch_holding_an_upload_records_parts,
    ended_uploads_are_cleaned_expired_and_forgotten,
});

async fn create(
    store: &dyn Store,
    org: Uuid,
    dir: Uuid,
    length: Option<u64>,
    ttl: Duration,
) -> Uuid {
    let id = Uuid::now_v7();
    store
        .create_resumable(&NewResumable {
            id,
            organization_id: org,
            directory_id: dir,
            length,
            metadata: "filename YS5jc3Y=".into(),
            expires_at: Utc::now() + chrono::Duration::from_std(ttl).unwrap(),
        })
        .await
        .unwrap();
    id
}

fn part(start: u64, byte_size: u64) -> ResumablePart {
    ResumablePart {
        start,
        byte_size,
        object_key: format!("uploads/x/{start}-{}", Uuid::new_v4().simple()),
    }
}

async fn only_the_patch_holding_an_upload_records_parts(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let later = Utc::now() + chrono::Duration::hours(1);
    let id = create(&*store, org, dir, None, Duration::from_secs(3600)).await;
    let first = store
        .take_resumable(org, dir, id, 0, Utc::now())
        .await
        .unwrap()
        .expect("taken at offset 0");
    assert_eq!(first.offset, 0);
    // Another organization, or the wrong offset, takes nothing.
    let (other, _) = tenant(&*store).await;
    assert!(store
        .take_resumable(other, dir, id, 0, Utc::now())
        .await
        .unwrap()
        .is_none());
    assert!(store.get_resumable(other, dir, id).await.unwrap().is_none());
    assert!(store
        .take_resumable(org, dir, id, 5, Utc::now())
        .await
        .unwrap()
        .is_none());
    // A second PATCH at the same offset takes the upload over: the first records nothing more.
    let second = store
        .take_resumable(org, dir, id, 0, Utc::now())
        .await
        .unwrap()
        .unwrap();
    assert!(second.generation > first.generation);
    assert!(!store
        .add_resumable_part(dir, id, first.generation, Some(&part(0, 10)), None, later)
        .await
        .unwrap());
    let kept = part(0, 10);
    assert!(store
        .add_resumable_part(dir, id, second.generation, Some(&kept), Some(25), later)
        .await
        .unwrap());
    let next = part(10, 15);
    assert!(store
        .add_resumable_part(dir, id, second.generation, Some(&next), None, later)
        .await
        .unwrap());
    let upload = store.get_resumable(org, dir, id).await.unwrap().unwrap();
    assert_eq!((upload.offset, upload.length), (25, Some(25)));
    assert!(upload.is_complete());
    assert_eq!(
        store.resumable_parts(dir, id).await.unwrap(),
        vec![kept, next]
    );
    // Its import records the source once.
    let source = Uuid::now_v7();
    assert!(store.imported_resumable(dir, id, source).await.unwrap());
    assert!(!store
        .imported_resumable(dir, id, Uuid::now_v7())
        .await
        .unwrap());
    let upload = store.get_resumable(org, dir, id).await.unwrap().unwrap();
    assert_eq!(upload.state, ResumableState::Imported);
    assert_eq!(upload.source_id, Some(source));
    // An ended upload takes no more PATCHes.
    assert!(store
        .take_resumable(org, dir, id, 25, Utc::now())
        .await
        .unwrap()
        .is_none());
}

async fn ended_uploads_are_cleaned_expired_and_forgotten(store: Arc<dyn Store>) {
    let (org, dir) = tenant(&*store).await;
    let later = Utc::now() + chrono::Duration::hours(1);
    let hour = Duration::from_secs(3600);
    let fresh = create(&*store, org, dir, Some(100), hour).await;
    let stale = create(&*store, org, dir, Some(100), Duration::from_millis(1)).await;
    let gone = create(&*store, org, dir, Some(100), hour).await;
    let taken = store
        .take_resumable(org, dir, gone, 0, Utc::now())
        .await
        .unwrap()
        .unwrap();
    assert!(store
        .add_resumable_part(dir, gone, taken.generation, Some(&part(0, 10)), None, later)
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(store.expire_resumables(Utc::now(), hour).await.unwrap(), 1);
    let expired = store.get_resumable(org, dir, stale).await.unwrap().unwrap();
    assert_eq!(expired.state, ResumableState::Expired);
    assert!(store
        .take_resumable(org, dir, stale, 0, Utc::now())
        .await
        .unwrap()
        .is_none());
    assert!(store.terminate_resumable(org, dir, gone).await.unwrap());
    assert!(!store.terminate_resumable(org, dir, gone).await.unwrap());
    assert!(store.get_resumable(org, dir, gone).await.unwrap().is_none());

    let mine = |mut leftovers: Vec<orbit_store::resumable::Leftover>| {
        leftovers.retain(|l| l.directory_id == dir);
        leftovers
    };
    let leftovers = mine(store.resumables_to_clean(100).await.unwrap());
    let mut ids: Vec<Uuid> = leftovers.iter().map(|l| l.id).collect();
    ids.sort();
    let mut want = vec![stale, gone];
    want.sort();
    assert_eq!(ids, want, "{leftovers:?}");
    for leftover in &leftovers {
        store.cleaned_resumable(leftover).await.unwrap();
    }
    assert!(store.resumable_parts(dir, gone).await.unwrap().is_empty());
    assert!(mine(store.resumables_to_clean(100).await.unwrap()).is_empty());
    // An expired upload answers until its record is forgotten; a receiving one stays.
    store.forget_resumables(Utc::now()).await.unwrap();
    assert!(store
        .get_resumable(org, dir, stale)
        .await
        .unwrap()
        .is_some());
    store
        .forget_resumables(Utc::now() + chrono::Duration::hours(2))
        .await
        .unwrap();
    assert!(store
        .get_resumable(org, dir, stale)
        .await
        .unwrap()
        .is_none());
    let fresh = store.get_resumable(org, dir, fresh).await.unwrap().unwrap();
    assert_eq!(fresh.state, ResumableState::Receiving);
}
