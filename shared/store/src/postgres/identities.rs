//! Finding and claiming identities: the hashed keys with open addressing (`layout`), the
//! owners a lock-free read finds, the claims in key order that arbitrate between concurrent
//! commits, and the settling of a resolution against what was claimed.

use super::*;

/// What a commit writes into: the source its rows belong to. `seq` versions every profile
/// write of the source.
pub(super) struct Target {
    pub(super) source: Uuid,
    pub(super) directory: Uuid,
    pub(super) seq: i64,
    pub(super) keys: KeySpace,
    /// A dry run's commits write only what validation found: see [`apply_results`].
    pub(super) dry_run: bool,
    /// How the source's values merge into profiles.
    pub(super) merge: MergeRules,
}

impl Target {
    pub(super) fn of(store: &PgStore, source: &Source) -> Self {
        Target {
            source: source.id,
            directory: source.directory_id,
            seq: source.seq,
            keys: store.keys,
            dry_run: source.dry_run,
            merge: store.merge_rules(&source.columns),
        }
    }
}

impl PgStore {
    /// The merge rules a commit of a source with these columns writes under.
    pub(super) fn merge_rules(&self, columns: &ColumnMap) -> MergeRules {
        match self.ignore_merge_rules {
            true => MergeRules::default(),
            false => columns.merge.clone(),
        }
    }
}

/// An identity of a chunk: (kind, value).
pub(super) type Identity = (FieldName, String);

/// The key each of a chunk's identities sits at, or would go to if claimed now.
pub(super) type Slots = IdentityMap<i64>;

/// A probe longer than this means the key space is full, which only a test's tiny masked
/// space can be (64 bits hold far more identities than any table).
pub(super) const MAX_PROBE_ROUNDS: usize = 1024;

/// The identities stored at `keys`, each probed by primary key, whatever the statistics say:
/// a plain join let the planner, estimating a young table from stale statistics, hash-join
/// against the whole table, which made each chunk slower than the one before it. The
/// `LIMIT 1` keeps the lateral subquery from being flattened into such a join.
pub(super) async fn stored_at(
    conn: &mut PgConnection,
    directory: Uuid,
    keys: &[i64],
) -> StoreResult<HashMap<i64, StoredIdentity>> {
    let rows = sqlx::query(
        "SELECT u.key, i.directory_id, i.kind, i.value, i.profile_id FROM UNNEST($2::int8[]) AS u(key)
         CROSS JOIN LATERAL (SELECT directory_id, kind, value, profile_id FROM identities
             WHERE directory_id = $1 AND key = u.key LIMIT 1) i",
    )
    .bind(directory)
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("key")?,
                StoredIdentity {
                    directory: row.try_get("directory_id")?,
                    kind: row.try_get("kind")?,
                    value: row.try_get("value")?,
                    profile: row.try_get("profile_id")?,
                },
            ))
        })
        .collect()
}

/// A row of `identities`, as read at some key.
pub(super) struct StoredIdentity {
    pub(super) directory: Uuid,
    pub(super) kind: i16,
    pub(super) value: String,
    pub(super) profile: Uuid,
}

impl StoredIdentity {
    /// Whether this row is the identity looked for, not another one that collided with it.
    pub(super) fn is(&self, directory: Uuid, kind: &str, value: &str) -> bool {
        self.directory == directory
            && kind_number(kind).ok() == Some(self.kind)
            && self.value == value
    }
}

/// Follows each identity's probe sequence from its home key to the key that holds it (its
/// owner is that row's profile) or to the first free key (where a claim would put it). Keys
/// held by other identities are collisions: the probe moves on.
pub(super) async fn locate(
    conn: &mut PgConnection,
    keys: KeySpace,
    directory: Uuid,
    identities: Vec<Identity>,
) -> StoreResult<(Owners, Slots)> {
    let mut owners = Owners::default();
    let mut slots = Slots::default();
    let mut pending = Vec::with_capacity(identities.len());
    for (kind, value) in identities {
        let home = keys.home(directory, kind_number(kind)?, &value);
        pending.push(((kind, value), home));
    }
    for _ in 0..MAX_PROBE_ROUNDS {
        if pending.is_empty() {
            return Ok((owners, slots));
        }
        let probed: Vec<i64> = pending.iter().map(|(_, key)| *key).collect();
        let found = stored_at(conn, directory, &probed).await?;
        let mut collided = Vec::new();
        for ((kind, value), key) in pending {
            match found.get(&key) {
                Some(stored) if stored.is(directory, kind, &value) => {
                    owners.insert(kind, value.clone(), stored.profile);
                    slots.insert(kind, value, key);
                }
                Some(_) => collided.push(((kind, value), keys.next(key))),
                None => {
                    slots.insert(kind, value, key);
                }
            }
        }
        pending = collided;
    }
    Err(StoreError::Corrupt("the identity key space is full".into()))
}

