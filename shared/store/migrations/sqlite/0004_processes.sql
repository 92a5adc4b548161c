-- Every process that takes chunk leases (orbit-worker, or a gateway running the in-process
-- queue) heartbeats here about once a second, each heartbeat good until `expires_ms`. A lease
-- whose owner's heartbeat has expired is void at once, so the chunks of a killed worker are
-- taken over in seconds instead of when their lease runs out; the lease stays the backstop for
-- a process that heartbeats but no longer works on its chunk. A process that exits cleanly
-- deletes its row; rows of long-dead processes are swept by the reaper.
CREATE TABLE processes (
    owner TEXT PRIMARY KEY,
    heartbeat_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
