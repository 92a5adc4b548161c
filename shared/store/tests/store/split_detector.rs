//! The split detector: many commits racing into one directory must give exactly what
//! committing the same chunks one after the other, in the order they committed, gives. Its
//! cases run on PostgreSQL and on Citus (a fresh database, or schema, each).
//!
//! Each seed uploads one source whose chunks draw their rows from a small pool of emails,
//! phones and LinkedIn URLs, so that chunks overlap densely and chain profiles together. Eight
//! committers race through the chunks; every commit pauses for a random while between claiming
//! its identities and committing, and a killer terminates some of the backends caught in that
//! pause. The oracle then replays the chunks in their commit order through the domain's
//! resolution and compares, up to the naming of profiles: which rows share a profile, who owns
//! each identity, which rows were warned of an identity conflict, and every profile's fields.
//! Checks on the tables add that every identity belongs to a profile that lists it, every
//! profile holds at least one record, and every identity is where a lookup will find it. The
//! identity keys are masked to a few bits, so that most identities collide with another one
//! (of this directory or another): a collision must never merge two people.
//!
//! Commit order is observable for the chunks of one source: a commit updates its source's row
//! last and holds that lock until it commits, so the store's commit observer (a `testing`
//! hook) is called in commit order.
//!
//! A second case races several sources, each with random merge rules, into one directory,
//! with rows that clear fields. Which profile a row joins depends on the commit order, which
//! is not observable across sources; which value a profile keeps must not. So its oracle takes
//! the rows each profile holds from the records table and applies them one by one in (source
//! sequence, row) order under each source's rules, read literally (`newer_wins` replaces
//! unless an `overwrite` wrote the value, `keep_existing` fills what nothing wrote,
//! `overwrite` replaces): every profile's fields must be what that gives. It bites: with the
//! store made to ignore the rules (`PgStore::ignore_merge_rules`), it fails.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orbit_config::DatabaseSettings;
use orbit_core::domain::csv::{Dialect, TextEncoding};
use orbit_core::domain::header::{Column, ColumnMap, KnownField};
use orbit_core::domain::merge::{EmptyCells, MergeRules, Rule};
use orbit_core::domain::resolve::{resolve_batch, Existing, ProfileState, IDENTITY_KINDS};
use orbit_core::domain::row::RecordDraft;
use orbit_core::model::*;
use orbit_store::postgres::{identity_key, PgStore, ReadOwners};
use orbit_store::prelude::*;
use orbit_testkit::TestDatabase;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{Connection, Row};
use uuid::Uuid;

const SEEDS: u64 = 12;
const CHUNKS: u64 = 24;
const ROWS_PER_CHUNK: u64 = 12;
const COMMITTERS: usize = 8;
/// Identity keys keep only this many bits of their hash: the seeds' 384 distinct identities
/// share 512 keys, so most of them collide with another and sit past their home key.
const KEY_BITS: u32 = 9;
const KEY_MASK: i64 = (1 << KEY_BITS) - 1;

/// A row drawn from small pools: two rows share an identity often, and a row with two
/// identities often bridges two profiles.
fn draw_record(rng: &mut StdRng, row: u64) -> RecordDraft {
    let mut fields = BTreeMap::new();
    let kinds = rng.random_range(1..=3);
    for (kind, pool) in [("email", 14), ("phone", 10), ("linkedin_url", 8)]
        .into_iter()
        .take(kinds)
    {
        if kinds == 1 || rng.random_bool(0.7) {
            let n = rng.random_range(0..pool);
            let value = match kind {
                "email" => format!("p{n}@x.co"),
                "phone" => format!("+1415555{n:04}"),
                _ => format!("linkedin.com/in/p{n}"),
            };
            fields.insert(kind, value);
        }
    }
    if fields.is_empty() {
        fields.insert("email", format!("p{}@x.co", rng.random_range(0..14)));
    }
    // Fields that merges fight over: the newest row must win whatever the commit order.
    for (field, choices) in [
        ("city", ["Paris", "Lyon", "Rome"]),
        ("title", ["CTO", "CEO", "VP"]),
    ] {
        if rng.random_bool(0.6) {
            fields.insert(field, choices[rng.random_range(0..3)].into());
        }
    }
    RecordDraft {
        row_number: row,
        line_number: row + 1,
        fields,
        attributes: BTreeMap::new(),
        warnings: vec![],
    }
}

