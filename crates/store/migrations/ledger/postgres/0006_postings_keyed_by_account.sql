-- A posting is identified by its account and its place in that account's sequence:
-- (account_id, account_seq) becomes the primary key (it was already UNIQUE), and
-- `id` stays a column (the history API shows it; it is generated time-ordered and
-- unique like every other id) but loses its own index. That index was one more
-- B-tree insert per posting, two per transfer, with nothing reading through it: no
-- query looks a posting up by id.
--
-- The new primary key builds its index from the table (the unique constraint's index
-- cannot be adopted while the constraint owns it): on a large ledger this migration
-- reads postings once, holding its lock meanwhile.
ALTER TABLE postings DROP CONSTRAINT postings_pkey;
ALTER TABLE postings DROP CONSTRAINT postings_account_id_account_seq_key;
ALTER TABLE postings ADD CONSTRAINT postings_pkey PRIMARY KEY (account_id, account_seq);
