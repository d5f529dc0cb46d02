-- IP trust (trusted networks per user, held logins) and custom roles.
-- Times are microseconds since the Unix epoch (UTC).

-- Networks a user has confirmed (or their first login came from). A revoked row is
-- kept (revoked_at set) so "has this user ever trusted a network" stays answerable.
CREATE TABLE trusted_networks (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    network TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE UNIQUE INDEX trusted_networks_live ON trusted_networks (user_id, network) WHERE revoked_at IS NULL;
CREATE INDEX trusted_networks_user ON trusted_networks (user_id);

-- A login (correct password) from an untrusted network, waiting for the emailed
-- confirmation. The ticket and both link tokens are stored as SHA-256.
CREATE TABLE login_holds (
    ticket_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    network TEXT NOT NULL,
    ip TEXT,
    device_id TEXT NOT NULL,
    device_name TEXT NOT NULL,
    confirm_hash TEXT NOT NULL UNIQUE,
    deny_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    confirmed_at BIGINT,
    denied_at BIGINT,
    completed_at BIGINT
);
CREATE INDEX login_holds_user ON login_holds (user_id, created_at);

-- Set by "this wasn't me": no login until a password reset clears it.
ALTER TABLE users ADD COLUMN security_locked_at BIGINT;
