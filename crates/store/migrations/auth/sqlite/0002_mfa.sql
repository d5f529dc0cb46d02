-- Second factors (TOTP, emailed codes, recovery codes), login MFA tickets.

-- One TOTP secret per user, sealed with the master-key envelope (AAD: user id).
-- enabled_at NULL: enrolment pending confirmation. last_step: the last accepted
-- time step (a code of that step or an earlier one is refused: no replay).
CREATE TABLE mfa_totp (
    user_id TEXT PRIMARY KEY REFERENCES users(id),
    secret_sealed TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    enabled_at INTEGER,
    last_step INTEGER
);

-- Single-use recovery codes, SHA-256 hashed.
CREATE TABLE mfa_recovery_codes (
    code_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    created_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE INDEX mfa_recovery_codes_user ON mfa_recovery_codes (user_id);

-- Emailed one-time codes as a second factor the user turned on.
CREATE TABLE mfa_email (
    user_id TEXT PRIMARY KEY REFERENCES users(id),
    enabled_at INTEGER NOT NULL
);

-- Emailed one-time codes: hashed (SHA-256 over id and code), short-lived, single
-- use, dead after too many wrong attempts. purpose: login:<ticket hash>,
-- step_up:<session id> or enrol.
CREATE TABLE mfa_email_codes (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    purpose TEXT NOT NULL,
    code_hash TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE INDEX mfa_email_codes_user ON mfa_email_codes (user_id, purpose, created_at);

-- Login tickets between a correct password and the second factor: SHA-256 hashed,
-- single use, short-lived, bound to the user and the device of the login.
CREATE TABLE mfa_tickets (
    ticket_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    device_id TEXT NOT NULL,
    device_name TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
