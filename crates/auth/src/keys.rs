//! Token signing keys: stored in AuthShield's database with the private half sealed by
//! the master key, rotated with overlap.
//!
//! A rotated-in key is published in the JWKS at once but signs only from `signs_from`
//! (`publish_ahead_secs` later, so relying parties that cached the JWKS have fetched it
//! before its first token reaches them); the key it replaces signs until then
//! (`retired_at`). After that the old key stays in the JWKS (and so verifiable) until
//! `verify_until`, the moment every token it signed has expired. `retire` ends that
//! overlap at once, for a key believed compromised (after a rotation with no
//! publication delay, so that it has stopped signing).

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
    /// When it starts signing; absent: from its creation.
    pub signs_from: Option<String>,
    /// When it stops (or stopped) signing, rotated out; absent: not yet rotated out.
    /// A staged rotation's switch may lie ahead.
    pub signs_until: Option<String>,
    /// When it stops (or stopped) verifying, and leaves the JWKS.
    pub verify_until: Option<String>,
    /// Whether it signs now (servers switch within their 15-second key reload).
    pub signing: bool,
}

/// Whether a key with these times signs at `now`: it has started (`signs_from`) and
/// has not been rotated out (`retired_at`). Of the keys that do, the newest signs.
pub(crate) fn signs_at(signs_from: Option<i64>, retired_at: Option<i64>, now: i64) -> bool {
    signs_from.is_none_or(|t| t <= now) && retired_at.is_none_or(|t| t > now)
}

/// [`signs_at`] in SQL, with `now` as parameter `$1`.
pub(crate) const SIGNS_AT_SQL: &str =
    "(signs_from IS NULL OR signs_from <= $1) AND (retired_at IS NULL OR retired_at > $1)";