fn upload(org: Uuid, dir: Uuid) -> NewUpload {
    upload_with(org, dir, CHUNKS, MergeRules::default())
}

fn upload_with(org: Uuid, dir: Uuid, chunk_count: u64, merge: MergeRules) -> NewUpload {
    let id = Uuid::now_v7();
    let mut columns = ColumnMap::from_header(&["email".into(), "phone".into()], 10).unwrap();
    columns.merge = merge;
    let chunks = (0..chunk_count)
        .map(|i| ChunkSpec {
            index: i as u32,
            first_row: 1 + i * ROWS_PER_CHUNK,
            row_count: ROWS_PER_CHUNK,
            start_offset: i * 1000,
            end_offset: (i + 1) * 1000,
            start_line: 2 + i * ROWS_PER_CHUNK,
        })
        .collect();
    NewUpload {
        source: NewSource {
            id,
            organization_id: org,
            directory_id: dir,
            filename: "split.csv".into(),
            byte_size: chunk_count * 1000,
            sha256: "cd".repeat(32),
            compression: Compression::None,
            received_bytes: chunk_count * 1000,
            object_key: format!("sources/{org}/{id}.csv"),
            dialect: Dialect {
                encoding: TextEncoding::Utf8,
                delimiter: b',',
                bom_len: 0,
            },
            columns,
            max_field_bytes: 100,
            default_region: "US".into(),
            dry_run: false,
            total_rows: chunk_count * ROWS_PER_CHUNK,
        },
        sync_chunk: None,
        sync_results: ChunkResults::default(),
        chunks,
        idempotency: None,
        resumable: None,
        admission: None,
        traceparent: None,
        tracestate: None,
    }
}

/// A profile's fields: value and version.
type Fields = BTreeMap<String, (String, (i64, i64))>;

/// What the directory holds, with profiles named by the rows they hold, so that the store's
/// outcome and the oracle's compare whatever ids each gave its profiles.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// Each profile's rows, and its fields (value and version).
    profiles: BTreeMap<BTreeSet<u64>, Fields>,
    /// (kind, value) → the rows of its owner.
    owners: BTreeMap<(String, String), BTreeSet<u64>>,
    /// Rows warned of an identity conflict, with the column.
    conflicts: BTreeSet<(u64, String)>,
}

fn outcome(
    assignments: &HashMap<u64, Uuid>,
    owners: &HashMap<(String, String), Uuid>,
    states: &HashMap<Uuid, ProfileState>,
    conflicts: BTreeSet<(u64, String)>,
) -> Outcome {
    let mut rows_of: HashMap<Uuid, BTreeSet<u64>> = HashMap::new();
    for (row, profile) in assignments {
        rows_of.entry(*profile).or_default().insert(*row);
    }
    let fields = |state: &ProfileState| {
        state
            .fields
            .iter()
            .map(|(k, v)| (k.to_string(), (v.value.clone(), v.version)))
            .collect()
    };
    Outcome {
        profiles: rows_of
            .iter()
            .map(|(id, rows)| (rows.clone(), fields(&states[id])))
            .collect(),
        owners: owners
            .iter()
            .map(|(key, id)| (key.clone(), rows_of[id].clone()))
            .collect(),
        conflicts,
    }
}

