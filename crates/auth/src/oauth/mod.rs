//! AuthShield as a standard OAuth 2.0 / OpenID Connect authorization server.
//!
//! - [`clients`]: registered clients (confidential with a SHA-256-hashed secret, or
//!   public), admin API and CLI.
//! - [`authorize`]: `GET /oauth/authorize` with PKCE (S256 only), the server-rendered
//!   sign-in, second-factor and consent pages, and single-use 60 s codes.
//! - [`device`]: the device authorization grant (RFC 8628).
//! - [`tokens`]: `POST /oauth/token` (authorization_code, refresh_token,
//!   client_credentials, device_code), introspection (RFC 7662) and revocation
//!   (RFC 7009).
//! - [`oidc`]: discovery, ID tokens (EdDSA, or ES256 per client), `/userinfo`.
//!
//! Errors of the token-style endpoints are RFC 6749 §5.2 JSON; errors of the browser
//! endpoints are HTML pages, and never a redirect to an unverified redirect URI.

pub mod authorize;
pub mod clients;
pub mod device;
pub mod es256;
pub mod oidc;
pub mod pages;
pub mod signin;
pub mod tokens;
pub mod upstream;
pub mod upstream_jws;

use crate::{AuthError, AuthService};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use vaultpay_web::{ApiError, Principal};

/// Per-service OAuth state.
#[derive(Debug, Default)]
pub struct OAuthState {
    /// The ES256 signer once loaded (or created); replaced when a rotation is seen.
    pub(crate) es256: parking_lot::RwLock<Option<std::sync::Arc<es256::Es256Key>>>,
    /// Clients by id for client authentication, briefly (see [`CLIENT_CACHE_TTL`]).
    clients: parking_lot::Mutex<
        std::collections::HashMap<String, (std::time::Instant, clients::Client)>,
    >,
    /// Revoked access-token ids (RFC 7009), see [`RevokedJtis`].
    pub(crate) revoked: RevokedJtis,
    /// The upstream OpenID providers' signing keys, see [`upstream_jws`].
    pub(crate) upstream_jwks: upstream_jws::JwksCache,
}

/// The revoked access-token ids not yet expired, in memory. Introspection is on the
/// hot path of every resource server, so it reads this set instead of the database:
/// revocations on this process enter it at once, and the whole set is reloaded from
/// `oauth_revoked_tokens` at most every [`REVOKED_RELOAD`] by whichever request
/// finds it stale, so a revocation on another replica counts within that time.
#[derive(Debug, Default)]
pub(crate) struct RevokedJtis {
    set: parking_lot::RwLock<std::collections::HashMap<String, i64>>,
    loaded_at: parking_lot::Mutex<Option<std::time::Instant>>,
    reload: tokio::sync::Mutex<()>,
}

/// How stale the revoked-token set may be (revocations on other replicas).
pub const REVOKED_RELOAD: std::time::Duration = std::time::Duration::from_millis(250);

impl RevokedJtis {
    /// Whether `jti` is revoked; reloads the set first when it is stale.
    pub(crate) async fn contains(
        &self,
        db: &vaultpay_store::Db,
        jti: &str,
    ) -> Result<bool, crate::AuthError> {
        let fresh =
            |at: &Option<std::time::Instant>| at.is_some_and(|t| t.elapsed() < REVOKED_RELOAD);
        if !fresh(&self.loaded_at.lock()) {
            // One request reloads; the others wait for it rather than query too.
            let _one = self.reload.lock().await;
            if !fresh(&self.loaded_at.lock()) {
                let started = std::time::Instant::now();
                let now = vaultpay_core::time::now_micros();
                let rows = sqlx::query(
                    "SELECT jti, expires_at FROM oauth_revoked_tokens WHERE expires_at > $1",
                )
                .bind(now)
                .fetch_all(db.read())
                .await?;
                let mut set = std::collections::HashMap::with_capacity(rows.len());
                for r in &rows {
                    use sqlx::Row;
                    set.insert(
                        r.try_get::<String, _>("jti")?,
                        r.try_get::<i64, _>("expires_at")?,
                    );
                }
                // Revocations made here while the query ran are kept; expired ones go.
                let mut current = self.set.write();
                for (k, v) in current.drain().filter(|(_, exp)| *exp > now) {
                    set.entry(k).or_insert(v);
                }
                *current = set;
                *self.loaded_at.lock() = Some(started);
            }
        }
        Ok(self.set.read().contains_key(jti))
    }

