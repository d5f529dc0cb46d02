-- OAuth 2.0 / OpenID Connect authorization server (PostgreSQL).
CREATE TABLE oauth_clients (
    client_id TEXT PRIMARY KEY,
    -- SHA-256 (hex) of the client secret; NULL for public clients.
    secret_hash TEXT,
    name TEXT NOT NULL,
    -- JSON array of exact redirect URIs.
    redirect_uris TEXT NOT NULL,
    -- Space-separated grant types and scopes the client may use.
    grant_types TEXT NOT NULL,
    scopes TEXT NOT NULL,
    public BIGINT NOT NULL DEFAULT 0,
    id_token_alg TEXT NOT NULL DEFAULT 'EdDSA',
    created_at BIGINT NOT NULL
);

-- Sessions created by the authorization-code and device flows belong to a client.
ALTER TABLE sessions ADD COLUMN client_id TEXT;
ALTER TABLE sessions ADD COLUMN scope TEXT;

-- Browser authorization requests between /oauth/authorize and the code redirect.
CREATE TABLE oauth_requests (
    id_hash TEXT PRIMARY KEY,
    csrf_hash TEXT NOT NULL,
    client_id TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    -- 0 when the request named no redirect_uri (the client's only one was used).
    redirect_given BIGINT NOT NULL DEFAULT 1,
    scope TEXT NOT NULL,
    state TEXT,
    nonce TEXT,
    code_challenge TEXT,
    user_id TEXT,
    auth_time BIGINT,
    amr TEXT,
    stage TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX oauth_requests_expiry ON oauth_requests (expires_at);

CREATE TABLE oauth_codes (
    code_hash TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    -- The redirect_uri of the request ('' if it named none): the token request must repeat it.
    redirect_uri TEXT NOT NULL,
    scope TEXT NOT NULL,
    nonce TEXT,
    code_challenge TEXT,
    auth_time BIGINT NOT NULL,
    amr TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    -- The session the code was exchanged for (revoked if the code is replayed).
    session_id TEXT
);

CREATE TABLE oauth_device_codes (
    device_code_hash TEXT PRIMARY KEY,
    user_code TEXT NOT NULL UNIQUE,
    client_id TEXT NOT NULL,
    scope TEXT NOT NULL,
    -- pending | approved | denied | used
    status TEXT NOT NULL,
    user_id TEXT,
    auth_time BIGINT,
    amr TEXT,
    interval_secs BIGINT NOT NULL,
    last_polled_at BIGINT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    session_id TEXT
);

-- Revoked session-less access tokens (client_credentials), until they expire.
CREATE TABLE oauth_revoked_tokens (
    jti TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);

-- P-256 keys for ES256 ID tokens, private half sealed like the Ed25519 keys.
CREATE TABLE oauth_es256_keys (
    kid TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    private_key_sealed TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

INSERT INTO permissions (name, description) VALUES ('clients:manage', 'Register and delete OAuth clients');
INSERT INTO role_permissions (role, permission) VALUES ('admin', 'clients:manage');

-- Upstream sign-in ("Sign in with GitHub" / any OIDC provider): pending round trips
-- (state → the browser's authorization request) and linked identities.
CREATE TABLE oauth_upstream_states (
    state_hash TEXT PRIMARY KEY,
    request_id_hash TEXT NOT NULL,
    provider TEXT NOT NULL,
    nonce TEXT NOT NULL,
    verifier TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE upstream_identities (
    provider TEXT NOT NULL,
    subject TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    email TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (provider, subject)
);
CREATE INDEX upstream_identities_user ON upstream_identities (user_id);
