//! What a commit writes: failed rows and issues by text `COPY`, profiles, records and
//! identities by binary `COPY`, and the source's counters; completing and failing a source,
//! as SQLite does too, is `shared::transaction_steps`.

use super::*;

crate::shared::transaction_steps! { connection: PgConnection, database: sqlx::Postgres, bytewise_collation: " COLLATE \"C\"" }

/// Appends one row in COPY's text format: tab-separated, `\N` for NULL, backslash escapes.
pub(super) fn copy_row(buf: &mut Vec<u8>, fields: &[Option<&str>]) {
    for (i, field) in fields.iter().enumerate() {
        if i > 0 {
            buf.push(b'\t');
        }
        match field {
            None => buf.extend_from_slice(b"\\N"),
            // Most values need no escaping: copy them whole.
            Some(text)
                if !text
                    .bytes()
                    .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) =>
            {
                buf.extend_from_slice(text.as_bytes())
            }
            Some(text) => {
                for &b in text.as_bytes() {
                    match b {
                        b'\\' => buf.extend_from_slice(b"\\\\"),
                        b'\t' => buf.extend_from_slice(b"\\t"),
                        b'\n' => buf.extend_from_slice(b"\\n"),
                        b'\r' => buf.extend_from_slice(b"\\r"),
                        _ => buf.push(b),
                    }
                }
            }
        }
    }
    buf.push(b'\n');
}

pub(super) async fn copy_in(
    conn: &mut PgConnection,
    statement: &str,
    data: Vec<u8>,
) -> StoreResult<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut copy = conn.copy_in_raw(statement).await?;
    copy.send(data).await?;
    copy.finish().await?;
    Ok(())
}

/// Row issues are staged: the pass that completes a source may flag an issue a chunk already
/// recorded, and `ON CONFLICT DO NOTHING` keeps one. The table lives per connection and empties
/// itself at commit.
pub(super) const STAGE_ISSUES: &str = "CREATE TEMP TABLE IF NOT EXISTS stage_issues (
    directory_id UUID, source_id UUID, row_number BIGINT, line_number BIGINT, severity TEXT, code TEXT,
    column_name TEXT, message TEXT, value TEXT) ON COMMIT DELETE ROWS";

/// Inserts row issues given as COPY text rows, skipping any already recorded.
pub(super) async fn insert_issues(conn: &mut PgConnection, rows: Vec<u8>) -> StoreResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    conn.execute(STAGE_ISSUES).await?;
    copy_in(
        conn,
        "COPY stage_issues (directory_id, source_id, row_number, line_number, severity, code, column_name, message, value) FROM STDIN",
        rows,
    )
    .await?;
    // DELETE, not TRUNCATE: a truncate swaps the table's files, which cost more than the
    // handful of rows here, and the table may be used again before the commit.
    conn.execute(
        "INSERT INTO row_issues (directory_id, source_id, row_number, line_number, severity, code, column_name, message, value)
           SELECT * FROM stage_issues ORDER BY row_number ON CONFLICT DO NOTHING;
         DELETE FROM stage_issues;",
    )
    .await?;
    Ok(())
}

pub(super) fn issue_row(
    buf: &mut Vec<u8>,
    directory: &str,
    source: &str,
    row_number: i64,
    line_number: i64,
    issue: &row::Issue,
) {
    copy_row(
        buf,
        &[
            Some(directory),
            Some(source),
            Some(&row_number.to_string()),
            Some(&line_number.to_string()),
            Some(issue.code.severity().as_str()),
            Some(issue.code.as_str()),
            Some(issue.column.as_deref().unwrap_or("")),
            Some(&issue.message),
            issue.value.as_deref(),
        ],
    );
}

