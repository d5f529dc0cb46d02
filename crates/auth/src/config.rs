//! AuthShield configuration (the `[auth]` table of the config file).

use crate::hibp::HibpConfig;
use crate::mail::MailConfig;
use serde::{Deserialize, Serialize};
use vaultpay_core::gcra::Quota;
use vaultpay_core::password::{Argon2Params, PasswordPolicy};
use vaultpay_core::secret::Secret;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `iss` of issued tokens; also the base of links in emails unless `public_url` is set.
    pub issuer: String,
    /// `aud` of access tokens.
    pub audience: String,
    /// Base URL used in emailed links.
    pub public_url: Option<String>,
    pub access_token_ttl_secs: i64,
    /// A session ends when not refreshed for this long (sliding).
    pub session_idle_ttl_secs: i64,
    /// A session ends this long after login, however active (absolute).
    pub session_absolute_ttl_secs: i64,
    /// A spent refresh token presented again within this many seconds of its use (a
    /// client that refreshed twice concurrently) gets one more pair instead of
    /// revoking the session. 0 disables.
    pub refresh_reuse_grace_secs: i64,
    /// Clock skew allowed when verifying tokens.
    pub leeway_secs: i64,
    /// `vaultpay keys rotate` publishes the new signing keys this long before they sign,
    /// so that relying parties that cached the JWKS (served with `max-age=60`; running
    /// servers reload keys every 15 s) know a key before its first token reaches them.
    /// `keys rotate --now` skips it (key compromise).
    pub key_publish_ahead_secs: i64,
    pub argon2: Argon2Params,
    /// Concurrent password hashes (0 = number of CPUs).
    pub hash_concurrency: usize,
    pub password_policy: PasswordPolicy,
    /// How many previous passwords may not be reused.
    pub password_history: usize,
    pub lockout: LockoutConfig,
    pub rate_limits: RateLimits,
    pub hibp: HibpConfig,
    pub mail: MailConfig,
    pub email_verify_ttl_secs: i64,
    pub password_reset_ttl_secs: i64,
    /// How long a user's effective permissions are cached (also invalidated on change).
    pub permission_cache_ttl_secs: u64,
    /// How long `GET /v1/me` may answer from memory (session liveness and profile;
    /// dropped at once on every revocation or change, on every node with Redis).
    /// 0: always read the database.
    pub me_cache_ttl_ms: i64,
    /// Shared secret a separately deployed ledger uses (HTTP Basic, client id
    /// `vaultpay-ledger`) to call `/oauth/introspect`.
    pub introspection_secret: Option<Secret>,
    /// `[auth.ip_trust]`: trusted networks and held logins.
    pub ip_trust: crate::iptrust::IpTrustConfig,
    pub mfa: crate::mfa::MfaConfig,
    pub step_up: crate::mfa::StepUpConfig,
    /// OAuth 2.0 / OpenID Connect authorization server.
    pub oauth: crate::oauth::OAuthConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "http://127.0.0.1:8080".into(),
            audience: "vaultpay".into(),
            public_url: None,
            access_token_ttl_secs: 300,
            session_idle_ttl_secs: 14 * 86_400,
            session_absolute_ttl_secs: 30 * 86_400,
            refresh_reuse_grace_secs: 0,
            leeway_secs: 5,
            key_publish_ahead_secs: 90,
            argon2: Argon2Params::default(),
            hash_concurrency: 0,
            password_policy: PasswordPolicy::default(),
            password_history: 5,
            lockout: LockoutConfig::default(),
            rate_limits: RateLimits::default(),
            hibp: HibpConfig::default(),
            mail: MailConfig::default(),
            email_verify_ttl_secs: 86_400,
            password_reset_ttl_secs: 3_600,
            permission_cache_ttl_secs: 60,
            me_cache_ttl_ms: 2_000,
            introspection_secret: None,
            ip_trust: Default::default(),
            mfa: Default::default(),
            step_up: Default::default(),
            oauth: Default::default(),
        }
    }
}

/// Account lockout after consecutive failed logins, with growing back-off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LockoutConfig {
    /// Failed logins in a row that lock the account.
    pub threshold: i64,
    /// First lock duration; each further lock doubles it.
    pub base_secs: i64,
    pub max_secs: i64,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self {
            threshold: 5,
            base_secs: 60,
            max_secs: 3_600,
        }
    }
}

impl LockoutConfig {
    /// Lock duration (seconds) for the `n`th lock (n ≥ 1).
    pub fn duration_secs(&self, n: i64) -> i64 {
        let shift = u32::try_from((n - 1).clamp(0, 30)).unwrap_or(30);
        self.base_secs
            .saturating_mul(1i64 << shift)
            .min(self.max_secs)
    }
}

/// GCRA quotas per client IP and per account.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    pub login_per_ip: Quota,
    pub login_per_account: Quota,
    pub register_per_ip: Quota,
    /// Attempts to register one email address (stops enumeration by registration).
    pub register_per_account: Quota,
    pub refresh_per_ip: Quota,
    pub refresh_per_session: Quota,
    pub reset_per_ip: Quota,
    pub reset_per_account: Quota,
    /// OAuth requests started from one address (`GET /oauth/authorize`,
    /// `POST /oauth/device_authorization`): each writes a pending request, anonymously.
    pub oauth_start_per_ip: Quota,
    /// Revocations of client-credentials tokens (`POST /oauth/revoke`) by one client: a
    /// revoked one is kept (and reloaded by every replica) until it expires, so a
    /// client minting and revoking in a loop would grow that set.
    pub oauth_revoke_per_client: Quota,
}

impl RateLimits {
    /// Every quota with its name (for validation).
    pub fn all(&self) -> [(&'static str, Quota); 10] {
        [
            ("login_per_ip", self.login_per_ip),
            ("login_per_account", self.login_per_account),
            ("register_per_ip", self.register_per_ip),
            ("register_per_account", self.register_per_account),
            ("refresh_per_ip", self.refresh_per_ip),
            ("refresh_per_session", self.refresh_per_session),
            ("reset_per_ip", self.reset_per_ip),
            ("reset_per_account", self.reset_per_account),
            ("oauth_start_per_ip", self.oauth_start_per_ip),
            ("oauth_revoke_per_client", self.oauth_revoke_per_client),
        ]
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            login_per_ip: Quota::new(30, 60),
            login_per_account: Quota::new(10, 60),
            register_per_ip: Quota::new(10, 600),
            register_per_account: Quota::new(5, 600),
            refresh_per_ip: Quota::new(600, 60),
            refresh_per_session: Quota::new(30, 60),
            reset_per_ip: Quota::new(10, 600),
            reset_per_account: Quota::new(3, 600),
            oauth_start_per_ip: Quota::new(60, 60),
            oauth_revoke_per_client: Quota::new(600, 60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockout_backoff_grows_and_caps() {
        let l = LockoutConfig {
            threshold: 5,
            base_secs: 60,
            max_secs: 3600,
        };
        assert_eq!(l.duration_secs(1), 60);
        assert_eq!(l.duration_secs(2), 120);
        assert_eq!(l.duration_secs(4), 480);
        assert_eq!(l.duration_secs(10), 3600);
        assert_eq!(l.duration_secs(1000), 3600);
    }
}
