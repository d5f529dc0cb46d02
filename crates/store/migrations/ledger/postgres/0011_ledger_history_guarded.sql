-- The ledger's history only grows, as the audit log's does: postings are never changed
-- or removed; transfers are never removed and their terms never change (a hold's
-- captured amount, status and times do); accounts are closed, never removed, and what
-- identifies them never changes (their balances, holds, status and times do). A stray
-- statement (a bug, a hand-written fix) is refused by the database itself. The columns
-- the service updates are exactly those left out below; triggers cost nothing on
-- inserts.
CREATE FUNCTION ledger_history_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%', TG_ARGV[0];
END;
$$;
CREATE TRIGGER postings_no_change BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION ledger_history_refuse('postings are append-only');
CREATE TRIGGER postings_no_truncate BEFORE TRUNCATE ON postings
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_history_refuse('postings are append-only');
CREATE TRIGGER transfers_no_delete BEFORE DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_history_refuse('transfers are never deleted');
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_history_refuse('transfers are never deleted');
CREATE TRIGGER transfers_fixed_terms BEFORE UPDATE OF
    id, kind, from_account_id, to_account_id, amount, currency, description, initiated_by, batch_id, created_at
    ON transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_history_refuse('the terms of a transfer never change');
CREATE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_history_refuse('accounts are closed, never deleted');
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_history_refuse('accounts are closed, never deleted');
CREATE TRIGGER accounts_fixed_identity BEFORE UPDATE OF id, number, owner_id, kind, currency, created_at ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_history_refuse('the identity of an account never changes');
