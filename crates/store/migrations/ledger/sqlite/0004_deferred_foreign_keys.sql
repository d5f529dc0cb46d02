-- vaultpay: foreign_keys=off
-- The foreign keys of transfers and postings become DEFERRABLE INITIALLY DEFERRED:
-- still enforced, but checked when the transaction commits instead of after each
-- statement. With immediate foreign keys every multi-row INSERT may fail half-way and
-- be undone alone, so SQLite opened a statement journal for it and copied each page
-- the statement touched into it first; the bulk inserts (INSERT OR FAIL, see
-- Db::insert_or_fail) now need none. The ledger checks every account before it writes
-- and inserts a transfer before its postings, so a violation is a bug; it fails the
-- COMMIT, and the group committer then runs the group's jobs one by one.
--
-- SQLite cannot change a constraint in place: each table is rebuilt (new table, copy,
-- drop, rename; run with enforcement off, see store::migrate), with its columns, checks
-- and indexes as migrations 0001 and 0002 left them.
CREATE TABLE transfers_new (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('transfer', 'deposit', 'withdrawal', 'hold')),
    from_account_id TEXT NOT NULL REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    to_account_id TEXT NOT NULL REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    amount INTEGER NOT NULL CHECK (amount > 0),
    captured INTEGER NOT NULL DEFAULT 0,
    currency TEXT NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('posted', 'pending', 'voided', 'expired')),
    expires_at INTEGER,
    initiated_by TEXT NOT NULL,
    batch_id TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    CHECK (captured >= 0 AND captured <= amount)
);
INSERT INTO transfers_new (id, kind, from_account_id, to_account_id, amount, captured, currency,
    description, status, expires_at, initiated_by, batch_id, created_at, updated_at)
SELECT id, kind, from_account_id, to_account_id, amount, captured, currency,
    description, status, expires_at, initiated_by, batch_id, created_at, updated_at
FROM transfers;
DROP TABLE transfers;
ALTER TABLE transfers_new RENAME TO transfers;
CREATE INDEX transfers_pending ON transfers (expires_at) WHERE status = 'pending';

CREATE TABLE postings_new (
    id TEXT PRIMARY KEY,
    transfer_id TEXT NOT NULL REFERENCES transfers (id) DEFERRABLE INITIALLY DEFERRED,
    account_id TEXT NOT NULL REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    account_seq INTEGER NOT NULL,
    amount INTEGER NOT NULL CHECK (amount <> 0),
    currency TEXT NOT NULL,
    balance_after INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (account_id, account_seq)
);
INSERT INTO postings_new (id, transfer_id, account_id, account_seq, amount, currency,
    balance_after, created_at)
SELECT id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at
FROM postings;
DROP TABLE postings;
ALTER TABLE postings_new RENAME TO postings;
CREATE INDEX postings_account_time ON postings (account_id, created_at);
