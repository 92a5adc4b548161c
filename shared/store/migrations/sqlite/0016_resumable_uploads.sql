-- Resumable (tus) uploads and their stored parts, as in PostgreSQL (0019).
CREATE TABLE resumable_uploads (
    directory_id BLOB NOT NULL,
    id BLOB NOT NULL,
    organization_id BLOB NOT NULL,
    upload_length INTEGER,
    upload_offset INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    source_id BLOB,
    error TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    cleanup_ms INTEGER,
    PRIMARY KEY (directory_id, id)
);
CREATE INDEX resumable_uploads_expiry ON resumable_uploads (expires_ms);
CREATE INDEX resumable_uploads_cleanup ON resumable_uploads (cleanup_ms) WHERE cleanup_ms IS NOT NULL;

CREATE TABLE resumable_parts (
    directory_id BLOB NOT NULL,
    upload_id BLOB NOT NULL,
    start_offset INTEGER NOT NULL,
    byte_size INTEGER NOT NULL,
    object_key TEXT NOT NULL,
    PRIMARY KEY (directory_id, upload_id, start_offset)
);
