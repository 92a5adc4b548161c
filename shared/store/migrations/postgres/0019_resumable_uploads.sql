-- Resumable (tus) uploads (docs/imports.md, "Resumable uploads"). An upload's bytes are stored
-- as parts, each an object of its own, recorded here once written; `upload_offset` is the sum
-- of the recorded parts, so what a `HEAD` reports is durable. `generation` fences `PATCH`es:
-- each takes the upload over by bumping it, and a part is recorded only by the generation
-- that wrote it. `cleanup_ms` is set when an upload leaves `receiving` and its parts still
-- have to be removed from the object store. Sharded by directory under Citus, colocated with
-- `sources`, so the commit that records an upload's source records it here too, on one node.
CREATE TABLE resumable_uploads (
    directory_id UUID NOT NULL,
    id UUID NOT NULL,
    organization_id UUID NOT NULL,
    upload_length BIGINT,
    upload_offset BIGINT NOT NULL,
    metadata TEXT NOT NULL,
    generation BIGINT NOT NULL,
    state TEXT NOT NULL,
    source_id UUID,
    error TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    cleanup_ms BIGINT,
    PRIMARY KEY (directory_id, id)
);
CREATE INDEX resumable_uploads_expiry ON resumable_uploads (expires_ms);
CREATE INDEX resumable_uploads_cleanup ON resumable_uploads (cleanup_ms) WHERE cleanup_ms IS NOT NULL;

CREATE TABLE resumable_parts (
    directory_id UUID NOT NULL,
    upload_id UUID NOT NULL,
    start_offset BIGINT NOT NULL,
    byte_size BIGINT NOT NULL,
    object_key TEXT NOT NULL,
    PRIMARY KEY (directory_id, upload_id, start_offset)
);
