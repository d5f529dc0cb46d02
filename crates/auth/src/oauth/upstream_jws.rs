//! The signature of an upstream OpenID provider's ID token: its JWK Set (RFC 7517),
//! fetched from the discovery document's `jwks_uri` and cached per provider, and the
//! JWS compact serialisation (RFC 7515) checked against it, without a general-purpose
//! JWT library so that only the algorithms below can ever be accepted.
//!
//! Accepted algorithms: `RS256` (RSASSA-PKCS1-v1_5 with SHA-256, 2048–8192-bit
//! keys), `ES256` (P-256 with SHA-256, the fixed 64-byte r‖s signature of RFC 7518
//! §3.4) and `EdDSA` (Ed25519, RFC 8037). Refused before any key is looked at: a token
//! over [`MAX_TOKEN_BYTES`], anything but three base64url parts, a header with `crit`,
//! and every other `alg` (`none`, the `HS*` family, whose "secret" would be the
//! provider's public key, `PS*`, `RS384`, …).
//!
//! A key serves exactly one algorithm, the one its `kty`/`crv` implies; a key whose
//! `alg` says otherwise, whose `use` is not `sig` or whose `key_ops` lacks `verify` is
//! ignored, as are key types not listed above. A header `alg` that disagrees with the
//! key its `kid` names is refused (algorithm confusion), never coerced. Without a
//! `kid`, the one key of the header's algorithm is used, and the token is refused if
//! there are several.
//!
//! The set is reused for [`JWKS_TTL`]. A `kid` it does not hold (a rotated key)
//! refetches it once, at most every [`REFETCH_MIN_INTERVAL`] per provider, so hostile
//! tokens cannot make us hammer the provider; then the token is refused.

use crate::AuthError;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest ID token considered (bytes of its compact serialisation).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The largest JWK Set document read from a provider.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Keys read from one JWK Set; more are ignored.
const MAX_KEYS: usize = 64;
/// The longest encoded JWS header considered.
const MAX_HEADER_CHARS: usize = 2048;
/// How long a fetched JWK Set is used before it is fetched again.
pub const JWKS_TTL: Duration = Duration::from_secs(600);
/// The least time between two refetches caused by an unknown `kid`, per provider.
pub const REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Providers (`jwks_uri`s) remembered; beyond that the cache starts over.
const MAX_PROVIDERS: usize = 64;

/// Why a token's signature is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwsError {
    #[error("the token is too large")]
    TooLarge,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token's signing key is unknown")]
    UnknownKey,
    #[error("the token's signature is invalid")]
    Signature,
}

/// The accepted JWS algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

impl Alg {
    fn from_name(name: &str) -> Option<Alg> {
        match name {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "EdDSA" => Some(Alg::EdDsa),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// A public key, in the form `ring` verifies with.
#[derive(Clone)]
enum PublicKey {
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed SEC1 point (0x04 ‖ x ‖ y).
    P256(Vec<u8>),
    Ed25519([u8; 32]),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublicKey::Rsa { n, .. } => write!(f, "Rsa({} bits)", n.len() * 8),
            PublicKey::P256(_) => f.write_str("P256"),
            PublicKey::Ed25519(_) => f.write_str("Ed25519"),
        }
    }
}

impl PublicKey {
    fn alg(&self) -> Alg {
        match self {
            PublicKey::Rsa { .. } => Alg::Rs256,
            PublicKey::P256(_) => Alg::Es256,
            PublicKey::Ed25519(_) => Alg::EdDsa,
        }
    }

    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match self {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            PublicKey::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            PublicKey::Ed25519(x) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, sig)
                .is_ok(),
        }
    }
}

#[derive(Debug, Clone)]
struct Jwk {
    kid: Option<String>,
    key: PublicKey,
}

/// The usable signing keys of a JWK Set.
#[derive(Debug, Clone, Default)]
pub struct JwkSet {
    keys: Vec<Jwk>,
}

fn b64(v: &Value) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(v.as_str()?).ok()
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros);
    v
}