fn replay(order: &[usize], chunks: &[Vec<RecordDraft>], seq: i64) -> Outcome {
    let mut existing = Existing::default();
    let mut assignments = HashMap::new();
    let mut conflicts = BTreeSet::new();
    for &i in order {
        let plan = resolve_batch(
            &mut existing,
            &chunks[i],
            seq,
            &MergeRules::default(),
            |_| Uuid::now_v7(),
        );
        assignments.extend(plan.assignments);
        conflicts.extend(
            plan.warnings
                .into_iter()
                .map(|(row, issue)| (row, issue.column.unwrap_or_default())),
        );
    }
    let owners = existing
        .owners
        .iter()
        .map(|(kind, value, owner)| ((kind.to_owned(), value.to_owned()), owner))
        .collect();
    outcome(&assignments, &owners, &existing.profiles, conflicts)
}

/// The identities of a directory, straight from the table: (kind, value) → (key, profile).
async fn identity_rows(
    conn: &mut sqlx::PgConnection,
    dir: Uuid,
) -> HashMap<(String, String), (i64, Uuid)> {
    sqlx::query("SELECT key, kind, value, profile_id FROM identities WHERE directory_id = $1")
        .bind(dir)
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let kind = IDENTITY_KINDS[r.get::<i16, _>(1) as usize].to_owned();
            ((kind, r.get(2)), (r.get(0), r.get(3)))
        })
        .collect()
}

/// Every profile of a directory, read through the store.
async fn profiles(store: &PgStore, org: Uuid, dir: Uuid) -> Vec<Profile> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_profiles(org, dir, None, &PageRequest { after, limit: 100 })
            .await
            .unwrap();
        all.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => return all,
        }
    }
}

async fn stored(
    conn: &mut sqlx::PgConnection,
    store: &PgStore,
    org: Uuid,
    dir: Uuid,
    source: Uuid,
) -> Outcome {
    let assignments: HashMap<u64, Uuid> =
        sqlx::query("SELECT row_number, profile_id FROM records WHERE source_id = $1")
            .bind(source)
            .fetch_all(&mut *conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<i64, _>(0) as u64, r.get(1)))
            .collect();
    let owners = identity_rows(conn, dir)
        .await
        .into_iter()
        .map(|(identity, (_, profile))| (identity, profile))
        .collect();
    let states = profiles(store, org, dir)
        .await
        .into_iter()
        .map(|p| (p.id, p.state))
        .collect();
    let conflicts = sqlx::query(
        "SELECT row_number, column_name FROM row_issues WHERE source_id = $1 AND code = 'identity_conflict'",
    )
    .bind(source)
    .fetch_all(&mut *conn)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<i64, _>(0) as u64, r.get(1)))
    .collect();
    outcome(&assignments, &owners, &states, conflicts)
}

/// Every identity's profile exists and lists it, every profile holds a record, and every
/// identity can be found: no free key between its home and where it sits. What a commit that
/// re-pointed its claims wrongly, created a profile it then did not use, or probed wrongly
/// past a collision would break.
async fn assert_integrity(conn: &mut sqlx::PgConnection, store: &PgStore, org: Uuid, dir: Uuid) {
    let identities = identity_rows(conn, dir).await;
    let profiles = profiles(store, org, dir).await;
    let mut listed: HashMap<(String, String), Uuid> = HashMap::new();
    for p in &profiles {
        for identity in &p.identities {
            assert!(
                listed.insert(identity.clone(), p.id).is_none(),
                "{identity:?} is listed by two profiles"
            );
        }
    }
    let owners: HashMap<(String, String), Uuid> = identities
        .iter()
        .map(|(identity, (_, profile))| (identity.clone(), *profile))
        .collect();
    assert_eq!(
        listed, owners,
        "profiles list exactly the identities they own"
    );
    let taken: BTreeSet<i64> = sqlx::query("SELECT key FROM identities")
        .fetch_all(&mut *conn)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for ((kind, value), (key, _)) in &identities {
        let number = IDENTITY_KINDS.iter().position(|k| k == kind).unwrap() as i16;
        let mut probe = identity_key(dir, number, value) & KEY_MASK;
        while probe != *key {
            assert!(
                taken.contains(&probe),
                "{kind} {value} sits past a free key"
            );
            probe = (probe + 1) & KEY_MASK;
        }
    }
    let empty: i64 = sqlx::query(
        "SELECT COUNT(*) FROM profiles p WHERE p.directory_id = $1
           AND NOT EXISTS (SELECT 1 FROM records r WHERE r.directory_id = p.directory_id AND r.profile_id = p.id)",
    )
    .bind(dir)
    .fetch_one(&mut *conn)
    .await
    .unwrap()
    .get(0);
    assert_eq!(empty, 0, "profiles without a record");
}

