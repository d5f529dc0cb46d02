-- Drop secondary indexes no query needs; each cost a B-tree insert per row on every
-- write, and transfers_from / transfers_to (keyed by account) dirtied a random leaf
-- page per account touched by a commit.
--
-- transfers_from, transfers_to: no query selects transfers by account. The only user
-- was verify's held_equals_pending_holds check, now a GROUP BY over pending holds
-- (transfers_pending). Accounts are never deleted, so the foreign keys need no index on
-- the referencing side.
-- postings_transfer: only verify's full-table checks (GROUP BY / LEFT JOIN on
-- transfer_id) read postings by transfer; they scan the table anyway. Transfers are
-- never deleted. Kept: postings (account_id, account_seq) UNIQUE (history pages,
-- running balances) and postings_account_time (history with a time window).
DROP INDEX IF EXISTS transfers_from;
DROP INDEX IF EXISTS transfers_to;
DROP INDEX IF EXISTS postings_transfer;
