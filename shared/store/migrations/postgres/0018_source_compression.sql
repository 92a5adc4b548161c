-- How an upload's file came (docs/imports.md, "Compressed files"): byte_size and sha256 keep
-- describing the CSV as stored, decompressed; received_bytes is the file as it came over the
-- wire, NULL when that is the same. A constant default adds the column without rewriting.
ALTER TABLE sources ADD COLUMN compression TEXT NOT NULL DEFAULT 'none';
ALTER TABLE sources ADD COLUMN received_bytes BIGINT;
