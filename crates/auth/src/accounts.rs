//! Accounts: registration, email verification, password change and reset, profile,
//! and the bootstrap administrator.

use crate::hibp::HibpVerdict;
use crate::rbac::roles_of;
use crate::service::{Bootstrap, BootstrapOutcome};
use crate::{AuthError, AuthService};
use sqlx::Row;
use vaultpay_core::crypto::{opaque_token, sha256_hex};
use vaultpay_core::password::PolicyViolation;
use vaultpay_core::secret::Secret;
use vaultpay_core::time::{now_micros, rfc3339, secs};
use vaultpay_proto::auth as wire;
use vaultpay_store::audit::{append, NewAudit, Origin};
use vaultpay_web::{Ctx, Principal};

pub(crate) const MAX_EMAIL: usize = 254;
pub(crate) const MAX_NAME: usize = 100;

/// Trims, NFC-normalises and lower-cases an email address, writes its domain in its
/// ASCII form (IDNA, UTS 46: `bücher.de` is `xn--bcher-kva.de`) and checks its shape.
/// One mailbox so has one spelling: a domain typed in Unicode or in Punycode, or a
/// character composed or decomposed, is the same account, and an admin sees a
/// look-alike domain as the Punycode it is.
pub(crate) fn normalise_email(raw: &str) -> Result<String, AuthError> {
    use unicode_normalization::UnicodeNormalization;
    let bad = |why: &str| {
        AuthError::Invalid(
            "email_invalid",
            format!("The email address is invalid: {why}."),
        )
    };
    let trimmed = raw.trim();
    if trimmed.is_empty() || trimmed.len() > 4 * MAX_EMAIL {
        return Err(bad("it must be 1 to 254 characters"));
    }
    // (NFC leaves ASCII as it is: the usual address skips it)
    let lowered = if trimmed.is_ascii() {
        trimmed.to_ascii_lowercase()
    } else {
        trimmed.nfc().collect::<String>().to_lowercase()
    };
    let Some(at) = lowered.rfind('@') else {
        return Err(bad("it has no @"));
    };
    // A domain in Unicode or Punycode is replaced by its checked ASCII form; the part
    // before the @ stays, so `at` still splits the address.
    let domain = &lowered[at + 1..];
    let email = if domain.is_ascii() && !domain.contains("xn--") {
        lowered
    } else {
        let domain = idna::domain_to_ascii_strict(domain)
            .map_err(|_| bad("the domain is not a valid host name"))?;
        format!("{}@{domain}", &lowered[..at])
    };
    if email.len() > MAX_EMAIL {
        return Err(bad("it must be 1 to 254 characters"));
    }
    let (local, domain) = (&email[..at], &email[at + 1..]);
    if local.is_empty() || local.len() > 64 || local.contains('@') {
        return Err(bad("the part before @ is empty, too long or has another @"));
    }
    if email.chars().any(|c| {
        c.is_whitespace()
            || c.is_control()
            || matches!(
                c,
                '<' | '>' | '(' | ')' | '[' | ']' | ',' | ';' | ':' | '\\' | '"'
            )
    }) {
        return Err(bad("it contains characters not allowed in an address"));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_alphanumeric() || c == '-')
    };
    if labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(bad("the domain is not a valid host name"));
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(bad("dots in the part before @ are misplaced"));
    }
    Ok(email)
}

fn validate_name(name: &str) -> Result<String, AuthError> {
    let name = name.trim();
    let n = name.chars().count();
    if n == 0 || n > MAX_NAME || name.chars().any(char::is_control) {
        return Err(AuthError::Invalid(
            "name_invalid",
            format!("The name must be 1 to {MAX_NAME} printable characters."),
        ));
    }
    Ok(name.to_owned())
}

