//! SQL that both backends run as it is, written once: the stores' statements and their
//! webhook outboxes'. Both dialects read `$n` placeholders; SQLite numbers them by first
//! appearance, so in every statement here they first appear in order ($1 before $2 …), which
//! a test checks. What differs between the dialects (locking, COPY, upserts, time functions)
//! stays in each backend's own module.

/// The columns of `rows::SourceRow` that say whether a source waits out transient trouble:
/// the oldest run among its unfinished chunks, and what that chunk's last attempt said. Read
/// through `UNIQUE (directory_id, source_id, idx)`, over one source's chunks only; the
/// directory is the statement's `$1`, not the outer row's, because a sharded database routes a
/// statement to one shard only when every table in it names its shard by a constant.
macro_rules! retrying {
    () => {
        "(SELECT MIN(c.transient_since_ms) FROM chunks c WHERE c.directory_id = $1 AND c.source_id = s.id AND c.state IN ('pending', 'running')) AS retrying_since_ms, \
         (SELECT c.last_error FROM chunks c WHERE c.directory_id = $1 AND c.source_id = s.id AND c.state IN ('pending', 'running') AND c.transient_since_ms IS NOT NULL ORDER BY c.transient_since_ms LIMIT 1) AS retrying_error"
    };
}

/// Leases a claimed chunk to its new owner.
pub(super) const TAKE_LEASE: &str = "UPDATE chunks SET state = 'running', attempts = attempts + 1, lease_owner = $1, lease_token = $2, lease_expires_ms = $3 WHERE directory_id = $4 AND id = $5";
/// A pending source is processing once a chunk of it is claimed.
pub(super) const SOURCE_PROCESSING: &str = "UPDATE sources SET status = 'processing', updated_ms = $1 WHERE directory_id = $2 AND id = $3 AND status = 'pending'";
/// Gives a chunk back after a failed attempt, to be tried again after `not_before_ms`.
pub(super) const RELEASE_CHUNK: &str = "UPDATE chunks SET state = 'pending', lease_token = NULL, lease_owner = NULL, lease_expires_ms = NULL, queued_ms = NULL, not_before_ms = $1, last_error = $2, attempts = attempts - $3, transient_since_ms = $4 WHERE directory_id = $5 AND id = $6";
/// Gives back a chunk whose claim by `$3` failed without an answer ($1 directory, $2 chunk):
/// pending again and unpublished, so the reaper publishes it; had the claim taken the lease
/// after all, the lease is dropped and its attempt given back.
pub(super) const GIVE_BACK: &str = "UPDATE chunks SET attempts = attempts - CASE WHEN state = 'running' AND attempts > 0 THEN 1 ELSE 0 END, state = 'pending', lease_owner = NULL, lease_token = NULL, lease_expires_ms = NULL, queued_ms = NULL WHERE directory_id = $1 AND id = $2 AND (state = 'pending' OR (state = 'running' AND lease_owner = $3))";
/// Moves one pass (`fair::Advance`): $1 its id, $2 the floor, $3 the charge, $4 the floor of
/// its virtual time, $5 now. One statement, so concurrent advances of a row all count.
pub(super) const ADVANCE_PASS: &str =
    "INSERT INTO scheduler_shares (id, pass, vtime, updated_ms) VALUES ($1, $2 + $3, $4, $5)
     ON CONFLICT (id) DO UPDATE SET
         pass = CASE WHEN scheduler_shares.pass > $2 THEN scheduler_shares.pass ELSE $2 END + $3,
         vtime = CASE WHEN scheduler_shares.vtime > $4 THEN scheduler_shares.vtime ELSE $4 END,
         updated_ms = $5";
/// Records the answer of an upload under its idempotency key, if the claim is still this request's.
pub(super) const IDEMPOTENCY_COMPLETED: &str = "UPDATE idempotency_keys SET state = 'completed', sha256 = $1, source_id = $2, response = $3 WHERE directory_id = $4 AND key = $5 AND claim_token = $6";
/// A source by id, unscoped: for the store's own use after a scoped check.
pub(super) const SOURCE_BY_ID: &str = "SELECT * FROM sources WHERE directory_id = $1 AND id = $2";
/// The open chunks of a source that failed.
pub(super) const FAIL_OPEN_CHUNKS: &str = "UPDATE chunks SET state = 'failed', lease_token = NULL, lease_owner = NULL WHERE directory_id = $1 AND source_id = $2 AND state IN ('pending', 'running')";
/// A planned chunk of an upload.
pub(super) const INSERT_CHUNK: &str = "INSERT INTO chunks (id, directory_id, source_id, idx, first_row, row_count, start_offset, end_offset, start_line, state, queued_ms, traceparent, tracestate) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";
pub(super) const INSERT_ORGANIZATION: &str =
    "INSERT INTO organizations (id, name, created_ms) VALUES ($1, $2, $3)";
