-- vaultpay: foreign_keys=off
-- A posting is identified by its account and its place in that account's sequence:
-- (account_id, account_seq) becomes the primary key (it was already UNIQUE), and
-- `id` stays a column (the history API shows it; it is generated time-ordered and
-- unique like every other id) but loses its own index. That index was one more
-- B-tree insert per posting, two per transfer, with nothing reading through it: no
-- query looks a posting up by id. Batch API on SQLite: +8% (BENCHMARKS.md).
--
-- SQLite cannot drop a primary key in place: the table is rebuilt (as in 0004: run
-- with enforcement off, see store::migrate), with its columns, checks and deferred
-- foreign keys. Its time index is not rebuilt: migration 0008 retires it (it drops it
-- with IF EXISTS, so a database that ran an earlier form of this file is fine too).
CREATE TABLE postings_new (
    id TEXT NOT NULL,
    transfer_id TEXT NOT NULL REFERENCES transfers (id) DEFERRABLE INITIALLY DEFERRED,
    account_id TEXT NOT NULL REFERENCES accounts (id) DEFERRABLE INITIALLY DEFERRED,
    account_seq INTEGER NOT NULL,
    amount INTEGER NOT NULL CHECK (amount <> 0),
    currency TEXT NOT NULL,
    balance_after INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, account_seq)
);
INSERT INTO postings_new (id, transfer_id, account_id, account_seq, amount, currency,
    balance_after, created_at)
SELECT id, transfer_id, account_id, account_seq, amount, currency, balance_after, created_at
FROM postings;
DROP TABLE postings;
ALTER TABLE postings_new RENAME TO postings;