impl AuthService {
    /// Policy, bundled list and (optionally) the breached-password range API.
    async fn check_new_password(&self, password: &str, inputs: &[&str]) -> Result<(), AuthError> {
        // Length and the bundled list at once; only zxcvbn waits for a hashing thread.
        self.inner
            .cfg
            .password_policy
            .check_shape(password)
            .map_err(AuthError::Password)?;
        self.inner
            .hashes
            .check_policy(self.inner.cfg.password_policy.clone(), password, inputs)
            .await?
            .map_err(AuthError::Password)?;
        if let Some(hibp) = &self.inner.hibp {
            match hibp.check(password).await {
                HibpVerdict::Clean => {}
                HibpVerdict::Breached(count) => {
                    return Err(AuthError::Password(PolicyViolation::Breached { count }));
                }
                HibpVerdict::Unavailable(why) => {
                    tracing::warn!(reason = %why, fail_open = hibp.fail_open(), "breached-password check unavailable");
                    if !hibp.fail_open() {
                        return Err(AuthError::BreachCheckUnavailable);
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses a password matching one of the last N (current included).
    async fn check_history(&self, user_id: &str, password: &str) -> Result<(), AuthError> {
        let n = self.inner.cfg.password_history as i64;
        if n == 0 {
            return Ok(());
        }
        let rows = sqlx::query(
            "SELECT password_hash FROM password_history WHERE user_id = $1 ORDER BY created_at DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(n)
        .fetch_all(self.inner.db.read())
        .await?;
        for r in rows {
            let phc: String = r.try_get("password_hash")?;
            if self.verify_password(password.to_owned(), Some(phc)).await? {
                return Err(AuthError::PasswordReused);
            }
        }
        Ok(())
    }

    async fn create_user(
        &self,
        origin: &Origin,
        email: &str,
        name: &str,
        phc: &str,
        roles: &[&str],
        verified: bool,
    ) -> Result<String, AuthError> {
        let db = &self.inner.db;
        let id = uuid::Uuid::now_v7().to_string();
        let now = now_micros();
        let mut tx = db.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, email_verified, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $6)",
        )
        .bind(&id)
        .bind(email)
        .bind(name)
        .bind(phc)
        .bind(i64::from(verified))
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if vaultpay_store::is_unique_violation(Some(&e)) => {
                return Err(AuthError::EmailTaken)
            }
            other => other?,
        };
        sqlx::query(
            "INSERT INTO password_history (user_id, password_hash, created_at) VALUES ($1, $2, $3)",
        )
        .bind(&id)
        .bind(phc)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for role in roles {
            sqlx::query("INSERT INTO user_roles (user_id, role, granted_at) VALUES ($1, $2, $3)")
                .bind(&id)
                .bind(*role)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        append(
            db,
            &mut tx,
            origin,
            NewAudit::success("user.registered")
                .actor(&id)
                .resource(&id)
                .metadata(serde_json::json!({ "roles": roles })),
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// `POST /v1/auth/register`.
    pub async fn register(
        &self,
        ctx: &Ctx,
        req: wire::RegisterRequest,
    ) -> Result<wire::User, AuthError> {
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("register:ip:{}", ctx.ip_key()),
            self.inner.cfg.rate_limits.register_per_ip,
        )
        .await?;
        let email = normalise_email(&req.email)?;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("register:acct:{email}"),
            self.inner.cfg.rate_limits.register_per_account,
        )
        .await?;
        let name = validate_name(&req.name)?;
        self.check_new_password(&req.password, &[&email, &name])
            .await?;
        let exists = sqlx::query("SELECT id FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(self.inner.db.read())
            .await?;
        if exists.is_some() {
            return Err(AuthError::EmailTaken);
        }
        let phc = self.hash_password(req.password).await?;
        let id = self
            .create_user(&ctx.origin(), &email, &name, &phc, &["customer"], false)
            .await?;
        self.send_verification(&ctx.origin(), &id, &email).await?;
        self.user(&id).await
    }

    /// Issues a mailed link's token of `purpose` for `user_id` and audits it (`audit`,
    /// resource the user) in one transaction: a link that can verify an address or
    /// reset a password is a credential, and its issue leaves a trace.
    pub(crate) async fn new_email_token(
        &self,
        origin: &Origin,
        user_id: &str,
        purpose: &str,
        ttl_secs: i64,
        audit: NewAudit<'_>,
    ) -> Result<String, AuthError> {
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let token = insert_email_token(&mut *tx, user_id, purpose, ttl_secs, None).await?;
        append(db, &mut tx, origin, audit.resource(user_id)).await?;
        tx.commit().await?;
        Ok(token)
    }

    async fn send_verification(
        &self,
        origin: &Origin,
        user_id: &str,
        email: &str,
    ) -> Result<(), AuthError> {
        let token = self
            .new_email_token(
                origin,
                user_id,
                "verify",
                self.inner.cfg.email_verify_ttl_secs,
                NewAudit::success("email.verification_sent").actor(user_id),
            )
            .await?;
        let link = format!("{}/v1/auth/verify-email?token={token}", self.public_url());
        let text = format!(
            "Welcome to VaultPay.\n\nConfirm your email address by opening this link:\n\n{link}\n\n\
             The link works once and expires in {} hours. If you did not sign up, ignore this message.\n",
            self.inner.cfg.email_verify_ttl_secs / 3600
        );
        self.send_mail(email, "Confirm your email address", text)
            .await;
        Ok(())
    }

    /// Sends a new verification link to the caller.
    pub async fn resend_verification(
        &self,
        ctx: &Ctx,
        p: &Principal,
    ) -> Result<wire::Accepted, AuthError> {
        self.require_live_session(p).await?;
        let user = self.user(p.user_id()).await?;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("verify:acct:{}", user.id),
            self.inner.cfg.rate_limits.reset_per_account,
        )
        .await?;
        if !user.email_verified {
            self.send_verification(&ctx.origin(), &user.id, &user.email)
                .await?;
        }
        Ok(wire::Accepted {
            status: "sent".into(),
        })
    }

    /// Consumes a single-use token of `purpose`; returns its user.
    pub(crate) async fn consume_email_token(
        &self,
        tx: &mut vaultpay_store::Tx,
        token: &str,
        purpose: &str,
    ) -> Result<String, AuthError> {
        Ok(self
            .consume_email_token_payload(tx, token, purpose)
            .await?
            .0)
    }

    /// Consumes a single-use token of `purpose`; returns its user and payload.
    pub(crate) async fn consume_email_token_payload(
        &self,
        tx: &mut vaultpay_store::Tx,
        token: &str,
        purpose: &str,
    ) -> Result<(String, Option<String>), AuthError> {
        if token.is_empty() || token.len() > 128 {
            return Err(AuthError::BadEmailToken);
        }
        let now = now_micros();
        let hash = sha256_hex(token.as_bytes());
        let db = &self.inner.db;
        let owner =
            crate::sessions::lock_owner(db, tx, "email_tokens", "token_hash", &hash).await?;
        let row = sqlx::query(&format!(
            "SELECT user_id, payload, expires_at, used_at FROM email_tokens WHERE token_hash = $1 AND purpose = $2{}",
            db.for_update()
        ))
        .bind(&hash)
        .bind(purpose)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or(AuthError::BadEmailToken)?;
        let user_id: String = row.try_get("user_id")?;
        let used: Option<i64> = row.try_get("used_at")?;
        let expires: i64 = row.try_get("expires_at")?;
        if used.is_some() || expires <= now || owner.as_deref() != Some(user_id.as_str()) {
            return Err(AuthError::BadEmailToken);
        }
        sqlx::query("UPDATE email_tokens SET used_at = $1 WHERE token_hash = $2")
            .bind(now)
            .bind(&hash)
            .execute(&mut **tx)
            .await?;
        Ok((user_id, row.try_get("payload")?))
    }

    /// Confirms an email address from the emailed link.
    pub async fn verify_email(&self, ctx: &Ctx, token: &str) -> Result<wire::User, AuthError> {
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let user_id = self.consume_email_token(&mut tx, token, "verify").await?;
        sqlx::query("UPDATE users SET email_verified = 1, updated_at = $1 WHERE id = $2")
            .bind(now_micros())
            .bind(&user_id)
            .execute(&mut *tx)
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("user.email_verified")
                .actor(&user_id)
                .resource(&user_id),
        )
        .await?;
        tx.commit().await?;
        self.sessions_changed(Some(&user_id)).await;
        self.user(&user_id).await
    }

    /// Starts a reset: always answers the same, whether or not the account exists.
    pub async fn forgot_password(
        &self,
        ctx: &Ctx,
        email: &str,
    ) -> Result<wire::Accepted, AuthError> {
        let rl = &self.inner.cfg.rate_limits;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("reset:ip:{}", ctx.ip_key()),
            rl.reset_per_ip,
        )
        .await?;
        let email = normalise_email(email)?;
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("reset:acct:{email}"),
            rl.reset_per_account,
        )
        .await?;
        let user = sqlx::query("SELECT id FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(self.inner.db.read())
            .await?;
        if let Some(u) = user {
            let id: String = u.try_get("id")?;
            let token = self
                .new_email_token(
                    &ctx.origin(),
                    &id,
                    "reset",
                    self.inner.cfg.password_reset_ttl_secs,
                    NewAudit::success("password.reset_requested"),
                )
                .await?;
            let link = format!("{}/v1/auth/password/reset?token={token}", self.public_url());
            let text = format!(
                "Someone asked to reset the password of your VaultPay account.\n\n\
                 To choose a new password, open this link:\n\n{link}\n\n\
                 (An application may instead send this token with the new password to \
                 POST /v1/auth/password/reset: {token})\n\n\
                 The token works once and expires in {} minutes. If it was not you, ignore this message; \
                 your password is unchanged.\n",
                self.inner.cfg.password_reset_ttl_secs / 60
            );
            self.send_mail(&email, "Reset your password", text).await;
        } else {
            // The same answer, and about the same work: one write transaction (an
            // audit entry in place of the token and its entry), so that the time taken
            // does not tell whether the address has an account (mail is queued, not
            // waited for, with SMTP). The entry also shows someone trying addresses.
            self.audit_only(
                ctx,
                NewAudit::failure("password.reset_requested")
                    .metadata(serde_json::json!({ "email": email, "reason": "unknown_email" })),
            )
            .await?;
        }
        Ok(wire::Accepted {
            status: "accepted".into(),
        })
    }

    async fn set_password(
        &self,
        tx: &mut vaultpay_store::Tx,
        user_id: &str,
        phc: &str,
    ) -> Result<(), AuthError> {
        let now = now_micros();
        sqlx::query("UPDATE users SET password_hash = $1, updated_at = $2, failed_logins = 0, locked_until = NULL, security_locked_at = NULL WHERE id = $3")
            .bind(phc)
            .bind(now)
            .bind(user_id)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "INSERT INTO password_history (user_id, password_hash, created_at) VALUES ($1, $2, $3)",
        )
        .bind(user_id)
        .bind(phc)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        // Reset links mailed before this change must not change the password again.
        void_email_tokens(tx, user_id, "reset", now).await
    }

    pub(crate) async fn user_inputs(&self, user_id: &str) -> Result<(String, String), AuthError> {
        let r = sqlx::query("SELECT email, name FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(self.inner.db.read())
            .await?
            .ok_or(AuthError::NotFound("user"))?;
        Ok((r.try_get("email")?, r.try_get("name")?))
    }

    /// Completes a reset: new password, every session revoked.
    pub async fn reset_password(
        &self,
        ctx: &Ctx,
        req: wire::ResetPasswordRequest,
    ) -> Result<wire::Accepted, AuthError> {
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("reset:ip:{}", ctx.ip_key()),
            self.inner.cfg.rate_limits.reset_per_ip,
        )
        .await?;
        // Look the token up first (without consuming it) so policy errors do not burn it.
        let row = sqlx::query("SELECT user_id FROM email_tokens WHERE token_hash = $1 AND purpose = 'reset' AND used_at IS NULL AND expires_at > $2")
            .bind(sha256_hex(req.token.as_bytes()))
            .bind(now_micros())
            .fetch_optional(self.inner.db.read())
            .await?
            .ok_or(AuthError::BadEmailToken)?;
        let user_id: String = row.try_get("user_id")?;
        let (email, name) = self.user_inputs(&user_id).await?;
        self.check_new_password(&req.new_password, &[&email, &name])
            .await?;
        self.check_history(&user_id, &req.new_password).await?;
        let phc = self.hash_password(req.new_password).await?;
        let db = &self.inner.db;
        let mut tx = db.begin().await?;
        let consumed = self
            .consume_email_token(&mut tx, &req.token, "reset")
            .await?;
        if consumed != user_id {
            return Err(AuthError::BadEmailToken);
        }
        self.set_password(&mut tx, &user_id, &phc).await?;
        let revoked = self
            .revoke_sessions_tx(&mut tx, &user_id, None, "password_reset")
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("password.reset")
                .actor(&user_id)
                .resource(&user_id)
                .metadata(serde_json::json!({ "sessions_revoked": revoked })),
        )
        .await?;
        tx.commit().await?;
        self.sessions_changed(Some(&user_id)).await;
        self.notify_security_change(
            &user_id,
            "Your password was reset",
            "Your VaultPay password was reset through a link mailed to this address, and every session was ended.",
        )
        .await;
        Ok(wire::Accepted {
            status: "password_reset".into(),
        })
    }

