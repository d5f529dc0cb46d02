//! The ledger's view of a separately deployed AuthShield: its JWKS over HTTP, and
//! RFC 7662 introspection with client authentication.

use futures::future::BoxFuture;
use std::net::IpAddr;
use std::time::Duration;
use vaultpay_core::jwt::KeySet;
use vaultpay_core::secret::Secret;
use vaultpay_proto::auth::Introspection;

/// The HTTP client for AuthShield: no proxy from the environment (`HTTP_PROXY` would
/// see the introspection secret and users' tokens, and could serve its own JWKS) and
/// no redirects.
fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
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
    pub fn new(auth_url: &str) -> Result<Self, String> {
        Ok(Self {
            url: format!("{}/.well-known/jwks.json", auth_url.trim_end_matches('/')),
            http: client()?,
        })
    }
}

impl vaultpay_web::KeySource for JwksSource {
    fn fetch(&self) -> BoxFuture<'_, Result<KeySet, String>> {
        Box::pin(async move {
            let res = self
                .http
                .get(&self.url)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !res.status().is_success() {
                return Err(format!("JWKS answered {}", res.status()));
            }
            let doc: serde_json::Value = res.json().await.map_err(|e| e.to_string())?;
            KeySet::from_jwks(&doc).map_err(|e| e.to_string())
        })
    }
}

/// Introspection at `{auth_url}/oauth/introspect` as client `vaultpay-ledger`.
pub struct HttpIntrospector {
    url: String,
    secret: Secret,
    http: reqwest::Client,
}

impl HttpIntrospector {
    pub fn new(auth_url: &str, secret: Secret) -> Result<Self, String> {
        Ok(Self {
            url: format!("{}/oauth/introspect", auth_url.trim_end_matches('/')),
            secret,
            http: client()?,
        })
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
            let res = req.send().await.map_err(|e| e.to_string())?;
            if !res.status().is_success() {
                return Err(format!("introspection answered {}", res.status()));
            }
            res.json::<Introspection>().await.map_err(|e| e.to_string())
        })
    }
}
