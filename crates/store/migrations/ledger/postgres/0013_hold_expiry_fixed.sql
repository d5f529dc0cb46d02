-- A hold's expiry is one of its terms (the payer's funds are reserved until then, and
-- the expiry task voids it then): the service never changes it, so a stray statement
-- extending or shortening a hold is refused like any other change of terms.
DROP TRIGGER transfers_fixed_terms ON transfers;
CREATE TRIGGER transfers_fixed_terms BEFORE UPDATE OF
    id, kind, from_account_id, to_account_id, amount, currency, description, expires_at,
    initiated_by, batch_id, created_at
    ON transfers
    FOR EACH ROW EXECUTE FUNCTION ledger_history_refuse('the terms of a transfer never change');