    /// Checks the signed-in user's current password before a sensitive change. A wrong
    /// one is audited as `failure_action` and counts toward lockout like a failed
    /// login, so a stolen access token cannot be used to guess the password: the guesses
    /// share the sign-in's per-account rate limit, and a locked account is refused
    /// before any password is checked, as at sign-in.
    pub(crate) async fn check_current_password(
        &self,
        ctx: &Ctx,
        user_id: &str,
        email: &str,
        password: String,
        phc: String,
        failure_action: &'static str,
    ) -> Result<(), AuthError> {
        vaultpay_web::enforce(
            &*self.inner.limiter,
            &format!("login:acct:{email}"),
            self.inner.cfg.rate_limits.login_per_account,
        )
        .await?;
        match self.refuse_locked(user_id).await {
            Err(locked @ AuthError::Locked { .. }) => {
                self.audit_only(
                    ctx,
                    NewAudit::failure(failure_action)
                        .actor(user_id)
                        .resource(user_id)
                        .metadata(serde_json::json!({ "reason": "locked" })),
                )
                .await?;
                return Err(locked);
            }
            other => other?,
        }
        if self.verify_password(password, Some(phc)).await? {
            return Ok(());
        }
        self.audit_only(
            ctx,
            NewAudit::failure(failure_action)
                .actor(user_id)
                .resource(user_id),
        )
        .await?;
        self.login_failed(ctx, email, true).await?;
        Err(crate::error::current_password_wrong())
    }

