-- Drop the ledger audit log's filter indexes: the ledger's audit API
-- (GET /v1/admin/ledger/audit) pages by seq only (the primary key), and `vaultpay
-- ledger verify` walks the chain by seq, so nothing reads audit_log by actor, action,
-- request id or time. Each was a B-tree insert per audited change: four per posted
-- transfer. AuthShield's audit log, which its admin API filters by those columns,
-- keeps them. Should the ledger's audit API grow filters, add back the ones it uses.
DROP INDEX IF EXISTS audit_log_actor;
DROP INDEX IF EXISTS audit_log_action;
DROP INDEX IF EXISTS audit_log_request;
DROP INDEX IF EXISTS audit_log_at;