/// One key of the set, or `None` when it is not a usable signing key.
fn parse_jwk(k: &Value) -> Option<Jwk> {
    let field = |n: &str| k.get(n).unwrap_or(&Value::Null);
    if !field("use").is_null() && field("use") != "sig" {
        return None;
    }
    if let Some(ops) = k.get("key_ops") {
        if !ops.as_array()?.iter().any(|o| o == "verify") {
            return None;
        }
    }
    let kid = match field("kid") {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        _ => return None,
    };
    let key = match (field("kty").as_str()?, field("crv").as_str()) {
        ("RSA", _) => {
            let n = strip_leading_zeros(b64(field("n"))?);
            let e = strip_leading_zeros(b64(field("e"))?);
            // 2048–8192 bits (ring checks the exact bit length again).
            if !(256..=1024).contains(&n.len()) || e.is_empty() || e.len() > 8 {
                return None;
            }
            PublicKey::Rsa { n, e }
        }
        ("EC", Some("P-256")) => {
            let (x, y) = (b64(field("x"))?, b64(field("y"))?);
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut point = Vec::with_capacity(65);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            PublicKey::P256(point)
        }
        ("OKP", Some("Ed25519")) => PublicKey::Ed25519(b64(field("x"))?.try_into().ok()?),
        _ => return None,
    };
    if !field("alg").is_null() && field("alg") != key.alg().name() {
        return None;
    }
    Some(Jwk { kid, key })
}

impl JwkSet {
    /// Reads a JWK Set document; keys that are not usable signing keys are skipped.
    pub fn parse(body: &[u8]) -> Result<JwkSet, JwsError> {
        let doc: Value = serde_json::from_slice(body).map_err(|_| JwsError::Malformed)?;
        let keys = doc["keys"].as_array().ok_or(JwsError::Malformed)?;
        Ok(JwkSet {
            keys: keys.iter().take(MAX_KEYS).filter_map(parse_jwk).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn key_for(&self, kid: Option<&str>, alg: Alg) -> Result<&PublicKey, JwsError> {
        match kid {
            Some(kid) => {
                let mut named = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .peekable();
                if named.peek().is_none() {
                    return Err(JwsError::UnknownKey);
                }
                // The key the header names must be a key of the header's algorithm.
                named
                    .find(|k| k.key.alg() == alg)
                    .map(|k| &k.key)
                    .ok_or(JwsError::Algorithm)
            }
            None => {
                let mut of_alg = self.keys.iter().filter(|k| k.key.alg() == alg);
                match (of_alg.next(), of_alg.next()) {
                    (Some(k), None) => Ok(&k.key),
                    _ => Err(JwsError::UnknownKey),
                }
            }
        }
    }

    /// Checks the signature of `jws` and returns its payload (a JSON object).
    pub fn verify(&self, jws: &Jws<'_>) -> Result<Value, JwsError> {
        let key = self.key_for(jws.kid.as_deref(), jws.alg)?;
        if !key.verify(jws.signed, &jws.signature) {
            return Err(JwsError::Signature);
        }
        let payload = URL_SAFE_NO_PAD
            .decode(jws.payload)
            .map_err(|_| JwsError::Malformed)?;
        match serde_json::from_slice(&payload) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(JwsError::Malformed),
        }
    }
}

/// A JWS compact serialisation whose form and header are acceptable; its signature is
/// not checked yet.
#[derive(Debug)]
pub struct Jws<'a> {
    alg: Alg,
    kid: Option<String>,
    /// `header.payload`, the signed bytes.
    signed: &'a [u8],
    payload: &'a str,
    signature: Vec<u8>,
}

impl<'a> Jws<'a> {
    pub fn parse(token: &'a str) -> Result<Jws<'a>, JwsError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(JwsError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwsError::Malformed);
        };
        if h.len() > MAX_HEADER_CHARS {
            return Err(JwsError::Malformed);
        }
        let header = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwsError::Malformed)?;
        let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&header) else {
            return Err(JwsError::Malformed);
        };
        if header.contains_key("crit") {
            return Err(JwsError::Algorithm);
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(Alg::from_name)
            .ok_or(JwsError::Algorithm)?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(JwsError::Malformed),
        };
        let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwsError::Signature)?;
        if signature.is_empty() {
            return Err(JwsError::Signature);
        }
        Ok(Jws {
            alg,
            kid,
            signed: &token.as_bytes()[..h.len() + 1 + p.len()],
            payload: p,
            signature,
        })
    }
}

/// What is known of one provider's keys.
#[derive(Debug, Default)]
struct Slot {
    set: Option<Arc<JwkSet>>,
    fetched_at: Option<Instant>,
    /// The last refetch caused by an unknown `kid`.
    refetched_at: Option<Instant>,
}

