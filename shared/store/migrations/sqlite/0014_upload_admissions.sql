-- Uploads admitted under their organization's limits, as in PostgreSQL (0016).
CREATE TABLE upload_admissions (
    id BLOB PRIMARY KEY,
    organization_id BLOB NOT NULL,
    owner TEXT NOT NULL,
    admitted_ms INTEGER NOT NULL,
    open_until_ms INTEGER NOT NULL
);
CREATE INDEX upload_admissions_org ON upload_admissions (organization_id, admitted_ms);

-- An organization's unfinished sources, counted at every admission.
CREATE INDEX sources_open_by_org ON sources (organization_id) WHERE status IN ('pending', 'processing');