    /// Records a revocation made by this process (after its commit).
    pub(crate) fn insert(&self, jti: &str, expires_at_micros: i64) {
        self.set.write().insert(jti.to_owned(), expires_at_micros);
    }
}

/// How long a client looked up for authentication is reused. A deletion on this
/// process takes effect at once; on other replicas (or by the CLI) within this time.
pub const CLIENT_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl OAuthState {
    pub(crate) fn forget_client(&self, client_id: &str) {
        self.clients.lock().remove(client_id);
    }
}

/// The `[auth.oauth]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OAuthConfig {
    /// Lifetime of an authorization code.
    pub code_ttl_secs: i64,
    /// How long a browser has between `/oauth/authorize` and the consent.
    pub request_ttl_secs: i64,
    /// Lifetime of a device code (RFC 8628).
    pub device_code_ttl_secs: i64,
    /// Minimum polling interval for device codes; 0 disables `slow_down`.
    pub device_poll_interval_secs: i64,
    /// Lifetime of ID tokens.
    pub id_token_ttl_secs: i64,
    /// Lifetime of client-credentials access tokens (0 = the access-token TTL).
    pub client_credentials_ttl_secs: i64,
    /// Upstream sign-in providers by name ("Sign in with …" on the sign-in page).
    pub upstream: std::collections::BTreeMap<String, upstream::UpstreamConfig>,
}

impl Default for OAuthConfig {
    fn default() -> Self {
        Self {
            code_ttl_secs: 60,
            request_ttl_secs: 600,
            device_code_ttl_secs: 600,
            device_poll_interval_secs: 5,
            id_token_ttl_secs: 300,
            client_credentials_ttl_secs: 0,
            upstream: Default::default(),
        }
    }
}

/// Scopes this server knows. `api` lets a client's token act on the VaultPay API
/// with the user's roles; without it an OAuth token only identifies the user.
pub const SCOPES: &[&str] = &["openid", "profile", "email", "offline_access", "api"];

pub const GRANT_CODE: &str = "authorization_code";
pub const GRANT_REFRESH: &str = "refresh_token";
pub const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
pub const GRANT_DEVICE: &str = "urn:ietf:params:oauth:grant-type:device_code";
pub const GRANTS: &[&str] = &[
    GRANT_CODE,
    GRANT_REFRESH,
    GRANT_CLIENT_CREDENTIALS,
    GRANT_DEVICE,
];

/// Splits a space-separated scope string (deduplicated, order kept), in time linear in
/// its length: a request's scope comes from anyone (a ~64 KB query string holds ~16,000
/// distinct words; comparing each with every one kept took ~0.8 s of CPU).
pub(crate) fn split_scope(s: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    s.split(' ')
        .filter(|p| !p.is_empty() && seen.insert(*p))
        .map(str::to_owned)
        .collect()
}

/// Longest `scope` a request may carry: this server's five scopes take 39 bytes.
pub(crate) const MAX_SCOPE_LEN: usize = 1024;

/// A request's `scope` parameter split as [`split_scope`], or `invalid_scope` when it
/// is longer than [`MAX_SCOPE_LEN`].
pub(crate) fn requested_scope(s: &str) -> Result<Vec<String>, OAuthError> {
    if s.len() > MAX_SCOPE_LEN {
        return Err(OAuthError::new(
            "invalid_scope",
            format!("scope is longer than {MAX_SCOPE_LEN} bytes"),
        ));
    }
    Ok(split_scope(s))
}

pub(crate) fn has_scope(scope: &str, want: &str) -> bool {
    scope.split(' ').any(|s| s == want)
}

/// Refuses a token issued to an OAuth client unless it was granted the `api` scope.
pub(crate) fn require_api_scope(p: &Principal) -> Result<(), AuthError> {
    if !p.may_use_api() {
        return Err(AuthError::Forbidden("scope:api".into()));
    }
    Ok(())
}

