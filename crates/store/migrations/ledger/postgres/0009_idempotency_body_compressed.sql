-- Stored responses of 4 KiB or more (a 1,000-transfer batch's is ~400 KB) are kept
-- LZ4-compressed by the server (block format, size prepended) in body_lz4, with body
-- ''; smaller ones stay in body as before, body_lz4 NULL. The compression moves out of
-- the database backend, the busiest process of the batch benchmark; EXTERNAL storage
-- keeps PostgreSQL from trying to compress the compressed bytes again.
ALTER TABLE idempotency_keys ADD COLUMN body_lz4 BYTEA;
ALTER TABLE idempotency_keys ALTER COLUMN body_lz4 SET STORAGE EXTERNAL;
