-- These indexes served one query, the duplicate-in-file scan when a source finishes, and cost
-- three index insertions per imported row inside the per-directory critical section, where
-- every worker waits. The scan now reads the source's records by primary key once per
-- identity kind instead (measured in docs/performance.md).
DROP INDEX records_email;
DROP INDEX records_linkedin;
DROP INDEX records_phone;
