-- Stored responses (a batch's is ~400 KB) are compressed with lz4 instead of pglz
-- when this server was built with lz4 (Debian's and the PostgreSQL project's packages
-- are): `pglz_compress` was ~6% of the backend's CPU in the batch benchmark, and the
-- batch API gained 5% with lz4. Rows already stored keep their compression; both read
-- back the same. Without lz4 support nothing changes.
DO $$
BEGIN
    ALTER TABLE idempotency_keys ALTER COLUMN body SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR syntax_error THEN -- no lz4 build; before 14, no SET COMPRESSION
    RAISE NOTICE 'lz4 not available: idempotency_keys.body stays pglz';
END
$$;
