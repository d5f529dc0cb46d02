//! The ledger's view of a separately deployed AuthShield: its JWKS over HTTP, and
//! RFC 7662 introspection with client authentication.

use futures::future::BoxFuture;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vaultpay_auth::outbound::{read_body_capped, read_capped};
use vaultpay_core::jwt::KeySet;
use vaultpay_core::secret::Secret;
use vaultpay_proto::auth::Introspection;

/// Largest JWKS document read from AuthShield.
const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Largest introspection answer read from AuthShield.
const MAX_INTROSPECTION_BYTES: usize = 16 * 1024;

/// The authorities `auth_ca_path` names, for AuthShield's TLS besides the public roots.
pub fn load_ca(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// The HTTP client for AuthShield, one for everything a ledger run alone asks it (its
/// JWKS, introspection, the issuer probe): no proxy from the environment (`HTTP_PROXY`
/// would see the introspection secret and users' tokens, and could serve its own
/// JWKS), no redirects, and `ca` trusted besides the public roots.
pub fn client(ca: &[reqwest::Certificate]) -> Result<reqwest::Client, String> {
    ca.iter()
        .fold(reqwest::Client::builder(), |b, c| {
            b.add_root_certificate(c.clone())
        })
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(2))
        .user_agent(concat!("vaultpay-ledger/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// Verification keys from `{auth_url}/.well-known/jwks.json`.
pub struct JwksSource {
    url: String,
    http: reqwest::Client,
}

impl JwksSource {
    pub fn new(auth_url: &str, http: reqwest::Client) -> Self {
        Self {
            url: format!("{}/.well-known/jwks.json", auth_url.trim_end_matches('/')),
            http,
        }
    }
}

impl vaultpay_web::KeySource for JwksSource {
    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, String>> {
        Box::pin(async move {
            let body = read_capped(self.http.get(&self.url), MAX_JWKS_BYTES)
                .await
                .map_err(|e| format!("JWKS: {e}"))?;
            let doc: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| format!("JWKS: {e}"))?;
            KeySet::from_jwks(&doc).map_err(|e| e.to_string())
        })
    }
}

/// Largest discovery document read from AuthShield.
const MAX_DISCOVERY_BYTES: usize = 64 * 1024;

/// Checks that AuthShield's tokens carry the issuer this ledger expects: a ledger given
/// another `auth.issuer` than AuthShield's refuses every token (`invalid_token`), which
/// its users see and its operator cannot tell from a bad token. Asked at start and with
/// every JWKS reload; `/readyz` answers 503 while they differ.
pub struct IssuerProbe {
    url: String,
    expected: String,
    http: reqwest::Client,
    mismatch: Arc<AtomicBool>,
}

impl IssuerProbe {
    pub fn new(auth_url: &str, expected: &str, http: reqwest::Client) -> Self {
        Self {
            url: format!(
                "{}/.well-known/openid-configuration",
                auth_url.trim_end_matches('/')
            ),
            expected: expected.to_owned(),
            http,
            mismatch: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set while AuthShield names another issuer (for `/readyz`).
    pub fn mismatch(&self) -> Arc<AtomicBool> {
        self.mismatch.clone()
    }

    /// Reads AuthShield's issuer from its discovery document. An unreachable AuthShield
    /// or an unreadable answer changes nothing (the JWKS reloads tell `/readyz` about
    /// that); a different issuer is an error naming both and the setting to change.
    pub async fn probe(&self) -> Result<u64, String> {
        let body = read_capped(self.http.get(&self.url), MAX_DISCOVERY_BYTES)
            .await
            .map_err(|e| format!("AuthShield's discovery document: {e}"))?;
        let doc: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| format!("AuthShield's discovery document: {e}"))?;
        let Some(theirs) = doc.get("issuer").and_then(|i| i.as_str()) else {
            return Err("AuthShield's discovery document names no issuer".to_owned());
        };
        let differs = theirs != self.expected;
        self.mismatch.store(differs, Ordering::Relaxed);
        if differs {
            return Err(format!(
                "AuthShield issues tokens as {theirs:?} but this ledger's auth.issuer is {:?}: \
                 every token is refused until VAULTPAY_AUTH__ISSUER={theirs} is set here",
                self.expected
            ));
        }
        Ok(0)
    }
}

/// Introspection at `{auth_url}/oauth/introspect` as client `vaultpay-ledger`.
pub struct HttpIntrospector {
    url: String,
    secret: Secret,
    http: reqwest::Client,
    /// Whether AuthShield's last answer refused this ledger's credentials (401): the
    /// two processes were given different `auth.introspection_secret`s, and every
    /// sensitive operation answers 503 until that is fixed (see [`Self::probe`]).
    refused: Arc<AtomicBool>,
}

/// The name of the token [`HttpIntrospector::probe`] asks about (no token has it:
/// AuthShield answers `active: false` to a caller it accepts).
const PROBE_TOKEN: &str = "vaultpay-ledger-credentials-probe";

impl HttpIntrospector {
    pub fn new(auth_url: &str, secret: Secret, http: reqwest::Client) -> Self {
        Self {
            url: format!("{}/oauth/introspect", auth_url.trim_end_matches('/')),
            secret,
            http,
            refused: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Set while AuthShield refuses this ledger's credentials (for `/readyz`).
    pub fn credentials_refused(&self) -> Arc<AtomicBool> {
        self.refused.clone()
    }

    /// Asks AuthShield about a token that does not exist, to learn whether it accepts
    /// this ledger's credentials before a user's sensitive operation finds out: run at
    /// start and then periodically. An unreachable AuthShield changes nothing here
    /// (the JWKS reloads tell `/readyz` about that).
    pub async fn probe(&self) -> Result<u64, String> {
        use vaultpay_web::Introspector;
        self.introspect(PROBE_TOKEN, None).await.map(|_| 0)
    }
}

impl vaultpay_web::Introspector for HttpIntrospector {
    fn introspect<'a>(
        &'a self,
        token: &'a str,
        client_ip: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<Introspection, String>> {
        Box::pin(async move {
            let ip = client_ip.map(|i| i.to_string());
            let mut form = vec![("token", token), ("token_type_hint", "access_token")];
            if let Some(ip) = ip.as_deref() {
                // AuthShield answers inactive when the caller's network is not trusted.
                form.push(("client_ip", ip));
            }
            let mut req = self
                .http
                .post(&self.url)
                .basic_auth("vaultpay-ledger", Some(self.secret.expose()))
                .form(&form);
            if let Some(id) = vaultpay_web::current_request_id() {
                req = req.header("x-request-id", id);
            }
            let res = req
                .send()
                .await
                .map_err(|e| format!("introspection: {e}"))?;
            let status = res.status();
            if status == reqwest::StatusCode::UNAUTHORIZED {
                self.refused.store(true, Ordering::Relaxed);
                return Err(
                    "introspection: AuthShield refuses this ledger's credentials (401): \
                     auth.introspection_secret differs between the two"
                        .to_owned(),
                );
            }
            if !status.is_success() {
                return Err(format!("introspection: AuthShield answered {status}"));
            }
            let body = read_body_capped(res, MAX_INTROSPECTION_BYTES)
                .await
                .map_err(|e| format!("introspection: {e}"))?;
            let answer = serde_json::from_slice::<Introspection>(&body)
                .map_err(|e| format!("introspection: {e}"))?;
            self.refused.store(false, Ordering::Relaxed);
            Ok(answer)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn the_ca_file_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("vaultpay-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, include_str!("../tests/it/fixtures/test_ca.pem")).unwrap();
        assert_eq!(super::load_ca(&good).unwrap().len(), 1);
        // the certificates trusted make a client
        assert!(super::client(&super::load_ca(&good).unwrap()).is_ok());
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        assert!(super::load_ca(&junk)
            .unwrap_err()
            .contains("no PEM certificate"));
        assert!(super::load_ca(&dir.join("missing.pem")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
