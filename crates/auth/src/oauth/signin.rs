//! Password sign-in for the browser flows: the same limits, lockout and audit as
//! `POST /v1/auth/login`, without creating a first-party session.

use crate::{AuthError, AuthService};
use vaultpay_web::Ctx;

// ---------------------------------------------------------------------------
// Second factor in the browser flows (authorize and device pages): the user's
// factors from the MFA module; a wrong code is audited and counts toward the lockout
// like a wrong password. A user whose only factor is emailed codes gets a code mailed
// when the step is reached.
// ---------------------------------------------------------------------------

/// Whether `user_id` has a second factor that sign-in must check; mails a code when
/// emailed codes are the user's only factor and `mail` is set (not when the form
/// already carries the code a previous mail sent: a new mail would void it). Fails
/// closed.
pub async fn second_factor_required(
    svc: &AuthService,
    ctx: &Ctx,
    user_id: &str,
    mail: bool,
) -> bool {
    match svc.browser_second_factor_start(ctx, user_id, mail).await {
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
    /// Checks an email and password; returns the user id and the hash the password
    /// matched (for [`crate::sessions::recheck_authority`] in the step it allows). Rate
    /// limited per address and per account, counts failures toward the lockout,
    /// audited.
    pub(crate) async fn check_password(
        &self,
        ctx: &Ctx,
        email: &str,
        password: &str,
    ) -> Result<(String, String), AuthError> {
        let crate::sessions::Signin {
            user_id,
            email,
            password_hash,
            ..
        } = self
            .check_credentials(ctx, email, password.to_owned())
            .await?;
        // The "this wasn't me" lock was read before Argon2 ran: read it again, to refuse
        // the sign-in at once. The failure count is reset here only for an account
        // without a second factor; with one, only once its code passed
        // ([`AuthService::browser_second_factor`]): a right password must not wipe
        // the count that wrong codes add to, or a caller who knows the password could
        // guess codes for ever, a sign-in page apart.
        let row = sqlx::query(&format!(
            "SELECT security_locked_at, password_hash, {} FROM users WHERE id = $1",
            crate::mfa::FACTOR_COLUMNS
        ))
        .bind(&user_id)
        .fetch_optional(self.inner.db.writer())
        .await?;
        let Some(row) = row else {
            return Err(AuthError::InvalidCredentials);
        };
        if crate::sessions::password_changed_since(&row, &password_hash)? {
            return Err(AuthError::InvalidCredentials);
        }
        if crate::sessions::is_security_locked(&row)? {
            return Err(self.refuse_security_locked(ctx, &user_id).await);
        }
        if !crate::mfa::Factors::from_row(&row)?.any() {
            self.sign_in_passed(&user_id, &email).await?;
        }
        // IP trust as at the first-party login: the first network is trusted, a new one
        // is held (the confirm link is mailed; the user signs in again after it), and a
        // "this wasn't me" lock refuses.
        let device = vaultpay_proto::auth::DeviceInfo {
            id: "browser".into(),
            name: "Browser sign-in".into(),
        };
        self.ip_trust_login_gate(ctx, &user_id, &email, &device, &password_hash)
            .await?;
        Ok((user_id, password_hash))
    }
}

/// Resets the failure count of user `$1` (a sign-in passed every factor it has).
pub(crate) const RESET_FAILURES_SQL: &str =
    "UPDATE users SET failed_logins = 0 WHERE id = $1 AND failed_logins <> 0";

impl AuthService {
    /// A browser sign-in passed every factor the account has: its failure count and
    /// its per-account sign-in limit start again.
    pub(crate) async fn sign_in_passed(&self, user_id: &str, email: &str) -> Result<(), AuthError> {
        sqlx::query(RESET_FAILURES_SQL)
            .bind(user_id)
            .execute(self.inner.db.writer())
            .await?;
        self.reset_login_limit(email).await;
        Ok(())
    }
}

/// The status and text a browser page shows for a failed sign-in (`None`: not a sign-in
/// failure, answered as an API error).
pub(crate) fn signin_failure(e: &AuthError) -> Option<(axum::http::StatusCode, &'static str)> {
    let status = if matches!(e, AuthError::Api(_)) {
        axum::http::StatusCode::TOO_MANY_REQUESTS
    } else {
        axum::http::StatusCode::UNAUTHORIZED
    };
    signin_failure_text(e).map(|t| (status, t))
}

fn signin_failure_text(e: &AuthError) -> Option<&'static str> {
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
