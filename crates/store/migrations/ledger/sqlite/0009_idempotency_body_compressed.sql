-- Stored responses of 4 KiB or more (a 1,000-transfer batch's is ~400 KB) are kept
-- LZ4-compressed (block format, size prepended) in body_lz4, with body ''; smaller ones
-- stay in body as before, body_lz4 NULL. SQLite stored them uncompressed: they were
-- about a third of the bytes a batch wrote.
ALTER TABLE idempotency_keys ADD COLUMN body_lz4 BLOB;
