-- The idempotency key of a batch that placed holds is kept past its 24 hours while any
-- of those holds is pending (as a single hold's key is): retried after a day, the
-- batch is replayed instead of placing its holds again. The purge finds a batch's
-- pending holds through this index. Only pending holds made by a batch are in it, so
-- the batch path that posts plain transfers writes nothing more.
CREATE INDEX transfers_pending_batch ON transfers (batch_id) WHERE status = 'pending' AND batch_id IS NOT NULL;
