-- A refused post or void of a hold names the hold in its own column: `operation` is
-- `post_hold` or `void_hold` (it was `post_hold:<hold id>`, which no filter could
-- match), and `transfer_id` holds the id. Rows written before are split the same way.
ALTER TABLE failed_transfers ADD COLUMN transfer_id TEXT;
UPDATE failed_transfers SET transfer_id = substr(operation, 11), operation = substr(operation, 1, 9)
WHERE operation LIKE 'post\_hold:%' ESCAPE '\' OR operation LIKE 'void\_hold:%' ESCAPE '\';