/// The current owners of a chunk's identities and the state of those owners, read without a
/// lock: what the optimistic resolution works from; and where each identity is or would go.
///
/// Each row's first identity (in resolution order) is looked up by key. The others are not,
/// where the profile owning the row's first identity lists them: identities never change
/// owner, and a profile lists exactly the identities it owns, so that profile owns them. In a
/// re-import, where every row's identities already belong to its profile, that is one probe
/// a row instead of one per identity. Identities no loaded profile lists are then looked up
/// by key, and their owners loaded, in a second round.
pub(super) async fn read_owners(
    conn: &mut PgConnection,
    target: &Target,
    prepared: &Prepared,
) -> StoreResult<(Snapshot, HashMap<Uuid, ProfileState>)> {
    let mut firsts: HashSet<(FieldName, &str)> = HashSet::new();
    // (an identity, its row's first identity), for every identity but a row's first.
    let mut others = Vec::new();
    for record in &prepared.accepted {
        let mut identities = resolve::IDENTITY_KINDS
            .iter()
            .filter_map(|kind| record.fields.get(*kind).map(|v| (*kind, v.as_str())));
        let Some(first) = identities.next() else {
            continue;
        };
        firsts.insert(first);
        others.extend(identities.map(|other| (other, first)));
    }
    let lookups = |set: HashSet<(FieldName, &str)>| -> Vec<Identity> {
        set.into_iter().map(|(k, v)| (k, v.to_owned())).collect()
    };
    let (mut owners, mut slots) =
        locate(conn, target.keys, target.directory, lookups(firsts)).await?;
    let mut loaded = load_listing(conn, target.directory, &owners_to_load(&owners)).await?;
    let mut unknown: HashSet<(FieldName, &str)> = HashSet::new();
    for ((kind, value), (first_kind, first_value)) in others {
        if owners.get(kind, value).is_some() || slots.get(kind, value).is_some() {
            continue;
        }
        let owner = owners.get(first_kind, first_value);
        let listed = owner
            .and_then(|id| loaded.get(&id))
            .is_some_and(|read| read.listed.iter().any(|(k, v)| k == kind && v == value));
        match owner {
            Some(id) if listed => owners.insert(kind, value.to_owned(), id),
            _ => {
                unknown.insert((kind, value));
            }
        }
    }
    if !unknown.is_empty() {
        let (more, more_slots) =
            locate(conn, target.keys, target.directory, lookups(unknown)).await?;
        for (kind, value, id) in more.iter() {
            owners.insert(kind, value.to_owned(), id);
        }
        for (kind, value, key) in more_slots.iter() {
            slots.insert(kind, value.to_owned(), key);
        }
        let missing: Vec<Uuid> = owners_to_load(&owners)
            .into_iter()
            .filter(|id| !loaded.contains_key(id))
            .collect();
        loaded.extend(load_listing(conn, target.directory, &missing).await?);
    }
    let mut stamps = HashMap::with_capacity(loaded.len());
    let mut profiles = HashMap::with_capacity(loaded.len());
    for (id, read) in loaded {
        stamps.insert(id, read.stamp);
        profiles.insert(id, read.state);
    }
    let snapshot = Snapshot {
        owners,
        slots,
        stamps,
    };
    Ok((snapshot, profiles))
}

/// What the optimistic read found, kept for the transaction to check it against: the owners
/// of the chunk's identities, where each identity is or would go, and which version of each
/// owner's row it read (the resolution took the states themselves).
#[derive(Default)]
pub(super) struct Snapshot {
    pub(super) owners: Owners,
    pub(super) slots: Slots,
    pub(super) stamps: HashMap<Uuid, String>,
}