async fn chunk_state(url: &str, chunk: Uuid) -> String {
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("SELECT state FROM chunks WHERE id = $1")
        .bind(chunk)
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get(0)
}

/// Commits `rows` under `lease` as a worker would: the store retries what the killer does to
/// it, and should it give up, this tries again.
async fn commit_until_done(store: &PgStore, lease: &Lease, rows: &[RecordDraft], url: &str) {
    let chunk = lease.chunk_id;
    let mut tries = 0;
    loop {
        let results = ChunkResults {
            accepted: rows.to_vec(),
            failed: vec![],
        };
        match store.commit_chunk(lease, results).await {
            Ok(Committed::Done { .. }) => return,
            // A backend killed while it committed can die after the commit is durable: the
            // retry then finds the chunk done, not leased.
            Ok(Committed::LeaseLost) => {
                assert_eq!(
                    chunk_state(url, chunk).await,
                    "done",
                    "chunk {chunk} lost its lease"
                );
                return;
            }
            Err(e) => {
                tries += 1;
                assert!(tries < 20, "chunk {chunk} keeps failing: {e}");
            }
        }
    }
}

/// Terminates, now and then, a session of the test's database (`url`; the sessions are those
/// where `column` is `value`: [`TestDatabase::sessions`]) caught inside a commit's pause.
async fn kill_some(
    url: String,
    (column, value): (&'static str, String),
    stop: Arc<tokio::sync::Notify>,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let kill = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE {column} = $1 AND state = 'idle in transaction' ORDER BY random() LIMIT 1"
    );
    loop {
        tokio::select! {
            _ = stop.notified() => return,
            _ = tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))) => {}
        }
        if rng.random_bool(0.3) {
            sqlx::query(&kill)
                .bind(&value)
                .execute(&mut admin)
                .await
                .unwrap();
        }
    }
}

// The cases take the database itself, not a store: they open `PgStore` with its testing knobs.
macro_rules! in_postgres_database {
    ($case:path) => {
        $case(orbit_testkit::TestDatabase::create().await).await
    };
}

macro_rules! in_citus_schema {
    ($case:path) => {
        $case(orbit_testkit::TestDatabase::citus().await).await
    };
}

orbit_testkit::conformance!(postgres => in_postgres_database, citus => in_citus_schema; {
    concurrent_commits_equal_a_serial_replay_in_commit_order,
    concurrent_uploads_keep_the_values_their_merge_rules_say,
    the_detector_notices_a_store_that_ignores_merge_rules,
    the_databases_identity_key_function_is_the_stores,
});

