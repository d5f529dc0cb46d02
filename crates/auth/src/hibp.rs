//! Breached-password check against a k-anonymity range API compatible with
//! [Have I Been Pwned](https://haveibeenpwned.com/API/v3#PwnedPasswords).
//!
//! Only the first five hex digits of the password's SHA-1 leave the process
//! (`GET {base_url}/range/{PREFIX}`); the server answers with every known suffix in
//! that range and the match is made locally. `Add-Padding: true` asks the server to
//! pad the answer with fake zero-count entries so its size does not reveal the
//! prefix either.
//!
//! The check is best effort: when the service is slow or down the verdict is
//! [`HibpVerdict::Unavailable`] and the caller decides with
//! [`HibpClient::fail_open`] whether the password is accepted anyway.

use std::time::Duration;

use reqwest::Url;
use serde::{Deserialize, Serialize};
use vaultpay_core::password::{hibp_count_in_range, hibp_prefix_suffix};

/// The public Have I Been Pwned Pwned Passwords API.
pub const DEFAULT_BASE_URL: &str = "https://api.pwnedpasswords.com";

/// Largest range response read. Real padded responses are 30–50 KiB.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The `[auth.hibp]` configuration section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HibpConfig {
    /// Ask the range API at all (off by default: it sends traffic to a third party).
    pub enabled: bool,
    /// Base URL of the API; `/range/{PREFIX}` is appended.
    pub base_url: String,
    /// Upper bound on one lookup (connect, request and response body), in ms.
    pub timeout_ms: u64,
    /// Accept the password when the API cannot answer (`true`), or refuse it.
    pub fail_open: bool,
}

impl Default for HibpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            base_url: DEFAULT_BASE_URL.to_owned(),
            timeout_ms: 1500,
            fail_open: true,
        }
    }
}

/// The outcome of one lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HibpVerdict {
    /// The password is not in the corpus (or only as a padding entry).
    Clean,
    /// The password appears this many times in known breaches.
    Breached(u64),
    /// No usable answer (timeout, connection failure, error status, garbage body).
    /// The reason is for logs; it never contains the password or its hash.
    Unavailable(String),
}

