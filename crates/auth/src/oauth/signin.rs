//! Password sign-in for the browser flows: the same limits, lockout and audit as
//! `POST /v1/auth/login`, without creating a first-party session.

use crate::accounts::normalise_email;
use crate::{AuthError, AuthService};
use sqlx::Row;
use vaultpay_core::time::now_micros;
use vaultpay_store::audit::NewAudit;
use vaultpay_web::Ctx;

// ---------------------------------------------------------------------------
// Second factor in the browser flows (authorize and device pages): the user's
// factors from the MFA module; a wrong code is audited and counts toward the lockout
// like a wrong password. A user whose only factor is emailed codes gets a code mailed
// when the step is reached.
// ---------------------------------------------------------------------------

/// Whether `user_id` has a second factor that sign-in must check. Fails closed.
pub async fn second_factor_required(svc: &AuthService, ctx: &Ctx, user_id: &str) -> bool {
    match svc.browser_second_factor_start(ctx, user_id).await {
        Ok(required) => required,
        Err(e) => {
            tracing::warn!(error = %e, "second-factor check failed; requiring one");
            true
        }
    }
}

/// Checks and consumes a second-factor code of `user_id`.
pub async fn verify_second_factor(svc: &AuthService, ctx: &Ctx, user_id: &str, code: &str) -> bool {
    match svc.browser_second_factor(ctx, user_id, code).await {
        Ok(ok) => ok,
        Err(e) => {
            tracing::warn!(error = %e, "second-factor verification refused");
            false
        }
    }
}

impl AuthService {
    /// Checks an email and password; returns the user id. Rate limited per address
    /// and per account, counts failures toward the lockout, audited.
    pub(crate) async fn check_password(
        &self,
        ctx: &Ctx,
        email: &str,
        password: &str,
    ) -> Result<String, AuthError> {
        let cfg = &self.inner.cfg;
        if password.len() > 1024 {
            return Err(AuthError::InvalidCredentials);
        }
        let limiter = &*self.inner.limiter;
        vaultpay_web::enforce(
            limiter,
            &format!("login:ip:{}", ctx.ip_key()),
            cfg.rate_limits.login_per_ip,
        )
        .await?;
        let email = normalise_email(email).map_err(|_| AuthError::InvalidCredentials)?;
        vaultpay_web::enforce(
            limiter,
            &format!("login:acct:{email}"),
            cfg.rate_limits.login_per_account,
        )
        .await?;
        let row = sqlx::query("SELECT id, password_hash, locked_until FROM users WHERE email = $1")
            .bind(&email)
            .fetch_optional(self.inner.db.read())
            .await?;
        let now = now_micros();
        let (user_id, phc) = match &row {
            Some(r) => {
                let locked_until: Option<i64> = r.try_get("locked_until")?;
                if let Some(until) = locked_until.filter(|u| *u > now) {
                    let id: String = r.try_get("id")?;
                    self.audit_only(
                        ctx,
                        NewAudit::failure("login.refused_locked")
                            .actor(&id)
                            .resource(&id),
                    )
                    .await?;
                    return Err(AuthError::Locked {
                        retry_after_secs: ((until - now + 999_999) / 1_000_000).max(1),
                    });
                }
                (
                    Some(r.try_get::<String, _>("id")?),
                    Some(r.try_get::<String, _>("password_hash")?),
                )
            }
            None => (None, None),
        };
        let ok = self.verify_password(password.to_owned(), phc).await?;
        let Some(user_id) = user_id.filter(|_| ok) else {
            self.login_failed(ctx, &email, row.is_some()).await?;
            return Err(AuthError::InvalidCredentials);
        };
        sqlx::query("UPDATE users SET failed_logins = 0 WHERE id = $1 AND failed_logins <> 0")
            .bind(&user_id)
            .execute(self.inner.db.writer())
            .await?;
        let _ = self
            .inner
            .limiter
            .reset(&format!("login:acct:{email}"))
            .await;
        // IP trust as at the first-party login: the first network is trusted, a new one
        // is held (the confirm link is mailed; the user signs in again after it), and a
        // "this wasn't me" lock refuses.
        let device = vaultpay_proto::auth::DeviceInfo {
            id: "browser".into(),
            name: "Browser sign-in".into(),
        };
        self.ip_trust_login_gate(ctx, &user_id, &email, &device)
            .await?;
        Ok(user_id)
    }
}

/// What a browser page says for a failed sign-in.
pub(crate) fn signin_failure_text(e: &AuthError) -> Option<&'static str> {
    match e {
        AuthError::InvalidCredentials => Some("The email or password is wrong."),
        AuthError::Locked { .. } => {
            Some("Too many failed sign-ins; the account is locked for a while.")
        }
        AuthError::IpConfirmationRequired(_) => Some(
            "This network is new for your account: we emailed you a link to confirm it. \
             Confirm it, then sign in again.",
        ),
        AuthError::ResetRequired => Some("This account is locked until its password is reset."),
        AuthError::Api(a) if a.status().as_u16() == 429 => {
            Some("Too many attempts; wait a moment and try again.")
        }
        _ => None,
    }
}