pub(super) const ORGANIZATION_EXISTS: &str = "SELECT 1 FROM organizations WHERE id = $1";
pub(super) const USER_BY_EMAIL: &str =
    "SELECT id FROM users WHERE organization_id = $1 AND email = $2";
pub(super) const INSERT_TOKEN: &str = "INSERT INTO tokens (hash, organization_id, user_id, created_ms, expires_ms) VALUES ($1, $2, $3, $4, $5)";
pub(super) const TOKEN_BY_HASH: &str =
    "SELECT organization_id, user_id, expires_ms, revoked_ms FROM tokens WHERE hash = $1";
pub(super) const REVOKE_TOKEN: &str =
    "UPDATE tokens SET revoked_ms = $1 WHERE hash = $2 AND revoked_ms IS NULL";
pub(super) const DIRECTORY: &str =
    "SELECT * FROM directories WHERE organization_id = $1 AND id = $2";
/// A page of an organization's directories, oldest first.
pub(super) const DIRECTORIES_PAGE: &str =
    "SELECT * FROM directories WHERE organization_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
/// Records which directory a key of the organization is used on ($1 organization, $2 key,
/// $3 directory, $4 expiry, $5 now): returns a row unless the key is in use on another
/// directory and has not expired.
pub(super) const SCOPE_KEY: &str = "INSERT INTO idempotency_scopes (organization_id, key, directory_id, expires_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id, key) DO UPDATE SET directory_id = excluded.directory_id, expires_ms = excluded.expires_ms WHERE idempotency_scopes.directory_id = excluded.directory_id OR idempotency_scopes.expires_ms < $5 RETURNING directory_id";
/// Forgets a released key's directory, so that the key is free for any directory again.
pub(super) const UNSCOPE_KEY: &str =
    "DELETE FROM idempotency_scopes WHERE organization_id = $1 AND key = $2 AND directory_id = $3";
/// Frees a key whose request failed, if the claim is still this request's.
pub(super) const RELEASE_IDEMPOTENCY_KEY: &str = "DELETE FROM idempotency_keys WHERE directory_id = $1 AND key = $2 AND claim_token = $3 AND state = 'in_flight'";
/// A source as clients see it, scoped to its directory ($1) and organization ($2).
pub(super) const SOURCE: &str = concat!(
    "SELECT s.*, ",
    retrying!(),
    " FROM sources s WHERE directory_id = $1 AND organization_id = $2 AND id = $3"
);
/// A page of a directory's ($1) sources as clients see them, newest first; $2 the organization.
pub(super) const SOURCES_PAGE: &str = concat!(
    "SELECT s.*, ",
    retrying!(),
    " FROM sources s WHERE directory_id = $1 AND organization_id = $2 AND seq < $3 ORDER BY seq DESC LIMIT $4"
);
pub(super) const FAILED_ROWS_PAGE: &str = "SELECT * FROM failed_rows WHERE directory_id = $1 AND source_id = $2 AND row_number > $3 ORDER BY row_number LIMIT $4";
pub(super) const RENEW_LEASE: &str = "UPDATE chunks SET lease_expires_ms = $1 WHERE directory_id = $2 AND id = $3 AND lease_token = $4 AND state = 'running'";
/// Processes dead for long: their leases were taken over long ago.
pub(super) const FORGET_DEAD_PROCESSES: &str = "DELETE FROM processes WHERE expires_ms < $1";
pub(super) const RETIRE_PROCESS: &str = "DELETE FROM processes WHERE owner = $1";
/// At start-up: every open chunk is to be published again, and running ones taken over.
pub(super) const FORGET_QUEUED: &str = "UPDATE chunks SET queued_ms = NULL, lease_expires_ms = CASE WHEN state = 'running' THEN 0 ELSE lease_expires_ms END WHERE state IN ('pending', 'running')";
pub(super) const FAILED_SOURCES_BY_CODE: &str = "SELECT COALESCE(error_code, '') AS code, COUNT(*) AS n FROM sources WHERE status = 'failed' GROUP BY 1";
pub(super) const SOURCES_BY_STATUS: &str =
    "SELECT status, COUNT(*) AS n FROM sources GROUP BY status";
pub(super) const OPEN_CHUNKS: &str =
    "SELECT COUNT(*) FROM chunks WHERE state IN ('pending', 'running')";