/// A profile as the optimistic read found it.
struct ReadProfile {
    state: ProfileState,
    /// The identities the profile lists.
    listed: Vec<(String, String)>,
    /// Which version of the row this is ([`STAMP`]).
    stamp: String,
}

/// Profiles by id, read without a lock, each with the identities it lists and its stamp.
async fn load_listing(
    conn: &mut PgConnection,
    directory: Uuid,
    ids: &[Uuid],
) -> StoreResult<HashMap<Uuid, ReadProfile>> {
    let mut profiles = HashMap::with_capacity(ids.len());
    for row in select_profiles(conn, directory, ids).await? {
        let (state, listed) = profile_from_row(&row)?;
        let stamp = row.try_get("stamp")?;
        profiles.insert(
            row.try_get("id")?,
            ReadProfile {
                state,
                listed,
                stamp,
            },
        );
    }
    Ok(profiles)
}

/// Locks profiles in the order of `ids` (ascending), the one order in which every commit
/// locks profiles, and returns each one's [`STAMP`]: what tells whether it changed since the
/// optimistic read without reading it whole again.
async fn lock_stamps(
    conn: &mut PgConnection,
    directory: Uuid,
    ids: &[Uuid],
) -> StoreResult<HashMap<Uuid, String>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = format!(
        "SELECT p.id, p.stamp FROM UNNEST($2::uuid[]) WITH ORDINALITY AS u(id, n)
         CROSS JOIN LATERAL (SELECT id, {STAMP} FROM profiles WHERE directory_id = $1 AND id = u.id FOR UPDATE) p
         ORDER BY u.n"
    );
    sqlx::query(&sql)
        .bind(directory)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("stamp")?)))
        .collect()
}

/// Which version of a profile row was read: the id of the transaction that wrote it. Any
/// write makes a new version under its writer's id, and a transaction that committed before
/// the read cannot write again, so an equal stamp means the row was not written since. (On
/// Citus each shard's node numbers its own transactions; a row stays on its node.)
const STAMP: &str = "xmin::text AS stamp";

/// Profile states by id, in a transaction that has locked them already.
async fn load_profiles(
    conn: &mut PgConnection,
    directory: Uuid,
    ids: &[Uuid],
) -> StoreResult<HashMap<Uuid, ProfileState>> {
    let mut profiles = HashMap::with_capacity(ids.len());
    for row in select_profiles(conn, directory, ids).await? {
        profiles.insert(row.try_get("id")?, profile_from_row(&row)?.0);
    }
    Ok(profiles)
}

/// Each profile of `ids`, probed by primary key whatever the statistics say (see
/// [`stored_at`]), with its [`STAMP`].
async fn select_profiles(
    conn: &mut PgConnection,
    directory: Uuid,
    ids: &[Uuid],
) -> StoreResult<Vec<PgRow>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT p.id, p.stamp, {columns} FROM UNNEST($2::uuid[]) WITH ORDINALITY AS u(id, n)
         CROSS JOIN LATERAL (SELECT {STAMP}, * FROM profiles WHERE directory_id = $1 AND id = u.id LIMIT 1) p
         ORDER BY u.n",
        columns = profile_columns(),
    );
    Ok(sqlx::query(&sql)
        .bind(directory)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?)
}

/// What claiming a chunk's new identities found: the keys this transaction now holds, and the
/// owners of the identities a concurrent commit claimed first.
pub(super) struct Claimed<'a> {
    /// (kind, value, key), in no particular order; only a re-resolution looks them up.
    pub(super) won: Vec<(FieldName, &'a str, i64)>,
    pub(super) lost: Vec<(FieldName, String, Uuid)>,
}

