//! The P-256 key that signs ES256 ID tokens for clients without EdDSA support.
//! Stored like the Ed25519 keys (private half sealed by the master key), created on
//! first use under a lock, published in the JWKS.

use crate::{AuthError, AuthService};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use serde::Serialize;
use sqlx::Row;
use std::sync::Arc;
use vaultpay_core::crypto::Envelope;
use vaultpay_core::time::now_micros;
use vaultpay_store::Db;
use zeroize::Zeroizing;

const LOCK_ES256: i64 = 0x4f41;

/// A loaded ES256 signer.
pub struct Es256Key {
    kid: String,
    key: SigningKey,
    header_b64: String,
}

impl std::fmt::Debug for Es256Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Es256Key(kid={})", self.kid)
    }
}

impl Es256Key {
    fn new(kid: String, key: SigningKey) -> Self {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        let header_b64 = URL_SAFE_NO_PAD.encode(header.to_string());
        Self {
            kid,
            key,
            header_b64,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// JWS compact serialisation with a raw r‖s signature (RFC 7518 §3.4).
    pub fn sign<C: Serialize>(&self, claims: &C) -> Result<String, AuthError> {
        let payload = serde_json::to_vec(claims).map_err(|e| AuthError::Internal(e.to_string()))?;
        let mut out = self.header_b64.clone();
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        let sig: Signature = self.key.sign(out.as_bytes());
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.to_bytes(), &mut out);
        Ok(out)
    }

    /// The public key as a JWK (RFC 7518 §6.2).
    pub fn jwk(&self) -> serde_json::Value {
        public_jwk(&self.kid, VerifyingKey::from(&self.key))
    }
}

fn public_jwk(kid: &str, vk: VerifyingKey) -> serde_json::Value {
    let point = vk.to_encoded_point(false);
    let x = point
        .x()
        .map(|x| URL_SAFE_NO_PAD.encode(x))
        .unwrap_or_default();
    let y = point
        .y()
        .map(|y| URL_SAFE_NO_PAD.encode(y))
        .unwrap_or_default();
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid, "x": x, "y": y,
    })
}

impl AuthService {
    /// The ES256 signer, loaded (or created) once.
    pub(crate) async fn es256(&self) -> Result<Arc<Es256Key>, AuthError> {
        self.inner
            .oauth
            .es256
            .get_or_try_init(|| async {
                load_or_create(self.db(), &self.inner.env)
                    .await
                    .map(Arc::new)
            })
            .await
            .cloned()
    }
}

/// Makes sure the P-256 key exists. Called when an ES256 client is registered, so
/// the key is in the JWKS before it signs anything (relying parties cache JWKS).
pub async fn ensure_key(db: &Db, env: &Envelope) -> Result<(), AuthError> {
    load_or_create(db, env).await.map(|_| ())
}

async fn load_or_create(db: &Db, env: &Envelope) -> Result<Es256Key, AuthError> {
    let mut tx = db.begin().await?;
    db.lock(&mut tx, LOCK_ES256).await?;
    let row = sqlx::query(
        "SELECT kid, private_key_sealed FROM oauth_es256_keys ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let key = if let Some(r) = row {
        let kid: String = r.try_get("kid")?;
        let sealed: String = r.try_get("private_key_sealed")?;
        let secret = env
            .open(&sealed, kid.as_bytes())
            .map_err(|e| AuthError::Internal(format!("cannot open ES256 key {kid}: {e}")))?;
        let sk = SigningKey::from_slice(&secret)
            .map_err(|_| AuthError::Internal("bad ES256 key".into()))?;
        Es256Key::new(kid, sk)
    } else {
        let kid = format!("es256-{}", uuid::Uuid::now_v7());
        let sk = SigningKey::random(&mut rand::rngs::OsRng);
        let secret = Zeroizing::new(sk.to_bytes().to_vec());
        let sealed = env
            .seal(&secret, kid.as_bytes())
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        let public = hex::encode(VerifyingKey::from(&sk).to_encoded_point(false).as_bytes());
        sqlx::query(
            "INSERT INTO oauth_es256_keys (kid, public_key, private_key_sealed, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&kid)
        .bind(&public)
        .bind(&sealed)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
        vaultpay_store::audit::append(
            db,
            &mut tx,
            &vaultpay_store::audit::Origin::default(),
            vaultpay_store::audit::NewAudit::success("key.created")
                .actor("system")
                .resource(&kid)
                .metadata(serde_json::json!({ "alg": "ES256" })),
        )
        .await?;
        Es256Key::new(kid, sk)
    };
    tx.commit().await?;
    Ok(key)
}

/// Adds the ES256 key to a JWK Set document once it exists (it is created when the
/// first ES256 client is registered, so deployments without such clients publish only
/// their Ed25519 keys).
pub(crate) async fn add_to_jwks(svc: &AuthService, doc: &mut serde_json::Value) {
    if svc.inner.oauth.es256.get().is_none() {
        let exists = sqlx::query("SELECT kid FROM oauth_es256_keys LIMIT 1")
            .fetch_optional(svc.db().read())
            .await;
        if !matches!(exists, Ok(Some(_))) {
            return;
        }
    }
    match svc.es256().await {
        Ok(k) => {
            if let Some(keys) = doc.get_mut("keys").and_then(|k| k.as_array_mut()) {
                keys.push(k.jwk());
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not load the ES256 key"),
    }
}
