-- A dry run validates a file exactly as an import would (counts, row issues, failed rows) but
-- writes no record, profile or identity: the commit path checks this flag at one point.
ALTER TABLE sources ADD COLUMN dry_run BOOLEAN NOT NULL DEFAULT 0;
