-- An organization's own scheduling weight and upload limits, set by `orbit-gateway admin
-- set-limits`; a NULL column takes the configured default (docs/operations.md).
CREATE TABLE organization_limits (
    organization_id UUID PRIMARY KEY REFERENCES organizations(id),
    weight INTEGER CHECK (weight > 0),
    max_uploads_in_flight BIGINT CHECK (max_uploads_in_flight >= 0),
    max_queued_rows BIGINT CHECK (max_queued_rows >= 0),
    max_uploads_per_minute BIGINT CHECK (max_uploads_per_minute >= 0),
    updated_ms BIGINT NOT NULL
);

-- The fair scheduler's virtual times (docs/concurrency.md, "Fair shares"): one row per
-- organization and per directory that had chunks run, holding the pass its next chunk starts
-- from; an organization's row also keeps the virtual time of its directories, and the row of
-- the nil UUID the virtual time of the whole service. Only the order of passes matters: a row
-- lost or reset costs at most one chunk's share.
CREATE TABLE scheduler_shares (
    id UUID PRIMARY KEY,
    pass DOUBLE PRECISION NOT NULL,
    vtime DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_ms BIGINT NOT NULL
);

-- The fair scheduler reads each unfinished source's first chunk ready to run: one probe here
-- per source, however many chunks wait.
CREATE INDEX chunks_ready ON chunks (directory_id, source_id, idx) WHERE state = 'pending';
