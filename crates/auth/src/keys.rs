//! Token signing keys: stored in AuthShield's database with the private half sealed by
//! the master key, rotated with overlap.
//!
//! A key signs until it is rotated out; after that it stays in the JWKS (and so
//! verifiable) until `verify_until`, the moment every token it signed has expired.
//! `retire` ends that overlap at once, for a key believed compromised.

use crate::AuthError;
use futures::future::BoxFuture;
use sqlx::Row;
use vaultpay_core::crypto::Envelope;
use vaultpay_core::jwt::{KeySet, Signer25519};
use vaultpay_core::time::{now_micros, secs};
use vaultpay_store::Db;
use zeroize::Zeroizing;

const ALG: &str = "EdDSA";

/// The current signer and every key still verifiable.
pub struct LoadedKeys {
    pub signer: Signer25519,
    pub verify: KeySet,
}

/// Facts about one key, for `vaultpay keys list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub kid: String,
    pub alg: String,
    pub created_at: String,
    pub retired_at: Option<String>,
    pub verify_until: Option<String>,
    pub signing: bool,
}

async fn create_key(
    db: &Db,
    env: &Envelope,
    tx: &mut vaultpay_store::Tx,
) -> Result<String, AuthError> {
    let kid = uuid::Uuid::now_v7().to_string();
    let (signer, secret) = Signer25519::generate(kid.clone());
    let secret = Zeroizing::new(secret);
    let sealed = env
        .seal(&*secret, kid.as_bytes())
        .map_err(|e| AuthError::Internal(e.to_string()))?;
    let public = hex::encode(signer.public_key());
    sqlx::query(
        "INSERT INTO signing_keys (kid, alg, public_key, private_key_sealed, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&kid)
    .bind(ALG)
    .bind(&public)
    .bind(&sealed)
    .bind(now_micros())
    .execute(&mut **tx)
    .await?;
    let _ = db;
    Ok(kid)
}

/// Makes sure a signing key exists (first start).
pub async fn ensure_key(db: &Db, env: &Envelope) -> Result<(), AuthError> {
    let mut tx = db.begin().await?;
    let active = sqlx::query("SELECT kid FROM signing_keys WHERE retired_at IS NULL LIMIT 1")
        .fetch_optional(&mut *tx)
        .await?;
    if active.is_none() {
        let kid = create_key(db, env, &mut tx).await?;
        let origin = vaultpay_store::audit::Origin::default();
        vaultpay_store::audit::append(
            db,
            &mut tx,
            &origin,
            vaultpay_store::audit::NewAudit::success("key.created")
                .actor("system")
                .resource(&kid),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Rotates the Ed25519 signing key: the current one stops signing and stays
/// verifiable for `overlap_secs`; a new one is made. Returns the new key's id.
pub async fn rotate(
    db: &Db,
    env: &Envelope,
    overlap_secs: i64,
    actor: &str,
) -> Result<String, AuthError> {
    let mut tx = db.begin().await?;
    let kid = rotate_in(db, env, &mut tx, overlap_secs, actor).await?;
    tx.commit().await?;
    Ok(kid)
}

/// `vaultpay keys rotate`: the Ed25519 signing key ([`rotate`], `overlap_secs`) and, if
/// there is one, the ES256 ID-token key (`id_overlap_secs`), in ONE transaction: both
/// rotate, or neither does. Returns the new keys' ids.
pub async fn rotate_all(
    db: &Db,
    env: &Envelope,
    overlap_secs: i64,
    id_overlap_secs: i64,
    actor: &str,
) -> Result<(String, Option<String>), AuthError> {
    let mut tx = db.begin().await?;
    // The ES256 key's lock before the audit chain's (which the Ed25519 rotation's
    // audit entry takes): the order `es256::load_or_create` takes them in.
    db.lock(&mut tx, crate::oauth::es256::LOCK_ES256).await?;
    let kid = rotate_in(db, env, &mut tx, overlap_secs, actor).await?;
    let id_kid = crate::oauth::es256::rotate_in(db, env, &mut tx, id_overlap_secs, actor).await?;
    tx.commit().await?;
    Ok((kid, id_kid))
}

async fn rotate_in(
    db: &Db,
    env: &Envelope,
    tx: &mut vaultpay_store::Tx,
    overlap_secs: i64,
    actor: &str,
) -> Result<String, AuthError> {
    rotate_out(tx, "signing_keys", overlap_secs).await?;
    let kid = create_key(db, env, tx).await?;
    let origin = vaultpay_store::audit::Origin::default();
    vaultpay_store::audit::append(
        db,
        tx,
        &origin,
        vaultpay_store::audit::NewAudit::success("key.rotated")
            .actor(actor)
            .resource(&kid)
            .metadata(serde_json::json!({ "overlap_secs": overlap_secs })),
    )
    .await?;
    Ok(kid)
}

/// Stops the signing key of `table` ("signing_keys", or the ES256 ID-token keys) from
/// signing: it stays verifiable (in the JWKS) for `overlap_secs`. Returns how many keys
/// it rotated out (none: the table has no key yet).
pub(crate) async fn rotate_out(
    tx: &mut vaultpay_store::Tx,
    table: &'static str,
    overlap_secs: i64,
) -> Result<u64, AuthError> {
    let now = now_micros();
    let n = sqlx::query(&format!(
        "UPDATE {table} SET retired_at = $1, verify_until = $2 WHERE retired_at IS NULL"
    ))
    .bind(now)
    .bind(now + secs(overlap_secs))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n)
}

/// How often running servers reload their keys: a rotated-out key still signs on them
/// for up to this long, so a rotation's overlap includes it.
pub const RELOAD_EVERY_SECS: i64 = 15;

/// The key tables, and the `alg` an ES256 key's audit entries and listing name.
const KEY_TABLES: [(&str, Option<&str>); 2] =
    [("signing_keys", None), ("oauth_es256_keys", Some("ES256"))];

/// Stops a rotated-out key (Ed25519 or ES256) from verifying anything, at once; false
/// if `kid` is no rotated-out key.
pub async fn retire(db: &Db, kid: &str, actor: &str) -> Result<bool, AuthError> {
    let mut tx = db.begin().await?;
    let now = now_micros();
    for (table, alg) in KEY_TABLES {
        let n = sqlx::query(&format!(
            "UPDATE {table} SET verify_until = $1 WHERE kid = $2 AND retired_at IS NOT NULL"
        ))
        .bind(now)
        .bind(kid)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 1 {
            let mut entry = vaultpay_store::audit::NewAudit::success("key.retired")
                .actor(actor)
                .resource(kid);
            if let Some(alg) = alg {
                entry = entry.metadata(serde_json::json!({ "alg": alg }));
            }
            let origin = vaultpay_store::audit::Origin::default();
            vaultpay_store::audit::append(db, &mut tx, &origin, entry).await?;
            tx.commit().await?;
            return Ok(true);
        }
    }
    tx.commit().await?;
    Ok(false)
}

/// Whether the database holds any signing key (each sealed with the master key).
pub async fn any(db: &Db) -> Result<bool, AuthError> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM signing_keys")
        .fetch_one(db.read())
        .await?;
    Ok(n > 0)
}

/// Checks that `env` opens the current signing key, when there is one (a wrong master
/// key would seal new keys that the server then cannot open).
pub async fn check_opens(db: &Db, env: &Envelope) -> Result<(), AuthError> {
    let active: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM signing_keys WHERE retired_at IS NULL")
            .fetch_one(db.read())
            .await?;
    if active > 0 {
        load(db, env).await?;
    }
    Ok(())
}

/// Loads the signer (newest unretired key) and all keys still verifiable.
pub async fn load(db: &Db, env: &Envelope) -> Result<LoadedKeys, AuthError> {
    let now = now_micros();
    let rows = sqlx::query(
        "SELECT kid, public_key, private_key_sealed, retired_at FROM signing_keys \
         WHERE verify_until IS NULL OR verify_until > $1 ORDER BY created_at DESC",
    )
    .bind(now)
    .fetch_all(db.read())
    .await?;
    let mut verify = KeySet::default();
    let mut signer = None;
    for r in rows {
        let kid: String = r.try_get("kid")?;
        let public: String = r.try_get("public_key")?;
        let public: [u8; 32] = hex::decode(&public)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| AuthError::Internal(format!("bad public key for {kid}")))?;
        verify
            .insert(kid.clone(), &public)
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        let retired: Option<i64> = r.try_get("retired_at")?;
        if signer.is_none() && retired.is_none() {
            let sealed: String = r.try_get("private_key_sealed")?;
            let secret = env
                .open(&sealed, kid.as_bytes())
                .map_err(|e| AuthError::Internal(format!("cannot open signing key {kid}: {e}")))?;
            let secret: [u8; 32] = secret
                .as_slice()
                .try_into()
                .map_err(|_| AuthError::Internal("bad signing key length".into()))?;
            let s = Signer25519::new(kid.clone(), &secret);
            if s.public_key() != public {
                return Err(AuthError::Internal(format!(
                    "signing key {kid} does not match its public key"
                )));
            }
            signer = Some(s);
        }
    }
    let signer = signer.ok_or_else(|| AuthError::Internal("no active signing key".into()))?;
    Ok(LoadedKeys { signer, verify })
}

/// Lists every key (Ed25519 and ES256), newest first.
pub async fn list(db: &Db) -> Result<Vec<KeyInfo>, AuthError> {
    let mut keys = Vec::new();
    for (table, alg) in KEY_TABLES {
        let alg = alg.map_or("alg".to_owned(), |a| format!("'{a}' AS alg"));
        let rows = sqlx::query(&format!(
            "SELECT kid, {alg}, created_at, retired_at, verify_until FROM {table}"
        ))
        .fetch_all(db.read())
        .await?;
        for r in &rows {
            let retired: Option<i64> = r.try_get("retired_at")?;
            let until: Option<i64> = r.try_get("verify_until")?;
            keys.push((
                r.try_get::<i64, _>("created_at")?,
                KeyInfo {
                    kid: r.try_get("kid")?,
                    alg: r.try_get("alg")?,
                    created_at: vaultpay_core::time::rfc3339(r.try_get("created_at")?),
                    retired_at: retired.map(vaultpay_core::time::rfc3339),
                    verify_until: until.map(vaultpay_core::time::rfc3339),
                    signing: retired.is_none(),
                },
            ));
        }
    }
    keys.sort_by_key(|k| std::cmp::Reverse(k.0));
    Ok(keys.into_iter().map(|(_, k)| k).collect())
}

/// Verification keys straight from the database (AuthShield's own verifier).
pub struct DbKeySource {
    pub db: Db,
}

impl vaultpay_web::KeySource for DbKeySource {
    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, String>> {
        Box::pin(async move {
            let now = now_micros();
            let rows = sqlx::query("SELECT kid, public_key FROM signing_keys WHERE verify_until IS NULL OR verify_until > $1")
                .bind(now)
                .fetch_all(self.db.read())
                .await
                .map_err(|e| e.to_string())?;
            let mut set = KeySet::default();
            for r in rows {
                let kid: String = r.try_get("kid").map_err(|e| e.to_string())?;
                let public: String = r.try_get("public_key").map_err(|e| e.to_string())?;
                let public: [u8; 32] = hex::decode(&public)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or("bad public key")?;
                set.insert(kid, &public).map_err(|e| e.to_string())?;
            }
            Ok(set)
        })
    }
}