async fn create_key(
    db: &Db,
    env: &Envelope,
    tx: &mut vaultpay_store::Tx,
    signs_from: Option<i64>,
) -> Result<String, AuthError> {
    let kid = uuid::Uuid::now_v7().to_string();
    let (signer, secret) = Signer25519::generate(kid.clone());
    let secret = Zeroizing::new(secret);
    let sealed = env
        .seal(&*secret, kid.as_bytes())
        .map_err(|e| AuthError::Internal(e.to_string()))?;
    let public = hex::encode(signer.public_key());
    sqlx::query(
        "INSERT INTO signing_keys (kid, alg, public_key, private_key_sealed, created_at, signs_from) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&kid)
    .bind(ALG)
    .bind(&public)
    .bind(&sealed)
    .bind(now_micros())
    .bind(signs_from)
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
        let kid = create_key(db, env, &mut tx, None).await?;
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

/// When a rotation's new keys start signing, and how long the keys they replace verify
/// after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The new key is published now and signs this many seconds later (0: at once,
    /// for a key believed compromised). The old key signs until then.
    pub publish_ahead_secs: i64,
    /// How long the Ed25519 key rotated out verifies after it stopped signing.
    pub overlap_secs: i64,
    /// The same for the ES256 ID-token key.
    pub id_overlap_secs: i64,
}

/// Rotates the Ed25519 signing key: a new one is made, published at once and signing
/// `publish_ahead_secs` later; the current one signs until then and stays verifiable
/// for `overlap_secs` after. Returns the new key's id.
pub async fn rotate(
    db: &Db,
    env: &Envelope,
    publish_ahead_secs: i64,
    overlap_secs: i64,
    actor: &str,
) -> Result<String, AuthError> {
    let mut tx = db.begin().await?;
    let switch = now_micros() + secs(publish_ahead_secs);
    let kid = rotate_in(db, env, &mut tx, switch, overlap_secs, actor).await?;
    tx.commit().await?;
    Ok(kid)
}

/// `vaultpay keys rotate`: the Ed25519 signing key ([`rotate`]) and, if there is one,
/// the ES256 ID-token key, in ONE transaction and with the same switch time: both
/// rotate, or neither does. Returns the new keys' ids and when they start signing
/// (microseconds).
pub async fn rotate_all(
    db: &Db,
    env: &Envelope,
    r: Rotation,
    actor: &str,
) -> Result<(String, Option<String>, i64), AuthError> {
    let mut tx = db.begin().await?;
    // The ES256 key's lock before the audit chain's (which the Ed25519 rotation's
    // audit entry takes): the order `es256::load_or_create` takes them in.
    db.lock(&mut tx, crate::oauth::es256::LOCK_ES256).await?;
    let switch = now_micros() + secs(r.publish_ahead_secs);
    let kid = rotate_in(db, env, &mut tx, switch, r.overlap_secs, actor).await?;
    let id_kid =
        crate::oauth::es256::rotate_in(db, env, &mut tx, switch, r.id_overlap_secs, actor).await?;
    tx.commit().await?;
    Ok((kid, id_kid, switch))
}

async fn rotate_in(
    db: &Db,
    env: &Envelope,
    tx: &mut vaultpay_store::Tx,
    switch: i64,
    overlap_secs: i64,
    actor: &str,
) -> Result<String, AuthError> {
    rotate_out(tx, "signing_keys", switch, overlap_secs).await?;
    let kid = create_key(db, env, tx, Some(switch)).await?;
    let origin = vaultpay_store::audit::Origin::default();
    vaultpay_store::audit::append(
        db,
        tx,
        &origin,
        vaultpay_store::audit::NewAudit::success("key.rotated")
            .actor(actor)
            .resource(&kid)
            .metadata(serde_json::json!({
                "overlap_secs": overlap_secs,
                "signs_from": vaultpay_core::time::rfc3339(switch),
            })),
    )
    .await?;
    Ok(kid)
}

/// Makes every key of `table` ("signing_keys", or the ES256 ID-token keys) that would
/// still sign at `switch` stop then: it stays verifiable (in the JWKS) for
/// `overlap_secs` after (never longer than it already would: a key `retire`d keeps its
/// end). A key already due to stop earlier keeps its times. Returns how
/// many keys it rotated out (none: the table has no key yet).
pub(crate) async fn rotate_out(
    tx: &mut vaultpay_store::Tx,
    table: &'static str,
    switch: i64,
    overlap_secs: i64,
) -> Result<u64, AuthError> {
    let n = sqlx::query(&format!(
        "UPDATE {table} SET retired_at = $1, \
         verify_until = CASE WHEN verify_until IS NOT NULL AND verify_until < $2 THEN verify_until ELSE $2 END \
         WHERE retired_at IS NULL OR retired_at > $1"
    ))
    .bind(switch)
    .bind(switch + secs(overlap_secs))
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(n)
}

/// How long relying parties may cache the JWKS (its `Cache-Control`): a rotated-in key
/// is published at least this long plus [`RELOAD_EVERY_SECS`] before it signs.
pub const JWKS_MAX_AGE_SECS: i64 = 60;
/// The JWKS `Cache-Control` header, [`JWKS_MAX_AGE_SECS`] spelt out.
pub const JWKS_CACHE_CONTROL: &str = "public, max-age=60";

/// How often running servers reload their keys: a rotated-out key still signs on them
/// for up to this long, so a rotation's overlap includes it.
pub const RELOAD_EVERY_SECS: i64 = 15;

/// The key tables, and the `alg` an ES256 key's audit entries and listing name.
const KEY_TABLES: [(&str, Option<&str>); 2] =
    [("signing_keys", None), ("oauth_es256_keys", Some("ES256"))];

/// Stops a rotated-out key (Ed25519 or ES256) from verifying anything, at once; false
/// if `kid` is no key that has stopped signing (a key still signing until a staged
/// rotation's switch cannot be retired: rotate with no publication delay first).
pub async fn retire(db: &Db, kid: &str, actor: &str) -> Result<bool, AuthError> {
    let mut tx = db.begin().await?;
    let now = now_micros();
    for (table, alg) in KEY_TABLES {
        let n = sqlx::query(&format!(
            "UPDATE {table} SET verify_until = $1 WHERE kid = $2 AND retired_at <= $1"
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

/// Loads the signer (the newest key that signs now, see [`signs_at`]) and all keys still
/// verifiable (published keys that do not sign yet included).
pub async fn load(db: &Db, env: &Envelope) -> Result<LoadedKeys, AuthError> {
    let now = now_micros();
    let rows = sqlx::query(
        "SELECT kid, public_key, private_key_sealed, retired_at, signs_from FROM signing_keys \
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
        let from: Option<i64> = r.try_get("signs_from")?;
        if signer.is_none() && signs_at(from, retired, now) {
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
            "SELECT kid, {alg}, created_at, retired_at, verify_until, signs_from FROM {table} \
             ORDER BY created_at DESC"
        ))
        .fetch_all(db.read())
        .await?;
        let now = now_micros();
        let mut signer_seen = false;
        for r in &rows {
            let retired: Option<i64> = r.try_get("retired_at")?;
            let until: Option<i64> = r.try_get("verify_until")?;
            let from: Option<i64> = r.try_get("signs_from")?;
            // the newest key that may sign now is the one that does
            let signing = !signer_seen && signs_at(from, retired, now);
            signer_seen |= signing;
            keys.push((
                r.try_get::<i64, _>("created_at")?,
                KeyInfo {
                    kid: r.try_get("kid")?,
                    alg: r.try_get("alg")?,
                    created_at: vaultpay_core::time::rfc3339(r.try_get("created_at")?),
                    signs_from: from.map(vaultpay_core::time::rfc3339),
                    signs_until: retired.map(vaultpay_core::time::rfc3339),
                    verify_until: until.map(vaultpay_core::time::rfc3339),
                    signing,
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

#[cfg(test)]
mod tests {
    use super::signs_at;

    #[test]
    fn the_jwks_cache_control_says_its_max_age() {
        assert_eq!(
            super::JWKS_CACHE_CONTROL,
            format!("public, max-age={}", super::JWKS_MAX_AGE_SECS)
        );
    }

    #[test]
    fn a_key_signs_from_its_switch_until_it_is_rotated_out() {
        // the first key: signs from creation until rotated out
        assert!(signs_at(None, None, 100));
        assert!(signs_at(None, Some(101), 100));
        assert!(!signs_at(None, Some(100), 100));
        // a staged key: published, not signing before its switch
        assert!(!signs_at(Some(101), None, 100));
        assert!(signs_at(Some(100), None, 100));
        // rotated out before its switch (`keys rotate --now` during a staged rotation)
        assert!(!signs_at(Some(150), Some(120), 130));
        assert!(!signs_at(Some(150), Some(120), 160));
    }
}
