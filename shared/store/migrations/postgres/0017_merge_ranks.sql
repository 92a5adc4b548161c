-- The merge rank of each known field of a profile (docs/imports.md, "Merge rules"): 2 bits a
-- field in the order of the field columns, 0 for newer_wins, 1 keep_existing, 2 overwrite.
-- NULL while every field is newer_wins, which is every profile written before merge rules
-- existed, and every one written without them: adding the column rewrites nothing, and a
-- profile pays for it only once an import with rules writes it. Custom attributes keep their
-- ranks in their JSON.
ALTER TABLE profiles ADD COLUMN field_ranks BIGINT;
