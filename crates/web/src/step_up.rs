//! The RFC 9470 step-up challenge both services answer with.

use crate::error::ApiError;
use crate::Principal;
use axum::http::{header, HeaderValue, StatusCode};
use vaultpay_core::step_up::{is_fresh_mfa, ACR_MFA};

/// `401 insufficient_user_authentication` with the RFC 9470 §3 challenge:
/// `WWW-Authenticate: Bearer error="insufficient_user_authentication",
/// error_description="…", acr_values="<mfa acr>", max_age=<n>`.
pub fn step_up_required(max_age_secs: i64) -> ApiError {
    let detail = "A second factor within the last few minutes is required; complete step-up at POST /v1/auth/step-up (with no second factor yet, enrol one first: POST /v1/mfa/totp or /v1/mfa/email/enable) and retry with the new token.";
    let challenge = format!(
        "Bearer error=\"insufficient_user_authentication\", error_description=\"{detail}\", acr_values=\"{ACR_MFA}\", max_age={max_age_secs}"
    );
    let mut e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
        "Step-up authentication required",
    )
    .detail(detail)
    .with("acr_values", ACR_MFA)
    .with("max_age", max_age_secs);
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        e.headers.push((header::WWW_AUTHENTICATE, v));
    }
    e
}

/// `401 insufficient_user_authentication` asking only for a recent authentication
/// (`max_age` without `acr_values`, RFC 9470 §3): the client signs in again.
pub fn reauthentication_required(max_age_secs: i64) -> ApiError {
    let detail = "This needs a sign-in within the last few minutes; log in again and retry with the new token.";
    let challenge = format!(
        "Bearer error=\"insufficient_user_authentication\", error_description=\"{detail}\", max_age={max_age_secs}"
    );
    let mut e = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "insufficient_user_authentication",
        "Recent authentication required",
    )
    .detail(detail)
    .with("max_age", max_age_secs);
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        e.headers.push((header::WWW_AUTHENTICATE, v));
    }
    e
}

/// Refuses a caller whose token does not show a second factor within `max_age_secs`.
pub fn require_step_up(p: &Principal, max_age_secs: i64, now_secs: i64) -> Result<(), ApiError> {
    if is_fresh_mfa(
        p.claims.acr.as_deref(),
        p.claims.auth_time,
        now_secs,
        max_age_secs,
    ) {
        Ok(())
    } else {
        Err(step_up_required(max_age_secs))
    }
}
