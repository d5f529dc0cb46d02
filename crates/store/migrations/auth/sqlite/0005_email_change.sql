-- Email change: the pending new address travels with its single-use token.
ALTER TABLE email_tokens ADD COLUMN payload TEXT;