/// Refuses a token issued to an OAuth client (403 `first_party_session_required`):
/// for what only the user's own session may do, whatever scope a client was granted
/// (approving a device, adding or replacing a second factor, changing the password or
/// email, unlinking a sign-in provider).
pub(crate) fn require_first_party(p: &Principal) -> Result<(), AuthError> {
    if p.claims.client_id.is_some() {
        return Err(AuthError::Api(vaultpay_web::ApiError::forbidden(
            "first_party_session_required",
            "Do this from a VaultPay session (POST /v1/auth/login), not with a token issued to an OAuth client.",
        )));
    }
    Ok(())
}

/// An error of the OAuth token-style endpoints, rendered as RFC 6749 §5.2 JSON.
#[derive(Debug)]
pub enum OAuthError {
    OAuth {
        status: StatusCode,
        error: &'static str,
        description: String,
        /// Send `WWW-Authenticate: Basic` (failed client authentication).
        basic: bool,
    },
    Api(ApiError),
}

impl OAuthError {
    pub fn new(error: &'static str, description: impl Into<String>) -> Self {
        OAuthError::OAuth {
            status: StatusCode::BAD_REQUEST,
            error,
            description: description.into(),
            basic: false,
        }
    }

    pub fn invalid_client(description: impl Into<String>) -> Self {
        OAuthError::OAuth {
            status: StatusCode::UNAUTHORIZED,
            error: "invalid_client",
            description: description.into(),
            basic: true,
        }
    }

    pub fn grant(description: impl Into<String>) -> Self {
        Self::new("invalid_grant", description)
    }

    pub fn request(description: impl Into<String>) -> Self {
        Self::new("invalid_request", description)
    }
}

impl From<AuthError> for OAuthError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::OAuth("invalid_client", d) => OAuthError::invalid_client(d),
            AuthError::OAuth(code, d) => OAuthError::new(code, d),
            other => OAuthError::Api(other.into()),
        }
    }
}

impl From<vaultpay_store::StoreError> for OAuthError {
    fn from(e: vaultpay_store::StoreError) -> Self {
        AuthError::from(e).into()
    }
}

impl From<sqlx::Error> for OAuthError {
    fn from(e: sqlx::Error) -> Self {
        AuthError::from(e).into()
    }
}

impl From<ApiError> for OAuthError {
    fn from(e: ApiError) -> Self {
        OAuthError::Api(e)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let (status, error, description, basic, headers) = match self {
            OAuthError::OAuth {
                status,
                error,
                description,
                basic,
            } => (status, error.to_owned(), description, basic, Vec::new()),
            OAuthError::Api(e) => {
                if e.status().is_server_error() {
                    return e.into_response();
                }
                let status = e.status();
                let error = match status {
                    StatusCode::TOO_MANY_REQUESTS => "slow_down",
                    StatusCode::UNAUTHORIZED => "invalid_client",
                    _ => "invalid_request",
                };
                let d = e.problem.detail.clone().unwrap_or_default();
                (status, error.to_owned(), d, false, e.headers)
            }
        };
        let body = serde_json::json!({ "error": error, "error_description": description });
        let mut res = (status, Json(body)).into_response();
        let h = res.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if basic {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"vaultpay\""),
            );
        }
        for (k, v) in headers {
            h.append(k, v);
        }
        res
    }
}

/// Client credentials as presented: HTTP Basic (client_secret_basic), form fields
/// (client_secret_post), or a bare `client_id` (public clients).
#[derive(Debug, Clone)]
pub struct PresentedClient {
    pub client_id: String,
    pub secret: Option<String>,
    pub basic: bool,
}

/// Parses `Authorization: Basic` per RFC 6749 §2.3.1 (both parts form-urlencoded).
pub(crate) fn basic_credentials(
    headers: &HeaderMap,
) -> Result<Option<(String, String)>, OAuthError> {
    use base64::Engine;
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || OAuthError::invalid_client("malformed HTTP Basic credentials");
    let v = v.to_str().map_err(|_| bad())?;
    let Some(b64) = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))
    else {
        return Ok(None);
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (id, pw) = text.split_once(':').ok_or_else(bad)?;
    let id = urlencoding::decode(&id.replace('+', " "))
        .map_err(|_| bad())?
        .into_owned();
    let pw = urlencoding::decode(&pw.replace('+', " "))
        .map_err(|_| bad())?
        .into_owned();
    // Decoded here, so the body and path checks for NUL never saw them: a NUL in a
    // query parameter is a database error on PostgreSQL.
    if id.chars().chain(pw.chars()).any(char::is_control) {
        return Err(bad());
    }
    Ok(Some((id, pw)))
}

