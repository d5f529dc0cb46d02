//! `[auth.mfa]` and `[auth.step_up]`.

use serde::{Deserialize, Serialize};
use vaultpay_core::gcra::Quota;

/// Second factors: emailed codes and login tickets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MfaConfig {
    /// `issuer` label in the `otpauth://` URI authenticator apps show.
    pub totp_issuer: String,
    /// Lifetime of an emailed one-time code.
    pub email_code_ttl_secs: i64,
    /// Wrong guesses after which an emailed code is dead.
    pub email_code_max_attempts: i64,
    /// Emailed codes one user may ask for (GCRA).
    pub email_send: Quota,
    /// Lifetime of the ticket between the password and the second factor.
    pub ticket_ttl_secs: i64,
    /// Wrong codes after which a ticket is dead (each also counts toward lockout).
    pub ticket_max_attempts: i64,
    /// Recovery codes issued when TOTP is enabled.
    pub recovery_codes: usize,
}

impl Default for MfaConfig {
    fn default() -> Self {
        Self {
            totp_issuer: "VaultPay".into(),
            email_code_ttl_secs: 300,
            email_code_max_attempts: 5,
            email_send: Quota::new(3, 300),
            ticket_ttl_secs: 300,
            ticket_max_attempts: 5,
            recovery_codes: 10,
        }
    }
}

/// Step-up (RFC 9470): operations that need a second factor within `max_age_secs`.
///
/// Policy, per flag:
/// - `role_changes` (granting or revoking roles, creating or deleting custom roles):
///   a second factor within `max_age_secs` from everyone; an administrator without
///   one must enrol one first.
/// - `password_change`, `email_change`: a second factor within `max_age_secs` from
///   users who have one; from users without one, a sign-in within `max_age_secs`
///   (they have nothing stronger; the current password is checked too).
///
/// Large ledger transfers are governed by `[ledger]` `step_up_large_transfers` and
/// need step-up from everyone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepUpConfig {
    pub max_age_secs: i64,
    pub password_change: bool,
    pub email_change: bool,
    /// Granting or revoking roles, creating or deleting custom roles (checked on the
    /// acting administrator).
    pub role_changes: bool,
}

impl Default for StepUpConfig {
    fn default() -> Self {
        Self {
            max_age_secs: 900,
            password_change: true,
            email_change: true,
            role_changes: true,
        }
    }
}