    /// Changes the password given the current one; ends every other session.
    pub async fn change_password(
        &self,
        ctx: &Ctx,
        p: &Principal,
        req: wire::ChangePasswordRequest,
    ) -> Result<wire::Accepted, AuthError> {
        self.require_live_session(p).await?;
        self.require_step_up(p, crate::mfa::StepUpOp::PasswordChange)
            .await?;
        let user_id = p.user_id();
        let current = sqlx::query("SELECT password_hash FROM users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(self.inner.db.read())
            .await?
            .ok_or(AuthError::NotFound("user"))?;
        let matched: String = current.try_get("password_hash")?;
        let (email, name) = self.user_inputs(user_id).await?;
        self.check_current_password(
            ctx,
            user_id,
            &email,
            req.current_password,
            matched.clone(),
            "password.change_failed",
        )
        .await?;
        self.check_new_password(&req.new_password, &[&email, &name])
            .await?;
        self.check_history(user_id, &req.new_password).await?;
        let phc = self.hash_password(req.new_password).await?;
        let db = &self.inner.db;
        // a reset that committed while the passwords were checked and hashed is not
        // undone by this change
        let mut tx = crate::sessions::begin_as_caller(db, p, Some(&matched)).await?;
        self.set_password(&mut tx, user_id, &phc).await?;
        let revoked = self
            .revoke_sessions_tx(&mut tx, user_id, Some(p.session_id()), "password_changed")
            .await?;
        append(
            db,
            &mut tx,
            &ctx.origin(),
            NewAudit::success("password.changed")
                .actor(user_id)
                .resource(user_id)
                .metadata(serde_json::json!({ "other_sessions_revoked": revoked })),
        )
        .await?;
        tx.commit().await?;
        self.sessions_changed(Some(user_id)).await;
        self.notify_security_change(
            user_id,
            "Your password was changed",
            "Your VaultPay password was changed, and your other sessions were ended.",
        )
        .await;
        Ok(wire::Accepted {
            status: "password_changed".into(),
        })
    }

    /// Writes one audit entry on its own (for refusals that change nothing else).
    pub(crate) async fn audit_only(&self, ctx: &Ctx, new: NewAudit<'_>) -> Result<(), AuthError> {
        vaultpay_store::audit::append_alone(&self.inner.db, &ctx.origin(), new).await?;
        Ok(())
    }

    /// A user as the API shows it.
    pub async fn user(&self, user_id: &str) -> Result<wire::User, AuthError> {
        let r = sqlx::query(
            "SELECT id, email, name, email_verified, created_at FROM users WHERE id = $1",
        )
        .bind(user_id)
        .fetch_optional(self.inner.db.read())
        .await?
        .ok_or(AuthError::NotFound("user"))?;
        Ok(wire::User {
            id: r.try_get("id")?,
            email: r.try_get("email")?,
            name: r.try_get("name")?,
            email_verified: r.try_get::<i64, _>("email_verified")? != 0,
            roles: roles_of(self.inner.db.read(), user_id).await?,
            created_at: rfc3339(r.try_get("created_at")?),
        })
    }

    /// `GET /v1/me`: the caller, if their session is still live (one query; roles and
    /// permissions come from the invalidated-on-change cache).
    pub async fn me(&self, p: &Principal) -> Result<wire::Me, AuthError> {
        crate::oauth::require_api_scope(p)?;
        let now = now_micros();
        let cache = &self.inner.me;
        // Not while deaf to other nodes' invalidations (see `Bus::deaf`).
        let ttl = if self.inner.bus.deaf() {
            0
        } else {
            self.inner.cfg.me_cache_ttl_ms.saturating_mul(1_000)
        };
        let e = match cache.get(p.session_id(), p.user_id(), now, ttl) {
            Some(e) => e,
            None => {
                let generation = cache.generation();
                let r = sqlx::query(
                    "SELECT u.id AS id, u.email AS email, u.name AS name, u.email_verified AS email_verified, \
                     u.created_at AS created_at, s.expires_at AS expires_at, s.idle_expires_at AS idle_expires_at \
                     FROM sessions s JOIN users u ON u.id = s.user_id \
                     WHERE s.id = $1 AND s.user_id = $2 AND s.revoked_at IS NULL AND s.expires_at > $3 \
                     AND s.idle_expires_at > $3",
                )
                .bind(p.session_id())
                .bind(p.user_id())
                .bind(now)
                .fetch_optional(self.inner.db.read())
                .await?
                .ok_or(AuthError::SessionInactive)?;
                let e = std::sync::Arc::new(crate::me_cache::MeEntry {
                    user_id: r.try_get("id")?,
                    email: r.try_get("email")?,
                    name: r.try_get("name")?,
                    email_verified: r.try_get::<i64, _>("email_verified")? != 0,
                    created_at: rfc3339(r.try_get("created_at")?),
                    expires_at: r.try_get("expires_at")?,
                    idle_expires_at: r.try_get("idle_expires_at")?,
                    cached_at: now,
                });
                if ttl > 0 {
                    cache.insert(generation, p.session_id(), e.clone());
                }
                e
            }
        };
        let effective = self.effective(p.user_id()).await?;
        let user = wire::User {
            id: e.user_id.clone(),
            email: e.email.clone(),
            name: e.name.clone(),
            email_verified: e.email_verified,
            roles: effective.roles.clone(),
            created_at: e.created_at.clone(),
        };
        Ok(wire::Me {
            user,
            permissions: effective.permissions.iter().cloned().collect(),
            session_id: p.session_id().to_owned(),
        })
    }

    /// Rewrites stored addresses that an earlier version kept in another spelling
    /// than [`normalise_email`] gives now (an internationalised domain in Unicode, a
    /// decomposed character), so their owners still sign in with them. Only rows with
    /// non-ASCII addresses are read. An address whose new spelling another account
    /// already has is left as it is and named in the log (two accounts for one mailbox:
    /// an administrator decides which stays). Each rewrite is audited
    /// (`user.email_normalised`). Returns how many were rewritten.
    pub async fn normalise_stored_emails(&self) -> Result<u64, AuthError> {
        let db = &self.inner.db;
        let sql = match db.backend() {
            vaultpay_store::Backend::Sqlite => {
                "SELECT id, email FROM users WHERE length(CAST(email AS BLOB)) <> length(email)"
            }
            vaultpay_store::Backend::Postgres => {
                "SELECT id, email FROM users WHERE octet_length(email) <> char_length(email)"
            }
        };
        let rows = sqlx::query(sql).fetch_all(db.read()).await?;
        let mut rewritten = 0;
        for r in &rows {
            let id: String = r.try_get("id")?;
            let old: String = r.try_get("email")?;
            let new = match normalise_email(&old) {
                Ok(n) if n != old => n,
                Ok(_) => continue,
                Err(_) => {
                    tracing::warn!(user_id = %id, "a stored email address is not valid under the current rules; left as it is");
                    continue;
                }
            };
            let mut tx = db.begin().await?;
            let taken = sqlx::query("SELECT id FROM users WHERE email = $1")
                .bind(&new)
                .fetch_optional(&mut *tx)
                .await?;
            if taken.is_some() {
                tracing::error!(user_id = %id, email = %new, "two accounts for one mailbox: this one's address was left in its old spelling");
                continue;
            }
            let n = sqlx::query(
                "UPDATE users SET email = $1, updated_at = $2 WHERE id = $3 AND email = $4",
            )
            .bind(&new)
            .bind(now_micros())
            .bind(&id)
            .bind(&old)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n == 1 {
                append(
                    db,
                    &mut tx,
                    &Origin::default(),
                    NewAudit::success("user.email_normalised")
                        .resource(&id)
                        .metadata(serde_json::json!({ "from": old, "to": new })),
                )
                .await?;
                tx.commit().await?;
                rewritten += 1;
            }
        }
        if rewritten > 0 {
            tracing::info!(
                rewritten,
                "stored email addresses rewritten in their normalised spelling"
            );
        }
        Ok(rewritten)
    }

    /// Creates the first administrator when the database has no users.
    pub async fn bootstrap(&self, b: Bootstrap) -> Result<Option<BootstrapOutcome>, AuthError> {
        let any = sqlx::query("SELECT id FROM users LIMIT 1")
            .fetch_optional(self.inner.db.read())
            .await?;
        if any.is_some() {
            return Ok(None);
        }
        let email = normalise_email(b.admin_email.as_deref().unwrap_or("admin@vaultpay.local"))?;
        let (password, generated) = match b.admin_password {
            Some(p) => {
                self.inner
                    .cfg
                    .password_policy
                    .check(p.expose(), &[&email])
                    .map_err(AuthError::Password)?;
                (p, false)
            }
            None => (Secret::new(vaultpay_core::crypto::random_token(18)), true),
        };
        let phc = self.hash_password(password.expose().to_owned()).await?;
        let origin = Origin {
            request_id: Some("bootstrap".into()),
            ..Origin::default()
        };
        match self
            .create_user(
                &origin,
                &email,
                "Administrator",
                &phc,
                &["admin", "customer"],
                true,
            )
            .await
        {
            Ok(_) => {}
            // another replica bootstrapped at the same moment
            Err(AuthError::EmailTaken) => return Ok(None),
            Err(e) => return Err(e),
        }
        Ok(Some(BootstrapOutcome {
            email,
            generated_password: generated.then_some(password),
        }))
    }
}

/// Stores a new single-use email token of `purpose` (hashed; `payload` travels with
/// it) and returns the token to mail. `exec` is the pool or an open transaction.
pub(crate) async fn insert_email_token<'e, E>(
    exec: E,
    user_id: &str,
    purpose: &str,
    ttl_secs: i64,
    payload: Option<&str>,
) -> Result<String, AuthError>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let token = opaque_token();
    let now = now_micros();
    sqlx::query(
        "INSERT INTO email_tokens (token_hash, user_id, purpose, created_at, expires_at, payload) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(sha256_hex(token.as_bytes()))
    .bind(user_id)
    .bind(purpose)
    .bind(now)
    .bind(now + secs(ttl_secs))
    .bind(payload)
    .execute(exec)
    .await?;
    Ok(token)
}