/// The client credentials of a request, if any were presented.
pub(crate) fn presented_client(
    headers: &HeaderMap,
    form_id: Option<&str>,
    form_secret: Option<&str>,
) -> Result<Option<PresentedClient>, OAuthError> {
    let form_id = form_id.filter(|s| !s.is_empty());
    let form_secret = form_secret.filter(|s| !s.is_empty());
    if let Some((id, secret)) = basic_credentials(headers)? {
        if form_secret.is_some() {
            return Err(OAuthError::request(
                "use one client authentication method, not two",
            ));
        }
        if form_id.is_some_and(|f| f != id) {
            return Err(OAuthError::request(
                "client_id does not match the credentials",
            ));
        }
        return Ok(Some(PresentedClient {
            client_id: id,
            secret: Some(secret),
            basic: true,
        }));
    }
    match (form_id, form_secret) {
        (Some(id), secret) => Ok(Some(PresentedClient {
            client_id: id.to_owned(),
            secret: secret.map(str::to_owned),
            basic: false,
        })),
        (None, Some(_)) => Err(OAuthError::request("client_secret without client_id")),
        (None, None) => Ok(None),
    }
}

impl AuthService {
    /// A client by id, from the short-lived cache (hot paths: token, introspection).
    pub(crate) async fn cached_client(
        &self,
        client_id: &str,
    ) -> Result<Option<clients::Client>, AuthError> {
        let state = &self.inner.oauth;
        if let Some((at, c)) = state.clients.lock().get(client_id) {
            if at.elapsed() < CLIENT_CACHE_TTL {
                return Ok(Some(c.clone()));
            }
        }
        let c = clients::get(self.db(), client_id).await?;
        let mut map = state.clients.lock();
        if map.len() > 10_000 {
            map.clear();
        }
        match &c {
            Some(c) => {
                map.insert(client_id.to_owned(), (std::time::Instant::now(), c.clone()));
            }
            None => {
                map.remove(client_id);
            }
        }
        Ok(c)
    }

    /// Authenticates a client: a confidential client by its secret (constant-time
    /// comparison of SHA-256 hashes), a public one by its id alone. Failures are rate
    /// limited per address like logins (secret guessing).
    pub(crate) async fn authenticate_client(
        &self,
        ctx: &vaultpay_web::Ctx,
        presented: Option<PresentedClient>,
    ) -> Result<clients::Client, OAuthError> {
        let Some(p) = presented else {
            return Err(OAuthError::invalid_client(
                "client authentication is required",
            ));
        };
        let client = if p.client_id.len() <= 128 {
            self.cached_client(&p.client_id).await?
        } else {
            None
        };
        let ok = match (&client, &p.secret) {
            (Some(c), None) => c.public,
            (Some(c), Some(secret)) => match &c.secret_hash {
                Some(h) => vaultpay_core::crypto::ct_eq(
                    vaultpay_core::crypto::sha256_hex(secret.as_bytes()).as_bytes(),
                    h.as_bytes(),
                ),
                // A public client has no secret; presenting one is an error.
                None => false,
            },
            (None, _) => false,
        };
        match client {
            Some(c) if ok => Ok(c),
            _ => {
                let key = format!("oauth:client_fail:{}", ctx.ip_key());
                vaultpay_web::enforce(
                    &*self.limiter(),
                    &key,
                    self.config().rate_limits.login_per_ip,
                )
                .await?;
                metrics::counter!("auth_oauth_client_auth_failures_total").increment(1);
                Err(OAuthError::invalid_client("client authentication failed"))
            }
        }
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        clients::create_route, clients::list_route, clients::delete_route, authorize::authorize,
        authorize::signin, authorize::second_factor, authorize::consent, device::device_authorization,
        device::device_page, device::device_submit, device::approve_route, tokens::revoke,
        oidc::discovery, oidc::userinfo
    ),
    components(schemas(clients::NewClient, clients::ClientView, clients::CreatedClient, clients::ClientList,
        device::ApproveRequest, device::DeviceAuthForm, tokens::TokenOnlyForm, tokens::TokenParams)),
    tags((name = "oauth", description = "OAuth 2.0 / OpenID Connect provider"))
)]
struct OAuthApi;

