-- OAuth authorization requests that asked for a fresh sign-in (prompt=login or
-- max_age): sign-in providers are not offered for them (a provider may answer from
-- its own session without asking the user anything, so its sign-in proves no fresh
-- authentication).
ALTER TABLE oauth_requests ADD COLUMN fresh_login INTEGER NOT NULL DEFAULT 0;