async fn concurrent_commits_equal_a_serial_replay_in_commit_order(database: TestDatabase) {
    let (column, value) = database.sessions();
    let sessions = (column, value.to_owned());
    let mut store = PgStore::open(&DatabaseSettings::for_url(&database.url, 12))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    store.mask_identity_keys(KEY_BITS);
    let pauses = Arc::new(Mutex::new(StdRng::seed_from_u64(7)));
    store.pause_commits(move || Duration::from_millis(pauses.lock().unwrap().random_range(0..15)));
    let committed = Arc::new(Mutex::new(Vec::new()));
    let log = committed.clone();
    store.observe_commits(move |chunk| log.lock().unwrap().push(chunk));
    let store = Arc::new(store);
    let mut admin = sqlx::PgConnection::connect(&database.url).await.unwrap();

    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        // Claims that read owners first and blind ones (which learn every owner from a refused
        // claim) must both hold up; adaptive mixes the two as overlaps come and go.
        store.read_owners(
            [ReadOwners::Adaptive, ReadOwners::Always, ReadOwners::Never][seed as usize % 3],
        );
        let org = store.create_organization("Split").await.unwrap();
        let dir = store.create_directory(org.id, "Race").await.unwrap().id;
        let (source, queued) = store.commit_upload(upload(org.id, dir)).await.unwrap();
        let chunks: Vec<Vec<RecordDraft>> = (0..CHUNKS)
            .map(|i| {
                (0..ROWS_PER_CHUNK)
                    .map(|r| draw_record(&mut rng, 1 + i * ROWS_PER_CHUNK + r))
                    .collect()
            })
            .collect();
        let mut leases = Vec::new();
        for c in &queued {
            match store
                .claim_chunk(c, "detector", Duration::from_secs(600), 5)
                .await
                .unwrap()
            {
                Claim::Claimed(work) => leases.push(work.lease),
                other => panic!("{other:?}"),
            }
        }
        committed.lock().unwrap().clear();
        let stop = Arc::new(tokio::sync::Notify::new());
        let killer = tokio::spawn(kill_some(
            database.url.clone(),
            sessions.clone(),
            stop.clone(),
            seed,
        ));
        let next = Arc::new(Mutex::new((0..CHUNKS as usize).collect::<Vec<_>>()));
        let mut committers = tokio::task::JoinSet::new();
        for _ in 0..COMMITTERS {
            let (store, next, leases, chunks, url) = (
                store.clone(),
                next.clone(),
                leases.clone(),
                chunks.clone(),
                database.url.clone(),
            );
            committers.spawn(async move {
                loop {
                    let Some(i) = next.lock().unwrap().pop() else {
                        return;
                    };
                    commit_until_done(&store, &leases[i], &chunks[i], &url).await;
                }
            });
        }
        while let Some(done) = committers.join_next().await {
            done.unwrap();
        }
        stop.notify_one();
        killer.await.unwrap();

        // The last call for a chunk is its successful try: a try that failed after the call
        // was followed by another.
        let log = committed.lock().unwrap().clone();
        let mut order: Vec<usize> = Vec::new();
        for (pos, chunk) in log.iter().enumerate() {
            if !log[pos + 1..].contains(chunk) {
                order.push(queued.iter().position(|c| c.chunk_id == *chunk).unwrap());
            }
        }
        assert_eq!(order.len(), CHUNKS as usize, "every chunk committed once");
        let source = store
            .get_source(org.id, dir, source.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(source.status, SourceStatus::Completed, "seed {seed}");
        assert_eq!(source.accepted, CHUNKS * ROWS_PER_CHUNK);
        let expected = replay(&order, &chunks, source.seq);
        let actual = stored(&mut admin, &store, org.id, dir, source.id).await;
        assert_eq!(
            actual, expected,
            "seed {seed}: the concurrent outcome differs from a serial replay in commit order {order:?}"
        );
        assert_integrity(&mut admin, &store, org.id, dir).await;
    }
}

/// Sources of the merge-rules case, each with its own random rules and this many chunks.
const RULED_SOURCES: usize = 4;
const RULED_CHUNKS: u64 = 6;
/// The rules a field or attribute may be given, and the fields and attribute they fight over.
const RULES: [Rule; 3] = [Rule::NewerWins, Rule::KeepExisting, Rule::Overwrite];
const CONTESTED: [&str; 4] = ["city", "title", "company", "attributes.plan"];

fn random_rules(rng: &mut StdRng) -> MergeRules {
    let mut rules = MergeRules {
        default: RULES[rng.random_range(0..3)],
        ..MergeRules::default()
    };
    for key in CONTESTED {
        if rng.random_bool(0.4) {
            rules
                .fields
                .insert(key.into(), RULES[rng.random_range(0..3)]);
        }
    }
    if rng.random_bool(0.5) {
        rules.empty_cells = EmptyCells::Clear;
    }
    rules
}

