-- A rotated-in key is published (in the JWKS) before it signs: relying parties that
-- cached the JWKS can verify its first tokens. `signs_from` is when it starts
-- signing (NULL: from its creation); the key it replaces signs until then
-- (`retired_at` may lie in the future).
ALTER TABLE signing_keys ADD COLUMN signs_from BIGINT;
ALTER TABLE oauth_es256_keys ADD COLUMN signs_from BIGINT;
