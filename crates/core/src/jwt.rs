//! EdDSA (Ed25519) JSON Web Tokens, signed and verified without a general-purpose JWT
//! library so that exactly one algorithm can ever be accepted.
//!
//! Verification refuses, before looking at any claim: a token that is not three
//! base64url parts, a header whose `alg` is anything but `EdDSA` (so `none` and
//! HS256-with-the-public-key confusion are impossible), a header with `crit`, a `kid`
//! not in the key set, and a signature that fails verification (strict RFC 8032, with
//! per-key tables: see [`crate::ed25519`]). Then `exp`, `nbf`, `iss` and `aud` are
//! checked against the caller's rules and clock.

use crate::ed25519::PreparedKey;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm is not accepted")]
    Algorithm,
    #[error("token signing key is unknown")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token could not be signed")]
    Sign,
    #[error("token is not an access token (its typ must be at+jwt)")]
    TokenType,
}

/// An `aud` claim: one string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(v) => v.iter().any(|a| a == aud),
        }
    }
}

/// The claims of an AuthShield access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    /// The user id (or the client id for client-credentials tokens).
    pub sub: String,
    pub aud: Audience,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    /// Session id: the refresh-token family this token came from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sid: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Device id the session was created on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub device_id: String,
    pub auth_time: i64,
    #[serde(default)]
    pub amr: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// What a verifier accepts.
#[derive(Debug, Clone)]
pub struct Rules {
    pub issuer: String,
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: i64,
}

/// The `typ` header of an access token (RFC 9068 §2.1).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// A private signing key with its key id.
#[derive(Clone)]
pub struct Signer25519 {
    kid: String,
    key: SigningKey,
    /// The encoded headers, computed once: an access token's (`typ: at+jwt`, RFC 9068)
    /// and any other JWT's (`typ: JWT`, e.g. an ID token).
    access_header_b64: String,
    header_b64: String,
}

impl std::fmt::Debug for Signer25519 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer25519(kid={})", self.kid)
    }
}

impl Signer25519 {
    pub fn new(kid: impl Into<String>, secret: &[u8; 32]) -> Self {
        let kid = kid.into();
        let header = |typ: &str| {
            let h = serde_json::json!({"alg": "EdDSA", "typ": typ, "kid": kid});
            URL_SAFE_NO_PAD.encode(h.to_string())
        };
        Self {
            access_header_b64: header(ACCESS_TOKEN_TYP),
            header_b64: header("JWT"),
            key: SigningKey::from_bytes(secret),
            kid,
        }
    }

    /// A new random key.
    pub fn generate(kid: impl Into<String>) -> (Self, [u8; 32]) {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        (Self::new(kid, &secret), secret)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs an access token (header `typ: at+jwt`, the only kind [`verify`] accepts).
    pub fn sign_access<C: Serialize>(&self, claims: &C) -> Result<String, JwtError> {
        self.sign_with(&self.access_header_b64, claims)
    }

    /// Signs any other claims set (header `typ: JWT`): an ID token, say, which is then
    /// refused where an access token is expected.
    pub fn sign<C: Serialize>(&self, claims: &C) -> Result<String, JwtError> {
        self.sign_with(&self.header_b64, claims)
    }

    fn sign_with<C: Serialize>(&self, header_b64: &str, claims: &C) -> Result<String, JwtError> {
        let payload = serde_json::to_vec(claims).map_err(|_| JwtError::Sign)?;
        let mut out = String::with_capacity(header_b64.len() + payload.len() * 4 / 3 + 90);
        out.push_str(header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let sig: Signature = self.key.sign(out.as_bytes());
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.to_bytes(), &mut out);
        Ok(out)
    }
}

/// Public verification keys by `kid`.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, PreparedKey>,
}

