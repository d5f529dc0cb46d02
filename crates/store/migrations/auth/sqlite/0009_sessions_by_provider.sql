-- A session signed in through an upstream provider (GitHub, another OIDC issuer)
-- remembers which one, and so do the authorization request and the code it passes
-- through on the way: unlinking the provider ends those sessions and grants.
ALTER TABLE oauth_requests ADD COLUMN upstream_provider TEXT;
ALTER TABLE oauth_codes ADD COLUMN upstream_provider TEXT;
ALTER TABLE sessions ADD COLUMN upstream_provider TEXT;
