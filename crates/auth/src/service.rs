//! The AuthShield service object: shared state and the helpers every flow uses.

use crate::config::AuthConfig;
use crate::hashpool::HashPool;
use crate::hibp::HibpClient;
use crate::keys;
use crate::mail::{Mailer, Message};
use crate::rbac::PermCache;
use crate::rotation::{Policy, RotationQueue};
use crate::AuthError;
use parking_lot::RwLock;
use std::path::Path;
use std::sync::Arc;
use vaultpay_core::crypto::{Envelope, MasterKey};
use vaultpay_core::jwt::{AccessClaims, Audience, Rules, Signer25519};
use vaultpay_core::password::PasswordHasher;
use vaultpay_core::secret::Secret;
use vaultpay_core::time::now_micros;
use vaultpay_store::Db;
use vaultpay_web::{RateLimiter, TokenVerifier};

pub(crate) struct Inner {
    pub db: Db,
    pub cfg: AuthConfig,
    pub env: Envelope,
    pub dummy_hash: String,
    pub hashes: HashPool,
    pub signer: RwLock<Arc<Signer25519>>,
    pub verifier: Arc<TokenVerifier>,
    pub limiter: Arc<dyn RateLimiter>,
    pub mailer: Arc<dyn Mailer>,
    pub hibp: Option<HibpClient>,
    pub perms: PermCache,
    pub rotations: RotationQueue,
    pub iptrust: crate::iptrust::TrustState,
    pub bus: crate::custom_roles::Bus,
    pub oauth: crate::oauth::OAuthState,
    pub me: crate::me_cache::MeCache,
    /// Refused uses of a permission, recorded in the audit log (rate-limited per user).
    pub denials: vaultpay_store::audit::DenialLog,
}

/// AuthShield. Cheap to clone.
#[derive(Clone)]
pub struct AuthService {
    pub(crate) inner: Arc<Inner>,
}

/// The first administrator, created on the first start of an empty database.
#[derive(Debug, Clone, Default)]
pub struct Bootstrap {
    pub admin_email: Option<String>,
    pub admin_password: Option<Secret>,
}

/// What [`AuthService::bootstrap`] did.
#[derive(Debug)]
pub struct BootstrapOutcome {
    pub email: String,
    /// Set when the password was generated: shown once, never stored in clear.
    pub generated_password: Option<Secret>,
}

