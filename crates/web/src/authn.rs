use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
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

/// Verifies access tokens locally against a cached key set.
pub struct TokenVerifier {
    keys: RwLock<KeySet>,
    rules: Rules,
    source: Arc<dyn KeySource>,
    last_refetch: Mutex<Option<Instant>>,
}

impl TokenVerifier {
    pub fn new(rules: Rules, source: Arc<dyn KeySource>, initial: KeySet) -> Self {
        Self {
            keys: RwLock::new(initial),
            rules,
            source,
            last_refetch: Mutex::new(None),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Verifies `token`; on an unknown `kid`, refetches the keys once and retries.
    pub async fn verify(&self, token: &str) -> Result<AccessClaims, JwtError> {
        let now = vaultpay_core::time::now_micros() / 1_000_000;
        let first = jwt::verify(token, &self.keys.read(), &self.rules, now);
        match first {
            Err(JwtError::UnknownKey) if self.claim_refetch() => {
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "could not refetch verification keys");
                    return first;
                }
                jwt::verify(token, &self.keys.read(), &self.rules, now)
            }
            other => other,
        }
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
        *self.keys.write() = keys;
        Ok(())
    }

    pub fn set_keys(&self, keys: KeySet) {
        *self.keys.write() = keys;
    }

    pub fn jwks(&self) -> serde_json::Value {
        self.keys.read().to_jwks()
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
}

/// Parses `Authorization: Bearer <token>` strictly (RFC 6750 §2.1).
pub fn bearer_token(parts: &Parts) -> Result<&str, ApiError> {
    let mut values = parts.headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(ApiError::unauthorized(
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
