use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vaultpay_core::jwt::{self, AccessClaims, JwtError, KeySet, Rules};
use vaultpay_proto::auth::Introspection;

/// Where verification keys come from: AuthShield's own database, or its JWKS URL.
pub trait KeySource: Send + Sync + 'static {
    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, String>>;
}

/// Asks AuthShield whether a token's session is still live (RFC 7662).
pub trait Introspector: Send + Sync + 'static {
    fn introspect<'a>(
        &'a self,
        token: &'a str,
        client_ip: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<Introspection, String>>;
}

/// Minimum time between two key refetches caused by unknown `kid`s, so a flood of
/// forged tokens cannot turn into a flood of JWKS requests.
const UNKNOWN_KID_REFETCH_INTERVAL: Duration = Duration::from_secs(5);

const CACHE_SHARDS: usize = 16;
const CACHE_PER_SHARD: usize = 4096;

type ClaimsMap = HashMap<Box<str>, AccessClaims>;

/// Tokens that passed full verification, keyed by the whole token text (never by the
/// signature alone, so a swapped payload cannot hit). An entry is reused only while
/// the token's `exp`/`nbf` still hold, and the cache is emptied whenever the key set
/// changes, so a retired key stops verifying at once.
struct VerifiedCache {
    hasher: std::hash::RandomState,
    shards: Vec<Mutex<ClaimsMap>>,
}