/// The locked half: settles the resolution and writes it, inside the caller's transaction,
/// which has fenced the chunk (or created the source) already.
pub(super) async fn apply_results(
    tx: &mut PgConnection,
    target: &Target,
    prepared: &mut Prepared,
    (snapshot, optimistic): (Snapshot, Resolution),
    pause: &CommitPause,
) -> StoreResult<(Applied, u64)> {
    // DRY RUN: the one point where a dry run leaves the write path. It claims no identity and
    // writes no record or profile; it keeps what validation and the lock-free resolution
    // found (counts, warnings, failed rows), as the import would have.
    if target.dry_run {
        // What the lock-free read found (nothing, if the commit claimed blind), so that a dry
        // run does not tell the next commit into a directory of known contacts to claim blind.
        let owned = snapshot.owners.len() as u64;
        let applied = write_failed_and_issues(tx, target, prepared, optimistic).await?;
        return Ok((applied, owned));
    }
    let (resolution, owned) = settle(tx, target, prepared, snapshot, optimistic, pause).await?;
    Ok((write_all(tx, target, prepared, resolution).await?, owned))
}

/// Writes the profiles a resolution created (COPY) and changed (one UPDATE, in place), each
/// with the identities it claimed.
pub(super) async fn write_profiles(
    conn: &mut PgConnection,
    target: &Target,
    resolution: &Resolution,
    now: i64,
) -> StoreResult<()> {
    let mut gained: HashMap<Uuid, Vec<(&str, &str)>> = HashMap::new();
    for (kind, value, profile) in &resolution.identities {
        gained
            .entry(*profile)
            .or_default()
            .push((*kind, value.as_str()));
    }
    // New profiles go straight in with COPY: their ids are new. (Array-bound `INSERT … SELECT
    // FROM UNNEST` measured within 5% of COPY both ways: slower on 10,000-row chunks, faster on
    // 100-row uploads.)
    // directory, id, created, updated, version, a value and a version per field, ranks,
    // attributes, identities.
    let width = 8 + 2 * field_names().count() as i16;
    let mut rows = BinaryRows::new();
    for (id, state) in &resolution.created {
        let columns = ProfileColumns::of(state)?;
        let mut identities = gained.remove(id).unwrap_or_default();
        identities.sort_unstable();
        rows.row(width)
            .uuid(target.directory)
            .uuid(*id)
            .int8(now)
            .int8(now)
            .int8_or_null(columns.version);
        for (value, version) in &columns.fields {
            rows.text_or_null(*value).int8_or_null(*version);
        }
        rows.int8_or_null(columns.ranks)
            .text_or_null(columns.attributes.as_deref())
            .text(&identities_text(identities)?);
    }
    if let Some(data) = rows.finish() {
        let statement = format!(
            "COPY profiles (directory_id, id, {}) FROM STDIN (FORMAT binary)",
            profile_columns()
        );
        copy_in(conn, &statement, data).await?;
    }
    if resolution.updated.is_empty() {
        return Ok(());
    }
    let n = resolution.updated.len();
    let names: Vec<&str> = field_names().collect();
    let mut ids = Vec::with_capacity(n);
    let mut values: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(n); names.len()];
    let mut versions: Vec<Vec<Option<i64>>> = vec![Vec::with_capacity(n); names.len()];
    let mut attributes = Vec::with_capacity(n);
    let mut gains = Vec::with_capacity(n);
    let mut shared = Vec::with_capacity(n);
    let mut ranks = Vec::with_capacity(n);
    for (id, state) in &resolution.updated {
        let columns = ProfileColumns::of(state)?;
        ids.push(*id);
        shared.push(columns.version);
        ranks.push(columns.ranks);
        for (f, (value, version)) in columns.fields.into_iter().enumerate() {
            values[f].push(value);
            versions[f].push(version);
        }
        attributes.push(columns.attributes);
        gains.push(identities_text(gained.remove(id).unwrap_or_default())?);
    }
    // $1 directory, $2 now, $3 ids, $4 attributes, $5 gained identities (lines), $6 shared
    // versions, $7 ranks, then a value and a version array per field.
    let mut set = String::from(
        "updated_ms = $2, attributes = u.attributes, version = u.version, field_ranks = u.field_ranks,
         identities = CASE WHEN u.gained = '' THEN p.identities WHEN p.identities = '' THEN u.gained
                           ELSE p.identities || E'\\n' || u.gained END",
    );
    let mut unnest = String::from("$3::uuid[], $4::text[], $5::text[], $6::int8[], $7::int8[]");
    let mut aliases = String::from("id, attributes, gained, version, field_ranks");
    for (f, name) in names.iter().enumerate() {
        set.push_str(&format!(", {name} = u.{name}, {name}_v = u.{name}_v"));
        unnest.push_str(&format!(", ${}::text[], ${}::int8[]", 8 + 2 * f, 9 + 2 * f));
        aliases.push_str(&format!(", {name}, {name}_v"));
    }
    // Planned from statistics: where they still see the directory as small, this hashes the
    // whole directory (100 ms a slice at 100,000 profiles), which is why a large source
    // analyzes the tables it wrote once it completes (`PgStore::analyze_after`).
    let sql = format!(
        "UPDATE profiles p SET {set} FROM UNNEST({unnest}) AS u({aliases})
         WHERE p.directory_id = $1 AND p.id = u.id"
    );
    let mut query = sqlx::query(&sql)
        .bind(target.directory)
        .bind(now)
        .bind(&ids)
        .bind(&attributes)
        .bind(&gains)
        .bind(&shared)
        .bind(&ranks);
    for (value, version) in values.iter().zip(&versions) {
        query = query.bind(value).bind(version);
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

pub(super) async fn write_all(
    conn: &mut PgConnection,
    target: &Target,
    prepared: &Prepared,
    resolution: Resolution,
) -> StoreResult<Applied> {
    write_profiles(conn, target, &resolution, now_ms()).await?;
    // Records and failed rows go straight in too. None can exist yet: a chunk commits once,
    // fenced by its lease and its `running` state, and the upload's own rows belong to a new
    // source. Should that ever fail, the primary keys refuse the second copy loudly.
    let mut rows = BinaryRows::new();
    for ((r, draft), profile) in prepared
        .records
        .iter()
        .zip(&prepared.accepted)
        .zip(&resolution.profile_of)
    {
        let identity = |kind| draft.fields.get(kind).map(String::as_str);
        rows.row(8)
            .uuid(target.directory)
            .uuid(target.source)
            .int8(r.row_number)
            .int8(r.line_number)
            .uuid(*profile)
            .text_or_null(identity("email"))
            .text_or_null(identity("linkedin_url"))
            .text_or_null(identity("phone"));
    }
    if let Some(data) = rows.finish() {
        copy_in(
            conn,
            "COPY records (directory_id, source_id, row_number, line_number, profile_id, email, linkedin_url, phone) FROM STDIN (FORMAT binary)",
            data,
        )
        .await?;
    }
    write_failed_and_issues(conn, target, prepared, resolution).await
}

/// What every commit writes, a dry run's too: the failed rows and the row issues.
pub(super) async fn write_failed_and_issues(
    conn: &mut PgConnection,
    target: &Target,
    prepared: &Prepared,
    resolution: Resolution,
) -> StoreResult<Applied> {
    let directory_id = target.directory.to_string();
    let source_id = target.source.to_string();
    let mut buf = Vec::new();
    for f in &prepared.failed {
        copy_row(
            &mut buf,
            &[
                Some(&directory_id),
                Some(&source_id),
                Some(&f.row_number.to_string()),
                Some(&f.line_number.to_string()),
                Some(&f.fields),
                Some(f.error_code),
                Some(&f.error_message),
            ],
        );
    }
    copy_in(
        conn,
        "COPY failed_rows (directory_id, source_id, row_number, line_number, fields, error_code, error_message) FROM STDIN",
        buf,
    )
    .await?;
    let mut buf = Vec::new();
    for i in resolution.warnings.iter().chain(&prepared.failed_issues) {
        issue_row(
            &mut buf,
            &directory_id,
            &source_id,
            i.row_number,
            i.line_number,
            &i.issue,
        );
    }
    insert_issues(conn, buf).await?;
    Ok(resolution.applied)
}

/// Adds a commit's counts to its source (`owned`: how many of its identities were owned
/// already), and completes the source when this was its last chunk. `sole`: this commit holds
/// every row of the source (an upload imported whole inside its request).
pub(super) async fn advance_source(
    conn: &mut PgConnection,
    target: &Target,
    applied: &Applied,
    owned: u64,
    chunks_done: u64,
    sole: bool,
) -> StoreResult<bool> {
    let row = sqlx::query(
        "UPDATE sources SET accepted = accepted + $1, failed = failed + $2, warnings = warnings + $3,
             processed_rows = processed_rows + $4, chunks_done = chunks_done + $5, status = 'processing', updated_ms = $6,
             owned_identities = owned_identities + $9
         WHERE directory_id = $7 AND id = $8 AND status IN ('pending', 'processing')
         RETURNING chunk_count, chunks_done, owned_identities",
    )
    .bind(applied.accepted as i64)
    .bind(applied.failed as i64)
    .bind(applied.warnings as i64)
    .bind((applied.accepted + applied.failed) as i64)
    .bind(chunks_done as i64)
    .bind(now_ms())
    .bind(target.directory)
    .bind(target.source)
    .bind(owned as i64)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(false) };
    let (count, done): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    if done < count {
        return Ok(false);
    }
    // The scans for duplicates across commits find nothing new when every duplicate was within
    // one commit's rows, which flagged it already (`row::flag_duplicates_in_batch`): when one
    // commit holds the whole source, or when no commit found an identity owned (a value on
    // two rows committed apart makes the later commit find it owned). Skipping them saves
    // about 2.4 s at the end of a 1M-row ingest, and five statements (three scans, two around
    // them for their bound) of every small upload of known contacts.
    let owned: Option<i64> = row.try_get(2)?;
    let scan = !sole && owned != Some(0);
    finalize_source(conn, target, scan).await?;
    Ok(true)
}

