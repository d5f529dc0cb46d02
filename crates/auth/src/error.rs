//! AuthShield's error enum and its mapping to problem documents.

use axum::http::{HeaderName, StatusCode};
use vaultpay_core::password::PolicyViolation;
use vaultpay_web::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid request: {1}")]
    Invalid(&'static str, String),
    #[error("email or password is wrong")]
    InvalidCredentials,
    #[error("account locked")]
    Locked { retry_after_secs: i64 },
    #[error("email already registered")]
    EmailTaken,
    #[error("password refused: {0}")]
    Password(PolicyViolation),
    #[error("password was used recently")]
    PasswordReused,
    #[error("password check service unavailable")]
    BreachCheckUnavailable,
    #[error("token is invalid, expired or already used")]
    BadEmailToken,
    #[error("session is not active")]
    SessionInactive,
    #[error("not found")]
    NotFound(&'static str),
    #[error("forbidden: missing permission {0}")]
    Forbidden(String),
    #[error("conflict: {1}")]
    Conflict(&'static str, String),
    /// A login from an untrusted network is held (`202` with this ticket).
    #[error("the network must be confirmed by email")]
    IpConfirmationRequired(String),
    #[error("the login ticket is invalid, expired or already used")]
    BadLoginTicket,
    #[error("account locked until the password is reset")]
    ResetRequired,
    #[error("OAuth error {0}: {1}")]
    OAuth(&'static str, String),
    /// Not a failure: the password was right and a second factor is due (answered 202).
    #[error("a second factor is required")]
    MfaRequired(Box<vaultpay_proto::mfa::MfaChallenge>),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("storage: {0}")]
    Store(#[from] vaultpay_store::StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

impl AuthError {
    /// `Locked` (with the seconds left, at least 1) while `locked_until` is after `now`
    /// (both in microseconds).
    pub(crate) fn if_locked(locked_until: Option<i64>, now: i64) -> Result<(), AuthError> {
        match locked_until.filter(|u| *u > now) {
            Some(until) => Err(AuthError::Locked {
                retry_after_secs: ((until - now + 999_999) / 1_000_000).max(1),
            }),
            None => Ok(()),
        }
    }
}

impl From<sqlx::Error> for AuthError {
    fn from(e: sqlx::Error) -> Self {
        AuthError::Store(e.into())
    }
}

/// A wrong current password given to confirm a change by a signed-in user (password or
/// email change, turning a second factor off): 403, not 401. The bearer token is
/// fine; a 401 would tell clients to drop it (and RFC 9110 wants a 401 to carry a
/// `WWW-Authenticate` challenge, which would name the token). It still counts as a
/// failed sign-in toward the lockout.
pub(crate) fn current_password_wrong() -> AuthError {
    AuthError::Api(
        ApiError::new(StatusCode::FORBIDDEN, "current_password_wrong", "Forbidden")
            .detail("The current password is wrong."),
    )
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Invalid(code, detail) => ApiError::unprocessable(code, detail),
            AuthError::InvalidCredentials => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "Unauthorized",
            )
            .detail("The email or password is wrong."),
            AuthError::Locked { retry_after_secs } => {
                ApiError::new(StatusCode::LOCKED, "account_locked", "Account locked")
                    .detail("Too many failed logins; the account is locked for a while.")
                    .with("retry_after", retry_after_secs)
                    .header(HeaderName::from_static("retry-after"), retry_after_secs)
            }
            AuthError::EmailTaken => {
                ApiError::conflict("email_taken", "An account with this email already exists.")
            }
            AuthError::Password(v) => {
                let mut err = ApiError::unprocessable(v.code(), v.message());
                if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(&v) {
                    for (k, val) in m {
                        if k != "code" && k != "message" {
                            err = err.with(&k, val);
                        }
                    }
                }
                err
            }
            AuthError::PasswordReused => ApiError::unprocessable(
                "password_reused",
                "This password was used recently; choose one you have not used before.",
            ),
            AuthError::BreachCheckUnavailable => {
                ApiError::unavailable("breached-password service unavailable and fail_open is off")
                    .detail("The breached-password check is unavailable; retry later.")
            }
            AuthError::BadEmailToken => ApiError::bad_request(
                "invalid_token",
                "The link is invalid, expired or already used.",
            ),
            AuthError::SessionInactive => {
                ApiError::unauthorized("session_revoked", "This session has ended; sign in again.")
            }
            AuthError::NotFound(what) => {
                ApiError::not_found("not_found", format!("No such {what}."))
            }
            AuthError::Forbidden(perm) => {
                ApiError::forbidden("forbidden", format!("This needs the `{perm}` permission."))
            }
            AuthError::Conflict(code, detail) => ApiError::conflict(code, detail),
            AuthError::IpConfirmationRequired(_) => ApiError::new(
                StatusCode::ACCEPTED,
                "ip_confirmation_required",
                "Confirmation required",
            )
            .detail("Confirm this network with the emailed link, then complete the login."),
            AuthError::BadLoginTicket => ApiError::bad_request(
                "invalid_login_ticket",
                "The login ticket is invalid, expired, already used, or used from another device or network.",
            ),
            AuthError::ResetRequired => ApiError::new(
                StatusCode::LOCKED,
                "password_reset_required",
                "Account locked",
            )
            .detail("The account was locked after a sign-in was reported as not yours; reset the password to unlock it."),
            AuthError::OAuth(code, detail) => ApiError::bad_request(code, detail),
            AuthError::MfaRequired(_) => ApiError::new(
                StatusCode::ACCEPTED,
                "mfa_required",
                "Second factor required",
            ),
            AuthError::Api(e) => e,
            AuthError::Store(e) if e.is_transient() => ApiError::transaction_conflict(e),
            AuthError::Store(e) if e.is_unreachable() => ApiError::unavailable(e),
            AuthError::Store(e) => ApiError::internal(e),
            AuthError::Internal(e) => ApiError::internal(e),
        }
    }
}

impl axum::response::IntoResponse for AuthError {
    fn into_response(self) -> axum::response::Response {
        ApiError::from(self).into_response()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A transaction that lost a race (here SQLite's second writer, refused at once)
    /// is answered 503 `transaction_conflict` with `Retry-After`, not 500.
    #[tokio::test]
    async fn a_lost_race_is_a_retryable_503() {
        let race = vaultpay_store::testing::lost_race(vaultpay_store::Backend::Sqlite)
            .await
            .unwrap();
        let e = ApiError::from(AuthError::Store(vaultpay_store::StoreError::Sqlx(race)));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.problem.code, "transaction_conflict");
        assert!(e
            .headers
            .iter()
            .any(|(k, v)| k == axum::http::header::RETRY_AFTER && v == "1"));
        let other = ApiError::from(AuthError::Internal("boom".into()));
        assert_eq!(other.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