/// Per organization with unfinished sources: their rows not yet processed, and their latest
/// progress (`crate::backlog`).
pub(super) const ORGANIZATION_QUEUED_ROWS: &str = "SELECT organization_id, CAST(SUM(total_rows - processed_rows) AS BIGINT) AS queued_rows, MAX(updated_ms) AS progress_ms FROM sources WHERE status IN ('pending', 'processing') GROUP BY organization_id";
/// Per organization: its chunks ready at $1 (pending, past their `not_before_ms`) and when the
/// oldest became ready: at its `not_before_ms` if a failed attempt set one, else when its
/// source was uploaded. A colocated join (both tables are sharded by directory).
pub(super) const ORGANIZATION_READY_CHUNKS: &str = "SELECT s.organization_id, COUNT(*) AS ready_chunks, MIN(CASE WHEN c.not_before_ms > s.created_ms THEN c.not_before_ms ELSE s.created_ms END) AS ready_since_ms FROM chunks c JOIN sources s ON s.directory_id = c.directory_id AND s.id = c.source_id WHERE c.state = 'pending' AND c.not_before_ms <= $1 AND s.status IN ('pending', 'processing') GROUP BY s.organization_id";

/// Records a process's heartbeat.
pub(super) const HEARTBEAT: &str = "INSERT INTO processes (owner, heartbeat_ms, expires_ms) VALUES ($1, $2, $3) ON CONFLICT (owner) DO UPDATE SET heartbeat_ms = excluded.heartbeat_ms, expires_ms = excluded.expires_ms";
pub(super) const INSERT_USER: &str = "INSERT INTO users (id, organization_id, email, created_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id, email) DO NOTHING";
pub(super) const INSERT_DIRECTORY: &str = "INSERT INTO directories (id, organization_id, name, created_ms) VALUES ($1, $2, $3, $4) RETURNING *";
/// Archives a directory once: archiving it again keeps the first time.
pub(super) const ARCHIVE_DIRECTORY: &str = "UPDATE directories SET archived_ms = COALESCE(archived_ms, $1) WHERE organization_id = $2 AND id = $3 RETURNING *";
/// A page of a source's row issues, in row order, after the cursor (row, id).
pub(super) const ISSUES_PAGE: &str = "SELECT i.* FROM row_issues i JOIN sources s ON s.directory_id = i.directory_id AND s.id = i.source_id WHERE s.organization_id = $1 AND s.directory_id = $2 AND i.directory_id = $2 AND i.source_id = $3 AND (i.row_number, i.id) > ($4, $5) ORDER BY i.row_number, i.id LIMIT $6";
/// A failed source's failed chunks, open again with fresh attempts.
pub(super) const REOPEN_CHUNKS: &str = "UPDATE chunks SET state = 'pending', attempts = 0, lease_owner = NULL, lease_token = NULL, lease_expires_ms = NULL, queued_ms = NULL, not_before_ms = 0, last_error = NULL, transient_since_ms = NULL WHERE directory_id = $1 AND source_id = $2 AND state = 'failed' RETURNING id, traceparent, tracestate";
pub(super) const REOPEN_SOURCE: &str = "UPDATE sources SET status = 'processing', error_code = NULL, error_message = NULL, completed_ms = NULL, updated_ms = $1 WHERE directory_id = $2 AND id = $3";
/// Ends an open source failed; a source already ended stays as it is.
pub(super) const FAIL_SOURCE: &str = "UPDATE sources SET status = 'failed', error_code = $1, error_message = $2, completed_ms = $3, updated_ms = $3 WHERE directory_id = $4 AND id = $5 AND status IN ('pending', 'processing')";
/// Completes an open source whose rows all add up, its warnings counted by row at last.
pub(super) const COMPLETE_SOURCE: &str = "UPDATE sources SET warnings = (SELECT COUNT(DISTINCT row_number) FROM row_issues WHERE directory_id = $1 AND source_id = $2 AND severity = 'warning'), status = 'completed', completed_ms = $3, updated_ms = $3 WHERE directory_id = $1 AND id = $2 AND status IN ('pending', 'processing')";

