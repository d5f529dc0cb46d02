//! Step-up authentication (RFC 9470): which tokens prove a recent second factor.
//!
//! A token satisfies step-up when its `acr` is [`ACR_MFA`] and its `auth_time` is at
//! most `max_age` seconds old. AuthShield issues `acr = ACR_MFA` exactly when the
//! session's `amr` contains [`AMR_MFA`].

/// The `acr` of a session authenticated with a second factor.
pub const ACR_MFA: &str = "urn:vaultpay:acr:mfa";
/// The `amr` value every multi-factor authentication carries (RFC 8176).
pub const AMR_MFA: &str = "mfa";
/// The `amr` value of a one-time code (TOTP, emailed code, recovery code).
pub const AMR_OTP: &str = "otp";

/// The `acr` a token with these `amr` values carries.
pub fn acr_for(amr: &[String]) -> Option<String> {
    amr.iter().any(|m| m == AMR_MFA).then(|| ACR_MFA.to_owned())
}

/// True when `acr`/`auth_time` (seconds) show a second factor within `max_age_secs`
/// of `now_secs`. An `auth_time` in the future (beyond a small skew) does not count.
pub fn is_fresh_mfa(acr: Option<&str>, auth_time: i64, now_secs: i64, max_age_secs: i64) -> bool {
    acr == Some(ACR_MFA) && auth_time <= now_secs + 60 && now_secs - auth_time <= max_age_secs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freshness() {
        let now = 1_000_000;
        assert!(is_fresh_mfa(Some(ACR_MFA), now - 900, now, 900));
        assert!(!is_fresh_mfa(Some(ACR_MFA), now - 901, now, 900));
        assert!(!is_fresh_mfa(None, now, now, 900));
        assert!(!is_fresh_mfa(Some("urn:other"), now, now, 900));
        assert!(!is_fresh_mfa(Some(ACR_MFA), now + 3600, now, 900));
    }

    #[test]
    fn acr_follows_amr() {
        assert_eq!(acr_for(&["pwd".into()]), None);
        assert_eq!(
            acr_for(&["pwd".into(), "otp".into(), "mfa".into()]).as_deref(),
            Some(ACR_MFA)
        );
    }
}
