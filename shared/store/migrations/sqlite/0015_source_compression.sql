-- How an upload's file came, as in PostgreSQL (0018).
ALTER TABLE sources ADD COLUMN compression TEXT NOT NULL DEFAULT 'none';
ALTER TABLE sources ADD COLUMN received_bytes INTEGER;