/// The rows of a source ($1 its directory, $2 itself) whose `kind` identity an earlier row of
/// it has: one pass over the source's records, sorted by value (`collate` names a bytewise
/// collation where the database's default is not one: equal values are equal bytes either way,
/// and bytes sort faster).
///
/// A window rather than a join of the records with their grouped selves: the planner, which
/// sees a young source's records as one row until statistics catch up (and never, with
/// autovacuum off), joined them by nested loop, so that a 30,000-row re-import spent nine
/// minutes here.
pub(super) fn repeated_identities(kind: &str, collate: &str) -> String {
    format!(
        "SELECT row_number, line_number, value FROM (
             SELECT row_number, line_number, {kind} AS value,
                    MIN(row_number) OVER (PARTITION BY {kind}{collate}) AS first
             FROM records WHERE directory_id = $1 AND source_id = $2 AND {kind} IS NOT NULL) r
         WHERE row_number > first"
    )
}

// Webhook endpoints and deliveries.
/// The enabled webhook endpoints of an organization, for the events of an ending source.
pub(super) const SUBSCRIBED_ENDPOINTS: &str =
    "SELECT * FROM webhook_endpoints WHERE organization_id = $1 AND disabled_ms IS NULL";
pub(super) const INSERT_ENDPOINT: &str = "INSERT INTO webhook_endpoints (id, organization_id, directory_id, url, events, secret, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)";
/// An organization's webhook endpoints, oldest first.
pub(super) const ENDPOINTS: &str =
    "SELECT * FROM webhook_endpoints WHERE organization_id = $1 ORDER BY created_ms, id";
pub(super) const ENDPOINT: &str =
    "SELECT * FROM webhook_endpoints WHERE organization_id = $1 AND id = $2";
/// Enables an endpoint again, its failure run back at 0.
pub(super) const ENABLE_ENDPOINT: &str = "UPDATE webhook_endpoints SET disabled_ms = NULL, failure_run = 0 WHERE organization_id = $1 AND id = $2 RETURNING *";
/// An endpoint's newest deliveries.
pub(super) const DELIVERIES_PAGE: &str = "SELECT d.* FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id WHERE e.organization_id = $1 AND d.endpoint_id = $2 ORDER BY d.created_ms DESC, d.id DESC LIMIT $3";
/// An endpoint that answered 2xx starts its failure run over.
pub(super) const ENDPOINT_SUCCEEDED: &str =
    "UPDATE webhook_endpoints SET failure_run = 0 WHERE id = $1";
/// A source's end, queued for one endpoint.
pub(super) const INSERT_DELIVERY: &str = "INSERT INTO webhook_deliveries (id, directory_id, endpoint_id, source_id, event_type, payload, state, next_attempt_ms, created_ms) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7)";
/// An attempt's record; a second record of the same attempt (a retried transaction) is dropped.
pub(super) const INSERT_ATTEMPT: &str = "INSERT INTO webhook_attempts (directory_id, delivery_id, attempt, at_ms, status_code, error, duration_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING";
/// What an attempt leaves of its delivery: its state, when it is due again, its lease gone.
pub(super) const DELIVERY_ATTEMPTED: &str = "UPDATE webhook_deliveries SET state = $1, attempts = attempts + 1, next_attempt_ms = COALESCE($2, next_attempt_ms), lease_token = NULL, lease_until_ms = NULL, delivered_ms = CASE WHEN $3 THEN $4 ELSE delivered_ms END WHERE directory_id = $5 AND id = $6";
/// An endpoint that failed: its failure run grows, and at `disable_after` ($1) it is disabled.
pub(super) const ENDPOINT_FAILED: &str = "UPDATE webhook_endpoints SET failure_run = failure_run + 1, disabled_ms = CASE WHEN disabled_ms IS NULL AND failure_run + 1 >= $1 THEN $2 ELSE disabled_ms END WHERE id = $3";

// Per-organization limits (`crate::limits`).
/// An organization's own values.
pub(super) const ORGANIZATION_LIMITS: &str = "SELECT CAST(weight AS BIGINT) AS weight, max_uploads_in_flight, max_queued_rows, max_uploads_per_minute FROM organization_limits WHERE organization_id = $1";
/// Writes an organization's own values, all four at once.
pub(super) const UPSERT_ORGANIZATION_LIMITS: &str = "INSERT INTO organization_limits (organization_id, weight, max_uploads_in_flight, max_queued_rows, max_uploads_per_minute, updated_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (organization_id) DO UPDATE SET weight = excluded.weight, max_uploads_in_flight = excluded.max_uploads_in_flight, max_queued_rows = excluded.max_queued_rows, max_uploads_per_minute = excluded.max_uploads_per_minute, updated_ms = excluded.updated_ms";
/// An organization's unfinished sources and the rows they have still to process (through
/// `sources_open_by_org`; on a sharded database a read of every shard, without locks).
pub(super) const OPEN_SOURCES: &str = "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(total_rows - processed_rows), 0) AS BIGINT) AS queued_rows FROM sources WHERE organization_id = $1 AND status IN ('pending', 'processing')";
/// An organization's ($1) admissions since $2: the per-minute count and the oldest of them.
pub(super) const ADMISSIONS_SINCE: &str = "SELECT COUNT(*) AS n, MIN(admitted_ms) AS oldest FROM upload_admissions WHERE organization_id = $1 AND admitted_ms > $2";
pub(super) const INSERT_ADMISSION: &str = "INSERT INTO upload_admissions (id, organization_id, owner, admitted_ms, open_until_ms) VALUES ($1, $2, $3, $4, $5)";
/// The admitted upload's source exists: the source counts as in flight from now on.
pub(super) const CLOSE_ADMISSION: &str =
    "UPDATE upload_admissions SET open_until_ms = 0 WHERE id = $1";