impl VerifiedCache {
    fn new() -> Self {
        Self {
            hasher: std::hash::RandomState::new(),
            shards: (0..CACHE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, token: &str) -> &Mutex<ClaimsMap> {
        use std::hash::BuildHasher;
        &self.shards[(self.hasher.hash_one(token) as usize) % CACHE_SHARDS]
    }

    fn get(&self, token: &str, rules: &Rules, now: i64) -> Option<AccessClaims> {
        let shard = self.shard(token).lock();
        let c = shard.get(token)?;
        (c.exp + rules.leeway_secs > now && c.nbf - rules.leeway_secs <= now).then(|| c.clone())
    }

    fn put(&self, token: &str, claims: &AccessClaims) {
        let mut shard = self.shard(token).lock();
        if shard.len() >= CACHE_PER_SHARD {
            shard.clear();
        }
        shard.insert(token.into(), claims.clone());
    }

    fn clear(&self) {
        for s in &self.shards {
            s.lock().clear();
        }
    }
}

/// Verifies access tokens locally against a cached key set.
pub struct TokenVerifier {
    keys: RwLock<KeySet>,
    rules: Rules,
    source: Arc<dyn KeySource>,
    last_refetch: Mutex<Option<Instant>>,
    /// When the source last answered a key set (`None`: never, or a fixed key set).
    fetched: Mutex<Option<Instant>>,
    verified: VerifiedCache,
}

impl TokenVerifier {
    pub fn new(rules: Rules, source: Arc<dyn KeySource>, initial: KeySet) -> Self {
        Self {
            keys: RwLock::new(initial),
            rules,
            source,
            last_refetch: Mutex::new(None),
            fetched: Mutex::new(None),
            verified: VerifiedCache::new(),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Verifies `token`; on an unknown `kid`, refetches the keys once and retries.
    /// A token that already verified is answered from the verified-token cache.
    pub async fn verify(&self, token: &str) -> Result<AccessClaims, JwtError> {
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        if let Some(claims) = self.verified.get(token, &self.rules, now) {
            return Ok(claims);
        }
        let first = self.verify_and_remember(token, now);
        match first {
            Err(JwtError::UnknownKey) if self.claim_refetch() => {
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "could not refetch verification keys");
                    return first;
                }
                self.verify_and_remember(token, now)
            }
            other => other,
        }
    }

    /// Full verification; a token that passes is cached. Both happen under the key
    /// set's read lock, so a key change (`set_keys` empties the cache under the write
    /// lock) cannot fall between them and leave a token of a removed key cached.
    fn verify_and_remember(&self, token: &str, now_secs: i64) -> Result<AccessClaims, JwtError> {
        let keys = self.keys.read();
        let result = jwt::verify(token, &keys, &self.rules, now_secs);
        if let Ok(claims) = &result {
            self.verified.put(token, claims);
        }
        result
    }

    fn claim_refetch(&self) -> bool {
        let mut last = self.last_refetch.lock();
        let due = last.is_none_or(|t| t.elapsed() >= UNKNOWN_KID_REFETCH_INTERVAL);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Reloads the key set from its source.
    pub async fn refresh(&self) -> Result<(), String> {
        let keys = self.source.fetch().await?;
        // A source that answers no key at all (a misrouted or broken JWKS endpoint) is
        // a failed fetch, not a rotation: the keys held stay.
        if keys.is_empty() {
            return Err("the key source returned no keys".into());
        }
        self.set_keys(keys);
        *self.fetched.lock() = Some(Instant::now());
        Ok(())
    }

    /// How long ago the key source last answered a key set (`None`: never). Keys held
    /// past their source's answers may include one retired since: a ledger run alone
    /// reports itself not ready when this grows too old.
    pub fn keys_age(&self) -> Option<std::time::Duration> {
        self.fetched.lock().map(|t| t.elapsed())
    }

    /// Replaces the key set; when any key or key id changes, tokens verified under the
    /// old set must verify again. Keys that stay keep their prepared tables.
    pub fn set_keys(&self, mut keys: KeySet) {
        let mut guard = self.keys.write();
        if !keys.adopt_unchanged(&guard) {
            self.verified.clear();
        }
        *guard = keys;
    }

    pub fn jwks(&self) -> serde_json::Value {
        self.keys.read().to_jwks()
    }

    /// Whether any verification key is loaded (a remote key set may not be yet).
    pub fn has_keys(&self) -> bool {
        !self.keys.read().is_empty()
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub claims: AccessClaims,
    /// The raw bearer token, for introspection of sensitive operations.
    pub token: String,
}

impl Principal {
    pub fn user_id(&self) -> &str {
        &self.claims.sub
    }

    pub fn session_id(&self) -> &str {
        &self.claims.sid
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.claims.roles.iter().any(|r| r == role)
    }

    pub fn has_any_role(&self, roles: &[&str]) -> bool {
        roles.iter().any(|r| self.has_role(r))
    }

    /// Whether the token may act on the user's behalf on VaultPay's own APIs: a
    /// first-party token, or one AuthShield issued to an OAuth client with the `api`
    /// scope.
    pub fn may_use_api(&self) -> bool {
        self.claims.client_id.is_none()
            || self
                .claims
                .scope
                .as_deref()
                .is_some_and(|s| s.split(' ').any(|x| x == "api"))
    }
}

/// Parses `Authorization: Bearer <token>` strictly (RFC 6750 §2.1).
pub fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(ApiError::credentials_missing(
            "missing_token",
            "This endpoint needs a bearer access token.",
        ));
    };
    if values.next().is_some() {
        return Err(ApiError::unauthorized(
            "invalid_token",
            "More than one Authorization header.",
        ));
    }
    let value = value.to_str().map_err(|_| {
        ApiError::unauthorized("invalid_token", "The Authorization header is not ASCII.")
    })?;
    let token = match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token,
        // `Bearer` alone (a client that sent `Bearer ` with an empty variable: the
        // trailing space does not survive as part of the value)
        None if value.trim().eq_ignore_ascii_case("bearer") => {
            return Err(ApiError::unauthorized(
                "invalid_token",
                "The Authorization header names the Bearer scheme but carries no token.",
            ))
        }
        _ => {
            return Err(ApiError::unauthorized(
                "invalid_token",
                "The Authorization scheme must be Bearer.",
            ))
        }
    };
    let well_formed = !token.is_empty()
        && token.len() <= 4096
        && token.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+' | b'/' | b'=')
        });
    if !well_formed {
        return Err(ApiError::unauthorized(
            "invalid_token",
            "The bearer token is malformed.",
        ));
    }
    Ok(token)
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let token = bearer_token(parts)?;
        let verifier = parts
            .extensions
            .get::<Arc<TokenVerifier>>()
            .ok_or_else(|| ApiError::internal("no token verifier installed on this router"))?;
        match verifier.verify(token).await {
            Ok(claims) => Ok(Principal {
                claims,
                token: token.to_owned(),
            }),
            // No key at all yet (a ledger run alone that has not reached AuthShield's
            // JWKS): the token is not known bad, the service is not ready.
            Err(JwtError::UnknownKey) if !verifier.has_keys() => Err(ApiError::unavailable(
                "no verification keys: AuthShield's JWKS has not been fetched",
            )),
            Err(e) => Err(ApiError::unauthorized("invalid_token", e.to_string())),
        }
    }
}

/// The caller when a token is present and valid; `None` when no Authorization header.
pub struct MaybePrincipal(pub Option<Principal>);

