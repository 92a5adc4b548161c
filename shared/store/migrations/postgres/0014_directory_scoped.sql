-- Every table a directory's imports write carries the directory and leads its primary key
-- with it, so the schema can be sharded by directory (Citus: docs/scaling.md) and every
-- transaction of the ingest path names the one shard it touches. On one PostgreSQL nothing
-- changes but a 16-byte wider key on the bulk tables.
--
-- The foreign keys between a directory's tables and from them to the organization's tables
-- go: a sharded table may only reference a table colocated with it by its whole sharding key
-- or a table copied to every node, and the order in which tables become either would matter.
-- Orbit writes these rows only in the transaction that creates or holds their parents, and
-- never deletes a source, a directory or an organization (0004 dropped the bulk tables' keys
-- for the same reason); deleting a webhook endpoint deletes its deliveries and attempts
-- explicitly, as SQLite does.
ALTER TABLE sources DROP CONSTRAINT sources_organization_id_fkey;
ALTER TABLE sources DROP CONSTRAINT sources_directory_id_fkey;
ALTER TABLE chunks DROP CONSTRAINT chunks_source_id_fkey;
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_endpoint_id_fkey;
ALTER TABLE webhook_attempts DROP CONSTRAINT webhook_attempts_delivery_id_fkey;

-- sources: found by (directory, id); the sequence still orders them (and versions their
-- profile writes) but is no key.
ALTER TABLE sources DROP CONSTRAINT sources_pkey;
ALTER TABLE sources DROP CONSTRAINT sources_id_key;
ALTER TABLE sources ADD PRIMARY KEY (directory_id, id);

ALTER TABLE chunks ADD COLUMN directory_id UUID;
UPDATE chunks c SET directory_id = s.directory_id FROM sources s WHERE s.id = c.source_id;
ALTER TABLE chunks ALTER COLUMN directory_id SET NOT NULL;
ALTER TABLE chunks DROP CONSTRAINT chunks_pkey;
ALTER TABLE chunks DROP CONSTRAINT chunks_source_id_idx_key;
ALTER TABLE chunks ADD PRIMARY KEY (directory_id, id);
ALTER TABLE chunks ADD UNIQUE (directory_id, source_id, idx);

ALTER TABLE records ADD COLUMN directory_id UUID;
UPDATE records r SET directory_id = s.directory_id FROM sources s WHERE s.id = r.source_id;
ALTER TABLE records ALTER COLUMN directory_id SET NOT NULL;
ALTER TABLE records DROP CONSTRAINT records_pkey;
ALTER TABLE records ADD PRIMARY KEY (directory_id, source_id, row_number);

ALTER TABLE row_issues ADD COLUMN directory_id UUID;
UPDATE row_issues i SET directory_id = s.directory_id FROM sources s WHERE s.id = i.source_id;
ALTER TABLE row_issues ALTER COLUMN directory_id SET NOT NULL;
ALTER TABLE row_issues DROP CONSTRAINT row_issues_pkey;
ALTER TABLE row_issues ADD PRIMARY KEY (directory_id, id);
DROP INDEX row_issues_unique;
CREATE UNIQUE INDEX row_issues_unique ON row_issues (directory_id, source_id, row_number, code, column_name);

ALTER TABLE failed_rows ADD COLUMN directory_id UUID;
UPDATE failed_rows f SET directory_id = s.directory_id FROM sources s WHERE s.id = f.source_id;
ALTER TABLE failed_rows ALTER COLUMN directory_id SET NOT NULL;
ALTER TABLE failed_rows DROP CONSTRAINT failed_rows_pkey;
ALTER TABLE failed_rows ADD PRIMARY KEY (directory_id, source_id, row_number);

-- identities: the key already hashes the directory in; it now also leads the primary key.
ALTER TABLE identities DROP CONSTRAINT identities_pkey;
ALTER TABLE identities ADD PRIMARY KEY (directory_id, key);

-- Idempotency keys: the claim lives with its directory, so the upload's transaction completes
-- it on the directory's shard. Which directory a key of the organization was first used on
-- (what makes a reuse on another directory a 422) is `idempotency_scopes`, a small table kept
-- on the coordinator: see docs/scaling.md.
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
ALTER TABLE idempotency_keys ADD PRIMARY KEY (directory_id, key);
CREATE TABLE idempotency_scopes (
    organization_id UUID NOT NULL,
    key TEXT NOT NULL,
    directory_id UUID NOT NULL,
    expires_ms BIGINT NOT NULL,
    PRIMARY KEY (organization_id, key)
);
INSERT INTO idempotency_scopes (organization_id, key, directory_id, expires_ms)
SELECT organization_id, key, directory_id, expires_ms FROM idempotency_keys;

-- The webhook outbox: a source's end writes its deliveries in the transaction that ends it,
-- on the source's shard.
ALTER TABLE webhook_deliveries ADD COLUMN directory_id UUID;
UPDATE webhook_deliveries d SET directory_id = s.directory_id FROM sources s WHERE s.id = d.source_id;
ALTER TABLE webhook_deliveries ALTER COLUMN directory_id SET NOT NULL;
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_pkey;
ALTER TABLE webhook_deliveries ADD PRIMARY KEY (directory_id, id);

ALTER TABLE webhook_attempts ADD COLUMN directory_id UUID;
UPDATE webhook_attempts a SET directory_id = d.directory_id FROM webhook_deliveries d WHERE d.id = a.delivery_id;
ALTER TABLE webhook_attempts ALTER COLUMN directory_id SET NOT NULL;
ALTER TABLE webhook_attempts DROP CONSTRAINT webhook_attempts_pkey;
ALTER TABLE webhook_attempts ADD PRIMARY KEY (directory_id, delivery_id, attempt);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id);