/// Completes a source whose last chunk just committed, with its scans for duplicates across
/// commits if `scan`.
pub(super) async fn finalize_source(
    conn: &mut PgConnection,
    target: &Target,
    scan: bool,
) -> StoreResult<()> {
    if !scan {
        return complete_source(conn, target.directory, target.source).await;
    }
    // The scans read the whole source: the commit's statement bound, which is there to cut a
    // COPY whose sender froze, would fail a big source at the very end, every time it is
    // retried. It is lifted for them and put back for the COPY of what they found.
    let bound: String = sqlx::query_scalar(
        "SELECT current_setting('statement_timeout'), set_config('statement_timeout', '0', true)",
    )
    .fetch_one(&mut *conn)
    .await?;
    let mut buf = Vec::new();
    let (directory, source) = (target.directory.to_string(), target.source.to_string());
    for kind in resolve::IDENTITY_KINDS {
        for (row_number, line_number, value) in
            repeated_identities(conn, target.directory, target.source, kind).await?
        {
            let issue = row::duplicate_issue(kind, &value);
            issue_row(
                &mut buf,
                &directory,
                &source,
                row_number,
                line_number,
                &issue,
            );
        }
    }
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(bound)
        .execute(&mut *conn)
        .await?;
    insert_issues(conn, buf).await?;
    complete_source(conn, target.directory, target.source).await
}

#[cfg(test)]
mod tests {
    use super::copy_row;

    #[test]
    fn copy_rows_escape_only_what_copy_text_format_requires() {
        let mut buf = Vec::new();
        copy_row(&mut buf, &[Some("plain, \"quoted\" é"), None, Some("")]);
        copy_row(&mut buf, &[Some("tab\there"), Some("a\\b\r\nc")]);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "plain, \"quoted\" é\t\\N\t\ntab\\there\ta\\\\b\\r\\nc\n"
        );
    }
}