/// [`draw_record`] with a company and a `plan` attribute too, and the empty cells that
/// `rules` clear as validation writes them: the empty value.
fn draw_ruled_record(rng: &mut StdRng, row: u64, rules: &MergeRules) -> RecordDraft {
    let mut record = draw_record(rng, row);
    if rng.random_bool(0.6) {
        record.fields.insert(
            "company",
            ["Acme", "Initech", "Globex"][rng.random_range(0..3)].into(),
        );
    }
    if rng.random_bool(0.6) {
        record.attributes.insert(
            "plan".into(),
            ["free", "pro"][rng.random_range(0..2)].into(),
        );
    }
    for field in ["city", "title", "company"] {
        let column = Column::Known(KnownField::named(field).unwrap());
        if !record.fields.contains_key(field) && rules.clears(&column) && rng.random_bool(0.5) {
            record.fields.insert(field, String::new());
        }
    }
    if !record.attributes.contains_key("plan")
        && rules.clears(&Column::Custom("plan".into()))
        && rng.random_bool(0.5)
    {
        record.attributes.insert("plan".into(), String::new());
    }
    record
}

/// A profile's values, keyed `field` or `attributes.name`; a cleared one is the empty value.
type Values = BTreeMap<String, String>;

/// The rules read literally: `writes` applied one by one in (source sequence, row) order.
fn serial_values(mut writes: Vec<(i64, &MergeRules, &RecordDraft)>) -> Values {
    writes.sort_by_key(|(seq, _, record)| (*seq, record.row_number));
    // Each value, and whether an `overwrite` wrote it.
    let mut state: BTreeMap<String, (String, bool)> = BTreeMap::new();
    let mut write = |key: String, rule: Rule, value: &String| {
        let current = state.get(&key);
        let apply = match rule {
            Rule::NewerWins => !current.is_some_and(|(_, overwritten)| *overwritten),
            Rule::KeepExisting => current.is_none(),
            Rule::Overwrite => true,
        };
        if apply {
            state.insert(key, (value.clone(), rule == Rule::Overwrite));
        }
    };
    for (_, rules, record) in writes {
        for (field, value) in &record.fields {
            write(field.to_string(), rules.field_rule(field), value);
        }
        for (name, value) in &record.attributes {
            write(
                format!("attributes.{name}"),
                rules.attribute_rule(name),
                value,
            );
        }
    }
    state.into_iter().map(|(k, (v, _))| (k, v)).collect()
}

fn stored_values(state: &ProfileState) -> Values {
    let fields = state
        .fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.value.clone()));
    let attributes =
        (state.attributes.iter()).map(|(k, v)| (format!("attributes.{k}"), v.value.clone()));
    fields.chain(attributes).collect()
}

