//! What a commit writes: records, profiles and identities, issues and failed rows, and the
//! source's counters; completing and failing a source, as PostgreSQL does too, is
//! `shared::transaction_steps`.

use super::*;

crate::shared::transaction_steps! { connection: SqliteConnection, database: sqlx::Sqlite, bytewise_collation: "" }

/// Materializes validated rows: resolves them to profiles and writes records, profiles,
/// identities, issues and failed rows. Runs inside the caller's write transaction, which is
/// what makes resolution race-free: SQLite has one writer at a time.
pub(super) async fn apply_results(
    conn: &mut SqliteConnection,
    source: &Source,
    mut prepared: Prepared,
) -> StoreResult<Applied> {
    let dir = source.directory_id;
    let mut existing = Existing::default();
    for (kind, values) in identity_lookups(&prepared) {
        for batch in values.chunks(IN_BATCH) {
            let sql = format!(
                "SELECT value, profile_id FROM profile_identities WHERE directory_id = ? AND kind = ? AND value IN ({})",
                placeholders(batch.len())
            );
            let mut query = sqlx::query(&sql).bind(dir).bind(kind);
            for v in batch {
                query = query.bind(*v);
            }
            for row in query.fetch_all(&mut *conn).await? {
                existing
                    .owners
                    .insert(kind, row.try_get("value")?, row.try_get("profile_id")?);
            }
        }
    }
    for batch in owners_to_load(&existing.owners).chunks(IN_BATCH) {
        let sql = format!(
            "SELECT id, state FROM profiles WHERE id IN ({})",
            placeholders(batch.len())
        );
        let mut query = sqlx::query(&sql);
        for id in batch {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            let state: String = row.try_get("state")?;
            existing.profiles.insert(
                row.try_get("id")?,
                serde_json::from_str::<ProfileState>(&state)?,
            );
        }
    }

    let writes = resolve(&mut prepared, existing, source.seq, &source.columns.merge)?;
    // DRY RUN: the one point where a dry run leaves the write path: no profile, identity or
    // record; the counts, warnings and failed rows stay, as the import would have them.
    if source.dry_run {
        write_failed_and_issues(conn, source, &prepared, &writes.warnings).await?;
        return Ok(writes.applied);
    }
    let now = now_ms();
    let state_json = |profiles: BTreeMap<Uuid, ProfileState>| -> StoreResult<Vec<(Uuid, String)>> {
        profiles
            .into_iter()
            .map(|(id, state)| Ok((id, serde_json::to_string(&state)?)))
            .collect()
    };
    let (created, updated) = (state_json(writes.created)?, state_json(writes.updated)?);
    for batch in created.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO profiles (id, organization_id, directory_id, state, created_ms, updated_ms) ",
        );
        insert.push_values(batch, |mut row, (id, state)| {
            row.push_bind(id)
                .push_bind(source.organization_id)
                .push_bind(dir)
                .push_bind(state)
                .push_bind(now)
                .push_bind(now);
        });
        insert.build().execute(&mut *conn).await?;
    }
    for (id, state) in &updated {
        sqlx::query("UPDATE profiles SET state = ?, updated_ms = ? WHERE id = ?")
            .bind(state)
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    for batch in writes.identities.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO profile_identities (directory_id, kind, value, profile_id) ",
        );
        insert.push_values(batch, |mut row, (kind, value, profile)| {
            row.push_bind(dir)
                .push_bind(kind)
                .push_bind(value)
                .push_bind(profile);
        });
        insert.build().execute(&mut *conn).await?;
    }
    let mut records = Vec::with_capacity(prepared.records.len());
    for ((r, draft), profile) in prepared
        .records
        .iter()
        .zip(&prepared.accepted)
        .zip(&writes.profile_of)
    {
        let fields = serde_json::to_string(&draft.fields)?;
        let attributes = serde_json::to_string(&draft.attributes)?;
        records.push((r, &draft.fields, profile, fields, attributes));
    }
    for batch in records.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO records (directory_id, source_id, row_number, line_number, profile_id, email, linkedin_url, phone, fields, attributes) ",
        );
        insert.push_values(
            batch,
            |mut row, (r, identities, profile, fields, attributes)| {
                row.push_bind(source.directory_id)
                    .push_bind(source.id)
                    .push_bind(r.row_number)
                    .push_bind(r.line_number)
                    .push_bind(**profile)
                    .push_bind(identities.get("email"))
                    .push_bind(identities.get("linkedin_url"))
                    .push_bind(identities.get("phone"))
                    .push_bind(fields)
                    .push_bind(attributes);
            },
        );
        insert.build().execute(&mut *conn).await?;
    }
    write_failed_and_issues(conn, source, &prepared, &writes.warnings).await?;
    Ok(writes.applied)
}

