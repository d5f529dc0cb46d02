-- Every authorization and device request sweeps expired codes, device codes and
-- revoked-token ids before it writes its own: by these indexes, not a scan of each
-- table (anonymous requests trigger the sweep).
CREATE INDEX oauth_codes_expiry ON oauth_codes (expires_at);
CREATE INDEX oauth_device_codes_expiry ON oauth_device_codes (expires_at);
CREATE INDEX oauth_revoked_tokens_expiry ON oauth_revoked_tokens (expires_at);
