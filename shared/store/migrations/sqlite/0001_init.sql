-- Timestamps are Unix milliseconds: they compare as numbers, which lease and TTL checks need.

CREATE TABLE organizations (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE users (
    id BLOB PRIMARY KEY,
    organization_id BLOB NOT NULL REFERENCES organizations(id),
    email TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    UNIQUE (organization_id, email)
);

CREATE TABLE tokens (
    hash BLOB PRIMARY KEY,
    organization_id BLOB NOT NULL REFERENCES organizations(id),
    user_id BLOB NOT NULL REFERENCES users(id),
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    revoked_ms INTEGER
);

CREATE TABLE directories (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id BLOB NOT NULL UNIQUE,
    organization_id BLOB NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    archived_ms INTEGER
);
CREATE INDEX directories_org ON directories (organization_id, seq);

CREATE TABLE sources (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id BLOB NOT NULL UNIQUE,
    organization_id BLOB NOT NULL REFERENCES organizations(id),
    directory_id BLOB NOT NULL REFERENCES directories(id),
    status TEXT NOT NULL,
    filename TEXT NOT NULL,
    byte_size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    object_key TEXT NOT NULL,
    encoding TEXT NOT NULL,
    delimiter INTEGER NOT NULL,
    bom_len INTEGER NOT NULL,
    columns TEXT NOT NULL,
    total_rows INTEGER NOT NULL,
    processed_rows INTEGER NOT NULL DEFAULT 0,
    accepted INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    warnings INTEGER NOT NULL DEFAULT 0,
    chunk_count INTEGER NOT NULL,
    chunks_done INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    completed_ms INTEGER
);
CREATE INDEX sources_dir ON sources (organization_id, directory_id, seq);
CREATE INDEX sources_status ON sources (status);

CREATE TABLE chunks (
    id BLOB PRIMARY KEY,
    source_id BLOB NOT NULL REFERENCES sources(id),
    idx INTEGER NOT NULL,
    first_row INTEGER NOT NULL,
    row_count INTEGER NOT NULL,
    start_offset INTEGER NOT NULL,
    end_offset INTEGER NOT NULL,
    start_line INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_token BLOB,
    lease_expires_ms INTEGER,
    queued_ms INTEGER,
    not_before_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    UNIQUE (source_id, idx)
);
CREATE INDEX chunks_open ON chunks (state) WHERE state IN ('pending', 'running');

CREATE TABLE profiles (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id BLOB NOT NULL UNIQUE,
    organization_id BLOB NOT NULL REFERENCES organizations(id),
    directory_id BLOB NOT NULL REFERENCES directories(id),
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX profiles_dir ON profiles (directory_id, seq);

-- Within a directory an identity belongs to at most one profile: the primary key says so.
CREATE TABLE profile_identities (
    directory_id BLOB NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    profile_id BLOB NOT NULL REFERENCES profiles(id),
    PRIMARY KEY (directory_id, kind, value)
);
CREATE INDEX profile_identities_profile ON profile_identities (profile_id);

-- Keyed by (source, row): a redelivered chunk can never add a record twice.
CREATE TABLE records (
    source_id BLOB NOT NULL REFERENCES sources(id),
    row_number INTEGER NOT NULL,
    line_number INTEGER NOT NULL,
    profile_id BLOB NOT NULL REFERENCES profiles(id),
    email TEXT,
    linkedin_url TEXT,
    phone TEXT,
    fields TEXT NOT NULL,
    attributes TEXT NOT NULL,
    PRIMARY KEY (source_id, row_number)
);
CREATE INDEX records_email ON records (source_id, email) WHERE email IS NOT NULL;
CREATE INDEX records_linkedin ON records (source_id, linkedin_url) WHERE linkedin_url IS NOT NULL;
CREATE INDEX records_phone ON records (source_id, phone) WHERE phone IS NOT NULL;

CREATE TABLE row_issues (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id BLOB NOT NULL REFERENCES sources(id),
    row_number INTEGER NOT NULL,
    line_number INTEGER NOT NULL,
    severity TEXT NOT NULL,
    code TEXT NOT NULL,
    column_name TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL,
    value TEXT
);
CREATE UNIQUE INDEX row_issues_unique ON row_issues (source_id, row_number, code, column_name);

CREATE TABLE failed_rows (
    source_id BLOB NOT NULL REFERENCES sources(id),
    row_number INTEGER NOT NULL,
    line_number INTEGER NOT NULL,
    fields TEXT NOT NULL,
    error_code TEXT NOT NULL,
    error_message TEXT NOT NULL,
    PRIMARY KEY (source_id, row_number)
);

CREATE TABLE idempotency_keys (
    organization_id BLOB NOT NULL,
    key TEXT NOT NULL,
    directory_id BLOB NOT NULL,
    state TEXT NOT NULL,
    claim_token BLOB NOT NULL,
    sha256 TEXT,
    source_id BLOB,
    response TEXT,
    locked_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (organization_id, key)
);