impl AuthService {
    /// Builds the service on a migrated database, creating a signing key if none exists.
    pub async fn new(
        db: Db,
        cfg: AuthConfig,
        master: &MasterKey,
        limiter: Arc<dyn RateLimiter>,
        data_dir: &Path,
    ) -> Result<Self, AuthError> {
        let env = Envelope::new(master);
        keys::ensure_key(&db, &env).await?;
        let loaded = keys::load(&db, &env).await?;
        let hasher =
            PasswordHasher::new(cfg.argon2).map_err(|e| AuthError::Internal(e.to_string()))?;
        let h2 = hasher.clone();
        let dummy_hash = tokio::task::spawn_blocking(move || h2.dummy_hash())
            .await
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        let rules = Rules {
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway_secs: cfg.leeway_secs,
        };
        let verifier = Arc::new(TokenVerifier::new(
            rules,
            Arc::new(keys::DbKeySource { db: db.clone() }),
            loaded.verify,
        ));
        let mailer = crate::mail::build(&cfg.mail, data_dir)
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        // SMTP is a network round trip: no request waits for it (see `mail::Background`).
        // The file outbox writes locally and synchronously, so a newcomer's link is in
        // `data/mail` when the request returns.
        let mailer: Arc<dyn crate::mail::Mailer> = if cfg.mail.smtp.is_some() {
            Arc::new(crate::mail::Background::spawn(mailer))
        } else {
            mailer
        };
        let hibp = if cfg.hibp.enabled {
            Some(HibpClient::new(&cfg.hibp).map_err(AuthError::Internal)?)
        } else {
            None
        };
        let permits = if cfg.hash_concurrency == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        } else {
            cfg.hash_concurrency
        };
        let hashes = HashPool::start(hasher, permits)?;
        let perms = PermCache::new(cfg.permission_cache_ttl_secs);
        let rotations = RotationQueue::spawn(
            db.clone(),
            Policy {
                reuse_grace_secs: cfg.refresh_reuse_grace_secs,
                idle_ttl_secs: cfg.session_idle_ttl_secs,
            },
        );
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                env,
                dummy_hash,
                hashes,
                signer: RwLock::new(Arc::new(loaded.signer)),
                verifier,
                limiter,
                mailer,
                hibp,
                perms,
                rotations,
                iptrust: Default::default(),
                bus: Default::default(),
                oauth: Default::default(),
                me: Default::default(),
                denials: Default::default(),
                cfg,
            }),
        })
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn config(&self) -> &AuthConfig {
        &self.inner.cfg
    }

    /// The verifier of this service's access tokens (install it on routers).
    pub fn verifier(&self) -> Arc<TokenVerifier> {
        self.inner.verifier.clone()
    }

    /// The limiter credential checks go through.
    pub fn limiter(&self) -> Arc<dyn RateLimiter> {
        self.inner.limiter.clone()
    }

    /// Reloads signing and verification keys (after `vaultpay keys rotate`).
    pub async fn reload_keys(&self) -> Result<(), AuthError> {
        let loaded = keys::load(&self.inner.db, &self.inner.env).await?;
        *self.inner.signer.write() = Arc::new(loaded.signer);
        self.inner.verifier.set_keys(loaded.verify);
        self.reload_es256().await
    }

    /// Periodic work: picking up rotated keys; stops when `shutdown` turns true.
    pub fn spawn_background(
        &self,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let svc = self.clone();
        let every = std::time::Duration::from_secs(keys::RELOAD_EVERY_SECS.unsigned_abs());
        vec![vaultpay_web::every(
            "key_reload",
            every,
            shutdown,
            move || {
                let svc = svc.clone();
                async move { svc.reload_keys().await.map(|()| 0) }
            },
        )]
    }

    /// Hashes on the hashing threads (`hash_concurrency` of them).
    pub(crate) async fn hash_password(&self, password: String) -> Result<String, AuthError> {
        self.inner.hashes.hash(password).await
    }

    /// Verifies on the hashing threads; `phc = None` verifies against the dummy hash
    /// so an unknown account costs the same as a wrong password, and so does an
    /// account without a password (see [`is_password_hash`]).
    pub(crate) async fn verify_password(
        &self,
        password: String,
        phc: Option<String>,
    ) -> Result<bool, AuthError> {
        let (usable, phc) = match phc {
            Some(p) if is_password_hash(&p) => (true, p),
            _ => (false, self.inner.dummy_hash.clone()),
        };
        let ok = self.inner.hashes.verify(password, phc).await?;
        Ok(ok && usable)
    }

    /// Signs an access token for a session.
    pub(crate) fn issue_access(
        &self,
        s: &SessionFacts,
        roles: Vec<String>,
    ) -> Result<(String, i64), AuthError> {
        let now = now_micros() / 1_000_000;
        let ttl = self.inner.cfg.access_token_ttl_secs;
        let claims = AccessClaims {
            iss: self.inner.cfg.issuer.clone(),
            sub: s.user_id.clone(),
            aud: Audience::One(self.inner.cfg.audience.clone()),
            exp: now + ttl,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::now_v7().to_string(),
            sid: s.session_id.clone(),
            roles,
            device_id: s.device_id.clone(),
            auth_time: s.auth_time / 1_000_000,
            amr: s.amr.clone(),
            acr: vaultpay_core::step_up::acr_for(&s.amr),
            scope: None,
            client_id: None,
        };
        let signer = self.inner.signer.read().clone();
        let token = signer
            .sign_access(&claims)
            .map_err(|e| AuthError::Internal(e.to_string()))?;
        metrics::counter!("auth_tokens_issued_total", "kind" => "access").increment(1);
        Ok((token, ttl))
    }

    /// Sends mail; a failure is logged, not returned (the flow that sent it stands).
    pub(crate) async fn send_mail(&self, to: &str, subject: &str, text: String) {
        let msg = Message {
            to: to.to_owned(),
            subject: subject.to_owned(),
            text,
        };
        if let Err(e) = self.inner.mailer.send(msg).await {
            tracing::warn!(error = %e, "could not send mail");
        }
    }

    /// Tells the account's address, after the commit, about a security change made to
    /// the account (`what`, a sentence), so that an owner whose password someone else
    /// has learns of it. The mail carries no link that acts.
    pub(crate) async fn notify_security_change(&self, user_id: &str, subject: &str, what: &str) {
        let Ok(email) = self.user_email(user_id).await else {
            tracing::warn!(user_id, "security notice: no address to send it to");
            return;
        };
        let text = format!(
            "{what}\n\nIf this was not you, someone else may have your password: reset it now \
             (\"Forgot password\" where you sign in), which also ends every session.\n"
        );
        self.send_mail(&email, subject, text).await;
    }

    /// Base of links in emails.
    pub(crate) fn public_url(&self) -> &str {
        self.inner
            .cfg
            .public_url
            .as_deref()
            .unwrap_or(&self.inner.cfg.issuer)
            .trim_end_matches('/')
    }
}

/// What a token is issued from.
#[derive(Debug, Clone)]
pub(crate) struct SessionFacts {
    pub user_id: String,
    pub session_id: String,
    pub device_id: String,
    pub auth_time: i64,
    pub amr: Vec<String>,
}

/// Whether a stored password hash is one a password can match (an Argon2id PHC
/// string). Anything else (an account made by an upstream sign-in, whose hash is `!`)
/// is verified against the dummy hash instead, as an unknown account is: refusing it
/// at once would answer in microseconds where a wrong password takes Argon2's time,
/// and tell a caller which addresses have accounts without a password.
fn is_password_hash(stored: &str) -> bool {
    stored.starts_with("$argon2id$")
}

/// A service on a fresh SQLite database with the default configuration, an in-memory
/// limiter and a data directory of its own (unit tests).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) async fn test_service() -> (AuthService, vaultpay_store::Db, std::path::PathBuf) {
    use vaultpay_store::{testing, Backend, Service};
    let db = testing::fresh_db(Service::Auth, Backend::Sqlite)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("vaultpay-svc-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let svc = AuthService::new(
        db.clone(),
        crate::config::AuthConfig::default(),
        &vaultpay_core::crypto::MasterKey::generate(),
        std::sync::Arc::new(vaultpay_web::MemoryRateLimiter::default()),
        &dir,
    )
    .await
    .unwrap();
    (svc, db, dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_argon2id_hashes_are_checked_as_themselves() {
        use super::is_password_hash;
        let h = vaultpay_core::password::PasswordHasher::default().dummy_hash();
        assert!(is_password_hash(&h));
        for other in ["!", "", "$argon2i$v=19$m=64,t=1,p=1$x$y"] {
            assert!(!is_password_hash(other), "{other:?}");
        }
    }
}
