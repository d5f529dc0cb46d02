-- The ledger's history only grows, as the audit log's does: postings are never changed
-- or removed; transfers are never removed and their terms never change (a hold's
-- captured amount, status and times do); accounts are closed, never removed, and what
-- identifies them never changes (their balances, holds, status and times do). A stray
-- statement (a bug, a hand-written fix) is refused by the database itself. The columns
-- the service updates are exactly those left out below; triggers cost nothing on
-- inserts. A later migration that rebuilds one of these tables must drop and recreate
-- its triggers.
CREATE TRIGGER postings_no_update BEFORE UPDATE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only'); END;
CREATE TRIGGER postings_no_delete BEFORE DELETE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are append-only'); END;
CREATE TRIGGER transfers_no_delete BEFORE DELETE ON transfers
BEGIN SELECT RAISE(ABORT, 'transfers are never deleted'); END;
CREATE TRIGGER transfers_fixed_terms BEFORE UPDATE OF
    id, kind, from_account_id, to_account_id, amount, currency, description, initiated_by, batch_id, created_at
    ON transfers
BEGIN SELECT RAISE(ABORT, 'the terms of a transfer never change'); END;
CREATE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
BEGIN SELECT RAISE(ABORT, 'accounts are closed, never deleted'); END;
CREATE TRIGGER accounts_fixed_identity BEFORE UPDATE OF id, number, owner_id, kind, currency, created_at ON accounts
BEGIN SELECT RAISE(ABORT, 'the identity of an account never changes'); END;