/// The failed rows and the row issues (`warnings` of accepted rows, the failed rows' errors).
pub(super) async fn write_failed_and_issues(
    conn: &mut SqliteConnection,
    source: &Source,
    prepared: &Prepared,
    warnings: &[IssueWrite],
) -> StoreResult<()> {
    for batch in prepared.failed.chunks(ROWS_PER_INSERT) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT OR IGNORE INTO failed_rows (directory_id, source_id, row_number, line_number, fields, error_code, error_message) ",
        );
        insert.push_values(batch, |mut row, f| {
            row.push_bind(source.directory_id)
                .push_bind(source.id)
                .push_bind(f.row_number)
                .push_bind(f.line_number)
                .push_bind(&f.fields)
                .push_bind(f.error_code)
                .push_bind(&f.error_message);
        });
        insert.build().execute(&mut *conn).await?;
    }
    for i in warnings.iter().chain(&prepared.failed_issues) {
        insert_issue(
            conn,
            source.directory_id,
            source.id,
            i.row_number as u64,
            i.line_number as u64,
            &i.issue,
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn insert_issue(
    conn: &mut SqliteConnection,
    dir: Uuid,
    source: Uuid,
    row_number: u64,
    line_number: u64,
    issue: &Issue,
) -> StoreResult<bool> {
    let done = sqlx::query(
        "INSERT OR IGNORE INTO row_issues (directory_id, source_id, row_number, line_number, severity, code, column_name, message, value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(dir)
    .bind(source)
    .bind(row_number as i64)
    .bind(line_number as i64)
    .bind(issue.code.severity().as_str())
    .bind(issue.code.as_str())
    .bind(issue.column.as_deref().unwrap_or(""))
    .bind(&issue.message)
    .bind(&issue.value)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Adds the applied counts to the source and completes it when its last chunk is in.
pub(super) async fn advance_source(
    conn: &mut SqliteConnection,
    dir: Uuid,
    source: Uuid,
    applied: &Applied,
    chunks_done: u64,
) -> StoreResult<bool> {
    let now = now_ms();
    sqlx::query(
        "UPDATE sources SET accepted = accepted + ?, failed = failed + ?, warnings = warnings + ?, processed_rows = processed_rows + ?, chunks_done = chunks_done + ?, status = 'processing', updated_ms = ? WHERE id = ? AND status IN ('pending', 'processing')",
    )
    .bind(applied.accepted as i64)
    .bind(applied.failed as i64)
    .bind(applied.warnings as i64)
    .bind((applied.accepted + applied.failed) as i64)
    .bind(chunks_done as i64)
    .bind(now)
    .bind(source)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query("SELECT chunk_count, chunks_done FROM sources WHERE id = ?")
        .bind(source)
        .fetch_one(&mut *conn)
        .await?;
    let (count, done): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    if done < count {
        return Ok(false);
    }
    finalize_source(conn, dir, source).await?;
    Ok(true)
}

/// Every chunk is in: flags duplicates across chunks, settles the warning count and completes
/// the source (or fails it, should the counts not add up).
pub(super) async fn finalize_source(
    conn: &mut SqliteConnection,
    dir: Uuid,
    source_id: Uuid,
) -> StoreResult<()> {
    for kind in resolve::IDENTITY_KINDS {
        for (row_number, line_number, value) in
            repeated_identities(conn, dir, source_id, kind).await?
        {
            let issue = row::duplicate_issue(kind, &value);
            insert_issue(
                conn,
                dir,
                source_id,
                row_number as u64,
                line_number as u64,
                &issue,
            )
            .await?;
        }
    }
    complete_source(conn, dir, source_id).await
}