pub(super) const DELETE_ADMISSION: &str = "DELETE FROM upload_admissions WHERE id = $1";
/// Whether a finished request's answer is kept under the key ($1 directory, $2 key, $3
/// organization, $4 now).
pub(super) const KEY_COMPLETED: &str = "SELECT 1 FROM idempotency_keys WHERE directory_id = $1 AND key = $2 AND organization_id = $3 AND state = 'completed' AND expires_ms > $4";

#[cfg(test)]
mod tests {
    /// Every shared statement, for the placeholder check.
    const ALL: &[&str] = &[
        super::TAKE_LEASE,
        super::SOURCE_PROCESSING,
        super::RELEASE_CHUNK,
        super::GIVE_BACK,
        super::IDEMPOTENCY_COMPLETED,
        super::SOURCE_BY_ID,
        super::FAIL_OPEN_CHUNKS,
        super::INSERT_CHUNK,
        super::INSERT_ORGANIZATION,
        super::ORGANIZATION_EXISTS,
        super::USER_BY_EMAIL,
        super::INSERT_TOKEN,
        super::TOKEN_BY_HASH,
        super::REVOKE_TOKEN,
        super::DIRECTORY,
        super::DIRECTORIES_PAGE,
        super::RELEASE_IDEMPOTENCY_KEY,
        super::SCOPE_KEY,
        super::UNSCOPE_KEY,
        super::SOURCE,
        super::SOURCES_PAGE,
        super::FAILED_ROWS_PAGE,
        super::RENEW_LEASE,
        super::FORGET_DEAD_PROCESSES,
        super::RETIRE_PROCESS,
        super::FORGET_QUEUED,
        super::FAILED_SOURCES_BY_CODE,
        super::SOURCES_BY_STATUS,
        super::OPEN_CHUNKS,
        super::SUBSCRIBED_ENDPOINTS,
        super::INSERT_ENDPOINT,
        super::ENDPOINTS,
        super::ENDPOINT,
        super::ENABLE_ENDPOINT,
        super::DELIVERIES_PAGE,
        super::ENDPOINT_SUCCEEDED,
        super::HEARTBEAT,
        super::INSERT_USER,
        super::INSERT_DIRECTORY,
        super::ARCHIVE_DIRECTORY,
        super::ISSUES_PAGE,
        super::REOPEN_CHUNKS,
        super::REOPEN_SOURCE,
        super::FAIL_SOURCE,
        super::COMPLETE_SOURCE,
        super::INSERT_DELIVERY,
        super::INSERT_ATTEMPT,
        super::DELIVERY_ATTEMPTED,
        super::ENDPOINT_FAILED,
        super::ORGANIZATION_LIMITS,
        super::UPSERT_ORGANIZATION_LIMITS,
        super::OPEN_SOURCES,
        super::ADMISSIONS_SINCE,
        super::INSERT_ADMISSION,
        super::CLOSE_ADMISSION,
        super::DELETE_ADMISSION,
        super::KEY_COMPLETED,
        super::super::rows::CHUNK_DONE,
        super::super::rows::CHUNK_RESUMES_AT,
    ];

    #[test]
    fn placeholders_first_appear_in_order() {
        let repeated = super::repeated_identities("email", "");
        for sql in ALL.iter().copied().chain([repeated.as_str()]) {
            let mut seen = Vec::new();
            let mut rest = sql;
            while let Some(at) = rest.find('$') {
                rest = &rest[at + 1..];
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let n: usize = digits.parse().expect("a $n placeholder");
                if !seen.contains(&n) {
                    seen.push(n);
                }
            }
            let expected: Vec<usize> = (1..=seen.len()).collect();
            assert_eq!(seen, expected, "{sql}");
        }
    }
}