impl HibpConfig {
    /// Refuses a base URL that is not an absolute https URL (http only to a loopback
    /// address: in clear text anyone on the way could answer "breached" or "clean" at
    /// will) without query or fragment, and a zero timeout.
    pub fn validate(&self) -> Result<(), String> {
        let base = self.base_url.trim().trim_end_matches('/');
        let url = Url::parse(base).map_err(|e| format!("hibp.base_url {base:?}: {e}"))?;
        if url.cannot_be_a_base() || !crate::outbound::is_secure_url(base) {
            return Err(format!(
                "hibp.base_url {base:?}: must be an https:// URL (http:// only to a loopback address)"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "hibp.base_url {base:?}: must not have a query or fragment"
            ));
        }
        if self.timeout_ms == 0 {
            return Err("hibp.timeout_ms must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// Client for the range API; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct HibpClient {
    http: reqwest::Client,
    /// `base_url` without a trailing slash.
    base_url: String,
    timeout: Duration,
    fail_open: bool,
}

impl HibpClient {
    /// Builds a client (rustls, the configured timeout, a `VaultPay/<version>`
    /// User-Agent). `cfg.enabled` is the caller's switch and is not looked at here.
    ///
    /// # Errors
    ///
    /// A message naming the setting when the base URL is not an absolute `http(s)`
    /// URL without query or fragment, or the timeout is zero.
    pub fn new(cfg: &HibpConfig) -> Result<Self, String> {
        cfg.validate()?;
        let base = cfg.base_url.trim().trim_end_matches('/');
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!(
                "VaultPay/",
                env!("CARGO_PKG_VERSION"),
                " (breached-password check)"
            ))
            .build()
            .map_err(|e| format!("HTTP client for the breached-password check: {e}"))?;
        Ok(Self {
            http,
            base_url: base.to_owned(),
            timeout,
            fail_open: cfg.fail_open,
        })
    }

    /// `GET {base_url}/range/{PREFIX}` with `Add-Padding: true`; never sends more
    /// than the 5-char prefix.
    pub async fn check(&self, password: &str) -> HibpVerdict {
        let (prefix, suffix) = hibp_prefix_suffix(password);
        let verdict = match self.fetch_range(&prefix).await {
            Ok(body) => verdict_from_range(&body, &suffix),
            Err(reason) => HibpVerdict::Unavailable(reason),
        };
        match &verdict {
            HibpVerdict::Unavailable(reason) => tracing::warn!(
                reason = reason.as_str(),
                fail_open = self.fail_open,
                "breached-password check unavailable"
            ),
            HibpVerdict::Breached(_) => tracing::debug!("password found in breach corpus"),
            HibpVerdict::Clean => {}
        }
        verdict
    }

    /// Whether a password is accepted when the verdict is
    /// [`HibpVerdict::Unavailable`].
    #[must_use]
    pub fn fail_open(&self) -> bool {
        self.fail_open
    }

    /// Fetches the range body for `prefix`, or a reason it could not.
    async fn fetch_range(&self, prefix: &str) -> Result<String, String> {
        let url = format!("{}/range/{prefix}", self.base_url);
        let mut response = self
            .http
            .get(url)
            .header("Add-Padding", "true")
            .send()
            .await
            .map_err(|e| self.describe(e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("range API answered HTTP {status}"));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| self.describe(e))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(format!(
                    "range API response larger than {MAX_BODY_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| "range API response is not UTF-8".to_owned())
    }

    /// A loggable reason for a transport error, without the URL (which holds the
    /// prefix).
    fn describe(&self, e: reqwest::Error) -> String {
        if e.is_timeout() {
            format!("range API timed out after {} ms", self.timeout.as_millis())
        } else if e.is_connect() {
            format!("cannot connect to the range API: {}", e.without_url())
        } else {
            format!("range API request failed: {}", e.without_url())
        }
    }
}

/// Interprets a range response body for the password with SHA-1 `suffix`.
///
/// A body without a single well-formed `SUFFIX:COUNT` line is not a range response
/// (a captive portal, an error page served with 200) and so proves nothing.
fn verdict_from_range(body: &str, suffix: &str) -> HibpVerdict {
    if !body.lines().any(is_range_line) {
        return HibpVerdict::Unavailable("range API response has no range entries".to_owned());
    }
    match hibp_count_in_range(body, suffix) {
        0 => HibpVerdict::Clean,
        count => HibpVerdict::Breached(count),
    }
}

/// Whether `line` is `<35 hex digits>:<decimal count>`.
fn is_range_line(line: &str) -> bool {
    line.trim().split_once(':').is_some_and(|(suffix, count)| {
        let (suffix, count) = (suffix.trim(), count.trim());
        suffix.len() == 35
            && suffix.bytes().all(|b| b.is_ascii_hexdigit())
            && !count.is_empty()
            && count.bytes().all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let cfg: HibpConfig = serde_json::from_str("{}").unwrap();
        assert!(!cfg.enabled);
        assert_eq!(cfg.base_url, DEFAULT_BASE_URL);
        assert_eq!(cfg.timeout_ms, 1500);
        assert!(cfg.fail_open);
        assert!(serde_json::from_str::<HibpConfig>(r#"{"fail_closed": true}"#).is_err());
    }

    #[test]
    fn base_url_is_validated_and_normalised() {
        let with = |base_url: &str| {
            HibpClient::new(&HibpConfig {
                base_url: base_url.to_owned(),
                ..HibpConfig::default()
            })
        };
        assert_eq!(
            with("https://x.example/").unwrap().base_url,
            "https://x.example"
        );
        assert_eq!(
            with("http://127.0.0.1:9/hibp/").unwrap().base_url,
            "http://127.0.0.1:9/hibp"
        );
        assert!(with("ftp://x.example").is_err());
        // in clear text only to this host
        assert!(with("http://x.example").is_err());
        assert!(with("http://localhost:9").is_ok());
        assert!(with("x.example").is_err());
        assert!(with("https://x.example/?q=1").is_err());
        assert!(HibpClient::new(&HibpConfig {
            timeout_ms: 0,
            ..HibpConfig::default()
        })
        .is_err());
    }

    #[test]
    fn verdicts_from_bodies() {
        let suffix = "1E4C9B93F3F0682250B6CF8331B7EE68FD8";
        let body = format!(
            "0018A45C4D1DEF81644B54AB7F969B88D65:1\r\n{suffix}:3861493\r\n\
             00D4F6E8FA6EECAD2A3AA415EEC418D38EC:0\r\n"
        );
        assert_eq!(
            verdict_from_range(&body, suffix),
            HibpVerdict::Breached(3_861_493)
        );
        assert_eq!(
            verdict_from_range(&body, "00D4F6E8FA6EECAD2A3AA415EEC418D38EC"),
            HibpVerdict::Clean
        );
        assert_eq!(
            verdict_from_range(&body, "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"),
            HibpVerdict::Clean
        );
        assert!(matches!(
            verdict_from_range("<html>Sign in to Wi-Fi</html>", suffix),
            HibpVerdict::Unavailable(_)
        ));
        assert!(matches!(
            verdict_from_range("", suffix),
            HibpVerdict::Unavailable(_)
        ));
    }
}
