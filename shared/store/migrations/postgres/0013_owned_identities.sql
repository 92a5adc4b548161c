-- How many times a commit of the source found one of its rows' identities already owned (by an
-- earlier commit of the same source, or by another source). While it is 0, no value appears on
-- two rows committed apart, so completing the source skips the scan for in-file duplicates
-- across commits. Sources created before this column have NULL, which never skips the scan.
ALTER TABLE sources ADD COLUMN owned_identities BIGINT;
