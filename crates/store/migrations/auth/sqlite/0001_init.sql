-- AuthShield schema (SQLite). Times are microseconds since the Unix epoch (UTC).
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    email_verified INTEGER NOT NULL DEFAULT 0,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    lock_count INTEGER NOT NULL DEFAULT 0,
    locked_until INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE password_history (
    user_id TEXT NOT NULL REFERENCES users(id),
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX password_history_user ON password_history (user_id, created_at);

CREATE TABLE roles (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    builtin INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE permissions (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL
);
CREATE TABLE role_permissions (
    role TEXT NOT NULL REFERENCES roles(name),
    permission TEXT NOT NULL REFERENCES permissions(name),
    PRIMARY KEY (role, permission)
);
CREATE TABLE user_roles (
    user_id TEXT NOT NULL REFERENCES users(id),
    role TEXT NOT NULL REFERENCES roles(name),
    granted_at INTEGER NOT NULL,
    granted_by TEXT,
    PRIMARY KEY (user_id, role)
);

CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    device_id TEXT NOT NULL,
    device_name TEXT NOT NULL,
    ip TEXT,
    user_agent TEXT,
    created_at INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    idle_expires_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    auth_time INTEGER NOT NULL,
    amr TEXT NOT NULL,
    revoked_at INTEGER,
    revoked_reason TEXT
);
CREATE INDEX sessions_user ON sessions (user_id, created_at);

CREATE TABLE refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    created_at INTEGER NOT NULL,
    used_at INTEGER,
    replaced_by TEXT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    alg TEXT NOT NULL,
    public_key TEXT NOT NULL,
    private_key_sealed TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER,
    verify_until INTEGER
);

CREATE TABLE email_tokens (
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id),
    purpose TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE INDEX email_tokens_user ON email_tokens (user_id, purpose);

CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    at INTEGER NOT NULL,
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
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;

INSERT INTO roles (name, description, builtin) VALUES
    ('customer', 'Default role of every account: own profile, sessions, wallets and transfers', 1),
    ('support', 'Reads customer accounts and sessions to help them', 1),
    ('compliance', 'Reads audit logs, accounts, transfers and KYC records', 1),
    ('admin', 'Everything, including roles, treasury and key management', 1);

INSERT INTO permissions (name, description) VALUES
    ('profile:read', 'Read own profile'),
    ('sessions:manage', 'List and revoke own sessions'),
    ('accounts:own', 'Open and use own wallets'),
    ('transfers:create', 'Send money from own wallets'),
    ('users:read', 'Read any user'),
    ('users:manage', 'Unlock users, change their state'),
    ('accounts:read', 'Read any wallet'),
    ('accounts:manage', 'Freeze, unfreeze and close wallets'),
    ('transfers:read', 'Read any transfer'),
    ('audit:read', 'Read audit logs'),
    ('kyc:read', 'Read KYC records'),
    ('roles:manage', 'Grant and revoke roles'),
    ('treasury:move', 'Deposit and withdraw through settlement accounts'),
    ('keys:manage', 'Rotate signing keys');

INSERT INTO role_permissions (role, permission) VALUES
    ('customer', 'profile:read'), ('customer', 'sessions:manage'),
    ('customer', 'accounts:own'), ('customer', 'transfers:create'),
    ('support', 'users:read'), ('support', 'accounts:read'),
    ('compliance', 'users:read'), ('compliance', 'accounts:read'), ('compliance', 'transfers:read'),
    ('compliance', 'audit:read'), ('compliance', 'kyc:read'),
    ('admin', 'profile:read'), ('admin', 'sessions:manage'), ('admin', 'accounts:own'),
    ('admin', 'transfers:create'), ('admin', 'users:read'), ('admin', 'users:manage'),
    ('admin', 'accounts:read'), ('admin', 'accounts:manage'), ('admin', 'transfers:read'),
    ('admin', 'audit:read'), ('admin', 'kyc:read'), ('admin', 'roles:manage'),
    ('admin', 'treasury:move'), ('admin', 'keys:manage');
