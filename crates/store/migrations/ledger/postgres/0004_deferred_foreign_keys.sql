-- Nothing to do on PostgreSQL: the SQLite migration of the same number makes the
-- foreign keys of transfers and postings deferred so that SQLite's multi-row inserts
-- need no statement journal; PostgreSQL has none to avoid, and its writers keep
-- immediate foreign keys.
SELECT 1;
