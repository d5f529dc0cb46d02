-- GET /v1/admin/failed-transfers?user_id=… lists one user's refused attempts, newest
-- first, through this index. A failed transfer is written only when one is refused,
-- never on the path that posts money.
CREATE INDEX failed_transfers_user ON failed_transfers (user_id, id);
