-- Nothing to do on SQLite: the PostgreSQL migration of the same number compresses
-- stored responses with lz4; SQLite stores them uncompressed.
SELECT 1;
