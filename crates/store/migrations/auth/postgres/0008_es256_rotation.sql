-- The ES256 ID-token key rotates like the Ed25519 keys: a rotated-out key stops
-- signing at once and stays in the JWKS until `verify_until` (`keys retire` ends that
-- at once).
ALTER TABLE oauth_es256_keys ADD COLUMN retired_at BIGINT;
ALTER TABLE oauth_es256_keys ADD COLUMN verify_until BIGINT;
