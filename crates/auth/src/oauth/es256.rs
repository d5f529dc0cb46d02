//! The P-256 key that signs ES256 ID tokens for clients without EdDSA support.
//! Stored like the Ed25519 keys (private half sealed by the master key), created on
//! first use under a lock, published in the JWKS. `vaultpay keys rotate` rotates it
//! with the Ed25519 key when it exists, at the same switch time: the new key is in the
//! JWKS at once and signs from the switch; the old key signs until then and stays in
//! the JWKS for the ID-token lifetime after (`keys retire` drops it at once); servers
//! pick the new one up with their periodic key reload.

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

pub(crate) const LOCK_ES256: i64 = 0x4f41;

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
    /// The ES256 signer: the newest key that signs now (`keys::signs_at`), loaded (or
    /// created) on first use and replaced by [`AuthService::reload_es256`].
    pub(crate) async fn es256(&self) -> Result<Arc<Es256Key>, AuthError> {
        if let Some(k) = self.inner.oauth.es256.read().clone() {
            return Ok(k);
        }
        let k = Arc::new(load_or_create(self.db(), &self.inner.env).await?);
        // A reload that ran meanwhile may have set a newer key: keep it.
        Ok(self.inner.oauth.es256.write().get_or_insert(k).clone())
    }

    /// Picks up a rotated ES256 key (with the Ed25519 keys' periodic reload). Does
    /// nothing before the first ES256 client made the key.
    pub(crate) async fn reload_es256(&self) -> Result<(), AuthError> {
        let current = self
            .inner
            .oauth
            .es256
            .read()
            .as_ref()
            .map(|k| k.kid.clone());
        let newest: Option<String> = sqlx::query_scalar(&format!(
            "SELECT kid FROM oauth_es256_keys WHERE {} ORDER BY created_at DESC LIMIT 1",
            crate::keys::SIGNS_AT_SQL
        ))
        .bind(now_micros())
        .fetch_optional(self.db().read())
        .await?;
        if newest.is_some() && newest != current {
            let k = Arc::new(load_or_create(self.db(), &self.inner.env).await?);
            *self.inner.oauth.es256.write() = Some(k);
        }
        Ok(())
    }
}

/// Rotates the ES256 key if there is one: a new one is made, in the JWKS at once and
/// signing `publish_ahead_secs` later; the signing key signs until then and stays in the
/// JWKS for `overlap_secs` after. Returns the new key's id.
pub async fn rotate(
    db: &Db,
    env: &Envelope,
    publish_ahead_secs: i64,
    overlap_secs: i64,
    actor: &str,
) -> Result<Option<String>, AuthError> {
    let mut tx = db.begin().await?;
    let switch = now_micros() + vaultpay_core::time::secs(publish_ahead_secs);
    let kid = rotate_in(db, env, &mut tx, switch, overlap_secs, actor).await?;
    tx.commit().await?;
    Ok(kid)
}

/// [`rotate`] inside the caller's transaction (see `keys::rotate_all`).
pub(crate) async fn rotate_in(
    db: &Db,
    env: &Envelope,
    tx: &mut vaultpay_store::Tx,
    switch: i64,
    overlap_secs: i64,
    actor: &str,
) -> Result<Option<String>, AuthError> {
    db.lock(tx, LOCK_ES256).await?;
    if crate::keys::rotate_out(tx, "oauth_es256_keys", switch, overlap_secs).await? == 0 {
        return Ok(None);
    }
    Ok(Some(
        create(db, env, tx, "key.rotated", actor, Some(switch))
            .await?
            .kid,
    ))
}

/// Makes sure the P-256 key exists. Called when an ES256 client is registered, so
/// the key is in the JWKS before it signs anything (relying parties cache JWKS).
pub async fn ensure_key(db: &Db, env: &Envelope) -> Result<(), AuthError> {
    load_or_create(db, env).await.map(|_| ())
}

async fn load_or_create(db: &Db, env: &Envelope) -> Result<Es256Key, AuthError> {
    let mut tx = db.begin().await?;
    db.lock(&mut tx, LOCK_ES256).await?;
    let row = sqlx::query(&format!(
        "SELECT kid, private_key_sealed FROM oauth_es256_keys WHERE {} \
         ORDER BY created_at DESC LIMIT 1",
        crate::keys::SIGNS_AT_SQL
    ))
    .bind(now_micros())
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
        create(db, env, &mut tx, "key.created", "system", None).await?
    };
    tx.commit().await?;
    Ok(key)
}

/// Makes, seals, stores and audits a new P-256 key (inside the caller's transaction,
/// which holds [`LOCK_ES256`]).
async fn create(
    db: &Db,
    env: &Envelope,
    tx: &mut vaultpay_store::Tx,
    action: &'static str,
    actor: &str,
    signs_from: Option<i64>,
) -> Result<Es256Key, AuthError> {
    let kid = format!("es256-{}", uuid::Uuid::now_v7());
    let sk = SigningKey::random(&mut rand::rngs::OsRng);
    let secret = Zeroizing::new(sk.to_bytes().to_vec());
    let sealed = env
        .seal(&secret, kid.as_bytes())
        .map_err(|e| AuthError::Internal(e.to_string()))?;
    let public = hex::encode(VerifyingKey::from(&sk).to_encoded_point(false).as_bytes());
    sqlx::query(
        "INSERT INTO oauth_es256_keys (kid, public_key, private_key_sealed, created_at, signs_from) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&kid)
    .bind(&public)
    .bind(&sealed)
    .bind(now_micros())
    .bind(signs_from)
    .execute(&mut **tx)
    .await?;
    vaultpay_store::audit::append(
        db,
        tx,
        &vaultpay_store::audit::Origin::default(),
        vaultpay_store::audit::NewAudit::success(action)
            .actor(actor)
            .resource(&kid)
            .metadata(match signs_from {
                Some(t) => serde_json::json!({
                    "alg": "ES256",
                    "signs_from": vaultpay_core::time::rfc3339(t),
                }),
                None => serde_json::json!({ "alg": "ES256" }),
            }),
    )
    .await?;
    Ok(Es256Key::new(kid, sk))
}

/// Adds the ES256 keys still verifiable (the signing one and those rotated out less
/// than their overlap ago) to a JWK Set document. There are none before the first
/// ES256 client is registered, so deployments without such clients publish only their
/// Ed25519 keys.
pub(crate) async fn add_to_jwks(
    svc: &AuthService,
    doc: &mut serde_json::Value,
) -> Result<(), AuthError> {
    let rows = sqlx::query(
        "SELECT kid, public_key FROM oauth_es256_keys \
         WHERE verify_until IS NULL OR verify_until > $1 ORDER BY created_at DESC",
    )
    .bind(now_micros())
    .fetch_all(svc.db().read())
    .await
    .inspect_err(|e| tracing::warn!(error = %e, "could not read the ES256 keys"))?;
    let Some(keys) = doc.get_mut("keys").and_then(|k| k.as_array_mut()) else {
        return Ok(());
    };
    for r in rows {
        let (Ok(kid), Ok(public)) = (
            r.try_get::<String, _>("kid"),
            r.try_get::<String, _>("public_key"),
        ) else {
            continue;
        };
        let vk = hex::decode(&public)
            .ok()
            .and_then(|b| VerifyingKey::from_sec1_bytes(&b).ok());
        match vk {
            Some(vk) => keys.push(public_jwk(&kid, vk)),
            None => tracing::warn!(kid, "bad ES256 public key"),
        }
    }
    Ok(())
}