/// The OpenAPI document of the OAuth/OIDC routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    <OAuthApi as utoipa::OpenApi>::openapi()
}

/// The OAuth/OIDC routes (merged into AuthShield's router).
pub(crate) fn routes() -> Router<AuthService> {
    Router::new()
        .route(
            "/v1/admin/clients",
            post(clients::create_route).get(clients::list_route),
        )
        .route("/v1/admin/clients/{id}", delete(clients::delete_route))
        .route("/oauth/authorize", get(authorize::authorize))
        .route("/oauth/authorize/signin", post(authorize::signin))
        .route(
            "/oauth/authorize/second-factor",
            post(authorize::second_factor),
        )
        .route("/oauth/authorize/consent", post(authorize::consent))
        .route("/oauth/authorize/upstream/{name}", post(upstream::start))
        .route(
            "/oauth/authorize/upstream/{name}/callback",
            get(upstream::callback),
        )
        .route(
            "/oauth/device_authorization",
            post(device::device_authorization),
        )
        .route(
            "/oauth/device",
            get(device::device_page).post(device::device_submit),
        )
        .route("/v1/oauth/device/approve", post(device::approve_route))
        .route("/oauth/revoke", post(tokens::revoke))
        .route("/.well-known/openid-configuration", get(oidc::discovery))
        .route("/userinfo", get(oidc::userinfo).post(oidc::userinfo))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn basic(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn scopes_are_split_once_each_in_order_and_long_ones_refused() {
        assert_eq!(
            split_scope(" api  openid api email openid "),
            ["api", "openid", "email"]
        );
        let many: Vec<String> = (0..16_000).map(|i| format!("s{i}")).collect();
        let joined = many.join(" ");
        assert_eq!(split_scope(&joined), many);
        let e = requested_scope(&joined).unwrap_err();
        assert!(
            matches!(
                e,
                OAuthError::OAuth {
                    error: "invalid_scope",
                    ..
                }
            ),
            "{e:?}"
        );
        let at_limit = "a".repeat(MAX_SCOPE_LEN);
        assert_eq!(requested_scope(&at_limit).unwrap(), [at_limit]);
    }

    #[test]
    fn basic_credentials_are_form_urldecoded() {
        use base64::Engine;
        let enc = base64::engine::general_purpose::STANDARD.encode("my%3Aclient:s%2Bc+ret");
        let (id, pw) = basic_credentials(&basic(&format!("Basic {enc}")))
            .unwrap()
            .unwrap();
        assert_eq!(id, "my:client");
        assert_eq!(pw, "s+c ret");
        assert!(basic_credentials(&basic("Basic !!!")).is_err());
        assert!(basic_credentials(&basic("Bearer x")).unwrap().is_none());
    }

    #[test]
    fn one_client_authentication_method_only() {
        use base64::Engine;
        let enc = base64::engine::general_purpose::STANDARD.encode("a:b");
        let h = basic(&format!("Basic {enc}"));
        assert!(presented_client(&h, None, Some("b")).is_err());
        assert!(presented_client(&h, Some("other"), None).is_err());
        let p = presented_client(&h, Some("a"), None).unwrap().unwrap();
        assert!(p.basic);
        let p = presented_client(&HeaderMap::new(), Some("pub"), None)
            .unwrap()
            .unwrap();
        assert!(p.secret.is_none());
        assert!(presented_client(&HeaderMap::new(), None, Some("s")).is_err());
        assert!(presented_client(&HeaderMap::new(), None, None)
            .unwrap()
            .is_none());
    }

    #[test]
    fn scopes_split_and_dedupe() {
        assert_eq!(split_scope("openid  email openid"), vec!["openid", "email"]);
        assert!(has_scope("openid email", "email"));
        assert!(!has_scope("openid emails", "email"));
    }
}
