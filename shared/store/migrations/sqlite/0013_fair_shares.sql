-- An organization's own scheduling weight and upload limits, set by `orbit-gateway admin
-- set-limits`; a NULL column takes the configured default (docs/operations.md).
CREATE TABLE organization_limits (
    organization_id BLOB PRIMARY KEY REFERENCES organizations(id),
    weight INTEGER CHECK (weight > 0),
    max_uploads_in_flight INTEGER CHECK (max_uploads_in_flight >= 0),
    max_queued_rows INTEGER CHECK (max_queued_rows >= 0),
    max_uploads_per_minute INTEGER CHECK (max_uploads_per_minute >= 0),
    updated_ms INTEGER NOT NULL
);

-- The fair scheduler's virtual times (docs/concurrency.md, "Fair shares"), as in PostgreSQL.
CREATE TABLE scheduler_shares (
    id BLOB PRIMARY KEY,
    pass REAL NOT NULL,
    vtime REAL NOT NULL DEFAULT 0,
    updated_ms INTEGER NOT NULL
);
