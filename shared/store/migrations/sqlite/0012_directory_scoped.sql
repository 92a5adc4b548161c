-- The tables a directory's imports write carry the directory, as in PostgreSQL, where it
-- leads their keys so that the schema can be sharded by directory (docs/scaling.md): the
-- statements both backends share name it. Here the keys stay as they are.
ALTER TABLE chunks ADD COLUMN directory_id BLOB;
UPDATE chunks SET directory_id = (SELECT s.directory_id FROM sources s WHERE s.id = chunks.source_id);
ALTER TABLE records ADD COLUMN directory_id BLOB;
UPDATE records SET directory_id = (SELECT s.directory_id FROM sources s WHERE s.id = records.source_id);
ALTER TABLE row_issues ADD COLUMN directory_id BLOB;
UPDATE row_issues SET directory_id = (SELECT s.directory_id FROM sources s WHERE s.id = row_issues.source_id);
ALTER TABLE failed_rows ADD COLUMN directory_id BLOB;
UPDATE failed_rows SET directory_id = (SELECT s.directory_id FROM sources s WHERE s.id = failed_rows.source_id);
ALTER TABLE webhook_deliveries ADD COLUMN directory_id BLOB;
UPDATE webhook_deliveries SET directory_id = (SELECT s.directory_id FROM sources s WHERE s.id = webhook_deliveries.source_id);
ALTER TABLE webhook_attempts ADD COLUMN directory_id BLOB;
UPDATE webhook_attempts SET directory_id = (SELECT d.directory_id FROM webhook_deliveries d WHERE d.id = webhook_attempts.delivery_id);

-- Which directory a key of the organization was first used on, while it lives: a reuse on
-- another directory is refused (422). PostgreSQL needs it once its keys live per directory;
-- here it is the same table, so both backends decide alike.
CREATE TABLE idempotency_scopes (
    organization_id BLOB NOT NULL,
    key TEXT NOT NULL,
    directory_id BLOB NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (organization_id, key)
);
INSERT INTO idempotency_scopes (organization_id, key, directory_id, expires_ms)
SELECT organization_id, key, directory_id, expires_ms FROM idempotency_keys;
