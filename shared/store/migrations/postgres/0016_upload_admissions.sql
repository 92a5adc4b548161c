-- Uploads admitted under their organization's limits (docs/operations.md, "Per-organization
-- limits"). A row is written when an upload is admitted, before its body is read; it counts as
-- in flight until its source exists (`open_until_ms` is then set to 0) or the request ends
-- without one (the row is deleted), and is presumed dead once `open_until_ms` passes
-- (admitted + `ingest.max_upload_duration`) or its gateway (`owner`) stops heartbeating. Rows
-- of the last minute are the per-minute count; older closed ones are pruned by later
-- admissions of the same organization. A plain table on the coordinator under Citus
-- (shared/store/src/postgres/citus.rs), like `idempotency_scopes`: written on every upload.
CREATE TABLE upload_admissions (
    id UUID PRIMARY KEY,
    organization_id UUID NOT NULL,
    owner TEXT NOT NULL,
    admitted_ms BIGINT NOT NULL,
    open_until_ms BIGINT NOT NULL
);
CREATE INDEX upload_admissions_org ON upload_admissions (organization_id, admitted_ms);

-- An organization's unfinished sources, counted at every admission: their number and the rows
-- they still have to process.
CREATE INDEX sources_open_by_org ON sources (organization_id) WHERE status IN ('pending', 'processing');
