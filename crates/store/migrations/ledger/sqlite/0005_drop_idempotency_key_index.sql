-- The group committer looked up a group's idempotency keys by key alone
-- (`WHERE key IN (…)`); it now joins the group's (user, key) pairs with the primary key,
-- so this index had no reader left. Each stored key cost a B-tree insert in it at a
-- random leaf (client keys are random), one more dirty page per transfer in every
-- group commit.
DROP INDEX IF EXISTS idempotency_keys_key;
