-- A worker commits a chunk in slices, each in its own transaction; the chunk remembers where
-- the first record no slice has committed starts, so a takeover resumes there. NULL until the
-- first slice commits.
ALTER TABLE chunks
    ADD COLUMN resume_offset BIGINT,
    ADD COLUMN resume_line BIGINT,
    ADD COLUMN resume_row BIGINT;
