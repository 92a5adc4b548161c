-- The W3C trace context (`traceparent`, `tracestate`) of the upload that queued each chunk.
-- The reaper publishes a chunk again with it, so a worker that takes a republished chunk still
-- reports its spans in the upload's trace. NULL when the gateway was not tracing.
ALTER TABLE chunks ADD COLUMN traceparent TEXT;
ALTER TABLE chunks ADD COLUMN tracestate TEXT;