impl KeySet {
    /// Adds a key. Bytes that are not a curve point, and small-order points (weak keys
    /// under which a constant signature verifies for every message), are refused.
    pub fn insert(&mut self, kid: impl Into<String>, public: &[u8; 32]) -> Result<(), JwtError> {
        let key = PreparedKey::new(public).map_err(|_| JwtError::Malformed)?;
        self.keys.insert(kid.into(), key);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Takes over `old`'s prepared keys, with the tables they have built, for every key
    /// both sets hold under the same id (a refetch of an unchanged set rebuilds
    /// nothing), and says whether the two sets are the same: the same public keys under
    /// the same ids.
    pub fn adopt_unchanged(&mut self, old: &KeySet) -> bool {
        let mut kept = 0;
        for (kid, k) in &mut self.keys {
            if let Some(o) = old.keys.get(kid).filter(|o| o.to_bytes() == k.to_bytes()) {
                *k = o.clone();
                kept += 1;
            }
        }
        kept == self.keys.len() && kept == old.keys.len()
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The JWK Set document (RFC 7517, OKP keys per RFC 8037).
    pub fn to_jwks(&self) -> serde_json::Value {
        let mut keys: Vec<_> = self.keys.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let keys: Vec<_> = keys
            .into_iter()
            .map(|(kid, k)| {
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                    "kid": kid, "x": URL_SAFE_NO_PAD.encode(k.to_bytes()),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// Builds a key set from a JWKS document, keeping only Ed25519 signing keys.
    pub fn from_jwks(doc: &serde_json::Value) -> Result<Self, JwtError> {
        let mut set = KeySet::default();
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or(JwtError::Malformed)?;
        for k in keys {
            let field = |n: &str| k.get(n).and_then(|v| v.as_str());
            if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
                continue;
            }
            if field("alg").is_some_and(|a| a != "EdDSA")
                || field("use").is_some_and(|u| u != "sig")
            {
                continue;
            }
            let (Some(kid), Some(x)) = (field("kid"), field("x")) else {
                continue;
            };
            let x = URL_SAFE_NO_PAD.decode(x).map_err(|_| JwtError::Malformed)?;
            let x: [u8; 32] = x.try_into().map_err(|_| JwtError::Malformed)?;
            set.insert(kid, &x)?;
        }
        Ok(set)
    }

    /// Checks the header and signature of `token` (a JWT of any `typ`) and returns its
    /// decoded payload. Claims are not checked here; see [`verify`].
    pub fn verify_signature<C: DeserializeOwned>(&self, token: &str) -> Result<C, JwtError> {
        self.verify_typed(token, false)
    }

    /// [`Self::verify_signature`], also refusing a token whose header does not say it
    /// is an access token when `access` is set.
    fn verify_typed<C: DeserializeOwned>(&self, token: &str, access: bool) -> Result<C, JwtError> {
        let mut parts = token.splitn(3, '.');
        let (Some(h), Some(p), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(JwtError::Malformed);
        };
        if s.contains('.') || h.len() > 512 {
            return Err(JwtError::Malformed);
        }
        let header_bytes = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Malformed)?;
        let header: Header<'_> =
            serde_json::from_slice(&header_bytes).map_err(|_| JwtError::Malformed)?;
        if header.alg != "EdDSA" || header.crit.is_some() {
            return Err(JwtError::Algorithm);
        }
        let kid = header.kid.ok_or(JwtError::UnknownKey)?;
        let key = self.keys.get(kid).ok_or(JwtError::UnknownKey)?;
        if access && !header.typ.is_some_and(is_access_typ) {
            return Err(JwtError::TokenType);
        }
        let mut sig = [0u8; 64];
        match URL_SAFE_NO_PAD.decode_slice(s, &mut sig) {
            Ok(64) => {}
            _ => return Err(JwtError::Signature),
        }
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
        if !key.verify(signed, &sig) {
            return Err(JwtError::Signature);
        }
        let payload = URL_SAFE_NO_PAD.decode(p).map_err(|_| JwtError::Malformed)?;
        serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed)
    }
}

/// RFC 9068 §4: `at+jwt` or `application/at+jwt`, compared case-insensitively.
fn is_access_typ(typ: &str) -> bool {
    let t = typ.as_bytes();
    let at = |s: &[u8]| s.eq_ignore_ascii_case(ACCESS_TOKEN_TYP.as_bytes());
    at(t) || (t.len() == 18 && t[..12].eq_ignore_ascii_case(b"application/") && at(&t[12..]))
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: &'a str,
    #[serde(borrow, default)]
    typ: Option<&'a str>,
    #[serde(borrow, default)]
    kid: Option<&'a str>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

/// Verifies an access token: header, signature, then time, issuer and audience.
pub fn verify(
    token: &str,
    keys: &KeySet,
    rules: &Rules,
    now_secs: i64,
) -> Result<AccessClaims, JwtError> {
    let claims: AccessClaims = keys.verify_typed(token, true)?;
    check_registered(
        &claims.iss,
        &claims.aud,
        claims.exp,
        claims.nbf,
        rules,
        now_secs,
    )?;
    Ok(claims)
}

/// The registered-claims checks shared by every token kind.
pub fn check_registered(
    iss: &str,
    aud: &Audience,
    exp: i64,
    nbf: i64,
    rules: &Rules,
    now_secs: i64,
) -> Result<(), JwtError> {
    if exp + rules.leeway_secs <= now_secs {
        return Err(JwtError::Expired);
    }
    if nbf - rules.leeway_secs > now_secs {
        return Err(JwtError::NotYetValid);
    }
    if iss != rules.issuer {
        return Err(JwtError::Issuer);
    }
    if !aud.contains(&rules.audience) {
        return Err(JwtError::Audience);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    const NOW: i64 = 1_800_000_000;

    fn rules() -> Rules {
        Rules {
            issuer: "https://auth.test".into(),
            audience: "vaultpay".into(),
            leeway_secs: 0,
        }
    }

    fn claims() -> AccessClaims {
        AccessClaims {
            iss: "https://auth.test".into(),
            sub: "u1".into(),
            aud: Audience::One("vaultpay".into()),
            exp: NOW + 300,
            iat: NOW,
            nbf: NOW,
            jti: "j1".into(),
            sid: "s1".into(),
            roles: vec!["customer".into()],
            device_id: "d1".into(),
            auth_time: NOW,
            amr: vec!["pwd".into()],
            acr: None,
            scope: None,
            client_id: None,
        }
    }

    fn setup() -> (Signer25519, KeySet) {
        let (signer, _) = Signer25519::generate("k1");
        let mut keys = KeySet::default();
        keys.insert("k1", &signer.public_key()).unwrap();
        (signer, keys)
    }

    /// `claims()` under `header`, validly signed by `signer`'s key.
    fn signed_with(signer: &Signer25519, header: &serde_json::Value) -> String {
        let unsigned = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap())
        );
        let sig = signer.key.sign(unsigned.as_bytes());
        format!("{unsigned}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }

    fn forge(header: serde_json::Value, claims: &AccessClaims, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap()),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    #[test]
    fn accepts_a_valid_token() {
        let (signer, keys) = setup();
        let tok = signer.sign_access(&claims()).unwrap();
        assert_eq!(verify(&tok, &keys, &rules(), NOW).unwrap(), claims());
    }

    #[test]
    fn refuses_alg_none() {
        let (_, keys) = setup();
        let tok = forge(
            serde_json::json!({"alg": "none", "kid": "k1"}),
            &claims(),
            b"",
        );
        assert_eq!(verify(&tok, &keys, &rules(), NOW), Err(JwtError::Algorithm));
        let tok = forge(
            serde_json::json!({"alg": "none", "kid": "k1"}),
            &claims(),
            b"",
        );
        let stripped = tok.trim_end_matches('.');
        assert!(verify(stripped, &keys, &rules(), NOW).is_err());
    }

    #[test]
    fn refuses_hs256_signed_with_the_public_key() {
        let (signer, keys) = setup();
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": "k1"});
        let unsigned = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap())
        );
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&signer.public_key()).unwrap();
        mac.update(unsigned.as_bytes());
        let tok = format!(
            "{unsigned}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(verify(&tok, &keys, &rules(), NOW), Err(JwtError::Algorithm));
    }

    #[test]
    fn refuses_unknown_kid_and_missing_kid() {
        let (signer, _) = setup();
        let tok = signer.sign_access(&claims()).unwrap();
        let (other, _) = Signer25519::generate("k2");
        let mut keys = KeySet::default();
        keys.insert("k2", &other.public_key()).unwrap();
        assert_eq!(
            verify(&tok, &keys, &rules(), NOW),
            Err(JwtError::UnknownKey)
        );
        let tok = forge(serde_json::json!({"alg": "EdDSA"}), &claims(), &[0; 64]);
        assert_eq!(
            verify(&tok, &keys, &rules(), NOW),
            Err(JwtError::UnknownKey)
        );
    }

    #[test]
    fn refuses_a_key_swapped_under_the_same_kid() {
        let (_, keys) = setup();
        let (evil, _) = Signer25519::generate("k1");
        let tok = evil.sign_access(&claims()).unwrap();
        assert_eq!(verify(&tok, &keys, &rules(), NOW), Err(JwtError::Signature));
    }

    #[test]
    fn refuses_tampered_payload() {
        let (signer, keys) = setup();
        let tok = signer.sign_access(&claims()).unwrap();
        let mut c = claims();
        c.roles = vec!["admin".into()];
        let parts: Vec<&str> = tok.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(
            verify(&forged, &keys, &rules(), NOW),
            Err(JwtError::Signature)
        );
    }

    /// RFC 9068: only a token whose header says `at+jwt` is an access token. An ID
    /// token (or any other JWT) signed by the same key, with the right issuer and
    /// audience, is refused: token confusion.
    #[test]
    fn refuses_a_jwt_that_is_not_an_access_token() {
        let (signer, keys) = setup();
        let other = signer.sign(&claims()).unwrap();
        assert_eq!(
            verify(&other, &keys, &rules(), NOW),
            Err(JwtError::TokenType)
        );
        // it is still a valid signature for whoever reads other JWTs
        assert!(keys.verify_signature::<AccessClaims>(&other).is_ok());
        for (typ, ok) in [
            (Some("at+jwt"), true),
            (Some("AT+JWT"), true),
            (Some("application/at+jwt"), true),
            (Some("Application/At+Jwt"), true),
            (Some("JWT"), false),
            (None, false),
            (Some(""), false),
            (Some("at+jwtx"), false),
            (Some("xapplication/at+jwt"), false),
            (Some("application/jwt"), false),
            (Some("application:at+jwt"), false),
        ] {
            let mut header = serde_json::json!({"alg": "EdDSA", "kid": "k1"});
            if let Some(t) = typ {
                header["typ"] = t.into();
            }
            let r = verify(&signed_with(&signer, &header), &keys, &rules(), NOW);
            assert_eq!(r.is_ok(), ok, "typ {typ:?}: {r:?}");
            if !ok {
                assert_eq!(r, Err(JwtError::TokenType), "typ {typ:?}");
            }
        }
    }

    #[test]
    fn refuses_crit_header() {
        let (signer, keys) = setup();
        let header = serde_json::json!({"alg": "EdDSA", "kid": "k1", "crit": ["exp"]});
        let tok = signed_with(&signer, &header);
        assert_eq!(verify(&tok, &keys, &rules(), NOW), Err(JwtError::Algorithm));
    }

    #[test]
    fn checks_time_issuer_audience() {
        let (signer, keys) = setup();
        let tok = signer.sign_access(&claims()).unwrap();
        assert_eq!(
            verify(&tok, &keys, &rules(), NOW + 300),
            Err(JwtError::Expired)
        );
        assert!(verify(&tok, &keys, &rules(), NOW + 299).is_ok());
        assert_eq!(
            verify(&tok, &keys, &rules(), NOW - 1),
            Err(JwtError::NotYetValid)
        );
        let r = Rules {
            leeway_secs: 5,
            ..rules()
        };
        assert!(verify(&tok, &keys, &r, NOW - 5).is_ok());
        let r = Rules {
            issuer: "https://evil".into(),
            ..rules()
        };
        assert_eq!(verify(&tok, &keys, &r, NOW), Err(JwtError::Issuer));
        let r = Rules {
            audience: "other".into(),
            ..rules()
        };
        assert_eq!(verify(&tok, &keys, &r, NOW), Err(JwtError::Audience));
        let mut c = claims();
        c.aud = Audience::Many(vec!["x".into(), "vaultpay".into()]);
        assert!(verify(&signer.sign_access(&c).unwrap(), &keys, &rules(), NOW).is_ok());
    }

    #[test]
    fn garbage_is_malformed() {
        let (_, keys) = setup();
        for t in ["", "a", "a.b", "a.b.c.d", "!!.??.**", "eyJ.eyJ.sig"] {
            assert!(verify(t, &keys, &rules(), NOW).is_err(), "{t}");
        }
    }

    #[test]
    fn a_weak_key_cannot_join_a_key_set() {
        // the identity point: with it, `R = identity, s = 0` would pass for any token
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut keys = KeySet::default();
        assert_eq!(keys.insert("weak", &identity), Err(JwtError::Malformed));
        let doc = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "weak",
            "x": URL_SAFE_NO_PAD.encode(identity)}]});
        assert_eq!(KeySet::from_jwks(&doc).unwrap_err(), JwtError::Malformed);
    }

    #[test]
    fn jwks_round_trip() {
        let (signer, keys) = setup();
        let doc = keys.to_jwks();
        assert_eq!(doc["keys"][0]["kty"], "OKP");
        assert!(doc["keys"][0].get("d").is_none(), "no private part in JWKS");
        let again = KeySet::from_jwks(&doc).unwrap();
        let tok = signer.sign_access(&claims()).unwrap();
        assert!(verify(&tok, &again, &rules(), NOW).is_ok());
    }
}
