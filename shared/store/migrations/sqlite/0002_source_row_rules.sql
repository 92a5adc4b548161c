-- The row rules an upload was validated with travel with its source, so that every worker
-- judges the remaining chunks exactly as the gateway judged the first rows.
ALTER TABLE sources ADD COLUMN max_field_bytes INTEGER NOT NULL DEFAULT 8192;
ALTER TABLE sources ADD COLUMN default_region TEXT NOT NULL DEFAULT 'US';