/// Races sources with random merge rules into one directory and returns, per seed, the
/// profiles whose stored values differ from the serial reading of the rules over the rows
/// they hold (with the seed's description). `ignore_rules` breaks the store.
async fn race_ruled_uploads(
    database: &TestDatabase,
    seeds: u64,
    ignore_rules: bool,
) -> Vec<String> {
    let (column, value) = database.sessions();
    let sessions = (column, value.to_owned());
    let mut store = PgStore::open(&DatabaseSettings::for_url(&database.url, 12))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let pauses = Arc::new(Mutex::new(StdRng::seed_from_u64(11)));
    store.pause_commits(move || Duration::from_millis(pauses.lock().unwrap().random_range(0..15)));
    if ignore_rules {
        store.ignore_merge_rules();
    }
    let store = Arc::new(store);
    let mut admin = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let mut differences = Vec::new();
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let org = store.create_organization("Rules").await.unwrap();
        let dir = store.create_directory(org.id, "Race").await.unwrap().id;
        // (source, its sequence, its rules, its chunks' rows), and every chunk's lease.
        let mut sources = Vec::new();
        let mut work = Vec::new();
        for _ in 0..RULED_SOURCES {
            let rules = random_rules(&mut rng);
            let (source, queued) = store
                .commit_upload(upload_with(org.id, dir, RULED_CHUNKS, rules.clone()))
                .await
                .unwrap();
            let chunks: Vec<Vec<RecordDraft>> = (0..RULED_CHUNKS)
                .map(|i| {
                    (0..ROWS_PER_CHUNK)
                        .map(|r| draw_ruled_record(&mut rng, 1 + i * ROWS_PER_CHUNK + r, &rules))
                        .collect()
                })
                .collect();
            for (c, rows) in queued.iter().zip(&chunks) {
                match store
                    .claim_chunk(c, "detector", Duration::from_secs(600), 5)
                    .await
                    .unwrap()
                {
                    Claim::Claimed(claimed) => work.push((claimed.lease, rows.clone())),
                    other => panic!("{other:?}"),
                }
            }
            sources.push((source.id, source.seq, rules, chunks));
        }
        use rand::seq::SliceRandom;
        work.shuffle(&mut rng);
        let stop = Arc::new(tokio::sync::Notify::new());
        let killer = tokio::spawn(kill_some(
            database.url.clone(),
            sessions.clone(),
            stop.clone(),
            seed,
        ));
        let next = Arc::new(Mutex::new(work));
        let mut committers = tokio::task::JoinSet::new();
        for _ in 0..COMMITTERS {
            let (store, next, url) = (store.clone(), next.clone(), database.url.clone());
            committers.spawn(async move {
                loop {
                    let Some((lease, rows)) = next.lock().unwrap().pop() else {
                        return;
                    };
                    commit_until_done(&store, &lease, &rows, &url).await;
                }
            });
        }
        while let Some(done) = committers.join_next().await {
            done.unwrap();
        }
        stop.notify_one();
        killer.await.unwrap();

        // Which profile each row joined, from the records table.
        let joined: HashMap<(Uuid, u64), Uuid> = sqlx::query(
            "SELECT source_id, row_number, profile_id FROM records WHERE directory_id = $1",
        )
        .bind(dir)
        .fetch_all(&mut admin)
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get::<i64, _>(1) as u64), r.get(2)))
        .collect();
        let mut writes: HashMap<Uuid, Vec<(i64, &MergeRules, &RecordDraft)>> = HashMap::new();
        for (source, seq, rules, chunks) in &sources {
            for record in chunks.iter().flatten() {
                let profile = joined[&(*source, record.row_number)];
                writes
                    .entry(profile)
                    .or_default()
                    .push((*seq, rules, record));
            }
        }
        let profiles = profiles(&store, org.id, dir).await;
        assert_eq!(
            profiles.len(),
            writes.len(),
            "seed {seed}: a profile per joined set of rows"
        );
        for profile in profiles {
            let want = serial_values(writes.remove(&profile.id).unwrap());
            let got = stored_values(&profile.state);
            if got != want {
                let rules: Vec<String> = sources
                    .iter()
                    .map(|(_, seq, rules, _)| {
                        format!("{seq}: {}", serde_json::to_string(rules).unwrap())
                    })
                    .collect();
                differences.push(format!(
                    "seed {seed}, profile {}: stored {got:?}, serially {want:?}; rules {rules:?}",
                    profile.id
                ));
            }
        }
    }
    differences
}