/// The JWK Sets of the upstream providers, by `jwks_uri` (one per [`AuthService`]).
///
/// [`AuthService`]: crate::AuthService
#[derive(Debug, Default)]
pub struct JwksCache {
    providers: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

fn refused(e: JwsError) -> AuthError {
    AuthError::OAuth(
        "invalid_grant",
        format!("the provider's ID token failed its signature check: {e}"),
    )
}

impl JwksCache {
    fn slot(&self, jwks_uri: &str) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut providers = self.providers.lock();
        if providers.len() >= MAX_PROVIDERS && !providers.contains_key(jwks_uri) {
            providers.clear();
        }
        providers.entry(jwks_uri.to_owned()).or_default().clone()
    }

    /// Verifies `token` with the keys at `jwks_uri` and returns its claims. `fetch`
    /// reads the set (errors pass through as they are); `now` is the clock.
    pub async fn verify<F, Fut>(
        &self,
        jwks_uri: &str,
        token: &str,
        now: Instant,
        fetch: F,
    ) -> Result<Value, AuthError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<JwkSet, AuthError>>,
    {
        // Form and algorithm first: a token refused for those costs no fetch.
        let jws = Jws::parse(token).map_err(refused)?;
        let slot = self.slot(jwks_uri);
        // Held across the fetch: one fetch per provider at a time.
        let mut slot = slot.lock().await;
        let cached = match (&slot.set, slot.fetched_at) {
            (Some(set), Some(at)) if now.saturating_duration_since(at) < JWKS_TTL => {
                Some(set.clone())
            }
            _ => None,
        };
        let (set, fetched_now) = match cached {
            Some(set) => (set, false),
            None => {
                let set = Arc::new(fetch().await?);
                slot.set = Some(set.clone());
                slot.fetched_at = Some(now);
                (set, true)
            }
        };
        match set.verify(&jws) {
            Err(JwsError::UnknownKey)
                if !fetched_now
                    && slot.refetched_at.is_none_or(|at| {
                        now.saturating_duration_since(at) >= REFETCH_MIN_INTERVAL
                    }) =>
            {
                // Maybe the provider rotated its keys: look once more.
                slot.refetched_at = Some(now);
                let set = Arc::new(fetch().await?);
                slot.set = Some(set.clone());
                slot.fetched_at = Some(now);
                set.verify(&jws).map_err(refused)
            }
            r => r.map_err(refused),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn enc(v: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    fn ed_key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn es_key() -> EcdsaKeyPair {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap()
    }

    fn ed_jwk(kid: &str, k: &Ed25519KeyPair) -> Value {
        json!({ "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid,
                "x": enc(k.public_key().as_ref()) })
    }

    fn es_jwk(kid: &str, k: &EcdsaKeyPair) -> Value {
        let p = k.public_key().as_ref();
        json!({ "kty": "EC", "crv": "P-256", "kid": kid, "x": enc(&p[1..33]), "y": enc(&p[33..]) })
    }

    fn set(keys: Vec<Value>) -> JwkSet {
        JwkSet::parse(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
    }

    fn signing_input(header: Value, claims: Value) -> String {
        format!(
            "{}.{}",
            enc(header.to_string().as_bytes()),
            enc(claims.to_string().as_bytes())
        )
    }

    fn ed_token(kid: Option<&str>, k: &Ed25519KeyPair, claims: Value) -> String {
        let mut h = json!({ "alg": "EdDSA", "typ": "JWT" });
        if let Some(kid) = kid {
            h["kid"] = json!(kid);
        }
        let input = signing_input(h, claims);
        format!("{input}.{}", enc(k.sign(input.as_bytes()).as_ref()))
    }

    fn es_token(kid: &str, k: &EcdsaKeyPair, claims: Value) -> String {
        let input = signing_input(json!({ "alg": "ES256", "kid": kid }), claims);
        let sig = k.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        format!("{input}.{}", enc(sig.as_ref()))
    }

    fn check(s: &JwkSet, token: &str) -> Result<Value, JwsError> {
        s.verify(&Jws::parse(token)?)
    }

    #[test]
    fn eddsa_and_es256_verify_and_tampering_is_refused() {
        let (ed, es) = (ed_key(), es_key());
        let s = set(vec![ed_jwk("ed", &ed), es_jwk("es", &es)]);
        assert_eq!(s.len(), 2);
        let t = ed_token(Some("ed"), &ed, json!({ "sub": "a" }));
        assert_eq!(check(&s, &t).unwrap()["sub"], "a");
        let t = es_token("es", &es, json!({ "sub": "b" }));
        assert_eq!(check(&s, &t).unwrap()["sub"], "b");
        // Another payload under the same signature.
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            enc(json!({ "sub": "admin" }).to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(check(&s, &forged), Err(JwsError::Signature));
        // A DER (not fixed r‖s) or truncated signature.
        let short = format!("{}.{}.{}", parts[0], parts[1], &parts[2][..40]);
        assert_eq!(check(&s, &short), Err(JwsError::Signature));
        // No kid: the one key of the algorithm.
        let t = ed_token(None, &ed, json!({ "sub": "c" }));
        assert_eq!(check(&s, &t).unwrap()["sub"], "c");
        // No kid and two keys of the algorithm: ambiguous.
        let s2 = set(vec![ed_jwk("ed", &ed), ed_jwk("ed2", &ed_key())]);
        assert_eq!(check(&s2, &t), Err(JwsError::UnknownKey));
        // Signed by a key that is not the one its kid names.
        let t = ed_token(Some("ed2"), &ed, json!({ "sub": "d" }));
        assert_eq!(check(&s2, &t), Err(JwsError::Signature));
    }

    #[test]
    fn algorithms_outside_the_three_and_confusion_are_refused() {
        let ed = ed_key();
        let s = set(vec![ed_jwk("ed", &ed)]);
        let claims = enc(br#"{"sub":"x"}"#);
        for alg in [
            "none", "HS256", "HS512", "RS384", "PS256", "ES384", "ES256K", "Ed25519",
        ] {
            let h = enc(json!({ "alg": alg, "kid": "ed" }).to_string().as_bytes());
            assert_eq!(
                Jws::parse(&format!("{h}.{claims}.c2ln")).unwrap_err(),
                JwsError::Algorithm,
                "{alg}"
            );
            assert_eq!(
                Jws::parse(&format!("{h}.{claims}.")).unwrap_err(),
                JwsError::Algorithm,
                "{alg}"
            );
        }
        // No alg, or not a string.
        for h in [json!({ "kid": "ed" }), json!({ "alg": ["EdDSA"] })] {
            let h = enc(h.to_string().as_bytes());
            assert_eq!(
                Jws::parse(&format!("{h}.{claims}.c2ln")).unwrap_err(),
                JwsError::Algorithm
            );
        }
        // The header says ES256, the kid names an Ed25519 key.
        let h = enc(json!({ "alg": "ES256", "kid": "ed" })
            .to_string()
            .as_bytes());
        let t = format!("{h}.{claims}.{}", enc(&[1; 64]));
        assert_eq!(check(&s, &t), Err(JwsError::Algorithm));
        // crit is not understood.
        let h = enc(json!({ "alg": "EdDSA", "kid": "ed", "crit": ["exp"] })
            .to_string()
            .as_bytes());
        assert_eq!(
            Jws::parse(&format!("{h}.{claims}.c2ln")).unwrap_err(),
            JwsError::Algorithm
        );
    }

    #[test]
    fn hostile_input_is_refused_without_panic() {
        let s = set(vec![ed_jwk("ed", &ed_key())]);
        let good_h = enc(br#"{"alg":"EdDSA","kid":"ed"}"#);
        for t in [
            String::new(),
            ".".into(),
            "..".into(),
            "a.b".into(),
            "a.b.c.d".into(),
            format!("{good_h}.e30.!!!"),
            format!("{good_h}.e30=.c2ln"),
            format!("{good_h}.!.{}", enc(&[0; 64])),
            "e30.e30.c2ln".into(),
            format!("{}.e30.c2ln", enc(b"[1,2]")),
            format!("{}.e30.c2ln", enc(b"\xff\xfe")),
            format!("{}.e30.c2ln", enc(br#"{"alg":"EdDSA","kid":7}"#)),
            format!("{}.e30.c2ln", "A".repeat(MAX_HEADER_CHARS + 4)),
            format!("{good_h}.{}.{}", enc(b"not json"), enc(&[0; 64])),
        ] {
            assert!(check(&s, &t).is_err(), "{t}");
        }
        let huge = format!("{good_h}.{}.c2ln", "A".repeat(MAX_TOKEN_BYTES));
        assert_eq!(Jws::parse(&huge).unwrap_err(), JwsError::TooLarge);
    }

    #[test]
    fn jwks_keeps_only_usable_signing_keys() {
        let (ed, es) = (ed_key(), es_key());
        let mut enc_use = ed_jwk("enc", &ed);
        enc_use["use"] = json!("enc");
        let mut wrong_alg = ed_jwk("wrong-alg", &ed);
        wrong_alg["alg"] = json!("RS256");
        let mut es_as_hs = es_jwk("es-hs", &es);
        es_as_hs["alg"] = json!("HS256");
        let mut no_verify = ed_jwk("no-verify", &ed);
        no_verify["key_ops"] = json!(["sign"]);
        let mut p384 = es_jwk("p384", &es);
        p384["crv"] = json!("P-384");
        let small_rsa =
            json!({ "kty": "RSA", "kid": "rsa1024", "n": enc(&[0xc5; 128]), "e": "AQAB" });
        let s = set(vec![
            enc_use,
            wrong_alg,
            es_as_hs,
            no_verify,
            p384,
            small_rsa,
            json!({ "kty": "oct", "kid": "hmac", "k": "c2VjcmV0" }),
            json!({ "kty": "OKP", "crv": "Ed25519", "kid": "short", "x": "AAAA" }),
            json!({ "kty": "EC", "crv": "P-256", "kid": "no-y", "x": enc(&[1; 32]) }),
            json!("not an object"),
            json!({ "kty": "OKP", "crv": "Ed25519", "kid": 5, "x": enc(&[1; 32]) }),
            ed_jwk("good", &ed),
        ]);
        assert_eq!(s.len(), 1);
        for kid in ["enc", "wrong-alg", "no-verify"] {
            let t = ed_token(Some(kid), &ed, json!({}));
            assert_eq!(check(&s, &t), Err(JwsError::UnknownKey), "{kid}");
        }
        assert!(check(&s, &ed_token(Some("good"), &ed, json!({}))).is_ok());
        // Not a JWK Set at all.
        for body in [&b"{"[..], b"[]", b"{\"keys\":{}}", b"null", b"\xff"] {
            assert_eq!(JwkSet::parse(body).unwrap_err(), JwsError::Malformed);
        }
    }

    #[tokio::test]
    async fn cache_refetches_once_for_an_unknown_kid_then_rate_limits() {
        let (k1, k2, k3) = (ed_key(), ed_key(), ed_key());
        let published = parking_lot::Mutex::new(vec![ed_jwk("k1", &k1)]);
        let fetches = AtomicUsize::new(0);
        let fetch = || {
            fetches.fetch_add(1, Ordering::SeqCst);
            let keys = published.lock().clone();
            async move { Ok(set(keys)) }
        };
        let cache = JwksCache::default();
        let uri = "https://idp.test/jwks";
        let t0 = Instant::now();
        let t1 = ed_token(Some("k1"), &k1, json!({ "sub": "1" }));
        assert!(cache.verify(uri, &t1, t0, fetch).await.is_ok());
        assert!(cache.verify(uri, &t1, t0, fetch).await.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "cached");
        // A rotated key: one refetch finds it.
        published.lock().push(ed_jwk("k2", &k2));
        let t2 = ed_token(Some("k2"), &k2, json!({ "sub": "2" }));
        assert!(cache.verify(uri, &t2, t0, fetch).await.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        // An unknown kid soon after: no refetch, refused.
        published.lock().push(ed_jwk("k3", &k3));
        let t3 = ed_token(Some("k3"), &k3, json!({ "sub": "3" }));
        let later = t0 + Duration::from_secs(10);
        let e = cache.verify(uri, &t3, later, fetch).await.unwrap_err();
        assert!(matches!(e, AuthError::OAuth("invalid_grant", _)), "{e}");
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        // Once the interval has passed, it may refetch again.
        let later = t0 + REFETCH_MIN_INTERVAL;
        assert!(cache.verify(uri, &t3, later, fetch).await.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        // A bad token costs no fetch.
        let bad = format!("{}.e30.", enc(br#"{"alg":"none"}"#));
        assert!(cache.verify(uri, &bad, later, fetch).await.is_err());
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        // After the TTL the set is fetched again; another provider has its own set.
        let expired = later + JWKS_TTL;
        assert!(cache.verify(uri, &t1, expired, fetch).await.is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 4);
        assert!(cache
            .verify("https://other.test/jwks", &t1, expired, fetch)
            .await
            .is_ok());
        assert_eq!(fetches.load(Ordering::SeqCst), 5);
        // A kid unknown right after a (TTL) fetch is not refetched again.
        let t4 = ed_token(Some("k4"), &ed_key(), json!({}));
        let fresh = expired + JWKS_TTL;
        assert!(cache.verify(uri, &t4, fresh, fetch).await.is_err());
        assert_eq!(fetches.load(Ordering::SeqCst), 6);
        // A failing fetch is passed through, not a refusal of the token.
        let failing = || async { Err(AuthError::Internal("unreachable".into())) };
        let e = cache
            .verify("https://down.test/jwks", &t1, fresh, failing)
            .await
            .unwrap_err();
        assert!(matches!(e, AuthError::Internal(_)), "{e}");
    }
}
