-- OAuth authorization requests that asked for a second factor (acr_values=urn:vaultpay:acr:mfa).
ALTER TABLE oauth_requests ADD COLUMN acr_mfa INTEGER NOT NULL DEFAULT 0;