async fn concurrent_uploads_keep_the_values_their_merge_rules_say(database: TestDatabase) {
    let differences = race_ruled_uploads(&database, SEEDS / 2, false).await;
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

async fn the_detector_notices_a_store_that_ignores_merge_rules(database: TestDatabase) {
    let differences = race_ruled_uploads(&database, 2, true).await;
    assert!(
        !differences.is_empty(),
        "a store that ignores merge rules went unnoticed"
    );
}

async fn the_databases_identity_key_function_is_the_stores(database: TestDatabase) {
    let store = PgStore::open(&DatabaseSettings::for_url(&database.url, 2))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let dir = Uuid::now_v7();
    for (kind, value) in [
        (0i16, "ann@example.com"),
        (1, "linkedin.com/in/zoë"),
        (2, "+14155552671"),
        (0, ""),
    ] {
        let sql: i64 = sqlx::query("SELECT orbit_identity_key($1, $2, $3)")
            .bind(dir)
            .bind(kind)
            .bind(value)
            .fetch_one(&mut conn)
            .await
            .unwrap()
            .get(0);
        assert_eq!(sql, identity_key(dir, kind, value), "{kind} {value}");
    }
}

/// Migration 0010 rewrites the identities and profiles a running installation holds: run the
/// migrations before it, store profiles and identities the old way, run it, and read them back
/// through the store. PostgreSQL only: no installation on Citus predates it.
#[tokio::test]
async fn the_narrow_rows_migration_keeps_profiles_and_identities() {
    let database = TestDatabase::create().await;
    let mut conn = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let dir_path = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres");
    let mut files: Vec<_> = std::fs::read_dir(dir_path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let (before, after): (Vec<_>, Vec<_>) = files
        .into_iter()
        .partition(|f| f.file_name().unwrap().to_str().unwrap() < "0010");
    let run = |file: &std::path::Path| std::fs::read_to_string(file).unwrap();
    for file in &before {
        sqlx::raw_sql(&run(file)).execute(&mut conn).await.unwrap();
    }
    let (org, dir) = (Uuid::now_v7(), Uuid::now_v7());
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    sqlx::raw_sql(&format!(
        "INSERT INTO organizations VALUES ('{org}', 'o', 0);
         INSERT INTO directories (id, organization_id, name, created_ms) VALUES ('{dir}', '{org}', 'd', 0);
         INSERT INTO profiles (id, organization_id, directory_id, state, created_ms, updated_ms) VALUES
           ('{ann}', '{org}', '{dir}', '{{\"fields\":{{\"email\":{{\"value\":\"ann@x.co\",\"version\":[3,7]}},\"city\":{{\"value\":\"Paris\",\"version\":[4,1]}}}},\"attributes\":{{\"tier\":{{\"value\":\"gold\",\"version\":[3,7]}}}}}}', 10, 20),
           ('{bob}', '{org}', '{dir}', '{{\"fields\":{{\"phone\":{{\"value\":\"+14155550100\",\"version\":[5,2]}}}},\"attributes\":{{}}}}', 11, 21);
         INSERT INTO profile_identities VALUES
           ('{dir}', 'email', 'ann@x.co', '{ann}'),
           ('{dir}', 'phone', '+14155550199', '{ann}'),
           ('{dir}', 'phone', '+14155550100', '{bob}');"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    for file in &after {
        sqlx::raw_sql(&run(file)).execute(&mut conn).await.unwrap();
    }

    let store = PgStore::open(&DatabaseSettings::for_url(&database.url, 2))
        .await
        .unwrap();
    let profile = store.get_profile(org, dir, ann).await.unwrap().unwrap();
    assert_eq!(profile.state.fields["email"].value, "ann@x.co");
    assert_eq!(profile.state.fields["email"].version, (3, 7));
    assert_eq!(profile.state.fields["city"].version, (4, 1));
    assert_eq!(profile.state.attributes["tier"].value, "gold");
    assert_eq!(
        profile.identities,
        vec![
            ("email".to_owned(), "ann@x.co".to_owned()),
            ("phone".to_owned(), "+14155550199".to_owned())
        ]
    );
    let by_email = store
        .list_profiles(
            org,
            dir,
            Some("ann@x.co"),
            &PageRequest {
                after: None,
                limit: 10,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        by_email.items.len(),
        1,
        "the migrated key finds its profile"
    );
    assert_eq!(by_email.items[0].id, ann);
    let bob = store.get_profile(org, dir, bob).await.unwrap().unwrap();
    assert_eq!(bob.state.fields["phone"].version, (5, 2));
    assert!(bob.state.attributes.is_empty());
    let owners = identity_rows(&mut conn, dir).await;
    assert_eq!(owners.len(), 3);
    assert_eq!(
        owners[&("phone".to_owned(), "+14155550199".to_owned())].1,
        ann
    );
}
