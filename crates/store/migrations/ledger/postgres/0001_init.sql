-- VaultPay ledger schema (PostgreSQL). Keep in step with ../sqlite/0001_init.sql:
-- the same tables, columns and indexes; only the integer type and the trigger syntax differ.
-- Money is integer minor units; times are microseconds since the Unix epoch; ids are text.

-- Wallets and the per-currency settlement accounts (kind = 'settlement', owner_id NULL).
-- balance always equals the sum of the account's postings; held is the part of it
-- reserved by pending holds (available = balance - held).
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    number TEXT NOT NULL UNIQUE,
    owner_id TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('savings', 'current', 'settlement')),
    name TEXT NOT NULL,
    currency TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'frozen', 'closed')),
    balance BIGINT NOT NULL DEFAULT 0,
    held BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    posting_seq BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX accounts_owner ON accounts (owner_id, id);
CREATE UNIQUE INDEX accounts_settlement ON accounts (currency) WHERE kind = 'settlement';

-- Transfers, deposits, withdrawals and holds. A hold (pending) reserves `amount` on the
-- payer; `captured` is how much of it has been posted (0 <= captured <= amount).
CREATE TABLE transfers (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('transfer', 'deposit', 'withdrawal', 'hold')),
    from_account_id TEXT NOT NULL REFERENCES accounts (id),
    to_account_id TEXT NOT NULL REFERENCES accounts (id),
    amount BIGINT NOT NULL CHECK (amount > 0),
    captured BIGINT NOT NULL DEFAULT 0,
    currency TEXT NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('posted', 'pending', 'voided', 'expired')),
    expires_at BIGINT,
    initiated_by TEXT NOT NULL,
    batch_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CHECK (captured >= 0 AND captured <= amount)
);
CREATE INDEX transfers_from ON transfers (from_account_id, created_at);
CREATE INDEX transfers_to ON transfers (to_account_id, created_at);
CREATE INDEX transfers_pending ON transfers (expires_at) WHERE status = 'pending';

-- Double-entry postings: every transfer's postings sum to zero. account_seq numbers an
-- account's postings 1, 2, 3…; balance_after is the running balance after this one.
CREATE TABLE postings (
    id TEXT PRIMARY KEY,
    transfer_id TEXT NOT NULL REFERENCES transfers (id),
    account_id TEXT NOT NULL REFERENCES accounts (id),
    account_seq BIGINT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount <> 0),
    currency TEXT NOT NULL,
    balance_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (account_id, account_seq)
);
CREATE INDEX postings_transfer ON postings (transfer_id);
CREATE INDEX postings_account_time ON postings (account_id, created_at);

-- Attempts that failed, with their reason, kept apart from the ledger.
CREATE TABLE failed_transfers (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    idempotency_key TEXT,
    operation TEXT NOT NULL,
    from_account_id TEXT,
    to_account_id TEXT,
    amount BIGINT,
    currency TEXT,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX failed_transfers_at ON failed_transfers (created_at);

-- Idempotency keys, scoped to the user, with the stored response. Written in the
-- transaction that performs the operation.
CREATE TABLE idempotency_keys (
    user_id TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    resource_id TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
-- group commit looks up the keys of a whole group at once by key
CREATE INDEX idempotency_keys_key ON idempotency_keys (key);

-- Transactional outbox: events written with the change, relayed afterwards.
CREATE TABLE outbox (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    published_at BIGINT
);
CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;

CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    at BIGINT NOT NULL,
    actor TEXT,
    action TEXT NOT NULL,
    resource TEXT,
    outcome TEXT NOT NULL,
    ip TEXT,
    user_agent TEXT,
    request_id TEXT,
    metadata TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_log_actor ON audit_log (actor, seq);
CREATE INDEX audit_log_action ON audit_log (action, seq);
CREATE INDEX audit_log_request ON audit_log (request_id);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
