//! Second factors and step-up wire types (AuthShield).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A pending TOTP enrolment: show the QR code (or the secret) in an authenticator
/// app, then confirm with a code.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct TotpEnrollment {
    /// The shared secret, base32 (RFC 4648) without padding.
    pub secret: String,
    /// `otpauth://totp/…` URI (what the QR code encodes).
    pub otpauth_uri: String,
    /// The URI as an SVG QR code.
    pub qr_svg: String,
}

debug_redacted!(TotpEnrollment {  } hides { secret, otpauth_uri, qr_svg });

#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CodeRequest {
    pub code: String,
}

debug_redacted!(CodeRequest {  } hides { code });

/// TOTP is on; the recovery codes are shown this once (stored hashed).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TotpConfirmed {
    pub status: String,
    pub recovery_codes: Vec<String>,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TotpDisableRequest {
    /// The account password.
    pub password: String,
    /// A current TOTP code, or a recovery code when the authenticator is lost.
    pub code: String,
}

debug_redacted!(TotpDisableRequest {  } hides { password, code });

/// `POST /v1/admin/users/{id}/mfa/reset`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaResetRequest {
    /// Why (1 to 500 characters, no control characters; kept in the audit log): for
    /// example how the person's identity was verified.
    pub reason: String,
    /// Also lock the account until its password is reset (as "this wasn't me" does):
    /// for a factor someone else enrolled, who knows the password.
    #[serde(default)]
    pub require_password_reset: bool,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    /// The account password.
    pub password: String,
}

debug_redacted!(PasswordRequest {  } hides { password });

/// The caller's second factors.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MfaStatus {
    pub totp_enabled: bool,
    pub email_enabled: bool,
    pub recovery_codes_remaining: i64,
}

/// `202` answer of `POST /v1/auth/login` when a second factor is needed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MfaChallenge {
    /// Always `mfa_required`.
    pub status: String,
    /// Single use, short-lived; pass to `/v1/auth/mfa/verify`.
    pub mfa_ticket: String,
    /// Methods the user may answer with: `totp`, `email`, `recovery_code`.
    pub methods: Vec<String>,
    /// Seconds the ticket stays valid.
    pub expires_in: i64,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaVerifyRequest {
    pub mfa_ticket: String,
    pub code: String,
    /// `totp`, `email` or `recovery_code`; guessed from the code's shape when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// When given, must be the device the login named (the ticket is bound to it).
    #[serde(default)]
    pub device_id: Option<String>,
}

debug_redacted!(MfaVerifyRequest { method, device_id } hides { mfa_ticket, code });

#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MfaTicketRequest {
    pub mfa_ticket: String,
}

debug_redacted!(MfaTicketRequest {  } hides { mfa_ticket });

/// `POST /v1/auth/step-up`: prove a second factor again for the current session.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StepUpRequest {
    pub code: String,
    /// `totp`, `email` or `recovery_code`; guessed from the code's shape when absent.
    #[serde(default)]
    pub method: Option<String>,
}

debug_redacted!(StepUpRequest { method } hides { code });