/// Claims identities for their profiles, each at the key its probe found free, in ascending
/// key order. A key another transaction inserted but has not committed makes this one wait for
/// it (the primary key arbitrates). A key refused is then read: if it holds the same identity,
/// a concurrent commit claimed it first and owns it; if another (a collision that arrived in
/// the meantime), the claim moves on to the next key.
pub(super) async fn claim_identities<'a>(
    conn: &mut PgConnection,
    target: &Target,
    identities: &'a [(FieldName, String, Uuid)],
    slots: &Slots,
) -> StoreResult<Claimed<'a>> {
    let mut claimed = Claimed {
        won: Vec::with_capacity(identities.len()),
        lost: Vec::new(),
    };
    let mut pending = Vec::with_capacity(identities.len());
    for (kind, value, profile) in identities {
        let key = match slots.get(kind, value) {
            Some(key) => key,
            None => target
                .keys
                .home(target.directory, kind_number(kind)?, value),
        };
        pending.push((*kind, value.as_str(), *profile, key));
    }
    pending.sort_unstable_by_key(|p| p.3);
    if claim_all_by_copy(conn, target.directory, &pending).await? {
        claimed.won = pending
            .into_iter()
            .map(|(kind, value, _, key)| (kind, value, key))
            .collect();
        return Ok(claimed);
    }
    for _ in 0..MAX_PROBE_ROUNDS {
        if pending.is_empty() {
            return Ok(claimed);
        }
        pending.sort_unstable_by_key(|p| p.3);
        let mut kinds = Vec::with_capacity(pending.len());
        for (kind, ..) in &pending {
            kinds.push(kind_number(kind)?);
        }
        let values: Vec<&str> = pending.iter().map(|p| p.1).collect();
        let profiles: Vec<Uuid> = pending.iter().map(|p| p.2).collect();
        let keys: Vec<i64> = pending.iter().map(|p| p.3).collect();
        let inserted: HashSet<(i64, i16, String)> = sqlx::query(
            "INSERT INTO identities (key, directory_id, kind, value, profile_id)
             SELECT u.key, $1, u.kind, u.value, u.profile_id
             FROM UNNEST($2::int8[], $3::int2[], $4::text[], $5::uuid[]) AS u(key, kind, value, profile_id)
             ORDER BY u.key
             ON CONFLICT DO NOTHING
             RETURNING key, kind, value",
        )
        .bind(target.directory)
        .bind(&keys)
        .bind(&kinds)
        .bind(&values)
        .bind(&profiles)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("key")?, row.try_get("kind")?, row.try_get("value")?)))
        .collect::<StoreResult<_>>()?;
        let mut refused = Vec::new();
        for (p, kind) in pending.into_iter().zip(kinds) {
            if inserted.contains(&(p.3, kind, p.1.to_owned())) {
                claimed.won.push((p.0, p.1, p.3));
            } else {
                refused.push(p);
            }
        }
        if refused.is_empty() {
            return Ok(claimed);
        }
        let keys: Vec<i64> = refused.iter().map(|p| p.3).collect();
        let found = stored_at(conn, target.directory, &keys).await?;
        pending = Vec::new();
        for (kind, value, profile, key) in refused {
            match found.get(&key) {
                Some(stored) if stored.is(target.directory, kind, value) => {
                    claimed.lost.push((kind, value.to_owned(), stored.profile));
                }
                Some(_) => pending.push((kind, value, profile, target.keys.next(key))),
                // Whoever held the key rolled back: try it again.
                None => pending.push((kind, value, profile, key)),
            }
        }
    }
    Err(StoreError::Corrupt("the identity key space is full".into()))
}