impl<S: Send + Sync> FromRequestParts<S> for MaybePrincipal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if !parts.headers.contains_key(header::AUTHORIZATION) {
            return Ok(MaybePrincipal(None));
        }
        Principal::from_request_parts(parts, state)
            .await
            .map(|p| MaybePrincipal(Some(p)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use vaultpay_core::jwt::{Audience, Signer25519};

    struct Fixed(KeySet);

    impl KeySource for Fixed {
        fn fetch(&self) -> BoxFuture<'_, Result<KeySet, String>> {
            let k = self.0.clone();
            Box::pin(async move { Ok(k) })
        }
    }

    fn claims(now: i64) -> AccessClaims {
        AccessClaims {
            iss: "iss".into(),
            sub: "u1".into(),
            aud: Audience::One("aud".into()),
            exp: now + 300,
            iat: now,
            nbf: now,
            jti: "j".into(),
            sid: "s".into(),
            roles: vec!["customer".into()],
            device_id: "d".into(),
            auth_time: now,
            amr: vec!["pwd".into()],
            acr: None,
            scope: None,
            client_id: None,
        }
    }

    /// A signer, a verifier trusting its key, and the current time in seconds.
    /// Each malformed Authorization header is refused with what is wrong with it.
    #[test]
    fn bearer_token_says_what_is_wrong() {
        let parse = |value: &'static str| {
            let (mut parts, ()) = axum::http::Request::new(()).into_parts();
            parts.headers.insert(
                header::AUTHORIZATION,
                axum::http::HeaderValue::from_static(value),
            );
            bearer_token(&parts)
                .map(str::to_owned)
                .map_err(|e| e.problem.detail.unwrap_or_default())
        };
        assert_eq!(parse("Bearer abc.def-ghi").unwrap(), "abc.def-ghi");
        assert_eq!(parse("bearer abc").unwrap(), "abc");
        for empty in ["Bearer", "bearer", "BEARER"] {
            assert!(
                parse(empty).unwrap_err().contains("carries no token"),
                "{empty}"
            );
        }
        assert!(parse("Basic dXNlcjpwYXNz")
            .unwrap_err()
            .contains("must be Bearer"));
        assert!(parse("Bearertoken").unwrap_err().contains("must be Bearer"));
        assert!(parse("Bearer a b").unwrap_err().contains("malformed"));
        assert!(parse("Bearer  ").unwrap_err().contains("malformed"));
    }

    fn setup() -> (Signer25519, TokenVerifier, i64) {
        let (signer, _) = Signer25519::generate("k1");
        let mut keys = KeySet::default();
        keys.insert("k1", &signer.public_key()).unwrap();
        (
            signer,
            verifier(keys),
            vaultpay_core::time::now_micros() / 1_000_000,
        )
    }

    fn verifier(keys: KeySet) -> TokenVerifier {
        let rules = Rules {
            issuer: "iss".into(),
            audience: "aud".into(),
            leeway_secs: 0,
        };
        TokenVerifier::new(rules, Arc::new(Fixed(KeySet::default())), keys)
    }

    #[tokio::test]
    async fn cached_tokens_stop_verifying_when_their_key_is_retired() {
        let (signer, v, now) = setup();
        let token = signer.sign_access(&claims(now)).unwrap();
        assert_eq!(v.verify(&token).await.unwrap().sub, "u1");
        assert_eq!(
            v.verify(&token).await.unwrap().sub,
            "u1",
            "second use is a cache hit"
        );
        // the key is removed (retired): the cached token must be refused too
        v.set_keys(KeySet::default());
        assert_eq!(v.verify(&token).await, Err(JwtError::UnknownKey));
    }

    #[tokio::test]
    async fn cached_tokens_stop_verifying_when_their_kid_gets_another_key() {
        let (signer, v, now) = setup();
        let token = signer.sign_access(&claims(now)).unwrap();
        v.verify(&token).await.unwrap();
        // same key ids, the same key: the cache stays
        let mut same = KeySet::default();
        same.insert("k1", &signer.public_key()).unwrap();
        v.set_keys(same);
        assert!(v.verified.get(&token, v.rules(), now).is_some());
        // `k1` now names another key: a token cached under the old one is refused
        let (other, _) = Signer25519::generate("k1");
        let mut swapped = KeySet::default();
        swapped.insert("k1", &other.public_key()).unwrap();
        v.set_keys(swapped);
        assert_eq!(v.verify(&token).await, Err(JwtError::Signature));
    }

    #[tokio::test]
    async fn a_different_payload_with_a_cached_signature_is_not_a_hit() {
        let (signer, v, now) = setup();
        let token = signer.sign_access(&claims(now)).unwrap();
        v.verify(&token).await.unwrap();
        let mut evil = claims(now);
        evil.roles = vec!["admin".into()];
        let evil_payload = signer.sign_access(&evil).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let evil_parts: Vec<&str> = evil_payload.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], evil_parts[1], parts[2]);
        assert_eq!(v.verify(&forged).await, Err(JwtError::Signature));
    }

    #[tokio::test]
    async fn expired_cached_tokens_are_refused() {
        let (signer, v, now) = setup();
        let mut c = claims(now);
        c.exp = now - 1;
        let token = signer.sign_access(&c).unwrap();
        assert_eq!(v.verify(&token).await, Err(JwtError::Expired));
        // even if it had been cached while valid, a hit re-checks exp
        v.verified.put(&token, &c);
        assert_eq!(v.verify(&token).await, Err(JwtError::Expired));
    }

    /// A key source that answers an empty set (a misrouted or broken JWKS endpoint) is
    /// a failed refresh: the keys held stay, and tokens keep verifying.
    #[tokio::test]
    async fn an_empty_key_set_from_the_source_keeps_the_keys_held() {
        let (signer, v, now) = setup();
        let token = signer.sign_access(&claims(now)).unwrap();
        assert!(
            v.refresh().await.is_err(),
            "the fixed source answers no keys"
        );
        assert!(v.has_keys());
        assert_eq!(v.verify(&token).await.unwrap().sub, "u1");
    }
}