/// Marks every unused email token of `purpose` for `user_id` used, so links mailed
/// earlier stop working; `tx` holds the user's row (see
/// [`crate::sessions::lock_owner`]).
pub(crate) async fn void_email_tokens(
    tx: &mut vaultpay_store::Tx,
    user_id: &str,
    purpose: &str,
    now: i64,
) -> Result<(), AuthError> {
    sqlx::query(
        "UPDATE email_tokens SET used_at = $1 WHERE user_id = $2 AND purpose = $3 AND used_at IS NULL",
    )
    .bind(now)
    .bind(user_id)
    .bind(purpose)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            normalise_email("  Alice@Example.COM ").ok().as_deref(),
            Some("alice@example.com")
        );
        for bad in [
            "",
            "alice",
            "@x.com",
            "a@",
            "a@b",
            "a b@x.com",
            "a@x..com",
            "a@-x.com",
            "a@@x.com",
            ".a@x.com",
            "a<b>@x.com",
        ] {
            assert!(normalise_email(bad).is_err(), "{bad}");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(normalise_email(&long).is_err());
    }

    /// One mailbox, one spelling: an internationalised domain is stored in its ASCII
    /// (Punycode) form whether typed in Unicode, in Punycode, upper-case, or with its
    /// characters decomposed; a look-alike domain shows as the Punycode it is.
    #[test]
    fn internationalised_emails_have_one_spelling() {
        let ascii = Some("anna@xn--bcher-kva.de");
        for typed in [
            "anna@bücher.de",
            "Anna@BÜCHER.de",
            "anna@bu\u{0308}cher.de", // u + combining diaeresis
            "anna@xn--bcher-kva.de",
            "ANNA@XN--BCHER-KVA.DE",
        ] {
            assert_eq!(normalise_email(typed).ok().as_deref(), ascii, "{typed}");
        }
        // Cyrillic "а" in place of the Latin one: another domain, and it looks it
        let lookalike = normalise_email("alice@ex\u{0430}mple.com").unwrap();
        assert!(lookalike.starts_with("alice@xn--"), "{lookalike}");
        assert_ne!(lookalike, "alice@example.com");
        // a composed and a decomposed local part are the same address
        assert_eq!(
            normalise_email("jose\u{0301}@example.com").unwrap(),
            normalise_email("jos\u{00e9}@example.com").unwrap()
        );
        for bad in [
            "a@xn--.com",          // empty Punycode
            "a@xn--a-ecp.ru.xn--", // a label that is only the prefix
            "a@bü_cher.de",        // not a host name character
            "a@bücher..de",
        ] {
            assert!(normalise_email(bad).is_err(), "{bad}");
        }
    }
}
