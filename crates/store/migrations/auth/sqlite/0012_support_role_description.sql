-- The built-in support role's description promised sessions it cannot read: it has
-- users:read and accounts:read (profiles and ledger accounts), and no route shows
-- another user's sessions. Only the stock description is replaced; one an
-- administrator edited is left as it is.
UPDATE roles SET description = 'Reads customer profiles and ledger accounts to help them'
WHERE name = 'support' AND description = 'Reads customer accounts and sessions to help them';
