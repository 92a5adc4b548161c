-- When a chunk's current run of transient failures (storage, network, database trouble)
-- began: such failures give their attempt back until the run is older than
-- `worker.transient_retry_for`, so an outage does not poison an import.
ALTER TABLE chunks ADD COLUMN transient_since_ms BIGINT;