/// The usual case, every identity still free where the optimistic read found it, in one COPY
/// (rows in ascending key order): a multi-row insert logs about a third of what `INSERT … ON
/// CONFLICT` logs, which writes a speculative insertion and its confirmation per row. If any
/// key was claimed meanwhile, the unique index refuses the COPY (after waiting for the claim's
/// transaction, as `ON CONFLICT` would), the savepoint undoes it, and the caller claims one by
/// one. Returns whether the COPY claimed them all.
pub(super) async fn claim_all_by_copy(
    conn: &mut PgConnection,
    directory: Uuid,
    pending: &[(&str, &str, Uuid, i64)],
) -> StoreResult<bool> {
    let mut rows = BinaryRows::new();
    for (kind, value, profile, key) in pending {
        rows.row(5)
            .int8(*key)
            .uuid(directory)
            .int2(kind_number(kind)?)
            .text(value)
            .uuid(*profile);
    }
    let Some(data) = rows.finish() else {
        return Ok(true);
    };
    conn.execute("SAVEPOINT claim_by_copy").await?;
    let copied = copy_in(
        conn,
        "COPY identities (key, directory_id, kind, value, profile_id) FROM STDIN (FORMAT binary)",
        data,
    )
    .await;
    match copied {
        Ok(()) => {
            conn.execute("RELEASE SAVEPOINT claim_by_copy").await?;
            Ok(true)
        }
        Err(e) if e.is_unique_violation() => {
            conn.execute("ROLLBACK TO SAVEPOINT claim_by_copy").await?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Turns the optimistic resolution into the one this transaction commits: claims its
/// identities, learns the owners of the ones a concurrent commit claimed first, locks the
/// existing profiles it merges into, and resolves again if any of that differs from what the
/// lock-free read saw. After it, every identity of the chunk is either held by this
/// transaction or owned by a committed one (identities never change owner), and every profile
/// it reads is locked, so the outcome is the one a serial commit at this point would give.
/// Also returns how many of the chunk's identities were owned already.
pub(super) async fn settle(
    conn: &mut PgConnection,
    target: &Target,
    prepared: &mut Prepared,
    snapshot: Snapshot,
    optimistic: Resolution,
    pause: &CommitPause,
) -> StoreResult<(Resolution, u64)> {
    let Snapshot {
        mut owners,
        slots,
        stamps,
    } = snapshot;
    let Claimed { won, lost } =
        claim_identities(conn, target, &optimistic.identities, &slots).await?;
    pause.wait().await;
    let mut stale = !lost.is_empty();
    for (kind, value, owner) in lost {
        owners.insert(kind, value, owner);
    }
    let owned = owners.len() as u64;
    let ids = owners_to_load(&owners);
    stale |= lock_stamps(conn, target.directory, &ids).await? != stamps;
    if !stale {
        return Ok((optimistic, owned));
    }
    let existing = Existing {
        profiles: load_profiles(conn, target.directory, &ids).await?,
        owners,
    };
    let settled = resolve(prepared, existing, target.seq, &target.merge)?;
    let won: HashMap<(&str, &str), i64> = won
        .into_iter()
        .map(|(kind, value, key)| ((kind, value), key))
        .collect();
    // The settled resolution claims exactly the keys this transaction won: the others have
    // owners now. Rows that create the same profile keep its id (`Prepared` fixes new ids per
    // row), so only the identities whose profile changed are pointed elsewhere.
    if settled.identities.len() != won.len()
        || settled
            .identities
            .iter()
            .any(|(kind, value, _)| !won.contains_key(&(*kind, value.as_str())))
    {
        return Err(StoreError::Corrupt(
            "re-resolution claimed other identities than the transaction holds".into(),
        ));
    }
    let optimistic_owner: HashMap<(&str, &str), Uuid> = optimistic
        .identities
        .iter()
        .map(|(kind, value, profile)| ((*kind, value.as_str()), *profile))
        .collect();
    let (keys, profiles): (Vec<i64>, Vec<Uuid>) = settled
        .identities
        .iter()
        .filter(|(kind, value, profile)| {
            optimistic_owner.get(&(*kind, value.as_str())) != Some(profile)
        })
        .map(|(kind, value, profile)| (won[&(*kind, value.as_str())], *profile))
        .unzip();
    if !keys.is_empty() {
        sqlx::query(
            "UPDATE identities i SET profile_id = u.profile_id
             FROM UNNEST($2::int8[], $3::uuid[]) AS u(key, profile_id)
             WHERE i.directory_id = $1 AND i.key = u.key",
        )
        .bind(target.directory)
        .bind(&keys)
        .bind(&profiles)
        .execute(&mut *conn)
        .await?;
    }
    Ok((settled, owned))
}

/// The optimistic half of a commit, on a connection of its own before any lock is taken, so
/// that a commit holds its locks only while it writes: the directory's current owners of the
/// chunk's identities, and the resolution they give. Without `read`, it assumes every identity
/// is new and free at its home key; claiming them (`settle`) corrects the guess where it was
/// wrong, exactly as it does after a concurrent commit claimed a key first.
pub(super) async fn resolve_optimistically(
    pool: &PgPool,
    target: &Target,
    prepared: &mut Prepared,
    read: bool,
) -> StoreResult<(Snapshot, Resolution)> {
    let (snapshot, profiles) = if read {
        read_owners(&mut *pool.acquire().await?, target, prepared).await?
    } else {
        (Snapshot::default(), HashMap::new())
    };
    let existing = Existing {
        owners: snapshot.owners.clone(),
        profiles,
    };
    let optimistic = resolve(prepared, existing, target.seq, &target.merge)?;
    Ok((snapshot, optimistic))
}
