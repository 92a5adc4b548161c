-- The process (see `processes`) holding an in-flight idempotency claim. When it dies, the
-- claim is taken over as soon as its heartbeat expires, instead of after
-- `idempotency.in_flight_timeout`: a crashed gateway no longer locks its clients' keys.
ALTER TABLE idempotency_keys ADD COLUMN owner TEXT;
